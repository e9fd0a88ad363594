"""A hand-written TVM kernel bound to one layer's arguments (its weights and scratch buffers, allocated once)."""

from __future__ import annotations

from typing import Any

import numpy as np

from qcompile.errors import BackendError


class BoundKernel:
    """Calls ``function(activations, *arguments)``; the output is ``arguments[output]``, reused by every call.
    Subclasses set ``rows``, ``k``, ``function``, ``arguments`` and ``output``, and name their kernel and its
    activations' dtype in ``LABEL`` and ``DTYPE``."""

    LABEL = "kernel"
    DTYPE: type = np.int8
    rows: int
    k: int
    function: Any
    arguments: list[Any]
    output: int

    def __init__(self) -> None:
        from qcompile.runtime import tvm_runtime

        tvm = tvm_runtime.load()
        self._tvm, self.device = tvm, tvm.cpu()

    def run_tensor(self, activations: Any) -> Any:
        """Run on a TVM tensor already on the device; returns the (reused) int32 output tensor."""
        self.function(activations, *self.arguments)
        return self.arguments[self.output]

    def __call__(self, activations: np.ndarray) -> np.ndarray:
        if activations.shape != (self.rows, self.k) or activations.dtype != self.DTYPE:
            raise BackendError(
                f"{self.LABEL} built for {np.dtype(self.DTYPE).name} [{self.rows}, {self.k}] activations, got "
                f"{activations.dtype} {list(activations.shape)}"
            )
        tensor = self._tvm.runtime.tensor(np.ascontiguousarray(activations), self.device)
        return self.run_tensor(tensor).numpy()
