"""Embedding tables as int8 rows: a token's vector is gathered as codes and scaled by its row's scale.

A causal LM's embedding table is its largest tensor (SmolLM2-135M: 49152 x 576, 113 MB in float32, as
much as all its int8 linear layers together), and the QDQ graph leaves it float: ``Gather`` reads rows, it
multiplies nothing. This rewrite stores it as int8 codes with one scale per row (``max|row| / 127``,
symmetric, as llama.cpp's Q8_0 stores ``token_embd`` with one scale per 32 values): ``Gather(codes, ids)``,
``Cast`` to float, times ``Gather(scales, ids)``. Only the gathered rows are ever dequantized. A table that
anything else reads stays float (it would be stored twice).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir import convenience

from qcompile.graph import add_initializer

logger = logging.getLogger(__name__)

MIN_ELEMENTS = 1 << 20  # smaller tables are not worth an extra Gather and Mul per lookup
LIMIT = 127


def quantize_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[V, H]`` float -> (int8 codes ``[V, H]``, float32 scales ``[V, 1]``); an all-zero row gets scale 1."""
    peak = np.abs(table).max(axis=1, keepdims=True).astype(np.float32)
    scales = np.where(peak > 0, peak / np.float32(LIMIT), np.float32(1)).astype(np.float32)
    codes = np.clip(np.rint(table / scales), -LIMIT, LIMIT).astype(np.int8)
    return codes, scales


def quantize_embeddings(model: ir.Model) -> list[dict[str, Any]]:
    """Rewrite every large constant float table read only by axis-0 Gathers; returns what it did, per table."""
    graph = model.graph
    done = []
    for table in list(graph.initializers.values()):
        array = table.const_value.numpy() if table.const_value is not None else None
        if array is None or array.ndim != 2 or array.dtype != np.float32 or array.size < MIN_ELEMENTS:
            continue
        uses = table.uses()
        if not uses or table.is_graph_output() or table.is_graph_input():
            continue
        gathers = [use.node for use in uses]
        if any(
            node.op_type != "Gather" or use.idx != 0 or int(node.attributes.get_int("axis", 0)) != 0
            for node, use in zip(gathers, uses, strict=True)
        ):
            continue
        codes, scales = quantize_rows(array)
        base = str(table.name)
        codes_value = add_initializer(graph, f"{base}_int8_rows", codes)
        scales_value = add_initializer(graph, f"{base}_row_scales", scales)
        for index, node in enumerate(gathers):
            ids = node.inputs[1]
            out = node.outputs[0]
            name = f"{base}_lookup{index}"
            gathered = ir.node("Gather", [codes_value, ids], {"axis": 0}, name=f"{name}_codes")
            widened = ir.node("Cast", [gathered.outputs[0]], {"to": ir.DataType.FLOAT}, name=f"{name}_cast")
            row_scales = ir.node("Gather", [scales_value, ids], {"axis": 0}, name=f"{name}_scales")
            scaled = ir.node(
                "Mul",
                [widened.outputs[0], row_scales.outputs[0]],
                outputs=[ir.Value(name=f"{name}_rows", type=out.type, shape=out.shape)],
                name=f"{name}_scale",
            )
            convenience.replace_nodes_and_values(
                graph, node, [node], [gathered, widened, row_scales, scaled], [out], [scaled.outputs[0]]
            )
        del graph.initializers[base]
        error = float(np.abs(codes * scales - array).max() / max(float(np.abs(array).max()), 1e-30))
        done.append({"table": base, "shape": list(array.shape), "max_error_of_peak": error})
        logger.info("embedding %s %s stored as int8 rows", base, array.shape)
    return done
