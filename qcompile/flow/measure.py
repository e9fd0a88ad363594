"""Measuring an artifact while it is written: latency of every executor here, accuracy against the float
model, the integer graphs against their numpy oracle, and the choice of the default executor (measured
for this machine's targets, predicted by the cost model for a board nothing here can run)."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from qcompile import calibration, frontend, hwmodels
from qcompile.backends.integer import reference as integer_reference
from qcompile.calibration import Feed, Preprocess
from qcompile.errors import ArtifactError
from qcompile.flow import decoder
from qcompile.flow.feeds import feeds_from
from qcompile.flow.quantize import QuantizeResult, output_metrics
from qcompile.hwmodels.cost import INT8, CostModel
from qcompile.hwmodels.layers import describe
from qcompile.runtime import Session, bench
from qcompile.runtime.manifest import Manifest, Measured
from qcompile.search.choices import as_pipeline_sees_it, quantized_choices

logger = logging.getLogger(__name__)

REFERENCE_ONNX = "reference.fp32.onnx"


def evaluate(reference: Session, quantized: Session, feeds: Iterable[Feed]) -> dict[str, Any]:
    """Stream ``feeds`` through both; metrics of the quantized outputs against the reference's, over all
    outputs, and for a model with several outputs each output's own under ``per_output``."""
    per_name: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    for feed in feeds:
        expected, produced = reference.run(feed), quantized.run(feed)
        for name, value in expected.items():
            outputs, references = per_name.setdefault(name, ([], []))
            references.append(np.asarray(value))
            outputs.append(np.asarray(produced[name]))
    every_output = [array for outputs, _ in per_name.values() for array in outputs]
    every_reference = [array for _, references in per_name.values() for array in references]
    metrics: dict[str, Any] = output_metrics(every_output, every_reference)
    metrics["samples"] = float(len(next(iter(per_name.values()))[1])) if per_name else 0.0
    if len(per_name) > 1:
        metrics["per_output"] = {name: output_metrics(*pair) for name, pair in per_name.items()}
    return metrics


# Steps applied to the onnxruntime executor's file after the QDQ graph's error was measured.
FILE_ONLY_STEPS = ("embedding_rows", "pack_int4")


def _evaluation_feeds(eval_data: Any, inputs: list[calibration.InputSpec], preprocess: Preprocess | None) -> list[Feed]:
    # A list: with an integer graph the feeds are evaluated twice (the QDQ graph, and what the device runs).
    return list(calibration.checked(feeds_from(eval_data, inputs, preprocess, "evaluation"), inputs, "evaluation data"))


# Interleaved rounds of the quantized and the float onnxruntime executors at compile time: ten pairs to take
# the median of (a sub-millisecond model's speed ratio moves by tens of percent between rounds on 2 cores).
QUANTIZED_VS_FLOAT_ROUNDS = 10
# How much faster than float a quantized executor must measure to be the default: timing the same file twice in
# one process moved sub-millisecond corpus models by up to +-15 % here, so a smaller gain is not told from noise,
# and then the float model (exact, and never slower) is the default.
CLEAR_GAIN = 1.1


# The rounds may stop after this many when they already decide the default executor (_default_settled):
# EfficientNet-Lite0's measurement took 5.3 s of a 40 s compile, half of it rounds that changed nothing.
SETTLED_ROUNDS = 5
# How unlikely the rounds' lead of one quantized executor over another must be if the two were equally fast
# (a one-sided sign test over rounds): 5 of 5 rounds, 7 of 8, 8 of 9.
SETTLED_P = 0.05


def _default_settled(round_medians: Mapping[str, Sequence[float]]) -> bool:
    """Whether the rounds so far decide the default executor: every round finds the fastest quantized
    executor clearly faster than float (by ``CLEAR_GAIN``), or none in any round; and where several quantized
    executors compete, the one with the lowest median beat each other one in enough rounds that equal speed
    would explain it with probability under ``SETTLED_P``."""
    quantized = [name for name in round_medians if name != "onnxruntime-fp32"]
    if "onnxruntime-fp32" not in round_medians or not quantized:
        return False
    fp32 = np.array(round_medians["onnxruntime-fp32"])
    times = np.array([round_medians[name] for name in quantized])  # [executor, round]
    clear = fp32 / times.min(axis=0) >= CLEAR_GAIN
    if clear.any() and not clear.all():
        return False
    if not clear.any():
        return True  # float stays the default, whichever quantized executor is faster
    leader = int(np.argmin(np.median(times, axis=1)))
    rounds = times.shape[1]
    for other in range(len(quantized)):
        if other != leader:
            wins = int((times[leader] < times[other]).sum())
            # P(at least `wins` of `rounds` fair coin flips)
            chance = sum(math.comb(rounds, k) for k in range(wins, rounds + 1)) / 2**rounds
            if chance > SETTLED_P:
                return False
    return True


def measure(
    folder: Path,
    manifest: Manifest,
    result: QuantizeResult,
    eval_data: Any,
    inputs: list[calibration.InputSpec],
    preprocess: Preprocess | None,
    target_is_here: bool = True,
) -> Measured:
    """Accuracy against float and the latency of every executor, measured now, on this machine (for a cross
    target :func:`predict_default` then chooses the default executor by prediction). The files are the ones
    just written into ``folder``: they are not verified again."""
    sample = result.sample
    reference = Session(folder, manifest, "onnxruntime-fp32")
    sessions = {"onnxruntime-fp32": reference}
    native = [
        name
        for name in ("onnxruntime", "tvm", "integer")
        if name in manifest.executors and reference.runnable_here(name)
    ]
    sessions.update({name: reference.with_executor(name) for name in native})
    # onnxruntime executors and a library on qcompile's kernels are timed in interleaved rounds (tiny models
    # differ by microseconds, whichever ran first would pay for the warm-up, and a runtime's spinning workers
    # slow the next: the kernels' EfficientNet-Lite0 library measured 3.8-4.0 ms timed after the onnxruntime
    # rounds, 2.2-2.4 ms interleaved with them); TVM's importer build can take a second per run: a few runs
    # tell that it is not the default.
    fast = {
        name: functools.partial(session.run, sample)
        for name, session in sessions.items()
        if name.startswith("onnxruntime") or (name == "tvm" and manifest.executors[name].requires_cpu)
    }
    # A pause before each round: one onnxruntime session's spinning workers otherwise slow the next (the
    # quantized ResNet-18 measured 6.6 ms beside its fp32 session without it, 2.7 ms with).
    timed_fast = bench.compare(
        fast,
        rounds=QUANTIZED_VS_FLOAT_ROUNDS,
        pause_seconds=0.1,
        settled=_default_settled,
        min_rounds=SETTLED_ROUNDS,
    )
    latencies = {name: timed.as_dict() for name, timed in timed_fast.items()}
    for name, session in sessions.items():
        if name not in fast:
            # An unscheduled TVM build takes up to seconds a run: it stops after three runs past two seconds.
            timed = bench.measure(functools.partial(session.run, sample), runs=50, warmup=1, max_seconds=2.0)
            latencies[name] = timed.as_dict()
    quantized = [name for name in ("onnxruntime", "tvm") if name in latencies]
    fastest = min(quantized, key=lambda name: latencies[name]["median_ms"])
    default: str = fastest
    reason = f"fastest quantized executor ({latencies[fastest]['median_ms']:.2f} ms median)"
    # The onnxruntime pair is decided on its paired rounds (bench.speedup); a TVM library on its median.
    float_latency = timed_fast["onnxruntime-fp32"]
    gain = (
        bench.speedup(float_latency, timed_fast[fastest])
        if fastest in timed_fast
        else float_latency.median_ms / latencies[fastest]["median_ms"]
    )
    if gain < CLEAR_GAIN:
        default = "onnxruntime-fp32"
        reason = (
            f"no quantized executor was clearly faster than float onnxruntime ({latencies[fastest]['median_ms']:.3f}"
            f" vs {latencies['onnxruntime-fp32']['median_ms']:.3f} ms median; {gain:.2f}x over paired rounds, "
            f"{CLEAR_GAIN:.2f}x needed)"
        )
        if target_is_here:
            logger.warning("%s; the default executor is the float model", reason)
    accuracy: dict[str, Any] = {"calibration": result.error}
    if any(manifest.pass_entry(name) for name in FILE_ONLY_STEPS):
        # 'calibration' is the in-memory QDQ graph's error; the file the executor runs took more steps
        accuracy["calibration_sample_file"] = evaluate(sessions["onnxruntime-fp32"], sessions["onnxruntime"], [sample])
    if "tvm" in sessions:
        difference = max(
            float(np.abs(a - b).max())
            for a, b in zip(
                sessions["tvm"].run(sample).values(), sessions["onnxruntime"].run(sample).values(), strict=True
            )
        )
        accuracy["tvm_vs_onnxruntime_max_abs_diff"] = difference
    if eval_data is not None:
        feeds = _evaluation_feeds(eval_data, inputs, preprocess)
        if "integer" in sessions:
            accuracy["evaluation_integer"] = evaluate(sessions["onnxruntime-fp32"], sessions["integer"], feeds)
        elif "tvm" in sessions and manifest.executors["tvm"].requires_cpu:
            # the host library runs the integer-only lowering: its own numerics, evaluated as well
            accuracy["evaluation_tvm"] = evaluate(sessions["onnxruntime-fp32"], sessions["tvm"], feeds)
        accuracy["evaluation"] = evaluate(sessions["onnxruntime-fp32"], sessions["onnxruntime"], feeds)
    return Measured(latencies, default, reason, accuracy, bench.machine())


def measure_lut(
    folder: Path, manifest: Manifest, sample: Feed, eval_data: Any, inputs: list[calibration.InputSpec]
) -> Measured:
    """Latencies of the ternary executors on this machine, the LUT executor's agreement with onnxruntime's
    integer kernels, and accuracy against float."""
    sessions = {"onnxruntime-fp32": Session(folder, manifest, "onnxruntime-fp32")}
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
        feeds = calibration.checked(feeds_from(eval_data, inputs, None, "evaluation"), inputs, "evaluation data")
        accuracy["evaluation"] = evaluate(sessions["onnxruntime-fp32"], sessions["onnxruntime"], feeds)
    reason = (
        f"faster ternary executor on this build machine ({latencies[default]['median_ms']:.3f} ms median); "
        "the FPGA's own latency is the plan's estimate (lut/plan.json)"
    )
    return Measured(latencies, default, reason, accuracy, bench.machine())


def _require_exact(produced: dict[str, np.ndarray], expected: list[np.ndarray], what: str) -> None:
    """``what``'s outputs equal the numpy oracle's bit for bit, or an ArtifactError (nothing is written)."""
    if not all(np.array_equal(a, b) for a, b in zip(produced.values(), expected, strict=True)):
        raise ArtifactError(f"{what} differs from the numpy oracle of the integer-only graph")


# Float islands: the library's float layers sum in another order than onnxruntime (with fused multiply-adds),
# about a float32 rounding per value, and the quantization after an island can then move codes by one step,
# which the integer layers after it carry to the outputs. How far that alone goes is measured: the oracle once
# more with its islands' outputs scaled by 1 + 2**-20 (16 float32 ulps). The library may differ from the oracle
# by a few times that spread, never by much more: a wrong kernel does.
ISLAND_PERTURBATION = 2.0**-20
ISLAND_SPREAD_FACTOR = 4.0
ISLAND_FLOOR = 1e-3  # of the output's range: the tolerance where the perturbation happens to flip no code


def _deviation(produced: list[np.ndarray], expected: list[np.ndarray]) -> tuple[float, float]:
    """The largest |difference| over every output, relative to that output's range, and the lowest cosine.
    Non-finite values must sit where the other side has the same one (a NaN or an infinity elsewhere is an
    infinite difference): a NaN would otherwise compare as no difference at all."""
    error, cosine = 0.0, 1.0
    for ours, theirs in zip(produced, expected, strict=True):
        a, b = np.asarray(ours, np.float64).ravel(), np.asarray(theirs, np.float64).ravel()
        if not a.size:
            continue
        finite = np.isfinite(a) & np.isfinite(b)
        same = (np.isnan(a) & np.isnan(b)) | (a == b)
        if not np.all(finite | same):
            return float("inf"), -1.0
        a, b = a[finite], b[finite]
        if not a.size:
            continue
        error = max(error, float(np.abs(a - b).max()) / (float(np.abs(b).max()) or 1.0))
        norms = float(np.linalg.norm(a) * np.linalg.norm(b))
        cosine = min(cosine, float(a @ b) / norms if norms else 1.0)
    return error, cosine


def check_kernels(folder: Path, manifest: Manifest, lowered: onnx.ModelProto, sample: Feed) -> str | None:
    """A host build's kernel library against the numpy oracle of its integer graph: bit for bit, or, where the
    graph keeps float layers (float islands), within a few times what float32 rounding in them alone moves the
    outputs (:data:`ISLAND_SPREAD_FACTOR`). Returns None when it passes (the manifest says how close it is),
    else how far it is."""
    assert manifest.measured is not None
    produced = list(Session(folder, manifest, "tvm").run(sample).values())
    passed, detail, _ = oracle_agreement(produced, lowered, sample)
    if not passed:
        return f"the library of qcompile's kernels {detail}"
    manifest.measured.accuracy["tvm_vs_oracle"] = f"{detail} on the calibration sample"
    return None


def oracle_agreement(produced: list[np.ndarray], lowered: onnx.ModelProto, sample: Feed) -> tuple[bool, str, bool]:
    """Outputs of a build of the integer graph ``lowered`` against its numpy oracle on ``sample``: whether they
    pass (bit for bit; with float islands, within a few times what float32 rounding in them alone moves the
    oracle), a line saying how close they are, and whether they are bit-identical."""
    expected = integer_reference.run(lowered, sample)
    islands = integer_reference.float_islands(lowered)
    exact = all(np.array_equal(a, b) for a, b in zip(produced, expected, strict=True))
    if not islands:
        return exact, "bit-exact with the numpy oracle" if exact else "differs from the numpy oracle", exact
    if exact:
        return True, f"bit-exact with the numpy oracle, its {len(islands)} node(s) kept float included", exact
    spread, spread_cosine = _deviation(integer_reference.run(lowered, sample, ISLAND_PERTURBATION), expected)
    error, cosine = _deviation(produced, expected)
    tolerance = max(ISLAND_SPREAD_FACTOR * spread, ISLAND_FLOOR)
    cosine_floor = 1.0 - ISLAND_SPREAD_FACTOR * max(1.0 - spread_cosine, ISLAND_FLOOR**2)
    if error > tolerance or cosine < cosine_floor:
        return (
            False,
            f"differs from the numpy oracle by {error:.3g} of an output's range (cosine {cosine:.6f}); float "
            f"rounding in its {len(islands)} float node(s) alone moves them {spread:.3g} (cosine {spread_cosine:.6f})",
            exact,
        )
    return (
        True,
        f"within {error:.2g} of the output range of the numpy oracle (cosine {cosine:.6f}): {len(islands)} node(s) "
        f"kept float, whose float32 rounding alone moves the oracle {spread:.2g}; bit-exact elsewhere",
        exact,
    )


def check_integer(folder: Path, manifest: Manifest, lowered: onnx.ModelProto, sample: Feed) -> None:
    """The integer graph under onnxruntime and under TVM against the numpy oracle on the calibration sample
    (bit for bit), and the faster of the two (both run the integer graph) as the default executor."""
    measured = manifest.measured
    assert measured is not None
    session = Session(folder, manifest, "integer")
    produced = session.run(sample)
    expected = integer_reference.run(lowered, sample)
    _require_exact(produced, expected, "the integer-only graph under onnxruntime")
    measured.accuracy["integer_vs_oracle"] = "bit-exact on the calibration sample"
    if "tvm" in manifest.executors:
        _require_exact(session.with_executor("tvm").run(sample), expected, "the TVM build of the integer graph")
        measured.accuracy["tvm_vs_oracle"] = "bit-exact on the calibration sample"
    measured.accuracy["integer_vs_qdq_max_abs_diff"] = max(
        float(np.abs(a - b).max())
        for a, b in zip(produced.values(), session.with_executor("onnxruntime").run(sample).values(), strict=True)
    )
    # Both run the integer graph bit for bit; the faster on this machine is the default.
    latency = measured.latency_ms
    default = min((name for name in ("integer", "tvm") if name in latency), key=lambda n: latency[n]["median_ms"])
    measured.default_executor = default
    measured.default_reason = (
        "integer-only target: the integer graph is what the device runs; "
        + ", ".join(
            f"{name} {latency[name]['median_ms']:.3f} ms median" for name in ("integer", "tvm") if name in latency
        )
        + f" here (both bit-exact with the numpy oracle): {default} is faster"
    )


def predict_default(
    manifest: Manifest,
    model: ir.Model,
    result: QuantizeResult,
    target: hwmodels.Target,
    library: dict[str, Any] | None = None,
) -> None:
    """For a cross target nothing here measures the board: the default executor is chosen by prediction, and
    the manifest says so: the cost model's for the onnxruntime executors, and for a library of qcompile's
    kernels its own estimate (``library``: :meth:`qcompile.backends.tvm.estimate.LibraryEstimate.summary`)."""
    measured = manifest.measured
    assert measured is not None
    float_layers = frozenset(record.name for record in result.layers if record.float_reason)
    quantized, floating, state = predict(model, float_layers, target)
    measured.latency_scope = "measured on this build machine, not on the target"
    measured.predicted_latency_ms = {"onnxruntime": quantized, "onnxruntime-fp32": floating, "cost_model": state}
    candidates = {"onnxruntime": quantized, "onnxruntime-fp32": floating}
    if library is not None:
        measured.predicted_latency_ms["tvm"] = library["estimated_ms"]
        measured.predicted_latency_ms["tvm_estimate"] = library
        candidates["tvm"] = library["estimated_ms"]
    measured.default_executor = min(candidates, key=lambda name: candidates[name])
    figures = f"{quantized:.2f} ms quantized vs {floating:.2f} ms float on onnxruntime"
    if library is not None:
        figures += f", and qcompile's kernels {library['estimated_ms']:.2f} ms ({library['source']})"
    measured.default_reason = (
        f"cross target {target.name}, not measured here: the cost model ({state}) predicts {figures}; "
        "measure on the board with `qcompile bench --rpc`"
    )


def predict(float_model: ir.Model, float_layers: frozenset[str], target: hwmodels.Target) -> tuple[float, float, str]:
    """The cost model's end-to-end latency on ``target`` of the quantized graph and of the float one, in ms,
    and how calibrated the model is."""
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


def predicted_latency_ms(folder: Path, manifest: Manifest, target_name: str) -> tuple[float, str]:
    """The cost model's end-to-end latency of the artifact's quantized graph on ``target_name``; for the
    artifact's own target when its default is a library of qcompile's kernels, that library's estimate."""
    predicted = manifest.measured.predicted_latency_ms if manifest.measured else None
    if target_name == manifest.target.name and predicted and "tvm" in predicted and manifest.default_executor == "tvm":
        return float(predicted["tvm"]), f"estimated for {target_name}: {predicted['tvm_estimate']['source']}"
    float_layers = frozenset(layer["name"] for layer in manifest.layers if layer["float_reason"])
    target = hwmodels.load_target(target_name)
    latency, _, state = predict(frontend.load(folder / REFERENCE_ONNX), float_layers, target)
    return latency, f"predicted for {target_name} by the cost model ({state})"


# Interleaved rounds timing a decode step of each executor at compile time.
STEP_ROUNDS = 7


def check_decode_step(
    folder: Path,
    manifest: Manifest,
    executor: str,
    layout: Any,
    lowered: onnx.ModelProto,
    sample: Feed,
    capacity: int,
    codes: decoder.CacheCodes | None,
    emulated: Callable[[list[np.ndarray]], list[np.ndarray]] | None = None,
) -> dict[str, Any]:
    """A decoder's decode-step library (``executor``, a cache of ``capacity`` positions) on a real step: the
    calibration sample's tokens prefilled by the quantized onnxruntime graph, then the token its logits pick.
    It must equal the numpy oracle of its integer graph (``lowered``; bit for bit, or within float islands'
    rounding); its logits are compared with the quantized onnxruntime graph's step on the cache of the filled
    positions alone, and with the float model's step on its own cache; the three steps are timed in interleaved
    rounds. A library for another CPU runs
    through ``emulated`` (its inputs in the graph's order, under qemu) and is not timed. Returns what the
    manifest records; raises :class:`ArtifactError` when the library disagrees with the oracle."""
    from qcompile.runtime.generate import StepCache, step_buffers

    quantized, reference = Session(folder, manifest, "onnxruntime"), Session(folder, manifest, "onnxruntime-fp32")
    entry = manifest.executors[executor]
    assert entry.input_shapes is not None
    prefill = quantized.run(sample)
    token = int(np.asarray(prefill[layout.logits])[0, -1].argmax())
    cache = {past: np.asarray(prefill[present]) for past, present in layout.cache}
    positions = next(iter(cache.values())).shape[2]
    if positions >= capacity:
        raise ArtifactError(f"the calibration sample fills {positions} cache positions, past the step's {capacity}")
    step_decoder = decoder.decoder_entry(
        layout, executors=[], step_capacity=capacity, **decoder.CacheCodes.decoder_fields(codes)
    )
    steps = StepCache(step_decoder, step_buffers(entry, {info.name: info for info in manifest.inputs}))
    steps.start(cache)
    feeds = {name: array.copy() for name, array in steps.feeds(token).items()}
    if emulated is None:
        stepper = Session(folder, manifest, executor)
        produced = list(stepper.run(feeds).values())
    else:
        produced = emulated([feeds[value.name] for value in lowered.graph.input])
    passed, detail, _ = oracle_agreement(produced, lowered, feeds)
    if not passed:
        raise ArtifactError(f"the decode-step library {detail}")
    unpadded: Feed = {layout.input_ids: np.asarray([[token]], dtype=np.int64), **cache}
    if layout.attention_mask is not None:
        unpadded[layout.attention_mask] = np.ones((1, positions + 1), dtype=np.int64)
    if layout.position_ids is not None:
        unpadded[layout.position_ids] = np.asarray([[positions]], dtype=np.int64)
    logits = np.asarray(produced[[info.name for info in manifest.outputs].index(layout.logits)])
    # against the quantized graph's step on the same cache, and the float model's step on its own cache
    float_prefill = reference.run(sample)
    float_step = {**unpadded, **{past: np.asarray(float_prefill[present]) for past, present in layout.cache}}
    agreement = {}
    for name, session, feed in (("onnxruntime", quantized, unpadded), ("onnxruntime-fp32", reference, float_step)):
        theirs = np.asarray(session.run(feed)[layout.logits])
        agreement[name] = output_metrics([logits.reshape(1, -1)], [theirs.reshape(1, -1)])  # top-1: the next token
    verdict: dict[str, Any] = {
        "capacity": capacity,
        "oracle": f"{detail} on a decode step after the calibration sample",
        "logits_vs": agreement,
    }
    if emulated is not None:
        return verdict
    timed = bench.compare(
        {
            executor: functools.partial(stepper.run, feeds),
            "onnxruntime": functools.partial(quantized.run, unpadded),
            "onnxruntime-fp32": functools.partial(reference.run, unpadded),
        },
        rounds=STEP_ROUNDS,
        pause_seconds=0.1,
    )
    verdict["cache_positions_timed"] = positions
    verdict["step_ms"] = {name: latency.median_ms for name, latency in timed.items()}
    verdict["speedup_over_onnxruntime"] = bench.speedup(timed["onnxruntime"], timed[executor])
    verdict["speedup_over_fp32"] = bench.speedup(timed["onnxruntime-fp32"], timed[executor])
    return verdict
