"""Robustness figures with a small deterministic encoder (signs of a scene's colour layout against
the mean) on real UCM scenes: each figure equals its direct computation, runs repeat exactly, and
the drift detector fires more on strong noise than on clean queries."""
import numpy as np
import pytest
from PIL import Image

from evaluation import metrics
from evaluation.corruptions import corrupt
from evaluation.robustness import robustness
from serving.index.drift import BitDrift, choose_threshold


def layout_codes(images: list[np.ndarray]) -> np.ndarray:
    """64-bit codes: each cell of an 8x8 grid of each colour channel brighter than the image's mean
    (bit j = cell j of channel j % 3)."""
    out = []
    for image in images:
        small = np.asarray(Image.fromarray(image).resize((8, 8), Image.BILINEAR), dtype=np.float32)
        cells = np.stack([small[..., c].ravel() for c in range(3)], axis=1)  # (64, 3)
        pick = cells[np.arange(64), np.arange(64) % 3]
        out.append(np.where(pick >= small.mean(), 1, -1))
    return np.asarray(out, dtype=np.int8)


@pytest.fixture(scope="module")
def scenes(ucm_dir):
    import json

    entries = json.loads((ucm_dir / "dataset_ucm.json").read_text())["images"]
    chosen = [e for e in entries if e["class"] in ("beach", "forest", "parkinglot")][::4][:60]
    images = [np.asarray(Image.open(ucm_dir / e["filepath"] / e["filename"]).convert("RGB").resize((96, 96)))
              for e in chosen]
    labels = np.array([("beach", "forest", "parkinglot").index(e["class"]) for e in chosen])
    return images, labels


def test_each_figure_is_its_direct_computation_and_runs_repeat(scenes):
    images, labels = scenes
    queries, q_labels, db_images, db_labels = images[:20], labels[:20], images[20:], labels[20:]
    db_codes = layout_codes(db_images)
    kinds, severities = ("gaussian_noise", "jpeg"), (1, 3)
    found = robustness(layout_codes, queries, q_labels, db_codes, db_labels, kinds=kinds, severities=severities,
                       seed=4, progress=False)
    assert found == robustness(layout_codes, queries, q_labels, db_codes, db_labels, kinds=kinds,
                               severities=severities, seed=4, progress=False)
    relevance = metrics.relevance_from_labels(q_labels, db_labels)
    clean = layout_codes(queries)
    clean_map = metrics.mean_average_precision(metrics.hamming_distances(clean, db_codes), relevance)
    assert found["clean"]["map_all"] == clean_map
    for kind in kinds:
        for severity in severities:
            codes = layout_codes([corrupt(image, kind, severity, 4 * 1_000_003 + i) for i, image in enumerate(queries)])
            want = metrics.mean_average_precision(metrics.hamming_distances(codes, db_codes), relevance)
            got = found["corruptions"][kind][str(severity)]
            assert got["map_all"] == want and got["map_drop"] == pytest.approx(clean_map - want)
            assert got["bit_flip_rate"] == (codes != clean).mean()
            assert got["alarm_rate"] is None  # no detector given
    assert found["corruptions"]["gaussian_noise"]["3"]["bit_flip_rate"] > found["corruptions"]["jpeg"]["1"]["bit_flip_rate"]


def test_the_detector_fires_on_strong_noise_more_than_on_clean_queries(scenes):
    images, labels = scenes
    codes = layout_codes(images)
    detector = choose_threshold(BitDrift.fit(codes[20:]), codes[:20], window=8, quantile=0.95, trials=200)
    found = robustness(layout_codes, images[:20], labels[:20], codes[20:], labels[20:], detector, window=8,
                       kinds=("gaussian_noise",), severities=(3,), progress=False)
    assert found["corruptions"]["gaussian_noise"]["3"]["alarm_rate"] > found["clean"]["alarm_rate"]
