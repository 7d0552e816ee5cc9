"""Image loading, dihedral views, and cached encoder features.

With a frozen backbone the features of each image view never change, so they are computed
once and cached on disk, keyed by the encoder's weights and the exact inputs: the images by the
sha256 of their bytes, not their paths, so an image replaced in place gets a new key. A
fine-tuned encoder has other weights, hence another key: a cache can never serve stale features.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from .config import NUM_DIHEDRAL_VIEWS  # 4 rotations x optional flip (configs check views against it)

log = logging.getLogger(__name__)



def load_image(path: Path, size: int) -> np.ndarray:
    """Decode an image as RGB and resize it to ``size`` x ``size`` (bicubic): (size, size, 3) uint8."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        return np.array(image, dtype=np.uint8)  # a writable copy: torch.from_numpy needs one


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W), scaled to [0, 1] then standardised."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, H, W)
    mean = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def dihedral(images: torch.Tensor, view: int) -> torch.Tensor:
    """View ``view`` (0..7) of a (B, C, H, W) batch: rotate by 90*(view % 4) degrees, flip if view >= 4."""
    if not 0 <= view < NUM_DIHEDRAL_VIEWS:
        raise ValueError(f"dihedral view must be in 0..7, got {view}")
    out = torch.rot90(images, view % 4, dims=(2, 3))
    return torch.flip(out, dims=(3,)) if view >= 4 else out


# Sensor views (``train.sensor_views``): how another sensor or another flight would see the scene.
# Each parameter is drawn per image and view from numpy's default_rng((SENSOR_SEED, view, row)).
SENSOR_SEED = 20261201
SENSOR_SHIFT = {"angle": 40.0,  # rotation in degrees, uniform in [-40, 40], corners cropped away
                "zoom": (0.6, 1.0),  # side of the random square kept, as a fraction of the image's
                "brightness": 0.25, "contrast": 0.25, "saturation": 0.35, "hue": 0.04,  # +- ranges
                "blur_sigma": (0.0, 1.5)}  # Gaussian blur, sigma uniform in the range


def sensor_view(image: torch.Tensor, view: int, row: int) -> torch.Tensor:
    """Sensor view ``view`` of one uint8 image (3, H, W) of dataset row ``row``: rotated by an
    arbitrary angle (the corners cut off, so no fill shows), zoomed in on a random square, its
    colours shifted and blurred; the same (view, row) always gives the same view."""
    from torchvision.transforms.v2 import functional as TF

    rng, shift = np.random.default_rng((SENSOR_SEED, view, row)), SENSOR_SHIFT
    size = image.shape[-1]
    angle = float(rng.uniform(-shift["angle"], shift["angle"]))
    rad = np.deg2rad(abs(angle))
    inner = int(size / (np.cos(rad) + np.sin(rad)))  # the largest upright square inside the rotated one
    out = TF.center_crop(TF.rotate(image, angle, interpolation=TF.InterpolationMode.BILINEAR), [inner, inner])
    side = max(8, int(inner * rng.uniform(*shift["zoom"])))
    top, left = (int(rng.integers(inner - side + 1)) for _ in range(2))
    out = TF.resized_crop(out, top, left, side, side, [size, size], antialias=True)
    out = TF.adjust_brightness(out, 1 + rng.uniform(-shift["brightness"], shift["brightness"]))
    out = TF.adjust_contrast(out, 1 + rng.uniform(-shift["contrast"], shift["contrast"]))
    out = TF.adjust_saturation(out, 1 + rng.uniform(-shift["saturation"], shift["saturation"]))
    out = TF.adjust_hue(out, rng.uniform(-shift["hue"], shift["hue"]))
    sigma = float(rng.uniform(*shift["blur_sigma"]))
    return TF.gaussian_blur(out, [9, 9], [sigma, sigma]) if sigma > 0.1 else out


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes: what an image cache entry is keyed by."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def module_fingerprint(module: nn.Module) -> str:
    """Hash of a module's parameters and buffers: equal fingerprints mean equal outputs."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class FeatureCache:
    """Arrays on disk under ``root``, one .npy per key (a hash of everything that made them)."""

    def __init__(self, root: Path | None):
        self.root = Path(root) if root is not None else None

    @staticmethod
    def key(**parts) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def get(self, key: str) -> np.ndarray | None:
        if self.root is None or not (self.root / f"{key}.npy").exists():
            return None
        return np.load(self.root / f"{key}.npy")

    def put(self, key: str, array: np.ndarray) -> None:
        if self.root is None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        # A temporary name of this process's own: data-parallel workers may fill the same entry at once.
        tmp = self.root / f"{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.npy"
        np.save(tmp, array)
        tmp.replace(self.root / f"{key}.npy")  # atomic: a killed run leaves no half-written entry


def default_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.inference_mode()
def image_features(encoder: nn.Module, paths: list[Path], image_size: int, mean, std,
                   views: tuple[int, ...] = (0,), batch_size: int = 64, device: torch.device | None = None,
                   cache: FeatureCache | None = None, desc: str = "image features", sensor_views: int = 0) -> np.ndarray:
    """Pooled features of every image under each dihedral view, then under ``sensor_views`` sensor
    views (``sensor_view``): float32 (V + S, N, D).

    Each view is cached on its own, under a key made of the encoder's fingerprint and pooled
    stages, the preprocessing, the view and the content of the files in order (their sha256;
    hashing UCM's 2,100 images takes about 0.1 s); the views not in the cache are computed
    together, decoding each image once.
    """
    cache = cache or FeatureCache(None)
    fingerprint = module_fingerprint(encoder)
    # The weights' fingerprint does not say which stages are pooled: the same backbone with other
    # pool_levels gives other features.
    levels = list(getattr(encoder, "pool_levels", []))
    files = hashlib.sha256("\n".join(file_digest(p) for p in paths).encode()).hexdigest()
    views = tuple(views) + tuple(f"sensor-{k}" for k in range(sensor_views))
    keys = {v: FeatureCache.key(kind="image", encoder=fingerprint, levels=levels, size=image_size, mean=list(mean),
                                std=list(std), view=v, files=files,
                                **({"shift": SENSOR_SHIFT, "seed": SENSOR_SEED} if isinstance(v, str) else {}))
            for v in views}
    found = {v: cache.get(keys[v]) for v in views}
    missing = tuple(v for v in views if found[v] is None)
    if missing:
        computed = _compute_image_features(encoder, paths, image_size, mean, std, missing, batch_size, device, desc,
                                           (fingerprint, cache.root))
        for v, array in zip(missing, computed):
            cache.put(keys[v], array)
            found[v] = array
    else:
        log.info("%s: %d images x %d views from cache", desc, len(paths), len(views))
    return np.stack([found[v] for v in views])  # (V, N, D)


def _compute_image_features(encoder, paths, image_size, mean, std, views, batch_size, device, desc,
                            exported: tuple[str, Path | None]) -> np.ndarray:
    """(V, N, D) features; on a CPU, a large set runs through onnxruntime (training/onnx_features.py),
    the encoder exported once under ``exported`` = (its fingerprint, the cache root)."""
    from . import onnx_features

    device = device or next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    forward = encoder
    if onnx_features.wanted(device, len(paths) * len(views)):
        forward = onnx_features.load(encoder, exported[0], image_size, exported[1])
    chunks = []
    for start in tqdm(range(0, len(paths), batch_size), desc=desc, unit="batch"):
        batch = torch.from_numpy(np.stack([load_image(p, image_size) for p in paths[start:start + batch_size]]))
        x = normalize(batch.to(device), mean, std)

        def view_of(v) -> torch.Tensor:
            if isinstance(v, str):  # "sensor-K"
                k = int(v.split("-")[1])
                shifted = torch.stack([sensor_view(image.permute(2, 0, 1), k, start + i) for i, image in enumerate(batch)])
                return normalize(shifted.permute(0, 2, 3, 1).to(device), mean, std)
            return dihedral(x, v)
        # Rotate first, then lay out channels-last: a rotated channels-last tensor is strided
        # oddly and convolutions on it run at half speed.
        chunks.append(torch.stack([forward(view_of(v).contiguous(memory_format=torch.channels_last)).float().cpu()
                                   for v in views]))  # (V, b, D)
    encoder.train(was_training)
    return torch.cat(chunks, dim=1).numpy()  # (V, N, D)


@torch.inference_mode()
def array_features(encoder: nn.Module, images: list[np.ndarray], mean, std, views: tuple[int, ...] = (0,),
                   device: torch.device | None = None, batch_size: int = 32) -> np.ndarray:
    """Pooled features (V, N, D) of RGB uint8 arrays (H, W, 3) of one size under dihedral ``views``,
    preprocessed as ``image_features``'s (for images made in memory, such as corrupted queries)."""
    device = device or next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    chunks = []
    for start in range(0, len(images), batch_size):
        x = normalize(torch.from_numpy(np.stack(images[start:start + batch_size])).to(device), mean, std)
        chunks.append(torch.stack([encoder(dihedral(x, v).contiguous(memory_format=torch.channels_last)).float().cpu()
                                   for v in views]))
    encoder.train(was_training)
    return torch.cat(chunks, dim=1).numpy()


@torch.inference_mode()
def text_features(encoder, texts: list[str], batch_size: int = 256, cache: FeatureCache | None = None,
                  desc: str = "text features") -> np.ndarray:
    """Mean-pooled sentence features of every text: float32 (M, D), cached like image features."""
    cache = cache or FeatureCache(None)
    key = FeatureCache.key(kind="text", encoder=module_fingerprint(encoder.model),
                           max_length=encoder.config.max_length, texts=hashlib.sha256("\n".join(texts).encode()).hexdigest())
    cached = cache.get(key)
    if cached is not None:
        log.info("%s: %d texts from cache", desc, len(texts))
        return cached
    was_training = encoder.training
    encoder.eval()
    # Each distinct text once (caption sets repeat many), sorted by length so each batch pads
    # little; then every text takes its distinct text's row.
    distinct = sorted(set(texts), key=lambda t: (len(t), t))
    rows = np.zeros((len(distinct), encoder.feature_dim), dtype=np.float32)
    for start in tqdm(range(0, len(distinct), batch_size), desc=desc, unit="batch"):
        rows[start:start + batch_size] = encoder.encode(distinct[start:start + batch_size]).float().cpu().numpy()
    encoder.train(was_training)
    where = {text: i for i, text in enumerate(distinct)}
    out = rows[[where[t] for t in texts]] if texts else np.zeros((0, encoder.feature_dim), dtype=np.float32)
    cache.put(key, out)
    return out
