"""SmoothQuant folding: exact in float on real models, one joint scale for a shared producer, and refusals
that name the value when no producer can absorb the scale.

Tolerance: outputs of the rewritten fp32 model equal the original's within 1e-5 of their largest
magnitude. Scaling a weight row by s and the producer by 1/s changes each product only by float32 rounding
of the scaled parameters (measured 0.9e-6 on the pre-norm transformer, 1.2e-6 on EfficientNet-Lite0).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import zoo
from graph_helpers import constant

from qcompile import execution, frontend
from qcompile.errors import CalibrationError
from qcompile.flow.profile import small_transformer
from qcompile.flow.quantize import QuantizeOptions
from qcompile.graph import clone
from qcompile.passes.matmul_to_gemm import MatMulAddToGemmPass
from qcompile.passes.smoothquant import SmoothQuantPass, producer_statistics
from qcompile.search import sensitivity

TOLERANCE = 1e-5


def _smooth(model, feeds, alpha):  # type: ignore[no-untyped-def]
    MatMulAddToGemmPass()(model)
    before = clone(model)
    references = sensitivity.run_all(model, feeds)
    absmax, rows = producer_statistics(model, feeds)
    smoother = SmoothQuantPass(absmax.get, alpha, rows.get)
    smoother(model)
    outputs = sensitivity.run_all(model, feeds)
    worst = max(float(np.abs(o - r).max() / np.abs(r).max()) for o, r in zip(outputs, references, strict=True))
    onnx.checker.check_model(execution.to_proto(model), full_check=True)
    return before, smoother.decisions, worst


def _weights(model) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    return {
        str(node.name): node.inputs[1].const_value.numpy()
        for node in model.graph
        if len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[1].const_value is not None
    }


@pytest.mark.parametrize("alpha", [0.5, "auto"])
def test_pre_norm_transformer_folds_into_layernorm_with_a_joint_scale(alpha: float | str) -> None:
    model, feeds = small_transformer()
    before, decisions, worst = _smooth(model, feeds, alpha)
    assert worst < TOLERANCE
    folded = [d for d in decisions if d.reason is None]
    assert len(folded) == 4 and all(d.producer and "layernormalization" in d.producer for d in folded)
    shared = next(d for d in folded if len(d.consumers) == 3)  # one LayerNorm feeding Q, K and V
    old, new = _weights(before), _weights(model)
    ratios = [new[name] / old[name] for name in shared.consumers]  # rows (input channels) scaled by s
    scale = ratios[0][:, 0]
    assert scale.max() / scale.min() > 1.05  # per-channel, not one constant (random weights: no big outliers)
    for ratio in ratios:
        np.testing.assert_allclose(ratio, np.broadcast_to(scale[:, None], ratio.shape), rtol=1e-5)
    layernorm = next(node for node in model.graph if node.name == shared.producer)
    gamma_before = next(node for node in before.graph if node.name == shared.producer).inputs[1].const_value.numpy()
    np.testing.assert_allclose(layernorm.inputs[1].const_value.numpy() * scale, gamma_before, rtol=1e-5)
    if alpha == "auto":
        assert all(d.alpha in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9) and d.errors for d in folded)
    # Inputs behind a Transpose (attention output) or a GELU-like Mul cannot absorb a scale: named, left alone.
    refused = [d for d in decisions if d.reason is not None]
    assert refused and all("cannot absorb a per-channel scale" in d.reason and d.value in d.reason for d in refused)


def test_post_norm_minilm_is_left_alone_with_reasons(minilm: Path) -> None:
    model = frontend.load(minilm)
    feeds = list(zoo.minilm_feeds(zoo.pydoc_sentences(4, offset=1000)))
    _, decisions, worst = _smooth(model, feeds, 0.5)
    # BERT-style post-norm: every LayerNorm output also feeds the residual Add, so no scale may be folded.
    assert worst == 0.0 and decisions and all(d.reason is not None for d in decisions)
    layernorm_groups = [d for d in decisions if d.producer and "layer_norm" in d.producer]
    assert len(layernorm_groups) == 12
    assert all(f"value '{d.value}' also feeds Add" in d.reason for d in layernorm_groups)  # type: ignore[operator]


def test_efficientnet_stays_exact(efficientnet: Path) -> None:
    model = frontend.load(efficientnet)
    feeds = [{"input": crop[None]} for crop in zoo.photo_crops(4, seed=2)]
    _, decisions, worst = _smooth(model, feeds, 0.5)
    assert worst < TOLERANCE
    assert any(d.reason is None for d in decisions)  # conv -> conv pairs without a nonlinearity fold


def test_options_and_flags_are_validated() -> None:
    from qcompile.cli import main

    with pytest.raises(CalibrationError, match="SmoothQuant alpha"):
        QuantizeOptions(smoothquant=1.5)
    with pytest.raises(ValueError, match="alpha"):
        SmoothQuantPass(lambda name: None, alpha="sometimes")
    with pytest.raises(SystemExit) as exit_info:
        main(["model.onnx", "-c", "data", "--smoothquant", "2"])
    assert exit_info.value.code == 2


def test_llama_style_block_folds_into_rmsnorm_weight_and_up_projection() -> None:
    """A Llama-style block at opset 18: RMSNorm as Pow / ReduceMean / Add / Sqrt / Div, then Mul by its
    weight, feeding Q, K and V; then a SwiGLU MLP, ``(silu(h G) * (h U)) D``. The RMSNorm weight absorbs one
    joint scale for Q, K and V; the up projection (read only by the gating Mul) absorbs the down
    projection's; the gate projection (read by Sigmoid and Mul) cannot."""
    import onnx_ir as ir

    rng = np.random.default_rng(0)
    width = 64

    x = ir.Value(name="x", shape=ir.Shape([1, 8, width]), type=ir.TensorType(ir.DataType.FLOAT))
    nodes, values = [], {}

    def op(kind: str, inputs: list[ir.Value], name: str, **attributes: object) -> ir.Value:
        out = ir.Value(name=name)
        nodes.append(ir.node(kind, inputs, attributes=attributes, outputs=[out], name=f"node_{name}"))  # type: ignore[arg-type]
        values[name] = out
        return out

    squared = op("Pow", [x, constant("two", np.array(2.0))], "squared")
    mean = op("ReduceMean", [squared, constant("axes", np.array([-1], np.int64))], "mean")
    root = op("Sqrt", [op("Add", [mean, constant("eps", np.array(1e-6))], "mean_eps")], "root")
    normed = op("Div", [x, root], "normed")
    gamma = rng.uniform(0.5, 2.0, width) * np.where(np.arange(width) % 16 == 0, 20.0, 1.0)  # outlier channels
    weighted = op("Mul", [normed, constant("gamma", gamma)], "weighted")
    outputs = [
        op("MatMul", [weighted, constant(f"w_{head}", rng.standard_normal((width, width)) / 8)], head)
        for head in ("q", "k", "v")
    ]
    total = op("Add", [op("Add", [outputs[0], outputs[1]], "qk"), outputs[2]], "total")
    gate = op("MatMul", [total, constant("w_gate", rng.standard_normal((width, 2 * width)) / 8)], "gate")
    silu = op("Mul", [gate, op("Sigmoid", [gate], "sigmoid")], "silu")
    outlier_columns = np.where(np.arange(2 * width) % 8 == 0, 30.0, 1.0)
    w_up = rng.standard_normal((width, 2 * width)) / 8 * outlier_columns
    hidden = op("Mul", [silu, op("MatMul", [total, constant("w_up", w_up)], "up")], "hidden")
    down = op("MatMul", [hidden, constant("w_down", rng.standard_normal((2 * width, width)) / 8)], "down")
    initializers = [
        value for node in nodes for value in node.inputs if value is not None and value.const_value is not None
    ]
    graph = ir.Graph([x], [down], nodes=nodes, initializers=initializers, opset_imports={"": 18}, name="block")
    model = frontend.normalize(ir.Model(graph, ir_version=10), name="rmsnorm block")
    feeds = [{"x": rng.standard_normal((1, 8, width)).astype(np.float32)} for _ in range(4)]
    _, decisions, worst = _smooth(model, feeds, "auto")
    assert worst < TOLERANCE
    folded = {d.producer: d for d in decisions if d.reason is None}
    assert sorted(folded) == ["node_up", "node_weighted"]
    norm, mlp = folded["node_weighted"], folded["node_up"]
    assert norm.producer == "node_weighted" and sorted(norm.consumers) == ["node_k", "node_q", "node_v"]
    assert mlp.producer == "node_up" and mlp.value == "hidden" and mlp.consumers == ["node_down"]
    assert mlp.max_scale is not None and mlp.max_scale > 2.0
    refused = {d.consumers[0]: d.reason for d in decisions if d.reason is not None}
    assert "'total'" in refused["node_gate"] and "Add" in refused["node_gate"]
