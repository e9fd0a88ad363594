# mypy: disable-error-code="valid-type"
# (TVMScript annotates buffers as T.Buffer(shape, dtype), which is not a type to mypy.)
"""The table-lookup ternary matmul as a TVM TIR kernel, for x86-64 (AVX2) and aarch64 (NEON).

``Y[M, N] = X[M, K] @ W[K, N]`` with int8 ``X``, ternary ``W`` packed by
:func:`~qcompile.runtime.lut.pack.pack_pairs` and int32 ``Y``, bit-exact with
:func:`~qcompile.backends.lut.reference.dense`. Two stages, written directly in TIR (no schedule search):

1. Tables. For every row and every pair of activations ``(x0, x1)``, the 9 partial sums
   ``(d0 - 1) * x0 + (d1 - 1) * x1`` (index ``3 * d0 + d1``), offset by +256 into [0, 512] so they are
   non-negative, split into a low-byte and a high-byte table of 16 entries (repeated to the vector width).
2. Lookups. One vector load fetches the packed indices of ``lanes`` outputs (two pairs per byte); each pair
   costs, per row, two byte shuffles (``vpshufb`` / ``tbl``: ``lanes`` lookups each, low and high bytes), one
   byte interleave that forms the 16-bit values, and one 16-bit add. 16-bit sums cannot overflow within a
   chunk of 126 pairs (126 x 512 < 65536); each chunk is widened into int32 and the offset removed at the end.

On x86-64 with AVX-512BW a second kernel, ``_words``, uses 16-bit tables instead: for every row and every
triplet of activations the 27 sums ``sum_i (d_i - 1) * x_i`` as int16 in one 512-bit vector (32 entries),
and one ``vpermw`` looks up 32 outputs' triplet indices at once (:func:`~qcompile.runtime.lut.pack.
pack_triplet_words`; a word's high byte is shifted down for the second triplet). Per six weights and 32
outputs that is one load, one shift, two permutes and two 16-bit adds, with no byte interleave and no
offset. It works in register tiles of up to 4 rows x 2 or 3 blocks of 32 outputs (:class:`WordPlan`), so a
vector of index words serves every row of the tile and a row's tables every block; each parallel part
builds the tables of its own rows. 16-bit sums cannot overflow within 42 words (42 x 2 x 384 < 32768).
:class:`LutMatMul` times every variant built for a layer and keeps the fastest.

The vectors are explicit (``T.call_llvm_pure_intrin`` on the shuffle intrinsic, ``T.Shuffle`` for the
interleave); LLVM allocates registers. Output blocks are split into parallel parts; each part walks the
rows, then its blocks, so a row's tables stay in cache while its blocks read them. 512-bit vectors (AVX-512
``vpshufb``) measured no faster than 256-bit ones on this AMD EPYC (10.9 vs 9.9 us at 1 x 576 x 1536),
so the pair kernel uses AVX2 on x86-64. Scratch buffers (tables, and the word kernel's int32 tile
accumulators) are arguments, allocated once per layer by :class:`LutMatMul`; the 16-bit accumulators (and
the pair kernel's int32 ones) are buffers small enough for the stack, which LLVM keeps in registers, so a
call allocates nothing.
"""

from __future__ import annotations

from typing import Any

from qcompile.backends.tvm.bound import compile_kernels
from qcompile.backends.tvm.script import prim_func
from qcompile.runtime.lut.layout import (
    SERIAL,
    TABLE_BYTES,
    WORD_TILE_BLOCKS,
    WORDS,
    Flavor,
    WordPlan,
    variant_layouts,
    word_plan,
)
from qcompile.runtime.lut.pack import TRIPLET, WORD_LANES, lane_order

OFFSET = 256  # added to every table entry: pair sums of int8 lie in [-256, 256]
CHUNK_BYTES = 63  # index bytes (two pairs each) summed in 16 bits before widening: 126 x 512 < 65536
FUNCTION = "lut_matmul"
PARTS = 4  # output blocks are split into this many parallel parts, each walking rows then its blocks


def _interleave_masks(lanes: int) -> list[int]:
    """``T.Shuffle`` indices that interleave low bytes (0..lanes-1) with high bytes (lanes..2*lanes-1) in the
    order :func:`~qcompile.runtime.lut.pack.lane_order` gives the accumulator lanes."""
    return [index for position in lane_order(lanes) for index in (position, lanes + position)]


def padded_activation(x: Any, row: Any, column: Any, k: int) -> Any:
    """``x[row, column]`` as int16 in TIR, zero past the last column (the kernels pad K to whole groups)."""
    from tvm import tirx

    return tirx.Cast("int16", tirx.if_then_else(column < k, x[row, tirx.min(column, k - 1)], tirx.const(0, "int8")))


def primfunc(rows: int, k: int, n: int, flavor: Flavor, parallel: bool = True) -> Any:
    """The TIR kernel for ``[rows, k] @ [k, n]`` (its arguments: :func:`arguments`); ``parallel=False`` runs
    the parts one after the other on the calling thread."""
    from tvm import tirx
    from tvm.script import tirx as T

    lanes = flavor.lanes
    index_bytes = -(-k // 4)
    pairs = 2 * index_bytes
    blocks = -(-n // lanes)
    chunks = -(-index_bytes // CHUNK_BYTES)
    mask = _interleave_masks(lanes)
    repeat = list(range(lanes))  # of [table] x 4: the 16-byte table in every 128-bit part (up to 512 bits)
    parts = min(blocks, PARTS)
    part_loop = T.parallel if parallel else T.serial
    per_part = -(-blocks // parts)
    t8 = f"int8x{TABLE_BYTES}"
    tu8 = f"uint8x{TABLE_BYTES}"
    shuffle = flavor.shuffle
    i8 = f"int8x{lanes}"
    u16 = f"uint16x{lanes}"
    bias = OFFSET * pairs

    def entries(x: Any, digits: Any, row: Any, pair: Any) -> Any:
        """The 16 table entries of a pair, offset: ``(d0 - 1) * x0 + (d1 - 1) * x1 + 256`` (int16)."""
        weights = [digits[index, tirx.Ramp(0, 1, TABLE_BYTES)] for index in (0, 1)]
        pair_activations = [
            tirx.Broadcast(padded_activation(x, row, pair * 2 + index, k), TABLE_BYTES) for index in (0, 1)
        ]
        return (
            weights[0] * pair_activations[0]
            + weights[1] * pair_activations[1]
            + tirx.Broadcast(tirx.const(OFFSET, "int16"), TABLE_BYTES)
        )

    def lookup(table: Any, row: Any, pair: Any, indices: Any) -> Any:
        """``lanes`` lookups of ``indices`` in the 16-byte ``table[row, pair]`` (repeated per 128-bit part)."""
        stored = table[row, pair, tirx.Ramp(0, 1, TABLE_BYTES)]
        return tirx.call_llvm_pure_intrin(i8, shuffle, tirx.Shuffle([stored] * 4, repeat), indices)

    def pair_sums(low: Any, high: Any, row: Any, pair: Any, indices: Any) -> Any:
        """The offset 16-bit pair sums of ``lanes`` outputs: low and high table bytes, interleaved."""
        codes = tirx.reinterpret(i8, indices)
        both = [lookup(low, row, pair, codes), lookup(high, row, pair, codes)]
        return tirx.reinterpret(u16, tirx.Shuffle(both, mask))

    # The kernel body builds its vectors with the helpers above: a name bound inside a TVMScript loop would
    # be lowered to a buffer in memory.
    @prim_func
    def kernel(
        X: T.Buffer((rows, k), "int8"),
        Wp: T.Buffer((blocks, index_bytes, lanes), "uint8"),
        Y: T.Buffer((rows, n), "int32"),
        low: T.Buffer((rows, pairs, TABLE_BYTES), "int8"),
        high: T.Buffer((rows, pairs, TABLE_BYTES), "int8"),
        digits: T.Buffer((2, TABLE_BYTES), "int16"),
    ):
        T.func_attr({"global_symbol": FUNCTION, "tir.noalias": True})
        for rp in range(rows * pairs):
            low[rp // pairs, rp % pairs, T.ramp(0, 1, TABLE_BYTES)] = T.Cast(
                t8, T.Cast(tu8, entries(X, digits, rp // pairs, rp % pairs) & T.Broadcast(T.int16(255), TABLE_BYTES))
            )
            high[rp // pairs, rp % pairs, T.ramp(0, 1, TABLE_BYTES)] = T.Cast(
                t8, entries(X, digits, rp // pairs, rp % pairs) >> T.Broadcast(T.int16(8), TABLE_BYTES)
            )
        for part in part_loop(parts):
            for m in range(rows):
                for nb in T.serial(part * per_part, T.min(part * per_part + per_part, blocks)):
                    # "global"-scope buffers this small live on the stack, and LLVM keeps them in registers
                    acc = T.alloc_buffer((lanes,), "int32", scope="global")
                    acc16 = T.alloc_buffer((lanes,), "uint16", scope="global")
                    acc[T.ramp(0, 1, lanes)] = T.Broadcast(T.int32(0), lanes)
                    for c in range(chunks):
                        acc16[T.ramp(0, 1, lanes)] = T.Broadcast(T.uint16(0), lanes)
                        for q in range(T.min(CHUNK_BYTES, index_bytes - c * CHUNK_BYTES)):
                            acc16[T.ramp(0, 1, lanes)] = (
                                acc16[T.ramp(0, 1, lanes)]
                                + pair_sums(
                                    low,
                                    high,
                                    m,
                                    (c * CHUNK_BYTES + q) * 2,
                                    Wp[nb, c * CHUNK_BYTES + q, T.ramp(0, 1, lanes)] & T.Broadcast(T.uint8(15), lanes),
                                )
                                + pair_sums(
                                    low,
                                    high,
                                    m,
                                    (c * CHUNK_BYTES + q) * 2 + 1,
                                    Wp[nb, c * CHUNK_BYTES + q, T.ramp(0, 1, lanes)] >> T.Broadcast(T.uint8(4), lanes),
                                )
                            )
                        acc[T.ramp(0, 1, lanes)] = acc[T.ramp(0, 1, lanes)] + T.Cast(
                            f"int32x{lanes}", acc16[T.ramp(0, 1, lanes)]
                        )
                    for lane in range(lanes):
                        if nb * lanes + lane < n:
                            Y[m, nb * lanes + lane] = acc[lane] - bias

    return kernel


WORD_CHUNK = 42  # words summed in 16 bits before widening: 42 x 2 x 384 < 32768
PERMUTE = "llvm.x86.avx512.permvar.hi.512"  # vpermw: 32 lookups in a 32-entry table of int16


def word_primfunc(plan: WordPlan, tile_blocks: int, parallel: bool = True) -> Any:
    """The triplet-word kernel for ``plan`` with tiles ``tile_blocks`` blocks wide (its arguments:
    :func:`word_arguments`); ``parallel=False`` walks the row tiles on the calling thread.

    Each part walks its row tiles, building the triplet tables of a row tile's rows, then walking its
    blocks in tiles; a tile keeps ``tile_rows x tile_blocks`` 16-bit accumulators, so one load of index
    words serves ``tile_rows`` rows and one row's tables serve ``tile_blocks`` blocks (at batch 8 the
    untiled kernel streamed tables and words from L2 for every row and block: 26.5 against 18.4 us at
    8 x 1536 x 576 on one core)."""
    from tvm import tirx
    from tvm.script import tirx as T

    lanes = WORD_LANES
    rows, k, n, tile_rows, words = plan.rows, plan.k, plan.n, plan.tile_rows, plan.words
    groups = 2 * words
    tiles = -(-plan.blocks // tile_blocks)
    # The serial variant is one part: one thread builds each row's tables once.
    row_parts, block_parts = (plan.row_parts, plan.block_parts) if parallel else (1, 1)
    per_part = -(-tiles // block_parts)
    row_tiles_per_part = -(-plan.row_tiles // row_parts)
    chunks = -(-words // WORD_CHUNK)
    part_loop = T.parallel if parallel else T.serial
    i16 = f"int16x{lanes}"
    widest = max(WORD_TILE_BLOCKS)  # the int32 accumulators' shape, whatever this variant's width

    def row_of(row_tile: Any, r: Any) -> Any:
        return tirx.min(row_tile * tile_rows + r, rows - 1)

    def entries(x: Any, digits: Any, row: Any, group: Any) -> Any:
        """The 32 table entries of a triplet: ``sum_i (d_i - 1) * x_i`` (zero past entry 26)."""
        terms = [
            digits[index, tirx.Ramp(0, 1, lanes)]
            * tirx.Broadcast(padded_activation(x, row, group * TRIPLET + index, k), lanes)
            for index in range(TRIPLET)
        ]
        return terms[0] + terms[1] + terms[2]

    def word_sums(table: Any, part: Any, r: Any, word: Any, indices: Any) -> Any:
        """The two triplet sums of ``lanes`` outputs of tile row ``r`` from one vector of index words."""
        high = indices >> tirx.Broadcast(tirx.const(8, "uint16"), lanes)
        return sum(
            (
                tirx.call_llvm_pure_intrin(
                    i16, PERMUTE, table[part, r, word * 2 + half, tirx.Ramp(0, 1, lanes)], tirx.reinterpret(i16, idx)
                )
                for half, idx in enumerate((indices, high))
            ),
            tirx.Broadcast(tirx.const(0, "int16"), lanes),
        )

    @prim_func
    def kernel(
        X: T.Buffer((rows, k), "int8"),
        Wq: T.Buffer((plan.padded_blocks, words, lanes), "uint16"),
        Y: T.Buffer((rows, n), "int32"),
        table: T.Buffer((plan.parts, tile_rows, groups, lanes), "int16"),
        acc: T.Buffer((plan.parts, tile_rows, widest, lanes), "int32"),
        digits: T.Buffer((TRIPLET, lanes), "int16"),
    ):
        T.func_attr({"global_symbol": FUNCTION, "tir.noalias": True})
        for part in part_loop(row_parts * block_parts):
            for row_tile in T.serial(
                (part // block_parts) * row_tiles_per_part,
                T.min((part // block_parts) * row_tiles_per_part + row_tiles_per_part, plan.row_tiles),
            ):
                for rg in range(tile_rows * groups):
                    table[part, rg // groups, rg % groups, T.ramp(0, 1, lanes)] = entries(
                        X, digits, row_of(row_tile, rg // groups), rg % groups
                    )
                for tile in T.serial(
                    (part % block_parts) * per_part, T.min((part % block_parts) * per_part + per_part, tiles)
                ):
                    acc16 = T.alloc_buffer((tile_rows, tile_blocks, lanes), "int16", scope="global")  # on the stack
                    for r in T.unroll(tile_rows):
                        for b in T.unroll(tile_blocks):
                            acc[part, r, b, T.ramp(0, 1, lanes)] = T.Broadcast(T.int32(0), lanes)
                    for c in range(chunks):
                        for r in T.unroll(tile_rows):
                            for b in T.unroll(tile_blocks):
                                acc16[r, b, T.ramp(0, 1, lanes)] = T.Broadcast(T.int16(0), lanes)
                        for q in range(T.min(WORD_CHUNK, words - c * WORD_CHUNK)):
                            for b in T.unroll(tile_blocks):
                                for r in T.unroll(tile_rows):
                                    acc16[r, b, T.ramp(0, 1, lanes)] = acc16[r, b, T.ramp(0, 1, lanes)] + word_sums(
                                        table,
                                        part,
                                        r,
                                        c * WORD_CHUNK + q,
                                        Wq[tile * tile_blocks + b, c * WORD_CHUNK + q, T.ramp(0, 1, lanes)],
                                    )
                        for r in T.unroll(tile_rows):
                            for b in T.unroll(tile_blocks):
                                acc[part, r, b, T.ramp(0, 1, lanes)] = acc[part, r, b, T.ramp(0, 1, lanes)] + T.Cast(
                                    f"int32x{lanes}", acc16[r, b, T.ramp(0, 1, lanes)]
                                )
                    for r in T.unroll(tile_rows):
                        for b in T.unroll(tile_blocks):
                            for lane in range(lanes):
                                if (tile * tile_blocks + b) * lanes + lane < n:
                                    Y[row_of(row_tile, r), (tile * tile_blocks + b) * lanes + lane] = acc[
                                        part, r, b, lane
                                    ]

    return kernel


def build(shapes: dict[str, tuple[int, int, int]], flavor: Flavor) -> Any:
    """One TVM module with two kernels per layer (six with ``flavor.words``): ``shapes`` maps a function
    name to ``(rows, k, n)``; the function ``name`` runs output blocks in parallel, ``name + SERIAL`` on the
    calling thread (a thread pool wake-up costs microseconds, which small layers do not repay), and each has
    triplet-word twins ``+ WORDS + width``, one per tile width; :class:`LutMatMul` times them all."""
    functions = {}
    for name, (rows, k, n) in shapes.items():
        plan = word_plan(rows, k, n)
        for variant, layout in variant_layouts(name, flavor).items():
            parallel = SERIAL not in variant
            if layout == WORDS:
                width = int(variant.partition(WORDS)[2])
                function = word_primfunc(plan, width, parallel)
            else:
                function = primfunc(rows, k, n, flavor, parallel)
            functions[variant] = function.with_attr("global_symbol", variant)
    return compile_kernels(functions, flavor.tvm_target, f"the LUT kernel for {flavor.arch}")


def export(module: Any, path: Any, flavor: Flavor) -> None:
    """Write ``module`` as a shared library; a foreign CPU's library is linked with its cross compiler and
    its ELF header checked."""
    from tvm.support import cc

    from qcompile.backends.tvm import cross

    toolchain = cross.toolchain_for(flavor.tvm_target)
    if toolchain is None:
        module.export_library(str(path))
        return
    module.export_library(str(path), fcompile=cc.cross_compiler(cross.require_compiler(toolchain)))
    cross.check_elf(path, toolchain)
