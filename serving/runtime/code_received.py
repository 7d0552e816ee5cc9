"""Hash codes received over a radio link: the symbols of a code link decoded into a query code (no torch).

A field unit sends its image student's code instead of its photo (serving/model/field.py writes the body
of ``POST /v1/search/received``); the body's ``link`` names how: ``repetition`` (the code's signs repeated
on BPSK or QPSK, serving/model/code_link.py: any deployment decodes it) or ``learned`` (a codec of
``code_link_model``, a folder of ``terrahash jscc train``'s ``OUT/code``, serving/model/learned_link.py).
``CodeReceiver.decode`` checks the symbols (n complex64 values, finite), the link (one this deployment
can decode, carrying codes of the served length) and the code space (the sender's student must speak the
served arm's), and returns the decoded soft code (bits,), whose signs the router searches.

Client errors are JSON 4xx: ``invalid_symbols`` (422: not base64, not n values, not finite),
``invalid_link`` (422: n uses of the modulation cannot carry the served code), ``not_configured`` (404:
a learned link and no ``code_link_model``), ``unknown_link`` (404: no learned codec for n uses, or of that
model version), ``code_space_mismatch`` (409: the sender's code space is not the served arm's). A refusal
that only the arm's own model makes (its code space or code length) is ``arm_specific``: a challenger or a
shadow that refuses leaves the request to the primary and is not counted as failing. A ``code_link_model``
that cannot be loaded answers 503 ``code_link_unavailable``.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from serving.model import code_link
from serving.model.learned_link import LearnedLink, load_codecs

from .checks import ApiError
from .jscc import ReceivedError, parse_symbols


class CodeReceiver:
    """Decodes code-link symbols; the learned codecs of ``folder`` (None: repetition only) load at first use."""

    def __init__(self, folder: str | Path | None = None):
        self.folder = Path(folder) if folder else None
        self._codecs: dict[int, LearnedLink] | None = None
        self._broken: str | None = None  # why the codecs could not be loaded (kept: a restart retries)
        self._lock = threading.Lock()

    def codecs(self) -> dict[int, LearnedLink]:
        """The learned codecs by channel uses (raises ReceivedError 404 when none is configured)."""
        if self.folder is None:
            raise ReceivedError("not_configured", "this deployment decodes no learned code link (serve it with "
                                "code_link_model: the OUT/code folder of `terrahash jscc train`)", status=404)
        with self._lock:
            if self._codecs is None and self._broken is None:
                try:
                    self._codecs = {codec.uses: codec for codec in load_codecs(self.folder)}
                except (OSError, ValueError, KeyError, RuntimeError) as err:  # onnxruntime's errors are RuntimeErrors
                    self._broken = f"{type(err).__name__}: {err}"
        if self._broken is not None:
            raise ApiError(503, "code_link_unavailable", f"code_link_model {self.folder} cannot be loaded "
                                                         f"({self._broken})")
        return self._codecs

    def decode(self, link, encoded: str, snr_db: float, bits: int, code_space: str | None) -> tuple[np.ndarray, dict]:
        """(the decoded soft code (bits,) float32, what the answer reports of the link) of a body's ``link``
        (api.CodeLinkSpec) and symbols, for an arm serving ``bits``-bit codes of ``code_space``."""
        n = link.channel_uses
        if code_space is not None and link.code_space != code_space:
            raise ReceivedError("code_space_mismatch", f"link.code_space {link.code_space[:19]}... is not the served "
                                f"model's {code_space[:19]}...: its codes would not be comparable", status=409,
                                arm_specific=True)
        symbols = parse_symbols(encoded, n)
        described = {"protocol": "code", "scheme": link.scheme, "channel_uses": n}
        if link.scheme == "repetition":
            modulation = link.modulation or "bpsk"
            try:
                repetition = code_link.Repetition(modulation, bits, n)
            except ValueError as err:  # n uses cannot carry this arm's code length
                raise ReceivedError("invalid_link", f"link: {err}", arm_specific=True) from None
            soft = code_link.combine(symbols[None], repetition)[0]
            return _bounded(soft), {**described, "modulation": modulation, "repeats": repetition.repeats}
        codecs = self.codecs()
        codec = codecs.get(n)
        if codec is None:
            raise ReceivedError("unknown_link", f"no learned codec for {n} channel uses; this deployment has "
                                f"{sorted(codecs)}", status=404)
        version = codec.spec["model_version"]
        if link.model_version is not None and link.model_version != version:
            raise ReceivedError("unknown_link", f"the learned codec for {n} channel uses is version {version!r}, "
                                f"not {link.model_version!r}", status=404)
        if codec.bits != bits or codec.spec.get("code_space") not in (None, link.code_space):
            raise ReceivedError("code_space_mismatch", f"the learned codec for {n} channel uses decodes "
                                f"{codec.bits}-bit codes of another student than the served model's", status=409,
                                arm_specific=True)
        soft = codec.decode(symbols[None].astype(np.complex128), snr_db)[0]
        return _bounded(soft), {**described, "model_version": version}


def _bounded(soft: np.ndarray) -> np.ndarray:
    """The soft code as float32 in [-1, 1]: scaled down by its peak when that is over 1 (the same ranking, signs
    and inner-product order), so that symbols near complex64's range cannot overflow the ranking; 422 when
    the decoded values are not finite."""
    soft = np.asarray(soft, dtype=np.float64)
    if not np.isfinite(soft).all():
        raise ReceivedError("invalid_symbols", "symbols: they decode to values that are not finite (out of range)")
    peak = float(np.abs(soft).max(initial=0.0))
    return (soft / peak if peak > 1.0 else soft).astype(np.float32)


__all__ = ["CodeReceiver"]
