"""ONNX in: safe loading, checking, opset normalization and shape inference."""

from __future__ import annotations

import os

import numpy as np
import onnx_ir as ir

from qcompile.frontend.loader import load_model
from qcompile.frontend.normalize import CANONICAL_OPSET, normalize, parse_input_shapes, shapes_from_sample, specialize


def load(
    path: str | os.PathLike[str],
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    sample: dict[str, np.ndarray] | None = None,
) -> ir.Model:
    """Load, check and normalize the model at ``path``: the frontend's one entry point. With a calibration
    ``sample``, dynamic input dims that ``input_shapes`` does not fix are fixed from it, and value shapes
    that shape inference cannot tell are observed on it."""
    model = load_model(path)
    name = os.path.basename(os.fspath(path))
    if sample is not None:
        input_shapes, _ = shapes_from_sample(model, sample, input_shapes, name)
    return normalize(model, input_shapes, name=name, sample=sample)


__all__ = [
    "CANONICAL_OPSET",
    "load",
    "load_model",
    "normalize",
    "parse_input_shapes",
    "shapes_from_sample",
    "specialize",
]
