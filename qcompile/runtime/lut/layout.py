"""How the table-lookup kernels of a ``lut/`` package are called: the instruction-set flavors, the layout of
every argument after the activations, and a layer's kernel bound to its packed weights.

The kernels themselves are generated at compile time (:mod:`qcompile.backends.lut.kernel`); this is what
both the compiler and an artifact's runtime need, so it lives with the runtime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from qcompile.errors import BackendError
from qcompile.runtime import cpu, threads
from qcompile.runtime.bound import BoundKernel
from qcompile.runtime.lut.pack import TRIPLET, TRIPLET_ENTRIES, WORD_LANES, pack_pairs, pack_triplet_words

TABLE_BYTES = 16  # a byte shuffle's table; 256-bit shuffles see it repeated in both 128-bit halves


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
        flags = cpu.flags()
        if " avx2" not in flags:
            raise BackendError("the x86-64 LUT kernel needs AVX2 (vpshufb on 256-bit vectors); this CPU lacks it")
        from tvm.target import codegen

        # Tuned for this machine's CPU (LLVM's name for it), as a library built here and run here may be.
        flavor = FLAVORS["x86_64"]
        return replace(
            flavor, tvm_target={**flavor.tvm_target, "mcpu": codegen.llvm_get_system_cpu()}, words=" avx512bw" in flags
        )
    raise BackendError(f"no LUT kernel for {machine}; it is written for x86-64 (AVX2) and aarch64 (NEON)")


WORDS = "_words"  # suffix of the triplet-word variants of a kernel (x86-64 with AVX-512BW), then the tile width
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
