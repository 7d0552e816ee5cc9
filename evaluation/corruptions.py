"""Image corruptions for the robustness section of the report: what a sensor, the weather or a
link does to a scene, at three severities each.

Every function takes an RGB image as a uint8 array (H, W, 3) and returns a new one of the same
shape; the random ones draw from ``numpy.random.default_rng(seed)`` only, so one (image, kind,
severity, seed) always gives the same pixels. Severity 1 is mild, 3 is strong; a stronger
severity moves the image further from the original for every kind (for rotation: loses more of
it; tests/evaluation/test_corruptions.py).

=====================  =====================================================  ===============
kind                   what it does                                           1 / 2 / 3
=====================  =====================================================  ===============
``gaussian_noise``     additive noise, std as a fraction of 255               0.04/0.08/0.12
``blur``               Gaussian blur, radius in pixels                        1 / 2 / 4
``haze``               blend toward a bright airlight, thicker at the top     0.25/0.45/0.65
``brightness_snow``    brighter, with random snow flakes (fraction of pixels) 1.15/1.3/1.5, 1/3/6%
``cloud``              opaque soft-edged blobs covering about this fraction   10%/25%/40%
``rotation``           rotation about the centre (corners in the mean colour) 10/25/45 degrees
``jpeg``               JPEG re-encoding at this quality                       30 / 15 / 5
=====================  =====================================================  ===============
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

SEVERITIES = (1, 2, 3)


def _noise(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    std = (0.04, 0.08, 0.12)[severity - 1] * 255
    return image.astype(np.float32) + rng.normal(0.0, std, image.shape).astype(np.float32)


def _blur(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    radius = (1, 2, 4)[severity - 1]
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))


def _haze(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Atmospheric scattering I = J t + A (1 - t), the transmission t falling toward the top."""
    density = (0.25, 0.45, 0.65)[severity - 1]
    rows = np.linspace(1.0, 0.6, image.shape[0], dtype=np.float32)[:, None, None]  # thicker far away (top)
    haze = density * rows
    airlight = 235.0
    return image.astype(np.float32) * (1 - haze) + airlight * haze


def _brightness_snow(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    gain, flakes = ((1.15, 0.01), (1.3, 0.03), (1.5, 0.06))[severity - 1]
    out = image.astype(np.float32) * gain
    snow = (rng.random(image.shape[:2]) < flakes).astype(np.float32)
    snow = np.asarray(Image.fromarray((snow * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.7)),
                      dtype=np.float32) / 255
    snow = np.clip(snow * 2.5, 0, 1)[..., None]
    return out * (1 - snow) + 250.0 * snow


def _cloud(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Random elliptical blobs added until about the severity's fraction of the image is covered."""
    cover = (0.10, 0.25, 0.40)[severity - 1]
    h, w = image.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    mask = np.zeros((h, w), np.float32)
    while (mask > 0.5).mean() < cover:
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(0.08, 0.22) * h, rng.uniform(0.08, 0.22) * w
        distance = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        mask = np.maximum(mask, np.clip(1.5 - distance, 0, 1))  # opaque core, soft edge
    shade = rng.uniform(215, 245)
    return image.astype(np.float32) * (1 - mask[..., None]) + shade * mask[..., None]


def _rotation(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    angle = (10, 25, 45)[severity - 1]  # the corners lost grow up to 45 degrees
    fill = tuple(int(v) for v in image.reshape(-1, 3).mean(axis=0))
    return np.asarray(Image.fromarray(image).rotate(angle, resample=Image.BILINEAR, fillcolor=fill))


def _jpeg(image: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    quality = (30, 15, 5)[severity - 1]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


CORRUPTIONS = {"gaussian_noise": _noise, "blur": _blur, "haze": _haze, "brightness_snow": _brightness_snow,
               "cloud": _cloud, "rotation": _rotation, "jpeg": _jpeg}
KINDS = tuple(CORRUPTIONS)


def corrupt(image: np.ndarray, kind: str, severity: int, seed: int = 0) -> np.ndarray:
    """``image`` (H, W, 3) uint8 under corruption ``kind`` (one of ``KINDS``) at ``severity`` 1..3,
    drawing any randomness from ``seed``; a new uint8 array of the same shape."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; known: {', '.join(KINDS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    out = CORRUPTIONS[kind](image, severity, np.random.default_rng(seed))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
