# mypy: disable-error-code="valid-type"
# (TVMScript annotates buffers as T.Buffer(shape, dtype), which is not a type to mypy.)
"""Hand-written TVM TIR int8 matmul kernels, one per instruction set (a :class:`Flavor`).

:func:`matmul_primfunc` computes ``Y[M, N] = (A - za) @ W`` for uint8 activations ``A [M, K]`` with one zero
point ``za``, int8 weights ``W [K, N]`` and an int32 result, exactly what ONNX ``MatMulInteger`` computes
with a scalar activation zero point and symmetric weights, as the integer lowering
(:mod:`qcompile.backends.integer`) emits for linear layers. Integer arithmetic, so bit-exact with numpy.
The integer graph's convolutions (:mod:`qcompile.backends.tvm.integer`) use the same flavors.

The flavors (TVM ships int8 intrinsics for AVX-512 VNNI only; these are written here):

- ``vnni`` (x86-64, AVX-512 VNNI): ``vpdpbusd`` multiplies 64 unsigned bytes by 64 signed bytes and adds each
  four products into one of 16 int32 lanes.
- ``vnni`` with AMX tiles (``Flavor.tiles``; Sapphire Rapids and later Xeons): the same flavor everywhere, but
  matmuls over 16 rows or more run on the AMX tile registers (``tdpbusd``: a 16 x 64 uint8 tile times a
  16 x 64 int8 tile, laid out exactly as :func:`pack_weights` packs one block, into 16 x 16 int32 sums); see
  :func:`qcompile.backends.tvm.integer._amx_kernel` and :mod:`qcompile.runtime.amx`.
- ``avxvnni`` (x86-64 with AVX-VNNI but not AVX-512: Alder Lake and later client cores): ``vpdpbusd`` on 256-bit
  registers, 32 bytes by 32 into 8 int32 lanes.
- ``avx2`` (x86-64 without VNNI): ``vpmaddwd`` on 16-bit lanes: the activations zero-extended and the weights
  sign-extended to int16 (so no product saturates, unlike ``vpmaddubsw``), each two products summed into
  one of 8 int32 lanes, then added to the accumulator.
- ``neon`` (aarch64 without the dot product, Armv8.0: Cortex-A72, A53): ``smull`` multiplies 8 signed bytes
  by 8 into int16 (a product of two int8 fits), ``sadalp`` adds each two neighbouring products into one of 4
  int32 lanes. Signed bytes, so the activations go in as ``x - 128``, as for ``sdot``.
- ``neon-dot`` (aarch64 with the dot-product extension, ``+dotprod``): ``sdot`` adds four int8 x int8 products
  into each of 4 int32 lanes. It multiplies signed bytes, so the activations go in as ``x - 128`` (a flip
  of the top bit) and the zero-point correction uses ``za - 128``: ``(x - za) w = (x - 128) w - (za - 128) w``.

Weights are packed once (:func:`pack_weights`) as ``[blocks, K / g, lanes x g]``: for each ``lanes`` output
columns, each group of ``g`` consecutive k, so one vector load feeds one instruction; the ``g`` activation
bytes ``A[m, g q : g q + g]`` are read as one word and broadcast. The kernel works in register tiles of rows x
blocks (tiles run in parallel); the accumulators are a ``scope="global"`` buffer under TVM's 1024-byte stack
limit, which LLVM keeps in registers (TVM lowers a ``"local"`` buffer to a heap workspace, stored on every
step: see :mod:`qcompile.backends.lut.kernel`). The zero point is folded into a per-column correction
``(za - offset) * sum_k W[k, n]`` subtracted at the end. K must be a multiple of ``g``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from qcompile.backends.tvm.bound import compile_kernels
from qcompile.backends.tvm.script import prim_func
from qcompile.errors import BackendError
from qcompile.runtime import (
    amx,
    cpu,
    threads,  # noqa: F401  (sets up TVM's thread pool)
)
from qcompile.runtime.bound import BoundKernel

FUNCTION = "int8_matmul"
# LLVM's names of the AMX features a library with tile kernels is built with (and the runtime checks for)
AMX_FEATURES = ("+amx-tile", "+amx-int8")


@dataclass(frozen=True)
class Flavor:
    """One instruction set's int8 dot product: ``lanes`` int32 accumulators per vector, each adding ``group``
    products per instruction; weights packed as ``weight_dtype``; activations enter as ``x - offset``."""

    name: str
    lanes: int
    group: int
    intrinsic: str
    weight_dtype: str
    offset: int
    tile_rows: int
    tile_blocks: int
    tvm_target: dict[str, Any]
    # x86-64 with AMX: the products of many rows run on the tile registers (integer.py's _amx_kernel)
    tiles: bool = False

    @property
    def title(self) -> str:
        return f"{self.name} + AMX tiles" if self.tiles else self.name

    @property
    def accumulator_dtype(self) -> str:
        return "float32" if self.name == "fp32" else "int32"

    @property
    def activation_dtype(self) -> str:
        return "float32" if self.name == "fp32" else "uint8"

    def activations(self, codes: Any) -> Any:
        """The ``group`` uint8 activation codes (a vector load) as the instruction's broadcast operand (fp32:
        one float, broadcast)."""
        from tvm import tirx

        if self.name == "fp32":
            return tirx.Broadcast(codes, self.lanes)
        if self.name == "avx2":
            word = tirx.reinterpret("int32", tirx.Cast(f"int16x{self.group}", codes))
            return tirx.reinterpret(f"int16x{self.lanes * self.group}", tirx.Broadcast(word, self.lanes))
        if self.offset:
            codes = codes ^ tirx.Broadcast(tirx.const(self.offset, "uint8"), self.group)
        word = tirx.reinterpret(f"int{8 * self.group}", codes)
        return tirx.reinterpret(f"int8x{self.lanes * self.group}", tirx.Broadcast(word, self.lanes))

    def word_activations(self, word: Any) -> Any:
        """The ``group`` (four) activation codes read as one int32 ``word``, as the instruction's operand."""
        from tvm import tirx

        if self.offset:  # x - 128 in each byte: flip each byte's top bit
            flip = int.from_bytes(bytes([self.offset] * self.group), "little", signed=True)
            word = word ^ tirx.const(flip, f"int{8 * self.group}")
        return tirx.reinterpret(f"int8x{self.lanes * self.group}", tirx.Broadcast(word, self.lanes))

    def dot(self, accumulator: Any, activations: Any, weights: Any) -> Any:
        """``accumulator`` plus, per lane, the sum of ``group`` products."""
        from tvm import tirx

        if self.name == "fp32":  # one fused multiply-add per lane
            return tirx.call_llvm_pure_intrin(
                f"float32x{self.lanes}", self.intrinsic, activations, weights, accumulator
            )
        vector = f"int32x{self.lanes}"
        if self.name == "neon":  # 8 int16 products (smull), summed in pairs into the int32 lanes (sadalp)
            products = tirx.call_llvm_pure_intrin("int16x8", "llvm.aarch64.neon.smull", activations, weights)
            return accumulator + tirx.call_llvm_pure_intrin(vector, self.intrinsic, products)  # saddlp + add: sadalp
        if self.name == "avx2":
            return accumulator + tirx.call_llvm_pure_intrin(vector, self.intrinsic, activations, weights)
        return tirx.call_llvm_pure_intrin(vector, self.intrinsic, accumulator, activations, weights)


FLAVORS = {
    "vnni": Flavor("vnni", 16, 4, "llvm.x86.avx512.vpdpbusd.512", "int8", 0, 4, 3, {"kind": "llvm"}),
    # AVX-VNNI (Alder Lake and later client cores, Zen 5: vpdpbusd on 256-bit registers, VEX-encoded, without
    # AVX-512): the vnni flavor's dot product on 8 lanes
    "avxvnni": Flavor(
        "avxvnni",
        8,
        4,
        "llvm.x86.avx512.vpdpbusd.256",
        "int8",
        0,
        4,
        2,
        {"kind": "llvm", "mattr": ["+avx2", "+fma", "+avxvnni"]},
    ),
    "avx2": Flavor(
        "avx2", 8, 2, "llvm.x86.avx2.pmadd.wd", "int16", 0, 4, 2, {"kind": "llvm", "mattr": ["+avx2", "+fma"]}
    ),
    "neon": Flavor(
        "neon",
        4,
        2,
        "llvm.aarch64.neon.saddlp",
        "int8",
        128,
        4,
        4,
        {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]},
    ),
    "neon-dot": Flavor(
        "neon-dot",
        4,
        4,
        "llvm.aarch64.neon.sdot",
        "int8",
        128,
        4,
        4,
        {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]},
    ),
}
# The float layers a host build keeps (float islands): fp32 fused multiply-adds on the same register tiles,
# one input channel per step (16 lanes with AVX-512, 8 with AVX2 + FMA).
FLOAT = Flavor("fp32", 16, 1, "llvm.fma.v16f32", "float32", 0, 4, 3, {"kind": "llvm"})
VNNI = FLAVORS["vnni"]
LANES, GROUP, TILE_ROWS, TILE_BLOCKS = VNNI.lanes, VNNI.group, VNNI.tile_rows, VNNI.tile_blocks
DOT = VNNI.intrinsic


def _cpu_flags() -> str:
    return cpu.flags()


def require_vnni() -> dict[str, Any]:
    """The TVM target for this machine, or a clear error when it has no AVX-512 VNNI."""
    if " avx512_vnni" not in _cpu_flags():
        raise BackendError("the int8 VNNI kernels need an x86-64 CPU with AVX-512 VNNI (vpdpbusd); this one lacks it")
    from tvm.target import codegen

    return {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()}


def host_flavor() -> Flavor:
    """The best flavor for this machine (VNNI, with AMX tiles where the CPU has them and Linux grants them;
    else AVX-VNNI; else AVX2), its target tuned for this CPU; or a clear error."""
    flags = _cpu_flags()
    if " avx512_vnni" in flags:
        if amx.wanted():
            return replace(VNNI, tvm_target={**require_vnni(), "mattr": list(AMX_FEATURES)}, tiles=True)
        return replace(VNNI, tvm_target=require_vnni())
    if " avx2" in flags:
        from tvm.target import codegen

        flavor = FLAVORS["avxvnni" if " avx_vnni" in flags else "avx2"]
        return replace(flavor, tvm_target={**flavor.tvm_target, "mcpu": codegen.llvm_get_system_cpu()})
    raise BackendError("the int8 kernels need an x86-64 CPU with AVX2 or AVX-512 VNNI; this one has neither")


def float_flavor() -> Flavor:
    """The fp32 flavor for this machine: 16 lanes with AVX-512, else 8 (AVX2 + FMA)."""
    if " avx512f" in _cpu_flags():
        return FLOAT
    return replace(FLOAT, lanes=8, intrinsic="llvm.fma.v8f32")


# aarch64: 4 fp32 lanes per NEON register (fmla).
NEON_FLOAT = replace(FLOAT, lanes=4, intrinsic="llvm.fma.v4f32")


def target_flavors(tvm_target: dict[str, Any], native: bool) -> tuple[Flavor, Flavor, dict[str, Any]]:
    """The int8 and fp32 flavors for ``tvm_target`` and the TVM target to build them for: this machine's for a
    ``native`` target (tuned for its CPU model); for aarch64, ``neon-dot`` when the target's ``mattr`` has
    ``+dotprod``, else ``neon``, built for the target as given. Any other target: :class:`BackendError`."""
    if tvm_target.get("kind") != "llvm":
        raise BackendError(f"qcompile's int8 kernels are CPU code; {tvm_target.get('kind')} is not an LLVM target")
    triple = str(tvm_target.get("mtriple", ""))
    if native:
        flavor = host_flavor()
        return flavor, float_flavor(), {**tvm_target, **flavor.tvm_target}
    if triple.startswith("aarch64"):
        flavor = FLAVORS["neon-dot" if "+dotprod" in tvm_target.get("mattr", []) else "neon"]
        return flavor, NEON_FLOAT, dict(tvm_target)
    raise BackendError(f"qcompile's int8 kernels have no flavor for {triple} yet (x86-64 and aarch64 have)")


def _check_shape(m: int, k: int, n: int, flavor: Flavor = VNNI) -> None:
    if min(m, k, n) < 1:
        raise BackendError(f"int8 matmul needs a non-empty [M, K] @ [K, N], got M={m}, K={k}, N={n}")
    if k % flavor.group:
        raise BackendError(
            f"the {flavor.name} int8 matmul sums groups of {flavor.group} inputs; K={k} is not a multiple of "
            f"{flavor.group}"
        )


def matmul_primfunc(m: int, k: int, n: int, parallel: bool = True, flavor: Flavor = VNNI) -> Any:
    """The kernel for ``[m, k] @ [k, n]``; arguments ``A`` (uint8 ``[m, k]``), the packed weights, the
    per-column correction (int32 ``[n]``) and ``Y`` (int32 ``[m, n]``)."""
    from tvm import tirx
    from tvm.script import tirx as T

    _check_shape(m, k, n, flavor)
    lanes, group = flavor.lanes, flavor.group
    tile_rows, tile_blocks = min(flavor.tile_rows, m), flavor.tile_blocks
    quads = k // group
    blocks = -(-n // lanes)
    row_tiles = -(-m // tile_rows)
    block_tiles = -(-blocks // tile_blocks)
    part_loop = T.parallel if parallel else T.serial
    width = lanes * group

    def row_of(tile: Any, r: Any) -> Any:
        """The last row tile recomputes the last rows rather than reading past them."""
        return tirx.min((tile // block_tiles) * tile_rows + r, m - 1)

    def activations(a: Any, row: Any, quad: Any) -> Any:
        return flavor.activations(a[row, tirx.Ramp(quad * group, 1, group) if group > 1 else quad])

    def block(tile: Any, b: Any) -> Any:
        return (tile % block_tiles) * tile_blocks + b

    @prim_func
    def kernel(
        A: T.Buffer((m, k), "uint8"),
        Wp: T.Buffer((block_tiles * tile_blocks, quads, width), flavor.weight_dtype),
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
                        acc[r, b, T.ramp(0, 1, lanes)] = flavor.dot(
                            acc[r, b, T.ramp(0, 1, lanes)],
                            activations(A, row_of(tile, r), q),
                            Wp[block(tile, b), q, T.ramp(0, 1, width)],
                        )
            for r in T.unroll(tile_rows):
                for b in T.unroll(tile_blocks):
                    if (block(tile, b) + 1) * lanes <= n:  # a whole block: one vector
                        Y[row_of(tile, r), T.ramp(block(tile, b) * lanes, 1, lanes)] = (
                            acc[r, b, T.ramp(0, 1, lanes)] - correction[T.ramp(block(tile, b) * lanes, 1, lanes)]
                        )
                    else:
                        for lane in range(lanes):
                            if block(tile, b) * lanes + lane < n:
                                Y[row_of(tile, r), block(tile, b) * lanes + lane] = (
                                    acc[r, b, lane] - correction[block(tile, b) * lanes + lane]
                                )

    return kernel


def pack_weights(weights: np.ndarray, flavor: Flavor = VNNI, tile_blocks: int | None = None) -> np.ndarray:
    """int8 (fp32 for the float flavor) ``[K, N]`` -> ``[blocks, K / g, lanes x g]`` (as the flavor's weight
    dtype): for each ``lanes`` output columns, each group of ``g`` k, the bytes one instruction reads
    (column-major within the group); columns padded with zeros to whole tiles of ``tile_blocks`` (default: the
    flavor's) blocks."""
    k, n = weights.shape
    _check_shape(1, k, n, flavor)
    lanes, group = flavor.lanes, flavor.group
    tile = tile_blocks or flavor.tile_blocks
    blocks = -(-n // (lanes * tile)) * tile  # whole tiles of blocks
    padded = np.zeros((k, blocks * lanes), weights.dtype)
    padded[:, :n] = weights
    by_group = padded.reshape(k // group, group, blocks, lanes).transpose(2, 0, 3, 1)
    packed = np.ascontiguousarray(by_group.reshape(blocks, k // group, lanes * group))
    return packed.astype(flavor.weight_dtype)


def zero_point_correction(weights: np.ndarray, zero_point: int, flavor: Flavor = VNNI) -> np.ndarray:
    """``(za - offset) * sum_k W[k, n]`` as int32: what ``(A - za) @ W`` subtracts from ``(A - offset) @ W``."""
    return ((int(zero_point) - flavor.offset) * weights.astype(np.int64).sum(axis=0)).astype(np.int32)


def build(shapes: dict[str, tuple[int, int, int]], tvm_target: dict[str, Any], flavor: Flavor = VNNI) -> Any:
    """One TVM module with a parallel kernel ``name`` and a serial one ``name + "_serial"`` per entry of
    ``shapes`` (``name -> (m, k, n)``)."""
    functions = {}
    for name, (m, k, n) in shapes.items():
        for variant, parallel in ((name, True), (name + "_serial", False)):
            functions[variant] = matmul_primfunc(m, k, n, parallel, flavor).with_attr("global_symbol", variant)
    return compile_kernels(functions, tvm_target, f"the {flavor.name} int8 matmul kernels")


def arguments(weights: np.ndarray, rows: int, zero_point: int = 0, flavor: Flavor = VNNI) -> list[np.ndarray]:
    """The kernel's arguments after the activations: packed weights, correction, the output."""
    return [
        pack_weights(weights, flavor),
        zero_point_correction(weights, zero_point, flavor),
        np.zeros((rows, weights.shape[1]), np.int32),
    ]


class Int8MatMul(BoundKernel):
    """One layer's kernel bound to its packed weights and zero-point correction; calling it with uint8
    ``[m, k]`` activations returns ``(A - zero_point) @ W`` as int32."""

    LABEL = "int8 matmul"
    DTYPE = np.uint8
    output = 2

    def __init__(
        self, module: Any, name: str, weights: np.ndarray, rows: int, zero_point: int = 0, flavor: Flavor = VNNI
    ) -> None:
        import tvm

        if weights.dtype != np.int8 or weights.ndim != 2:
            raise BackendError(f"int8 matmul weights must be a 2-D int8 array, got {weights.dtype} {weights.shape}")
        super().__init__()
        self.rows, (self.k, self.n) = rows, weights.shape
        self.function = module[name]
        self.arguments = [
            tvm.runtime.tensor(array, self.device) for array in arguments(weights, rows, zero_point, flavor)
        ]
