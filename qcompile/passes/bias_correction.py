"""Bias correction: cancel the mean output shift that weight rounding causes.

Rounding a layer's weights to ``W_q = W + dW`` shifts its output by ``dW x``. Over the calibration data
the expected shift of output channel ``o`` is ``sum_{i,k} dW[o, i, k] * E[x_i]`` (for a Conv, ``E[x_i]``
is the mean of input channel ``i`` over batch and space; border padding is ignored, a bounded error of a
few border pixels). Subtracting it from the bias leaves ``E[W_q x + b'] = E[W x + b]`` (Nagel et al.,
"Data-Free Quantization", 2019). Depthwise layers, whose few weights per channel round coarsely, gain the
most.

After this pass, every annotated Conv / Gemm / MatMul weight with a known input mean has a bias that
absorbs the expected rounding shift (a zero bias is added where the layer had none).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from qcompile.passes.annotate import layer_name, require_annotated
from qcompile.passes.gptq import ORIGINAL_KEY, SCALES_KEY
from qcompile.passes.quant_spec import SPEC_KEY, QuantSpec

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
