"""The intake corpus through qcompile: tiny Hugging Face architectures, exported as users export them.

    python bench/intake.py [--work DIR] [--only NAME ...] [--exporters torchscript,dynamo,optimum] [--tvm]

For every architecture of ``examples/intake_zoo.py`` and every exporter: export into DIR/NAME/EXPORTER, save
8 calibration samples there as .npz files, and compile with ``qcompile.api.compile`` given nothing but those
samples (no input shapes, no options, no TVM build unless ``--tvm``: then the host library on qcompile's
kernels too, shipped when it measured faster than onnxruntime fp32; the table's default-executor cell adds
its compile-time median, or why there is none). A compiled artifact then runs 8 held-out samples on its
quantized ('onnxruntime') and float ('onnxruntime-fp32') executors: mean cosine per output between the two,
the float executor's cosine against the exported model itself (a frontend that changed the math shows here),
and both latencies, with the default executor's, timed alternately in one process (speedups: the median of
the ratios of back-to-back rounds, ``qcompile.runtime.bench.speedup``). The dims the export leaves dynamic
that the artifact's onnxruntime files keep, and the int8 artifact's cosine against the export on a sample
with every kept dim of another size.

Each architecture runs in a child process of its own (a new one after a crash or hang), so a crash or a hang
is one row, not the end of the run. Prints a markdown table; writes every figure to DIR/results.json. A
``QCompileError`` is a refusal with a message; any other exception out of ``compile`` is a bug and is shown as
``bug: Type: ...``. optimum exports need an environment with optimum-onnx: see ``--optimum-python``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import intake_zoo  # noqa: E402

CALIBRATION_SAMPLES = 8
EVALUATION_SAMPLES = 8
CALIBRATION_SEED = 0
EVALUATION_SEED = 1
RESULT = "result.json"


# Set (by --tvm) for the child processes: build the host library too.
TVM_VARIABLE = "QCOMPILE_INTAKE_TVM"


def first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else ""


def cosine(ours: np.ndarray, theirs: np.ndarray) -> float:
    ours, theirs = ours.astype(np.float64).ravel(), theirs.astype(np.float64).ravel()
    norms = np.linalg.norm(ours) * np.linalg.norm(theirs)
    if norms == 0.0:
        return 1.0 if np.array_equal(ours, theirs) else 0.0
    return float(ours @ theirs / norms)


def model_facts(path: Path) -> dict[str, Any]:
    """Opset, input and output shapes (symbolic dimensions by name) and node count of an exported model."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)

    def shape(value: Any) -> list[int | str]:
        return [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim]

    return {
        "opset": next((entry.version for entry in proto.opset_import if entry.domain in {"", "ai.onnx"}), None),
        "inputs": {value.name: shape(value) for value in proto.graph.input},
        "outputs": {value.name: shape(value) for value in proto.graph.output},
        "nodes": len(proto.graph.node),
        "external_data": any(path.parent.glob("*.data")),
    }


def save_samples(feeds: list[dict[str, np.ndarray]], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index, feed in enumerate(feeds):
        np.savez(folder / f"{index:03d}.npz", **feed)
    return folder


def run_case(name: str, exporter: str, folder: Path) -> dict[str, Any]:
    """Export, compile and measure one (architecture, exporter); never raises."""
    import onnxruntime

    build_tvm = os.environ.get(TVM_VARIABLE) == "1"

    from qcompile import api, runtime
    from qcompile.errors import QCompileError
    from qcompile.flow.dynamic import probes
    from qcompile.runtime import bench

    result: dict[str, Any] = {"model": name, "exporter": exporter, "compiled": False}
    started = time.perf_counter()
    try:
        path = intake_zoo.export(name, exporter, folder / "export")
    except Exception as error:
        result.update(stage="export", error=f"export failed: {type(error).__name__}: {first_line(error)}")
        return result
    result["export_seconds"] = round(time.perf_counter() - started, 2)
    result["export_settings"] = json.loads((folder / "export" / "export.json").read_text())
    result["onnx"] = model_facts(path)
    input_names = list(result["onnx"]["inputs"])
    calibration = save_samples(
        intake_zoo.calibration_feeds(name, CALIBRATION_SAMPLES, CALIBRATION_SEED, input_names=input_names),
        folder / "calibration",
    )
    evaluation = intake_zoo.calibration_feeds(name, EVALUATION_SAMPLES, EVALUATION_SEED, input_names=input_names)
    artifact = folder / "artifact"
    started = time.perf_counter()
    try:
        manifest = api.compile(
            path, artifact, calibration_data=calibration, build_tvm=build_tvm, progress=False, force=True
        )
    except QCompileError as error:
        result.update(stage="compile", error=first_line(error), error_type=type(error).__name__)
        return result
    except Exception as error:
        result.update(stage="compile", error=f"bug: {type(error).__name__}: {first_line(error)}", bug=True)
        return result
    result["compile_seconds"] = round(time.perf_counter() - started, 2)
    result["compiled"] = True
    result["default_executor"] = manifest.get("default_executor")
    if build_tvm:  # the host library on qcompile's kernels: shipped (its compile-time median) or why not
        tvm_latency = manifest["measured"]["latency_ms"].get("tvm")
        result["tvm"] = f"{tvm_latency['median_ms']:.3f} ms" if tvm_latency else manifest["skipped"].get("tvm", "")
    result["float_layers"] = sum(1 for layer in manifest.get("layers", []) if layer.get("float_reason"))
    try:
        quantized = runtime.load(artifact, "onnxruntime")
        reference = runtime.load(artifact, "onnxruntime-fp32")
        source = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        source_names = [output.name for output in source.get_outputs()]
        cosines: dict[str, list[float]] = {output.name: [] for output in quantized.outputs}
        reference_cosines: dict[str, list[float]] = {output: [] for output in source_names}
        for feed in evaluation:
            ours, theirs = quantized.run(feed), reference.run(feed)
            exported = dict(zip(source_names, source.run(None, feed), strict=True))
            for output in cosines:
                cosines[output].append(cosine(ours[output], theirs[output]))
            for output in reference_cosines:
                if output in theirs:
                    reference_cosines[output].append(cosine(theirs[output], exported[output]))
        result["cosine"] = {output: float(np.mean(values)) for output, values in cosines.items()}
        result["fp32_vs_export_cosine"] = {
            output: float(np.mean(values)) for output, values in reference_cosines.items() if values
        }
        result["missing_outputs"] = sorted(set(source_names) - {output.name for output in reference.outputs})
        kept = manifest["passes"][0].get("dynamic_in_onnxruntime", {}) if manifest["passes"] else {}
        declared = sum(isinstance(dim, str) for shape in result["onnx"]["inputs"].values() for dim in shape)
        result["dynamic_dims"] = {"declared": declared, "kept": sum(len(axes) for axes in kept.values())}
        if kept:
            # Every kept dim of another size at once: the int8 artifact against the exported model.
            members = [(name, int(axis)) for name, axes in kept.items() for axis in axes]
            for other in probes(evaluation[0], members):  # the first size the export itself runs
                try:
                    exported = dict(zip(source_names, source.run(None, other), strict=True))
                except Exception:  # onnxruntime's own error types
                    continue
                ours = quantized.run(other)
                cosines_there = [cosine(ours[name], exported[name]) for name in ours if name in exported]
                result["other_shape_cosine"] = min(cosines_there)
                break
        feed = evaluation[0]
        # fp32 first, then quantized, alternately (bench.compare interleaves its rounds): 10 rounds of >= 6 runs,
        # the speedup the median of the rounds' ratios (bench.speedup); the default executor's the same way.
        default = runtime.load(artifact)
        latency = bench.compare(
            {
                "fp32": lambda: reference.run(feed),
                "quantized": lambda: quantized.run(feed),
                "default": lambda: default.run(feed),
            },
            rounds=10,
            min_runs=6,
            pause_seconds=0.05,
        )
        result["fp32_ms"] = latency["fp32"].median_ms
        result["quantized_ms"] = latency["quantized"].median_ms
        result["speedup"] = bench.speedup(latency["fp32"], latency["quantized"])
        result["default_speedup"] = bench.speedup(latency["fp32"], latency["default"])
    except Exception as error:
        result.update(stage="run", error=f"run failed: {type(error).__name__}: {first_line(error)}", bug=True)
    return result


def run_isolated(
    name: str, exporters: list[str], work: Path, timeout: float, optimum_python: str | None
) -> list[dict[str, Any]]:
    """``run_case`` for each exporter of ``name`` in a child process (one import of torch for them all); a
    crash or timeout becomes that exporter's result, and a new child takes the exporters after it."""
    environment = dict(os.environ)
    if optimum_python:
        environment[intake_zoo.OPTIMUM_PYTHON_VARIABLE] = optimum_python
    results = []
    pending = list(exporters)
    for exporter in pending:
        (work / name / exporter).mkdir(parents=True, exist_ok=True)
        (work / name / exporter / RESULT).unlink(missing_ok=True)
    while pending:
        command = [sys.executable, __file__, "--case", name, ",".join(pending), "--work", str(work)]
        started = time.perf_counter()
        with open(work / name / f"log.{pending[0]}.txt", "w") as log:
            try:
                completed = subprocess.run(
                    command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=environment,
                    timeout=timeout * len(pending),
                    check=False,
                )
                code: int | None = completed.returncode
            except subprocess.TimeoutExpired:
                code = None
        seconds = round(time.perf_counter() - started, 1)
        done = []
        for exporter in pending:
            path = work / name / exporter / RESULT
            if not path.exists():
                break
            done.append({**json.loads(path.read_text()), "seconds": seconds / len(pending)})
        pending = pending[len(done) :]
        results.extend(done)
        if pending:
            error = f"timeout after {timeout * len(pending):.0f} s" if code is None else f"crash: exited with {code}"
            results.append(
                {
                    "model": name,
                    "exporter": pending[0],
                    "compiled": False,
                    "stage": "crash",
                    "error": error,
                    "bug": True,
                }
            )
            pending = pending[1:]
    return results


def _library(result: dict[str, Any]) -> str:
    """With --tvm: the host library's compile-time median, or why there is none (first words)."""
    if "tvm" not in result:
        return ""
    shipped = result["tvm"].endswith(" ms")
    return f" (library {result['tvm']})" if shipped else f" (no library: {result['tvm'][:60]})"


def row(result: dict[str, Any]) -> str:
    cosines = result.get("cosine") or {}
    if cosines:
        worst = min(cosines, key=cosines.__getitem__)
        quality = f"{cosines[worst]:.4f}" + (f" ({worst})" if len(cosines) > 1 else "")
    else:
        quality = ""
    reference = result.get("fp32_vs_export_cosine") or {}
    fidelity = f"{min(reference.values()):.5f}" if reference else ""
    error = result.get("error", "")
    if len(error) > 140:
        error = error[:137] + "..."
    speedup = f"{result['speedup']:.2f}" if "speedup" in result else ""
    if "default_speedup" in result:
        speedup += f" / {result['default_speedup']:.2f}"
    dims = result.get("dynamic_dims")
    dynamic = f"{dims['kept']}/{dims['declared']}" if dims else ""
    if "other_shape_cosine" in result:
        dynamic += f" ({result['other_shape_cosine']:.4f})"
    cells = [
        result["model"],
        result["exporter"],
        "yes" if result["compiled"] else "no",
        error.replace("|", "\\|"),
        quality,
        fidelity,
        (result.get("default_executor") or "") + _library(result),
        speedup,
        dynamic,
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| model | exporter | compiled | error | min mean cosine int8 vs fp32 | fp32 vs export | default executor "
    "| int8 / default executor speedup over fp32 | dynamic dims kept (int8 cosine at other sizes) |\n"
    "|---|---|---|---|---|---|---|---|---|"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/intake"), help="where models and results go")
    parser.add_argument("--only", action="append", default=[], help="an architecture to run (repeatable)")
    parser.add_argument("--exporters", default=",".join(intake_zoo.EXPORTERS), help="comma-separated exporters")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one (model, exporter) may take")
    parser.add_argument(
        "--optimum-python",
        default=os.environ.get(intake_zoo.OPTIMUM_PYTHON_VARIABLE),
        help="a python with optimum-onnx installed (optimum-onnx 0.1 needs transformers < 4.58, so usually a "
        "venv made with --system-site-packages); default: this python",
    )
    parser.add_argument(
        "--tvm",
        action="store_true",
        help="also build the host library on qcompile's kernels (shipped when faster than onnxruntime fp32)",
    )
    parser.add_argument("--case", nargs=2, metavar=("NAME", "EXPORTERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        name, exporters = args.case
        for exporter in exporters.split(","):
            folder = args.work / name / exporter
            result = run_case(name, exporter, folder)
            (folder / RESULT).write_text(json.dumps(result, indent=1))
        return

    from qcompile.runtime import bench

    unknown = sorted(set(args.only) - set(intake_zoo.ARCHITECTURES))
    exporters = [exporter.strip() for exporter in args.exporters.split(",") if exporter.strip()]
    if args.tvm:
        os.environ[TVM_VARIABLE] = "1"  # (the child processes inherit it)
    unknown += sorted(set(exporters) - set(intake_zoo.EXPORTERS))
    if unknown:
        parser.error(f"unknown architectures or exporters: {unknown}")
    names = args.only or list(intake_zoo.ARCHITECTURES)
    args.work.mkdir(parents=True, exist_ok=True)
    machine = bench.machine()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['system']} {machine['machine']}")
    print(HEADER, flush=True)
    results = []
    for name in names:
        wanted = [
            exporter
            for exporter in exporters
            if exporter != "optimum" or intake_zoo.ARCHITECTURES[name].optimum_task is not None
        ]
        for result in run_isolated(name, wanted, args.work, args.timeout, args.optimum_python):
            results.append(result)
            print(row(result), flush=True)
        (args.work / "results.json").write_text(json.dumps({"machine": machine, "results": results}, indent=1))
    compiled = sum(result["compiled"] for result in results)
    bugs = sum(bool(result.get("bug")) for result in results)
    print(f"\n{compiled}/{len(results)} compiled; {bugs} bugs (crashes or non-QCompileError exceptions)")
    print(f"results: {args.work / 'results.json'}")


if __name__ == "__main__":
    main()
