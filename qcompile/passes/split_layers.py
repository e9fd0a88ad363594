"""SplitQuant layer splitting: one layer becomes three whose weights are the low, middle and high clusters of
the original values, summed after, so that each part gets its own quantization scale.

A layer ``y = x W + b`` equals ``x W_low + x W_mid + (x W_high + b)`` when ``W = W_low + W_mid + W_high`` and
each part holds the weights of one cluster (zeros elsewhere). The clusters come from 1-D k-means (k = 3) over
the layer's weight values (Lloyd's iterations from the 1/6, 1/2 and 5/6 quantiles). The middle part, which
holds most weights in a narrow range, is then quantized with a fine step instead of one stretched by the
outliers, and the outlier parts keep their resolution too (Song et al., "SplitQuant", 2025). The bias stays
with the high part.

Exact in float up to the order of the final sums (measured 1e-7 relative on the digits CNN). The model gets
two more Conv / Gemm / MatMul nodes and two Adds per split layer. Each part's weights are quantized like any
layer's, with their own scales; the parts' outputs are not re-quantized: they are summed as accumulators
(int32 on an integer device; in float between the parts' DequantizeLinear and the sum's quantization in the
QDQ graph), so that parts whose outputs partly cancel do not each need a wide activation range.
After this pass, every split layer's three parts read the same input and their sum replaces its output.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompile.graph import add_initializer, is_constant
from qcompile.passes.annotate import require_unannotated
from qcompile.passes.quant_spec import SPLIT_SUM_KEY

logger = logging.getLogger(__name__)

PARTS = ("low", "mid", "high")


def kmeans_1d(values: np.ndarray, iterations: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Three cluster centres of ``values`` (sorted) and each value's cluster index (0 low, 1 mid, 2 high).

    Lloyd's iterations on the sorted values: a cluster is a run of them between two edges, so its size and sum
    come from two binary searches and the prefix sums, and an iteration costs nothing next to the one sort (an
    LM head's 28 M weights: 43 -> 8 s, the same labels)."""
    flat = values.ravel().astype(np.float64)
    ordered = np.sort(flat)
    prefix = np.concatenate([[0.0], np.cumsum(ordered)])
    centres = np.quantile(ordered, [1 / 6, 1 / 2, 5 / 6])
    edges = (centres[:-1] + centres[1:]) / 2
    for _ in range(iterations):
        edges = (centres[:-1] + centres[1:]) / 2
        # a value equal to an edge joins the lower cluster
        bounds = np.concatenate([[0], np.searchsorted(ordered, edges, side="right"), [ordered.size]])
        counts = np.diff(bounds)
        sums = prefix[bounds[1:]] - prefix[bounds[:-1]]
        updated = np.where(counts > 0, sums / np.maximum(counts, 1), centres)
        if np.allclose(updated, centres):
            break
        centres = np.sort(updated)
    return centres, np.searchsorted(edges, flat).reshape(values.shape)


@dataclass
class Split:
    layer: str
    centres: list[float]
    counts: list[int]


def _eligible(node: ir.Node) -> bool:
    if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2 or node.inputs[1] is None:
        return False
    weight = node.inputs[1]
    return is_constant(weight) and weight.const_value is not None and weight.const_value.size >= 3


class SplitLayersPass(ir.passes.InPlacePass):
    """After this pass, every Conv / Gemm / MatMul with a constant weight is three layers summed by two Adds."""

    def requires(self, model: ir.Model) -> None:
        require_unannotated(model, "SplitLayersPass")

    def __init__(self) -> None:
        super().__init__()
        self.splits: list[Split] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.splits = []
        for node in list(model.graph):
            if _eligible(node):
                self._split(model.graph, node)
        logger.info("split %d layers into three", len(self.splits))
        return ir.passes.PassResult(model, modified=bool(self.splits))

    def _split(self, graph: ir.Graph, node: ir.Node) -> None:
        weight = node.inputs[1].const_value.numpy()  # type: ignore[union-attr]
        centres, labels = kmeans_1d(weight)
        output = node.outputs[0]
        parts: list[ir.Value] = []
        for index, part in enumerate(PARTS):
            values = np.where(labels == index, weight, 0).astype(weight.dtype)
            name = f"{node.name}_{part}"
            constant = add_initializer(graph, f"{name}_weight", values)
            inputs = [node.inputs[0], constant]
            if part == "high":
                inputs += list(node.inputs[2:])  # the bias stays with one part
            result = ir.Value(name=f"{name}_out", shape=output.shape, type=output.type)
            graph.insert_before(
                node,
                ir.Node(
                    node.domain,
                    node.op_type,
                    inputs,
                    attributes=list(node.attributes.values()),
                    outputs=[result],
                    name=name,
                ),
            )
            parts.append(result)
        partial = ir.Value(name=f"{node.name}_low_mid", shape=output.shape, type=output.type)
        first = ir.Node("", "Add", [parts[0], parts[1]], outputs=[partial], name=f"{node.name}_sum_low_mid")
        graph.insert_before(node, first)
        total = ir.Value(name=f"{node.name}_sum", shape=output.shape, type=output.type)
        second = ir.Node("", "Add", [partial, parts[2]], outputs=[total], name=f"{node.name}_sum")
        graph.insert_before(node, second)
        for adder in (first, second):
            adder.metadata_props[SPLIT_SUM_KEY] = str(node.name)
        old_weight = node.inputs[1]
        if output.is_graph_output():
            original = str(output.name)
            output.name = f"{original}_unsplit"
            total.name = original  # the graph's output keeps its name
        output.replace_all_uses_with(total, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        if old_weight is not None and not old_weight.uses() and old_weight.name in graph.initializers:
            graph.initializers.pop(str(old_weight.name))
        counts = [int(np.sum(labels == k)) for k in range(3)]
        self.splits.append(Split(str(node.name), [float(c) for c in centres], counts))
