"""LUT backend: ternary layers as table lookups, for FPGA-style targets and as a CPU kernel.

From a graph rewritten by :class:`qcompile.passes.ternarize.TernarizePass` (int8 rows x ternary weights in
``MatMulInteger``), :func:`build` writes into the artifact's ``lut/`` folder:

- ``layer_<i>.trits5``: each layer's weights in the engine's 1.6-bit format (:mod:`.pack`);
- ``model.lut.onnx``: the graph with each such ``MatMulInteger`` replaced by ``LutMatMul`` (domain
  ``ai.qcompile.lut``, attributes ``layer``, ``k``, ``n``), the weights no longer inside;
- ``kernels.so``: the TVM table-lookup kernel (:mod:`.kernel`) of every layer, built for this machine, and
  ``kernels.aarch64.so``, the same for the board's Arm cores (NEON), when the aarch64 cross compiler is
  installed (``qcompile toolchains --install``);
- ``engine.hpp`` and ``sim_main.cpp``: the FPGA engine as HLS-style C++ and its C++ simulation (:mod:`.hls`);
- ``plan.json``: per-layer tiling, table size, weight placement, cycles, and the device's resources and
  latency (:mod:`.fpga`), an estimate.

:class:`LutExecutor` runs ``model.lut.onnx`` on the host: onnx's reference evaluator for the float glue,
the TVM kernel for every ``LutMatMul``. Its integer products are bit-exact with onnxruntime's
``MatMulInteger`` on the ternary graph.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.shape_inference

from qcompile.backends.lut import fpga, hls, kernel
from qcompile.backends.lut.pack import pack_trits5, unpack_trits5
from qcompile.backends.tvm import cross
from qcompile.errors import BackendError, UnsupportedModelError
from qcompile.hwmodels import Target

FOLDER = "lut"
GRAPH = f"{FOLDER}/model.lut.onnx"
KERNELS = f"{FOLDER}/kernels.so"
DEVICE_KERNELS = f"{FOLDER}/kernels.aarch64.so"  # for the board's Arm cores (the KV260's Cortex-A53)
PLAN = f"{FOLDER}/plan.json"
DOMAIN = "ai.qcompile.lut"
OP = "LutMatMul"


@dataclass(frozen=True)
class Layer:
    index: int
    name: str
    k: int
    n: int
    rows: int
    weights: np.ndarray  # int8 trits [K, N]

    @property
    def file(self) -> str:
        return f"{FOLDER}/layer_{self.index}.trits5"

    @property
    def function(self) -> str:
        return f"layer_{self.index}"


def ternary_layers(proto: onnx.ModelProto) -> list[Layer]:
    """Every ``MatMulInteger`` of ``proto`` whose second input is a ternary int8 initializer."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    shapes = {
        info.name: [dim.dim_value if dim.HasField("dim_value") else None for dim in info.type.tensor_type.shape.dim]
        for info in (*inferred.graph.value_info, *inferred.graph.input)
    }
    initializers = {tensor.name: tensor for tensor in proto.graph.initializer}
    layers: list[Layer] = []
    for node in proto.graph.node:
        if node.op_type != "MatMulInteger" or len(node.input) != 2 or node.input[1] not in initializers:
            continue
        weights = onnx.numpy_helper.to_array(initializers[node.input[1]])
        if weights.ndim != 2 or weights.dtype != np.int8 or not np.isin(weights, (-1, 0, 1)).all():
            continue
        shape = shapes.get(node.input[0])
        if not shape or any(dim is None for dim in shape):
            raise UnsupportedModelError(
                f"'{node.name}': the LUT kernel needs a static input shape, got {shape}; give --input-shape"
            )
        rows = int(np.prod([dim for dim in shape[:-1] if dim is not None], dtype=np.int64))
        k, n = weights.shape
        layers.append(Layer(len(layers), node.name, k=int(k), n=int(n), rows=rows, weights=weights))
    if not layers:
        raise UnsupportedModelError("the graph has no MatMulInteger with ternary weights for the LUT backend")
    return layers


def _lut_graph(proto: onnx.ModelProto, layers: list[Layer]) -> onnx.ModelProto:
    graph = onnx.ModelProto()
    graph.CopyFrom(proto)
    by_name = {layer.name: layer for layer in layers}
    dropped = set()
    for node in graph.graph.node:
        layer = by_name.get(node.name)
        if node.op_type != "MatMulInteger" or layer is None:
            continue
        dropped.add(node.input[1])
        replacement = onnx.helper.make_node(
            OP,
            [node.input[0]],
            list(node.output),
            name=node.name,
            domain=DOMAIN,
            layer=layer.index,
            k=layer.k,
            n=layer.n,
        )
        node.CopyFrom(replacement)
    still_used = {name for node in graph.graph.node for name in node.input}
    kept = [tensor for tensor in graph.graph.initializer if tensor.name not in dropped or tensor.name in still_used]
    del graph.graph.initializer[:]
    graph.graph.initializer.extend(kept)
    graph.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    return graph


def build(proto: onnx.ModelProto, target: Target, staging: Path) -> tuple[list[str], dict[str, Any]]:
    """Write the ``lut/`` folder for the ternary graph ``proto``; returns the files and the plan."""
    layers = ternary_layers(proto)
    folder = staging / FOLDER
    folder.mkdir(exist_ok=True)
    files = []
    for layer in layers:
        (staging / layer.file).write_bytes(pack_trits5(layer.weights).tobytes())
        files.append(layer.file)
    (staging / GRAPH).write_bytes(_lut_graph(proto, layers).SerializeToString())
    files.append(GRAPH)
    flavor = kernel.host_flavor()
    module = kernel.build({layer.function: (layer.rows, layer.k, layer.n) for layer in layers}, flavor)
    kernel.export(module, staging / KERNELS, flavor)
    files.append(KERNELS)
    shapes = {layer.function: (layer.rows, layer.k, layer.n) for layer in layers}
    arm = kernel.FLAVORS["aarch64"]
    toolchain = cross.toolchain_for(arm.tvm_target)
    device_kernels = "not built: no aarch64 cross compiler (qcompile toolchains --install)"
    if toolchain is not None and cross.status(toolchain)["compiler"]:
        kernel.export(kernel.build(shapes, arm), staging / DEVICE_KERNELS, arm)
        files.append(DEVICE_KERNELS)
        device_kernels = DEVICE_KERNELS
    figures = fpga.engine_figures(target)
    parallel = int(figures["group_parallel"])
    engine_layers = [
        hls.EngineLayer(layer.name, layer.k, layer.n, int(figures["lanes"]) // parallel, parallel) for layer in layers
    ]
    files += [f"{FOLDER}/{name}" for name in hls.emit(engine_layers, folder)]
    plan = fpga.plan([(layer.name, layer.k, layer.n, layer.rows) for layer in layers], target)
    plan["files"] = {layer.name: layer.file for layer in layers}
    plan["kernel"] = {"arch": flavor.arch, "lanes": flavor.lanes, "shuffle": flavor.shuffle}
    plan["device_kernels"] = device_kernels
    (staging / PLAN).write_text(json.dumps(plan, indent=1))
    files.append(PLAN)
    return files, plan


class LutExecutor:
    """Runs an artifact's ``model.lut.onnx`` with the TVM table-lookup kernels on this machine."""

    def __init__(self, folder: Path, entry: dict[str, Any]) -> None:
        from onnx.reference import ReferenceEvaluator
        from onnx.reference.op_run import OpRun

        if entry.get("arch", platform.machine()) != platform.machine():
            raise BackendError(f"the LUT kernels of {folder} are built for {entry['arch']}")
        graph = onnx.load(str(folder / entry["file"]))
        plan = json.loads((folder / PLAN).read_text())
        flavor = kernel.host_flavor()
        import tvm

        module = tvm.runtime.load_module(str(folder / entry["kernels"]))
        kernels = {}
        for node in graph.graph.node:
            if node.domain != DOMAIN:
                continue
            attributes = {attribute.name: attribute.i for attribute in node.attribute}
            index, k, n = attributes["layer"], attributes["k"], attributes["n"]
            packed = np.fromfile(folder / plan["files"][node.name], np.uint8).reshape(n, -1)
            rows = next(layer["rows"] for layer in plan["layers"] if layer["name"] == node.name)
            kernels[index] = kernel.LutMatMul(module, f"layer_{index}", unpack_trits5(packed, k), rows, flavor)

        class LutMatMul(OpRun):  # type: ignore[misc]
            op_domain = DOMAIN

            def _run(self, codes: np.ndarray, layer: int = 0, k: int = 0, n: int = 0) -> tuple[np.ndarray]:
                result = kernels[layer](np.ascontiguousarray(codes.reshape(-1, k)))
                return (result.reshape(*codes.shape[:-1], n),)

        self._evaluator = ReferenceEvaluator(graph, new_ops=[LutMatMul])

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return list(self._evaluator.run(None, feeds))
