"""Annotation: decide which values are quantized, and how, as QuantSpecs attached to values.

After this pass, every weight of a quantized Conv / Gemm / MatMul carries a per-channel symmetric
``QuantSpec`` (int8, unless ``weight_formats`` names int4 or ternary for its layer) and every activation
at a quantization point carries a uint8 spec and its calibrated range.

Quantization points are chosen so that onnxruntime (and TVM) can run whole regions in integers:

- every float activation input of a quantized Conv / Gemm / MatMul;
- the inputs and output of an Add, Concat or pooling op whose every non-constant input already flows in
  int8 (the output of a quantized compute op, after its Relu / Clip, or of another such op); the output
  after a sole Relu / Clip consumer, as for compute ops (a ResNet block's Add, Relu). This keeps
  residual streams of CNNs in int8 but leaves a transformer's bias adds, residual adds and LayerNorms in
  float, where 8 bits are known to lose too much.

A layer named in ``float_layers`` is not annotated; the caller records why it stays float.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping

import numpy as np
import onnx_ir as ir

from qcompile.graph import is_constant, is_float, layer_name
from qcompile.passes.quant_spec import ACTIVATION_UINT8, RANGE_KEY, SPEC_KEY, SPLIT_SUM_KEY, WEIGHT_FORMATS, QuantSpec

logger = logging.getLogger(__name__)

COMPUTE_OPS = frozenset({"Conv", "Gemm", "MatMul"})
AUX_OPS = frozenset({"Add", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool"})
ACTIVATION_OPS = frozenset({"Relu", "Clip"})
# Elementwise activations an integer-only target computes as a 256-entry table on uint8 codes; with
# ``table_ops`` their inputs and outputs become quantization points as AUX_OPS' are.
TABLE_OPS = frozenset({"Sigmoid", "Tanh", "HardSigmoid", "HardSwish"})
# Ops an integer-only target computes in integers from their first input's codes (their other inputs are
# constants: LayerNorm's scale and bias); quantized around with ``table_ops`` as well.
INTEGER_ROW_OPS = frozenset({"Softmax", "LayerNormalization"})
SHAPE_OPS = frozenset({"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze"})


def weight_axis(node: ir.Node, index: int) -> int | None:
    """The output-channel axis of a constant input of ``node``, or None if it is not a weight."""
    if node.op_type == "Conv" and index == 1:
        return 0
    if node.op_type == "Gemm" and index == 1:
        trans_b = node.attributes.get("transB")
        return 0 if trans_b is not None and trans_b.as_int() else 1
    if node.op_type == "MatMul" and index == 1:
        weight = node.inputs[1]
        return weight.const_value.shape.rank() - 1 if weight is not None and weight.const_value else None
    return None


def quantizable_layers(model: ir.Model) -> list[ir.Node]:
    """Compute nodes qcompile can quantize: Conv / Gemm with a constant weight, MatMul with float inputs of
    which only the second may be constant, and then as a 2-D weight. A constant first operand or a batched
    constant second one (a rotary table: inverse frequencies times positions, [batch, dim/2, 1]) is no layer's
    weight: onnxruntime's integer MatMul takes per-column zero points only for a 2-D B ("b zero point is not
    valid"), and such products are a few hundred multiply-adds on positions that 8 bits would blur."""
    layers = []
    for node in model.graph:
        if node.op_type not in COMPUTE_OPS or not all(is_float(value) for value in node.inputs[:2]):
            continue
        if node.op_type in ("Conv", "Gemm") and not is_constant(node.inputs[1]):
            continue
        if node.op_type == "MatMul" and (
            is_constant(node.inputs[0])
            or (is_constant(node.inputs[1]) and node.inputs[1].const_value.shape.rank() != 2)  # type: ignore[union-attr]
        ):
            continue
        layers.append(node)
    return layers


def _activation_output(node: ir.Node) -> ir.Value:
    """The value a compute node's result flows on in int8: through a sole Relu / Clip consumer."""
    output = node.outputs[0]
    users = output.uses()
    if len(users) == 1 and not output.is_graph_output():
        consumer = next(iter(users)).node
        if consumer.op_type in ACTIVATION_OPS and all(
            index == 0 or is_constant(value) or value is None for index, value in enumerate(consumer.inputs)
        ):
            return consumer.outputs[0]
    return output


def gelu_output(node: ir.Node) -> ir.Value | None:
    """The output of the erf GELU that starts at ``node`` — ``x * 0.5 * (1 + erf(x / sqrt 2))`` as exporters
    write it at opsets without a Gelu op (Div, Erf, Add, then two Muls, one of them by x) — or None."""
    if node.op_type != "Div" or not is_constant(node.inputs[1]) or node.inputs[0] is None:
        return None
    x = node.inputs[0]
    divisor = float(node.inputs[1].const_value.numpy().reshape(-1)[0])  # type: ignore[union-attr]
    if abs(divisor - 2**0.5) > 1e-3:
        return None
    chain = [node]
    for expected in ("Erf", "Add"):
        uses = list(chain[-1].outputs[0].uses())
        if len(uses) != 1 or uses[0].node.op_type != expected:
            return None
        chain.append(uses[0].node)
    if chain[-1].inputs[1] is None or not is_constant(chain[-1].inputs[1]):
        return None
    value = chain[-1].outputs[0]
    multiplied_by_x = False
    for _ in range(2):  # Mul by x and Mul by 0.5, in either order
        uses = list(value.uses())
        if len(uses) != 1 or uses[0].node.op_type != "Mul":
            return None
        other = uses[0].node.inputs[1 - uses[0].idx]
        if other is x:
            multiplied_by_x = True
        elif (
            other is None
            or other.const_value is None
            or abs(float(other.const_value.numpy().reshape(-1)[0]) - 0.5) > 1e-6
        ):
            return None
        value = uses[0].node.outputs[0]
    return value if multiplied_by_x else None


def masked_scores(node: ir.Node, int8_flow: set[int]) -> ir.Value | None:
    """For a Softmax over ``Add(scores, Where(mask, 0, -inf))`` (an attention mask as exporters write it),
    the int8 scores value; else None."""
    source = node.inputs[0] if node.op_type == "Softmax" and node.inputs else None
    adder = source.producer() if source is not None else None
    if adder is None or adder.op_type != "Add" or len(source.uses()) != 1:  # type: ignore[union-attr]
        return None
    for index in (0, 1):
        scores, mask = adder.inputs[index], adder.inputs[1 - index]
        where = mask.producer() if mask is not None else None
        constant_branches = where is not None and all(is_constant(value) for value in where.inputs[1:3])
        if scores is not None and id(scores) in int8_flow and where is not None and where.op_type == "Where":
            return scores if constant_branches else None
    return None


def plan_quantization_points(
    model: ir.Model, float_layers: frozenset[str] = frozenset(), table_ops: bool = False
) -> tuple[list[ir.Node], list[ir.Value]]:
    """The quantized compute layers and the activation values to quantize, in graph order (with
    ``table_ops``, also around the TABLE_OPS activations fed by int8 values)."""
    grouped = AUX_OPS | TABLE_OPS | INTEGER_ROW_OPS if table_ops else AUX_OPS
    layers = [node for node in quantizable_layers(model) if layer_name(node) not in float_layers]
    quantized_layers = {id(node) for node in layers}
    int8_flow: set[int] = set()
    points: dict[int, ir.Value] = {}
    for node in model.graph:
        if id(node) in quantized_layers:
            for value in node.inputs[:2]:
                if value is not None and not is_constant(value):
                    points.setdefault(id(value), value)
            output = _activation_output(node)
            int8_flow.add(id(output))
            if node.op_type == "Conv" and not output.is_graph_output():
                # onnxruntime runs a QDQ Conv as an integer kernel only when its output is quantized too (a
                # MatMul or Gemm has integer kernels with float outputs); without, it dequantizes and runs
                # the Conv in float, slower than the float model: EfficientNet-Lite0's last 1x1 Conv, whose
                # reader is the float ReduceMean, took 262 us so against ~55 us as an integer kernel. (A
                # graph output stays float: no integer kernel could write it.)
                points.setdefault(id(output), output)
        elif node.op_type == "Add" and SPLIT_SUM_KEY in node.metadata_props:
            # The parts of one split layer are summed as accumulators, before any re-quantization.
            if all(value is not None and id(value) in int8_flow for value in node.inputs):
                int8_flow.add(id(_activation_output(node)))
        elif table_ops and node.op_type == "Gather" and is_constant(node.inputs[0]) and is_float(node.inputs[0]):
            # An embedding: its float table is quantized with the lookup's output range.
            points.setdefault(id(node.outputs[0]), node.outputs[0])
            int8_flow.add(id(node.outputs[0]))
        elif table_ops and masked_scores(node, int8_flow) is not None:
            # The mask is applied in integers inside the Softmax, on the scores' int32 accumulator.
            points.setdefault(id(node.outputs[0]), node.outputs[0])
            int8_flow.add(id(node.outputs[0]))
        elif table_ops and node.op_type == "Mul" and node.inputs[0] is not None and id(node.inputs[0]) in int8_flow:
            if is_constant(node.inputs[1]) and node.inputs[1].const_value.numpy().size == 1:  # type: ignore[union-attr]
                int8_flow.add(id(node.outputs[0]))  # scaling by a constant changes only the scale
        elif table_ops and (gelu := gelu_output(node)) is not None and id(node.inputs[0]) in int8_flow:
            points.setdefault(id(node.inputs[0]), node.inputs[0])  # type: ignore[arg-type]
            points.setdefault(id(gelu), gelu)
            int8_flow.add(id(gelu))
        elif table_ops and node.op_type in SHAPE_OPS and node.inputs and id(node.inputs[0]) in int8_flow:
            # A reshape of an int8 value is still one; quantized before it, so that a per-channel accumulator
            # is never reshaped across its channel axis (attention heads split it).
            points.setdefault(id(node.inputs[0]), node.inputs[0])  # type: ignore[arg-type]
            int8_flow.add(id(node.outputs[0]))
        elif node.op_type in grouped:
            # Only ops fed entirely by int8 activations (no constant operand) stay in the int8 region.
            activations = [value for value in node.inputs if value is not None]
            if node.op_type in INTEGER_ROW_OPS:
                activations = activations[:1]
            if activations and all(
                not is_constant(value) and is_float(value) and id(value) in int8_flow for value in activations
            ):
                for value in activations:
                    if not (table_ops and _residual_into_norm(value)):
                        points.setdefault(id(value), value)
                # A residual Add's Relu (ResNet's blocks) stays in the region: quantized after it.
                output = _activation_output(node)
                if not (table_ops and _residual_into_norm(output)):
                    points.setdefault(id(output), output)
                int8_flow.add(id(output))
    return layers, list(points.values())


# An average pool requantizes its input sum by input_scale / (output_scale * window): onnxruntime's QLinear
# average pools refuse a factor of 256 or more ("parameter out of computation range"), and the integer kernels'
# fixed-point multipliers are built for factors below 1. The output's range lies inside the input's, so this
# only binds when the calibrated output range collapsed (a layer dead on every sample: output scale at its floor
# under a ReLU6's full [0, 6] input scale, seen on MobileNets with untrained BatchNorm statistics).
AVERAGING_OPS = frozenset({"AveragePool", "GlobalAveragePool"})
MAX_AVERAGE_FACTOR = 128.0


def _averaging_window(node: ir.Node) -> int | None:
    if node.op_type == "AveragePool":
        kernel = node.attributes.get("kernel_shape")
        return int(np.prod(kernel.as_ints())) if kernel is not None else None
    shape = node.inputs[0].shape if node.inputs[0] is not None else None
    spatial = [dim for dim in shape[2:] if isinstance(dim, int)] if shape is not None else []
    if shape is None or len(shape) < 3 or len(spatial) != len(shape) - 2:
        return None
    return math.prod(spatial)


def _widen_average_range(node: ir.Node) -> None:
    """Widen a quantized average pool's output range so its requantization factor stays below
    MAX_AVERAGE_FACTOR (see there)."""
    source, target = node.inputs[0], node.outputs[0]
    window = _averaging_window(node)
    if source is None or window is None or RANGE_KEY not in source.meta or RANGE_KEY not in target.meta:
        return
    source_span = source.meta[RANGE_KEY][1] - source.meta[RANGE_KEY][0]
    low, high = target.meta[RANGE_KEY]
    least = source_span / (MAX_AVERAGE_FACTOR * window)
    if high - low < least:
        target.meta[RANGE_KEY] = (float(low), float(low + least))


def _residual_into_norm(value: ir.Value) -> bool:
    """A residual Add's sum read only by a LayerNorm: an integer-only target keeps it in int32 (I-BERT does)
    rather than re-quantizing the residual stream to 8 bits before the normalization."""
    producer = value.producer()
    uses = list(value.uses())
    return (
        producer is not None
        and producer.op_type == "Add"
        and len(uses) == 1
        and uses[0].node.op_type == "LayerNormalization"
        and uses[0].idx == 0
    )


def _known_activation_range(value: ir.Value) -> tuple[float, float] | None:
    """A Relu / Clip output's range is known a priori: [0, inf) or [min, max]."""
    producer = value.producer()
    if producer is None or producer.op_type not in ACTIVATION_OPS:
        return None
    if producer.op_type == "Relu":
        return 0.0, float("inf")
    bounds = []
    for index in (1, 2):
        bound = producer.inputs[index] if len(producer.inputs) > index else None
        bounds.append(float(bound.const_value.numpy()) if is_constant(bound) else None)  # type: ignore[union-attr]
    return (bounds[0] if bounds[0] is not None else -float("inf"), bounds[1] if bounds[1] is not None else float("inf"))


def first_annotated(model: ir.Model) -> ir.Value | None:
    """A value of ``model`` that carries a QuantSpec, or None."""
    values = (value for node in model.graph for value in (*node.inputs, *node.outputs) if value is not None)
    return next((value for value in (*model.graph.inputs, *values) if SPEC_KEY in value.meta), None)


def require_annotated(model: ir.Model, pass_name: str) -> None:
    """Precondition of the passes that read QuantSpecs: AnnotatePass has run on ``model``."""
    if first_annotated(model) is None:
        raise ir.passes.PreconditionError(f"{pass_name} reads QuantSpecs: run AnnotatePass first")


def require_unannotated(model: ir.Model, pass_name: str) -> None:
    """Precondition of the float rewrites: they change weights and activations, so they must run before
    annotation has fixed their QuantSpecs and ranges."""
    annotated = first_annotated(model)
    if annotated is not None:
        raise ir.passes.PreconditionError(
            f"{pass_name} rewrites the float model, but value '{annotated.name}' already carries a QuantSpec: "
            "run it before AnnotatePass"
        )


class AnnotatePass(ir.passes.InPlacePass):
    """After this pass, every quantized layer's weight and every quantization point carries a QuantSpec."""

    def __init__(
        self,
        value_range: Callable[..., tuple[float, float]],
        float_layers: frozenset[str] = frozenset(),
        weight_formats: Mapping[str, str] | None = None,
        activation_spec: QuantSpec = ACTIVATION_UINT8,
        weight_block: int | None = None,
        table_ops: bool = False,
        activation_formats: Mapping[str, QuantSpec] | None = None,
    ) -> None:
        """``value_range(name)`` is a value's calibrated range for ``activation_spec``; a layer named in
        ``activation_formats`` reads its activations in that spec instead (a wider one, say 16 bits: a value
        read by several layers takes the widest), and their ranges come from ``value_range(name, levels)``."""
        super().__init__()
        self.table_ops = table_ops
        self.value_range = value_range
        self.float_layers = float_layers
        self.weight_formats = weight_formats or {}
        self.activation_spec = activation_spec
        self.weight_block = weight_block
        self.activation_formats = activation_formats or {}

    def requires(self, model: ir.Model) -> None:
        require_unannotated(model, "AnnotatePass")

    def ensures(self, model: ir.Model) -> None:
        values = (value for node in model.graph for value in node.inputs if value is not None)
        for value in (*model.graph.inputs, *values):
            if SPEC_KEY in value.meta and not is_constant(value) and RANGE_KEY not in value.meta:
                raise ir.passes.PostconditionError(f"activation '{value.name}' has a QuantSpec but no calibrated range")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        layers, points = plan_quantization_points(model, self.float_layers, self.table_ops)
        for node in layers:
            for index, value in enumerate(node.inputs[:2]):
                axis = weight_axis(node, index)
                if value is not None and is_constant(value) and axis is not None:
                    base = WEIGHT_FORMATS[self.weight_formats.get(layer_name(node), "int8")]
                    spec = dataclasses.replace(base, axis=axis, block_size=self.weight_block)
                    if not spec.blocked(value.const_value.numpy().shape):  # type: ignore[union-attr]
                        spec = dataclasses.replace(spec, block_size=None)  # not 2-D, or blocks cannot tile it
                    value.meta[SPEC_KEY] = spec
        wide: dict[int, QuantSpec] = {}
        for node in layers:
            reads = self.activation_formats.get(layer_name(node))
            if reads is None:
                continue
            for value in node.inputs[:2]:
                if value is not None and not is_constant(value):
                    current = wide.get(id(value))
                    if current is None or reads.bits > current.bits:
                        wide[id(value)] = reads
        for value in points:
            spec = wide.get(id(value), self.activation_spec)
            if spec == self.activation_spec:
                low, high = self.value_range(str(value.name))
            else:
                low, high = self.value_range(str(value.name), spec.levels)
            known = _known_activation_range(value)
            if known is not None and np.isfinite(known).all() and known[0] <= 0.0 <= known[1]:
                # ReLU6-style clips saturate often: the full clip range keeps the saturated values exact
                # (measured on EfficientNet-Lite0: output error 2.33e-3 against 2.38e-3 when calibrated).
                low, high = known
            elif known is not None:
                low, high = max(low, known[0]), min(high, known[1])
            if not np.isfinite([low, high]).all() or high < low:
                raise ValueError(f"value '{value.name}' has no usable calibration range ({low}, {high})")
            value.meta[SPEC_KEY] = spec
            value.meta[RANGE_KEY] = (float(low), float(high))
        for node in model.graph:
            if node.op_type in AVERAGING_OPS:
                _widen_average_range(node)
        logger.info("annotated %d layers and %d activation values", len(layers), len(points))
        return ir.passes.PassResult(model, modified=bool(layers))
