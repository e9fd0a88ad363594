"""Safe loading of an ONNX model from a path.

Checks, in order: the path is a readable, non-empty file; it parses as an ONNX ModelProto; every
external-data reference resolves to a file inside the model's own folder (no ``..``, no absolute path,
no symlink that leaves it); ``onnx.checker`` with ``full_check`` passes (run on the path, so models over
2 GB in external data are checked too); the default-domain opset is one qcompile accepts; no node is
from a domain qcompile cannot run; no weight holds NaN or Inf. Only then is the model read into
``onnx_ir``, with external tensors left on disk until used.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from qcompile.errors import ModelLoadError, UnsafeModelError, UnsupportedModelError, first_line

logger = logging.getLogger(__name__)

MIN_OPSET = 11
MAX_OPSET = 23
# A serialized ModelProto cannot exceed 2 GiB; larger models must keep weights in external data.
PROTOBUF_LIMIT = 2**31 - 1
# Below this total size, weights are read into memory at load time; above it they stay on disk.
IN_MEMORY_LIMIT = 2**31 - 2**26
SUPPORTED_DOMAINS = frozenset({"", "ai.onnx"})


def _iter_tensors(graph: onnx.GraphProto):  # type: ignore[no-untyped-def]
    """Every TensorProto in a graph: initializers, Constant/attribute tensors, and subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                yield attribute.t
            elif attribute.type == onnx.AttributeProto.TENSORS:
                yield from attribute.tensors
            elif attribute.type == onnx.AttributeProto.GRAPH:
                yield from _iter_tensors(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from _iter_tensors(subgraph)


def check_external_data(proto: onnx.ModelProto, model_path: Path) -> None:
    """Reject external-data references that would read outside the model's folder."""
    base = model_path.parent.resolve()
    for tensor in _iter_tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        location = entries.get("location", "")
        where = f"{model_path.name}: tensor '{tensor.name}' keeps its data in '{location}'"
        if not location:
            raise ModelLoadError(f"{where}, which names no file; re-export the model with its weights")
        if os.path.isabs(location) or Path(location).is_absolute():
            raise UnsafeModelError(f"{where}, an absolute path; external data must sit in the model's folder")
        if ".." in Path(location).parts:
            raise UnsafeModelError(f"{where}, which climbs out with '..'; external data must sit in the model's folder")
        target = (base / location).resolve()
        if not target.is_relative_to(base):
            raise UnsafeModelError(
                f"{where}, which resolves to {target} outside {base} (a symlink?); copy the data next to the model"
            )
        if not target.is_file():
            raise ModelLoadError(f"{where}, which does not exist; keep the data file next to the model")
        end = int(entries.get("offset", "0")) + int(entries.get("length", "0"))
        if end > target.stat().st_size:
            raise ModelLoadError(
                f"{where}, which is shorter ({target.stat().st_size} bytes) than the "
                f"{end} bytes the model refers to (truncated?)"
            )


def _external_bytes(proto: onnx.ModelProto, model_path: Path) -> int:
    files = {
        entry.value
        for tensor in _iter_tensors(proto.graph)
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return sum((model_path.parent / location).stat().st_size for location in files)


def load_model(path: str | os.PathLike[str]) -> ir.Model:
    """Load and check an ONNX model; see the module docstring for every check made.

    Raises:
        ModelLoadError: unreadable, truncated, not ONNX, or fails ``onnx.checker``.
        UnsafeModelError: external data outside the model's folder.
        UnsupportedModelError: opset outside 11..23 or an operator domain qcompile cannot run.
    """
    model_path = Path(path)
    name = model_path.name
    if not model_path.exists():
        raise ModelLoadError(f"{model_path}: no such file")
    if not model_path.is_file():
        raise ModelLoadError(f"{model_path}: not a file; pass the path of a .onnx model")
    size = model_path.stat().st_size
    if size == 0:
        raise ModelLoadError(f"{name}: the file is empty")
    if size > PROTOBUF_LIMIT:
        raise ModelLoadError(
            f"{name}: {size} bytes is over protobuf's 2 GiB limit; save the weights as "
            "external data (onnx.save(..., save_as_external_data=True))"
        )
    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as error:
        raise ModelLoadError(f"{name}: not a valid ONNX protobuf ({error}); the file may be truncated") from error
    if not proto.graph.node and not proto.graph.output:
        raise ModelLoadError(f"{name}: parses, but holds no graph (not an ONNX model, or truncated)")
    check_external_data(proto, model_path)
    opset = next((entry.version for entry in proto.opset_import if entry.domain in SUPPORTED_DOMAINS), None)
    if opset is None or not MIN_OPSET <= opset <= MAX_OPSET:
        raise UnsupportedModelError(
            f"{name}: default-domain opset {opset} is outside {MIN_OPSET}..{MAX_OPSET}; "
            "convert it with onnx.version_converter first"
        )
    for node in proto.graph.node:
        if node.domain not in SUPPORTED_DOMAINS:
            raise UnsupportedModelError(
                f"{name}: node '{node.name or node.output[0]}' is {node.domain}::{node.op_type}, a custom "
                "operator qcompile cannot compile; export the model with standard ONNX operators"
            )
    try:
        onnx.checker.check_model(str(model_path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise ModelLoadError(f"{name}: fails onnx.checker: {first_line(error)}") from error
    try:
        model = ir.load(model_path)
    except Exception as error:  # onnx_ir raises several types for malformed tensors
        raise ModelLoadError(f"{name}: cannot be read into the IR: {error}") from error
    if size + _external_bytes(proto, model_path) < IN_MEMORY_LIMIT:
        # Small enough to hold: read external data now, so later stages never depend on the source folder.
        ir.external_data.load_to_model(model)
    logger.info("loaded %s: %d nodes, opset %d", name, len(model.graph), opset)
    return model
