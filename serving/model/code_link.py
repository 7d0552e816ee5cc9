"""A hash code sent over a noisy multi-hop radio link: repetition-coded BPSK/QPSK, AWGN, decode-and-forward.

A field unit hashes its photo with the image student and sends the code instead of the pixels; relays
decide each bit and send it on; the service receives the last hop's soft values. numpy only (no torch),
so the field unit and the service share this module.

Channel: the conventions of training/jscc.py's DeepJSCC channel, so both links are compared at the same
SNR and the same number of complex channel uses.

- A transmission is ``n`` complex channel uses (complex symbols; one symbol = two real dimensions, I and Q).
- Power normalisation per code: x_n = x * sqrt(n / ||x||^2), mean power 1 per complex symbol
  (``power_normalize``; the constellations below already have it, so it changes nothing but is kept as
  the contract).
- Complex AWGN at SNR s dB: y = x_n + w, w ~ CN(0, sigma^2), sigma^2 = 10^(-s/10); each real component
  of w has variance sigma^2 / 2.
- Multi-hop: every hop has the same per-hop SNR and the same ``n``; noise is drawn independently per hop.

Modulation (``SCHEMES``: bits per complex channel use). Bit +1 (code value >= 0, serving/model/codes.py's
rule) is the positive amplitude.

- ``bpsk``: 1 bit per use, on I only: x = b in {-1, +1}; Q is left empty, so all the power is on the bit.
- ``qpsk``: 2 bits per use, one on I and one on Q: x = (b_I + j b_Q) / sqrt(2).

Repetition: a ``bits``-long code is sent ``r = n * m / bits`` times (m bits per use), as whole copies of
the code one after the other (stream bit p is code bit p mod bits; QPSK puts stream bits 2u and 2u + 1
on I and Q of use u). A 64-bit code needs 64 r uses with BPSK and 32 r with QPSK; an ``n`` with
``n * m`` not a multiple of ``bits`` (in particular n * m < bits: the code does not fit) is a ValueError.

Decoding: maximum-ratio combining. The r real observations of bit k (amplitude a: 1 for BPSK, 1/sqrt(2)
for QPSK) are summed and scaled, soft_k = sum_i y_ki / (r a), so a noiseless channel gives back +-1
exactly; the hard decision is sign(soft_k) with sign(0) = +1. The log-likelihood ratio is
LLR_k = 4 r a^2 soft_k / sigma^2. A relay takes the hard decision and re-encodes it (decode-and-forward:
errors of one hop are carried on, never amplified).

Theory (``bit_error_rate``): per hop p = Q(sqrt(2 r a^2 / sigma^2)), i.e. Q(sqrt(2 r SNR)) for BPSK and
Q(sqrt(r SNR)) for QPSK, the same figure at the same n: QPSK's second bit per use costs half the power
per bit. Over h hops of hard decisions the bit flips an odd number of times: p_h = (1 - (1 - 2p)^h) / 2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

SCHEMES = {"bpsk": 1, "qpsk": 2}  # bits per complex channel use


def noise_variance(snr_db: float) -> float:
    """sigma^2 of complex AWGN at ``snr_db`` for unit signal power (training/jscc.py's definition)."""
    snr_db = float(snr_db)
    if not math.isfinite(snr_db):
        raise ValueError(f"snr_db must be a finite number of dB, got {snr_db}")
    return 10.0 ** (-snr_db / 10.0)


@dataclass(frozen=True)
class Repetition:
    """A code of ``bits`` bits sent as ``n`` complex channel uses of ``scheme``, each bit ``repeats`` times."""

    scheme: str  # a key of SCHEMES
    bits: int  # code length
    n: int  # complex channel uses per code

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {self.scheme!r}; known: {sorted(SCHEMES)}")
        for name in ("bits", "n"):
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        carried = self.n * self.bits_per_use
        if carried < self.bits:
            raise ValueError(f"{self.n} {self.scheme} channel uses carry {carried} bits, fewer than the code's "
                             f"{self.bits}: the code is not carried (it needs at least {self.min_uses} uses)")
        if carried % self.bits:
            raise ValueError(f"{self.n} {self.scheme} channel uses carry {carried} bits, not a whole number of "
                             f"copies of a {self.bits}-bit code: n must be a multiple of {self.min_uses}")

    @property
    def bits_per_use(self) -> int:
        return SCHEMES[self.scheme]

    @property
    def min_uses(self) -> int:
        """Channel uses of one copy of the code (ceil(bits / m)); n must be a multiple of it."""
        return -(-self.bits // self.bits_per_use)

    @property
    def repeats(self) -> int:
        """r: how many times each bit is sent."""
        return self.n * self.bits_per_use // self.bits

    @property
    def amplitude(self) -> float:
        """a: the amplitude of one bit on its real dimension at unit symbol power."""
        return 1.0 / math.sqrt(self.bits_per_use)


def carries(scheme: str, bits: int, n: int) -> bool:
    """Whether ``n`` uses of ``scheme`` carry a ``bits``-bit code by repetition (a whole number of copies)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; known: {sorted(SCHEMES)}")
    return n * SCHEMES[scheme] >= bits and (n * SCHEMES[scheme]) % bits == 0


def _codes(code) -> tuple[np.ndarray, bool]:
    """(B, bits) float64 codes of a (bits,) or (B, bits) array, and whether it was one code."""
    arr = np.asarray(code)
    if arr.ndim not in (1, 2) or arr.shape[-1] == 0:
        raise ValueError(f"a code is a (bits,) or (B, bits) array, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_) or np.iscomplexobj(arr):
        raise ValueError(f"a code holds real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError("the code holds NaN or infinite values; their signs, and so their bits, are undefined")
    return np.atleast_2d(arr), arr.ndim == 1


def signs(values) -> np.ndarray:
    """+-1 int8 of real values, sign(0) = +1 (serving/model/codes.py: bit 1 = x >= 0)."""
    return np.where(np.asarray(values) >= 0, 1, -1).astype(np.int8)


def power_normalize(symbols: np.ndarray) -> np.ndarray:
    """(B, n) complex symbols scaled per code to mean power 1 per complex symbol: ||x_b||^2 = n."""
    power = np.sum(np.abs(symbols) ** 2, axis=-1, keepdims=True)
    return symbols * np.sqrt(symbols.shape[-1] / np.maximum(power, 1e-12))


def encode(code, link: Repetition) -> np.ndarray:
    """(B, n) complex128 symbols of (B, bits) codes (their signs), or (n,) of one (bits,) code."""
    codes, single = _codes(code)
    if codes.shape[1] != link.bits:
        raise ValueError(f"codes of {codes.shape[1]} bits, the link sends {link.bits}")
    stream = np.tile(signs(codes).astype(np.float64), (1, link.repeats))  # (B, n * m)
    if link.bits_per_use == 1:
        symbols = stream + 0j  # (B, n), I only
    else:
        symbols = (stream[:, 0::2] + 1j * stream[:, 1::2]) * link.amplitude  # (B, n)
    symbols = power_normalize(symbols)
    return symbols[0] if single else symbols


def awgn(symbols, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """y = x + w, w ~ CN(0, sigma^2) per complex symbol (variance sigma^2 / 2 per real component)."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
    x = np.asarray(symbols, dtype=np.complex128)
    std = math.sqrt(noise_variance(snr_db) / 2.0)
    noise = rng.standard_normal((*x.shape, 2)) * std  # (..., n, 2): I and Q
    return x + (noise[..., 0] + 1j * noise[..., 1])


def combine(received, link: Repetition) -> np.ndarray:
    """Maximum-ratio combining: (B, bits) float64 soft values (noiseless: +-1) of (B, n) received symbols,
    or (bits,) of (n,) ones."""
    y = np.asarray(received)
    single = y.ndim == 1
    y = np.atleast_2d(y).astype(np.complex128)
    if y.ndim != 2 or y.shape[1] != link.n:
        raise ValueError(f"received symbols of shape {np.shape(received)}; the link sends {link.n} per code")
    if not np.isfinite(y.view(np.float64)).all():
        raise ValueError("received symbols hold NaN or infinite values")
    if link.bits_per_use == 1:
        stream = y.real  # (B, n)
    else:
        stream = np.stack([y.real, y.imag], axis=-1).reshape(len(y), -1)  # (B, 2n): I0, Q0, I1, Q1, ...
    soft = stream.reshape(len(y), link.repeats, link.bits).sum(axis=1) / (link.repeats * link.amplitude)  # (B, bits)
    return soft[0] if single else soft


def llr(soft, link: Repetition, snr_db: float) -> np.ndarray:
    """Log-likelihood ratios log P(+1 | y) / P(-1 | y) of ``combine``'s soft values: 4 r a^2 soft / sigma^2."""
    return 4.0 * link.repeats * link.amplitude ** 2 * np.asarray(soft, dtype=np.float64) / noise_variance(snr_db)


def relay(received, link: Repetition) -> np.ndarray:
    """What a decode-and-forward relay sends on: its hard decisions on ``received``, encoded again."""
    return encode(signs(combine(received, link)), link)


class Received(NamedTuple):
    soft: np.ndarray  # (B, bits) or (bits,) float64: the last hop's combined soft values (noiseless: +-1)
    signs: np.ndarray  # same shape, int8 +-1: its hard decisions (sign(0) = +1)


def send_over_hops(code, hops: int, snr_db: float, n: int, rng: np.random.Generator,
                   scheme: str = "bpsk") -> Received:
    """``code`` (bits,) or (B, bits), real or +-1 (its signs are sent) over ``hops`` hops of ``n`` uses of
    ``scheme`` each at ``snr_db`` per hop, relays deciding and re-encoding; noise from ``rng`` (seeded:
    the same seed gives the same result)."""
    codes, single = _codes(code)
    link = Repetition(scheme, codes.shape[1], n)
    soft = combine(received_symbols(codes, hops, snr_db, link, rng), link)
    out = Received(soft, signs(soft))
    return Received(out.soft[0], out.signs[0]) if single else out


def received_symbols(codes: np.ndarray, hops: int, snr_db: float, link: Repetition,
                     rng: np.random.Generator) -> np.ndarray:
    """(B, n) complex symbols that reach the service: (B, bits) codes sent over ``hops`` hops of ``link``
    at ``snr_db`` each, relays deciding and re-encoding (``send_over_hops`` combines them)."""
    if isinstance(hops, (bool, np.bool_)) or not isinstance(hops, (int, np.integer)) or hops < 1:
        raise ValueError(f"a link has at least one hop, got {hops!r}")
    noise_variance(snr_db)  # a bad SNR fails before any noise is drawn
    symbols = encode(codes, link)
    for _ in range(hops - 1):
        symbols = relay(awgn(symbols, snr_db, rng), link)
    return awgn(symbols, snr_db, rng)


def q_function(x: float) -> float:
    """Q(x) = P(N(0, 1) > x)."""
    return 0.5 * math.erfc(x / math.sqrt(2.0))


def bit_error_rate(snr_db: float, n: int, bits: int, scheme: str = "bpsk", hops: int = 1) -> float:
    """The theoretical bit error rate after ``hops`` decode-and-forward hops (module docstring)."""
    link = Repetition(scheme, bits, n)
    p = q_function(math.sqrt(2.0 * link.repeats * link.amplitude ** 2 / noise_variance(snr_db)))
    return (1.0 - (1.0 - 2.0 * p) ** hops) / 2.0


__all__ = ["Received", "Repetition", "SCHEMES", "awgn", "bit_error_rate", "carries", "combine", "encode", "llr",
           "noise_variance", "power_normalize", "q_function", "received_symbols", "relay", "send_over_hops", "signs"]
