# mypy: disable-error-code="valid-type"
# (TVMScript annotates buffers as T.Buffer(shape, dtype), which is not a type to mypy.)
"""The table-lookup ternary matmul as a TVM TIR kernel, for x86-64 (AVX2) and aarch64 (NEON).

``Y[M, N] = X[M, K] @ W[K, N]`` with int8 ``X``, ternary ``W`` packed by
:func:`~qcompile.backends.lut.pack.pack_pairs` and int32 ``Y``, bit-exact with
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
and one ``vpermw`` looks up 32 outputs' triplet indices at once (:func:`~qcompile.backends.lut.pack.
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

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from qcompile.backends.lut.pack import TRIPLET, TRIPLET_ENTRIES, WORD_LANES, lane_order, pack_pairs, pack_triplet_words
from qcompile.backends.tvm import threads
from qcompile.backends.tvm.bound import BoundKernel, compile_kernels
from qcompile.errors import BackendError

OFFSET = 256  # added to every table entry: pair sums of int8 lie in [-256, 256]
CHUNK_BYTES = 63  # index bytes (two pairs each) summed in 16 bits before widening: 126 x 512 < 65536
FUNCTION = "lut_matmul"
TABLE_BYTES = 16  # a byte shuffle's table; 256-bit shuffles see it repeated in both 128-bit halves
PARTS = 4  # output blocks are split into this many parallel parts, each walking rows then its blocks


@dataclass(frozen=True)
class Flavor:
    """How the kernel is vectorized for one instruction set."""

    arch: str
    lanes: int
    shuffle: str  # the LLVM intrinsic of a 16-entry byte table lookup
    tvm_target: dict[str, Any]
    words: bool = False  # 512-bit 16-bit permutes (AVX-512BW): build the triplet-word kernel too


FLAVORS = {
    "x86_64": Flavor("x86_64", 32, "llvm.x86.avx2.pshuf.b", {"kind": "llvm", "mattr": ["+avx2", "+ssse3"]}),
    "aarch64": Flavor(
        "aarch64",
        16,
        "llvm.aarch64.neon.tbl1",
        {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]},
    ),
}


def host_flavor() -> Flavor:
    """The flavor for this machine, or a clear error (x86-64 needs AVX2)."""
    import platform

    machine = platform.machine()
    if machine == "aarch64":
        return FLAVORS["aarch64"]
    if machine in ("x86_64", "AMD64"):
        cpuinfo = Path("/proc/cpuinfo")
        flags = cpuinfo.read_text() if cpuinfo.exists() else ""
        if " avx2" not in flags:
            raise BackendError("the x86-64 LUT kernel needs AVX2 (vpshufb on 256-bit vectors); this CPU lacks it")
        from tvm.target import codegen

        # Tuned for this machine's CPU (LLVM's name for it), as a library built here and run here may be.
        flavor = FLAVORS["x86_64"]
        return replace(
            flavor, tvm_target={**flavor.tvm_target, "mcpu": codegen.llvm_get_system_cpu()}, words=" avx512bw" in flags
        )
    raise BackendError(f"no LUT kernel for {machine}; it is written for x86-64 (AVX2) and aarch64 (NEON)")


def _interleave_masks(lanes: int) -> list[int]:
    """``T.Shuffle`` indices that interleave low bytes (0..lanes-1) with high bytes (lanes..2*lanes-1) in the
    order :func:`~qcompile.backends.lut.pack.lane_order` gives the accumulator lanes."""
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
    @T.prim_func
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


WORDS = "_words"  # suffix of the triplet-word variants of a kernel (x86-64 with AVX-512BW), then the tile width
WORD_CHUNK = 42  # words summed in 16 bits before widening: 42 x 2 x 384 < 32768
PERMUTE = "llvm.x86.avx512.permvar.hi.512"  # vpermw: 32 lookups in a 32-entry table of int16
WORD_TILE_ROWS = 4  # rows of a register tile
# 32-output blocks of a register tile: one variant each, timed by LutMatMul. The 16-bit accumulators of a tile
# (4 x 3 x 64 bytes) stay in registers only while they are a "global"-scope buffer under TVM's 1024-byte stack
# limit: larger or "local" buffers are lowered to TVMBackendAllocWorkspace calls, and every addition is then
# stored to that heap memory (8 x 576 x 1536 on one core: 18.0 us with 4 x 4 tiles there, 14.8 us with 4 x 3).
WORD_TILE_BLOCKS = (2, 3)
WORD_BLOCK_MULTIPLE = math.lcm(*WORD_TILE_BLOCKS)  # packed blocks are padded to a multiple of every tile width


@dataclass(frozen=True)
class WordPlan:
    """How the triplet-word kernel splits ``[rows, k] @ [k, n]``: tiles of ``tile_rows`` rows (the last tile
    clamps its row index, so it recomputes the last rows rather than reading past them) and ``tile_blocks``
    blocks of 32 outputs; ``row_parts x block_parts`` parallel parts, one per thread, each walking a range
    of row tiles with its own tables (so the tables take ``parts x tile_rows`` rows, whatever ``rows`` is)."""

    rows: int
    k: int
    n: int
    tile_rows: int
    row_tiles: int
    row_parts: int
    block_parts: int
    words: int
    blocks: int
    padded_blocks: int

    @property
    def parts(self) -> int:
        return self.row_parts * self.block_parts


def word_plan(rows: int, k: int, n: int) -> WordPlan:
    """The split of a layer for this machine's thread count: the row tiles divided between the threads
    where there are enough of them, else each row tile's blocks (each part then builds the same tables, a
    few microseconds, rather than waiting for one part to build them)."""
    tile_rows = min(rows, WORD_TILE_ROWS)
    row_tiles = -(-rows // tile_rows)
    workers = threads.count()
    blocks = -(-n // WORD_LANES)
    row_parts = min(workers, row_tiles)
    block_parts = max(1, min(-(-workers // row_parts), -(-blocks // max(WORD_TILE_BLOCKS))))
    padded_blocks = -(-blocks // WORD_BLOCK_MULTIPLE) * WORD_BLOCK_MULTIPLE
    words = -(-k // (2 * TRIPLET))
    return WordPlan(rows, k, n, tile_rows, row_tiles, row_parts, block_parts, words, blocks, padded_blocks)


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

    @T.prim_func
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


def word_digits() -> np.ndarray:
    """``[3, 32]`` int16: the weights ``d_i - 1`` of each triplet-table entry (zero past entry 26)."""
    entry = np.arange(WORD_LANES)
    valid = entry < TRIPLET_ENTRIES
    return np.stack([np.where(valid, (entry // 3 ** (TRIPLET - 1 - i)) % 3 - 1, 0) for i in range(TRIPLET)]).astype(
        np.int16
    )


def word_arguments(weights: np.ndarray, rows: int) -> list[np.ndarray]:
    """Every argument of the triplet-word kernels after the activations: packed weights, the int32 output,
    the tables, the int32 tile accumulators and the digit table."""
    k, n = weights.shape
    plan = word_plan(rows, k, n)
    return [
        pack_triplet_words(weights, plan.padded_blocks),
        np.zeros((rows, n), np.int32),
        np.zeros((plan.parts, plan.tile_rows, 2 * plan.words, WORD_LANES), np.int16),
        np.zeros((plan.parts, plan.tile_rows, max(WORD_TILE_BLOCKS), WORD_LANES), np.int32),
        word_digits(),
    ]


def digit_table() -> np.ndarray:
    """``[2, 16]`` int16: the weights ``d0 - 1`` and ``d1 - 1`` of each table entry (zero past entry 8)."""
    entry = np.arange(TABLE_BYTES)
    valid = entry < 9
    return np.stack([np.where(valid, entry // 3 - 1, 0), np.where(valid, entry % 3 - 1, 0)]).astype(np.int16)


SERIAL = "_serial"  # suffix of the single-threaded variant of every kernel


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


def arguments(weights: np.ndarray, rows: int, flavor: Flavor) -> list[np.ndarray]:
    """Every argument of the kernel after the activations, for ``weights`` ``[K, N]``: packed weights, the
    int32 output, the two tables and the digit table."""
    k, n = weights.shape
    pairs = 2 * -(-k // 4)
    return [
        pack_pairs(weights, flavor.lanes),
        np.zeros((rows, n), np.int32),
        np.zeros((rows, pairs, TABLE_BYTES), np.int8),
        np.zeros((rows, pairs, TABLE_BYTES), np.int8),
        digit_table(),
    ]


OUTPUT_ARGUMENT = 2  # position of Y among the kernel's arguments


def variant_layouts(name: str, flavor: Flavor) -> dict[str, str]:
    """Every function :func:`build` made for the layer ``name``, with the layout of its arguments: ``""``
    for :func:`arguments`, ``WORDS`` for :func:`word_arguments`."""
    variants = {name: "", name + SERIAL: ""}
    if flavor.words:
        for serial in ("", SERIAL):
            variants.update({f"{name}{serial}{WORDS}{width}": WORDS for width in WORD_TILE_BLOCKS})
    return variants


class LutMatMul(BoundKernel):
    """A layer's kernel bound to its packed weights, with its scratch buffers allocated once.

    Given the module and the layer's function name, it times every variant :func:`build` made (parallel and
    serial; pair and triplet-word kernels) on zero activations (``trials`` calls each, best of three rounds)
    and keeps the fastest; ``chosen`` says which."""

    LABEL = "LUT kernel"
    output = OUTPUT_ARGUMENT - 1

    def __init__(
        self, module: Any, name: str, weights: np.ndarray, rows: int, flavor: Flavor, trials: int = 30
    ) -> None:
        import time

        import tvm

        super().__init__()
        self.rows, (self.k, self.n) = rows, weights.shape
        layouts = {"": arguments(weights, rows, flavor)}
        if flavor.words:
            layouts[WORDS] = word_arguments(weights, rows)
        bound = {
            suffix: [tvm.runtime.tensor(array, self.device) for array in arrays] for suffix, arrays in layouts.items()
        }
        zeros = tvm.runtime.tensor(np.zeros((rows, self.k), np.int8), self.device)
        variants = variant_layouts(name, flavor)
        timings = {}
        for variant, suffix in variants.items():
            function = module[variant]
            best = float("inf")
            for _ in range(3):
                started = time.perf_counter()
                for _ in range(trials):
                    function(zeros, *bound[suffix])
                best = min(best, time.perf_counter() - started)
            timings[variant] = best
        self.chosen = min(timings, key=timings.__getitem__)
        self.function = module[self.chosen]
        self.arguments = bound[variants[self.chosen]]
