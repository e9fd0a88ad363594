"""Streaming activation observers: they see one batch at a time and keep a fixed-size summary.

Collecting statistics (``update``) is separate from turning them into a range (``compute_range``), as in
torch.ao's observers. Every observer's memory is bounded independently of the number of samples:
min/max and a per-channel mean are O(channels); the histogram has a fixed number of bins and grows its
range by merging bins, never by keeping samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

HISTOGRAM_BINS = 2048
HISTOGRAM_LIMIT = 1e30
MIN_SPAN = 1e-8


@dataclass
class MinMaxObserver:
    """Running minimum and maximum, and per-channel mean and max |x| along ``channel_axis``.

    The channel mean feeds bias correction; the channel max |x| feeds residual-stream equalization.
    """

    channel_axis: int = 1
    minimum: float = math.inf
    maximum: float = -math.inf
    channel_sum: np.ndarray | None = None
    channel_count: int = 0
    channel_absmax: np.ndarray | None = None

    def update(self, batch: np.ndarray) -> None:
        if batch.size:
            self._observe(batch)

    def _observe(self, batch: np.ndarray) -> tuple[float, float]:
        """Fold a non-empty ``batch`` in; returns its least and greatest values."""
        if batch.ndim >= 2:
            axes = tuple(axis for axis in range(batch.ndim) if axis != self.channel_axis % batch.ndim)
            sums = batch.sum(axis=axes, dtype=np.float64)
            # per channel first, then over channels: each value is read twice, not four times (no |x| copy)
            lows, highs = batch.min(axis=axes), batch.max(axis=axes)
            low, high = float(lows.min()), float(highs.max())
            absmax = np.maximum(np.abs(highs), np.abs(lows))  # max |x| is at the least or the greatest x
            self.channel_absmax = absmax if self.channel_absmax is None else np.maximum(self.channel_absmax, absmax)
            self.channel_sum = sums if self.channel_sum is None else self.channel_sum + sums
            self.channel_count += batch.size // batch.shape[self.channel_axis]
        else:
            low, high = float(batch.min()), float(batch.max())
        self.minimum = min(self.minimum, low)
        self.maximum = max(self.maximum, high)
        return low, high

    @property
    def seen(self) -> bool:
        return self.maximum >= self.minimum

    def channel_mean(self) -> np.ndarray | None:
        if self.channel_sum is None or self.channel_count == 0:
            return None
        return (self.channel_sum / self.channel_count).astype(np.float32)

    def compute_range(self) -> tuple[float, float]:
        return self.minimum, self.maximum


def _bin_counts(batch: np.ndarray, low: float, high: float, bins: int) -> np.ndarray:
    """How many of ``batch``'s values fall in each of ``bins`` equal bins over ``[low, high]`` (every value is
    inside). ``np.histogram`` gives the same counts except for values within float32 rounding of an edge, which
    may land in the neighbouring bin here; it is 2.4x slower (7.7 ms against 3.2 ms on 1.2M values measured
    here: it checks each value against the edges), and EfficientNet-Lite0's calibration bins 1920 batches."""
    index = ((batch.ravel() - np.float32(low)) * np.float32(bins / (high - low))).astype(np.intp)
    np.clip(index, 0, bins - 1, out=index)
    return np.bincount(index, minlength=bins)


@dataclass
class HistogramObserver(MinMaxObserver):
    """Min/max plus a fixed-bin histogram of values, for percentile and MSE-optimal clipping.

    The histogram spans ``[low, high]``; when a batch falls outside, the span doubles (about zero) until
    it fits and pairs of old bins are merged, so the bin count never changes.
    """

    bins: int = HISTOGRAM_BINS
    counts: np.ndarray = field(default_factory=lambda: np.zeros(HISTOGRAM_BINS, dtype=np.float64))
    low: float = 0.0
    high: float = 0.0
    histogram_valid: bool = True

    def update(self, batch: np.ndarray) -> None:
        if batch.size == 0:
            return
        batch_low, batch_high = self._observe(batch)
        if not np.isfinite([batch_low, batch_high]).all() or max(-batch_low, batch_high) > HISTOGRAM_LIMIT:
            # Masking values (-inf, float32 min) cannot be binned; such a value keeps min/max only.
            self.histogram_valid = False
        if not self.histogram_valid:
            return
        if self.high <= self.low:
            self.low, self.high = min(batch_low, 0.0), max(batch_high, 0.0)
            # A first batch of zeros, or of subnormal values (an untrained BatchNorm's 1e-42 activations),
            # spans too little for 2048 distinct float32 bin edges; any span below this quantizes alike
            # (scales bottom out at quant_spec.MIN_SCALE).
            self.high = max(self.high, self.low + MIN_SPAN)
        while batch_low < self.low or batch_high > self.high:
            self._double_span(batch_low < self.low, batch_high > self.high)
        self.counts += _bin_counts(batch, self.low, self.high, self.bins)

    def _double_span(self, grow_low: bool, grow_high: bool) -> None:
        # Double the span while keeping old bin edges on new bin edges: each new bin covers two old ones.
        # The old span goes where the new one grows toward the data: both sides (and always when zero is
        # strictly inside), only up, or only down. A span starting at 0 that meets negative values grows
        # down (it used to grow up forever: a hang on outputs that are all zeros in the first batch).
        width = self.high - self.low
        merged = self.counts.reshape(-1, 2).sum(axis=1)
        if (grow_low and grow_high) or (self.low < 0.0 < self.high):
            new_low, new_high = self.low - width / 2, self.high + width / 2
            start = self.bins // 4
        elif grow_high:
            new_low, new_high = self.low, self.high + width
            start = 0
        else:
            new_low, new_high = self.low - width, self.high
            start = self.bins // 2
        self.counts = np.zeros(self.bins, dtype=np.float64)
        self.counts[start : start + self.bins // 2] = merged
        self.low, self.high = new_low, new_high

    def _edges(self) -> np.ndarray:
        return np.linspace(self.low, self.high, self.bins + 1)

    def percentile_range(self, percentile: float) -> tuple[float, float]:
        """Clip the lowest and highest ``(100 - percentile) / 2`` % of the values seen."""
        total = self.counts.sum()
        if total == 0:
            return self.compute_range()
        cumulative = np.cumsum(self.counts) / total
        tail = (100.0 - percentile) / 200.0
        edges = self._edges()
        low_index = int(np.searchsorted(cumulative, tail, side="left"))
        high_index = int(np.searchsorted(cumulative, 1.0 - tail, side="left"))
        low = max(float(edges[low_index]), self.minimum) if self.minimum < 0 else self.minimum
        high = min(float(edges[min(high_index + 1, self.bins)]), self.maximum)
        return min(low, 0.0), max(high, 0.0)

    def mse_range(self, levels: int = 256) -> tuple[float, float]:
        """The clipping range that minimizes the expected squared error of ``levels``-level quantization.

        Candidates shrink the min/max range in 64 steps; each is scored on the histogram's bin centres:
        clipped values cost their squared distance to the range, kept ones ``step**2 / 12``.
        """
        total = self.counts.sum()
        if total == 0:
            return self.compute_range()
        edges = self._edges()
        centres = (edges[:-1] + edges[1:]) / 2
        full_low, full_high = min(self.minimum, 0.0), max(self.maximum, 0.0)
        best, best_error = (full_low, full_high), math.inf
        for fraction in np.linspace(1.0, 0.2, 64):
            low, high = full_low * fraction, full_high * fraction
            step = (high - low) / (levels - 1)
            if step <= 0:
                continue
            clipped = np.clip(centres, low, high)
            error = float(np.sum(self.counts * ((centres - clipped) ** 2 + step**2 / 12)))
            if error < best_error:
                best, best_error = (low, high), error
        return best


def make_observer(method: str) -> MinMaxObserver:
    return MinMaxObserver() if method == "minmax" else HistogramObserver()


def observed_range(
    observer: MinMaxObserver, method: str, percentile: float = 99.99, levels: int = 256
) -> tuple[float, float]:
    """The range ``method`` ('minmax', 'percentile' or 'mse') chooses from an observer's statistics; the MSE
    range is optimal for quantization to ``levels`` codes."""
    if method == "minmax" or not isinstance(observer, HistogramObserver) or not observer.histogram_valid:
        return observer.compute_range()
    if method == "percentile":
        return observer.percentile_range(percentile)
    if method == "mse":
        return observer.mse_range(levels)
    raise ValueError(f"unknown calibration method '{method}' (minmax, percentile, mse)")
