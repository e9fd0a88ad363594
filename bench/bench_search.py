"""The bit-width search's Pareto front against uniform int8 and uniform int4, on real models.

    python bench/bench_search.py [--work DIR] [--target host] [--eval 64]

Calibrates the host cost model here (``qcompile profile``'s sweep), then for EfficientNet-Lite0 and
all-MiniLM-L6-v2 runs the search (sensitivity of every layer in fp32 / int8 / int4 / int2 / ternary, MILP over
a sweep of latency budgets) and, for every Pareto point and for uniform int8 and uniform int4 weights,
builds the model and measures its output error against fp32 on held-out data, and its latency under
onnxruntime. Prints a table per model, whether the front dominates each uniform configuration, and the
search time; writes a plot per model (``pareto_<model>.svg`` in the working folder). Predicted latencies
are for ``--target``; measured ones are on this machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import zoo

from qcompile import frontend, hwmodels
from qcompile.flow import profile
from qcompile.flow.quantize import QuantizeOptions, quantize
from qcompile.hwmodels.cost import calibration_path
from qcompile.runtime import bench
from qcompile.search import allocate, report, sensitivity


def measured_error(model: Any, feeds: list[dict[str, np.ndarray]], references: list[np.ndarray]) -> float:
    return sensitivity.relative_error(sensitivity.run_all(model, feeds), references)


def study(
    name: str,
    path: Path,
    calibration: list[dict[str, np.ndarray]],
    held_out: list[dict[str, np.ndarray]],
    target: hwmodels.Target,
    plots: Path,
) -> list[str]:
    source = frontend.load(path)
    references = sensitivity.run_all(source, held_out)
    fp32_ms = profile.wall_us(source, held_out[0], 50) / 1e3
    # The budget only picks the chosen point; the front spans every budget.
    result = quantize(
        source,
        calibration,
        QuantizeOptions(bits="auto", latency_budget_ms=1e6),
        progress=False,
        target=target,
    )
    assert result.search is not None and result.variant is not None
    problem = result.search.problem
    rows = []
    points: list[tuple[str, allocate.Allocation]] = [
        ("uniform int8", allocate.uniform(problem, "int8")),
        ("uniform int4", allocate.uniform(problem, "int4")),
    ] + [(f"front {index}", point) for index, point in enumerate(result.search.front)]
    measured: dict[str, tuple[float, float, float]] = {}
    for label, point in points:
        model = result.variant(point.formats)
        error = measured_error(model, held_out, references)
        latency = profile.wall_us(model, held_out[0], 50) / 1e3
        measured[label] = (point.latency_ms, error, latency)
        counts = point.summary()["layers"]
        rows.append(
            f"| {name} | {label} | {'/'.join(str(counts[fmt]) for fmt in allocate.CANDIDATES)} | "
            f"{point.latency_ms:.2f} | {point.size_mb:.2f} | {error:.2e} | {latency:.2f} |"
        )
    front = [value for label, value in measured.items() if label.startswith("front")]
    plot = [{"latency_ms": p, "error": e, "layers": label} for label, (p, e, _) in measured.items() if "front" in label]
    others = {label: {"latency_ms": p, "error": e} for label, (p, e, _) in measured.items() if "uniform" in label}
    svg = report.pareto_svg(plot, plot[0], others, error_label="measured output error vs fp32 (log)")
    (plots / f"pareto_{name}.svg").write_text(svg)
    for uniform in ("uniform int8", "uniform int4"):
        predicted, error, _ = measured[uniform]
        lower_error = any(p <= predicted * (1 + 1e-9) and e < error for p, e, _ in front)
        faster = any(e <= error and p < predicted for p, e, _ in front)
        rows.append(
            f"| {name} | front vs {uniform} | | | | | | lower error at <= its latency: {lower_error}; "
            f"lower latency at <= its error: {faster} |"
        )
    rows.append(f"| {name} | fp32 | | {allocate.uniform(problem, 'fp32').latency_ms:.2f} | | 0 | {fp32_ms:.2f} |")
    rows.append(
        f"| {name} | search time | | | | | | {result.search.seconds:.1f} s ({len(problem.layers)} layers x "
        f"{len(allocate.CANDIDATES) - 1} formats) |"
    )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="working folder (default: a temporary one)")
    parser.add_argument("--target", default="host", help="target whose cost model prices the search")
    parser.add_argument("--eval", type=int, default=64, help="held-out samples per model (default 64)")
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="qcompile-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["QCOMPILE_HOME"] = str(work / "home")
    host = hwmodels.load_target("host")
    calibration_result, _ = profile.calibrate(host, runs=60, progress=False)
    calibration_result.save(calibration_path("host"))
    target = hwmodels.load_target(args.target)
    rows = study(
        "EfficientNet-Lite0",
        zoo.export_efficientnet_lite0(work / "efficientnet_lite0.onnx"),
        [{"input": image[None]} for image in zoo.photo_crops(32, seed=2)],
        [{"input": image[None]} for image in zoo.photo_crops(args.eval, seed=1)],
        target,
        work,
    )
    rows += study(
        "all-MiniLM-L6-v2",
        zoo.export_minilm(work / "minilm.onnx"),
        list(zoo.minilm_feeds(zoo.pydoc_sentences(32, offset=1000))),
        list(zoo.minilm_feeds(zoo.pydoc_sentences(args.eval))),
        target,
        work,
    )
    machine = bench.machine()
    print(f"\nmachine: {machine['cpu']}, {machine['cores']} cores; predicted for {args.target}, measured here")
    print(
        f"\n| model | configuration | layers {'/'.join(allocate.CANDIDATES)} | predicted ms | size MB | measured "
        "error vs fp32 | measured ms |"
    )
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nplots (front measured, uniform int8 / int4 as squares): {work}/pareto_*.svg")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
