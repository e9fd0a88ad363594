"""The compile flow: a target's ``pipeline`` names a sequence of stages in :data:`PIPELINES`.

Every stage is a function of one :class:`Build`, the state of one compile: it reads what earlier stages
left there and adds its own part (a quantized graph, files in the staging folder, executors, manifest
sections). Adding a kind of target is a row of the table, not another branch. The manifest is assembled
from the build and written once, at the end, into a staging folder that only then becomes the artifact.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from qcompile import calibration, execution, frontend, hwmodels
from qcompile.backends import integer as integer_lowering
from qcompile.backends import lut
from qcompile.backends import tvm as tvm_backend
from qcompile.backends.integer import reference as integer_reference
from qcompile.calibration import Feed, Preprocess
from qcompile.errors import ArtifactError, BackendError, CalibrationError, UnsupportedModelError, first_line
from qcompile.flow import decoder, dynamic, measure
from qcompile.flow.decoder import CacheCodes
from qcompile.flow.feeds import feeds_from
from qcompile.flow.quantize import QuantizeOptions, QuantizeResult, per_row_activations, quantize
from qcompile.graph import clone
from qcompile.passes import last_logits, pack_int4
from qcompile.passes.dynamic_rows import MICROSOFT, blocked_products, fuse_rescales
from qcompile.passes.embedding import quantize_embeddings
from qcompile.passes.hadamard import channels_in_grid_order
from qcompile.passes.manager import PassLog
from qcompile.passes.pack_int4 import pack_int4_weights
from qcompile.passes.share_constants import share_constants
from qcompile.passes.ternarize import TernarizePass
from qcompile.runtime import tvm_runtime
from qcompile.runtime.artifact import MANIFEST, atomic_folder, dumps, sha256_file
from qcompile.runtime.manifest import Decoder, Executor, Manifest, Measured, Source, TargetInfo, TensorInfo
from qcompile.search import report

logger = logging.getLogger(__name__)

QUANTIZED_ONNX = "model.int8.onnx"
REFERENCE_ONNX = measure.REFERENCE_ONNX
TERNARY_ONNX = "model.ternary.onnx"
INTEGER_ONNX = "model.integer.onnx"
STEP_LIBRARY = "decode_step.so"
STEP_EXECUTOR = "tvm-decode"
STEP_WEIGHTS = "decode_step.weights"
# The cache positions a decode-step library holds when the model's context is longer: its attention reads every
# position, filled or not, each step (SmolLM2-135M at 511: some 18 M multiply-adds and 6 MB of 8-bit cache a
# token, against 135 M weights); a longer generation goes on decoding on onnxruntime. With the new token, 512
# positions: the attention products' widths are whole vectors (513 ran them on scalars, 6x slower).
STEP_CAPACITY = 511
DECODE_STEP_CHOICES = ("auto", "always", "off")
# A decode step streams every weight once: where most of them would be float (group-wise int4 weights, which the
# kernels do not take: SmolLM2 W4A8's step library was 590 MB and 41.5 ms against onnxruntime's 23.8), none is built.
MAX_FLOAT_WEIGHT_SHARE = 0.5
REPORT_HTML = "report.html"


def version() -> str:
    try:
        return metadata.version("qcompile")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass
class Build:
    """One compile in progress: its inputs, and what the stages have made so far."""

    source: Path
    model: ir.Model  # the normalized float model
    target: hwmodels.Target
    options: QuantizeOptions
    staging: Path
    calibration_feeds: Iterable[Feed]
    inputs: list[calibration.InputSpec]
    eval_data: Any
    preprocess: Preprocess | None
    build_tvm: bool
    progress: bool
    result: QuantizeResult | None = None
    graph: ir.Model | None = None  # what the artifact's 'onnxruntime' executor runs
    lowered: onnx.ModelProto | None = None  # the integer-only graph, when the target runs one
    host_integer: onnx.ModelProto | None = None  # the lowering a host kernel library runs
    library_estimate: dict[str, Any] | None = None  # a cross kernel library's board estimate
    sample: Feed | None = None
    written: list[str] = field(default_factory=list)
    executors: dict[str, Executor] = field(default_factory=dict)
    manifest_options: dict[str, Any] = field(default_factory=dict)
    passes: list[dict[str, Any]] = field(default_factory=list)
    layers: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    lut_plan: dict[str, Any] | None = None
    measured: Measured | None = None
    input_shapes: dict[str, Any] | None = None  # the manifest's record of how the inputs got static shapes
    causal: decoder.Layout | None = None  # a causal LM with a KV cache: its inputs and outputs
    logits_from: str | None = None  # the onnxruntime files' input that slices the sequence before the LM head
    decode_step: str = "auto"  # its decode-step library: 'auto' (shipped when faster), 'always' or 'off'
    decoder: Decoder | None = None  # how it generates
    # a decoder's decode-step executor, its cache positions, and its cache's codes (None: a float cache)
    step: tuple[str, int, CacheCodes | None] | None = None

    @property
    def toolchain(self) -> Any:
        """The cross toolchain of a TVM build for another CPU, or None."""
        integer_only = self.target.pipeline == "integer-only"
        if not self.target.backend.startswith("tvm") or integer_only:
            return None
        return tvm_backend.cross.toolchain_for(self.target.tvm_target)

    def manifest(self) -> Manifest:
        return Manifest(
            qcompile_version=version(),
            source=Source(self.source.name, sha256_file(self.source)),
            target=TargetInfo(self.target.name, self.target.description, self.target.backend, self.target.tvm_target),
            inputs=_tensor_infos((self.graph or self.model).graph.inputs),
            outputs=_tensor_infos((self.graph or self.model).graph.outputs),
            options=self.manifest_options,
            passes=[self.input_shapes, *self.passes] if self.input_shapes else self.passes,
            layers=self.layers,
            executors=self.executors,
            files={
                name: sha256_file(self.staging / name)
                for name in sorted({*self.written, *(entry.file for entry in self.executors.values())})
            },
            skipped=self.skipped,
            lut=self.lut_plan,
            measured=self.measured,
            default_executor=self.measured.default_executor if self.measured else None,
            decoder=self.decoder,
        )


Stage = Callable[[Build], None]


def _tensor_infos(values: Any) -> list[TensorInfo]:
    return [
        TensorInfo(
            str(value.name),
            tuple(int(dim) if isinstance(dim, int) else -1 for dim in value.shape),
            str(np.dtype(value.dtype.numpy())),
        )
        for value in values
    ]


def _peek(feeds: Iterable[Feed]) -> tuple[Feed, Iterable[Feed]]:
    """The first sample, and the samples with it still in front."""
    iterator = iter(feeds)
    first = next(iterator, None)
    if first is None:
        raise CalibrationError("the calibration data holds no samples; give at least one calibration sample")
    if not isinstance(first, dict):
        raise CalibrationError(f"calibration data: sample 0 is a {type(first).__name__}, not a dict of arrays")
    return first, itertools.chain([first], iterator)


# ------------------------------------------------------------------------------------------------ stages


def integer_only_options(build: Build) -> None:
    """An integer-only device has no float unit: every layer is quantized, weights int8, activations uint8."""
    options, device = build.options, build.target
    if options.bits != "8" or options.activation_bits != 8 or options.weight_block is not None:
        raise CalibrationError(
            f"target {device.name} runs int8 weights (per channel) and 8-bit activations only: "
            "drop --bits, --activation-bits and --weight-block"
        )
    if options.float_threshold:
        logger.info("target %s has no float unit: every layer is quantized (float threshold 0)", device.name)
    build.options = dataclasses.replace(options, float_threshold=0.0, integer_only=True)


def quantize_qdq(build: Build) -> None:
    """Calibrate, search or measure sensitivity, and quantize to a QDQ graph."""
    result = quantize(build.model, build.calibration_feeds, build.options, build.progress, target=build.target)
    build.result, build.graph, build.sample = result, result.model, result.sample
    build.manifest_options = dataclasses.asdict(build.options)
    build.passes = result.passes
    build.layers = [vars(record) for record in result.layers]


def lower_to_integers(build: Build) -> None:
    """The QDQ graph as an integer-only graph (ConvInteger / MatMulInteger, int32 bias, dyadic requant)."""
    assert build.graph is not None
    build.lowered, lowering = integer_lowering.lower(execution.to_proto(build.graph))
    build.passes.append(
        {
            "name": "requantize",
            "requantizations": lowering.requantizations,
            "rounding": "round half up: floor((acc * M0 + 2**(n-1)) / 2**n), M0 in [2**29, 2**30)",
            "accumulator_bounds": lowering.layers,
        }
    )


def write_onnx(build: Build) -> None:
    """The quantized and the reference ONNX files (the integer graph too, when there is one), checked."""
    assert build.graph is not None
    staging = build.staging
    build.written += execution.save(_packed(build), staging / QUANTIZED_ONNX)
    reference = clone(build.model)
    share_constants(reference)  # an exporter's tied weights (an LM head's transposed embedding table) once
    if build.causal is not None:  # the float file takes the prefill's slice too, or neither does
        sliced = last_logits.slice_before_head(reference, build.causal.logits)
        build.logits_from = build.logits_from if sliced == build.logits_from else None
    build.written += execution.save(reference, staging / REFERENCE_ONNX)
    build.executors["onnxruntime"] = Executor("onnxruntime", QUANTIZED_ONNX, "quantized QDQ model")
    build.executors["onnxruntime-fp32"] = Executor(
        "onnxruntime", REFERENCE_ONNX, "the normalized float model (reference, fallback)"
    )
    if build.sample is not None and dynamic.dynamic_dims(build.model):
        files = {"onnxruntime": QUANTIZED_ONNX, "onnxruntime-fp32": REFERENCE_ONNX}
        kept, static = dynamic.keep_dynamic_dims(
            staging, files, "onnxruntime-fp32", build.model, build.source, build.sample
        )
        served = {name: {str(axis): dim for axis, dim in axes.items()} for name, axes in kept.items()}
        for executor in files:
            build.executors[executor].dynamic_dims = served or None
        if build.input_shapes is not None:
            build.input_shapes["dynamic_in_onnxruntime"] = served
            build.input_shapes["kept_static"] = static
    onnx.checker.check_model(str(staging / QUANTIZED_ONNX), full_check=True)
    if build.lowered is not None:
        _write_integer(build, build.lowered)
        build.executors["integer"] = Executor(
            "onnxruntime",
            INTEGER_ONNX,
            "integer-only graph: ConvInteger / MatMulInteger, int32 bias, dyadic requantization",
        )
    search = next((entry for entry in build.passes if entry["name"] == "bit_search"), None)
    if search is not None:
        assert build.result is not None
        html = report.render(build.source.name, build.target.name, search, build.result.layers)
        (staging / REPORT_HTML).write_text(html)
        build.written.append(REPORT_HTML)


def _packed(build: Build) -> ir.Model:
    """The graph the 'onnxruntime' executor runs: a decoder's embedding table as int8 rows
    (:mod:`qcompile.passes.embedding`), and 4-bit blocked weights packed two to a byte where the options make
    any (:mod:`qcompile.passes.pack_int4`); online rotations read in grid order
    (:func:`qcompile.passes.hadamard.channels_in_grid_order`); per-row products rescaled by onnxruntime's fused
    kernel (:func:`qcompile.passes.dynamic_rows.fuse_rescales`); equal constants stored once
    (:mod:`qcompile.passes.share_constants`).
    The TVM library is built from the graph before any of these."""
    assert build.graph is not None
    packed = clone(build.graph)
    if build.causal:
        int4 = build.options.bits == "4" and build.options.weight_block is not None
        tables = quantize_embeddings(packed, build.options.weight_block if int4 else None)
        if tables:
            build.passes.append({"name": "embedding_rows", "tables": tables})
    count = pack_int4_weights(packed) if build.options.weight_block is not None else {}
    if any(count.values()):
        # with per-row activations, the kernel quantizes its own input rows per block at run time
        dynamic = pack_int4.kernel_quantized_inputs(packed) if per_row_activations(build.model, build.options) else 0
        build.passes.append(
            {
                "name": "pack_int4",
                "weights": count[4],
                "int8_weights": count[8],
                "inputs_quantized_by_the_kernel": dynamic,
                "kernel": f"{pack_int4.DOMAIN}.MatMulNBits (onnxruntime), accuracy_level "
                f"{pack_int4.ACCURACY_LEVEL}: int8 activations per input block x 4-bit weights packed two to a "
                "byte (or 8-bit blocked weights), int32 accumulation",
            }
        )
    grid = channels_in_grid_order(packed)  # online rotations without their last Transpose (the same products)
    if grid:
        build.passes.append({"name": "rotations_in_grid_order", "rotations": grid})
    if build.causal is not None:  # a prefill computes the logits of the last position alone
        build.logits_from = last_logits.slice_before_head(packed, build.causal.logits)
    fused = fuse_rescales(packed)  # per-row products rescaled in the GEMM's output stage
    if fused:
        build.passes.append(
            {
                "name": "fused_rescales",
                "products": fused,
                "kernel": f"{MICROSOFT}.MatMulIntegerToFloat (onnxruntime): float(acc) * channel scale from the "
                "GEMM's output stage, then times the row scale (the same float32 products as MatMulInteger, Cast, "
                "Mul, Mul)",
            }
        )
    shared = share_constants(packed)
    if shared["shared"] or shared["transposed"]:
        build.passes.append({"name": "share_constants", **shared})
    return packed


def _write_integer(build: Build, graph: onnx.ModelProto) -> None:
    graph.ir_version = execution.ORT_IR_VERSION
    (build.staging / INTEGER_ONNX).write_bytes(graph.SerializeToString())
    onnx.checker.check_model(str(build.staging / INTEGER_ONNX), full_check=True)
    build.written.append(INTEGER_ONNX)


def _host_integer_graph(build: Build, graph: onnx.ModelProto) -> onnx.ModelProto:
    """For a build for a CPU the kernels have a flavor for (this machine's, or aarch64): the QDQ graph's
    integer-only lowering, which qcompile's int8 kernels run (:func:`qcompile.backends.tvm.build_integer`); the
    layers that stay float, and ops with no integer form, are kept as float islands the kernels run in float.
    Raises :class:`~qcompile.backends.tvm.KernelsNotUsed` when the lowering refuses the graph (a float op on a
    value that has no float form there)."""
    device = build.target
    if not device.backend.startswith("tvm"):
        raise tvm_backend.KernelsNotUsed("the target is not a CPU")
    tvm_backend.kernel_flavors(device.tvm_target)  # the kernels have a flavor for its CPU, before lowering
    try:
        lowered, _ = integer_lowering.lower(graph, float_islands=True)
    except UnsupportedModelError as reason:
        raise tvm_backend.KernelsNotUsed(
            f"the quantized graph does not lower to integers: {first_line(reason)}"
        ) from reason
    except Exception as error:  # a bug in an optional speed-up: the onnxruntime files still carry the model
        logger.warning("the integer lowering failed (please report it): %s", error, exc_info=True)
        raise tvm_backend.KernelsNotUsed(
            f"internal error in the integer lowering ({type(error).__name__}: {first_line(error)}); please report it"
        ) from error
    return lowered


# Why a host build is skipped when qcompile's int8 kernels do not cover the graph: TVM's importer build is
# unscheduled on the CPU (no fusion, no tiling), measured 20-100x slower than onnxruntime's fp32 run of the same
# model; shipping it would only add megabytes and compile time spent timing it.
UNSCHEDULED_HOST_BUILD = (
    "qcompile's int8 kernels do not cover this graph, and TVM's default build of it is unscheduled: it would run "
    "far slower than onnxruntime fp32, so no library is shipped"
)


def build_library(build: Build) -> None:
    """The TVM library of the graph: qcompile's int8 kernels where the graph lowers to integers, else TVM's
    importer build; cross-compiled (with the device runner) for another CPU, CUDA source for a GPU."""
    if not build.build_tvm:
        return
    tvm_backend.await_import()  # (imported in the background while quantizing: one import at a time)
    assert build.graph is not None
    if build.causal:
        build.skipped["tvm"] = (
            "a decoder with a KV cache: a library would run only the calibration sample's sequence and cache "
            "lengths (a prefill of that many tokens), not decode steps; generation runs the onnxruntime "
            "executors, which take every length"
        )
        logger.info("TVM library not built: %s", build.skipped["tvm"])
        return
    if execution.is_large(build.graph):
        build.skipped["tvm"] = "the model's weights pass 2 GiB; the TVM ONNX importer needs one in-memory protobuf"
        logger.warning("TVM library not built: %s", build.skipped["tvm"])
        return
    staging, device, toolchain, lowered = build.staging, build.target, build.toolchain, build.lowered
    # A library is built for the calibration shapes: what the graph computes from dynamic dims is folded.
    graph = lowered if lowered is not None else execution.to_proto(frontend.specialize(build.graph))
    kernels, not_used = None, None
    try:
        kernel_graph = lowered if lowered is not None else _host_integer_graph(build, graph)
        board = device.device if toolchain is not None else None  # a cross build is estimated for its board
        kernels = tvm_backend.build_integer(kernel_graph, device.tvm_target, staging, device=board)
    except tvm_backend.KernelsNotUsed as reason:
        not_used = str(reason)
        logger.info("qcompile's int8 kernels not used: %s", not_used)
    requires_cpu = None
    if kernels is not None:
        built, built_for, built_with, build.library_estimate = kernels
        # A native build uses every instruction of this CPU model: the runtime checks the CPU it runs on.
        gpu_note, requires_cpu = None, built_for["mcpu"] if toolchain is None else None
        if lowered is None:  # a host build: the library runs the QDQ graph's integer-only lowering
            build.host_integer = kernel_graph
            build.host_integer.ir_version = execution.ORT_IR_VERSION
            (staging / INTEGER_ONNX).write_bytes(build.host_integer.SerializeToString())
            build.written.append(INTEGER_ONNX)
            built_with += (
                f"; the integer-only lowering of the quantized graph ({INTEGER_ONNX}: dyadic "
                "requantization, within a quantization step of the QDQ graph)"
            )
    elif toolchain is None and lowered is None and device.tvm_target.get("kind") == "llvm":
        build.skipped["tvm"] = f"{UNSCHEDULED_HOST_BUILD} ({not_used})"
        logger.info("TVM library not built: %s", build.skipped["tvm"])
        return
    else:
        try:
            built, gpu_note = tvm_backend.build(graph, device.tvm_target, staging)
        except BackendError as error:
            if lowered is not None:  # the integer graph's library is what this target is for
                raise
            build.skipped["tvm"] = f"{first_line(error)}; the onnxruntime files carry the model"
            logger.warning("TVM library not built: %s", build.skipped["tvm"])
            return
        built_for, built_with = device.tvm_target, "TVM's ONNX importer (Relax default build)"
    build.written += built[1:]
    executor = Executor(
        "tvm",
        built[0],
        f"TVM library of the {'integer-only' if lowered is not None else 'quantized'} graph",
        target=built_for,
        lowering=built_with,
        requires_cpu=requires_cpu,  # built with every instruction of this CPU model: the runtime checks it
        requires_flags=tvm_runtime.isa_flags() if requires_cpu else None,
    )
    if gpu_note:
        executor.kernels = built[1:]
        executor.cannot_run = (
            f"{gpu_note}. The library's CUDA module holds source only (the TVM wheel's code generator "
            "has no CUDA compiler): a device runtime cannot load it as is"
        )
    if toolchain:
        executor.arch = toolchain.arch
        executor.description += f", cross-compiled for {toolchain.arch}"
        if toolchain.runnable and not gpu_note:
            build.written += tvm_backend.cross.bundle(toolchain, staging)
            executor.runner = f"{tvm_backend.cross.DEVICE_FOLDER}/{tvm_backend.cross.RUNNER}"
        elif not gpu_note:
            executor.cannot_run = (
                f"no TVM runtime is published for {toolchain.arch}: the library is cross-compiled, linked "
                "and its ELF header checked, but it cannot be run here"
            )
    build.executors["tvm"] = executor


def build_decode_step(build: Build) -> None:
    """A decoder's decode steps on qcompile's kernels: the quantized graph specialized to one token on a cache of
    fixed size (:func:`qcompile.flow.decoder.step_graph`), lowered to integers and built like a host library,
    checked against the numpy oracle of its integer graph on a real step; for this machine, shipped when a step
    runs faster than the quantized onnxruntime graph's (timed here in interleaved rounds); for an Arm board,
    cross-compiled, run under qemu as the board's CPU for that check, and its latency there estimated (never
    timed under emulation). The manifest's decoder entry names it."""
    device, layout, toolchain = build.target, build.causal, build.toolchain
    if layout is None or not build.build_tvm or build.lowered is not None:
        return
    if build.decode_step == "off":
        build.skipped[STEP_EXECUTOR] = "not asked for (--decode-step off)"
        return
    if toolchain is not None and (not toolchain.runnable or device.tvm_target.get("kind") != "llvm"):
        build.skipped[STEP_EXECUTOR] = f"no decode-step library for {device.name}: no TVM runtime runs it there"
        return
    assert build.graph is not None and build.sample is not None and build.measured is not None
    context = decoder.context_of(build.source)
    capacity = min(context, STEP_CAPACITY) if context else STEP_CAPACITY
    started = time.perf_counter()
    try:
        step = decoder.step_graph(build.graph, layout, capacity)
        quantize_embeddings(step)  # int8 rows, as the onnxruntime file stores them (113 MB -> 28 MB for SmolLM2)
        step = frontend.specialize(step)
        if build.options.weight_block is not None and per_row_activations(build.model, build.options):
            # group-wise weights: the input quantized per block at run time, as MatMulNBits does in the onnxruntime
            # file, and each layer one int4 x int8 kernel reading the packed codes (on the static shapes)
            blocked = blocked_products(step)
            if blocked:
                build.passes.append({"name": "blocked_step_products", "layers": blocked})
        graph = execution.to_proto(step)
        integer_graph = _host_integer_graph(build, graph)
        share = decoder.float_weight_share(integer_graph, integer_reference.float_islands(integer_graph))
        if share > MAX_FLOAT_WEIGHT_SHARE:
            raise tvm_backend.KernelsNotUsed(
                f"{share:.0%} of the step's weights would be multiplied in float (the kernels take 8-bit weights "
                "per channel, and group-wise weights where the activations are quantized per row or block at run time)"
            )
        codes = decoder.quantize_cache(integer_graph, layout)  # an 8-bit cache, where the graph allows it
        board = device.device if toolchain is not None else None
        built = tvm_backend.build_integer(
            integer_graph,
            device.tvm_target,
            build.staging,
            file_name=STEP_LIBRARY,
            device=board,
            # on the host its weights go in a file of their own, read into their tensors once (on a board the
            # runner loads the library alone)
            weights_file=STEP_WEIGHTS if toolchain is None else None,
        )
    except (decoder.NoStepGraph, tvm_backend.KernelsNotUsed) as reason:
        build.skipped[STEP_EXECUTOR] = f"no decode-step library: {reason}"
        logger.info("%s", build.skipped[STEP_EXECUTOR])
        return
    files, built_for, built_with, estimate = built
    # the step graph's inputs: the model's, then the caches of per-position key scales quantize_cache added
    shapes = {
        value.name: [dim.dim_value for dim in value.type.tensor_type.shape.dim] for value in integer_graph.graph.input
    }
    dtypes = dict.fromkeys(codes.codes, "uint8") if codes else {}
    state = [list(pair) for pair in codes.scales.values()] if codes else []  # in the graph's order
    dtypes.update({scales: "float32" for scales, _ in state})
    executor = Executor(
        "tvm",
        files[0],
        f"TVM library of one decode step on a cache of {capacity} positions (qcompile's kernels)",
        target=built_for,
        lowering=f"{built_with}; the integer-only lowering of the quantized graph's decode step",
        requires_cpu=built_for["mcpu"] if toolchain is None else None,
        requires_flags=tvm_runtime.isa_flags() if toolchain is None else None,
        input_shapes=shapes,
        input_dtypes=dtypes or None,
        weights=files[1] if len(files) > 1 else None,
        state=state or None,
    )
    emulated = None
    if toolchain is not None:
        executor.arch = toolchain.arch
        executor.description += f", cross-compiled for {toolchain.arch}"
        if f"{tvm_backend.cross.DEVICE_FOLDER}/{tvm_backend.cross.RUNNER}" not in build.written:
            build.written += tvm_backend.cross.bundle(toolchain, build.staging)
        executor.runner = f"{tvm_backend.cross.DEVICE_FOLDER}/{tvm_backend.cross.RUNNER}"
        cpu, features = str(device.tvm_target.get("mcpu", "max")), list(device.tvm_target.get("mattr", []))

        def emulated(inputs: list[np.ndarray]) -> list[np.ndarray]:
            outputs, _ = tvm_backend.cross.emulate(toolchain, build.staging, files[0], inputs, cpu, features)
            return outputs

    build.executors[STEP_EXECUTOR] = executor
    build.written += files[1:]
    verdict = measure.check_decode_step(
        build.staging, build.manifest(), STEP_EXECUTOR, layout, integer_graph, build.sample, capacity, codes, emulated
    )
    if toolchain is not None:
        verdict["oracle"] += f", run under {toolchain.qemu} -cpu {device.tvm_target.get('mcpu', 'max')}"
        if estimate is not None:
            verdict["board_estimate"] = estimate
    logger.info("decode-step library built and checked in %.1f s: %s", time.perf_counter() - started, verdict)
    build.measured.accuracy["decode_step"] = verdict
    slower = toolchain is None and verdict["step_ms"][STEP_EXECUTOR] >= verdict["step_ms"]["onnxruntime"]
    if slower and build.decode_step == "auto":
        del build.executors[STEP_EXECUTOR]
        for name in files:
            (build.staging / name).unlink()
        build.skipped[STEP_EXECUTOR] = (
            "qcompile's kernels ran a decode step no faster than the quantized onnxruntime graph here "
            f"({verdict['step_ms'][STEP_EXECUTOR]:.2f} against {verdict['step_ms']['onnxruntime']:.2f} ms): not shipped"
        )
        return
    build.step = (STEP_EXECUTOR, capacity, codes)


def measure_here(build: Build) -> None:
    """Every executor this machine can run, timed; accuracy against float; the default executor."""
    assert build.result is not None
    build.measured = measure.measure(
        build.staging,
        build.manifest(),
        build.result,
        build.eval_data,
        build.inputs,
        build.preprocess,
        target_is_here=build.toolchain is None and build.lowered is None,
    )


def predict_on_board(build: Build) -> None:
    """A cross target: the default executor by prediction for the board (the cost model's for onnxruntime, the
    llvm-mca estimate for a library of qcompile's kernels)."""
    assert build.result is not None
    if build.toolchain:
        manifest = build.manifest()
        library = build.library_estimate if "tvm" in build.executors else None
        measure.predict_default(manifest, build.model, build.result, build.target, library)
        build.measured = manifest.measured


def check_integer_graph(build: Build) -> None:
    """The integer graph's executors bit-exact with the numpy oracle; the faster is the default."""
    assert build.lowered is not None and build.sample is not None
    manifest = build.manifest()
    measure.check_integer(build.staging, manifest, build.lowered, build.sample)
    build.measured = manifest.measured


def check_host_kernels(build: Build) -> None:
    """A host library on qcompile's int8 kernels bit-exact with the numpy oracle of its integer graph. One that
    is not (a bug in qcompile's kernels) is not shipped: the artifact keeps its onnxruntime executors (the
    default among them by the medians just measured), the manifest says why, and a warning asks for a report,
    rather than the whole compile failing for want of an optional executor."""
    if build.host_integer is None:
        return
    assert build.sample is not None
    manifest = build.manifest()
    failure = measure.check_kernels(build.staging, manifest, build.host_integer, build.sample)
    build.measured = manifest.measured
    if failure is None:
        return
    measured = build.measured
    assert measured is not None
    logger.warning("%s: the library is not shipped (a bug in qcompile's kernels; please report it)", failure)
    note = f"{failure}: TVM library not shipped"
    if measured.default_executor == "tvm":
        latency = measured.latency_ms
        gain = latency["onnxruntime-fp32"]["median_ms"] / latency["onnxruntime"]["median_ms"]
        measured.default_executor = "onnxruntime" if gain >= measure.CLEAR_GAIN else "onnxruntime-fp32"
        note += (
            f"; the default is {measured.default_executor} instead (onnxruntime on the quantized graph "
            f"{gain:.2f}x onnxruntime fp32 by the medians, {measure.CLEAR_GAIN:.2f}x needed)"
        )
    _unship_library(
        build,
        "qcompile's kernels disagreed with the numpy oracle of their integer graph on the calibration sample (a "
        "bug in qcompile: please report it), so the library is not shipped (the figures: measured.default_reason)",
        note,
    )


def check_emulated_kernels(build: Build) -> None:
    """A cross library on qcompile's kernels run under qemu as the target's CPU, against the numpy oracle of its
    integer graph (as :func:`check_host_kernels` does here); where nothing can emulate the target, the manifest
    says it was not run."""
    executor, toolchain = build.executors.get("tvm"), build.toolchain
    if build.host_integer is None or executor is None or toolchain is None or build.measured is None:
        return
    assert build.sample is not None
    accuracy = build.measured.accuracy
    if executor.runner is None or not toolchain.runnable:
        accuracy["tvm_vs_oracle"] = f"not run: nothing here emulates {toolchain.arch} with a TVM runtime"
        return
    target = build.target.tvm_target
    cpu = str(target.get("mcpu", "max"))
    inputs = [build.sample[value.name] for value in build.host_integer.graph.input]
    try:
        outputs, _ = tvm_backend.cross.emulate(
            toolchain, build.staging, executor.file, inputs, cpu, list(target.get("mattr", []))
        )
    except tvm_backend.cross.IllegalInstructionError as error:  # qemu's model of the CPU lacks a feature
        accuracy["tvm_vs_oracle"] = f"not run: {error}"
        logger.warning("the %s library was not checked under qemu: %s", toolchain.arch, error)
        return
    passed, detail, _ = measure.oracle_agreement(outputs, build.host_integer, build.sample)
    if not passed:
        raise ArtifactError(f"the {toolchain.arch} library of qcompile's kernels, run under qemu -cpu {cpu}, {detail}")
    accuracy["tvm_vs_oracle"] = f"{detail} on the calibration sample, run under {toolchain.qemu} -cpu {cpu}"
    logger.info("the %s library under qemu -cpu %s: %s", toolchain.arch, cpu, detail)


def drop_slow_library(build: Build) -> None:
    """A host library (qcompile's kernels) that measured no faster than onnxruntime fp32 is not shipped: its
    files are removed and the manifest says what it measured (float islands can leave a graph mostly float)."""
    measured, executor = build.measured, build.executors.get("tvm")
    if measured is None or executor is None or not executor.requires_cpu or build.lowered is not None:
        return
    latency = measured.latency_ms
    # The default was chosen on paired rounds (bench.speedup); on a tiny model the medians can disagree with it,
    # and the default executor is never dropped.
    if measured.default_executor == "tvm" or "tvm" not in latency:
        return
    if latency["tvm"]["median_ms"] < latency["onnxruntime-fp32"]["median_ms"]:
        return
    # The figures go with the other measurements (measured.default_reason); skipped stays byte-reproducible.
    figures = (
        f"qcompile's kernels ran this graph in {latency['tvm']['median_ms']:.3f} ms against onnxruntime fp32's "
        f"{latency['onnxruntime-fp32']['median_ms']:.3f} ms here (median): TVM library not shipped"
    )
    logger.info("%s", figures)
    _unship_library(
        build,
        "qcompile's kernels measured no faster than onnxruntime fp32 on the build machine, so the library is not "
        "shipped (the figures: measured.default_reason)",
        figures,
    )


def _unship_library(build: Build, skipped: str, figures: str) -> None:
    """Remove a host library (and the integer graph it runs) from the artifact being built: ``skipped`` (no
    figures, so that it stays byte-reproducible) says why, and ``figures`` join the default's reason."""
    measured, executor = build.measured, build.executors["tvm"]
    assert measured is not None
    build.skipped["tvm"] = skipped
    measured.default_reason = f"{measured.default_reason}; {figures}"
    for name in (executor.file, INTEGER_ONNX):
        (build.staging / name).unlink(missing_ok=True)
        if name in build.written:
            build.written.remove(name)
    del build.executors["tvm"]
    measured.latency_ms.pop("tvm", None)
    for key in [key for key in measured.accuracy if "tvm" in key]:
        del measured.accuracy[key]
    build.host_integer = None


def ternarize(build: Build) -> None:
    """Ternary weights and per-row int8 activations (no calibration statistics: the activation scales are
    computed at run time); the calibration data gives the sample latencies and agreement are measured on."""
    sample = next(iter(calibration.checked(build.calibration_feeds, build.inputs, "calibration data")), None)
    if sample is None:
        raise CalibrationError("the calibration data is empty")
    build.sample = sample
    ternary = clone(build.model)
    ternarizer = TernarizePass(build.options.ternary_scales)
    PassLog().run(ternarizer, ternary)
    logger.info("ternarized %d layers", len(ternarizer.layers))
    build.graph = ternary
    build.manifest_options = {"ternary_scales": build.options.ternary_scales}
    build.passes = [{"name": "ternarize", "scales": build.options.ternary_scales, "layers": len(ternarizer.layers)}]
    build.layers = [
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
        for layer in ternarizer.layers
    ]


def write_lut_package(build: Build) -> None:
    """The ternary graph, the reference, and the ``lut/`` package (packed weights, kernels, engine, plan)."""
    assert build.graph is not None
    staging = build.staging
    proto = execution.to_proto(build.graph)
    build.written += execution.save(build.graph, staging / TERNARY_ONNX)
    build.written += execution.save(build.model, staging / REFERENCE_ONNX)
    onnx.checker.check_model(str(staging / TERNARY_ONNX), full_check=True)
    lut_files, plan = lut.build(proto, build.target, staging)
    build.written += lut_files
    build.executors = {
        "onnxruntime": Executor(
            "onnxruntime", TERNARY_ONNX, "ternary graph: int8 rows x ternary weights in MatMulInteger"
        ),
        "onnxruntime-fp32": Executor("onnxruntime", REFERENCE_ONNX, "the float model"),
        "lut": Executor(
            "lut",
            lut.GRAPH,
            "table-lookup TVM kernels on this machine (the FPGA engine's host simulation)",
            kernels=lut.KERNELS,
        ),
    }
    keys = ("weights_on_chip", "weight_bytes", "resources", "step_latency_us", "bound", "estimate")
    build.lut_plan = {key: plan[key] for key in keys}


def measure_lut(build: Build) -> None:
    """The ternary executors timed here; the LUT executor's agreement with onnxruntime's integer kernels."""
    assert build.sample is not None
    build.measured = measure.measure_lut(build.staging, build.manifest(), build.sample, build.eval_data, build.inputs)


# A target's `pipeline` (its target file) -> the stages that compile for it, in order.
QDQ_STAGES: tuple[Stage, ...] = (quantize_qdq, write_onnx, build_library, measure_here)
PIPELINES: dict[str, tuple[Stage, ...]] = {
    # predict_on_board: a target file of the user's own may name an edge CPU with the host's pipeline
    "w8a8": (*QDQ_STAGES, check_host_kernels, drop_slow_library, build_decode_step, predict_on_board),
    "w8a8-cross": (*QDQ_STAGES, predict_on_board, check_emulated_kernels, build_decode_step),
    "w8a8-cuda": (*QDQ_STAGES, predict_on_board),
    "integer-only": (integer_only_options, quantize_qdq, lower_to_integers, *QDQ_STAGES[1:], check_integer_graph),
    "lut": (ternarize, write_lut_package, measure_lut),
}


# The pipelines whose onnxruntime executors keep the model's dynamic dims.
DYNAMIC_PIPELINES = frozenset({"w8a8", "w8a8-cross", "w8a8-cuda"})


# What each pipeline writes, and where its figures come from: `qcompile targets` prints it.
PIPELINE_SUMMARIES: dict[str, str] = {
    "w8a8": "QDQ model (onnxruntime) + TVM library for this CPU; measured here",
    "w8a8-cross": "QDQ model + TVM library cross-compiled for the board (aarch64: qcompile's kernels, checked "
    "under qemu, with a Python-free runner); estimated here (llvm-mca, cost model), measured with bench --rpc",
    "w8a8-cuda": "QDQ model + CUDA kernels (source, and a fatbin where nvcc exists); compile-only here",
    "integer-only": "integer-only graph (ConvInteger / MatMulInteger, dyadic requantization) and its TVM build; "
    "simulated here, bit-exact with the numpy oracle",
    "lut": "ternary graph + lut/ package (packed weights, table-lookup kernels, FPGA engine C++, plan); "
    "the device latency is the plan's estimate",
}


def _describe_decoder(build: Build, causal: decoder.Layout, tokenizer: Path | None) -> None:
    """The manifest's decoder entry and the tokenizer, or why the artifact cannot generate."""
    logits = next(value for value in build.model.graph.outputs if value.name == causal.logits)
    vocabulary = logits.shape[-1] if logits.shape is not None and isinstance(logits.shape[-1], int) else None
    build.decoder, why = decoder.describe(causal, build.source, build.staging, build.executors, tokenizer, vocabulary)
    if build.decoder is not None and build.logits_from is not None:
        build.decoder = dataclasses.replace(build.decoder, logits_from=build.logits_from)
    if build.decoder is not None and build.step is not None:
        name, capacity, codes = build.step
        build.decoder = dataclasses.replace(
            build.decoder,
            step_executor=name,
            step_capacity=capacity,
            **CacheCodes.decoder_fields(codes),
        )
    if why is not None:
        build.skipped["generate"] = why
        logger.warning("the artifact cannot generate: %s", why)
    elif build.decoder is not None:
        build.written += [name for name in (build.decoder.tokenizer, build.decoder.chat_template) if name is not None]


def targets() -> list[tuple[str, str, str]]:
    """``(name, description, what its pipeline writes)`` for every bundled target."""
    rows = []
    for name in hwmodels.available_targets():
        target = hwmodels.load_target(name)
        rows.append((name, target.description, PIPELINE_SUMMARIES[target.pipeline]))
    return rows


def compile_model(
    model_path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    target: str = "host",
    calibration_data: str | os.PathLike[str] | Iterable[Feed] | None = None,
    eval_data: str | os.PathLike[str] | Iterable[Feed] | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    options: QuantizeOptions | None = None,
    preprocess: Preprocess | None = None,
    build_tvm: bool = True,
    force: bool = False,
    progress: bool = True,
    tokenizer: str | os.PathLike[str] | None = None,
    decode_step: str = "auto",
) -> Manifest:
    """Compile the ONNX model at ``model_path`` for ``target`` into the artifact folder ``output`` (see
    :func:`qcompile.api.compile`). Returns the manifest written. On any error nothing is left at ``output``."""
    if decode_step not in DECODE_STEP_CHOICES:
        raise CalibrationError(f"decode_step {decode_step!r} is not one of {', '.join(DECODE_STEP_CHOICES)}")
    device = hwmodels.load_target(target)  # its pipeline is one of PIPELINES' (checked there)
    stages = PIPELINES[device.pipeline]
    if build_tvm and build_library in stages and device.backend.startswith("tvm"):
        tvm_backend.import_in_background()  # needed after quantization: loaded meanwhile
    options = (options or QuantizeOptions()).for_target(device)
    source = Path(model_path)
    raw = frontend.load_model(source)
    # The first sample fixes the dims the model leaves dynamic (unless --input-shape does) and shows the
    # shapes shape inference cannot tell; every later sample must agree with it.
    declared = calibration.input_specs(raw)
    causal = decoder.layout([spec.name for spec in declared], [str(value.name) for value in raw.graph.outputs])
    calibration_source = feeds_from(calibration_data, declared, preprocess, "calibration")
    if causal is not None:  # a decoder's samples may hold its tokens alone (the prefill of an empty cache)
        calibration_source = decoder.completed(calibration_source, causal, declared)
        if eval_data is not None:
            eval_data = list(
                decoder.completed(feeds_from(eval_data, declared, preprocess, "evaluation"), causal, declared)
            )
    first, calibration_feeds = _peek(calibration_source)
    first = next(iter(calibration.split_batch(first, declared)))  # a stacked batch of a static-batch model
    shapes, from_sample = frontend.shapes_from_sample(raw, first, input_shapes, source.name)
    # The onnxruntime files keep the dims fixed from the sample dynamic (an integer-only or ternary graph
    # is static throughout: its lowering and kernels are built for one shape).
    dynamic_inputs = frozenset(from_sample) if device.pipeline in DYNAMIC_PIPELINES else frozenset()
    model = frontend.normalize(raw, shapes, name=source.name, sample=first, dynamic_inputs=dynamic_inputs)
    inputs = calibration.input_specs(model)
    with atomic_folder(Path(output), overwrite=force) as staging:
        build = Build(
            source,
            model,
            device,
            options,
            staging,
            calibration_feeds,
            inputs,
            eval_data,
            preprocess,
            build_tvm,
            progress,
            causal=causal,
            decode_step=decode_step,
            input_shapes={
                "name": "input_shapes",
                "given": {key: list(value) for key, value in (input_shapes or {}).items()},
                "from_first_sample": {key: list(value) for key, value in from_sample.items()},
            },
        )
        for stage in stages:
            stage(build)
        if causal is not None and device.pipeline in DYNAMIC_PIPELINES:
            _describe_decoder(build, causal, Path(tokenizer) if tokenizer is not None else None)
        manifest = build.manifest()
        (staging / MANIFEST).write_text(dumps(manifest))
    logger.info("wrote %s (default executor %s)", output, manifest.default_executor)
    return manifest
