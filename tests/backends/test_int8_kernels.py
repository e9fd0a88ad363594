"""The int8 matmul kernels: VNNI bit-exact with numpy and with onnxruntime's MatMulInteger; the AVX2 flavor
(built for a CPU without AVX-512, run here) and the NEON dot-product flavor (cross-compiled for aarch64, run
under qemu as a Cortex-A76) bit-exact with numpy. Integer results: compared for equality."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from conftest import require_emulation
from onnx import TensorProto, helper

from qcompile.backends.tvm import cross
from qcompile.errors import BackendError
from qcompile.runtime.executors import session_from_bytes

int8_kernels = pytest.importorskip("qcompile.backends.tvm.int8_kernels")

# (M, K, N): MiniLM's attention projection, rows and columns that do not fill a tile, a single row.
SHAPES = [(128, 384, 384), (7, 12, 50), (1, 4, 1)]


def _target() -> dict:
    try:
        return int8_kernels.require_vnni()
    except BackendError as error:
        pytest.skip(str(error))


def test_matmul_is_bit_exact_with_numpy_and_onnxruntime() -> None:
    """Extremes included: activations 255 against weights -128 over K = 384 (the largest sums), and a zero
    point, which the kernel folds into a per-column correction."""
    target = _target()
    module = int8_kernels.build({f"case{i}": shape for i, shape in enumerate(SHAPES)}, target)
    rng = np.random.default_rng(0)
    for index, (m, k, n) in enumerate(SHAPES):
        a = rng.integers(0, 256, (m, k)).astype(np.uint8)
        w = rng.integers(-128, 128, (k, n)).astype(np.int8)
        if index == 0:
            a[0], w[:, 0] = 255, -128
        for zero_point in (0, 131):
            expected = (a.astype(np.int64) - zero_point) @ w.astype(np.int64)
            for name in (f"case{index}", f"case{index}_serial"):
                result = int8_kernels.Int8MatMul(module, name, w, m, zero_point)(a)
                assert result.dtype == np.int32 and np.array_equal(result, expected), (name, zero_point)
        graph = helper.make_graph(
            [helper.make_node("MatMulInteger", ["a", "w", "za"], ["y"])],
            "g",
            [helper.make_tensor_value_info("a", TensorProto.UINT8, [m, k])],
            [helper.make_tensor_value_info("y", TensorProto.INT32, [m, n])],
            [
                helper.make_tensor("w", TensorProto.INT8, [k, n], w.tobytes(), raw=True),
                helper.make_tensor("za", TensorProto.UINT8, [], [131]),
            ],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
        onnxruntime = session_from_bytes(model.SerializeToString()).run(None, {"a": a})[0]
        assert np.array_equal(int8_kernels.Int8MatMul(module, f"case{index}", w, m, 131)(a), onnxruntime)


def test_bad_shapes_and_inputs_are_clear_errors() -> None:
    with pytest.raises(BackendError, match="K=6 is not a multiple of 4"):
        int8_kernels.matmul_primfunc(2, 6, 8)
    with pytest.raises(BackendError, match="non-empty"):
        int8_kernels.pack_weights(np.zeros((0, 4), np.int8))
    target = _target()
    module = int8_kernels.build({"m": (2, 8, 4)}, target)
    matmul = int8_kernels.Int8MatMul(module, "m", np.ones((8, 4), np.int8), 2)
    with pytest.raises(BackendError, match=r"uint8 \[2, 8\] activations"):
        matmul(np.zeros((2, 8), np.int8))


def _extreme_case(m: int, k: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random codes and weights, with one row of 255 against a column of -128 (the largest sums)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (m, k)).astype(np.uint8)
    w = rng.integers(-128, 128, (k, n)).astype(np.int8)
    a[0], w[:, 0] = 255, -128
    return a, w


@pytest.mark.parametrize(("name", "cpu"), [("avx2", "haswell"), ("avxvnni", "alderlake")])
def test_the_256_bit_flavors_are_bit_exact(name: str, cpu: str) -> None:
    """Built for Haswell (AVX2) or Alder Lake (AVX-VNNI), neither with AVX-512, so LLVM cannot use anything
    wider; run on this CPU (AVX-VNNI only where it has it)."""
    _target()
    if name == "avxvnni" and " avx_vnni" not in int8_kernels._cpu_flags():
        pytest.skip("this CPU has no AVX-VNNI")
    flavor = dataclasses.replace(int8_kernels.FLAVORS[name], tvm_target={"kind": "llvm", "mcpu": cpu})
    shapes = {"big": (128, 384, 384), "ragged": (7, 12, 50), "one": (1, flavor.group, 1)}
    module = int8_kernels.build(shapes, flavor.tvm_target, flavor)
    for index, (name, (m, k, n)) in enumerate(shapes.items()):
        a, w = _extreme_case(m, k, n, index)
        for zero_point in (0, 131):
            expected = (a.astype(np.int64) - zero_point) @ w.astype(np.int64)
            for variant in (name, f"{name}_serial"):
                result = int8_kernels.Int8MatMul(module, variant, w, m, zero_point, flavor)(a)
                assert np.array_equal(result, expected), (variant, zero_point)


@pytest.mark.parametrize(("name", "cpu"), [("neon-dot", "cortex-a76"), ("neon", "cortex-a72")])
def test_aarch64_flavors_are_bit_exact_under_qemu(name: str, cpu: str, tmp_path: Path) -> None:
    """sdot multiplies signed bytes: activations enter as x - 128, the correction uses za - 128; without the dot
    product (Cortex-A72), int16-widened products accumulate into int32 lanes."""
    from tvm.support import cc

    flavor = int8_kernels.FLAVORS[name]
    toolchain, runner = require_emulation(flavor.tvm_target)
    shape = (9, 136, 37)
    module = int8_kernels.build({"mm": shape}, flavor.tvm_target, flavor)
    module.export_library(str(tmp_path / "mm.so"), fcompile=cc.cross_compiler(cross.require_compiler(toolchain)))
    assert cross.check_elf(tmp_path / "mm.so", toolchain).machine == cross.elf_info(tmp_path / "mm.so").machine
    a, w = _extreme_case(*shape, seed=5)
    for zero_point in (0, 131):
        inputs = [a, *int8_kernels.arguments(w, shape[0], zero_point, flavor)]
        outputs, _ = cross.emulate(
            toolchain, tmp_path, "mm.so", inputs, cpu, flavor.tvm_target["mattr"], function="mm", runner=runner
        )
        assert np.array_equal(outputs[3], (a.astype(np.int64) - zero_point) @ w.astype(np.int64)), zero_point
