"""TVM for running libraries: its runtime alone where nothing in the process compiles.

``import tvm`` loads TVM's compiler library as well as its runtime (260 MB of LLVM and passes; about 370 MB
resident after the import, on a machine with SmolLM2's artifact: more than the model's int8 weights). A
process that only runs artifacts needs the runtime (3 MB): TVM loads it alone when ``TVM_USE_RUNTIME_LIB=1``
is set before its first import. :func:`load` does that when TVM is not imported yet and qcompile's compiling
side (:mod:`qcompile.backends.tvm`) is not either; compiling in that process afterwards fails with a clear
error (:func:`require_compiler`), so a program that loads artifacts and then compiles imports
``qcompile.api`` first. ``QCOMPILE_TVM=full`` always loads the whole of TVM. (TVM's FFI also imports torch
when it is installed, another 250 MB and seconds: not when the runtime loads TVM alone.)

Without the compiler there is no LLVM to name the host CPU: a library built for one CPU model is checked
against the instruction-set flags recorded when it was built (:func:`isa_flags`).
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

from qcompile.errors import BackendError
from qcompile.runtime import cpu

ENVIRONMENT = "QCOMPILE_TVM"
# /proc/cpuinfo flags naming instruction sets LLVM may emit for a CPU model (vector, matrix, bit manipulation,
# crypto): a library built with one of them needs it; flags of the machine around the CPU (a hypervisor's,
# power management) do not matter.
_ISA = re.compile(
    r"^(sse\w*|ssse3|avx\w*|amx\w*|fma\w*|f16c|bmi\d|adx|aes|vaes|pclmulqdq|vpclmulqdq|sha\w*|gfni|popcnt|movbe|"
    r"abm|lzcnt|cx16|rdrand|rdseed|xsave\w*|asimd\w*|sve\w*|i8mm|bf16|fphp|dotprod|neon|vfp\w*)$"
)


def load(compiler: bool = False) -> Any:
    """The ``tvm`` module; its runtime alone when nothing in this process has asked for the compiler (nor does
    ``compiler``: a library whose CPU model only LLVM can check)."""
    if "tvm" not in sys.modules and not compiler and not _compiler_wanted():
        before = os.environ.get("TVM_USE_RUNTIME_LIB")
        os.environ["TVM_USE_RUNTIME_LIB"] = "1"
        # tvm_ffi imports torch if it can, for tensor exchange the runtime never uses: 250 MB resident and
        # seconds of import. A None entry makes that import fail; it is removed after, so torch imports later.
        blocked = "torch" not in sys.modules
        if blocked:
            sys.modules["torch"] = None  # type: ignore[assignment]
        try:
            import tvm
        finally:
            if blocked:
                del sys.modules["torch"]
            if before is None:
                del os.environ["TVM_USE_RUNTIME_LIB"]
            else:
                os.environ["TVM_USE_RUNTIME_LIB"] = before
        return tvm
    import tvm

    return tvm


def runtime_only() -> bool:
    """Whether the loaded TVM is its runtime alone (False before TVM is imported)."""
    base = sys.modules.get("tvm.base")
    return bool(getattr(base, "_RUNTIME_ONLY", False))


def _compiler_wanted() -> bool:
    return os.environ.get(ENVIRONMENT) == "full" or "qcompile.backends.tvm" in sys.modules


def require_compiler() -> None:
    """Raise if this process loaded TVM's runtime alone: nothing can be compiled with it."""
    if runtime_only():
        raise BackendError(
            "this process loaded TVM's runtime alone (qcompile.runtime does, to run artifacts in less memory), "
            "and TVM cannot load its compiler afterwards: import qcompile.api before loading any artifact, or "
            f"set {ENVIRONMENT}=full, to compile in the same process"
        )


def isa_flags(text: str | None = None) -> list[str]:
    """The instruction-set flags of this CPU (``/proc/cpuinfo``'s first ``flags`` or ``Features`` line), sorted."""
    for line in (cpu.flags() if text is None else text).splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return sorted({flag for flag in value.split() if _ISA.match(flag)})
    return []
