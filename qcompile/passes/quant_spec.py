"""Quantization decisions as data: a frozen, self-validating :class:`QuantSpec`.

A spec is attached to a value (``value.meta[SPEC_KEY]``); the generic QDQ pass turns annotations into
graph changes. Affine quantization: ``q = clamp(round(x / scale) + zero_point, qmin, qmax)`` and
``x ~ (q - zero_point) * scale``; ``round`` is round-half-to-even, as ONNX QuantizeLinear does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

SPEC_KEY = "qcompile.quant_spec"
RANGE_KEY = "qcompile.range"
# On the Adds that sum one split layer's parts (split_layers): their inputs are accumulators of one layer,
# summed before any re-quantization, so annotation does not quantize them.
SPLIT_SUM_KEY = "qcompile.split_sum"
# On a weight GPTQ rounded: its per-channel scales (the codes it chose assume them), and the float weight
# before rounding (bias correction measures the rounding shift against it).
SCALES_KEY = "qcompile.weight_scales"
ORIGINAL_KEY = "qcompile.original_weight"
# On the MatMulInteger of a ternarized layer: the layer's name, for the LUT backend.
TERNARY_KEY = "qcompile.ternary"
# The smallest scale we emit; a constant-zero tensor would otherwise get scale 0 (a division by zero).
MIN_SCALE = 1e-8


SCALE_RULES = ("max", "absmean", "mse")
CLIP_RATIOS = np.linspace(1.0, 0.5, 26)


@dataclass(frozen=True)
class QuantSpec:
    """How one value is quantized.

    Attributes:
        bits: integer width, 2..16.
        signed: int (True) or uint (False) storage.
        symmetric: zero point fixed at 0 (True) or fitted to the range (False).
        axis: per-channel axis, or None for one scale per tensor.
        group_size: channels along ``axis`` share a scale in groups of this many (None: each its own).
        block_size: for 2-D weights, each output channel has one scale per block of this many consecutive
            input channels (group-wise quantization, as GGUF and AWQ store 4-bit weights); None: one scale
            per output channel. Scales then have shape ``[outputs, inputs / block_size]``.
        scale_rule: weight scales from the largest magnitude ('max': nothing clips), from the mean
            magnitude ('absmean', as BitNet b1.58 scales ternary weights: 2-bit symmetric codes -1, 0, 1), or
            'mse': per channel, the clipping of the largest magnitude (ratios 1.0 down to 0.5) that minimises
            the squared rounding error (at 4 bits, the step saved on the bulk outweighs the clipped tail).
        full_range: with ``symmetric``, keep the most negative code too (two's complement, zero point 0):
            2-bit codes -2, -1, 0, 1 instead of -1, 0, 1. The grid is then lopsided; 'max' and 'mse' scales
            cover each channel's positive side with ``qmax`` steps and its negative side with ``-qmin``.
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    axis: int | None = None
    group_size: int | None = None
    scale_rule: str = "max"
    block_size: int | None = None
    full_range: bool = False

    def __post_init__(self) -> None:
        if self.scale_rule not in SCALE_RULES:
            raise ValueError(f"QuantSpec scale_rule must be one of {SCALE_RULES}, got {self.scale_rule!r}")
        if not 2 <= self.bits <= 16:
            raise ValueError(f"QuantSpec bits must be in 2..16, got {self.bits}")
        if self.group_size is not None and (self.axis is None or self.group_size < 1):
            raise ValueError("QuantSpec group_size needs an axis and must be >= 1")
        if self.block_size is not None and (self.axis is None or self.block_size < 1):
            raise ValueError("QuantSpec block_size needs an axis and must be >= 1")
        if self.symmetric and not self.signed:
            raise ValueError("a symmetric QuantSpec must be signed (zero point 0 in the middle of the range)")
        if self.full_range and not self.symmetric:
            raise ValueError("full_range is for symmetric (zero point 0) specs")

    @property
    def qmin(self) -> int:
        # Symmetric signed ranges drop the most negative code, so that -qmax..qmax is balanced.
        if self.signed:
            return -(2 ** (self.bits - 1)) + (1 if self.symmetric and not self.full_range else 0)
        return 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin + 1

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
        """Symmetric scales for ``weight``: one per channel along ``axis`` (or one for the tensor), or one per
        channel and input block (``block_size``): ``[outputs, blocks]``."""
        if self.block_size is not None:
            rows = self.blocks(weight)
            flat = dataclasses.replace(self, axis=0, group_size=None, block_size=None).weight_scales(rows)
            return on_scale_grid(flat.reshape(weight.shape[self.axis], -1))  # type: ignore[index]
        channels = 1 if self.axis is None else weight.shape[self.axis]
        moved = weight.reshape(1, -1) if self.axis is None else np.moveaxis(weight, self.axis, 0)
        moved = moved.reshape(channels, -1)
        if self.scale_rule == "absmean":
            scales = np.abs(moved).mean(axis=1)
        elif self.scale_rule == "mse":
            scales = _mse_scales(moved.astype(np.float32), self.qmin, self.qmax)
        else:
            scales = _covering_scales(moved, self.qmin, self.qmax)
        scales = scales.astype(np.float32).clip(MIN_SCALE)
        return scales.reshape(()) if self.axis is None else scales

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

    def blocked(self, shape: tuple[int, ...]) -> bool:
        """Whether a weight of ``shape`` takes block scales (2-D, inputs a multiple of ``block_size``)."""
        return self.block_size is not None and len(shape) == 2 and shape[1 - self.axis] % self.block_size == 0  # type: ignore[operator]

    def blocks(self, weight: np.ndarray) -> np.ndarray:
        """``weight`` as rows of one block each: ``[outputs * blocks, block_size]`` (output-major)."""
        if not self.blocked(weight.shape):
            raise ValueError(f"weight of shape {weight.shape} cannot take blocks of {self.block_size} inputs")
        return np.moveaxis(weight, self.axis, 0).reshape(-1, self.block_size)  # type: ignore[arg-type]

    def expand_scales(self, scales: np.ndarray) -> np.ndarray:
        """Block scales ``[outputs, blocks]`` spread to one scale per element of the weight."""
        full = np.repeat(scales, self.block_size or 1, axis=1)  # [outputs, inputs]
        return np.moveaxis(full, 0, self.axis)  # type: ignore[arg-type]

    def _broadcast(self, values: np.ndarray, ndim: int) -> np.ndarray:
        if self.block_size is not None and values.ndim == 2 and ndim == 2:
            return self.expand_scales(values)
        if values.ndim == 0 or self.axis is None:
            return values
        shape = [1] * ndim
        shape[self.axis] = -1
        return values.reshape(shape)


# Block scales are stored as 8-bit codes on a logarithmic grid below their row's largest: ``scale = peak *
# SCALE_TABLE[code]``, 16 steps per octave (a scale moves by at most 2.2 %), 256 codes (down to peak / 60000).
# A block of 32 int4 weights then takes 17 bytes (GGUF's Q4_0: 18 with its float16 scale); a file computes the
# scales back with a Gather of the table and a Mul by the peaks, which onnxruntime folds when it loads it.
SCALE_STEPS_PER_OCTAVE = 16
SCALE_TABLE = np.exp2(-np.arange(256, dtype=np.float64) / SCALE_STEPS_PER_OCTAVE).astype(np.float32)


def scale_codes(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Block scales ``[rows, blocks]`` (positive) -> (uint8 codes ``[rows, blocks]``, float32 row peaks
    ``[rows, 1]``) of the nearest grid scales."""
    peaks = scales.max(axis=1, keepdims=True).astype(np.float32)
    steps = -SCALE_STEPS_PER_OCTAVE * np.log2(scales.astype(np.float64) / peaks)
    return np.clip(np.rint(steps), 0, len(SCALE_TABLE) - 1).astype(np.uint8), peaks


def on_scale_grid(scales: np.ndarray) -> np.ndarray:
    """Block scales ``[rows, blocks]`` moved to the stored grid (:data:`SCALE_TABLE`): what the file holds
    exactly, so codes are rounded with the scales it gives back."""
    codes, peaks = scale_codes(scales)
    return (SCALE_TABLE[codes] * peaks).astype(np.float32)


def _covering(rows: np.ndarray, qmin: int, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``rows`` ``[channels, values]``: the side that needs the larger scale to clip nothing, as
    its magnitude and its number of steps (``qmax`` for the positive side, ``-qmin`` for the negative; the
    largest magnitude and ``qmax`` when the grid is balanced)."""
    high, low = rows.max(axis=1, initial=0.0), -rows.min(axis=1, initial=0.0)
    negative = low * qmax > high * -qmin
    return np.where(negative, low, high), np.where(negative, -qmin, qmax)


def _covering_scales(rows: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """The least scale per row that clips nothing."""
    peak, steps = _covering(rows, qmin, qmax)
    return peak / steps


def _mse_scales(rows: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Per row of ``rows`` ``[channels, values]``: the scale ``ratio x`` the covering scale (ratio in
    :data:`CLIP_RATIOS`) with the least squared rounding error, clipping included."""
    peak, steps = (part[:, None] for part in _covering(rows, qmin, qmax))
    best_error = np.full(len(rows), np.inf)
    best = peak[:, 0] / steps[:, 0]
    for ratio in CLIP_RATIOS:
        scale = np.maximum(peak * ratio / steps, MIN_SCALE)
        error = ((np.clip(np.rint(rows / scale), qmin, qmax) * scale - rows) ** 2).sum(axis=1)
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best = np.where(better, scale[:, 0], best)
    return best


WEIGHT_INT8_PER_CHANNEL = QuantSpec(bits=8, signed=True, symmetric=True, axis=0)
# Weight formats the bit-width search chooses between, as specs without an axis (annotation sets it).
WEIGHT_FORMATS = {
    "int8": QuantSpec(bits=8),
    "int4": QuantSpec(bits=4, scale_rule="mse"),
    "ternary": QuantSpec(bits=2, scale_rule="absmean"),
    # Two's-complement 2-bit codes -2, -1, 0, 1 (zero point 0) with an MSE-fitted scale per channel: four
    # levels where ternary has three (on all-MiniLM-L6-v2's weight matrices, relative squared weight error
    # 0.16 against ternary's 0.28).
    "int2": QuantSpec(bits=2, scale_rule="mse", full_range=True),
}
ACTIVATION_UINT8 = QuantSpec(bits=8, signed=False, symmetric=False)
# Activation formats: asymmetric per-tensor unsigned codes (uint4 codes are stored in uint8 and clamped;
# uint16 codes need opset 21's QuantizeLinear).
ACTIVATION_FORMATS = {
    8: ACTIVATION_UINT8,
    4: QuantSpec(bits=4, signed=False, symmetric=False),
    16: QuantSpec(bits=16, signed=False, symmetric=False),
}
