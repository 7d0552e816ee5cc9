"""Drift of incoming queries, seen in their codes: per-bit means of a window of query codes against
a reference set's.

For bit j with reference frequency p_j (the share of reference codes with the bit set) and a
window of n query codes in which it is set with frequency q_j, the statistic is

    D = (1 / nbits) * sum_j (q_j - p_j)^2 / (p_j (1 - p_j) / n)

the mean over bits of each bit's squared z-score. Queries drawn like the reference give D near 1
(each term is about chi-square with one degree of freedom); corrupted or off-domain images move
many bits at once and D grows with n. The threshold is chosen on clean held-out queries (val):
the ``quantile`` of D over random windows of them (``choose_threshold``), so its false-alarm rate
there is about 1 - quantile. Numpy only: serving computes the same figure per router replica.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EPS = 1e-3  # bit frequencies are kept in [EPS, 1 - EPS]: a constant bit cannot divide by zero


def bits_set(codes: np.ndarray) -> np.ndarray:
    """(n, nbits) bool of codes given as signs (+-1, or continuous: >= 0 is set) or as {0, 1}."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or not len(codes):
        raise ValueError(f"expected a non-empty (n, nbits) array of codes, got shape {codes.shape}")
    if codes.dtype == np.bool_:
        return codes
    if codes.min() >= 0 and codes.max() <= 1 and np.isin(codes, (0, 1)).all():
        return codes.astype(bool)
    return codes >= 0


@dataclass(frozen=True)
class BitDrift:
    """The detector: reference per-bit frequencies and an alarm threshold on D."""

    reference: np.ndarray  # (nbits,) share of reference codes with each bit set
    threshold: float = float("inf")

    @classmethod
    def fit(cls, reference_codes: np.ndarray, threshold: float = float("inf")) -> "BitDrift":
        return cls(bits_set(reference_codes).mean(axis=0), float(threshold))

    @property
    def nbits(self) -> int:
        return len(self.reference)

    def statistic(self, window: np.ndarray) -> float:
        """D of a window of query codes (n, nbits)."""
        q = bits_set(window)
        if q.shape[1] != self.nbits:
            raise ValueError(f"window codes have {q.shape[1]} bits, the reference {self.nbits}")
        p = np.clip(self.reference, EPS, 1 - EPS)
        return float(np.mean((q.mean(axis=0) - p) ** 2 / (p * (1 - p) / len(q))))

    def alarm(self, window: np.ndarray) -> bool:
        return self.statistic(window) > self.threshold

    def to_json(self) -> dict:
        return {"reference": [round(float(v), 6) for v in self.reference], "threshold": self.threshold}

    @classmethod
    def from_json(cls, data: dict) -> "BitDrift":
        return cls(np.asarray(data["reference"], dtype=np.float64), float(data["threshold"]))


def window_statistics(detector: BitDrift, codes: np.ndarray, window: int, trials: int, seed: int) -> np.ndarray:
    """D of ``trials`` windows of ``window`` codes drawn without replacement from ``codes``."""
    codes = bits_set(codes)
    if window > len(codes):
        raise ValueError(f"a window of {window} codes needs at least as many codes, got {len(codes)}")
    rng = np.random.default_rng(seed)
    return np.array([detector.statistic(codes[rng.choice(len(codes), window, replace=False)])
                     for _ in range(trials)])


def choose_threshold(detector: BitDrift, clean_codes: np.ndarray, window: int, quantile: float = 0.99,
                     trials: int = 500, seed: int = 0) -> BitDrift:
    """The detector with its threshold at the ``quantile`` of D over clean windows (val queries)."""
    stats = window_statistics(detector, clean_codes, window, trials, seed)
    return BitDrift(detector.reference, float(np.quantile(stats, quantile)))


def alarm_rate(detector: BitDrift, codes: np.ndarray, window: int, trials: int = 200, seed: int = 1) -> float:
    """Share of random windows of ``codes`` on which the detector fires."""
    return float((window_statistics(detector, codes, window, trials, seed) > detector.threshold).mean())


# --- serving: the detector of an index, and the window of a router replica's recent queries ---

DRIFT_WINDOW = 32
DRIFT_QUANTILE = 0.99


def index_detector(codes: np.ndarray, window: int = DRIFT_WINDOW, quantile: float = DRIFT_QUANTILE,
                   seed: int = 0) -> dict | None:
    """The detector an index build records (``to_json`` plus ``window`` and ``quantile``): reference
    frequencies of a seeded 80% of the indexed image codes, threshold on windows of the other 20%
    (codes the reference did not see, as val queries are in the report). None under 5 windows of codes."""
    codes = bits_set(codes)
    if len(codes) < 5 * window:
        return None
    order = np.random.default_rng(seed).permutation(len(codes))
    held = max(window, len(codes) // 5)
    detector = choose_threshold(BitDrift.fit(codes[order[held:]]), codes[order[:held]], window, quantile=quantile,
                                seed=seed)
    return {**detector.to_json(), "window": window, "quantile": quantile, "reference_codes": int(len(codes) - held)}


class QueryWindow:
    """The last ``window`` query codes of one router replica and one index, and D over them."""

    def __init__(self, recorded: dict):
        self.detector = BitDrift.from_json(recorded)
        self.window = int(recorded.get("window", DRIFT_WINDOW))
        self.codes = np.zeros((self.window, self.detector.nbits), dtype=bool)
        self.seen = 0

    def observe(self, code: np.ndarray) -> dict | None:
        """Add one query's code; {"statistic", "threshold", "alarm", "window"} once the window is full."""
        self.codes[self.seen % self.window] = bits_set(np.asarray(code).reshape(1, -1))[0]
        self.seen += 1
        if self.seen < self.window:
            return None
        statistic = self.detector.statistic(self.codes)
        return {"statistic": statistic, "threshold": self.detector.threshold,
                "alarm": statistic > self.detector.threshold, "window": self.window}
