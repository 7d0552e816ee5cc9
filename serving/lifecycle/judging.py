"""The canary's judging, as plain functions over its window: per-arm figures from timestamped samples, and
the verdict on each arm against the primary and the thresholds (serving.runtime.settings.CanaryConfig).

The controller (serving/lifecycle/canary.py) gathers the samples (the routers' reports, its own probes)
and acts on the verdicts; everything here is arithmetic a test can check without Ray.
"""
from __future__ import annotations

import collections

import numpy as np

NO_DATA = "no data yet"


class Series:
    """Timestamped samples of one arm: (time, ok, seconds, ...), pruned to the last hour."""

    def __init__(self):
        self.samples: collections.deque = collections.deque()

    def add(self, t: float, *values) -> None:
        self.samples.append((t, *values))

    def since(self, cutoff: float) -> list[tuple]:
        while self.samples and self.samples[0][0] < cutoff - 3600:
            self.samples.popleft()  # keep an hour at most
        return [s for s in self.samples if s[0] >= cutoff]


def probe_scores(ids: list[str], label: str, labels: dict, class_size: int, k: int) -> tuple[float, float]:
    """(AP@k, recall@k) of one answer by class relevance. AP@k divides by the relevant items retrieved
    (the deep hashing convention); recall@k by min(k, relevant items in the database)."""
    relevant = np.array([labels.get(i) == label for i in ids[:k]], dtype=bool)
    hits = int(relevant.sum())
    if hits == 0:
        return 0.0, 0.0
    precision = np.cumsum(relevant) / np.arange(1, len(relevant) + 1)
    return float((precision * relevant).sum() / hits), hits / max(1, min(k, class_size))


def window_figures(arms, live: dict, shadow: dict, probes: dict, cutoff: float) -> dict:
    """Per arm (serving.runtime.traffic.ArmRoute), over the samples since ``cutoff``: requests, errors,
    error rate, p50/p99 (ms), probe count, errors, mAP@k, recall@k and p99; for a shadow arm its mean
    overlap@k and rank correlation with the client's answers, for a live one its fallbacks and share.
    ``live``, ``shadow`` and ``probes``: {arm name: Series} of (t, ok, seconds, fallback),
    (t, ok, seconds, overlap, rank) and (t, ok, ap, recall, seconds) samples."""
    out, total = {}, 0
    for arm in arms:
        series = (shadow if arm.shadow else live)[arm.name].since(cutoff)
        latencies = np.array([s[2] for s in series], dtype=float) * 1000
        errors = sum(1 for s in series if not s[1])
        sent = probes[arm.name].since(cutoff)
        answered = [p for p in sent if p[1]]
        probe_ms = np.array([p[4] for p in answered], dtype=float) * 1000
        f = {"requests": len(series), "errors": errors,
             "error_rate": errors / len(series) if series else None,
             "p50_ms": float(np.percentile(latencies, 50)) if latencies.size else None,
             "p99_ms": float(np.percentile(latencies, 99)) if latencies.size else None,
             "probe": {"count": len(sent), "errors": len(sent) - len(answered),
                       "map_at_k": float(np.mean([p[2] for p in answered])) if answered else None,
                       "recall_at_k": float(np.mean([p[3] for p in answered])) if answered else None,
                       "p99_ms": float(np.percentile(probe_ms, 99)) if probe_ms.size else None}}
        if arm.shadow:
            overlaps = [s[3] for s in series if s[3] is not None]
            ranks = [s[4] for s in series if s[4] is not None]
            f["mirror"] = {"overlap_at_k": float(np.mean(overlaps)) if overlaps else None,
                           "rank_correlation": float(np.mean(ranks)) if ranks else None}
        else:
            f["fallbacks"] = sum(1 for s in series if s[3])
            total += len(series)
        out[arm.name] = f
    for arm in arms:
        if not arm.shadow:
            out[arm.name]["share"] = out[arm.name]["requests"] / total if total else None
    return out


def failure_reasons(f: dict, primary_map: float | None, config) -> tuple[bool, list[str]]:
    """(whether the arm could be judged, why it fails) from its window figures ``f`` (window_figures),
    the primary's probe mAP@k and the thresholds (CanaryConfig). Client requests are judged once there
    are ``min_requests``; probes once there are ``min_probes``, their p99 only while client requests are
    too few to judge."""
    c, reasons, judged = config, [], False
    probes = f["probe"]
    if f["requests"] >= c.min_requests:
        judged = True
        if f["error_rate"] > c.max_error_rate:
            reasons.append(f"error rate {f['error_rate']:.3f} > {c.max_error_rate}")
        if f["p99_ms"] is not None and f["p99_ms"] > c.max_p99_ms:
            reasons.append(f"p99 {f['p99_ms']:.0f} ms > {c.max_p99_ms:.0f} ms")
    if probes["count"] >= c.min_probes:
        judged = True
        if f["requests"] < c.min_requests and probes["p99_ms"] is not None and probes["p99_ms"] > c.max_p99_ms:
            reasons.append(f"probe p99 {probes['p99_ms']:.0f} ms > {c.max_p99_ms:.0f} ms")  # little live traffic
        if probes["errors"] / probes["count"] > c.max_error_rate:
            reasons.append(f"probe error rate {probes['errors'] / probes['count']:.3f} > {c.max_error_rate}")
        elif probes["map_at_k"] is not None and primary_map is not None \
                and probes["map_at_k"] < primary_map - c.max_probe_map_drop:
            reasons.append(f"probe mAP@{c.probe_k} {probes['map_at_k']:.3f} < primary's {primary_map:.3f} "
                           f"- {c.max_probe_map_drop}")
    return judged, reasons


def verdicts(traffic, figures: dict, rollbacks: dict, config) -> dict[str, dict]:
    """{arm: {"verdict", "reasons"}} of every arm of ``traffic`` (serving.runtime.traffic.Traffic): the
    primary is "primary", an arm rolled back stays "rolled back", one without weight "no traffic";
    the others are "failing" (with reasons), "healthy", or NO_DATA while neither requests nor probes
    are enough to judge."""
    primary_map = figures.get(traffic.primary, {}).get("probe", {}).get("map_at_k")
    out = {}
    for arm in traffic.arms:
        if arm.name == traffic.primary:
            out[arm.name] = {"verdict": "primary", "reasons": []}
        elif arm.name in rollbacks:
            out[arm.name] = {"verdict": "rolled back", "reasons": rollbacks[arm.name]["reasons"]}
        elif arm.weight <= 0:
            out[arm.name] = {"verdict": "no traffic", "reasons": []}
        else:
            judged, reasons = failure_reasons(figures[arm.name], primary_map, config)
            out[arm.name] = {"verdict": "failing" if reasons else ("healthy" if judged else NO_DATA),
                             "reasons": reasons}
    return out


def reason_tag(reasons: list[str]) -> str:
    """The metric tag of a rollback's reasons: errors, latency or quality."""
    text = " ".join(reasons)
    return "errors" if "error rate" in text else "latency" if "p99" in text else "quality"
