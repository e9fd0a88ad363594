"""Residual-stream equalization: per-channel scales folded into the layers that write and read a stream.

A residual stream is a set of activations tied together by Add nodes (``a + b = c``: all three must share
one per-channel scaling). When every writer of the stream is a Conv / Gemm (whose output channel ``c`` can
be divided by ``s_c``: weights and bias) and every reader is a dense Conv / Gemm (whose input channel ``c``
can be multiplied by ``s_c``), dividing the stream by ``diag(s)`` changes nothing in float:
``W_r (x / s) * s = W_r x`` and ``(W_w / s) y + b / s = (W_w y + b) / s`` for every writer, and Adds of
scaled operands are scaled sums.

One 8-bit scale per tensor then covers channels whose ranges were far apart. ``s_c = max|x_c|^alpha /
max|W_c|^(1-alpha)`` (``W_c``: input channel ``c`` of every reader) splits the range between activation and
reader weights, the SmoothQuant rule (Xiao et al., 2023), with ``alpha = 0.5``. Writers are quantized per
output channel, so dividing their rows costs them no precision.

After this pass, every eligible stream is equalized and :attr:`ResidualEqualizationPass.streams` lists the
values whose calibration ranges must be measured again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from qcompile.graph import is_constant, is_float
from qcompile.passes.annotate import require_unannotated

logger = logging.getLogger(__name__)

SCALE_LIMITS = (1e-4, 1e4)


def _int_attribute(node: ir.Node, name: str, default: int) -> int:
    attribute = node.attributes.get(name)
    return attribute.as_int() if attribute is not None else default


def _streams(graph: ir.Graph) -> list[list[ir.Value]]:
    """Groups of float activations tied by Adds of two activations (union-find over values)."""
    parent: dict[int, ir.Value] = {}
    every: dict[int, ir.Value] = {}

    def find(value: ir.Value) -> ir.Value:
        root = value
        while parent.get(id(root), root) is not root:
            root = parent[id(root)]
        parent[id(value)] = root
        return root

    for node in graph:
        if node.op_type in ("Conv", "Gemm"):
            parent.setdefault(id(node.outputs[0]), node.outputs[0])
            every[id(node.outputs[0])] = node.outputs[0]
        if node.op_type == "Add" and all(
            value is not None and not is_constant(value) and is_float(value) for value in node.inputs
        ):
            members = [*node.inputs, node.outputs[0]]
            for member in members:
                parent.setdefault(id(member), member)  # type: ignore[arg-type]
                every[id(member)] = member  # type: ignore[assignment]
            root = find(members[0])  # type: ignore[arg-type]
            for member in members[1:]:
                parent[id(find(member))] = root  # type: ignore[arg-type]
    groups: dict[int, list[ir.Value]] = {}
    for value in every.values():
        groups.setdefault(id(find(value)), []).append(value)
    return list(groups.values())


def _writer_ok(node: ir.Node | None) -> bool:
    if node is None or node.op_type not in ("Conv", "Gemm") or not is_constant(node.inputs[1]):
        return False
    if len(node.inputs[1].uses()) != 1:  # type: ignore[union-attr]
        return False
    if node.op_type == "Gemm" and not _int_attribute(node, "transB", 0):
        return False
    return (
        len(node.inputs) < 3
        or node.inputs[2] is None
        or (is_constant(node.inputs[2]) and len(node.inputs[2].uses()) == 1)
    )  # type: ignore[union-attr]


def _reader_ok(node: ir.Node, index: int) -> bool:
    if index != 0 or node.op_type not in ("Conv", "Gemm") or not is_constant(node.inputs[1]):
        return False
    if len(node.inputs[1].uses()) != 1:  # type: ignore[union-attr]
        return False
    if node.op_type == "Conv":
        return _int_attribute(node, "group", 1) == 1
    return not _int_attribute(node, "transA", 0)


def _input_channel_absmax(node: ir.Node) -> np.ndarray:
    weight = node.inputs[1].const_value.numpy()  # type: ignore[union-attr]
    if node.op_type == "Conv":
        return np.abs(weight).max(axis=(0, *range(2, weight.ndim)))
    return np.abs(weight if _int_attribute(node, "transB", 0) else weight.T).max(axis=0)


def _set(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.tensor(array.astype(np.float32), name=value.name)


class ResidualEqualizationPass(ir.passes.InPlacePass):
    """After this pass, each eligible residual stream is divided per channel by its SmoothQuant scale."""

    def requires(self, model: ir.Model) -> None:
        require_unannotated(model, "ResidualEqualizationPass")

    def __init__(self, channel_absmax: Callable[[str], np.ndarray | None], alpha: float = 0.5) -> None:
        super().__init__()
        self.channel_absmax = channel_absmax
        self.alpha = alpha
        self.streams: list[list[str]] = []
        self.scales: dict[str, np.ndarray] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for members in _streams(model.graph):
            self._equalize(members)
        logger.info("equalized %d residual streams", len(self.streams))
        return ir.passes.PassResult(model, modified=bool(self.streams))

    def _equalize(self, members: list[ir.Value]) -> None:
        ids = {id(value) for value in members}
        writers, readers = [], []
        for value in members:
            producer = value.producer()
            if value.is_graph_output() or producer is None:
                return
            if producer.op_type == "Add" and all(id(v) in ids for v in producer.inputs):
                pass
            elif _writer_ok(producer):
                writers.append(producer)
            else:
                return
            for use in value.uses():
                if use.node.op_type == "Add" and id(use.node.outputs[0]) in ids:
                    continue
                if not _reader_ok(use.node, use.idx):
                    return
                readers.append(use.node)
        statistics = [self.channel_absmax(str(value.name)) for value in members]
        if not writers or not readers or any(stat is None for stat in statistics):
            return
        activation = np.max(np.stack(statistics), axis=0)  # type: ignore[arg-type]
        weight = np.max(np.stack([_input_channel_absmax(node) for node in readers]), axis=0)
        if activation.shape != weight.shape:
            return
        scales = np.clip(
            np.power(np.maximum(activation, 1e-8), self.alpha) / np.power(np.maximum(weight, 1e-8), 1 - self.alpha),
            *SCALE_LIMITS,
        )
        for node in writers:
            weight_value = node.inputs[1]
            array = weight_value.const_value.numpy()  # type: ignore[union-attr]
            shape = [-1] + [1] * (array.ndim - 1)
            _set(weight_value, array / scales.reshape(shape))  # type: ignore[arg-type]
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                _set(node.inputs[2], node.inputs[2].const_value.numpy() / scales)  # type: ignore[union-attr]
        for node in set(readers):
            weight_value = node.inputs[1]
            array = weight_value.const_value.numpy()  # type: ignore[union-attr]
            if node.op_type == "Conv":
                _set(weight_value, array * scales.reshape(1, -1, *[1] * (array.ndim - 2)))  # type: ignore[arg-type]
            elif _int_attribute(node, "transB", 0):
                _set(weight_value, array * scales.reshape(1, -1))  # type: ignore[arg-type]
            else:
                _set(weight_value, array * scales.reshape(-1, 1))  # type: ignore[arg-type]
        self.streams.append([str(value.name) for value in members])
        self.scales.update({str(value.name): scales for value in members})
