"""The lowering's per-op rules: ``RULES``, one table, tried in order for every node of the QDQ graph.

A rule is ``(ops, handler)``: ``ops`` the op types it looks at (None: any op), ``handler(lowering, node)``
returns True when the node is its own (lowered, deferred, or refused with a message) and False when it is
not, without emitting anything; the next rule is then tried. The order is the precedence where several
rules could take the same node (a ``MatMul`` of two activations before a ``MatMul`` with a weight, integer
arithmetic on integer inputs before any op-specific rule); a node no rule takes is refused by
:func:`refuse_unlowered`.

What each op becomes:

- Conv / Gemm / MatMul with a quantized weight: ``ConvInteger`` / ``MatMulInteger`` (uint8 x int8 -> int32,
  the activation's zero point as an input), plus the int32 bias: an int32 accumulator at scale
  ``s_x * s_w[c]``; ``255 * sum_k |w[c, k]| + |bias[c]|`` bounds ``|acc|``, and a reduction past int32 is
  split (:func:`_split_reduction`). MatMul of two activations: ``MatMulInteger`` of both codes, at scale
  ``s_a * s_b``.
- ReLU / Clip on an accumulator move the clamp bounds to ``round(bound / s_y) + z_y`` (the same codes the
  QDQ graph gives); on a uint8 value, ReLU is ``Max(q, z)``.
- MaxPool, Flatten, Reshape, Transpose, Squeeze, Unsqueeze run on the uint8 codes (order-preserving, same
  scale). Sigmoid, Tanh, HardSigmoid, HardSwish, LeakyRelu on uint8 codes become a 256-entry uint8 table built from
  the input and output quantization parameters (``Gather``), and so does an erf GELU as exporters write
  it (Div, Erf, Add, Mul, Mul: recognised as one); Concat rescales each input to the output's
  scale (requantization) where they differ.
- GlobalAveragePool / ReduceMean over H, W: ``ReduceSum`` of ``q - z`` in int32, an accumulator at scale
  ``s / (H * W)`` (of an accumulator: clamped to its ReLU / Clip bounds, summed in int64).
- Add of two uint8 values: each ``q - z`` times an integer approximation of ``s_input / s_unit``
  (``s_unit`` = the finer scale / 2**k, k as large as int32 allows), summed in int32.
- Softmax and LayerNormalization over the last axis, of uint8 codes or of a one-scale accumulator; an
  attention mask (``Where`` between 0 and a huge negative, added to the scores) is carried into the
  Softmax, ``Where(IsNaN(p), 0, p)`` on codes is ``p``, and ``Mul`` by a positive constant folds into the
  scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from qcompile.backends.integer.arithmetic import (
    ACCUMULATOR_LIMIT,
    TABLE_FUNCTIONS,
    Accumulator,
    Codes,
    Deferred,
    Lowering,
    Value,
    channel_shape,
    label,
)
from qcompile.backends.integer.reference import node_attributes

LAYOUT_OPS = frozenset({"Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze"})
INTEGRAL_TYPES = frozenset(
    {TensorProto.INT64, TensorProto.INT32, TensorProto.INT16, TensorProto.INT8, TensorProto.UINT8}
    | {TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64, TensorProto.BOOL}
)
# Ops this lowering has an integer form for (given quantized inputs); any other op is listed when refused.
# Not the union of the rules' ops: the Div and Erf of a GELU chain are lowered only as part of the chain.
LOWERABLE_OPS = frozenset(
    {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm", "MatMul", "Relu", "Clip", "MaxPool", "GlobalAveragePool"}
    | {"ReduceMean", "Add", "Concat", "Softmax", "LayerNormalization", "Gather", "Mul", "Where", "IsNaN"}
    | LAYOUT_OPS
    | set(TABLE_FUNCTIONS)
)
CONV_ATTRIBUTES = ("pads", "strides", "dilations", "group", "kernel_shape", "auto_pad")

Handler = Callable[[Lowering, onnx.NodeProto], bool]


def skip_gelu_member(lowering: Lowering, node: onnx.NodeProto) -> bool:
    """An Erf, Add or Mul of a GELU chain: lowered with the chain's Div."""
    return node.output[0] in lowering.inside_gelu


def defer_gelu_chain(lowering: Lowering, node: onnx.NodeProto) -> bool:
    """The Div that starts an erf GELU on uint8 codes: the chain's output is one table (deferred)."""
    codes = lowering.values.get(node.input[0])
    if node.output[0] not in lowering.gelus or not isinstance(codes, Codes):
        return False
    members, output = lowering.gelus[node.output[0]]
    lowering.values[output] = Deferred("Gelu", (codes,), {})
    lowering.inside_gelu |= members
    return True


def propagate_refusal(lowering: Lowering, node: onnx.NodeProto) -> bool:
    """A node reading a refused node's output: counted (a lowerable op) or listed (an op with no integer form)."""
    if not lowering.failed.intersection(node.input):
        return False
    lowering.failed.update(node.output)
    if node.op_type in LOWERABLE_OPS:
        lowering.dependent += 1
    else:
        lowering.refused.append(f"{label(node)} ({node.op_type}): no integer form for this op")
    return True


def lower_dequantize(lowering: Lowering, node: onnx.NodeProto) -> bool:
    """A constant's DequantizeLinear makes it a quantized constant; an activation's keeps its codes."""
    name, inputs = label(node), list(node.input)
    data = lowering.constant(inputs[0])
    scale = lowering.constant(inputs[1])
    zero = lowering.constant(inputs[2]) if len(inputs) > 2 and inputs[2] else None
    if data is not None:  # a weight or a bias
        if zero is not None and np.any(zero != 0):
            lowering.refuse(node, f"{name} (DequantizeLinear): constant with a nonzero zero point")
            return True
        axis = next((attribute.i for attribute in node.attribute if attribute.name == "axis"), 1)
        lowering.values[node.output[0]] = (data, np.asarray(scale, np.float64).reshape(-1), axis)
    elif inputs[0] in lowering.values and isinstance(lowering.values[inputs[0]], Codes):
        lowering.values[node.output[0]] = lowering.values[inputs[0]]
    else:
        lowering.refuse(node, f"{name} (DequantizeLinear): input '{inputs[0]}' is not quantized")
    return True


def lower_quantize(lowering: Lowering, node: onnx.NodeProto) -> bool:
    """Input quantization stays; elsewhere the QuantizeLinear is where an accumulator is requantized, a
    deferred op resolved, or codes rescaled."""
    name, inputs = label(node), list(node.input)
    scale = float(np.asarray(lowering.constant(inputs[1])).reshape(-1)[0])
    zero = lowering.constant(inputs[2]) if len(inputs) > 2 and inputs[2] else np.array(0, np.uint8)
    if zero is None or zero.dtype != np.uint8 or np.asarray(lowering.constant(inputs[1])).size != 1:
        lowering.refuse(node, f"{name} (QuantizeLinear): only per-tensor uint8 activations are lowered")
        return True
    zero_point = int(zero)
    source = lowering.values.get(inputs[0])
    if inputs[0] in lowering.graph_inputs or inputs[0] in lowering.floats:  # quantization of a float value stays
        lowering.build.nodes.append(node)
        lowering.values[node.output[0]] = Codes(node.output[0], scale, zero_point)
    elif isinstance(source, Accumulator):
        lowering.values[node.output[0]] = Codes(lowering.requantize(source, scale, zero_point, name), scale, zero_point)
    elif isinstance(source, Deferred):
        codes = Codes(lowering.resolve(source, scale, zero_point, name), scale, zero_point)
        lowering.values[node.output[0]] = codes
        lowering.quantized_as[inputs[0]] = codes
    elif isinstance(source, Codes):
        if math.isclose(source.scale, scale, rel_tol=1e-7) and source.zero_point == zero_point:
            lowering.values[node.output[0]] = source
        else:
            rescaled = lowering.requantize(lowering.as_accumulator(source, name), scale, zero_point, name)
            lowering.values[node.output[0]] = Codes(rescaled, scale, zero_point)
    else:
        lowering.refuse(node, f"{name} (QuantizeLinear): its input '{inputs[0]}' is computed in float")
    return True


def keep_integer_arithmetic(lowering: Lowering, node: onnx.NodeProto) -> bool:
    """Integer and boolean arithmetic on integer inputs (masks, position ids, a ``MatMulInteger`` of run-time
    codes) is already integer-only. An input that a ``QuantizeLinear`` quantized is read as the codes it lowered
    to (the same integers: the lowered codes keep that node's scale and zero point)."""
    types = lowering.element_types
    if not (
        node.input
        and all(value == "" or types.get(value) in INTEGRAL_TYPES for value in node.input)
        and all(types.get(value) in INTEGRAL_TYPES for value in node.output)
    ):
        return False
    renamed = [value.name if isinstance(value := lowering.values.get(name), Codes) else name for name in node.input]
    if renamed != list(node.input):
        kept = onnx.NodeProto()
        kept.CopyFrom(node)
        del kept.input[:]
        kept.input.extend(renamed)
        node = kept
    lowering.build.nodes.append(node)
    return True


def defer_table_gather(lowering: Lowering, node: onnx.NodeProto) -> bool:
    """A Gather from a constant float table (an embedding): gathered from the table's codes."""
    table = lowering.constant(node.input[0])
    if table is None or table.dtype.kind != "f":
        return False
    lowering.values[node.output[0]] = Deferred(
        "GatherTable", (), {"table": table, "indices": node.input[1], "node": node}
    )
    return True


def defer_attention_mask(lowering: Lowering, node: onnx.NodeProto) -> bool:
    """Where(condition, 0, -inf) on a boolean mask: carried to the Softmax its scores reach."""
    inputs = list(node.input)
    if lowering.element_types.get(inputs[0]) != TensorProto.BOOL or inputs[0] in lowering.values:
        return False
    branches = [lowering.constant(value) for value in inputs[1:3]]
    if not all(branch is not None and branch.size == 1 for branch in branches):
        return False
    kept, dropped = (float(branch.reshape(-1)[0]) for branch in branches)  # type: ignore[union-attr]
    if not ((kept == 0.0 and dropped <= -1e9) or (dropped == 0.0 and kept <= -1e9)):
        return False
    # An attention mask: 0 where attended, -inf (or a huge negative) elsewhere.
    lowering.values[node.output[0]] = Deferred(
        "Mask", (), {"condition": inputs[0], "keep_when": kept == 0.0, "node": node}
    )
    return True


def defer_masked_scores(lowering: Lowering, node: onnx.NodeProto) -> bool:
    """Scores (codes, or a one-scale accumulator) plus an attention mask: a masked Softmax input."""
    arguments = lowering.arguments(node)
    if len(arguments) != 2 or not any(isinstance(item, Deferred) and item.op == "Mask" for item in arguments):
        return False
    scores = next((item for item in arguments if isinstance(item, Codes | Accumulator)), None)
    # (two non-empty inputs: arguments pairs with node.input)
    mask_name, mask = next(
        (name, item) for name, item in zip(node.input, arguments, strict=True) if isinstance(item, Deferred)
    )
    attributes = mask.attributes | {"mask": mask_name, "node": node}  # (what a float island reading it re-emits)
    if isinstance(scores, Codes):
        lowering.values[node.output[0]] = Deferred("Masked", (scores,), attributes)
        return True
    if isinstance(scores, Accumulator) and scores.scales.size == 1:
        lowering.values[node.output[0]] = Deferred("Masked", (), attributes | {"accumulator": scores})
        return True
    return False


def drop_isnan(lowering: Lowering, node: onnx.NodeProto) -> bool:
    """IsNaN of codes: integer codes are never NaN."""
    arguments = lowering.arguments(node)
    if not (arguments and isinstance(arguments[0], Codes)):
        return False
    lowering.values[node.output[0]] = Deferred("NotNaN", (), {})
    return True


def drop_where_not_nan(lowering: Lowering, node: onnx.NodeProto) -> bool:
    """Where(IsNaN(p), 0, p) of codes ``p`` is ``p``."""
    condition = lowering.values.get(node.input[0])
    if not (isinstance(condition, Deferred) and condition.op == "NotNaN"):
        return False
    kept_value = lowering.values.get(node.input[2])
    if not isinstance(kept_value, Codes):
        return False
    lowering.values[node.output[0]] = kept_value
    return True


def fold_positive_scale(lowering: Lowering, node: onnx.NodeProto) -> bool:
    """Mul of codes or an accumulator by a positive scalar constant: the same integers at a scaled scale."""
    arguments = lowering.arguments(node)
    if not (len(arguments) == 2 and isinstance(arguments[0], Codes | Accumulator)):
        return False
    factor = lowering.constant(node.input[1])
    if not (factor is not None and factor.size == 1 and float(factor.reshape(-1)[0]) > 0):
        return False
    scaled = float(factor.reshape(-1)[0])
    factor_of = arguments[0]
    if isinstance(factor_of, Codes):
        lowering.values[node.output[0]] = Codes(factor_of.name, factor_of.scale * scaled, factor_of.zero_point)
    else:
        lowering.values[node.output[0]] = Accumulator(
            factor_of.name, factor_of.scales * scaled, factor_of.axis, factor_of.rank, factor_of.bound
        )
    return True


def lower_activation_matmul(lowering: Lowering, node: onnx.NodeProto) -> bool:
    """MatMul of two uint8 activations (Q.K^T, P.V): MatMulInteger with both zero points, one scale."""
    arguments = lowering.arguments(node)
    if not (len(arguments) == 2 and all(isinstance(item, Codes) for item in arguments)):
        return False
    name, inputs, build = label(node), list(node.input), lowering.build
    left, right = arguments
    assert isinstance(left, Codes) and isinstance(right, Codes)
    zeros = [
        build.const(np.array(item.zero_point, np.uint8), f"{name}_z{index}") for index, item in enumerate((left, right))
    ]
    product = build.node("MatMulInteger", [left.name, right.name, *zeros], f"{name}_acc")
    depth = lowering.shapes.get(inputs[0], [0])[-1]
    rank = len(lowering.shapes.get(node.output[0], [0, 0]))
    bound = 255.0 * 255.0 * depth
    if bound > ACCUMULATOR_LIMIT:
        lowering.refuse(
            node,
            f"{name} ({node.op_type}): its int32 accumulator can reach {bound:.3g}; an activation product is not split",
        )
        return True
    lowering.values[node.output[0]] = Accumulator(
        product, np.array([left.scale * right.scale]), -1, max(2, rank), bound
    )
    lowering.report.layers.append(
        {"name": name, "op_type": "MatMul", "accumulator_bound": bound, "limit": ACCUMULATOR_LIMIT, "parts": 1}
    )
    return True


def lower_weighted_layer(lowering: Lowering, node: onnx.NodeProto) -> bool:
    """Conv / Gemm / MatMul of codes by a quantized weight: ConvInteger / MatMulInteger plus the int32 bias,
    the reduction split into parts that each fit int32 where the whole may not."""
    arguments = lowering.arguments(node)
    if not (len(arguments) >= 2 and isinstance(arguments[0], Codes)):
        return False
    op, name, build = node.op_type, label(node), lowering.build
    weight = arguments[1]
    if not isinstance(weight, tuple):
        lowering.refuse(node, f"{name} ({op}): its weight is not a quantized constant")
        return True
    codes, (weights, weight_scales, _axis) = arguments[0], weight
    attributes = node_attributes(node)
    if op == "Gemm":
        if attributes.get("transA", 0) or attributes.get("alpha", 1.0) != 1.0 or attributes.get("beta", 1.0) != 1.0:
            lowering.refuse(node, f"{name} (Gemm): transA / alpha / beta are not lowered")
            return True
        matrix = weights.T if attributes.get("transB", 0) else weights
    else:
        matrix = weights
    zero = build.const(np.array(codes.zero_point, np.uint8), f"{name}_xz")
    geometry: dict[str, Any]
    if op == "Conv":
        channels = weights.shape[0]
        geometry = {key: value for key, value in attributes.items() if key in CONV_ATTRIBUTES}
        geometry["kernel_shape"] = [int(size) for size in weights.shape[2:]]
        # |w| summed over the kernel window (1-D, 2-D or 3-D): [Cin per group, Cout], the reduction axis first.
        contributions = np.abs(weights.astype(np.int64)).sum(axis=tuple(range(2, weights.ndim))).T
        axis, rank, input_axis = 1, weights.ndim, 1
    else:
        if matrix.ndim != 2:
            lowering.refuse(node, f"{name} ({op}): only 2-D weights are lowered")
            return True
        channels = matrix.shape[1]
        geometry = {}
        contributions = np.abs(matrix.astype(np.int64))
        axis, rank, input_axis = -1, max(2, len(lowering.shapes.get(node.output[0], [0, 0]))), -1
    scales = codes.scale * np.broadcast_to(weight_scales, (channels,)).astype(np.float64)
    bias = None
    bias_bound = np.zeros(channels)
    if len(arguments) > 2 and isinstance(arguments[2], tuple):
        bias = arguments[2][0].astype(np.int64).reshape(-1)
        bias_bound = np.abs(bias.astype(np.float64))
    bound = float((255.0 * contributions.sum(axis=0) + bias_bound).max())
    parts = _split_reduction(contributions, bias_bound)
    if len(parts) > 1 and op == "Conv" and int(attributes.get("group", 1)) != 1:
        lowering.refuse(
            node, f"{name} ({op}): its int32 accumulator can reach {bound:.3g}; a grouped conv is not split"
        )
        return True
    lowering.report.layers.append(
        {"name": name, "op_type": op, "accumulator_bound": bound, "limit": ACCUMULATOR_LIMIT, "parts": len(parts)}
    )
    partials: list[str] = []
    for index, (start, stop) in enumerate(parts):
        piece = f"{name}_part{index}" if len(parts) > 1 else name
        operand = codes.name
        if len(parts) > 1:
            limits = [
                build.const(np.array([value], np.int64), f"{piece}_{tag}")
                for value, tag in ((start, "start"), (stop, "stop"))
            ]
            operand = build.node(
                "Slice",
                [operand, *limits, build.const(np.array([input_axis], np.int64), f"{piece}_axis")],
                f"{piece}_x",
            )
        if op == "Conv":
            sliced = np.ascontiguousarray(weights[:, start:stop])
            product = build.node(
                "ConvInteger", [operand, build.const(sliced, f"{piece}_w"), zero], f"{piece}_acc", **geometry
            )
        else:
            sliced = np.ascontiguousarray(matrix[start:stop])
            product = build.node("MatMulInteger", [operand, build.const(sliced, f"{piece}_w"), zero], f"{piece}_acc")
        partials.append(product)
    accumulated = partials[0]
    bias_type: type[np.signedinteger[Any]] = np.int32
    if len(parts) > 1:  # partial sums in int32 each, their total in int64
        widened = [build.node("Cast", [partial], f"{partial}_int64", to=TensorProto.INT64) for partial in partials]
        accumulated = widened[0]
        for index, partial_sum in enumerate(widened[1:]):
            accumulated = build.node("Add", [accumulated, partial_sum], f"{name}_sum{index}")
        bias_type = np.int64
    if bias is not None:
        shaped = bias.astype(bias_type).reshape(channel_shape(channels, axis, rank))
        accumulated = build.node("Add", [accumulated, build.const(shaped, f"{name}_b")], f"{name}_biased")
    lowering.values[node.output[0]] = Accumulator(accumulated, scales, axis, rank, bound)
    return True


def clamp_accumulator(lowering: Lowering, node: onnx.NodeProto) -> bool:
    """ReLU / Clip of an accumulator: its clip bounds, applied when it is requantized."""
    source = _source(lowering, node)
    if not isinstance(source, Accumulator):
        return False
    inputs = list(node.input)
    low, high = source.clip
    if node.op_type == "Relu":
        low = max(low, 0.0)
    else:
        bounds = [lowering.constant(value) for value in inputs[1:3]] + [None, None]
        low = max(low, float(bounds[0])) if bounds[0] is not None and inputs[1:2] and inputs[1] else low
        high = min(high, float(bounds[1])) if len(inputs) > 2 and inputs[2] and bounds[1] is not None else high
    lowering.values[node.output[0]] = Accumulator(
        source.name, source.scales, source.axis, source.rank, source.bound, (low, high)
    )
    return True


def mean_of_accumulator(lowering: Lowering, node: onnx.NodeProto) -> bool:
    """A float mean of an accumulator (the QDQ graph quantizes only after it): clamp the int32 values to the
    ReLU / Clip bounds in accumulator units, sum them in int64, scale by 1 / (H * W)."""
    source = _source(lowering, node)
    if not isinstance(source, Accumulator):
        return False
    op, name, inputs, build = node.op_type, label(node), list(node.input), lowering.build
    axes = [2, 3] if op == "GlobalAveragePool" else reduce_axes(node, lowering.constants)
    spatial = lowering.shapes.get(inputs[0], [])
    if source.rank != 4 or len(spatial) != 4 or sorted(a % 4 for a in axes) != [2, 3] or source.axis != 1:
        lowering.refuse(node, f"{name} ({op}): only a mean over H and W of an NCHW accumulator is lowered")
        return True
    channel = channel_shape(source.scales.size, 1, 4) if source.scales.size > 1 else []
    held = source.name
    if math.isfinite(source.clip[0]):
        low_codes = np.ceil(source.clip[0] / source.scales).astype(np.int32).reshape(channel)
        held = build.node("Max", [held, build.const(low_codes, f"{name}_lo")], f"{name}_floor")
    if math.isfinite(source.clip[1]):
        high_codes = np.floor(source.clip[1] / source.scales).astype(np.int32).reshape(channel)
        held = build.node("Min", [held, build.const(high_codes, f"{name}_hi")], f"{name}_ceiling")
    wide = build.node("Cast", [held], f"{name}_int64", to=TensorProto.INT64)
    keep = _keepdims(node)
    axes_name = build.const(np.array([2, 3], np.int64), f"{name}_axes")
    total = build.node("ReduceSum", [wide, axes_name], f"{name}_sum", keepdims=keep)
    count = spatial[2] * spatial[3]
    lowering.values[node.output[0]] = Accumulator(
        total, source.scales / count, 1, 4 if keep else 2, source.bound, (-math.inf, math.inf)
    )
    return True


def reshape_accumulator(lowering: Lowering, node: onnx.NodeProto) -> bool:
    """Flatten / Reshape of an accumulator that keeps its channel axis (or has one scale)."""
    source = _source(lowering, node)
    if not isinstance(source, Accumulator):
        return False
    op, name, inputs, build = node.op_type, label(node), list(node.input), lowering.build
    before, after = lowering.shapes.get(inputs[0], []), lowering.shapes.get(node.output[0], [])
    squeezed = source.axis == 1 and len(after) == 2 and before[:2] == after and all(d == 1 for d in before[2:])
    channels_last = bool(before and after) and source.axis % source.rank == source.rank - 1
    channels_last = channels_last and before[-1] == after[-1]
    if not (squeezed or channels_last or source.scales.size == 1):
        lowering.refuse(node, f"{name} ({op}): a reshape of an accumulator must keep its channel axis")
        return True
    copied = helper.make_node(op, [source.name, *inputs[1:]], [build.name(f"{name}_acc")], name=f"{name}_acc")
    copied.attribute.extend(node.attribute)
    build.nodes.append(copied)
    axis = 1 if squeezed else -1
    lowering.values[node.output[0]] = Accumulator(
        copied.output[0], source.scales, axis, max(2, len(after)), source.bound, source.clip
    )
    return True


def defer_table_function(lowering: Lowering, node: onnx.NodeProto) -> bool:
    """Sigmoid, Tanh, HardSigmoid, HardSwish, Gelu of codes: a table, built at the QuantizeLinear after it."""
    source = _source(lowering, node)
    if not isinstance(source, Codes):
        return False
    lowering.values[node.output[0]] = Deferred(node.op_type, (source,), node_attributes(node) | {"node": node})
    return True


def defer_masked_softmax(lowering: Lowering, node: onnx.NodeProto) -> bool:
    """Softmax of masked scores: the integer Softmax with the mask, built at the QuantizeLinear after it."""
    source = _source(lowering, node)
    if not (isinstance(source, Deferred) and source.op == "Masked"):
        return False
    attributes = node_attributes(node) | source.attributes | {"node": node}
    lowering.values[node.output[0]] = Deferred("Softmax", source.sources, attributes)
    return True


def defer_normalization(lowering: Lowering, node: onnx.NodeProto) -> bool:
    """Softmax / LayerNormalization over the last axis of uint8 codes, or of an int32 accumulator with one
    scale (a residual sum, attention scores); built at the QuantizeLinear after it."""
    source = _source(lowering, node)
    scalar_accumulator = isinstance(source, Accumulator) and source.scales.size == 1
    if not (isinstance(source, Codes) or scalar_accumulator):
        return False
    op, name, inputs = node.op_type, label(node), list(node.input)
    attributes = node_attributes(node) | {"node": node}
    rank = len(lowering.shapes.get(inputs[0], []))
    if rank == 0 or int(attributes.get("axis", -1)) % rank != rank - 1:
        lowering.refuse(node, f"{name} ({op}): only the last axis is lowered")
        return True
    if op == "LayerNormalization":
        gamma = lowering.constant(inputs[1])
        beta = lowering.constant(inputs[2]) if len(inputs) > 2 and inputs[2] else np.zeros(1, np.float32)
        if gamma is None or beta is None:
            lowering.refuse(node, f"{name} ({op}): its scale and bias must be constants")
            return True
        attributes |= {"gamma": gamma, "beta": beta, "width": lowering.shapes[inputs[0]][-1]}
    if isinstance(source, Codes):
        lowering.values[node.output[0]] = Deferred(op, (source,), attributes)
    else:
        lowering.values[node.output[0]] = Deferred(op, (), attributes | {"accumulator": source})
    return True


def defer_concat(lowering: Lowering, node: onnx.NodeProto) -> bool:
    """Concat of codes: each input rescaled to the scale of the QuantizeLinear after it."""
    arguments = lowering.arguments(node)
    if not (arguments and all(isinstance(item, Codes) for item in arguments)):
        return False
    sources = tuple(item for item in arguments if isinstance(item, Codes))
    lowering.values[node.output[0]] = Deferred(node.op_type, sources, node_attributes(node) | {"node": node})
    return True


def relu_on_codes(lowering: Lowering, node: onnx.NodeProto) -> bool:
    """ReLU of codes: Max(q, z)."""
    source = _source(lowering, node)
    if not isinstance(source, Codes):
        return False
    name, build = label(node), lowering.build
    floor = build.const(np.array(source.zero_point, np.uint8), f"{name}_z")
    lowering.values[node.output[0]] = Codes(
        build.node("Max", [source.name, floor], f"{name}_q"), source.scale, source.zero_point
    )
    return True


def copy_input_layout(lowering: Lowering, node: onnx.NodeProto) -> bool:
    """Reshaping the float input before its quantization moves values, it computes nothing: kept."""
    if not (node.input and node.input[0] in lowering.graph_inputs):
        return False
    lowering.build.nodes.append(node)
    lowering.graph_inputs.update(node.output)
    return True


def move_codes(lowering: Lowering, node: onnx.NodeProto) -> bool:
    """MaxPool and the layout ops on codes: the same op on the uint8 codes, same scale."""
    source = _source(lowering, node)
    if not isinstance(source, Codes):
        return False
    op, name, build = node.op_type, label(node), lowering.build
    if op == "MaxPool" and len(node.output) > 1 and node.output[1]:
        lowering.refuse(node, f"{name} (MaxPool): the indices output is not lowered")
        return True
    copied = helper.make_node(op, [source.name, *node.input[1:]], [build.name(f"{name}_q")], name=f"{name}_q")
    copied.attribute.extend(node.attribute)
    build.nodes.append(copied)
    lowering.values[node.output[0]] = Codes(copied.output[0], source.scale, source.zero_point)
    return True


def mean_of_codes(lowering: Lowering, node: onnx.NodeProto) -> bool:
    """GlobalAveragePool / ReduceMean over H, W of codes: ReduceSum of q - z, at scale s / (H * W)."""
    source = _source(lowering, node)
    if not isinstance(source, Codes):
        return False
    op, name, build = node.op_type, label(node), lowering.build
    shape = lowering.shapes.get(node.input[0], [])
    axes = [2, 3] if op == "GlobalAveragePool" else reduce_axes(node, lowering.constants)
    if len(shape) != 4 or sorted(a % 4 for a in axes) != [2, 3] or any(dim <= 0 for dim in shape):
        lowering.refuse(node, f"{name} ({op}): only a mean over H and W of a static NCHW tensor is lowered")
        return True
    keep = _keepdims(node)
    centred = lowering.as_accumulator(source, name)
    total = build.node(
        "ReduceSum",
        [centred.name, build.const(np.array([2, 3], np.int64), f"{name}_axes")],
        f"{name}_sum",
        keepdims=keep,
    )
    count = shape[2] * shape[3]
    lowering.values[node.output[0]] = Accumulator(
        total, np.array([source.scale / count]), 0, 4 if keep else 2, 255.0 * count
    )
    return True


def add_codes(lowering: Lowering, node: onnx.NodeProto) -> bool:
    """Add of two uint8 values: each q - z times round(s_input / s_unit), s_unit the finer scale / 2**k with
    k as large as int32 allows (255 * ratio * 2**k <= 2**29 per term), summed in int32."""
    arguments = lowering.arguments(node)
    if not (len(arguments) == 2 and all(isinstance(item, Codes) for item in arguments)):
        return False
    name, build = label(node), lowering.build
    first, second = arguments
    assert isinstance(first, Codes) and isinstance(second, Codes)
    ratio = max(first.scale, second.scale) / min(first.scale, second.scale)
    exponent = math.floor(math.log2((2**29) / (255.0 * ratio)))
    unit = min(first.scale, second.scale) / 2.0**exponent
    terms = []
    for index, term in enumerate((first, second)):
        centred = lowering.as_accumulator(term, f"{name}_{index}")
        factor = np.array(round(term.scale / unit), np.int32)
        terms.append(build.node("Mul", [centred.name, build.const(factor, f"{name}_{index}_f")], f"{name}_{index}_t"))
    summed = build.node("Add", terms, f"{name}_sum")
    rank = len(lowering.shapes.get(node.output[0], [0, 0, 0, 0]))
    lowering.values[node.output[0]] = Accumulator(summed, np.array([unit]), 0, rank, 2.0**30)
    return True


def refuse_unlowered(lowering: Lowering, node: onnx.NodeProto) -> None:
    """A node no rule takes: refused, with what its inputs are."""
    kinds = ", ".join(_kind(item) for item in lowering.arguments(node)) or "none"
    reason = "no integer form for this op" if node.op_type not in LOWERABLE_OPS else "no integer form for these inputs"
    lowering.refuse(node, f"{label(node)} ({node.op_type}): {reason} ({kinds})")


MEAN_OPS = ("GlobalAveragePool", "ReduceMean")
# (op types or None for any op, handler), in precedence order: the first handler that returns True wins.
RULES: tuple[tuple[frozenset[str] | None, Handler], ...] = tuple(
    (None if ops is None else frozenset(ops), handler)
    for ops, handler in (
        (("Erf", "Add", "Mul"), skip_gelu_member),
        (("Div",), defer_gelu_chain),
        (None, propagate_refusal),
        (("DequantizeLinear",), lower_dequantize),
        (("QuantizeLinear",), lower_quantize),
        (None, keep_integer_arithmetic),
        (("Gather",), defer_table_gather),
        (("Where",), defer_attention_mask),
        (("Add",), defer_masked_scores),
        (("IsNaN",), drop_isnan),
        (("Where",), drop_where_not_nan),
        (("Mul",), fold_positive_scale),
        (("MatMul",), lower_activation_matmul),
        (("Conv", "Gemm", "MatMul"), lower_weighted_layer),
        (("Relu", "Clip"), clamp_accumulator),
        (MEAN_OPS, mean_of_accumulator),
        (("Flatten", "Reshape"), reshape_accumulator),
        (tuple(TABLE_FUNCTIONS), defer_table_function),
        (("Softmax",), defer_masked_softmax),
        (("Softmax", "LayerNormalization"), defer_normalization),
        (("Concat",), defer_concat),
        (("Relu",), relu_on_codes),
        (tuple(LAYOUT_OPS), copy_input_layout),
        (("MaxPool", *LAYOUT_OPS), move_codes),
        (MEAN_OPS, mean_of_codes),
        (("Add",), add_codes),
    )
)


def _source(lowering: Lowering, node: onnx.NodeProto) -> Value | None:
    """What the node's first non-empty input is now (None: float)."""
    arguments = lowering.arguments(node)
    return arguments[0] if arguments else None


def _keepdims(node: onnx.NodeProto) -> int:
    if node.op_type == "GlobalAveragePool":
        return 1
    return next((a.i for a in node.attribute if a.name == "keepdims"), 1)


def _split_reduction(contributions: np.ndarray, bias_bound: np.ndarray) -> list[tuple[int, int]]:
    """Ranges of the reduction axis (rows of ``contributions``, ``|w|`` per input and output channel) whose
    partial accumulators each stay within int32: one range when the whole sum (with the bias) does."""
    totals = 255.0 * contributions.sum(axis=0) + bias_bound
    if totals.max() <= ACCUMULATOR_LIMIT:
        return [(0, contributions.shape[0])]
    parts, start, running = [], 0, np.zeros(contributions.shape[1])
    for row in range(contributions.shape[0]):
        step = 255.0 * contributions[row]
        if (running + step).max() > ACCUMULATOR_LIMIT and row > start:
            parts.append((start, row))
            start, running = row, np.zeros_like(running)
        running = running + step
    parts.append((start, contributions.shape[0]))
    return parts


def _kind(item: object) -> str:
    if isinstance(item, Codes):
        return "uint8"
    if isinstance(item, Accumulator):
        return "int32 accumulator"
    return "constant" if isinstance(item, tuple) else "float"


def reduce_axes(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> list[int]:
    """A reduction's axes: its attribute (older opsets) or its constant input; [] when it has neither."""
    for attribute in node.attribute:
        if attribute.name == "axes":
            return list(attribute.ints)
    if len(node.input) > 1 and node.input[1] in constants:
        return [int(axis) for axis in constants[node.input[1]]]
    return []
