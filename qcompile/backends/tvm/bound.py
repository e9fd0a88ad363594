"""Hand-written TVM kernels: compiling a module of them (a kernel bound to a layer's arguments is
:class:`qcompile.runtime.bound.BoundKernel`)."""

from __future__ import annotations

from typing import Any

from qcompile.errors import BackendError, first_line


def compile_kernels(functions: dict[str, Any], tvm_target: dict[str, Any], what: str) -> Any:
    """``tvm.compile`` of the PrimFuncs ``functions`` (name -> function) for ``tvm_target``; a failure is a
    BackendError naming ``what`` was being built."""
    import tvm

    try:
        return tvm.compile(tvm.IRModule(functions), target=tvm.target.Target(tvm_target))
    except Exception as error:  # TVM raises its own error types and plain Python errors alike
        raise BackendError(f"TVM could not build {what}: {first_line(error)}") from error
