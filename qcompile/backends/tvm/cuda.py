"""CUDA targets (Jetson Orin Nano): GPU schedules, the generated kernels, and nvcc.

Relax needs every GPU kernel bound to threads before it can generate code; TVM's default dlight rules
(matmul, GEMV, reductions, and a fallback for element-wise kernels) do that without tuning. The PyPI wheel
of TVM 0.27 then generates CUDA C but has no CUDA compiler in its code generator (its
``tvm_callback_cuda_compile`` hook is never called), so the library's CUDA module holds source only, which
no device runtime loads as is. The artifact therefore also carries the kernels as source (``kernels.cu``)
and, where nvcc is installed, compiled for the target's architecture (``kernels.fatbin``): that proves the
generated code compiles for sm_87. There is no GPU here, so nothing of it is run.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from qcompile.errors import BackendError

KERNELS_SOURCE = "kernels.cu"
KERNELS_BINARY = "kernels.fatbin"


def schedule(module: Any, target: Any) -> Any:
    """``module`` lowered to TIR and every kernel given a default GPU schedule for ``target``."""
    from tvm import relax
    from tvm.s_tir import dlight

    with target:
        module = relax.get_pipeline("zero")(module)
        return dlight.ApplyDefaultSchedule(
            dlight.gpu.Matmul(),
            dlight.gpu.GEMV(),
            dlight.gpu.Reduction(),
            dlight.gpu.GeneralReduction(),
            dlight.gpu.Fallback(),
        )(module)


def _source(module: Any) -> str:
    if module.kind == "cuda":
        return str(module.inspect_source(""))
    return "".join(_source(child) for child in module.imports)


def write_kernels(executable: Any, arch: str, out_dir: Path) -> tuple[list[str], str]:
    """Write the CUDA source of ``executable`` and, with nvcc, its fatbin for ``arch``; returns the files
    and one line saying how far the build went."""
    source = _source(executable.mod)
    if not source:
        raise BackendError("the TVM build for CUDA produced no CUDA kernels")
    (out_dir / KERNELS_SOURCE).write_text(source)
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return [KERNELS_SOURCE], "CUDA source generated; no nvcc here, so not compiled; not run (no GPU)"
    with tempfile.TemporaryDirectory(prefix="qcompile-nvcc-") as scratch:
        output = Path(scratch) / KERNELS_BINARY
        command = [nvcc, "--fatbin", "-O3", f"-arch={arch}", "-o", str(output), str(out_dir / KERNELS_SOURCE)]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            reason = result.stderr.strip()[-800:]
            raise BackendError(f"nvcc could not compile the generated kernels for {arch}: {reason}")
        shutil.copy2(output, out_dir / KERNELS_BINARY)
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    release = version.splitlines()[-1] if version else "nvcc"
    return [KERNELS_SOURCE, KERNELS_BINARY], f"CUDA kernels compiled by nvcc ({release}) for {arch}; not run (no GPU)"
