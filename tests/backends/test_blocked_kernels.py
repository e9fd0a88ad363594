"""Linear layers with group-wise weights (int4 codes per block of inputs, or int8 codes per block) on qcompile's
kernels: the activations quantized per block at run time and the packed weights multiplied by one kernel per layer.

References and tolerances:
- the rewritten graph (:func:`qcompile.passes.dynamic_rows.blocked_products`) on onnxruntime against the numpy
  model :func:`~qcompile.passes.dynamic_rows.blocked_product`: bit-exact (the same float32 steps in the same
  order) up to 4 blocks; from 8 blocks onnxruntime's ReduceSum adds them in another order (within 1e-6 of the
  range);
- the kernel against the numpy oracle of the integer graph: bit-exact on inputs where every float step is exact
  (integer activations whose blocks each reach 127, so that the block scale is 1; power-of-two weight scales),
  which checks every integer step (the codes, the nibbles, the offsets, the block sums); on random inputs within
  1e-6 of the output's range: LLVM fuses the multiply by the activation's scale into the float sum (an FMA, one
  rounding fewer), and the kernel equals the numpy model with that fusion bit for bit.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompile import execution
from qcompile.backends.integer import lowering as integer_lowering
from qcompile.backends.integer import reference as integer_reference
from qcompile.passes.dynamic_rows import blocked_product, blocked_products, quantize_blocks
from qcompile.runtime.executors import session_from_bytes

tvm = pytest.importorskip("tvm")
integer = pytest.importorskip("qcompile.backends.tvm.integer")
int8_kernels = pytest.importorskip("qcompile.backends.tvm.int8_kernels")
blocked = pytest.importorskip("qcompile.backends.tvm.blocked")

ROWS, INPUTS, BLOCK = 3, 128, 32
SEQUENTIAL_BLOCKS = 4  # onnxruntime's ReduceSum over a leading axis adds up to this many in order (measured)


def _layers(rng: np.random.Generator, block: int, power_of_two_scales: bool = False) -> list[tuple[np.ndarray, ...]]:
    """Three layers' (codes [N, K], block scales [N, K / block]): 4-bit codes over 48 outputs, 4-bit codes over
    80 (five vectors of 16: a last partial tile of the kernel's four), and 8-bit codes (-128 and 127 included)
    over 16."""
    layers = []
    for outputs, low, high in ((48, -8, 7), (80, -8, 7), (16, -128, 127)):
        codes = rng.integers(low, high + 1, (outputs, INPUTS)).astype(np.int8)
        codes[0, :2] = (low, high)
        if power_of_two_scales:
            scales = 2.0 ** rng.integers(-8, -2, (outputs, INPUTS // block)).astype(np.float32)
        else:
            scales = rng.uniform(0.005, 0.05, (outputs, INPUTS // block)).astype(np.float32)
        layers.append((codes, scales))
    return layers


def _qdq_model(layers: list[tuple[np.ndarray, ...]], block: int) -> ir.Model:
    """``x [1, ROWS, K]`` statically quantized, read by linear layers whose weights are rebuilt as the QDQ pass
    writes a blocked weight (DequantizeLinear of ``[N K / block, block]`` rows, Reshape, Transpose)."""
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
    ]
    initializers = [numpy_helper.from_array(np.float32(0.05), "s"), numpy_helper.from_array(np.uint8(128), "z")]
    outputs = []
    for index, (codes, scales) in enumerate(layers):
        rows = codes.reshape(-1, block)
        nodes += [
            helper.make_node("DequantizeLinear", [f"c{index}", f"s{index}", f"z{index}"], [f"r{index}"], axis=0),
            helper.make_node("Reshape", [f"r{index}", f"shape{index}"], [f"m{index}"]),
            helper.make_node("Transpose", [f"m{index}"], [f"w{index}"], perm=[1, 0]),
            helper.make_node("MatMul", ["xd", f"w{index}"], [f"y{index}"], name=f"linear{index}"),
        ]
        initializers += [
            numpy_helper.from_array(rows, f"c{index}"),
            numpy_helper.from_array(scales.reshape(-1), f"s{index}"),
            numpy_helper.from_array(np.zeros(rows.shape[0], np.int8), f"z{index}"),
            numpy_helper.from_array(np.array(codes.shape, np.int64), f"shape{index}"),
        ]
        outputs.append(helper.make_tensor_value_info(f"y{index}", TensorProto.FLOAT, [1, ROWS, codes.shape[0]]))
    graph = helper.make_graph(
        nodes, "blocked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, ROWS, INPUTS])], outputs,
        initializers,
    )  # fmt: skip
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def _integer_graph(layers: list[tuple[np.ndarray, ...]], block: int) -> onnx.ModelProto:
    model = _qdq_model(layers, block)
    assert blocked_products(model) == len(layers)
    proto = execution.to_proto(model)
    proto.ir_version = execution.ORT_IR_VERSION
    lowered, _ = integer_lowering.lower(proto, float_islands=True)
    return lowered


def _exact_input(rng: np.random.Generator, block: int) -> np.ndarray:
    """Integer activations whose every block reaches 127 (a block scale of exactly 1), and one block of zeros."""
    x = rng.integers(-127, 128, (1, ROWS, INPUTS)).astype(np.float32)
    x[..., ::block] = 127.0
    x[0, 1, block : 2 * block] = 0.0  # (a zero block: the floor keeps its scale finite, its codes 0)
    return x


def _random_input(rng: np.random.Generator) -> np.ndarray:
    return (rng.standard_normal((1, ROWS, INPUTS)) * np.array([1.0, 30.0, 0.005])[None, :, None]).astype(np.float32)


def _build(model: onnx.ModelProto, flavor: object) -> tuple[object, list[str]]:
    from tvm import relax

    module = integer.to_relax(model, flavor)
    kinds = [gvar.name_hint.split("_", 1)[1] for gvar in module.functions if "_" in gvar.name_hint]
    executable = relax.build(
        module,
        target=tvm.target.Target(flavor.tvm_target),
        relax_pipeline=integer.pipeline(),  # type: ignore[attr-defined]
    )
    return relax.VirtualMachine(executable, tvm.cpu()), kinds


def _run(vm: object, x: np.ndarray) -> list[np.ndarray]:
    result = vm["main"](tvm.runtime.tensor(x))  # type: ignore[index]
    return [result.numpy()] if hasattr(result, "numpy") else [item.numpy() for item in result]


def _fused_model(x: np.ndarray, codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """:func:`blocked_product` with the multiply by the activation's scale fused into the sum (one rounding, as
    LLVM's FMA computes it)."""
    rows = x.reshape(-1, x.shape[-1])
    block = codes.shape[1] // scales.shape[1]
    blocks = codes.shape[1] // block
    a_codes, a_scales = quantize_blocks(rows, block)
    products = np.einsum(
        "mgk,ngk->mgn",
        a_codes.reshape(-1, blocks, block).astype(np.int64),
        codes.reshape(codes.shape[0], blocks, block).astype(np.int64),
    ).astype(np.float32)
    total = np.zeros((rows.shape[0], codes.shape[0]), np.float32)
    for index in range(blocks):
        weighted = products[:, index] * scales[:, index]  # float32
        total = (weighted.astype(np.float64) * a_scales[:, index, None] + total).astype(np.float32)
    return total.reshape(*x.shape[:-1], codes.shape[0])


@pytest.mark.parametrize("block", [16, 32, 64])
def test_blocked_layers_quantize_their_input_per_block_like_the_numpy_model(block: int) -> None:
    """Exact equality on onnxruntime where its ReduceSum adds the blocks one after the other (up to 4 of them;
    from 8, in another order: within 1e-6 of the range); and the per-block codes keep each row's resolution:
    within 1.5 % of the float product's peak for rows of very different ranges (a static per-tensor scale of 0.05
    rounds the row of 0.005s to nothing)."""
    rng = np.random.default_rng(block)
    layers = _layers(rng, block)
    model = _qdq_model(layers, block)
    x = _random_input(rng)
    static = session_from_bytes(execution.to_proto(model).SerializeToString()).run(None, {"x": x})
    assert blocked_products(model) == 3
    proto = execution.to_proto(model)
    ops = [node.op_type for node in proto.graph.node]
    assert "QuantizeLinear" in ops and "MatMul" not in ops and "Transpose" not in ops  # the float rebuild is gone
    assert ops.count("ReduceMax") == 1  # one quantization of x, shared by the three layers
    produced = session_from_bytes(proto.SerializeToString()).run(None, {"x": x})
    for output, (codes, scales), before in zip(produced, layers, static, strict=True):
        model_output = blocked_product(x, codes, scales)
        if INPUTS // block <= SEQUENTIAL_BLOCKS:
            np.testing.assert_array_equal(output, model_output)
        else:  # onnxruntime's ReduceSum adds 8 or more blocks in another order
            assert np.abs(output - model_output).max() <= 1e-6 * np.ptp(model_output)
        exact = x @ (codes * np.repeat(scales, block, axis=1)).T
        for row in range(ROWS):
            assert np.abs(output[0, row] - exact[0, row]).max() <= 0.015 * np.abs(exact[0, row]).max()
        assert np.abs(before[0, 2]).max() == 0.0


@pytest.mark.parametrize("block", [16, 32])
def test_blocked_layers_run_as_one_kernel_each_bit_exact_with_the_oracle(flavor: object, block: int) -> None:
    """Each layer is one kernel (no separate quantization, product or rescaling kernels); bit-exact with the oracle
    where the float steps are exact, and on random inputs equal to the numpy model with the kernel's FMA."""
    if flavor.name not in blocked.FLAVORS:  # type: ignore[attr-defined]
        pytest.skip(f"the blocked kernel needs a byte dot product; this CPU's flavor is {flavor.name}")  # type: ignore[attr-defined]
    rng = np.random.default_rng(10 + block)
    layers = _layers(rng, block, power_of_two_scales=True)
    model = _integer_graph(layers, block)
    vm, kinds = _build(model, flavor)
    assert kinds.count("blocked") == 3 and len(kinds) == 3
    x = _exact_input(rng, block)
    for ours, expected in zip(_run(vm, x), integer_reference.run(model, {"x": x}), strict=True):
        np.testing.assert_array_equal(ours, expected)
    layers = _layers(rng, block)
    model = _integer_graph(layers, block)
    vm, _ = _build(model, flavor)
    x = _random_input(rng)
    oracle = integer_reference.run(model, {"x": x})
    for ours, expected, (codes, scales) in zip(_run(vm, x), oracle, layers, strict=True):
        np.testing.assert_array_equal(ours, _fused_model(x, codes, scales))
        assert np.abs(ours - expected).max() <= 1e-6 * np.ptp(expected)


@pytest.mark.parametrize("name, cpu", [("avxvnni", "alderlake"), ("neon-dot", "cortex-a76"), ("avx2", "haswell")])
def test_blocked_layers_on_the_other_flavors(name: str, cpu: str, tmp_path: Path) -> None:
    """AVX-VNNI (256-bit vpdpbusd, where this CPU has it) and aarch64 sdot (signed bytes: 8-bit weights stored as
    they are; cross-compiled and run under qemu as a Cortex-A76 when the toolchain is installed), bit-exact on the
    exact inputs; a flavor without a byte dot product (AVX2) is refused with the reason, so the step library is
    not built there."""
    from conftest import require_emulation
    from tvm.support import cc

    from qcompile.backends.tvm import cross, link

    flavor = int8_kernels.FLAVORS[name]
    target = {**flavor.tvm_target, "mcpu": cpu}
    rng = np.random.default_rng(7)
    model = _integer_graph(_layers(rng, BLOCK, power_of_two_scales=True), BLOCK)
    if name == "avx2":
        with pytest.raises(integer.NotLowerable, match="byte dot product"):
            _build(model, dataclasses.replace(flavor, tvm_target=target))
        return
    if name == "avxvnni" and " avx_vnni" not in int8_kernels._cpu_flags():
        pytest.skip("this CPU has no AVX-VNNI")
    x = _exact_input(rng, BLOCK)
    expected = integer_reference.run(model, {"x": x})
    if name == "avxvnni":
        vm, _ = _build(model, dataclasses.replace(flavor, tvm_target=target))
        produced = _run(vm, x)
    else:
        toolchain, runner = require_emulation(target)
        link.build_library(
            integer.to_relax(model, flavor, int8_kernels.NEON_FLOAT),
            tvm.target.Target(target),
            tmp_path / "blocked.so",
            integer.pipeline(),
            cc.cross_compiler(cross.require_compiler(toolchain)),
        )
        produced, _ = cross.emulate(
            toolchain, tmp_path, "blocked.so", [x], cpu, flavor.tvm_target["mattr"], runner=runner
        )
    for ours, wanted in zip(produced, expected, strict=True):
        np.testing.assert_array_equal(ours, wanted, err_msg=name)


def test_packed_weights_hold_every_code_where_the_kernel_reads_it() -> None:
    """The packing against the layout the kernel's description states: 4-bit codes as ``c + 8``, byte ``4 l + i``
    of vector ``o`` holding input ``8 o + i`` of output ``l`` low and ``8 o + 4 + i`` high; 8-bit codes one to a
    byte, ``c + 128`` for an unsigned-by-signed instruction."""
    rng = np.random.default_rng(3)
    codes = rng.integers(-8, 8, (2, 32, 32)).astype(np.int8)  # [G, B, N]: K = 64, N = 32
    packed, offset, per_byte = blocked.pack(codes, 16, unsigned=True)
    assert packed.shape == (2, 8, 64) and (offset, per_byte) == (8, 2)
    flat = codes.reshape(64, 32).astype(np.int16) + 8
    for j, o, lane, i in ((0, 0, 0, 0), (1, 7, 15, 3), (0, 3, 9, 2)):
        byte = int(packed[j, o, 4 * lane + i])
        assert byte & 15 == flat[8 * o + i, 16 * j + lane] and byte >> 4 == flat[8 * o + 4 + i, 16 * j + lane]
    wide = rng.integers(-128, 128, (1, 32, 16)).astype(np.int8)
    packed, offset, per_byte = blocked.pack(wide, 16, unsigned=True)
    assert packed.shape == (1, 8, 64) and (offset, per_byte) == (128, 1)
    assert int(packed[0, 5, 4 * 3 + 1]) == int(wide[0, 21, 3]) + 128
    signed, offset, _ = blocked.pack(wide, 4, unsigned=False)
    assert offset == 0 and int(signed.view(np.int8)[2, 5, 4 * 1 + 1]) == int(wide[0, 21, 9])
