"""How fast a library of qcompile's kernels would run on a board that is not here: an estimate, and it says so.

Emulated time (qemu) is not a board's speed, so the estimate comes from the target CPU's scheduling model
instead. Every dense kernel (convolution, matmul) is compiled alone for the target; its smallest loop that
does multiply-accumulates (one or more register-tile steps) is read from the assembly and given to
``llvm-mca`` (Debian's llvm packages) with the target's ``mcpu``, which simulates that loop on the CPU's
pipelines and reports its cycles per iteration in steady state. The kernel's cycles are that times the number
of iterations (its register-tile steps, known from how the kernel was generated), spread over the target's
cores (its tiles run in parallel). Other kernels are costed on the target file's roofline: their bytes over
the on-chip (working set within the L2) or memory bandwidth, and a depthwise convolution's products at one
vector multiply-add per cycle. Each kernel call adds the target file's per-op overhead.

What it leaves out: cache misses inside the dense loops (llvm-mca assumes loads hit L1), the epilogues'
cycles, and thread-pool synchronisation beyond the per-op overhead. A board measures (``qcompile bench
--rpc``); the estimate says what to expect before one does.
"""

from __future__ import annotations

import functools
import logging
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Any

from qcompile.errors import BackendError

logger = logging.getLogger(__name__)

# Multiply-accumulates per instruction of the flavors' dot products: aarch64 (128-bit registers; smull counts
# only on bytes, 8 int16 products: the int8 flavor, not the requantization's 64-bit products) and x86-64 (at
# 512 bits; a ymm / xmm operand does a half / a quarter).
DOT_MACS = {"sdot": 16, "udot": 16, "smlal": 4, "smlal2": 4, "fmla": 4, "smull": 8, "smull2": 8,
            "vpdpbusd": 64, "vpmaddwd": 32, "vfmadd231ps": 16, "vfmadd213ps": 16, "vfmadd132ps": 16}  # fmt: skip
_X86_WIDTH = {"%zmm": 1, "%ymm": 2, "%xmm": 4}
ITERATIONS = 200  # llvm-mca's simulated iterations of a loop (steady state)

_LABEL = re.compile(r"^(\.LBB\d+_\d+):")
# Branches to a local label: aarch64 (b, b.cond, cbz / cbnz, tbz / tbnz) and x86-64 (jmp, jcc).
_BRANCH = re.compile(r"^\s+(?:b\.\w+|b|cbn?z|tbn?z|j[a-z]+)\s+(?:[^,]+,\s*)*(\.LBB\d+_\d+)\s*$")
_INSTRUCTION = re.compile(r"^\s+([a-z][a-z0-9.]*)\b")


@dataclass(frozen=True)
class KernelEstimate:
    name: str
    kind: str  # "dense" (llvm-mca), "depthwise" or "memory" (roofline)
    ms: float
    macs: int  # multiply-accumulates (dense: as the register tiles compute them, padding included)
    cycles_per_step: float | None = None  # dense: llvm-mca cycles per register-tile step, one core


@dataclass(frozen=True)
class LibraryEstimate:
    ms: float
    kernels: list[KernelEstimate]
    dense_ms: float
    dense_roofline: float | None  # dense kernels' MACs per cycle per core over the target's int8 peak
    source: str

    def summary(self) -> dict[str, Any]:
        return {
            "estimated_ms": self.ms,
            "dense_ms": self.dense_ms,
            "dense_fraction_of_int8_peak": self.dense_roofline,
            "kernels": len(self.kernels),
            "source": self.source,
        }


def mca_program() -> str | None:
    """The llvm-mca on this machine (Debian installs it as llvm-mca or llvm-mca-<version>)."""
    for name in ("llvm-mca", *(f"llvm-mca-{version}" for version in range(20, 13, -1))):
        found = shutil.which(name)
        if found:
            return found
    return None


def loops(assembly: str) -> list[list[str]]:
    """The bodies (instruction lines) of the loops in ``assembly``, innermost first: a branch back to a label
    above it closes a loop."""
    lines = assembly.splitlines()
    labels: dict[str, int] = {}
    spans: list[tuple[int, int]] = []
    for index, line in enumerate(lines):
        label = _LABEL.match(line)
        if label:
            labels[label.group(1)] = index
            continue
        branch = _BRANCH.match(line)
        if branch and branch.group(1) in labels:
            spans.append((labels[branch.group(1)], index))
    spans.sort(key=lambda span: span[1] - span[0])
    return [[line for line in lines[start + 1 : end + 1] if _INSTRUCTION.match(line)] for start, end in spans]


def innermost_loops(assembly: str) -> list[list[str]]:
    """The bodies of the loops in ``assembly`` that contain no other loop."""
    bodies = loops(assembly)
    return [body for body in bodies if not any(len(other) < len(body) and _contains(body, other) for other in bodies)]


def _contains(outer: list[str], inner: list[str]) -> bool:
    return any(outer[start : start + len(inner)] == inner for start in range(len(outer) - len(inner) + 1))


def multiply_loop(assembly: str) -> list[str]:
    """The smallest loop that does multiply-accumulates (a loop the compiler unrolled completely leaves the
    next one out), or, in a kernel unrolled throughout, all its instructions."""
    for body in loops(assembly):
        if loop_macs(body) > 0:
            return body
    return [line for line in assembly.splitlines() if _INSTRUCTION.match(line)]


def loop_macs(body: list[str]) -> int:
    """Multiply-accumulates one iteration of ``body`` does in the flavors' dot-product instructions."""
    total = 0
    for line in body:
        match = _INSTRUCTION.match(line)
        if match and match.group(1) in DOT_MACS:
            if match.group(1).startswith("smull") and ".8h" not in line:
                continue
            divisor = next((part for register, part in _X86_WIDTH.items() if register in line), 1)
            total += DOT_MACS[match.group(1)] // divisor
    return total


@functools.lru_cache(maxsize=512)
def _mca_cycles(body: str, triple: str, cpu: str) -> float:
    program = mca_program()
    if program is None:
        raise BackendError("llvm-mca is not installed (Debian: apt-get install llvm)")
    result = subprocess.run(
        [program, f"-mtriple={triple}", f"-mcpu={cpu}", f"-iterations={ITERATIONS}"],
        input=body,
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Total Cycles:\s+(\d+)", result.stdout)
    if result.returncode != 0 or match is None:
        raise BackendError(f"llvm-mca failed on a loop for {cpu}: {result.stderr.strip()[-300:]}")
    return int(match.group(1)) / ITERATIONS


def dense_loop_cycles(function: Any, tvm_target: dict[str, Any], mca_cpu: str | None = None) -> tuple[float, int]:
    """llvm-mca's cycles per iteration of ``function``'s multiply-accumulate loop on the target's CPU (or on
    llvm-mca's model ``mca_cpu``, where it has none of that CPU), and the multiply-accumulates of one
    iteration."""
    import tvm

    name = str(function.attrs["global_symbol"])
    executable = tvm.compile(tvm.IRModule({name: function}), target=tvm.target.Target(tvm_target))
    assembly = executable.mod.inspect_source("asm")
    body = multiply_loop(assembly)
    macs = loop_macs(body)
    if macs == 0:
        raise BackendError(f"{name}: no multiply-accumulate loop found in its {tvm_target.get('mcpu')} assembly")
    text = "\n".join(line for line in body if not _BRANCH.match(line)) + "\n"
    cpu = mca_cpu or str(tvm_target.get("mcpu", "generic"))
    return _mca_cycles(text, str(tvm_target.get("mtriple", "x86_64-linux-gnu")), cpu), macs


def _buffer_bytes(function: Any) -> int:
    total = 0
    for buffer in function.params:
        if not hasattr(buffer, "shape"):
            continue
        elements = 1
        for dim in buffer.shape:
            elements *= int(dim)
        total += elements * tvm_dtype_bytes(str(buffer.dtype))
    return total


def tvm_dtype_bytes(dtype: str) -> int:
    bits = int(re.sub(r"[^0-9]", "", dtype.split("x")[0]) or 8)
    return max(1, bits // 8)


def estimate(module: Any, tvm_target: dict[str, Any], device: Any) -> LibraryEstimate:
    """The estimated latency of the Relax ``module``'s kernels (as :func:`qcompile.backends.tvm.integer.to_relax`
    makes them) on ``device`` (a target file's :class:`qcompile.hwmodels.Device`) for ``tvm_target``."""
    import tvm

    from qcompile.backends.tvm.integer import DENSE_STEPS, STEP_MACS, WINDOW_MACS

    hz = device.clock_ghz * 1e9
    int8_peak = device.macs_per_cycle.get("int8")
    vector_lanes = max(1, device.vector_bits // 32)
    kernels: list[KernelEstimate] = []
    dense_cycles, dense_macs = 0.0, 0
    for global_var, function in module.functions.items():
        if not isinstance(function, tvm.tirx.PrimFunc):
            continue
        name = global_var.name_hint
        attributes = function.attrs
        size = _buffer_bytes(function)
        on_chip = size <= device.onchip_memory_kib * 1024
        bandwidth = device.onchip_bandwidth_gbs if on_chip else device.memory_bandwidth_gbs
        memory_s = size / (bandwidth * 1e9)
        overhead_s = device.op_overhead_us * 1e-6
        if attributes is not None and DENSE_STEPS in attributes:
            steps, step_macs = int(attributes[DENSE_STEPS]), int(attributes[STEP_MACS])
            cycles, macs = dense_loop_cycles(function.with_attr("global_symbol", name), tvm_target)
            per_step = cycles * step_macs / macs
            compute_s = steps * per_step / device.cores / hz
            dense_cycles += steps * per_step
            dense_macs += steps * step_macs
            ms = (max(compute_s, memory_s) + overhead_s) * 1e3
            kernels.append(KernelEstimate(name, "dense", ms, steps * step_macs, per_step))
        elif attributes is not None and WINDOW_MACS in attributes:
            macs = int(attributes[WINDOW_MACS])
            compute_s = macs / vector_lanes / device.cores / hz
            kernels.append(KernelEstimate(name, "depthwise", (max(compute_s, memory_s) + overhead_s) * 1e3, macs))
        else:
            kernels.append(KernelEstimate(name, "memory", (memory_s + overhead_s) * 1e3, 0))
    dense_ms = sum(kernel.ms for kernel in kernels if kernel.kind == "dense")
    roofline = dense_macs / dense_cycles / int8_peak if dense_cycles and int8_peak else None
    mca = mca_program() or "llvm-mca"
    source = (
        f"estimate, not a measurement: dense kernels' loops simulated by {mca.rsplit('/', 1)[-1]} as "
        f"{tvm_target.get('mcpu')}, other kernels on the target file's roofline, {device.op_overhead_us:g} us per "
        f"kernel call, {device.cores} cores at {device.clock_ghz:g} GHz"
    )
    return LibraryEstimate(sum(kernel.ms for kernel in kernels), kernels, dense_ms, roofline, source)
