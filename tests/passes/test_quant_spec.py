"""QuantSpec validates itself and computes affine parameters that keep zero exact."""

from __future__ import annotations

import numpy as np
import pytest

from qcompile.passes.quant_spec import ACTIVATION_UINT8, QuantSpec


def test_validation() -> None:
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=1)
    with pytest.raises(ValueError, match="group_size needs an axis"):
        QuantSpec(group_size=32)
    with pytest.raises(ValueError, match="symmetric"):
        QuantSpec(signed=False, symmetric=True)


def test_ranges_and_round_trip() -> None:
    spec = QuantSpec(bits=8, axis=0)
    assert (spec.qmin, spec.qmax) == (-127, 127)
    assert (ACTIVATION_UINT8.qmin, ACTIVATION_UINT8.qmax) == (0, 255)
    weight = np.random.default_rng(0).standard_normal((4, 9)).astype(np.float32)
    scales = spec.weight_scales(weight)
    restored = spec.dequantize(spec.quantize(weight, scales), scales)
    # Round to nearest: every weight within half a step of its channel's scale.
    assert np.all(np.abs(restored - weight) <= scales[:, None] / 2 + 1e-7)


def test_activation_params_keep_zero_exact() -> None:
    scale, zero_point = ACTIVATION_UINT8.params_from_range(-1.3, 5.1)
    assert zero_point.dtype == np.uint8
    codes = ACTIVATION_UINT8.quantize(np.array([0.0, -1.3, 5.1], np.float32), scale, zero_point)
    assert ACTIVATION_UINT8.dequantize(codes, scale, zero_point)[0] == 0.0
    assert codes[1] == 0 and codes[2] == 255


def test_quantize_options_are_validated() -> None:
    from qcompile.errors import CalibrationError
    from qcompile.flow.quantize import QuantizeOptions

    with pytest.raises(CalibrationError, match="weight blocks must hold >= 2 inputs"):
        QuantizeOptions(weight_block=1)
    with pytest.raises(CalibrationError, match="cannot be combined with --bits auto"):
        QuantizeOptions(weight_block=32, bits="auto", size_budget_mb=1.0)
    with pytest.raises(CalibrationError, match="activation bits 6"):
        QuantizeOptions(activation_bits=6)
    with pytest.raises(CalibrationError, match="int8 activations only"):
        QuantizeOptions(activation_bits=4, bits="auto", size_budget_mb=1.0)
    with pytest.raises(CalibrationError, match="bias correction 'empirical' is not one of sequential, expected, none"):
        QuantizeOptions(bias_correction="empirical")
    with pytest.raises(CalibrationError, match=r"bias samples \(--bias-samples\) must be at least 1, got 0"):
        QuantizeOptions(bias_samples=0)
    with pytest.raises(ValueError, match="block_size needs an axis"):
        QuantSpec(bits=4, block_size=32)
    assert QuantizeOptions(bits="4", weight_block=32, activation_bits=4).weight_block == 32
