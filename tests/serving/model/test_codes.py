"""serving/model/codes.py: bit length checks, bit order, packing round trips, Hamming distances."""
import numpy as np
import pytest

from evaluation.metrics import hamming_distances, pack_bits as eval_pack_bits
from serving.model.codes import (BitLengthError, check_packed, hamming, hamming_matrix, pack_bits, pack_signs,
                           random_codes, unpack_bits, unpack_signs, validate_bits)


@pytest.mark.parametrize("bits", [8, 16, 64, 128, 1024])
def test_valid_bit_lengths(bits):
    assert validate_bits(bits) == bits
    assert validate_bits(np.int64(bits)) == bits


@pytest.mark.parametrize("bits", [0, 4, 12, 63, 1032, -8, 8.0, True, "64", None])
def test_wrong_bit_length_is_a_clear_error(bits):
    with pytest.raises(BitLengthError, match="bits must be"):
        validate_bits(bits)


def test_bit_order_is_msb_first_and_zero_is_plus_one():
    values = np.array([[0.3, -1.0, -2.0, -0.1, -5.0, -1.0, -1.0, 0.0,   # bit 0 and bit 7 set
                        -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0]])
    packed = pack_signs(values)
    assert packed.dtype == np.uint8 and packed.shape == (1, 2)
    assert packed.tolist() == [[0b1000_0001, 0]]


def test_sign_round_trip():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(50, 64))
    values[0, :5] = 0.0
    signs = unpack_signs(pack_signs(values))
    assert signs.dtype == np.int8
    np.testing.assert_array_equal(signs, np.where(values >= 0, 1, -1))


def test_bit_round_trip_and_agreement_with_evaluation():
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 2, size=(30, 128))
    packed = pack_bits(bits)
    np.testing.assert_array_equal(unpack_bits(packed), bits)
    np.testing.assert_array_equal(packed, eval_pack_bits(bits))  # one convention across the project
    np.testing.assert_array_equal(pack_signs(bits * 2 - 1), packed)


def test_pack_refuses_bad_input():
    with pytest.raises(BitLengthError):
        pack_signs(np.ones((2, 12)))
    with pytest.raises(ValueError, match="NaN"):
        pack_signs(np.full((1, 8), np.nan))
    with pytest.raises(ValueError, match="0/1"):
        pack_bits(np.full((1, 8), 2))
    with pytest.raises(ValueError, match="2-D"):
        pack_signs(np.ones(8))


def test_check_packed_width_and_dtype():
    codes = random_codes(3, 64)
    assert check_packed(codes, 64).shape == (3, 8)
    with pytest.raises(BitLengthError, match="expected 4 bytes"):
        check_packed(codes, 32)
    with pytest.raises(ValueError, match="uint8"):
        check_packed(codes.astype(np.int32), 64)


def test_hamming_matches_unpacked_reference():
    db = random_codes(40, 64, seed=2)
    queries = random_codes(7, 64, seed=3)
    expected = (unpack_bits(queries)[:, None, :] != unpack_bits(db)[None, :, :]).sum(axis=2)
    np.testing.assert_array_equal(hamming_matrix(queries, db, block_pairs=100), expected)
    np.testing.assert_array_equal(hamming(queries, queries), np.zeros(7))
    np.testing.assert_array_equal(hamming_matrix(queries, db),
                                  hamming_distances(unpack_bits(queries), unpack_bits(db)))


def test_random_codes_with_few_distinct_values():
    codes = random_codes(1000, 16, seed=0, distinct=4)
    assert len(np.unique(codes, axis=0)) <= 4
