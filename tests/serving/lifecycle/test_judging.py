"""The canary's judging as plain functions: window figures from timestamped samples, and the verdicts."""
from __future__ import annotations

import collections

import pytest

from serving.lifecycle.judging import NO_DATA, Series, probe_scores, reason_tag, verdicts, window_figures
from serving.runtime.settings import CanaryConfig
from serving.runtime.traffic import check_traffic

CONFIG = CanaryConfig(min_requests=10, min_probes=4, max_error_rate=0.1, max_p99_ms=500.0, max_probe_map_drop=0.2)


def traffic(**weights):
    arms = [{"name": name, "weight": weight, "model_app": f"m-{name}", "index_app": "i"}
            for name, weight in weights.items()]
    return check_traffic({"arms": arms, "primary": "champion"})


def samples(live=None, shadow=None, probes=None, t: float = 100.0):
    """{arm: Series} of each kind, every sample at time ``t``."""
    out = []
    for given in (live, shadow, probes):
        series = collections.defaultdict(Series)
        for arm, rows in (given or {}).items():
            for row in rows:
                series[arm].add(t, *row)
        out.append(series)
    return out


def judged(split, live=None, probes=None) -> dict:
    live_s, shadow_s, probe_s = samples(live, None, probes)
    figures = window_figures(split.arms, live_s, shadow_s, probe_s, cutoff=50.0)
    return verdicts(split, figures, {}, CONFIG)


def test_window_figures_count_the_window_only():
    split = traffic(champion=75, challenger=25)
    live, shadow, probes = samples({"champion": [(True, 0.010, False)] * 30,
                                    "challenger": [(True, 0.020, False)] * 8 + [(False, 0.9, True)] * 2})
    live["challenger"].add(10.0, False, 5.0, False)  # before the window: not counted
    figures = window_figures(split.arms, live, shadow, probes, cutoff=50.0)
    challenger = figures["challenger"]
    assert (challenger["requests"], challenger["errors"], challenger["fallbacks"]) == (10, 2, 2)
    assert challenger["error_rate"] == pytest.approx(0.2) and challenger["p50_ms"] == pytest.approx(20.0)
    assert figures["champion"]["share"] == pytest.approx(30 / 40) and challenger["share"] == pytest.approx(10 / 40)
    assert challenger["probe"] == {"count": 0, "errors": 0, "map_at_k": None, "recall_at_k": None, "p99_ms": None}


def test_a_shadow_arm_is_figured_by_its_agreement_with_the_client():
    split = check_traffic({"arms": [{"name": "champion", "weight": 100, "model_app": "a", "index_app": "i"},
                                    {"name": "shadow", "weight": 50, "shadow": True, "model_app": "b",
                                     "index_app": "i"}]})
    live, shadow, probes = samples({"champion": [(True, 0.01, False)]},
                                   shadow={"shadow": [(True, 0.02, 0.8, 0.5), (True, 0.02, 0.6, None)]})
    figures = window_figures(split.arms, live, shadow, probes, cutoff=50.0)
    assert figures["shadow"]["mirror"] == {"overlap_at_k": pytest.approx(0.7), "rank_correlation": pytest.approx(0.5)}
    assert "share" not in figures["shadow"] and figures["champion"]["share"] == 1.0


@pytest.mark.parametrize("challenger, probes, verdict, reason", [
    ([(True, 0.01, False)] * 5, None, NO_DATA, None),  # too few requests, no probes
    ([(True, 0.01, False)] * 20, None, "healthy", None),
    ([(True, 0.01, False)] * 17 + [(False, 0.01, False)] * 3, None, "failing", "error rate 0.150 > 0.1"),
    ([(True, 0.8, False)] * 20, None, "failing", "p99 800 ms > 500 ms"),
    # few requests: judged by probes, their mAP@k 0.3 against the primary's 0.9
    ([(True, 0.01, False)] * 2, [(True, 0.3, 0.3, 0.01)] * 4, "failing", "probe mAP@10 0.300 < primary's 0.900 - 0.2"),
    ([(True, 0.01, False)] * 2, [(True, 0.8, 0.8, 0.01)] * 4, "healthy", None),
    ([(True, 0.01, False)] * 2, [(False, 0.0, 0.0, 0.01)] * 4, "failing", "probe error rate 1.000 > 0.1"),
])
def test_a_challenger_is_judged_against_the_thresholds_and_the_primary(challenger, probes, verdict, reason):
    split = traffic(champion=90, challenger=10)
    found = judged(split, {"champion": [(True, 0.01, False)] * 50, "challenger": challenger},
                   {"champion": [(True, 0.9, 0.9, 0.01)] * 4, "challenger": probes or []})
    assert found["champion"] == {"verdict": "primary", "reasons": []}
    assert found["challenger"]["verdict"] == verdict
    assert found["challenger"]["reasons"] == ([reason] if reason else [])


def test_an_arm_rolled_back_or_without_weight_is_not_judged_again():
    split = traffic(champion=100, challenger=0, other=0)
    live, shadow, probes = samples({"challenger": [(False, 1.0, False)] * 50})
    figures = window_figures(split.arms, live, shadow, probes, cutoff=50.0)
    found = verdicts(split, figures, {"other": {"reasons": ["error rate 1.000 > 0.1"]}}, CONFIG)
    assert found["challenger"] == {"verdict": "no traffic", "reasons": []}
    assert found["other"] == {"verdict": "rolled back", "reasons": ["error rate 1.000 > 0.1"]}


def test_probe_scores_and_reason_tags():
    labels = {"a": "x", "b": "y", "c": "x", "d": "x"}
    assert probe_scores(["a", "b", "c"], "x", labels, class_size=3, k=3) == (pytest.approx((1 + 2 / 3) / 2), 2 / 3)
    assert probe_scores(["b"], "x", labels, class_size=3, k=3) == (0.0, 0.0)
    assert [reason_tag([r]) for r in ("error rate 0.2 > 0.1", "p99 900 ms > 500 ms", "probe mAP@10 0.1 < ...")] == \
        ["errors", "latency", "quality"]
