"""``qcompile verify``: an artifact's files against their sha256, its cross-compiled libraries' ELF headers,
and, under qemu, each aarch64 library's outputs against a reference: the numpy oracle of the artifact's integer
graph for a library on qcompile's kernels, else the same graph built and run on this machine."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from qcompile.backends import tvm as tvm_backend
from qcompile.calibration import Feed
from qcompile.flow import measure
from qcompile.flow.compile import INTEGER_ONNX, QUANTIZED_ONNX
from qcompile.runtime import load as load_artifact
from qcompile.runtime.executors import TVMExecutor


def _host_reference_target() -> dict[str, Any]:
    """The host build that rounds as AArch64 code does (FMA contraction), when this CPU has FMA."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    return tvm_backend.cross.HOST_REFERENCE if " fma " in flags else {"kind": "llvm"}


def check(
    path: str | os.PathLike[str],
    emulate: bool = False,
    cpu: str | None = None,
    feeds: Feed | None = None,
) -> list[dict[str, Any]]:
    """Check an artifact: every file's sha256 (always), the ELF header of every cross-compiled library,
    and with ``emulate`` a run of each aarch64 library under qemu as ``cpu`` (default: the target's
    ``mcpu``) compared with a reference. A library on qcompile's kernels is compared with the numpy oracle of the
    artifact's integer graph: bit for bit, or, where the graph keeps float layers, within a few times what
    float32 rounding in them alone moves the outputs (as the compile checked it). An importer build is compared
    with the same graph built for and run on this machine, within max |difference| <= 1e-5 x max(1, max |host
    output|); with the FMA-contracting host build the outputs are expected to be bit-identical.

    Returns one record per check (``check``, ``passed``, ``detail`` and figures; ``bit_exact`` says whether the
    emulated outputs equal the reference's).
    """
    folder = Path(path)
    session = load_artifact(folder, "onnxruntime-fp32")
    manifest = session.manifest
    records: list[dict[str, Any]] = [
        {"check": "sha256", "passed": True, "detail": f"{len(manifest.files)} files match the manifest"}
    ]
    for name, entry in manifest.executors.items():
        if entry.kind != "tvm" or entry.arch is None or entry.target is None:
            continue
        toolchain = tvm_backend.cross.TOOLCHAINS[entry.arch]
        info = tvm_backend.cross.check_elf(folder / entry.file, toolchain)
        abi = f", float ABI {info.float_abi}" if info.float_abi else ""
        records.append({"check": f"{name}: ELF", "passed": True, "detail": f"{toolchain.arch}, ELF{info.bits}{abi}"})
        if not emulate:
            continue
        if entry.input_shapes is not None:  # a decoder's step library: it takes a step's cache, not these inputs
            records.append(
                {
                    "check": f"{name}: emulated run",
                    "passed": None,
                    "detail": "a decode step on its own cache layout: run under qemu against the numpy oracle at "
                    "compile time (measured.accuracy.decode_step), not re-run here",
                }
            )
            continue
        if not toolchain.runnable or entry.runner is None:
            records.append(
                {
                    "check": f"{name}: emulated run",
                    "passed": None,
                    "detail": entry.cannot_run or f"no TVM runtime for {toolchain.arch}: not run",
                }
            )
            continue
        target = entry.target.get("host", entry.target) if entry.target["kind"] != "llvm" else entry.target
        chosen_cpu = cpu or target.get("mcpu") or "max"
        feed = session.check_feeds(feeds) if feeds is not None else session.random_feeds()
        arrays = [feed[info.name] for info in session.inputs]
        try:
            outputs, _ = tvm_backend.cross.emulate(
                toolchain, folder, entry.file, arrays, chosen_cpu, list(target.get("mattr", []))
            )
        except tvm_backend.cross.IllegalInstructionError as error:
            records.append({"check": f"{name}: emulated run", "passed": False, "detail": str(error)})
            continue
        if (entry.lowering or "").startswith(tvm_backend.INTEGER_KERNELS) and (folder / INTEGER_ONNX).is_file():
            integer_graph = onnx.load(str(folder / INTEGER_ONNX))
            passed, agreement, exact = measure.oracle_agreement(outputs, integer_graph, feed)
            records.append(
                {
                    "check": f"{name}: emulated run",
                    "passed": passed,
                    "bit_exact": exact,
                    "detail": f"qemu -cpu {chosen_cpu}: {agreement}",
                }
            )
            continue
        references = host_run(folder / QUANTIZED_ONNX, feed, [info.name for info in session.inputs])
        differences = [float(np.abs(a.astype(np.float64) - b).max()) for a, b in zip(outputs, references, strict=True)]
        scale = max(1.0, *(float(np.abs(b).max()) for b in references))
        worst = max(differences)
        records.append(
            {
                "check": f"{name}: emulated run",
                "passed": worst <= 1e-5 * scale,
                "bit_exact": worst == 0.0,
                "max_abs_diff": worst,
                "detail": f"qemu -cpu {chosen_cpu} vs host build: max |diff| {worst:.3g}"
                + (" (bit-exact)" if worst == 0.0 else f", tolerance {1e-5 * scale:.3g}"),
            }
        )
    return records


def host_run(onnx_path: Path, feed: Feed, input_names: list[str]) -> list[np.ndarray]:
    """Build ``onnx_path`` with TVM for this machine (rounding as AArch64 does) and run it on ``feed``."""

    with tempfile.TemporaryDirectory(prefix="qcompile-host-ref-") as scratch:
        (library, *_), _ = tvm_backend.build(onnx.load(str(onnx_path)), _host_reference_target(), Path(scratch))
        executor = TVMExecutor(Path(scratch) / library, input_names)
        return [np.asarray(value) for value in executor.run(feed)]
