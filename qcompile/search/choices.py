"""What the cost model reads of a float model that the pipeline will quantize: its layers in the form the
pipeline quantizes them, and the compute dtype each node gets under W8A8."""

from __future__ import annotations

import onnx_ir as ir

from qcompile.graph import clone, layer_name
from qcompile.hwmodels.cost import INT8, Choice
from qcompile.hwmodels.layers import describe
from qcompile.passes.annotate import plan_quantization_points
from qcompile.passes.matmul_to_gemm import MatMulAddToGemmPass


def quantized_choices(model: ir.Model, float_layers: frozenset[str] = frozenset()) -> dict[str, Choice]:
    """The choice of every node once ``model`` is quantized W8A8 as the pipeline does it: int8 compute
    layers, int8 Add / Concat / pooling where the int8 flow reaches them, float elsewhere."""
    layers, points = plan_quantization_points(model, float_layers)
    quantized = {layer_name(node) for node in layers}
    names = {str(value.name) for value in points}
    choices = {}
    for node, spec in zip(model.graph, describe(model), strict=True):
        if spec.name in quantized or (
            not spec.quantizable and any(value is not None and str(value.name) in names for value in node.inputs)
        ):
            choices[spec.name] = INT8
    return choices


def as_pipeline_sees_it(model: ir.Model) -> ir.Model:
    """A copy of the float ``model`` in the form the pipeline quantizes (MatMul + bias Add as Gemm), so that
    its node names match the quantized model's layers."""
    rewritten = clone(model)
    MatMulAddToGemmPass()(rewritten)
    return rewritten
