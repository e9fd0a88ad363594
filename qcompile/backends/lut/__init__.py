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

:class:`qcompile.runtime.lut.LutExecutor` runs ``model.lut.onnx`` on the host: onnx's reference evaluator for
the float glue, the TVM kernel for every ``LutMatMul``. Its integer products are bit-exact with onnxruntime's
``MatMulInteger`` on the ternary graph.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.shape_inference

from qcompile.backends.lut import fpga, hls, kernel
from qcompile.backends.tvm import cross
from qcompile.errors import UnsupportedModelError
from qcompile.hwmodels import Target
from qcompile.runtime.lut import DEVICE_KERNELS, DOMAIN, FOLDER, GRAPH, KERNELS, OP, PLAN
from qcompile.runtime.lut import layout as lut_layout
from qcompile.runtime.lut.pack import pack_trits5


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
    flavor = lut_layout.host_flavor()
    module = kernel.build({layer.function: (layer.rows, layer.k, layer.n) for layer in layers}, flavor)
    kernel.export(module, staging / KERNELS, flavor)
    files.append(KERNELS)
    shapes = {layer.function: (layer.rows, layer.k, layer.n) for layer in layers}
    arm = lut_layout.FLAVORS["aarch64"]
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
