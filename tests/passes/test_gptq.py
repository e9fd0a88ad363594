"""GPTQ lowers the layer-output error of int8 weights, stays on the grid, and falls back when it would overfit."""

from __future__ import annotations

import numpy as np

from qcompile.passes.gptq import Hessian, gptq_round, validated_round


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
    rounded = gptq_round(weight, hessian, scales, 127)
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
    rounded, share = validated_round(weight, hessian, scales, 127)
    nearest = np.clip(np.rint(weight / scales[:, :, None]), -127, 127) * scales[:, :, None]
    kept = np.all(np.isclose(rounded, nearest), axis=2)[0]
    assert share == 1.0 - kept.mean()
