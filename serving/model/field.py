"""The field unit of a code link: its image student, the code it sends, and the body the service receives.

A field unit (a drone, a ground team's laptop) runs only onnxruntime and numpy: the exported image
student (the int8 variant when the folder has one) hashes its photo, a code link (serving/model/
code_link.py's repetition or serving/model/learned_link.py's learned codec) turns the code into ``n``
complex channel uses, and relays carry them. What reaches the service is the JSON body of
``POST /v1/search/received`` (``code_message``): the last hop's complex64 symbols, base64-encoded,
beside the link's spec, which names everything the service needs to decode them and nothing it could
get wrong silently:

    {"link": {"protocol": "code", "scheme": "repetition" | "learned", "modulation": "bpsk" | "qpsk" | null,
              "channel_uses": n, "code_space": "<the student's code space>",
              "model_version": "<the learned codec's version>" | null},
     "symbols": "<base64 complex64 little-endian, n values>", "snr_db": s, "hops": h, "k": 10,
     "source_hash": "<hex of the clean code's bits>" | absent}
"""
from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path

import numpy as np

BATCH = 32  # images per ONNX call
SCHEMES = ("repetition", "learned")


def student_spec(model_dir: str | Path, variant: str = "auto") -> Path:
    """The image student's spec in an exported students folder (or a run's ``students/onnx``): ``int8``,
    ``fp32``, or ``auto`` (int8 when there is one: what a field unit would carry)."""
    from .versions import find_spec, resolve_model

    folder = resolve_model(model_dir)
    if variant != "auto":
        return find_spec(folder, "image", variant)
    try:
        return find_spec(folder, "image", "int8")
    except FileNotFoundError:
        return find_spec(folder, "image", "fp32")


def student_code_space(spec: Path) -> str:
    """The code space of the image student's codes (serving/model/spec.py)."""
    from .versions import model_code_space

    return model_code_space(spec.parent, spec)


def encode_images(spec: Path, paths: Sequence[str | Path]) -> np.ndarray:
    """(N, bits) continuous (pre-sign) codes of image files by the ONNX image student of ``spec``."""
    from .encoders import ImageEncoder

    encoder = ImageEncoder(spec)
    return np.concatenate([encoder.encode(list(paths[i:i + BATCH])) for i in range(0, len(paths), BATCH)])


def code_message(symbols: np.ndarray, *, scheme: str, snr_db: float, hops: int, code_space: str,
                 modulation: str | None = None, model_version: str | None = None, source_hash: bytes | None = None,
                 k: int = 10) -> dict:
    """The JSON body of ``POST /v1/search/received`` for the last hop's (n,) complex symbols of a code link."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; known: {list(SCHEMES)}")
    values = np.asarray(symbols, dtype=np.complex64)
    if values.ndim == 2 and values.shape[0] == 1:
        values = values[0]
    if values.ndim != 1 or not len(values):
        raise ValueError(f"one code's symbols are (n,) or (1, n), got shape {values.shape}")
    body = {"link": {"protocol": "code", "scheme": scheme, "modulation": modulation, "channel_uses": int(len(values)),
                     "code_space": code_space, "model_version": model_version},
            "symbols": base64.b64encode(values.astype("<c8").tobytes()).decode("ascii"),
            "snr_db": float(snr_db), "hops": int(hops), "k": int(k)}
    if source_hash is not None:
        body["source_hash"] = source_hash.hex()
    return body


__all__ = ["SCHEMES", "code_message", "encode_images", "student_code_space", "student_spec"]
