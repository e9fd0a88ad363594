"""Running a ``lut/`` package (:mod:`qcompile.backends.lut` writes it): ``model.lut.onnx`` under onnx's
reference evaluator for the float glue, the TVM table-lookup kernel of this machine for every ``LutMatMul``.
Needs numpy, onnx and the TVM runtime, nothing of the compiler.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import onnx

from qcompile.errors import BackendError
from qcompile.runtime.lut import layout
from qcompile.runtime.lut.pack import unpack_trits5
from qcompile.runtime.manifest import Executor

FOLDER = "lut"
GRAPH = f"{FOLDER}/model.lut.onnx"
KERNELS = f"{FOLDER}/kernels.so"
DEVICE_KERNELS = f"{FOLDER}/kernels.aarch64.so"  # for the board's Arm cores (the KV260's Cortex-A53)
PLAN = f"{FOLDER}/plan.json"
DOMAIN = "ai.qcompile.lut"
OP = "LutMatMul"


class LutExecutor:
    """Runs an artifact's ``model.lut.onnx`` with the TVM table-lookup kernels on this machine."""

    def __init__(self, folder: Path, entry: Executor) -> None:
        from onnx.reference import ReferenceEvaluator
        from onnx.reference.op_run import OpRun

        if (entry.arch or platform.machine()) != platform.machine():
            raise BackendError(f"the LUT kernels of {folder} are built for {entry.arch}")
        graph = onnx.load(str(folder / entry.file))
        plan = json.loads((folder / PLAN).read_text())
        flavor = layout.host_flavor()
        import tvm

        module = tvm.runtime.load_module(str(folder / str(entry.kernels)))
        kernels = {}
        for node in graph.graph.node:
            if node.domain != DOMAIN:
                continue
            attributes = {attribute.name: attribute.i for attribute in node.attribute}
            index, k, n = attributes["layer"], attributes["k"], attributes["n"]
            packed = np.fromfile(folder / plan["files"][node.name], np.uint8).reshape(n, -1)
            rows = next(layer["rows"] for layer in plan["layers"] if layer["name"] == node.name)
            kernels[index] = layout.LutMatMul(module, f"layer_{index}", unpack_trits5(packed, k), rows, flavor)

        class LutMatMul(OpRun):  # type: ignore[misc]
            op_domain = DOMAIN

            def _run(self, codes: np.ndarray, layer: int = 0, k: int = 0, n: int = 0) -> tuple[np.ndarray]:
                result = kernels[layer](np.ascontiguousarray(codes.reshape(-1, k)))
                return (result.reshape(*codes.shape[:-1], n),)

        self._evaluator = ReferenceEvaluator(graph, new_ops=[LutMatMul])

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return list(self._evaluator.run(None, feeds))
