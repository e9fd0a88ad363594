"""``qcompile gate``: an artifact held to latency, accuracy and size budgets, each check saying where its
figure comes from (measured here, on a board over RPC, estimated by the LUT plan or predicted by the cost
model). The report formats are :mod:`qcompile.runtime.gate`'s."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from pathlib import Path

from qcompile import calibration, hwmodels
from qcompile.calibration import Feed, Preprocess
from qcompile.errors import ArtifactError, CalibrationError
from qcompile.flow.feeds import feeds_from, session_inputs
from qcompile.flow.measure import evaluate, predicted_latency_ms
from qcompile.flow.quantize import accuracy_drop
from qcompile.runtime import bench
from qcompile.runtime import gate as gate_report
from qcompile.runtime import load as load_artifact


def _device_elsewhere(target: str) -> bool:
    """Whether ``target`` is an accelerator this machine only simulates (its latency is then predicted)."""
    return hwmodels.load_target(target).pipeline in ("integer-only", "lut")


def check(
    path: str | os.PathLike[str],
    max_latency_ms: float | None = None,
    max_accuracy_drop: float | None = None,
    max_size_mb: float | None = None,
    data: str | os.PathLike[str] | Iterable[Feed] | None = None,
    target: str | None = None,
    runs: int = 100,
    preprocess: Preprocess | None = None,
    executor: str | None = None,
    rpc: str | None = None,
) -> list[gate_report.Check]:
    """Check the artifact at ``path`` against each budget given; the report formats are
    :mod:`qcompile.runtime.gate`'s.

    Latency is measured here on ``executor`` (default: the artifact's default executor), or with ``rpc``
    (HOST:PORT) on the remote device that runs the artifact's TVM library, unless ``target`` names another
    device than the artifact's, or an accelerator this machine only simulates (int8-npu, fpga-lut) and no
    ``executor`` is named: then the cost model predicts it, or the fpga-lut plan estimates it (and the
    check says so). Accuracy drop is measured on ``data`` against the artifact's float reference when given,
    else read from the manifest.
    """
    budgets = (max_latency_ms, max_accuracy_drop, max_size_mb)
    if all(budget is None for budget in budgets):
        raise ArtifactError("give at least one budget: --max-latency-ms, --max-accuracy-drop or --max-size-mb")
    if any(budget is not None and budget <= 0 for budget in budgets):
        raise ArtifactError("budgets must be positive")
    folder = Path(path)
    session = load_artifact(folder, executor)
    manifest = session.manifest
    target = target or manifest.target.name
    checks: list[gate_report.Check] = []
    feeds: list[Feed] | None = None
    if data is not None:
        inputs = session_inputs(session)
        feeds = list(calibration.checked(feeds_from(data, inputs, preprocess, "gate"), inputs, "gate data"))
        if not feeds:
            raise CalibrationError(f"the gate data {data} holds no samples")
    if max_latency_ms is not None:
        if rpc is not None:
            from qcompile.backends.tvm import rpc as tvm_rpc

            entry = manifest.executors.get(executor or "tvm")
            if entry is None or entry.kind != "tvm":
                raise ArtifactError(f"--rpc measures a TVM library; {folder} has no TVM executor '{executor or 'tvm'}'")
            feed = session.check_feeds(feeds[0] if feeds else session.random_feeds())
            arrays = [feed[info.name] for info in session.inputs]
            remote = tvm_rpc.run_remote(folder / entry.file, arrays, rpc, runs)
            value = remote.latency.median_ms
            source = f"measured on the {remote.device}, {entry.file}, median of {remote.latency.runs} runs"
        elif target == manifest.target.name and manifest.lut and executor is None:
            # An FPGA-style target: nothing here runs its engine; the plan written at compile time estimates it.
            value = float(manifest.lut["step_latency_us"]) / 1e3
            source = f"estimated for {target} by the LUT engine plan (lut/plan.json), not measured"
        elif target == manifest.target.name and not (_device_elsewhere(target) and executor is None):
            feed = feeds[0] if feeds else session.random_feeds()
            latency = bench.measure(functools.partial(session.run, feed), runs=runs, warmup=10, max_seconds=60)
            machine = bench.machine()
            value = latency.median_ms
            source = (
                f"measured here ({machine['cpu']}, {machine['cores']} cores), {session.executor}, "
                f"median of {latency.runs} runs"
            )
        else:
            value, source = predicted_latency_ms(folder, manifest, target)
        checks.append(gate_report.Check("latency", max_latency_ms, value, "ms", source))
    if max_accuracy_drop is not None:
        if feeds is not None:
            reference = session.with_executor("onnxruntime-fp32")
            metrics = evaluate(reference, session, feeds)
            source = f"measured here on {len(feeds)} samples against the float reference"
        else:
            if manifest.measured is None:
                raise ArtifactError(f"{folder}: the manifest holds no measurements; pass --data to measure accuracy")
            accuracy = manifest.measured.accuracy
            scope = "evaluation" if "evaluation" in accuracy else "calibration"
            metrics = accuracy[scope]
            source = f"from the manifest: {scope} samples at compile time" + (
                "" if scope == "evaluation" else " (not held out; pass --data for held-out samples)"
            )
        if session.executor == "onnxruntime-fp32":
            metrics = {"mean_cosine": 1.0}
            source = "the executor runs the float model"
        kind = "top-1 disagreement" if "top1_agreement" in metrics else "1 - mean cosine"
        checks.append(
            gate_report.Check("accuracy drop", max_accuracy_drop, accuracy_drop(metrics), "pt", f"{kind}, {source}")
        )
    if max_size_mb is not None:
        file_name = manifest.executors[session.executor].file
        size = (folder / file_name).stat().st_size / 1e6
        checks.append(gate_report.Check("size", max_size_mb, size, "MB", f"{file_name} ({session.executor}'s file)"))
    return checks
