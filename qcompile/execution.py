"""Running models while compiling: onnxruntime sessions on the IR, sharing its weights, and kernel profiles.

Calibration, the passes that measure (GPTQ, bias correction, SmoothQuant), the search and the flow all run
models through here; sessions are created by :mod:`qcompile.runtime.executors`, so compile-time sessions
and an artifact's run the same graph optimizations. A model whose weights pass :data:`LARGE_MODEL_BYTES`
cannot be serialized as one protobuf (2 GiB limit): it is written with its weights in an external data file
beside it, and onnxruntime loads it from that path.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from qcompile.runtime.executors import (
    ORT_IR_VERSION,
    create_session,
    session_from_path,
    session_options,
)

# Leaves room under protobuf's 2 GiB for the graph itself.
LARGE_MODEL_BYTES = 2**31 - 2**26


def weight_bytes(model: ir.Model) -> int:
    return sum(value.const_value.nbytes for value in model.graph.initializers.values() if value.const_value is not None)


def is_large(model: ir.Model) -> bool:
    return weight_bytes(model) > LARGE_MODEL_BYTES


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """Serialize ``model`` for onnxruntime (only for models that are not large)."""
    proto = ir.serde.serialize_model(model)
    proto.ir_version = ORT_IR_VERSION
    return proto


def quiet_run() -> ort.RunOptions:
    """Run options under which a failing run raises without onnxruntime also logging it at ERROR level (for
    runs whose failure is an answer: probing which input sizes a model takes)."""
    options = ort.RunOptions()
    options.log_severity_level = 4
    return options


def save(model: ir.Model, path: Path) -> list[str]:
    """Write ``model`` to ``path`` for onnxruntime; returns the names of the files written.

    A large model's weights go to ``<name>.data`` beside it, so the two files travel together.
    """
    if not is_large(model):
        path.write_bytes(to_proto(model).SerializeToString())
        return [path.name]
    data = f"{path.name}.data"
    original = model.ir_version
    model.ir_version = ORT_IR_VERSION
    try:
        ir.save(model, path, external_data=data, size_threshold_bytes=1024)
    finally:
        model.ir_version = original
    return [path.name, data]


def _large_session(model: ir.Model, extra_outputs: list[str], threads: int) -> ort.InferenceSession:
    values = {str(value.name): value for node in model.graph for value in node.outputs}
    values.update({str(value.name): value for value in model.graph.inputs})
    added = [values[name] for name in extra_outputs if name in values and not values[name].is_graph_output()]
    model.graph.outputs.extend(added)
    folder = tempfile.TemporaryDirectory(prefix="qcompile-ort-")
    try:
        save(model, Path(folder.name) / "model.onnx")
    finally:
        for value in added:
            model.graph.outputs.remove(value)
    session = session_from_path(Path(folder.name) / "model.onnx", threads)
    session._qcompile_folder = folder  # type: ignore[attr-defined]  # the data lives as long as the session
    return session


# Initializers at least this large are handed to onnxruntime as arrays in memory, not inside the protobuf.
SHARED_TENSOR_BYTES = 1024
_SHAREABLE = {np.dtype(name) for name in ("float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64")}


def _proto_sharing_weights(model: ir.Model) -> tuple[onnx.ModelProto, list[str], list[ort.OrtValue]]:
    """``model``'s protobuf with its large initializers as external-data references, and those tensors as
    OrtValues over the same memory (``SessionOptions.add_external_initializers``).

    Serializing a model copies every weight into the protobuf and onnxruntime parses it back out: for a
    model with float weights (90 MB for all-MiniLM-L6-v2) that was most of the time of each of the bit-width
    search's hundreds of sessions. Here the weights are not copied at all."""
    names: list[str] = []
    values: list[ort.OrtValue] = []
    swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
    try:
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if tensor is None or tensor.nbytes < SHARED_TENSOR_BYTES or tensor.dtype.numpy() not in _SHAREABLE:
                continue
            if not value.uses() and not value.is_graph_output():
                continue  # onnxruntime drops unused initializers first, then finds nothing to attach these to
            array = np.ascontiguousarray(tensor.numpy())
            values.append(ort.OrtValue.ortvalue_from_numpy(array))
            names.append(str(value.name))
            reference = ir.ExternalTensor(
                "qcompile-in-memory",
                0,
                tensor.nbytes,
                tensor.dtype,
                shape=ir.Shape(array.shape),
                name=str(value.name),
                base_dir="",
            )
            swapped.append((value, tensor))
            value.const_value = reference
        proto = to_proto(model)
    finally:
        for value, tensor in swapped:
            value.const_value = tensor
    return proto, names, values


def session(
    model: ir.Model | onnx.ModelProto,
    extra_outputs: list[str] | None = None,
    threads: int = 0,
    only_extra: bool = False,
) -> ort.InferenceSession:
    """An onnxruntime CPU session for ``model``; ``extra_outputs`` exposes intermediate values. With
    ``only_extra`` they are the only outputs, and the session holds only the nodes they need (onnxruntime runs
    every node of a graph, whatever outputs a run asks for)."""
    if isinstance(model, ir.Model) and is_large(model):
        return _large_session(model, extra_outputs or [], threads)
    names: list[str] = []
    arrays: list[ort.OrtValue] = []
    if isinstance(model, ir.Model):
        proto, names, arrays = _proto_sharing_weights(model)
    else:
        proto = model
    if extra_outputs:
        proto = onnx.ModelProto.FromString(proto.SerializeToString())
        if only_extra:
            del proto.graph.output[:]
            needed = _keep_needed(proto.graph, set(extra_outputs))
            kept = [tensor for tensor in proto.graph.initializer if tensor.name in needed]
            del proto.graph.initializer[:]
            proto.graph.initializer.extend(kept)
            shared = [(name, array) for name, array in zip(names, arrays, strict=True) if name in needed]
            names, arrays = [name for name, _ in shared], [array for _, array in shared]
        present = {output.name for output in proto.graph.output}
        for name in extra_outputs:
            if name not in present:
                proto.graph.output.append(onnx.ValueInfoProto(name=name))
    proto.ir_version = ORT_IR_VERSION
    options = session_options(threads)
    if names:
        options.add_external_initializers(names, arrays)
    created = create_session(proto.SerializeToString(), options)
    created._qcompile_arrays = arrays  # type: ignore[attr-defined]  # onnxruntime reads their memory
    return created


def _keep_needed(graph: onnx.GraphProto, wanted: set[str]) -> set[str]:
    """Drop the nodes of ``graph`` (in topological order) that nothing in ``wanted`` depends on; returns the
    names of every value the kept nodes read or write."""
    needed, kept = set(wanted), []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(node.input)
            for attribute in node.attribute:  # values a subgraph reads from the outer scope
                for subgraph in [attribute.g, *attribute.graphs]:
                    needed.update(name for inner in subgraph.node for name in inner.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    return needed


@dataclass(frozen=True)
class KernelTimes:
    """What onnxruntime's profiler saw: the median microseconds of each kernel, keyed by the name of its node
    in the optimized graph onnxruntime runs, and each such node's op type and the values it writes (a fused
    node, such as a SkipLayerNormalization, writes the value of the source node it ends in)."""

    times: dict[str, float]
    outputs: dict[str, tuple[str, ...]]
    op_types: dict[str, str]


def kernel_times(
    model: ir.Model, feed: dict[str, np.ndarray], runs: int = 20, warmup: int = 3, sessions: int = 3
) -> KernelTimes:
    """Median time of each onnxruntime kernel over ``runs`` runs, with the values each kernel writes.

    Names are those of the optimized graph onnxruntime runs (fused nodes keep the name of a source node or
    value with a suffix such as ``_nchwc`` or ``_token_12``); a kernel run several times per run is summed
    per run. Each time is the median over ``runs`` runs in a session, and the least of those over ``sessions``
    fresh sessions: on the 2-vCPU machines measured here, one session can run 30 % slower than the next for
    its whole life.
    """
    proto = to_proto(model)
    proto.ir_version = ORT_IR_VERSION
    data = proto.SerializeToString()
    per_session: dict[str, list[float]] = {}
    outputs: dict[str, tuple[str, ...]] = {}
    op_types: dict[str, str] = {}
    for _ in range(sessions):
        with tempfile.TemporaryDirectory(prefix="qcompile-profile-") as folder:
            options = session_options()
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(folder) / "ort")
            first = not per_session  # the optimized graph is the same in every session: read it once
            if first:
                options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
            session = create_session(data, options)
            if first:
                optimized = onnx.load(str(Path(folder) / "optimized.onnx"), load_external_data=False)
                outputs = {node.name: tuple(node.output) for node in optimized.graph.node}
                op_types = {node.name: node.op_type for node in optimized.graph.node}
            for _ in range(warmup + runs):
                session.run(None, feed)
            events = json.loads(Path(session.end_profiling()).read_text())
        per_run: dict[str, list[float]] = {}
        for event in events:
            if event.get("cat") == "Node" and str(event.get("name", "")).endswith("_kernel_time"):
                per_run.setdefault(event["name"].removesuffix("_kernel_time"), []).append(float(event["dur"]))
        for name, durations in per_run.items():
            per_call = len(durations) // (warmup + runs) or 1  # a node can run several times per run
            timed = np.array(durations[warmup * per_call :]).reshape(-1, per_call).sum(axis=1)
            per_session.setdefault(name, []).append(float(np.median(timed)))
    return KernelTimes({name: float(min(values)) for name, values in per_session.items()}, outputs, op_types)
