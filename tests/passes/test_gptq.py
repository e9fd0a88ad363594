"""GPTQ lowers the layer-output error of int8 weights, stays on the grid, and falls back when it would overfit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import parse_model, save_model

from qcompile import frontend
from qcompile.passes.annotate import quantizable_layers
from qcompile.passes.gptq import Hessian, HessianCollector, gptq_round, validated_round

DEPTHWISE = """
<ir_version: 8, opset_import: ["" : 18]>
g (float[1, 2, 5, 5] x) => (float[1, 2, 3, 3] y)
  <float[2, 1, 3, 3] w = {w}> {{
    y = Conv <group: int = 2, strides: ints = [2, 2], pads: ints = [1, 1, 1, 1]> (x, w)
}}
"""


def correlated_inputs(rows: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((cols, cols)) / np.sqrt(cols)
    return rng.standard_normal((rows, cols)) @ mixing + rng.standard_normal(cols)


def output_error(weight: np.ndarray, rounded: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum((x @ (rounded - weight)[0].T) ** 2))


def test_gptq_beats_nearest_and_stays_on_grid() -> None:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((1, 16, 32))
    scales = np.abs(weight).max(axis=2) / 127
    x = correlated_inputs(2000, 32, 1)
    hessian = (x.T @ x)[None]
    rounded = gptq_round(weight, hessian, scales, (-127, 127))
    nearest = np.clip(np.rint(weight / scales[:, :, None]), -127, 127) * scales[:, :, None]
    codes = rounded / scales[:, :, None]
    np.testing.assert_allclose(codes, np.rint(codes), atol=1e-9)
    assert np.abs(codes).max() <= 127 + 1e-9
    held_out = correlated_inputs(2000, 32, 1)[::-1]
    assert output_error(weight, rounded, held_out) < 0.5 * output_error(weight, nearest, held_out)


def test_validated_round_falls_back_on_degenerate_rows() -> None:
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((1, 4, 8))
    scales = np.abs(weight).max(axis=2) / 127
    # Even and odd samples see unrelated inputs: nothing GPTQ learns on one half transfers.
    even = correlated_inputs(8, 8, 3)
    odd = correlated_inputs(8, 8, 4)
    hessian = Hessian((even.T @ even + odd.T @ odd)[None], (even.T @ even)[None], (odd.T @ odd)[None], 16)
    rounded, share = validated_round(weight, hessian, scales, (-127, 127))
    nearest = np.clip(np.rint(weight / scales[:, :, None]), -127, 127) * scales[:, :, None]
    kept = np.all(np.isclose(rounded, nearest), axis=2)[0]
    assert share == 1.0 - kept.mean()


def test_collector_streams_and_matches_direct_patches(tmp_path: Path) -> None:
    weights = "{" + ", ".join(["0.1"] * 18) + "}"
    model = frontend.load(save_model(parse_model(DEPTHWISE.format(w=weights)), tmp_path / "dw.onnx"))
    rng = np.random.default_rng(5)
    feeds = [{"x": rng.standard_normal((1, 2, 5, 5)).astype(np.float32)} for _ in range(3)]
    collector = HessianCollector(model, quantizable_layers(model))
    passed = list(collector.tap(iter(feeds)))
    assert passed == feeds and collector.samples == 3
    (entry,) = collector.hessians.values()

    def patches(x: np.ndarray, group: int) -> np.ndarray:
        padded = np.pad(x[0, group].astype(np.float64), 1)
        return np.array([padded[i : i + 3, j : j + 3].ravel() for i in range(0, 5, 2) for j in range(0, 5, 2)])

    # Each sample's products are summed in float32: every entry within 1e-6 of the matrix's largest (an
    # off-diagonal entry that cancels can be off by more than 1e-6 of itself).
    for group in range(2):
        rows = [patches(feed["x"], group) for feed in feeds]
        moments = [r.T @ r for r in rows]
        for found, expected in [
            (entry.matrix[group], sum(moments)),
            (entry.even[group], moments[0] + moments[2]),
            (entry.odd[group], moments[1]),
        ]:
            np.testing.assert_allclose(found, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())
    assert entry.rows == 3 * 9


def test_act_order_keeps_the_grid_and_lowers_the_error() -> None:
    """Act-order (columns by decreasing H_ii) is a permutation of the same problem: the result stays on the
    4-bit grid of the fixed scales, and on inputs whose activity varies by column it lowers tr(E H E^T)
    against the natural order (and both against round-to-nearest)."""
    from qcompile.passes.gptq import gptq_round

    rng = np.random.default_rng(4)
    cols, out = 48, 24
    activity = np.exp(rng.uniform(-2, 2, cols))  # some inputs far more active than others
    rows = rng.standard_normal((4000, cols)) * activity + rng.standard_normal((4000, 1))
    hessian = (rows.T @ rows / len(rows))[None]
    weight = rng.standard_normal((1, out, cols))
    scales = np.abs(weight).max(axis=2) / 7
    costs = {}
    for label, rounded in {
        "nearest": np.clip(np.rint(weight / scales[:, :, None]), -7, 7) * scales[:, :, None],
        "natural": gptq_round(weight, hessian, scales, (-7, 7)),
        "act_order": gptq_round(weight, hessian, scales, (-7, 7), act_order=True),
    }.items():
        codes = rounded / scales[:, :, None]
        np.testing.assert_allclose(codes, np.rint(codes), atol=1e-9)
        assert np.abs(np.rint(codes)).max() <= 7
        error = rounded - weight
        costs[label] = float(np.einsum("goi,gij,goj->", error, hessian, error))
    assert costs["act_order"] < costs["natural"] < costs["nearest"]
