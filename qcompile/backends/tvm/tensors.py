"""The values qcompile's TVM kernels pass around while they lower a graph: stored tensors and their layouts
(:class:`Stored`, :class:`Rows`), values not yet computed (:class:`Lazy`, on an :class:`Anchor`), and what a
kernel's epilogue reads (:class:`Env`, :func:`pack`); shared by :mod:`qcompile.backends.tvm.integer` (the
walk over the graph, the CNN kernels) and :mod:`qcompile.backends.tvm.sequence` (the row-major kernels)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

LANES = 16


class NotLowerable(Exception):
    """The integer graph has something these kernels do not cover (the message says what)."""


# ------------------------------------------------------------------------------------------ tensors


class Rows(tuple):  # type: ignore[type-arg]
    """The logical shape ``(1, C, 1, M)`` of a row-major tensor ``[..., C]`` (``M`` the product of its leading
    dims): transformer activations, attention masks and other index-shaped data. It is stored as an NHWC map
    of one row of ``M`` pixels, ``(1, M, Cs)``, so that the convolution kernels run a matmul over its rows;
    with ``Cs == C`` those are the ONNX tensor's own bytes. A marker type: it travels with ``logical``
    wherever a value is derived from another without changing shape."""


def rows_logical(shape: tuple[int, ...] | list[int]) -> Rows:
    dims = tuple(int(d) for d in shape)
    channels = dims[-1] if dims else 1
    count = int(np.prod(dims[:-1])) if len(dims) > 1 else 1
    return Rows((1, channels, 1, count))


@dataclass
class Stored:
    """A materialized tensor: a Relax value. ``layout`` "nhwc" stores logical NCHW ``[1, C, H, W]`` as
    ``[H + top + bottom, W + left + right, Cs]`` (Cs = C rounded up for the VNNI kernels); "nc" stores
    ``[1, C]`` (or ``[1, C, 1, 1]``) as ``[1, C]``; "nchw" is a float graph input as given."""

    var: Any
    logical: tuple[int, ...]
    dtype: str
    layout: str
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    channels: int = 0  # stored channels (nhwc)
    fill: int = 0
    period: int = 0  # rows: read row j at j % period (a tensor broadcast over leading dims)
    # rows: a view whose row j is row sum(((j // d) % m) * s) of ``var`` (a Transpose that keeps the last axis:
    # attention's head split and merge), read in place by elementwise kernels; other readers get a copy.
    row_map: tuple[tuple[int, int, int], ...] = ()

    def source_rows(self, rows: np.ndarray) -> np.ndarray:
        """The rows of ``var`` that rows ``rows`` of this value read."""
        if not self.row_map:
            return rows
        return sum(((rows // d) % m) * s for d, m, s in self.row_map)  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, ...]:
        if self.layout == "nhwc":
            _, _, h, w = self.logical
            top, left, bottom, right = self.pads
            return (h + top + bottom, w + left + right, self.channels)
        if self.layout == "nc":
            return (1, self.logical[1])
        return self.logical


@dataclass
class Lazy:
    """A value not yet computed: ``expression(env)`` gives it at one (pixel, channel-vector) from the
    anchor's value (``env.source``), the leaves' loads (``env.leaf(i)``) and per-channel constants
    (``env.constant(i)``, rows of ``constants``)."""

    logical: tuple[int, ...]
    dtype: str
    expression: Callable[[Env], Any]
    anchor: Anchor | None = None
    leaves: list[Stored] = field(default_factory=list)
    constants: list[np.ndarray] = field(default_factory=list)
    # How this value came from another with one elementwise op on a constant: (that value, op, the constant
    # or a Cast's dtype); read by the requantization fast path.
    step: tuple[Lazy, str, Any] | None = None


@dataclass
class Env:
    """What a Lazy's expression may use inside a kernel."""

    source: Any
    leaf: Callable[[int], Any]
    constant: Callable[[int], Any]
    lanes: int
    channel: Any = None  # the channel index (a Ramp of ``lanes`` channels)
    raw: Callable[[int, Any], Any] | None = None  # constant row i at any index, in its stored dtype


@dataclass
class Anchor:
    """A compute op whose per-element value an epilogue continues: ``kind`` conv / depthwise / matmul /
    maxpool / reduce / intsoftmax with its input, weights and geometry."""

    kind: str
    input: Stored
    logical: tuple[int, ...]
    source_dtype: str
    weights: np.ndarray | None = None
    zero_point: int = 0
    kernel: tuple[int, int] = (1, 1)
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    # Per channel, added to the accumulator: an int32 bias folded into the correction, or a float layer's bias.
    offset: np.ndarray | None = None
    other: Stored | None = None  # a batched matmul's second operand
    other_transposed: bool = False  # ... given as rows of its columns ([batch N, K]: keys for Q K^T)
    other_zero: int = 0
    epsilon: float = 0.0  # LayerNormalization's
    factors: tuple[np.ndarray, ...] = ()  # a Hadamard rotation's signs, inner and (Kronecker) outer factors
    terms: tuple[int, ...] = ()  # the integer Softmax's multiplier, rounding term and unit (its table: weights)

    def correction(self, per_channel_weight_sums: np.ndarray, activation_offset: int = 0) -> np.ndarray:
        """What the kernel subtracts from its raw sums of ``(x - activation_offset) w``: ``(zero_point -
        activation_offset) * sum(w)`` less the folded offset (int32 arithmetic wraps alike in either order)."""
        total = (self.zero_point - activation_offset) * per_channel_weight_sums.astype(np.int64)
        if self.offset is not None:
            total = total - self.offset.astype(np.int64)
        return total.astype(np.int32)


def pack_constants(
    constants: list[np.ndarray], channels: int, whole: int = 0
) -> tuple[list[np.ndarray], list[tuple[int, int, str]]]:
    """Per-channel constant rows (and 256-entry lookup tables, read at a code) as three matrices (int64, int32,
    float32; each at least one row, so that every kernel has the same signature; rows zero-padded to the
    widest), and for each row: (its matrix, its row, its dtype). A per-channel row continues up to ``whole``
    columns with its last channel's value: a kernel that computes a partial block of channels as a whole vector
    reads there, and must read valid values (a zero divisor would trap)."""
    kinds = ("int64", "int32", "float32")
    width = max([channels, whole, *(row.size for row in constants)])
    matrices: list[list[np.ndarray]] = [[], [], []]
    where = []
    for row in constants:
        kind = 2 if row.dtype.kind == "f" else 1 if row.dtype == np.int32 else 0
        where.append((kind, len(matrices[kind]), row.dtype.name))
        padded = np.zeros(width, kinds[kind])
        padded[: row.size] = row
        if row.size == channels and whole > channels:
            padded[channels:whole] = row[-1]
        matrices[kind].append(padded)
    stacked = [np.stack(rows) if rows else np.zeros((1, channels), kinds[kind]) for kind, rows in enumerate(matrices)]
    return stacked, where


def epilogue_env(source: Any, leaf: Callable[[int], Any], matrices: Any, where: list[Any], c: Any, lanes: int) -> Env:
    from tvm import tirx

    def raw(index: int, at: Any) -> Any:
        kind, row, _ = where[index]
        return matrices[kind][row, at]

    def constant(index: int) -> Any:
        dtype = where[index][2]
        return tirx.Cast(dtype if lanes == 1 else f"{dtype}x{lanes}", raw(index, c))

    return Env(source, leaf, constant, lanes, c, raw)


def store_index(target: Stored, i: Any, j: Any, c: Any) -> tuple[Any, ...]:
    if target.layout == "nhwc":
        return (i + target.pads[0], j + target.pads[1], c)
    if target.layout == "nchw":
        return (0, c, i, j)
    return (0, c)


# Below this much work (multiply-adds, or elements moved) a kernel runs on the calling thread: waking TVM's pool
# costs more than it saves there. Measured here (2 cores, one process, against onnxruntime fp32): the corpus's
# MobileNetV1 at 32 x 32 ran 0.061 ms all parallel, 0.045 ms with 2**18, 0.041 ms all serial; EfficientNet-Lite0
# 2.18 ms all parallel, 2.14 ms with 2**18, 2.54 ms with 2**20.
PARALLEL_WORK = 1 << 18


def loop_for(work: int) -> Any:
    """The outer loop of a kernel doing ``work``: parallel over TVM's pool, or serial when it is small."""
    from tvm.script import tirx as T

    return T.parallel if work >= PARALLEL_WORK else T.serial
