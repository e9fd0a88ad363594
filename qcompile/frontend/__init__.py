"""ONNX in: safe loading, checking, opset normalization and shape inference."""

from __future__ import annotations

import os

import onnx_ir as ir

from qcompile.frontend.loader import load_model
from qcompile.frontend.normalize import CANONICAL_OPSET, normalize, parse_input_shapes


def load(path: str | os.PathLike[str], input_shapes: dict[str, tuple[int, ...]] | None = None) -> ir.Model:
    """Load, check and normalize the model at ``path``: the frontend's one entry point."""
    model = load_model(path)
    return normalize(model, input_shapes, name=os.path.basename(os.fspath(path)))


__all__ = ["CANONICAL_OPSET", "load", "load_model", "normalize", "parse_input_shapes"]
