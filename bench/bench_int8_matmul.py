"""The int8 matmul kernels (qcompile/backends/tvm/int8_kernels.py) against onnxruntime, one layer at a time.

    python bench/bench_int8_matmul.py

``[M, K] @ [K, N]`` at the linear-layer shapes of all-MiniLM-L6-v2 (128 tokens: attention projections and
the MLP) and of ResNet-18's 1x1 / fc layers seen as matmuls: onnxruntime's fp32 ``MatMul`` and int8
``MatMulInteger`` (uint8 activations with a zero point, int8 weights) against the TVM kernels: the VNNI
flavor (``vpdpbusd``), the AVX-VNNI flavor where the CPU has it (256-bit ``vpdpbusd``, built for Alder Lake)
and the AVX2 flavor (``vpmaddwd``, built for Haswell; neither of those two uses AVX-512),
all called from Python in this process, timed in interleaved rounds (``qcompile.runtime.bench.compare``);
each kernel's output checked equal to onnxruntime's MatMulInteger first. The integer graph's convolutions
(``qcompile.backends.tvm.integer``) run the same register tiles.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from qcompile.backends.tvm import int8_kernels
from qcompile.runtime import bench
from qcompile.runtime.executors import session_from_bytes

SHAPES = [
    ("MiniLM attention projection", 128, 384, 384),
    ("MiniLM MLP up", 128, 384, 1536),
    ("MiniLM MLP down", 128, 1536, 384),
    ("ResNet-18 layer4 1x1 downsample (7x7)", 49, 256, 512),
    ("ResNet-18 fc", 1, 512, 1000),
]
ZERO_POINT = 128


def session(op: str, x: np.ndarray, weights: np.ndarray) -> Any:
    inputs = ["x", "w", "za"] if op == "MatMulInteger" else ["x", "w"]
    initializers = [numpy_helper.from_array(weights, "w")]
    if op == "MatMulInteger":
        initializers.append(numpy_helper.from_array(np.array(ZERO_POINT, np.uint8), "za"))
    element = TensorProto.UINT8 if x.dtype == np.uint8 else TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node(op, inputs, ["y"])],
        "g",
        [helper.make_tensor_value_info("x", element, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.INT32 if op == "MatMulInteger" else element, None)],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    return session_from_bytes(model.SerializeToString())


def main() -> None:
    machine = bench.machine()
    print(f"machine: {machine}; onnxruntime default threads; TVM threads {int8_kernels.threads.count()}")
    shapes = {f"s{i}": shape[1:] for i, shape in enumerate(SHAPES)}
    vnni = int8_kernels.VNNI
    modules = [(vnni, int8_kernels.build(shapes, int8_kernels.require_vnni(), vnni))]
    cpus = {"avxvnni": "alderlake", "avx2": "haswell"}  # 256-bit flavors, built without AVX-512
    for name, cpu in cpus.items():
        if name == "avxvnni" and " avx_vnni" not in int8_kernels._cpu_flags():
            continue
        flavor = dataclasses.replace(int8_kernels.FLAVORS[name], tvm_target={"kind": "llvm", "mcpu": cpu})
        modules.append((flavor, int8_kernels.build(shapes, flavor.tvm_target, flavor)))
    names = [flavor.name.upper() for flavor, _ in modules]
    rng = np.random.default_rng(0)
    columns = [f"{name} kernel us" for name in names] + ["ORT int8 us", "ORT fp32 us"]
    columns += [f"{name} vs {other}" for name in names for other in ("int8", "fp32")]
    print("\n| layer | M x K x N | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for index, (name, m, k, n) in enumerate(SHAPES):
        a = rng.integers(0, 256, (m, k)).astype(np.uint8)
        w = rng.integers(-127, 128, (k, n)).astype(np.int8)
        print(row(name, modules, f"s{index}", a, w), flush=True)


def row(name: str, modules: list[tuple[Any, Any]], function: str, a: np.ndarray, w: np.ndarray) -> str:
    """One table row: every kernel checked against MatMulInteger, then all timed in interleaved rounds."""
    import tvm

    (m, k), n = a.shape, w.shape[1]
    integer = session("MatMulInteger", a, w)
    floating = session("MatMul", a.astype(np.float32), w.astype(np.float32))
    centred = a.astype(np.float32) - ZERO_POINT
    expected = integer.run(None, {"x": a})[0]
    tensor = tvm.runtime.tensor(a)
    runs: dict[str, Callable[[], object]] = {}
    for flavor, module in modules:
        for variant in (function, f"{function}_serial"):
            kernel = int8_kernels.Int8MatMul(module, variant, w, m, ZERO_POINT, flavor)
            assert np.array_equal(kernel(a), expected), f"{name}: the {flavor.name} kernel differs from MatMulInteger"
            runs[f"{flavor.name} {variant}"] = partial(kernel.run_tensor, tensor)
    runs["int8"] = partial(integer.run, None, {"x": a})
    runs["fp32"] = partial(floating.run, None, {"x": centred})
    timings = bench.compare(runs, rounds=10, round_seconds=0.2)
    best = {
        flavor.name: min(timings[key].median_ms for key in runs if key.startswith(flavor.name + " ")) * 1e3
        for flavor, _ in modules
    }
    int8_us, fp32_us = timings["int8"].median_ms * 1e3, timings["fp32"].median_ms * 1e3
    kernels = " | ".join(f"{best[flavor.name]:.1f}" for flavor, _ in modules)
    ratios = " | ".join(f"{int8_us / best[f.name]:.2f}x | {fp32_us / best[f.name]:.2f}x" for f, _ in modules)
    return f"| {name} | {m} x {k} x {n} | {kernels} | {int8_us:.1f} | {fp32_us:.1f} | {ratios} |"


if __name__ == "__main__":
    main()
