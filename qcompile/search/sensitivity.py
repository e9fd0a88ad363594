"""Per-layer sensitivity: how much quantizing one layer alone moves the model's outputs.

For each quantizable layer, a model is built in which only that layer (its weights and its activation
inputs) is quantized; its sensitivity is the relative squared error of the outputs against the float
model on the calibration samples, ``sum ||y_q - y||^2 / sum ||y||^2``. Layers above a threshold stay
float, and the reason (with the figure) goes into the manifest.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from tqdm import tqdm

from qcompile.backends import ort as ort_backend
from qcompile.calibration import Feed

logger = logging.getLogger(__name__)


def relative_error(outputs: Sequence[np.ndarray], references: Sequence[np.ndarray]) -> float:
    """``sum ||y_q - y||^2 / sum ||y||^2`` over every output of every sample."""
    numerator = sum(
        float(np.sum((np.asarray(out, np.float64) - ref) ** 2)) for out, ref in zip(outputs, references, strict=True)
    )
    denominator = sum(float(np.sum(np.asarray(ref, np.float64) ** 2)) for ref in references)
    return numerator / max(denominator, 1e-30)


def run_all(model: ir.Model, feeds: Sequence[Feed]) -> list[np.ndarray]:
    """Every output of ``model`` for every feed, flattened into one list (sample-major)."""
    session = ort_backend.session(model)
    outputs: list[np.ndarray] = []
    for feed in feeds:
        outputs.extend(np.asarray(value) for value in session.run(None, feed))
    return outputs


@dataclass(frozen=True)
class LayerSensitivity:
    layer: str
    op_type: str
    error: float


def measure(
    layers: Sequence[str],
    op_types: Sequence[str],
    build: Callable[[str], ir.Model],
    feeds: Sequence[Feed],
    references: Sequence[np.ndarray],
    progress: bool = True,
) -> list[LayerSensitivity]:
    """Sensitivity of each layer; ``build(layer)`` returns a model with only ``layer`` quantized."""
    results = []
    show = progress and sys.stderr.isatty()
    for layer, op_type in tqdm(
        list(zip(layers, op_types, strict=True)), desc="sensitivity", unit="layer", disable=not show, file=sys.stderr
    ):
        error = relative_error(run_all(build(layer), feeds), references)
        results.append(LayerSensitivity(layer, op_type, error))
    return results
