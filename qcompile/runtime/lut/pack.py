"""Ternary weights as table indices, in the two layouts the LUT engines read.

Both layouts encode a ternary matrix ``W`` of shape ``[K, N]`` (``Y = X @ W``) with values in {-1, 0, +1}.
A group of ``g`` consecutive weights of one output column is one index into a table of the partial sums of
the matching ``g`` activations; the digit of weight ``i`` is ``w_i + 1`` in {0, 1, 2}.

``trits5`` (the FPGA engine's format, 1.6 bits per weight): ``g = 5``, index ``sum(d_i * 3**i)`` in
[0, 243), one byte per group, stored ``[N, ceil(K / 5)]`` so that an output's weights stream contiguously.
Negating every weight maps index ``c`` to ``242 - c``, so a table of the 122 indices 0..121 (121 is the
all-zero group) answers every lookup: ``T[c]`` for ``c <= 121`` and ``-T[242 - c]`` above.

``pairs`` (the CPU kernel's format, 2 bits per weight): ``g = 2``, index ``3 * d_0 + d_1`` in [0, 9), a
4-bit nibble; byte ``q`` of an output holds groups ``2q`` (low nibble) and ``2q + 1`` (high nibble). The
bytes of ``lanes`` consecutive outputs are contiguous (``[ceil(N / lanes), ceil(K / 4), lanes]``) so one
vector load fetches the indices of ``lanes`` outputs, and a byte shuffle (x86 ``pshufb``, Arm ``tbl``) is
``lanes`` lookups in a 16-entry table. ``lane_order`` says which output each byte position holds.

``triplet words`` (the x86-64 AVX-512 kernel's format, 16 bits per 6 weights): ``g = 3``, index
``9 * d_0 + 3 * d_1 + d_2`` in [0, 27); the 16-bit word ``q`` of an output holds groups ``2q`` (low byte)
and ``2q + 1`` (high byte), stored ``[ceil(N / 32), ceil(K / 6), 32]`` with output ``32 b + i`` in lane
``i``: a 16-bit permute (``vpermw``) reads only the low 5 bits of each word, so one vector of words indexes
a 32-entry table of 16-bit sums for the low byte directly and for the high byte after one shift.

Padding: K and N are padded with zero weights (index of an all-zero group); the kernels read padded
activations as zero and never write padded outputs, so any shape packs.
"""

from __future__ import annotations

import numpy as np

from qcompile.errors import BackendError

TRITS5_GROUP = 5
TRITS5_ZERO = 121  # index of five zero weights: digits (1, 1, 1, 1, 1)
TRITS5_TABLE = 122  # entries kept once the sign symmetry folds the other 121 away
PAIR_ZERO = 4  # index of two zero weights: 3 * 1 + 1
TRIPLET = 3
TRIPLET_ENTRIES = 27  # 3 ** 3 indices of a triplet word's byte
WORD_LANES = 32  # 16-bit lanes of a 512-bit vector
NIBBLE_TABLE = 16  # a byte shuffle looks up in 16 entries; pair indices use 9


def check_ternary(weights: np.ndarray, name: str = "weights") -> np.ndarray:
    """``weights`` as an int8 ``[K, N]`` array, or a clear error when it is not ternary."""
    array = np.asarray(weights)
    if array.ndim != 2 or 0 in array.shape:
        raise BackendError(f"{name}: a ternary matmul weight must be a non-empty 2-D [K, N] array, got {array.shape}")
    if not np.isin(array, (-1, 0, 1)).all():
        raise BackendError(f"{name}: weights must be -1, 0 or +1; found {np.setdiff1d(array, (-1, 0, 1))[:5]}")
    return array.astype(np.int8)


def pack_trits5(weights: np.ndarray) -> np.ndarray:
    """``[K, N]`` ternary -> ``[N, ceil(K / 5)]`` uint8 indices (1.6 bits per weight)."""
    trits = check_ternary(weights)
    k, n = trits.shape
    groups = -(-k // TRITS5_GROUP)
    digits = np.ones((groups * TRITS5_GROUP, n), np.int64)
    digits[:k] = trits.astype(np.int64) + 1
    powers = 3 ** np.arange(TRITS5_GROUP, dtype=np.int64)
    codes = np.tensordot(powers, digits.reshape(groups, TRITS5_GROUP, n), axes=([0], [1]))  # [groups, N]
    return np.ascontiguousarray(codes.T.astype(np.uint8))


def unpack_trits5(packed: np.ndarray, k: int) -> np.ndarray:
    """Inverse of :func:`pack_trits5`: ``[N, groups]`` uint8 -> ``[K, N]`` int8."""
    codes = packed.astype(np.int64).T  # [groups, N]
    digits = (codes[:, None, :] // 3 ** np.arange(TRITS5_GROUP)[None, :, None]) % 3
    return (digits.reshape(-1, packed.shape[0])[:k] - 1).astype(np.int8)


def lane_order(lanes: int) -> list[int]:
    """For each accumulator lane of a ``lanes``-wide block, the byte position whose index it sums.

    The kernel widens the low and high table bytes to 16 bits with the byte interleave of the instruction
    set, which works within each 128-bit part of a vector (x86 ``vpunpcklbw`` / ``vpunpckhbw``; Arm
    ``zip1`` / ``zip2`` on a single 128-bit vector): the first half of the lanes comes from bytes 0..7 of
    every 128-bit part, the second half from bytes 8..15.
    """
    if lanes % 16 or lanes < 16:
        raise BackendError(f"the LUT kernel works on vectors of 16, 32 or 64 bytes, not {lanes}")
    parts = range(0, lanes, 16)
    return [base + byte for base in parts for byte in range(8)] + [
        base + byte for base in parts for byte in range(8, 16)
    ]


def pack_pairs(weights: np.ndarray, lanes: int) -> np.ndarray:
    """``[K, N]`` ternary -> ``[ceil(N / lanes), ceil(K / 4), lanes]`` uint8, two 4-bit pair indices a byte."""
    trits = check_ternary(weights)
    k, n = trits.shape
    bytes_per_output = -(-k // 4)
    blocks = -(-n // lanes)
    padded = np.zeros((bytes_per_output * 4, blocks * lanes), np.int64)
    padded[:k, :n] = trits
    codes = (padded[0::2] + 1) * 3 + (padded[1::2] + 1)  # [groups, blocks * lanes]
    packed = (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)  # [bytes, blocks * lanes]
    by_block = packed.reshape(bytes_per_output, blocks, lanes).transpose(1, 0, 2)
    out = np.empty_like(by_block)
    out[:, :, lane_order(lanes)] = by_block
    return np.ascontiguousarray(out)


def pack_triplet_words(weights: np.ndarray, blocks: int = 0) -> np.ndarray:
    """``[K, N]`` ternary -> ``[blocks, ceil(K / 6), 32]`` uint16: two triplet indices a word; ``blocks`` at
    least ``ceil(N / 32)`` (the default), any more hold zero weights."""
    trits = check_ternary(weights)
    k, n = trits.shape
    words_per_output = -(-k // (2 * TRIPLET))
    blocks = max(blocks, -(-n // WORD_LANES))
    digits = np.ones((words_per_output * 2 * TRIPLET, blocks * WORD_LANES), np.int64)  # zero weights
    digits[:k, :n] = trits.astype(np.int64) + 1
    codes = 9 * digits[0::3] + 3 * digits[1::3] + digits[2::3]  # [groups, blocks * 32]
    words = codes[0::2] | (codes[1::2] << 8)  # [words, blocks * 32]
    return np.ascontiguousarray(
        words.reshape(words_per_output, blocks, WORD_LANES).transpose(1, 0, 2).astype(np.uint16)
    )
