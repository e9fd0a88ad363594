"""Measure layers on this machine and calibrate the cost model: what ``qcompile profile`` runs.

Per-layer times come from onnxruntime's own profiler (the executor qcompile's host artifacts default to),
run on the whole model so that each layer is timed in its real context: caches, layouts and fusions as
in deployment. onnxruntime renames the nodes it fuses; :func:`layer_times` maps its kernels back to the
source model's nodes (node names and value names, with ORT's suffixes stripped). Kernels that map to no
node (layout reorders, the graph's input quantization) are reported as unattributed.

Calibration measures a fixed sweep of single-layer models (convolutions, depthwise and pointwise
convolutions, GEMMs and activation-by-activation MatMuls of the shapes found in mobile CNNs and small
transformers, each as fp32 and as int8 QDQ) and fits the cost model's ``a * roofline + b`` per layer kind
and compute dtype, so that a model's own layers are predicted from measurements of other layers.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from tqdm import tqdm

from qcompile.backends import ort as ort_backend
from qcompile.calibration import Feed
from qcompile.hwmodels import Target
from qcompile.hwmodels.cost import FLOAT, INT8, Calibration, Choice, CostModel, compute_dtype, fit_factors
from qcompile.hwmodels.layers import FUSED_AFTER_COMPUTE, LayerSpec, describe
from qcompile.passes.annotate import AnnotatePass, plan_quantization_points
from qcompile.passes.qdq import QDQPass
from qcompile.runtime import bench

logger = logging.getLogger(__name__)

_ORT_SUFFIXES = re.compile(
    r"(_token_\d+|_nchwc|/MatMulAddFusion|/MatMulScaleFusion/?|_reshape_input|_reshape_output|_flat_input"
    r"|_QuantizeLinear|_DequantizeLinear|_quant|_Fused)$"
)


def _aliases(model: ir.Model) -> dict[str, str]:
    """Every name onnxruntime may derive a kernel name from -> the source node it belongs to."""
    aliases: dict[str, str] = {}
    for spec, node in zip(describe(model), model.graph, strict=True):
        owner = spec.name
        if node.op_type in FUSED_AFTER_COMPUTE and spec.free:
            producer = node.inputs[0].producer() if node.inputs[0] is not None else None
            owner = aliases.get(str(producer.name), owner) if producer is not None else owner
        for name in (str(node.name), *(str(value.name) for value in node.outputs)):
            aliases.setdefault(name, owner)
    return aliases


def layer_times(model: ir.Model, kernels: dict[str, float]) -> tuple[dict[str, float], float]:
    """Kernel times mapped to ``model``'s nodes (summed per node), and the time that maps to none."""
    aliases = _aliases(model)
    times: dict[str, float] = {}
    unattributed = 0.0
    for kernel, duration in kernels.items():
        name = kernel
        while name not in aliases:
            stripped = _ORT_SUFFIXES.sub("", name)
            if stripped == name:
                break
            name = stripped
        if name in aliases:
            times[aliases[name]] = times.get(aliases[name], 0.0) + duration
        else:
            unattributed += duration
    return times, unattributed


def quantized_choices(model: ir.Model, float_layers: frozenset[str] = frozenset()) -> dict[str, Choice]:
    """The choice of every node once ``model`` is quantized W8A8 as the pipeline does it: int8 compute
    layers, int8 Add / Concat / pooling where the int8 flow reaches them, float elsewhere."""
    layers, points = plan_quantization_points(model, float_layers)
    names = {str(value.name) for value in points}
    choices = {spec.name: INT8 for spec in describe(model) if spec.name in {_name(node) for node in layers}}
    for node, spec in zip(model.graph, describe(model), strict=True):
        if spec.kind == "other" and any(value is not None and str(value.name) in names for value in node.inputs):
            choices[spec.name] = INT8
    return choices


def _name(node: ir.Node) -> str:
    return str(node.name or node.outputs[0].name)


# ---------------------------------------------------------------------------------------------- the sweep


def _value(name: str, shape: tuple[int, ...]) -> ir.Value:
    return ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(ir.DataType.FLOAT))


def _constant(name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(
        name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.FLOAT), const_value=ir.tensor(array)
    )
    return value


@dataclass(frozen=True)
class Probe:
    """One single-layer model of the sweep, before quantization."""

    label: str
    build: Callable[[], tuple[ir.Model, Feed]]


def _model(nodes: list[ir.Node], inputs: list[ir.Value], output: ir.Value, constants: list[ir.Value]) -> ir.Model:
    graph = ir.Graph(inputs, [output], nodes=nodes, initializers=constants, opset_imports={"": 21}, name="probe")
    return ir.Model(graph, ir_version=10, producer_name="qcompile-profile")


def conv_probe(cin: int, cout: int, size: int, kernel: int, stride: int = 1, depthwise: bool = False) -> Probe:
    def build() -> tuple[ir.Model, Feed]:
        rng = np.random.default_rng(0)
        group = cin if depthwise else 1
        out_size = (size + 2 * (kernel // 2) - kernel) // stride + 1
        x = _value("x", (1, cin, size, size))
        w = _constant("w", rng.standard_normal((cout, cin // group, kernel, kernel)).astype(np.float32) * 0.1)
        b = _constant("b", rng.standard_normal(cout).astype(np.float32))
        y = _value("y", (1, cout, out_size, out_size))
        pad = kernel // 2
        node = ir.node(
            "Conv",
            [x, w, b],
            attributes={"group": group, "strides": [stride, stride], "pads": [pad] * 4, "kernel_shape": [kernel] * 2},
            outputs=[y],
            name="layer",
        )
        return _model([node], [x], y, [w, b]), {"x": rng.standard_normal((1, cin, size, size)).astype(np.float32)}

    kind = "depthwise" if depthwise else ("pointwise" if kernel == 1 else "conv")
    return Probe(f"{kind} {cin}->{cout} {kernel}x{kernel}/{stride} @{size}", build)


def gemm_probe(rows: int, depth: int, cols: int) -> Probe:
    def build() -> tuple[ir.Model, Feed]:
        rng = np.random.default_rng(0)
        x = _value("x", (rows, depth))
        w = _constant("w", rng.standard_normal((cols, depth)).astype(np.float32) * 0.05)
        b = _constant("b", rng.standard_normal(cols).astype(np.float32))
        y = _value("y", (rows, cols))
        node = ir.node("Gemm", [x, w, b], attributes={"transB": 1}, outputs=[y], name="layer")
        return _model([node], [x], y, [w, b]), {"x": rng.standard_normal((rows, depth)).astype(np.float32)}

    return Probe(f"gemm {rows}x{depth}x{cols}", build)


def matmul_probe(batch: int, rows: int, depth: int, cols: int) -> Probe:
    def build() -> tuple[ir.Model, Feed]:
        rng = np.random.default_rng(0)
        a, b = _value("a", (batch, rows, depth)), _value("b", (batch, depth, cols))
        y = _value("y", (batch, rows, cols))
        node = ir.node("MatMul", [a, b], outputs=[y], name="layer")
        feed = {
            "a": rng.standard_normal((batch, rows, depth)).astype(np.float32),
            "b": rng.standard_normal((batch, depth, cols)).astype(np.float32),
        }
        return _model([node], [a, b], y, []), feed

    return Probe(f"matmul {batch}x{rows}x{depth}x{cols}", build)


def default_sweep() -> list[Probe]:
    """Layer shapes of mobile CNNs (ImageNet resolutions) and small transformers (widths 256 to 1536)."""
    probes = [conv_probe(3, 32, 224, 3, 2), conv_probe(32, 64, 56, 3), conv_probe(64, 128, 28, 3)]
    probes += [conv_probe(128, 256, 14, 3), conv_probe(256, 256, 7, 3)]
    for cin, cout, size in ((16, 96, 112), (96, 24, 56), (24, 144, 56), (144, 40, 28), (40, 240, 28)):
        probes.append(conv_probe(cin, cout, size, 1))
    for cin, cout, size in ((240, 80, 14), (80, 480, 14), (480, 112, 14), (672, 192, 7), (192, 1152, 7)):
        probes.append(conv_probe(cin, cout, size, 1))
    probes.append(conv_probe(320, 1280, 7, 1))
    for channels, size, kernel, stride in (
        (32, 112, 3, 1),
        (96, 112, 3, 2),
        (144, 56, 3, 1),
        (144, 56, 5, 2),
        (240, 28, 5, 1),
        (480, 14, 3, 1),
        (672, 14, 5, 2),
        (1152, 7, 5, 1),
    ):
        probes.append(conv_probe(channels, channels, size, kernel, stride, depthwise=True))
    for rows, depth, cols in ((1, 1280, 1000), (1, 576, 1536), (8, 576, 1536), (64, 256, 256), (128, 384, 1536)):
        probes.append(gemm_probe(rows, depth, cols))
    probes += [gemm_probe(128, 1536, 384), gemm_probe(32, 768, 768)]
    probes += [matmul_probe(12, 128, 32, 128), matmul_probe(12, 128, 128, 32), matmul_probe(8, 64, 64, 64)]
    return probes


def _quantize_probe(model: ir.Model) -> ir.Model:
    """The probe as the W8A8 pipeline emits it, with its output requantized as the next layer would."""
    output = model.graph.outputs[0]
    result = _value("result", tuple(int(dim) for dim in output.shape.numpy()))  # type: ignore[union-attr]
    # An Add of the output to itself: the int8 flow reaches it, so the layer's output is quantized.
    model.graph.append(ir.node("Add", [output, output], outputs=[result], name="requantize"))
    model.graph.outputs[0] = result
    AnnotatePass(lambda name: (-8.0, 8.0))(model)
    QDQPass()(model)
    return model


@dataclass(frozen=True)
class Measurement:
    label: str
    layer: LayerSpec
    choice: Choice
    measured_us: float
    run_overhead_us: float


def measure_probe(probe: Probe, choice: Choice, runs: int) -> Measurement:
    model, feed = probe.build()
    (layer,) = [spec for spec in describe(model) if spec.quantizable]
    if choice == INT8:
        model = _quantize_probe(model)
    kernels = ort_backend.kernel_times(model, feed, runs)
    times, _ = layer_times(model, kernels)
    session = ort_backend.session(model)
    wall = bench.measure(lambda: session.run(None, feed), runs=runs, warmup=3).median_ms * 1e3
    return Measurement(probe.label, layer, choice, times.get("layer", 0.0), max(wall - sum(kernels.values()), 0.0))


def calibrate(
    target: Target, probes: list[Probe] | None = None, runs: int = 30, progress: bool = True
) -> tuple[Calibration, list[Measurement]]:
    """Measure ``probes`` (the default sweep) as fp32 and int8 here and fit the cost model's factors."""
    if target.name != "host":
        from qcompile.errors import TargetError

        raise TargetError(
            f"profiling '{target.name}' needs that device; this version measures only the host (remote boards "
            "through TVM RPC are not supported yet)"
        )
    probes = probes or default_sweep()
    started = time.perf_counter()
    measurements = []
    show = progress and sys.stderr.isatty()
    jobs = [(probe, choice) for probe in probes for choice in (FLOAT, INT8)]
    for probe, choice in tqdm(jobs, desc="profiling", unit="layer", disable=not show, file=sys.stderr):
        measurements.append(measure_probe(probe, choice, runs))
    model = CostModel(target)
    groups: dict[str, list[Measurement]] = {}
    for item in measurements:
        if item.measured_us > 0:
            groups.setdefault(f"{item.layer.kind}/{compute_dtype(item.choice, target)}", []).append(item)
    calibration = Calibration(target.name, machine=bench.machine())
    for key, items in sorted(groups.items()):
        roofline = np.array([model.roofline_us(item.layer, item.choice) for item in items])
        measured = np.array([item.measured_us for item in items])
        scale, overhead, error = fit_factors(roofline, measured)
        calibration.factors[key] = (scale, overhead)
        calibration.fit[key] = {"layers": len(items), "rms_relative_error": error, "efficiency": 1 / scale}
    calibration.run_overhead_us = float(np.median([item.run_overhead_us for item in measurements]))
    calibration.fit["seconds"] = time.perf_counter() - started
    logger.info("profiled %d layers in %.1f s", len(measurements), calibration.fit["seconds"])
    return calibration, measurements


def spearman(predicted: list[float], measured: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    import scipy.stats

    if len(predicted) < 2:
        return math.nan
    return float(scipy.stats.spearmanr(predicted, measured).statistic)
