"""Binary hash codes on the serving side: bit length checks, packing to bytes, Hamming distances.

Conventions (the same as training's ``sign(tanh(W x))`` codes and evaluation/metrics.pack_bits):

* A code is ``sign(x)`` with ``sign(0) = +1``: bit 1 means ``x >= 0``, bit 0 means ``x < 0``.
* Packing is ``np.packbits`` big-endian (MSB-first): bit 0 of the code is the most significant bit
  of byte 0, bit 8 the most significant bit of byte 1, and so on.
* Code lengths are whole bytes: a multiple of 8 from 8 to 1024 bits. faiss binary indexes work on
  whole bytes, so a 12-bit code would have to be padded; we refuse it instead of guessing.

Packed codes are ``uint8`` arrays of shape (n, bits // 8). Nothing here imports torch.
"""
from __future__ import annotations

import numpy as np

MIN_BITS = 8
MAX_BITS = 1024
BIT_ORDER = "msb-first"  # recorded in every index manifest (np.packbits' default order)
SIGN_RULE = "bit 1 = x >= 0"  # likewise; sign(0) = +1

# Number of set bits of every byte value: uint8 (256,).
_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1).astype(np.uint8)


class BitLengthError(ValueError):
    """A code length that is not a multiple of 8 in 8..1024, or codes whose width disagrees with it."""


def validate_bits(bits) -> int:
    """Return ``bits`` as an int, or raise BitLengthError: it must be a multiple of 8 in 8..1024."""
    if isinstance(bits, (bool, np.bool_)) or not isinstance(bits, (int, np.integer)):
        raise BitLengthError(f"bits must be an integer, got {bits!r}")
    bits = int(bits)
    if bits % 8 or not MIN_BITS <= bits <= MAX_BITS:
        raise BitLengthError(f"bits must be a multiple of 8 between {MIN_BITS} and {MAX_BITS}, got {bits}")
    return bits


def n_bytes(bits) -> int:
    """Bytes per packed code of ``bits`` bits."""
    return validate_bits(bits) // 8


def pack_signs(values) -> np.ndarray:
    """Pack real-valued (or -1/+1) codes (n, bits) to uint8 (n, bits // 8): bit 1 where value >= 0.

    Do not pass 0/1 arrays here: 0 counts as non-negative, so it becomes bit 1. Use pack_bits.
    """
    arr = _as_2d(values, "values")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"values must be real numbers, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and np.isnan(arr).any():
        raise ValueError("values contain NaN; their sign, and so their bit, is undefined")
    validate_bits(arr.shape[1])
    return np.packbits(arr >= 0, axis=1)  # (n, bits // 8)


def pack_bits(bits01) -> np.ndarray:
    """Pack 0/1 or bool codes (n, bits) to uint8 (n, bits // 8); any other value is an error."""
    arr = _as_2d(bits01, "bits01")
    if arr.dtype != np.bool_:
        if not np.issubdtype(arr.dtype, np.number) or not np.isin(arr, (0, 1)).all():
            raise ValueError("bits01 must hold only 0/1 or bool values (use pack_signs for real values)")
    validate_bits(arr.shape[1])
    return np.packbits(arr.astype(bool), axis=1)


def unpack_bits(packed, bits=None) -> np.ndarray:
    """Unpack uint8 (n, bits // 8) to 0/1 uint8 (n, bits); ``bits`` defaults to 8 x the width."""
    packed = check_packed(packed, bits)
    return np.unpackbits(packed, axis=1)


def unpack_signs(packed, bits=None) -> np.ndarray:
    """Unpack to -1/+1 int8 (n, bits): the codes ``sign(x)`` that were packed."""
    return unpack_bits(packed, bits).astype(np.int8) * 2 - 1


def check_packed(packed, bits=None) -> np.ndarray:
    """Packed codes as a C-contiguous uint8 (n, bits // 8) array, or a clear error.

    With ``bits`` given the width must be ``bits // 8``; without it the width itself must be a valid
    code length in bytes.
    """
    arr = np.asarray(packed)
    if arr.dtype != np.uint8:
        raise ValueError(f"packed codes must be uint8, got dtype {arr.dtype}")
    arr = _as_2d(arr, "packed codes")
    width = arr.shape[1]
    if bits is None:
        validate_bits(width * 8)
    elif width != n_bytes(bits):
        raise BitLengthError(f"packed codes are {width} bytes ({width * 8} bits) wide, expected "
                             f"{validate_bits(bits) // 8} bytes for {bits}-bit codes")
    return np.ascontiguousarray(arr)


def hamming(a, b) -> np.ndarray:
    """Hamming distances between packed codes, broadcasting over all but the last (byte) axis: int32.

    ``hamming(q[:, None], db[None])`` is the (Q, N) matrix; ``hamming(x, y)`` with equal shapes
    pairs rows one to one.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError(f"packed codes must be uint8, got {a.dtype} and {b.dtype}")
    if a.shape[-1] != b.shape[-1]:
        raise BitLengthError(f"code widths differ: {a.shape[-1]} and {b.shape[-1]} bytes")
    return _POPCOUNT[a ^ b].sum(axis=-1, dtype=np.int32)


def hamming_matrix(queries, db, block_pairs: int = 1 << 22) -> np.ndarray:
    """Hamming distances between every query and every database code: int32 (Q, N).

    Queries go a block at a time so the (block, N, bytes) temporary stays near ``block_pairs`` items.
    """
    queries, db = check_packed(queries), check_packed(db)
    if queries.shape[1] != db.shape[1]:
        raise BitLengthError(f"code widths differ: queries {queries.shape[1]} bytes, database {db.shape[1]}")
    out = np.empty((queries.shape[0], db.shape[0]), dtype=np.int32)
    block = max(1, block_pairs // max(1, db.shape[0] * db.shape[1]))
    for start in range(0, queries.shape[0], block):
        out[start:start + block] = hamming(queries[start:start + block, None, :], db[None, :, :])
    return out


def random_codes(n: int, bits: int, seed: int = 0, distinct: int | None = None) -> np.ndarray:
    """Random packed codes uint8 (n, bits // 8), for tests and benchmarks.

    With ``distinct`` the codes are drawn from only that many different values (heavy ties).
    """
    rng = np.random.default_rng(seed)
    width = n_bytes(bits)
    if distinct is None:
        return rng.integers(0, 256, size=(n, width), dtype=np.uint8)
    pool = rng.integers(0, 256, size=(distinct, width), dtype=np.uint8)
    return pool[rng.integers(0, distinct, size=n)]


def _as_2d(values, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n, width), got shape {arr.shape}")
    return arr
