"""Helpers for tests that build small ONNX IR graphs by hand."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def constant(name: str, array: np.ndarray) -> ir.Value:
    """A constant value (int64 for integer arrays, float32 otherwise) to use as an initializer."""
    array = np.asarray(array, np.int64 if np.asarray(array).dtype.kind == "i" else np.float32)
    return ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        const_value=ir.tensor(array, name=name),
    )
