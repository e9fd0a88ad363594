"""Arm boards without a board: qcompile's kernels cross-compiled, checked under qemu, and their speed estimated.

    python bench/bench_edge.py [--work DIR] [--models efficientnet,resnet18,minilm] [--targets rpi4,cortex-a76]

Each model is compiled for each target exactly as a user would (``qcompile.api.compile`` with 32 calibration
samples: EfficientNet-Lite0 and ResNet-18 on photo crops, all-MiniLM-L6-v2 on pydoc sentences at 64 tokens).
The compile builds the library on qcompile's kernels in the target CPU's flavor (``sdot`` on the Cortex-A76,
``smull`` + ``sadalp`` on the Cortex-A72 of the Raspberry Pi 4), runs it under ``qemu-aarch64 -cpu <mcpu>``
against the numpy oracle of its integer graph, and estimates its latency on the board
(:mod:`qcompile.backends.tvm.estimate`: llvm-mca on the target's scheduling model for the dense kernels'
loops, the target file's roofline for the rest). The table sets beside it the cost model's prediction of
onnxruntime on that board (int8 QDQ and fp32, uncalibrated unless ``qcompile profile --rpc`` ran) and
published board figures, labelled as such. Emulated time is never used: it is not a board's speed.
Needs ``qcompile toolchains --install`` and llvm-mca (Debian's llvm packages).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import zoo

from qcompile import api
from qcompile.runtime import bench

CALIBRATION = 32

# Published board figures, for scale only (other runtimes, other boards; not measured here).
PUBLISHED = [
    "TFLite with XNNPACK, Raspberry Pi 3B+ (Cortex-A53): EfficientNet-Lite0 int8 82.7 ms, fp32 135.2 ms (1.63x), "
    "as the Arm issue cites it",
]


def _models(work: Path, names: list[str]) -> dict[str, tuple[Path, list[dict[str, np.ndarray]]]]:
    models: dict[str, tuple[Path, list[dict[str, np.ndarray]]]] = {}
    crops = [{"input": crop[None]} for crop in zoo.photo_crops(CALIBRATION, seed=0)]
    if "efficientnet" in names:
        models["efficientnet"] = (zoo.export_efficientnet_lite0(work / "efficientnet_lite0.onnx"), crops)
    if "resnet18" in names:
        models["resnet18"] = (zoo.export_resnet18(work / "resnet18.onnx"), crops)
    if "minilm" in names:
        feeds = list(zoo.minilm_feeds(zoo.pydoc_sentences(CALIBRATION)))
        models["minilm"] = (zoo.export_minilm(work / "minilm.onnx"), feeds)
    return models


def _row(model: str, target: str, manifest: dict[str, Any], seconds: float, folder: Path) -> dict[str, Any]:
    measured = manifest["measured"]
    predicted = measured.get("predicted_latency_ms") or {}
    estimate = predicted.get("tvm_estimate") or {}
    library = manifest["executors"].get("tvm", {})
    return {
        "model": model,
        "target": target,
        "lowering": library.get("lowering"),
        "estimated_ms": estimate.get("estimated_ms"),
        "dense_ms": estimate.get("dense_ms"),
        "dense_fraction_of_int8_peak": estimate.get("dense_fraction_of_int8_peak"),
        "predicted_onnxruntime_int8_ms": predicted.get("onnxruntime"),
        "predicted_onnxruntime_fp32_ms": predicted.get("onnxruntime-fp32"),
        "cost_model": predicted.get("cost_model"),
        "oracle_check": measured["accuracy"].get("tvm_vs_oracle"),
        "default_executor": manifest["default_executor"],
        "library_mb": (folder / library["file"]).stat().st_size / 1e6 if library else None,
        "compile_s": seconds,
        "layers_float": sum(1 for layer in manifest["layers"] if layer["float_reason"]),
        "layers": len(manifest["layers"]),
    }


def _cell(value: float | None, form: str) -> str:
    return "-" if value is None else format(value, form)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="folder for models and artifacts (default: a temporary one)")
    parser.add_argument("--models", default="efficientnet,resnet18,minilm", help="comma-separated")
    parser.add_argument("--targets", default="rpi4,cortex-a76", help="comma-separated aarch64 targets")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="qcompile-bench-edge-"))
    work.mkdir(parents=True, exist_ok=True)
    models = _models(work, args.models.split(","))
    rows = []
    for model, (path, feeds) in models.items():
        for target in args.targets.split(","):
            folder = work / f"{model}.{target}"
            started = time.perf_counter()
            manifest = api.compile(path, folder, target=target, calibration_data=feeds, force=True, progress=False)
            rows.append(_row(model, target, manifest, time.perf_counter() - started, folder))
            print(json.dumps(rows[-1]), flush=True)
    (work / "results.json").write_text(json.dumps(rows, indent=1))
    machine = bench.machine()
    print(f"\nbuilt on {machine['cpu']}, {machine['cores']} cores; every latency below is an estimate for the board")
    print(
        "| model | target | kernels' estimate ms | dense kernels, % of int8 peak | onnxruntime int8 / fp32 predicted "
        "ms | kernels vs fp32 (estimated) | under qemu vs numpy oracle | default | float layers | compile s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        peak = row["dense_fraction_of_int8_peak"]
        ratio = (
            row["predicted_onnxruntime_fp32_ms"] / row["estimated_ms"]
            if row["estimated_ms"] and row["predicted_onnxruntime_fp32_ms"]
            else None
        )
        check = (row["oracle_check"] or "-").split(" on the calibration sample")[0]
        print(
            f"| {row['model']} | {row['target']} | {_cell(row['estimated_ms'], '.2f')} | "
            f"{_cell(peak * 100 if peak else None, '.0f')} | {_cell(row['predicted_onnxruntime_int8_ms'], '.2f')} / "
            f"{_cell(row['predicted_onnxruntime_fp32_ms'], '.2f')} | {_cell(ratio, '.2f')}x | {check} | "
            f"{row['default_executor']} | {row['layers_float']}/{row['layers']} | {row['compile_s']:.0f} |"
        )
    print("\npublished board figures, for scale (not measured here):")
    for line in PUBLISHED:
        print(f"- {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
