"""The search's Hessian proxy: its second-order weight error is the exact layer-output error it claims to
be, and the search with it measures int8 only and scales the other formats."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from qcompile import frontend
from qcompile.errors import CalibrationError
from qcompile.flow.quantize import QuantizeOptions, quantize
from qcompile.passes.quant_spec import WEIGHT_FORMATS
from qcompile.search import sensitivity


@pytest.mark.parametrize("fmt", ["int8", "int4", "int2", "ternary"])
def test_hessian_weight_error_is_the_layer_output_error(fmt: str) -> None:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((16, 24))  # Gemm B with transB=0: [in, out]
    samples = rng.standard_normal((200, 16))
    node = ir.node(
        "Gemm",
        [ir.Value(name="x"), ir.Value(name="w", const_value=ir.tensor(weight.astype(np.float32)))],
        outputs=[ir.Value(name="y")],
    )
    rows = sensitivity.weight_rows(node, 1)
    assert rows is not None and rows.shape == (1, 24, 16)  # output channels x input columns
    hessian = (samples.T @ samples)[None]
    claimed = sensitivity.hessian_weight_error(rows, hessian, WEIGHT_FORMATS[fmt])
    # Round the same way by hand: the format's scale per output channel (max, absmean or MSE clipping, as the
    # proxy documents); weights as float32 in the node.
    spec = WEIGHT_FORMATS[fmt]
    exact = weight.astype(np.float32).astype(np.float64)
    scale = dataclasses.replace(spec, axis=1).weight_scales(exact).astype(np.float64)  # per output column
    rounded = np.clip(np.rint(exact / scale), spec.qmin, spec.qmax) * scale
    actual = float(np.sum((samples @ rounded - samples @ exact) ** 2))
    assert claimed == pytest.approx(actual, rel=1e-9)  # the same quantity, summed in another order


def test_search_with_the_proxy_measures_only_int8_weights(
    digits: tuple[Path, float], digits_calibration: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(CalibrationError, match="measured or hessian"):
        QuantizeOptions(bits="auto", size_budget_mb=1.0, sensitivity="fisher")
    model = frontend.load(digits[0])
    feeds = [{"image": np.load(path)} for path in sorted(digits_calibration.glob("*.npy"))]
    calls: list[int] = []
    original = sensitivity.measure

    def counting(layers, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(len(layers))
        return original(layers, *args, **kwargs)

    monkeypatch.setattr(sensitivity, "measure", counting)
    options = QuantizeOptions(bits="auto", size_budget_mb=0.02, sensitivity="hessian", weight_rounding="nearest")
    result = quantize(model, feeds, options, progress=False)
    assert result.search is not None
    layers = len(result.search.problem.layers)
    proxied = next(entry for entry in result.passes if entry["name"] == "bit_search")["hessian_proxied_layers"]
    # int8 and int8 read at 16 bits measured; the narrower weight formats from the ratios.
    assert proxied == layers and calls == [layers, layers, 0, 0, 0]
    for cost in result.search.problem.layers:
        assert cost.error["int8"] > 0 and cost.error["ternary"] > cost.error["int4"] > cost.error["int8"]
        assert cost.error["int2"] > cost.error["int4"]
