"""The field-link grid as the report and the training README show it: summary, plot, table, HTML section."""
import math
import re

import numpy as np
import pytest


def eval_report() -> dict:
    """A `jscc eval --json` report: code points of class-structured 64-bit codes, and two pixel points."""
    from evaluation.code_link_eval import link_points

    rng = np.random.default_rng(0)
    centres = np.where(rng.random((4, 64)) < 0.5, -1.0, 1.0)
    q_labels, db_labels = np.repeat(np.arange(4), 5), np.repeat(np.arange(4), 20)

    def codes(labels):
        out = centres[labels].copy()
        out[rng.random(out.shape) < 0.1] *= -1
        return out

    code = link_points(codes(q_labels), q_labels, codes(db_labels), db_labels, hops=(1, 3), snrs_db=(-5.0, -15.0),
                       uses=(32, 64, 256), modulations=("bpsk",))
    pixel = [{"protocol": "df", "hops": 3, "snr_db": snr, "model": model, "channel_uses": 16384, "map_ratio": ratio,
              "bit_agreement": 0.6, "map_all": 0.2, "psnr": 18.0, "ms_ssim": 0.5}
             for snr, model, ratio in ((-5.0, "aligned", 0.24), (-15.0, "baseline", 0.13))]
    return {"split": "test", "map_all_clean": 0.9, "points": pixel + code.pop("points"),
            "code": {**code, "split": "test", "queries": 20}}


def test_shannon_minimum_is_the_issues_figure():
    from evaluation.field_links import shannon_uses

    assert [math.ceil(shannon_uses(64, s)) for s in (-5, -10, -15)] == [162, 466, 1425]


def test_summary_plot_and_table():
    from evaluation.field_links import figure_at, markdown, plot, summary

    section = summary(eval_report(), "eval.json")
    assert section["snrs_db"] == [-5.0, -15.0] and section["hops"] == [1, 3] and section["uses"] == [32, 64, 256]
    assert "n32" not in section["grid"]["bpsk"]["h3"]["-5dB"]  # BPSK cannot carry 64 bits in 32 uses
    assert figure_at(section, "pixel-aligned", 3, -5.0, 16384) == 0.24
    assert figure_at(section, "bpsk", 3, -5.0, 64) is not None and figure_at(section, "learned", 3, -5.0, 64) is None
    assert plot(section).startswith(b"\x89PNG")
    table = markdown(section, hops=3)
    assert table.splitlines()[0] == "| channel uses | -5 dB learned | -5 dB bpsk | -15 dB learned | -15 dB bpsk |"
    row = next(line for line in table.splitlines() if line.startswith("| 256 |"))
    ratio, agreement = (figure_at(section, "bpsk", 3, -5.0, 256, name) for name in ("map_ratio", "bit_agreement"))
    assert f"{ratio:.3f} ({agreement:.3f})" in row
    assert "| 16,384 (pixels, aligned) |" in table
    with pytest.raises(ValueError, match="no code links"):
        summary({"points": [], "map_all_clean": 0.9})


def test_report_section_shows_the_summarys_figures():
    from evaluation.field_links import summary
    from evaluation.report_html import field_links_html
    from evaluation.report_page import lookup, number

    report = {"field_links": summary(eval_report(), "eval.json")}
    plots = {}
    html = field_links_html(report, plots)
    assert plots["field_links"].startswith(b"\x89PNG")
    keys = re.findall(r'data-key="([^"]+)"[^>]*>([^<]*)<', html)
    assert len(keys) > 8
    for path, shown in keys:
        digits = 4 if path.endswith("map_all_clean") else 3
        assert shown == number(lookup(report, path), digits)
    assert "field_links.grid.pixel-aligned.h3.-5dB.n16384.map_ratio" in dict(keys)
