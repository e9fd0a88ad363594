"""Embedding tables as int8 rows: a token's vector is gathered as codes and scaled by its row's scale.

A causal LM's embedding table is its largest tensor (SmolLM2-135M: 49152 x 576, 113 MB in float32, as
much as all its int8 linear layers together), and the QDQ graph leaves it float: ``Gather`` reads rows, it
multiplies nothing. This rewrite stores it as int8 codes with one scale per row (``max|row| / 127``,
symmetric, as llama.cpp's Q8_0 stores ``token_embd`` with one scale per 32 values): ``Gather(codes, ids)``,
``Cast`` to float, times ``Gather(scales, ids)``. Only the gathered rows are ever dequantized. A table that
anything else reads stays float (it would be stored twice).

Where the model's linear layers take group-wise 4-bit weights (``--bits 4 --weight-block N``), the table
takes the same format: 4-bit codes with one scale per block of ``N`` values of a row (stored as those
weights' scales are), packed two to a byte and read by onnxruntime's ``com.microsoft.GatherBlockQuantized``
(as llama.cpp's Q4_0 stores ``token_embd``): SmolLM2-135M's table goes from 28 MB as int8 rows to 15 MB.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir import convenience

from qcompile.graph import add_initializer
from qcompile.passes import pack_int4
from qcompile.passes.quant_spec import WEIGHT_FORMATS

logger = logging.getLogger(__name__)

MIN_ELEMENTS = 1 << 20  # smaller tables are not worth an extra Gather and Mul per lookup
LIMIT = 127


def quantize_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[V, H]`` float -> (int8 codes ``[V, H]``, float32 scales ``[V, 1]``); an all-zero row gets scale 1."""
    peak = np.abs(table).max(axis=1, keepdims=True).astype(np.float32)
    scales = np.where(peak > 0, peak / np.float32(LIMIT), np.float32(1)).astype(np.float32)
    codes = np.clip(np.rint(table / scales), -LIMIT, LIMIT).astype(np.int8)
    return codes, scales


def _blocked_lookup(
    graph: ir.Graph, base: str, table: np.ndarray, block: int
) -> tuple[ir.Value, ir.Value, list[ir.Node], float]:
    """The table as 4-bit codes in blocks of ``block`` values of a row, one scale per block (the format and
    rounding of the model's group-wise int4 weights), packed two to a byte as
    ``com.microsoft.GatherBlockQuantized`` reads them; returns (packed codes, scales, the nodes that compute the
    scales from what is stored, the largest error relative to the table's peak)."""
    spec = dataclasses.replace(WEIGHT_FORMATS["int4"], axis=0, block_size=block)
    scales = spec.weight_scales(table)  # [V, H / block]
    codes = spec.quantize(table, scales)
    packed = pack_int4.pack(codes, block).reshape(table.shape[0], table.shape[1] // 2)
    error = float(np.abs(spec.dequantize(codes, scales) - table).max() / max(float(np.abs(table).max()), 1e-30))
    scales_value, computed = pack_int4.stored_scales(graph, f"{base}_block_scales", scales, table.shape[0])
    return add_initializer(graph, f"{base}_int4_rows", packed), scales_value, computed, error


def blocks_fit(table_shape: tuple[int, ...], block: int | None) -> bool:
    """Whether a ``[V, H]`` table takes 4-bit blocks of ``block`` (onnxruntime's kernel: a power of two >= 16)."""
    return block is not None and block >= 16 and not block & (block - 1) and table_shape[-1] % block == 0


def quantize_embeddings(model: ir.Model, block: int | None = None) -> list[dict[str, Any]]:
    """Rewrite every large constant float table read only by axis-0 Gathers; returns what it did, per table.

    With ``block`` (a model whose linear layers take group-wise int4 weights), a table whose rows blocks of that
    size tile is stored as 4-bit codes with one scale per block, as those weights are, and read by
    ``com.microsoft.GatherBlockQuantized``; int8 rows otherwise."""
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
        base = str(table.name)
        if blocks_fit(array.shape, block):
            assert block is not None
            packed, block_scales, computed, error = _blocked_lookup(graph, base, array, block)
            first = next(iter(graph))
            for step in computed:
                graph.insert_before(first, step)
            for index, node in enumerate(gathers):
                lookup = ir.node(
                    "GatherBlockQuantized",
                    [packed, node.inputs[1], block_scales],
                    {"bits": 4, "block_size": block, "gather_axis": 0, "quantize_axis": 1},
                    domain=pack_int4.DOMAIN,
                    outputs=[ir.Value(name=f"{base}_lookup{index}_rows", type=node.outputs[0].type)],
                    name=f"{base}_lookup{index}",
                )
                lookup.outputs[0].shape = node.outputs[0].shape
                convenience.replace_nodes_and_values(graph, node, [node], [lookup], [node.outputs[0]], lookup.outputs)
            model.opset_imports.setdefault(pack_int4.DOMAIN, 1)
            del graph.initializers[base]
            done.append(
                {
                    "table": base,
                    "shape": list(array.shape),
                    "format": f"int4, blocks of {block}",
                    "max_error_of_peak": error,
                }
            )
            logger.info("embedding %s %s stored as 4-bit blocks of %d", base, array.shape, block)
            continue
        codes, scales = quantize_rows(array)
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
        done.append({"table": base, "shape": list(array.shape), "format": "int8 rows", "max_error_of_peak": error})
        logger.info("embedding %s %s stored as int8 rows", base, array.shape)
    return done
