# mypy: disable-error-code="valid-type"
# (TVMScript annotates buffers as T.Buffer(shape, dtype), which is not a type to mypy.)
"""Kernels for row-major tensors (:class:`~qcompile.backends.tvm.tensors.Rows`): transformer activations
``[..., C]`` stored as ``(1, M, C)``, attention masks and other small index-shaped data.

- :func:`gather_kernel`: a data-movement op with constant parameters (Transpose, Expand, Unsqueeze,
  GatherND or Gather at constant indices, ...) as one gather through a constant index map: the map is what
  the op does to ``arange(size)`` (computed once, at build time, by onnx's reference implementation).
- :func:`embedding_kernel`: a float table ``[V, D]`` read at runtime indices (token embeddings).
- :func:`row_kernel`: LayerNormalization and Softmax over the last axis, one row at a time on 16-lane
  vectors, the row's epilogue fused (the requantization of the result, a NaN guard).
- :func:`integer_softmax_kernel`: the integer Softmax (an exp table, a row sum, an exact rounded division) of
  codes or rounded accumulators, one row at a time, the requantization fused.
- :func:`batched_matmul_kernel`: ``MatMulInteger`` of two activations (``Q K^T``, ``P V``): uint8 codes
  with scalar zero points, on the int8 flavor's dot-product instruction (the second operand packed per batch
  at run time), int32 products summed exactly, zero points corrected with the row and column sums.

The float functions use their own vectorisable forms (:func:`fast_exp`, :func:`fast_erf`): LLVM turns a
vector ``exp`` or ``erf`` into one libm call per lane.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from qcompile.backends.tvm.script import prim_func
from qcompile.backends.tvm.tensors import (
    LANES,
    Anchor,
    Lazy,
    NotLowerable,
    Stored,
    epilogue_env,
    loop_for,
    pack_constants,
    store_index,
)

ROTATION_TILE = 8  # vectors a rotation accumulates at once (8 of the 32 AVX-512 registers)
EXP_LIMIT = 87.0  # exp(87) ~ 6e37: arguments above are clamped (the power of two stays a normal float32)
# Below this, exp is 0. exp(-60) ~ 8.8e-27: divided by a row sum of up to 2^16 terms, or scaled by any
# epilogue, it stays a normal float32. Arguments near -87 gave subnormal results, and each operation on a
# subnormal costs a microcode assist on Intel cores (~100 cycles): MiniLM's masked softmax rows took 0.5 ms
# each instead of 0.09 (Xeon with AMX, 2 cores). The terms dropped are below 1e-26 of the row's largest.
EXP_FLOOR = -60.0
# Row reductions of :func:`row_kernel` (anchor kinds), one value per row.
ROW_REDUCTIONS = ("rowmean", "rowsum", "rowl2", "rowmax", "rowabsmax")


def _vector(dtype: str, lanes: int) -> str:
    return dtype if lanes == 1 else f"{dtype}x{lanes}"


def fast_exp(x: Any, lanes: int) -> Any:
    """``exp(x)`` for float32 ``x`` (any lanes): ``2^n p(r)`` with ``n = round(x / ln 2)``, ``r = x - n ln 2``
    (ln 2 split in two for an exact product) and a degree-6 Taylor polynomial on ``|r| <= ln 2 / 2`` (relative
    error below 2e-7); the power of two is built in the exponent bits. Arguments above 87 are clamped to 87;
    below :data:`EXP_FLOOR` the result is 0 (so that nothing downstream computes with subnormals)."""
    from tvm import tirx

    f32 = _vector("float32", lanes)

    def const(value: float) -> Any:
        return tirx.const(value, "float32")

    clamped = tirx.min(tirx.max(x, const(EXP_FLOOR)), const(EXP_LIMIT))
    n = tirx.floor(clamped * const(1.0 / math.log(2.0)) + const(0.5))
    r = clamped - n * const(0.693145751953125) - n * const(1.428606765330187e-06)
    poly = const(1.0 / 720.0)
    for coefficient in (1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0):
        poly = poly * r + const(coefficient)
    i32 = _vector("int32", lanes)
    bits = (tirx.Cast(i32, n) + tirx.const(127, "int32")) << tirx.const(23, "int32")
    zero = tirx.Broadcast(const(0.0), lanes) if lanes > 1 else const(0.0)
    return tirx.Select(x < const(EXP_FLOOR), zero, poly * tirx.reinterpret(f32, bits))


def fast_tanh(x: Any, lanes: int) -> Any:
    """``tanh(x)`` as ``(1 - t) / (1 + t)`` with ``t = exp(-2 |x|)`` (:func:`fast_exp`), the sign of ``x``
    restored: absolute error below 1.2e-7 (measured on 2M points over [-12, 12] and near zero, where it is a
    relative error up to 1.5e-5 at |x| = 1e-3). LLVM would call libm's tanh once per lane: GPT-2's tanh GELU
    took 26 us of a tiny GPT-2's 57 us of kernels that way."""
    from tvm import tirx

    def const(value: float) -> Any:
        return tirx.const(value, "float32")

    t = fast_exp(const(-2.0) * tirx.abs(x), lanes)
    y = (const(1.0) - t) / (const(1.0) + t)
    return tirx.Select(x < const(0.0), const(0.0) - y, y)


def fast_erf(x: Any, lanes: int) -> Any:
    """``erf(x)`` by Abramowitz and Stegun's 7.1.26 (absolute error below 1.5e-7): ``1 - t p(t) exp(-x^2)``
    with ``t = 1 / (1 + 0.3275911 |x|)``, the sign of ``x`` restored."""
    from tvm import tirx

    def const(value: float) -> Any:
        return tirx.const(value, "float32")

    magnitude = tirx.abs(x)
    t = const(1.0) / (const(1.0) + const(0.3275911) * magnitude)
    poly = const(1.061405429)
    for coefficient in (-1.453152027, 1.421413741, -0.284496736, 0.254829592):
        poly = poly * t + const(coefficient)
    y = const(1.0) - poly * t * fast_exp(const(0.0) - magnitude * magnitude, lanes)
    return tirx.Select(x < const(0.0), const(0.0) - y, y)


def run_length(index: np.ndarray) -> int:
    """The longest ``R`` dividing the map's length such that each block of ``R`` positions of ``index`` reads
    ``R`` consecutive elements (1 when a position is -1, a Pad's fill): an Expand of whole rows or heads
    (grouped-query attention's repeated keys), a Slice of rows, a Concat of blocks."""
    flat = index.reshape(-1).astype(np.int64)
    if flat.size == 0 or (flat < 0).any():
        return 1
    starts = np.flatnonzero(np.diff(flat) != 1) + 1  # where a run of consecutive elements begins
    return int(np.gcd.reduce(np.append(starts, flat.size)))


def transposed_blocks(index: np.ndarray) -> np.ndarray | None:
    """The first source element of each ``[R, C]`` block of the map when every block reads a contiguous ``[C, R]``
    block of the source transposed (``Y[n, r, c] = X[base_n + c R + r]``: attention's ``K^T`` per head), else
    None."""
    if index.ndim < 2 or index.shape[-1] < 2 or index.shape[-2] < 2:
        return None
    rows, columns = index.shape[-2:]
    blocks = index.reshape(-1, rows, columns).astype(np.int64)
    bases = blocks[:, 0, 0]
    expected = bases[:, None, None] + np.arange(columns)[None, None, :] * rows + np.arange(rows)[None, :, None]
    return bases.astype(np.int32) if (bases >= 0).all() and np.array_equal(blocks, expected) else None


def gather_kernel(
    size: int,
    index: np.ndarray,
    dtype: str,
    fill: float | None = None,
    source_shape: tuple[int, ...] | None = None,
    target_shape: tuple[int, ...] | None = None,
    run: int = 1,
    transposed: tuple[int, int] | None = None,
) -> Any:
    """``Y[i] = X[index[i]]`` over the flat elements of ``X`` (of ``source_shape``, default flat) and ``Y`` (of
    ``target_shape``, default flat; ``index`` an int32 constant argument); with a ``fill``, an index of -1 reads
    that value instead (a Pad). Two forms read a map smaller than ``Y``:

    - ``run`` > 1: ``index`` holds the first element of each block of ``run`` consecutive ones
      (:func:`run_length`): ``Y[b * run + j] = X[index[b] + j]``, contiguous memory moved in vectors;
    - ``transposed = (rows, columns)``: ``index`` holds the first element of each block read transposed
      (:func:`transposed_blocks`): ``Y[n, r, c] = X[index[n] + c * rows + r]``.

    The buffers take their callers' shapes so that no reshape (a call of the VM's own, about half a microsecond
    each) surrounds the kernel."""
    from tvm import tirx
    from tvm.script import tirx as T

    count = int(index.size)
    rows, columns = transposed or (1, 1)
    total = count * run * rows * columns
    outer = loop_for(total)
    # a run moves in vectors of 64 bytes where it divides into them (LLVM left the byte loop scalar)
    width = 64 // np.dtype(dtype).itemsize
    width = width if run > 1 and run % width == 0 else 1
    chunks = run // width

    def read(X: Any, at: Any) -> Any:
        if fill is None:
            return X[at]
        return tirx.Select(at < 0, tirx.const(fill, dtype), X[tirx.max(at, 0)])

    @prim_func
    def gather(
        X: T.Buffer(source_shape or (size,), dtype),
        At: T.Buffer((count,), "int32"),
        Y: T.Buffer(target_shape or (total,), dtype),
    ):
        T.func_attr({"tir.noalias": True})
        Xf = T.decl_buffer((size,), dtype, data=X.data)
        Yf = T.decl_buffer((total,), dtype, data=Y.data)
        if transposed is not None:
            for n in outer(count):
                for r in T.serial(rows):
                    for c in T.serial(columns):
                        Yf[(n * rows + r) * columns + c] = Xf[At[n] + c * rows + r]
        elif run > 1:
            for b in outer(count):
                for c in T.serial(chunks):
                    for j in T.vectorized(width):
                        Yf[b * run + c * width + j] = Xf[At[b] + c * width + j]
        else:
            for i in outer(count):
                Yf[i] = read(Xf, At[i])

    return gather


def flat_copy_kernel(size: int, total: int, offset: int, dtype: str, outer: int = 1) -> Any:
    """``Y[o, offset + i] = X[o, i]`` for ``X`` of ``outer`` blocks of ``size`` into ``Y`` of ``outer`` blocks of
    ``total``, both flat (one input of a Concat of row-major tensors: ``outer`` is the product of the dims before
    the axis, ``size`` and ``total`` the elements from it on; a KV cache's past and new positions, a ViT's class
    token before its patches)."""
    from tvm.script import tirx as T

    loop = loop_for(outer * size)

    if outer == 1:

        @prim_func
        def flat_copy(X: T.Buffer((size,), dtype), Y: T.Buffer((total,), dtype)):
            T.func_attr({"tir.noalias": True})
            for i in loop(size):
                Y[offset + i] = X[i]

        return flat_copy

    @prim_func
    def block_copy(X: T.Buffer((outer * size,), dtype), Y: T.Buffer((outer * total,), dtype)):
        T.func_attr({"tir.noalias": True})
        for o in loop(outer):
            for i in T.serial(size):
                Y[o * total + offset + i] = X[o * size + i]

    return block_copy


def embedding_kernel(rows: int, width: int, count: int, index_dtype: str, dtype: str = "float32") -> Any:
    """``Y[s, :] = table[ids[s], :]`` for a ``[rows, width]`` table of ``dtype`` (float32, or a decoder's int8
    rows and their float32 scales; negative ids count from the end, as ONNX Gather's do; out-of-range ids are
    clamped rather than read past the table)."""
    from tvm import tirx
    from tvm.script import tirx as T

    lanes = LANES if width % LANES == 0 else 1
    blocks = width // lanes

    def position(ids: Any, s: Any) -> Any:
        raw = tirx.Cast("int32", ids[s])
        wrapped = tirx.Select(raw < 0, raw + rows, raw)
        return tirx.min(tirx.max(wrapped, 0), rows - 1)

    def columns(b: Any) -> Any:
        return tirx.Ramp(b * lanes, 1, lanes) if lanes > 1 else b

    @prim_func
    def embedding(
        ids: T.Buffer((count,), index_dtype),
        table: T.Buffer((rows, width), dtype),
        Y: T.Buffer((count, width), dtype),
    ):
        T.func_attr({"tir.noalias": True})
        for s in range(count):
            for b in range(blocks):
                Y[s, columns(b)] = table[position(ids, s), columns(b)]

    return embedding


def _horizontal(buffer: Any, lanes: int, combine: Any) -> Any:
    """The lanes of a ``lanes``-wide accumulator combined into one scalar (a tree of ``combine``)."""
    values = [buffer[k] for k in range(lanes)]
    while len(values) > 1:
        values = [combine(values[k], values[k + 1]) for k in range(0, len(values), 2)]
    return values[0]


def row_kernel(value: Lazy, anchor: Anchor, target: Stored) -> tuple[Any, list[Any]]:
    """LayerNormalization (``anchor.kind`` "layernorm"; the scale and bias are the epilogue's rows), Softmax
    ("softmax"), or one value per row over its channels (:data:`ROW_REDUCTIONS`: the mean, sum, 2-norm, maximum
    or largest magnitude), epilogue fused. Rows run in 16-lane blocks; when the width is not a multiple of 16 (a
    ViT's 197 tokens), a softmax's last ``width % 16`` channels are one more vector, and the other kernels' go
    one lane at a time."""
    from tvm import tirx
    from tvm.script import tirx as T

    source = anchor.input
    _, channels, _, count = source.logical
    if source.shape != (1, count, channels):
        raise NotLowerable(f"a row-wise {anchor.kind} of rows stored as {source.shape}")
    blocks, tail = divmod(channels, LANES)
    start = blocks * LANES
    (ints, halves, floats), where = pack_constants(value.constants, channels)
    layernorm = anchor.kind == "layernorm"
    reduction = anchor.kind in ROW_REDUCTIONS  # one value per row
    norm = anchor.kind == "rowl2"  # (sqrt of the sum of squares: F.normalize's divisor, SwinV2's cosine attention)
    largest = anchor.kind in ("rowmax", "rowabsmax")  # (max |x|: the range of per-row quantization at run time)

    def term(x: Any) -> Any:
        if anchor.kind == "rowabsmax":
            return tirx.abs(x)
        return x * x if norm else x

    factor = 1.0 / channels if anchor.kind == "rowmean" else 1.0
    epsilon = anchor.epsilon
    whole = tirx.Ramp(0, 1, LANES)

    def lanes_of(x: float) -> Any:
        return tirx.Broadcast(tirx.const(x, "float32"), LANES)

    def columns(b: Any) -> Any:
        return tirx.Ramp(b * LANES, 1, LANES)

    def finish(x: Any, column: Any, lanes: int, first: Any, second: Any, K64: Any, K32: Any, KF: Any) -> Any:
        if lanes > 1:
            first, second = tirx.Broadcast(first, lanes), tirx.Broadcast(second, lanes)
        normalized = (x - first) * second if layernorm else fast_exp(x - first, lanes) * second
        return value.expression(epilogue_env(normalized, lambda i: None, (K64, K32, KF), where, column, lanes))

    def add(a: Any, b: Any) -> Any:
        return a + b

    def reduced(total: Any, K64: Any, K32: Any, KF: Any) -> Any:
        return value.expression(epilogue_env(total, lambda i: None, (K64, K32, KF), where, 0, 1))

    def maximum(a: Any, b: Any) -> Any:
        return tirx.max(a, b)

    # A softmax's last width % 16 channels run as one more 16-lane vector: read at columns clamped to the row
    # (the lanes past it hold -inf, whose exp is 0), finished whole and stored lane by lane. One lane at a time,
    # each exp is some 30 scalar instructions, twice: Data2VecAudio's 39-wide attention rows spent 18 % of the
    # model's time in its two softmax kernels that way. The other row kernels keep the lane-by-lane tail.
    vector_tail = tail > 0 and not layernorm and not reduction
    scalar_tail = 0 if vector_tail else tail
    tail_columns = tirx.min(tirx.Ramp(start, 1, LANES), tirx.Broadcast(tirx.const(channels - 1, "int32"), LANES))

    def tail_of(X: Any, m: Any) -> Any:
        live = tirx.Ramp(0, 1, LANES) < tirx.Broadcast(tirx.const(tail, "int32"), LANES)
        return tirx.Select(live, X[0, m, tail_columns], lanes_of(-math.inf))

    outer = loop_for(count * channels * 8)

    @prim_func
    def rowwise(
        X: T.Buffer(source.shape, "float32"),
        K64: T.Buffer(ints.shape, "int64"),
        K32: T.Buffer(halves.shape, "int32"),
        KF: T.Buffer(floats.shape, "float32"),
        Y: T.Buffer(target.shape, target.dtype),
    ):
        T.func_attr({"tir.noalias": True})
        for m in outer(count):
            acc = T.alloc_buffer((LANES,), "float32", scope="global")
            stats = T.alloc_buffer((2,), "float32", scope="global")
            finished = T.alloc_buffer((LANES,), target.dtype, scope="global")
            # Maxima start at -inf: a row masked with float32's lowest value (-3.4e38, torch's masked_fill with
            # finfo.min, as DeBERTa does) kept a start of -3e38 as its maximum, every exp underflowed to 0, and
            # the row became 0 / 0 = NaN where onnxruntime gives the uniform row.
            if not layernorm and not reduction:  # softmax: the row's maximum first
                acc[whole] = lanes_of(-math.inf)
                for b in range(blocks):
                    acc[whole] = T.max(acc[whole], X[0, m, columns(b)])
                if vector_tail:
                    acc[whole] = T.max(acc[whole], tail_of(X, m))
                stats[0] = _horizontal(acc, LANES, maximum)
            acc[whole] = lanes_of(-math.inf if largest else 0.0)
            for b in range(blocks):
                if largest:
                    acc[whole] = T.max(acc[whole], term(X[0, m, columns(b)]))
                elif layernorm or reduction:
                    acc[whole] = acc[whole] + term(X[0, m, columns(b)])
                else:
                    acc[whole] = acc[whole] + fast_exp(X[0, m, columns(b)] - T.Broadcast(stats[0], LANES), LANES)
            if vector_tail:
                acc[whole] = acc[whole] + fast_exp(tail_of(X, m) - T.Broadcast(stats[0], LANES), LANES)
            stats[1] = _horizontal(acc, LANES, maximum if largest else add)
            for t in range(scalar_tail):
                if largest:
                    stats[1] = T.max(stats[1], term(X[0, m, start + t]))
                elif layernorm or reduction:
                    stats[1] = stats[1] + term(X[0, m, start + t])
                else:
                    stats[1] = stats[1] + fast_exp(X[0, m, start + t] - stats[0], 1)
            if norm:
                Y[store_index(target, 0, m, 0)] = reduced(T.sqrt(stats[1]), K64, K32, KF)
            elif largest:
                Y[store_index(target, 0, m, 0)] = reduced(stats[1], K64, K32, KF)
            elif reduction:
                Y[store_index(target, 0, m, 0)] = reduced(stats[1] * T.float32(factor), K64, K32, KF)
            elif layernorm:
                stats[0] = stats[1] * T.float32(1.0 / channels)
                acc[whole] = lanes_of(0.0)
                for b in range(blocks):
                    acc[whole] = acc[whole] + (X[0, m, columns(b)] - T.Broadcast(stats[0], LANES)) * (
                        X[0, m, columns(b)] - T.Broadcast(stats[0], LANES)
                    )
                stats[1] = _horizontal(acc, LANES, add)
                for t in range(tail):
                    stats[1] = stats[1] + (X[0, m, start + t] - stats[0]) * (X[0, m, start + t] - stats[0])
                stats[1] = T.float32(1.0) / T.sqrt(stats[1] * T.float32(1.0 / channels) + T.float32(epsilon))
            else:
                stats[1] = T.float32(1.0) / stats[1]
            if not reduction:
                for b in range(blocks):
                    Y[store_index(target, 0, m, columns(b))] = finish(
                        X[0, m, columns(b)], columns(b), LANES, stats[0], stats[1], K64, K32, KF
                    )
                if vector_tail:
                    finished[whole] = finish(
                        X[0, m, tail_columns], tail_columns, LANES, stats[0], stats[1], K64, K32, KF
                    )
                    for t in range(tail):
                        Y[store_index(target, 0, m, start + t)] = finished[t]
                for t in range(scalar_tail):
                    Y[store_index(target, 0, m, start + t)] = finish(
                        X[0, m, start + t], start + t, 1, stats[0], stats[1], K64, K32, KF
                    )

    return rowwise, [source, ints, halves, floats]


def column_kernel(value: Lazy, anchor: Anchor, target: Stored) -> tuple[Any, list[Any]]:
    """The mean ("colmean"), sum ("colsum") or 2-norm ("coll2") of float rows over all of them, one row out (a
    token mean-pooling, ConvNeXt V2's response norm): 16 channels at a time down the rows, the last ``width %
    16`` one lane at a time, epilogue fused."""
    from tvm import tirx
    from tvm.script import tirx as T

    source = anchor.input
    _, channels, _, count = source.logical
    if source.shape != (1, count, channels):
        raise NotLowerable(f"a {anchor.kind} of rows stored as {source.shape}")
    blocks, tail = divmod(channels, LANES)
    start = blocks * LANES
    (ints, halves, floats), where = pack_constants(value.constants, channels)
    factor = 1.0 / count if anchor.kind == "colmean" else 1.0

    norm = anchor.kind == "coll2"

    def term(x: Any) -> Any:
        return x * x if norm else x

    def finish(total: Any, column: Any, lanes: int, K64: Any, K32: Any, KF: Any) -> Any:
        if norm:
            scaled = tirx.sqrt(total)
        else:
            scaled = total * (tirx.Broadcast(tirx.const(factor, "float32"), lanes) if lanes > 1 else T.float32(factor))
        return value.expression(epilogue_env(scaled, lambda i: None, (K64, K32, KF), where, column, lanes))

    def columns(b: Any) -> Any:
        return tirx.Ramp(b * LANES, 1, LANES)

    whole = tirx.Ramp(0, 1, LANES)

    @prim_func
    def column_reduce(
        X: T.Buffer(source.shape, "float32"),
        K64: T.Buffer(ints.shape, "int64"),
        K32: T.Buffer(halves.shape, "int32"),
        KF: T.Buffer(floats.shape, "float32"),
        Y: T.Buffer(target.shape, target.dtype),
    ):
        T.func_attr({"tir.noalias": True})
        acc = T.alloc_buffer((LANES,), "float32", scope="global")
        for b in range(blocks):
            acc[whole] = T.Broadcast(T.float32(0), LANES)
            for m in range(count):
                acc[whole] = acc[whole] + term(X[0, m, columns(b)])
            Y[store_index(target, 0, 0, columns(b))] = finish(acc[whole], columns(b), LANES, K64, K32, KF)
        for t in range(tail):
            acc[0] = T.float32(0)
            for m in range(count):
                acc[0] = acc[0] + term(X[0, m, start + t])
            Y[store_index(target, 0, 0, start + t)] = finish(acc[0], start + t, 1, K64, K32, KF)

    return column_reduce, [source, ints, halves, floats]


def cumsum_kernel(value: Lazy, anchor: Anchor, target: Stored) -> tuple[Any, list[Any]]:
    """CumSum along each row (``anchor.terms``: exclusive, reverse), summed in the input's dtype as onnxruntime
    and numpy sum it, one element at a time; epilogue fused."""
    from tvm.script import tirx as T

    source = anchor.input
    _, channels, _, count = source.logical
    if source.shape != (1, count, channels):
        raise NotLowerable(f"a cumulative sum of rows stored as {source.shape}")
    exclusive, reverse = (bool(term) for term in anchor.terms)
    dtype = source.dtype
    (ints, halves, floats), where = pack_constants(value.constants, channels)

    def finish(total: Any, column: Any, K64: Any, K32: Any, KF: Any) -> Any:
        return value.expression(epilogue_env(total, lambda i: None, (K64, K32, KF), where, column, 1))

    def column(t: Any) -> Any:
        return channels - 1 - t if reverse else t

    @prim_func
    def cumsum(
        X: T.Buffer(source.shape, dtype),
        K64: T.Buffer(ints.shape, "int64"),
        K32: T.Buffer(halves.shape, "int32"),
        KF: T.Buffer(floats.shape, "float32"),
        Y: T.Buffer(target.shape, target.dtype),
    ):
        T.func_attr({"tir.noalias": True})
        for m in range(count):
            acc = T.alloc_buffer((1,), dtype, scope="global")
            acc[0] = T.Cast(dtype, 0)
            for t in range(channels):
                if exclusive:
                    Y[store_index(target, 0, m, column(t))] = finish(acc[0], column(t), K64, K32, KF)
                    acc[0] = acc[0] + X[0, m, column(t)]
                else:
                    acc[0] = acc[0] + X[0, m, column(t)]
                    Y[store_index(target, 0, m, column(t))] = finish(acc[0], column(t), K64, K32, KF)

    return cumsum, [source, ints, halves, floats]


def integer_softmax_kernel(value: Lazy, anchor: Anchor, target: Stored) -> tuple[Any, list[Any]]:
    """The integer Softmax of :meth:`qcompile.backends.integer.arithmetic.Lowering.integer_softmax` over each
    row of int64 ``x`` (codes, or a rounded accumulator): ``e = table[clip(max(x) - x, 0, E - 1)]``, ``S = sum
    e``, and ``(e m0 + S half) // (S unit)`` as the epilogue's source. The quotient is exact: the float64
    estimate (numerator and divisor are exact below 2**53, the quotient within 2**-40 of the true one) is
    corrected by one step of an integer remainder check, instead of one 64-bit division per element.

    Rows run 16 lanes at a time; the last ``width % 16`` channels are one more vector read at columns clamped
    to the row (a repeated value changes no maximum; its exp is left out of the sum), finished whole and
    stored lane by lane. One lane at a time, the TorchScript export of Data2VecAudio (39-wide attention rows)
    ran this kernel at about a sixth of the speed."""
    from tvm import tirx
    from tvm.script import tirx as T

    source = anchor.input
    _, channels, _, count = source.logical
    if source.shape != (1, count, channels):
        raise NotLowerable(f"an integer softmax of rows stored as {source.shape}")
    table = anchor.weights
    assert table is not None
    m0, half, unit = anchor.terms
    last = table.size - 1
    (ints, halves, floats), where = pack_constants(value.constants, channels)
    blocks, tail = divmod(channels, LANES)
    start = blocks * LANES
    ragged = tail > 0
    whole = tirx.Ramp(0, 1, LANES)
    wide = f"int64x{LANES}"

    def splat(x: Any, dtype: str = "int64") -> Any:
        return tirx.Broadcast(tirx.const(x, dtype) if isinstance(x, int) else x, LANES)

    def columns(b: Any) -> Any:
        return tirx.Ramp(b * LANES, 1, LANES)

    tail_columns = tirx.min(tirx.Ramp(start, 1, LANES), splat(channels - 1, "int32"))
    live = tirx.Ramp(0, 1, LANES) < splat(tail, "int32")

    def exp_of(E: Any, x: Any, peak: Any) -> Any:
        gap = tirx.min(tirx.max(splat(peak) - x, splat(0)), splat(last))
        return tirx.Cast(wide, E[tirx.Cast(f"int32x{LANES}", gap)])

    def ratio(e: Any, total: Any, reciprocal: Any) -> Any:
        numerator = e * splat(m0) + splat(total * tirx.const(half, "int64"))
        divisor = splat(total * tirx.const(unit, "int64"))
        estimate = tirx.Cast(wide, tirx.Cast(f"float64x{LANES}", numerator) * splat(reciprocal, "float64"))
        remainder = numerator - estimate * divisor
        low = tirx.Cast(wide, remainder < splat(0))
        high = tirx.Cast(wide, remainder >= divisor)
        return estimate + high - low

    def finish(q: Any, c: Any, K64: Any, K32: Any, KF: Any) -> Any:
        return value.expression(epilogue_env(q, lambda i: None, (K64, K32, KF), where, c, LANES))

    outer = loop_for(count * channels * 8)

    @prim_func
    def integer_softmax(
        X: T.Buffer(source.shape, "int64"),
        E: T.Buffer((table.size,), "int32"),
        K64: T.Buffer(ints.shape, "int64"),
        K32: T.Buffer(halves.shape, "int32"),
        KF: T.Buffer(floats.shape, "float32"),
        Y: T.Buffer(target.shape, target.dtype),
    ):
        T.func_attr({"tir.noalias": True})
        for m in outer(count):
            exps = T.alloc_buffer((start + LANES,), "int64", scope="global")
            acc = T.alloc_buffer((LANES,), "int64", scope="global")
            stats = T.alloc_buffer((2,), "int64", scope="global")
            reciprocal = T.alloc_buffer((1,), "float64", scope="global")
            finished = T.alloc_buffer((LANES,), target.dtype, scope="global")
            acc[whole] = T.Broadcast(X[0, m, 0], LANES)
            for b in range(blocks):
                acc[whole] = T.max(acc[whole], X[0, m, columns(b)])
            if ragged:
                acc[whole] = T.max(acc[whole], X[0, m, tail_columns])
            stats[0] = _horizontal(acc, LANES, tirx.max)
            acc[whole] = T.Broadcast(T.int64(0), LANES)
            for b in range(blocks):
                exps[columns(b)] = exp_of(E, X[0, m, columns(b)], stats[0])
                acc[whole] = acc[whole] + exps[columns(b)]
            if ragged:
                exps[columns(blocks)] = tirx.Select(live, exp_of(E, X[0, m, tail_columns], stats[0]), splat(0))
                acc[whole] = acc[whole] + exps[columns(blocks)]
            stats[1] = _horizontal(acc, LANES, lambda a, b: a + b)
            reciprocal[0] = T.float64(1.0) / T.Cast("float64", stats[1] * T.int64(unit))
            for b in range(blocks):
                Y[store_index(target, 0, m, columns(b))] = finish(
                    ratio(exps[columns(b)], stats[1], reciprocal[0]), columns(b), K64, K32, KF
                )
            if ragged:
                finished[whole] = finish(
                    ratio(exps[columns(blocks)], stats[1], reciprocal[0]), tail_columns, K64, K32, KF
                )
                for t in range(tail):
                    Y[store_index(target, 0, m, start + t)] = finished[t]

    return integer_softmax, [source, table.astype(np.int32), ints, halves, floats]


def batched_matmul_kernel(
    value: Lazy, anchor: Anchor, other: Stored, target: Stored, flavor: Any = None
) -> tuple[Any, list[Any]]:
    """``(A - za) (B - zb)`` per batch for uint8 ``A [batch, M, K]`` (``anchor.input``, rows of K) and ``B [batch,
    K, N]`` (``other``, rows of N), exactly in int32: ``sum a b - zb sum_k a - za sum_k b + K za zb``, epilogue
    fused; or ``A B`` of float32 activations. Integer products go on the int8 ``flavor``'s dot-product
    instruction where its shapes allow (:func:`_batched_dot_kernel`), else on int32 vectors of 16, 8 or 4
    lanes: the widest that divides ``N``, or when none does, the widest not above it with the last ``N % lanes``
    columns one more vector read at columns clamped to the row, finished whole and stored lane by lane (an
    ``N`` under 4 goes one lane at a time)."""
    from tvm import tirx
    from tvm.script import tirx as T

    source = anchor.input
    if anchor.other_transposed or (
        flavor is not None
        and anchor.source_dtype == "int32"
        and source.logical[1] % flavor.group == 0
        and other.logical[1] % flavor.lanes == 0
    ):
        return _batched_dot_kernel(value, anchor, other, target, flavor)
    _, depth, _, total = source.logical
    _, width, _, other_rows = other.logical
    batch = other_rows // depth
    rows = total // batch
    za, zb = anchor.zero_point, anchor.other_zero
    # the widest vector that divides N: Swin's P V (N = 8, a head of 8 channels) ran one lane at a time, 23 % of
    # the model's run in that one kernel. Else a last, partial vector: Data2VecAudio's Q K^T over 39 positions
    # (N = 39) went one lane at a time, 15 % of its run in two such kernels.
    lanes = next((count for count in (LANES, 8, 4) if width % count == 0), 0)
    lanes = lanes or next((count for count in (LANES, 8, 4) if width > count), 1)
    blocks, tail = divmod(width, lanes)
    ragged = tail > 0
    start = blocks * lanes
    (ints, halves, floats), where = pack_constants(value.constants, width)
    dtype, accumulator = source.dtype, anchor.source_dtype  # uint8 into int32, or float32 throughout
    integer = accumulator == "int32"
    wide = _vector(accumulator, lanes)
    whole = tirx.Ramp(0, 1, lanes) if lanes > 1 else 0

    def columns(b: Any) -> Any:
        return tirx.Ramp(b * lanes, 1, lanes) if lanes > 1 else b

    def widen(x: Any) -> Any:
        return tirx.Cast(wide, x) if integer else x

    def splat(x: Any) -> Any:
        return tirx.Broadcast(x, lanes) if lanes > 1 else x

    tail_columns = (
        tirx.min(tirx.Ramp(start, 1, lanes), tirx.Broadcast(tirx.const(width - 1, "int32"), lanes)) if ragged else 0
    )

    def product(A: Any, g: Any, m: Any, k: Any, b_row: Any) -> Any:
        """Row ``m``'s k-th code times ``b_row`` (a vector of B's k-th row)."""
        return splat(tirx.Cast(accumulator, A[0, g * rows + m, k])) * widen(b_row)

    # (allocated only where it is read: a buffer over the stack limit would be a heap workspace every call)
    edge_rows = depth if ragged else 1

    def finish(acc: Any, colsum: Any, rowsum: Any, K64: Any, K32: Any, KF: Any, at: Any) -> Any:
        corrected = acc
        if integer:
            corrected = (
                acc
                - splat(tirx.const(zb, "int32") * rowsum)
                - colsum * splat(tirx.const(za, "int32"))
                + splat(tirx.const(depth * za * zb, "int32"))
            )
        return value.expression(epilogue_env(corrected, lambda i: None, (K64, K32, KF), where, at, lanes))

    outer = loop_for(batch * rows * depth * width)

    @prim_func
    def batched(
        A: T.Buffer(source.shape, dtype),
        B: T.Buffer(other.shape, dtype),
        K64: T.Buffer(ints.shape, "int64"),
        K32: T.Buffer(halves.shape, "int32"),
        KF: T.Buffer(floats.shape, "float32"),
        Y: T.Buffer(target.shape, target.dtype),
    ):
        T.func_attr({"tir.noalias": True})
        for g in outer(batch):
            # the last, partial vector's columns of B (clamped to the row), gathered once per batch: gathered
            # in the row loop, each was a lane-by-lane insert, and the kernel ran slower than one lane at a time
            edge = T.alloc_buffer((edge_rows, lanes), dtype, scope="global")
            if ragged:
                for k in range(depth):
                    edge[k, whole] = B[0, g * depth + k, tail_columns]
            for m in range(rows):
                rowsum = T.alloc_buffer((1,), accumulator, scope="global")
                rowsum[0] = T.Cast(accumulator, 0)
                if integer:
                    for k in range(depth):
                        rowsum[0] = rowsum[0] + T.Cast(accumulator, A[0, g * rows + m, k])
                for b in range(blocks):
                    acc = T.alloc_buffer((lanes,), accumulator, scope="global")
                    colsum = T.alloc_buffer((lanes,), accumulator, scope="global")
                    acc[whole] = splat(T.Cast(accumulator, 0))
                    colsum[whole] = splat(T.Cast(accumulator, 0))
                    for k in range(depth):
                        acc[whole] = acc[whole] + product(A, g, m, k, B[0, g * depth + k, columns(b)])
                        if integer:
                            colsum[whole] = colsum[whole] + widen(B[0, g * depth + k, columns(b)])
                    Y[store_index(target, 0, g * rows + m, columns(b))] = finish(
                        acc[whole], colsum[whole], rowsum[0], K64, K32, KF, columns(b)
                    )
                if ragged:
                    last = T.alloc_buffer((lanes,), accumulator, scope="global")
                    lastsum = T.alloc_buffer((lanes,), accumulator, scope="global")
                    finished = T.alloc_buffer((lanes,), target.dtype, scope="global")
                    last[whole] = splat(T.Cast(accumulator, 0))
                    lastsum[whole] = splat(T.Cast(accumulator, 0))
                    for k in range(depth):
                        last[whole] = last[whole] + product(A, g, m, k, edge[k, whole])
                        if integer:
                            lastsum[whole] = lastsum[whole] + widen(edge[k, whole])
                    finished[whole] = finish(last[whole], lastsum[whole], rowsum[0], K64, K32, KF, tail_columns)
                    for t in range(tail):
                        Y[store_index(target, 0, g * rows + m, start + t)] = finished[t]

    return batched, [source, other, ints, halves, floats]


def _batched_dot_kernel(
    value: Lazy, anchor: Anchor, other: Stored, target: Stored, flavor: Any
) -> tuple[Any, list[Any]]:
    """The integer batched product on the int8 ``flavor``'s dot-product instruction (``vpdpbusd``,
    ``vpmaddwd``, ``sdot``, ``smull`` + ``sadalp``), as the weight kernels use it.

    Per batch, ``B`` is first packed as the flavor packs weights (:func:`~qcompile.backends.tvm.int8_kernels.
    pack_weights`: for each ``lanes`` columns, each group of ``g`` consecutive k, the bytes one instruction
    reads), as ``b - s`` (``s = 128`` for the flavors that multiply signed bytes, else 0), and its column sums
    ``C`` are taken. Each row then reads ``g`` bytes of ``A`` at a time, as the flavor's activations (``a - o``,
    ``o`` its offset), into up to four column blocks' accumulators, and the instruction gives
    ``D = sum (a - o)(b - s)``. Then, with the row sum ``R = sum_k a``, exactly in int32:
    ``sum (a - za)(b - zb) = D + (s - zb)(R - K o) + (o - za) C - K zb (o - za)``.
    all-MiniLM-L6-v2's attention products (12 heads of 64 x 32 by 32 x 64, or 64 x 64 by 64 x 32): 45 us a call
    on int32 vectors (a multiply and two adds per 16 products), 7 us here (AMD EPYC, AVX-512 VNNI)."""
    from tvm import tirx
    from tvm.script import tirx as T

    source = anchor.input
    _, depth, _, total = source.logical
    transposed = anchor.other_transposed  # B given as B^T's rows, [batch N, K]
    if transposed:
        width = anchor.logical[1]
        batch = other.logical[3] // width
    else:
        _, width, _, other_rows = other.logical
        batch = other_rows // depth
    rows = total // batch
    za, zb = anchor.zero_point, anchor.other_zero
    lanes, group, packed = flavor.lanes, flavor.group, flavor.weight_dtype
    blocks, steps = width // lanes, depth // group
    tile = next(t for t in (4, 3, 2, 1) if blocks % t == 0)  # column blocks accumulated at once
    shift = 128 if packed == "int8" else 0
    offset = flavor.offset
    (ints, halves, floats), where = pack_constants(value.constants, width)

    def splat(x: Any) -> Any:
        return tirx.Broadcast(x, lanes)

    def block(b: Any) -> Any:
        return tirx.Ramp(b * lanes, 1, lanes)

    def finish(dot: Any, colsum: Any, rowsum: Any, K64: Any, K32: Any, KF: Any, b: Any) -> Any:
        # rowsum: R - K o
        i32 = "int32"
        corrected = (
            dot
            + splat(tirx.const(shift - zb, i32) * rowsum)
            + colsum * splat(tirx.const(offset - za, i32))
            - splat(tirx.const(depth * zb * (offset - za), i32))
        )
        return value.expression(epilogue_env(corrected, lambda i: None, (K64, K32, KF), where, block(b), lanes))

    outer = loop_for(batch * rows * depth * width)
    bits = 8 if packed == "int8" else 16  # each b's field in the instruction's operand
    field = f"uint{bits * group}"  # one field per k of a group, for each of the lanes columns
    word = f"{field}x{lanes}"
    flip = 0x80 if packed == "int8" else 0  # b ^ 0x80 is b - 128 as a signed byte
    ones = tirx.Broadcast(tirx.const(1, packed), lanes * group)

    def interleaved(B: Any, g: Any, q: Any, b: Any) -> Any:
        """The ``group`` rows k = q g .. q g + g - 1 of block ``b`` as the instruction reads them: for each
        column, its ``group`` fields side by side in one word (vector shifts and ors, no scalar copies)."""
        fields = None
        for j in range(group):
            row = tirx.Cast(word, B[0, g * depth + q * group + j, block(b)])
            if flip:
                row = row ^ tirx.Broadcast(tirx.const(flip, field), lanes)
            shifted = row << tirx.Broadcast(tirx.const(bits * j, field), lanes) if j else row
            fields = shifted if fields is None else fields | shifted
        return tirx.reinterpret(f"{packed}x{lanes * group}", fields)

    def columns_words(W: Any, g: Any, q: Any, b: Any) -> Any:
        """For B given as B^T's rows: the ``group`` = 4 k of group ``q`` for the block's columns, one 32-bit
        word of each column's row (a strided load), as :func:`interleaved` lays them out."""
        return W[tirx.Ramp((g * width + b * lanes) * steps + q, steps, lanes)]

    def byte_sums(words: Any) -> Any:
        """Per lane, the sum of the four bytes of a 32-bit word."""
        mask = tirx.Broadcast(tirx.const(0xFF, "uint32"), lanes)
        total = None
        for j in range(4):
            shifted = words >> tirx.Broadcast(tirx.const(8 * j, "uint32"), lanes) if j else words
            part = tirx.Cast(f"int32x{lanes}", shifted & mask)
            total = part if total is None else total + part
        return total

    flip_words = tirx.Broadcast(tirx.const(0x80808080 if flip else 0, "uint32"), lanes)

    @prim_func
    def batched_dot(
        A: T.Buffer(source.shape, "uint8"),
        B: T.Buffer(other.shape, "uint8"),
        K64: T.Buffer(ints.shape, "int64"),
        K32: T.Buffer(halves.shape, "int32"),
        KF: T.Buffer(floats.shape, "float32"),
        Y: T.Buffer(target.shape, target.dtype),
    ):
        T.func_attr({"tir.noalias": True})
        W = T.decl_buffer(((batch * width if transposed else 1) * steps,), "uint32", data=B.data)
        for g in outer(batch):
            P = T.alloc_buffer((blocks, steps, lanes * group), packed, scope="global")
            C = T.alloc_buffer((width,), "int32", scope="global")
            for b in range(blocks):
                C[block(b)] = splat(T.int32(0))
                for q in range(steps):
                    if transposed:
                        words = columns_words(W, g, q, b)
                        P[b, q, tirx.Ramp(0, 1, lanes * group)] = tirx.reinterpret(
                            f"{packed}x{lanes * group}", words ^ flip_words
                        )
                        C[block(b)] = C[block(b)] + byte_sums(words)
                    else:
                        P[b, q, tirx.Ramp(0, 1, lanes * group)] = interleaved(B, g, q, b)
                        for j in T.unroll(group):
                            C[block(b)] = C[block(b)] + T.Cast(
                                f"int32x{lanes}", B[0, g * depth + q * group + j, block(b)]
                            )
            for m in range(rows):
                # the row's sum less K o, from the same instruction against ones (every lane holds it)
                R = T.alloc_buffer((lanes,), "int32", scope="global")
                R[tirx.Ramp(0, 1, lanes)] = splat(T.int32(0))
                for q in range(steps):
                    R[tirx.Ramp(0, 1, lanes)] = flavor.dot(
                        R[tirx.Ramp(0, 1, lanes)],
                        flavor.activations(A[0, g * rows + m, tirx.Ramp(q * group, 1, group)]),
                        ones,
                    )
                for bt in range(blocks // tile):
                    acc = T.alloc_buffer((tile * lanes,), "int32", scope="global")
                    for t in T.unroll(tile):
                        acc[block(t)] = splat(T.int32(0))
                    for q in range(steps):
                        for t in T.unroll(tile):
                            acc[block(t)] = flavor.dot(
                                acc[block(t)],
                                flavor.activations(A[0, g * rows + m, tirx.Ramp(q * group, 1, group)]),
                                P[bt * tile + t, q, tirx.Ramp(0, 1, lanes * group)],
                            )
                    for t in T.unroll(tile):
                        Y[store_index(target, 0, g * rows + m, block(bt * tile + t))] = finish(
                            acc[block(t)], C[block(bt * tile + t)], R[0], K64, K32, KF, bt * tile + t
                        )

    return batched_dot, [source, other, ints, halves, floats]


def sylvester(size: int) -> np.ndarray:
    """Sylvester's Hadamard matrix of a power-of-two ``size`` (entries +-1)."""
    matrix = np.ones((1, 1), np.float32)
    while matrix.shape[0] < size:
        matrix = np.block([[matrix, matrix], [matrix, -matrix]])
    return matrix


def _walsh_hadamard_16(x: Any) -> Any:
    """``x H_16`` for one 16-lane vector: four butterfly stages, each a lane shuffle and a blend of the sum and
    the difference."""
    from tvm import tirx

    for stride in (8, 4, 2, 1):
        swapped = tirx.Shuffle([x], [lane ^ stride for lane in range(LANES)])
        x = tirx.Shuffle([x + swapped, swapped - x], [lane + LANES if lane & stride else lane for lane in range(LANES)])
    return x


def regrouped(inner: np.ndarray, outer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``H_m (x) H_p`` with groups a multiple of 16 wide where the outer factor allows: when ``p`` is not a
    multiple of 16 and the outer factor is itself a Kronecker product ``A (x) B``, the same matrix is
    ``A (x) (B (x) H_p)``, taken with the smallest ``B`` that makes the inner factor a multiple of 16. SmolLM2's
    576 channels come as ``H_144 (x) H_4`` with ``H_144 = H_12 (x) H_12``: as ``H_12 (x) H_48`` the rotation
    runs on contiguous vectors (48 + 12 multiply-adds per channel) instead of mixing 144 groups across
    strided lanes (144 per channel): one 256-row rotation took 0.80 ms, now 0.13 ms (2-core Xeon). Otherwise
    the factors are returned unchanged."""
    p, m = inner.shape[0], outer.shape[0]
    corner = float(outer[0, 0])
    if p % LANES == 0 or corner == 0.0:
        return inner, outer
    for size in range(2, m):
        if m % size or (size * p) % LANES:
            continue
        major, minor = outer[::size, ::size], outer[:size, :size] / corner
        if np.allclose(np.kron(major, minor), outer, rtol=1e-6, atol=0.0):
            return np.kron(minor, inner).astype(np.float32), major.astype(np.float32)
    return inner, outer


def rotation_kernel(value: Lazy, anchor: Anchor, target: Stored) -> tuple[Any, list[Any]]:
    """A Hadamard rotation ``y = (x * s) (H_m (x) H_p)`` of each row of ``K = m p`` channels, epilogue fused:
    the row scaled by the signs ``s``, each of its ``m`` groups of ``p`` multiplied by the inner factor
    ``H_p`` (into a scratch row), then the groups mixed by the outer factor ``H_m`` (the identity for a
    block-diagonal rotation). An inner factor that is Sylvester's matrix times a constant (as the rotation
    pass makes it) runs as a fast Walsh-Hadamard transform: sums and differences of the row's 16-lane vectors,
    then four in-vector butterflies, ``p log p`` additions instead of ``p^2`` multiply-adds."""
    from tvm import tirx
    from tvm.script import tirx as T

    source = anchor.input
    signs, inner, outer = anchor.factors
    inner, outer = regrouped(inner, outer)
    _, channels, _, count = source.logical
    p, m = inner.shape[0], outer.shape[0]
    lanes = LANES if p % LANES == 0 else 1
    blocks = p // lanes
    (ints, halves, floats), where = pack_constants(value.constants, channels)
    whole = tirx.Ramp(0, 1, lanes) if lanes > 1 else 0
    power_of_two = p & (p - 1) == 0
    scale = float(inner[0, 0])
    fast = lanes == LANES and power_of_two and blocks <= 16 and np.array_equal(inner, scale * sylvester(p))
    # Groups narrower than a vector (SmolLM2's 576 = 144 x 4): the outer mixing runs across the groups instead,
    # 16 output groups at a time for each position j in a group (channels j, j + p, ...: strided lanes).
    across = lanes == 1 and m % LANES == 0
    across_blocks = max(m // LANES, 1)
    across_tile = min(across_blocks, ROTATION_TILE)
    across_tiles = -(-across_blocks // across_tile)

    def group_block(t: Any, b: Any) -> Any:
        return tirx.min(t * across_tile + b, across_blocks - 1) * LANES

    def strided(t: Any, b: Any, j: Any) -> Any:
        return tirx.Ramp(group_block(t, b) * p + j, p, LANES)

    def finish_across(acc: Any, K64: Any, K32: Any, KF: Any, channels_at: Any) -> Any:
        return value.expression(epilogue_env(acc, lambda i: None, (K64, K32, KF), where, channels_at, LANES))

    def splat(x: Any) -> Any:
        return tirx.Broadcast(x, lanes) if lanes > 1 else x

    def span(start: Any) -> Any:
        return tirx.Ramp(start, 1, lanes) if lanes > 1 else start

    def finish(acc: Any, K64: Any, K32: Any, KF: Any, channel: Any) -> Any:
        return value.expression(epilogue_env(acc, lambda i: None, (K64, K32, KF), where, span(channel), lanes))

    def mixed_blocks(scaled: Any, i: Any, b: Any) -> Any:
        """Block ``b`` of the group's vectors combined by ``H_blocks`` (the cross-vector butterfly stages):
        source block ``a`` enters with the sign ``(-1)^popcount(a & b)``."""
        total = None
        for source_block in range(blocks):
            parity = tirx.popcount(tirx.const(source_block, "int32") & b) % 2
            sign = splat(tirx.Cast("float32", 1 - 2 * parity))
            term = scaled[span(i * p + source_block * lanes)] * sign
            total = term if total is None else total + term
        return total

    zero = splat(tirx.const(0.0, "float32"))
    outer_loop = loop_for(count * channels * (p + m))
    tile = min(blocks, ROTATION_TILE)  # blocks of lanes accumulated at once: independent chains in registers
    tiles = -(-blocks // tile)

    def column(t: Any, b: Any) -> Any:
        return tirx.min(t * tile + b, blocks - 1) * lanes  # (a last partial tile recomputes its last block)

    @prim_func
    def rotation(
        X: T.Buffer(source.shape, "float32"),
        S: T.Buffer((channels,), "float32"),
        Hp: T.Buffer((p, p), "float32"),
        Hm: T.Buffer((m, m), "float32"),
        K64: T.Buffer(ints.shape, "int64"),
        K32: T.Buffer(halves.shape, "int32"),
        KF: T.Buffer(floats.shape, "float32"),
        Y: T.Buffer(target.shape, target.dtype),
    ):
        T.func_attr({"tir.noalias": True})
        for r in outer_loop(count):
            scaled = T.alloc_buffer((channels,), "float32", scope="global")
            grouped = T.alloc_buffer((channels,), "float32", scope="global")
            acc = T.alloc_buffer((tile, lanes), "float32", scope="global")
            for c in range(channels):
                scaled[c] = X[0, r, c] * S[c]
            if fast:
                for i in range(m):
                    for b in T.unroll(blocks):
                        grouped[span(i * p + b * lanes)] = mixed_blocks(scaled, i, b)
                    for b in T.unroll(blocks):
                        grouped[span(i * p + b * lanes)] = _walsh_hadamard_16(grouped[span(i * p + b * lanes)]) * splat(
                            T.float32(scale)
                        )
            else:
                for i in range(m):
                    for t in range(tiles):
                        for b in T.unroll(tile):
                            acc[b, whole] = zero
                        for k in range(p):
                            for b in T.unroll(tile):
                                acc[b, whole] = acc[b, whole] + splat(scaled[i * p + k]) * Hp[k, span(column(t, b))]
                        for b in T.unroll(tile):
                            grouped[span(i * p + column(t, b))] = acc[b, whole]
            if across:
                wide = T.alloc_buffer((across_tile, LANES), "float32", scope="global")
                for j in range(p):
                    for t in range(across_tiles):
                        for b in T.unroll(across_tile):
                            wide[b, T.ramp(0, 1, LANES)] = T.Broadcast(T.float32(0), LANES)
                        for i in range(m):
                            for b in T.unroll(across_tile):
                                wide[b, T.ramp(0, 1, LANES)] = (
                                    wide[b, T.ramp(0, 1, LANES)]
                                    + T.Broadcast(grouped[i * p + j], LANES)
                                    * Hm[i, T.ramp(group_block(t, b), 1, LANES)]
                                )
                        for b in T.unroll(across_tile):
                            Y[store_index(target, 0, r, strided(t, b, j))] = finish_across(
                                wide[b, T.ramp(0, 1, LANES)], K64, K32, KF, strided(t, b, j)
                            )
            else:
                for i2 in range(m):
                    for t in range(tiles):
                        for b in T.unroll(tile):
                            acc[b, whole] = zero
                        for i in range(m):
                            for b in T.unroll(tile):
                                acc[b, whole] = acc[b, whole] + splat(Hm[i, i2]) * grouped[span(i * p + column(t, b))]
                        for b in T.unroll(tile):
                            Y[store_index(target, 0, r, span(i2 * p + column(t, b)))] = finish(
                                acc[b, whole], K64, K32, KF, i2 * p + column(t, b)
                            )

    return rotation, [source, signs, inner, outer, ints, halves, floats]
