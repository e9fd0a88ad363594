"""Bias correction: cancel the mean output shift that weight rounding causes.

Rounding a layer's weights to ``W_q = W + dW`` shifts its output by ``dW x``. Over the calibration data
the expected shift of output channel ``o`` is ``sum_{i,k} dW[o, i, k] * E[x_i]`` (for a Conv, ``E[x_i]``
is the mean of input channel ``i`` over batch and space; border padding is ignored, a bounded error of a
few border pixels). Subtracting it from the bias leaves ``E[W_q x + b'] = E[W x + b]`` (Nagel et al.,
"Data-Free Quantization", 2019). Depthwise layers, whose few weights per channel round coarsely, gain the
most.

After this pass, every annotated Conv / Gemm / MatMul weight with a known input mean has a bias that
absorbs the expected rounding shift (a zero bias is added where the layer had none).

That correction sees the layer's own weights only. Quantizing activations moves means too: clipping to the
calibrated range is biased, and the rounding noise passed through a ReLU6 raises its mean. :func:`refit_biases`
then works on the finished QDQ model, one layer at a time in graph order: it measures each Conv / Gemm
output's per-channel mean in the quantized model (whose earlier layers are refitted already) and moves the
bias so that the mean equals the float model's on the same samples (empirical bias correction). Done for
all layers at once instead, each layer cancels again the shifts its predecessors cancel themselves: on
EfficientNet-Lite0 (top-1 agreement with fp32, six evaluation sets of 240 crops) a simultaneous refit of
weights and biases fell from 94.0 % to 84.7 %, while the refit one layer at a time rises to 95.1 %.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from tqdm import tqdm

from qcompile import execution
from qcompile.calibration import Feed
from qcompile.graph import layer_name
from qcompile.passes.annotate import require_annotated
from qcompile.passes.quant_spec import ORIGINAL_KEY, SCALES_KEY, SPEC_KEY, QuantSpec

logger = logging.getLogger(__name__)


def expected_shift(node: ir.Node, rounding_error: np.ndarray, input_mean: np.ndarray) -> np.ndarray | None:
    """``E[dW x]`` per output channel of ``node``, or None when the layout is not one handled here."""
    if node.op_type == "Conv":
        group_attr = node.attributes.get("group")
        groups = group_attr.as_int() if group_attr is not None else 1
        out_channels, in_per_group = rounding_error.shape[:2]
        if input_mean.shape[0] != in_per_group * groups or out_channels % groups:
            return None
        per_group_out = out_channels // groups
        summed = rounding_error.reshape(out_channels, in_per_group, -1).sum(axis=2)
        means = input_mean.reshape(groups, in_per_group)
        return np.einsum("goi,gi->go", summed.reshape(groups, per_group_out, in_per_group), means).reshape(-1)
    if node.op_type == "Gemm":
        trans_b = node.attributes.get("transB")
        matrix = rounding_error if trans_b is not None and trans_b.as_int() else rounding_error.T
        return matrix @ input_mean if matrix.shape[1] == input_mean.shape[0] else None
    return None


class BiasCorrectionPass(ir.passes.InPlacePass):
    """After this pass, each corrected layer's bias absorbs the expected shift of its rounded weights."""

    def __init__(self, input_mean: Callable[[str], np.ndarray | None]) -> None:
        super().__init__()
        self.input_mean = input_mean

    def requires(self, model: ir.Model) -> None:
        require_annotated(model, type(self).__name__)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        corrected = 0
        for node in model.graph:
            if node.op_type not in ("Conv", "Gemm") or len(node.inputs) < 2:
                continue
            weight, activation = node.inputs[1], node.inputs[0]
            if weight is None or activation is None or SPEC_KEY not in weight.meta or weight.const_value is None:
                continue
            mean = self.input_mean(str(activation.name))
            if mean is None:
                continue
            spec: QuantSpec = weight.meta[SPEC_KEY]
            array = weight.const_value.numpy().astype(np.float32)
            # After GPTQ the weights are already on their grid; the error is measured from the originals.
            original = weight.meta.get(ORIGINAL_KEY, array)
            scales = weight.meta.get(SCALES_KEY, spec.weight_scales(array))
            rounding_error = spec.dequantize(spec.quantize(array, scales), scales) - original
            shift = expected_shift(node, rounding_error.astype(np.float64), mean.astype(np.float64))
            if shift is None:
                continue
            self._subtract_from_bias(model.graph, node, shift.astype(np.float32))
            corrected += 1
        logger.info("bias correction adjusted %d layers", corrected)
        return ir.passes.PassResult(model, modified=corrected > 0)

    @staticmethod
    def _subtract_from_bias(graph: ir.Graph, node: ir.Node, shift: np.ndarray) -> None:
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None and bias.const_value is not None and len(bias.uses()) == 1:
            bias.const_value = ir.tensor(bias.const_value.numpy() - shift, name=bias.name)
            return
        old = bias.const_value.numpy() if bias is not None and bias.const_value is not None else 0.0
        name = f"{layer_name(node)}_corrected_bias"
        value = ir.Value(
            name=name,
            shape=ir.Shape(shift.shape),
            type=ir.TensorType(ir.DataType.FLOAT),
            const_value=ir.tensor((old - shift).astype(np.float32), name=name),
        )
        graph.register_initializer(value)
        if len(node.inputs) > 2:
            node.replace_input_with(2, value)
        else:
            node.resize_inputs(3)
            node.replace_input_with(2, value)


INT32_LIMIT = 2**31 - 1


def _bias_writer(node: ir.Node) -> tuple[np.ndarray, Callable[[np.ndarray], None]] | None:
    """The float bias of a quantized Conv / Gemm (int32 codes behind a DequantizeLinear, or a float
    constant) and a function that replaces it; None when the bias is missing or shared."""
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is None:
        return None
    producer = bias.producer()
    if producer is None:
        if bias.const_value is None or len(bias.uses()) != 1:
            return None
        constant = bias

        def write_float(values: np.ndarray) -> None:
            constant.const_value = ir.tensor(values.astype(np.float32), name=constant.name)

        return bias.const_value.numpy().astype(np.float64), write_float
    codes, scale = producer.inputs[0], producer.inputs[1] if len(producer.inputs) > 1 else None
    if producer.op_type != "DequantizeLinear" or codes is None or scale is None:
        return None
    if codes.const_value is None or scale.const_value is None or len(codes.uses()) != 1 or len(bias.uses()) != 1:
        return None
    current = codes.const_value.numpy().astype(np.float64)
    step = np.broadcast_to(scale.const_value.numpy().astype(np.float64), current.shape)
    stored = codes

    def write_codes(values: np.ndarray) -> None:
        integers = np.clip(np.rint(values / step), -INT32_LIMIT, INT32_LIMIT).astype(np.int32)
        stored.const_value = ir.tensor(integers, name=stored.name)

    return current * step, write_codes


def _means(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Mean over batch and space (channels on axis 1) of each array, averaged over the arrays."""
    total = sum(
        np.asarray(array).mean(axis=tuple(axis for axis in range(array.ndim) if axis != 1), dtype=np.float64)
        for array in arrays
    )
    return np.asarray(total) / len(arrays)


def _channel_means(session: Any, names: list[str], feeds: Sequence[Feed]) -> dict[str, np.ndarray]:
    """Mean over batch and space of each output ``names`` (channels on axis 1) over ``feeds``."""
    outputs = [session.run(names, feed) for feed in feeds]
    return {name: _means([sample[index] for sample in outputs]) for index, name in enumerate(names)}


class _Sweep:
    """The quantized model run a piece at a time in graph order, on every feed at once, keeping the values
    later pieces read: the piece for a layer is what its output needs and was not computed yet. After a
    layer's bias changes, :meth:`forget` drops its output, and the next piece computes it again.

    Each node runs about once (a refitted layer twice) instead of once per layer after it: on
    EfficientNet-Lite0 the refit of 49 layers ran 49 growing prefixes of the model, 7 s of its compile."""

    def __init__(self, model: ir.Model, feeds: Sequence[Feed]) -> None:
        self.model = model
        self.nodes = list(model.graph)
        self.position = {id(node): index for index, node in enumerate(self.nodes)}
        self.computed: set[int] = set()
        self.values: list[dict[str, np.ndarray]] = [dict(feed) for feed in feeds]

    @staticmethod
    def usable(model: ir.Model) -> bool:
        """Whether the model can be run in pieces (no node reads values through a subgraph)."""
        return not any(
            attribute.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
            for node in model.graph
            for attribute in node.attributes.values()
        )

    def output(self, node: ir.Node) -> list[np.ndarray]:
        """``node``'s first output on each feed, computing what it needs."""
        piece: dict[int, ir.Node] = {}
        stack = [node] if id(node) not in self.computed else []
        while stack:
            current = stack.pop()
            if id(current) in piece:
                continue
            piece[id(current)] = current
            for value in current.inputs:
                producer = value.producer() if value is not None else None
                if producer is not None and id(producer) not in self.computed:
                    stack.append(producer)
        if piece:
            self._run(sorted(piece.values(), key=lambda item: self.position[id(item)]))
        name = str(node.outputs[0].name)
        return [values[name] for values in self.values]

    def forget(self, node: ir.Node) -> None:
        """Drop ``node``'s outputs, and those of the nodes before it that read constants alone (the
        DequantizeLinear of its new bias codes): they run again when next needed."""
        self.computed.discard(id(node))
        for values in self.values:
            for output in node.outputs:
                values.pop(str(output.name), None)
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer is not None and all(item is None or item.const_value is not None for item in producer.inputs):
                self.forget(producer)

    def _run(self, piece: list[ir.Node]) -> None:
        members = {id(node) for node in piece}
        first = self.values[0]
        inputs: dict[str, onnx.ValueInfoProto] = {}
        initializers: dict[str, onnx.TensorProto] = {}
        outputs: list[onnx.ValueInfoProto] = []
        # The node asked for (the others in the piece are its ancestors): its inputs are kept too, since the
        # node runs again when its bias changes.
        wanted = piece[-1]
        for node in piece:
            for value in node.inputs:
                if value is None or ((producer := value.producer()) is not None and id(producer) in members):
                    continue
                name = str(value.name)
                if name in first and name not in inputs:
                    array = np.asarray(first[name])
                    inputs[name] = onnx.helper.make_tensor_value_info(name, _tensor_type(array), array.shape)
                elif name not in first and value.const_value is not None and name not in initializers:
                    initializers[name] = ir.serde.serialize_tensor(value.const_value)
                    initializers[name].name = name
            for value in node.outputs:
                read_later = any(id(user) not in members or user is wanted for user, _ in value.uses())
                if (value.name and read_later) or value is wanted.outputs[0]:
                    outputs.append(onnx.ValueInfoProto(name=str(value.name)))
        graph = onnx.helper.make_graph(
            [ir.serde.serialize_node(node) for node in piece],
            "piece",
            list(inputs.values()),
            outputs,
            list(initializers.values()),
        )
        opsets = [onnx.helper.make_opsetid(domain, version) for domain, version in self.model.opset_imports.items()]
        proto = onnx.helper.make_model(graph, opset_imports=opsets)
        proto.ir_version = execution.ORT_IR_VERSION
        session = execution.session(proto)
        names = [item.name for item in outputs]
        for values in self.values:
            values.update(zip(names, session.run(names, {name: values[name] for name in inputs}), strict=True))
        self.computed |= members
        # What no later node reads is dropped; the node asked for keeps its inputs (it may run again) and its
        # output (the caller reads it next).
        later = {str(value.name) for value in [*wanted.inputs, wanted.outputs[0]] if value is not None}
        later.update(
            str(value.name)
            for node in self.nodes
            if id(node) not in self.computed
            for value in node.inputs
            if value is not None
        )
        for values in self.values:
            for name in [name for name in values if name not in later]:
                del values[name]


def _tensor_type(array: np.ndarray) -> int:
    return onnx.helper.np_dtype_to_tensor_dtype(array.dtype)


def refit_biases(reference: ir.Model, quantized: ir.Model, feeds: Sequence[Feed], progress: bool = False) -> int:
    """Refit, in graph order, the bias of every quantized Conv / Gemm of ``quantized`` (a QDQ model of
    ``reference``) so that its per-channel output mean over ``feeds`` equals ``reference``'s; returns the
    number of layers refitted. ``quantized`` is changed in place (only bias values)."""
    produced = {str(value.name) for node in reference.graph for value in node.outputs}
    quantized.graph.sort()  # inserted quantization nodes may follow their readers in the list: graph order first
    layers = []
    for node in quantized.graph:
        weight = node.inputs[1] if node.op_type in ("Conv", "Gemm") and len(node.inputs) > 1 else None
        producer = weight.producer() if weight is not None else None
        while producer is not None and producer.op_type in ("Reshape", "Transpose") and producer.inputs[0] is not None:
            producer = producer.inputs[0].producer()  # block-quantized weights are reshaped after dequantizing
        if producer is None or producer.op_type != "DequantizeLinear":
            continue  # a float layer: no rounding to cancel
        writer = _bias_writer(node)
        if writer is not None and str(node.outputs[0].name) in produced and node.outputs[0].shape is not None:
            layers.append((node, writer))
    if not layers or not feeds:
        return 0
    names = [str(node.outputs[0].name) for node, _ in layers]
    targets = _channel_means(execution.session(reference, extra_outputs=names), names, feeds)
    show = progress and sys.stderr.isatty()
    sweep = _Sweep(quantized, feeds) if _Sweep.usable(quantized) and not execution.is_large(quantized) else None
    refitted = 0
    for node, (bias, write) in tqdm(layers, desc="refitting biases", unit="layer", disable=not show, file=sys.stderr):
        name = str(node.outputs[0].name)
        if sweep is not None:
            measured = _means(sweep.output(node))
        else:  # only the layer and what feeds it run: its output does not depend on what comes after it
            layer = execution.session(quantized, extra_outputs=[name], only_extra=True)
            measured = _channel_means(layer, [name], feeds)[name]
        if measured.shape == bias.shape:
            write(bias - (measured - targets[name]))
            refitted += 1
            if sweep is not None:
                sweep.forget(node)
    logger.info("refitted the biases of %d layers one at a time", refitted)
    return refitted
