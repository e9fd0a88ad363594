"""Edge targets: build time, artifact size and, under qemu-user, the difference from the host, per target.

    python bench/bench_edge.py [--work DIR]

EfficientNet-Lite0 is quantized once (W8A8, 32 calibration crops); its QDQ graph is then built with TVM for
every CPU target. The aarch64 libraries run with the artifact's own runner under qemu-aarch64 as the
target's CPU, on one evaluation crop, and are compared with the same graph built for this machine (with FMA
contraction, as AArch64 code rounds). Emulated milliseconds are qemu's speed, not the board's. Needs
`qcompile toolchains --install`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import zoo

from qcompile import api, hwmodels
from qcompile.backends import tvm as tvm_backend
from qcompile.backends.tvm import cross
from qcompile.flow import verify
from qcompile.runtime import bench

TARGETS = ("host", "rpi4", "cortex-a76", "armv7", "riscv64")


def _size_mb(folder: Path) -> float:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="folder for models and artifacts (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="qcompile-bench-edge-"))
    work.mkdir(parents=True, exist_ok=True)
    model = zoo.export_efficientnet_lite0(work / "efficientnet_lite0.onnx")
    calibration = work / "calibration"
    calibration.mkdir(exist_ok=True)
    for index, crop in enumerate(zoo.photo_crops(32, seed=0)):
        np.save(calibration / f"{index:02d}.npy", crop[None])
    quantized = work / "effnet.quantized"
    api.compile(model, quantized, calibration_data=calibration, build_tvm=False, force=True, progress=False)
    proto = onnx.load(str(quantized / api.QUANTIZED_ONNX))
    crop = zoo.photo_crops(1, seed=99)[0][None].astype(np.float32)
    host_outputs = verify.host_run(quantized / api.QUANTIZED_ONNX, {"input": crop}, ["input"])
    onnx_mb = _size_mb(quantized) - (quantized / "manifest.json").stat().st_size / 1e6

    machine = bench.machine()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores; model EfficientNet-Lite0 W8A8")
    print("| target | TVM target | build s | library MB | artifact MB | emulated as | max abs diff vs host | qemu ms |")
    print("|---|---|---|---|---|---|---|---|")
    for name in TARGETS:
        target = hwmodels.load_target(name)
        folder = work / f"effnet.{name}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        started = time.perf_counter()
        (library, *_), _ = tvm_backend.build(proto, target.tvm_target, folder)
        seconds = time.perf_counter() - started
        toolchain = cross.toolchain_for(target.tvm_target)
        emulated, difference, qemu_ms = "-", "-", "-"
        if toolchain is not None and toolchain.runnable:
            cross.bundle(toolchain, folder)
            cpu = target.tvm_target.get("mcpu", "max")
            outputs, latency = cross.emulate(
                toolchain, folder, library, [crop], cpu, list(target.tvm_target.get("mattr", [])), repeat=3
            )
            emulated = cpu
            difference = f"{float(np.abs(outputs[0] - host_outputs[0]).max()):.3g}"
            qemu_ms = f"{latency:.0f}" if latency is not None else "-"
        elif toolchain is not None:
            info = cross.check_elf(folder / library, toolchain)
            emulated = f"not run: no runtime (ELF{info.bits}, e_machine {info.machine}, {info.float_abi} float ABI)"
        print(
            f"| {name} | {target.tvm_target.get('mtriple', 'x86_64')} {target.tvm_target.get('mcpu', '')} | "
            f"{seconds:.1f} | {(folder / library).stat().st_size / 1e6:.1f} | {_size_mb(folder) + onnx_mb:.1f} | "
            f"{emulated} | {difference} | {qemu_ms} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
