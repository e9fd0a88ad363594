"""Integer-only lowering of a QDQ model: no float arithmetic between input quantization and output
dequantization.

From the QDQ graph of :mod:`qcompile.passes.qdq` (activations uint8 with zero point, weights int8 symmetric
per output channel, int32 biases at scale ``s_x * s_w``) :func:`lower` builds a graph of standard ONNX
integer ops: ``ConvInteger`` / ``MatMulInteger`` with int32 accumulators, dyadic requantization at each
``QuantizeLinear``, tables, integer Softmax and LayerNorm (the arithmetic and its derivations:
:mod:`qcompile.backends.integer.arithmetic`; what each op becomes: :mod:`qcompile.backends.integer.rules`).

How it runs: nodes are visited in graph order, and each is offered to the rules of
:data:`~qcompile.backends.integer.rules.RULES`, one table of ``(op types, handler)`` in precedence order.
The first handler whose op types include the node's (or that takes any op) and that returns True has
lowered it (emitted integer nodes, or recorded what its output now is: uint8 codes, an accumulator, a
quantized constant, or an op deferred to the ``QuantizeLinear`` after it), or refused it with a message.
A handler returns False, having emitted nothing, when the node is not its to lower. A node no rule takes
is refused, and every node reading a refused node's output is refused with it.

Graph outputs: an accumulator is dequantized (``Cast`` to float, ``Mul`` by its scales); a uint8 value
by ``DequantizeLinear``.

Static overflow analysis: for every accumulator, ``255 * sum_k |w[c, k]| + |bias[c]|`` bounds ``|acc|``. A
layer whose bound passes the int32 range has its reduction split (input channels of a Conv, rows of a
MatMul weight) into parts whose partial sums each fit int32, summed in int64 (``Slice`` of the input, one
``ConvInteger`` / ``MatMulInteger`` per part); the requantization then uses fewer multiplier bits so that
``acc * M0`` stays below 2**60. A grouped Conv is not split (an error names it). The report lists every
layer's bound and number of parts.

Anything else (ops with no integer form, float ops between quantized values) cannot be lowered:
:func:`lower` raises one error listing every such node, with its op and the reason. For a host build,
``float_islands`` keeps such nodes as the float ops they are instead (the layers the quantization kept float,
ops with no integer form): their integer inputs are dequantized (codes by ``DequantizeLinear``, accumulators
cast and scaled), the ``QuantizeLinear`` after them quantizes their float output, and the graph is integer
everywhere else. The numpy oracle runs those nodes with onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from qcompile.backends.integer.arithmetic import (
    Accumulator,
    Codes,
    Deferred,
    Lowering,
    LoweringReport,
    channel_shape,
)
from qcompile.backends.integer.reference import FLOAT_ISLANDS
from qcompile.backends.integer.rules import RULES, refuse_unlowered
from qcompile.errors import UnsupportedModelError


def lower(model: onnx.ModelProto, float_islands: bool = False) -> tuple[onnx.ModelProto, LoweringReport]:
    """The integer-only form of the QDQ ``model``.

    Args:
        model: a QDQ graph as :mod:`qcompile.passes.qdq` writes it.
        float_islands: keep the nodes with no integer form as the float ops they are (a host build, whose
            kernels run float layers too), their integer inputs dequantized and their quantized readers
            quantizing them, instead of refusing them; the report lists them (``float_nodes``) and the graph's
            ``metadata_props`` name them (:data:`FLOAT_ISLANDS`) for the oracle.

    Returns:
        The integer graph (same inputs and outputs) and the report of its accumulators and requantizations.

    Raises:
        UnsupportedModelError: one error listing every node that cannot be lowered.
    """
    lowering = Lowering(model, float_islands)
    for node in model.graph.node:
        if not any((ops is None or node.op_type in ops) and handler(lowering, node) for ops, handler in RULES):
            refuse_unlowered(lowering, node)
    outputs = [_dequantize_output(lowering, output) for output in model.graph.output]
    if lowering.refused:
        raise _refusal(lowering)
    build = lowering.build
    # Constants the copied nodes (input quantization, layout ops) read keep their names.
    present = {tensor.name for tensor in build.initializers}
    read = {value for node in build.nodes for value in node.input}
    build.initializers += [tensor for tensor in model.graph.initializer if tensor.name in read - present]
    graph = helper.make_graph(
        build.nodes, f"{model.graph.name}_integer", list(model.graph.input), outputs, build.initializers
    )
    lowered = helper.make_model(graph, opset_imports=list(model.opset_import))
    lowered.ir_version = model.ir_version
    if lowering.report.float_nodes:
        onnx.helper.set_model_props(lowered, {FLOAT_ISLANDS: "\n".join(lowering.report.float_nodes)})
    return lowered, lowering.report


def _dequantize_output(lowering: Lowering, output: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    """Emit the float graph output ``output`` from what it is in integers (or record that it is not)."""
    build = lowering.build
    result = lowering.values.get(output.name)
    if isinstance(result, Deferred) and output.name in lowering.quantized_as:
        result = lowering.quantized_as[output.name]  # the float output of an integer op: its quantized codes
    if isinstance(result, Accumulator):
        floating = build.node("Cast", [result.name], f"{output.name}_float", to=TensorProto.FLOAT)
        shape = channel_shape(result.scales.size, result.axis, result.rank) if result.scales.size > 1 else []
        factors = build.const(result.scales.astype(np.float32).reshape(shape), f"{output.name}_scales")
        build.nodes.append(
            helper.make_node("Mul", [floating, factors], [output.name], name=f"{output.name}_dequantize")
        )
    elif isinstance(result, Codes):
        step = build.const(np.array(result.scale, np.float32), f"{output.name}_scale")
        offset = build.const(np.array(result.zero_point, np.uint8), f"{output.name}_zero")
        build.nodes.append(helper.make_node("DequantizeLinear", [result.name, step, offset], [output.name]))
    elif output.name not in lowering.failed and output.name not in lowering.floats:
        lowering.refused.append(f"graph output '{output.name}' is not computed in integers")
    return output


def _refusal(lowering: Lowering) -> UnsupportedModelError:
    """One error: how many nodes of each op were refused, then each refusal's message."""
    refused, dependent = lowering.refused, lowering.dependent
    downstream = f"\n  (and {dependent} node(s) after them, which read their outputs)" if dependent else ""
    by_op: dict[str, int] = {}
    for message in refused:
        kind = message.split(" (", 1)[1].split(")", 1)[0] if " (" in message else "output"
        by_op[kind] = by_op.get(kind, 0) + 1
    summary = ", ".join(f"{kind} x{count}" for kind, count in sorted(by_op.items(), key=lambda item: -item[1]))
    return UnsupportedModelError(
        f"{len(refused)} node(s) cannot be lowered to integer-only arithmetic ({summary}):\n  "
        + "\n  ".join(refused)
        + downstream
    )
