"""``report.html`` and its PNG plots from ``report.json`` (``evaluation.report``).

Every number on the page is a ``report_page.cell`` naming its JSON path, so the page can be checked
against the JSON (tests/evaluation/test_report_browser.py); plots and thumbnails are embedded as
data URIs: the page needs no network nor any file beside it.
"""
from __future__ import annotations

import base64
import html
import io

import numpy as np

from .report_page import cell, image, number, page, png_of, table

TASKS = (("image → image", "image_to_image"), ("text → image", "text_to_image"), ("image → text", "image_to_text"))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _has_text(entry: dict) -> bool:
    return entry["binary"]["text_to_image"] is not None


def code_length_html(report: dict, plots: dict) -> str:
    section = report["code_length"]
    names = section["order"]
    rows = [(n, f"code_length.models.{n}") for n in names]
    first = section["models"][names[0]]
    columns = [("bits", "bits"), ("i→i mAP@all", "binary.image_to_image.map_all"),
               ("i→i mAP@50", "binary.image_to_image.map_50"), ("i→i P@10", "binary.image_to_image.p_at_10")]
    if _has_text(first):
        columns += [("t→i mAP@all", "binary.text_to_image.map_all"), ("i→t mAP@all", "binary.image_to_text.map_all"),
                    ("t→i R@1", "binary.text_to_image.r1"), ("t→i R@5", "binary.text_to_image.r5"),
                    ("t→i R@10", "binary.text_to_image.r10"), ("mR", "binary.mr")]
    parts = ["<h3>Binary codes (Hamming ranking)</h3>", table(report, rows, columns, best="max", plain=("bits",))]
    ways = [("i→i " + w, f"{w}.image_to_image.map_all") for w in ("binary", "asymmetric", "float")]
    if _has_text(first):
        ways += [("t→i " + w, f"{w}.text_to_image.map_all") for w in ("binary", "asymmetric", "float")]
        ways += [("mR " + w, f"{w}.mr") for w in ("binary", "asymmetric", "float")]
    parts += ["<h3>Binary, asymmetric (float query against binary database) and float</h3>",
              table(report, rows, ways, best="max")]
    ceiling = section.get("recall_ceiling")
    if ceiling:
        parts.append(f'<p class="note">R@K ceiling of text → image on these queries (identical captions get '
                     f'identical codes): R@1 {cell_span(report, "code_length.recall_ceiling.r1", 1)}, R@5 '
                     f'{cell_span(report, "code_length.recall_ceiling.r5", 1)}, R@10 '
                     f'{cell_span(report, "code_length.recall_ceiling.r10", 1)} '
                     f'({ceiling["distinct_captions"]} distinct texts among {ceiling["captions"]} captions).</p>')
    students = [(f"{n} {v}", f"code_length.models.{n}.students.{v}") for n in names
                for v in section["models"][n]["students"]]
    if students:
        teacher_rows = [(f"{n} teacher", f"code_length.models.{n}") for n in names if section["models"][n]["students"]]
        cols = [c for c in columns if c[1].startswith("binary.")]
        parts += ["<h3>Teacher against its ONNX students (fp32, int8)</h3>",
                  table(report, sorted(teacher_rows + students), cols)]
    else:
        parts.append('<p class="note">No run has students (terrahash distill writes them to RUN/students).</p>')
    plots["code_length"] = _code_length_plot(section)
    plots["pr_curves"] = _pr_plot(section)
    parts += [image(plots["code_length"], "mAP@all against code length",
                    "mAP@all against code length, per config: binary (solid), asymmetric (dashed), float (dotted)."),
              image(plots["pr_curves"], "precision-recall curves", "Image → image precision and recall by Hamming radius.")]
    return "".join(parts)


def cell_span(report: dict, path: str, digits: int) -> str:
    return cell(report, path, digits).replace("<td", "<span", 1).replace("</td>", "</span>")


def _code_length_plot(section: dict) -> bytes:
    plt = _plt()
    entries = section["models"]
    tasks = [t for t in TASKS[:2] if all(e["binary"][t[1]] is not None for e in entries.values())]
    figure, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 3.6), squeeze=False)
    configs = sorted({e["config"] for e in entries.values()})
    for ax, (label, task) in zip(axes[0], tasks):
        for n, config in enumerate(configs):
            mine = sorted((e for e in entries.values() if e["config"] == config), key=lambda e: e["bits"])
            bits = [e["bits"] for e in mine]
            for way, style in (("binary", "-"), ("asymmetric", "--"), ("float", ":")):
                ax.plot(bits, [e[way][task]["map_all"] for e in mine], style, marker="o", color=f"C{n}",
                        label=f"{config} {way}" if task == tasks[0][1] else None)
        ax.set_xscale("log", base=2)
        every_bits = sorted({e["bits"] for e in entries.values()})
        ax.set_xticks(every_bits, [str(b) for b in every_bits])
        ax.minorticks_off()
        ax.set_xlabel("bits")
        ax.set_ylabel("mAP@all")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    figure.tight_layout(rect=(0, 0.13, 1, 1))  # room below the axes' labels for the legend
    figure.legend(loc="lower center", ncol=3, fontsize=8, bbox_to_anchor=(0.5, 0.0))
    return png_of(figure)


def _pr_plot(section: dict) -> bytes:
    plt = _plt()
    figure, ax = plt.subplots(figsize=(5.2, 4))
    for n, name in enumerate(section["order"]):
        curve = section["models"][name]["pr_curve"]
        ax.plot(curve["recall"], curve["precision"], marker=".", color=f"C{n % 10}", label=name)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return png_of(figure)


def baselines_html(report: dict) -> str:
    base = report["baselines"]
    rows = [(n, f"baselines.methods.{n}") for n in base["methods"]]
    columns = [("bits", "bits"), ("bytes/item", "bytes_per_item"), ("mAP@all", "map_all"), ("AP@50", "map_50"),
               ("P@10", "p_at_10")]
    parts = [f'<p class="note">Image → image on the frozen image features ({base["image_dim"]} dimensions), '
             f'fitted on {html.escape(base["fit_on"])}: random-hyperplane LSH, ITQ, float cosine and a FAISS PQ '
             "index (bits = sub-quantizers × bits each).</p>",
             table(report, rows, columns, best="max", plain=("bits", "bytes_per_item"))]
    fusion_rows = []
    if "fusion_pq" in base:
        fusion_rows += [(f"PQ {w}", f"baselines.fusion_pq.{w}") for w in ("image", "text", "average", "maximum")]
    for name in base.get("fusion_codes", {}):
        fusion_rows += [(f"{name} {w}", f"baselines.fusion_codes.{name}.{w}")
                        for w in ("image", "text", "average", "maximum")]
    if fusion_rows:
        parts += ["<h3>Per-modality indexes fused by the average or the maximum of their scores</h3>",
                  '<p class="note">Each query is a test image with its captions; each database item an image with its '
                  "captions. PQ: the multimodal paper's method on the frozen features (visual embedding; the mean "
                  "of the captions' sentence embeddings). Ours: an image-code index and a caption-code index "
                  "(the mean of the captions' codes), scored 1 − Hamming / bits. AP@50 as the paper reports it.</p>",
                  table(report, fusion_rows, columns[2:], best="max")]
    return "".join(parts)


def pareto_html(report: dict, plots: dict) -> str:
    section = report["pareto"]
    rows = [(p["name"] + (" ★" if p["on_front"] else ""), f"pareto.points.{i}") for i, p in enumerate(section["points"])]
    columns = [("family", "family"), ("mAP@all", "map_all"), ("bytes/item", "bytes_per_item"),
               ("latency p50 ms", "latency_ms_p50"), ("latency p99 ms", "latency_ms_p99"),
               ("Wh / 1k queries", "energy_wh_per_1k_queries"), ("on front", "on_front")]
    method = next(iter(section["costs"].values()))["energy_method"]
    plots["pareto"] = _pareto_plot(section)
    return "".join([
        f'<p class="note">Image → image mAP@all against the cost of serving it: bytes per item, and the latency and '
        f"energy of single-query top-{section['k']} searches on one core over a faiss index of "
        f"{number(section['database_size'])} items grown from the database codes ({number(section['queries'])} queries; "
        f"energy by codecarbon: {html.escape(method)}). ★: no other configuration is at least as good on every "
        "axis and better on one.</p>",
        table(report, rows, columns),
        image(plots["pareto"], "Pareto front", "mAP@all against each cost axis; filled markers are on the front.")])


def _pareto_plot(section: dict) -> bytes:
    plt = _plt()
    axes_list = [("bytes_per_item", "bytes per item"), ("latency_ms_p50", "latency p50 (ms)"),
                 ("energy_wh_per_1k_queries", "Wh per 1,000 queries")]
    figure, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    families = {"model": "C0", "student": "C2", "baseline": "C7"}
    for ax, (key, label) in zip(axes, axes_list):
        for p in section["points"]:
            if p.get(key) is None:
                continue
            color = families[p["family"]]
            ax.scatter(p[key], p["map_all"], color=color if p["on_front"] else "white", edgecolor=color, s=36)
            ax.annotate(p["name"], (p[key], p["map_all"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("mAP@all")
        ax.grid(alpha=0.3)
    return png_of(figure)


def fairness_html(report: dict, plots: dict) -> str:
    section = report["fairness"]
    rows = [(n, f"fairness.entries.{n}") for n in section["entries"]]
    columns = [("mean class AP", "mean"), ("worst class", "worst"), ("its AP", "worst_ap"), ("gap", "gap")]
    parts = ['<p class="note">Image → image mAP@all of each class\'s queries; the gap is the mean over classes '
             "minus the worst class.</p>", table(report, rows, columns)]
    plots["fairness"] = _fairness_plot(section, report["classes"])
    parts.append(image(plots["fairness"], "per-class AP", "Per-class AP of every model and baseline."))
    for name, found in section["confusion"].items():
        pairs = [(f"{p['query_class']} → {p['result_class']}", f"fairness.confusion.{name}.most_confused.{i}")
                 for i, p in enumerate(found["most_confused"])]
        if pairs:
            parts += [f"<h3>{html.escape(name)}: classes confused most (share of top-{found['k']} results)</h3>",
                      table(report, pairs, [("share", "share")])]
    return "".join(parts)


def _fairness_plot(section: dict, classes: list[str]) -> bytes:
    plt = _plt()
    names = list(section["entries"])
    values = np.array([[section["entries"][n]["per_class"].get(c, np.nan) for c in classes] for n in names])
    figure, ax = plt.subplots(figsize=(max(6, 0.45 * len(classes)), 0.32 * len(names) + 1.6))
    shown = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=70, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    figure.colorbar(shown, ax=ax, fraction=0.03)
    return png_of(figure)


def robustness_html(report: dict, plots: dict) -> str:
    section = report["robustness"]
    rows = [(f"{k} {s}", f"robustness.corruptions.{k}.{s}") for k, by in section["corruptions"].items() for s in by]
    columns = [("mAP@all", "map_all"), ("mAP drop", "map_drop"), ("bit-flip rate", "bit_flip_rate"),
               ("drift alarm rate", "alarm_rate")]
    plots["robustness"] = _robustness_plot(section)
    return "".join([
        f'<p class="note">{number(section["queries"])} test images ({html.escape(section["encoder"])}) corrupted at three '
        f"severities, ranked against the clean database codes. Clean mAP@all "
        f'{cell_span(report, "robustness.clean.map_all", 4)}.</p>',
        table(report, rows, columns),
        image(plots["robustness"], "robustness", "mAP@all of corrupted queries by severity (0: clean).")])


def _robustness_plot(section: dict) -> bytes:
    plt = _plt()
    figure, ax = plt.subplots(figsize=(6, 3.8))
    clean = section["clean"]["map_all"]
    for n, (kind, by) in enumerate(section["corruptions"].items()):
        severities = sorted(by, key=int)
        ax.plot([0] + [int(s) for s in severities], [clean] + [by[s]["map_all"] for s in severities], marker="o",
                color=f"C{n}", label=kind)
    ax.set_xticks([0, 1, 2, 3])
    ax.set_xlabel("severity")
    ax.set_ylabel("mAP@all")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return png_of(figure)


def drift_html(report: dict) -> str:
    section = report["drift"]
    rows = [("clean val", "drift.alarm_rate.clean_val"), ("clean test", "drift.alarm_rate.clean_test")]
    rows += [(f"{k} {s}", f"drift.alarm_rate.corruptions.{k}.{s}") for k, by in section["alarm_rate"]["corruptions"].items()
             for s in by]
    body = "".join(f"<tr><th>{html.escape(label)}</th>{cell(report, path)}</tr>" for label, path in rows)
    return (f'<p class="note">Per-bit means of windows of {number(section["window"])} query codes '
            f"({html.escape(section['encoder'])}) against the train codes': D = mean over bits of the squared z-score. "
            f"Threshold {cell_span(report, 'drift.threshold', 3)}: the {number(section['quantile'], 2)} quantile of D "
            "over windows of clean val queries. Serving exposes D as the Prometheus gauge "
            "<code>terrahash_query_drift</code>; when it fires, answers are flagged (serving/README.md).</p>"
            f"<table><thead><tr><th>queries</th><th>alarm rate</th></tr></thead><tbody>{body}</tbody></table>")


def thumbnail(path: str, size: int = 72) -> str:
    from PIL import Image

    with Image.open(path) as picture:
        picture = picture.convert("RGB")
        picture.thumbnail((size, size))
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def examples_html(report: dict) -> str:
    parts = ['<p class="note">Top results by Hamming distance (ties by id); a green frame marks a result of the '
             "query's class.</p>"]
    for name, queries in report["examples"]["models"].items():
        parts.append(f"<h3>{html.escape(name)}</h3>")
        for q in queries:
            if q["kind"] == "text":
                head = f"“{html.escape(q['text'])}”"
            else:
                head = f'<img class="thumb" src="{thumbnail(q["path"])}" alt="query image">'
            label = f" ({html.escape(q['label'])})" if q.get("label") else ""
            hits = "".join(
                f'<figure class="hit{" correct" if h["correct"] else ""}"><img src="{thumbnail(h["path"])}" '
                f'alt="{html.escape(h["class"])}"><figcaption>{html.escape(h["class"])}, d={h["distance"]}'
                "</figcaption></figure>" for h in q["results"])
            parts.append(f'<div class="example"><div class="query">{head}{label}</div><div class="hits">{hits}</div></div>')
    return "".join(parts)


def peers_html(report: dict) -> str:
    peers = report["peers"]
    parts = [f'<p class="note">{html.escape(peers.get("source", ""))}; {html.escape(peers.get("note", ""))}</p>']
    for set_name, found in peers.get("sets", {}).items():
        rows = [(name, f"peers.sets.{set_name}.indexes.{name}") for name in found["indexes"]]
        columns = [("recall@10", "recall_at_10"), ("p50 ms", "latency_ms_p50"), ("p99 ms", "latency_ms_p99"),
                   ("build s", "build_seconds"), ("memory MB", "memory_mb")]
        parts += [f"<h3>{html.escape(set_name)} codes ({number(found['size'])} × {found['bits']} bits)</h3>",
                  table(report, rows, columns)]
    missing = peers.get("missing", {})
    if missing:
        parts.append("<ul>" + "".join(f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in missing.items())
                     + "</ul>")
    return "".join(parts)


def field_links_html(report: dict, plots: dict) -> str:
    from .field_links import snr_key, figure_at, plot, table_hops

    section = report["field_links"]
    hops = table_hops(section)
    plots["field_links"] = plot(section, hops=sorted({1, hops}))
    schemes = [s for s in ("learned", "bpsk", "qpsk") if s in section["grid"]]
    rows = []
    for n in section["uses"]:
        cells = []
        for snr in section["snrs_db"]:
            for scheme in schemes:
                path = f"field_links.grid.{scheme}.h{hops}.{snr_key(snr)}.n{n}"
                cells += ([cell(report, f"{path}.map_ratio", 3), cell(report, f"{path}.bit_agreement", 3)]
                          if figure_at(section, scheme, hops, snr, n) is not None else ["<td>-</td>", "<td>-</td>"])
        rows.append(f"<tr><th>{number(n)}</th>{''.join(cells)}</tr>")
    head = "".join(f'<th colspan="2">{snr:g} dB, {html.escape(scheme)}</th>' for snr in section["snrs_db"]
                   for scheme in schemes)
    pixel = []
    for model in ("aligned", "baseline"):
        grid = section["grid"].get(f"pixel-{model}", {}).get(f"h{hops}", {})
        for n in sorted({int(key[1:]) for by in grid.values() for key in by}):
            cells = [cell(report, f"field_links.grid.pixel-{model}.h{hops}.{snr_key(snr)}.n{n}.{name}", 3)
                     if f"n{n}" in grid.get(snr_key(snr), {}) else "<td>-</td>"
                     for snr in section["snrs_db"] for name in ("map_ratio", "bit_agreement")]
            pixel.append(f"<tr><th>pixels, {html.escape(model)}, {number(n)} uses</th>{''.join(cells)}</tr>")
    pixel_head = "".join(f'<th colspan="2">{snr:g} dB</th>' for snr in section["snrs_db"])
    return "".join([
        f'<p class="note">{number(section["queries"])} {html.escape(section["split"])} images sent as their image '
        f"student's ({html.escape(section.get('student', 'unknown'))}) {number(section['bits'])}-bit code over {hops} decode-and-forward hops: received-query mAP@all as "
        f"a ratio to clean queries ({cell_span(report, 'field_links.map_all_clean', 4)}) and, second, the bit "
        f"agreement with the clean code. From {html.escape(section['source'])}.</p>",
        f"<table><thead><tr><th>channel uses</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>",
        (f"<table><thead><tr><th>pixel links (DeepJSCC of the image), {hops} hops</th>{pixel_head}</tr>"
         f"</thead><tbody>{''.join(pixel)}</tbody></table>" if pixel else ""),
        image(plots["field_links"], "field queries over radio links",
              "mAP ratio against channel uses per hop, per SNR: learned codec (solid), repetition-coded BPSK (dashed), "
              "1 hop (faint) and more; pixel links as points; dotted: Shannon's minimum for the code's exact bits.")])


EXTRA_STYLE = """<style>
.example { display: flex; gap: 1rem; align-items: center; margin: .5rem 0; }
.example .query { width: 14rem; font-size: .9rem; }
.hits { display: flex; gap: .4rem; } .hit { margin: 0; text-align: center; font-size: .75rem; }
.hit img { border: 3px solid #ddd; } .hit.correct img { border-color: #2e9b4e; }
</style>"""


def render(report: dict) -> tuple[str, dict[str, bytes]]:
    """(report.html, {plot name: PNG bytes})."""
    plots: dict[str, bytes] = {}
    sections = [("code-length", "Code length dial", code_length_html(report, plots)),
                ("baselines", "Baselines", baselines_html(report)),
                ("pareto", "Pareto front", pareto_html(report, plots)),
                ("fairness", "Fairness across classes", fairness_html(report, plots)),
                ("robustness", "Robustness to corruptions", robustness_html(report, plots)),
                ("drift", "Drift detector", drift_html(report)),
                ("examples", "Examples", examples_html(report)),
                ("peers", "Peer indexes", peers_html(report))]
    if "field_links" in report:
        sections.append(("field-links", "Field queries over radio links", field_links_html(report, plots)))
    database = report["database"]
    intro = (f'<p class="note">{html.escape(report["dataset"])}: {number(database["queries"])} test queries against '
             f"a database of {html.escape(' + '.join(database.get('splits') or ['every other image']))}; relevance by class "
             f"({len(report['classes'])} classes). Every figure here is in report.json.</p>")
    text = page("TerraHash evaluation report", sections, intro)
    return text.replace("</head>", EXTRA_STYLE + "</head>", 1), plots
