"""Field queries over radio links at a glance: ``terrahash jscc eval --json``'s grid as one plot and one table.

The plot has one panel per SNR: received-query mAP@all as a ratio to clean queries against the complex
channel uses per hop, for the code links (the learned codecs, solid; repetition-coded BPSK, dashed) at
each hop count, the pixel links (DeepJSCC of the 128 px image, aligned and baseline) as points at their
own number of channel uses, and Shannon's minimum for the code's exact bits over one hop,
bits / log2(1 + SNR), as a vertical line: below it no code can deliver every bit, whatever its design.

``summary`` reduces the eval JSON to what the report shows (``report["field_links"]``): per scheme, hop
count, SNR and channel uses, the mAP ratio and the bit agreement (the instance figure: the share of the
received code's bits equal to the clean code's). The report's HTML section and the training README's
table and picture come from it:

    python -m evaluation.field_links --eval runs/jscc-cpu/eval.json --png docs/img/field_links.png [--hops 3]
"""
from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

CODE_SCHEMES = ("learned", "bpsk", "qpsk")  # how the table names a code link: the learned codec, repetition on ...
PIXEL_MODELS = ("aligned", "baseline")


def shannon_uses(bits: int, snr_db: float) -> float:
    """The fewest complex channel uses that can carry ``bits`` exact bits at ``snr_db`` over one AWGN hop."""
    return bits / math.log2(1.0 + 10.0 ** (snr_db / 10.0))


def snr_key(snr_db: float) -> str:
    """``-5dB``, ``-12p5dB``: no dot, so that the report's dotted JSON paths can name it."""
    return f"{snr_db:g}dB".replace(".", "p")


def summary(report: dict, source: str = "") -> dict:
    """``report``: a ``terrahash jscc eval --json`` file's contents (code points, and pixel points when the
    folder has pixel links). Returns {"bits", "map_all_clean", "snrs_db", "hops", "uses", "shannon_uses",
    "grid": {scheme: {"h<hops>": {"<snr>dB": {"n<uses>": {"map_ratio", "bit_agreement"}}}}}}, schemes being
    ``learned``, ``bpsk``, ``qpsk`` (repetition) and the pixel links' ``pixel-aligned``, ``pixel-baseline``
    (decode-and-forward only)."""
    if "code" not in report:
        raise ValueError("the eval report has no code links (train them with protocol code, then `terrahash jscc "
                         "eval --json`)")
    grid: dict = {}
    for p in report["points"]:
        if p["protocol"] == "code":
            if not p["carried"]:
                continue
            scheme = p["modulation"] or p["scheme"]
        elif p["protocol"] == "df":
            scheme = f"pixel-{p['model']}"
        else:
            continue
        entry = {"map_ratio": p["map_ratio"], "bit_agreement": p["bit_agreement"]}
        grid.setdefault(scheme, {}).setdefault(f"h{p['hops']}", {}).setdefault(
            snr_key(p["snr_db"]), {})[f"n{p['channel_uses']}"] = entry
    code = [p for p in report["points"] if p["protocol"] == "code"]
    bits = report["code"]["bits"]
    snrs = sorted({p["snr_db"] for p in code}, reverse=True)
    return {"source": source, "bits": bits, "map_all_clean": report["code"]["map_all_clean"],
            "student": report["code"].get("student", {}).get("quantization", "unknown"),
            "pixel_map_all_clean": report.get("map_all_clean"), "split": report["code"].get("split", "test"),
            "queries": report["code"]["queries"], "snrs_db": snrs, "hops": sorted({p["hops"] for p in code}),
            "uses": sorted({p["channel_uses"] for p in code}),
            "shannon_uses": {snr_key(s): round(shannon_uses(bits, s), 1) for s in snrs}, "grid": grid}


def table_hops(section: dict) -> int:
    """The hop count a table shows: 3 (the issue's and the plot's) when measured, else the most."""
    return 3 if 3 in section["hops"] else max(section["hops"])


def figure_at(section: dict, scheme: str, hops: int, snr_db: float, uses: int, name: str = "map_ratio"):
    """One figure of the summary's grid, or None where the grid has no such point."""
    point = section["grid"].get(scheme, {}).get(f"h{hops}", {}).get(snr_key(snr_db), {}).get(f"n{uses}")
    return None if point is None else point[name]


def plot(section: dict, hops: Sequence[int] = (1, 3)) -> bytes:
    """The picture (module docstring) as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report_page import png_of

    snrs = section["snrs_db"]
    figure, axes = plt.subplots(1, len(snrs), figsize=(4.6 * len(snrs), 3.8), sharey=True, squeeze=False)
    styles = {"learned": ("-", "C0", "learned codec"), "bpsk": ("--", "C1", "repetition, BPSK")}
    widths = {h: 1.0 + 1.2 * (n == len(hops) - 1) for n, h in enumerate(hops)}
    for ax, snr in zip(axes[0], snrs):
        for scheme, (line, color, label) in styles.items():
            for h in hops:
                points = sorted((int(n[1:]), v["map_ratio"]) for n, v in section["grid"].get(scheme, {}).get(
                    f"h{h}", {}).get(snr_key(snr), {}).items())
                if points:
                    ax.plot(*zip(*points), line, color=color, marker="o", markersize=3, linewidth=widths[h],
                            alpha=0.45 if widths[h] < 2 else 1.0, label=f"{label}, {h} hop{'s' * (h > 1)}")
        for model, marker in zip(PIXEL_MODELS, ("s", "^")):
            for h in hops:
                grid = section["grid"].get(f"pixel-{model}", {}).get(f"h{h}", {}).get(snr_key(snr), {})
                for n, v in grid.items():
                    ax.plot(int(n[1:]), v["map_ratio"], marker, color="C3" if model == "aligned" else "C7",
                            alpha=0.45 if widths[h] < 2 else 1.0, label=f"pixels, {model}, {h} hop{'s' * (h > 1)}")
        ax.axvline(section["shannon_uses"][snr_key(snr)], color="k", linewidth=0.8, linestyle=":",
                   label=f"Shannon minimum, {section['bits']} exact bits")
        ax.axhline(0.95, color="0.6", linewidth=0.6)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{snr:g} dB per hop")
        ax.set_xlabel("complex channel uses per hop")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mAP@all / clean")
    axes[0][0].set_ylim(0, 1.05)
    handles, labels = axes[0][-1].get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    figure.tight_layout()
    figure.legend(unique.values(), unique.keys(), loc="upper center", ncol=4, fontsize=7, frameon=False,
                  bbox_to_anchor=(0.5, 0.0))  # below the axes' labels
    return png_of(figure)


def markdown(section: dict, hops: int = 3, schemes: Sequence[str] = ("learned", "bpsk")) -> str:
    """The table at ``hops``: rows channel uses, per SNR the mAP ratio and (in brackets) bit agreement of each
    scheme; the pixel links' row at their own channel uses."""
    snrs = section["snrs_db"]
    head = "| channel uses | " + " | ".join(f"{s:g} dB {scheme}" for s in snrs for scheme in schemes) + " |"
    lines = [head, "|" + "---|" * (1 + len(snrs) * len(schemes))]

    def shown(scheme: str, snr: float, n: int) -> str:
        ratio = figure_at(section, scheme, hops, snr, n)
        agreement = figure_at(section, scheme, hops, snr, n, "bit_agreement")
        return "-" if ratio is None else f"{ratio:.3f} ({agreement:.3f})"

    for n in section["uses"]:
        lines.append(f"| {n:,} | " + " | ".join(shown(scheme, s, n) for s in snrs for scheme in schemes) + " |")
    for model in PIXEL_MODELS:
        grid = section["grid"].get(f"pixel-{model}", {}).get(f"h{hops}", {})
        uses = sorted({int(n[1:]) for by in grid.values() for n in by})
        for n in uses:
            cells = [shown(f"pixel-{model}", s, n) if scheme == schemes[0] else "" for s in snrs for scheme in schemes]
            lines.append(f"| {n:,} (pixels, {model}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.field_links", description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval", required=True, help="a `terrahash jscc eval --json` file")
    parser.add_argument("--png", help="write the plot here")
    parser.add_argument("--hops", type=int, default=3, help="hop count of the printed table (default: %(default)s)")
    args = parser.parse_args(argv)
    section = summary(json.loads(Path(args.eval).read_text()), args.eval)
    if args.png:
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        Path(args.png).write_bytes(plot(section, hops=(1, args.hops) if args.hops != 1 else (1,)))
    print(markdown(section, args.hops))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
