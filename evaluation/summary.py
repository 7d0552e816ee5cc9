"""A Markdown table over several `terrahash eval` JSON reports (one row per model)."""
from __future__ import annotations

import json
from pathlib import Path

COLUMNS = (  # (header, path into the report, scale)
    ("i2i mAP@all", ("image_to_image", "map_all"), 1),
    ("i2i mAP@50", ("image_to_image", "map_50"), 1),
    ("i2i P@10", ("image_to_image", "p_at_10"), 1),
    ("t2i mAP@all", ("text_to_image", "map_all"), 1),
    ("i2t mAP@all", ("image_to_text", "map_all"), 1),
    ("t2i R@1/5/10", ("text_to_image", ("r1", "r5", "r10")), 1),
    ("i2t R@1/5/10", ("image_to_text", ("r1", "r5", "r10")), 1),
    ("mR", ("mr",), 1),
)


def _cell(report: dict, path: tuple) -> str:
    if len(path) == 1:
        return f"{report[path[0]]:.1f}"
    task, key = path
    if isinstance(key, tuple):
        return "/".join(f"{report[task][k]:.1f}" for k in key)
    return f"{report[task][key]:.4f}"


def markdown_table(reports: list[dict]) -> str:
    """Rows sorted by config then bits; binary figures, with the float mR for comparison."""
    header = ["config", "bits", *(c[0] for c in COLUMNS), "mR (float)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(reports, key=lambda r: (r["config"], r["bits"])):
        cells = [r["config"], str(r["bits"]), *(_cell(r, c[1]) for c in COLUMNS), f"{r['float']['mr']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarize(paths: list[str | Path]) -> str:
    return markdown_table([json.loads(Path(p).read_text()) for p in paths])
