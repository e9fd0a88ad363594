"""The golden models: a small CNN with BatchNorm (frontend), annotated with fixed ranges and quantized to
QDQ (passes), then lowered to an integer-only graph (backends). No onnxruntime and no calibration run:
every byte is a function of the seeded weights and numpy's arithmetic, so the hashes hold across CPUs.

Run as a script to print the hashes (``python tests/golden/build.py``); tests/test_golden.py compares them
with the stored ones.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper

CHANNELS = 8


def source_model() -> onnx.ModelProto:
    """Conv + BatchNorm + Relu, a depthwise Conv, a residual Add, pooling and a Gemm classifier."""
    rng = np.random.default_rng(2026)

    def weight(name: str, *shape: int, scale: float = 0.3) -> onnx.TensorProto:
        return onnx.numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    initializers = [
        weight("w1", CHANNELS, 3, 3, 3),
        weight("b1", CHANNELS),
        onnx.numpy_helper.from_array(rng.uniform(0.5, 1.5, CHANNELS).astype(np.float32), "gamma"),
        weight("beta", CHANNELS, scale=0.1),
        weight("mean", CHANNELS, scale=0.1),
        onnx.numpy_helper.from_array(rng.uniform(0.5, 1.5, CHANNELS).astype(np.float32), "var"),
        weight("w2", CHANNELS, 1, 3, 3),
        weight("b2", CHANNELS),
        weight("w3", 10, CHANNELS),
        weight("b3", 10),
    ]
    nodes = [
        onnx.helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        onnx.helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["n1"]),
        onnx.helper.make_node("Relu", ["n1"], ["r1"]),
        onnx.helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], group=CHANNELS),
        onnx.helper.make_node("Relu", ["c2"], ["r2"]),
        onnx.helper.make_node("Add", ["r2", "r1"], ["a"]),
        onnx.helper.make_node("GlobalAveragePool", ["a"], ["p"]),
        onnx.helper.make_node("Flatten", ["p"], ["f"]),
        onnx.helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], transB=1),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "golden",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 12, 12])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 10])],
        initializers,
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


def value_range(name: str, levels: int = 256) -> tuple[float, float]:
    """Fixed calibration ranges: a pure function of the value's name, as a calibration would hand them."""
    digest = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
    return (-0.5 - digest % 7 / 10, 1.0 + digest % 11 / 5)


def build() -> dict[str, bytes]:
    """The bytes of the normalized float model, its QDQ model and its integer-only lowering."""
    import onnx_ir as ir

    from qcompile import frontend

    try:  # the lowering's home since the restructuring; before it, qcompile.passes.requantize
        from qcompile.backends.integer import lower
    except ImportError:
        from qcompile.passes.requantize import lower  # type: ignore[no-redef]
    from qcompile.passes.annotate import AnnotatePass
    from qcompile.passes.qdq import QDQPass

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "golden.onnx"
        onnx.save(source_model(), str(path))
        model = frontend.load(path)
    normalized = ir.serde.serialize_model(model).SerializeToString()
    AnnotatePass(value_range)(model)
    QDQPass()(model)
    qdq = ir.serde.serialize_model(model)
    lowered, _ = lower(qdq)
    return {"normalized": normalized, "qdq": qdq.SerializeToString(), "integer": lowered.SerializeToString()}


def hashes() -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in build().items()}


if __name__ == "__main__":
    import json

    print(json.dumps(hashes(), indent=2, sort_keys=True))
