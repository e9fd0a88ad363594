"""Ternary weights and int8 activations for every linear layer (BitNet b1.58 style).

For each MatMul with a constant 2-D weight, and each Gemm with a constant weight (alpha = beta = 1):

- weights: ``W[K, N]`` -> scale ``s`` and trits ``t = clip(round(W / s), -1, 1)`` with ``s`` the mean of
  ``|W|`` ("absmean", as BitNet b1.58) per output channel (``granularity="channel"``, default) or over the
  whole matrix (``"tensor"``); weights that are ternary already (``{-a, 0, a}``) keep ``s = a`` and their codes;
- activations: int8 per row (per token), absmax: ``a = max|x|`` over the last axis,
  ``q = clip(round(x * 127 / a), -127, 127)``, computed at run time (no calibration);
- the product: ``MatMulInteger(q, t)`` in int32, then ``float(acc) * (a / 127) * s (+ bias)``.

The rewritten graph is standard ONNX (onnxruntime runs it); the int32 ``MatMulInteger`` of int8 rows by
ternary weights is exactly what the table-lookup engines of :mod:`qcompile.backends.lut` compute. -127..127
keeps the activation code symmetric, as the weights are.

Accuracy needs a model trained for ternary weights (quantization-aware, e.g. with a straight-through
estimator); a float model ternarized after training loses most of its accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompile.errors import UnsupportedModelError
from qcompile.graph import add_initializer, drop_if_unused, is_constant, layer_name
from qcompile.passes.annotate import require_unannotated
from qcompile.passes.dynamic_rows import Chain, rescaled, row_codes
from qcompile.passes.quant_spec import TERNARY_KEY

EXACT_RTOL = 1e-6  # magnitudes this close to a channel's peak count as that one level (float32 storage)
GRANULARITIES = ("channel", "tensor")


def ternarize_weights(weights: np.ndarray, granularity: str = "channel") -> tuple[np.ndarray, np.ndarray]:
    """``[K, N]`` float -> (int8 trits ``[K, N]``, float32 scales ``[N]``), absmean scaling.

    Weights that are already ternary, every nonzero of a channel (or of the matrix, per tensor) of one
    magnitude ``a`` (a model trained ternary and exported with its ternary weights), keep their exact codes
    and scale ``a``: absmean would give ``a`` times the channel's share of nonzeros, and round the smaller
    magnitudes of a sparse channel to zero.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, not {granularity!r}")
    magnitude = np.abs(weights.astype(np.float64))
    by_channel = granularity == "channel"
    scale = magnitude.mean(axis=0) if by_channel else np.full(weights.shape[1], magnitude.mean())
    peak = magnitude.max(axis=0) if by_channel else np.full(weights.shape[1], magnitude.max())
    # ternary already: every magnitude is 0 or the peak (to float32 rounding of a stored a * sign)
    level = (magnitude == 0) | np.isclose(magnitude, peak, rtol=EXACT_RTOL, atol=0)
    exact = level.all(axis=0) if by_channel else np.full(weights.shape[1], level.all())
    scale = np.where(exact, peak, scale)
    scale = np.where(scale > 0, scale, 1.0)
    trits = np.clip(np.round(weights / scale), -1, 1).astype(np.int8)
    return trits, scale.astype(np.float32)


@dataclass(frozen=True)
class TernaryLayer:
    """What the LUT backend needs to know about one rewritten layer."""

    name: str
    k: int
    n: int
    zero_fraction: float


def _weight_and_bias(node: ir.Node) -> tuple[np.ndarray, ir.Value | None] | None:
    """``[K, N]`` float weight and the bias value of a linear node, or None if it is not one."""
    if node.op_type == "MatMul":
        weight = node.inputs[1]
        if not is_constant(weight) or weight.const_value.shape.rank() != 2:  # type: ignore[union-attr]
            return None
        return weight.const_value.numpy().astype(np.float32), None  # type: ignore[union-attr]
    if node.op_type == "Gemm":
        weight = node.inputs[1]
        if not is_constant(weight):
            return None
        attributes = {name: attribute.value for name, attribute in node.attributes.items()}
        if attributes.get("transA", 0) or attributes.get("alpha", 1.0) != 1.0 or attributes.get("beta", 1.0) != 1.0:
            raise UnsupportedModelError(
                f"Gemm '{layer_name(node)}': the ternary path takes Gemm with alpha = beta = 1 and no transA"
            )
        matrix = weight.const_value.numpy().astype(np.float32)  # type: ignore[union-attr]
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None and not is_constant(bias):
            raise UnsupportedModelError(f"Gemm '{layer_name(node)}': its bias must be a constant")
        return (matrix.T if attributes.get("transB", 0) else matrix), bias
    return None


class TernarizePass(ir.passes.InPlacePass):
    """After this pass no linear layer with a constant weight computes in float: each is int8 rows times
    ternary weights in a ``MatMulInteger``, rescaled to float after."""

    def requires(self, model: ir.Model) -> None:
        require_unannotated(model, "TernarizePass")

    def ensures(self, model: ir.Model) -> None:
        tagged = {str(node.meta[TERNARY_KEY]) for node in model.graph if TERNARY_KEY in node.meta}
        missing = [layer.name for layer in self.layers if layer.name not in tagged]
        if missing:
            raise ir.passes.PostconditionError(f"ternarized layers without their tagged MatMulInteger: {missing[:5]}")

    def __init__(self, granularity: str = "channel") -> None:
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, not {granularity!r}")
        self.granularity = granularity
        self.layers: list[TernaryLayer] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.layers = []
        for node in list(graph):
            found = _weight_and_bias(node)
            if found is None:
                continue
            weights, bias = found
            name = layer_name(node)
            trits, scales = ternarize_weights(weights, self.granularity)
            self._rewrite(graph, node, name, trits, scales, bias)
            k, n = trits.shape
            self.layers.append(TernaryLayer(name, int(k), int(n), zero_fraction=float((trits == 0).mean())))
        if not self.layers:
            raise UnsupportedModelError(
                "the ternary path found no MatMul / Gemm with a constant 2-D weight to ternarize"
            )
        graph.sort()
        return ir.passes.PassResult(model, modified=True)

    def _rewrite(
        self,
        graph: ir.Graph,
        node: ir.Node,
        name: str,
        trits: np.ndarray,
        scales: np.ndarray,
        bias: ir.Value | None,
    ) -> None:
        x = node.inputs[0]
        assert x is not None
        output = node.outputs[0]
        chain = Chain(f"{name}_ternary")
        weights = add_initializer(graph, f"{chain.prefix}_trits", trits)
        channel_scales = add_initializer(graph, f"{chain.prefix}_scales", scales)
        codes, row_scale = row_codes(graph, chain, x)
        product = chain("MatMulInteger", [codes, weights])
        chain.nodes[-1].meta[TERNARY_KEY] = name
        result = rescaled(chain, product, row_scale, channel_scales, bias)
        graph.insert_after(node, chain.nodes)
        output.replace_all_uses_with(result, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        result.name, result.shape, result.type = output.name, output.shape, output.type
        for value in node.inputs[1:]:
            drop_if_unused(graph, value)
