"""A plain numpy interpreter of integer-only graphs: the oracle the lowered graph is checked against.

It knows exactly the ops :mod:`qcompile.backends.integer.lowering` emits and evaluates each with the integer
semantics of the ONNX specification, in int64 where the spec's result type allows no overflow:
``QuantizeLinear`` (round half to even, saturate), ``ConvInteger`` / ``MatMulInteger`` (subtract the zero
points, multiply, accumulate in int32: summed in float64 by BLAS where that is exact), ``Div`` on integers
(truncation toward zero), ``Clip``, ``Max``, ``Cast``, ``MaxPool`` on uint8, ``ReduceSum``, ``ReduceMax``,
``Gather`` (tables), ``Concat``, ``Where``, the integer and boolean ops of masks (``And``, ``Or``, ``Not``,
``Equal``, ``GatherElements``, ``GatherND``, ``Expand``, ``ConstantOfShape``), the layout ops,
and at the output ``Mul`` on floats and ``DequantizeLinear``. Any other op is an error: the oracle never guesses,
except on the nodes a host build kept in float (named in the graph's ``qcompile.float_islands`` metadata):
those are run by onnxruntime, one node at a time (the float semantics of the QDQ graph's own executor).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qcompile.errors import UnsupportedModelError

_DTYPES = {onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.UINT8: np.uint8,
           onnx.TensorProto.INT8: np.int8, onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.BOOL: np.bool_,
           onnx.TensorProto.INT16: np.int16, onnx.TensorProto.UINT16: np.uint16}  # fmt: skip


# Island sessions kept (LRU): more than a graph's island nodes, or a pass over them misses every time.
ISLAND_SESSIONS = 16384


def node_attributes(node: onnx.NodeProto) -> dict[str, Any]:
    """A node's attributes as Python values."""
    return {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}


def _windows(
    x: np.ndarray, kernel: list[int], strides: list[int], pads: list[int], dilations: list[int], fill: Any
) -> np.ndarray:
    """``[N, C, OH, OW, KH, KW]`` sliding windows of an NCHW tensor padded with ``fill``."""
    padded = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])), constant_values=fill)
    height = (padded.shape[2] - dilations[0] * (kernel[0] - 1) - 1) // strides[0] + 1
    width = (padded.shape[3] - dilations[1] * (kernel[1] - 1) - 1) // strides[1] + 1
    rows = (np.arange(height) * strides[0])[:, None] + np.arange(kernel[0]) * dilations[0]  # [OH, KH]
    cols = (np.arange(width) * strides[1])[:, None] + np.arange(kernel[1]) * dilations[1]  # [OW, KW]
    return padded[:, :, rows[:, None, :, None], cols[None, :, None, :]]


def _conv_integer(x: np.ndarray, w: np.ndarray, x_zero: Any, w_zero: Any, attributes: dict[str, Any]) -> np.ndarray:
    if w.ndim == 3:  # over time: the same convolution on a height of 1
        lifted = {**attributes, "kernel_shape": [1, *attributes.get("kernel_shape", w.shape[2:])]}
        for key, unit in (("strides", 1), ("dilations", 1)):
            lifted[key] = [unit, *attributes.get(key, [unit])]
        pads = list(attributes.get("pads", [0, 0]))
        lifted["pads"] = [0, pads[0], 0, pads[1]]
        return _conv_integer(x[:, :, None], w[:, :, None], x_zero, w_zero, lifted)[:, :, 0]
    kernel = list(attributes.get("kernel_shape", w.shape[2:]))
    strides = list(attributes.get("strides", [1, 1]))
    dilations = list(attributes.get("dilations", [1, 1]))
    pads = list(attributes.get("pads", [0, 0, 0, 0]))
    if attributes.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise UnsupportedModelError("the integer oracle takes explicit pads, not auto_pad")
    groups = int(attributes.get("group", 1))
    centred = x.astype(np.int64) - np.int64(x_zero)
    weights = w.astype(np.int64) - np.int64(w_zero)
    # Padding holds the zero point, i.e. 0 once centred.
    windows = _windows(centred, kernel, strides, pads, dilations, 0)  # [N, C, OH, OW, KH, KW]
    batch, _, height, width = windows.shape[:4]
    per_group_in, per_group_out = x.shape[1] // groups, w.shape[0] // groups
    depth = per_group_in * kernel[0] * kernel[1]
    # One product per group: [G, N*OH*OW, Cg*KH*KW] @ [G, Cg*KH*KW, Og].
    rows = windows.reshape(batch, groups, per_group_in, height, width, *kernel)
    rows = rows.transpose(1, 0, 3, 4, 2, 5, 6).reshape(groups, batch * height * width, depth)
    filters = weights.reshape(groups, per_group_out, depth).transpose(0, 2, 1)
    sums = _integer_matmul(rows, filters)  # [G, N*OH*OW, Og]
    sums = sums.reshape(groups, batch, height, width, per_group_out).transpose(1, 0, 4, 2, 3)
    return sums.reshape(batch, groups * per_group_out, height, width).astype(np.int32)


# float64 holds every integer below 2**53 exactly: a product of integers whose every partial sum stays below it is
# exact in float64 in any order of summation, so BLAS computes it; past that bound, numpy's int64 loops do.
_EXACT_IN_FLOAT64 = 2**53


def _integer_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` of int64 arrays, exactly, as int64."""
    if a.size == 0 or b.size == 0:
        return np.matmul(a, b)
    bound = int(np.abs(a).max()) * int(np.abs(b).max()) * a.shape[-1]
    if bound >= _EXACT_IN_FLOAT64:
        return np.matmul(a, b)
    return np.matmul(a.astype(np.float64), b.astype(np.float64)).astype(np.int64)


def _max_pool(x: np.ndarray, attributes: dict[str, Any]) -> np.ndarray:
    if attributes.get("ceil_mode", 0) or attributes.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise UnsupportedModelError("the integer oracle's MaxPool takes explicit pads and floor mode")
    kernel = list(attributes["kernel_shape"])
    windows = _windows(
        x, kernel, list(attributes.get("strides", [1, 1])), list(attributes.get("pads", [0, 0, 0, 0])),
        list(attributes.get("dilations", [1, 1])), np.iinfo(x.dtype).min,
    )  # fmt: skip
    return windows.max(axis=(4, 5)).astype(x.dtype)


# The metadata key of an integer graph with float islands: the kept float nodes' names, one per line.
FLOAT_ISLANDS = "qcompile.float_islands"


def float_islands(model: onnx.ModelProto) -> frozenset[str]:
    """The names of the nodes a host build's lowering kept in float (see ``lower(float_islands=True)``)."""
    listed = next((prop.value for prop in model.metadata_props if prop.key == FLOAT_ISLANDS), "")
    return frozenset(filter(None, listed.split("\n")))


def float_node(model: onnx.ModelProto, node: onnx.NodeProto, given: dict[str, np.ndarray]) -> list[np.ndarray]:
    """One node of a float island run by onnxruntime (the float semantics the QDQ graph's executor has; on
    edge cases such as a pooling window larger than its input onnx.reference differs from it)."""
    from qcompile.execution import ORT_IR_VERSION

    inputs = [
        helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape)
        for name, value in given.items()
    ]
    outputs = [helper.make_empty_tensor_value_info(name) for name in node.output if name]
    graph = helper.make_graph([node], "island", inputs, outputs)
    single = helper.make_model(graph, opset_imports=list(model.opset_import))
    single.ir_version = ORT_IR_VERSION
    return [np.asarray(value) for value in _island_session(single.SerializeToString()).run(None, given)]


@functools.lru_cache(maxsize=ISLAND_SESSIONS)
def _island_session(serialized: bytes) -> Any:
    """An onnxruntime session of one island node, kept: a compile runs the oracle twice (and once more per
    sample a test checks) over the same nodes (a transformer has hundreds: MiniLM 451; SmolLM2-135M's W4A8 decode
    step 5287). One thread, no pool: each session's own pool of threads, thousands of sessions alive, made
    creating one take 27 ms instead of 0.1 (5000 nodes: 138 s a pass)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])


def _perturbed(value: np.ndarray, perturbation: float) -> np.ndarray:
    """``value * (1 + perturbation)``, except where that overflows float32: a mask's -3.4e38 keeps its value
    rather than becoming -inf, which a later ``0 * mask`` (unmasked positions) would turn into NaN."""
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = value * np.float32(1 + perturbation)
    return np.where(np.isinf(scaled) & np.isfinite(value), value, scaled)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], island_perturbation: float = 0.0) -> list[np.ndarray]:
    """Evaluate the integer graph ``model`` on ``feeds``; returns the graph outputs in order. Float islands are
    run by onnxruntime, node by node; ``island_perturbation`` scales their float outputs by ``1 + p`` (with
    ``p`` at float32's rounding, how far rounding in the islands alone moves the outputs)."""
    env: dict[str, np.ndarray] = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    env.update(feeds)
    islands = float_islands(model)
    for node in model.graph.node:
        args: list[Any] = [env[name] if name else None for name in node.input]
        attributes = node_attributes(node)
        op = node.op_type
        if (node.name or node.output[0]) in islands:
            evaluated = float_node(model, node, {name: env[name] for name in node.input if name})
            if island_perturbation:
                evaluated = [_perturbed(v, island_perturbation) if v.dtype == np.float32 else v for v in evaluated]
            env.update(zip(node.output, evaluated, strict=True))
            continue
        if op == "QuantizeLinear":
            zero = args[2] if len(args) > 2 and args[2] is not None else np.uint8(0)
            info = np.iinfo(zero.dtype)
            scaled = np.round(args[0].astype(np.float32) / np.float32(args[1])).astype(np.float64) + float(zero)
            result = np.clip(scaled, info.min, info.max).astype(zero.dtype)
        elif op == "DequantizeLinear":
            zero = args[2] if len(args) > 2 and args[2] is not None else 0
            result = ((args[0].astype(np.int32) - np.int32(zero)).astype(np.float32) * np.float32(args[1])).astype(
                np.float32
            )
        elif op == "ConvInteger":
            result = _conv_integer(
                args[0], args[1], args[2] if len(args) > 2 else 0, args[3] if len(args) > 3 else 0, attributes
            )
        elif op == "MatMulInteger":
            a = args[0].astype(np.int64) - np.int64(args[2] if len(args) > 2 and args[2] is not None else 0)
            b = args[1].astype(np.int64) - np.int64(args[3] if len(args) > 3 and args[3] is not None else 0)
            result = _integer_matmul(a, b).astype(np.int32)
        elif op == "Cast":
            target = _DTYPES[attributes["to"]]
            result = args[0].astype(target)
        elif op in ("Add", "Sub", "Mul", "Max", "Min"):
            a, b = np.asarray(args[0]), np.asarray(args[1])
            function = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Max": np.maximum, "Min": np.minimum}[op]
            result = function(a, b).astype(np.result_type(a.dtype, b.dtype))
        elif op == "Div":
            a, b = np.asarray(args[0]), np.asarray(args[1])
            if a.dtype.kind not in "iu":
                raise UnsupportedModelError(f"{node.name}: the integer oracle divides integers only")
            quotient = np.abs(a.astype(np.int64)) // np.abs(b.astype(np.int64))
            result = (np.sign(a) * np.sign(b) * quotient).astype(a.dtype)  # truncation toward zero
        elif op == "Clip":
            result = np.clip(args[0], args[1], args[2]).astype(args[0].dtype)
        elif op == "MaxPool":
            result = _max_pool(args[0], attributes)
        elif op == "ReduceSum":
            axes = tuple(int(axis) for axis in args[1])
            result = (
                args[0]
                .sum(axis=axes, keepdims=bool(attributes.get("keepdims", 1)), dtype=np.int64)
                .astype(args[0].dtype)
            )
        elif op == "ReduceMax":
            axes = tuple(int(axis) for axis in args[1])
            result = args[0].max(axis=axes, keepdims=bool(attributes.get("keepdims", 1)))
        elif op == "Flatten":
            axis = int(attributes.get("axis", 1))
            result = args[0].reshape(int(np.prod(args[0].shape[:axis])), -1)
        elif op == "Reshape":
            shape = [dim if dim != 0 else args[0].shape[index] for index, dim in enumerate(args[1].tolist())]
            result = args[0].reshape(shape)
        elif op == "Transpose":
            result = np.transpose(args[0], attributes.get("perm"))
        elif op == "Where":
            result = np.where(args[0], args[1], args[2])
        elif op in ("And", "Or", "Xor"):
            result = {"And": np.logical_and, "Or": np.logical_or, "Xor": np.logical_xor}[op](args[0], args[1])
        elif op == "Not":
            result = np.logical_not(args[0])
        elif op == "Equal":
            result = np.equal(args[0], args[1])
        elif op == "GatherElements":
            result = np.take_along_axis(args[0], args[1].astype(np.int64), axis=int(attributes.get("axis", 0)))
        elif op == "GatherND":
            if int(attributes.get("batch_dims", 0)):
                raise UnsupportedModelError(f"{node.name}: the integer oracle's GatherND takes batch_dims = 0")
            indices = args[1].astype(np.int64)
            result = args[0][tuple(np.moveaxis(indices, -1, 0))]
        elif op == "Expand":
            result = args[0] * np.ones(tuple(int(d) for d in args[1]), dtype=args[0].dtype)
        elif op == "ConstantOfShape":  # (torch's full_like: WavLM's relative-position buckets, TorchScript export)
            fill = attributes.get("value")
            value = numpy_helper.to_array(fill).reshape(-1)[0] if fill is not None else np.float32(0)
            result = np.full(tuple(int(d) for d in args[0]), value, dtype=value.dtype)
        elif op == "Gather":
            result = np.take(args[0], args[1].astype(np.int64), axis=int(attributes.get("axis", 0)))
        elif op == "Concat":
            result = np.concatenate(args, axis=int(attributes["axis"]))
        elif op == "Slice":
            starts, ends = (np.asarray(args[1]).tolist(), np.asarray(args[2]).tolist())
            sliced = np.asarray(args[3]).tolist() if len(args) > 3 and args[3] is not None else range(len(starts))
            window = [slice(None)] * args[0].ndim
            for start, end, dimension in zip(starts, ends, sliced, strict=True):
                window[dimension] = slice(start, end)
            result = args[0][tuple(window)]
        elif op == "CumSum":  # (RoBERTa's position ids: a running count of the padding mask, in its dtype)
            axis = int(np.asarray(args[1]).reshape(-1)[0])
            reverse, exclusive = bool(attributes.get("reverse", 0)), bool(attributes.get("exclusive", 0))
            data = np.flip(args[0], axis) if reverse else args[0]
            total = np.cumsum(data, axis=axis, dtype=data.dtype)
            if exclusive:  # each position without its own value: the running sum shifted by one
                total = np.concatenate(
                    [np.zeros_like(np.take(total, [0], axis=axis)), np.delete(total, -1, axis=axis)], axis=axis
                )
            result = np.flip(total, axis) if reverse else total
        elif op == "Squeeze":
            result = np.squeeze(args[0], axis=tuple(int(a) for a in args[1]) if len(args) > 1 else None)
        elif op == "Unsqueeze":
            result = np.expand_dims(args[0], tuple(int(a) for a in args[1]))
        else:
            raise UnsupportedModelError(f"{node.name}: the integer oracle has no '{op}'")
        env[node.output[0]] = np.asarray(result)
    return [env[output.name] for output in model.graph.output]
