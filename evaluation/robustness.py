"""The report's robustness and drift sections: query images corrupted (``evaluation.corruptions``)
and encoded again, ranked against the clean database codes.

For each corruption and severity: image-to-image mAP@all by Hamming ranking and its drop from the
clean queries', the bit-flip rate (share of bits that differ from the clean query's code), and the
drift detector's alarm rate on windows of the corrupted codes. The encoder is any callable from a
list of RGB uint8 arrays to (n, nbits) codes (the image student, or the teacher), so this module
needs no model of its own. Image i of a run is corrupted with seed ``seed * 1_000_003 + i``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from serving.index.drift import BitDrift, alarm_rate, bits_set

from . import metrics
from .corruptions import KINDS, SEVERITIES, corrupt

Encode = Callable[[list[np.ndarray]], np.ndarray]


def hamming_map(codes: np.ndarray, labels: np.ndarray, db_codes: np.ndarray, db_labels: np.ndarray) -> float:
    """Image-to-image mAP@all of sign codes against database sign codes, by Hamming ranking (class relevance)."""
    relevance = metrics.relevance_from_labels(labels, db_labels)
    return metrics.mean_average_precision(metrics.hamming_distances(codes, db_codes), relevance)


def robustness(encode: Encode, images: Sequence[np.ndarray], labels: np.ndarray, db_codes: np.ndarray,
               db_labels: np.ndarray, detector: BitDrift | None = None, window: int = 32,
               kinds: Sequence[str] = KINDS, severities: Sequence[int] = SEVERITIES, seed: int = 0,
               progress: bool = True) -> dict:
    """{"clean": {"map_all", "alarm_rate"}, "corruptions": {kind: {str(severity): {"map_all",
    "map_drop", "bit_flip_rate", "alarm_rate"}}}} of the query ``images`` (their class ``labels``)
    against the database's sign codes. ``alarm_rate`` only with a ``detector``."""
    labels = np.asarray(labels)
    clean = bits_set(encode(list(images)))
    clean_map = hamming_map(clean, labels, db_codes, db_labels)
    out = {"clean": {"map_all": clean_map,
                     "alarm_rate": alarm_rate(detector, clean, window) if detector else None},
           "corruptions": {}, "queries": len(images), "window": window, "seed": seed}
    steps = tqdm(total=len(kinds) * len(severities), desc="corruptions", unit="set", disable=not progress)
    for kind in kinds:
        out["corruptions"][kind] = {}
        for severity in severities:
            corrupted = [corrupt(image, kind, severity, seed * 1_000_003 + i) for i, image in enumerate(images)]
            codes = bits_set(encode(corrupted))
            found = hamming_map(codes, labels, db_codes, db_labels)
            out["corruptions"][kind][str(severity)] = {
                "map_all": found, "map_drop": clean_map - found,
                "bit_flip_rate": float((codes != clean).mean()),
                "alarm_rate": alarm_rate(detector, codes, window) if detector else None}
            steps.update()
    steps.close()
    return out
