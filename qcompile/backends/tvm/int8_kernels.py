# mypy: disable-error-code="valid-type"
# (TVMScript annotates buffers as T.Buffer(shape, dtype), which is not a type to mypy.)
"""Hand-written TVM TIR integer kernels for x86-64 with AVX-512 VNNI: the first of the fast integer kernels.

:func:`matmul_primfunc` computes ``Y[M, N] = (A - za) @ W`` for uint8 activations ``A [M, K]`` with one zero
point ``za``, int8 weights ``W [K, N]`` and an int32 result, exactly what ONNX ``MatMulInteger`` computes
with a scalar activation zero point and symmetric weights, as the integer lowering
(:mod:`qcompile.passes.requantize`) emits for linear layers. Integer arithmetic, so bit-exact with numpy.

How: ``vpdpbusd`` (``llvm.x86.avx512.vpdpbusd.512``) multiplies 64 unsigned bytes by 64 signed bytes and
adds each four products into one of 16 int32 lanes. Weights are packed once (:func:`pack_weights`) as
``[blocks, K / 4, 16 x 4]``: for 16 output columns, each group of four consecutive k, so one 64-byte load
feeds one instruction; four activation bytes ``A[m, 4q:4q+4]`` are read as one int32 and broadcast. The
kernel works in register tiles of ``tile_rows`` rows x ``tile_blocks`` blocks of 16 columns (4 x 3: per four
k, 3 weight loads and 4 broadcasts for 12 instructions); tiles run in parallel. The accumulators are a
``scope="global"`` buffer under TVM's 1024-byte stack limit, which LLVM keeps in registers (TVM lowers a
``"local"`` buffer to a heap workspace, stored on every step: see :mod:`qcompile.backends.lut.kernel`). The
zero point is folded into a per-column correction ``za * sum_k W[k, n]`` subtracted at the end.

Not yet: K must be a multiple of 4, and nothing in the compile path calls this kernel yet (the TVM build of
the integer graph still goes through TVM's ONNX importer, which widens MatMulInteger to int32).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qcompile.backends.tvm import threads  # noqa: F401  (sets up TVM's thread pool)
from qcompile.backends.tvm.bound import BoundKernel, compile_kernels
from qcompile.errors import BackendError

LANES = 16  # int32 lanes of a 512-bit vector
GROUP = 4  # bytes summed into one lane by vpdpbusd
DOT = "llvm.x86.avx512.vpdpbusd.512"
TILE_ROWS = 4
TILE_BLOCKS = 3  # 4 x 3 x 16 int32 = 768 bytes of accumulators: under TVM's 1024-byte stack limit
FUNCTION = "int8_matmul"


def require_vnni() -> dict[str, Any]:
    """The TVM target for this machine, or a clear error when it has no AVX-512 VNNI."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.exists() else ""
    if " avx512_vnni" not in flags:
        raise BackendError("the int8 VNNI kernels need an x86-64 CPU with AVX-512 VNNI (vpdpbusd); this one lacks it")
    from tvm.target import codegen

    return {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()}


def _check_shape(m: int, k: int, n: int) -> None:
    if min(m, k, n) < 1:
        raise BackendError(f"int8 matmul needs a non-empty [M, K] @ [K, N], got M={m}, K={k}, N={n}")
    if k % GROUP:
        raise BackendError(f"the VNNI int8 matmul sums groups of {GROUP} inputs; K={k} is not a multiple of {GROUP}")


def matmul_primfunc(m: int, k: int, n: int, parallel: bool = True) -> Any:
    """The kernel for ``[m, k] @ [k, n]``; arguments ``A`` (uint8 ``[m, k]``), the packed weights, the
    per-column correction (int32 ``[n]``) and ``Y`` (int32 ``[m, n]``)."""
    from tvm import tirx
    from tvm.script import tirx as T

    _check_shape(m, k, n)
    lanes, tile_rows, tile_blocks = LANES, min(TILE_ROWS, m), TILE_BLOCKS
    quads = k // GROUP
    blocks = -(-n // lanes)
    row_tiles = -(-m // tile_rows)
    block_tiles = -(-blocks // tile_blocks)
    part_loop = T.parallel if parallel else T.serial
    i32 = f"int32x{lanes}"
    i8 = f"int8x{lanes * GROUP}"

    def row_of(tile: Any, r: Any) -> Any:
        """The last row tile recomputes the last rows rather than reading past them."""
        return tirx.min((tile // block_tiles) * tile_rows + r, m - 1)

    def activations(a: Any, row: Any, quad: Any) -> Any:
        """``A[row, 4 quad : 4 quad + 4]`` in every lane, as 64 bytes."""
        return tirx.reinterpret(
            i8, tirx.Broadcast(tirx.reinterpret("int32", a[row, tirx.Ramp(quad * GROUP, 1, GROUP)]), lanes)
        )

    @T.prim_func
    def kernel(
        A: T.Buffer((m, k), "uint8"),
        Wp: T.Buffer((block_tiles * tile_blocks, quads, lanes * GROUP), "int8"),
        correction: T.Buffer((n,), "int32"),
        Y: T.Buffer((m, n), "int32"),
    ):
        T.func_attr({"global_symbol": FUNCTION, "tir.noalias": True})
        for tile in part_loop(row_tiles * block_tiles):
            acc = T.alloc_buffer((tile_rows, tile_blocks, lanes), "int32", scope="global")  # on the stack
            for r in T.unroll(tile_rows):
                for b in T.unroll(tile_blocks):
                    acc[r, b, T.ramp(0, 1, lanes)] = T.Broadcast(T.int32(0), lanes)
            for q in range(quads):
                for b in T.unroll(tile_blocks):
                    for r in T.unroll(tile_rows):
                        acc[r, b, T.ramp(0, 1, lanes)] = T.call_llvm_pure_intrin(
                            i32,
                            DOT,
                            acc[r, b, T.ramp(0, 1, lanes)],
                            activations(A, row_of(tile, r), q),
                            Wp[(tile % block_tiles) * tile_blocks + b, q, T.ramp(0, 1, lanes * GROUP)],
                        )
            for r in T.unroll(tile_rows):
                for b in T.unroll(tile_blocks):
                    if ((tile % block_tiles) * tile_blocks + b + 1) * lanes <= n:  # a whole block: one vector
                        Y[row_of(tile, r), T.ramp(((tile % block_tiles) * tile_blocks + b) * lanes, 1, lanes)] = (
                            acc[r, b, T.ramp(0, 1, lanes)]
                            - correction[T.ramp(((tile % block_tiles) * tile_blocks + b) * lanes, 1, lanes)]
                        )
                    else:
                        for lane in range(lanes):
                            if ((tile % block_tiles) * tile_blocks + b) * lanes + lane < n:
                                Y[row_of(tile, r), ((tile % block_tiles) * tile_blocks + b) * lanes + lane] = (
                                    acc[r, b, lane]
                                    - correction[((tile % block_tiles) * tile_blocks + b) * lanes + lane]
                                )

    return kernel


def pack_weights(weights: np.ndarray) -> np.ndarray:
    """int8 ``[K, N]`` -> ``[blocks, K / 4, 64]``: for each 16 output columns, each group of four k, the 16 x
    4 bytes one ``vpdpbusd`` reads (column-major within the group); columns padded with zeros to whole tiles."""
    k, n = weights.shape
    _check_shape(1, k, n)
    blocks = -(-n // (LANES * TILE_BLOCKS)) * TILE_BLOCKS  # whole tiles of 16-column blocks
    padded = np.zeros((k, blocks * LANES), np.int8)
    padded[:, :n] = weights
    by_group = padded.reshape(k // GROUP, GROUP, blocks, LANES).transpose(2, 0, 3, 1)
    return np.ascontiguousarray(by_group.reshape(blocks, k // GROUP, LANES * GROUP))


def zero_point_correction(weights: np.ndarray, zero_point: int) -> np.ndarray:
    """``za * sum_k W[k, n]`` as int32: what ``(A - za) @ W`` subtracts from ``A @ W``."""
    return (int(zero_point) * weights.astype(np.int64).sum(axis=0)).astype(np.int32)


def build(shapes: dict[str, tuple[int, int, int]], tvm_target: dict[str, Any]) -> Any:
    """One TVM module with a parallel kernel ``name`` and a serial one ``name + "_serial"`` per entry of
    ``shapes`` (``name -> (m, k, n)``)."""
    functions = {}
    for name, (m, k, n) in shapes.items():
        for variant, parallel in ((name, True), (name + "_serial", False)):
            functions[variant] = matmul_primfunc(m, k, n, parallel).with_attr("global_symbol", variant)
    return compile_kernels(functions, tvm_target, "the int8 matmul kernels")


class Int8MatMul(BoundKernel):
    """One layer's kernel bound to its packed weights and zero-point correction; calling it with uint8
    ``[m, k]`` activations returns ``(A - zero_point) @ W`` as int32."""

    LABEL = "int8 matmul"
    DTYPE = np.uint8
    output = 2

    def __init__(self, module: Any, name: str, weights: np.ndarray, rows: int, zero_point: int = 0) -> None:
        import tvm

        if weights.dtype != np.int8 or weights.ndim != 2:
            raise BackendError(f"int8 matmul weights must be a 2-D int8 array, got {weights.dtype} {weights.shape}")
        super().__init__()
        self.rows, (self.k, self.n) = rows, weights.shape
        self.function = module[name]
        self.arguments = [
            tvm.runtime.tensor(array, self.device)
            for array in (
                pack_weights(weights),
                zero_point_correction(weights, zero_point),
                np.zeros((rows, self.n), np.int32),
            )
        ]
