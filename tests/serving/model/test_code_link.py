"""serving/model/code_link.py: repetition-coded BPSK/QPSK over multi-hop AWGN, against its theory."""
import math

import numpy as np
import pytest

from serving.model.code_link import (Repetition, awgn, bit_error_rate, carries, combine, encode, llr, noise_variance,
                                     q_function, relay, send_over_hops, signs)

BITS = 64


def random_signs(count: int, bits: int = BITS, seed: int = 0) -> np.ndarray:
    return np.where(np.random.default_rng(seed).random((count, bits)) < 0.5, -1, 1).astype(np.int8)


@pytest.mark.parametrize("scheme, n, repeats", [("bpsk", 64, 1), ("bpsk", 256, 4), ("qpsk", 32, 1), ("qpsk", 256, 8)])
def test_channel_uses_and_repeats(scheme, n, repeats):
    link = Repetition(scheme, BITS, n)
    assert link.repeats == repeats and link.min_uses == (64 if scheme == "bpsk" else 32)
    assert encode(random_signs(3), link).shape == (3, n)


@pytest.mark.parametrize("scheme, n", [("bpsk", 64), ("bpsk", 1024), ("qpsk", 32), ("qpsk", 96)])
def test_unit_power_per_complex_symbol(scheme, n):
    symbols = encode(random_signs(50), Repetition(scheme, BITS, n))
    assert np.allclose(np.mean(np.abs(symbols) ** 2, axis=1), 1.0, atol=1e-12)
    if scheme == "bpsk":
        assert np.all(symbols.imag == 0)  # one bit per use, on I only


@pytest.mark.parametrize("snr_db", [-15.0, -5.0, 0.0, 10.0])
def test_noise_power_at_a_given_snr(snr_db):
    sigma2 = 10 ** (-snr_db / 10)
    assert noise_variance(snr_db) == pytest.approx(sigma2)
    noise = awgn(np.zeros((200, 1000), dtype=complex), snr_db, np.random.default_rng(1))
    assert np.mean(np.abs(noise) ** 2) == pytest.approx(sigma2, rel=0.01)
    assert np.var(noise.real) == pytest.approx(sigma2 / 2, rel=0.01)
    assert np.var(noise.imag) == pytest.approx(sigma2 / 2, rel=0.01)


@pytest.mark.parametrize("scheme, n", [("bpsk", 64), ("qpsk", 32), ("qpsk", 128)])
def test_noiseless_decoding_gives_back_the_code(scheme, n):
    codes = np.random.default_rng(2).standard_normal((5, BITS))  # real codes: their signs are sent
    link = Repetition(scheme, BITS, n)
    soft = combine(encode(codes, link), link)
    assert np.allclose(soft, signs(codes))
    assert np.array_equal(signs(0.0), np.int8(1))  # sign(0) = +1, as serving/model/codes.py


@pytest.mark.parametrize("scheme", ["bpsk", "qpsk"])
def test_high_snr_over_several_hops_is_exact(scheme):
    codes = random_signs(100)
    out = send_over_hops(codes, hops=4, snr_db=30.0, n=64, rng=np.random.default_rng(3), scheme=scheme)
    assert np.array_equal(out.signs, codes)
    assert out.soft.shape == codes.shape and out.soft.dtype == np.float64
    one = send_over_hops(codes[0].astype(float), hops=2, snr_db=30.0, n=64, rng=np.random.default_rng(3))
    assert one.soft.shape == (BITS,) and np.array_equal(one.signs, codes[0])


def test_seeded_generator_is_deterministic():
    codes = random_signs(20)
    a = send_over_hops(codes, 3, -5.0, 128, np.random.default_rng(7))
    b = send_over_hops(codes, 3, -5.0, 128, np.random.default_rng(7))
    c = send_over_hops(codes, 3, -5.0, 128, np.random.default_rng(8))
    assert np.array_equal(a.soft, b.soft) and not np.array_equal(a.soft, c.soft)


def test_relay_resends_its_decisions_errors_carried_not_amplified():
    codes = random_signs(400)
    link = Repetition("bpsk", BITS, 64)
    rng = np.random.default_rng(4)
    first = awgn(encode(codes, link), -5.0, rng)
    decided = signs(combine(first, link))
    assert (decided != codes).mean() > 0.15  # hop 1 made errors
    forwarded = relay(first, link)
    assert np.array_equal(forwarded, encode(decided, link))  # clean constellation points: no noise forwarded
    assert np.allclose(np.abs(forwarded) ** 2, 1.0)
    # a near-noiseless second hop delivers exactly the relay's decisions: hop 1's errors, no more
    second = signs(combine(awgn(forwarded, 60.0, rng), link))
    assert np.array_equal(second, decided)


@pytest.mark.parametrize("scheme, n, snr_db, hops", [("bpsk", 64, -5.0, 1), ("bpsk", 256, -5.0, 1),
                                                      ("qpsk", 32, -5.0, 1), ("qpsk", 128, -5.0, 1),
                                                      ("bpsk", 512, -10.0, 1), ("bpsk", 256, -5.0, 3),
                                                      ("qpsk", 512, -10.0, 3)])
def test_bit_error_rate_matches_the_q_function(scheme, n, snr_db, hops):
    codes = random_signs(2000, seed=5)
    out = send_over_hops(codes, hops, snr_db, n, np.random.default_rng(6), scheme=scheme)
    measured = float((out.signs != codes).mean())
    expected = bit_error_rate(snr_db, n, BITS, scheme, hops)
    # 128,000 bits: the standard error is under 0.0015
    assert measured == pytest.approx(expected, abs=0.006)


def test_theory_closed_forms():
    snr = 10 ** (-5 / 10)
    assert bit_error_rate(-5.0, 64, BITS, "bpsk") == pytest.approx(q_function(math.sqrt(2 * snr)))
    assert bit_error_rate(-5.0, 32, BITS, "qpsk") == pytest.approx(q_function(math.sqrt(snr)))
    # the same n gives the same figure with either scheme
    assert bit_error_rate(-10.0, 512, BITS, "bpsk") == pytest.approx(bit_error_rate(-10.0, 512, BITS, "qpsk"))
    p = bit_error_rate(-5.0, 64, BITS)
    assert bit_error_rate(-5.0, 64, BITS, hops=3) == pytest.approx((1 - (1 - 2 * p) ** 3) / 2)


def test_llr_scales_soft_values():
    link = Repetition("qpsk", BITS, 64)  # r = 2, a^2 = 1/2
    assert llr(np.array([1.0, -0.5]), link, 0.0).tolist() == pytest.approx([4.0, -2.0])


@pytest.mark.parametrize("scheme, n", [("bpsk", 32), ("bpsk", 96), ("bpsk", 0), ("qpsk", 16), ("qpsk", 48),
                                       ("bpsk", 64.0), ("psk8", 64)])
def test_unusable_n_or_scheme_is_a_clear_error(scheme, n):
    with pytest.raises(ValueError, match="not carried|multiple of|positive integer|unknown scheme"):
        Repetition(scheme, BITS, n)
    with pytest.raises(ValueError):
        send_over_hops(random_signs(1), 1, 0.0, n, np.random.default_rng(0), scheme=scheme)


def test_carries():
    assert carries("qpsk", 64, 32) and not carries("bpsk", 64, 32) and not carries("bpsk", 64, 96)


@pytest.mark.parametrize("bad", [np.array([0.1, np.nan] * 32), np.array([np.inf] * 64), np.zeros((2, 3, 64)),
                                 np.array(["a"] * 64), np.ones(64) * 1j])
def test_bad_codes_are_errors(bad):
    with pytest.raises(ValueError):
        send_over_hops(bad, 1, 0.0, 64, np.random.default_rng(0))


def test_bad_snr_hops_rng_and_symbols_are_errors():
    codes = random_signs(1)
    for snr in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            send_over_hops(codes, 1, snr, 64, np.random.default_rng(0))
    for hops in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="at least one hop"):
            send_over_hops(codes, hops, 0.0, 64, np.random.default_rng(0))
    with pytest.raises(TypeError, match="Generator"):
        send_over_hops(codes, 1, 0.0, 64, rng=0)
    link = Repetition("bpsk", BITS, 64)
    received = encode(codes, link)
    received[0, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        combine(received, link)
    with pytest.raises(ValueError, match="sends 64"):
        combine(np.ones((1, 32), dtype=complex), link)
