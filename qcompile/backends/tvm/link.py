"""``build_library``: ``relax.build`` and ``export_library`` for a module of qcompile's CPU kernels, with LLVM's
work spread over the cores.

``relax.build`` hands every kernel to LLVM as one module, and ``export_library`` then writes that module's
object code: both on one core. On EfficientNet-Lite0's 79 kernels that is 3.6 s of optimization and 3.4 s
of code emission (2-core AMD EPYC), while the other core idles. Here the kernels are dealt round robin into
one module per core (at most :data:`MAX_PARTS`); each is built and written to its own object file in its own
thread (TVM's code generation runs without holding Python's interpreter lock), and the VM's bytecode is
linked with them the way ``relax.build`` links its one module. EfficientNet-Lite0: 3.7 s instead of 7.0 s,
with outputs bit-identical to the one-module build's (measured). tests/backends/test_integer_lowering.py
checks ResNet-18's library built this way (host, and aarch64 in three parts under qemu) and built by
``relax.build`` against the numpy oracle, bit for bit.

The steps are ``relax.build``'s and ``export_library``'s own, in apache-tvm 0.27 (pinned by the project):
the Relax pipeline, ``VMCodeGen``, ``tirx.build`` per part, ``VMLink`` with the first part as the library and
the others imported into it (as ``relax.build`` imports external modules), and the import tree packed into
an object file beside the kernels' (``ModulePackImportsToLLVM``), all linked by ``fcompile``.

The VM's own code is compiled too (``relax.build``'s ``exec_mode="compiled"``): instead of bytecode that the
VM interprets, instruction by instruction, on every call, ``main`` is a function of native code (one more
kernel in the parts) that calls the kernels directly and TVM's builtins (tensor allocation, reshapes) through
their packed interface. A small model's library makes hundreds of such calls per run, and the interpreter's
share of a call was a quarter of the run: a tiny CvT's library (300 kernels, 0.19 ms) ran 182 -> 143 us
(2-core Xeon, 2 threads, same process), with outputs bit-identical to the bytecode build's.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# More parts than cores only adds LLVM set-up per part; four covers the machines qcompile compiles on.
MAX_PARTS = 4

# How the VM runs ``main``: "compiled" (native code; see the module's docstring) or "bytecode" (interpreted).
EXEC_MODE = "compiled"


def parts_for(kernels: int) -> int:
    """How many modules ``kernels`` kernels are split into: one per core, at most :data:`MAX_PARTS`."""
    return max(1, min(os.cpu_count() or 1, MAX_PARTS, kernels))


def build_library(
    module: Any,
    target: Any,
    path: Path,
    relax_pipeline: Any,
    fcompile: Callable[..., Any] | None = None,
    parts: int | None = None,
) -> None:
    """Build the Relax ``module`` (qcompile's kernels, ``call_tir`` of PrimFuncs) for the LLVM ``target`` with
    ``relax_pipeline`` and write the shared library ``path``, linked by ``fcompile`` (the host compiler by
    default, a cross compiler's for another CPU); the kernels are compiled in ``parts`` threads (by default
    :func:`parts_for`)."""
    import tvm
    from tvm import relax
    from tvm.relax import vm_build
    from tvm.runtime import _ffi_api as runtime_api
    from tvm.support import cc

    with target:
        lowered = relax_pipeline(module)
    attributes = dict(lowered.attrs) if lowered.attrs else {}
    kernels = _kernels(lowered)
    if not kernels or attributes.get("external_mods") or attributes.get("const_name_to_constant"):
        # not what qcompile's kernels make: relax.build's own path links such modules and constants
        executable = relax.build(lowered, target=target, relax_pipeline=None, exec_mode=EXEC_MODE)
        executable.export_library(str(path), fcompile=fcompile)
        return
    builder = relax.ExecBuilder()
    leftover = vm_build._vmcodegen(builder, lowered, EXEC_MODE)
    kernels = _kernels(leftover)
    count = min(parts, len(kernels)) if parts is not None else parts_for(len(kernels))
    modules = [tvm.IRModule(dict(kernels[index::count]), attrs=leftover.attrs) for index in range(count)]
    with tempfile.TemporaryDirectory(prefix="qcompile-link-") as scratch:
        objects = [os.path.join(scratch, f"kernels{index}.o") for index in range(count)]

        def compile_part(index: int) -> Any:
            library = tvm.tirx.build(modules[index], target=target)
            library.write_to_file(objects[index])
            return library

        with ThreadPoolExecutor(count, thread_name_prefix="qcompile-llvm") as pool:
            libraries = list(pool.map(compile_part, range(count)))
        executable = relax._ffi_api.VMLink(builder, target, libraries[0], libraries[1:], {})
        packed = runtime_api.ModulePackImportsToLLVM(
            executable, False, libraries[0].get_function("_get_target_string")(), ""
        )
        packed.write_to_file(os.path.join(scratch, "devc.o"))
        (fcompile or cc.create_shared)(
            str(path), [*objects, os.path.join(scratch, "devc.o")], options=_direct_call_aliases(kernels)
        )


def _direct_call_aliases(kernels: list[tuple[Any, Any]]) -> list[str]:
    """Linker options that give each kernel the name compiled ``main`` calls it by. ``main`` calls a kernel
    directly, by its global symbol; a kernel in the same LLVM module resolves to the function TVM emits as
    ``__tvm_ffi_<symbol>``, but one in another part is left an undefined ``<symbol>``, defined here as that
    function's alias (both have TVM's packed calling convention)."""
    if EXEC_MODE != "compiled":
        return []
    aliases = []
    for _, function in kernels:
        symbol = function.attrs.get("global_symbol") if function.attrs else None
        if symbol and not str(symbol).startswith("__vmtir__"):
            aliases.append(f"-Wl,--defsym,{symbol}=__tvm_ffi_{symbol}")
    return aliases


def _kernels(module: Any) -> list[tuple[Any, Any]]:
    """The PrimFuncs of an IRModule, with their global vars, in the module's order."""
    import tvm

    return [(var, function) for var, function in module.functions.items() if isinstance(function, tvm.tirx.PrimFunc)]
