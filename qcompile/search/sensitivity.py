"""Per-layer sensitivity: how much quantizing one layer alone moves the model's outputs.

For each quantizable layer, a model is built in which only that layer (its weights and its activation
inputs) is quantized; its sensitivity is the relative squared error of the outputs against the float
model on the calibration samples, ``sum ||y_q - y||^2 / sum ||y||^2``. Layers above a threshold stay
float, and the reason (with the figure) goes into the manifest.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
from tqdm import tqdm

from qcompile import execution
from qcompile.calibration import Feed
from qcompile.passes.quant_spec import WEIGHT_FORMATS, QuantSpec

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
    session = execution.session(model)
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


def weight_rows(node: ir.Node, hessian_groups: int) -> np.ndarray | None:
    """The weight of a Conv / Gemm as ``[groups, output channels per group, input columns]``, matching the
    layout of its Hessian (:mod:`qcompile.passes.gptq`); None when it has no constant weight."""
    weight = node.inputs[1].const_value if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if weight is None:
        return None
    array = weight.numpy().astype(np.float64)
    if node.op_type == "Conv":
        return array.reshape(hessian_groups, array.shape[0] // hessian_groups, -1)
    trans_b = node.attributes.get("transB")
    return (array if trans_b is not None and trans_b.as_int() else array.T)[None]


def hessian_weight_error(rows: np.ndarray, hessian: np.ndarray, spec: QuantSpec) -> float:
    """``sum_g tr(dW_g H_g dW_g^T)``: the layer-output squared error that round-to-nearest weights in
    ``spec`` (one scale per output channel) add, to second order, on the samples behind ``hessian``."""
    flat = rows.reshape(-1, rows.shape[2])
    per_row = dataclasses.replace(spec, axis=0, group_size=None, block_size=None)
    scales = per_row.weight_scales(flat).astype(np.float64)
    rounded = np.clip(np.rint(flat / scales[:, None]), spec.qmin, spec.qmax) * scales[:, None]
    delta = (rounded - flat).reshape(rows.shape)
    return float((np.matmul(delta, hessian) * delta).sum())


def hessian_ratios(
    layers: dict[str, ir.Node], hessians: dict[str, Any], formats: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Per layer, each format's second-order weight error relative to int8's, for the layers with a
    Hessian (those GPTQ supports); the bit-width search's cheaper proxy scales a layer's measured int8
    sensitivity by these ratios instead of measuring every format."""
    ratios: dict[str, dict[str, float]] = {}
    for name, node in layers.items():
        entry = hessians.get(name)
        rows = weight_rows(node, entry.matrix.shape[0]) if entry is not None else None
        if entry is None or rows is None or rows.shape[2] != entry.matrix.shape[1]:
            continue
        errors = {fmt: hessian_weight_error(rows, entry.matrix, WEIGHT_FORMATS[fmt]) for fmt in ("int8", *formats)}
        if errors["int8"] > 0:
            ratios[name] = {fmt: errors[fmt] / errors["int8"] for fmt in formats}
    return ratios
