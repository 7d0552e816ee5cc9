"""The learned code link at run time: the exported codec of training/code_link.py with onnxruntime and numpy.

A field unit, every relay and the service load the same folder (``code_link.spec.json``, the encoder and
the decoder). The channel is serving/model/code_link.py's: ``n`` complex channel uses per code per hop,
mean power 1 per complex symbol, complex AWGN at the per-hop SNR. The field unit sends
encoder(tanh(c / code_scale)); a relay decodes its received symbols to a soft code and re-encodes that
(or its signs, as the spec's ``relay`` says); the service's received code is the signs of its soft code.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from serving.storage import sha256_file

from .code_link import _codes, awgn, noise_variance, signs

SPEC_FILE = "code_link.spec.json"
MANIFEST = "code_link.json"  # training/code_link.py's list of the codecs it trained


class Received(NamedTuple):
    soft: np.ndarray  # (B, bits) float32 in (-1, 1): the service's decoded soft code
    signs: np.ndarray  # (B, bits) int8 +-1 (sign(0) = +1)


class LearnedLink:
    """One exported codec (a folder holding ``code_link.spec.json``)."""

    def __init__(self, folder: str | Path):
        import onnxruntime as ort

        self.folder = Path(folder)
        self.spec = json.loads((self.folder / SPEC_FILE).read_text())
        if self.spec.get("kind") != "code_link":
            raise ValueError(f"{self.folder / SPEC_FILE}: not a code link spec (kind {self.spec.get('kind')!r})")
        self.bits, self.uses = int(self.spec["bits"]), int(self.spec["uses"])
        self.code_scale, self.relay = float(self.spec["code_scale"]), self.spec["relay"]
        for part in ("encoder", "decoder"):  # the files are the ones the spec's model_version names
            path = self.folder / self.spec[part]["file"]
            if sha256_file(path) != self.spec[part]["sha256"]:
                raise ValueError(f"{path}: its sha256 is not the one {SPEC_FILE} records")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self._encoder, self._decoder = (
            ort.InferenceSession(str(self.folder / self.spec[part]["file"]), options,
                                 providers=["CPUExecutionProvider"]) for part in ("encoder", "decoder"))

    def _snr(self, snr_db: float, batch: int) -> np.ndarray:
        noise_variance(snr_db)  # finite, or ValueError
        return np.full(batch, snr_db, dtype=np.float32)

    def field_input(self, code) -> np.ndarray:
        """(B, bits) float32 soft code tanh(c / code_scale) of pre-sign codes."""
        codes, _ = _codes(code)
        if codes.shape[1] != self.bits:
            raise ValueError(f"codes of {codes.shape[1]} bits, the link sends {self.bits}")
        return np.tanh(codes / self.code_scale).astype(np.float32)

    def encode(self, soft, snr_db: float) -> np.ndarray:
        """(B, n) complex128 channel symbols of (B, bits) soft codes in [-1, 1]."""
        u = np.asarray(soft, dtype=np.float32)
        if u.ndim != 2 or u.shape[1] != self.bits or not np.isfinite(u).all():
            raise ValueError(f"a (B, {self.bits}) finite soft code is needed, got shape {u.shape}")
        x = self._encoder.run(["out"], {"x": u, "snr_db": self._snr(snr_db, len(u))})[0].astype(np.float64)
        return x[:, 0::2] + 1j * x[:, 1::2]  # (B, n): symbol j = real values (2j, 2j+1)

    def decode(self, received, snr_db: float) -> np.ndarray:
        """(B, bits) float32 soft code of (B, n) received complex symbols."""
        y = np.asarray(received, dtype=np.complex128)
        if y.ndim != 2 or y.shape[1] != self.uses:
            raise ValueError(f"received symbols of shape {y.shape}; the link sends {self.uses} per code")
        if not np.isfinite(y.view(np.float64)).all():
            raise ValueError("received symbols hold NaN or infinite values")
        flat = np.stack([y.real, y.imag], axis=-1).reshape(len(y), -1).astype(np.float32)  # (B, 2n)
        return self._decoder.run(["out"], {"x": flat, "snr_db": self._snr(snr_db, len(y))})[0]

    def received_symbols(self, code, hops: int, snr_db: float, rng: np.random.Generator) -> np.ndarray:
        """(B, n) complex symbols that reach the service: pre-sign codes (B, bits) sent by the field unit over
        ``hops`` decode-and-forward hops at ``snr_db`` each, relays decoding and re-encoding; noise from ``rng``."""
        if isinstance(hops, (bool, np.bool_)) or not isinstance(hops, (int, np.integer)) or hops < 1:
            raise ValueError(f"a link has at least one hop, got {hops!r}")
        u = self.field_input(code)
        noise_variance(snr_db)
        for _ in range(hops - 1):
            u = self.decode(awgn(self.encode(u, snr_db), snr_db, rng), snr_db)
            if self.relay == "hard":
                u = signs(u).astype(np.float32)
        return awgn(self.encode(u, snr_db), snr_db, rng)

    def receive(self, received, snr_db: float) -> Received:
        """The service's soft code and its signs of (B, n) received symbols."""
        u = self.decode(received, snr_db)
        return Received(u, signs(u))

    def send_over_hops(self, code, hops: int, snr_db: float, rng: np.random.Generator) -> Received:
        """Pre-sign codes (B, bits) over ``hops`` decode-and-forward hops at ``snr_db`` each; noise from ``rng``."""
        return self.receive(self.received_symbols(code, hops, snr_db, rng), snr_db)


def load_codecs(folder: str | Path) -> list[LearnedLink]:
    """The learned codecs under ``folder``, by ``n``: those its ``code_link.json`` lists (``n<uses>/``, what
    training/code_link.py wrote last), else every subfolder with ``code_link.spec.json``."""
    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        specs = [folder / f"n{codec['uses']}" / SPEC_FILE for codec in json.loads((folder / MANIFEST).read_text())["codecs"]]
    else:
        specs = sorted(folder.glob(f"*/{SPEC_FILE}"))
    if not specs:
        raise FileNotFoundError(f"{folder}: no learned codec (*/{SPEC_FILE})")
    codecs = sorted((LearnedLink(spec.parent) for spec in specs), key=lambda codec: codec.uses)
    uses = [codec.uses for codec in codecs]
    if len(set(uses)) != len(uses):
        raise ValueError(f"{folder}: two codecs for the same number of channel uses ({uses})")
    return codecs


__all__ = ["LearnedLink", "Received", "SPEC_FILE", "load_codecs"]
