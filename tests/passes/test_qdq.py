"""Annotation + QDQ insertion on a tiny Conv -> Relu -> Conv -> Add graph, and on Gemm."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import parse_model, save_model

from qcompile import execution, frontend
from qcompile.graph import layer_name
from qcompile.passes.annotate import AnnotatePass, plan_quantization_points
from qcompile.passes.qdq import QDQPass
from qcompile.passes.quant_spec import RANGE_KEY

RESIDUAL = """
<ir_version: 8, opset_import: ["" : 18]>
g (float[1, 4, 6, 6] x) => (float[1, 4, 6, 6] y)
  <float[4, 4, 1, 1] w1 = {w1}, float[4] b1 = {b1}, float[4, 4, 1, 1] w2 = {w2}, float[4] b2 = {b2}> {{
    c1 = Conv (x, w1, b1)
    r1 = Relu (c1)
    c2 = Conv (r1, w2, b2)
    y = Add (c2, r1)
}}
"""


def residual_model(tmp_path: Path) -> ir.Model:
    rng = np.random.default_rng(0)

    def values(count: int) -> str:
        return "{" + ", ".join(f"{value:.4f}" for value in rng.standard_normal(count)) + "}"

    text = RESIDUAL.format(w1=values(16), b1=values(4), w2=values(16), b2=values(4))
    return frontend.load(save_model(parse_model(text), tmp_path / "residual.onnx"))


def ranges_from(model: ir.Model, x: np.ndarray):  # type: ignore[no-untyped-def]
    names = [str(value.name) for node in model.graph for value in node.outputs] + ["x"]
    results = dict(zip(names, execution.session(model, extra_outputs=names).run(names, {"x": x}), strict=True))
    return lambda name, levels=256: (float(results[name].min()), float(results[name].max()))


def test_points_follow_int8_flow(tmp_path: Path) -> None:
    model = residual_model(tmp_path)
    layers, points = plan_quantization_points(model)
    assert [node.op_type for node in layers] == ["Conv", "Conv"]
    # Conv inputs, and the Add (whose inputs both flow in int8) with its output; c1 is not a point:
    # it flows on through its Relu.
    assert sorted(str(value.name) for value in points) == ["c2", "r1", "x", "y"]


def test_qdq_structure_and_numerics(tmp_path: Path) -> None:
    model = residual_model(tmp_path)
    x = np.random.default_rng(1).standard_normal((1, 4, 6, 6)).astype(np.float32)
    expected = execution.session(model).run(None, {"x": x})[0]
    AnnotatePass(ranges_from(model, x))(model)
    QDQPass()(model)
    proto = execution.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    ops = [node.op_type for node in model.graph]
    assert ops.count("QuantizeLinear") == 4  # x, r1, c2, y
    assert ops.count("DequantizeLinear") == 4 + 2 + 2  # activations, weights, biases
    biases = [value for value in model.graph.initializers.values() if str(value.name).endswith("_bias_quantized")]
    assert len(biases) == 2 and all(value.const_value.dtype == ir.DataType.INT32 for value in biases)
    weights = [value for value in model.graph.initializers.values() if str(value.name).endswith("w1_quantized")]
    assert weights[0].const_value.dtype == ir.DataType.INT8
    actual = execution.session(model).run(None, {"x": x})[0]
    # Four 8-bit roundings in a row over a range of a few units: a few output steps at most.
    output_step = (expected.max() - expected.min()) / 255
    assert np.abs(actual - expected).max() <= 4 * output_step


POOLED = """
<ir_version: 8, opset_import: ["" : 18]>
g (float[1, 4, 6, 6] x) => (float[1, 4, 1, 1] y)
  <float[4, 4, 1, 1] w1 = {w1}, float[4] b1 = {b1}, int64[2] axes = {{2, 3}}> {{
    c1 = Conv (x, w1, b1)
    r1 = Relu (c1)
    y = ReduceMean (r1, axes)
}}
"""


def test_a_conv_read_only_by_float_ops_still_runs_as_an_integer_kernel(tmp_path: Path) -> None:
    # onnxruntime fuses DequantizeLinear -> Conv into QLinearConv only when the output is quantized too; else it
    # runs a float Conv on dequantized inputs, slower than the float model.
    rng = np.random.default_rng(0)
    text = POOLED.format(
        w1="{" + ", ".join(f"{v:.4f}" for v in rng.standard_normal(16)) + "}",
        b1="{" + ", ".join(f"{v:.4f}" for v in rng.standard_normal(4)) + "}",
    )
    model = frontend.load(save_model(parse_model(text), tmp_path / "pooled.onnx"))
    assert sorted(str(value.name) for value in plan_quantization_points(model)[1]) == ["r1", "x"]
    x = rng.standard_normal((1, 4, 6, 6)).astype(np.float32)
    AnnotatePass(ranges_from(model, x))(model)
    QDQPass()(model)
    kernels = set(execution.kernel_times(model, {"x": x}, runs=1, warmup=0, sessions=1).op_types.values())
    assert "QLinearConv" in kernels and not kernels & {"Conv", "FusedConv"}, kernels


DEAD_POOL = """
<ir_version: 8, opset_import: ["" : 18]>
g (float[1, 4, 6, 6] x) => (float[1, 4] y)
  <float[4, 4, 1, 1] w1 = {w1}, float[4] b1 = {{-9, -9, -9, -9}}, float zero = {{0}}, float six = {{6}}> {{
    c1 = Conv (x, w1, b1)
    r1 = Clip (c1, zero, six)
    p1 = GlobalAveragePool (r1)
    y = Flatten (p1)
}}
"""


def test_a_pool_dead_on_every_sample_keeps_a_scale_onnxruntime_accepts(tmp_path: Path) -> None:
    # Biases of -9 keep the ReLU6 at zero on these samples: the pool's calibrated output range collapses to
    # [0, 0] (scale at its floor, 1e-8) under the clip's full [0, 6] input scale, a requantization factor of
    # 2e7 / 36 that onnxruntime's QLinearGlobalAveragePool refused ("out of computation range").
    rng = np.random.default_rng(0)
    text = DEAD_POOL.format(w1="{" + ", ".join(f"{v:.4f}" for v in 0.1 * rng.standard_normal(16)) + "}")
    model = frontend.load(save_model(parse_model(text), tmp_path / "dead.onnx"))
    x = rng.standard_normal((1, 4, 6, 6)).astype(np.float32)
    AnnotatePass(ranges_from(model, x))(model)
    pooled = next(node for node in model.graph if node.op_type == "GlobalAveragePool")
    low, high = pooled.outputs[0].meta[RANGE_KEY]
    assert (low, high) != (0.0, 0.0) and (6.0 - 0.0) / (high - low) / 36 < 128.0 + 1e-9
    QDQPass()(model)
    np.testing.assert_array_equal(execution.session(model).run(None, {"x": x})[0], np.zeros((1, 4), np.float32))


ROTARY = """
<ir_version: 8, opset_import: ["" : 18]>
g (float[1, 6, 8] x, float[1, 1, 6] positions) => (float[1, 6, 4] y, float[1, 4, 6] angles)
  <float[8, 4] w = {w}, float[1, 4, 1] frequencies = {{1, 0.1, 0.01, 0.001}}> {{
    y = MatMul (x, w)
    angles = MatMul (frequencies, positions)
  }}
"""


def test_only_two_dimensional_constants_are_matmul_weights(tmp_path: Path) -> None:
    # A rotary table (frequencies [1, 4, 1] times positions) has a constant first operand; onnxruntime failed on
    # its integer MatMul with "b zero point is not valid" when such a constant was quantized per channel.
    rng = np.random.default_rng(0)
    text = ROTARY.format(w="{" + ", ".join(f"{v:.4f}" for v in rng.standard_normal(32)) + "}")
    model = frontend.load(save_model(parse_model(text), tmp_path / "rotary.onnx"))
    layers, points = plan_quantization_points(model)
    assert [str(node.outputs[0].name) for node in layers] == ["y"]
    assert [str(value.name) for value in points] == ["x"]


def test_ordering_is_checked(tmp_path: Path) -> None:
    import pytest

    from qcompile.passes.bias_correction import BiasCorrectionPass

    model = residual_model(tmp_path)
    with pytest.raises(ir.passes.PreconditionError, match="run AnnotatePass first"):
        BiasCorrectionPass(lambda name: None)(model)


def test_a_layer_read_at_sixteen_bits_gets_uint16_codes_under_opset_21(tmp_path: Path) -> None:
    """``activation_formats``: the second Conv reads ``r1`` at 16 bits (W8A16), so ``r1``'s QuantizeLinear
    writes uint16 codes and the model moves to opset 21 (the first with 16-bit QuantizeLinear); the other
    points stay uint8. The model checks and runs in onnxruntime, and r1's step is 257x finer (65535 steps
    over the same calibrated range instead of 255)."""
    from qcompile.passes.quant_spec import ACTIVATION_FORMATS

    x = np.random.default_rng(1).standard_normal((1, 4, 6, 6)).astype(np.float32)
    steps = {}
    for wide in (False, True):
        model = residual_model(tmp_path)
        expected = execution.session(model).run(None, {"x": x})[0]
        second = layer_name(plan_quantization_points(model)[0][1])
        formats = {second: ACTIVATION_FORMATS[16]} if wide else {}
        AnnotatePass(ranges_from(model, x), activation_formats=formats)(model)
        QDQPass()(model)
        proto = execution.to_proto(model)
        onnx.checker.check_model(proto, full_check=True)
        zero_points = {init.name: init.data_type for init in proto.graph.initializer}
        codes = {
            node.input[0]: zero_points[node.input[2]] for node in proto.graph.node if node.op_type == "QuantizeLinear"
        }
        uint16 = {name for name, dtype in codes.items() if dtype == onnx.TensorProto.UINT16}
        assert uint16 == ({"r1"} if wide else set()) and set(codes) == {"x", "r1", "c2", "y"}
        assert {opset.domain: opset.version for opset in proto.opset_import}[""] == (21 if wide else 18)
        got = execution.session(model).run(None, {"x": x})[0]
        np.testing.assert_allclose(got, expected, atol=0.1 * float(np.abs(expected).max()))  # int8 elsewhere
        steps[wide] = float(
            onnx.numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == "r1_scale"))
        )
    assert steps[False] / steps[True] == pytest.approx(65535 / 255, rel=1e-5)


def test_uint4_activations_are_clamped_to_sixteen_levels(tmp_path: Path) -> None:
    """uint4 codes live in uint8 storage: QuantizeLinear alone would saturate at 255, so a Clip keeps the
    codes in 0..15. Checked on the dequantized input of the first Conv: inputs beyond the calibrated range
    land on the range's ends, and at most 16 distinct values remain."""
    from qcompile.passes.quant_spec import ACTIVATION_FORMATS

    model = residual_model(tmp_path)
    rng = np.random.default_rng(2)
    calibration_x = rng.standard_normal((1, 4, 6, 6)).astype(np.float32)
    AnnotatePass(ranges_from(model, calibration_x), activation_spec=ACTIVATION_FORMATS[4])(model)
    QDQPass()(model)
    proto = execution.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    clips = [node for node in proto.graph.node if node.op_type == "Clip" and node.input[0].endswith("_quantized")]
    assert len(clips) == 4  # one per activation point: x, r1, c2, y
    wide = (calibration_x * 3.0).astype(np.float32)  # far outside the calibrated range
    session = execution.session(model, extra_outputs=["x_dequantized"])
    (seen,) = session.run(["x_dequantized"], {"x": wide})
    low, high = float(calibration_x.min()), float(calibration_x.max())
    scale = (high - min(low, 0.0)) / 15
    assert len(np.unique(seen)) <= 16
    assert seen.max() <= high + scale / 2 and seen.min() >= min(low, 0.0) - scale / 2


@pytest.mark.parametrize("trans_b", [False, True])
def test_block_scaled_weights_match_a_numpy_reference(tmp_path: Path, trans_b: bool) -> None:
    """int4 weights with one scale per output channel and block of 32 inputs: the dequantized weight the
    graph computes (DequantizeLinear over one row per block, Reshape, Transpose) equals codes x scales
    computed in numpy, exactly; each block of 32 inputs has the scale it would have alone, moved to the grid the
    packed file stores block scales on."""
    from qcompile.passes.quant_spec import WEIGHT_FORMATS, QuantSpec, on_scale_grid

    rng = np.random.default_rng(3)
    weight = rng.standard_normal((16, 64) if trans_b else (64, 16)).astype(np.float32)
    shape, values = ",".join(map(str, weight.shape)), ", ".join(f"{v:.6f}" for v in weight.ravel())
    text = f"""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[3, 64] x) => (float[3, 16] y) <float[{shape}] w = {{{values}}}> {{
        y = Gemm <transB = {int(trans_b)}> (x, w)
    }}"""
    model = frontend.load(save_model(parse_model(text), tmp_path / "gemm.onnx"))
    x = rng.standard_normal((3, 64)).astype(np.float32)
    spec_formats = {layer_name(node): "int4" for node in model.graph}
    AnnotatePass(ranges_from(model, x), weight_formats=spec_formats, weight_block=32)(model)
    (node,) = [node for node in model.graph if node.op_type == "Gemm"]
    spec = node.inputs[1].meta["qcompile.quant_spec"]
    assert spec.block_size == 32 and spec.bits == 4 and spec.scale_rule == WEIGHT_FORMATS["int4"].scale_rule
    original = node.inputs[1].const_value.numpy().copy()
    QDQPass()(model)
    onnx.checker.check_model(execution.to_proto(model), full_check=True)
    dequantized = str(node.inputs[1].name)
    (seen,) = execution.session(model, extra_outputs=[dequantized]).run([dequantized], {"x": x})
    scales = spec.weight_scales(original)  # [16 outputs, 2 blocks]
    assert scales.shape == (16, 2)
    expected = spec.dequantize(spec.quantize(original, scales), scales)
    np.testing.assert_array_equal(seen, expected)
    rows = original.T if not trans_b else original  # [outputs, inputs]
    per_channel = QuantSpec(bits=4, axis=0, scale_rule=spec.scale_rule)
    # each block's scale is that block's own per-channel scale, moved to the stored grid below its row's largest
    alone = np.stack([per_channel.weight_scales(rows[:, 32 * block : 32 * (block + 1)]) for block in range(2)], 1)
    np.testing.assert_array_equal(scales, on_scale_grid(alone))


def test_two_bit_weights_are_the_four_twos_complement_codes(tmp_path: Path) -> None:
    """``--bits 2``: every weight is stored as int8 codes in {-2, -1, 0, 1} (all four used) with a per-channel
    scale, and the quantized model still follows the float one's sign pattern (a coarse format: only a
    sanity bound)."""
    from qcompile.flow.quantize import QuantizeOptions, quantize

    model = residual_model(tmp_path)
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.standard_normal((1, 4, 6, 6)).astype(np.float32)} for _ in range(4)]
    options = QuantizeOptions(bits="2", float_threshold=0, weight_rounding="nearest", sensitivity_samples=4)
    result = quantize(model, feeds, options, progress=False)
    assert [record.weight_bits for record in result.layers] == [2, 2]
    codes = [
        value.const_value.numpy()
        for value in result.model.graph.initializers.values()
        if str(value.name).endswith(("w1_quantized", "w2_quantized"))
    ]
    assert len(codes) == 2 and all(set(np.unique(c)) <= {-2, -1, 0, 1} for c in codes)
    assert {-2, 1} <= set(np.unique(np.concatenate([c.ravel() for c in codes])))
    assert result.error["mean_cosine"] > 0.5
    with pytest.raises(Exception, match="not 8, 4, 2 or auto"):
        QuantizeOptions(bits="3")


CHAIN = """
<ir_version: 8, opset_import: ["" : 18]>
g (float[1, 4, 6, 6] x) => (float[1, 4, 6, 6] y)
  <float[4, 4, 1, 1] w1 = {w1}, float[4, 4, 1, 1] w2 = {w2}, float[4, 4, 1, 1] w3 = {w3}> {{
    c1 = Conv (x, w1)
    r1 = Relu (c1)
    c2 = Conv (r1, w2)
    r2 = Relu (c2)
    y = Conv (r2, w3)
}}
"""


def test_a_layer_kept_float_between_int8_layers_runs_in_float(tmp_path: Path) -> None:
    # onnxruntime's WeightBiasQuantization would quantize the float weights of a Conv read from a DequantizeLinear
    # and written to a QuantizeLinear (coarser than qcompile's int8); qcompile's sessions switch it off.
    from qcompile.flow.quantize import quantize

    rng = np.random.default_rng(0)
    weights = {name: "{" + ", ".join(f"{v:.4f}" for v in rng.standard_normal(16)) + "}" for name in ("w1", "w2", "w3")}
    model = frontend.load(save_model(parse_model(CHAIN.format(**weights)), tmp_path / "chain.onnx"))
    middle = layer_name([node for node in model.graph if node.op_type == "Conv"][1])
    feeds = [{"x": rng.standard_normal((1, 4, 6, 6)).astype(np.float32)} for _ in range(4)]
    mixed = quantize(model, feeds, progress=False, keep_float=frozenset({middle})).model
    profiled = execution.kernel_times(mixed, feeds[0], runs=1, warmup=0, sessions=1)
    # onnxruntime names a node by its output where the source node has no name: the float layer's is 'c2...'.
    kernels = profiled.op_types.items()
    assert any(op in ("Conv", "FusedConv") and name.startswith("c2") for name, op in kernels), profiled.op_types
    assert not any(op == "QLinearConv" and name.startswith("c2") for name, op in kernels)
    assert "QLinearConv" in profiled.op_types.values()  # the first layer is still an integer kernel
