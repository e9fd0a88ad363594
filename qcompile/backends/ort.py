"""onnxruntime sessions from the IR: the one place that hands models to onnxruntime.

onnx 1.23 writes IR version 14, which onnxruntime 1.31 rejects, so every model handed over is stamped
with :data:`ORT_IR_VERSION`.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
import onnxruntime as ort

ORT_IR_VERSION = 10


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """Serialize ``model`` for onnxruntime (and for writing to disk)."""
    proto = ir.serde.serialize_model(model)
    proto.ir_version = ORT_IR_VERSION
    return proto


def session_options(threads: int = 0) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return options


def session_from_bytes(data: bytes, threads: int = 0) -> ort.InferenceSession:
    return ort.InferenceSession(data, session_options(threads), providers=["CPUExecutionProvider"])


def session(
    model: ir.Model | onnx.ModelProto, extra_outputs: list[str] | None = None, threads: int = 0
) -> ort.InferenceSession:
    """An onnxruntime CPU session for ``model``; ``extra_outputs`` exposes intermediate values."""
    proto = to_proto(model) if isinstance(model, ir.Model) else model
    if extra_outputs:
        proto = onnx.ModelProto.FromString(proto.SerializeToString())
        present = {output.name for output in proto.graph.output}
        for name in extra_outputs:
            if name not in present:
                proto.graph.output.append(onnx.ValueInfoProto(name=name))
    proto.ir_version = ORT_IR_VERSION
    return session_from_bytes(proto.SerializeToString(), threads)
