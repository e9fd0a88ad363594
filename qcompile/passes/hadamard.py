"""Hadamard rotation of MatMul / Gemm inputs (QuaRot / SpinQuant style): spread outliers over all channels.

For an orthogonal ``Q``, ``x W = (x Q)(Q^T W)``: the rotated activation ``x Q`` mixes every channel into every
other, so a channel with outliers no longer sets the per-tensor scale alone, and ``Q^T W`` stays as easy to
quantize per output channel. ``Q = D H / sqrt(n)`` with ``H`` a Hadamard matrix and ``D`` a random +-1
diagonal (seeded: the rotation is randomized but reproducible).

Sizes: ``n = m * 2^k``. For ``m = 1`` ``H`` is Sylvester's; for ``m`` a product of 12s and 20s,
``H = H_m (x) H_{2^k}`` (Kronecker products) with ``H_12`` and ``H_20`` from Paley's first construction
(primes 11 and 19); otherwise ``H`` is block-diagonal, ``n / 2^k`` copies of ``H_{2^k}`` (orthogonal, but
mixing only within blocks of ``2^k``). MiniLM's 384 = 12 x 32 and 1536 = 12 x 128 and SmolLM2's
1536 and 576 = 12 x 12 x 4 get full Kronecker rotations; 160 = 20 x 8 too; 72 = 9 x 8 gets 9 blocks of 8.

Where the rotation goes:
- the residual stream of a pre-norm transformer (QuaRot's offline fold), first: when an embedding Gather
  starts a stream that only residual Adds (the other term written by a linear layer) and RMSNorms read, and
  each RMSNorm's output (``x * r(x)``, then ``* gamma``) only feeds linear layers, the whole stream is
  rotated by one ``Q``: the embedding table's columns, every writer's output columns (``W Q``) and every
  RMSNorm reader's rows (``Q^T diag(gamma) W``). RMSNorm commutes with ``Q`` once gamma is folded out,
  since ``r(x)`` depends only on the row's mean square; the Mul by gamma is removed. No runtime cost; Q, K,
  V, gate, up and the LM head read rotated inputs. Only with ``residual=True`` (``--rotate
  hadamard-residual``): with per-tensor static activation scales it costs accuracy at 4-bit weights (the
  RMSNorm weight no longer damps the stream's outlier channels before quantization; SmolLM2-135M W4A8 with
  SmoothQuant: perplexity +17.8 % against +15.8 % with per-input rotations; W8A8 +2.5 % against +2.7 %),
  though it halves the online transforms.
  A stream read by LayerNorms instead (pre-LN GPT / OPT style) is first centred, as QuaRot does: the
  embedding table's rows and every writer's output columns lose their mean, so every stream row has zero
  mean, each LayerNorm is then an RMSNorm (``x / sqrt(mean(x^2) + eps)``, replacing the node), its scale is
  folded into the readers' rows and its bias into their outputs (``beta W`` added). Anything else reading
  the stream (both kinds of norm at once; a BERT-style post-norm block, where the normalized value is the
  stream; a graph output) leaves the stream alone, and the reason is recorded;
- the producer of ``x`` is a MatMul / Gemm with constant weight (and bias) read only by rotated consumers:
  ``Q`` is folded into its output columns, ``W_p Q`` and ``b Q``: no runtime cost;
- otherwise (the input of a down projection after a gated MLP, attention heads going into an output
  projection, a GELU, a Transpose): an online transform is inserted before the consumer in standard ONNX
  ops (Mul by ``D``, Reshape, two MatMuls with the small factors ``H_m`` and ``H_{2^k}``, Transpose, Reshape:
  ``n (m + 2^k)`` multiply-adds per row, not ``n^2``); consumers reading the same value share one transform.
Conv consumers (channels on axis 1) are left alone, and said so.

After this pass, every rotated consumer's weight is ``Q^T W`` and its input is ``x Q``; outputs are unchanged
in float (to rounding: measured 1e-6 relative on all-MiniLM-L6-v2).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompile.graph import (
    add_initializer,
    channel_readers,
    consumer_rows,
    int_attribute,
    is_constant,
    private_weight,
    scale_consumer_rows,
    single_use_constant,
)
from qcompile.passes.annotate import require_unannotated
from qcompile.passes.dynamic_rows import ROWS_KEY

logger = logging.getLogger(__name__)


def _sylvester(size: int) -> np.ndarray:
    matrix = np.ones((1, 1))
    while matrix.shape[0] < size:
        matrix = np.block([[matrix, matrix], [matrix, -matrix]])
    return matrix


def _paley(prime: int) -> np.ndarray:
    """Hadamard matrix of order ``prime + 1`` (Paley I; ``prime`` = 3 mod 4)."""
    residues = {(i * i) % prime for i in range(1, prime)}

    def chi(value: int) -> int:
        value %= prime
        return 0 if value == 0 else (1 if value in residues else -1)

    jacobsthal = np.array([[chi(j - i) for j in range(prime)] for i in range(prime)], dtype=np.float64)
    size = prime + 1
    core = np.zeros((size, size))
    core[0, 1:] = 1
    core[1:, 0] = -1
    core[1:, 1:] = jacobsthal
    return core + np.eye(size)


SMALL = {12: 11, 20: 19}


def _paley_product(size: int) -> np.ndarray | None:
    """A Hadamard matrix of order ``m``, the Kronecker product of Paley matrices of orders 12 (= 4 x 3) and
    20 (= 4 x 5), with ``size = m * 2^k``: one H_12 per factor 3 of ``size``, one H_20 per factor 5, each
    taking two factors 2. None when ``size`` has other odd factors, too few factors 2, or no odd factor."""
    counts = {}
    rest = size
    for order, odd in ((12, 3), (20, 5)):
        counts[order] = 0
        while rest % odd == 0:
            rest //= odd
            counts[order] += 1
    twos = sum(counts.values()) * 2
    if rest & (rest - 1) or rest < 2**twos or twos == 0:
        return None
    matrix = np.ones((1, 1))
    for order, count in counts.items():
        for _ in range(count):
            matrix = np.kron(matrix, _paley(SMALL[order]))
    return matrix


def factors(size: int) -> tuple[np.ndarray, np.ndarray, str]:
    """``(A, B, kind)`` with the rotation's Hadamard part ``A (x) B`` (``kind`` 'kronecker') or ``m`` blocks
    of ``B`` (``A`` the identity, ``kind`` 'block-diagonal'); both normalized to be orthogonal."""
    outer = _paley_product(size)
    if outer is not None:
        rest = size // outer.shape[0]
        return outer / np.sqrt(outer.shape[0]), _sylvester(rest) / np.sqrt(rest), "kronecker"
    power = size & -size
    multiple = size // power
    block = _sylvester(power) / np.sqrt(power)
    if multiple == 1:
        return np.ones((1, 1)), block, "sylvester"
    return np.eye(multiple), block, "block-diagonal"


def rotation(size: int, seed: int = 0) -> np.ndarray:
    """The dense orthogonal ``Q = D (A (x) B)`` of :func:`factors` with a seeded random sign diagonal ``D``."""
    outer, inner, _ = factors(size)
    signs = np.random.default_rng(seed + size).choice([-1.0, 1.0], size)
    return signs[:, None] * np.kron(outer, inner)


@dataclass
class Rotation:
    value: str
    consumers: list[str]
    size: int = 0
    kind: str | None = None
    folded_into: str | None = None
    reason: str | None = None


def _rotate_consumer(node: ir.Node, q: np.ndarray) -> None:
    value = private_weight(node)
    weight = value.const_value.numpy()  # type: ignore[union-attr]
    if node.op_type == "Gemm" and int_attribute(node, "transB", 0):
        new = weight.astype(np.float64) @ q  # W^T stored: (Q^T W)^T = W^T Q
    else:
        new = q.T @ weight.astype(np.float64)
    value.const_value = ir.tensor(new.astype(weight.dtype), name=value.name)  # type: ignore[union-attr]


def _linear_producer(node: ir.Node | None, size: int) -> bool:
    if node is None or node.op_type not in ("MatMul", "Gemm") or not single_use_constant(node.inputs[1]):
        return False
    if node.op_type == "Gemm" and int_attribute(node, "transA", 0):
        return False
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None and not single_use_constant(bias):
        return False
    weight = node.inputs[1].const_value.numpy()  # type: ignore[union-attr]
    columns = weight.shape[0] if node.op_type == "Gemm" and int_attribute(node, "transB", 0) else weight.shape[-1]
    return weight.ndim == 2 and columns == size


def _fold_into_producer(node: ir.Node, q: np.ndarray) -> None:
    value = node.inputs[1]
    weight = value.const_value.numpy()  # type: ignore[union-attr]
    if node.op_type == "Gemm" and int_attribute(node, "transB", 0):
        new = q.T @ weight.astype(np.float64)
    else:
        new = weight.astype(np.float64) @ q
    value.const_value = ir.tensor(new.astype(weight.dtype), name=value.name)  # type: ignore[union-attr]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None:
        b = bias.const_value.numpy()  # type: ignore[union-attr]
        bias.const_value = ir.tensor((b.astype(np.float64) @ q).astype(b.dtype), name=bias.name)


_ROW_INVARIANT_OPS = ("Add", "Sub", "Mul", "Div", "Sqrt", "Reciprocal")


def _reduce_axes(node: ir.Node) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        if not is_constant(node.inputs[1]):
            return None
        return [int(a) for a in node.inputs[1].const_value.numpy().reshape(-1)]  # type: ignore[union-attr]
    attribute = node.attributes.get("axes")
    return list(attribute.as_ints()) if attribute is not None else None


def _is_mean_square(value: ir.Value, stream: ir.Value) -> bool:
    """``value`` is ``ReduceMean(Pow(stream, 2))`` over the last axis (keepdims): unchanged by a rotation of
    ``stream``'s last axis, since an orthogonal ``Q`` keeps every row's sum of squares."""
    node = value.producer()
    if node is None or node.op_type != "ReduceMean" or not int_attribute(node, "keepdims", 1):
        return False
    square = node.inputs[0].producer() if node.inputs[0] is not None else None
    if square is None or square.op_type != "Pow" or square.inputs[0] is not stream:
        return False
    exponent = square.inputs[1]
    if not is_constant(exponent) or float(exponent.const_value.numpy()) != 2.0:  # type: ignore[union-attr]
        return False
    rank = stream.shape.rank() if stream.shape is not None else 0
    return _reduce_axes(node) in ([-1], [rank - 1])


def _row_invariant(value: ir.Value | None, stream: ir.Value, depth: int = 0) -> bool:
    """``value`` is computed from constants and ``stream``'s per-row mean square only (RMSNorm's
    ``1 / sqrt(mean(x^2) + eps)``), so rotating ``stream`` leaves it unchanged."""
    if value is None or depth > 8:
        return False
    if is_constant(value):
        return True
    if _is_mean_square(value, stream):
        return True
    node = value.producer()
    if node is None or node.op_type not in _ROW_INVARIANT_OPS:
        return False
    return all(_row_invariant(item, stream, depth + 1) for item in node.inputs)


@dataclass
class _Norm:
    """One norm reading the residual stream: an RMSNorm's ``x * r(x)`` (``scaled``), then an optional
    ``* gamma``; or a LayerNormalization node (``scaled``, ``layer_norm`` set)."""

    scaled: ir.Node
    gamma: ir.Node | None
    readers: list[tuple[ir.Node, int]]
    layer_norm: bool = False


@dataclass
class _Stream:
    embedding: ir.Node
    writers: list[ir.Node]
    norms: list[_Norm]


def _gamma_of(node: ir.Node, size: int) -> ir.Value | None:
    """The per-channel constant of ``x * gamma`` when ``node`` is one, else None."""
    if node.op_type != "Mul" or len(node.inputs) != 2:
        return None
    constants = [value for value in node.inputs if is_constant(value)]
    if len(constants) != 1:
        return None
    array = constants[0].const_value.numpy()  # type: ignore[union-attr]
    return constants[0] if array.size == size and array.shape[-1] == size else None


def _per_row(node: ir.Node, index: int, stream: ir.Value) -> bool:
    """``node`` is ``stream * r`` or ``stream / r`` with ``r`` one number per row, computed from the row's mean
    square (RMSNorm's scaling): rotating ``stream`` rotates the result the same way."""
    if len(node.inputs) != 2 or not (node.op_type == "Mul" or (node.op_type == "Div" and index == 0)):
        return False
    factor = node.inputs[1 - index]
    if factor is None or factor.shape is None:
        return False
    per_row = factor.shape.rank() == 0 or factor.shape[-1] == 1
    return per_row and _row_invariant(factor, stream)


def _trace_stream(embedding: ir.Node, size: int) -> tuple[_Stream | None, str]:
    """Every reader of the residual stream that starts at ``embedding``'s output must be a residual Add (the
    other term written by a linear layer), the mean square of an RMSNorm, or ``x * r(x)`` of one whose
    output (after an optional ``* gamma``) only linear layers read; otherwise the reason it is not."""
    stream = _Stream(embedding, [], [])
    pending = [embedding.outputs[0]]
    members: set[int] = set()
    while pending:
        value = pending.pop()
        if id(value) in members:
            continue
        members.add(id(value))
        if value.is_graph_output():
            return None, f"the residual stream value '{value.name}' is a graph output"
        for node, index in value.uses():
            name = f"'{node.name}' ({node.op_type})"
            if node.op_type == "Add" and len(node.inputs) == 2:
                other = node.inputs[1 - index]
                writer = other.producer() if other is not None else None
                if other is not None and writer is not None and not (id(other) in members or other in pending):
                    if not _linear_producer(writer, size) or len(other.uses()) != 1 or other.is_graph_output():
                        return None, f"{name} adds '{other.name}', which no linear layer of {size} outputs writes"
                    stream.writers.append(writer)
                pending.append(node.outputs[0])
            elif node.op_type == "Pow" and all(
                use.op_type == "ReduceMean" and _is_mean_square(use.outputs[0], value)
                for use, _ in node.outputs[0].uses()
            ):
                continue
            elif node.op_type == "LayerNormalization" and index == 0 and _plain_layer_norm(node, value):
                readers = channel_readers(node.outputs[0], channels_last=True)
                if not readers or any(
                    consumer_rows(reader, slot) is None or reader.op_type == "Conv" for reader, slot in readers
                ):
                    return None, f"the normalized value '{node.outputs[0].name}' of {name} is read by a non-linear node"
                stream.norms.append(_Norm(node, None, readers, layer_norm=True))
            elif _per_row(node, index, value):
                out = node.outputs[0]
                gamma = None
                users = list(out.uses())
                if len(users) == 1 and _gamma_of(users[0][0], size) is not None and not out.is_graph_output():
                    gamma = users[0][0]
                    out = gamma.outputs[0]
                readers = channel_readers(out, channels_last=True)
                if not readers or any(
                    consumer_rows(reader, slot) is None or reader.op_type == "Conv" for reader, slot in readers
                ):
                    return None, f"the normalized value '{out.name}' of {name} is read by a non-linear node"
                stream.norms.append(_Norm(node, gamma, readers))
            else:
                return None, f"{name} reads the residual stream '{value.name}'"
    if not stream.norms:
        return None, "no RMSNorm or LayerNorm reads the stream"
    if len({norm.layer_norm for norm in stream.norms}) > 1:
        return None, "RMSNorms and LayerNorms both read the stream (centering it would change the RMSNorms)"
    return stream, ""


def _plain_layer_norm(node: ir.Node, stream: ir.Value) -> bool:
    """A LayerNormalization over the last axis with constant scale (and bias), only its first output used."""
    rank = stream.shape.rank() if stream.shape is not None else 0
    constants = all(is_constant(value) for value in node.inputs[1:] if value is not None)
    extra_outputs = any(output.uses() or output.is_graph_output() for output in node.outputs[1:])
    return int_attribute(node, "axis", -1) in (-1, rank - 1) and constants and not extra_outputs


def _center_producer(node: ir.Node) -> None:
    """Subtract each row's mean over the output channels from a linear producer's weight (and its bias'
    mean): its outputs then have zero mean over the channels."""
    value = private_weight(node)
    weight = value.const_value.numpy().astype(np.float64)  # type: ignore[union-attr]
    axis = 0 if node.op_type == "Gemm" and int_attribute(node, "transB", 0) else -1
    centred = weight - weight.mean(axis=axis, keepdims=True)
    value.const_value = ir.tensor(centred.astype(np.float32), name=value.name)  # type: ignore[union-attr]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None and bias.const_value is not None:
        b = bias.const_value.numpy()
        bias.const_value = ir.tensor((b - b.mean()).astype(b.dtype), name=bias.name)


def _add_reader_bias(reader: ir.Node, extra: np.ndarray) -> None:
    """``reader``'s output gains ``extra`` (a LayerNorm's bias pushed through its weight): into a Gemm's C,
    else an Add of a constant inserted after it."""
    graph = reader.graph
    assert graph is not None
    if reader.op_type == "Gemm" and len(reader.inputs) > 2 and reader.inputs[2] is not None:
        bias = private_weight(reader, 2)
        current = bias.const_value.numpy()  # type: ignore[union-attr]
        bias.const_value = ir.tensor((current + extra).astype(current.dtype), name=bias.name)
        return
    output = reader.outputs[0]
    constant = add_initializer(graph, f"{reader.name}_layernorm_bias", extra.astype(np.float32))
    shifted = ir.Value(name=f"{output.name}_shifted", shape=output.shape, type=output.type)
    output.replace_all_uses_with(shifted, replace_graph_outputs=True)
    graph.insert_after(
        reader, ir.node("Add", [output, constant], outputs=[shifted], name=f"{reader.name}_layernorm_bias")
    )
    if shifted.is_graph_output():
        original = str(output.name)
        output.name = f"{original}_unshifted"
        shifted.name = original


def _layer_norm_to_rms(node: ir.Node) -> None:
    """Replace a LayerNormalization of a zero-mean input by its RMSNorm without scale and bias
    (``x / sqrt(mean(x^2) + eps)``, which equals ``(x - mean) / std`` there); scale and bias were folded
    into the readers."""
    graph = node.graph
    assert graph is not None
    x = node.inputs[0]
    assert x is not None
    epsilon = node.attributes.get("epsilon")
    eps = epsilon.as_float() if epsilon is not None else 1e-5
    base = str(node.name)
    nodes: list[ir.Node] = []

    def add(op: str, inputs: list[ir.Value], suffix: str, **attributes: Any) -> ir.Value:
        out = ir.Value(name=f"{base}_{suffix}")
        nodes.append(ir.node(op, inputs, attributes=attributes, outputs=[out], name=f"{base}_{suffix}"))
        return out

    squared = add("Pow", [x, add_initializer(graph, f"{base}_two_c", np.array(2.0, np.float32))], "square")
    axes = add_initializer(graph, f"{base}_axes_c", np.array([-1], np.int64))
    mean = add("ReduceMean", [squared, axes], "mean_square", keepdims=1)
    root = add(
        "Sqrt", [add("Add", [mean, add_initializer(graph, f"{base}_eps_c", np.array(eps, np.float32))], "eps")], "rms"
    )
    normed = add("Div", [x, root], "rmsnorm")
    normed.shape, normed.type = node.outputs[0].shape, node.outputs[0].type
    for new in nodes:
        graph.insert_before(node, new)
    node.outputs[0].replace_all_uses_with(normed)
    graph.remove(node, safe=True)


def _rotate_table(node: ir.Node, q: np.ndarray) -> None:
    """``Gather(table, ids)`` returns rows of ``table @ q``."""
    value = private_weight(node, 0)
    table = value.const_value.numpy()  # type: ignore[union-attr]
    new = (table.astype(np.float64) @ q).astype(table.dtype)
    value.const_value = ir.tensor(new, name=value.name)


class HadamardRotationPass(ir.passes.InPlacePass):
    """After this pass, every eligible MatMul / Gemm reads ``x Q`` (folded or online) with weights ``Q^T W``."""

    def requires(self, model: ir.Model) -> None:
        require_unannotated(model, "HadamardRotationPass")

    def __init__(self, seed: int = 0, residual: bool = False, sequences_only: bool = False) -> None:
        super().__init__()
        self.seed = seed
        self.residual = residual
        self.sequences_only = sequences_only  # leave a model alone whose linear layers each read one row
        self.rotations: list[Rotation] = []

    def _fold_stream(self, embedding: ir.Node) -> set[int]:
        """Rotate a residual stream offline (QuaRot): the embedding table's columns, every residual writer's
        output columns and every RMSNorm reader's rows, with each RMSNorm's gamma folded into its readers
        first (the Mul by gamma is then removed). Returns the readers rotated; records a refusal when the
        stream does not allow it."""
        table = embedding.inputs[0]
        output = embedding.outputs[0]
        if not is_constant(table) or table.const_value.numpy().ndim != 2 or output.shape is None:  # type: ignore[union-attr]
            return set()
        size = table.const_value.numpy().shape[1]  # type: ignore[union-attr]
        if size < 2 or output.shape[-1] != size:
            return set()
        stream, reason = _trace_stream(embedding, size)
        if stream is None:
            self.rotations.append(Rotation(str(output.name), [], size, reason=f"residual stream not rotated: {reason}"))
            return set()
        q = rotation(size, self.seed)
        layer_norms = stream.norms[0].layer_norm
        if layer_norms:  # QuaRot: centre the stream, so that each LayerNorm is an RMSNorm (+ folded scale, bias)
            table_value = private_weight(embedding, 0)
            centred = table_value.const_value.numpy().astype(np.float64)  # type: ignore[union-attr]
            centred -= centred.mean(axis=1, keepdims=True)
            table_value.const_value = ir.tensor(centred.astype(np.float32), name=table_value.name)
            for writer in stream.writers:
                _center_producer(writer)
        _rotate_table(embedding, q)
        for writer in stream.writers:  # their weights are single-use (_linear_producer)
            _fold_into_producer(writer, q)
        rotated: set[int] = set()
        for norm in stream.norms:
            gamma_value = _gamma_of(norm.gamma, size) if norm.gamma is not None else None
            gamma = gamma_value.const_value.numpy().reshape(-1) if gamma_value is not None else None  # type: ignore[union-attr]
            beta = None
            if norm.layer_norm:
                gamma = norm.scaled.inputs[1].const_value.numpy().reshape(-1)  # type: ignore[union-attr]
                bias = norm.scaled.inputs[2] if len(norm.scaled.inputs) > 2 else None
                beta = bias.const_value.numpy().reshape(-1) if bias is not None else None  # type: ignore[union-attr]
            for reader, slot in norm.readers:
                if beta is not None:
                    rows = consumer_rows(reader, slot)
                    assert rows is not None
                    _add_reader_bias(reader, beta.astype(np.float64) @ rows.astype(np.float64))
                if gamma is not None:
                    scale_consumer_rows(reader, gamma.astype(np.float64))
                _rotate_consumer(reader, q)
                rotated.add(id(reader))
            if norm.layer_norm:
                _layer_norm_to_rms(norm.scaled)
            if norm.gamma is not None and gamma_value is not None:  # folded: the Mul and its weight go
                graph = norm.gamma.graph
                assert graph is not None
                norm.gamma.outputs[0].replace_all_uses_with(norm.scaled.outputs[0])
                graph.remove(norm.gamma, safe=True)
                if not gamma_value.uses() and gamma_value.name in graph.initializers:
                    graph.initializers.pop(str(gamma_value.name))
        readers = [str(reader.name) for norm in stream.norms for reader, _ in norm.readers]
        kind = "LayerNorms turned RMSNorms (stream centred; scale and bias" if layer_norms else "RMSNorms (gamma"
        where = (
            f"residual stream: embedding '{embedding.name}', {len(stream.writers)} residual writers, "
            f"{len(stream.norms)} {kind} folded into their readers)"
        )
        self.rotations.append(Rotation(str(output.name), readers, size, factors(size)[2], folded_into=where))
        return rotated

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.rotations = []
        graph = model.graph
        if self.sequences_only and not any(_reads_rows(node) for node in graph if node.op_type in ("MatMul", "Gemm")):
            reason = "no MatMul / Gemm reads more than one row (not a sequence model): rotation left to --rotate"
            self.rotations.append(Rotation("-", [], reason=reason))
            return ir.passes.PassResult(model, modified=False)
        done: set[int] = set()
        if self.residual:
            for node in list(graph):
                if node.op_type == "Gather":
                    done |= self._fold_stream(node)
        # First, producers whose every reader is a consumer that can take the rotation: fold, no runtime cost.
        for node in list(graph):
            output = node.outputs[0] if node.outputs else None
            if output is None or output.shape is None or output.shape.rank() == 0:
                continue
            size = output.shape[-1]
            if not isinstance(size, int) or not _linear_producer(node, size):
                continue
            readers = channel_readers(output, channels_last=True)
            if not readers or any(
                consumer_rows(reader, index) is None or reader.op_type == "Conv" or id(reader) in done
                for reader, index in readers
            ):
                continue
            q = rotation(size, self.seed)
            _fold_into_producer(node, q)
            for reader, _ in readers:
                _rotate_consumer(reader, q)
                done.add(id(reader))
            kind = factors(size)[2]
            names = [str(reader.name) for reader, _ in readers]
            self.rotations.append(Rotation(str(output.name), names, size, kind, folded_into=str(node.name)))
        # Then every other eligible consumer: one online transform per input value.
        online: dict[int, tuple[ir.Value, Rotation]] = {}
        for node in list(graph):
            if id(node) in done or node.op_type not in ("MatMul", "Gemm") or consumer_rows(node, 0) is None:
                if node.op_type == "Conv" and consumer_rows(node, 0) is not None:
                    source = node.inputs[0]
                    self.rotations.append(
                        Rotation(
                            str(source.name) if source is not None else "?",
                            [str(node.name)],
                            reason="a Conv reads its channels on axis 1; rotating them needs layout changes",
                        )
                    )
                continue
            source = node.inputs[0]
            shape = source.shape if source is not None else None
            last = shape[-1] if shape is not None and shape.rank() > 0 else None
            size = last if isinstance(last, int) else 0
            if source is None or shape is None or not all(isinstance(d, int) for d in shape) or size < 2:
                name = str(source.name) if source is not None else "?"
                self.rotations.append(Rotation(name, [str(node.name)], reason=f"'{name}' has no static shape"))
                continue
            q = rotation(size, self.seed)
            if id(source) not in online:
                rotated = self._insert_online(graph, node, source, size)
                record = Rotation(str(source.name), [], size, factors(size)[2])
                online[id(source)] = (rotated, record)
                self.rotations.append(record)
            rotated, record = online[id(source)]
            node.replace_input_with(0, rotated)
            _rotate_consumer(node, q)
            record.consumers.append(str(node.name))
        count = sum(1 for item in self.rotations if item.reason is None)
        logger.info("Hadamard: %d rotations (%d folded)", count, sum(1 for r in self.rotations if r.folded_into))
        return ir.passes.PassResult(model, modified=count > 0)

    def _insert_online(self, graph: ir.Graph, before: ir.Node, source: ir.Value, size: int) -> ir.Value:
        """``source @ Q`` in ONNX ops, inserted before ``before``; returns the rotated value."""
        outer, inner, kind = factors(size)
        signs = np.random.default_rng(self.seed + size).choice([-1.0, 1.0], size).astype(np.float32)
        base = f"{source.name}_hadamard"
        m, p = outer.shape[0], inner.shape[0]
        shape_in = add_initializer(graph, f"{base}_shape_in", np.array([-1, m, p], np.int64))
        nodes = []

        def add(op: str, inputs: list[ir.Value], suffix: str, **attributes: Any) -> ir.Value:
            output = ir.Value(name=f"{base}_{suffix}")
            nodes.append(ir.node(op, inputs, attributes=attributes, outputs=[output], name=f"{base}_{suffix}"))
            return output

        # Back to the source's own shape as it is at run time: a model served with dynamic dims (another batch
        # or sequence length under onnxruntime) keeps them.
        shape_out = add("Shape", [source], "shape_out")
        signed = add("Mul", [source, add_initializer(graph, f"{base}_signs_c", signs)], "signed")
        grid = add("Reshape", [signed, shape_in], "grid")  # [rows, m, p]: index i * p + j
        right = add("MatMul", [grid, add_initializer(graph, f"{base}_inner_c", inner.astype(np.float32))], "inner")
        if kind == "kronecker":
            flipped = add("Transpose", [right], "flip", perm=[0, 2, 1])  # [rows, p, m]
            mixed = add(
                "MatMul", [flipped, add_initializer(graph, f"{base}_outer_c", outer.astype(np.float32))], "outer"
            )
            right = add("Transpose", [mixed], "unflip", perm=[0, 2, 1])
        rotated = add("Reshape", [right, shape_out], "out")
        rotated.shape = source.shape
        rotated.type = source.type
        for new in nodes:
            graph.insert_before(before, new)
        return rotated


def _reads_rows(node: ir.Node) -> bool:
    """Whether a linear layer's input holds more than one row (a sequence: leading dims whose product is > 1)."""
    source = node.inputs[0] if node.inputs else None
    shape = source.shape if source is not None else None
    if shape is None or shape.rank() < 2:
        return False
    leading = list(shape)[:-1]
    sizes = [dim for dim in leading if isinstance(dim, int)]
    return len(sizes) < len(leading) or int(np.prod(sizes)) > 1


def channels_in_grid_order(model: ir.Model) -> int:
    """For onnxruntime's file: drop each Kronecker online rotation's last ``Transpose`` (``[rows, p, m]`` back to
    ``[rows, m, p]``), so the rotated row comes out with its channels in grid order (channel ``j m + i`` holds
    channel ``i p + j``), and permute the input rows of the integer weights that read it the same way. The
    products are the same integers: a row's quantization (per tensor, or per row at run time: its largest
    magnitude) does not depend on the order of its channels, nor does an int32 dot product. Only where every
    reader is such a layer: a static ``QuantizeLinear`` -> ``DequantizeLinear`` -> ``MatMul`` / ``Gemm`` by
    per-channel int8 weights, or the per-row chain of :mod:`qcompile.passes.dynamic_rows` ending in
    ``MatMulInteger``. onnxruntime's ``Transpose`` of ``[rows, 4, 144]`` took a fifth of SmolLM2's prefill (53 of
    274 ms for 256 tokens, 2 cores). Returns how many rotations changed."""
    graph = model.graph
    chains: dict[str, list[ir.Node]] = {}  # the per-row chains' nodes, by the value they quantize
    for node in graph:
        source = node.metadata_props.get(ROWS_KEY)
        if source is not None:
            chains.setdefault(source, []).append(node)
    changed = 0
    for unflip in list(graph):
        if unflip.op_type != "Transpose" or not str(unflip.name).endswith("_hadamard_unflip"):
            continue
        mixing = unflip.inputs[0].producer() if unflip.inputs[0] is not None else None
        readers = list(unflip.outputs[0].uses())
        if mixing is None or len(readers) != 1 or readers[0].node.op_type != "Reshape":
            continue
        rotated = readers[0].node.outputs[0]
        outer = mixing.inputs[1].const_value if mixing.inputs[1] is not None else None
        weights = _grid_order_weights(rotated, chains.get(str(rotated.name), []))
        if outer is None or weights is None or rotated.is_graph_output():
            continue
        m = outer.numpy().shape[0]
        first, first_axis = weights[0]
        channels = first.const_value.numpy().shape[first_axis]  # type: ignore[union-attr]
        p = channels // m
        order = np.arange(channels).reshape(m, p).T.reshape(-1)  # grid position j m + i <- channel i p + j
        for weight, axis in weights:
            array = np.take(weight.const_value.numpy(), order, axis=axis)  # type: ignore[union-attr]
            weight.const_value = ir.tensor(np.ascontiguousarray(array), name=weight.name)
        readers[0].node.replace_input_with(0, unflip.inputs[0])
        graph.remove(unflip, safe=True)
        changed += 1
    return changed


def _grid_order_weights(rotated: ir.Value, chain: list[ir.Node]) -> list[tuple[ir.Value, int]] | None:
    """The int8 weight constants of the layers reading ``rotated`` and their input axis, when every reader is
    one whose result does not depend on the order of the rows' channels but through those weights (``chain``:
    the nodes of ``rotated``'s per-row quantization); None otherwise."""
    weights: list[tuple[ir.Value, int]] = []
    for use in rotated.uses():
        node = use.node
        if any(node is member for member in chain):  # the per-row chain: its products' weights, below
            continue
        if node.op_type != "QuantizeLinear" or use.idx != 0 or _size(node.inputs[1]) != 1:
            return None
        for dq_use in node.outputs[0].uses():
            dq = dq_use.node
            if dq.op_type != "DequantizeLinear" or _size(dq.inputs[1]) != 1:
                return None
            for reader in dq.outputs[0].uses():
                found = _dequantized_weight(reader.node) if reader.idx == 0 else None
                if found is None:
                    return None
                weights.append(found)
    for node in chain:
        if node.op_type == "MatMulInteger":
            weight = node.inputs[1]
            if weight is None or weight.const_value is None or len(weight.uses()) != 1 or weight.is_graph_input():
                return None
            weights.append((weight, 0))
        elif any(value is rotated for value in node.inputs) and node.op_type not in ("Abs", "Mul"):
            return None
    if not weights or any(w.const_value is None or w.const_value.shape.rank() != 2 for w, _ in weights):
        return None
    depths = {w.const_value.numpy().shape[axis] for w, axis in weights}  # type: ignore[union-attr]
    if len(depths) != 1 or len({id(w) for w, _ in weights}) != len(weights):
        return None
    return weights


def _size(value: ir.Value | None) -> int | None:
    return None if value is None or value.const_value is None else int(value.const_value.numpy().size)


def _dequantized_weight(node: ir.Node) -> tuple[ir.Value, int] | None:
    """The int8 codes a MatMul or Gemm reads through a per-channel (along its outputs) or per-tensor
    DequantizeLinear, read by nothing else, and their input axis (0 for ``[K, N]``, 1 for a Gemm's transposed
    ``[N, K]``)."""
    if node.op_type not in ("MatMul", "Gemm") or node.inputs[1] is None:
        return None
    transposed = node.op_type == "Gemm" and "transB" in node.attributes and node.attributes["transB"].as_int() == 1
    if node.op_type == "Gemm" and "transA" in node.attributes and node.attributes["transA"].as_int() == 1:
        return None
    dq = node.inputs[1].producer()
    if dq is None or dq.op_type != "DequantizeLinear" or len(node.inputs[1].uses()) != 1:
        return None
    codes = dq.inputs[0]
    axis = dq.attributes["axis"].as_int() if "axis" in dq.attributes else 1
    outputs_axis = 0 if transposed else 1
    if codes is None or codes.const_value is None or len(codes.uses()) != 1:
        return None
    if _size(dq.inputs[1]) != 1 and axis != outputs_axis:
        return None
    return codes, 1 - outputs_axis
