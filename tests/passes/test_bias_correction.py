"""Bias correction removes the expected output shift of rounded weights exactly (1x1 conv, no padding), and the
sequential refit matches every quantized layer's output means to the float model's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
import zoo

from qcompile import execution, frontend
from qcompile.flow.quantize import QuantizeOptions, quantize
from qcompile.passes import bias_correction
from qcompile.passes.bias_correction import BiasCorrectionPass, expected_shift
from qcompile.passes.quant_spec import SPEC_KEY, QuantSpec


def conv_node(weight: np.ndarray, groups: int = 1) -> ir.Node:
    x = ir.Value(name="x", shape=ir.Shape([1, weight.shape[1] * groups, 5, 5]), type=ir.TensorType(ir.DataType.FLOAT))
    w = ir.Value(
        name="w",
        const_value=ir.tensor(weight, name="w"),
        shape=ir.Shape(weight.shape),
        type=ir.TensorType(ir.DataType.FLOAT),
    )
    b = ir.Value(
        name="b",
        const_value=ir.tensor(np.zeros(weight.shape[0], np.float32), name="b"),
        shape=ir.Shape([weight.shape[0]]),
        type=ir.TensorType(ir.DataType.FLOAT),
    )
    return ir.node("Conv", [x, w, b], {"group": groups}, name="conv")


def test_expected_shift_matches_direct_computation() -> None:
    rng = np.random.default_rng(0)
    error = rng.standard_normal((6, 2, 1, 1))
    mean = rng.standard_normal(6)
    node = conv_node(np.zeros((6, 2, 1, 1), np.float32), groups=3)
    shift = expected_shift(node, error, mean)
    direct = np.array([error[o, :, 0, 0] @ mean[(o // 2) * 2 : (o // 2) * 2 + 2] for o in range(6)])
    np.testing.assert_allclose(shift, direct, rtol=1e-12)


def test_pass_cancels_mean_shift() -> None:
    rng = np.random.default_rng(1)
    weight = (rng.standard_normal((4, 3, 1, 1)) * 0.37).astype(np.float32)
    node = conv_node(weight)
    graph = ir.Graph([node.inputs[0]], node.outputs, nodes=[node], initializers=[node.inputs[1], node.inputs[2]])
    node.inputs[1].meta[SPEC_KEY] = QuantSpec(axis=0)
    model = ir.Model(graph, ir_version=10)
    x = rng.standard_normal((200, 3)) + np.array([2.0, -1.0, 0.5])
    BiasCorrectionPass(lambda name: x.mean(axis=0).astype(np.float32))(model)
    spec = QuantSpec(axis=0)
    scales = spec.weight_scales(weight)
    rounded = spec.dequantize(spec.quantize(weight, scales), scales)[:, :, 0, 0]
    bias = node.inputs[2].const_value.numpy()
    # E[W_q x + b'] == E[W x]: exact up to float32 round-off.
    np.testing.assert_allclose((x @ rounded.T + bias).mean(axis=0), (x @ weight[:, :, 0, 0].T).mean(axis=0), atol=1e-5)


def _layer_means(model: ir.Model, names: list[str], feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    session = execution.session(model, extra_outputs=names)
    outputs = [session.run(names, feed) for feed in feeds]
    return {name: np.mean([out[i].mean(axis=(0, 2, 3)) for out in outputs], axis=0) for i, name in enumerate(names)}


def test_sequential_refit_matches_float_output_means(digits: tuple[Path, float]) -> None:
    """After the refit, every quantized Conv's per-channel output mean on the refit samples equals the float
    model's within one step of its int32 bias codes (half a step of rounding, plus float32 sums and the
    fused kernels' own rounding); with the expected correction alone the shifts are over ten steps."""
    train_x, _, _, _ = zoo.digits_split()
    feeds = [{"image": train_x[i : i + 1]} for i in range(32)]
    source = frontend.load(digits[0])
    refitted = quantize(source, feeds, QuantizeOptions(float_threshold=0), progress=False)
    expected = quantize(source, feeds, QuantizeOptions(float_threshold=0, bias_correction="expected"), progress=False)
    step = next(p for p in refitted.passes if p["name"] == "bias_correction")
    assert step["method"] == "sequential" and step["refitted_layers"] >= 2
    names = [str(node.outputs[0].name) for node in refitted.model.graph if node.op_type == "Conv"]
    floats = _layer_means(source, names, feeds)
    after = _layer_means(refitted.model, names, feeds)
    before = _layer_means(expected.model, names, feeds)
    steps = {  # the int32 bias codes' scale, per channel: a refitted mean is off by at most half of it
        str(node.outputs[0].name): node.inputs[2].producer().inputs[1].const_value.numpy()
        for node in refitted.model.graph
        if node.op_type == "Conv"
    }
    for name in names:
        np.testing.assert_array_less(np.abs(after[name] - floats[name]), steps[name] + 1e-6, err_msg=name)
    assert max((np.abs(before[n] - floats[n]) / steps[n]).max() for n in names) > 10


def test_refit_in_pieces_equals_refit_on_prefixes(digits: tuple[Path, float], monkeypatch: pytest.MonkeyPatch) -> None:
    """The refit runs the quantized model a piece at a time, keeping values between layers (each node runs
    about once); the same refit on one prefix model per layer (each layer's ancestors run again) gives the
    same bias codes, up to float32 rounding where onnxruntime fuses the two graphs' nodes differently."""
    train_x, _, _, _ = zoo.digits_split()
    feeds = [{"image": train_x[i : i + 1]} for i in range(32)]
    source = frontend.load(digits[0])
    pieces = quantize(source, feeds, QuantizeOptions(float_threshold=0), progress=False).model
    monkeypatch.setattr(bias_correction._Sweep, "usable", staticmethod(lambda model: False))
    prefixes = quantize(source, feeds, QuantizeOptions(float_threshold=0), progress=False).model
    codes = {
        name: value.const_value.numpy()
        for name, value in pieces.graph.initializers.items()
        if name.endswith("_bias_quantized") and value.const_value is not None
    }
    assert len(codes) >= 2
    for name, found in codes.items():
        again = prefixes.graph.initializers[name].const_value
        assert again is not None
        scale = max(1, int(np.abs(found).max()))
        assert np.abs(found.astype(np.int64) - again.numpy()).max() <= max(2, scale * 1e-5), name
