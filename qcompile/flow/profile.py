"""Measure layers on this machine and calibrate the cost model: what ``qcompile profile`` runs.

Per-layer times come from onnxruntime's own profiler (the executor qcompile's host artifacts default to),
run on the whole model so that each layer is timed in its real context: caches, layouts and fusions as
in deployment. onnxruntime renames the nodes it fuses; :func:`layer_times` maps its kernels back to the
source model's nodes (node names and value names, with ORT's suffixes stripped; a fused node named with a
counter, such as a SkipLayerNormalization, by the value it writes in the optimized graph). Kernels that map
to no node (the graph's input quantization, reshapes onnxruntime inserts) are reported as unattributed.

Calibration measures three fixed sweep networks built here with random weights, a MobileNetV2-style CNN
(with dense 3x3 convolutions added), a pre-norm transformer with a causal mask and a post-norm one with a
key-padding mask, each as fp32, as qcompile's W8A8 QDQ model and as W8A16, and fits the cost model's
factors per layer kind and compute dtype to every node. Their shapes
are not those of the bundled example models, so predicting those tests the model rather than looking up a
measurement. Layers are timed inside whole networks because timing them alone misleads: measured here,
a depthwise convolution ran 1.65x slower inside EfficientNet-Lite0 than alone with the same shape.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import scipy.optimize
from tqdm import tqdm

from qcompile import execution, frontend
from qcompile.calibration import Feed
from qcompile.errors import TargetError
from qcompile.flow.quantize import QuantizeOptions, quantize
from qcompile.graph import layer_name
from qcompile.hwmodels import Target
from qcompile.hwmodels.cost import FLOAT, INT8, W8A16, Calibration, Choice, CostModel, compute_dtype, fit_factors
from qcompile.hwmodels.layers import FUSED_AFTER_COMPUTE, LayerSpec, describe, layer_edges
from qcompile.runtime import bench
from qcompile.search.choices import as_pipeline_sees_it, quantized_choices

logger = logging.getLogger(__name__)

_ORT_SUFFIXES = re.compile(
    r"(_token_\d+|_nchwc|/MatMulAddFusion|/MatMulScaleFusion/?|_reshape_input|_reshape_output|_flat_input"
    r"|_QuantizeLinear|_DequantizeLinear|_quant|_Fused)$"
)


# Kernels never attributed by the value they write: layout changes (float/int8 crossing costs) and kernels
# missing from the optimized graph (op type unknown, None).
_LAYOUT_KERNELS = frozenset({"ReorderInput", "ReorderOutput", "Transpose", None})


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


def layer_times(model: ir.Model, kernels: execution.KernelTimes) -> tuple[dict[str, float], float]:
    """Kernel times mapped to ``model``'s nodes (summed per node), and the time that maps to none.

    A kernel belongs to the node its name derives from or, failing that (onnxruntime names the nodes it
    fuses, such as SkipLayerNormalization, with a counter), to the node that writes the value it writes;
    layout changes onnxruntime inserts (reorders, transposes) stay unattributed: they are the cost of
    crossing between float and int8 regions, which the cost model prices per crossing."""
    aliases = _aliases(model)
    times: dict[str, float] = {}
    unattributed = 0.0
    for kernel, duration in kernels.times.items():
        name = kernel
        while name not in aliases:
            stripped = _ORT_SUFFIXES.sub("", name)
            if stripped == name:
                if kernels.op_types.get(kernel) not in _LAYOUT_KERNELS:
                    name = next((value for value in kernels.outputs.get(kernel, ()) if value in aliases), kernel)
                break
            name = stripped
        if name in aliases:
            times[aliases[name]] = times.get(aliases[name], 0.0) + duration
        else:
            unattributed += duration
    return times, unattributed


# ---------------------------------------------------------------------------------------------- the sweep


class _Net:
    """A tiny graph builder for the sweep networks; shapes come from the frontend's shape inference."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[ir.Node] = []
        self.constants: list[ir.Value] = []
        self.count = 0

    def _name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}_{self.count}"

    def constant(self, array: np.ndarray) -> ir.Value:
        name = self._name("c")
        value = ir.Value(
            name=name,
            shape=ir.Shape(array.shape),
            type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
            const_value=ir.tensor(array, name=name),
        )
        self.constants.append(value)
        return value

    def weight(self, *shape: int, fan_in: int) -> ir.Value:
        return self.constant((self.rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32))

    def op(self, op_type: str, inputs: list[ir.Value], **attributes: Any) -> ir.Value:
        name = self._name(op_type.lower())
        output = ir.Value(name=name)
        self.nodes.append(ir.node(op_type, inputs, attributes=attributes, outputs=[output], name=f"node_{name}"))
        return output

    def conv(self, x: ir.Value, cin: int, cout: int, kernel: int, stride: int = 1, group: int = 1) -> ir.Value:
        w = self.weight(cout, cin // group, kernel, kernel, fan_in=cin // group * kernel * kernel)
        b = self.constant(np.zeros(cout, np.float32))
        pads = [kernel // 2] * 4
        return self.op("Conv", [x, w, b], group=group, strides=[stride, stride], pads=pads, kernel_shape=[kernel] * 2)

    def relu6(self, x: ir.Value) -> ir.Value:
        low, high = self.constant(np.array(0.0, np.float32)), self.constant(np.array(6.0, np.float32))
        return self.op("Clip", [x, low, high])

    def linear(self, x: ir.Value, depth: int, width: int) -> ir.Value:
        product = self.op("MatMul", [x, self.weight(depth, width, fan_in=depth)])
        return self.op("Add", [product, self.constant(np.zeros(width, np.float32))])

    def model(self, inputs: list[ir.Value], output: ir.Value) -> ir.Model:
        graph = ir.Graph(
            inputs, [output], nodes=self.nodes, initializers=self.constants, opset_imports={"": 18}, name="sweep"
        )
        model = ir.Model(graph, ir_version=10, producer_name="qcompile-profile")
        return frontend.normalize(model, name="sweep network")


def _input(name: str, shape: tuple[int, ...], dtype: ir.DataType = ir.DataType.FLOAT) -> ir.Value:
    return ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype))


def mobile_cnn() -> tuple[ir.Model, list[Feed]]:
    """A MobileNetV2-style network (widths 32..320, expansion 6, 3x3 and 5x5 depthwise) plus dense 3x3 convs."""
    net = _Net(1)
    image = _input("image", (1, 3, 224, 224))
    x = net.relu6(net.conv(image, 3, 32, 3, 2))
    channels, size = 32, 112
    blocks = [(16, 1, 3, 1), (24, 6, 3, 2), (24, 6, 5, 1), (32, 6, 3, 2), (32, 6, 3, 1), (64, 6, 5, 2)]
    blocks += [(64, 6, 3, 1), (96, 6, 3, 1), (96, 6, 5, 1), (160, 6, 5, 2), (160, 6, 3, 1), (320, 6, 3, 1)]
    for width, expansion, kernel, stride in blocks:
        hidden = channels * expansion
        y = net.relu6(net.conv(x, channels, hidden, 1)) if expansion > 1 else x
        y = net.relu6(net.conv(y, hidden, hidden, kernel, stride, group=hidden))
        y = net.conv(y, hidden, width, 1)
        x = net.op("Add", [x, y]) if stride == 1 and width == channels else y
        channels, size = width, size // stride
    for width in (256, 256):  # dense 3x3 convolutions, as in ResNets
        x = net.relu6(net.conv(x, channels, width, 3))
        channels = width
    x = net.relu6(net.conv(x, channels, 1024, 1))
    pooled = net.op("Flatten", [net.op("GlobalAveragePool", [x])])
    logits = net.op("Gemm", [pooled, net.weight(1000, 1024, fan_in=1024)], transB=1)
    rng = np.random.default_rng(2)
    feeds = [{"image": rng.standard_normal((1, 3, 224, 224)).astype(np.float32)} for _ in range(4)]
    return net.model([image], logits), feeds


def small_transformer(
    width: int = 256, heads: int = 4, hidden: int = 1024, length: int = 128, post_norm: bool = False, seed: int = 3
) -> tuple[ir.Model, list[Feed]]:
    """Two encoder layers of a width unlike MiniLM's: pre-norm with a causal mask (GPT-style) or post-norm
    with a key-padding mask input, half the keys padded (BERT-style, as a padded batch runs). Masks matter to
    the timing: onnxruntime's Softmax runs several times slower on rows holding masked (hugely negative)
    scores than on random ones. GELU is written out with Erf as torch.onnx exports it."""
    net = _Net(seed)
    tokens = _input("x", (1, length, width))
    inputs = [tokens]
    x: ir.Value = tokens
    head = width // heads
    huge = np.finfo(np.float32).min
    if post_norm:
        mask = _input("mask", (1, 1, 1, length))
        inputs.append(mask)
    else:
        mask = net.constant(np.triu(np.full((length, length), huge, np.float32), k=1)[None, None])
    split = net.constant(np.array([1, length, heads, head], np.int64))
    merge = net.constant(np.array([1, length, width], np.int64))

    def norm(value: ir.Value) -> ir.Value:
        gamma, beta = net.constant(np.ones(width, np.float32)), net.constant(np.zeros(width, np.float32))
        return net.op("LayerNormalization", [value, gamma, beta], axis=-1)

    def attention(value: ir.Value) -> ir.Value:
        q, k, v = (net.op("Reshape", [net.linear(value, width, width), split]) for _ in range(3))
        q = net.op("Transpose", [q], perm=[0, 2, 1, 3])
        k = net.op("Transpose", [k], perm=[0, 2, 3, 1])
        v = net.op("Transpose", [v], perm=[0, 2, 1, 3])
        scores = net.op("Mul", [net.op("MatMul", [q, k]), net.constant(np.array(head**-0.5, np.float32))])
        context = net.op("MatMul", [net.op("Softmax", [net.op("Add", [scores, mask])], axis=-1), v])
        context = net.op("Reshape", [net.op("Transpose", [context], perm=[0, 2, 1, 3]), merge])
        return net.linear(context, width, width)

    def feed_forward(value: ir.Value) -> ir.Value:
        up = net.linear(value, width, hidden)
        erf = net.op("Erf", [net.op("Div", [up, net.constant(np.array(np.sqrt(2.0), np.float32))])])
        half = net.op(
            "Mul",
            [net.constant(np.array(0.5, np.float32)), net.op("Add", [erf, net.constant(np.array(1.0, np.float32))])],
        )
        return net.linear(net.op("Mul", [up, half]), hidden, width)

    for _ in range(2):
        if post_norm:
            x = norm(net.op("Add", [attention(x), x]))
            x = norm(net.op("Add", [feed_forward(x), x]))
        else:
            x = net.op("Add", [x, attention(norm(x))])
            x = net.op("Add", [x, feed_forward(norm(x))])
    rng = np.random.default_rng(seed + 1)
    padding = np.where(np.arange(length) < length // 2, 0.0, huge).astype(np.float32).reshape(1, 1, 1, length)
    feeds = [
        {"x": rng.standard_normal((1, length, width)).astype(np.float32), **({"mask": padding} if post_norm else {})}
        for _ in range(4)
    ]
    return net.model(inputs, x), feeds


def bert_like() -> tuple[ir.Model, list[Feed]]:
    """The post-norm transformer of the sweep: wider and shorter than MiniLM (512 x 32 against 384 x 64)."""
    return small_transformer(width=512, heads=8, hidden=2048, length=32, post_norm=True, seed=5)


def default_sweep() -> list[tuple[str, Callable[[], tuple[ir.Model, list[Feed]]]]]:
    """The networks ``qcompile profile`` measures: shapes of mobile CNNs and small transformers that are not
    those of the bundled example models, so that predicting those is a test of the model, not a lookup."""
    return [("mobile CNN", mobile_cnn), ("small transformer", small_transformer), ("post-norm transformer", bert_like)]


def wall_us(model: ir.Model, feed: Feed, runs: int, sessions: int = 3) -> float:
    """End-to-end time of ``model`` under onnxruntime: the best of ``sessions`` fresh sessions' medians
    (see :func:`qcompile.execution.kernel_times` for why sessions differ)."""
    medians = []
    for _ in range(sessions):
        session = execution.session(model)
        medians.append(bench.measure(lambda: session.run(None, feed), runs=runs, warmup=3).median_ms * 1e3)  # noqa: B023
    return float(min(medians))


@dataclass(frozen=True)
class Measurement:
    network: str
    layer: LayerSpec
    choice: Choice
    measured_us: float


def sweep_options() -> QuantizeOptions:
    """Quick quantization for timing only: the graph is what matters, not the rounding."""
    return QuantizeOptions(
        calibration="minmax",
        bias_correction="none",
        weight_rounding="nearest",
        float_threshold=0.0,
        sensitivity_samples=1,
    )


def measure_transitions(
    model: ir.Model, feeds: list[Feed], runs: int, cost: CostModel
) -> list[tuple[float, float, float]]:
    """``(unexplained us, elements, count)`` of float/int8 transitions in mixed versions of ``model`` (every
    second, then every third compute layer float): wall time the per-node model does not explain."""
    rewritten = as_pipeline_sees_it(model)
    specs = describe(rewritten)
    names = [spec.name for spec in specs if spec.quantizable]
    edges = layer_edges(rewritten, names)
    rows = []
    for step in (2, 3):
        floats = frozenset(names[::step])
        mixed = quantize(model, feeds, sweep_options(), progress=False, keep_float=floats).model
        choices = quantized_choices(rewritten, floats)
        explained = cost.model_latency_ms(specs, choices) * 1e3
        crossing = [elements for producer, consumer, elements in edges if (producer in floats) != (consumer in floats)]
        rows.append((wall_us(mixed, feeds[0], runs) - explained, float(sum(crossing)), float(len(crossing))))
    return rows


def with_conversions(graph: ir.Model, times: dict[str, float]) -> dict[str, float]:
    """``times`` with each compute layer of a QDQ ``graph`` charged for the DequantizeLinear nodes that feed it
    and the QuantizeLinear (and code Clip) behind them, shared among their readers: where onnxruntime does not
    fuse them into an integer kernel (16-bit activations), they run as kernels of their own, per layer."""
    charged = dict(times)
    for node in graph.graph:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        for value in node.inputs[:2]:
            chain = []
            producer = value.producer() if value is not None else None
            while producer is not None and producer.op_type in ("DequantizeLinear", "Clip", "QuantizeLinear"):
                chain.append(producer)
                producer = producer.inputs[0].producer() if producer.inputs[0] is not None else None
            readers = max(len(value.uses()), 1) if value is not None else 1
            extra = sum(times.get(layer_name(step), 0.0) for step in chain) / readers
            if extra:
                charged[layer_name(node)] = charged.get(layer_name(node), 0.0) + extra
    return charged


def measure_network(name: str, model: ir.Model, feeds: list[Feed], runs: int) -> tuple[list[Measurement], float]:
    """Every node's time in ``model`` as fp32, as qcompile's W8A8 model and as W8A16 (int8 weights, 16-bit
    activations, whose conversions are charged to the layers: :func:`with_conversions`); and the time between
    kernels per node."""
    import dataclasses

    quantized = quantize(model, feeds, sweep_options(), progress=False).model
    wide_options = dataclasses.replace(sweep_options(), activation_bits=16)
    wide = quantize(model, feeds, wide_options, progress=False).model
    rewritten = as_pipeline_sees_it(model)
    specs = describe(rewritten)
    measurements: list[Measurement] = []
    overheads = []
    int8_choices = quantized_choices(rewritten)
    wide_choices = {name: W8A16 if choice == INT8 else choice for name, choice in int8_choices.items()}
    for graph, choices in ((rewritten, {}), (quantized, int8_choices), (wide, wide_choices)):
        kernels = execution.kernel_times(graph, feeds[0], runs)
        times, _ = layer_times(graph, kernels)
        if graph is wide:
            times = with_conversions(graph, times)
        wall = wall_us(graph, feeds[0], runs)
        running = sum(1 for spec in specs if not spec.free)
        overheads.append(max(wall - sum(kernels.times.values()), 0.0) / running)
        for spec in specs:
            if not spec.free and spec.name in times:
                measurements.append(Measurement(name, spec, choices.get(spec.name, FLOAT), times[spec.name]))
    return measurements, float(np.median(overheads))


def _fit(target: Target, measurements: list[Measurement], machine: dict[str, Any]) -> Calibration:
    """The cost model's factors per ``kind/dtype``, fitted to every measured layer."""
    cost = CostModel(target)
    groups: dict[str, list[Measurement]] = {}
    for item in measurements:
        if item.measured_us > 0 and math.isfinite(cost.roofline_us(item.layer, item.choice)):
            groups.setdefault(f"{item.layer.kind}/{compute_dtype(item.choice, target)}", []).append(item)
    calibration = Calibration(target.name, machine=machine)
    for key, items in sorted(groups.items()):
        roofline = np.array([cost.roofline_us(item.layer, item.choice) for item in items])
        measured = np.array([item.measured_us for item in items])
        elements = np.array([item.layer.input_elements + item.layer.output_elements for item in items], float)
        weights = np.array([item.layer.weight_elements for item in items], float)
        calibration.factors[key], error = fit_factors(roofline, elements, weights, measured)
        calibration.fit[key] = {"layers": len(items), "rms_relative_error": error}
    return calibration


def calibrate(target: Target, runs: int = 30, progress: bool = True) -> tuple[Calibration, list[Measurement]]:
    """Measure the sweep networks here as fp32 and int8, and fit the cost model's factors to every node."""
    if target.name != "host":
        raise TargetError(
            f"profiling '{target.name}' needs that device; this machine profiles only the host: run a TVM RPC "
            f"server on the board and pass --rpc HOST:PORT"
        )
    started = time.perf_counter()
    measurements: list[Measurement] = []
    overheads = []
    show = progress and sys.stderr.isatty()
    networks = [(name, *build()) for name, build in default_sweep()]
    for name, model, feeds in tqdm(networks, desc="profiling", unit="network", disable=not show, file=sys.stderr):
        found, overhead = measure_network(name, model, feeds, runs)
        measurements += found
        overheads.append(overhead)
    calibration = _fit(target, measurements, bench.machine())
    calibration.node_overhead_us = float(np.median(overheads))
    fitted = CostModel(target, calibration)
    transitions = [row for _, model, feeds in networks for row in measure_transitions(model, feeds, runs, fitted)]
    unexplained, elements, counts = (np.array(column) for column in zip(*transitions, strict=True))
    solution, _ = scipy.optimize.nnls(np.stack([elements, counts], axis=1), np.maximum(unexplained, 0.0))
    calibration.transition = (float(solution[0]), float(solution[1]))
    calibration.fit["transitions"] = {"networks": len(transitions), "unexplained_us": unexplained.tolist()}
    calibration.fit["seconds"] = time.perf_counter() - started
    logger.info("profiled %d nodes in %.1f s", len(measurements), calibration.fit["seconds"])
    return calibration, measurements


def single_layer(model: ir.Model, node: ir.Node, seed: int = 0) -> tuple[ir.Model, list[Feed]]:
    """``node`` of ``model`` alone: its activations become graph inputs (random data of their shapes), its
    constants stay constants."""
    rng = np.random.default_rng(seed)
    inputs: list[ir.Value] = []
    constants: list[ir.Value] = []
    wired: list[ir.Value | None] = []
    for value in node.inputs:
        if value is None:
            wired.append(None)
            continue
        copy = ir.Value(name=str(value.name), shape=value.shape, type=value.type, const_value=value.const_value)
        (constants if value.const_value is not None else inputs).append(copy)
        wired.append(copy)
    outputs = [ir.Value(name=str(value.name), shape=value.shape, type=value.type) for value in node.outputs]
    alone = ir.Node(
        node.domain, node.op_type, wired, attributes=list(node.attributes.values()), outputs=outputs, name=node.name
    )
    graph = ir.Graph(
        inputs, outputs, nodes=[alone], initializers=constants, opset_imports=dict(model.opset_imports), name="layer"
    )
    feeds = [
        {
            str(value.name): rng.standard_normal(value.shape.numpy()).astype(value.dtype.numpy())  # type: ignore[union-attr]
            for value in inputs
        }
    ]
    return ir.Model(graph, ir_version=10, producer_name="qcompile-profile"), feeds


def calibrate_remote(
    target: Target, address: str, runs: int = 10, max_layers: int | None = None, progress: bool = True
) -> tuple[Calibration, list[Measurement]]:
    """Measure the sweep networks' compute layers on a remote board through TVM RPC, and fit the cost model.

    Each distinct Conv / Gemm / MatMul of the sweep networks is cut out alone (:func:`single_layer`), as fp32
    and as qcompile's W8A8 QDQ layer, built with TVM for ``target`` (cross-compiled as for an artifact),
    uploaded, and timed on the board's clock. TVM 0.27's Relax VM has no per-kernel profiler, so layers are
    timed alone here, unlike on the host; the calibration therefore describes what the board's TVM build
    runs. The per-call overhead comes from a one-element Add; float/int8 transitions keep their defaults.
    ``max_layers`` (per network) shortens the sweep.
    """
    import tempfile

    from qcompile.backends import tvm as tvm_backend
    from qcompile.backends.tvm import rpc

    started = time.perf_counter()
    rpc.time_libraries([], address)  # fail now, not after minutes of building, when nothing answers there
    show = progress and sys.stderr.isatty()
    cases: list[tuple[str, LayerSpec, Choice, ir.Model, list[Feed]]] = []
    for name, build in default_sweep():
        model, _ = build()
        rewritten = as_pipeline_sees_it(model)
        seen: set[tuple[Any, ...]] = set()
        chosen = []
        for node, spec in zip(rewritten.graph, describe(rewritten), strict=True):
            key = (spec.kind, spec.macs, spec.weight_elements, spec.input_elements)
            if spec.quantizable and key not in seen:
                seen.add(key)
                chosen.append((node, spec))
        for node, spec in chosen[:max_layers]:
            alone, feeds = single_layer(rewritten, node)
            cases.append((name, spec, FLOAT, alone, feeds))
            quantized = quantize(alone, feeds, sweep_options(), progress=False).model
            cases.append((name, spec, INT8, quantized, feeds))
    overhead_net = _Net(0)
    x = _input("x", (1,))
    overhead_model = overhead_net.model([x], overhead_net.op("Add", [x, overhead_net.constant(np.ones(1, np.float32))]))
    with tempfile.TemporaryDirectory(prefix="qcompile-profile-") as scratch:
        libraries = []
        for index, (_, _, _, model, feeds) in enumerate(
            tqdm(cases, desc="building layers", unit="layer", disable=not show, file=sys.stderr)
        ):
            (library, *_), _ = tvm_backend.build(
                execution.to_proto(model), target.tvm_target, Path(scratch), f"layer_{index}.so"
            )
            libraries.append((Path(scratch) / library, [feeds[0][str(value.name)] for value in model.graph.inputs]))
        (library, *_), _ = tvm_backend.build(
            execution.to_proto(overhead_model), target.tvm_target, Path(scratch), "overhead.so"
        )
        libraries.append((Path(scratch) / library, [np.ones(1, np.float32)]))
        times = rpc.time_libraries(libraries, address, runs)
    measurements = [
        Measurement(name, spec, choice, measured)
        for (name, spec, choice, _, _), measured in zip(cases, times[:-1], strict=True)
    ]
    calibration = _fit(target, measurements, {"cpu": f"remote board at {address}", "via": "TVM RPC", "executor": "tvm"})
    calibration.node_overhead_us = times[-1]
    calibration.fit["transitions"] = "not measured remotely: defaults"
    calibration.fit["seconds"] = time.perf_counter() - started
    logger.info("profiled %d layers remotely in %.1f s", len(measurements), calibration.fit["seconds"])
    return calibration, measurements


def spearman(predicted: list[float], measured: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    import scipy.stats

    if len(predicted) < 2:
        return math.nan
    return float(scipy.stats.spearmanr(predicted, measured).statistic)
