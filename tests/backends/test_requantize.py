"""Integer-only lowering: the dyadic multiplier, the rounding rule against Python integers, the digits CNN
bit-exact between onnxruntime, TVM and the numpy oracle and as accurate as its QDQ graph, the int8-npu
target, and the errors (ops with no integer form, accumulators past int32).

Integer outputs are compared for equality (no tolerance); accuracy of the integer graph against the QDQ
graph: top-1 within 0.5 points on the 397 held-out digits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import zoo
from conftest import save_model
from onnx import TensorProto, helper, numpy_helper

from qcompile import api, runtime
from qcompile.backends import tvm as tvm_backend
from qcompile.backends.integer import dyadic, lower
from qcompile.backends.integer import reference as integer_reference
from qcompile.errors import CalibrationError, UnsupportedModelError
from qcompile.flow.quantize import QuantizeOptions
from qcompile.runtime.executors import ORT_IR_VERSION, session_from_bytes

HAS_VNNI = " avx512_vnni" in Path("/proc/cpuinfo").read_text()


def test_dyadic_multipliers_are_close_and_in_range() -> None:
    multipliers = np.exp(np.random.default_rng(0).uniform(np.log(1e-6), np.log(3.0), 1000))
    m0, shift = dyadic(multipliers)
    assert ((m0 >= 2**29) & (m0 < 2**30)).all() and (shift >= 1).all()
    assert np.abs(m0 * 2.0**-shift / multipliers - 1).max() < 2.0**-29
    with pytest.raises(UnsupportedModelError, match="positive"):
        dyadic(np.array([0.0]))


def _qdq_gemm(weights: np.ndarray, bias: np.ndarray, scales: tuple[float, float, float], zero: int) -> onnx.ModelProto:
    """x float [1, K] -> Q/DQ (scale s_x, zero point) -> Gemm(DQ(int8 W [N, K], s_w), int32 bias) -> Q/DQ (s_y)."""
    s_x, s_w, s_y = scales
    n, k = weights.shape
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], axis=0),
        helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["bd"]),
        helper.make_node("Gemm", ["xd", "wd", "bd"], ["y"], transB=1, name="layer"),
        helper.make_node("QuantizeLinear", ["y", "sy", "zy"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["out"]),
    ]
    initializers = [
        numpy_helper.from_array(np.array(s_x, np.float32), "sx"),
        numpy_helper.from_array(np.array(zero, np.uint8), "zx"),
        numpy_helper.from_array(weights.astype(np.int8), "w"),
        numpy_helper.from_array(np.full(n, s_w, np.float32), "sw"),
        numpy_helper.from_array(np.zeros(n, np.int8), "zw"),
        numpy_helper.from_array(bias.astype(np.int32), "b"),
        numpy_helper.from_array(np.array(s_x * s_w, np.float32), "sb"),
        numpy_helper.from_array(np.array(0, np.int32), "zb"),
        numpy_helper.from_array(np.array(s_y, np.float32), "sy"),
        numpy_helper.from_array(np.array(zero, np.uint8), "zy"),
    ]
    graph = helper.make_graph(
        nodes,
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, n])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = ORT_IR_VERSION
    return model


def test_requantization_rounds_half_up_and_saturates() -> None:
    rng = np.random.default_rng(1)
    weights = rng.integers(-127, 128, (16, 24))
    bias = rng.integers(-5000, 5000, 16)
    scales, zero = (0.02, 0.003, 0.05), 128
    lowered, report = lower(_qdq_gemm(weights, bias, scales, zero))
    onnx.checker.check_model(lowered, full_check=True)
    assert (
        report.requantizations == 1
        and report.layers[0]["accumulator_bound"] == (255 * np.abs(weights).sum(1) + np.abs(bias)).max()
    )
    session = session_from_bytes(lowered.SerializeToString())
    (m0,), (shift,) = dyadic(np.array([scales[0] * scales[1] / scales[2]]))
    for trial in range(20):
        x = (rng.standard_normal((1, 24)) * 2).astype(np.float32)
        codes = np.clip(np.round(x / np.float32(scales[0])) + zero, 0, 255).astype(np.int64)
        acc = (codes - zero) @ weights.T + bias
        # The rule, in Python integers: floor((acc * M0 + 2**(n-1)) / 2**n) + z, clamped to [0, 255].
        expected = [
            min(255, max(0, (int(a) * int(m0) + (1 << (int(shift) - 1))) // (1 << int(shift)) + zero)) for a in acc[0]
        ]
        (out,) = session.run(None, {"x": x})
        assert np.array_equal(np.round(out / np.float32(scales[2])).astype(np.int64)[0] + zero, expected), trial
        assert np.array_equal(integer_reference.run(lowered, {"x": x})[0], out)


@pytest.fixture(scope="module")
def digits_qdq(digits: tuple[Path, float], digits_calibration: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("integer") / "digits.int8-npu"
    _, _, test_x, _ = zoo.digits_split()
    evaluation = [{"image": test_x[i : i + 1]} for i in range(64)]
    api.compile(
        digits[0], output, target="int8-npu", calibration_data=digits_calibration, eval_data=evaluation, progress=False
    )
    return output


def test_digits_integer_graph_is_bit_exact_and_as_accurate_as_qdq(digits_qdq: Path) -> None:
    manifest = json.loads((digits_qdq / "manifest.json").read_text())
    latency = manifest["measured"]["latency_ms"]
    fastest = min(("integer", "tvm"), key=lambda name: latency[name]["median_ms"])
    assert manifest["default_executor"] == fastest and manifest["target"]["name"] == "int8-npu"
    if HAS_VNNI:  # built on qcompile's int8 kernels for this CPU, not through TVM's ONNX importer
        assert manifest["executors"]["tvm"]["lowering"].startswith(tvm_backend.INTEGER_KERNELS)
        tvm_entry = manifest["executors"]["tvm"]
        assert tvm_entry["requires_cpu"] == tvm_entry["target"]["mcpu"]  # the runtime refuses it on another CPU
    assert manifest["measured"]["accuracy"]["integer_vs_oracle"].startswith("bit-exact")
    assert manifest["measured"]["accuracy"]["tvm_vs_oracle"].startswith("bit-exact")  # TVM built the same graph
    assert "ConvInteger" in {node.op_type for node in onnx.load(str(digits_qdq / api.INTEGER_ONNX)).graph.node}
    lowered = onnx.load(str(digits_qdq / api.INTEGER_ONNX))
    # No float op between the input's QuantizeLinear and the output's dequantization.
    float_ops = [
        node.op_type
        for node in lowered.graph.node[1:-2]
        if node.op_type in ("Conv", "Gemm", "MatMul", "DequantizeLinear")
    ]
    assert not float_ops
    integer, qdq = runtime.load(digits_qdq, "integer"), runtime.load(digits_qdq, "onnxruntime")
    built = runtime.load(digits_qdq, "tvm")
    _, _, test_x, test_y = zoo.digits_split()
    hits = {"integer": 0, "qdq": 0}
    for index in range(len(test_x)):
        feed = {"image": test_x[index : index + 1]}
        produced = integer.run(feed)["logits"]
        if index < 40:
            expected = integer_reference.run(lowered, feed)[0]
            assert np.array_equal(produced, expected) and np.array_equal(built.run(feed)["logits"], expected), index
        hits["integer"] += int(produced.argmax() == test_y[index])
        hits["qdq"] += int(qdq.run(feed)["logits"].argmax() == test_y[index])
    assert abs(hits["integer"] - hits["qdq"]) / len(test_x) <= 0.005
    assert hits["integer"] / len(test_x) > 0.95
    # The NPU is not here: the gate predicts its latency (every node int8), unless an executor is named.
    (check,) = api.gate(digits_qdq, max_latency_ms=5.0)
    assert check.passed and check.source.startswith("predicted for int8-npu by the cost model")
    (measured,) = api.gate(digits_qdq, max_latency_ms=5.0, executor="integer")
    assert measured.source.startswith("measured here")


def test_ops_without_integer_form_are_listed_and_nothing_is_written(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="project"),
            helper.make_node("Erf", ["h"], ["p"], name="gelu_erf"),
            helper.make_node("MatMul", ["p", "v"], ["y"], name="mix"),
        ],
        "erf",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [
            numpy_helper.from_array(np.random.default_rng(2).standard_normal((8, 6)).astype(np.float32), "w"),
            numpy_helper.from_array(np.random.default_rng(3).standard_normal((6, 4)).astype(np.float32), "v"),
        ],
    )
    model = save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "erf.onnx")
    calibration = [{"x": np.random.default_rng(index).standard_normal((2, 8)).astype(np.float32)} for index in range(4)]
    with pytest.raises(
        UnsupportedModelError,
        match=r"(?s)Erf x1\).*gelu_erf \(Erf\): no integer form for this op \(int32 accumulator\)",
    ):
        api.compile(model, tmp_path / "out", target="int8-npu", calibration_data=calibration, progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(CalibrationError, match="int8 weights"):
        api.compile(
            model, tmp_path / "out", target="int8-npu", calibration_data=calibration, options=QuantizeOptions(bits="4")
        )


def test_a_reduction_past_int32_is_split_and_stays_exact() -> None:
    rng = np.random.default_rng(5)
    weights = np.where(rng.random((3, 70000)) < 0.9, 127, -127)  # up to 255 x 127 x 70000 = 2.27e9 > 2**31
    weights[0] = 127
    qdq = _qdq_gemm(weights, np.zeros(3), (0.01, 0.01, 30.0), 0)
    lowered, report = lower(qdq)
    assert report.layers[0]["parts"] == 2 and report.layers[0]["accumulator_bound"] > 2**31
    assert [node.op_type for node in lowered.graph.node].count("MatMulInteger") == 2
    x = np.full((1, 70000), 2.5, np.float32)  # every code 250: channel 0's accumulator is 2.22e9, past int32
    (out,) = session_from_bytes(lowered.SerializeToString()).run(None, {"x": x})
    assert np.array_equal(out, integer_reference.run(lowered, {"x": x})[0])
    codes = np.clip(np.round(x / np.float32(0.01)), 0, 255).astype(np.int64)
    real = float(0.01 * 0.01) * (codes @ weights.T)  # exact in float64 here
    assert np.abs(codes @ weights.T).max() > 2**31
    np.testing.assert_allclose(out, np.clip(np.round(real / 30.0), 0, 255) * np.float32(30.0), atol=30.0)  # one code


def test_efficientnet_lowers_completely_and_is_bit_exact(efficientnet: Path, tmp_path: Path) -> None:
    """49 Conv (depthwise among them), ReLU6 clamps, residual Adds, the H x W mean and the classifier."""
    crops = zoo.photo_crops(6, seed=2)
    output = tmp_path / "efficientnet.int8-npu"
    manifest = api.compile(
        efficientnet, output, target="int8-npu", calibration_data=[{"input": crop[None]} for crop in crops[:4]],
        progress=False,
    )  # fmt: skip
    assert manifest["measured"]["accuracy"]["tvm_vs_oracle"].startswith("bit-exact")
    lowered = onnx.load(str(output / api.INTEGER_ONNX))
    kinds = [node.op_type for node in lowered.graph.node]
    assert kinds.count("ConvInteger") == 49 and kinds.count("MatMulInteger") == 1 and "Conv" not in kinds
    session, built = runtime.load(output, "integer"), runtime.load(output, "tvm")
    if HAS_VNNI:
        assert manifest["executors"]["tvm"]["lowering"].startswith(tvm_backend.INTEGER_KERNELS)
    for crop in crops[4:]:
        feed = {"input": crop[None]}
        (produced,) = session.run(feed).values()
        (from_kernels,) = built.run(feed).values()
        expected = integer_reference.run(lowered, feed)[0]
        assert np.array_equal(produced, expected) and np.array_equal(from_kernels, expected)


def _train_and_compile(net: Any, epochs: int, folder: Path, calibration: int) -> tuple[Path, onnx.ModelProto]:
    """Train ``net`` on digits, export it (opset 17, legacy exporter), compile it for int8-npu; returns the
    artifact and its integer graph."""
    import torch

    train_x, train_y, _, _ = zoo.digits_split()
    zoo._train_on_digits(net, train_x, train_y, epochs)
    model = folder / "net.onnx"
    torch.onnx.export(
        net.eval(), (torch.from_numpy(train_x[:1]),), str(model), dynamo=False, opset_version=17,
        input_names=["image"], output_names=["logits"],
    )  # fmt: skip
    output = folder / "net.int8-npu"
    feeds = [{"image": train_x[i : i + 1]} for i in range(calibration)]
    api.compile(model, output, target="int8-npu", calibration_data=feeds, progress=False)
    return output, onnx.load(str(output / api.INTEGER_ONNX))


def _activations_net() -> Any:
    """A small CNN (trained briefly here) with HardSwish, Sigmoid, Tanh and HardSigmoid, and a Concat of three
    branches: op coverage for the tables and the Concat rescaling, not a good classifier."""
    import torch

    torch.manual_seed(0)

    class Net(torch.nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.stem = torch.nn.Conv2d(1, 8, 3, padding=1)
            self.branches = torch.nn.ModuleList(
                [torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 1), torch.nn.Conv2d(8, 8, 1)]
            )
            self.mix = torch.nn.Conv2d(24, 16, 3, padding=1)
            self.head = torch.nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            hidden = torch.nn.functional.hardswish(self.stem(x))
            functions = (torch.sigmoid, torch.tanh, torch.nn.functional.hardsigmoid)
            merged = torch.cat([f(branch(hidden)) for f, branch in zip(functions, self.branches, strict=True)], 1)
            return self.head(torch.nn.functional.hardswish(self.mix(merged)).mean((2, 3)))

    return Net()


def test_table_activations_and_concat_are_lowered_exactly(tmp_path: Path) -> None:
    output, lowered = _train_and_compile(_activations_net(), 10, tmp_path, 16)
    _, _, test_x, _ = zoo.digits_split()
    kinds = [node.op_type for node in lowered.graph.node]
    assert kinds.count("Gather") == 5 and kinds.count("Concat") == 1  # 2 HardSwish, Sigmoid, Tanh, HardSigmoid
    integer, qdq = runtime.load(output, "integer"), runtime.load(output, "onnxruntime")
    agree = 0
    for index in range(60):
        feed = {"image": test_x[index : index + 1]}
        (produced,) = integer.run(feed).values()
        assert np.array_equal(produced, integer_reference.run(lowered, feed)[0]), index
        agree += int(produced.argmax() == qdq.run(feed)["logits"].argmax())
    assert agree >= 59  # the tables quantize as the QDQ graph does: the same decisions


def _token_net() -> Any:
    """A tiny token model trained here: 8 tokens of 8 pixels -> Linear -> LayerNorm -> Linear -> GELU (erf,
    exported as Div/Erf/Add/Mul/Mul) -> Linear -> Softmax -> Flatten -> Linear, for the integer LayerNorm,
    GELU table and Softmax."""
    import torch

    torch.manual_seed(0)

    class Net(torch.nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.norm = torch.nn.Linear(8, 32), torch.nn.LayerNorm(32)
            self.mlp, self.mix, self.head = torch.nn.Linear(32, 32), torch.nn.Linear(32, 16), torch.nn.Linear(128, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            hidden = torch.nn.functional.gelu(self.mlp(self.norm(self.embed(x.reshape(x.shape[0], 8, 8)))))
            return self.head(torch.softmax(self.mix(hidden), -1).flatten(1))

    return Net()


def test_integer_layer_norm_gelu_and_softmax_match_qdq(tmp_path: Path) -> None:
    output, lowered = _train_and_compile(_token_net(), 15, tmp_path, 32)
    _, _, test_x, test_y = zoo.digits_split()
    kinds = {node.op_type for node in lowered.graph.node}
    assert {"ReduceMax", "Gather", "Min"} <= kinds and not {"LayerNormalization", "Softmax", "Erf", "Exp"} & kinds
    integer, qdq = runtime.load(output, "integer"), runtime.load(output, "onnxruntime")
    hits = {"integer": 0, "qdq": 0}
    for index in range(len(test_x)):
        feed = {"image": test_x[index : index + 1]}
        (produced,) = integer.run(feed).values()
        if index < 30:
            assert np.array_equal(produced, integer_reference.run(lowered, feed)[0]), index
        hits["integer"] += int(produced.argmax() == test_y[index])
        hits["qdq"] += int(qdq.run(feed)["logits"].argmax() == test_y[index])
    assert abs(hits["integer"] - hits["qdq"]) / len(test_x) <= 0.005 and hits["qdq"] / len(test_x) > 0.85


def test_integer_layer_norm_root_is_the_floor_square_root() -> None:
    """The Newton iteration the LayerNorm lowering emits gives floor(sqrt(R)) for every radicand it meets."""
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
            helper.make_node("LayerNormalization", ["d", "g", "b"], ["y"], axis=-1, epsilon=1e-5),
            helper.make_node("QuantizeLinear", ["y", "sy", "zy"], ["yq"]),
            helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["out"]),
        ],
        "norm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 16])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [64, 16])],
        [
            numpy_helper.from_array(np.array(1.0, np.float32), "s"),
            numpy_helper.from_array(np.array(0, np.uint8), "z"),
            numpy_helper.from_array(np.ones(16, np.float32), "g"),
            numpy_helper.from_array(np.zeros(16, np.float32), "b"),
            numpy_helper.from_array(np.array(8.0 / 255, np.float32), "sy"),
            numpy_helper.from_array(np.array(128, np.uint8), "zy"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = ORT_IR_VERSION
    lowered, _ = lower(model)
    root = next(node.output[0] for node in lowered.graph.node if node.op_type == "Min")
    radicand = next(node.output[0] for node in lowered.graph.node if node.output[0].endswith("_r"))
    lowered.graph.output.extend(
        helper.make_tensor_value_info(name, TensorProto.INT64, None) for name in (radicand, root)
    )
    rng = np.random.default_rng(7)
    # Rows from constant (R = the epsilon floor) to full-range spikes: every row is another radicand.
    x = np.where(rng.random((64, 16)) < np.linspace(0, 1, 64)[:, None], rng.integers(0, 256, (64, 16)), 7).astype(
        np.float32
    )
    out, r, d = session_from_bytes(lowered.SerializeToString()).run(None, {"x": x})
    r, d = r.ravel().astype(object), d.ravel().astype(object)  # Python integers: exact squares
    assert all(root**2 <= value < (root + 1) ** 2 for root, value in zip(d, r, strict=True))
    assert len(set(r)) > 50
    reference = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(
        out, np.clip(np.round(reference / (8 / 255)), -128, 127) * (8 / 255), atol=8 / 255 + 1e-6
    )


def test_minilm_lowers_completely_and_is_bit_exact(minilm: Path, tmp_path: Path) -> None:
    """Embeddings, attention masks, Q.K^T and P.V, Softmax, LayerNorm, GELU: every node of a real
    transformer in integers, onnxruntime = TVM = the numpy oracle (checked at compile time)."""
    calibration = list(zoo.minilm_feeds(zoo.pydoc_sentences(4)))
    output = tmp_path / "minilm.int8-npu"
    manifest = api.compile(minilm, output, target="int8-npu", calibration_data=calibration, progress=False)
    accuracy = manifest["measured"]["accuracy"]
    assert accuracy["integer_vs_oracle"].startswith("bit-exact") and accuracy["tvm_vs_oracle"].startswith("bit-exact")
    lowered = onnx.load(str(output / api.INTEGER_ONNX))
    kinds = {node.op_type for node in lowered.graph.node}
    assert not {"Softmax", "LayerNormalization", "Erf", "MatMul", "Gemm", "DequantizeLinear"} & (
        kinds - {"DequantizeLinear"}
    )
    assert [node.op_type for node in lowered.graph.node].count("DequantizeLinear") == 1  # the output only
    sessions = {name: runtime.load(output, name) for name in ("integer", "onnxruntime", "onnxruntime-fp32")}
    cosines: dict[str, list[float]] = {"integer": [], "onnxruntime": []}
    for feed in zoo.minilm_feeds(zoo.pydoc_sentences(8, offset=50)):
        mask = feed["attention_mask"][0].astype(bool)
        pooled = {name: next(iter(session.run(feed).values()))[0][mask].mean(0) for name, session in sessions.items()}
        reference = pooled["onnxruntime-fp32"]
        for name in cosines:
            cosines[name].append(
                float(pooled[name] @ reference / np.linalg.norm(pooled[name]) / np.linalg.norm(reference))
            )
    # All-int8 MiniLM (LayerNorm inputs, scores and embeddings per-tensor uint8) is itself far from fp32
    # (~0.87 pooled cosine); the integer graph must be as good as the QDQ graph it comes from.
    assert abs(np.mean(cosines["integer"]) - np.mean(cosines["onnxruntime"])) < 0.02


def test_a_1d_convolution_lowers_bit_exactly(tmp_path: Path) -> None:
    """Audio front ends (wav2vec2, HuBERT, Whisper) convolve over time: a Conv1d network lowers to the integer
    graph (the accumulator bound sums |w| over a 1-D window; the integer lowering once indexed a 4-D one and
    crashed), and the compile's own check holds it bit-exact with the numpy oracle on onnxruntime."""
    rng = np.random.default_rng(0)
    first = numpy_helper.from_array(rng.standard_normal((8, 2, 5)).astype(np.float32) * 0.3, "w1")
    second = numpy_helper.from_array(rng.standard_normal((4, 8, 3)).astype(np.float32) * 0.3, "w2")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w1"], ["a"], strides=[2], pads=[2, 2]),
            helper.make_node("Relu", ["a"], ["b"]),
            helper.make_node("Conv", ["b", "w2"], ["y"], pads=[1, 1]),
        ],
        "conv1d",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16])],
        [first, second],
    )
    path = save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "c.onnx")
    calibration = [{"x": rng.standard_normal((1, 2, 32)).astype(np.float32)} for _ in range(16)]
    manifest = api.compile(path, tmp_path / "out", target="int8-npu", calibration_data=calibration, progress=False)
    assert manifest["measured"]["accuracy"]["integer_vs_oracle"].startswith("bit-exact")
    integer_graph = onnx.load(str(tmp_path / "out" / api.INTEGER_ONNX))
    assert [node.op_type for node in integer_graph.graph.node].count("ConvInteger") == 2
