"""Bias correction removes the expected output shift of rounded weights exactly (1x1 conv, no padding)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

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
