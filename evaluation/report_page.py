"""A self-contained HTML page from a report's JSON: tables whose every number names the JSON path it
shows (``data-key``), and plots embedded as base64 PNGs, so the page opens without a network and a
test can check each shown figure against ``report.json``.

Paths are dotted keys into the report (``code_length.fast_split-64.image_to_image.map_all``); a
list index is a key too (``pareto.points.3.map_all``).
"""
from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Sequence

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 72rem; color: #1d2430; padding: 0 1rem; }
h1 { font-size: 1.6rem; } h2 { margin-top: 2.4rem; border-bottom: 1px solid #d8dde6; padding-bottom: .3rem; }
table { border-collapse: collapse; margin: .8rem 0 1.2rem; font-variant-numeric: tabular-nums; }
th, td { padding: .25rem .7rem; text-align: right; border-bottom: 1px solid #eef0f4; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f4f6f9; font-weight: 600; }
td.best { font-weight: 700; background: #eaf6ea; }
figure { margin: 1rem 0; } figure img { max-width: 100%; border: 1px solid #eef0f4; }
figcaption, p.note { color: #5b6472; font-size: .9rem; }
"""


def lookup(report: dict, path: str):
    """The value at a dotted ``path`` of ``report`` (KeyError naming the path if absent)."""
    value = report
    for part in path.split("."):
        try:
            value = value[int(part)] if isinstance(value, list) else value[part]
        except (KeyError, IndexError, ValueError, TypeError):
            raise KeyError(f"{path}: no {part!r} in the report") from None
    return value


def number(value, digits: int = 4) -> str:
    """How a figure is shown: floats with ``digits`` decimals, ints as they are, None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def cell(report: dict, path: str, digits: int = 4, best: bool = False) -> str:
    klass = ' class="best"' if best else ""
    return f'<td data-key="{html.escape(path)}"{klass}>{number(lookup(report, path), digits)}</td>'


def table(report: dict, rows: Sequence[tuple[str, str]], columns: Sequence[tuple[str, str]], digits: int = 4,
          corner: str = "", best: str | None = None, plain: Sequence[str] = ()) -> str:
    """A table of ``report`` figures: row (label, path prefix) x column (label, path suffix); the
    figure at ``prefix.suffix``. ``best``: "max" or "min" marks each column's best row, except in the
    ``plain`` columns (suffixes: sizes, bits)."""
    head = "".join(f"<th>{html.escape(label)}</th>" for label, _ in columns)
    marks = {}
    if best:
        for _, suffix in columns:
            if suffix in plain:
                continue
            values = {prefix: lookup(report, f"{prefix}.{suffix}") for _, prefix in rows}
            known = {p: v for p, v in values.items() if isinstance(v, (int, float))}
            if known:
                marks[suffix] = (max if best == "max" else min)(known.values())
    body = []
    for label, prefix in rows:
        cells = "".join(cell(report, f"{prefix}.{suffix}", digits,
                             best=suffix in marks and lookup(report, f"{prefix}.{suffix}") == marks[suffix])
                        for _, suffix in columns)
        body.append(f"<tr><th>{html.escape(label)}</th>{cells}</tr>")
    return (f"<table><thead><tr><th>{html.escape(corner)}</th>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


def png_of(figure) -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def image(png: bytes, alt: str, caption: str = "") -> str:
    data = base64.b64encode(png).decode("ascii")
    text = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">{text}</figure>'


def page(title: str, sections: Iterable[tuple[str, str, str]], intro: str = "") -> str:
    """The whole page: ``sections`` of (anchor id, heading, inner HTML), with a table of contents."""
    sections = list(sections)
    toc = " · ".join(f'<a href="#{anchor}">{html.escape(heading)}</a>' for anchor, heading, _ in sections)
    body = "".join(f'<section id="{anchor}"><h2>{html.escape(heading)}</h2>{inner}</section>'
                   for anchor, heading, inner in sections)
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><style>{STYLE}</style>"
            f"</head><body><h1>{html.escape(title)}</h1>{intro}<nav>{toc}</nav>{body}</body></html>")
