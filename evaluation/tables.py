"""The printed form of a ``terrahash eval`` report: title, figures, footnotes, free-text figures."""
from __future__ import annotations

from .ceiling import footnote
from .retrieval import LEAVE_ONE_OUT, SIMILARITIES, format_table


def title(report: dict) -> str:
    """What was measured: the dataset and split, the model, and whether it is a transfer figure."""
    model = f"{report['bits']} bits ({report['config']})"
    if not report.get("transfer"):
        return f"{report['dataset']} {report['split']} split, {model}:"
    trained = report["trained_on"]
    source = trained.get("dataset") or "its training data"
    return (f"TRANSFER figures: model {model} trained on {source} ({len(trained['classes'])} classes), evaluated on "
            f"{report['dataset']} ({len(report['classes'])} classes), {report['split']} split; relevance by "
            f"{report['dataset']}'s classes ({'; '.join(report['transfer_reasons'])}):")


def database_line(report: dict) -> str:
    db = report["database"]
    if db.get("rule") == LEAVE_ONE_OUT:
        return (f"database: leave-one-out, every one of the {db['images']} images a query against all the others "
                f"({db['why']})")
    return (f"queries: {db['queries']} {report['split']} images, {db['query_captions']} captions; database: "
            f"{db['images']} images of {' + '.join(db['splits'])}")


def footnotes(report: dict) -> tuple[str, ...]:
    notes = []
    if report["text_to_image"] is None:
        notes.append("- text figures: the queried images have no captions (image-only set)")
    ceiling = footnote(report.get("recall_ceiling"), report["split"])
    if ceiling:
        notes.append(ceiling)
    return tuple(notes)


def free_text_table(report: dict, worst: int | None = None) -> str:
    """Free-text figures beside the dataset's own text-to-image mAP, then the per-class mAP, worst
    (by binary mAP) first; ``worst`` limits how many classes are listed."""
    free = report["free_text"]
    kinds = list(SIMILARITIES)
    head = f"{'metric':<28}" + "".join(f"{k:>12}" for k in kinds)
    lines = [f"free-text queries ({free['name']}: {free['queries']} queries) against the same database:", head]
    for name in ("map_all", "map_50", "p_at_10"):
        lines.append(f"{'free_text.' + name:<28}" + "".join(f"{free[k][name]:>12.4f}" for k in kinds))
    own = [(report if k == "binary" else report[k])["text_to_image"] for k in kinds]
    if own[0] is not None:
        lines.append(f"{'captions t2i.map_all':<28}" + "".join(f"{o['map_all']:>12.4f}" for o in own))
    per_class = sorted(free["binary"]["per_class"], key=lambda c: (free["binary"]["per_class"][c], c))
    lines.append("free-text mAP by class, worst first:")
    for c in per_class[:worst]:
        lines.append(f"  {c:<26}" + "".join(f"{free[k]['per_class'][c]:>12.4f}" for k in kinds))
    for key, label in (("classes_left_out", "query classes not in the dataset (left out)"),
                       ("classes_without_queries", "dataset classes without queries")):
        if free[key]:
            lines.append(f"  {label}: {', '.join(free[key])}")
    return "\n".join(lines)


def format_report(report: dict) -> str:
    """The whole printed report of ``terrahash eval``."""
    parts = [format_table(report, report["float"], title=f"{title(report)}\n{database_line(report)}",
                          asymmetric=report.get("asymmetric"), footnotes=footnotes(report))]
    if "free_text" in report:
        parts.append(free_text_table(report))
    if (report.get("per_class") or {}).get("image_to_image"):
        parts.append(per_class_line(report))
    return "\n\n".join(parts)


def per_class_line(report: dict) -> str:
    """The worst classes by image-to-image AP (binary), beside the mean over classes."""
    from evaluation.metrics import worst_class

    per_class = report["per_class"]["image_to_image"]
    worst = worst_class(per_class)
    lowest = sorted(per_class.items(), key=lambda item: (item[1], item[0]))[:3]
    return (f"per-class image-to-image mAP@all (binary): mean over classes {worst['mean']:.3f}; lowest: "
            + ", ".join(f"{c} {v:.3f}" for c, v in lowest) + f" (gap {worst['gap']:.3f})")
