"""Float islands: layers a host build keeps in float run on qcompile's kernels beside the integer ones.

The integer lowering keeps the nodes it has no integer form for (``float_islands=True``), the numpy oracle
runs them with onnxruntime node by node, and the kernels run them in fp32 (register-tiled FMA convolutions and
matmuls, depthwise windows, fused activations). Tolerances: a float-only graph against onnxruntime within
1e-5 of each output's range (fp32 sums of at most 216 products in another order: ~1e-6); a mixed graph
against the oracle within ``measure.ISLAND_SPREAD_FACTOR`` times the spread float32 rounding alone gives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompile import execution
from qcompile.backends import integer as integer_lowering
from qcompile.backends.integer import reference as integer_reference
from qcompile.errors import UnsupportedModelError
from qcompile.flow import compile as compile_flow
from qcompile.runtime.manifest import Executor, Measured

tvm = pytest.importorskip("tvm")
integer = pytest.importorskip("qcompile.backends.tvm.integer")
int8_kernels = pytest.importorskip("qcompile.backends.tvm.int8_kernels")


def _model(
    nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto], shape: list[int], outputs: dict[str, list[int]]
) -> onnx.ModelProto:
    """An opset-18 model of ``nodes`` reading a float image ``x`` of ``shape``."""
    graph = helper.make_graph(
        nodes,
        "islands",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, dims) for name, dims in outputs.items()],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = execution.ORT_IR_VERSION
    return model


def _float_cnn(seed: int = 0) -> onnx.ModelProto:
    """A small float CNN with every kind of float layer the kernels run: a strided 3 x 3 stem over three
    channels, ReLU, a depthwise 3 x 3 with ReLU6, a pointwise conv with HardSwish (also a 4-D output), a
    squeeze-excite gate, a whole-map AveragePool, Flatten, a Gemm classifier (transB) and a sigmoid."""
    rng = np.random.default_rng(seed)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    initializers = [
        weight("w_stem", 24, 3, 3, 3), weight("b_stem", 24), weight("w_dw", 24, 1, 3, 3), weight("b_dw", 24),
        weight("w_pw", 40, 24, 1, 1), weight("b_pw", 40), weight("w_fc", 10, 40), weight("b_fc", 10),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array(6.0, np.float32), "six"),
    ]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w_stem", "b_stem"], ["stem"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["stem"], ["stem_relu"]),
        helper.make_node("Conv", ["stem_relu", "w_dw", "b_dw"], ["dw"], pads=[1, 1, 1, 1], group=24),
        helper.make_node("Clip", ["dw", "zero", "six"], ["dw6"]),
        helper.make_node("Conv", ["dw6", "w_pw", "b_pw"], ["pw"]),
        helper.make_node("HardSwish", ["pw"], ["features"]),
        # A squeeze-excite gate: the H x W mean through a sigmoid, broadcast over H, W.
        helper.make_node("GlobalAveragePool", ["features"], ["squeezed"]),
        helper.make_node("Sigmoid", ["squeezed"], ["gate"]),
        helper.make_node("Mul", ["features", "gate"], ["excited"]),
        # A pooling head written as one window larger than the map (ceil_mode: one output).
        helper.make_node("AveragePool", ["excited"], ["pooled"], kernel_shape=[32, 32], strides=[32, 32], ceil_mode=1),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w_fc", "b_fc"], ["fc"], transB=1),
        helper.make_node("Sigmoid", ["fc"], ["probabilities"]),
    ]
    return _model(nodes, initializers, [1, 3, 32, 32], {"probabilities": [1, 10], "features": [1, 40, 16, 16]})


def _run(module_graph: onnx.ModelProto, flavor: object, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    from tvm import relax

    executable = relax.build(
        integer.to_relax(module_graph, flavor),
        target=tvm.target.Target(flavor.tvm_target),  # type: ignore[attr-defined]
        relax_pipeline=integer.pipeline(),
    )
    result = relax.VirtualMachine(executable, tvm.cpu())["main"](*(tvm.runtime.tensor(v) for v in feed.values()))
    return [result.numpy()] if hasattr(result, "numpy") else [item.numpy() for item in result]


def _assert_as_onnxruntime(
    model: onnx.ModelProto, flavor: object, feed: dict[str, np.ndarray], options: Any = None
) -> None:
    """The kernels' outputs of ``model`` within 1e-5 of each output's range of onnxruntime's (fp32 sums of a
    few hundred products at most, in another order)."""
    expected = onnxruntime.InferenceSession(model.SerializeToString(), options).run(None, feed)
    for produced, wanted in zip(_run(model, flavor, feed), expected, strict=True):
        assert produced.shape == wanted.shape
        np.testing.assert_allclose(produced, wanted, rtol=0, atol=1e-5 * float(np.abs(wanted).max()))


def test_float_layers_run_on_the_kernels_as_onnxruntime_computes_them(flavor: object) -> None:
    model = _float_cnn()
    with pytest.raises(UnsupportedModelError, match="no integer form"):
        integer_lowering.lower(model)
    kept, report = integer_lowering.lower(model, float_islands=True)
    assert len(report.float_nodes) == len(model.graph.node)
    assert integer_reference.float_islands(kept) == {node.name or node.output[0] for node in model.graph.node}
    feed = {"x": np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)}
    expected = onnxruntime.InferenceSession(model.SerializeToString()).run(None, feed)
    for produced, wanted in zip(_run(kept, flavor, feed), expected, strict=True):
        assert produced.shape == wanted.shape
        np.testing.assert_allclose(produced, wanted, rtol=0, atol=1e-5 * float(np.abs(wanted).max()))


def _quantize_dequantize(name: str, suffix: str) -> list[onnx.NodeProto]:
    return [
        helper.make_node("QuantizeLinear", [name, f"s{suffix}", f"z{suffix}"], [f"{name}_q"]),
        helper.make_node("DequantizeLinear", [f"{name}_q", f"s{suffix}", f"z{suffix}"], [f"{name}_dq"]),
    ]


def _mixed_graph(seed: int = 0) -> onnx.ModelProto:
    """QDQ as qcompile writes it, with the stem kept float: float conv -> quantized activations -> an int8
    pointwise conv (weights int8 per channel, int32 bias) -> ReLU -> its output quantized -> a float
    depthwise conv again -> the float output."""
    rng = np.random.default_rng(seed)
    stem = (rng.standard_normal((32, 3, 3, 3)) * 0.3).astype(np.float32)
    pointwise = rng.integers(-127, 128, (32, 32, 1, 1)).astype(np.int8)
    w_scales = (rng.uniform(0.5, 1.5, 32) * 2e-3).astype(np.float32)
    s_x, s_y = np.float32(0.02), np.float32(0.01)
    bias = rng.integers(-2000, 2000, 32).astype(np.int32)
    depthwise = (rng.standard_normal((32, 1, 3, 3)) * 0.3).astype(np.float32)
    initializers = [
        numpy_helper.from_array(stem, "w_stem"),
        numpy_helper.from_array(np.zeros(32, np.float32), "b_stem"),
        numpy_helper.from_array(s_x, "s1"), numpy_helper.from_array(np.uint8(120), "z1"),
        numpy_helper.from_array(pointwise, "w_pw_q"), numpy_helper.from_array(w_scales, "w_pw_s"),
        numpy_helper.from_array(np.zeros(32, np.int8), "w_pw_z"),
        numpy_helper.from_array(bias, "b_pw_q"), numpy_helper.from_array(w_scales * s_x, "b_pw_s"),
        numpy_helper.from_array(np.zeros(32, np.int32), "b_pw_z"),
        numpy_helper.from_array(s_y, "s2"), numpy_helper.from_array(np.uint8(0), "z2"),
        numpy_helper.from_array(depthwise, "w_dw"),
    ]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w_stem", "b_stem"], ["stem"], pads=[1, 1, 1, 1], strides=[2, 2]),
        *_quantize_dequantize("stem", "1"),
        helper.make_node("DequantizeLinear", ["w_pw_q", "w_pw_s", "w_pw_z"], ["w_pw"], axis=0),
        helper.make_node("DequantizeLinear", ["b_pw_q", "b_pw_s", "b_pw_z"], ["b_pw"], axis=0),
        helper.make_node("Conv", ["stem_dq", "w_pw", "b_pw"], ["pw"]),
        helper.make_node("Relu", ["pw"], ["pw_relu"]),
        *_quantize_dequantize("pw_relu", "2"),
        helper.make_node("Conv", ["pw_relu_dq", "w_dw"], ["y"], pads=[1, 1, 1, 1], group=32),
    ]
    return _model(nodes, initializers, [1, 3, 48, 48], {"y": [1, 32, 24, 24]})


def test_a_mixed_graph_keeps_its_integer_layers_and_crosses_in_the_epilogues(flavor: object) -> None:
    from qcompile.flow import measure

    model = _mixed_graph()
    lowered, report = integer_lowering.lower(model, float_islands=True)
    ops = [node.op_type for node in lowered.graph.node]
    # The pointwise layer is integer (ConvInteger + requantization); the float convs read dequantized codes.
    assert "ConvInteger" in ops and ops.count("Conv") == 2 and "DequantizeLinear" in ops
    assert sorted(report.float_nodes) == ["stem", "y"]
    feed = {"x": np.random.default_rng(2).standard_normal((1, 3, 48, 48)).astype(np.float32)}
    expected = integer_reference.run(lowered, feed)
    qdq = onnxruntime.InferenceSession(model.SerializeToString()).run(None, feed)[0]
    # The oracle computes what the QDQ graph means: the integer layer's codes within one step (0.01) of the
    # QDQ graph's float requantization, which the float depthwise conv after it carries at most sum |w| times.
    depthwise = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "w_dw")
    assert np.abs(expected[0] - qdq).max() <= 0.01 * float(np.abs(depthwise).sum(axis=(1, 2, 3)).max()) + 1e-5
    produced = _run(lowered, flavor, feed)
    spread, _ = measure._deviation(integer_reference.run(lowered, feed, measure.ISLAND_PERTURBATION), expected)
    error, cosine = measure._deviation(produced, expected)
    assert error <= max(measure.ISLAND_SPREAD_FACTOR * spread, measure.ISLAND_FLOOR) and cosine > 0.9999


def test_a_host_library_no_faster_than_float_is_not_shipped(tmp_path: Path) -> None:
    build = compile_flow.Build.__new__(compile_flow.Build)
    build.staging, build.lowered, build.skipped = tmp_path, None, {}
    build.written = ["model.tvm.so", compile_flow.INTEGER_ONNX, "model.int8.onnx"]
    for name in build.written:
        (tmp_path / name).write_bytes(b"x")
    build.executors = {"tvm": Executor("tvm", "model.tvm.so", "library", requires_cpu="znver4")}
    build.host_integer = onnx.ModelProto()
    latency = {"onnxruntime-fp32": {"median_ms": 1.0}, "onnxruntime": {"median_ms": 0.9}, "tvm": {"median_ms": 1.2}}
    build.measured = Measured(latency, "onnxruntime", "", {"tvm_vs_oracle": "x", "calibration": {}}, {})
    compile_flow.drop_slow_library(build)
    assert "tvm" not in build.executors and "tvm" not in build.measured.latency_ms
    assert "no faster than onnxruntime fp32" in build.skipped["tvm"]
    assert "1.200 ms against onnxruntime fp32's 1.000 ms" in build.measured.default_reason
    assert build.written == ["model.int8.onnx"] and not (tmp_path / "model.tvm.so").exists()
    assert set(build.measured.accuracy) == {"calibration"}
    # The default executor (chosen on paired rounds, which can disagree with the medians) is never dropped.
    build.executors = {"tvm": Executor("tvm", "model.tvm.so", "library", requires_cpu="znver4")}
    build.measured = Measured({**latency, "tvm": {"median_ms": 1.2}}, "tvm", "", {}, {})
    build.skipped = {}
    compile_flow.drop_slow_library(build)
    assert "tvm" in build.executors and not build.skipped


def _coverage_cnn(seed: int = 0) -> onnx.ModelProto:
    """A float CNN with the ops the kernels cover beyond ResNet's: a grouped conv (2 groups), hard swish and
    leaky ReLU (uint8 tables once quantized), a channel Concat of two branches at different scales, a PReLU
    (per-channel slopes: a float island), and the stem kept float by the caller."""
    rng = np.random.default_rng(seed)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    initializers = [
        weight("w_stem", 16, 3, 3, 3), weight("b_stem", 16), weight("w_group", 32, 8, 3, 3), weight("b_group", 32),
        weight("w_pw", 32, 32, 1, 1), weight("b_pw", 32), weight("w_out", 16, 64, 1, 1),
        numpy_helper.from_array((rng.uniform(0.05, 0.3, (16, 1, 1))).astype(np.float32), "slope"),
    ]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w_stem", "b_stem"], ["stem"], pads=[1, 1, 1, 1], name="stem"),
        helper.make_node("Relu", ["stem"], ["stem_relu"]),
        helper.make_node("Conv", ["stem_relu", "w_group", "b_group"], ["grouped"], pads=[1, 1, 1, 1], group=2),
        helper.make_node("HardSwish", ["grouped"], ["swished"]),
        helper.make_node("Conv", ["swished", "w_pw", "b_pw"], ["pw"]),
        helper.make_node("LeakyRelu", ["pw"], ["leaky"], alpha=0.1),
        helper.make_node("Concat", ["leaky", "swished"], ["joined"], axis=1),
        helper.make_node("Conv", ["joined", "w_out"], ["out"]),
        helper.make_node("PRelu", ["out", "slope"], ["y"]),
    ]
    return _model(nodes, initializers, [1, 3, 16, 16], {"y": [1, 16, 16, 16]})


def test_grouped_convs_tables_and_activation_islands_run_on_the_kernels(flavor: object) -> None:
    """Quantized by qcompile (stem kept float): the 2-group conv runs dense with zero blocks, hard swish as a
    uint8 table gathered in an epilogue, the Concat as copies into one tensor, leaky ReLU and PReLU in float;
    within the islands' spread of the oracle, and the oracle within a code of the QDQ graph."""
    import onnx_ir as ir

    from qcompile import frontend
    from qcompile.flow import measure
    from qcompile.flow.profile import sweep_options
    from qcompile.flow.quantize import quantize

    model = frontend.normalize(ir.from_proto(_coverage_cnn()))
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(4)]
    result = quantize(model, feeds, sweep_options(), progress=False, keep_float=frozenset({"stem"}))
    qdq = execution.to_proto(result.model)
    lowered, report = integer_lowering.lower(qdq, float_islands=True)
    ops = [node.op_type for node in lowered.graph.node]
    # Hard swish is a table; the leaky ReLU, read by the Concat with no quantization between, and the Concat
    # of its float output with codes are a float island (the QuantizeLinear after the Concat ends it).
    assert ops.count("Gather") == 1 and ops.count("ConvInteger") == 3
    assert {"stem", "leaky_float", "joined", "y"} <= set(report.float_nodes) and "Concat" in ops
    assert any(node.op_type == "PRelu" for node in lowered.graph.node)
    feed = feeds[0]
    expected = integer_reference.run(lowered, feed)
    qdq.ir_version = execution.ORT_IR_VERSION
    meant = onnxruntime.InferenceSession(qdq.SerializeToString()).run(None, feed)
    assert measure._deviation(expected, meant)[1] > 0.999
    spread, _ = measure._deviation(integer_reference.run(lowered, feed, measure.ISLAND_PERTURBATION), expected)
    error, cosine = measure._deviation(_run(lowered, flavor, feed), expected)
    assert error <= max(measure.ISLAND_SPREAD_FACTOR * spread, measure.ISLAND_FLOOR) and cosine > 0.9999


@pytest.mark.parametrize("pads", [[0, 0, 0, 0, 0, 0, 1, 1], [0, 0, 2, 1, 0, 0, 0, 2], [0] * 8])
def test_an_explicit_pad_before_a_float_max_pool(flavor: object, pads: list[int]) -> None:
    """BiT's stem: a float conv, a Pad of zeros on H and W (its "same" padding, asymmetric), an unpadded max
    pool, then a padded conv reading the pool's output. Against onnxruntime with its graph optimizations
    off: onnxruntime's pad fusion folds the Pad into the MaxPool's own pads, which pool over -inf instead of
    the zeros the graph pads with (measured here: up to 12 % of the output's range apart). A Pad of nothing
    (Swin's exporters write one) passes its input on."""
    rng = np.random.default_rng(2)
    initializers = [
        numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal((8, 16, 3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array(pads, np.int64), "pads"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Pad", ["c", "pads", "zero"], ["padded"], mode="constant"),
        helper.make_node("MaxPool", ["padded"], ["pooled"], kernel_shape=[3, 3], strides=[2, 2]),
        helper.make_node("Conv", ["pooled", "w2"], ["y"], pads=[1, 1, 1, 1]),
    ]
    height, width = (12 + pads[2] + pads[6] - 3) // 2 + 1, (12 + pads[3] + pads[7] - 3) // 2 + 1
    model = _model(nodes, initializers, [1, 3, 12, 12], {"y": [1, 8, height, width]})
    feed = {"x": rng.standard_normal((1, 3, 12, 12)).astype(np.float32)}
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    _assert_as_onnxruntime(model, flavor, feed, options)


def test_a_batch_norm_left_after_a_linear_layer_runs_in_its_epilogue(flavor: object) -> None:
    """LeViT's BatchNormalization over flattened tokens ``[N, C]`` after a linear layer (the normalizer folds
    only the ones after a convolution), and one after a convolution kept as written: a per-channel affine in
    the producer's epilogue, as onnxruntime computes it (float tolerance as above)."""
    rng = np.random.default_rng(4)

    def statistics(prefix: str, channels: int) -> list[onnx.TensorProto]:
        values = {
            "gamma": rng.standard_normal(channels), "beta": rng.standard_normal(channels),
            "mean": rng.standard_normal(channels), "var": rng.uniform(0.5, 2.0, channels),
        }  # fmt: skip
        return [numpy_helper.from_array(v.astype(np.float32), f"{prefix}_{k}") for k, v in values.items()]

    initializers = [
        numpy_helper.from_array(rng.standard_normal((8, 1, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal((12, 24)).astype(np.float32), "w_fc"),
        numpy_helper.from_array(np.array([12, 12], np.int64), "tokens"),
        numpy_helper.from_array(np.array([1, 12, 24], np.int64), "batched"),
        *statistics("conv", 8),
        *statistics("fc", 24),
    ]
    bn = ["gamma", "beta", "mean", "var"]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("BatchNormalization", ["c", *(f"conv_{k}" for k in bn)], ["normalized"]),
        helper.make_node("Relu", ["normalized"], ["features"]),
        helper.make_node("Reshape", ["x", "tokens"], ["rows"]),  # (a 2-D view of the image's values)
        helper.make_node("MatMul", ["rows", "w_fc"], ["projected"]),
        helper.make_node("BatchNormalization", ["projected", *(f"fc_{k}" for k in bn)], ["tokens_normalized"]),
        helper.make_node("Reshape", ["tokens_normalized", "batched"], ["y"]),
    ]
    model = _model(nodes, initializers, [1, 1, 12, 12], {"features": [1, 8, 6, 6], "y": [1, 12, 24]})
    feed = {"x": rng.standard_normal((1, 1, 12, 12)).astype(np.float32)}
    _assert_as_onnxruntime(model, flavor, feed)


def test_one_dimensional_convolutions_run_as_maps_of_height_one(flavor: object) -> None:
    """An audio front end as wav2vec2 / Whisper / ConvBERT write one: a waveform ``[1, L]`` unsqueezed to one
    channel, a strided Conv1d, ReLU, a padded strided Conv1d, a depthwise Conv1d, then both the tokens
    ``[1, L', C]`` (a Transpose into a LayerNorm) and a ``[1, C, L']`` sum as outputs: as onnxruntime computes
    them (float tolerance as above)."""
    rng = np.random.default_rng(5)
    initializers = [
        numpy_helper.from_array(rng.standard_normal((8, 1, 10)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((12, 8, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.standard_normal((12, 1, 5)).astype(np.float32), "wd"),
        numpy_helper.from_array(rng.standard_normal(12).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.standard_normal(12).astype(np.float32), "beta"),
        numpy_helper.from_array(np.array([1], np.int64), "channel_axis"),
        numpy_helper.from_array(rng.standard_normal((1, 12, 1)).astype(np.float32), "bias"),
    ]
    nodes = [
        helper.make_node("Unsqueeze", ["wave", "channel_axis"], ["x"]),
        helper.make_node("Conv", ["x", "w1"], ["c1"], strides=[5]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], strides=[2], pads=[1, 1]),
        helper.make_node("Conv", ["c2", "wd"], ["c3"], pads=[2, 2], group=12),
        helper.make_node("Transpose", ["c3"], ["tokens"], perm=[0, 2, 1]),
        helper.make_node("LayerNormalization", ["tokens", "gamma", "beta"], ["y"], axis=-1),
        helper.make_node("Add", ["c2", "c3"], ["summed"]),
        helper.make_node("Add", ["summed", "bias"], ["z"]),  # a [1, C, 1] bias, as exporters add a conv's
    ]
    graph = helper.make_graph(
        nodes,
        "audio",
        [helper.make_tensor_value_info("wave", TensorProto.FLOAT, [1, 160])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 12]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 12, 16]),
        ],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = execution.ORT_IR_VERSION
    feed = {"wave": rng.standard_normal((1, 160)).astype(np.float32)}
    _assert_as_onnxruntime(model, flavor, feed)


def test_a_group_norm_as_exporters_write_it(flavor: object) -> None:
    """GroupNorm (BiT, PoolFormer) exported as Reshape to ``[1, G, C / G * H * W]``, InstanceNormalization with
    a scale of ones and a bias of zeros, Reshape back and the per-channel affine, between two convolutions: a
    LayerNorm of each group's row; and the mean over H, W of that map kept as rows: as onnxruntime computes
    them (float tolerance as above)."""
    rng = np.random.default_rng(6)
    initializers = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((4, 8, 3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array([1, 2, 144], np.int64), "grouped"),
        numpy_helper.from_array(np.array([1, 8, 6, 6], np.int64), "map"),
        numpy_helper.from_array(np.ones(2, np.float32), "ones"),
        numpy_helper.from_array(np.zeros(2, np.float32), "zeros"),
        numpy_helper.from_array(rng.standard_normal((8, 1, 1)).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.standard_normal((8, 1, 1)).astype(np.float32), "beta"),
        numpy_helper.from_array(np.array([2, 3], np.int64), "h_w"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["c1", "grouped"], ["groups"]),
        helper.make_node("InstanceNormalization", ["groups", "ones", "zeros"], ["normalized"], epsilon=1e-5),
        helper.make_node("Reshape", ["normalized", "map"], ["ungrouped"]),
        helper.make_node("Mul", ["ungrouped", "gamma"], ["scaled"]),
        helper.make_node("Add", ["scaled", "beta"], ["shifted"]),
        helper.make_node("Relu", ["shifted"], ["r"]),
        helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1]),
        helper.make_node("ReduceMean", ["shifted", "h_w"], ["pooled"], keepdims=1),  # PoolFormer's head
    ]
    model = _model(nodes, initializers, [1, 3, 6, 6], {"y": [1, 4, 6, 6], "pooled": [1, 8, 1, 1]})
    feed = {"x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)}
    _assert_as_onnxruntime(model, flavor, feed)


@pytest.mark.parametrize(("strides", "include"), [(1, 0), (2, 1), (2, 0)])
def test_average_pooling_by_a_window(flavor: object, strides: int, include: int) -> None:
    """AveragePool by a 3 x 3 window over a padded map (PoolFormer's token mixer ``pool(x) - x`` at stride 1),
    counting the border (count_include_pad) or not: as onnxruntime computes it (float tolerance as above)."""
    rng = np.random.default_rng(7)
    initializers = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w")]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node(
            "AveragePool",
            ["c"],
            ["pooled"],
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
            strides=[strides] * 2,
            count_include_pad=include,
        ),
    ]
    side = (9 + 2 - 3) // strides + 1
    if strides == 1:
        nodes.append(helper.make_node("Sub", ["pooled", "c"], ["y"]))
    else:
        nodes.append(helper.make_node("Relu", ["pooled"], ["y"]))
    model = _model(nodes, initializers, [1, 3, 9, 9], {"y": [1, 8, side, side]})
    feed = {"x": rng.standard_normal((1, 3, 9, 9)).astype(np.float32)}
    _assert_as_onnxruntime(model, flavor, feed)


def test_a_map_with_a_border_is_also_read_as_rows(flavor: object) -> None:
    """A conv's output read by a padded conv (so stored with a border) and also unfolded into tokens (MobileViT's
    patches: Reshape, Transpose): the tokens come from its inside, copied out once (float tolerance as above)."""
    rng = np.random.default_rng(8)
    initializers = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((4, 8, 3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array([1, 8, 36], np.int64), "flat"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c1", "w2"], ["y"], pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["c1", "flat"], ["flattened"]),
        helper.make_node("Transpose", ["flattened"], ["tokens"], perm=[0, 2, 1]),
    ]
    model = _model(nodes, initializers, [1, 3, 6, 6], {"y": [1, 4, 6, 6], "tokens": [1, 36, 8]})
    feed = {"x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)}
    _assert_as_onnxruntime(model, flavor, feed)


def test_a_mean_over_h_then_over_w_is_one_mean(flavor: object) -> None:
    """FocalNet's global context ``x.mean(2, keepdim=True).mean(3, keepdim=True)`` as a gate: one mean over H,
    W for the second ReduceMean's output (float tolerance as above)."""
    rng = np.random.default_rng(9)
    initializers = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array([2], np.int64), "h"),
        numpy_helper.from_array(np.array([3], np.int64), "w_axis"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("ReduceMean", ["c", "h"], ["over_h"], keepdims=1),
        helper.make_node("ReduceMean", ["over_h", "w_axis"], ["context"], keepdims=1),
        helper.make_node("Sigmoid", ["context"], ["gate"]),
        helper.make_node("Mul", ["c", "gate"], ["y"]),
    ]
    model = _model(nodes, initializers, [1, 3, 6, 6], {"y": [1, 8, 6, 6]})
    feed = {"x": rng.standard_normal((1, 3, 6, 6)).astype(np.float32)}
    _assert_as_onnxruntime(model, flavor, feed)


@pytest.mark.parametrize(
    ("mode", "settings"),
    [
        ("linear", {"coordinate_transformation_mode": "half_pixel"}),  # SegFormer's bilinear upsampling
        ("linear", {"coordinate_transformation_mode": "align_corners"}),
        ("cubic", {}),
        ("nearest", {}),  # YOLO-style upsampling: a gather
    ],
)
def test_a_map_is_resized(flavor: object, mode: str, settings: dict[str, str]) -> None:
    """Resize of a conv's output by scales (x2 over H, x1.5 over W) in each mode, then a conv: as onnxruntime
    computes it (float tolerance as above: the taps sum in another order)."""
    rng = np.random.default_rng(10)
    initializers = [
        numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal((4, 16, 3, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array([1.0, 1.0, 2.0, 1.5], np.float32), "scales"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Resize", ["c", "", "scales"], ["resized"], mode=mode, **settings),
        helper.make_node("Conv", ["resized", "w2"], ["y"], pads=[1, 1, 1, 1]),
    ]
    model = _model(nodes, initializers, [1, 3, 5, 6], {"y": [1, 4, 10, 9]})
    feed = {"x": rng.standard_normal((1, 3, 5, 6)).astype(np.float32)}
    _assert_as_onnxruntime(model, flavor, feed)


def test_the_rounding_estimate_keeps_a_mask_finite() -> None:
    """The oracle's rounding estimate scales each island's output by 1 + 2^-20. An exporter's mask
    ``(1 - m) * -3.4e38`` used to overflow to -inf there, and then ``0 * -inf`` gave NaN in every unmasked
    position (all-MiniLM-L6-v2 exported by optimum). Values that would overflow keep their value."""
    lowest = np.finfo(np.float32).min
    nodes = [
        helper.make_node("Mul", ["x", "lowest"], ["mask"]),
        helper.make_node("Mul", ["mask", "zero"], ["y"]),
    ]
    initializers = [
        numpy_helper.from_array(np.array(lowest, np.float32), "lowest"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
    ]
    model = _model(nodes, initializers, [1, 4], {"y": [1, 4], "mask": [1, 4]})
    helper.set_model_props(model, {integer_reference.FLOAT_ISLANDS: "\n".join(node.output[0] for node in nodes)})
    assert integer_reference.float_islands(model) == {"mask", "y"}
    feed = {"x": np.array([[1.0, 0.0, 1.0, 1.0]], np.float32)}
    y, mask = integer_reference.run(model, feed, island_perturbation=2.0**-20)
    assert np.all(np.isfinite(mask)) and mask.min() == lowest
    assert not np.any(np.isnan(y)) and np.all(y == 0)
