"""The W8A8 quantization pipeline: calibrate, measure sensitivity, annotate, correct, insert QDQ.

The pass order is fixed here and checked, not left to comments: annotation must precede bias
correction (which reads the weight specs) and QDQ insertion (which consumes them).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompile import calibration, execution, hwmodels
from qcompile.calibration import Feed
from qcompile.errors import BudgetError, CalibrationError
from qcompile.flow import decoder
from qcompile.graph import clone, layer_name
from qcompile.hwmodels import Target
from qcompile.passes.annotate import AnnotatePass, plan_quantization_points, quantizable_layers
from qcompile.passes.bias_correction import BiasCorrectionPass, refit_biases
from qcompile.passes.dynamic_rows import DynamicActivationsPass
from qcompile.passes.equalize import ResidualEqualizationPass
from qcompile.passes.gptq import GPTQPass, Hessian, HessianCollector
from qcompile.passes.hadamard import HadamardRotationPass, Rotation
from qcompile.passes.manager import PassLog
from qcompile.passes.matmul_to_gemm import MatMulAddToGemmPass
from qcompile.passes.qdq import QDQPass
from qcompile.passes.quant_spec import ACTIVATION_FORMATS, WEIGHT_FORMATS
from qcompile.passes.smoothquant import Decision, SmoothQuantPass, producer_statistics
from qcompile.passes.split_layers import Split, SplitLayersPass
from qcompile.search import sensitivity
from qcompile.search.allocate import CANDIDATES, Allocation, candidate_formats
from qcompile.search.bits import SearchResult, within_accuracy
from qcompile.search.bits import search as search_bits

BIAS_CORRECTIONS = ("sequential", "expected", "none")
ACTIVATION_MODES = ("auto", "static", "dynamic")
# The value of an outlier-rewrite option that the target's recipe decides (its target file's [recipe]).
FROM_TARGET = "target"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizeOptions:
    """Options of the W8A8 pipeline; every field is recorded in the manifest.

    Attributes:
        calibration: activation range method: 'minmax', 'percentile' (99.99) or 'mse'.
        bias_correction: 'sequential' (fold the expected weight-rounding shift into biases, then refit each
            Conv / Gemm bias in graph order so that its output mean in the quantized model matches the float
            model's on the first ``bias_samples`` samples: one quantized-model session per layer),
            'expected' (the first step only) or 'none'.
        equalize: fold SmoothQuant-style per-channel scales into the writers and readers of residual streams
            (off by default: on EfficientNet-Lite0 it raised the held-out output error from 2.4e-3 to
            3.3e-3 at alpha 0.5 and 2.6e-3 at alpha 0.9).
        equalize_alpha: the SmoothQuant migration strength of those scales.
        weight_rounding: 'nearest' (round to nearest) or 'gptq' (error-compensating, needs calibration rows).
        float_threshold: a layer whose quantization alone moves the outputs by more than this relative
            squared error stays float (0 disables the fallback: every layer is quantized).
        max_calibration_samples: stop calibrating after this many samples (None: use them all).
        sensitivity_samples: calibration samples kept in memory to measure layer sensitivity and error.
        bias_samples: calibration samples kept in memory for the sequential bias refit (measured on
            EfficientNet-Lite0: 16 samples gave 94.5 % top-1 agreement over six evaluation sets, 32 gave 95.1 %).
        bits: '8' (int8 weights), '4' (int4 weights), '2' (2-bit weights: codes -2, -1, 0, 1 x an MSE-fitted
            scale per channel, e.g. SplitQuant's INT2) or 'auto': per-layer formats (fp32, int8, int4, int2 or
            ternary weights, int8 activations) chosen by the search under the budgets below.
        activation_bits: 8 (uint8 activations) or 4 (uint4 codes, clamped in uint8 storage: for accuracy
            studies such as W4A4; the bit-width search always uses 8).
        activations: how the inputs of linear layers with int8 weights are quantized: 'static' (one scale per
            tensor, chosen at calibration), 'dynamic' (one scale per row, the token, computed at run time:
            :mod:`qcompile.passes.dynamic_rows`) or 'auto': dynamic for a causal LM with a KV cache, whose tokens'
            ranges differ by orders of magnitude (SmolLM2-135M W8A8 perplexity +8.7 % static, +1.6 % dynamic),
            static otherwise. Needs a float unit: integer-only targets take 'static' ('auto' is static there).
            The calibration, sensitivity and search measure the static form; the final model is rewritten.
        weight_block: None (one scale per output channel) or a block size: each output channel of a 2-D
            MatMul / Gemm weight gets one scale per block of this many input channels (group-wise, as GGUF
            and AWQ store 4-bit weights); weights whose inputs the blocks cannot tile stay per channel.
            Not combinable with ``bits='auto'`` (the size model prices per-channel scales).
        latency_budget_ms: the search's end-to-end latency budget on the target (cost-model prediction).
        size_budget_mb: the search's budget for the bytes of weights and constants.
        max_accuracy_drop: with ``bits='auto'``, the search's accuracy budget in percentage points against the
            float model (:func:`accuracy_drop`), measured on the samples held in memory: of the Pareto points
            within the latency and size budgets, the fastest whose measured drop is within it is chosen.
        smoothquant: (this and the next two: :data:`FROM_TARGET`, the default, takes the target's recipe)
            fold SmoothQuant scales into the producers of MatMul / Gemm / Conv inputs (LayerNorm,
            linear layers; never a runtime Mul): None (off), an alpha in [0, 1], or 'auto' (alpha searched per
            producer on calibration rows). See :mod:`qcompile.passes.smoothquant`.
        rotate: None, 'hadamard', 'hadamard-residual' or 'auto': rotate MatMul / Gemm inputs by randomized Hadamard
            matrices, folded into a linear producer where one can take it, else as an online transform (exact in
            float). 'hadamard-residual' first rotates a pre-norm transformer's whole residual stream offline
            (QuaRot): fewer online transforms, but the activations after each RMSNorm lose its weight's
            damping of outlier channels, which per-tensor static activation scales pay for at 4 bits
            (SmolLM2-135M with SmoothQuant, perplexity: W8A8 +2.5 % vs +2.7 %; W4A8 +17.8 % vs +15.8 %).
            'auto' is 'hadamard' for a sequence model (a linear layer reads more than one row) and nothing
            otherwise (a CNN's classifier reads one row): all-MiniLM-L6-v2 W8A8 keeps every layer int8 at
            held-out mean cosine 0.9994 with it, where without it 9 of 36 layers stay float at 0.9983.
        split_layers: split every Conv / Gemm / MatMul into three layers holding the low, middle and high
            k-means clusters of its weights, summed after (SplitQuant; exact in float, 3x the layer's MACs).
        sensitivity: how the search gets each layer's error per format: 'measured' (run every format of
            every layer) or 'hessian' (measure int8 only; scale it by the Hessian-weighted weight-error ratio
            of the other formats, for layers with a Hessian: about a third of the runs).
        ternary_scales: for the LUT pipeline (target fpga-lut): the absmean scale of ternary weights per
            output 'channel' or one per 'tensor' (BitNet b1.58). See :mod:`qcompile.passes.ternarize`.
        integer_only: set for integer-only targets (int8-npu): also quantize around Sigmoid / Tanh /
            HardSigmoid / HardSwish, which the integer graph computes as 256-entry tables.
    """

    calibration: str = "mse"
    bias_correction: str = "sequential"
    equalize: bool = False
    equalize_alpha: float = 0.5
    weight_rounding: str = "gptq"
    float_threshold: float = 1e-3
    max_calibration_samples: int | None = None
    sensitivity_samples: int = 16
    bias_samples: int = 32
    bits: str = "8"
    activation_bits: int = 8
    activations: str = "auto"
    weight_block: int | None = None
    latency_budget_ms: float | None = None
    size_budget_mb: float | None = None
    max_accuracy_drop: float | None = None
    sensitivity: str = "measured"
    smoothquant: float | str | None = FROM_TARGET
    split_layers: bool | str = FROM_TARGET
    rotate: str | None = FROM_TARGET
    ternary_scales: str = "channel"
    integer_only: bool = False

    def __post_init__(self) -> None:
        if self.bits not in ("8", "4", "2", "auto"):
            raise CalibrationError(f"bits '{self.bits}' is not 8, 4, 2 or auto")
        if self.activation_bits not in ACTIVATION_FORMATS:
            raise CalibrationError(f"activation bits {self.activation_bits} is not one of {sorted(ACTIVATION_FORMATS)}")
        if self.weight_block is not None and (self.weight_block < 2 or self.bits == "auto"):
            raise CalibrationError("weight blocks must hold >= 2 inputs, and cannot be combined with --bits auto")
        if self.activations not in ACTIVATION_MODES:
            raise CalibrationError(f"activations '{self.activations}' is not one of {', '.join(ACTIVATION_MODES)}")
        if self.activations == "dynamic" and (self.activation_bits != 8 or self.integer_only):
            raise CalibrationError(
                "dynamic activations are 8-bit codes with a float scale per row: they need --activation-bits 8 "
                "and a target with a float unit"
            )
        if self.bits == "auto" and self.activation_bits != 8:
            raise CalibrationError("the bit-width search chooses weight formats for int8 activations only")
        budgets = (self.latency_budget_ms, self.size_budget_mb, self.max_accuracy_drop)
        if self.bits == "auto" and all(budget is None for budget in budgets):
            raise BudgetError(
                "--bits auto needs a budget: --latency-budget-ms, --size-budget-mb and/or --max-accuracy-drop"
            )
        if self.bits != "auto" and any(budget is not None for budget in budgets):
            raise BudgetError("latency, size and accuracy budgets are met by the bit-width search: add --bits auto")
        if any(budget is not None and budget <= 0 for budget in (self.latency_budget_ms, self.size_budget_mb)):
            raise BudgetError("latency and size budgets must be positive")
        if self.max_accuracy_drop is not None and not 0 <= self.max_accuracy_drop < 100:
            raise BudgetError(f"the accuracy budget is in percentage points, 0 to 100: got {self.max_accuracy_drop}")
        if self.calibration not in ("minmax", "percentile", "mse"):
            raise CalibrationError(f"calibration method '{self.calibration}' is not minmax, percentile or mse")
        if self.bias_correction not in BIAS_CORRECTIONS:
            raise CalibrationError(
                f"bias correction '{self.bias_correction}' is not one of {', '.join(BIAS_CORRECTIONS)}"
            )
        if self.weight_rounding not in ("nearest", "gptq"):
            raise CalibrationError(f"weight rounding '{self.weight_rounding}' is not nearest or gptq")
        if self.float_threshold < 0:
            raise CalibrationError("float threshold must be >= 0")
        if self.smoothquant not in (None, "auto", FROM_TARGET) and not (
            isinstance(self.smoothquant, float | int) and 0.0 <= self.smoothquant <= 1.0
        ):
            raise CalibrationError(f"SmoothQuant alpha {self.smoothquant!r} is not a number in [0, 1] or 'auto'")
        if self.rotate not in (None, "hadamard", "hadamard-residual", "auto", FROM_TARGET):
            raise CalibrationError(f"rotation '{self.rotate}' is not hadamard, hadamard-residual or auto")
        if self.sensitivity not in ("measured", "hessian"):
            raise CalibrationError(f"sensitivity '{self.sensitivity}' is not measured or hessian")
        if self.bias_samples < 1:
            raise CalibrationError(f"bias samples (--bias-samples) must be at least 1, got {self.bias_samples}")
        if self.sensitivity_samples < 1:
            raise CalibrationError("sensitivity samples must be >= 1")
        if self.ternary_scales not in ("channel", "tensor"):
            raise CalibrationError(f"ternary scales '{self.ternary_scales}' is not channel or tensor")
        if not isinstance(self.split_layers, bool) and self.split_layers != FROM_TARGET:
            raise CalibrationError(f"split layers {self.split_layers!r} is not true, false or '{FROM_TARGET}'")

    def for_target(self, target: Target) -> QuantizeOptions:
        """These options with every outlier rewrite left to the target (:data:`FROM_TARGET`) set as the
        target's recipe says; the API and the CLI both compile through this, so they agree."""
        recipe = target.recipe or hwmodels.RECIPE_DEFAULTS
        smoothquant, rotate, split = self.smoothquant, self.rotate, self.split_layers
        if smoothquant == FROM_TARGET:
            smoothquant = None if recipe["smoothquant"] == "off" else recipe["smoothquant"]
        if rotate == FROM_TARGET:
            rotate = None if recipe["rotate"] == "none" else recipe["rotate"]
        if split == FROM_TARGET:
            split = bool(recipe["split_layers"])
        return dataclasses.replace(self, smoothquant=smoothquant, rotate=rotate, split_layers=split)


@dataclass
class LayerRecord:
    """What happened to one quantizable layer; goes into the manifest as is."""

    name: str
    op_type: str
    weight_bits: int | None
    activation_bits: int | None
    sensitivity: float | None = None
    float_reason: str | None = None
    weight_format: str | None = "int8"
    predicted_latency_us: float | None = None


@dataclass
class QuantizeResult:
    model: ir.Model
    layers: list[LayerRecord]
    passes: list[dict[str, Any]]
    calibration_samples: int
    sample: Feed
    error: dict[str, Any] = field(default_factory=dict)
    search: SearchResult | None = None
    # Another per-layer choice of formats ('fp32', 'int8', 'int4', 'ternary') on the same calibration,
    # Hessians and options: for comparing the search's Pareto points without calibrating again.
    variant: Callable[[dict[str, str]], ir.Model] | None = None


def activation_values(model: ir.Model, table_ops: bool = False) -> list[str]:
    """Names of the activations that can become quantization points when every layer is quantized."""
    _, points = plan_quantization_points(model, table_ops=table_ops)
    return [str(value.name) for value in points]


def _quantize_copy(
    model: ir.Model,
    rewrites: PassLog,
    stats: calibration.Statistics,
    float_layers: frozenset[str],
    options: QuantizeOptions,
    hessians: dict[str, Hessian] | None = None,
    weight_formats: dict[str, str] | None = None,
    activation_formats: dict[str, int] | None = None,
) -> ir.Model:
    """``model`` quantized with ``float_layers`` left float; ``weight_formats`` and ``activation_formats``
    (activation bits) per layer where they differ from the options'. ``rewrites`` are the passes that made
    ``model``: the copy's own passes must be allowed to follow them."""
    copy, passes = clone(model), rewrites.fork()
    spec = ACTIVATION_FORMATS[options.activation_bits]

    def value_range(name: str, levels: int = spec.levels) -> tuple[float, float]:
        return stats.range(name, levels)

    wide = {name: ACTIVATION_FORMATS[bits] for name, bits in (activation_formats or {}).items() if bits != spec.bits}
    annotate = AnnotatePass(
        value_range, float_layers, weight_formats, spec, options.weight_block, options.integer_only, wide
    )
    if not passes.run(annotate, copy).modified:
        return copy  # every layer stays float: nothing to round, correct or insert
    if hessians:
        passes.run(GPTQPass(hessians), copy)
    if options.bias_correction != "none":
        passes.run(BiasCorrectionPass(stats.channel_mean), copy)
    passes.run(QDQPass(), copy)
    return copy


def per_row_activations(model: ir.Model, options: QuantizeOptions) -> bool:
    """Whether ``model``'s linear layers quantize their inputs per row at run time (``options.activations``,
    'auto' deciding by the model: a causal LM with a KV cache)."""
    if options.activations != "auto":
        return options.activations == "dynamic"
    if options.integer_only or options.activation_bits != 8:
        return False
    names = ([str(value.name) for value in model.graph.inputs], [str(value.name) for value in model.graph.outputs])
    return decoder.layout(*names) is not None


def _quantize_rows(model: ir.Model) -> tuple[list[str], list[str], list[str]]:
    """Rewrite ``model``'s statically quantized linear-layer inputs, attention probabilities and keys to
    run-time scales per row (per position for the keys); (the linear layers, the probability products, the key
    products)."""
    rewrite = DynamicActivationsPass()
    rewrite(model)
    return rewrite.layers, rewrite.products, rewrite.keys


def _split_formats(formats: dict[str, str]) -> tuple[frozenset[str], dict[str, str], dict[str, int]]:
    """The float layers, weight formats and activation bits of a search allocation (layer -> candidate)."""
    floats = frozenset(name for name, chosen in formats.items() if chosen == "fp32")
    pairs = {name: candidate_formats(chosen) for name, chosen in formats.items() if chosen != "fp32"}
    return floats, {name: pair[0] for name, pair in pairs.items()}, {name: pair[1] for name, pair in pairs.items()}


def output_metrics(outputs: list[np.ndarray], references: list[np.ndarray]) -> dict[str, float]:
    """Relative squared error, mean cosine and (for 2-D outputs) top-1 agreement against float."""
    cosines = []
    agree = []
    for out, ref in zip(outputs, references, strict=True):
        flat_out, flat_ref = out.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
        norms = float(np.linalg.norm(flat_out) * np.linalg.norm(flat_ref))
        cosines.append(float(flat_out @ flat_ref) / max(norms, 1e-30))
        if ref.ndim == 2 and ref.shape[1] > 1:
            agree.extend((out.argmax(axis=1) == ref.argmax(axis=1)).tolist())
    metrics = {
        "relative_error": sensitivity.relative_error(outputs, references),
        "mean_cosine": float(np.mean(cosines)),
    }
    if agree:
        metrics["top1_agreement"] = float(np.mean(agree))
    return metrics


def accuracy_drop(metrics: dict[str, float]) -> float:
    """Percentage points: 100 x (1 - top-1 agreement) for classifiers, 100 x (1 - mean cosine) otherwise."""
    if "top1_agreement" in metrics:
        return 100.0 * (1.0 - metrics["top1_agreement"])
    return 100.0 * (1.0 - metrics["mean_cosine"])


def quantize(
    model: ir.Model,
    feeds: Iterable[Feed],
    options: QuantizeOptions | None = None,
    progress: bool = True,
    target: Target | None = None,
    keep_float: frozenset[str] = frozenset(),
) -> QuantizeResult:
    """Quantize ``model`` to QDQ (int8 activations; weights as ``options.bits`` says); ``model`` itself is
    left unchanged. ``target`` (default host) prices the bit-width search's candidates; the layers named
    in ``keep_float`` stay float whatever else is decided."""
    target = target or hwmodels.load_target("host")
    options = (options or QuantizeOptions()).for_target(target)
    model = clone(model)
    rewrites = PassLog()  # the float rewrites of `model`, in the order passes.manager.ORDER checks
    gemm_rewrite = rewrites.run(MatMulAddToGemmPass(), model)
    checked = calibration.checked(feeds, calibration.input_specs(model))
    # The first samples stay in memory (a bounded number): they choose equalization scales, measure
    # sensitivity and feed GPTQ; the stream then goes on through calibration once, without being held.
    refit_count = options.bias_samples if options.bias_correction == "sequential" else 0
    held = list(itertools.islice(checked, max(options.sensitivity_samples, refit_count)))
    kept = held[: options.sensitivity_samples]
    smoothed: list[Decision] = []
    if options.smoothquant is not None:
        absmax, rows = producer_statistics(model, kept)
        smoother = SmoothQuantPass(absmax.get, options.smoothquant, rows.get)
        rewrites.run(smoother, model)
        smoothed = smoother.decisions
    rotations: list[Rotation] = []
    if options.rotate is not None:
        rotator = HadamardRotationPass(
            residual=options.rotate == "hadamard-residual", sequences_only=options.rotate == "auto"
        )
        rewrites.run(rotator, model)
        rotations = rotator.rotations
    splits: list[Split] = []
    if options.split_layers:
        splitter = SplitLayersPass()
        rewrites.run(splitter, model)
        splits = splitter.splits
    equalized: list[list[str]] = []
    if options.equalize:
        channels = calibration.collect(
            model, kept, activation_values(model, options.integer_only), "minmax", progress=False
        )
        equalizer = ResidualEqualizationPass(channels.channel_absmax, options.equalize_alpha)
        rewrites.run(equalizer, model)
        equalized = equalizer.streams
    layers = quantizable_layers(model)
    # GPTQ's Hessians accumulate over the whole calibration stream, in the same single pass over it.
    needs_hessians = options.weight_rounding == "gptq" or (options.bits == "auto" and options.sensitivity == "hessian")
    hessian_collector = HessianCollector(model, layers) if needs_hessians else None
    stream: Iterable[Feed] = itertools.chain(held, checked)
    stats = calibration.collect(
        model,
        hessian_collector.tap(stream) if hessian_collector else stream,
        activation_values(model, options.integer_only),
        options.calibration,
        options.max_calibration_samples,
        progress,
    )
    if hessian_collector is not None:
        hessian_collector.session = None  # calibration may stop before the stream ends: release it here too
    references = sensitivity.run_all(model, kept)
    names = [layer_name(node) for node in layers]
    records = {name: LayerRecord(name, node.op_type, 8, 8) for name, node in zip(names, layers, strict=True)}
    hessians = hessian_collector.hessians if hessian_collector else None
    ratios = None
    if options.bits == "auto" and options.sensitivity == "hessian" and hessians:
        by_name = dict(zip([layer_name(node) for node in layers], layers, strict=True))
        narrow = [fmt for fmt in CANDIDATES if fmt in WEIGHT_FORMATS and fmt != "int8"]  # weight formats
        ratios = sensitivity.hessian_ratios(by_name, hessians, narrow)
    if options.weight_rounding != "gptq":
        hessians = None  # collected for the sensitivity proxy only
    uniform = {"4": "int4", "2": "int2"}.get(options.bits, "int8")
    weight_formats = {name: uniform for name in names}
    activation_formats: dict[str, int] = {}
    for record in records.values():  # what every layer gets unless the search or the fallback decides
        record.weight_format, record.weight_bits = uniform, WEIGHT_FORMATS[uniform].bits
        record.activation_bits = options.activation_bits
    float_layers: set[str] = set()
    widened: dict[str, float] = {}  # layer -> its error with int8 weights, where int8 replaced a narrower width
    searched: SearchResult | None = None
    if options.bits == "auto" and layers:
        searched = search_bits(
            model,
            names,
            [node.op_type for node in layers],
            # Round-to-nearest here: GPTQ for every layer in every format would double the search's time;
            # the chosen model is then GPTQ-rounded, so these errors are upper bounds.
            lambda layer, chosen: _quantize_copy(
                model, rewrites, stats, frozenset(names) - {layer}, options, None, *_split_formats({layer: chosen})[1:]
            ),
            kept,
            references,
            target,
            options.latency_budget_ms,
            options.size_budget_mb,
            progress,
            ratios,
        )
        if options.max_accuracy_drop is not None:
            held_references = sensitivity.run_all(model, held)

            def drop_of(point: Allocation) -> float:
                # Round-to-nearest and no bias refit, as the search's variants: conservative for the final
                # model, which GPTQ and the refit then improve.
                floats, weights, activations = _split_formats(point.formats)
                built = _quantize_copy(model, rewrites, stats, floats, options, None, weights, activations)
                return accuracy_drop(output_metrics(sensitivity.run_all(built, held), held_references))

            searched.chosen = within_accuracy(
                searched, options.latency_budget_ms, options.max_accuracy_drop, drop_of, len(held)
            )
        for cost in searched.problem.layers:
            chosen = searched.chosen.formats[cost.name]
            record = records[cost.name]
            record.sensitivity = cost.error[chosen]
            record.predicted_latency_us = cost.latency_us[chosen]
            if chosen != "fp32":
                record.weight_format, record.activation_bits = candidate_formats(chosen)
                record.weight_bits = WEIGHT_FORMATS[record.weight_format].bits
            else:
                record.weight_format, record.weight_bits = "fp32", None
                float_layers.add(cost.name)
                record.activation_bits = None
                record.float_reason = (
                    "the bit-width search kept it float: within the budgets, the least total error "
                    f"(int8 alone would add relative error {cost.error['int8']:.2e})"
                )
        _, weight_formats, activation_formats = _split_formats(searched.chosen.formats)
    elif options.float_threshold > 0 and layers:
        measured = sensitivity.measure(
            names,
            [node.op_type for node in layers],
            lambda layer: _quantize_copy(
                model, rewrites, stats, frozenset(names) - {layer}, options, None, weight_formats
            ),
            kept,
            references,
            progress,
            reference=model,
        )
        # A layer too sensitive at a narrow uniform width (int4, int2) gets a second chance at int8 weights
        # before it stays float: a float LM head of SmolLM2 W4A8 is 113 MB, the same head int8 28 MB.
        over = [result for result in measured if result.error > options.float_threshold]
        if uniform != "int8" and over:
            wider = {**weight_formats, **{result.layer: "int8" for result in over}}
            retried = sensitivity.measure(
                [result.layer for result in over],
                [result.op_type for result in over],
                lambda layer: _quantize_copy(model, rewrites, stats, frozenset(names) - {layer}, options, None, wider),
                kept,
                references,
                progress,
                reference=model,
            )
            for again in retried:
                if again.error <= options.float_threshold:
                    weight_formats[again.layer] = "int8"
                    widened[again.layer] = again.error
        for result in measured:
            layer_format = weight_formats[result.layer]
            records[result.layer].sensitivity = widened.get(result.layer, result.error)
            records[result.layer].weight_format = layer_format
            records[result.layer].weight_bits = WEIGHT_FORMATS[layer_format].bits
            if result.layer in widened:
                continue
            if result.error > options.float_threshold:
                float_layers.add(result.layer)
                records[result.layer].weight_bits = records[result.layer].activation_bits = None
                records[result.layer].weight_format = "fp32"
                records[result.layer].float_reason = (
                    f"quantizing it alone moves the outputs by relative error {result.error:.2e}, over the "
                    f"threshold {options.float_threshold:.0e}"
                )
    for name in keep_float & set(names):
        float_layers.add(name)
        records[name].weight_bits = records[name].activation_bits = None
        records[name].weight_format = "fp32"
        records[name].float_reason = records[name].float_reason or "kept float by the caller"
    quantized = _quantize_copy(
        model, rewrites, stats, frozenset(float_layers), options, hessians, weight_formats, activation_formats
    )
    refit_skipped = None
    if refit_count and execution.is_large(quantized):
        refit_skipped = "the model is over 2 GB: each layer's onnxruntime session would write it to disk again"
        logger.warning("sequential bias refit skipped (the expected-shift correction stays): %s", refit_skipped)
    refit_feeds = [] if refit_skipped else held[:refit_count]  # empty: refit_biases changes nothing
    refitted = refit_biases(model, quantized, refit_feeds, progress)
    per_row = per_row_activations(model, options)
    per_row_layers, per_row_products, per_position_keys = _quantize_rows(quantized) if per_row else ([], [], [])
    error: dict[str, Any] = output_metrics(quantized_outputs := sensitivity.run_all(quantized, kept), references)
    output_names = [str(value.name) for value in model.graph.outputs]
    if len(output_names) > 1:  # run_all lists every output of a sample, sample after sample
        count = len(output_names)
        error["per_output"] = {
            name: output_metrics(quantized_outputs[index::count], references[index::count])
            for index, name in enumerate(output_names)
        }
    logger.info("quantized %d of %d layers; %s", len(layers) - len(float_layers), len(layers), error)
    passes: list[dict[str, Any]] = [
        {"name": "matmul_add_to_gemm", "modified": gemm_rewrite.modified},
        {"name": "calibrate", "method": options.calibration, "samples": stats.samples},
        {
            "name": "smoothquant",
            "enabled": options.smoothquant is not None,
            "alpha": options.smoothquant,
            "folded": [asdict(d) for d in smoothed if d.reason is None],
            "left_alone": [asdict(d) for d in smoothed if d.reason is not None],
        },
        {
            "name": "hadamard_rotation",
            "enabled": options.rotate is not None,
            "residual_stream": options.rotate == "hadamard-residual",
            "rotations": [asdict(item) for item in rotations if item.reason is None],
            "left_alone": [asdict(item) for item in rotations if item.reason is not None],
        },
        {
            "name": "split_layers",
            "enabled": options.split_layers,
            "clusters": "1-D k-means, k=3, over each layer's weights",
            "layers": [asdict(split) for split in splits],
        },
        {
            "name": "residual_equalization",
            "alpha": options.equalize_alpha,
            "streams": len(equalized),
            "enabled": options.equalize,
        },
        {
            "name": "sensitivity",
            "samples": len(kept),
            "float_threshold": options.float_threshold,
            "float_layers": sorted(float_layers),
            "int8_instead_of_narrower": {name: widened[name] for name in sorted(widened)},
        },
        {
            "name": "annotate",
            "weights": "symmetric per-channel: "
            + ("per-layer formats" if searched else uniform)
            + (f", one scale per {options.weight_block} inputs of 2-D weights" if options.weight_block else ""),
            "activations": f"uint{options.activation_bits} asymmetric per-tensor",
        },
        {
            "name": "weight_rounding",
            "method": options.weight_rounding,
            "layers": len(hessians or {}),
            "hessian_samples": hessian_collector.samples if hessian_collector else 0,
            "damping": 0.01,
        },
        *(
            [
                {
                    "name": "bias_correction",
                    "method": options.bias_correction,
                    "refitted_layers": refitted,
                    **({"refit_skipped": refit_skipped} if refit_skipped else {}),
                }
            ]
            if options.bias_correction != "none"
            else []
        ),
        {"name": "qdq", "bias": "int32, scale = input scale x weight scale"},
        {
            "name": "dynamic_activations",
            "mode": options.activations,
            "enabled": per_row,
            "layers": len(per_row_layers),
            "probability_products": len(per_row_products),
            "codes": "uint8 = round(x / s) + 128, s = max |x| / 127 per row at run time; MatMulInteger, then "
            "float(acc) * weight scale * s",
            "probability_codes": "uint8 = round(p / s), s = max p / 255 per row at run time; MatMulInteger by "
            "the static codes of V, then float(acc) * V's scale * s",
            "key_products": len(per_position_keys),
            "key_codes": "uint8 = round(k / s) + 128, s = max |k| / 127 per position (over head_dim) at run time; "
            "MatMulInteger by the static codes of Q, then float(acc) * (s * Q's scale)",
        },
    ]
    if searched is not None:
        passes.insert(
            3,
            {
                "name": "bit_search",
                "cost_model": searched.cost_model,
                "sensitivity": options.sensitivity,
                "hessian_proxied_layers": len(ratios or {}),
                "dominated_by_fp32": searched.dominated,
                "latency_budget_ms": options.latency_budget_ms,
                "size_budget_mb": options.size_budget_mb,
                "max_accuracy_drop": options.max_accuracy_drop,
                "accuracy_checks": [
                    {"latency_ms": latency, "error": error, "accuracy_drop": drop, "samples": len(held)}
                    for latency, error, drop in searched.accuracy_checks
                ],
                "predicted": searched.chosen.summary(),
                "fixed": {"latency_ms": searched.problem.fixed_ms, "size_mb": searched.problem.fixed_mb},
                "transitions": len(searched.problem.transitions),
                "pareto_front": [point.summary() for point in searched.front],
                "candidates": {
                    cost.name: {"error": cost.error, "latency_us": cost.latency_us} for cost in searched.problem.layers
                },
                "seconds": searched.seconds,
            },
        )

    def variant(formats: dict[str, str]) -> ir.Model:
        """The model quantized with other per-layer formats, as the pipeline would finish it."""
        floats, weights, activations = _split_formats(formats)
        built = _quantize_copy(model, rewrites, stats, floats, options, hessians, weights, activations)
        refit_biases(model, built, refit_feeds)
        if per_row:
            _quantize_rows(built)
        return built

    return QuantizeResult(
        quantized, [records[name] for name in names], passes, stats.samples, kept[0], error, searched, variant
    )


__all__ = ["LayerRecord", "QuantizeOptions", "QuantizeResult", "activation_values", "quantize"]
