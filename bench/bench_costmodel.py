"""How well the host cost model predicts onnxruntime on real models, calibrated on other layers.

    python bench/bench_costmodel.py [--work DIR] [--runs 30]

The cost model is calibrated on the fixed single-layer sweep (``qcompile profile``'s), then predicts every
Conv / Gemm / MatMul of EfficientNet-Lite0 and all-MiniLM-L6-v2, as fp32 and as qcompile's W8A8 QDQ model.
Measured per-layer times come from onnxruntime's profiler on the whole model; end-to-end times from timed
runs of the same model, in this process. Prints Spearman rank correlations and end-to-end errors.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import zoo

from qcompile import execution, frontend, hwmodels
from qcompile.flow import profile
from qcompile.flow.quantize import quantize
from qcompile.hwmodels.cost import FLOAT, CostModel
from qcompile.hwmodels.layers import describe, layer_edges
from qcompile.runtime import bench
from qcompile.search.choices import as_pipeline_sees_it, quantized_choices


def evaluate(name: str, path: Path, feeds: list[dict[str, np.ndarray]], model: CostModel, runs: int) -> list[str]:
    source = frontend.load(path)
    quantized = quantize(source, feeds, progress=False)
    float_layers = frozenset(record.name for record in quantized.layers if record.float_reason)
    rewritten = as_pipeline_sees_it(source)
    specs = describe(rewritten)
    compute = [spec for spec in specs if spec.quantizable]
    rows = []
    for label, graph, choices in (
        ("fp32", rewritten, {}),
        ("W8A8", quantized.model, quantized_choices(rewritten, float_layers)),
    ):
        times, unattributed = profile.layer_times(graph, execution.kernel_times(graph, feeds[0], runs))
        measured = [times.get(spec.name, 0.0) for spec in compute]
        predicted = [model.latency_us(spec, choices.get(spec.name, FLOAT)) for spec in compute]
        rho = profile.spearman(predicted, measured)
        wall = profile.wall_us(graph, feeds[0], runs=100) / 1e3
        edges = layer_edges(rewritten, [spec.name for spec in compute])
        end_to_end = model.model_latency_ms(specs, choices, edges=edges)
        rows.append(
            f"| {name} | {label} | {len(compute)} | {rho:.3f} | {sum(measured) / 1e3:.2f} | "
            f"{sum(predicted) / 1e3:.2f} | {wall:.2f} | {end_to_end:.2f} | {(end_to_end / wall - 1) * 100:+.0f} % |"
            f" {unattributed / 1e3:.2f} |"
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="working folder (default: a temporary one)")
    parser.add_argument("--runs", type=int, default=30, help="profiled runs per model")
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="qcompile-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    target = hwmodels.load_target("host")
    calibration, measurements = profile.calibrate(target, runs=args.runs, progress=False)
    model = CostModel(target, calibration)
    sweep_rho = profile.spearman(
        [model.latency_us(item.layer, item.choice) for item in measurements],
        [item.measured_us for item in measurements],
    )
    effnet = zoo.export_efficientnet_lite0(work / "efficientnet_lite0.onnx")
    minilm = zoo.export_minilm(work / "minilm.onnx")
    rows = evaluate(
        "EfficientNet-Lite0",
        effnet,
        [{"input": image[None]} for image in zoo.photo_crops(16, seed=2)],
        model,
        args.runs,
    )
    rows += evaluate(
        "all-MiniLM-L6-v2", minilm, list(zoo.minilm_feeds(zoo.pydoc_sentences(16, offset=1000))), model, args.runs
    )
    machine = bench.machine()
    print(f"\nmachine: {machine['cpu']}, {machine['cores']} cores; onnxruntime CPU, batch 1")
    print(
        f"calibration: {len(measurements)} sweep layers in {calibration.fit['seconds']:.1f} s; "
        f"Spearman on the sweep itself {sweep_rho:.3f}\n"
    )
    print(
        "| model | graph | layers | Spearman per layer | measured layers ms | predicted layers ms | "
        "measured end-to-end ms | predicted end-to-end ms | end-to-end error | unattributed kernels ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
