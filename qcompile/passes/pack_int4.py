"""Store group-wise 4-bit weights packed, two codes per byte, where onnxruntime computes from them packed
(and group-wise int8 weights as they are, one code per byte, by the same kernel).

The QDQ graph holds a block-quantized weight (``--bits 4 --weight-block N``) as int8 codes in [-8, 7], one
``DequantizeLinear`` row per (output channel, block) and a ``Reshape`` (and ``Transpose``) back to the
weight: one byte per weight, dequantized to float when onnxruntime loads the model. This pass replaces each
``MatMul`` reading such a weight by onnxruntime's ``com.microsoft.MatMulNBits``: the codes ``c`` stored as
``c + 8`` in 4 bits (zero point 8, its default), low nibble first along the input axis, ``[N, blocks,
N / 2]`` bytes, with the same block scales (stored as one 8-bit code per block on a logarithmic grid below
its row's largest scale, which the quantizer rounds them to: :func:`stored_scales`); the weight never exists
in float, and the file holds half a byte per weight and one per block of them. The product is the same:
``(c + 8 - 8) * scale`` is the dequantized weight.

With ``accuracy_level`` 4 onnxruntime's CPU kernel (MLAS) multiplies int8 activations, quantized per row
block of the input at run time, by the unpacked 4-bit codes in int32: the activation, already on the
8-bit grid of its static ``QuantizeLinear`` scale, is rounded once more, to that block's own int8 grid. With
per-row activations (:mod:`qcompile.passes.dynamic_rows`) the static ``QuantizeLinear`` in front of such a layer
goes (:func:`kernel_quantized_inputs`): the kernel rounds the float rows once, per block, as llama.cpp's Q8
activations are.
Other runtimes without the contrib op cannot run the file; the float reference and the TVM library are
built from the unpacked graph.

A blocked weight with codes outside [-8, 7] (a layer that took int8 weights because int4 cost it too much)
becomes an 8-bit ``MatMulNBits`` (``c + 128``, zero point 128): left as ``DequantizeLinear`` rows,
onnxruntime would dequantize it on every run (its constant folding keeps ``DequantizeLinear``).

Conditions: a 2-D weight ``[K, N]`` of a ``MatMul``, blocks of a power of two >= 16 along ``K`` (onnxruntime's
kernel).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from onnx_ir import convenience

from qcompile.graph import add_initializer, drop_if_unused
from qcompile.passes.quant_spec import SCALE_TABLE, scale_codes

logger = logging.getLogger(__name__)

DOMAIN = "com.microsoft"
ACCURACY_LEVEL = 4  # int8 activations x int4 weights, int32 accumulation (MLAS's fastest CPU path)
LOW, HIGH = -8, 7  # 4-bit codes; wider blocked codes are stored as 8 bits
SCALE_TABLE_NAME = "qcompile_block_scale_table"


def _blocked_weight(value: ir.Value) -> tuple[np.ndarray, np.ndarray, list[ir.Node]] | None:
    """(codes ``[N, K]``, scales ``[N * blocks]``, the nodes that rebuild the weight) of a block-quantized
    ``[K, N]`` weight: ``DequantizeLinear`` of ``[N * blocks, block]`` rows -> ``Reshape [N, K]`` ->
    ``Transpose``; None for anything else."""
    transpose = value.producer()
    if transpose is None or transpose.op_type != "Transpose" or len(value.uses()) != 1:
        return None
    perm = transpose.attributes.get("perm")
    if perm is None or list(perm.as_ints()) != [1, 0]:
        return None
    reshape = transpose.inputs[0].producer() if transpose.inputs[0] is not None else None
    if reshape is None or reshape.op_type != "Reshape" or reshape.inputs[1] is None:
        return None
    shape = reshape.inputs[1].const_value
    dq = reshape.inputs[0].producer() if reshape.inputs[0] is not None else None
    if shape is None or dq is None or dq.op_type != "DequantizeLinear" or len(dq.inputs) < 2:
        return None
    codes_value, scales_value = dq.inputs[0], dq.inputs[1]
    zero_value = dq.inputs[2] if len(dq.inputs) > 2 else None
    if codes_value is None or codes_value.const_value is None or scales_value is None:
        return None
    if scales_value.const_value is None:
        return None
    codes, scales = codes_value.const_value.numpy(), scales_value.const_value.numpy()
    outputs, inputs = (int(size) for size in shape.numpy())
    if codes.dtype != np.int8 or codes.ndim != 2 or scales.shape != (codes.shape[0],):
        return None
    if zero_value is not None and (zero_value.const_value is None or zero_value.const_value.numpy().any()):
        return None
    if codes.size != outputs * inputs:
        return None
    return codes.reshape(outputs, inputs), scales.astype(np.float32), [dq, reshape, transpose]


def bits_of(codes: np.ndarray) -> int:
    return 4 if codes.min() >= LOW and codes.max() <= HIGH else 8


def pack(codes: np.ndarray, block: int) -> np.ndarray:
    """``[N, K]`` codes -> ``[N, K / block, block * bits / 8]`` bytes: codes in [-8, 7] as ``c + 8``, two to a
    byte (code ``2i`` in the low nibble); others as ``c + 128``, one to a byte."""
    if bits_of(codes) == 8:
        return (codes.astype(np.int16) + 128).astype(np.uint8).reshape(codes.shape[0], -1, block)
    nibbles = (codes.astype(np.int16) - LOW).astype(np.uint8)
    pairs = nibbles.reshape(codes.shape[0], codes.shape[1] // block, block // 2, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)


def unpack(packed: np.ndarray, bits: int = 4) -> np.ndarray:
    """The inverse of :func:`pack`: ``[N, blocks, block * bits / 8]`` bytes -> ``[N, K]`` int8 codes."""
    if bits == 8:
        return (packed.astype(np.int16) - 128).astype(np.int8).reshape(packed.shape[0], -1)
    low, high = (packed & 0xF).astype(np.int16), (packed >> 4).astype(np.int16)
    return (np.stack([low, high], axis=-1).reshape(packed.shape[0], -1) + LOW).astype(np.int8)


def stored_scales(graph: ir.Graph, name: str, scales: np.ndarray, rows: int) -> tuple[ir.Value, list[ir.Node]]:
    """Block scales (``rows`` output channels' worth, in any shape) as the file stores them, and the float32
    value the kernel reads. On the quantizer's grid (:func:`qcompile.passes.quant_spec.on_scale_grid`, as every
    blocked weight's are): uint8 codes and one float32 peak per row, read back as ``Gather(table, codes) *
    peaks`` (the codes widened to int32 indices; the 1 KB table stored once; onnxruntime folds these constant
    ops when it loads the file, since the kernels take float32 scales). Otherwise float32 as they are. Returns
    the value and the nodes that compute it (to insert before its reader)."""
    shape = scales.shape
    grid = scales.astype(np.float32).reshape(rows, -1)
    codes, peaks = scale_codes(grid)
    if not np.array_equal(SCALE_TABLE[codes] * peaks, grid):
        return add_initializer(graph, name, scales.astype(np.float32)), []
    table = graph.initializers.get(SCALE_TABLE_NAME)
    if table is None:
        table = add_initializer(graph, SCALE_TABLE_NAME, SCALE_TABLE)
    widened = ir.node("Cast", [add_initializer(graph, f"{name}_codes", codes)], {"to": ir.DataType.INT32})
    looked_up = ir.node("Gather", [table, widened.outputs[0]], {"axis": 0})
    scaled = ir.node("Mul", [looked_up.outputs[0], add_initializer(graph, f"{name}_peaks", peaks)])
    shaped = ir.node("Reshape", [scaled.outputs[0], add_initializer(graph, f"{name}_shape", np.array(shape))])
    nodes = [widened, looked_up, scaled, shaped]
    for index, node in enumerate(nodes):
        node.name = f"{name}_{node.op_type.lower()}{index}"
    value = nodes[-1].outputs[0]
    value.name, value.shape, value.type = name, ir.Shape(shape), ir.TensorType(ir.DataType.FLOAT)
    return value, nodes


def remove_rebuild(graph: ir.Graph, rebuilt: list[ir.Node]) -> None:
    """A blocked weight's float rebuild (:func:`_blocked_weight`'s nodes), where nothing reads it any more, with
    the constants only it read."""
    for step in reversed(rebuilt):
        if step.graph is graph and not any(output.uses() for output in step.outputs):
            inputs = list(step.inputs)
            graph.remove(step, safe=True)
            for value in inputs:
                drop_if_unused(graph, value)


def pack_int4_weights(model: ir.Model) -> dict[int, int]:
    """Rewrite every MatMul reading a blocked weight as MatMulNBits; returns how many, by code bits."""
    graph = model.graph
    count = {4: 0, 8: 0}
    for node in list(graph):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or node.inputs[1] is None:
            continue
        found = _blocked_weight(node.inputs[1])
        if found is None:
            continue
        codes, scales, rebuilt = found
        outputs, inputs = codes.shape
        block = inputs * outputs // scales.size
        if block < 16 or block & (block - 1) or inputs % block:
            continue
        base = str(node.name or node.outputs[0].name)
        bits = bits_of(codes)
        packed = add_initializer(graph, f"{base}_int{bits}", pack(codes, block))
        block_scales, computed = stored_scales(graph, f"{base}_int{bits}_scales", scales, outputs)
        for step in computed:
            graph.insert_before(node, step)
        replacement = ir.node(
            "MatMulNBits",
            [node.inputs[0], packed, block_scales],
            {"K": inputs, "N": outputs, "bits": bits, "block_size": block, "accuracy_level": ACCURACY_LEVEL},
            domain=DOMAIN,
            outputs=[ir.Value(name=f"{base}_int4_out", type=node.outputs[0].type, shape=node.outputs[0].shape)],
            name=f"{base}_MatMulNBits",
        )
        # a graph output (an LM head's logits) keeps its name
        convenience.replace_nodes_and_values(
            graph, node, [node], [replacement], [node.outputs[0]], [replacement.outputs[0]]
        )
        remove_rebuild(graph, rebuilt)
        count[bits] += 1
    if any(count.values()):
        model.opset_imports.setdefault(DOMAIN, 1)
        for name in [name for name, value in graph.initializers.items() if not value.uses()]:
            del graph.initializers[name]
    logger.info("packed %d 4-bit and %d 8-bit blocked weights into MatMulNBits", count[4], count[8])
    return count


def kernel_quantized_inputs(model: ir.Model) -> int:
    """Let every ``MatMulNBits`` quantize its own input at run time: a static ``QuantizeLinear`` ->
    ``DequantizeLinear`` in front of it, read by such layers alone, is bypassed, so the kernel (``accuracy_level``
    4) rounds the float rows to int8 per block of its inputs once, with each block's own scale, instead of
    rounding the static grid's values again. Returns how many layers read their float input now."""
    graph = model.graph
    bypassed = 0
    for node in list(graph):
        if node.op_type != "MatMulNBits" or node.domain != DOMAIN or node.inputs[0] is None:
            continue
        dq = node.inputs[0].producer()
        quantized = dq.inputs[0] if dq is not None and dq.op_type == "DequantizeLinear" else None
        q = quantized.producer() if quantized is not None else None
        if q is None or q.op_type != "QuantizeLinear" or q.inputs[0] is None or len(q.outputs[0].uses()) != 1:
            continue
        if any(use.node.op_type != "MatMulNBits" for use in dq.outputs[0].uses()):  # type: ignore[union-attr]
            continue
        for use in list(dq.outputs[0].uses()):  # type: ignore[union-attr]
            use.node.replace_input_with(use.idx, q.inputs[0])
            bypassed += 1
        graph.remove([dq, q], safe=True)  # type: ignore[list-item]
        for value in (*q.inputs[1:], *dq.inputs[1:]):  # type: ignore[union-attr]
            drop_if_unused(graph, value)
    return bypassed
