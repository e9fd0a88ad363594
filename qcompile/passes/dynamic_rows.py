"""Activations quantized per row at run time: each row (a token) gets its own scale, ``max |x| / 127``.

A static per-tensor scale serves every token of every prompt with one range chosen at calibration. In an LLM
the tokens' ranges differ by orders of magnitude (the first token, the delimiters), so most tokens use a few of
the 255 levels. Measured on SmolLM2-135M W8A8 (rotation + SmoothQuant, 1022 tokens of text, float perplexity
14.24): static per-tensor input scales on the linear layers give 15.48 (+8.7 %); the same layers with per-row
scales 14.47 (+1.6 %); int8 weights alone 14.30. llama.cpp's Q8_0 quantizes its activations the same way (per
block of 32 at run time).

:class:`DynamicActivationsPass` rewrites, after QDQ insertion, every activation quantization read only by linear
layers with a constant int8 weight (``MatMul``, ``Gemm``; per-channel or per-tensor weight scales, not blocked):

- the row maximum ``m = max(max |x|, 2**-100)`` over the last axis (``ReduceMax`` of ``Abs``), the row scale
  ``s = m / 127``;
- codes ``q = QuantizeLinear(x * (127 / m), 1, 128)``: ``round(x / s) + 128`` as uint8, within 1..255, in one
  op that rounds, saturates and casts (zero point 128: symmetric codes in the layout the int8 kernels read,
  uint8 x int8). Against ``Round(Div(x, s)) + 128`` then ``Cast``, three passes over the row fewer: SmolLM2-135M
  W8A8's 256-token prefill on onnxruntime 276 -> 257 ms;
- ``MatMulInteger(q, W, 128)`` in int32, then ``float(acc) * w_scale * s (+ bias)``, in the order onnxruntime's
  fused ``MatMulIntegerToFloat`` multiplies (:func:`fuse_rescales` writes it so in onnxruntime's file).

Attention probabilities get per-row scales too: a ``Softmax`` output (directly or through the exporters' NaN guard
``Where(IsNaN(p), 0, p)``) quantized statically for ``P V`` alone becomes ``s = max p / 255`` per row, codes
``QuantizeLinear(p * (255 / max p), 1, 0)`` as uint8 with zero point 0 (a probability is never negative: all 256
levels), and
``MatMulInteger(codes, V's static codes)``, then ``float(acc) * V's scale * s``. A row spread over many tokens has
a maximum far below the calibrated one; one static scale gave such rows a few levels. Measured on SmolLM2-135M
W8A8 (4094 tokens, float perplexity 14.70): per-row linear inputs alone 15.02; with per-row probabilities 14.79;
with the four attention operands in float 14.76.

The guard's pass over every probability goes: the chain reads the ``Softmax`` itself, and the row scale of a NaN
row (a query that sees no position) becomes 0, which makes its product 0 as the guard did.

The keys of ``Q K^T`` get one scale per position: the right operand ``K^T`` (scaled, as the exporters write it)
quantized statically for products by Q's static codes alone becomes, per column (a key's ``head_dim`` values),
``s = max |k| / 127`` and codes ``QuantizeLinear(k * (127 / max |k|), 1, 128)``; ``MatMulInteger(Q's codes,
codes)``, then ``float(acc) * (s * Q's scale)``, the two scales multiplied once per column. A key's row is what
the cache holds per position, so the decode step keeps those codes and a float cache of their scales
(:func:`qcompile.flow.decoder.quantize_cache`). Measured on SmolLM2-135M W8A8 (4088 tokens): 14.795 -> 14.760,
float 14.70.

Those are standard ONNX ops that onnxruntime runs on its integer GEMM, and the integer lowering keeps them as
they are (a float island around an integer product), so the decode-step kernels compute the same. Q, V and every
other quantization point keep their static scales.

The chain is shared with the ternary path (:mod:`qcompile.passes.ternarize`), whose codes are int8 (no offset).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from qcompile.graph import add_initializer, drop_if_unused, layer_name

logger = logging.getLogger(__name__)

ACTIVATION_LIMIT = 127
PROBABILITY_LIMIT = 255  # probabilities are >= 0: uint8 codes with zero point 0
ROW_FLOOR = 2.0**-100  # the least row maximum: limit / maximum stays finite in float32 (a zero row: codes 0)
CODE_OFFSET = 128  # uint8 codes: the int8 code + 128, read with zero point 128
ROWS_KEY = "qcompile.rows_of"  # node metadata: the value whose rows the node's chain quantizes
LINEAR_OPS = ("MatMul", "Gemm")


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The activation quantizer of the rewritten graphs, in numpy: (int8 codes, float32 row scales)."""
    return _quantize_rows(np.abs(x), x, ACTIVATION_LIMIT, np.int8)


def quantize_probability_rows(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The probabilities' quantizer of the rewritten graphs, in numpy: (uint8 codes, float32 row scales)."""
    return _quantize_rows(p, p, PROBABILITY_LIMIT, np.uint8)


def quantize_key_columns(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The keys' quantizer of the rewritten graphs (``K^T [..., head_dim, positions]``, one scale per position),
    in numpy: (int8 codes, float32 column scales ``[..., 1, positions]``)."""
    return _quantize_rows(np.abs(k), k, ACTIVATION_LIMIT, np.int8, axis=-2)


def _quantize_rows(
    magnitudes: np.ndarray, x: np.ndarray, levels: int, dtype: type, axis: int = -1
) -> tuple[np.ndarray, np.ndarray]:
    """``x`` quantized per row (the slices along ``axis``) with the maxima of ``magnitudes``, as
    :func:`row_codes`'s chain computes it."""
    bounded = np.maximum(magnitudes.max(axis=axis, keepdims=True), np.float32(ROW_FLOOR))
    limit = np.float32(levels)
    info = np.iinfo(dtype)
    codes = np.clip(np.round(x * (limit / bounded)), info.min, info.max).astype(dtype)
    return codes, (bounded / limit).astype(np.float32)


class Chain:
    """Nodes built one after the other, named ``{prefix}_{op}_{index}``, for inserting together."""

    def __init__(self, prefix: str, source: str | None = None) -> None:
        self.prefix, self.source = prefix, source
        self.nodes: list[ir.Node] = []

    def __call__(self, op: str, inputs: list[ir.Value | None], **attributes: int) -> ir.Value:
        created = ir.node(op, inputs, attributes=attributes, name=f"{self.prefix}_{op.lower()}_{len(self.nodes)}")
        if self.source is not None:
            created.metadata_props[ROWS_KEY] = self.source
        self.nodes.append(created)
        return created.outputs[0]


def row_codes(
    graph: ir.Graph, chain: Chain, x: ir.Value, offset: int = 0, nonnegative: bool = False, axis: int = -1
) -> tuple[ir.Value, ir.Value]:
    """(codes, row scales) of ``x`` per row (the slices along ``axis``): int8 codes in [-127, 127], or with
    ``offset`` 128 the same codes + 128 as uint8; for ``nonnegative`` rows (probabilities) uint8 codes in [0, 255].
    ``x`` is multiplied by ``limit / max |x|`` and quantized at scale 1 by one ``QuantizeLinear`` (rounding half
    to even, saturating, casting: one pass over the row instead of three). The graph's constants are named after
    the chain's prefix."""
    prefix = chain.prefix
    axes = add_initializer(graph, f"{prefix}_axes", np.array([axis], np.int64))
    floor = add_initializer(graph, f"{prefix}_floor", np.array(ROW_FLOOR, np.float32))
    limit = add_initializer(
        graph, f"{prefix}_limit", np.array(PROBABILITY_LIMIT if nonnegative else ACTIVATION_LIMIT, np.float32)
    )
    unit = add_initializer(graph, f"{prefix}_unit", np.array(1.0, np.float32))
    zero_code = np.array(offset, np.uint8) if offset or nonnegative else np.array(0, np.int8)
    zero = add_initializer(graph, f"{prefix}_code_zero", zero_code)
    rowmax = chain("ReduceMax", [x if nonnegative else chain("Abs", [x]), axes], keepdims=1)
    bounded = chain("Max", [rowmax, floor])
    codes = chain("QuantizeLinear", [chain("Mul", [x, chain("Div", [limit, bounded])]), unit, zero])
    return codes, chain("Div", [bounded, limit])


def rescaled(
    chain: Chain,
    product: ir.Value,
    row_scale: ir.Value,
    channel_scales: ir.Value,
    bias: ir.Value | None,
    channels_first: bool = False,
) -> ir.Value:
    """``float(product) * row_scale * channel_scales (+ bias)``: an int32 product back in float; with
    ``channels_first``, ``float(product) * channel_scales * row_scale``, the order onnxruntime's fused
    ``MatMulIntegerToFloat`` multiplies in (:func:`fuse_rescales`)."""
    first, second = (channel_scales, row_scale) if channels_first else (row_scale, channel_scales)
    result = chain("Mul", [chain("Mul", [chain("Cast", [product], to=ir.DataType.FLOAT), first]), second])
    return chain("Add", [result, bias]) if bias is not None else result


MICROSOFT = "com.microsoft"


def fuse_rescales(model: ir.Model) -> int:
    """For onnxruntime's file: each per-row product of uint8 codes rescaled as ``float(acc) * channel scales *
    row scale`` (:func:`rescaled` with ``channels_first``) becomes one ``com.microsoft.MatMulIntegerToFloat``,
    which writes ``float(acc) * channel scale`` from its GEMM's output stage, then multiplies by the row scale in
    one pass: the same float32 products, without the int32 tensor and the passes of ``Cast`` and one ``Mul``.
    A bias stays a separate ``Add`` (the kernel would scale it by the row scale). Returns how many were fused."""
    graph, fused = model.graph, 0
    for node in list(graph):
        if node.op_type != "MatMulInteger" or ROWS_KEY not in node.metadata_props or len(node.inputs) < 3:
            continue
        codes, zero = node.inputs[0], node.inputs[2]
        if codes is None or zero is None or zero.const_value is None or zero.const_value.dtype != ir.DataType.UINT8:
            continue
        chain = [node]
        for op in ("Cast", "Mul", "Mul"):
            value = chain[-1].outputs[0]
            uses = list(value.uses())
            if value.is_graph_output() or len(uses) != 1 or uses[0].node.op_type != op or uses[0].idx != 0:
                break
            chain.append(uses[0].node)
        if len(chain) != 4 or chain[1].attributes.get_int("to", 0) != ir.DataType.FLOAT:
            continue
        channels, rows = chain[2].inputs[1], chain[3].inputs[1]
        if channels is None or channels.const_value is None or channels.const_value.shape.rank() > 1 or rows is None:
            continue
        inputs = [codes, node.inputs[1], rows, channels, zero, *(node.inputs[3:4] if len(node.inputs) > 3 else [])]
        output = chain[3].outputs[0]
        replacement = ir.node(
            "MatMulIntegerToFloat",
            inputs,
            domain=MICROSOFT,
            name=f"{node.name}_to_float",
            metadata_props=dict(node.metadata_props),
        )
        graph.insert_after(chain[3], replacement)
        output.replace_all_uses_with(replacement.outputs[0], replace_graph_outputs=True)
        for item in reversed(chain):
            graph.remove(item, safe=True)
        replacement.outputs[0].name, replacement.outputs[0].shape, replacement.outputs[0].type = (
            output.name,
            output.shape,
            output.type,
        )
        fused += 1
    if fused:
        model.opset_imports.setdefault(MICROSOFT, 1)
    return fused


def _weight(node: ir.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """(int8 codes ``[K, N]``, float32 scales ``[N]`` or scalar) of a linear layer's weight read through a
    per-channel or per-tensor ``DequantizeLinear`` of constant int8 codes; None for anything else."""
    if node.op_type not in LINEAR_OPS or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    dq = node.inputs[1].producer() if node.inputs[1] is not None else None
    if dq is None or dq.op_type != "DequantizeLinear" or any(value is None for value in dq.inputs[:2]):
        return None
    codes, scales = (dq.inputs[index].const_value for index in (0, 1))  # type: ignore[union-attr]
    zero = dq.inputs[2].const_value if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
    if codes is None or scales is None or codes.dtype != ir.DataType.INT8 or codes.shape.rank() != 2:
        return None
    if zero is not None and np.any(zero.numpy()):
        return None
    matrix, scale = codes.numpy(), scales.numpy().astype(np.float32)
    axis = int(dq.attributes["axis"].as_int()) if "axis" in dq.attributes else 1
    attributes = {name: attribute.value for name, attribute in node.attributes.items()}
    if node.op_type == "Gemm":
        if attributes.get("transA", 0) or attributes.get("alpha", 1.0) != 1.0 or attributes.get("beta", 1.0) != 1.0:
            return None
        if attributes.get("transB", 0):
            matrix, axis = matrix.T, 1 - axis % 2
    if scale.size > 1 and (scale.ndim != 1 or axis % 2 != 1 or scale.size != matrix.shape[1]):
        return None  # scales along the inputs, or blocks: not one per output channel
    return np.ascontiguousarray(matrix), scale.reshape(-1) if scale.size > 1 else scale.reshape(())


def _bias(node: ir.Node) -> np.ndarray | bool | None:
    """A Gemm's constant bias in float (an int32 bias at a static input scale dequantized), None when it has
    none, False when it is not a constant."""
    if node.op_type != "Gemm" or len(node.inputs) < 3 or node.inputs[2] is None:
        return None
    bias = node.inputs[2]
    if bias.const_value is not None:
        return bias.const_value.numpy().astype(np.float32)
    dq = bias.producer()
    if dq is None or dq.op_type != "DequantizeLinear" or any(v is None or v.const_value is None for v in dq.inputs):
        return False
    codes, scales, zero = (value.const_value.numpy() for value in dq.inputs)  # type: ignore[union-attr]
    return ((codes.astype(np.float64) - zero) * scales).astype(np.float32)


def _readers(q: ir.Node, takes: Callable[[ir.Node, int], bool]) -> list[ir.Node] | None:
    """The nodes reading ``q``'s codes through ``DequantizeLinear``, when they are its only readers and ``takes``
    each (the node, the input it reads them as); None otherwise."""
    readers: list[ir.Node] = []
    for use in q.outputs[0].uses():
        dq = use.node
        if dq.op_type != "DequantizeLinear" or q.outputs[0].is_graph_output() or dq.outputs[0].is_graph_output():
            return None
        for reader in dq.outputs[0].uses():
            if not takes(reader.node, reader.idx):
                return None
            readers.append(reader.node)
    return readers or None


def _linear_readers(q: ir.Node) -> list[ir.Node] | None:
    """The linear layers reading ``q``'s codes as their input, when they are its only readers and each has a
    weight this pass takes; None otherwise."""
    return _readers(q, lambda node, index: index == 0 and _weight(node) is not None and _bias(node) is not False)


def _nan_guard(value: ir.Value) -> ir.Node | None:
    """The ``Where`` of ``Where(IsNaN(p), 0, p)`` that writes ``value`` (the exporters' guard for a query that sees
    no position: its Softmax row is NaN), or None."""
    node = value.producer()
    if node is None or node.op_type != "Where" or len(node.inputs) != 3 or node.inputs[2] is None:
        return None
    guard = node.inputs[0].producer() if node.inputs[0] is not None else None
    zero = node.inputs[1].const_value if node.inputs[1] is not None else None
    if guard is None or guard.op_type != "IsNaN" or guard.inputs[0] is not node.inputs[2]:
        return None
    if zero is None or zero.size != 1 or zero.numpy().reshape(-1)[0] != 0:
        return None
    return node


def _probabilities(value: ir.Value) -> bool:
    """Whether ``value`` is a Softmax's output, directly or through ``Where(IsNaN(p), 0, p)``: never negative."""
    guard = _nan_guard(value)
    node = guard.inputs[2].producer() if guard is not None else value.producer()  # type: ignore[union-attr]
    return node is not None and node.op_type == "Softmax" and node.domain in ("", "ai.onnx")


def _static_codes(dq: ir.Node | None) -> bool:
    """Whether ``dq`` dequantizes an activation's uint8 codes with a scalar constant scale and zero point."""
    if dq is None or dq.op_type != "DequantizeLinear" or dq.inputs[0] is None or dq.inputs[0].const_value is not None:
        return False
    scale = dq.inputs[1].const_value if dq.inputs[1] is not None else None
    zero = dq.inputs[2].const_value if len(dq.inputs) > 2 and dq.inputs[2] is not None else None
    return (
        scale is not None
        and scale.size == 1
        and zero is not None
        and zero.size == 1
        and zero.dtype == ir.DataType.UINT8
    )


def _product_readers(q: ir.Node) -> list[ir.Node] | None:
    """The MatMuls reading the probabilities ``q`` quantizes as their left operand (through DequantizeLinear),
    each by an activation's static uint8 codes (``P V``), when they are its only readers; None otherwise."""
    if q.inputs[0] is None or not _probabilities(q.inputs[0]):
        return None
    zero = q.inputs[2].const_value if len(q.inputs) > 2 and q.inputs[2] is not None else None
    if zero is None or zero.dtype != ir.DataType.UINT8:
        return None

    def takes(node: ir.Node, index: int) -> bool:
        right = node.inputs[1].producer() if len(node.inputs) == 2 and node.inputs[1] is not None else None
        return node.op_type == "MatMul" and index == 0 and _static_codes(right)

    return _readers(q, takes)


# Ops between attention's scores and their Softmax: scaling, masks, a soft cap.
_SCORE_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Where", "Tanh", "Cast"})
SCORE_STEPS = 8  # the most of them on the way


def _scores(value: ir.Value) -> bool:
    """Whether ``value`` reaches a Softmax (over its last axis) through the scaling and masking ops alone, each
    read once: attention's scores, whose right operand is the keys."""
    for _ in range(SCORE_STEPS):
        uses = list(value.uses())
        if len(uses) != 1:
            return False
        node = uses[0].node
        if node.op_type == "Softmax":
            return node.attributes.get_int("axis", -1) in (-1, len(value.shape) - 1 if value.shape else -1)
        if node.op_type not in _SCORE_OPS:
            return False
        value = node.outputs[0]
    return False


def _key_readers(q: ir.Node) -> list[ir.Node] | None:
    """The MatMuls reading the activation ``q`` quantizes as their right operand (through DequantizeLinear), each
    by another activation's static uint8 codes that are not probabilities, whose product goes to a Softmax
    (``Q K^T``), when they are its only readers; None otherwise."""

    def takes(node: ir.Node, index: int) -> bool:
        if node.op_type != "MatMul" or index != 1 or len(node.inputs) != 2 or node.inputs[0] is None:
            return False
        if not _scores(node.outputs[0]):
            return False
        left = node.inputs[0].producer()
        if not _static_codes(left):
            return False
        quantize = left.inputs[0].producer()  # type: ignore[union-attr]
        return (
            quantize is not None
            and quantize.op_type == "QuantizeLinear"
            and quantize.inputs[0] is not None
            and not _probabilities(quantize.inputs[0])
        )

    x = q.inputs[0]
    if x is None or x.shape is None or x.shape.rank() < 2:
        return None
    return _readers(q, takes)


class DynamicActivationsPass(ir.passes.InPlacePass):
    """After this pass, no linear layer with a constant int8 weight reads a statically quantized input, and no
    product of attention probabilities by static codes reads statically quantized probabilities: they are
    quantized per row at run time and the product is an int32 ``MatMulInteger``; the keys of ``Q K^T`` are
    quantized per position (a column of ``K^T``) at run time."""

    def __init__(self) -> None:
        super().__init__()
        self.layers: list[str] = []
        self.products: list[str] = []
        self.keys: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.layers, self.products, self.keys = [], [], []
        for q in list(graph):
            if q.op_type != "QuantizeLinear" or q.inputs[0] is None or q.inputs[0].const_value is not None:
                continue
            readers = _linear_readers(q)
            if readers is not None:
                self._rewrite(graph, q, readers)
            elif (products := _product_readers(q)) is not None:
                self._rewrite_probabilities(graph, q, products)
            elif (products := _key_readers(q)) is not None:
                self._rewrite_keys(graph, q, products)
        modified = bool(self.layers or self.products or self.keys)
        if modified:
            graph.sort()
            logger.info(
                "%d linear layers and %d attention products quantize their input per row at run time, %d "
                "products their keys per position",
                len(self.layers),
                len(self.products),
                len(self.keys),
            )
        return ir.passes.PassResult(model, modified=modified)

    def ensures(self, model: ir.Model) -> None:
        for node in model.graph:
            static = node.op_type == "QuantizeLinear" and node.inputs[0] is not None
            if static and (_linear_readers(node) or _product_readers(node) or _key_readers(node)):
                raise ir.passes.PostconditionError(f"'{node.name}' still quantizes statically")

    @staticmethod
    def _row_chain(
        graph: ir.Graph,
        q: ir.Node,
        offset: int = 0,
        nonnegative: bool = False,
        axis: int = -1,
        x: ir.Value | None = None,
    ) -> tuple[str, ir.Value, ir.Value, ir.Value | None]:
        """The per-row chain (:func:`row_codes`) of what the static ``q`` quantizes (or of ``x``, the same
        values), inserted after it: (the value's name, its codes, its row scales, the codes' zero point)."""
        x = x if x is not None else q.inputs[0]
        assert x is not None
        source = str(x.name)
        rows = Chain(f"{source}_rows", source)
        codes, row_scale = row_codes(graph, rows, x, offset, nonnegative, axis)
        graph.insert_after(q, rows.nodes)
        quantize = codes.producer()
        assert quantize is not None
        return source, codes, row_scale, quantize.inputs[2]

    def _rewrite_probabilities(self, graph: ir.Graph, q: ir.Node, products: list[ir.Node]) -> None:
        guard = _nan_guard(q.inputs[0])  # type: ignore[arg-type]
        if guard is None:
            source, codes, row_scale, zero = self._row_chain(graph, q, nonnegative=True)
        else:
            # The guard's pass over every probability goes: a NaN row (a query that sees no position) has a NaN
            # maximum, hence a NaN scale, which becomes 0, so its product is 0 as the guard made it (its codes are
            # finite: the int32 product is finite). SmolLM2-135M's 256-token prefill on onnxruntime spent 14 % of
            # its time in the guards' IsNaN and Where.
            softmax = guard.inputs[2]
            source, codes, row_scale, zero = self._row_chain(graph, q, nonnegative=True, x=softmax)
            guarded = Chain(f"{source}_rows_nan", source)
            empty = add_initializer(graph, f"{source}_rows_nan_zero", np.array(0.0, np.float32))
            row_scale = guarded("Where", [guarded("IsNaN", [row_scale]), empty, row_scale])
            graph.insert_after(q, guarded.nodes)
        for node in products:
            name = layer_name(node)
            right = node.inputs[1].producer()  # type: ignore[union-attr]
            assert right is not None
            chain = Chain(f"{name}_dynamic", source)
            product = chain("MatMulInteger", [codes, right.inputs[0], zero, right.inputs[2]])
            result = rescaled(chain, product, row_scale, right.inputs[1], None, channels_first=True)  # type: ignore[arg-type]
            self._replace(graph, node, chain, result)
            self.products.append(name)
        _remove_static(graph, q)
        if guard is not None:  # the guard, where nothing reads it any more
            nan = guard.inputs[0]
            _drop_chain(graph, guard.outputs[0])
            _drop_chain(graph, nan)

    def _rewrite_keys(self, graph: ir.Graph, q: ir.Node, products: list[ir.Node]) -> None:
        source, codes, column_scale, zero = self._row_chain(graph, q, offset=CODE_OFFSET, axis=-2)
        for node in products:
            name = layer_name(node)
            left = node.inputs[0].producer()  # type: ignore[union-attr]
            assert left is not None
            chain = Chain(f"{name}_dynamic", source)
            product = chain("MatMulInteger", [left.inputs[0], codes, left.inputs[2], zero])
            # one scale per column (its key's times the queries'), then one Mul over the product
            scales = chain("Mul", [column_scale, left.inputs[1]])
            result = chain("Mul", [chain("Cast", [product], to=ir.DataType.FLOAT), scales])
            self._replace(graph, node, chain, result)
            self.keys.append(name)
        _remove_static(graph, q)

    @staticmethod
    def _replace(graph: ir.Graph, node: ir.Node, chain: Chain, result: ir.Value) -> None:
        """``node`` out, ``chain`` (computing ``result``) in, under ``node``'s output name; the inputs ``node``
        alone read (a weight's or an operand's DequantizeLinear) go with it."""
        output = node.outputs[0]
        graph.insert_after(node, chain.nodes)
        output.replace_all_uses_with(result, replace_graph_outputs=True)
        inputs = list(node.inputs)
        graph.remove(node, safe=True)
        result.name, result.shape, result.type = output.name, output.shape, output.type
        for value in inputs:
            _drop_chain(graph, value)

    def _rewrite(self, graph: ir.Graph, q: ir.Node, readers: list[ir.Node]) -> None:
        source, codes, row_scale, zero = self._row_chain(graph, q, offset=CODE_OFFSET)
        for node in readers:
            name = layer_name(node)
            matrix, scales = _weight(node)  # type: ignore[misc]
            bias = _bias(node)
            chain = Chain(f"{name}_dynamic", source)
            product = chain("MatMulInteger", [codes, add_initializer(graph, f"{name}_dynamic_weight", matrix), zero])
            bias_value = add_initializer(graph, f"{name}_dynamic_bias", bias) if isinstance(bias, np.ndarray) else None
            channel_scales = add_initializer(graph, f"{name}_dynamic_scales", scales)
            result = rescaled(chain, product, row_scale, channel_scales, bias_value, channels_first=True)
            self._replace(graph, node, chain, result)
            self.layers.append(name)
        _remove_static(graph, q)


def _remove_static(graph: ir.Graph, q: ir.Node) -> None:
    """The static quantization ``q`` that nothing reads through its DequantizeLinears any more, with its
    constants."""
    for dq in [use.node for use in q.outputs[0].uses()]:
        graph.remove(dq, safe=True)
    graph.remove(q, safe=True)
    for value in q.inputs[1:]:
        drop_if_unused(graph, value)


def _drop_chain(graph: ir.Graph, value: ir.Value | None) -> None:
    """Remove ``value`` if nothing reads it: its producer (a weight's ``DequantizeLinear``, a NaN guard) and its unused
    constants with it."""
    if value is None or value.uses() or value.is_graph_output():
        return
    producer = value.producer()
    if producer is None:
        drop_if_unused(graph, value)
        return
    inputs = list(producer.inputs)
    graph.remove(producer, safe=True)
    for item in inputs:
        drop_if_unused(graph, item)


def quantize_blocks(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """The blocked layers' activation quantizer (:func:`blocked_products`), in numpy: ``x [..., K]`` in blocks of
    ``block`` along its last axis, each with its own scale ``max |x| / 127``: (int8 codes ``[..., K]``, float32
    scales ``[..., K / block]``)."""
    shaped = x.reshape(*x.shape[:-1], -1, block)
    codes, scales = _quantize_rows(np.abs(shaped), shaped, ACTIVATION_LIMIT, np.int8)
    return codes.reshape(x.shape), scales[..., 0]


def blocked_product(x: np.ndarray, codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """What :func:`blocked_products` makes of ``x @ W`` for a blocked weight (int8 ``codes [N, K]``, float32
    ``scales [N, K / block]``), in numpy: per block, the int32 product of the activation's codes and the
    weight's, times the weight's block scale, times the activation's; the blocks summed in float32."""
    rows, (outputs, inputs) = x.reshape(-1, x.shape[-1]), codes.shape
    block = inputs // scales.shape[1]
    a_codes, a_scales = quantize_blocks(rows, block)
    blocks = inputs // block
    products = np.einsum(
        "mgk,ngk->mgn",
        a_codes.reshape(-1, blocks, block).astype(np.int64),
        codes.reshape(outputs, blocks, block).astype(np.int64),
    ).astype(np.int32)
    terms = products.astype(np.float32) * scales.T[None] * a_scales[..., None]
    total = terms[:, 0]
    for index in range(1, blocks):  # in block order (onnxruntime's ReduceSum adds up to 4 blocks so, more in another)
        total = total + terms[:, index]
    return total.reshape(*x.shape[:-1], outputs)


def blocked_products(model: ir.Model) -> int:
    """Linear layers with group-wise weights (:mod:`qcompile.passes.pack_int4`'s blocked form) quantize their
    input per block of the weight's ``block`` inputs at run time, as onnxruntime's ``MatMulNBits`` does inside its
    kernel (``accuracy_level`` 4) and llama.cpp's Q8 activations are, and multiply in standard ONNX ops:

    - ``x [..., K]`` reshaped ``[..., G, 1, B]`` (G blocks of B), codes per block :func:`row_codes` (uint8, zero
      point 128), scales ``[..., G, 1, 1]``;
    - ``MatMulInteger(codes, W [G, B, N], 128)``: one int32 product per block, ``[..., G, 1, N]``;
    - ``float(acc) * w_scales [G, 1, N] * scales``, summed over the blocks (``ReduceSum``), reshaped ``[..., N]``.

    The decode-step library is built from this form: the integer lowering keeps it (a float island around an
    integer product) and the kernels run each product as one int4 x int8 kernel
    (:func:`qcompile.backends.tvm.blocked.blocked_kernel`). Numpy model: :func:`blocked_product`. Returns how
    many layers were rewritten."""
    from qcompile.passes.pack_int4 import _blocked_weight, remove_rebuild

    graph = model.graph

    def takes(node: ir.Node, index: int) -> bool:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or index != 0 or node.inputs[1] is None:
            return False
        found = _blocked_weight(node.inputs[1])
        return found is not None and found[0].shape[1] % (found[0].size // found[1].size) == 0

    rewritten = 0
    for q in list(graph):
        if q.op_type != "QuantizeLinear" or q.inputs[0] is None or q.inputs[0].const_value is not None:
            continue
        readers = _readers(q, takes)
        x = q.inputs[0]
        if readers is None or x.shape is None or x.shape.rank() < 2:
            continue
        source, rank = str(x.name), x.shape.rank()
        chains: dict[int, tuple[ir.Value, ir.Value, ir.Value]] = {}  # per block size: codes, scales, zero point
        for node in readers:
            codes, scales, rebuilt = _blocked_weight(node.inputs[1])  # type: ignore[arg-type,misc]
            outputs, inputs = codes.shape
            block = codes.size // scales.size
            blocks = inputs // block
            if block not in chains:
                prefix = f"{source}_blocks{block}"
                rows = Chain(prefix, source)
                shape = add_initializer(graph, f"{prefix}_shape", np.array([0] * (rank - 1) + [blocks, 1, block]))
                shaped = rows("Reshape", [x, shape])
                block_codes, block_scales = row_codes(graph, rows, shaped, CODE_OFFSET)
                graph.insert_after(q, rows.nodes)
                zero = block_codes.producer().inputs[2]  # type: ignore[union-attr]
                chains[block] = (block_codes, block_scales, zero)  # type: ignore[assignment]
            block_codes, block_scales, zero = chains[block]
            name = layer_name(node)
            chain = Chain(f"{name}_blocked", source)
            weight = codes.reshape(outputs, blocks, block).transpose(1, 2, 0)  # [G, B, N]
            product = chain(
                "MatMulInteger",
                [block_codes, add_initializer(graph, f"{name}_blocked_weight", np.ascontiguousarray(weight)), zero],
            )
            weight_scales = scales.reshape(outputs, blocks).T.reshape(blocks, 1, outputs)
            scaled = rescaled(
                chain,
                product,
                block_scales,
                add_initializer(graph, f"{name}_blocked_scales", np.ascontiguousarray(weight_scales)),
                None,
                channels_first=True,
            )
            axes = add_initializer(graph, f"{name}_blocked_axes", np.array([-3], np.int64))
            summed = chain("ReduceSum", [scaled, axes], keepdims=0)
            shape = add_initializer(graph, f"{name}_blocked_shape", np.array([0] * (rank - 1) + [outputs]))
            DynamicActivationsPass._replace(graph, node, chain, chain("Reshape", [summed, shape]))
            remove_rebuild(graph, rebuilt)
            rewritten += 1
        _remove_static(graph, q)
    if rewritten:
        graph.sort()
        logger.info("%d blocked linear layers quantize their input per block at run time", rewritten)
    return rewritten
