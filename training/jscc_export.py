"""Export of a trained DeepJSCC link to ONNX for the query path, and the field unit's side of it.

``export_link`` writes, for one link of ``terrahash jscc train`` (one hop count, one model):

- ``jscc_encoder.onnx``: the first hop's encoder, image (B, 3, H, W) in [0, 1] [+ snr_db (B,)] ->
  power-normalised channel input (B, c_out, H/4, W/4), what a field unit runs;
- ``jscc_decoder.onnx``: the last hop's decoder, received (B, c_out, H/4, W/4) [+ snr_db (B,)] ->
  image (B, 3, H, W) in [0, 1], what the search service runs (serving/runtime/jscc.py, no torch);
- ``jscc.spec.json``: rho, c_out, image size, the power normalisation, the SNR the link was trained
  for, the hop count, each file's sha256 and inputs, and ``model_version`` (the decoder's sha256,
  first 16 hex digits), which a sender names so that symbols are never decoded by another model.

Received symbols travel as complex64: k = c_out * (H/4) * (W/4) / 2 values, symbol j the pair of
real values (2j, 2j + 1) of the channel input flattened in (c, y, x) order (``to_complex``).
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from serving.storage import sha256_file

from .jscc import DecodeForward, awgn, bandwidth_ratio, symbols

SPEC_FILE, ENCODER_FILE, DECODER_FILE = "jscc.spec.json", "jscc_encoder.onnx", "jscc_decoder.onnx"
SPEC_VERSION = 1
POWER_RULE = "mean power 1 per complex symbol, per image: z * sqrt(k / ||z||^2)"
VERIFY_ATOL = 1e-4


class _Hop(nn.Module):
    def __init__(self, module: nn.Module, conditioned: bool):
        super().__init__()
        self.module, self.conditioned = module, conditioned

    def forward(self, x, snr_db=None):
        return self.module(x, snr_db) if self.conditioned else self.module(x)


def _export(module: nn.Module, args: tuple, names: list[str], path: Path) -> None:
    from .export import _export as export_onnx

    batch = torch.export.Dim("batch", min=1)
    export_onnx(module, args, names, {name: {0: batch} for name in ("x", "snr_db")[:len(args)]}, path, "out")


def _verify(path: Path, module: nn.Module, feeds: dict[str, np.ndarray]) -> float:
    import onnxruntime as ort

    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["out"], feeds)[0]
    with torch.no_grad():
        want = module(*[torch.from_numpy(v) for v in feeds.values()]).numpy()
    error = float(np.abs(got - want).max())
    if error > VERIFY_ATOL:
        raise RuntimeError(f"{path}: onnxruntime differs from torch by up to {error:.2e} (> {VERIFY_ATOL})")
    return error


def export_link(link: DecodeForward, record: dict, out_dir: str | Path) -> Path:
    """Write the encoder, the decoder and their spec (module docstring); returns the spec path."""
    import logging

    for name in ("onnx_ir", "onnxscript"):
        logging.getLogger(name).setLevel(logging.WARNING)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    c = record["config"]
    size, c_out, conditioned = c["image_size"], c["c_out"], c["snr_conditioning"]
    encoder, decoder = _Hop(link.encoders[0], conditioned).eval(), _Hop(link.decoders[-1], conditioned).eval()
    rng = np.random.default_rng(0)
    image = rng.random((2, 3, size, size), dtype=np.float32)
    snr = np.array([-5.0, -10.0], dtype=np.float32)
    received = rng.standard_normal((2, c_out, size // 4, size // 4)).astype(np.float32)
    files = {}
    for name, module, first, path in (("encoder", encoder, image, out / ENCODER_FILE),
                                      ("decoder", decoder, received, out / DECODER_FILE)):
        inputs = ["x", "snr_db"] if conditioned else ["x"]
        args = (torch.from_numpy(first), torch.from_numpy(snr)) if conditioned else (torch.from_numpy(first),)
        _export(module, args, inputs, path)
        _verify(path, module, dict(zip(inputs, [a.numpy() for a in args])))
        files[name] = {"file": path.name, "sha256": sha256_file(path), "inputs": inputs}
    k = symbols(c_out, size, size)
    spec = {"format_version": SPEC_VERSION, "kind": "jscc", "model_version": files["decoder"]["sha256"][:16],
            "hops": link.hops, "model": record["model"], "image_size": size, "c_out": c_out, "symbols": k,
            "bandwidth_ratio": bandwidth_ratio(c_out), "power_normalisation": POWER_RULE,
            "snr_conditioning": conditioned,
            "snr_db": record["snr_db"] if record["snr_db"] is not None else list(c["snr_train_db"]),
            "symbol_layout": "complex64; symbol j = real values (2j, 2j+1) of the channel input flattened (c, y, x)",
            "image": "RGB in [0, 1], NCHW", **files}
    path = out / SPEC_FILE
    path.write_text(json.dumps(spec, indent=1))
    return path


def to_complex(z: torch.Tensor) -> np.ndarray:
    """(k,) complex64 of one channel input (c_out, H/4, W/4)."""
    return np.ascontiguousarray(z.detach().float().reshape(-1, 2).numpy()).view(np.complex64).reshape(-1)


@torch.no_grad()
def send(link: DecodeForward, image: torch.Tensor, snr_db: float, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """The field unit and the relays of a decode-and-forward link: (the complex symbols the service
    receives from the last hop, the source image). ``image``: (3, H, W) in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    x = image[None]
    for encoder, decoder in zip(link.encoders[:-1], link.decoders[:-1]):
        x = decoder(awgn(encoder(x, snr_db), snr_db, generator), snr_db)
    return to_complex(awgn(link.encoders[-1](x, snr_db), snr_db, generator)[0]), image


def received_message(symbols_: np.ndarray, snr_db: float, hops: int, model_version: str,
                     source_hash: bytes | None = None, k: int = 10) -> dict:
    """The JSON body of ``POST /v1/search/received``."""
    body = {"symbols": base64.b64encode(np.asarray(symbols_, dtype=np.complex64).tobytes()).decode("ascii"),
            "snr_db": snr_db, "hops": hops, "model_version": model_version, "k": k}
    if source_hash is not None:
        body["source_hash"] = source_hash.hex()
    return body
