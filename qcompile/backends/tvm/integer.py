# mypy: disable-error-code="valid-type"
# (TVMScript annotates buffers as T.Buffer(shape, dtype), which is not a type to mypy.)
"""The integer-only graph (:mod:`qcompile.backends.integer`) as a Relax module of hand-written int8 kernels.

TVM's ONNX importer widens ``ConvInteger`` / ``MatMulInteger`` to int32 and schedules nothing on the CPU,
so this module lowers the integer graph itself, on the int8 dot products of
:mod:`qcompile.backends.tvm.int8_kernels` (a flavor: AVX-512 VNNI, AVX2, or aarch64 ``sdot``):

- Activations live as uint8 **NHWC** tensors, channels innermost, so that a convolution is a matmul over
  ``(kh, kw, c)``: four consecutive channels are the four bytes one ``vpdpbusd`` sums (the channel count is
  padded to a multiple of four: the stem's three). A tensor read by a padded convolution or pooling is
  stored with that padding around it (filled with the reader's zero point), written by its producer; every
  other reader indexes past the border.
- Anchors: dense and pointwise ``ConvInteger`` and ``MatMulInteger`` run the flavor's register-tile kernel
  (implicit GEMM: the window is addressed in place, no im2col), or, with AMX, those over many contiguous rows
  the tile-register kernel (:func:`_amx_kernel`); depthwise ``ConvInteger`` runs on
  ``vpdpbusd`` over 16 channels (other flavors: int32 multiply-adds); ``MaxPool`` and ``ReduceSum`` over H,
  W are vectorised over channels.
- The elementwise integer ops after an anchor (bias ``Add``, the requantization's ``Cast``, ``Mul``,
  ``Add``, ``Div``, ``Sub``, ``Clip``, ``Cast``; ``Max`` / ``Min`` clamps; the output's float ``Mul``) are
  fused into the anchor's epilogue, on 16-lane vectors, so each layer reads int8 and writes int8 once.
  ``Div`` by a power of two is a shift with ONNX's truncation toward zero; the others are the ops
  themselves, in the same dtypes, so the result is bit-exact with the numpy oracle
  (:mod:`qcompile.backends.integer.reference`). The requantization chain as the lowering writes it has a
  cheaper exact form on 16 lanes (:func:`fast_requantize`).
- Elementwise ops over two tensors (a residual ``Add`` with its rescaling and requantization) and the input
  ``QuantizeLinear`` are one fused elementwise kernel each; a 4-D graph output is copied out NCHW.

Anything else (other ops, batch > 1, a split reduction's ``Slice``, a divisor that is not a power of two)
raises :class:`NotLowerable`; the caller then builds the graph with TVM's ONNX importer instead.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from qcompile.backends.integer.reference import float_node, node_attributes
from qcompile.backends.tvm import blocked, int8_kernels
from qcompile.backends.tvm.script import prim_func
from qcompile.backends.tvm.tensors import (
    LANES,
    Anchor,
    Env,
    Lazy,
    NotLowerable,
    Rows,
    Stored,
    epilogue_env,
    loop_for,
    pack_constants,
    rows_logical,
    store_index,
)
from qcompile.graph import array_digest
from qcompile.runtime import threads  # noqa: F401  (sets up TVM's thread pool)

# Boolean results (comparisons, logic, IsNaN) are uint8 0 / 1 here: a Cast to bool is ``x != 0``.
COMPARISONS = frozenset({"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "IsNaN"})
LOGIC = frozenset({"And", "Or", "Xor", "Not"})
ELEMENTWISE_OPS = frozenset(
    {"Add", "Sub", "Mul", "Div", "Cast", "Clip", "Max", "Min", "PRelu", "Pow", "Where", *COMPARISONS, *LOGIC}
)
# How far apart the readers of one value may meet again for it to stay lazy (see _Lowering._rejoins).
REJOIN_STEPS = 6
# Float functions of one float tensor (float islands), as expressions fused where they are used.
FLOAT_FUNCTIONS = frozenset(
    {
        "Relu",
        "LeakyRelu",
        "Sigmoid",
        "HardSigmoid",
        "HardSwish",
        "Tanh",
        "Erf",
        "Sqrt",
        "Reciprocal",
        "Neg",
        "Cos",
        "Sin",
        "Abs",
        "Round",
    }
)
# Ops that only move data, whatever their dtype: with constant parameters they are one gather through a constant
# index map (:func:`qcompile.backends.tvm.sequence.gather_kernel`), or no kernel at all when the map is the
# identity (a reshape of contiguous data).
MOVEMENT_OPS = frozenset(
    {"Transpose", "Flatten", "Unsqueeze", "Squeeze", "Expand", "GatherND", "GatherElements", "Slice", "Tile",
     "Identity", "Reshape"}
)  # fmt: skip
# The constant exponents Pow is computed for: products (onnxruntime multiplies for 2 and 3 too) and sqrt.
POW_EXPONENTS = frozenset({0.5, 2.0, 3.0})
# Movement ops that keep a tensor's elements in order (a row-major reshape of its leading dims).
SAME_ORDER_OPS = frozenset({"Flatten", "Unsqueeze", "Squeeze", "Identity", "Reshape"})
ONNX_DTYPES: dict[int, str] = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.INT8: "int8",
}


def _source(env: Env) -> Any:
    """An anchor's own value (its accumulator, maximum or sum), before any epilogue op."""
    return env.source


def _leaf_lazy(value: Stored) -> Lazy:
    return Lazy(value.logical, value.dtype, lambda env: env.leaf(0), leaves=[value])


# ------------------------------------------------------------------------------------------ the walk


class _Lowering:
    def __init__(self, model: onnx.ModelProto, flavor: int8_kernels.Flavor, float_flavor: int8_kernels.Flavor) -> None:
        from tvm import relax

        self.relax = relax
        self.model = model
        self.flavor, self.float_flavor = flavor, float_flavor
        self.constants = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
        self.values: dict[str, Stored | Lazy] = {}
        self.uses: dict[str, list[onnx.NodeProto]] = {}
        self.producers = {output: node for node in model.graph.node for output in node.output}
        for node in model.graph.node:
            for name in node.input:
                if name and name not in self.constants:
                    self.uses.setdefault(name, []).append(node)
        self.outputs = [output.name for output in model.graph.output]
        self.functions: dict[str, Any] = {}
        self.nhwc: dict[str, Stored] = {}  # NCHW float graph inputs copied NHWC for float layers
        self.builder = relax.BlockBuilder()
        self.count = 0
        self.shapes = _static_shapes(model)
        self.fused: set[str] = set()  # outputs of nodes another node's kernel computes
        self.images: dict[str, Stored] = {}  # row-major values as the NHWC maps convolutions read
        self.deferred_outputs: dict[str, str] = {}  # a node's output -> its reader's, which it computed too
        # group-wise weights' products (the quantization of their input and the rescaling included) by their
        # MatMulInteger's output: one kernel each
        self.blocked = blocked.matches(
            model.graph, self.producers, self.uses, self.constants, self.shapes, self.outputs
        )
        for item in self.blocked.values():
            self.fused.update(name for node in (*item.quantization, *item.product[1:]) for name in node.output)

    # -- padding each stored tensor gets: the largest its padded readers need
    def _padding(self, name: str) -> tuple[tuple[int, int, int, int], int]:
        pads, fill = (0, 0, 0, 0), None
        for node in self.uses.get(name, []):
            if node.op_type not in ("ConvInteger", "Conv", "MaxPool", "AveragePool"):
                continue
            attributes = node_attributes(node)
            node_pads = tuple(int(p) for p in attributes.get("pads", [0, 0, 0, 0]))
            if len(node_pads) == 2:  # a 1-D convolution runs as a 2-D one of height 1
                node_pads = (0, node_pads[0], 0, node_pads[1])
            if len(node_pads) != 4:
                continue
            top, left, bottom, right = node_pads[0], node_pads[1], node_pads[2], node_pads[3]
            pads = (max(pads[0], top), max(pads[1], left), max(pads[2], bottom), max(pads[3], right))
            if node.op_type == "ConvInteger":
                zero = int(self.constants[node.input[2]]) if len(node.input) > 2 and node.input[2] else 0
            else:
                zero = 0  # max pooling over uint8: 0 never wins against a real code
            if any((top, left, bottom, right)) or node.op_type == "ConvInteger":
                if fill is not None and fill != zero and any(node_pads):
                    raise NotLowerable(f"{name} is padded by readers with different zero points")
                if any(node_pads) or fill is None:
                    fill = zero
        return pads, fill or 0

    def _stored_channels(self, name: str, channels: int) -> int:
        """Channels padded to whole groups of four for a reader that multiplies them by constant weights (its
        kernel reads four at a time); a product of two activations reads its operands unpadded."""
        dense = any(
            n.op_type == "ConvInteger" or (n.op_type == "MatMulInteger" and n.input[1] in self.constants)
            for n in self.uses.get(name, [])
        )
        return -(-channels // 4) * 4 if dense else channels

    def _appended_to(self, name: str) -> bool:
        """Whether every reader of ``name`` concatenates it along an axis other than the channels: a KV cache's
        past positions (``[1, heads, past, head_dim]``, row-major), not an image."""
        readers = self.uses.get(name, [])
        return bool(readers) and all(
            node.op_type == "Concat" and int(node_attributes(node).get("axis", 0)) % 4 != 1 for node in readers
        )

    def run(self) -> Any:
        relax = self.relax
        graph = self.model.graph
        parameters = []
        for tensor in graph.input:
            if tensor.name in self.constants:
                continue
            shape = tuple(d.dim_value for d in tensor.type.tensor_type.shape.dim)
            dtype = ONNX_DTYPES.get(tensor.type.tensor_type.elem_type)
            if dtype is None or not shape or shape[0] != 1 or not all(shape):
                raise NotLowerable(f"input {tensor.name}: a batch-1 input of static shape and a numeric type")
            var = relax.Var(tensor.name, relax.TensorType(shape, dtype))
            parameters.append(var)
            image = len(shape) == 4 and dtype == "float32" and not self._appended_to(tensor.name)
            layout = "nchw" if image else "nc" if len(shape) == 2 else "rows"  # (rows: a view, made below)
            self.values[tensor.name] = Stored(var, shape, dtype, layout)
        with self.builder.function("main", parameters):
            with self.builder.dataflow():
                for name, value in list(self.values.items()):
                    if isinstance(value, Stored) and value.layout == "rows":  # [1, S, D] and the like
                        flat = self.builder.emit(relax.op.reshape(value.var, (int(np.prod(value.logical)),)))
                        self.values[name] = self._as_rows(flat, value.logical, value.dtype)
                for node in graph.node:
                    self._node(node)
                results = []
                for name in self.outputs:
                    value = self._materialize(name, output=True)
                    if isinstance(value.logical, Rows):  # row-major: its bytes, in the graph's shape
                        results.append(relax.op.reshape(self._flat(value), self._shape(name)))
                        continue
                    if value.layout == "nhwc":  # the graph's layout out
                        value = self._to_nchw(value, name)
                    shape = tuple(self._shape(name))
                    if tuple(value.shape) != shape and int(np.prod(value.shape)) == int(np.prod(shape)):
                        # (a 1-D convolution's [1, C, L] stored of height 1; a [1, C, 1, 1] mean stored [1, C])
                        results.append(relax.op.reshape(value.var, shape))
                        continue
                    results.append(value.var)
                result = self.builder.emit_output(results[0] if len(results) == 1 else relax.Tuple(results))
            self.builder.emit_func_output(result)
        return self.builder.get()

    # -- one node
    def _node(self, node: onnx.NodeProto) -> None:
        op = node.op_type
        output = node.output[0]
        if output in self.fused:
            return
        if all(not name or name in self.constants for name in node.input):
            self._fold(node)  # (a position index gathered from a constant table, a constant mask)
            return
        if op == "Shape":  # every shape is static here
            attributes = node_attributes(node)
            dims = self._shape(node.input[0])[int(attributes.get("start", 0)) : attributes.get("end")]
            self.constants[output] = np.array(dims, np.int64)
            return
        rotated = self._rotation(node) if op == "Mul" else None
        if op == "MatMulInteger" and output in self.blocked:
            output = self._blocked_product(self.blocked[output])
        elif rotated is not None:
            output = rotated
        elif op in ELEMENTWISE_OPS:
            self.values[output] = self._elementwise(node)
        elif op == "QuantizeLinear":
            self.values[output] = self._quantize(node)
        elif op == "DequantizeLinear":
            self.values[output] = self._dequantize(node)
        elif op in ("ConvInteger", "Conv"):
            self.values[output] = self._conv(node)
        elif op in ("MatMulInteger", "MatMul", "Gemm"):
            self.values[output] = self._matmul(node)
        elif op in FLOAT_FUNCTIONS:
            self.values[output] = self._float_function(node)
        elif op in ("Gather", "GatherElements", "GatherND") and self._uniform_gather(node):
            return
        elif op == "Gather" and node.input[0] in self.constants:
            table = self.constants[node.input[0]]
            embedding = table.dtype in (np.float32, np.int8) and table.ndim == 2
            self.values[output] = self._embedding(node) if embedding else self._table_lookup(node)
        elif op in ("LayerNormalization", "Softmax", "InstanceNormalization"):
            self.values[output] = self._row_op(node)
        elif op == "ReduceMax" and self.values[node.input[0]].dtype == "float32":
            self.values[output] = self._row_reduce(node)
        elif op == "ReduceMax":
            self._integer_softmax(node)
            return
        elif op == "MaxPool":
            self.values[output] = self._max_pool(node)
        elif op in ("ReduceSum", "GlobalAveragePool", "ReduceMean", "AveragePool", "ReduceL2"):
            self.values[output] = self._reduce(node)
        elif op in ("Reshape", "Flatten") and self._cnn_reshape(node):
            self.values[output] = self._reshape(node)
        elif op in MOVEMENT_OPS or op in ("Gather", "GatherND", "GatherElements"):
            self.values[output] = self._movement(node)
        elif op == "Split":
            for name, part in zip(node.output, self._split(node), strict=True):
                if name:
                    self.values[name] = part
        elif op == "Concat":
            self.values[output] = self._concat(node)
        elif op == "ScatterND":
            self.values[output] = self._scatter(node)
        elif op == "Pad":
            self.values[output] = self._pad(node)
        elif op == "BatchNormalization":
            self.values[output] = self._batch_norm(node)
        elif op == "CumSum":
            self.values[output] = self._cumsum(node)
        elif op == "Resize":
            self.values[output] = self._resize(node)
        else:
            raise NotLowerable(f"{node.name or output} ({op}) has no kernel here")
        if output in self.deferred_outputs:  # (a node that also computed its reader's output)
            self.values[self.deferred_outputs.pop(output)] = self.values[output]
        value = self.values[output]
        if isinstance(value, Lazy) and output not in self.outputs:  # (graph outputs are computed at the end)
            if len(self.uses.get(output, [])) > 1 and not self._rejoins(output):
                self.values[output] = self._materialize(output)  # computed once
            elif op in ("Cast", "QuantizeLinear") and value.dtype == "uint8" and value.anchor is not None:
                # A layer's requantized output is stored as it is, in 8 bits: a residual Add reading it
                # would otherwise store its rescaled int32 form.
                self.values[output] = self._materialize(output)

    def _rejoins(self, name: str) -> bool:
        """Whether the readers of ``name`` (several) all start chains of elementwise ops on constants that meet
        at one elementwise node within :data:`REJOIN_STEPS` steps, each value on the way read once: then
        ``name`` stays lazy and that node's kernel computes it, once per element, instead of storing it for
        several kernels. A GELU ``x * (1 + erf(x / sqrt 2)) / 2`` then runs in its linear layer's epilogue."""
        fusible = ELEMENTWISE_OPS | FLOAT_FUNCTIONS
        chains = []
        for reader in self.uses.get(name, []):
            chain, node = [], reader
            for _ in range(REJOIN_STEPS):
                if node.op_type not in fusible:
                    break
                chain.append(node)
                following = self.uses.get(node.output[0], [])
                if len(following) != 1 or node.output[0] in self.outputs:
                    break
                node = following[0]
            if not chain:
                return False
            chains.append(chain)
        joins = [node for node in chains[0] if all(any(node is other for other in chain) for chain in chains[1:])]
        if not joins:
            return False
        join = joins[0]
        ends = {name}
        for chain in chains:
            before = chain[: next(index for index, node in enumerate(chain) if node is join)]
            path = name
            for node in before:  # read once, on the path and constants only
                if node.output[0] in self.outputs or any(
                    item and item != path and item not in self.constants for item in node.input
                ):
                    return False
                path = node.output[0]
            ends.add(path)
        return all(not item or item in ends or item in self.constants for item in join.input)

    def _operand(self, name: str) -> Stored | Lazy | np.ndarray:
        if name in self.constants:
            return self.constants[name]
        return self.values[name]

    def _materialize(self, name: str, output: bool = False) -> Stored:
        value = self.values[name]
        if isinstance(value, Stored) and value.row_map:  # a view: copied out for readers other than elementwise
            value = _leaf_lazy(value)
        if isinstance(value, Stored):
            return value
        stored = self._emit(value, name, output)
        self.values[name] = stored
        return stored

    # -- per-channel constants
    @staticmethod
    def _per_channel(array: np.ndarray, logical: tuple[int, ...]) -> np.ndarray | None:
        """``array`` as a [C] row if it broadcasts along the channel axis only; None if it is a scalar."""
        if array.size == 1:
            return None
        channels = logical[1]
        squeezed = array.reshape(-1)
        expected = [1] * len(logical)
        expected[1] = channels
        # Broadcasting aligns shapes on the right: [C] is per channel for [1, C] only (for [1, C, H, W] it
        # would run along W).
        shapes = (expected, expected[-len(array.shape) :]) if len(array.shape) < len(expected) else (expected,)
        if squeezed.size != channels or list(array.shape) not in shapes:
            raise NotLowerable(f"a constant of shape {list(array.shape)} does not broadcast per channel")
        return squeezed

    def _elementwise(self, node: onnx.NodeProto) -> Lazy:
        from tvm import tirx

        op = node.op_type
        operands = [self._operand(name) for name in node.input if name]
        if op == "Pow":
            exponent = operands[1] if len(operands) > 1 else None
            if (
                not isinstance(exponent, np.ndarray)
                or exponent.size != 1
                or float(exponent.reshape(-1)[0]) not in POW_EXPONENTS
            ):
                raise NotLowerable(f"{node.name}: Pow is covered by a constant exponent of 2, 3 or 0.5")
        if op == "Cast":
            to_bool = int(node_attributes(node)["to"]) == onnx.TensorProto.BOOL
            to = "uint8" if to_bool else ONNX_DTYPES.get(int(node_attributes(node)["to"]))
            if to is None:
                raise NotLowerable(f"{node.name}: Cast to an unsupported type")
            source = self._as_lazy(operands[0])

            def cast(env: Env, inner: Lazy = source, to: str = to) -> Any:
                value = inner.expression(env)
                if to_bool:
                    value = _broadcasting(tirx.NE, value, tirx.const(0, inner.dtype))
                return tirx.Cast(to if env.lanes == 1 else f"{to}x{env.lanes}", value)

            step = (source, "Cast", to)
            return Lazy(source.logical, to, cast, source.anchor, source.leaves, source.constants, step)
        tensors = [item for item in operands if not isinstance(item, np.ndarray)]
        if not tensors:
            raise NotLowerable(f"{node.name}: an elementwise op on constants only")
        names = [name for name in node.input if name]
        operands = self._uniform_as_scalars(node, names, operands)
        rows = any(isinstance(item.logical, Rows) for item in tensors)
        for attempt in range(2):
            fitted = self._rows_operands(node, operands) if rows else operands
            reads = sum(_reads(item) for item in fitted if isinstance(item, Stored | Lazy))
            if reads <= 2 or attempt:
                break
            # A kernel reads at most two tensors: the operands computed first.
            operands = [
                self._materialize(name) if isinstance(item, Lazy) and item.leaves else item
                for name, item in zip(names, operands, strict=True)
            ]
        operands = fitted
        tensors = [item for item in operands if not isinstance(item, np.ndarray)]  # (constants made tensors too)
        # Two tensor operands: every anchored one is computed first (an anchor's kernel has one source), unless
        # both continue one anchor (a value that rejoins itself, see _rejoins).
        lazies: list[Lazy | np.ndarray] = []
        anchored = [item for item in operands if isinstance(item, Lazy) and item.anchor is not None]
        one_anchor = (
            len(anchored) == len(tensors)
            and len({id(item.anchor) for item in anchored}) == 1
            and not any(item.leaves for item in anchored)
        )
        for index, item in enumerate(operands):
            if isinstance(item, np.ndarray):
                lazies.append(item)
                continue
            if len(tensors) > 1 and isinstance(item, Lazy) and item.anchor is not None and not one_anchor:
                item = self._materialize(node.input[index])
            lazies.append(self._as_lazy(item))
        # The result has the largest operand's shape; a [1, C, 1, 1] operand broadcasts over H, W (an SE gate).
        logical = max((item.logical for item in lazies if isinstance(item, Lazy)), key=lambda shape: np.prod(shape))
        if rows:
            logical = rows_logical(self._shape(node.output[0]))
        dtype = next(item.dtype for item in lazies if isinstance(item, Lazy))
        if op == "Where":  # (the condition's codes are uint8; the values give the dtype)
            dtype = next(item.dtype if isinstance(item, Lazy) else item.dtype.name for item in lazies[1:])
        anchor = next((item.anchor for item in lazies if isinstance(item, Lazy) and item.anchor), None)
        leaves: list[Stored] = []
        constants: list[np.ndarray] = []
        parts: list[Callable[[Env], Any]] = []
        if not rows and len(logical) == 4 and logical[2] == 1 and len(self._shape(node.output[0])) == 3:
            # [1, C, L] stored as a map of height 1: its constants align on [1, C, 1, L]
            lazies = [
                np.expand_dims(item.reshape((1,) * (3 - item.ndim) + item.shape), 2)
                if isinstance(item, np.ndarray) and item.size > 1
                else item
                for item in lazies
            ]
        for item in lazies:
            if isinstance(item, np.ndarray):
                row = self._per_channel(item, logical)
                if row is None:
                    scalar = item.reshape(-1)[0].item()
                    parts.append(functools.partial(_scalar, scalar, dtype))
                else:
                    constants.append(row)
                    parts.append(functools.partial(_row, len(constants) - 1, dtype))
                continue
            per_channel = len(logical) == 4 and item.logical == (1, logical[1], 1, 1)
            if item.logical != logical and not (per_channel and not item.anchor) and not rows:
                raise NotLowerable(f"{node.name}: operands of shapes {item.logical} and {logical}")
            leaf_offset, constant_offset = len(leaves), len(constants)
            leaves += item.leaves
            constants += item.constants

            def shifted(env: Env, inner: Lazy = item, lo: int = leaf_offset, co: int = constant_offset) -> Any:
                raw = env.raw
                return inner.expression(
                    Env(
                        env.source,
                        lambda i: env.leaf(i + lo),
                        lambda i: env.constant(i + co),
                        env.lanes,
                        env.channel,
                        None if raw is None else (lambda i, at: raw(i + co, at)),
                    )
                )

            parts.append(shifted)
        if op == "Div" and dtype != "float32":
            result = self._division(node, lazies, logical, dtype, anchor, leaves, constants, parts)
        else:
            bounds = [bool(name) for name in node.input[1:3]]
            if op == "Clip" and bounds != [True, True]:  # one bound (SwinV2's clamp_min): a Max or a Min
                if bounds not in ([True], [True, False], [False, True]):
                    raise NotLowerable(f"{node.name}: Clip without bounds")
                op = "Max" if bounds[0] else "Min"
            combine = _combiner(op, node, dtype)
            if op in COMPARISONS or op in LOGIC:
                dtype = "uint8"
            result = Lazy(logical, dtype, lambda env: combine([part(env) for part in parts]), anchor, leaves, constants)
        if isinstance(lazies[0], Lazy) and all(isinstance(item, np.ndarray) for item in lazies[1:]):
            result.step = (lazies[0], op, lazies[1:])
        return result

    @staticmethod
    def _division(
        node: onnx.NodeProto,
        lazies: list[Any],
        logical: tuple[int, ...],
        dtype: str,
        anchor: Anchor | None,
        leaves: list[Stored],
        constants: list[np.ndarray],
        parts: list[Callable[[Env], Any]],
    ) -> Lazy:
        """Integer ``Div`` by a constant power of two, truncating toward zero as ONNX does: ``(x + ((x >> (b -
        1)) & (d - 1))) >> log2 d`` (b the width), a shift where a vector division does not exist."""
        from tvm import tirx

        divisor = lazies[1]
        if not isinstance(divisor, np.ndarray) or not isinstance(lazies[0], Lazy) or dtype not in ("int32", "int64"):
            raise NotLowerable(f"{node.name}: Div is covered by an integer constant only")
        flat = divisor.reshape(-1).astype(np.int64)
        if np.any(flat <= 0) or np.any(flat & (flat - 1)):
            raise NotLowerable(f"{node.name}: Div by a constant that is not a power of two")
        shifts = np.log2(flat).round().astype(np.int64).reshape(divisor.shape)
        row = _Lowering._per_channel(shifts, logical)
        width = 64 if dtype == "int64" else 32
        if row is None:
            shift = int(shifts.reshape(-1)[0])

            def by_scalar(env: Env) -> Any:
                x = parts[0](env)
                mask = tirx.const((1 << shift) - 1, dtype)
                return (x + ((x >> tirx.const(width - 1, dtype)) & mask)) >> tirx.const(shift, dtype)

            return Lazy(logical, dtype, by_scalar, anchor, leaves, constants)
        index = len(constants)
        constants = [*constants, row.astype(np.dtype(dtype))]

        def by_channel(env: Env) -> Any:
            x = parts[0](env)
            n = _constant_as(env, index, dtype)
            one = tirx.const(1, dtype)
            return (x + ((x >> tirx.const(width - 1, dtype)) & ((one << n) - one))) >> n

        return Lazy(logical, dtype, by_channel, anchor, leaves, constants)

    def _as_lazy(self, item: Stored | Lazy | np.ndarray) -> Lazy:
        if isinstance(item, Lazy):
            return item
        if isinstance(item, Stored):
            return _leaf_lazy(item)
        raise NotLowerable("a constant where a tensor was expected")

    def _quantize(self, node: onnx.NodeProto) -> Lazy:
        """QuantizeLinear of a float value: the graph's input image, or a float layer's output (its epilogue)."""
        from tvm import tirx

        source = self.values[node.input[0]]
        scale = self.constants[node.input[1]]
        zero = self.constants[node.input[2]] if len(node.input) > 2 and node.input[2] else np.uint8(0)
        if scale.size != 1 or zero.size != 1 or zero.dtype != np.uint8:
            raise NotLowerable("QuantizeLinear with a per-channel scale or a non-uint8 zero point")
        if source.dtype != "float32":
            raise NotLowerable(f"{node.name}: QuantizeLinear of a {source.dtype} value")
        inner = self._as_lazy(source)

        def quantize(env: Env) -> Any:
            scaled = tirx.nearbyint(inner.expression(env) / tirx.const(float(scale), "float32"))  # half to even
            shifted = scaled + tirx.const(float(zero), "float32")
            return tirx.Cast(
                "uint8" if env.lanes == 1 else f"uint8x{env.lanes}", tirx.max(tirx.min(shifted, 255.0), 0.0)
            )

        return Lazy(inner.logical, "uint8", quantize, inner.anchor, inner.leaves, inner.constants)

    def _dequantize(self, node: onnx.NodeProto) -> Lazy:
        """DequantizeLinear of uint8 codes into a float layer: ``(float(q) - z) * s``, as the oracle computes it."""
        from tvm import tirx

        inner = self._as_lazy(self.values[node.input[0]])
        scale = self.constants[node.input[1]]
        zero = self.constants[node.input[2]] if len(node.input) > 2 and node.input[2] else np.uint8(0)
        if inner.dtype != "uint8" or scale.size != 1 or zero.size != 1:
            raise NotLowerable(f"{node.name}: DequantizeLinear is covered on per-tensor uint8 codes")

        def dequantize(env: Env) -> Any:
            real = tirx.Cast("float32" if env.lanes == 1 else f"float32x{env.lanes}", inner.expression(env))
            return (real - tirx.const(float(zero), "float32")) * tirx.const(float(scale), "float32")

        return Lazy(inner.logical, "float32", dequantize, inner.anchor, inner.leaves, inner.constants)

    def _float_function(self, node: onnx.NodeProto) -> Lazy:
        """ReLU, leaky ReLU, sigmoid, hard sigmoid / swish or tanh of a float value, fused into its producer's
        epilogue."""
        from tvm import tirx

        inner = self._as_lazy(self.values[node.input[0]])
        if inner.dtype != "float32":
            raise NotLowerable(f"{node.name} ({node.op_type}) of a {inner.dtype} value")
        op, attributes = node.op_type, node_attributes(node)
        alpha = float(attributes.get("alpha", {"HardSwish": 1.0 / 6.0, "LeakyRelu": 0.01}.get(op, 0.2)))
        beta = float(attributes.get("beta", 0.5))

        def function(env: Env) -> Any:
            x = inner.expression(env)
            one, zero = tirx.const(1.0, "float32"), tirx.const(0.0, "float32")
            if op == "Relu":
                return tirx.max(x, zero)
            if op == "LeakyRelu":
                return tirx.max(x, zero) + tirx.min(x, zero) * tirx.const(alpha, "float32")
            if op == "Sigmoid":
                from qcompile.backends.tvm.sequence import fast_exp

                return one / (one + fast_exp(zero - x, env.lanes))
            if op == "Tanh":
                from qcompile.backends.tvm.sequence import fast_tanh

                return fast_tanh(x, env.lanes)
            if op == "Sqrt":
                return tirx.sqrt(x)
            if op == "Reciprocal":
                return one / x
            if op == "Neg":
                return zero - x
            if op in ("Cos", "Sin"):  # rotary embeddings of positions given at run time (a decode step's)
                return tirx.cos(x) if op == "Cos" else tirx.sin(x)
            if op == "Abs":  # (a row's range, for per-row quantization at run time)
                return tirx.abs(x)
            if op == "Round":  # half to even, as ONNX's Round
                return tirx.nearbyint(x)
            if op == "Erf":
                from qcompile.backends.tvm.sequence import fast_erf

                return fast_erf(x, env.lanes)
            gate = tirx.min(tirx.max(x * tirx.const(alpha, "float32") + tirx.const(beta, "float32"), zero), one)
            return gate if op == "HardSigmoid" else x * gate

        return Lazy(inner.logical, "float32", function, inner.anchor, inner.leaves, inner.constants)

    def _resize(self, node: onnx.NodeProto) -> Stored | Lazy:
        """Resize of a map by constant scales or sizes. Nearest: a gather through the index map the op makes of
        the positions (any dtype, codes too). Linear and cubic: each is a linear map of the input, separable
        over H and W, so each axis's taps and weights are read off the op applied (by onnxruntime, now) to a
        one-hot basis, and one kernel sums the taps (SegFormer's bilinear upsampling), epilogue fused."""
        extra = [name for name in node.input[1:] if name]
        if any(name not in self.constants for name in extra):
            raise NotLowerable(f"{node.name} (Resize) with scales or sizes computed at run time")
        attributes = node_attributes(node)
        mode = attributes.get("mode", b"nearest")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        shape, out = self._shape(node.input[0]), self._shape(node.output[0])
        if len(shape) != 4 or shape[:2] != out[:2] or shape[0] != 1:
            raise NotLowerable(f"{node.name}: Resize is covered over the H and W of a [1, C, H, W] map")
        if mode == "nearest":
            source = self._moved_source(node.input[0])
            positions = _positions(source, shape).astype(np.int32)  # (onnxruntime resizes int32, not int64)
            given = {node.input[0]: positions, **{name: self.constants[name] for name in extra}}
            return self._gathered(source, self._evaluate(node, given)[0].astype(np.int64))
        source = self._float_input(node.input[0])
        if isinstance(source.logical, Rows):
            source = self._image_of_rows(node.input[0], source)
        taps = []
        for axis in (2, 3):  # each axis alone: a one-hot basis of its size, resized by the node's own settings
            size, resized = shape[axis], out[axis]
            basis = np.eye(size, dtype=np.float32).reshape((1, size, size, 1) if axis == 2 else (1, size, 1, size))
            scales = self.constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if scales is not None and scales.size == 4:  # (the coordinates follow the given scale, not out / in)
                setting = np.array((1, 1, scales[2], 1) if axis == 2 else (1, 1, 1, scales[3]), np.float32)
                inputs = [node.input[0], "", "qcompile_setting"]
            else:
                setting = np.array((1, size, resized, 1) if axis == 2 else (1, size, 1, resized), np.int64)
                inputs = [node.input[0], "", "", "qcompile_setting"]
            single = onnx.helper.make_node(
                "Resize", inputs, [node.output[0]], name=node.name,
                **{key: value for key, value in attributes.items() if key != "axes"},
            )  # fmt: skip
            weights = self._evaluate(single, {node.input[0]: basis, "qcompile_setting": setting})[0]
            if weights.size != size * resized:
                raise NotLowerable(f"{node.name}: Resize whose scales give other sizes than the graph's")
            matrix = weights.reshape(size, resized).T  # [output, input]
            count = max(int((np.abs(matrix) > 0).sum(axis=1).max()), 1)
            index = np.zeros((resized, count), np.int32)
            value = np.zeros((resized, count), np.float32)
            for row in range(resized):
                (nonzero,) = np.nonzero(matrix[row])
                index[row, : nonzero.size], value[row, : nonzero.size] = nonzero, matrix[row, nonzero]
            taps.append((index, value))
        logical = (1, shape[1], out[2], out[3])
        anchor = Anchor("resize", source, logical, "float32", factors=(*taps[0], *taps[1]))
        return Lazy(logical, "float32", _source, anchor)

    def _cumsum(self, node: onnx.NodeProto) -> Lazy:
        """CumSum along the last axis of row-major data (RoBERTa's and MPNet's position ids, counted from the
        padding mask): a scan along each row in the input's dtype, epilogue fused."""
        shape = self._shape(node.input[0])
        axis = self.constants.get(node.input[1])
        if not shape or axis is None or axis.size != 1 or int(axis.reshape(-1)[0]) % len(shape) != len(shape) - 1:
            raise NotLowerable(f"{node.name}: CumSum is covered along the last axis, by a constant axis")
        source = self._materialize(node.input[0])
        if not isinstance(source.logical, Rows) or source.row_map or source.channels != source.logical[1]:
            source = self._gathered(source, _positions(source, shape))
        attributes = node_attributes(node)
        terms = (int(attributes.get("exclusive", 0)), int(attributes.get("reverse", 0)))
        anchor = Anchor("cumsum", source, source.logical, source.dtype, terms=terms)
        return Lazy(source.logical, source.dtype, _source, anchor)

    def _batch_norm(self, node: onnx.NodeProto) -> Lazy:
        """Inference BatchNormalization the normalizer could not fold into a convolution (LeViT's, after a
        linear layer on flattened tokens): ``x * a + b`` per channel, in the producer's epilogue."""
        inner = self._as_lazy(self.values[node.input[0]])
        parameters = [self.constants.get(name) for name in node.input[1:5]]
        channels = inner.logical[1]
        if inner.dtype != "float32" or any(item is None or item.size != channels for item in parameters):
            raise NotLowerable(f"{node.name}: BatchNormalization is covered on floats, with constant [C] statistics")
        if any(name for name in node.output[1:]):
            raise NotLowerable(f"{node.name}: BatchNormalization's training outputs")
        if len(self._shape(node.input[0])) > 2 and isinstance(inner.logical, Rows):
            raise NotLowerable(f"{node.name}: BatchNormalization over the channels of row-major [N, C, L] data")
        gamma, beta, mean, variance = (np.asarray(item, np.float64).reshape(-1) for item in parameters)  # type: ignore[arg-type]
        scale = gamma / np.sqrt(variance + float(node_attributes(node).get("epsilon", 1e-5)))
        row = len(inner.constants)
        constants = [*inner.constants, scale.astype(np.float32), (beta - mean * scale).astype(np.float32)]

        def affine(env: Env) -> Any:
            return inner.expression(env) * env.constant(row) + env.constant(row + 1)

        return Lazy(inner.logical, "float32", affine, inner.anchor, inner.leaves, constants)

    def _table_lookup(self, node: onnx.NodeProto) -> Lazy:
        """A 256-entry uint8 table read at codes (a function of one activation: sigmoid, tanh, hard swish, GELU):
        the table travels as a constant row, gathered per lane in the epilogue."""
        from tvm import tirx

        table = self.constants.get(node.input[0])
        indices = self.values.get(node.input[1])
        if table is None or table.dtype != np.uint8 or table.shape != (256,) or indices is None:
            raise NotLowerable(f"{node.name}: Gather is covered as a 256-entry uint8 table read at codes")
        if int(node_attributes(node).get("axis", 0)) != 0 or indices.dtype not in ("int32", "int64"):
            raise NotLowerable(f"{node.name}: Gather is covered as a 256-entry uint8 table read at codes")
        inner = self._as_lazy(indices)
        row = len(inner.constants)

        def lookup(env: Env) -> Any:
            assert env.raw is not None
            at = tirx.Cast("int32" if env.lanes == 1 else f"int32x{env.lanes}", inner.expression(env))
            return tirx.Cast("uint8" if env.lanes == 1 else f"uint8x{env.lanes}", env.raw(row, at))

        constants = [*inner.constants, table.astype(np.int32)]
        return Lazy(inner.logical, "uint8", lookup, inner.anchor, inner.leaves, constants)

    def _float_input(self, name: str) -> Stored:
        """A float value as a float layer reads it: stored NHWC (the graph's NCHW input copied once, with the
        border its readers need), or [1, C] rows."""
        value = self.values[name]
        if value.dtype != "float32":
            raise NotLowerable(f"{name}: a float layer reads a {value.dtype} value")
        if isinstance(value, Stored) and value.layout == "nchw":
            if name not in self.nhwc:
                self.nhwc[name] = self._emit(_leaf_lazy(value), name, output=False)
            return self.nhwc[name]
        return self._materialize(name)

    def _image_of_rows(self, name: str, source: Stored) -> Stored:
        """A row-major value of ONNX shape ``[1, C, H, W]`` (tokens turned back into a map: SegFormer's and
        CvT's ``[1, HW, C]`` transposed and reshaped) or ``[1, C, L]`` (a 1-D convolution's input) as the NHWC
        map a convolution reads: one gather into H, W, C order, then the map with the border its readers need."""
        shape = self._shape(name)
        if len(shape) == 3:  # [1, C, L]: the map of height 1 a 1-D convolution reads
            shape = (shape[0], shape[1], 1, shape[2])
        if len(shape) != 4 or shape[0] != 1:
            raise NotLowerable(f"{name}: a convolution of row-major data of shape {list(shape)}")
        if name not in self.images:
            _, channels, height, width = shape
            order = np.arange(channels * height * width, dtype=np.int64).reshape(shape).transpose(0, 2, 3, 1)
            rows = self._gathered(source, order)
            image = self._rows_as_image(rows, (1, height, width, channels), [0, 3, 1, 2], name)
            if image is None:
                raise NotLowerable(f"{name}: a convolution of row-major data that is not contiguous")
            self.images[name] = image
        return self.images[name]

    def _float_weights(self, node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray | None]:
        """A float layer's constant float32 weights and bias (None: no bias)."""
        weights = self.constants.get(node.input[1])
        bias_name = node.input[2] if len(node.input) > 2 else ""
        bias = self.constants.get(bias_name) if bias_name else None
        if weights is None or weights.dtype != np.float32 or (bias_name and (bias is None or bias.dtype != np.float32)):
            raise NotLowerable(f"{node.name}: a float {node.op_type} needs constant float32 weights and bias")
        return weights, bias

    def _conv(self, node: onnx.NodeProto) -> Lazy:
        """ConvInteger (int8 weights, uint8 codes) or a Conv kept in float (float islands): dense or depthwise."""
        attributes = node_attributes(node)
        bias: np.ndarray | None = None
        if node.op_type == "Conv":
            weights, bias = self._float_weights(node)
            source, zero, accumulator = self._float_input(node.input[0]), 0, "float32"
        else:
            source, accumulator = self._materialize(node.input[0]), "int32"
            weights = self.constants.get(node.input[1])  # type: ignore[assignment]
            if weights is None or weights.dtype != np.int8:
                raise NotLowerable(f"{node.name}: ConvInteger needs constant int8 weights")
            if len(node.input) > 3 and node.input[3] and np.any(self.constants[node.input[3]]):
                raise NotLowerable(f"{node.name}: weight zero points are not covered (weights are symmetric)")
            zero = int(self.constants[node.input[2]]) if len(node.input) > 2 and node.input[2] else 0
        if weights.ndim == 3:  # over one axis (audio front ends, ConvBERT): a 2-D convolution of height 1
            weights = weights[:, :, None, :]
            attributes = {
                **attributes,
                "pads": [0, *attributes.get("pads", [0, 0])[:1], 0, *attributes.get("pads", [0, 0])[1:]],
                "strides": [1, *attributes.get("strides", [1])],
                "dilations": [1, *attributes.get("dilations", [1])],
            }
        if weights.ndim != 4:
            raise NotLowerable(f"{node.name}: a {weights.ndim - 2}-D convolution (1-D and 2-D ones are covered)")
        if isinstance(source.logical, Rows):
            source = self._image_of_rows(node.input[0], source)
        if any(d != 1 for d in attributes.get("dilations", [1, 1])) or attributes.get("auto_pad", b"NOTSET") not in (
            b"NOTSET",
            "NOTSET",
        ):
            raise NotLowerable(f"{node.name}: dilation / auto_pad are not covered")
        pointwise = (
            weights.shape[2:] == (1, 1) and not any(attributes.get("pads", [0])) and source.logical[2:] == (1, 1)
        )
        if source.layout != "nhwc" and not (source.layout == "nc" and pointwise):  # (a 1 x 1 map is a row)
            raise NotLowerable(f"{node.name}: input is not an NHWC activation")
        _, channels, height, width = source.logical
        out_channels, per_group, kh, kw = weights.shape
        group = int(attributes.get("group", 1))
        pads = tuple(int(p) for p in attributes.get("pads", [0, 0, 0, 0]))
        strides = tuple(int(s) for s in attributes.get("strides", [1, 1]))
        oh = (height + pads[0] + pads[2] - kh) // strides[0] + 1
        ow = (width + pads[1] + pads[3] - kw) // strides[1] + 1
        if group == 1 and per_group == channels:
            kind = "conv"
        elif group == channels == out_channels and per_group == 1:
            kind = "depthwise"
        elif group <= MAX_DENSE_GROUPS and per_group * group == channels and out_channels % group == 0:
            kind, weights = "conv", _block_diagonal(weights, group)
        else:
            raise NotLowerable(
                f"{node.name}: grouped convolution (group {group}, more than {MAX_DENSE_GROUPS}) that is not depthwise"
            )
        logical = (1, out_channels, oh, ow)
        anchor = Anchor(
            kind, source, logical, accumulator, weights, zero, (kh, kw), (strides[0], strides[1]),
            (pads[0], pads[1], pads[2], pads[3]), bias,
        )  # fmt: skip
        return Lazy(logical, accumulator, _source, anchor)

    def _matmul(self, node: onnx.NodeProto) -> Lazy:
        """MatMulInteger of [1, K] codes by int8 weights, or a MatMul / Gemm kept in float on [1, K] rows."""
        bias: np.ndarray | None = None
        if node.op_type in ("MatMulInteger", "MatMul") and node.input[1] not in self.constants:
            return self._batched_matmul(node)
        if node.op_type == "MatMulInteger":
            source, accumulator, dtype = self._materialize(node.input[0]), "int32", "uint8"
            weights = self.constants.get(node.input[1])
            if weights is None or weights.dtype != np.int8 or weights.ndim != 2:
                raise NotLowerable(f"{node.name}: MatMulInteger needs constant 2-D int8 weights")
            if len(node.input) > 3 and node.input[3] and np.any(self.constants[node.input[3]]):
                raise NotLowerable(f"{node.name}: weight zero points are not covered")
            zero = int(self.constants[node.input[2]]) if len(node.input) > 2 and node.input[2] else 0
        else:
            source, accumulator, dtype, zero = self._float_input(node.input[0]), "float32", "float32", 0
            weights, bias = self._float_weights(node)
            attributes = node_attributes(node)
            if attributes.get("transA", 0) or attributes.get("alpha", 1.0) != 1.0 or attributes.get("beta", 1.0) != 1.0:
                raise NotLowerable(f"{node.name}: a float Gemm with transA / alpha / beta")
            if weights.ndim != 2:
                raise NotLowerable(f"{node.name}: a float {node.op_type} with {weights.ndim}-D weights")
            weights = weights.T if attributes.get("transB", 0) else weights
            if bias is not None:
                bias = np.broadcast_to(bias.reshape(-1), (weights.shape[1],)).astype(np.float32)
        if isinstance(source.logical, Rows):  # [..., K] rows: a 1 x 1 convolution over a map of one row
            if source.dtype != dtype or source.logical[1] != weights.shape[0]:
                raise NotLowerable(f"{node.name}: {node.op_type} of {source.dtype} rows of {source.logical[1]}")
            rows = Rows((1, weights.shape[1], 1, source.logical[3]))
            anchor = Anchor("conv", source, rows, accumulator, weights.T[:, :, None, None], zero, offset=bias)
            return Lazy(rows, accumulator, _source, anchor)
        if source.layout != "nc" or source.dtype != dtype or source.logical[1] != weights.shape[0]:
            raise NotLowerable(f"{node.name}: {node.op_type} is covered on [1, K] {dtype} rows only")
        logical = (1, weights.shape[1])
        anchor = Anchor("matmul", source, logical, accumulator, weights.T[:, :, None, None], zero, offset=bias)
        return Lazy(logical, accumulator, _source, anchor)

    def _blocked_product(self, item: blocked.Match) -> str:
        """A linear layer with group-wise weights, from its float input on (:mod:`qcompile.backends.tvm.blocked`);
        returns the name of its float output."""
        source = self._float_input(item.x)
        logical = rows_logical(self._shape(item.output))
        self.values[item.output] = Lazy(logical, "float32", _source, blocked.anchor(source, item, logical))
        return item.output

    def _single_reader(self, name: str, op: str) -> onnx.NodeProto | None:
        readers = self.uses.get(name, [])
        if len(readers) != 1 or readers[0].op_type != op or name in self.outputs:
            return None
        return readers[0]

    def _rotation(self, node: onnx.NodeProto) -> str | None:
        """The online Hadamard rotation :mod:`qcompile.passes.hadamard` inserts — Mul by the signs, Reshape to
        ``[rows, m, p]``, MatMul by the inner factor, (Transpose, MatMul by the outer factor, Transpose,) Reshape
        back — as one kernel (:func:`qcompile.backends.tvm.sequence.rotation_kernel`) whose epilogue continues
        with what reads it (the quantization of the rotated input). Returns the rotated value's name; None, and
        nothing done, for another Mul."""
        x, signs = node.input[0], self.constants.get(node.input[1])
        value = self.values.get(x)
        if signs is None or value is None or not isinstance(value.logical, Rows) or value.dtype != "float32":
            return None
        chain = [node]
        for op in ("Reshape", "MatMul"):
            reader = self._single_reader(chain[-1].output[0], op)
            if reader is None or reader.input[0] != chain[-1].output[0]:
                return None
            chain.append(reader)
        inner = self.constants.get(chain[-1].input[1])
        outer = None
        flip = self._single_reader(chain[-1].output[0], "Transpose")
        if flip is not None:
            mixing = self._single_reader(flip.output[0], "MatMul")
            unflip = self._single_reader(mixing.output[0], "Transpose") if mixing is not None else None
            if mixing is None or unflip is None:
                return None
            outer = self.constants.get(mixing.input[1])
            chain += [flip, mixing, unflip]
        last = self._single_reader(chain[-1].output[0], "Reshape")
        if last is None or inner is None or (flip is not None and outer is None):
            return None
        chain.append(last)
        channels = value.logical[1]
        grid = self.shapes.get(chain[1].output[0], ())
        p = inner.shape[0] if inner.ndim == 2 else 0
        m = channels // p if p else 0
        square = inner.shape == (p, p) and (outer is None or outer.shape == (m, m))
        if not square or len(grid) != 3 or grid[1:] != (m, p) or signs.size != channels or m * p != channels:
            return None
        if self.shapes.get(last.output[0]) != self._shape(x):
            return None
        transposes = [n for n in chain if n.op_type == "Transpose"]
        if any(list(node_attributes(t).get("perm", [])) != [0, 2, 1] for t in transposes):
            return None
        source = self._float_input(x)
        if source.shape != (1, value.logical[3], channels):
            return None
        mix = np.eye(m, dtype=np.float32) if outer is None else outer.astype(np.float32)
        factors = (signs.reshape(-1).astype(np.float32), inner.astype(np.float32), mix)
        anchor = Anchor("rotation", source, source.logical, "float32", factors=factors)
        self.values[last.output[0]] = Lazy(source.logical, "float32", _source, anchor)
        self.fused.update(n.output[0] for n in chain)
        return last.output[0]

    def _batched_matmul(self, node: onnx.NodeProto) -> Lazy:
        """MatMulInteger of two activations ``[..., M, K] x [..., K, N]`` (attention's ``Q K^T`` and ``P V``),
        with scalar uint8 zero points, or the float MatMul of two activations (an attention kept float)."""
        left, right = self._shape(node.input[0]), self._shape(node.input[1])
        # B broadcast over A's batch dims (multi-query attention: one key and value head for every query head,
        # as optimum exports Falcon): B expanded first, by a gather
        expanded = None
        if len(left) >= 2 and len(right) >= 2 and left[:-2] != right[:-2]:
            try:
                batch = np.broadcast_shapes(left[:-2], right[:-2])
            except ValueError:
                batch = None
            if batch == tuple(left[:-2]):
                expanded = (*left[:-2], *right[-2:])
        if len(left) < 2 or (left[:-2] != right[:-2] and expanded is None) or left[-1] != right[-2]:
            raise NotLowerable(f"{node.name}: MatMulInteger of shapes {list(left)} and {list(right)}")
        zeros = []
        for position in (2, 3):
            name = node.input[position] if len(node.input) > position else ""
            zero = self.constants.get(name, np.uint8(0)) if name else np.uint8(0)
            if (name and name not in self.constants) or np.asarray(zero).size != 1:
                raise NotLowerable(f"{node.name}: MatMulInteger with zero points that are not scalar constants")
            zeros.append(int(np.asarray(zero).reshape(-1)[0]))
        # (an operand may be a constant: SigLIP's pooling probe, projected and scaled, folds into one)
        transposed = self._transposed_operand(node, left, right) if expanded is None else None
        a = self._product_operand(node.input[0])
        # B^T's rows, read as the dot instruction packs them: no transpose kernel
        b = transposed if transposed is not None else self._product_operand(node.input[1])
        if expanded is not None:
            b = self._gathered(b, np.broadcast_to(_positions(b, right), expanded))
            right = expanded
        dtype, accumulator = ("uint8", "int32") if node.op_type == "MatMulInteger" else ("float32", "float32")
        stored_right = (*right[:-2], right[-1], right[-2]) if transposed is not None else right
        for operand, shape in ((a, left), (b, stored_right)):
            if operand.dtype != dtype or operand.shape != (1, int(np.prod(shape[:-1])), shape[-1]):
                raise NotLowerable(f"{node.name}: {node.op_type} of activations is covered on unpadded {dtype} rows")
        logical = rows_logical((*left[:-1], right[-1]))
        anchor = Anchor(
            "bmm",
            a,
            logical,
            accumulator,
            zero_point=zeros[0],
            other=b,
            other_zero=zeros[1],
            other_transposed=transposed is not None,
        )
        return Lazy(logical, accumulator, _source, anchor)

    def _product_operand(self, name: str) -> Stored:
        """An operand of a product of activations: stored, or a constant as rows."""
        return self._constant_rows(name) if name in self.constants else self._materialize(name)

    def _transposed_operand(self, node: onnx.NodeProto, left: tuple[int, ...], right: tuple[int, ...]) -> Stored | None:
        """For ``MatMulInteger(A, B)`` with ``B`` a Transpose of its last two axes (through reshapes that keep
        them: attention's ``Q K^T``), the untransposed operand's rows when the flavor's dot instruction can pack
        them directly (four consecutive bytes of a row are one column's group: 32-bit loads), else None."""
        flavor = self.flavor
        if node.op_type != "MatMulInteger" or flavor.group != 4 or flavor.weight_dtype != "int8":
            return None
        if left[-1] % 4 or right[-1] % flavor.lanes or node.input[1] in self.constants:
            return None
        producer = self.producers.get(node.input[1])
        while producer is not None and producer.op_type in ("Reshape", "Squeeze", "Unsqueeze", "Identity"):
            shape = self._shape(producer.input[0])
            if tuple(shape[-2:]) != tuple(right[-2:]) or int(np.prod(shape)) != int(np.prod(right)):
                return None
            producer = self.producers.get(producer.input[0])
        if producer is None or producer.op_type != "Transpose":
            return None
        shape = self._shape(producer.input[0])
        perm = [int(axis) for axis in node_attributes(producer).get("perm", [])]
        rank = len(shape)
        if rank < 2 or perm != [*range(rank - 2), rank - 1, rank - 2] or tuple(shape[-2:]) != (right[-1], right[-2]):
            return None
        source = self.values.get(producer.input[0])
        if not isinstance(source, Stored) or not isinstance(source.logical, Rows) or source.dtype != "uint8":
            return None
        if not _contiguous(source) or source.shape != (1, int(np.prod(shape[:-1])), shape[-1]):
            return None
        return source

    def _max_pool(self, node: onnx.NodeProto) -> Lazy:
        attributes = node_attributes(node)
        source = self._materialize(node.input[0])
        pads = tuple(int(p) for p in attributes.get("pads", [0, 0, 0, 0]))
        # A float map's border would have to hold -inf, not the 0 that no uint8 code loses to: float pooling is
        # covered unpadded (BiT pads with an explicit Pad of zeros first).
        covered = source.dtype == "uint8" or (source.dtype == "float32" and not any(pads))
        if not covered or source.layout != "nhwc" or attributes.get("ceil_mode", 0):
            raise NotLowerable(
                f"{node.name}: MaxPool is covered on uint8 NHWC activations, or unpadded float ones, without ceil_mode"
            )
        kh, kw = (int(k) for k in attributes["kernel_shape"])
        strides = tuple(int(s) for s in attributes.get("strides", [1, 1]))
        _, channels, height, width = source.logical
        oh = (height + pads[0] + pads[2] - kh) // strides[0] + 1
        ow = (width + pads[1] + pads[3] - kw) // strides[1] + 1
        logical = (1, channels, oh, ow)
        anchor = Anchor(
            "maxpool", source, logical, source.dtype, None, 0, (kh, kw), (strides[0], strides[1]),
            (pads[0], pads[1], pads[2], pads[3]),
        )  # fmt: skip
        return Lazy(logical, source.dtype, _source, anchor)

    def _reduce(self, node: onnx.NodeProto) -> Stored | Lazy:
        """ReduceSum over H, W (of codes or an accumulator, in its dtype), or a float layer's mean over H, W
        (GlobalAveragePool, ReduceMean of floats, an AveragePool whose one window is the map): the sum, scaled
        by 1 / (H W)."""
        from tvm import tirx

        mean = node.op_type != "ReduceSum"
        image: Stored | None = None
        if isinstance(self.values[node.input[0]].logical, Rows):
            shape = self._shape(node.input[0])
            if node.op_type == "AveragePool":  # a map kept as rows (after a GroupNorm's reshapes)
                return self._average_pool(node, self._image_of_rows(node.input[0], self._materialize(node.input[0])))
            if not (len(shape) == 4 and shape[0] == 1 and self._reduces_h_w(node)):
                return self._row_reduce(node)
            # over H, W of a map kept as rows (PoolFormer's head): the map's channel means
            image = self._image_of_rows(node.input[0], self._materialize(node.input[0]))
        if node.op_type == "ReduceL2":
            raise NotLowerable(f"{node.name}: ReduceL2 is covered over the last or the leading axes of row-major data")
        if image is not None:
            source = image
        else:
            source = self._float_input(node.input[0]) if mean else self._materialize(node.input[0])
        attributes = node_attributes(node)
        if node.op_type == "AveragePool":  # one window over the whole map (pooling heads written with a big kernel)
            kernel, pads = attributes.get("kernel_shape", []), attributes.get("pads", [0, 0, 0, 0])
            if any(pads) or len(kernel) != 2 or kernel[0] < source.logical[2] or kernel[1] < source.logical[3]:
                return self._average_pool(node, source)
            attributes = {"axes": [2, 3], "keepdims": 1}
        axes = list(attributes.get("axes", [2, 3] if node.op_type == "GlobalAveragePool" else []))
        if len(node.input) > 1 and node.input[1]:
            axes = [int(a) for a in self.constants[node.input[1]]]
        axes = sorted(int(a) % 4 for a in axes)
        if axes in ([2], [3]) and attributes.get("keepdims", 1):
            # over H, then over W by its one reader (FocalNet's global context, x.mean(2).mean(3)): one mean
            # over H, W computed for the reader's output
            readers = self.uses.get(node.output[0], [])
            if len(readers) == 1 and readers[0].op_type == node.op_type and node.output[0] not in self.outputs:
                reader = readers[0]
                other = self.constants.get(reader.input[1]) if len(reader.input) > 1 and reader.input[1] else None
                other_axes = [
                    int(a) % 4 for a in (other if other is not None else node_attributes(reader).get("axes", []))
                ]
                if sorted(axes + other_axes) == [2, 3] and node_attributes(reader).get("keepdims", 1):
                    self.fused.add(reader.output[0])
                    self.deferred_outputs[node.output[0]] = reader.output[0]
                    axes = [2, 3]
        if axes != [2, 3]:
            raise NotLowerable(f"{node.name}: {node.op_type} is covered over H, W")
        _, channels, height, width = source.logical
        # [1, C, 1, 1], or without keepdims the [1, C] row a pooling head hands its classifier (ConvNeXt's)
        logical: tuple[int, ...] = (1, channels, 1, 1) if attributes.get("keepdims", 1) else Rows((1, channels, 1, 1))
        dtype = source.dtype
        if source.layout == "nc":  # a 1 x 1 map: its sum and its mean are itself
            return Lazy(logical, dtype, lambda env: env.leaf(0), leaves=[source])
        if source.layout != "nhwc":
            raise NotLowerable(f"{node.name}: {node.op_type} of an input that is not NHWC")
        anchor = Anchor("reduce", source, logical, dtype)
        if not mean:
            return Lazy(logical, dtype, _source, anchor)
        factor = tirx.const(1.0 / (height * width), "float32")
        return Lazy(logical, dtype, lambda env: env.source * factor, anchor)

    def _reduces_h_w(self, node: onnx.NodeProto) -> bool:
        """Whether a ReduceMean / ReduceSum / GlobalAveragePool of a 4-D value reduces over its H and W."""
        if node.op_type == "GlobalAveragePool":
            return True
        if node.op_type not in ("ReduceMean", "ReduceSum"):
            return False
        axes = node.input[1] if len(node.input) > 1 and node.input[1] else None
        listed = self.constants.get(axes) if axes else node_attributes(node).get("axes")
        return listed is not None and sorted(int(a) % 4 for a in listed) == [2, 3]

    def _average_pool(self, node: onnx.NodeProto, source: Stored) -> Lazy:
        """AveragePool of a float map by a window (PoolFormer's 3 x 3 token mixer): the window's sum over the
        zero border, times one over the count of the inputs it covers (all of them with count_include_pad)."""
        attributes = node_attributes(node)
        if source.layout != "nhwc" or attributes.get("ceil_mode", 0) or len(attributes.get("kernel_shape", [])) != 2:
            raise NotLowerable(f"{node.name}: AveragePool is covered on float NHWC maps, 2-D, without ceil_mode")
        if any(d != 1 for d in attributes.get("dilations", [1, 1])):
            raise NotLowerable(f"{node.name}: a dilated AveragePool")
        kh, kw = (int(k) for k in attributes["kernel_shape"])
        pads = tuple(int(p) for p in attributes.get("pads", [0, 0, 0, 0]))
        strides = tuple(int(s) for s in attributes.get("strides", [1, 1]))
        _, channels, height, width = source.logical
        oh = (height + pads[0] + pads[2] - kh) // strides[0] + 1
        ow = (width + pads[1] + pads[3] - kw) // strides[1] + 1

        def covered(out: int, size: int, stride: int, before: int, extent: int) -> np.ndarray:
            start = np.arange(out) * stride - before
            return np.minimum(start + extent, size) - np.maximum(start, 0)

        counts = np.full((oh, ow), kh * kw, np.float64)
        if not attributes.get("count_include_pad", 0):
            counts = np.outer(covered(oh, height, strides[0], pads[0], kh), covered(ow, width, strides[1], pads[1], kw))
        logical = (1, channels, oh, ow)
        anchor = Anchor(
            "avgpool", source, logical, "float32", (1.0 / counts).astype(np.float32).reshape(oh * ow, 1), 0,
            (kh, kw), (strides[0], strides[1]), (pads[0], pads[1], pads[2], pads[3]),
        )  # fmt: skip
        return Lazy(logical, "float32", _source, anchor)

    def _row_reduce(self, node: onnx.NodeProto) -> Stored | Lazy:
        """ReduceMean / ReduceSum of float rows over their last axis, kept (RMSNorm's mean square): one value
        per row, which elementwise readers broadcast over the channels."""
        shape = self._shape(node.input[0])
        attributes = node_attributes(node)
        axes = [int(a) for a in self.constants[node.input[1]]] if len(node.input) > 1 and node.input[1] else []
        axes = axes or [int(a) for a in attributes.get("axes", [])]
        op = node.op_type
        if op == "GlobalAveragePool":  # the mean over every axis after the channels (SwinV2's 1-D pooling)
            op, axes, attributes = "ReduceMean", list(range(2, len(shape))), {"keepdims": 1}
        axes = sorted(a % len(shape) for a in axes)
        # a size-1 axis reduces nothing (Swin's pooling: [1, C, 1, S] over its last two axes)
        axes = [a for a in axes if shape[a] != 1] or axes
        if op not in ("ReduceMean", "ReduceSum", "ReduceL2", "ReduceMax"):
            raise NotLowerable(f"{node.name}: {node.op_type} of rows is a mean, a sum, a 2-norm or a maximum here")
        leading = list(range(len(shape) - 1))[-len(axes) :] if axes else []
        over_tokens = len(shape) > 1 and axes and axes == leading and all(d == 1 for d in shape[: axes[0]])
        if over_tokens and op != "ReduceMax":
            # over every leading axis after the ones (a token mean-pooling [1, S, D] -> [1, D], ConvNeXt V2's
            # response norm over H, W of [1, H, W, C]): one row out
            source = self._float_input(node.input[0])
            logical = Rows((1, source.logical[1], 1, 1))
            kind = {"ReduceMean": "colmean", "ReduceSum": "colsum", "ReduceL2": "coll2"}[op]
            return Lazy(logical, "float32", _source, Anchor(kind, source, logical, "float32"))
        if axes != [len(shape) - 1]:
            raise NotLowerable(f"{node.name}: {node.op_type} of rows is covered over the last axis or the tokens")
        kind = {"ReduceMean": "rowmean", "ReduceSum": "rowsum", "ReduceL2": "rowl2", "ReduceMax": "rowmax"}[op]
        absolute = self._single_reader(node.input[0], op) if op == "ReduceMax" else None
        producer = self.producers.get(node.input[0])
        if absolute is not None and producer is not None and producer.op_type == "Abs":
            # max |x| (a row's range, for per-row quantization): the Abs read in the reduction, not stored
            kind, source = "rowabsmax", self._float_input(producer.input[0])
        else:
            source = self._float_input(node.input[0])
        logical = Rows((1, 1, 1, source.logical[3]))
        value = Lazy(logical, "float32", _source, Anchor(kind, source, logical, "float32"))
        if attributes.get("keepdims", 1):
            return value
        # without keepdims (WavLM's ReduceSum): the same values in the same order, as rows of the shorter shape
        return self._stored_in_shape(value, node.output[0], self._shape(node.output[0]))

    def _reshape(self, node: onnx.NodeProto) -> Stored | Lazy:
        value = self.values[node.input[0]]
        logical = value.logical
        if len(logical) == 4 and logical[2] == logical[3] == 1:
            new = (1, logical[1])
            if isinstance(value, Lazy):
                return Lazy(new, value.dtype, value.expression, value.anchor, value.leaves, value.constants)
            if value.layout == "nc":
                return Stored(value.var, new, value.dtype, "nc")
        raise NotLowerable(f"{node.name}: only [1, C, 1, 1] -> [1, C] reshapes are covered")

    def _cnn_reshape(self, node: onnx.NodeProto) -> bool:
        """A [1, C, 1, 1] -> [1, C] reshape of a CNN head (rows and other reshapes are data movement)."""
        value = self.values.get(node.input[0])
        return value is not None and not isinstance(value.logical, Rows) and value.logical[2:] == (1, 1)

    # -- row-major tensors (transformers, masks)
    def _shape(self, name: str) -> tuple[int, ...]:
        if name in self.constants:
            return tuple(self.constants[name].shape)
        shape = self.shapes.get(name)
        if shape is None:
            raise NotLowerable(f"the shape of {name} is not known statically")
        return shape

    def _fold(self, node: onnx.NodeProto) -> None:
        """A node on constants only, computed now (by onnxruntime, as the oracle runs float nodes)."""
        results = self._evaluate(node, {name: self.constants[name] for name in node.input if name})
        self.constants.update(zip(node.output, results, strict=False))

    def _evaluate(self, node: onnx.NodeProto, given: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return float_node(self.model, node, given)
        except Exception as error:  # onnxruntime raises its own errors
            raise NotLowerable(f"{node.name} ({node.op_type}) could not be evaluated at build time: {error}") from error

    def _flat(self, value: Stored) -> Any:
        """``value``'s Relax tensor as one flat vector (a view; a map stored with a border is copied out first)."""
        relax = self.relax
        if not _contiguous(value):
            if value.row_map:
                raise NotLowerable("a padded row-major view read flat")
            # a map stored with its readers' border (MobileViT unfolds a conv's output into patches), or rows
            # with channels padded for a dense reader: the inside copied out once, in the order _positions
            # gives its elements
            inside = Stored(None, value.logical, value.dtype, "nhwc", channels=value.logical[1])
            copy = self._add_kernel(_copy_kernel(value, inside, 0), "unpad")
            inside.var = self.builder.emit(
                relax.call_tir(copy, [value.var], relax.TensorType(inside.shape, inside.dtype))
            )
            value = inside
        size = int(np.prod(value.shape))
        return self.builder.emit(relax.op.reshape(value.var, (size,)))

    def _stored_in_shape(self, value: Lazy, name: str, shape: tuple[int, ...]) -> Stored:
        """``value`` computed, then viewed as the row-major tensor of ``shape`` holding the same elements in the
        same order (a reduction without keepdims, a Softmax over an axis only ones follow)."""
        stored = self._emit(value, name, output=False)
        return self._as_rows(self._flat(stored), tuple(shape), stored.dtype)

    def _as_rows(self, data: Any, shape: tuple[int, ...], dtype: str) -> Stored:
        """A contiguous Relax tensor (of any shape holding as many elements) as the row-major tensor of
        ``shape`` (a reshape: a view)."""
        logical = rows_logical(shape)
        stored = Stored(None, logical, dtype, "nhwc", channels=logical[1])
        stored.var = self.builder.emit(self.relax.op.reshape(data, stored.shape))
        return stored

    def _add_kernel(self, function: Any, kind: str) -> Any:
        """``function`` added to the module under the next kernel name (``k012_conv``); returns its GlobalVar."""
        self.count += 1
        name = f"k{self.count:03d}_{kind}"
        return self.builder.add_func(function.with_attr("global_symbol", name), name)

    def _uniform_gather(self, node: onnx.NodeProto) -> bool:
        """A gather from a constant holding one value throughout is that value in the output's shape, whatever
        the indices (RoBERTa's token types: a zero buffer gathered at the position ids): folded to a constant."""
        data = self.constants.get(node.input[0])
        if data is None or node.output[0] in self.outputs:
            return False
        value = _uniform_value(data)
        if value is None:
            return False
        self.constants[node.output[0]] = np.full(self._shape(node.output[0]), value[0], data.dtype)
        return True

    def _uniform_as_scalars(self, node: onnx.NodeProto, names: list[str], operands: list[Any]) -> list[Any]:
        """Constants that hold one value throughout read as that scalar, where the tensor operands alone give
        the result's shape: an exporter's all-zero attention mask ``[1, 1, S, S]`` is then a scalar in the
        attention product's epilogue, not a tensor that product would have to read."""
        shapes = [
            self._shape(name) for name, item in zip(names, operands, strict=True) if not isinstance(item, np.ndarray)
        ]
        if np.broadcast_shapes(*shapes) != tuple(self._shape(node.output[0])):
            return operands
        scalars = []
        for item in operands:
            value = _uniform_value(item) if isinstance(item, np.ndarray) else None
            scalars.append(item if value is None else value)
        return scalars

    def _rows_operands(self, node: onnx.NodeProto, operands: list[Any]) -> list[Any]:
        """The operands of an elementwise op on row-major tensors, made to fit its result ``[..., C]``: scalars
        stay, a constant ``[1, ..., 1, C]`` becomes a per-channel row, other constants a tensor of the result's
        shape; a tensor broadcast over leading dims is read modulo its rows, any other broadcast is expanded
        (a gather)."""
        shape = self._shape(node.output[0])
        logical = rows_logical(shape)
        channels = logical[1]
        fitted: list[Any] = []
        for name, item in zip([n for n in node.input if n], operands, strict=True):
            if isinstance(item, np.ndarray):
                if item.size == 1 or (item.shape[-1:] == (channels,) and item.size == channels):
                    fitted.append(item if item.size == 1 else item.reshape(1, channels, 1, 1))
                    continue
                fitted.append(self._constant_rows(np.broadcast_to(item, shape)))
                continue
            anchored = isinstance(item, Lazy) and item.anchor is not None
            if item.logical == logical or (item.logical == (1, channels, 1, 1) and not anchored):
                fitted.append(item)
                continue
            own = self._shape(name)
            padded = (1,) * (len(shape) - len(own)) + own
            first = next((k for k, d in enumerate(padded) if d != 1), len(padded))
            stored = self._materialize(name) if isinstance(item, Lazy) or item.row_map else item
            if isinstance(stored.logical, Rows) and stored.logical[1] == channels and padded[first:] == shape[first:]:
                fitted.append(dataclasses.replace(stored, period=stored.logical[3]))  # leading-dims broadcast
                continue
            if isinstance(stored.logical, Rows) and stored.logical[1] == 1 and padded[:-1] == shape[:-1]:
                fitted.append(stored)  # one value per row (a norm's statistic), read at every channel
                continue
            fitted.append(self._gathered(stored, np.broadcast_to(_positions(stored, own), shape)))
        return fitted

    def _constant_rows(self, constant: str | np.ndarray) -> Stored:
        """A constant (by name, or an array) as a row-major tensor of its shape."""
        array = np.ascontiguousarray(self.constants[constant] if isinstance(constant, str) else constant)
        logical = rows_logical(array.shape)
        stored = Stored(None, logical, array.dtype.name, "nhwc", channels=logical[1])
        stored.var = self.relax.const(array.reshape(stored.shape), array.dtype.name)
        return stored

    def _gathered(self, source: Stored, index: np.ndarray, fill: float | None = None) -> Stored:
        """``source`` (flat) read at the positions ``index`` holds, as a row-major tensor of ``index``'s shape;
        with a ``fill``, positions -1 read that value (a Pad)."""
        from qcompile.backends.tvm import sequence

        relax = self.relax
        size = int(np.prod(source.shape if _contiguous(source) else source.logical))  # (what _flat gives)
        identity = index.size == size and np.array_equal(index.reshape(-1), np.arange(size))
        if source.row_map:
            channels = source.logical[1]
            if identity and index.shape[-1:] == (channels,):  # a reshape of the view's rows: still a view
                return dataclasses.replace(source, logical=rows_logical(tuple(index.shape)))
            rows = source.source_rows(np.arange(size // channels))
            viewed = ((rows * channels)[:, None] + np.arange(channels)).reshape(-1)  # into the viewed tensor
            index = np.where(index < 0, -1, viewed[np.maximum(index, 0)])
            identity = False
        # the source as it is stored when that is its elements in order (no reshape to flat first)
        contiguous = _contiguous(source)
        data = source.var if contiguous else self._flat(source)
        if identity:
            return self._as_rows(data, tuple(index.shape), source.dtype)  # a reshape: no data moves
        run = sequence.run_length(index)
        positions = np.ascontiguousarray(index.reshape(-1)[::run].astype(np.int32))
        logical = rows_logical(tuple(index.shape))
        target = Stored(None, logical, source.dtype, "nhwc", channels=logical[1])
        shapes = {"source_shape": source.shape if contiguous else (size,), "target_shape": target.shape}
        bases = sequence.transposed_blocks(index) if run == 1 else None
        transposed = None
        if bases is not None:  # blocks transposed: no map of every element
            positions, transposed = bases, (int(index.shape[-2]), int(index.shape[-1]))
        kernel = sequence.gather_kernel(size, positions, source.dtype, fill, run=run, transposed=transposed, **shapes)
        gvar = self._add_kernel(kernel, "gather")
        result_type = relax.TensorType(target.shape, source.dtype)
        target.var = self.builder.emit(relax.call_tir(gvar, [data, relax.const(positions, "int32")], result_type))
        return target

    def _movement(self, node: onnx.NodeProto) -> Stored | Lazy:
        """Transpose, Reshape, Expand, GatherND, ... of a tensor by constant parameters: the op applied (now,
        by onnxruntime) to the positions ``arange(size)`` gives the gather's index map."""
        data = node.input[0]
        extra = [name for name in node.input[1:] if name]
        if any(name not in self.constants for name in extra):
            raise NotLowerable(f"{node.name} ({node.op_type}) with a parameter computed at run time")
        value = self.values[data]
        same_rows = isinstance(value.logical, Rows) and rows_logical(self._shape(node.output[0])) == value.logical
        if isinstance(value, Lazy) and node.op_type in SAME_ORDER_OPS and same_rows:
            # the same elements in the same order (a linear layer's [1, S, N] output read as [S, N]): the lazy
            # value goes on, so a layer's epilogue continues through the reshape instead of being stored
            return value
        source = self._moved_source(data)
        shape = self._shape(data)
        if node.op_type == "Transpose" and isinstance(source.logical, Rows):
            perm = [int(a) for a in node_attributes(node)["perm"]]
            view = self._rows_as_image(source, shape, perm, node.output[0])
            if view is None and not source.row_map:
                view = self._transposed_rows(source, shape, perm)
            if view is not None:
                return view
        return self._gathered(source, self._index_maps(node, source, extra)[0])

    def _scatter(self, node: onnx.NodeProto) -> Stored:
        """ScatterND at constant indices (optimum's causal LM exports write the padding mask into the causal one
        with it; the indices come from shapes and ranges, constant here) as one gather through a map computed now:
        the updates, then the data, copied one after the other (flat), each output position reading the update
        written there, else its data. Every position written: the updates alone."""
        data, indices, updates = node.input[:3]
        reduction = node_attributes(node).get("reduction", b"none")
        if indices not in self.constants or reduction not in (b"none", "none"):
            raise NotLowerable(f"{node.name} (ScatterND) is covered at constant indices, without a reduction")
        shape = self._shape(data)
        index = self.constants[indices].astype(np.int64)
        depth = index.shape[-1]
        slots = tuple(index.reshape(-1, depth).T)
        written = np.zeros(shape, np.bool_)
        written[slots] = True
        source = self._moved_source(updates)
        positions = _positions(source, self._shape(updates)).reshape(-1, *shape[depth:])
        if written.all():
            index_map = np.zeros(shape, np.int64)
            index_map[slots] = positions
            return self._gathered(source, index_map)
        size = int(positions.size)
        if data in self.constants:
            data_positions = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
        else:
            data_positions = _positions(self._materialize(data), shape)
        both = onnx.helper.make_node("Concat", [updates, data], [f"{node.output[0]}/qcompile_sources"], axis=0)
        combined = self._stacked_rows(both, (size + int(np.prod(shape)),), 0)
        index_map = size + data_positions
        index_map[slots] = positions
        return self._gathered(combined, index_map)

    def _split(self, node: onnx.NodeProto) -> list[Stored]:
        """Split by constant sizes (GPT-2's fused query / key / value projection cut in three): each part one
        gather through the index map Split makes of the positions, or a view where the part is contiguous."""
        data = node.input[0]
        extra = [name for name in node.input[1:] if name]
        if any(name not in self.constants for name in extra) or ("num_outputs" in node_attributes(node) and extra):
            raise NotLowerable(f"{node.name} (Split) with sizes computed at run time")
        source = self._moved_source(data)
        return [self._gathered(source, index) for index in self._index_maps(node, source, extra)]

    def _moved_source(self, data: str) -> Stored:
        """What a data-movement op reads: a row view as it is, anything else stored."""
        value = self.values[data]
        return value if isinstance(value, Stored) and value.row_map else self._materialize(data)

    def _index_maps(self, node: onnx.NodeProto, source: Stored, extra: list[str]) -> list[np.ndarray]:
        """The movement op ``node`` applied (by onnxruntime, now) to where each element of ``source`` is
        stored, with its constant parameters ``extra``: one index map per output, for :meth:`_gathered`."""
        data = node.input[0]
        positions = _positions(source, self._shape(data))
        return self._evaluate(node, {data: positions, **{name: self.constants[name] for name in extra}})

    def _rows_as_image(self, source: Stored, shape: tuple[int, ...], perm: list[int], name: str) -> Stored | None:
        """A channels-last ``[1, H, W, C]`` row-major tensor transposed to NCHW (ConvNeXt's LayerNorm between
        permutes) as the NHWC map the convolutions read: the same bytes (a view), copied into the border and
        channel padding its readers need where they need one; None if it is not that."""
        contiguous = not any(source.pads) and source.channels == source.logical[1] and not source.period
        if len(shape) != 4 or shape[0] != 1 or perm != [0, 3, 1, 2] or not contiguous or source.row_map:
            return None
        _, height, width, channels = shape
        logical = (1, channels, height, width)
        image = Stored(None, logical, source.dtype, "nhwc", channels=channels)
        image.var = self.builder.emit(self.relax.op.reshape(source.var, image.shape))
        target = self._target(name, logical, source.dtype)
        if target.layout != "nhwc" or (not any(target.pads) and target.channels == channels):
            return image
        relax = self.relax
        result_type = relax.TensorType(target.shape, target.dtype)
        border = self._add_kernel(_fill_kernel(target), "pad")
        current = self.builder.emit(relax.call_tir(border, [], result_type))
        copy = self._add_kernel(_copy_kernel(image, target, 0), "pad")
        target.var = self.builder.emit(relax.call_tir_inplace(copy, [image.var, current], 1, result_type))
        return target

    @staticmethod
    def _transposed_rows(source: Stored, shape: tuple[int, ...], perm: list[int]) -> Stored | None:
        """A Transpose that keeps the last axis as a view of ``source``'s rows (no data moves), or None."""
        contiguous = not any(source.pads) and source.channels == source.logical[1] and not source.period
        if not contiguous or len(perm) < 3 or perm[-1] != len(shape) - 1:
            return None
        leading = shape[:-1]
        out = [leading[axis] for axis in perm[:-1]]
        terms = tuple(
            (int(np.prod(out[a + 1 :])), out[a], int(np.prod(leading[axis + 1 :])))
            for a, axis in enumerate(perm[:-1])
            if out[a] > 1
        )
        logical = rows_logical((*out, shape[-1]))
        return dataclasses.replace(source, logical=logical, row_map=terms)

    def _embedding(self, node: onnx.NodeProto) -> Stored:
        """Gather of a table's rows at run-time indices (token embeddings: float rows, or int8 rows and their
        scales)."""
        from qcompile.backends.tvm import sequence

        relax = self.relax
        table = self.constants[node.input[0]]
        indices = self._materialize(node.input[1])
        dtype = table.dtype.name
        axis = int(node_attributes(node).get("axis", 0))
        if axis != 0 or indices.dtype not in ("int32", "int64") or table.ndim != 2 or dtype not in ("float32", "int8"):
            raise NotLowerable(f"{node.name}: Gather of a table is covered along its rows at integer indices")
        count = int(np.prod(self._shape(node.input[1])))
        rows, width = table.shape
        gvar = self._add_kernel(sequence.embedding_kernel(rows, width, count, indices.dtype, dtype), "embedding")
        result_type = relax.TensorType((count, width), dtype)
        out = self.builder.emit(relax.call_tir(gvar, [self._flat(indices), relax.const(table, dtype)], result_type))
        return self._as_rows(out, self._shape(node.output[0]), dtype)

    def _integer_softmax(self, node: onnx.NodeProto) -> None:
        """The integer Softmax that :meth:`~qcompile.backends.integer.arithmetic.Lowering.integer_softmax`
        writes, matched whole from its ReduceMax (the row's peak) to its Div (the rounded ratio): one
        ``intsoftmax`` anchor, whose epilogue continues with the zero point, clamp and cast after it."""

        def reader(name: str, op: str) -> onnx.NodeProto:
            readers = self.uses.get(name, [])
            if len(readers) != 1 or readers[0].op_type != op or name in self.outputs:
                raise NotLowerable(f"{node.name}: ReduceMax is covered as the start of an integer Softmax")
            return readers[0]

        def scalar(name: str) -> int:
            value = self.constants.get(name)
            if value is None or value.size != 1 or value.dtype.kind not in "iu":
                raise NotLowerable(f"{node.name}: an integer Softmax with a term that is not an integer constant")
            return int(value.reshape(-1)[0])

        def over_last_axis(reduction: onnx.NodeProto) -> bool:
            axes = [int(a) for a in self.constants.get(reduction.input[1], [])] if len(reduction.input) > 1 else []
            axes = axes or [int(a) for a in node_attributes(reduction).get("axes", [])]
            rank = len(self._shape(reduction.input[0]))
            return [a % rank for a in axes] == [rank - 1] and bool(node_attributes(reduction).get("keepdims", 1))

        x, peak = node.input[0], node.output[0]
        shape = self._shape(x)
        if not over_last_axis(node):
            raise NotLowerable(f"{node.name}: ReduceMax is covered over the last axis, with keepdims")
        gap = reader(peak, "Sub")
        distance = reader(gap.output[0], "Clip")
        lookup = reader(distance.output[0], "Gather")
        table = self.constants.get(lookup.input[0])
        if (
            list(gap.input) != [peak, x]
            or table is None
            or table.ndim != 1
            or lookup.input[1] != distance.output[0]
            or int(node_attributes(lookup).get("axis", 0)) != 0
            or (scalar(distance.input[1]), scalar(distance.input[2])) != (0, table.size - 1)
            or table.min() < 0
            or table.max() >= 2**31
        ):
            raise NotLowerable(f"{node.name}: ReduceMax is covered as the start of an integer Softmax")
        exps = lookup.output[0]
        readers = {item.op_type: item for item in self.uses.get(exps, [])}
        if sorted(readers) != ["Mul", "ReduceSum"] or len(self.uses[exps]) != 2:
            raise NotLowerable(f"{node.name}: an integer Softmax with a mask has no kernel here")
        total, scaled = readers["ReduceSum"], readers["Mul"]
        if not over_last_axis(total):
            raise NotLowerable(f"{node.name}: ReduceMax is covered as the start of an integer Softmax")
        numerator = reader(scaled.output[0], "Add")
        ratio = reader(numerator.output[0], "Div")
        # The row sum's two readers: the rounding term (added to the numerator) and the divisor.
        sums = {
            reader(item.output[0], "Add" if item.output[0] in numerator.input else "Div").op_type: item
            for item in self.uses.get(total.output[0], [])
            if item.op_type == "Mul"
        }
        if (
            len(self.uses[total.output[0]]) != 2
            or sorted(sums) != ["Add", "Div"]
            or list(ratio.input) != [numerator.output[0], sums["Div"].output[0]]
        ):
            raise NotLowerable(f"{node.name}: ReduceMax is covered as the start of an integer Softmax")
        terms = (
            scalar(self._other_input(scaled, exps)),
            scalar(self._other_input(sums["Add"], total.output[0])),
            scalar(self._other_input(sums["Div"], total.output[0])),
        )
        source = self._materialize(x)
        if source.dtype != "int64":
            raise NotLowerable(f"{node.name}: an integer Softmax of {source.dtype} values")
        if not isinstance(source.logical, Rows):
            source = self._gathered(source, _positions(source, shape))
        logical = source.logical
        anchor = Anchor("intsoftmax", source, logical, "int64", weights=table, terms=terms)
        self.fused.add(peak)
        self.fused.update(item.output[0] for item in (gap, distance, lookup, total, scaled, *sums.values(), numerator))
        self.fused.add(ratio.output[0])
        self.values[ratio.output[0]] = Lazy(logical, "int64", _source, anchor)

    @staticmethod
    def _other_input(node: onnx.NodeProto, name: str) -> str:
        others = [item for item in node.input if item != name]
        return others[0] if len(others) == 1 else ""

    def _row_op(self, node: onnx.NodeProto) -> Stored | Lazy:
        """LayerNormalization or Softmax over the last axis of a float row-major tensor (an anchor whose
        epilogue continues with the scale and bias, or with whatever follows), or InstanceNormalization of a
        GroupNorm's ``[1, G, L]`` groups (a LayerNorm of each group's row)."""
        shape = self._shape(node.input[0])
        attributes = node_attributes(node)
        axis = int(attributes.get("axis", -1)) % len(shape)
        instance = node.op_type == "InstanceNormalization"
        if instance and (len(shape) != 3 or shape[0] != 1):
            # GroupNorm as exporters write it: [1, G, C / G * H * W] normalized per group, the affine after
            raise NotLowerable(f"{node.name}: InstanceNormalization is covered on [1, G, L] (a GroupNorm's groups)")
        if node.op_type == "Softmax" and axis < len(shape) - 1 and all(d == 1 for d in shape[axis + 1 :]):
            # over an axis only ones follow (ConvBERT's [N, k, 1] over k): the rows of [..., k], computed, then
            # viewed in the graph's shape again
            source = self._float_input(node.input[0])
            rows = self._gathered(source, _positions(source, shape).reshape(shape[: axis + 1]))
            value = Lazy(rows.logical, "float32", _source, Anchor("softmax", rows, rows.logical, "float32"))
            return self._stored_in_shape(value, node.output[0], shape)
        if axis != len(shape) - 1 and not instance:
            raise NotLowerable(f"{node.name}: {node.op_type} over an axis that is not the last")
        if node.op_type == "LayerNormalization" and any(node.output[1:]):
            raise NotLowerable(f"{node.name}: LayerNormalization's mean / inverse deviation outputs")
        source = self._float_input(node.input[0])
        if not isinstance(source.logical, Rows):
            source = self._gathered(source, _positions(source, shape))
        logical = source.logical
        if node.op_type == "Softmax":
            return Lazy(logical, "float32", _source, Anchor("softmax", source, logical, "float32"))
        channels = logical[1]
        scale = self.constants.get(node.input[1])
        bias = self.constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(channels)
        if instance and scale is not None and bias is not None:  # one scale and bias per row: covered when uniform
            uniform_scale, uniform_bias = _uniform_value(scale), _uniform_value(bias)
            if uniform_scale is None or uniform_bias is None:
                raise NotLowerable(f"{node.name}: InstanceNormalization with a scale / bias that differs per group")
            scale, bias = (
                np.full(channels, uniform_scale[0], np.float32),
                np.full(channels, uniform_bias[0], np.float32),
            )
        if scale is None or bias is None or scale.size != channels or bias.size != channels:
            raise NotLowerable(f"{node.name}: LayerNormalization with a scale / bias that is not a constant [C]")
        anchor = Anchor("layernorm", source, logical, "float32", epsilon=float(attributes.get("epsilon", 1e-5)))
        constants = [scale.reshape(-1).astype(np.float32), bias.reshape(-1).astype(np.float32)]

        def affine(env: Env) -> Any:
            return env.source * env.constant(0) + env.constant(1)

        return Lazy(logical, "float32", affine, anchor, [], constants)

    # -- kernels
    def _to_nchw(self, value: Stored, name: str) -> Stored:
        """A 4-D graph output stored NHWC (padded or not) written out as the NCHW tensor the graph declares."""
        relax = self.relax
        out = Stored(None, value.logical, value.dtype, "nchw")
        gvar = self._add_kernel(_copy_kernel(value, out, 0), "to_nchw")
        result_type = relax.TensorType(value.logical, value.dtype)
        return Stored(
            self.builder.emit(relax.call_tir(gvar, [value.var], result_type)), value.logical, value.dtype, "nchw"
        )

    def _target(self, name: str, logical: tuple[int, ...], dtype: str) -> Stored:
        """How the value ``name`` is stored: NHWC with the border and channel padding its readers need, or a
        row ([1, C], and a 1 x 1 map no dense reader needs padded)."""
        pads, fill = self._padding(name)
        channels = self._stored_channels(name, logical[1])
        if isinstance(logical, Rows):
            return Stored(None, logical, dtype, "nhwc", channels=channels)
        if len(logical) == 2 or (logical[2:] == (1, 1) and not any(pads) and channels == logical[1]):
            return Stored(None, logical, dtype, "nc")
        return Stored(None, logical, dtype, "nhwc", pads, channels, fill)

    def _pad(self, node: onnx.NodeProto) -> Stored | Lazy:
        """Pad of a feature map's H and W by a constant (BiT's "same" padding before its max pool, on codes):
        the padded map written once in the layout its readers take. Its region outside the source is filled
        with the pad value, the readers' own border with theirs, and the source copied in."""
        relax = self.relax
        attributes = node_attributes(node)
        extra = [name for name in node.input[1:3] if name]
        if any(name not in self.constants for name in extra) or (len(node.input) > 3 and node.input[3]):
            raise NotLowerable(f"{node.name}: Pad is covered with constant pads and value, over every axis")
        pads = [int(p) for p in self.constants[node.input[1]].reshape(-1)]
        if not any(pads):  # (exporters write Swin's pad-to-window-multiple even where it pads nothing)
            return self.values[node.input[0]]
        constant = self.constants[node.input[2]].reshape(-1) if len(extra) > 1 else np.zeros(1)
        constant_mode = attributes.get("mode", b"constant") in (b"constant", "constant")
        if isinstance(self.values[node.input[0]].logical, Rows):
            # row-major data (MobileBERT's shifted token embeddings): a gather whose padded positions read
            # the pad value
            shape = self._shape(node.input[0])
            if not constant_mode or len(pads) != 2 * len(shape) or min(pads) < 0 or constant.size != 1:
                raise NotLowerable(f"{node.name}: Pad of row-major data is covered by a constant, outward")
            source = self._moved_source(node.input[0])
            positions = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
            widths = list(zip(pads[: len(shape)], pads[len(shape) :], strict=True))
            return self._gathered(source, np.pad(positions, widths, constant_values=-1), float(constant[0]))
        source = self._materialize(node.input[0])
        if (
            not constant_mode
            or len(pads) != 8
            or any(pads[axis] or pads[axis + 4] for axis in (0, 1))
            or min(pads) < 0
            or source.layout != "nhwc"
            or isinstance(source.logical, Rows)
            or constant.size != 1
            or float(constant[0]) != int(constant[0])
        ):
            raise NotLowerable(f"{node.name}: Pad is covered on a feature map's H and W, by a constant integer")
        top, left, bottom, right = pads[2], pads[3], pads[6], pads[7]
        _, channels, height, width = source.logical
        logical = (1, channels, height + top + bottom, width + left + right)
        target = self._target(node.output[0], logical, source.dtype)
        if target.layout != "nhwc":
            raise NotLowerable(f"{node.name}: Pad of a map to a single pixel")
        around = target.pads
        outside = (around[0] + top, around[1] + left, around[2] + bottom, around[3] + right)
        region = Stored(None, source.logical, source.dtype, "nhwc", outside, target.channels, int(constant[0]))
        result_type = relax.TensorType(target.shape, target.dtype)
        current = self.builder.emit(relax.call_tir(self._add_kernel(_fill_kernel(region), "pad"), [], result_type))
        if any(around) or target.channels > channels:  # the readers' border, with their fill
            border = self._add_kernel(_fill_kernel(target), "pad")
            current = self.builder.emit(relax.call_tir_inplace(border, [current], 0, result_type))
        copy = self._add_kernel(_copy_kernel(source, region, 0), "pad")
        target.var = self.builder.emit(relax.call_tir_inplace(copy, [source.var, current], 1, result_type))
        return target

    def _concat(self, node: onnx.NodeProto) -> Stored:
        """Concat along channels: the border written once, then each input copied into its channel range; or
        of row-major tensors along any other axis (a ViT's class token before its patches, a KV cache's past
        and new positions): in each block of the dims before the axis, the inputs' elements one after another."""
        relax = self.relax
        shape = self._shape(node.output[0])
        axis = int(node_attributes(node).get("axis", 0)) % max(len(shape), 1)
        tensors = [self.values[name] for name in node.input if name and name not in self.constants]
        rows = bool(tensors) and all(isinstance(value.logical, Rows) for value in tensors)
        if rows and len(shape) > 1 and (all(dim == 1 for dim in shape[:axis]) or axis != len(shape) - 1):
            return self._stacked_rows(node, shape, axis)
        parts = [self._materialize(name) for name in node.input if name]
        first = parts[0]
        rank = len(first.logical)
        axis = int(node_attributes(node).get("axis", 1)) % max(rank, 1)
        same = all(
            part.dtype == first.dtype and part.logical[2:] == first.logical[2:] and part.layout != "nchw"
            for part in parts
        )
        if all(isinstance(part.logical, Rows) for part in parts):  # the last axis is the channels
            last = len(self._shape(node.output[0])) - 1
            axis = 1 if int(node_attributes(node).get("axis", 0)) % (last + 1) == last else -1
        if axis != 1 or rank not in (2, 4) or not same:
            if rows:  # row-major tensors along their last axis (ConvBERT's mixed attention heads)
                return self._stacked_rows(node, shape, len(shape) - 1)
            raise NotLowerable(f"{node.name}: Concat is covered along the channels of same-sized maps")
        logical: tuple[int, ...] = (1, sum(part.logical[1] for part in parts), *first.logical[2:])
        if isinstance(first.logical, Rows):
            logical = Rows(logical)
        target = self._target(node.output[0], logical, first.dtype)
        result_type = relax.TensorType(target.shape, target.dtype)
        self.count += 1
        label = f"k{self.count:03d}_concat"
        border_label = f"{label}_border"  # (the profile looks kernels up by this name: symbol and name agree)
        border = self.builder.add_func(_fill_kernel(target).with_attr("global_symbol", border_label), border_label)
        current = self.builder.emit(relax.call_tir(border, [], result_type))
        offset = 0
        for index, part in enumerate(parts):
            copy = _copy_kernel(part, target, offset).with_attr("global_symbol", f"{label}_{index}")
            gvar = self.builder.add_func(copy, f"{label}_{index}")
            current = self.builder.emit(relax.call_tir_inplace(gvar, [part.var, current], 1, result_type))
            offset += part.logical[1]
        target.var = current
        return target

    def _stacked_rows(self, node: onnx.NodeProto, shape: tuple[int, ...], axis: int) -> Stored:
        """Row-major tensors concatenated along ``axis``: in each block of the dims before it, each input's
        elements copied after the previous ones' (constant inputs too, such as an expanded class token); one
        contiguous copy per input when only ones precede the axis."""
        from qcompile.backends.tvm import sequence

        relax = self.relax
        names = [name for name in node.input if name]
        sources = []
        for name in names:
            if name in self.constants:
                array = np.ascontiguousarray(self.constants[name]).reshape(-1)
                sources.append((relax.const(array, array.dtype.name), array.size, array.dtype.name))
                continue
            part = self._materialize(name)
            sources.append((self._flat(part), int(np.prod(part.logical)), part.dtype))
        dtype = sources[0][2]
        if any(source_dtype != dtype for _, _, source_dtype in sources):
            raise NotLowerable(f"{node.name}: Concat of inputs of different types")
        outer = int(np.prod(shape[:axis]))
        total = sum(size for _, size, _ in sources) // outer
        result_type = relax.TensorType((outer * total,), dtype)
        current, offset = None, 0
        for data, size, _ in sources:
            size //= outer
            gvar = self._add_kernel(sequence.flat_copy_kernel(size, total, offset, dtype, outer), "concat")
            if current is None:  # the first copy makes the output; the others write their ranges in place
                current = self.builder.emit(relax.call_tir(gvar, [data], result_type))
            else:
                current = self.builder.emit(relax.call_tir_inplace(gvar, [data, current], 1, result_type))
            offset += size
        return self._as_rows(current, shape, dtype)

    def _emit(self, value: Lazy, name: str, output: bool) -> Stored:
        relax = self.relax
        value = fast_requantize(value) or value
        logical = value.logical
        target = self._target(name, logical, value.dtype)
        if value.anchor is None and _image_input(value, target):
            function, arguments = _image_input_kernel(value, target)
        elif value.anchor is None:
            function, arguments = _elementwise_kernel(value, target)
        else:
            function, arguments = _anchor_kernel(value, target, self.flavor, self.float_flavor)
        gvar = self._add_kernel(function, value.anchor.kind if value.anchor else "eltwise")
        label = gvar.name_hint
        operands = [item.var if isinstance(item, Stored) else relax.const(item, item.dtype.name) for item in arguments]
        result_type = relax.TensorType(target.shape, target.dtype)
        if target.layout == "nhwc" and (any(target.pads) or target.channels > logical[1]):
            # The border first, then the kernel writes the inside of the same tensor.
            border_label = f"{label}_border"
            border = self.builder.add_func(_fill_kernel(target).with_attr("global_symbol", border_label), border_label)
            filled = self.builder.emit(relax.call_tir(border, [], result_type))
            call = relax.call_tir_inplace(gvar, [*operands, filled], len(operands), result_type)
        else:
            call = relax.call_tir(gvar, operands, result_type)
        target.var = self.builder.emit(call)
        return target


def _uniform_value(array: np.ndarray) -> np.ndarray | None:
    """The one value ``array`` holds throughout, as a 1-element array; None if it holds several (or none)."""
    flat = array.reshape(-1)
    return flat[:1].copy() if flat.size and (flat == flat[0]).all() else None


def _contiguous(value: Stored) -> bool:
    """Whether ``value``'s bytes are its elements and nothing else (no border, no padding channels)."""
    return value.layout in ("nc", "nchw") or (not any(value.pads) and value.channels == value.logical[1])


def _positions(source: Stored, shape: tuple[int, ...]) -> np.ndarray:
    """Where each element of ``source``, a value of ONNX ``shape``, sits in its flat storage: in order for
    row-major data; a map's bytes are in H, W, C order, so each NCHW element is where it is stored (a 1-D
    convolution's [1, C, L] output is such a map, of height 1)."""
    if source.layout == "nhwc" and not isinstance(source.logical, Rows) and len(source.logical) == 4:
        _, channels, height, width = source.logical
        memory = np.arange(height * width * channels, dtype=np.int64).reshape(height, width, channels)
        return memory.transpose(2, 0, 1).reshape(shape)
    return np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)


def _static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Every value's shape that onnx's inference makes static (the graph's inputs are fixed here)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)  # (through Shape -> Reshape)
    except Exception:  # onnx raises its own errors and plain Python ones alike: no shapes then
        return {}
    shapes = {}
    for info in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        dims = info.type.tensor_type.shape.dim
        if info.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[info.name] = tuple(int(d.dim_value) for d in dims)
    return shapes


# A grouped convolution with up to this many groups runs as a dense one whose weights are zero between groups
# (exact: the zeros add nothing, and the zero-point correction sums the same weights); it does group times the
# products, which the dense kernels' speed still pays for at 2 to 4 groups (RegNet, ResNeXt-style blocks).
MAX_DENSE_GROUPS = 4


def _block_diagonal(weights: np.ndarray, group: int) -> np.ndarray:
    """Grouped weights ``[N, C / g, KH, KW]`` as the dense ``[N, C, KH, KW]`` with zeros between the groups."""
    out_channels, per_group = weights.shape[:2]
    dense = np.zeros((out_channels, per_group * group, *weights.shape[2:]), weights.dtype)
    outputs = out_channels // group
    for index in range(group):
        rows = slice(index * outputs, (index + 1) * outputs)
        dense[rows, index * per_group : (index + 1) * per_group] = weights[rows]
    return dense


def _lanes(expression: Any) -> int:
    """How many lanes a TIR expression has (its type reads ``float32x16``, or ``float32`` for one)."""
    text = str(expression.ty)
    return int(text.split("x")[1]) if "x" in text else 1


def _broadcasting(constructor: Callable[[Any, Any], Any], a: Any, b: Any) -> Any:
    """A TIR comparison node of ``a`` and ``b``, a scalar one broadcast to the other's lanes."""
    from tvm import tirx

    lanes = max(_lanes(a), _lanes(b))
    a, b = (tirx.Broadcast(x, lanes) if lanes > 1 and _lanes(x) == 1 else x for x in (a, b))
    return constructor(a, b)


def _reads(item: Stored | Lazy) -> int:
    """How many tensors an operand has a kernel read: a stored one, a lazy one's leaves, and an anchored one
    (computed first when an op has two tensor operands)."""
    if isinstance(item, Stored):
        return 1
    return len(item.leaves) + (1 if item.anchor is not None else 0)


def _scalar(value: Any, dtype: str, epilogue_env: Env) -> Any:
    from tvm import tirx

    return tirx.const(value, dtype)


def _row(index: int, dtype: str, env: Env) -> Any:
    return _constant_as(env, index, dtype)


def _constant_as(env: Env, index: int, dtype: str) -> Any:
    from tvm import tirx

    value = env.constant(index)
    return tirx.Cast(dtype if env.lanes == 1 else f"{dtype}x{env.lanes}", value)


def _combiner(op: str, node: onnx.NodeProto, dtype: str) -> Callable[[list[Any]], Any]:
    from tvm import tirx

    if op == "Add":
        return lambda v: v[0] + v[1]
    if op == "Sub":
        return lambda v: v[0] - v[1]
    if op == "Mul":
        return lambda v: v[0] * v[1]
    if op == "Div":  # of floats (integer division is a shift: _Lowering._division)
        return lambda v: v[0] / v[1]
    if op == "PRelu":  # of floats (a float island): x, or slope * x below zero
        return lambda v: tirx.max(v[0], tirx.const(0, dtype)) + tirx.min(v[0], tirx.const(0, dtype)) * v[1]
    if op == "Max":
        return lambda v: tirx.max(v[0], v[1])
    if op == "Min":
        return lambda v: tirx.min(v[0], v[1])
    if op == "Clip":
        return lambda v: tirx.min(tirx.max(v[0], v[1]), v[2]) if len(v) == 3 else tirx.max(v[0], v[1])
    if op == "Pow":  # of floats, by a constant exponent (checked by _Lowering._elementwise: POW_EXPONENTS)

        def power(v: list[Any]) -> Any:
            exponent = getattr(v[1], "value", None)
            if exponent == 2.0:  # (RMSNorm's mean square)
                return v[0] * v[0]
            if exponent == 3.0:  # (GPT-2's tanh GELU: x + 0.044715 x^3), as onnxruntime computes it
                return v[0] * v[0] * v[0]
            return tirx.sqrt(v[0])

        return power
    if op == "Where":

        def select(v: list[Any]) -> Any:
            # a condition stored as bytes is compared with 0; one read as bool (a constant bool mask) is itself
            is_bool = str(v[0].ty).startswith("bool")
            # (compared in its own type: a condition that is one value is a scalar of the op's dtype)
            zero = tirx.const(0, str(v[0].ty).split("x")[0])
            condition = v[0] if is_bool else _broadcasting(tirx.NE, v[0], zero)
            lanes = _lanes(condition)
            values = [tirx.Broadcast(x, lanes) if lanes > 1 and _lanes(x) == 1 else x for x in v[1:]]
            return tirx.Select(condition, *values)

        return select
    comparisons: dict[str, Callable[[Any, Any], Any]] = {
        "Equal": tirx.EQ,
        "Less": tirx.LT,
        "Greater": tirx.GT,
        "LessOrEqual": tirx.LE,
        "GreaterOrEqual": tirx.GE,
    }
    if op in comparisons or op == "IsNaN":
        compare = comparisons.get(op, lambda a, _b: tirx.isnan(a))

        def boolean(v: list[Any]) -> Any:
            result = _broadcasting(compare, v[0], v[-1])
            lanes = _lanes(result)
            return tirx.Cast(f"uint8x{lanes}" if lanes > 1 else "uint8", result)

        return boolean
    if op == "And":
        return lambda v: v[0] & v[1]
    if op == "Or":
        return lambda v: v[0] | v[1]
    if op == "Xor":
        return lambda v: v[0] ^ v[1]
    if op == "Not":
        return lambda v: v[0] ^ tirx.const(1, "uint8")
    raise NotLowerable(f"{node.name} ({op}) has no elementwise form")


# ------------------------------------------------------------------------------------------ requantization

REQUANTIZE_CHAIN = ("Cast", "Mul", "Add", "Div", "Sub", "Clip", "Cast")


def _chain(value: Lazy, length: int) -> list[tuple[Lazy, str, Any]] | None:
    """The last ``length`` single-constant steps that made ``value``, oldest first (None if fewer)."""
    steps = []
    current = value
    for _ in range(length):
        if current.step is None:
            return None
        steps.append(current.step)
        current = current.step[0]
    return steps[::-1]


def fast_requantize(value: Lazy) -> Lazy | None:
    """``value`` computed the cheap way when it is the requantization of an int32 value ``a`` as the integer
    lowering writes it — ``Cast(Clip(Div(Cast(a, int64) * M0 + R, 2**n) - U, lo, hi), uint8)`` — and the
    constants allow it (checked here for every channel): n >= 33, ``R = C + 2**(n - 1)`` with ``C`` a
    multiple of ``2**n`` large enough that the dividend is never negative (ONNX's truncating Div is then
    floor), 0 <= lo <= hi <= 255. Then, exactly,

        floor((a M0 + 2**(n-1)) / 2**n) = floor((hi32(a M0) + 2**(n-33)) / 2**(n-32))

    (``2**(n-1)`` is a multiple of ``2**32``, and floors of successive divisions compose), where hi32 is the
    high half of the 64-bit product: two ``vpmuldq`` for 16 lanes (widening multiplies for narrower vectors,
    ``smull`` / ``smull2`` on aarch64) and the rest in int32 lanes, instead of int64 arithmetic in every step.
    The result is ``clamp(that + K, lo, hi)`` with ``K = C / 2**n - U``.
    None when the pattern or a condition does not hold (the generic expression is then used)."""
    steps = _chain(value, len(REQUANTIZE_CHAIN))
    if steps is None or tuple(op for _, op, _ in steps) != REQUANTIZE_CHAIN:
        return None
    base = steps[0][0]
    if base.dtype != "int32" or steps[0][2] != "int64" or steps[-1][2] != "uint8" or base.logical[1] % LANES:
        return None
    channels = base.logical[1]

    def row(array: np.ndarray) -> np.ndarray:
        per_channel = _Lowering._per_channel(array, base.logical)
        return np.broadcast_to(array.reshape(-1)[0] if per_channel is None else per_channel, (channels,)).astype(
            np.int64
        )

    try:
        multiplier, offset, divisor, unbias = (row(steps[k][2][0]) for k in (1, 2, 3, 4))
        low, high = row(steps[5][2][0]), row(steps[5][2][1])
    except NotLowerable:
        return None
    if np.any(divisor <= 0) or np.any(divisor & (divisor - 1)):
        return None
    n = np.log2(divisor.astype(np.float64)).round().astype(np.int64)
    if np.any(n < 33) or np.any(n > 62) or np.any(multiplier < 0) or np.any(multiplier >= 2**31):
        return None
    half = np.left_shift(np.int64(1), n - 1)
    offset_c = offset - half
    if np.any(offset_c % divisor):
        return None
    # The dividend a M0 + R over every int32 a: never negative, never past int64 (exact integers in Python).
    for m0, r in zip(multiplier.tolist(), offset.tolist(), strict=True):
        if -(2**31) * m0 + r < 0 or (2**31 - 1) * m0 + r >= 2**63:
            return None
    shift_k = offset_c // divisor - unbias
    if np.any(np.abs(shift_k) >= 2**30) or np.any(low < 0) or np.any(high > 255) or np.any(low > high):
        return None
    shift = n - 32
    rounding = np.left_shift(np.int64(1), n - 33)
    # K folds into the rounding term when K * 2**shift fits int32 beside hi32 (< 2**30): one addition less.
    folded = rounding + shift_k * np.left_shift(np.int64(1), shift)
    fold = bool(np.all(np.abs(folded) < 2**30))
    odd_multiplier = np.zeros(channels, np.int64)
    odd_multiplier[0::2] = multiplier[1::2]  # the odd lanes' M0 in the low halves, as vpmuldq reads them
    rows = [
        multiplier.astype(np.int32),
        odd_multiplier.astype(np.int32),
        (folded if fold else rounding).astype(np.int32),
        shift.astype(np.int32),
        (np.zeros_like(shift_k) if fold else shift_k).astype(np.int32),
        low.astype(np.int32),
        high.astype(np.int32),
    ]
    first = len(value.constants)
    generic = value.expression
    anchor, source = value.anchor, base.expression
    bias = _foldable_bias(base)
    if bias is not None and anchor is not None:
        anchor = dataclasses.replace(anchor, offset=bias)
        source = _source
        rows.append(bias.astype(np.int32))  # for lanes off the fast path: the generic chain adds it again

    def requantize(env: Env) -> Any:
        from tvm import tirx

        if env.lanes == 1 or env.raw is None:  # a scalar tail: the ops as written
            if bias is None:
                return generic(env)
            return generic(dataclasses.replace(env, source=env.source - env.constant(first + 7)))
        if env.lanes != LANES:  # narrower vectors (aarch64 NEON, AVX2): widening multiplies (smull / smull2)
            wide = f"int64x{env.lanes}"
            product = tirx.Cast(wide, source(env)) * tirx.Cast(wide, env.constant(first))
            return finish(tirx.Cast(f"int32x{env.lanes}", product >> tirx.const(32, "int64")), env)
        # Each 64-bit half of the 16 lanes holds an even lane (low) and an odd lane (high): products of the
        # sign-extended halves are what vpmuldq computes (LLVM selects it for these shifts).
        a = tirx.reinterpret("int64x8", source(env))
        m_even = tirx.reinterpret("int64x8", env.constant(first))
        m_odd = tirx.reinterpret("int64x8", env.constant(first + 1))
        thirty_two = tirx.const(32, "int64")

        def low_half(x: Any) -> Any:
            return (x << thirty_two) >> thirty_two

        even = low_half(a) * low_half(m_even)
        odd = (a >> thirty_two) * low_half(m_odd)
        high_even = tirx.reinterpret("uint64x8", even) >> tirx.const(32, "uint64")
        high_odd = tirx.reinterpret("uint64x8", odd) & tirx.const(0xFFFFFFFF00000000, "uint64")
        return finish(tirx.reinterpret(f"int32x{LANES}", high_even | high_odd), env)

    def finish(top: Any, env: Env) -> Any:
        """From hi32 of the product on, in int32 lanes: round, shift, add K, clamp, narrow."""
        from tvm import tirx

        rounded = (top + env.constant(first + 2)) >> env.constant(first + 3)
        if not fold:
            rounded = rounded + env.constant(first + 4)
        clamped = tirx.min(tirx.max(rounded, env.constant(first + 5)), env.constant(first + 6))
        return tirx.Cast(f"uint8x{env.lanes}", clamped)

    return Lazy(value.logical, "uint8", requantize, anchor, value.leaves, [*value.constants, *rows])


def _foldable_bias(base: Lazy) -> np.ndarray | None:
    """The int32 bias of ``base = accumulator + bias`` straight after a convolution or matmul (it then folds
    into the kernel's zero-point correction), else None."""
    if base.step is None or base.step[1] != "Add" or base.anchor is None:
        return None
    accumulator, _, (bias,) = base.step
    if accumulator.expression is not _source or accumulator.anchor is not base.anchor:
        return None
    if base.anchor.kind not in ("conv", "matmul", "depthwise") or bias.dtype != np.int32:
        return None
    per_channel = _Lowering._per_channel(bias, base.logical)
    return np.broadcast_to(bias.reshape(-1)[0] if per_channel is None else per_channel, (base.logical[1],)).copy()


# ------------------------------------------------------------------------------------------ kernels


def _resize_kernel(value: Lazy, anchor: Anchor, target: Stored) -> tuple[Any, list[Any]]:
    """A separable linear resize of a float NHWC map: each output pixel the sum of its rows' taps times its
    columns' taps of the input (weights and source indices per output row and column, from
    :meth:`_Lowering._resize`), 16 channels at a time where the channels allow; epilogue fused."""
    from tvm import tirx
    from tvm.script import tirx as T

    source = anchor.input
    rows_at, rows_by, columns_at, columns_by = anchor.factors
    _, channels, out_h, out_w = anchor.logical
    th, tw = rows_at.shape[1], columns_at.shape[1]
    (ints, halves, floats), where = pack_constants(value.constants, channels)
    lanes = LANES if channels % LANES == 0 else 1
    blocks = channels // lanes

    def channel_span(b: Any) -> Any:
        return tirx.Ramp(b * lanes, 1, lanes) if lanes > 1 else b

    def splat(x: Any) -> Any:
        return tirx.Broadcast(x, lanes) if lanes > 1 else x

    def pixel(X: Any, Iy: Any, Wy: Any, Ix: Any, Wx: Any, i: Any, j: Any, b: Any) -> Any:
        total = None
        for y in range(th):
            for x in range(tw):
                term = _load(X, source, Iy[i, y], Ix[j, x], channel_span(b)) * splat(Wy[i, y] * Wx[j, x])
                total = term if total is None else total + term
        return total

    def finish(total: Any, b: Any, K64: Any, K32: Any, KF: Any) -> Any:
        return value.expression(epilogue_env(total, lambda i: None, (K64, K32, KF), where, channel_span(b), lanes))

    outer = loop_for(out_h * out_w * channels * th * tw)

    @prim_func
    def resize(
        X: T.Buffer(source.shape, "float32"),
        Iy: T.Buffer(rows_at.shape, "int32"),
        Wy: T.Buffer(rows_by.shape, "float32"),
        Ix: T.Buffer(columns_at.shape, "int32"),
        Wx: T.Buffer(columns_by.shape, "float32"),
        K64: T.Buffer(ints.shape, "int64"),
        K32: T.Buffer(halves.shape, "int32"),
        KF: T.Buffer(floats.shape, "float32"),
        Y: T.Buffer(target.shape, target.dtype),
    ):
        T.func_attr({"tir.noalias": True})
        for i in outer(out_h):
            for j in range(out_w):
                for b in range(blocks):
                    Y[store_index(target, i, j, channel_span(b))] = finish(
                        pixel(X, Iy, Wy, Ix, Wx, i, j, b), b, K64, K32, KF
                    )

    return resize, [source, rows_at, rows_by, columns_at, columns_by, ints, halves, floats]


def _load(buffer: Any, stored: Stored, i: Any, j: Any, c: Any) -> Any:
    """``stored`` at logical (i, j, c) (c a channel or a Ramp of channels); a 1 x 1 map at any (i, j)."""
    from tvm import tirx

    if len(stored.logical) == 4 and stored.logical[2:] == (1, 1):
        i, j = 0, 0
    elif stored.period:
        j = j % stored.period
    if stored.row_map:
        j = sum(((j // d) % m) * s for d, m, s in stored.row_map)
    if isinstance(stored.logical, Rows) and stored.logical[1] == 1 and isinstance(c, tirx.Ramp):
        return tirx.Broadcast(buffer[i + stored.pads[0], j + stored.pads[1], 0], c.lanes)  # one value per row
    if isinstance(stored.logical, Rows) and stored.logical[1] == 1:
        c = 0
    if stored.layout == "nhwc":
        return buffer[i + stored.pads[0], j + stored.pads[1], c]
    if stored.layout == "nc":
        return buffer[0, c]
    return buffer[0, c, i, j]


def _fill_kernel(target: Stored) -> Any:
    """Writes the border (and the padding channels) of a padded NHWC tensor with its fill value."""
    from tvm.script import tirx as T

    rows, cols, stored = target.shape
    _, channels, height, width = target.logical
    top, left = target.pads[0], target.pads[1]
    dtype, fill = target.dtype, target.fill
    extra = stored > channels

    @prim_func
    def fill_border(Y: T.Buffer((rows, cols, stored), dtype)):
        T.func_attr({"tir.noalias": True})
        for i in range(rows):
            if i < top or i >= top + height:
                for j in range(cols):
                    for c in range(stored):
                        Y[i, j, c] = T.Cast(dtype, fill)
            else:
                for j in range(left):
                    for c in range(stored):
                        Y[i, j, c] = T.Cast(dtype, fill)
                for j in range(left + width, cols):
                    for c in range(stored):
                        Y[i, j, c] = T.Cast(dtype, fill)
                if extra:
                    for j in range(width):
                        for c in range(channels, stored):
                            Y[i, j + left, c] = T.Cast(dtype, fill)

    return fill_border


def _copy_kernel(source: Stored, target: Stored, offset: int) -> Any:
    """Copies ``source`` into ``target`` at channel ``offset``: one input of a Concat (``target`` written in
    place), or a graph output stored NHWC copied out NCHW."""
    from tvm.script import tirx as T

    channels = source.logical[1]
    height, width = (source.logical[2], source.logical[3]) if len(source.logical) == 4 else (1, 1)
    dtype = source.dtype

    outer = loop_for(height * width * channels)

    @prim_func
    def copy(X: T.Buffer(source.shape, dtype), Y: T.Buffer(target.shape, dtype)):
        T.func_attr({"tir.noalias": True})
        for i in outer(height):
            for j in range(width):
                for c in range(channels):
                    Y[store_index(target, i, j, offset + c)] = _load(X, source, i, j, c)

    return copy


def _elementwise_kernel(value: Lazy, target: Stored) -> tuple[Any, list[Any]]:
    """One fused elementwise kernel over ``value``'s one or two leaves."""
    from tvm import tirx
    from tvm.script import tirx as T

    logical = value.logical
    height, width = (logical[2], logical[3]) if len(logical) == 4 else (1, 1)
    channels = logical[1]
    leaves = value.leaves
    if not 1 <= len(leaves) <= 2:
        raise NotLowerable(f"an elementwise kernel over {len(leaves)} tensors")
    first, second = leaves[0], leaves[-1]
    # Rows whose width 16 does not divide end in one more vector over their last 16 channels, overlapping the
    # block before it (elementwise: the overlap is computed again, to the same values, into another buffer).
    # One lane at a time, Data2VecAudio's GELUs over rows of 39 and 159 took 15 % of its run.
    stored_rows = all(leaf.layout != "nchw" for leaf in leaves)
    ragged = channels % LANES != 0 and channels > LANES and stored_rows
    vector = (channels % LANES == 0 or ragged) and stored_rows
    blocks = channels // LANES
    last = tirx.Ramp(channels - LANES, 1, LANES) if ragged else None
    (ints, halves, floats), where = pack_constants(value.constants, channels)
    y_nhwc = target.layout == "nhwc"
    top, left = target.pads[0], target.pads[1]
    dtype = target.dtype

    def compute(X0: Any, X1: Any, K64: Any, K32: Any, KF: Any, i: Any, j: Any, c: Any, lanes: int) -> Any:
        buffers = (X0, X1)

        def leaf(index: int) -> Any:
            return _load(buffers[index], leaves[index], i, j, c)

        return value.expression(epilogue_env(None, leaf, (K64, K32, KF), where, c, lanes))

    # Rows (one row of M pixels) run in parallel over the pixels.
    outer = loop_for(height * width * channels) if height > 1 else T.serial
    inner = loop_for(height * width * channels) if height == 1 else T.serial

    @prim_func
    def eltwise(
        X0: T.Buffer(first.shape, first.dtype),
        X1: T.Buffer(second.shape, second.dtype),
        K64: T.Buffer(ints.shape, "int64"),
        K32: T.Buffer(halves.shape, "int32"),
        KF: T.Buffer(floats.shape, "float32"),
        Y: T.Buffer(target.shape, dtype),
    ):
        T.func_attr({"tir.noalias": True})
        for i in outer(height):
            for j in inner(width):
                if vector:
                    for b in range(blocks):
                        if y_nhwc:
                            Y[i + top, j + left, T.ramp(b * LANES, 1, LANES)] = compute(
                                X0, X1, K64, K32, KF, i, j, tirx.Ramp(b * LANES, 1, LANES), LANES
                            )
                        else:
                            Y[0, T.ramp(b * LANES, 1, LANES)] = compute(
                                X0, X1, K64, K32, KF, i, j, tirx.Ramp(b * LANES, 1, LANES), LANES
                            )
                    if ragged:
                        if y_nhwc:
                            Y[i + top, j + left, last] = compute(X0, X1, K64, K32, KF, i, j, last, LANES)
                        else:
                            Y[0, last] = compute(X0, X1, K64, K32, KF, i, j, last, LANES)
                else:
                    for c in range(channels):
                        if y_nhwc:
                            Y[i + top, j + left, c] = compute(X0, X1, K64, K32, KF, i, j, c, 1)
                        else:
                            Y[0, c] = compute(X0, X1, K64, K32, KF, i, j, c, 1)

    return eltwise, [first, second, ints, halves, floats]


def _image_input(value: Lazy, target: Stored) -> bool:
    """An elementwise function of one float NCHW image (the input's QuantizeLinear) stored as NHWC with four
    channels, rows a multiple of 16 pixels wide and no per-channel constants."""
    leaves = value.leaves
    return (
        len(leaves) == 1
        and leaves[0].layout == "nchw"
        and not value.constants
        and target.layout == "nhwc"
        and target.channels == 4
        and value.logical[1] <= 4
        and value.logical[3] % LANES == 0
    )


def _image_input_kernel(value: Lazy, target: Stored) -> tuple[Any, list[Any]]:
    """16 pixels of each channel plane at a time, interleaved into 16 pixels x 4 channels (the padding
    channels hold the fill value) and stored as one 64-byte vector."""
    from tvm import tirx
    from tvm.script import tirx as T

    source = value.leaves[0]
    _, channels, height, width = value.logical
    top, left = target.pads[0], target.pads[1]
    fill = tirx.Broadcast(tirx.const(target.fill, target.dtype), LANES)
    order = [pixel + LANES * channel for pixel in range(LANES) for channel in range(4)]

    def pixels(X: Any, i: Any, j: Any) -> Any:
        planes = []
        for channel in range(channels):

            def leaf(_index: int, c: int = channel) -> Any:
                return X[0, c, i, tirx.Ramp(j * LANES, 1, LANES)]

            planes.append(value.expression(Env(None, leaf, lambda index: None, LANES, channel, None)))
        return tirx.Shuffle(planes + [fill] * (4 - channels), order)

    outer = loop_for(height * width * channels)

    @prim_func
    def image_input(X: T.Buffer(source.shape, source.dtype), Y: T.Buffer(target.shape, target.dtype)):
        T.func_attr({"tir.noalias": True})
        for i in outer(height):
            for j in range(width // LANES):
                Y[i + top, j * LANES + left, T.ramp(0, 1, 4 * LANES)] = pixels(X, i, j)

    return image_input, [source]


def _anchor_kernel(
    value: Lazy, target: Stored, flavor: int8_kernels.Flavor, float_flavor: int8_kernels.Flavor
) -> tuple[Any, list[Any]]:
    anchor = value.anchor
    assert anchor is not None
    if value.leaves:
        raise NotLowerable("an anchor's epilogue that reads another tensor")
    floating = anchor.source_dtype == "float32"
    from qcompile.backends.tvm import sequence

    if anchor.kind in ("layernorm", "softmax", *sequence.ROW_REDUCTIONS):
        return sequence.row_kernel(value, anchor, target)
    if anchor.kind == "resize":
        return _resize_kernel(value, anchor, target)
    if anchor.kind == "cumsum":
        return sequence.cumsum_kernel(value, anchor, target)
    if anchor.kind in ("colmean", "colsum", "coll2"):
        return sequence.column_kernel(value, anchor, target)
    if anchor.kind == "intsoftmax":
        return sequence.integer_softmax_kernel(value, anchor, target)
    if anchor.kind == "rotation":
        return sequence.rotation_kernel(value, anchor, target)
    if anchor.kind == "blocked":
        return blocked.blocked_kernel(value, anchor, target, flavor)
    if anchor.kind == "bmm":
        assert anchor.other is not None
        return sequence.batched_matmul_kernel(value, anchor, anchor.other, target, None if floating else flavor)
    if anchor.kind in ("conv", "matmul"):
        return _conv_kernel(value, anchor, target, float_flavor if floating else flavor)
    vnni_depthwise = anchor.kind == "depthwise" and flavor.name == "vnni" and not floating
    if vnni_depthwise and anchor.logical[1] % LANES == 0 and target.layout == "nhwc":
        return _depthwise_kernel(value, anchor, target)
    if anchor.kind in ("depthwise", "maxpool", "avgpool"):
        return _window_kernel(value, anchor, target)
    return _reduce_kernel(value, anchor, target)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


TILE_ROWS = {4: 3, 3: 4, 2: 6, 1: 8}  # rows per register tile of 4, 3, 2, 1 blocks of 16: <= 12 accumulators


def _tile_blocks(blocks: int) -> int:
    """Column blocks per register tile: the fewest zero blocks padded onto the last tile (64 columns in 4
    blocks: 4, not 3 + 3 with two blocks of zeros), 3 on a tie."""
    if blocks < 2:
        return blocks
    return min((4, 3, 2), key=lambda tile: (_ceil_div(blocks, tile) * tile - blocks, tile != 3, -tile))


L2_BYTES = 1 << 20  # per core, on the x86-64 cores with AVX-512 VNNI this targets (Zen 4/5, Ice Lake and later)


# PrimFunc attributes of a dense kernel: how many register-tile steps it runs, and the products in each; of a
# depthwise convolution on vector multiply-adds, its products.
DENSE_STEPS, STEP_MACS, WINDOW_MACS = "qcompile.dense_steps", "qcompile.step_macs", "qcompile.window_macs"


def _columns_outermost(weight_bytes: int, activation_bytes: int, block_tiles: int, row_tiles: int) -> bool:
    """Whether a dense kernel's tiles walk column tiles outermost (the activations re-read for every column tile)
    rather than row tiles (the weights re-read for every row tile, the default): when the weights do not stay in
    the L2 cache and that moves fewer bytes (ResNet's last stage: 2.4 MB of 3 x 3 weights, 49 output pixels;
    SmolLM2's 28 MB LM head over 256 rows)."""
    return weight_bytes > L2_BYTES // 2 and block_tiles * activation_bytes < row_tiles * weight_bytes


def pack_conv_weights(
    weights: np.ndarray, channels: int, tile_blocks: int, flavor: int8_kernels.Flavor = int8_kernels.VNNI
) -> np.ndarray:
    """int8 ``[N, C, KH, KW]`` -> ``[blocks, KH * KW * Cs / 4, 64]``: the reduction ordered (kh, kw, c) as the
    NHWC window is read (C padded with zero weights to the stored ``channels`` Cs), each 16 output columns'
    groups of four as one ``vpdpbusd`` reads them; blocks padded with zeros to whole tiles."""
    n, c, kh, kw = weights.shape
    ordered = np.zeros((kh, kw, channels, n), weights.dtype)
    ordered[:, :, :c, :] = weights.transpose(2, 3, 1, 0)
    return int8_kernels.pack_weights(ordered.reshape(kh * kw * channels, n), flavor, tile_blocks)


def _conv_kernel(value: Lazy, anchor: Anchor, target: Stored, flavor: int8_kernels.Flavor) -> tuple[Any, list[Any]]:
    """Dense convolution (any window, stride) or matmul on the VNNI register tiles, epilogue fused.

    The last block of a layer whose channels are not a multiple of the lanes is finished as a whole vector
    (its constants continue with the last channel's: ``pack_constants(whole=)``) into a stack buffer, then
    stored lane by lane. Finished lane by lane with the scalar epilogue, LLVM vectorized that loop into a
    masked store of int64 values narrowed to bytes, which the x86 backend of apache-tvm 0.27's LLVM lowered,
    for a single live lane, as an 8-byte store: seven zeros over the next pixel's first channels (MobileViTv2's
    129-channel 1 x 1 convolution, cosine 0.48 against the oracle). The AMX kernel does the same."""
    from tvm import tirx
    from tvm.script import tirx as T

    source, weights = anchor.input, anchor.weights
    assert weights is not None
    n, _, kh, kw = weights.shape
    stored = source.channels if source.layout == "nhwc" else source.logical[1]
    if stored % flavor.group:
        raise NotLowerable(f"a convolution over {stored} stored channels (not a multiple of {flavor.group})")
    out_h, out_w = (anchor.logical[2], anchor.logical[3]) if len(anchor.logical) == 4 else (1, 1)
    rows = out_h * out_w
    lanes, group = flavor.lanes, flavor.group
    if flavor.tiles and _amx_covers(anchor, source, stored, rows):
        return _amx_kernel(value, anchor, target, flavor)
    if flavor.name in ("vnni", "fp32"):
        tile_blocks = _tile_blocks(_ceil_div(n, lanes))
        tile_rows = min(TILE_ROWS[tile_blocks], rows)
    else:
        tile_blocks, tile_rows = min(flavor.tile_blocks, _ceil_div(n, lanes)), min(flavor.tile_rows, rows)
    packed = pack_conv_weights(weights, stored, tile_blocks, flavor)
    block_tiles = packed.shape[0] // tile_blocks
    row_tiles = -(-rows // tile_rows)
    quads = stored // group
    block_major = _columns_outermost(packed.size, rows * stored, block_tiles, row_tiles)
    accumulator = flavor.accumulator_dtype
    start = _accumulator_start(anchor, packed.shape[0] * lanes, flavor)
    (ints, halves, floats), where = pack_constants(value.constants, n, _ceil_div(n, lanes) * lanes)
    x_nhwc, y_nhwc = source.layout == "nhwc", target.layout == "nhwc"
    stride_h, stride_w = anchor.strides
    off_h = (source.pads[0] - anchor.pads[0]) if x_nhwc else 0
    off_w = (source.pads[1] - anchor.pads[1]) if x_nhwc else 0
    if x_nhwc and (off_h < 0 or off_w < 0):
        raise NotLowerable("a convolution input stored with less padding than the convolution needs")
    top, left = target.pads[0], target.pads[1]

    def row(tile: Any, r: Any) -> Any:
        row_tile = tile % row_tiles if block_major else tile // block_tiles
        return tirx.min(row_tile * tile_rows + r, rows - 1)

    # aarch64 widens a 4-byte vector load through 16-bit lanes (ushll, uzp1, mov: 3 instructions per row and
    # step); its flavors' codes (four for sdot, two for smull) are read as one word, through a view of the input.
    word_loads = flavor.name in ("neon-dot", "neon") and x_nhwc
    words = int(np.prod(source.shape)) // group

    def activations(X: Any, Xw: Any, tile: Any, r: Any, y: Any, x: Any, q: Any) -> Any:
        m = row(tile, r)
        if x_nhwc:
            h, w = (m // out_w) * stride_h + y + off_h, (m % out_w) * stride_w + x + off_w
            if word_loads:
                return flavor.word_activations(Xw[(h * source.shape[1] + w) * quads + q])
            codes = tirx.Ramp(q * group, 1, group) if group > 1 else q
            loaded = X[h, w, codes]
        else:
            loaded = X[0, tirx.Ramp(q * group, 1, group) if group > 1 else q]
        return flavor.activations(loaded)

    def epilogue(acc: Any, Cr: Any, K64: Any, K32: Any, KF: Any, c: Any, lanes: int) -> Any:
        return value.expression(epilogue_env(acc, lambda i: None, (K64, K32, KF), where, c, lanes))

    def oh(tile: Any, r: Any) -> Any:
        return row(tile, r) // out_w + top

    def block(tile: Any, b: Any) -> Any:
        """The tile's b-th block of 16 output columns."""
        block_tile = tile // row_tiles if block_major else tile % block_tiles
        return block_tile * tile_blocks + b

    def columns(tile: Any, b: Any) -> Any:
        return tirx.Ramp(block(tile, b) * lanes, 1, lanes)

    def ow(tile: Any, r: Any) -> Any:
        return row(tile, r) % out_w + left

    outer = loop_for(rows * n * kh * kw * stored)

    @prim_func
    def conv(
        X: T.Buffer(source.shape, flavor.activation_dtype),
        Wp: T.Buffer(packed.shape, flavor.weight_dtype),
        Cr: T.Buffer(start.shape, accumulator),
        K64: T.Buffer(ints.shape, "int64"),
        K32: T.Buffer(halves.shape, "int32"),
        KF: T.Buffer(floats.shape, "float32"),
        Y: T.Buffer(target.shape, target.dtype),
    ):
        T.func_attr({"tir.noalias": True})
        Xw = T.decl_buffer((words,), f"int{8 * group}", data=X.data)
        for tile in outer(row_tiles * block_tiles):
            acc = T.alloc_buffer((tile_rows, tile_blocks, lanes), accumulator, scope="global")  # on the stack
            tail = T.alloc_buffer((lanes,), target.dtype, scope="global")
            for r in T.unroll(tile_rows):
                for b in T.unroll(tile_blocks):
                    acc[r, b, T.ramp(0, 1, lanes)] = Cr[columns(tile, b)]  # minus the correction (or the bias)
            for y in range(kh):
                for x in range(kw):
                    for q in range(quads):
                        for b in T.unroll(tile_blocks):
                            for r in T.unroll(tile_rows):
                                acc[r, b, T.ramp(0, 1, lanes)] = flavor.dot(
                                    acc[r, b, T.ramp(0, 1, lanes)],
                                    activations(X, Xw, tile, r, y, x, q),
                                    Wp[block(tile, b), (y * kw + x) * quads + q, T.ramp(0, 1, lanes * group)],
                                )
            for r in T.unroll(tile_rows):
                for b in T.unroll(tile_blocks):
                    if (block(tile, b) + 1) * lanes <= n:  # a whole block: one vector
                        if y_nhwc:
                            Y[oh(tile, r), ow(tile, r), columns(tile, b)] = epilogue(
                                acc[r, b, T.ramp(0, 1, lanes)], Cr, K64, K32, KF, columns(tile, b), lanes
                            )
                        else:
                            Y[0, columns(tile, b)] = epilogue(
                                acc[r, b, T.ramp(0, 1, lanes)], Cr, K64, K32, KF, columns(tile, b), lanes
                            )
                    else:  # the last, partial block: computed whole (see _conv_kernel), stored lane by lane
                        tail[T.ramp(0, 1, lanes)] = epilogue(
                            acc[r, b, T.ramp(0, 1, lanes)], Cr, K64, K32, KF, columns(tile, b), lanes
                        )
                        for lane in range(lanes):
                            if block(tile, b) * lanes + lane < n:
                                if y_nhwc:
                                    Y[oh(tile, r), ow(tile, r), block(tile, b) * lanes + lane] = tail[lane]
                                else:
                                    Y[0, block(tile, b) * lanes + lane] = tail[lane]

    # What a cycle estimate needs (qcompile.hwmodels.mca): register-tile steps, and the products of each.
    work = {DENSE_STEPS: row_tiles * block_tiles * kh * kw * quads, STEP_MACS: tile_rows * tile_blocks * lanes * group}
    return conv.with_attrs(work), [source, packed, start, ints, halves, floats]


def _accumulator_start(anchor: Anchor, columns: int, flavor: int8_kernels.Flavor) -> np.ndarray:
    """What a dense kernel's ``columns`` accumulators (the packed columns) start at: a float layer's bias, or
    minus the zero-point correction (an addition less per output vector); zero in the padding columns."""
    weights = anchor.weights
    assert weights is not None
    n = weights.shape[0]
    start = np.zeros(columns, flavor.accumulator_dtype)
    if flavor.accumulator_dtype == "float32":
        start[:n] = 0.0 if anchor.offset is None else anchor.offset
    else:
        start[:n] = -anchor.correction(weights.astype(np.int64).sum(axis=(1, 2, 3)), flavor.offset).astype(np.int64)
    return start


# The AMX kernel's tiles: 16 rows of 64 bytes each (the activations: 16 rows of 64 codes; the weights: 16 groups
# of four k for 16 columns, as pack_weights lays out one block; the sums: 16 rows of 16 int32).
AMX_ROWS, AMX_BYTES = 16, 64
AMX_BLOCKS = 2  # column blocks of 16 per tile of work: 2 weight tiles, and 2 x (1 or 2) sum tiles
AMX_MIN_ROWS = 16


def _amx_covers(anchor: Anchor, source: Stored, stored: int, rows: int) -> bool:
    """Whether the AMX kernel computes this dense anchor: a 1 x 1 convolution (a matmul over rows) of a map
    stored without a border, so that its pixels are rows ``stored`` bytes apart, over at least 64 channels
    and 16 rows; int8 only."""
    weights = anchor.weights
    assert weights is not None
    return (
        source.dtype == "uint8"
        and weights.shape[2:] == (1, 1)
        and tuple(anchor.strides) == (1, 1)
        and not any(anchor.pads)
        and source.layout == "nhwc"
        and not any(source.pads)
        and not source.row_map
        and not source.period
        and source.shape[:2] == tuple(anchor.logical[2:4])
        and stored >= AMX_BYTES
        and rows >= AMX_MIN_ROWS
    )


def _amx_kernel(value: Lazy, anchor: Anchor, target: Stored, flavor: int8_kernels.Flavor) -> tuple[Any, list[Any]]:
    """A matmul over many rows (a transformer's linear layers, a CNN's pointwise convolutions) on the AMX tile
    registers, epilogue fused. Each tile of work is 32 rows (16 when fewer rows) by 32 columns: per 64 channels,
    two activation tiles and two weight tiles loaded, four ``tdpbusd`` (16 x 16 x 64 products each) into four
    sum tiles; the sums are then stored one tile at a time to a 1 KB buffer on the stack and finished as the
    register-tile kernel does. The last row tile starts early enough to end at the last row (recomputing some
    rows, with the same results) rather than reading past it. Inputs that are not a multiple of 64 channels
    (EfficientNet's 96, 144, 240...) end with a step whose weight tiles are padded with zero weights and whose
    activation tiles are loaded from a copy of their last channels, padded with zeros, in the same buffer."""
    from tvm import tirx
    from tvm.script import tirx as T

    source, weights = anchor.input, anchor.weights
    assert weights is not None
    n = weights.shape[0]
    stored = source.channels
    rows = anchor.logical[2] * anchor.logical[3]
    out_w = anchor.logical[3]
    lanes = flavor.lanes
    row_tile = 2 * AMX_ROWS if rows >= 2 * AMX_ROWS else AMX_ROWS
    a_tiles = row_tile // AMX_ROWS
    # the weights' channels padded with zeros to whole steps of 64: the last step's weight tiles
    steps, rest = divmod(stored, AMX_BYTES)
    packed = pack_conv_weights(weights, stored + (AMX_BYTES - rest) % AMX_BYTES, AMX_BLOCKS, flavor)
    start = _accumulator_start(anchor, packed.shape[0] * lanes, flavor)
    (ints, halves, floats), where = pack_constants(value.constants, n, _ceil_div(n, lanes) * lanes)
    block_tiles = packed.shape[0] // AMX_BLOCKS
    row_tiles = _ceil_div(rows, row_tile)
    quads = packed.shape[1]
    top, left = target.pads[0], target.pads[1]
    y_nhwc = target.layout == "nhwc"

    def intrinsic(name: str, *args: Any) -> Any:
        return tirx.call_llvm_intrin("void", f"llvm.x86.{name}", *args)

    def tile(number: Any) -> Any:
        return tirx.Cast("uint8", number)

    block_major = _columns_outermost(packed.size, rows * stored, block_tiles, row_tiles)

    def first(work: Any) -> Any:
        row_tile_index = work % row_tiles if block_major else work // block_tiles
        return tirx.min(row_tile_index * row_tile, rows - row_tile)

    def block(work: Any, b: Any) -> Any:
        block_tile = work // row_tiles if block_major else work % block_tiles
        return block_tile * AMX_BLOCKS + b

    def epilogue(acc: Any, K64: Any, K32: Any, KF: Any, c: Any, lanes: int) -> Any:
        return value.expression(epilogue_env(acc, lambda i: None, (K64, K32, KF), where, c, lanes))

    def finished(acc: Any, Cr: Any, K64: Any, K32: Any, KF: Any, r: Any, block: Any) -> Any:
        """Row ``r`` of the stored sums' block ``block``: the start added, the epilogue applied, as one vector."""
        columns = tirx.Ramp(block * lanes, 1, lanes)
        return epilogue(acc[r, tirx.Ramp(0, 1, lanes)] + Cr[columns], K64, K32, KF, columns, lanes)

    def weight_tile(Wp: Any, work: Any, b: Any, step: Any) -> Any:
        """Load weight tile ``6 + b``: the 16 groups of four channels of ``step`` for the tile's block ``b``."""
        at = (block(work, b) * quads + step * AMX_ROWS) * AMX_BYTES
        return intrinsic("tileloadd64", tile(6 + b), Wp.access_ptr("r", offset=at), tirx.const(AMX_BYTES, "int64"))

    def out(m: Any, c: Any) -> tuple[Any, ...]:
        return (m // out_w + top, m % out_w + left, c) if y_nhwc else (0, c)

    outer = loop_for(rows * n * stored)

    @prim_func
    def amx(
        X: T.Buffer(source.shape, "uint8"),
        Wp: T.Buffer(packed.shape, "int8"),
        Cr: T.Buffer(start.shape, "int32"),
        K64: T.Buffer(ints.shape, "int64"),
        K32: T.Buffer(halves.shape, "int32"),
        KF: T.Buffer(floats.shape, "float32"),
        Y: T.Buffer(target.shape, target.dtype),
    ):
        T.func_attr({"tir.noalias": True})
        Xf = T.decl_buffer((rows * stored,), "uint8", data=X.data)
        for work in outer(row_tiles * block_tiles):
            # the tile configuration (palette 1; each of the 8 tiles 16 rows of 64 bytes), loaded per tile of work
            config = T.alloc_buffer((64,), "uint8", scope="global")
            acc = T.alloc_buffer((AMX_ROWS, lanes), "int32", scope="global")
            tail = T.alloc_buffer((lanes,), target.dtype, scope="global")
            part = T.decl_buffer((AMX_ROWS, AMX_BYTES), "uint8", data=acc.data)  # (the sums' buffer, before them)
            for i in range(64):
                config[i] = T.uint8(0)
            config[0] = T.uint8(1)
            for t in range(8):
                config[16 + 2 * t] = T.uint8(AMX_BYTES)
                config[48 + t] = T.uint8(AMX_ROWS)
            T.evaluate(intrinsic("ldtilecfg", config.access_ptr("r")))
            # tiles 0-3: sums (a, b) at 2a + b; 4-5: activations; 6-7: weights
            for s in T.unroll(2 * a_tiles):
                T.evaluate(intrinsic("tilezero", tile(s)))
            for step in range(steps):
                for a in T.unroll(a_tiles):
                    T.evaluate(
                        intrinsic(
                            "tileloadd64",
                            tile(4 + a),
                            X.access_ptr("r", offset=(first(work) + a * AMX_ROWS) * stored + step * AMX_BYTES),
                            T.int64(stored),
                        )
                    )
                for b in T.unroll(AMX_BLOCKS):
                    T.evaluate(weight_tile(Wp, work, b, step))
                for a in T.unroll(a_tiles):
                    for b in T.unroll(AMX_BLOCKS):
                        T.evaluate(intrinsic("tdpbusd", tile(2 * a + b), tile(4 + a), tile(6 + b)))
            if rest > 0:  # the last channels (fewer than 64): each activation tile from a copy padded with zeros
                for b in T.unroll(AMX_BLOCKS):
                    T.evaluate(weight_tile(Wp, work, b, steps))
                for a in T.unroll(a_tiles):
                    for r in range(AMX_ROWS):
                        for c in T.vectorized(AMX_BYTES):
                            part[r, c] = T.if_then_else(
                                c < rest,
                                Xf[(first(work) + a * AMX_ROWS + r) * stored + steps * AMX_BYTES + c],
                                T.uint8(0),
                            )
                    T.evaluate(intrinsic("tileloadd64", tile(4 + a), acc.access_ptr("r"), T.int64(AMX_BYTES)))
                    for b in T.unroll(AMX_BLOCKS):
                        T.evaluate(intrinsic("tdpbusd", tile(2 * a + b), tile(4 + a), tile(6 + b)))
            for a in T.unroll(a_tiles):
                for b in T.unroll(AMX_BLOCKS):
                    T.evaluate(intrinsic("tilestored64", tile(2 * a + b), acc.access_ptr("w"), T.int64(4 * lanes)))
                    for r in range(AMX_ROWS):
                        if (block(work, b) + 1) * lanes <= n:  # a whole block: one vector
                            Y[out(first(work) + a * AMX_ROWS + r, T.ramp(block(work, b) * lanes, 1, lanes))] = finished(
                                acc, Cr, K64, K32, KF, r, block(work, b)
                            )
                        else:  # the last, partial block: computed whole (see _conv_kernel), stored lane by lane
                            tail[T.ramp(0, 1, lanes)] = finished(acc, Cr, K64, K32, KF, r, block(work, b))
                            for lane in range(lanes):
                                if block(work, b) * lanes + lane < n:
                                    Y[out(first(work) + a * AMX_ROWS + r, block(work, b) * lanes + lane)] = tail[lane]
            T.evaluate(intrinsic("tilerelease"))

    work = {DENSE_STEPS: row_tiles * block_tiles * steps, STEP_MACS: row_tile * AMX_BLOCKS * lanes * AMX_BYTES}
    return amx.with_attrs(work), [source, packed, start, ints, halves, floats]


def _depthwise_kernel(value: Lazy, anchor: Anchor, target: Stored) -> tuple[Any, list[Any]]:
    """Depthwise convolution on ``vpdpbusd``: each int32 lane holds one channel's code zero-extended (bytes
    ``x, 0, 0, 0``) and the weight as bytes ``w, 0, 0, 0``, so one instruction adds ``x * w`` to 16 channels'
    accumulators. Register tiles of up to 8 output pixels x up to 3 blocks of 16 channels (at most 12) keep
    that many independent accumulation chains in flight (one chain would wait on each instruction)."""
    from tvm import tirx
    from tvm.script import tirx as T

    source, weights = anchor.input, anchor.weights
    assert weights is not None
    _, channels, out_h, out_w = anchor.logical
    kh, kw = anchor.kernel
    stride_h, stride_w = anchor.strides
    off_h, off_w = source.pads[0] - anchor.pads[0], source.pads[1] - anchor.pads[1]
    if off_h < 0 or off_w < 0:
        raise NotLowerable("a depthwise input stored with less padding than it needs")
    taps = weights.reshape(channels, kh * kw).T
    as_bytes = taps.astype(np.uint8).astype(np.int32)  # w in the lane's low byte, zeros above
    correction = anchor.correction(taps.astype(np.int64).sum(axis=0))
    (ints, halves, floats), where = pack_constants(value.constants, channels)
    blocks = channels // LANES
    # Tile widths that divide the row: no clamped last tile, so LLVM sees the taps of neighbouring outputs
    # read the same input pixels and loads (and widens) each once. Widest first: a row of c outputs reads
    # (c - 1) * stride + kw input pixels per kernel row, so wide tiles load less per product (EfficientNet-
    # Lite0 0.90 ms against 1.03 ms with 3 channel blocks first, same process).
    tile_cols = max(d for d in range(1, min(8, out_w) + 1) if out_w % d == 0)
    tile_blocks = max(d for d in range(1, min(3, 12 // tile_cols) + 1) if blocks % d == 0)
    block_tiles = blocks // tile_blocks
    col_tiles = out_w // tile_cols
    tiles = col_tiles * block_tiles
    top, left = target.pads[0], target.pads[1]
    i32, i8 = f"int32x{LANES}", f"int8x{LANES * 4}"

    def col(t: Any, jj: Any) -> Any:
        return (t // block_tiles) * tile_cols + jj

    def channel(t: Any, b: Any) -> Any:
        return ((t % block_tiles) * tile_blocks + b) * LANES

    def codes(X: Any, i: Any, t: Any, jj: Any, b: Any, y: Any, x: Any) -> Any:
        loaded = X[i * stride_h + y + off_h, col(t, jj) * stride_w + x + off_w, tirx.Ramp(channel(t, b), 1, LANES)]
        return tirx.reinterpret(i8, tirx.Cast(i32, loaded))

    def epilogue(acc: Any, Cr: Any, K64: Any, K32: Any, KF: Any, t: Any, b: Any) -> Any:
        c = tirx.Ramp(channel(t, b), 1, LANES)
        return value.expression(epilogue_env(acc, lambda index: None, (K64, K32, KF), where, c, LANES))

    outer = loop_for(out_h * out_w * channels * kh * kw)

    @prim_func
    def depthwise(
        X: T.Buffer(source.shape, "uint8"),
        Wb: T.Buffer(as_bytes.shape, "int32"),
        Cr: T.Buffer((channels,), "int32"),
        K64: T.Buffer(ints.shape, "int64"),
        K32: T.Buffer(halves.shape, "int32"),
        KF: T.Buffer(floats.shape, "float32"),
        Y: T.Buffer(target.shape, target.dtype),
    ):
        T.func_attr({"tir.noalias": True})
        for it in outer(out_h * tiles):
            acc = T.alloc_buffer((tile_cols, tile_blocks, LANES), "int32", scope="global")  # on the stack
            for jj in T.unroll(tile_cols):
                for b in T.unroll(tile_blocks):
                    acc[jj, b, T.ramp(0, 1, LANES)] = Cr[T.ramp(channel(it % tiles, b), 1, LANES)]
            for y in T.unroll(kh):
                for x in T.unroll(kw):
                    for b in T.unroll(tile_blocks):
                        for jj in T.unroll(tile_cols):
                            acc[jj, b, T.ramp(0, 1, LANES)] = T.call_llvm_pure_intrin(
                                i32,
                                int8_kernels.DOT,
                                acc[jj, b, T.ramp(0, 1, LANES)],
                                codes(X, it // tiles, it % tiles, jj, b, y, x),
                                T.reinterpret(i8, Wb[y * kw + x, T.ramp(channel(it % tiles, b), 1, LANES)]),
                            )
            for jj in T.unroll(tile_cols):
                for b in T.unroll(tile_blocks):
                    Y[it // tiles + top, col(it % tiles, jj) + left, T.ramp(channel(it % tiles, b), 1, LANES)] = (
                        epilogue(acc[jj, b, T.ramp(0, 1, LANES)], Cr, K64, K32, KF, it % tiles, b)
                    )

    return depthwise, [source, as_bytes, (-correction.astype(np.int64)).astype(np.int32), ints, halves, floats]


def _window_kernel(value: Lazy, anchor: Anchor, target: Stored) -> tuple[Any, list[Any]]:
    """Depthwise convolution (int32 products of the widened codes) or max pooling, over each output pixel's
    window, vectorised over 16 channels; epilogue fused."""
    from tvm import tirx
    from tvm.script import tirx as T

    source = anchor.input
    _, channels, out_h, out_w = anchor.logical
    kh, kw = anchor.kernel
    stride_h, stride_w = anchor.strides
    off_h, off_w = source.pads[0] - anchor.pads[0], source.pads[1] - anchor.pads[1]
    if off_h < 0 or off_w < 0:
        raise NotLowerable("a window op's input stored with less padding than it needs")
    depthwise = anchor.kind == "depthwise"
    average = anchor.kind == "avgpool"  # weights: one over each output pixel's count, [out_h * out_w, 1]
    floating = anchor.source_dtype == "float32"
    accumulator = "float32" if floating else "int32"
    if average:
        assert anchor.weights is not None
        taps = anchor.weights
        correction = np.zeros(channels, accumulator)
    elif depthwise and floating:  # a float layer: products in float, the bias subtracted as a negative correction
        assert anchor.weights is not None
        taps = anchor.weights.reshape(channels, kh * kw).T.astype(np.float32)
        correction = -(np.zeros(channels, np.float32) if anchor.offset is None else anchor.offset.astype(np.float32))
    elif depthwise:
        assert anchor.weights is not None
        taps = anchor.weights.reshape(channels, kh * kw).T.astype(np.int32)  # [taps, C]
        correction = anchor.correction(taps.astype(np.int64).sum(axis=0))
    else:
        taps = np.zeros((1, channels), np.int32)
        correction = np.zeros(channels, accumulator)
    (ints, halves, floats), where = pack_constants(value.constants, channels)
    vector = channels % LANES == 0
    blocks = channels // LANES
    top, left = target.pads[0], target.pads[1]
    y_nhwc = target.layout == "nhwc"

    def window(X: Any, Wd: Any, i: Any, j: Any, c: Any, lanes: int) -> Any:
        result = None
        for y in range(kh):
            for x in range(kw):
                loaded = X[i * stride_h + y + off_h, j * stride_w + x + off_w, c]
                if depthwise:
                    widened = loaded if floating else tirx.Cast("int32" if lanes == 1 else f"int32x{lanes}", loaded)
                    term = widened * Wd[y * kw + x, c]
                    result = term if result is None else result + term
                elif average:
                    result = loaded if result is None else result + loaded
                else:
                    result = loaded if result is None else tirx.max(result, loaded)
        if average:
            reciprocal = Wd[i * out_w + j, 0]
            result = result * (tirx.Broadcast(reciprocal, lanes) if lanes > 1 else reciprocal)
        return result

    def compute(X: Any, Wd: Any, Cr: Any, K64: Any, K32: Any, KF: Any, i: Any, j: Any, c: Any, lanes: int) -> Any:
        source_value = window(X, Wd, i, j, c, lanes)
        if depthwise:
            source_value = source_value - Cr[c]
        return value.expression(epilogue_env(source_value, lambda index: None, (K64, K32, KF), where, c, lanes))

    outer = loop_for(out_h * out_w * channels * kh * kw)

    @prim_func
    def window_op(
        X: T.Buffer(source.shape, source.dtype),
        Wd: T.Buffer(taps.shape, taps.dtype.name),
        Cr: T.Buffer((channels,), accumulator),
        K64: T.Buffer(ints.shape, "int64"),
        K32: T.Buffer(halves.shape, "int32"),
        KF: T.Buffer(floats.shape, "float32"),
        Y: T.Buffer(target.shape, target.dtype),
    ):
        T.func_attr({"tir.noalias": True})
        for i in outer(out_h):
            for j in range(out_w):
                if vector:
                    for b in range(blocks):
                        if y_nhwc:
                            Y[i + top, j + left, T.ramp(b * LANES, 1, LANES)] = compute(
                                X, Wd, Cr, K64, K32, KF, i, j, tirx.Ramp(b * LANES, 1, LANES), LANES
                            )
                        else:
                            Y[0, T.ramp(b * LANES, 1, LANES)] = compute(
                                X, Wd, Cr, K64, K32, KF, i, j, tirx.Ramp(b * LANES, 1, LANES), LANES
                            )
                else:
                    for c in range(channels):
                        if y_nhwc:
                            Y[i + top, j + left, c] = compute(X, Wd, Cr, K64, K32, KF, i, j, c, 1)
                        else:
                            Y[0, c] = compute(X, Wd, Cr, K64, K32, KF, i, j, c, 1)

    work = {WINDOW_MACS: channels * out_h * out_w * kh * kw} if depthwise else {}
    return window_op.with_attrs(work) if work else window_op, [source, taps, correction, ints, halves, floats]


def _reduce_kernel(value: Lazy, anchor: Anchor, target: Stored) -> tuple[Any, list[Any]]:
    """Sum over H, W per channel (in the input's dtype, as the oracle's wrap-around), epilogue fused."""
    from tvm import tirx
    from tvm.script import tirx as T

    source = anchor.input
    _, channels, height, width = source.logical
    dtype = source.dtype
    lanes = LANES if channels % LANES == 0 else 1
    blocks = channels // lanes
    (ints, halves, floats), where = pack_constants(value.constants, channels)
    top, left = source.pads[0], source.pads[1]
    if target.layout != "nc" and (not isinstance(target.logical, Rows) or any(target.pads)):
        raise NotLowerable("a ReduceSum whose result is padded")  # (a [1, C] row-major result is one row)

    whole = tirx.Ramp(0, 1, lanes) if lanes > 1 else 0
    zero = tirx.Broadcast(tirx.const(0, dtype), lanes) if lanes > 1 else tirx.const(0, dtype)

    def channel(b: Any) -> Any:
        return tirx.Ramp(b * lanes, 1, lanes) if lanes > 1 else b

    def finish(total: Any, K64: Any, K32: Any, KF: Any, b: Any) -> Any:
        return value.expression(epilogue_env(total, lambda index: None, (K64, K32, KF), where, channel(b), lanes))

    outer = loop_for(height * width * channels)

    @prim_func
    def reduce(
        X: T.Buffer(source.shape, dtype),
        K64: T.Buffer(ints.shape, "int64"),
        K32: T.Buffer(halves.shape, "int32"),
        KF: T.Buffer(floats.shape, "float32"),
        Y: T.Buffer(target.shape, target.dtype),
    ):
        T.func_attr({"tir.noalias": True})
        for b in outer(blocks):
            total = T.alloc_buffer((lanes,), dtype, scope="global")
            total[whole] = zero
            for i in range(height):
                for j in range(width):
                    total[whole] = total[whole] + X[i + top, j + left, channel(b)]
            Y[store_index(target, 0, 0, channel(b))] = finish(total[whole], K64, K32, KF, b)

    return reduce, [source, ints, halves, floats]


def to_relax(
    model: onnx.ModelProto,
    flavor: int8_kernels.Flavor = int8_kernels.VNNI,
    float_flavor: int8_kernels.Flavor | None = None,
) -> Any:
    """The Relax module of ``model`` (an integer-only graph) on these kernels with ``flavor``'s dot product
    (the depthwise kernel is VNNI's; other flavors run depthwise layers as int32 multiply-adds) and
    ``float_flavor``'s fused multiply-adds in float layers (default: this machine's), or :class:`NotLowerable`."""
    return _Lowering(deduplicated(model), flavor, float_flavor or int8_kernels.float_flavor()).run()


def deduplicated(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with each node that repeats an earlier one (same op, attributes and inputs, constants compared
    by value) dropped and its readers pointed at the earlier outputs: the attention's query, key and value
    projections read one input, so its reshape, rotation and quantization are computed once, not three times."""
    digests = {tensor.name: array_digest(numpy_helper.to_array(tensor)) for tensor in model.graph.initializer}
    outputs = {output.name for output in model.graph.output}
    result = onnx.ModelProto()
    result.CopyFrom(model)
    renamed: dict[str, str] = {}
    seen: dict[tuple[Any, ...], onnx.NodeProto] = {}
    kept = []
    for node in result.graph.node:
        for index, name in enumerate(node.input):
            node.input[index] = renamed.get(name, name)
        key = (
            node.op_type,
            node.domain,
            tuple(attribute.SerializeToString() for attribute in node.attribute),
            tuple(digests.get(name, name) for name in node.input),
        )
        earlier = seen.get(key)
        if earlier is None or any(name in outputs for name in node.output) or len(earlier.output) != len(node.output):
            seen.setdefault(key, node)
            kept.append(node)
            continue
        renamed.update(zip(node.output, earlier.output, strict=True))
    if len(kept) == len(result.graph.node):
        return model
    nodes = [onnx.NodeProto.FromString(node.SerializeToString()) for node in kept]
    del result.graph.node[:]
    result.graph.node.extend(nodes)
    return result


def pipeline() -> Any:
    """Relax's default build pipeline less the passes that expect TVM's block-form PrimFuncs
    (``RewriteDataflowReshape`` inspects every called PrimFunc; these kernels are loop nests) and the
    operator passes that have nothing to do here (there are no Relax operators, only calls of kernels)."""
    import tvm
    from tvm.relax import transform

    @tvm.transform.module_pass(opt_level=0)
    def lower(module: Any, _context: Any) -> Any:
        passes = [
            # a transposed operand a batched product reads in place leaves its transpose kernel unused
            transform.DeadCodeElimination(["main"]),
            transform.ToNonDataflow(),
            transform.RemovePurityChecking(),
            transform.CallTIRRewrite(),
            transform.StaticPlanBlockMemory(),
            transform.LowerAllocTensor(),
            transform.KillAfterLastUse(),
            transform.LowerRuntimeBuiltin(),
            transform.ComputePrimValue(),
            transform.VMShapeLower(),
            transform.AttachGlobalSymbol(),
        ]
        return tvm.transform.Sequential(passes)(module)

    return lower
