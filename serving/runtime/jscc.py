"""Images received over a radio link: decode DeepJSCC channel symbols with the ONNX decoder (no torch).

A deployment serving field queries names an exported link (``jscc_model``: a folder written by
``terrahash jscc train`` under ``OUT/onnx/<link>``, holding ``jscc.spec.json`` and its decoder;
training/jscc_export.py). ``POST /v1/search/received`` carries the last hop's complex64 symbols
(base64), the link's SNR and the decoder's model version; ``ReceivedDecoder.image`` checks them and
returns the decoded RGB image, which the router then searches like an uploaded one.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
from pathlib import Path

import numpy as np

from .checks import ApiError

SPEC_FILE = "jscc.spec.json"


class ReceivedError(ApiError):
    """Symbols that cannot be decoded by this deployment's link (a client error: 4xx)."""

    def __init__(self, code: str, message: str, status: int = 422, arm_specific: bool = False):
        super().__init__(status, code, message)
        self.arm_specific = arm_specific


class ReceivedDecoder:
    """The decoder of one exported link, its spec checked against the file (sha256, inputs)."""

    def __init__(self, folder: str | Path, threads: int = 1):
        import onnxruntime as ort

        folder = Path(folder)
        path = folder / SPEC_FILE if folder.is_dir() else folder
        try:
            self.spec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"jscc_model: {path}: not a readable link spec ({err})") from None
        if self.spec.get("kind") != "jscc":
            raise ValueError(f"jscc_model: {path}: kind {self.spec.get('kind')!r}, not a jscc link spec")
        decoder = path.parent / self.spec["decoder"]["file"]
        digest = hashlib.sha256(decoder.read_bytes()).hexdigest()
        if digest != self.spec["decoder"]["sha256"]:
            raise ValueError(f"jscc_model: {decoder} has sha256 {digest[:12]}..., its spec says "
                             f"{self.spec['decoder']['sha256'][:12]}...")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(decoder), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in self.session.get_inputs()]
        if names != self.spec["decoder"]["inputs"]:
            raise ValueError(f"jscc_model: {decoder} takes inputs {names}, its spec says {self.spec['decoder']['inputs']}")

    @property
    def model_version(self) -> str:
        return self.spec["model_version"]

    def describe(self) -> dict:
        return {k: self.spec[k] for k in ("model_version", "hops", "model", "image_size", "c_out", "symbols",
                                          "bandwidth_ratio", "snr_db", "snr_conditioning")}

    def symbols(self, encoded: str, model_version: str) -> np.ndarray:
        """(k,) complex64 from the body's base64, checked: this decoder's model version, k symbols, finite."""
        if model_version != self.model_version:
            raise ReceivedError("unknown_model_version", f"symbols of model version {model_version!r}; this "
                                f"deployment decodes {self.model_version!r}", status=409)
        return parse_symbols(encoded, self.spec["symbols"])

    def image(self, symbols: np.ndarray, snr_db: float) -> np.ndarray:
        """The decoded image, RGB uint8 (H, W, 3)."""
        side = self.spec["image_size"] // 4
        channel = np.ascontiguousarray(symbols.astype(np.complex64)).view(np.float32).reshape(
            1, self.spec["c_out"], side, side)
        feeds = {"x": channel}
        if self.spec["snr_conditioning"]:
            feeds["snr_db"] = np.array([snr_db], dtype=np.float32)
        decoded = self.session.run(["out"], feeds)[0][0]  # (3, H, W) in [0, 1]
        return np.round(np.clip(decoded, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)


def parse_symbols(encoded: str, count: int) -> np.ndarray:
    """(count,) complex64 of base64 little-endian complex64 values, checked: the length and finite."""
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ReceivedError("invalid_symbols", "symbols: not valid base64") from None
    if len(raw) != 8 * count:
        raise ReceivedError("invalid_symbols", f"symbols: {len(raw)} bytes; the link sends {count} complex64 symbols "
                            f"({8 * count} bytes)")
    values = np.frombuffer(raw, dtype="<c8")
    if not np.isfinite(values.view(np.float32)).all():
        raise ReceivedError("invalid_symbols", "symbols: NaN or infinite values")
    return values


def source_bits(hex_hash: str | None, bits: int) -> np.ndarray | None:
    """The sender's hash of its image as bits (bits,), MSB first (serving/model/codes.py); None when absent."""
    if hex_hash is None:
        return None
    try:
        raw = bytes.fromhex(hex_hash)
    except ValueError:
        raise ReceivedError("invalid_source_hash", "source_hash: not hexadecimal") from None
    if len(raw) * 8 != bits:
        raise ReceivedError("invalid_source_hash", f"source_hash: {len(raw) * 8} bits; the served codes have {bits}")
    return np.unpackbits(np.frombuffer(raw, dtype=np.uint8))
