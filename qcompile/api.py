"""The Python face of the CLI: ``compile`` a model into an artifact, ``load`` an artifact."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from qcompile import calibration, frontend, hwmodels
from qcompile.backends import ort as ort_backend
from qcompile.backends import tvm as tvm_backend
from qcompile.calibration import Feed, Preprocess
from qcompile.errors import ArtifactError, CalibrationError, UnsupportedModelError, first_line
from qcompile.passes import pipeline
from qcompile.runtime import Session, bench
from qcompile.runtime import gate as gate_report
from qcompile.runtime import load as load_artifact
from qcompile.runtime.artifact import MANIFEST, SCHEMA_VERSION, atomic_folder, dumps, sha256_file
from qcompile.search import report

logger = logging.getLogger(__name__)

QUANTIZED_ONNX = "model.int8.onnx"
REFERENCE_ONNX = "reference.fp32.onnx"
TERNARY_ONNX = "model.ternary.onnx"
INTEGER_ONNX = "model.integer.onnx"
REPORT_HTML = "report.html"


def version() -> str:
    try:
        return metadata.version("qcompile")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _feeds(
    source: str | os.PathLike[str] | Iterable[Feed] | None,
    inputs: list[calibration.InputSpec],
    preprocess: Preprocess | None,
    what: str,
) -> Iterable[Feed]:
    if source is None:
        raise CalibrationError(
            f"no {what} data; pass a folder of .npy/.npz/images (--calibration DIR) "
            "or an iterable of feeds through the API"
        )
    if isinstance(source, str | os.PathLike):
        return calibration.from_folder(Path(source), inputs, preprocess)
    return source


def _tensor_infos(values: Any) -> list[dict[str, Any]]:
    return [
        {
            "name": str(value.name),
            "shape": [int(dim) if isinstance(dim, int) else -1 for dim in value.shape],
            "dtype": str(np.dtype(value.dtype.numpy())),
        }
        for value in values
    ]


def _evaluate(float_session: Any, quantized_session: Any, feeds: Iterable[Feed]) -> dict[str, float]:
    """Stream ``feeds`` through both models; metrics of the quantized outputs against float."""
    outputs: list[np.ndarray] = []
    references: list[np.ndarray] = []
    for feed in feeds:
        references.extend(np.asarray(value) for value in float_session.run(None, feed))
        outputs.extend(np.asarray(value) for value in quantized_session.run(None, feed))
    metrics = pipeline.output_metrics(outputs, references)
    metrics["samples"] = float(len(references))
    return metrics


def compile(
    model_path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    target: str = "host",
    calibration_data: str | os.PathLike[str] | Iterable[Feed] | None = None,
    eval_data: str | os.PathLike[str] | Iterable[Feed] | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    options: pipeline.QuantizeOptions | None = None,
    preprocess: Preprocess | None = None,
    build_tvm: bool = True,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Compile the ONNX model at ``model_path`` for ``target`` into the artifact folder ``output``.

    Returns the manifest. On any error nothing is left at ``output``.
    """
    options = options or pipeline.QuantizeOptions()
    device = hwmodels.load_target(target)
    source = Path(model_path)
    model = frontend.load(source, input_shapes)
    inputs = calibration.input_specs(model)
    calibration_feeds = _feeds(calibration_data, inputs, preprocess, "calibration")
    if device.pipeline == "lut":
        return _compile_lut(model, source, Path(output), device, calibration_feeds, eval_data, options, force)
    integer_only = device.pipeline == "integer-only"
    if integer_only:
        options = _integer_only_options(options, device)
    result = pipeline.quantize(model, calibration_feeds, options, progress, target=device)
    lowered = host_integer = None
    if integer_only:
        from qcompile.passes import requantize

        lowered, lowering = requantize.lower(ort_backend.to_proto(result.model))
        result.passes.append(
            {
                "name": "requantize",
                "requantizations": lowering.requantizations,
                "rounding": "round half up: floor((acc * M0 + 2**(n-1)) / 2**n), M0 in [2**29, 2**30)",
                "accumulator_bounds": lowering.layers,
            }
        )
    with atomic_folder(Path(output), overwrite=force) as staging:
        written = ort_backend.save(result.model, staging / QUANTIZED_ONNX)
        written += ort_backend.save(model, staging / REFERENCE_ONNX)
        onnx.checker.check_model(str(staging / QUANTIZED_ONNX), full_check=True)
        if lowered is not None:
            lowered.ir_version = ort_backend.ORT_IR_VERSION
            (staging / INTEGER_ONNX).write_bytes(lowered.SerializeToString())
            onnx.checker.check_model(str(staging / INTEGER_ONNX), full_check=True)
            written.append(INTEGER_ONNX)
        search = next((entry for entry in result.passes if entry["name"] == "bit_search"), None)
        if search is not None:
            (staging / REPORT_HTML).write_text(report.render(source.name, device.name, search, result.layers))
            written.append(REPORT_HTML)
        executors: dict[str, dict[str, Any]] = {
            "onnxruntime": {"kind": "onnxruntime", "file": QUANTIZED_ONNX, "description": "quantized QDQ model"},
            "onnxruntime-fp32": {
                "kind": "onnxruntime",
                "file": REFERENCE_ONNX,
                "description": "the normalized float model (reference, fallback)",
            },
        }
        skipped = None
        if lowered is not None:
            executors["integer"] = {
                "kind": "onnxruntime",
                "file": INTEGER_ONNX,
                "description": "integer-only graph: ConvInteger / MatMulInteger, int32 bias, dyadic requantization",
            }
        toolchain = (
            tvm_backend.cross.toolchain_for(device.tvm_target)
            if device.backend.startswith("tvm") and not integer_only
            else None
        )
        if build_tvm and ort_backend.is_large(result.model):
            skipped = "the model's weights pass 2 GiB; the TVM ONNX importer needs one in-memory protobuf"
            logger.warning("TVM library not built: %s", skipped)
        elif build_tvm:
            graph = lowered if lowered is not None else ort_backend.to_proto(result.model)
            kernel_graph = lowered if lowered is not None else _host_integer_graph(graph, device, toolchain)
            kernels = None
            if kernel_graph is not None:
                kernels = tvm_backend.build_integer(kernel_graph, device.tvm_target, staging)
            requires_cpu = None
            if kernels is not None:
                built, built_for, built_with = kernels
                gpu_note, requires_cpu = None, built_for["mcpu"]
                if lowered is None and kernel_graph is not None:  # a host build: the library runs the QDQ
                    host_integer = kernel_graph  # graph's integer-only lowering
                    host_integer.ir_version = ort_backend.ORT_IR_VERSION
                    (staging / INTEGER_ONNX).write_bytes(host_integer.SerializeToString())
                    written.append(INTEGER_ONNX)
                    built_with += (
                        f"; the integer-only lowering of the quantized graph ({INTEGER_ONNX}: dyadic "
                        "requantization, within a quantization step of the QDQ graph)"
                    )
            else:
                built, gpu_note = tvm_backend.build(graph, device.tvm_target, staging)
                built_for, built_with = device.tvm_target, "TVM's ONNX importer (Relax default build)"
            library = built[0]
            written += built[1:]
            executors["tvm"] = {
                "kind": "tvm",
                "file": library,
                "target": built_for,
                "lowering": built_with,
                "description": f"TVM library of the {'integer-only' if lowered is not None else 'quantized'} graph",
            }
            if requires_cpu:  # built with every instruction of this CPU model: the runtime checks it
                executors["tvm"]["requires_cpu"] = requires_cpu
            if gpu_note:
                executors["tvm"]["kernels"] = built[1:]
                executors["tvm"]["cannot_run"] = (
                    f"{gpu_note}. The library's CUDA module holds source only (the TVM wheel's code generator "
                    "has no CUDA compiler): a device runtime cannot load it as is"
                )
            if toolchain:
                executors["tvm"]["arch"] = toolchain.arch
                executors["tvm"]["description"] += f", cross-compiled for {toolchain.arch}"
                if toolchain.runnable and not gpu_note:
                    written += tvm_backend.cross.bundle(toolchain, staging)
                    executors["tvm"]["runner"] = f"{tvm_backend.cross.DEVICE_FOLDER}/{tvm_backend.cross.RUNNER}"
                elif not gpu_note:
                    executors["tvm"]["cannot_run"] = (
                        f"no TVM runtime is published for {toolchain.arch}: the library is cross-compiled, linked "
                        "and its ELF header checked, but it cannot be run here"
                    )
        manifest: dict[str, Any] = {
            **_manifest_header(source, device, result.model),
            "options": pipeline.options_dict(options),
            "passes": result.passes,
            "layers": [vars(record) for record in result.layers],
            "executors": executors,
            "skipped": {"tvm": skipped} if skipped else {},
            "files": {
                name: sha256_file(staging / name)
                for name in sorted({*written, *(entry["file"] for entry in executors.values())})
            },
        }
        (staging / MANIFEST).write_text(dumps(manifest))
        manifest["measured"] = _measure(
            staging,
            set(executors),
            result,
            eval_data,
            inputs,
            preprocess,
            target_is_here=toolchain is None and lowered is None,
        )
        if toolchain:
            _predict_default(manifest, model, result, device)
        if lowered is not None:
            _check_integer(manifest, staging, lowered, result.sample)
        if host_integer is not None:
            _check_kernels(manifest, staging, host_integer, result.sample)
        manifest["default_executor"] = manifest["measured"]["default_executor"]
        (staging / MANIFEST).write_text(dumps(manifest))
    logger.info("wrote %s (default executor %s)", output, manifest["default_executor"])
    return manifest


def _manifest_header(source: Path, device: hwmodels.Target, model: Any) -> dict[str, Any]:
    """What every manifest opens with: versions, the source, the target, the compiled graph's inputs/outputs."""
    return {
        "schema_version": SCHEMA_VERSION,
        "qcompile_version": version(),
        "source": {"file": source.name, "sha256": sha256_file(source)},
        "target": {
            "name": device.name,
            "description": device.description,
            "backend": device.backend,
            "tvm_target": device.tvm_target,
        },
        "inputs": _tensor_infos(model.graph.inputs),
        "outputs": _tensor_infos(model.graph.outputs),
    }


def _integer_only_options(options: pipeline.QuantizeOptions, device: hwmodels.Target) -> pipeline.QuantizeOptions:
    """An integer-only device has no float unit: every layer is quantized, weights int8, activations uint8."""
    import dataclasses

    if options.bits != "8" or options.activation_bits != 8 or options.weight_block is not None:
        raise CalibrationError(
            f"target {device.name} runs int8 weights (per channel) and 8-bit activations only: "
            "drop --bits, --activation-bits and --weight-block"
        )
    if options.float_threshold:
        logger.info("target %s has no float unit: every layer is quantized (float threshold 0)", device.name)
    return dataclasses.replace(options, float_threshold=0.0, integer_only=True)


def _host_integer_graph(graph: onnx.ModelProto, device: hwmodels.Target, toolchain: Any) -> onnx.ModelProto | None:
    """For a build on this machine's CPU: the QDQ graph's integer-only lowering, which qcompile's int8 kernels
    run (:func:`qcompile.backends.tvm.build_integer`); None when a layer stays float or an op has no integer
    form (the library is then TVM's build of the QDQ graph)."""
    if toolchain is not None or not device.backend.startswith("tvm") or device.tvm_target.get("kind") != "llvm":
        return None
    from qcompile.passes import requantize

    try:
        lowered, _ = requantize.lower(graph)
    except UnsupportedModelError as reason:
        logger.info("the int8 kernels are not used: %s", first_line(reason))
        return None
    return lowered


def _require_exact(produced: dict[str, np.ndarray], expected: list[np.ndarray], what: str) -> None:
    """``what``'s outputs equal the numpy oracle's bit for bit, or an ArtifactError (nothing is written)."""
    if not all(np.array_equal(a, b) for a, b in zip(produced.values(), expected, strict=True)):
        raise ArtifactError(f"{what} differs from the numpy oracle of the integer-only graph")


def _check_kernels(manifest: dict[str, Any], folder: Path, lowered: onnx.ModelProto, sample: Feed) -> None:
    """A host build's kernel library against the numpy oracle of its integer graph, bit for bit."""
    from qcompile.passes import integer_reference

    expected = integer_reference.run(lowered, sample)
    _require_exact(load_artifact(folder, "tvm").run(sample), expected, "the TVM int8 kernels' library")
    manifest["measured"]["accuracy"]["tvm_vs_oracle"] = "bit-exact on the calibration sample"


def _check_integer(manifest: dict[str, Any], folder: Path, lowered: onnx.ModelProto, sample: Feed) -> None:
    """The integer graph under onnxruntime and under TVM against the numpy oracle on the calibration sample
    (bit for bit), and the faster of the two (both run the integer graph) as the default executor."""
    from qcompile.passes import integer_reference

    session = load_artifact(folder, "integer")
    produced = session.run(sample)
    expected = integer_reference.run(lowered, sample)
    _require_exact(produced, expected, "the integer-only graph under onnxruntime")
    measured = manifest["measured"]
    measured["accuracy"]["integer_vs_oracle"] = "bit-exact on the calibration sample"
    if "tvm" in manifest["executors"]:
        _require_exact(session.with_executor("tvm").run(sample), expected, "the TVM build of the integer graph")
        measured["accuracy"]["tvm_vs_oracle"] = "bit-exact on the calibration sample"
    measured["accuracy"]["integer_vs_qdq_max_abs_diff"] = max(
        float(np.abs(a - b).max())
        for a, b in zip(produced.values(), session.with_executor("onnxruntime").run(sample).values(), strict=True)
    )
    # Both run the integer graph bit for bit; the faster on this machine is the default.
    latency = measured["latency_ms"]
    default = min((name for name in ("integer", "tvm") if name in latency), key=lambda n: latency[n]["median_ms"])
    measured["default_executor"] = default
    measured["default_reason"] = (
        "integer-only target: the integer graph is what the device runs; "
        + ", ".join(
            f"{name} {latency[name]['median_ms']:.3f} ms median" for name in ("integer", "tvm") if name in latency
        )
        + f" here (both bit-exact with the numpy oracle): {default} is faster"
    )


def _compile_lut(
    model: Any,
    source: Path,
    output: Path,
    device: hwmodels.Target,
    calibration_feeds: Iterable[Feed],
    eval_data: Any,
    options: pipeline.QuantizeOptions,
    force: bool,
) -> dict[str, Any]:
    """The LUT pipeline: ternary weights and per-row int8 activations (no calibration statistics: the
    activation scales are computed at run time), then the ``lut/`` package of :mod:`qcompile.backends.lut`.
    The calibration data gives the sample that latencies and the calibration error are measured on."""
    from qcompile.backends import lut
    from qcompile.passes.ternarize import TernarizePass

    inputs = calibration.input_specs(model)
    sample = next(iter(calibration.checked(calibration_feeds, inputs, "calibration data")), None)
    if sample is None:
        raise CalibrationError("the calibration data is empty")
    ternary = pipeline._clone(model)
    ternarize = TernarizePass(options.ternary_scales)
    ternarize(ternary)
    logger.info("ternarized %d layers", len(ternarize.layers))
    proto = ort_backend.to_proto(ternary)
    with atomic_folder(output, overwrite=force) as staging:
        written = ort_backend.save(ternary, staging / TERNARY_ONNX)
        written += ort_backend.save(model, staging / REFERENCE_ONNX)
        onnx.checker.check_model(str(staging / TERNARY_ONNX), full_check=True)
        lut_files, plan = lut.build(proto, device, staging)
        written += lut_files
        executors: dict[str, dict[str, Any]] = {
            "onnxruntime": {
                "kind": "onnxruntime",
                "file": TERNARY_ONNX,
                "description": "ternary graph: int8 rows x ternary weights in MatMulInteger",
            },
            "onnxruntime-fp32": {"kind": "onnxruntime", "file": REFERENCE_ONNX, "description": "the float model"},
            "lut": {
                "kind": "lut",
                "file": lut.GRAPH,
                "kernels": lut.KERNELS,
                "description": "table-lookup TVM kernels on this machine (the FPGA engine's host simulation)",
            },
        }
        manifest: dict[str, Any] = {
            **_manifest_header(source, device, ternary),
            "options": {"ternary_scales": options.ternary_scales},
            "passes": [{"name": "ternarize", "scales": options.ternary_scales, "layers": len(ternarize.layers)}],
            "layers": [
                {
                    "name": layer.name,
                    "op_type": "MatMul",
                    "weight_format": "ternary",
                    "weight_bits": 1.6,
                    "activation_bits": 8,
                    "float_reason": None,
                    "k": layer.k,
                    "n": layer.n,
                    "zero_fraction": round(layer.zero_fraction, 4),
                }
                for layer in ternarize.layers
            ],
            "lut": {
                key: plan[key]
                for key in ("weights_on_chip", "weight_bytes", "resources", "step_latency_us", "bound", "estimate")
            },
            "executors": executors,
            "skipped": {},
            "files": {name: sha256_file(staging / name) for name in sorted(set(written))},
        }
        (staging / MANIFEST).write_text(dumps(manifest))
        manifest["measured"] = _measure_lut(staging, sample, eval_data, inputs)
        manifest["default_executor"] = manifest["measured"]["default_executor"]
        (staging / MANIFEST).write_text(dumps(manifest))
    logger.info("wrote %s (default executor %s)", output, manifest["default_executor"])
    return manifest


def _measure_lut(folder: Path, sample: Feed, eval_data: Any, inputs: list[calibration.InputSpec]) -> dict[str, Any]:
    """Latencies of the ternary executors on this machine, the LUT executor's agreement with onnxruntime's
    integer kernels, and accuracy against float."""
    sessions = {"onnxruntime-fp32": load_artifact(folder, "onnxruntime-fp32")}
    sessions.update({name: sessions["onnxruntime-fp32"].with_executor(name) for name in ("onnxruntime", "lut")})
    latencies = {
        name: bench.measure(functools.partial(session.run, sample), runs=30, warmup=3).as_dict()
        for name, session in sessions.items()
    }
    default = min(("onnxruntime", "lut"), key=lambda name: latencies[name]["median_ms"])
    agreement = max(
        float(np.abs(a - b).max())
        for a, b in zip(sessions["lut"].run(sample).values(), sessions["onnxruntime"].run(sample).values(), strict=True)
    )
    accuracy: dict[str, Any] = {"lut_vs_onnxruntime_max_abs_diff": agreement}
    if eval_data is not None:
        feeds = calibration.checked(_feeds(eval_data, inputs, None, "evaluation"), inputs, "evaluation data")
        accuracy["evaluation"] = _evaluate(
            _RunAdapter(sessions["onnxruntime-fp32"]), _RunAdapter(sessions["onnxruntime"]), feeds
        )
    return {
        "latency_ms": latencies,
        "default_executor": default,
        "default_reason": (
            f"faster ternary executor on this build machine ({latencies[default]['median_ms']:.3f} ms median); "
            "the FPGA's own latency is the plan's estimate (lut/plan.json)"
        ),
        "accuracy": accuracy,
        "machine": bench.machine(),
    }


def _measure(
    folder: Path,
    executor_names: set[str],
    result: pipeline.QuantizeResult,
    eval_data: Any,
    inputs: list[calibration.InputSpec],
    preprocess: Preprocess | None,
    target_is_here: bool = True,
) -> dict[str, Any]:
    """Accuracy against float and the latency of every executor, measured now, on this machine (for a cross
    target the caller then chooses the default executor by prediction)."""
    sample = result.sample
    reference = load_artifact(folder, "onnxruntime-fp32")  # verifies every file once
    sessions = {"onnxruntime-fp32": reference}
    native = [
        name for name in ("onnxruntime", "tvm", "integer") if name in executor_names and reference.runnable_here(name)
    ]
    sessions.update({name: reference.with_executor(name) for name in native})
    # onnxruntime executors are timed in interleaved rounds (tiny models differ by microseconds, and whichever
    # ran first would pay for the warm-up); an unscheduled TVM build can take a second per run: a few runs
    # tell that it is not the default.
    fast = {
        name: functools.partial(session.run, sample)
        for name, session in sessions.items()
        if name.startswith("onnxruntime")
    }
    # A pause before each round: one onnxruntime session's spinning workers otherwise slow the next (the
    # quantized ResNet-18 measured 6.6 ms beside its fp32 session without it, 2.7 ms with).
    latencies = {name: timed.as_dict() for name, timed in bench.compare(fast, pause_seconds=0.1).items()}
    for name, session in sessions.items():
        if name not in fast:
            # An unscheduled TVM build takes up to seconds a run: it stops after three runs past two seconds.
            timed = bench.measure(functools.partial(session.run, sample), runs=50, warmup=1, max_seconds=2.0)
            latencies[name] = timed.as_dict()
    quantized = [name for name in ("onnxruntime", "tvm") if name in latencies]
    fastest = min(quantized, key=lambda name: latencies[name]["median_ms"])
    default: str = fastest
    reason = f"fastest quantized executor ({latencies[fastest]['median_ms']:.2f} ms median)"
    if latencies[fastest]["median_ms"] > latencies["onnxruntime-fp32"]["median_ms"]:
        default = "onnxruntime-fp32"
        reason = (
            f"every quantized executor was slower than float onnxruntime "
            f"({latencies[fastest]['median_ms']:.3f} vs {latencies['onnxruntime-fp32']['median_ms']:.3f} ms)"
        )
        if target_is_here:
            logger.warning("%s; the default executor is the float model", reason)
    accuracy: dict[str, Any] = {"calibration": result.error}
    if "tvm" in sessions:
        difference = max(
            float(np.abs(a - b).max())
            for a, b in zip(
                sessions["tvm"].run(sample).values(), sessions["onnxruntime"].run(sample).values(), strict=True
            )
        )
        accuracy["tvm_vs_onnxruntime_max_abs_diff"] = difference
    if eval_data is not None:
        # A list: with an integer graph the feeds are evaluated twice (the QDQ graph, and what the device runs).
        feeds = list(
            calibration.checked(_feeds(eval_data, inputs, preprocess, "evaluation"), inputs, "evaluation data")
        )
        if "integer" in sessions:
            accuracy["evaluation_integer"] = _evaluate(
                _RunAdapter(sessions["onnxruntime-fp32"]), _RunAdapter(sessions["integer"]), feeds
            )
        elif "tvm" in sessions and "requires_cpu" in sessions["tvm"].manifest["executors"]["tvm"]:
            # the host library runs the integer-only lowering: its own numerics, evaluated as well
            accuracy["evaluation_tvm"] = _evaluate(
                _RunAdapter(sessions["onnxruntime-fp32"]), _RunAdapter(sessions["tvm"]), feeds
            )
        accuracy["evaluation"] = _evaluate(
            _RunAdapter(sessions["onnxruntime-fp32"]), _RunAdapter(sessions["onnxruntime"]), feeds
        )
    return {
        "latency_ms": latencies,
        "default_executor": default,
        "default_reason": reason,
        "accuracy": accuracy,
        "machine": bench.machine(),
    }


def _predict_default(
    manifest: dict[str, Any], model: Any, result: pipeline.QuantizeResult, target: hwmodels.Target
) -> None:
    """For a cross target nothing here measures the board: the default executor is chosen by the cost
    model's prediction, and the manifest says so."""
    float_layers = frozenset(record.name for record in result.layers if record.float_reason)
    quantized, floating, state = _predict(model, float_layers, target)
    measured = manifest["measured"]
    measured["latency_scope"] = "measured on this build machine, not on the target"
    measured["predicted_latency_ms"] = {"onnxruntime": quantized, "onnxruntime-fp32": floating, "cost_model": state}
    default = "onnxruntime" if quantized <= floating else "onnxruntime-fp32"
    measured["default_executor"] = manifest["default_executor"] = default
    measured["default_reason"] = (
        f"cross target {target.name}, not measured here: the cost model ({state}) predicts "
        f"{quantized:.2f} ms quantized vs {floating:.2f} ms float; measure on the board with "
        "`qcompile bench --rpc`"
    )


class _RunAdapter:
    """Gives a runtime Session the ``run(None, feeds) -> list`` shape of an onnxruntime session."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def run(self, _names: None, feed: Feed) -> list[np.ndarray]:
        return list(self.session.run(feed).values())


def _predict(float_model: Any, float_layers: frozenset[str], target: hwmodels.Target) -> tuple[float, float, str]:
    """The cost model's end-to-end latency on ``target`` of the quantized graph and of the float one, in ms,
    and how calibrated the model is."""
    from qcompile.hwmodels.cost import INT8, CostModel
    from qcompile.hwmodels.layers import describe
    from qcompile.hwmodels.profile import as_pipeline_sees_it, quantized_choices

    cost = CostModel.for_target(target)
    model = as_pipeline_sees_it(float_model)
    specs = describe(model)
    choices = quantized_choices(model, float_layers)
    if target.pipeline == "integer-only":
        choices = {spec.name: INT8 for spec in specs}  # the lowering leaves no float op (or fails)
    quantized = cost.model_latency_ms(specs, choices)
    state = (
        f"calibrated on {cost.calibration.machine.get('cpu', '?')}"
        if cost.calibration
        else "uncalibrated: target-file figures, default efficiencies"
    )
    return quantized, cost.model_latency_ms(specs, {}), state


def predicted_latency_ms(folder: Path, manifest: dict[str, Any], target_name: str) -> tuple[float, str]:
    """The cost model's end-to-end latency of the artifact's quantized graph on ``target_name``."""
    float_layers = frozenset(layer["name"] for layer in manifest["layers"] if layer["float_reason"])
    target = hwmodels.load_target(target_name)
    latency, _, state = _predict(frontend.load(folder / REFERENCE_ONNX), float_layers, target)
    return latency, f"predicted for {target_name} by the cost model ({state})"


def _device_elsewhere(target: str) -> bool:
    """Whether ``target`` is an accelerator this machine only simulates (its latency is then predicted)."""
    return hwmodels.load_target(target).pipeline in ("integer-only", "lut")


def gate(
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
    """Check the artifact at ``path`` against each budget given; see :mod:`qcompile.runtime.gate`.

    Latency is measured here on ``executor`` (default: the artifact's default executor), or with ``rpc``
    (HOST:PORT) on the remote device that runs the artifact's TVM library, unless ``target`` names another
    device than the artifact's, or an accelerator this machine only simulates (int8-npu, fpga-lut) and no
    ``executor`` is named: then the cost model predicts it, or the fpga-lut plan estimates it (and the
    check says so). Accuracy
    drop is measured on ``data`` against the artifact's float reference when given, else read
    from the manifest.
    """
    budgets = (max_latency_ms, max_accuracy_drop, max_size_mb)
    if all(budget is None for budget in budgets):
        raise ArtifactError("give at least one budget: --max-latency-ms, --max-accuracy-drop or --max-size-mb")
    if any(budget is not None and budget <= 0 for budget in budgets):
        raise ArtifactError("budgets must be positive")
    folder = Path(path)
    session = load_artifact(folder, executor)
    manifest = session.manifest
    target = target or manifest["target"]["name"]
    checks: list[gate_report.Check] = []
    feeds: list[Feed] | None = None
    if data is not None:
        inputs = [calibration.InputSpec(info.name, info.shape, np.dtype(info.dtype)) for info in session.inputs]
        feeds = list(calibration.checked(_feeds(data, inputs, preprocess, "gate"), inputs, "gate data"))
        if not feeds:
            raise CalibrationError(f"the gate data {data} holds no samples")
    if max_latency_ms is not None:
        if rpc is not None:
            from qcompile.backends.tvm import rpc as tvm_rpc

            entry = manifest["executors"].get(executor or "tvm")
            if entry is None or entry["kind"] != "tvm":
                raise ArtifactError(f"--rpc measures a TVM library; {folder} has no TVM executor '{executor or 'tvm'}'")
            feed = session.check_feeds(feeds[0] if feeds else session.random_feeds())
            remote = tvm_rpc.run_remote(folder / entry["file"], [feed[info.name] for info in session.inputs], rpc, runs)
            value = remote.latency.median_ms
            source = f"measured on the {remote.device}, {entry['file']}, median of {remote.latency.runs} runs"
        elif target == manifest["target"]["name"] and manifest.get("lut") and executor is None:
            # An FPGA-style target: nothing here runs its engine; the plan written at compile time estimates it.
            value = float(manifest["lut"]["step_latency_us"]) / 1e3
            source = f"estimated for {target} by the LUT engine plan (lut/plan.json), not measured"
        elif target == manifest["target"]["name"] and not (_device_elsewhere(target) and executor is None):
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
            metrics = _evaluate(_RunAdapter(reference), _RunAdapter(session), feeds)
            source = f"measured here on {len(feeds)} samples against the float reference"
        else:
            accuracy = manifest["measured"]["accuracy"]
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
            gate_report.Check(
                "accuracy drop", max_accuracy_drop, pipeline.accuracy_drop(metrics), "pt", f"{kind}, {source}"
            )
        )
    if max_size_mb is not None:
        file_name = manifest["executors"][session.executor]["file"]
        size = (folder / file_name).stat().st_size / 1e6
        checks.append(gate_report.Check("size", max_size_mb, size, "MB", f"{file_name} ({session.executor}'s file)"))
    return checks


def _host_reference_target() -> dict[str, Any]:
    """The host build that rounds as AArch64 code does (FMA contraction), when this CPU has FMA."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    return tvm_backend.cross.HOST_REFERENCE if " fma " in flags else {"kind": "llvm"}


def verify(
    path: str | os.PathLike[str],
    emulate: bool = False,
    cpu: str | None = None,
    feeds: Feed | None = None,
) -> list[dict[str, Any]]:
    """Check an artifact: every file's sha256 (always), the ELF header of every cross-compiled library,
    and with ``emulate`` a run of each aarch64 library under qemu as ``cpu`` (default: the target's
    ``mcpu``) compared with the same graph built for and run on this machine.

    Returns one record per check (``check``, ``passed``, ``detail`` and figures). Tolerance of the emulated
    run: max |difference| <= 1e-5 x max(1, max |host output|); with the FMA-contracting host build the
    outputs are expected to be bit-identical, and ``bit_exact`` says whether they were.
    """
    folder = Path(path)
    session = load_artifact(folder, "onnxruntime-fp32")
    manifest = session.manifest
    records: list[dict[str, Any]] = [
        {"check": "sha256", "passed": True, "detail": f"{len(manifest['files'])} files match the manifest"}
    ]
    for name, entry in manifest["executors"].items():
        if entry["kind"] != "tvm" or "arch" not in entry:
            continue
        toolchain = tvm_backend.cross.TOOLCHAINS[entry["arch"]]
        info = tvm_backend.cross.check_elf(folder / entry["file"], toolchain)
        abi = f", float ABI {info.float_abi}" if info.float_abi else ""
        records.append({"check": f"{name}: ELF", "passed": True, "detail": f"{toolchain.arch}, ELF{info.bits}{abi}"})
        if not emulate:
            continue
        if not toolchain.runnable or "runner" not in entry:
            records.append(
                {
                    "check": f"{name}: emulated run",
                    "passed": None,
                    "detail": entry.get("cannot_run", f"no TVM runtime for {toolchain.arch}: not run"),
                }
            )
            continue
        target = entry["target"].get("host", entry["target"]) if entry["target"]["kind"] != "llvm" else entry["target"]
        chosen_cpu = cpu or target.get("mcpu") or "max"
        feed = session.check_feeds(feeds) if feeds is not None else session.random_feeds()
        arrays = [feed[info.name] for info in session.inputs]
        try:
            outputs, _ = tvm_backend.cross.emulate(
                toolchain, folder, entry["file"], arrays, chosen_cpu, list(target.get("mattr", []))
            )
        except tvm_backend.cross.IllegalInstructionError as error:
            records.append({"check": f"{name}: emulated run", "passed": False, "detail": str(error)})
            continue
        references = _host_run(folder / QUANTIZED_ONNX, feed, [info.name for info in session.inputs])
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


def _host_run(onnx_path: Path, feed: Feed, input_names: list[str]) -> list[np.ndarray]:
    """Build ``onnx_path`` with TVM for this machine (rounding as AArch64 does) and run it on ``feed``."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="qcompile-host-ref-") as scratch:
        (library, *_), _ = tvm_backend.build(onnx.load(str(onnx_path)), _host_reference_target(), Path(scratch))
        executor = tvm_backend.TVMExecutor(Path(scratch) / library, input_names)
        return [np.asarray(value) for value in executor.run(feed)]


def load(path: str | os.PathLike[str], executor: str | None = None) -> Session:
    """Verify and load an artifact (see :func:`qcompile.runtime.load`)."""
    return load_artifact(Path(path), executor)


__all__ = ["compile", "gate", "load", "predicted_latency_ms", "verify", "version"]
