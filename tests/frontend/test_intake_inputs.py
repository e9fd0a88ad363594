"""Intake of models that are not one float tensor in, one out: a streaming model (a recurrent state in and out, a
0-d int64 sample rate) and a paddle2onnx-style graph (opset 11, weights as Constant nodes, dynamic dims).

Each is exported with torch.onnx's TorchScript exporter and compiled from calibration samples alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

from qcompile import api, runtime

CHUNKS = 12


class Streaming(torch.nn.Module):
    """A chunk of features and the recurrent state in; logits and the next state out. The 0-d int64 sample
    rate scales the logits, as streaming audio models take one (the TVM executor once turned it 1-D)."""

    def __init__(self) -> None:
        super().__init__()
        self.read = torch.nn.Linear(16, 32)
        self.recur = torch.nn.Linear(32, 32)
        self.head = torch.nn.Linear(32, 4)

    def forward(self, chunk: torch.Tensor, state: torch.Tensor, rate: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden = torch.tanh(self.read(chunk) + self.recur(state))
        return self.head(hidden) * (rate.to(torch.float32) / 16000.0), hidden


def test_a_tvm_library_takes_a_0d_input(tmp_path: Path) -> None:
    """The TVM executor hands a 0-d input to the library as 0-d (it once made it 1-D, which the library refused)."""
    from qcompile.backends import tvm as tvm_backend
    from qcompile.runtime.executors import TVMExecutor

    path = tmp_path / "stream.onnx"
    arguments = (torch.randn(1, 16), torch.zeros(1, 32), torch.tensor(16000))
    torch.onnx.export(Streaming().eval(), arguments, str(path), dynamo=False, opset_version=17)
    proto = onnx.load(str(path))
    tvm_backend.build(proto, {"kind": "llvm"}, tmp_path)
    names = [value.name for value in proto.graph.input]
    feed = dict(zip(names, [np.ones((1, 16), np.float32), np.zeros((1, 32), np.float32), np.array(8000)], strict=True))
    got = TVMExecutor(tmp_path / tvm_backend.LIBRARY_FILE, names).run(feed)
    expected = onnxruntime.InferenceSession(str(path)).run(None, feed)
    for ours, theirs in zip(got, expected, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)  # float32 round-off of 32-term sums


def stream_feeds(path: Path, seed: int) -> list[dict[str, np.ndarray]]:
    """Consecutive chunks, each with the state the float model left after the one before."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    state = np.zeros((1, 32), np.float32)
    feeds = []
    for _ in range(CHUNKS):
        feed = {"chunk": rng.standard_normal((1, 16)).astype(np.float32), "state": state, "rate": np.array(16000)}
        feeds.append(feed)
        state = session.run(None, feed)[1]
    return feeds


def test_a_streaming_model_with_state_and_a_scalar_input_compiles_and_streams(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "stream.onnx"
    arguments = (torch.randn(1, 16), torch.zeros(1, 32), torch.tensor(16000))
    torch.onnx.export(
        Streaming().eval(), arguments, str(path), dynamo=False, opset_version=17,
        input_names=["chunk", "state", "rate"], output_names=["logits", "next_state"],
    )  # fmt: skip
    assert onnx.load(str(path)).graph.input[2].type.tensor_type.shape.dim == []  # the rate is 0-d
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    for index, feed in enumerate(stream_feeds(path, seed=0)):
        np.savez(calibration / f"{index:03d}.npz", **feed)

    manifest = api.compile(path, tmp_path / "artifact", calibration_data=calibration, progress=False)

    assert {info["name"]: info["shape"] for info in manifest["inputs"]} == {
        "chunk": [1, 16],
        "state": [1, 32],
        "rate": [],
    }
    assert set(manifest["measured"]["accuracy"]["calibration"]["per_output"]) == {"logits", "next_state"}
    # The int8 kernels do not cover this graph, and TVM's unscheduled build of it is not shipped.
    assert {"onnxruntime", "onnxruntime-fp32"} == set(manifest["executors"])
    assert "far slower than onnxruntime fp32" in manifest["skipped"]["tvm"]
    # Stream 12 chunks through each executor, feeding back its own state; compare with the float model's.
    expected = [onnxruntime.InferenceSession(str(path)).run(None, feed)[0] for feed in stream_feeds(path, seed=1)]
    for executor in ("onnxruntime", "onnxruntime-fp32"):
        session = runtime.load(tmp_path / "artifact", executor)
        state = np.zeros((1, 32), np.float32)
        streamed = []
        for feed in stream_feeds(path, seed=1):
            produced = session.run({**feed, "state": state})
            state = produced["next_state"]
            streamed.append(produced["logits"])
        ours, theirs = np.concatenate(streamed).ravel(), np.concatenate(expected).ravel()
        # 8-bit activations through a recurrence that feeds its own rounding back for 12 steps: the logits of
        # the whole stream keep cosine 0.99 with float's (measured 0.996 on the int8 one).
        assert ours @ theirs / (np.linalg.norm(ours) * np.linalg.norm(theirs)) >= 0.99


class Recognizer(torch.nn.Module):
    """A CRNN-shaped text recognizer: convolutional features read as a sequence, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
            torch.nn.MaxPool2d((8, 1)),
        )  # fmt: skip
        self.head = torch.nn.Linear(32, 20)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        sequence = self.features(image).squeeze(2).transpose(1, 2)
        return torch.softmax(self.head(sequence), -1)


def test_an_opset_11_graph_with_constant_node_weights_compiles(tmp_path: Path) -> None:
    # paddle2onnx writes opset 11 graphs whose weights are Constant nodes; at opset 11 Squeeze takes its axes
    # as an attribute (an input from 13 on), which onnxscript's converter left in place.
    torch.manual_seed(0)
    exported = tmp_path / "exported.onnx"
    torch.onnx.export(
        Recognizer().eval(), (torch.randn(1, 3, 16, 64),), str(exported), dynamo=False, opset_version=11,
        input_names=["image"], output_names=["probabilities"], dynamic_axes={"image": {0: "batch", 3: "width"}},
    )  # fmt: skip
    model = onnx.load(str(exported))
    constants = [
        onnx.helper.make_node("Constant", [], [tensor.name], value=tensor) for tensor in model.graph.initializer
    ]
    nodes = [*constants, *model.graph.node]
    del model.graph.initializer[:], model.graph.node[:]
    model.graph.node.extend(nodes)
    path = tmp_path / "constants.onnx"
    onnx.save(model, str(path))
    assert any(node.op_type == "Squeeze" and node.attribute for node in model.graph.node)
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    rng = np.random.default_rng(0)
    for index in range(8):
        np.save(calibration / f"{index:03d}.npy", rng.standard_normal((1, 3, 16, 64)).astype(np.float32))

    manifest = api.compile(path, tmp_path / "artifact", calibration_data=calibration, build_tvm=False, progress=False)

    assert [layer["op_type"] for layer in manifest["layers"] if not layer["float_reason"]] == ["Conv", "Conv", "Gemm"]
    image = rng.standard_normal((1, 3, 16, 64)).astype(np.float32)
    expected = onnxruntime.InferenceSession(str(exported)).run(None, {"image": image})[0]
    produced = runtime.load(tmp_path / "artifact", "onnxruntime").run({"image": image})["probabilities"]
    # Probabilities over 20 classes after three 8-bit layers: within 0.02 of float's, the same argmax mostly.
    np.testing.assert_allclose(produced, expected, atol=0.02)


def rotary_model(batch: str | int = "batch") -> onnx.ModelProto:
    """Two linear layers around RotaryEmbedding (opset 23), an op with no older form qcompile does not write out."""
    rng = np.random.default_rng(0)
    angles = np.arange(8)[:, None] * np.array([1.0, 0.1])[None]
    constants = {
        "w1": rng.standard_normal((16, 8)).astype(np.float32) * 0.3,
        "w2": rng.standard_normal((8, 16)).astype(np.float32) * 0.3,
        "heads": np.array([0, 8, 2, 4], np.int64),
        "merged": np.array([0, 8, 8], np.int64),
        "cos": np.cos(angles)[None].astype(np.float32),
        "sin": np.sin(angles)[None].astype(np.float32),
    }
    make = onnx.helper.make_node
    nodes = [
        make("MatMul", ["x", "w1"], ["a"]),
        make("Reshape", ["a", "heads"], ["b"]),
        make("Transpose", ["b"], ["c"], perm=[0, 2, 1, 3]),
        make("RotaryEmbedding", ["c", "cos", "sin"], ["r"]),
        make("Transpose", ["r"], ["d"], perm=[0, 2, 1, 3]),
        make("Reshape", ["d", "merged"], ["e"]),
        make("MatMul", ["e", "w2"], ["y"]),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "rotary",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, 8, 16])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [batch, 8, 16])],
        [onnx.numpy_helper.from_array(array, name) for name, array in constants.items()],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 23)])
    proto.ir_version = 10
    return proto


def test_a_model_with_an_op_that_has_no_opset_18_form_keeps_its_opset(tmp_path: Path) -> None:
    """RotaryEmbedding exists from opset 23 only and qcompile does not write it out: the model is not refused but
    stays at opset 23; its linear layers are quantized around it, and the onnxruntime files run it (no TVM
    library: TVM's importer does not know the op, and the int8 kernels do not cover it)."""
    path = tmp_path / "rotary.onnx"
    onnx.save(rotary_model(), str(path))
    rng = np.random.default_rng(1)
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    for index in range(8):
        np.save(calibration / f"{index}.npy", rng.standard_normal((1, 8, 16)).astype(np.float32))

    manifest = api.compile(path, tmp_path / "artifact", calibration_data=calibration, progress=False)

    quantized = onnx.load(str(tmp_path / "artifact" / "model.int8.onnx"))
    assert {entry.domain: entry.version for entry in quantized.opset_import}[""] == 23
    assert "RotaryEmbedding" in {node.op_type for node in quantized.graph.node}
    assert {node.op_type for node in quantized.graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
    assert set(manifest["executors"]) == {"onnxruntime", "onnxruntime-fp32"} and "tvm" in manifest["skipped"]
    # 8-bit weights and activations around two 16- and 8-term dot products: cosine 0.99 with float (measured 0.9999).
    feed = {"x": rng.standard_normal((1, 8, 16)).astype(np.float32)}
    expected = onnxruntime.InferenceSession(str(path)).run(None, feed)[0].ravel()
    got = runtime.load(tmp_path / "artifact", "onnxruntime").run(feed)["y"].ravel()
    assert got @ expected / (np.linalg.norm(got) * np.linalg.norm(expected)) >= 0.99
