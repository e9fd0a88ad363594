"""Quantization decisions as data: a frozen, self-validating :class:`QuantSpec`.

A spec is attached to a value (``value.meta[SPEC_KEY]``); the generic QDQ pass turns annotations into
graph changes. Affine quantization: ``q = clamp(round(x / scale) + zero_point, qmin, qmax)`` and
``x ~ (q - zero_point) * scale``; ``round`` is round-half-to-even, as ONNX QuantizeLinear does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPEC_KEY = "qcompile.quant_spec"
RANGE_KEY = "qcompile.range"
# The smallest scale we emit; a constant-zero tensor would otherwise get scale 0 (a division by zero).
MIN_SCALE = 1e-8


@dataclass(frozen=True)
class QuantSpec:
    """How one value is quantized.

    Attributes:
        bits: integer width, 2..16.
        signed: int (True) or uint (False) storage.
        symmetric: zero point fixed at 0 (True) or fitted to the range (False).
        axis: per-channel axis, or None for one scale per tensor.
        group_size: channels along ``axis`` share a scale in groups of this many (None: each its own).
        scale_rule: weight scales from the largest magnitude ('max': nothing clips) or from the mean
            magnitude ('absmean', as BitNet b1.58 scales ternary weights: 2-bit symmetric codes -1, 0, 1).
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    axis: int | None = None
    group_size: int | None = None
    scale_rule: str = "max"

    def __post_init__(self) -> None:
        if self.scale_rule not in ("max", "absmean"):
            raise ValueError(f"QuantSpec scale_rule must be 'max' or 'absmean', got {self.scale_rule!r}")
        if not 2 <= self.bits <= 16:
            raise ValueError(f"QuantSpec bits must be in 2..16, got {self.bits}")
        if self.group_size is not None and (self.axis is None or self.group_size < 1):
            raise ValueError("QuantSpec group_size needs an axis and must be >= 1")
        if self.symmetric and not self.signed:
            raise ValueError("a symmetric QuantSpec must be signed (zero point 0 in the middle of the range)")

    @property
    def qmin(self) -> int:
        # Symmetric signed ranges drop the most negative code, so that -qmax..qmax is balanced.
        if self.signed:
            return -(2 ** (self.bits - 1)) + (1 if self.symmetric else 0)
        return 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def storage_dtype(self) -> np.dtype:
        if self.bits <= 8:
            return np.dtype(np.int8 if self.signed else np.uint8)
        return np.dtype(np.int16 if self.signed else np.uint16)

    def params_from_range(self, low: float, high: float) -> tuple[np.float32, np.integer]:
        """Scale and zero point covering ``[low, high]`` (widened to include 0, so 0 is exact)."""
        low, high = min(float(low), 0.0), max(float(high), 0.0)
        if self.symmetric:
            scale = max(abs(low), abs(high)) / self.qmax
            zero_point = 0
        else:
            scale = (high - low) / (self.qmax - self.qmin)
            scale = max(scale, MIN_SCALE)
            zero_point = int(np.clip(round(self.qmin - low / scale), self.qmin, self.qmax))
        return np.float32(max(scale, MIN_SCALE)), self.storage_dtype.type(zero_point)

    def weight_scales(self, weight: np.ndarray) -> np.ndarray:
        """Symmetric scales for ``weight``: one per channel along ``axis`` (or one for the tensor)."""
        reduce = np.mean if self.scale_rule == "absmean" else np.max
        divisor = 1 if self.scale_rule == "absmean" else self.qmax
        if self.axis is None:
            return np.array(float(reduce(np.abs(weight))) / divisor, dtype=np.float32).clip(MIN_SCALE)
        moved = np.moveaxis(np.abs(weight), self.axis, 0).reshape(weight.shape[self.axis], -1)
        return (reduce(moved, axis=1) / divisor).astype(np.float32).clip(MIN_SCALE)

    def quantize(self, array: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | int = 0) -> np.ndarray:
        """Quantize with per-channel or per-tensor ``scale`` (broadcast along ``axis``)."""
        scale_b, zero_b = (
            self._broadcast(np.asarray(scale), array.ndim),
            self._broadcast(np.asarray(zero_point), array.ndim),
        )
        codes = np.rint(array / scale_b) + zero_b
        return np.clip(codes, self.qmin, self.qmax).astype(self.storage_dtype)

    def dequantize(self, codes: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | int = 0) -> np.ndarray:
        scale_b, zero_b = (
            self._broadcast(np.asarray(scale), codes.ndim),
            self._broadcast(np.asarray(zero_point), codes.ndim),
        )
        return ((codes.astype(np.float32) - zero_b) * scale_b).astype(np.float32)

    def _broadcast(self, values: np.ndarray, ndim: int) -> np.ndarray:
        if values.ndim == 0 or self.axis is None:
            return values
        shape = [1] * ndim
        shape[self.axis] = -1
        return values.reshape(shape)


WEIGHT_INT8_PER_CHANNEL = QuantSpec(bits=8, signed=True, symmetric=True, axis=0)
# Weight formats the bit-width search chooses between, as specs without an axis (annotation sets it).
WEIGHT_FORMATS = {
    "int8": QuantSpec(bits=8),
    "int4": QuantSpec(bits=4),
    "ternary": QuantSpec(bits=2, scale_rule="absmean"),
}
ACTIVATION_UINT8 = QuantSpec(bits=8, signed=False, symmetric=False)
# Activation formats: asymmetric per-tensor unsigned codes (uint4 codes are stored in uint8 and clamped).
ACTIVATION_FORMATS = {8: ACTIVATION_UINT8, 4: QuantSpec(bits=4, signed=False, symmetric=False)}
