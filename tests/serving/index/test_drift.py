"""The query-drift statistic against a plain loop, its threshold's false-alarm rate on fresh clean
windows, and that flipping bits (what a corruption does to codes) sets it off."""
import numpy as np
import pytest

from serving.index.drift import BitDrift, QueryWindow, alarm_rate, bits_set, choose_threshold, index_detector


def _codes(rng, n: int, p: np.ndarray) -> np.ndarray:
    """Sign codes (+-1) whose bit j is set with probability p[j]."""
    return np.where(rng.random((n, len(p))) < p, 1, -1).astype(np.int8)


def _plain_statistic(reference: np.ndarray, window: np.ndarray) -> float:
    total = 0.0
    for j in range(reference.shape[1]):
        p = sum(1 for row in reference if row[j] > 0) / len(reference)
        p = min(max(p, 1e-3), 1 - 1e-3)
        q = sum(1 for row in window if row[j] > 0) / len(window)
        total += (q - p) ** 2 / (p * (1 - p) / len(window))
    return total / reference.shape[1]


def test_the_statistic_equals_a_plain_loop_and_reads_every_code_form():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.2, 0.8, 32)
    p[0] = 1.0  # a constant bit: clipped, not a division by zero
    reference, window = _codes(rng, 300, p), _codes(rng, 40, p)
    detector = BitDrift.fit(reference)
    assert detector.statistic(window) == pytest.approx(_plain_statistic(reference, window), rel=1e-9)
    continuous = window * rng.uniform(0.1, 2.0, window.shape)
    assert detector.statistic(continuous) == detector.statistic(window)  # signs of continuous codes
    assert detector.statistic((window > 0).astype(np.uint8)) == detector.statistic(window)  # {0, 1}
    assert BitDrift.from_json(detector.to_json()).statistic(window) == pytest.approx(detector.statistic(window),
                                                                                      rel=1e-5)
    with pytest.raises(ValueError, match="16 bits, the reference 32"):
        detector.statistic(window[:, :16])
    with pytest.raises(ValueError, match="non-empty"):
        bits_set(np.zeros((0, 32)))


def test_the_threshold_chosen_on_clean_windows_holds_on_fresh_ones_and_flipped_bits_fire():
    rng = np.random.default_rng(1)
    p = rng.uniform(0.1, 0.9, 64)
    detector = BitDrift.fit(_codes(rng, 2000, p))
    detector = choose_threshold(detector, _codes(rng, 400, p), window=32, quantile=0.95, seed=0)
    assert 0.5 < detector.threshold < 3  # D is about 1 on clean windows
    assert alarm_rate(detector, _codes(rng, 400, p), window=32) <= 0.15  # fresh clean queries: rare alarms
    shifted = _codes(rng, 400, p)
    flips = rng.random(shifted.shape) < 0.15  # a corruption's bit flips
    shifted = np.where(flips, -shifted, shifted)
    assert alarm_rate(detector, shifted, window=32) >= 0.9
    with pytest.raises(ValueError, match="window of 32"):
        alarm_rate(detector, shifted[:10], window=32)


def test_the_index_detector_holds_out_codes_for_its_threshold_and_needs_enough():
    rng = np.random.default_rng(2)
    p = rng.uniform(0.1, 0.9, 64)
    codes = _codes(rng, 1000, p)
    recorded = index_detector(codes, window=32, quantile=0.99, seed=0)
    assert recorded["reference_codes"] == 800 and recorded["window"] == 32
    order = np.random.default_rng(0).permutation(1000)  # the held-out fifth is what the threshold saw
    mine = choose_threshold(BitDrift.fit(codes[order[200:]]), codes[order[:200]], 32, quantile=0.99, seed=0)
    assert recorded["threshold"] == pytest.approx(mine.threshold)
    assert index_detector(codes[:159], window=32) is None  # under 5 windows: no detector recorded


def test_a_query_window_reports_d_of_the_last_window_once_full():
    rng = np.random.default_rng(3)
    p = rng.uniform(0.2, 0.8, 16)
    reference = _codes(rng, 500, p)
    recorded = {**BitDrift.fit(reference, threshold=2.0).to_json(), "window": 8}
    window = QueryWindow(recorded)
    queries = _codes(rng, 20, p)
    found = [window.observe(q) for q in queries]
    assert found[:7] == [None] * 7
    detector = BitDrift.from_json(recorded)
    for i in range(7, 20):  # D over the last 8 codes, whatever order the ring holds them in
        assert found[i]["statistic"] == pytest.approx(detector.statistic(queries[i - 7:i + 1]))
        assert found[i]["alarm"] == (found[i]["statistic"] > 2.0)
    stuck = [window.observe(np.ones(16)) for _ in range(8)]  # one code over and over: a broken feed
    assert stuck[-1]["alarm"]
