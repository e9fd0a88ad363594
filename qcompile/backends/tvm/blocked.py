# mypy: disable-error-code="valid-type"
# (TVMScript annotates buffers as T.Buffer(shape, dtype), which is not a type to mypy.)
"""Linear layers with group-wise weights (int4 codes, or int8 codes per block) as one kernel each: the activations
quantized per block at run time, the weights read packed, two 4-bit codes to a byte.

The integer graph holds such a layer in the form :func:`qcompile.passes.dynamic_rows.blocked_products` writes:
``x [..., K]`` reshaped to ``[..., G, 1, B]`` (``G`` blocks of ``B`` inputs), int8 codes per block
``round(x * 127 / max |x|)`` (stored + 128), ``MatMulInteger`` by the weight's codes ``[G, B, N]``, then ``float(acc)
* w_scale[g, n] * a_scale[g]`` summed over the blocks. :func:`match` finds that chain in the graph and
:func:`blocked_kernel` computes it for each row of ``x``:

- the row's codes ``q`` (int8, ``-127 .. 127``), their sum per block ``S[g]`` and the block scales, once per row;
- per block and ``lanes`` outputs, the flavor's byte dot product (``vpdpbusd``, ``sdot``) of the weight bytes by
  four codes broadcast: 4-bit weights are stored as ``u = c + 8`` (``0 .. 15``), two to a byte (the low nibbles
  of one vector are four inputs of each output, the high nibbles the next four), split by a mask and a shift;
  ``sum u q - 8 S[g] = sum c q`` exactly in int32. ``vpdpbusd`` multiplies unsigned by signed bytes, so the
  weights are its unsigned operand and the codes its signed one; 8-bit weights on it are stored ``c + 128``
  (``- 128 S[g]``), on ``sdot`` (signed by signed) as they are;
- ``float(sum) * w_scale * a_scale`` added to the outputs' float accumulators block after block, in the graph's
  order, then the epilogue.

The weights are read once per row as the file stores them: 4 bits and one float32 scale per block of 32 per weight
(5 bits a weight), against 8 for int8 weights; decoding a token reads them once. Flavors: AVX-512 VNNI,
AVX-VNNI, aarch64 ``sdot``; others (AVX2, Armv8.0) raise :class:`NotLowerable`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from qcompile.backends.integer.reference import node_attributes
from qcompile.backends.integer.rules import reduce_axes
from qcompile.backends.tvm.script import prim_func
from qcompile.backends.tvm.tensors import (
    Anchor,
    Lazy,
    NotLowerable,
    Stored,
    epilogue_env,
    loop_for,
    pack_constants,
    store_index,
)

FLAVORS = ("vnni", "avxvnni", "neon-dot")  # byte dot products of four pairs per int32 lane
LIMIT = 127.0  # codes in -127 .. 127 (dynamic_rows.ACTIVATION_LIMIT)
OFFSET = 128  # the codes' zero point in the graph
TILE = 4  # output vectors accumulated at once: 8 int32 and 4 float32 registers, independent chains


@dataclass(frozen=True)
class Match:
    """One blocked product of the integer graph: what it reads, its constants, and the nodes it stands for."""

    x: str  # the float input [..., K]
    weights: np.ndarray  # int8 codes [G, B, N]
    scales: np.ndarray  # float32 [G, N]
    floor: float  # the least block maximum (the chain's Max)
    quantization: tuple[onnx.NodeProto, ...]  # x's block codes and scales (shared by the products of one x)
    product: tuple[onnx.NodeProto, ...]  # the MatMulInteger and its rescaling, in order; the last one's output
    #                                      is the product's value

    @property
    def output(self) -> str:
        return self.product[-1].output[0]


def _scalar(constants: dict[str, np.ndarray], name: str) -> float | None:
    value = constants.get(name)
    return float(np.asarray(value).reshape(-1)[0]) if value is not None and np.asarray(value).size == 1 else None


def match(
    node: onnx.NodeProto,
    producers: dict[str, onnx.NodeProto],
    uses: dict[str, list[onnx.NodeProto]],
    constants: dict[str, np.ndarray],
    shapes: dict[str, tuple[int, ...]],
) -> Match | None:
    """The blocked product whose ``MatMulInteger`` is ``node``, or None when the graph around it is not that form."""
    weights = constants.get(node.input[1]) if len(node.input) > 1 else None
    if node.op_type != "MatMulInteger" or weights is None or weights.dtype != np.int8 or weights.ndim != 3:
        return None
    blocks, block, outputs = weights.shape
    if len(node.input) < 3 or _scalar(constants, node.input[2]) != OFFSET or any(node.input[3:]):
        return None

    def made_by(name: str, op: str) -> onnx.NodeProto | None:
        producer = producers.get(name)
        return producer if producer is not None and producer.op_type == op else None

    def only_reader(name: str, op: str) -> onnx.NodeProto | None:
        readers = uses.get(name, [])
        return readers[0] if len(readers) == 1 and readers[0].op_type == op else None

    quantize = made_by(node.input[0], "QuantizeLinear")
    if quantize is None or len(quantize.input) < 3 or _scalar(constants, quantize.input[1]) != 1.0:
        return None
    zero = constants.get(quantize.input[2])
    if zero is None or zero.dtype != np.uint8 or _scalar(constants, quantize.input[2]) != OFFSET:
        return None
    scaled = made_by(quantize.input[0], "Mul")
    factor = made_by(scaled.input[1], "Div") if scaled is not None else None
    if factor is None or _scalar(constants, factor.input[0]) != LIMIT:
        return None
    bounded = made_by(factor.input[1], "Max")
    floor = _scalar(constants, bounded.input[1]) if bounded is not None else None
    peak = made_by(bounded.input[0], "ReduceMax") if bounded is not None else None
    if floor is None or peak is None or reduce_axes(peak, constants) != [-1]:
        return None
    if int(node_attributes(peak).get("keepdims", 1)) != 1:
        return None
    magnitude = made_by(peak.input[0], "Abs")
    shaped = made_by(scaled.input[0], "Reshape")  # type: ignore[union-attr]
    if magnitude is None or shaped is None or magnitude.input[0] != shaped.output[0]:
        return None
    x = shaped.input[0]
    x_shape, blocked_shape = shapes.get(x), shapes.get(shaped.output[0])
    if not x_shape or blocked_shape is None or tuple(blocked_shape[-3:]) != (blocks, 1, block):
        return None
    if x_shape[-1] != blocks * block or tuple(blocked_shape[:-3]) != tuple(x_shape[:-1]):
        return None
    # the rescaling: Cast, Mul by the weight's block scales, Mul by the activation's, ReduceSum over the blocks
    cast = only_reader(node.output[0], "Cast")
    by_weight = only_reader(cast.output[0], "Mul") if cast is not None else None
    if cast is None or by_weight is None or node_attributes(cast).get("to") != onnx.TensorProto.FLOAT:
        return None
    scales = constants.get(by_weight.input[1])
    if scales is None or scales.dtype != np.float32 or scales.shape != (blocks, 1, outputs):
        return None
    by_activation = only_reader(by_weight.output[0], "Mul")
    activation_scale = made_by(by_activation.input[1], "Div") if by_activation is not None else None
    if activation_scale is None or bounded is None or activation_scale.input[0] != bounded.output[0]:
        return None
    if _scalar(constants, activation_scale.input[1]) != LIMIT:
        return None
    summed = only_reader(by_activation.output[0], "ReduceSum")  # type: ignore[union-attr]
    rank = len(blocked_shape)
    if summed is None or [a % rank for a in reduce_axes(summed, constants) or [0]] != [rank - 3]:
        return None
    if int(node_attributes(summed).get("keepdims", 1)) != 0:
        return None
    reshaped = only_reader(summed.output[0], "Reshape")
    if reshaped is None or tuple(shapes.get(reshaped.output[0], ())) != (*x_shape[:-1], outputs):
        return None
    return Match(
        x,
        weights,
        scales.reshape(blocks, outputs),
        floor,
        (shaped, magnitude, peak, bounded, factor, scaled, quantize, activation_scale),  # type: ignore[arg-type]
        (node, cast, by_weight, by_activation, summed, reshaped),  # type: ignore[arg-type]
    )


def matches(
    graph: onnx.GraphProto,
    producers: dict[str, onnx.NodeProto],
    uses: dict[str, list[onnx.NodeProto]],
    constants: dict[str, np.ndarray],
    shapes: dict[str, tuple[int, ...]],
    outputs: list[str],
) -> dict[str, Match]:
    """Every blocked product of ``graph`` by its ``MatMulInteger``'s output, where each value of its chain is read by
    the chains alone (the quantization of one ``x`` is shared by the products reading it: Q, K and V)."""
    found = [m for node in graph.node if (m := match(node, producers, uses, constants, shapes)) is not None]
    inside = {id(n) for m in found for n in (*m.quantization, *m.product)}
    kept = {}
    for item in found:
        chain = (*item.quantization, *item.product[:-1])
        if all(
            name not in outputs and all(id(reader) in inside for reader in uses.get(name, []))
            for step in chain
            for name in step.output
        ):
            kept[item.product[0].output[0]] = item
    return kept


def pack(weights: np.ndarray, lanes: int, unsigned: bool) -> tuple[np.ndarray, int, int]:
    """The weight codes ``[G, B, N]`` as the kernel reads them, ``[N / lanes, K / 4 / per_byte, 4 lanes]`` bytes,
    the offset they are stored at, and the codes per byte. 4-bit codes (``-8 .. 7``) go as ``c + 8``, two to a
    byte: in each vector, byte ``4 l + i`` holds input ``8 o + i`` of output ``l`` in its low nibble and ``8 o + 4
    + i`` in its high nibble. Wider codes go one to a byte (vector ``o``: inputs ``4 o .. 4 o + 3``), as ``c +
    128`` for an unsigned-by-signed instruction, else as they are."""
    blocks, block, outputs = weights.shape
    inputs = blocks * block
    codes = weights.reshape(inputs, outputs // lanes, lanes).transpose(1, 0, 2).astype(np.int16)  # [J, K, L]
    if weights.min() >= -8 and weights.max() <= 7:
        nibbles = (codes + 8).astype(np.uint8).reshape(outputs // lanes, inputs // 8, 2, 4, lanes)
        low, high = nibbles[:, :, 0], nibbles[:, :, 1]  # [J, K / 8, 4, L]
        pairs = (low | (high << 4)).transpose(0, 1, 3, 2).reshape(outputs // lanes, inputs // 8, 4 * lanes)
        return np.ascontiguousarray(pairs), 8, 2
    offset = OFFSET if unsigned else 0
    stored = (codes + offset).astype(np.uint8 if unsigned else np.int8).view(np.uint8)
    packed = stored.reshape(outputs // lanes, inputs // 4, 4, lanes).transpose(0, 1, 3, 2)
    return np.ascontiguousarray(packed.reshape(outputs // lanes, inputs // 4, 4 * lanes)), offset, 1


def anchor(source: Stored, item: Match, logical: tuple[int, ...]) -> Anchor:
    """The kernel's anchor: ``x``'s rows, the codes and scales, the block floor."""
    return Anchor("blocked", source, logical, "float32", weights=item.weights, factors=(item.scales,),
                  epsilon=item.floor)  # fmt: skip


def blocked_kernel(value: Lazy, anchor: Anchor, target: Stored, flavor: Any) -> tuple[Any, list[Any]]:
    """The blocked product of each row of ``anchor.input`` (float32 ``[1, M, K]``), epilogue fused (see the module's
    description)."""
    from tvm import tirx
    from tvm.script import tirx as T

    if flavor is None or flavor.name not in FLAVORS:
        raise NotLowerable(f"blocked int4 / int8 products need a byte dot product ({', '.join(FLAVORS)})")
    source, weights = anchor.input, anchor.weights
    assert weights is not None
    (scales,) = anchor.factors
    blocks, block, outputs = weights.shape
    inputs = blocks * block
    lanes = flavor.lanes
    _, _, _, rows = anchor.logical
    if source.shape != (1, rows, inputs) or source.row_map or source.period or source.dtype != "float32":
        raise NotLowerable(f"a blocked product of {source.dtype} {source.shape}, not float32 rows of {inputs}")
    if outputs % lanes or block % 8:
        raise NotLowerable(f"a blocked product of {outputs} outputs in blocks of {block}")
    packed, weight_offset, per_byte = pack(weights, lanes, unsigned=flavor.name != "neon-dot")
    columns = outputs // lanes
    vectors = block // (4 * per_byte)  # vectors of weights per block and output vector
    pairs = block // 8  # steps of 8 inputs: two instructions into two accumulators per output vector
    vector_scales = np.ascontiguousarray(scales.reshape(blocks, columns, lanes).transpose(1, 0, 2))  # [J, G, L]
    tile = min(TILE, columns)
    tiles = -(-columns // tile)
    width = 4 * lanes
    (ints, halves, floats), where = pack_constants(value.constants, outputs)
    floor = anchor.epsilon
    whole = tirx.Ramp(0, 1, lanes)
    everything = tirx.Ramp(0, 1, width)
    outer = loop_for(rows * inputs * outputs)

    def splat(x: Any) -> Any:
        return tirx.Broadcast(x, lanes)

    def column(t: Any, b: int) -> Any:  # (a last partial tile recomputes its last vector: the same values)
        return tirx.min(t * tile + b, columns - 1)

    def codes_word(Q: Any, start: Any) -> Any:
        """Four codes from ``start``, as one int32 word broadcast to every lane, read as the instruction's bytes."""
        word = tirx.reinterpret("int32", Q[tirx.Ramp(start, 1, 4)])
        return tirx.reinterpret(f"int8x{width}", tirx.Broadcast(word, lanes))

    def weight_bytes(Wp: Any, j: Any, g: Any, o: Any, part: int) -> Any:
        """The weight bytes multiplied by the codes from input ``g B + 8 o + 4 part``: the low (``part`` 0) or high
        nibbles of vector ``o`` of the block, or its vector ``2 o + part`` of whole bytes."""
        if per_byte == 1:
            return tirx.reinterpret(f"int8x{width}", Wp[j, g * vectors + 2 * o + part, everything])
        data = Wp[j, g * vectors + o, everything]
        if part == 0:
            data = data & tirx.Broadcast(tirx.const(15, "uint8"), width)
        else:
            data = data >> tirx.Broadcast(tirx.const(4, "uint8"), width)
        return tirx.reinterpret(f"int8x{width}", data)

    def finish(total: Any, K64: Any, K32: Any, KF: Any, j: Any) -> Any:
        at = tirx.Ramp(j * lanes, 1, lanes)
        return value.expression(epilogue_env(total, lambda i: None, (K64, K32, KF), where, at, lanes))

    @prim_func
    def blocked(
        X: T.Buffer(source.shape, "float32"),
        Wp: T.Buffer(packed.shape, "uint8"),
        WS: T.Buffer(vector_scales.shape, "float32"),
        K64: T.Buffer(ints.shape, "int64"),
        K32: T.Buffer(halves.shape, "int32"),
        KF: T.Buffer(floats.shape, "float32"),
        Y: T.Buffer(target.shape, target.dtype),
    ):
        T.func_attr({"tir.noalias": True})
        for r in range(rows):
            Q = T.alloc_buffer((inputs,), "int8", scope="global")
            S = T.alloc_buffer((blocks,), "int32", scope="global")
            A = T.alloc_buffer((blocks,), "float32", scope="global")
            peak = T.alloc_buffer((1,), "float32", scope="global")
            total = T.alloc_buffer((1,), "int32", scope="global")
            for g in range(blocks):
                peak[0] = T.float32(0)
                for k in range(block):
                    peak[0] = T.max(peak[0], T.fabs(X[0, r, g * block + k]))
                bounded = T.max(peak[0], T.float32(floor))
                factor = T.float32(LIMIT) / bounded
                total[0] = 0
                for k in range(block):
                    code = T.Cast("int32", T.nearbyint(X[0, r, g * block + k] * factor))
                    Q[g * block + k] = T.Cast("int8", code)
                    total[0] = total[0] + code
                S[g] = total[0] * weight_offset
                A[g] = bounded / T.float32(LIMIT)
            for t in outer(tiles):
                acc = T.alloc_buffer((2 * tile, lanes), "int32", scope="global")
                out = T.alloc_buffer((tile, lanes), "float32", scope="global")
                for b in T.unroll(tile):
                    out[b, whole] = splat(T.float32(0))
                for g in range(blocks):
                    for b in T.unroll(2 * tile):
                        acc[b, whole] = splat(T.int32(0))
                    for o in T.unroll(pairs):
                        for b in T.unroll(tile):
                            acc[2 * b, whole] = flavor.dot(
                                acc[2 * b, whole],
                                weight_bytes(Wp, column(t, b), g, o, 0),
                                codes_word(Q, g * block + o * 8),
                            )
                            acc[2 * b + 1, whole] = flavor.dot(
                                acc[2 * b + 1, whole],
                                weight_bytes(Wp, column(t, b), g, o, 1),
                                codes_word(Q, g * block + o * 8 + 4),
                            )
                    for b in T.unroll(tile):
                        out[b, whole] = out[b, whole] + T.Cast(
                            f"float32x{lanes}", acc[2 * b, whole] + acc[2 * b + 1, whole] - splat(S[g])
                        ) * WS[column(t, b), g, whole] * splat(A[g])
                for b in T.unroll(tile):
                    Y[store_index(target, 0, r, tirx.Ramp(column(t, b) * lanes, 1, lanes))] = finish(
                        out[b, whole], K64, K32, KF, column(t, b)
                    )

    return blocked, [source, packed, vector_scales, ints, halves, floats]
