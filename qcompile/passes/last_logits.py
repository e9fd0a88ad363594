"""A causal LM's prefill computes the logits of the positions it needs: an input that slices the sequence before
the LM head.

A decoder's exported graph computes the logits of every position of its input (``[batch, sequence, vocab]``),
which perplexity needs, but a generation's prefill uses the last position's alone. The LM head is a large share
of a small LM's work (SmolLM2-135M: 28 of its 134 M weights, multiplied over every prompt position) and its
output the largest tensor (a 256-token prompt: 50 MB of float logits). This rewrite slices the LM head's input
along the sequence from a position the caller gives, ``qcompile_logits_from`` (``int64 [1]``): a graph input with
a default of 0 (an initializer of the same name, which onnxruntime lets a caller override), so a caller that
does not feed it gets every position's logits as before. The slice goes before the head's input quantization
(``QuantizeLinear`` / ``DequantizeLinear``, or the per-row quantization of :mod:`qcompile.passes.dynamic_rows`,
whose nodes name the value they read), so onnxruntime still runs the quantized product.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from qcompile.graph import add_initializer
from qcompile.passes.dynamic_rows import ROWS_KEY

logger = logging.getLogger(__name__)

INPUT = "qcompile_logits_from"
HEADS = ("MatMul", "MatMulNBits", "Gemm")
PASSED = ("QuantizeLinear", "DequantizeLinear")  # the head's input quantization, read by it alone


def slice_before_head(model: ir.Model, logits: str) -> str | None:
    """Add :data:`INPUT` and the slice to ``model`` if its output ``logits`` comes from a linear layer over a
    ``[batch, sequence, hidden]`` input; returns the input's name, or None when the graph is left as it was."""
    graph = model.graph
    output = next((value for value in graph.outputs if value.name == logits), None)
    head = output.producer() if output is not None else None
    if output is None or output.shape is None or len(output.shape) != 3 or INPUT in graph.initializers:
        return None
    found = _head_input(graph, head)
    if found is None:
        return None
    source, readers = found
    if source.shape is not None and len(source.shape) != 3:
        return None
    start = add_initializer(graph, INPUT, np.zeros(1, np.int64))
    graph.inputs.append(start)
    end = add_initializer(graph, f"{INPUT}_end", np.array([np.iinfo(np.int64).max], np.int64))
    axis = add_initializer(graph, f"{INPUT}_axis", np.ones(1, np.int64))
    sliced = ir.node("Slice", [source, start, end, axis], name=f"{INPUT}_slice")
    sliced.outputs[0].name = f"{source.name}_from"
    sliced.outputs[0].type = source.type
    graph.insert_before(readers[0], sliced)
    for reader in readers:
        for index, value in enumerate(reader.inputs):
            if value is source:
                reader.replace_input_with(index, sliced.outputs[0])
    logger.info("the LM head reads the sequence from %s on (default 0: every position)", INPUT)
    return INPUT


def _head_input(graph: ir.Graph, head: ir.Node | None) -> tuple[ir.Value, list[ir.Node]] | None:
    """The value the LM head's rows come from, and the nodes of the head that read it."""
    if head is None:
        return None
    rows_of = head.metadata_props.get(ROWS_KEY)
    if rows_of is not None:  # quantized per row at run time: every node of the chain names its source
        chain = [node for node in graph if node.metadata_props.get(ROWS_KEY) == rows_of]
        if sum(node.op_type == "MatMulInteger" for node in chain) != 1:
            return None  # the codes serve other layers too
        readers = [node for node in chain if any(value is not None and value.name == rows_of for value in node.inputs)]
        source = next(value for value in readers[0].inputs if value is not None and value.name == rows_of)
        return source, readers
    if head.op_type not in HEADS or head.inputs[0] is None:
        return None
    reader, source = head, head.inputs[0]
    while source.producer() is not None and source.producer().op_type in PASSED and len(source.uses()) == 1:  # type: ignore[union-attr]
        reader = source.producer()  # type: ignore[assignment]
        source = reader.inputs[0]  # type: ignore[assignment]
    return (source, [reader]) if source is not None else None
