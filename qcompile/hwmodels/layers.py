"""What the cost model needs to know of each node of a model: its kind, MACs, weights and activations."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir

from qcompile.graph import is_constant, layer_name

# Nodes that onnxruntime and TVM fuse into the compute node before them: they cost nothing of their own.
FUSED_AFTER_COMPUTE = frozenset({"Relu", "Clip"})
# Nodes that only relabel memory.
FREE = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Shape", "Identity", "Constant"})
# Row-wise reductions whose time per element is far from an elementwise op's: each is fitted on its own.
# ``addnorm`` is a LayerNormalization whose input is an Add used by nothing else (a post-norm residual):
# onnxruntime runs the two as one SkipLayerNormalization kernel, measured here 3-4x slower per element than
# a LayerNormalization alone, so it is a kind of its own and the Add costs nothing of its own.
ROW_KINDS = {"Softmax": "softmax", "LayerNormalization": "norm"}


@dataclass(frozen=True)
class LayerSpec:
    """One node as the cost model sees it.

    ``kind`` is one of conv (k x k, dense), pointwise (1 x 1), depthwise, gemm (constant weight), matmul (two
    activations), softmax, norm (LayerNormalization), addnorm (a LayerNormalization with the residual Add
    before it fused in: :data:`ROW_KINDS`) or other (everything else: elementwise, pooling, reshapes).
    """

    name: str
    op_type: str
    kind: str
    macs: int
    weight_elements: int
    output_channels: int
    input_elements: int
    output_elements: int
    input_shape: tuple[int, ...] = ()
    weight_shape: tuple[int, ...] = ()
    output_shape: tuple[int, ...] = ()
    attributes: dict[str, Any] = field(default_factory=dict)
    free: bool = False

    @property
    def quantizable(self) -> bool:
        return self.kind in ("conv", "pointwise", "depthwise", "gemm", "matmul")


def _shape(value: ir.Value | None) -> tuple[int, ...] | None:
    if value is None or value.shape is None:
        return None
    dims = [dim if isinstance(dim, int) else None for dim in value.shape]
    return None if any(dim is None for dim in dims) else tuple(int(dim) for dim in dims)  # type: ignore[arg-type]


def _elements(values: Sequence[ir.Value | None]) -> int:
    total = 0
    for value in values:
        shape = _shape(value)
        if value is not None and not is_constant(value) and shape is not None:
            total += math.prod(shape)
    return total


def _attributes(node: ir.Node) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, attribute in node.attributes.items():
        if attribute.type == ir.AttributeType.INT:
            result[name] = attribute.as_int()
        elif attribute.type == ir.AttributeType.INTS:
            result[name] = list(attribute.as_ints())
        elif attribute.type == ir.AttributeType.FLOAT:
            result[name] = attribute.as_float()
        elif attribute.type == ir.AttributeType.STRING:
            result[name] = attribute.as_string()
    return result


def _conv(node: ir.Node, x: tuple[int, ...], w: tuple[int, ...], y: tuple[int, ...]) -> tuple[str, int]:
    group = int(node.attributes["group"].as_int()) if "group" in node.attributes else 1
    kernel = math.prod(w[2:])
    macs = math.prod(y) * w[1] * kernel
    if group > 1 and group == x[1] and w[1] == 1:
        return "depthwise", macs
    return ("pointwise" if kernel == 1 and group == 1 else "conv"), macs


def describe(model: ir.Model) -> list[LayerSpec]:
    """A :class:`LayerSpec` for every node of ``model``'s main graph whose shapes are known."""
    specs = []
    for node in model.graph:
        inputs, outputs = list(node.inputs), list(node.outputs)
        x = _shape(inputs[0]) if inputs else None
        y = _shape(outputs[0]) if outputs else None
        w_value = inputs[1] if len(inputs) > 1 else None
        w = _shape(w_value)
        attributes = _attributes(node)
        common: dict[str, Any] = {
            "name": layer_name(node),
            "op_type": node.op_type,
            "input_elements": _elements(inputs),
            "output_elements": _elements(outputs),
            "input_shape": x or (),
            "output_shape": y or (),
            "attributes": attributes,
        }
        if node.op_type in ("Conv", "Gemm", "MatMul") and x and y and w:
            constant = is_constant(w_value)
            if node.op_type == "Conv":
                kind, macs = _conv(node, x, w, y)
                channels = w[0]
            elif node.op_type == "Gemm":
                trans_a = bool(attributes.get("transA", 0))
                depth = x[0] if trans_a else x[1]
                kind, macs, channels = "gemm", math.prod(y) * depth, y[-1]
            else:
                kind, macs, channels = ("gemm" if constant else "matmul"), math.prod(y) * x[-1], y[-1]
            specs.append(
                LayerSpec(
                    kind=kind,
                    macs=macs,
                    weight_elements=math.prod(w) if constant else 0,
                    output_channels=channels if constant else 0,
                    weight_shape=w,
                    **common,
                )
            )
            continue
        producer = inputs[0].producer() if inputs and inputs[0] is not None else None
        fused = (
            node.op_type in FUSED_AFTER_COMPUTE
            and producer is not None
            and producer.op_type in ("Conv", "Gemm", "MatMul")
            and len(inputs[0].uses()) == 1  # type: ignore[union-attr]
        ) or _add_into_norm(node)
        kind = ROW_KINDS.get(node.op_type, "other")
        if kind == "norm" and producer is not None and _add_into_norm(producer):
            kind = "addnorm"
            common["input_elements"] += _elements(producer.inputs) - _elements(inputs[:1])
        specs.append(
            LayerSpec(
                kind=kind, macs=0, weight_elements=0, output_channels=0, free=fused or node.op_type in FREE, **common
            )
        )
    return specs


def _add_into_norm(node: ir.Node) -> bool:
    """Whether ``node`` is an Add of two activations whose only reader is a LayerNormalization (onnxruntime's
    SkipLayerNormalization fusion)."""
    if node.op_type != "Add" or len(node.inputs) != 2 or any(v is None or is_constant(v) for v in node.inputs):
        return False
    uses = list(node.outputs[0].uses())
    return len(uses) == 1 and uses[0][0].op_type == "LayerNormalization" and uses[0][1] == 0


# Ops a tensor passes through between two compute layers without leaving its region (int8 or float).
PASS_THROUGH = FUSED_AFTER_COMPUTE | FREE | frozenset({"Add", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool"})


def layer_edges(model: ir.Model, layers: Sequence[str]) -> list[tuple[str, str, int]]:
    """``(producer, consumer, elements)`` for each pair of layers in ``layers`` joined by a tensor that passes
    only through pass-through ops: where one is float and the other int8, the tensor changes representation
    there (a QuantizeLinear or DequantizeLinear, and often a layout change), which costs time."""
    wanted = set(layers)
    edges: dict[tuple[str, str], int] = {}
    for node in model.graph:
        name = layer_name(node)
        if name not in wanted or not node.inputs or node.inputs[0] is None:
            continue
        shape = _shape(node.inputs[0])
        elements = math.prod(shape) if shape else 0
        stack = [node.inputs[0]]
        seen: set[int] = set()
        while stack:
            value = stack.pop()
            producer = value.producer()
            if producer is None or id(producer) in seen:
                continue
            seen.add(id(producer))
            if layer_name(producer) in wanted:
                edges[(layer_name(producer), name)] = elements
            elif producer.op_type in PASS_THROUGH:
                stack.extend(v for v in producer.inputs if v is not None and not is_constant(v))
    return [(producer, consumer, elements) for (producer, consumer), elements in edges.items()]
