"""Residual-stream equalization is exact in float, on a tiny residual block and on EfficientNet-Lite0."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
from conftest import parse_model, save_model

from qcompile import calibration, execution, frontend
from qcompile.flow.quantize import activation_values
from qcompile.passes.equalize import ResidualEqualizationPass


def equalize_and_compare(model: ir.Model, feeds: list[dict[str, np.ndarray]]) -> tuple[ResidualEqualizationPass, float]:
    names = [str(value.name) for node in model.graph for value in node.outputs]
    stats = calibration.collect(model, feeds, names + activation_values(model), "minmax", progress=False)
    expected = [execution.session(model).run(None, feed)[0] for feed in feeds]
    equalizer = ResidualEqualizationPass(stats.channel_absmax)
    equalizer(model)
    actual = [execution.session(model).run(None, feed)[0] for feed in feeds]
    worst = max(float(np.abs(a - e).max() / np.abs(e).max()) for a, e in zip(actual, expected, strict=True))
    return equalizer, worst


def test_residual_block(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)

    def values(count: int, scale: float = 1.0) -> str:
        return "{" + ", ".join(f"{v:.4f}" for v in rng.standard_normal(count) * scale) + "}"

    text = f"""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[1, 4, 5, 5] x) => (float[1, 2, 5, 5] y)
      <float[4, 4, 1, 1] w1 = {values(16)}, float[4] b1 = {values(4)}, float[4, 4, 1, 1] w2 = {values(16, 10.0)},
       float[2, 4, 1, 1] w3 = {values(8)}> {{
        a = Conv (x, w1, b1)
        b = Conv (a, w2)
        s = Add (a, b)
        y = Conv (s, w3)
    }}"""
    model = frontend.load(save_model(parse_model(text), tmp_path / "block.onnx"))
    feeds = [{"x": rng.standard_normal((1, 4, 5, 5)).astype(np.float32)} for _ in range(3)]
    equalizer, worst = equalize_and_compare(model, feeds)
    # a, b and s share one stream: w1 writes it, w2 reads and writes it, w3 reads it.
    assert sorted(map(sorted, equalizer.streams)) == [["a", "b", "s"]]
    assert worst < 1e-5  # float32 round-off of rescaled weights


def test_efficientnet_exact(efficientnet: Path) -> None:
    import zoo

    model = frontend.load(efficientnet)
    feeds = [{"input": image[None]} for image in zoo.photo_crops(4, seed=5)]
    equalizer, worst = equalize_and_compare(model, feeds)
    assert len(equalizer.streams) >= 5
    # Dozens of rescaled layers in float32: relative error at round-off level.
    assert worst < 1e-4
