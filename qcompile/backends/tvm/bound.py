"""Hand-written TVM kernels: compiling a module of them, and one kernel bound to a layer's arguments."""

from __future__ import annotations

from typing import Any

import numpy as np

from qcompile.errors import BackendError, first_line


def compile_kernels(functions: dict[str, Any], tvm_target: dict[str, Any], what: str) -> Any:
    """``tvm.compile`` of the PrimFuncs ``functions`` (name -> function) for ``tvm_target``; a failure is a
    BackendError naming ``what`` was being built."""
    import tvm

    try:
        return tvm.compile(tvm.IRModule(functions), target=tvm.target.Target(tvm_target))
    except Exception as error:  # TVM raises its own error types and plain Python errors alike
        raise BackendError(f"TVM could not build {what}: {first_line(error)}") from error


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
        import tvm

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
