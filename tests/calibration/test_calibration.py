"""Observers (bounded memory, correct ranges) and calibration data sources."""

from __future__ import annotations

import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qcompile.calibration import observers
from qcompile.calibration.data import InputSpec, Preprocess, checked, from_folder
from qcompile.calibration.observers import HISTOGRAM_BINS, HistogramObserver, MinMaxObserver
from qcompile.errors import CalibrationError

SPEC = [InputSpec("x", (1, 3, 4, 4), np.dtype(np.float32))]


def test_minmax_and_channel_mean() -> None:
    observer = MinMaxObserver()
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((1, 3, 4, 4)).astype(np.float32) for _ in range(5)]
    for batch in batches:
        observer.update(batch)
    stacked = np.concatenate(batches)
    assert observer.compute_range() == (float(stacked.min()), float(stacked.max()))
    np.testing.assert_allclose(observer.channel_mean(), stacked.mean(axis=(0, 2, 3)), rtol=1e-5)


def test_histogram_growth_keeps_counts_and_percentiles() -> None:
    observer = HistogramObserver()
    rng = np.random.default_rng(1)
    data = []
    for scale in (0.1, 1.0, 10.0):  # each batch forces the span to grow
        batch = (rng.standard_normal(20000) * scale).astype(np.float32)
        data.append(batch)
        observer.update(batch)
    values = np.concatenate(data)
    assert observer.counts.sum() == values.size and observer.counts.size == HISTOGRAM_BINS
    low, high = observer.percentile_range(99.0)
    bin_width = (observer.high - observer.low) / HISTOGRAM_BINS
    # The percentile is read off bin edges, numpy interpolates between samples: within two bins.
    assert abs(high - np.percentile(values, 99.5)) <= 2 * bin_width
    assert abs(low - np.percentile(values, 0.5)) <= 2 * bin_width


def test_bin_counts_match_numpy_histogram_up_to_edge_rounding() -> None:
    """The observer bins with one multiply per value; np.histogram checks values against the exact edges. They
    may disagree only for a value within float32 rounding of an edge: such a value moves to the next bin."""
    rng = np.random.default_rng(3)
    # inside the span, as the observer keeps it (its ends included)
    batch = np.clip(rng.standard_normal(100_000).astype(np.float32) * 3, -7.5, 7.5)
    low, high, bins = -7.5, 7.5, HISTOGRAM_BINS
    ours = observers._bin_counts(batch, low, high, bins)
    theirs, edges = np.histogram(batch, bins=bins, range=(low, high))
    assert ours.sum() == theirs.sum() == batch.size
    moved = np.flatnonzero(ours != theirs)
    near_edge = np.abs(batch[:, None] - edges[None, 1:-1].astype(np.float32)).min(axis=1) <= 4e-6 * high
    assert np.abs(ours - theirs).sum() <= 2 * near_edge.sum()  # each moved value changes two bins by one
    assert all(abs(int(ours[i]) - int(theirs[i])) <= near_edge.sum() for i in moved)


@pytest.mark.parametrize("first", [np.zeros(64), np.abs(np.linspace(0, 2, 64)), -np.abs(np.linspace(0, 2, 64))])
def test_histogram_grows_toward_either_side(first: np.ndarray) -> None:
    # A span that starts on one side of zero (an output that is all zeros, or all positive, in the first
    # batch) must grow toward later values on the other side: this used to loop forever.
    observer = HistogramObserver()
    observer.update(first.astype(np.float32))
    later = np.linspace(-40.0, 3.0, 1000, dtype=np.float32)
    observer.update(later)
    assert observer.low <= -40.0 and observer.high >= 3.0
    assert observer.counts.sum() == first.size + later.size


@pytest.mark.parametrize("first", [np.zeros(8, np.float32), np.full(8, 1e-42, np.float32)])
def test_histogram_starts_from_zeros_or_subnormal_values(first: np.ndarray) -> None:
    # An untrained BatchNorm stack drives activations to subnormal magnitudes: numpy cannot cut [0, 1e-42] into
    # 2048 distinct float32 bins ("Too many bins for data range"); the span starts at least 1e-8 wide.
    observer = HistogramObserver()
    observer.update(first)
    observer.update(np.linspace(-1.0, 2.0, 50, dtype=np.float32))
    assert observer.counts.sum() == 58 and observer.low <= -1.0 and observer.high >= 2.0


def test_mse_range_matches_laplace_optimum() -> None:
    observer = HistogramObserver()
    values = np.random.default_rng(2).laplace(0.0, 1.0, 400000).astype(np.float32)
    observer.update(values)
    low, high = observer.mse_range(levels=16)
    # For 4-bit quantization of Laplace(b=1) the MSE-optimal clip is about 5.0 b (Banner et al., ACIQ);
    # the max of 400k samples is about 12.
    assert observer.compute_range()[1] > 10.0
    assert 4.0 < high < 6.5 and -6.5 < low < -4.0, (low, high)


def test_observer_memory_is_bounded() -> None:
    observer = HistogramObserver()
    batch = np.random.default_rng(3).standard_normal((4, 64, 32, 32)).astype(np.float32)
    observer.update(batch)
    tracemalloc.start()
    for _ in range(200):
        observer.update(batch)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # 200 batches of 1 MiB each pass through; the observer keeps only its fixed-size state.
    assert peak < 8 * batch.nbytes
    assert sys.getsizeof(observer.counts) < 20 * HISTOGRAM_BINS


def test_folder_of_npy_npz_and_batches(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    np.save(tmp_path / "a.npy", rng.standard_normal((1, 3, 4, 4)).astype(np.float32))
    np.save(tmp_path / "b.npy", rng.standard_normal((3, 3, 4, 4)).astype(np.float64))  # batch of 3, float64
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((1, 3, 4, 4)))
    feeds = list(checked(from_folder(tmp_path, SPEC), SPEC))
    assert len(feeds) == 5
    assert all(feed["x"].dtype == np.float32 and feed["x"].shape == (1, 3, 4, 4) for feed in feeds)


def test_images_with_preprocessing(tmp_path: Path) -> None:
    Image.fromarray(np.full((10, 12, 3), 255, np.uint8)).save(tmp_path / "white.png")
    spec = [InputSpec("x", (1, 4, 4, 3), np.dtype(np.float32))]
    preprocess = Preprocess.from_json(
        '{"size": [4, 4], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "layout": "NHWC"}'
    )
    (feed,) = list(checked(from_folder(tmp_path, spec, preprocess), spec))
    np.testing.assert_allclose(feed["x"], 1.0)  # (1 - 0.5) / 0.5


def test_empty_and_mismatched_data(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match=r"no \.npy, \.npz or image files"):
        list(from_folder(tmp_path, SPEC))
    with pytest.raises(CalibrationError, match="no samples"):
        list(checked(iter([]), SPEC))
    with pytest.raises(CalibrationError, match=r"shape \(1, 3, 5, 5\), the model expects \(1, 3, 4, 4\)"):
        list(checked([{"x": np.zeros((1, 3, 5, 5), np.float32)}], SPEC))
    with pytest.raises(CalibrationError, match="no array for input 'x'"):
        list(checked([{"y": np.zeros((1, 3, 4, 4), np.float32)}], SPEC))
    with pytest.raises(CalibrationError, match="NaN"):
        list(checked([{"x": np.full((1, 3, 4, 4), np.nan, np.float32)}], SPEC))
