"""The link-quality benchmark: degraded val images hashed as `terrahash jscc eval` hashes received ones."""
import json

import pytest


def test_link_quality_degrades_and_measures_every_row(trained, subset, tmp_path, capsys):
    from evaluation.link_quality import KINDS, SCALES, main

    out = tmp_path / "quality.json"
    assert main(["--model", str(trained / "run"), "--hasher", "teacher", "--data", str(subset), "--size", "64",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["degradation"]: r for r in report["rows"]}
    assert set(rows) == {f"downsample x{f}" for f in SCALES} | {f"{k} {s}" for k in KINDS for s in (1, 2, 3)}
    assert (report["queries"], report["database"]) == (6, 12)  # val against train: 3 classes x (2, 4)
    # A coarser downsampling and a stronger blur lose more of the image.
    assert rows["downsample x2"]["psnr"] > rows["downsample x4"]["psnr"] > rows["downsample x8"]["psnr"]
    assert rows["blur 1"]["psnr"] > rows["blur 3"]["psnr"]
    for row in report["rows"]:
        assert 0 <= row["bit_agreement"] <= 1 and 0 < row["map_all"] <= 1
        assert row["map_ratio"] == pytest.approx(row["map_all"] / report["map_all_clean"])
    assert "downsample x4" in capsys.readouterr().out
