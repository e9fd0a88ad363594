"""The numpy definition of what the LUT engines compute, exactly, in integers.

:func:`dense` is the plain int8 x ternary matmul with int32 accumulation. :func:`lut_matmul` computes the
same product the way the FPGA engine does (tables of 5-activation partial sums, sign-folded to 122
entries, one lookup and add per packed byte); both are exact, so they are equal for every input, and the
TVM kernel and the C++ simulation are checked against them bit for bit.
"""

from __future__ import annotations

import numpy as np

from qcompile.runtime.lut.pack import TRITS5_GROUP, TRITS5_TABLE


def dense(activations: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``[M, K]`` int8 @ ``[K, N]`` ternary -> ``[M, N]`` int32."""
    return (activations.astype(np.int32) @ weights.astype(np.int32)).astype(np.int32)


def tables(activations: np.ndarray) -> np.ndarray:
    """``[M, K]`` int8 -> ``[M, groups, 122]`` int16 partial sums ``sum_i (d_i - 1) * x_i`` per index."""
    m, k = activations.shape
    groups = -(-k // TRITS5_GROUP)
    x = np.zeros((m, groups * TRITS5_GROUP), np.int32)
    x[:, :k] = activations
    codes = np.arange(TRITS5_TABLE)
    signs = (codes[:, None] // 3 ** np.arange(TRITS5_GROUP)[None, :]) % 3 - 1  # [122, 5]
    return np.einsum("mgi,ci->mgc", x.reshape(m, groups, TRITS5_GROUP), signs).astype(np.int16)


def lut_matmul(activations: np.ndarray, packed: np.ndarray) -> np.ndarray:
    """``[M, K]`` int8 times weights packed by :func:`~qcompile.runtime.lut.pack.pack_trits5` -> int32."""
    table = tables(activations).astype(np.int32)  # [M, groups, 122]
    codes = packed.astype(np.int64)  # [N, groups]
    folded = np.where(codes < TRITS5_TABLE, codes, 242 - codes)
    sign = np.where(codes < TRITS5_TABLE, 1, -1)
    groups = np.arange(codes.shape[1])[None, :]
    looked_up = table[:, groups, folded]  # [M, N, groups]
    return (looked_up * sign[None]).sum(axis=2, dtype=np.int64).astype(np.int32)
