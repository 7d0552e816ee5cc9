"""Corruptions of the report's robustness section, on real UCM scenes: deterministic per seed, the
image's shape kept, and a stronger severity always further from the original."""

import numpy as np
import pytest
from PIL import Image

from evaluation.corruptions import KINDS, SEVERITIES, corrupt

RANDOM = {"gaussian_noise", "brightness_snow", "cloud"}  # the kinds that draw from the seed


@pytest.fixture(scope="module")
def scenes(ucm_dir) -> list[np.ndarray]:
    paths = sorted((ucm_dir / "images").rglob("*.tif"))[::500][:3] or sorted((ucm_dir / "images").rglob("*.*"))[:3]
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def _moved(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def _lost(rotated: np.ndarray, image: np.ndarray) -> float:
    """Fraction of a rotated image filled with the original's mean colour (the corners rotated out)."""
    fill = np.array([int(v) for v in image.reshape(-1, 3).mean(axis=0)])
    return float((rotated == fill).all(axis=2).mean())


@pytest.mark.parametrize("kind", KINDS)
def test_each_corruption_is_deterministic_per_seed_and_grows_with_severity(scenes, kind):
    for image in scenes:
        moved = []
        for severity in SEVERITIES:
            out = corrupt(image, kind, severity, seed=7)
            assert out.shape == image.shape and out.dtype == np.uint8
            assert np.array_equal(out, corrupt(image, kind, severity, seed=7))  # same seed: same pixels
            if kind in RANDOM:
                assert not np.array_equal(out, corrupt(image, kind, severity, seed=8))
            moved.append(_lost(out, image) if kind == "rotation" else _moved(out, image))
        assert 0 < moved[0] < moved[1] < moved[2], (kind, moved)
    assert np.array_equal(scenes[0], scenes[0].copy())  # the input is never written to


def test_clouds_cover_about_the_severity_fraction(scenes):
    image = np.zeros((256, 256, 3), np.uint8)  # black ground: cloud pixels are the bright ones
    for severity, cover in zip(SEVERITIES, (0.10, 0.25, 0.40)):
        seen = (corrupt(image, "cloud", severity, seed=3).mean(axis=2) > 110).mean()
        assert cover <= seen <= cover + 0.25, (severity, seen)


def test_bad_arguments_are_refused_by_name(scenes):
    with pytest.raises(ValueError, match="unknown corruption 'fog'.*gaussian_noise"):
        corrupt(scenes[0], "fog", 1)
    with pytest.raises(ValueError, match="severity must be one of"):
        corrupt(scenes[0], "blur", 4)
    with pytest.raises(ValueError, match="RGB uint8"):
        corrupt(scenes[0].astype(np.float32), "blur", 1)
    with pytest.raises(ValueError, match="RGB uint8"):
        corrupt(scenes[0][..., 0], "blur", 1)
