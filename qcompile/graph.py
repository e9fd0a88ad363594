"""Graph helpers every stage shares: constants, layer names, initializers, the weights of linear layers.

A leaf: it imports nothing from qcompile, so passes, search, cost models and backends can all use it
without importing each other.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx_ir as ir

# On a model (``metadata_props``) whose input dims the frontend fixed from a calibration sample while keeping the
# computations of shapes from them: passes that add reshapes compute their shapes from values, not constants,
# so that the onnxruntime executors still run other batch sizes and lengths. Its value lists the dims (JSON).
DYNAMIC_DIMS_KEY = "qcompile.dynamic_dims"


def keeps_dynamic_dims(model: ir.Model) -> bool:
    return DYNAMIC_DIMS_KEY in model.metadata_props


def is_constant(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None


def is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16)


def layer_name(node: ir.Node) -> str:
    """The name a layer goes by in the manifest, the search and the cost model: the node's, else its output's."""
    return node.name or str(node.outputs[0].name)


def int_attribute(node: ir.Node, name: str, default: int) -> int:
    attribute = node.attributes.get(name)
    return attribute.as_int() if attribute is not None else default


def clone(model: ir.Model) -> ir.Model:
    """A copy of the graph and of every value's metadata; weight tensors are shared, which is safe because
    passes replace a tensor (``value.const_value = ...``) and never write into one."""
    return model.clone(deep_copy=True)


def array_digest(array: np.ndarray) -> str:
    """A digest of ``array``'s type, shape and values: equal digests, equal constants."""
    header = f"{array.dtype.name}{array.shape}".encode()
    return hashlib.blake2b(header + np.ascontiguousarray(array).tobytes(), digest_size=16).hexdigest()


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as an initializer of ``graph`` called ``name``; returns its value."""
    value = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        const_value=ir.tensor(array, name=name),
    )
    graph.register_initializer(value)
    return value


def drop_if_unused(graph: ir.Graph, value: ir.Value | None) -> None:
    """Remove a float initializer its integer replacement made dead: the artifact must not carry both."""
    if value is not None and not value.uses() and not value.is_graph_output() and value.name in graph.initializers:
        del graph.initializers[value.name]  # type: ignore[arg-type]


def single_use_constant(value: ir.Value | None) -> bool:
    return value is not None and is_constant(value) and len(value.uses()) == 1 and not value.is_graph_input()


def constant_weight(value: ir.Value | None) -> bool:
    return value is not None and is_constant(value) and not value.is_graph_input()


def private_weight(node: ir.Node, index: int = 1) -> ir.Value:
    """The constant input ``index`` of ``node``, copied first when other nodes read it too (an LM head tied to
    the embedding table): a rewrite of this consumer's weight must not change theirs. The quantized model
    stores the consumer's weight as integer codes anyway, so the copy costs nothing in the artifact."""
    value = node.inputs[index]
    assert value is not None and value.const_value is not None
    if len(value.uses()) == 1:
        return value
    graph = node.graph
    assert graph is not None
    copy = add_initializer(graph, f"{value.name}_{node.name}", value.const_value.numpy().copy())
    node.replace_input_with(index, copy)
    return copy


def consumer_rows(node: ir.Node, index: int) -> np.ndarray | None:
    """The weight of a linear consumer with its input channels as rows ``[channels, outputs]``; None when
    ``node`` cannot take an input-channel scale on input ``index``. A weight that other nodes read too (tied)
    is copied for this consumer when it is rewritten (:func:`private_weight`)."""
    if index != 0 or len(node.inputs) < 2 or not constant_weight(node.inputs[1]):
        return None
    weight = node.inputs[1].const_value.numpy()  # type: ignore[union-attr]
    if node.op_type == "MatMul" and weight.ndim == 2:
        return weight
    if node.op_type == "Gemm" and not int_attribute(node, "transA", 0):
        return weight.T if int_attribute(node, "transB", 0) else weight
    if node.op_type == "Conv" and weight.ndim == 4 and int_attribute(node, "group", 1) == 1:
        return np.moveaxis(weight, 1, 0).reshape(weight.shape[1], -1)
    return None


def scale_consumer_rows(node: ir.Node, scale: np.ndarray) -> None:
    """Multiply input channel ``j`` of a linear consumer's weight (as :func:`consumer_rows` sees it) by
    ``scale[j]``."""
    value = private_weight(node)
    weight = value.const_value.numpy()  # type: ignore[union-attr]
    if node.op_type == "Conv":
        new = weight * scale[None, :, None, None]
    elif node.op_type == "Gemm" and int_attribute(node, "transB", 0):
        new = weight * scale[None, :]
    else:
        new = weight * scale[:, None]
    value.const_value = ir.tensor(new.astype(weight.dtype), name=value.name)  # type: ignore[union-attr]


def channel_readers(value: ir.Value, channels_last: bool) -> list[tuple[ir.Node, int]] | None:
    """Every ``(node, input index)`` reading ``value``, through Reshapes that keep the last axis; None when
    the value (or a Reshape on the way) is a graph output."""
    if value.is_graph_output():
        return None
    found: list[tuple[ir.Node, int]] = []
    for node, index in value.uses():
        output = node.outputs[0] if node.outputs else None
        keeps_channels = (
            channels_last
            and node.op_type == "Reshape"
            and index == 0
            and output is not None
            and value.shape is not None
            and output.shape is not None
            and value.shape.rank() > 0
            and output.shape.rank() > 0
            and value.shape[-1] == output.shape[-1]
            and isinstance(value.shape[-1], int)
        )
        if keeps_channels:
            deeper = channel_readers(output, channels_last)  # type: ignore[arg-type]
            if deeper is None:
                return None
            found += deeper
        else:
            found.append((node, index))
    return found
