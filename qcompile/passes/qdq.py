"""QDQ insertion: turn QuantSpec annotations into QuantizeLinear / DequantizeLinear nodes.

After this pass, no value carries an unapplied QuantSpec and no float weight survives beside its integer
copy: every annotated weight is an integer initializer read through DequantizeLinear (per-channel
``axis`` as annotated), the bias of a quantized Conv / Gemm is int32 with scale
``s_input * s_weight[channel]`` (so an integer kernel adds it to the int32 accumulator unchanged), and
every annotated activation ``v`` is followed by ``QuantizeLinear -> DequantizeLinear`` whose output
replaces ``v`` for all of ``v``'s consumers.

This is the standard form onnxruntime fuses into QLinearConv / QLinearMatMul / QLinearAdd kernels.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import TopologicalSortPass

from qcompile.graph import add_initializer, drop_if_unused, layer_name
from qcompile.passes.annotate import require_annotated
from qcompile.passes.quant_spec import RANGE_KEY, SCALES_KEY, SPEC_KEY, QuantSpec, on_scale_grid

logger = logging.getLogger(__name__)

# Bias codes stay below 2**30, leaving int32 headroom for the accumulator they are added to.
INT32_BIAS_LIMIT = 2**30


def activation_params(value: ir.Value) -> tuple[np.float32, np.integer]:
    spec: QuantSpec = value.meta[SPEC_KEY]
    low, high = value.meta[RANGE_KEY]
    return spec.params_from_range(low, high)


def _quantizable_bias(node: ir.Node) -> tuple[np.ndarray, np.float32] | None:
    """A Conv / Gemm's constant bias and the scale of its quantized input, when the bias can go int32.

    The int32 bias has scale ``s_input * s_weight``; a channel whose weights are (near) zero gets a tiny
    weight scale and ``bias / (s_input * s_weight)`` would overflow, so the weight scale is floored at
    ``|bias| / (s_input * INT32_BIAS_LIMIT)``, which costs nothing (that channel's codes stay 0).
    """
    if node.op_type not in ("Conv", "Gemm") or len(node.inputs) < 3 or node.inputs[2] is None:
        return None
    bias, activation = node.inputs[2], node.inputs[0]
    if bias.const_value is None or activation is None or SPEC_KEY not in activation.meta:
        return None
    return bias.const_value.numpy(), activation_params(activation)[0]


SIXTEEN_BIT_OPSET = 21


class QDQPass(ir.passes.InPlacePass):
    """After this pass, every annotated value is quantized in the graph and no annotation is pending."""

    def requires(self, model: ir.Model) -> None:
        require_annotated(model, "QDQPass")

    def ensures(self, model: ir.Model) -> None:
        initializers = model.graph.initializers
        dead = [
            name
            for name, value in initializers.items()
            if f"{name}_quantized" in initializers and not value.uses() and not value.is_graph_output()
        ]
        if dead:
            raise ir.passes.PostconditionError(f"float weights left beside their integer copies: {dead[:5]}")
        for node in model.graph:
            for value in (*node.inputs, *node.outputs):
                if value is not None and SPEC_KEY in value.meta:
                    raise ir.passes.PostconditionError(f"value '{value.name}' still carries an unapplied QuantSpec")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            weight = node.inputs[1] if len(node.inputs) > 1 else None
            if weight is not None and SPEC_KEY in weight.meta and weight.const_value is not None:
                self._quantize_weight(graph, node, weight)
                modified = True
        annotated = [
            value
            for value in (*graph.inputs, *(out for node in graph for out in node.outputs))
            if SPEC_KEY in value.meta
        ]
        for value in annotated:
            if value.meta[SPEC_KEY].storage_dtype.itemsize > 1:
                # 16-bit QuantizeLinear / DequantizeLinear came with opset 21 (same semantics otherwise).
                model.opset_imports[""] = max(model.opset_imports.get("", 1), SIXTEEN_BIT_OPSET)
            self._insert_qdq(graph, value)
            modified = True
        TopologicalSortPass()(model)
        return ir.passes.PassResult(model, modified=modified)

    def _quantize_weight(self, graph: ir.Graph, node: ir.Node, weight: ir.Value) -> None:
        spec: QuantSpec = weight.meta.pop(SPEC_KEY)
        array = weight.const_value.numpy()  # type: ignore[union-attr]
        chosen = weight.meta.get(SCALES_KEY)
        bias = _quantizable_bias(node)
        floor = 0.0 if bias is None else np.abs(bias[0]) / (float(bias[1]) * INT32_BIAS_LIMIT)
        blocked = spec.block_size is not None  # AnnotatePass sets a block size only where blocks tile the weight
        scales = spec.weight_scales(array) if chosen is None else chosen
        if blocked and np.ndim(floor):
            floor = np.reshape(floor, (-1, 1))  # one floor per output channel, over its blocks
        scales = np.maximum(scales, floor).astype(np.float32)
        if blocked:
            scales = on_scale_grid(scales)  # what the packed file stores
        codes = spec.quantize(array, scales)
        base = str(weight.name)
        dequantized = ir.Value(name=f"{base}_dequantized", shape=weight.shape, type=weight.type)
        if blocked:
            # Opset 18 DequantizeLinear takes one scale per slice of one axis: lay the codes out as one row
            # per (output channel, input block), dequantize per row, then reshape back to the weight.
            codes, flat_scales = spec.blocks(codes), scales.reshape(-1)
        else:
            flat_scales = scales
        zero = np.zeros(flat_scales.shape, dtype=spec.storage_dtype)
        rows = ir.Value(name=f"{base}_rows", type=weight.type) if blocked else dequantized
        dq = ir.node(
            "DequantizeLinear",
            [
                add_initializer(graph, f"{base}_quantized", codes),
                add_initializer(graph, f"{base}_scale", flat_scales),
                add_initializer(graph, f"{base}_zero_point", zero),
            ],
            {"axis": 0 if blocked else spec.axis} if spec.axis is not None and flat_scales.ndim else {},
            outputs=[rows],
            name=f"{base}_DequantizeLinear",
        )
        inserted = [dq]
        if blocked:
            axis = int(spec.axis or 0)
            outputs_first = (array.shape[axis], array.shape[1 - axis])
            shape = add_initializer(graph, f"{base}_shape", np.array(outputs_first, np.int64))
            if spec.axis == 0:
                inserted.append(ir.node("Reshape", [rows, shape], outputs=[dequantized], name=f"{base}_Reshape"))
            else:
                matrix = ir.Value(name=f"{base}_matrix", type=weight.type)
                inserted.append(ir.node("Reshape", [rows, shape], outputs=[matrix], name=f"{base}_Reshape"))
                inserted.append(
                    ir.node("Transpose", [matrix], {"perm": [1, 0]}, outputs=[dequantized], name=f"{base}_Transpose")
                )
        for step in inserted:
            graph.insert_before(node, step)
        for use in list(weight.uses()):
            use.node.replace_input_with(use.idx, dequantized)
        drop_if_unused(graph, weight)
        if bias is not None:
            self._quantize_bias(graph, node, scales.max(axis=1) if blocked else scales, *bias)

    def _quantize_bias(
        self, graph: ir.Graph, node: ir.Node, weight_scales: np.ndarray, bias: np.ndarray, input_scale: np.float32
    ) -> None:
        values = bias.astype(np.float64)
        if values.ndim != 1 or (values.shape[0] != np.size(weight_scales) and np.size(weight_scales) != 1):
            return
        scales = (np.float64(input_scale) * np.broadcast_to(weight_scales, values.shape)).astype(np.float32)
        codes = np.clip(np.rint(values / scales), -(2**31) + 1, 2**31 - 1).astype(np.int32)
        base = f"{layer_name(node)}_bias"
        dequantized = ir.Value(name=f"{base}_dequantized", shape=node.inputs[2].shape, type=node.inputs[2].type)  # type: ignore[union-attr]
        dq = ir.node(
            "DequantizeLinear",
            [
                add_initializer(graph, f"{base}_quantized", codes),
                add_initializer(graph, f"{base}_scale", scales),
                add_initializer(graph, f"{base}_zero_point", np.zeros(scales.shape, np.int32)),
            ],
            {"axis": 0},
            outputs=[dequantized],
            name=f"{base}_DequantizeLinear",
        )
        graph.insert_before(node, dq)
        replaced = node.inputs[2]
        node.replace_input_with(2, dequantized)
        drop_if_unused(graph, replaced)

    def _insert_qdq(self, graph: ir.Graph, value: ir.Value) -> None:
        spec: QuantSpec = value.meta[SPEC_KEY]
        consumers = list(value.uses())
        scale, zero_point = activation_params(value)
        base = str(value.name)
        scale_value = add_initializer(graph, f"{base}_scale", np.array(scale, dtype=np.float32))
        zero_value = add_initializer(graph, f"{base}_zero_point", np.array(zero_point, dtype=spec.storage_dtype))
        quantized = ir.Value(
            name=f"{base}_quantized", shape=value.shape, type=ir.TensorType(ir.DataType.from_numpy(spec.storage_dtype))
        )
        dequantized = ir.Value(name=f"{base}_dequantized", shape=value.shape, type=value.type)
        q = ir.node(
            "QuantizeLinear", [value, scale_value, zero_value], outputs=[quantized], name=f"{base}_QuantizeLinear"
        )
        dq = ir.node(
            "DequantizeLinear",
            [quantized, scale_value, zero_value],
            outputs=[dequantized],
            name=f"{base}_DequantizeLinear",
        )
        inserted = [q, dq]
        storage = np.iinfo(spec.storage_dtype)
        if (spec.qmin, spec.qmax) != (storage.min, storage.max):
            # Codes narrower than their storage (uint4 in uint8): QuantizeLinear saturates to the storage
            # range only, so a Clip on the codes keeps them in qmin..qmax.
            clamped = ir.Value(name=f"{base}_clamped", shape=value.shape, type=quantized.type)
            bounds = [
                add_initializer(graph, f"{base}_{which}", np.array(bound, dtype=spec.storage_dtype))
                for which, bound in (("qmin", spec.qmin), ("qmax", spec.qmax))
            ]
            clip = ir.node("Clip", [quantized, *bounds], outputs=[clamped], name=f"{base}_ClipCodes")
            dq.replace_input_with(0, clamped)
            inserted = [q, clip, dq]
        for use in consumers:
            use.node.replace_input_with(use.idx, dequantized)
        producer = value.producer()
        if producer is not None:
            graph.insert_after(producer, inserted)
        else:
            graph.insert_before(next(iter(graph)), inserted)
        del value.meta[SPEC_KEY]
