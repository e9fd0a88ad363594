"""Streaming activation statistics over a calibration set."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from tqdm import tqdm

from qcompile import execution
from qcompile.calibration.data import Feed, InputSpec, Preprocess, checked, from_folder, split_batch
from qcompile.calibration.observers import MinMaxObserver, make_observer, observed_range
from qcompile.errors import CalibrationError

logger = logging.getLogger(__name__)


@dataclass
class Statistics:
    """What calibration learned about each observed value."""

    observers: dict[str, MinMaxObserver]
    samples: int
    method: str

    def range(self, name: str, levels: int = 256) -> tuple[float, float]:
        """The calibrated range of ``name`` for quantization to ``levels`` codes (the MSE range depends on it)."""
        return observed_range(self.observers[name], self.method, levels=levels)

    def channel_mean(self, name: str) -> np.ndarray | None:
        return self.observers[name].channel_mean()

    def channel_absmax(self, name: str) -> np.ndarray | None:
        observer = self.observers.get(name)
        return None if observer is None else observer.channel_absmax


def input_specs(model: ir.Model) -> list[InputSpec]:
    specs = []
    for value in model.graph.inputs:
        assert value.shape is not None and value.dtype is not None, "frontend guarantees static inputs"
        specs.append(
            InputSpec(
                str(value.name),
                tuple(dim if isinstance(dim, int) else -1 for dim in value.shape),
                np.dtype(value.dtype.numpy()),
            )
        )
    return specs


def collect(
    model: ir.Model,
    feeds: Iterable[Feed],
    value_names: list[str],
    method: str = "mse",
    max_samples: int | None = None,
    progress: bool = True,
) -> Statistics:
    """Run the float model over ``feeds`` and observe ``value_names``, one sample in memory at a time."""
    if method not in ("minmax", "percentile", "mse"):
        raise CalibrationError(f"calibration method '{method}' is not one of minmax, percentile, mse")
    session = execution.session(model, extra_outputs=value_names)
    observers = {name: make_observer(method) for name in value_names}
    output_names = [output.name for output in session.get_outputs()]
    samples = 0
    stream = checked(feeds, input_specs(model))
    show = progress and sys.stderr.isatty()
    with tqdm(total=max_samples, desc="calibrating", unit="sample", disable=not show, file=sys.stderr) as bar:
        for feed in stream:
            results = dict(zip(output_names, session.run(output_names, feed), strict=True))
            for name, observer in observers.items():
                observer.update(np.asarray(results[name], dtype=np.float32))
            samples += 1
            bar.update(1)
            if max_samples is not None and samples >= max_samples:
                break
    logger.info("calibrated %d values on %d samples (%s)", len(value_names), samples, method)
    return Statistics(observers, samples, method)


__all__ = [
    "Feed",
    "InputSpec",
    "Preprocess",
    "Statistics",
    "checked",
    "collect",
    "from_folder",
    "input_specs",
    "split_batch",
]
