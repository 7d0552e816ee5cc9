"""A Markdown table over several `terrahash eval` JSON reports (one row per model).

A figure a report lacks (the text figures of an image-only set) shows as "-". A transfer report
(model evaluated on another dataset than its training one) names the dataset in its config cell.
When any report has free-text figures, a column gives their binary text-to-image mAP. Above the
table, the text-to-image R@K ceiling of each dataset and split (``evaluation.ceiling``).
"""
from __future__ import annotations

import json
from pathlib import Path

COLUMNS = (  # (header, path into the report)
    ("i2i mAP@all", ("image_to_image", "map_all")),
    ("i2i mAP@50", ("image_to_image", "map_50")),
    ("i2i P@10", ("image_to_image", "p_at_10")),
    ("t2i mAP@all", ("text_to_image", "map_all")),
    ("i2t mAP@all", ("image_to_text", "map_all")),
    ("t2i R@1/5/10", ("text_to_image", ("r1", "r5", "r10"))),
    ("i2t R@1/5/10", ("image_to_text", ("r1", "r5", "r10"))),
    ("mR", ("mr",)),
)
MISSING = "-"


def _get(report: dict | None, *keys):
    for key in keys:
        if not isinstance(report, dict) or report.get(key) is None:
            return None
        report = report[key]
    return report


def _cell(report: dict, path: tuple) -> str:
    if len(path) == 1:
        value = _get(report, path[0])
        return MISSING if value is None else f"{value:.1f}"
    task, key = path
    if isinstance(key, tuple):
        values = [_get(report, task, k) for k in key]
        return MISSING if None in values else "/".join(f"{v:.1f}" for v in values)
    value = _get(report, task, key)
    return MISSING if value is None else f"{value:.4f}"


def _config(report: dict) -> str:
    if not report.get("transfer"):
        return report["config"]
    return f"{report['config']} (transfer: on {report['dataset']} {report['split']})"


def ceiling_notes(reports: list[dict]) -> list[str]:
    """One line per dataset and split whose reports carry a text-to-image R@K ceiling."""
    seen = {}
    for r in reports:
        ceiling = r.get("recall_ceiling")
        if ceiling:
            seen[(r["dataset"], r["split"])] = "/".join(f"{ceiling[k]:.1f}" for k in ("r1", "r5", "r10"))
    return [f"t2i R@1/5/10 cannot exceed {bounds} on {dataset} {split} (identical captions get identical codes)"
            for (dataset, split), bounds in seen.items()]


def markdown_table(reports: list[dict]) -> str:
    """Rows sorted by config then bits; binary figures, with the float mR for comparison."""
    free_text = any("free_text" in r for r in reports)
    notes = ceiling_notes(reports)
    header = ["config", "bits", *(c[0] for c in COLUMNS), *(["free-text t2i mAP@all"] if free_text else []),
              "mR (float)"]
    lines = [*notes, *([""] if notes else []), "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(reports, key=lambda r: (r["config"], r["bits"], r.get("dataset", ""))):
        cells = [_config(r), str(r["bits"]), *(_cell(r, c[1]) for c in COLUMNS)]
        if free_text:
            cells.append(_cell(r.get("free_text") or {}, ("binary", "map_all")))
        cells.append(_cell(r.get("float") or {}, ("mr",)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarize(paths: list[str | Path]) -> str:
    return markdown_table([json.loads(Path(p).read_text()) for p in paths])
