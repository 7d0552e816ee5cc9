"""A frozen image backbone's pooled features through onnxruntime: the cached features of a CPU run, faster.

Training on cached features spends most of its time computing them once: EfficientNet-Lite1 at 256 px
under 4 views of UCM's 2,100 images took 8 of the main job's 9 training minutes through torch on a
2-core CPU. onnxruntime runs the same network about 2.2 times as fast there (1 thread each: 0.48 s
against 1.05 s for 16 images; ``python -m evaluation.bench_features``). ``OnnxFeatures`` exports the
frozen encoder (training/models.py's ``ImageEncoder``: backbone and pooled stages) once per weights,
pooled stages and input size into ``<cache>/onnx/``, checks onnxruntime against torch on every load
(``VERIFY_ATOL`` on two random images; ``load`` exports a failing file again once, then falls back to
torch) and then stands in for the encoder: normalised images (B, 3, H, W)
in, features (B, D) out. training/features.py uses it on a CPU for sets large enough to repay the
export (``MIN_IMAGES`` image-views; about 20 s for Lite1). The sentence encoder stays on torch: exported the
same way, all-MiniLM-L6-v2 ran 2,032 captions at 294 texts/s against torch's 285 (2 threads), not worth an
export.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

VERIFY_ATOL = 1e-4
MIN_IMAGES = 1024  # image-views below which the export costs more than it saves


def wanted(device: torch.device, images: int) -> bool:
    """Whether to compute ``images`` image-views on ``device`` through onnxruntime ($TERRAHASH_FEATURES:
    ``torch`` or ``onnxruntime`` forces one)."""
    choice = os.environ.get("TERRAHASH_FEATURES", "auto")
    if choice not in ("auto", "torch", "onnxruntime"):
        raise ValueError(f"TERRAHASH_FEATURES={choice!r}: expected auto, torch or onnxruntime")
    if choice != "auto":
        return choice == "onnxruntime"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return device.type == "cpu" and images >= MIN_IMAGES


class OnnxFeatures:
    """The encoder's features (module docstring); ``fingerprint`` names its weights (features.module_fingerprint)."""

    def __init__(self, encoder: nn.Module, fingerprint: str, image_size: int, cache_root: Path | None,
                 threads: int | None = None):
        levels = "-".join(str(level) for level in getattr(encoder, "pool_levels", [])) or "none"
        folder = export_folder(cache_root)
        self.path = folder / f"{fingerprint}-levels{levels}-{image_size}px.onnx"
        self.threads = torch.get_num_threads() if threads is None else threads  # as many as torch would use
        encoder = encoder.eval()
        if not self.path.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            log.info("exporting the frozen image encoder to %s (once)", self.path)
            self._export(encoder, image_size)
        self._open()
        self.error = self._verify(encoder, image_size)

    def _open(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    def _export(self, encoder: nn.Module, image_size: int) -> None:
        from .export import _export

        batch = torch.export.Dim("batch", min=1)
        tmp = self.path.with_name(f"{self.path.stem}.{os.getpid()}.tmp.onnx")
        _export(encoder, (torch.randn(2, 3, image_size, image_size),), ["images"], ({0: batch},), tmp, "features")
        tmp.replace(self.path)  # atomic: workers exporting at once each leave a whole file

    def _verify(self, encoder: nn.Module, image_size: int) -> float:
        x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, image_size, image_size), np.float32))
        with torch.inference_mode():
            want = encoder(x.contiguous(memory_format=torch.channels_last)).float().numpy()
        error = float(np.abs(self(x).numpy() - want).max())
        if error > VERIFY_ATOL:
            raise RuntimeError(f"{self.path}: onnxruntime features differ from torch by up to {error:.2e} "
                               f"(> {VERIFY_ATOL}); delete the file to export it again")
        return error

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(images.detach().float().cpu().numpy())
        return torch.from_numpy(self.session.run(["features"], {"images": x})[0])


def load(encoder: nn.Module, fingerprint: str, image_size: int, cache_root: Path | None):
    """``OnnxFeatures`` of the encoder, or the encoder itself (torch) when its export cannot be used: an
    exported file that fails to load or to match torch is exported again once (a stale file from another
    exporter version), and if that fails too the features come from torch, with a warning."""
    for attempt in range(2):
        try:
            return OnnxFeatures(encoder, fingerprint, image_size, cache_root)
        except Exception as err:  # noqa: BLE001 - onnxruntime's and the exporter's errors have no common base
            log.warning("onnxruntime features unavailable (%s: %s)%s", type(err).__name__, err,
                        "; exporting again" if attempt == 0 else "; computing them with torch")
            for path in export_folder(cache_root).glob(f"{fingerprint}-*.onnx"):
                path.unlink(missing_ok=True)
    return encoder


def export_folder(cache_root: Path | None) -> Path:
    """Where exported encoders are kept: ``<cache>/onnx``, or a temporary folder without a cache."""
    return Path(cache_root) / "onnx" if cache_root is not None else Path(tempfile.gettempdir()) / "terrahash-onnx"


__all__ = ["MIN_IMAGES", "OnnxFeatures", "VERIFY_ATOL", "load", "wanted"]
