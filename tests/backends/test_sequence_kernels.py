"""Transformer encoders on qcompile's kernels: row-major tensors, attention, norms, masks and rotations.

References and tolerances:
- integer ops (activation x activation ``MatMulInteger``, the quantization feeding it) against the numpy
  oracle, bit-exact, at the extremes of the codes and zero points;
- float ops (LayerNorm, Softmax with a boolean mask, erf GELU, head transposes, embedding gathers, the online
  Hadamard rotation) against onnxruntime within 2e-5 of each output's range: float32 sums in another order
  and the vectorised exp / erf (relative error below 2e-7, absolute below 1.5e-7) move the outputs by ~1e-6;
- a tiny BERT exported as users export it, compiled for ``host`` from calibration samples alone: its library
  is qcompile's kernels, checked at compile time against the oracle (``tvm_vs_oracle``), and it agrees with
  onnxruntime running the QDQ graph (cosine >= 0.999: float islands computed in another order can move a
  code by one step).
"""

from __future__ import annotations

from pathlib import Path

import intake_zoo
import numpy as np
import onnx
import onnxruntime
import pytest
from conftest import keep_every_library
from onnx import TensorProto, helper, numpy_helper

from qcompile import api, execution, runtime
from qcompile.backends.integer import reference as integer_reference
from qcompile.passes.hadamard import factors

tvm = pytest.importorskip("tvm")
integer = pytest.importorskip("qcompile.backends.tvm.integer")
int8_kernels = pytest.importorskip("qcompile.backends.tvm.int8_kernels")

FLOAT_TOLERANCE = 2e-5  # of each output's range


def _model(
    nodes: list[onnx.NodeProto],
    initializers: list[onnx.TensorProto],
    inputs: dict[str, tuple[int, list[int]]],
    outputs: dict[str, tuple[int, list[int]]],
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "sequence",
        [helper.make_tensor_value_info(name, kind, shape) for name, (kind, shape) in inputs.items()],
        [helper.make_tensor_value_info(name, kind, shape) for name, (kind, shape) in outputs.items()],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = execution.ORT_IR_VERSION
    return model


def _build(model: onnx.ModelProto, flavor: object) -> tuple[object, list[str]]:
    """The VM of ``model`` on the kernels, and the kinds of kernel it calls."""
    from tvm import relax

    module = integer.to_relax(model, flavor)
    kinds = [gvar.name_hint.split("_", 1)[1] for gvar, func in module.functions.items() if "_" in gvar.name_hint]
    executable = relax.build(
        module,
        target=tvm.target.Target(flavor.tvm_target),  # type: ignore[attr-defined]
        relax_pipeline=integer.pipeline(),
    )
    return relax.VirtualMachine(executable, tvm.cpu()), kinds


def _run(vm: object, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    result = vm["main"](*(tvm.runtime.tensor(value) for value in feed.values()))  # type: ignore[index]
    return [result.numpy()] if hasattr(result, "numpy") else [item.numpy() for item in result]


def _onnxruntime(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """``model``'s outputs as onnxruntime computes them (the float reference)."""
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.asarray(value) for value in session.run(None, feed)]


def _attention_products(za: int, zb: int) -> onnx.ModelProto:
    """Q K^T-shaped MatMulInteger of two quantized activations: [2, 4, 32] x [2, 32, 16], heads as batch."""
    initializers = [
        numpy_helper.from_array(np.array(0.05, np.float32), "sa"),
        numpy_helper.from_array(np.array(0.07, np.float32), "sb"),
        numpy_helper.from_array(np.array(za, np.uint8), "za"),
        numpy_helper.from_array(np.array(zb, np.uint8), "zb"),
        numpy_helper.from_array(np.array([2, 4, 32], np.int64), "shape_a"),
        numpy_helper.from_array(np.array([2, 32, 16], np.int64), "shape_b"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["a", "sa", "za"], ["qa"]),
        helper.make_node("QuantizeLinear", ["b", "sb", "zb"], ["qb"]),
        helper.make_node("Reshape", ["qa", "shape_a"], ["heads_a"]),
        helper.make_node("Reshape", ["qb", "shape_b"], ["heads_b"]),
        helper.make_node("MatMulInteger", ["heads_a", "heads_b", "za", "zb"], ["scores"]),
    ]
    return _model(
        nodes,
        initializers,
        {"a": (TensorProto.FLOAT, [1, 8, 32]), "b": (TensorProto.FLOAT, [1, 64, 16])},
        {"scores": (TensorProto.INT32, [2, 4, 16])},
    )


ZERO_POINTS = ((0, 255), (255, 0), (131, 7))  # at both ends of the range, and in between


def _product_constants(za: int, zb: int, shapes: dict[str, list[int]]) -> list[onnx.TensorProto]:
    """A product's zero points ``za`` and ``zb`` and the int64 shapes its reshapes read, as initializers."""
    return [
        numpy_helper.from_array(np.array(za, np.uint8), "za"),
        numpy_helper.from_array(np.array(zb, np.uint8), "zb"),
        *(numpy_helper.from_array(np.array(shape, np.int64), name) for name, shape in shapes.items()),
    ]


def _attention_feed(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "a": (rng.uniform(-20, 20, (1, 8, 32))).astype(np.float32),  # codes that reach 0 and 255
        "b": (rng.uniform(-25, 25, (1, 64, 16))).astype(np.float32),
    }


def test_attention_products_of_two_activations_are_bit_exact(flavor: object) -> None:
    """On this CPU's flavor (the dot-product instruction, B packed per head at run time), with zero points at
    both ends of the range and codes that reach 0 and 255."""
    rng = np.random.default_rng(0)
    for za, zb in ZERO_POINTS:
        model = _attention_products(za, zb)
        vm, kinds = _build(model, flavor)
        assert "bmm" in kinds
        feed = _attention_feed(rng)
        (ours,) = _run(vm, feed)
        (expected,) = integer_reference.run(model, feed)
        assert ours.dtype == np.int32
        np.testing.assert_array_equal(ours, expected)


def test_products_over_any_number_of_columns_are_bit_exact(flavor: object) -> None:
    """Products whose N no vector width divides (39 positions of an audio model's attention, 21, 5) run whole
    vectors and one more at clamped columns, the last stored lane by lane; an N of 3 goes one lane at a time.
    Equal to the numpy oracle, with zero points at both ends of the range, and the lanes past each row do not
    reach the next row's output."""
    rng = np.random.default_rng(9)
    heads, rows, depth = 2, 5, 16
    for width in (39, 21, 5, 3):
        for za, zb in ZERO_POINTS:
            initializers = _product_constants(
                za, zb, {"shape_a": [heads, rows, depth], "shape_b": [heads, depth, width]}
            )
            nodes = [
                helper.make_node("Reshape", ["a", "shape_a"], ["heads_a"]),
                helper.make_node("Reshape", ["b", "shape_b"], ["heads_b"]),
                helper.make_node("MatMulInteger", ["heads_a", "heads_b", "za", "zb"], ["scores"]),
            ]
            inputs = {
                "a": (TensorProto.UINT8, [1, heads * rows, depth]),
                "b": (TensorProto.UINT8, [1, heads * depth, width]),
            }
            model = _model(nodes, initializers, inputs, {"scores": (TensorProto.INT32, [heads, rows, width])})
            vm, kinds = _build(model, flavor)
            assert "bmm" in kinds
            feed = {name: rng.integers(0, 256, shape).astype(np.uint8) for name, (_, shape) in inputs.items()}
            feed["a"][0, 0, :] = 255  # codes at both ends
            feed["b"][0, :, -1] = 0
            (ours,) = _run(vm, feed)
            (expected,) = integer_reference.run(model, feed)
            np.testing.assert_array_equal(ours, expected)


def test_keys_transposed_for_their_product_are_read_as_rows(flavor: object) -> None:
    """``Q K^T`` where ``K^T`` is a Transpose of the keys' last two axes (through a reshape that keeps them, as
    exporters write it): on a flavor whose instruction reads four k of a column at once, the product packs the
    keys' rows directly (no transpose kernel is called), bit-exact at zero points at both ends."""
    rng = np.random.default_rng(4)
    heads, queries, keys, dim = 3, 2, 32, 64
    for za, zb in ZERO_POINTS:
        initializers = _product_constants(za, zb, {"shape": [heads, dim, keys], "heads": [heads, queries, dim]})
        nodes = [
            helper.make_node("Reshape", ["q", "heads"], ["q3"]),
            helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
            helper.make_node("Reshape", ["kt", "shape"], ["kt3"]),
            helper.make_node("MatMulInteger", ["q3", "kt3", "za", "zb"], ["scores"]),
        ]
        inputs = {"q": (TensorProto.UINT8, [1, heads * queries, dim]), "k": (TensorProto.UINT8, [1, heads, keys, dim])}
        model = _model(nodes, initializers, inputs, {"scores": (TensorProto.INT32, [heads, queries, keys])})
        vm, _ = _build(model, flavor)
        feed = {name: rng.integers(0, 256, shape).astype(np.uint8) for name, (_, shape) in inputs.items()}
        feed["q"][0, 0, :] = 255  # codes at both ends
        feed["k"][0, 0, 0, :] = 0
        (ours,) = _run(vm, feed)
        q = feed["q"].reshape(heads, queries, dim).astype(np.int64) - za
        k = feed["k"][0].astype(np.int64) - zb
        np.testing.assert_array_equal(ours, np.einsum("hqd,hkd->hqk", q, k).astype(np.int32))


@pytest.mark.parametrize(
    "name, cpu",
    [("avx2", "haswell"), ("avxvnni", "alderlake"), ("neon-dot", "cortex-a76"), ("neon", "cortex-a72")],
)
def test_attention_products_on_the_other_flavors(name: str, cpu: str, tmp_path: Path) -> None:
    """The same products on AVX2 (vpmaddwd on 16-bit fields; runs on this x86 CPU), on AVX-VNNI (256-bit
    vpdpbusd; where this CPU has it) and on aarch64 with and without sdot (cross-compiled and run under qemu as
    that CPU when the toolchain is installed)."""
    import dataclasses

    from conftest import require_emulation
    from tvm.support import cc

    from qcompile.backends.tvm import cross, link

    flavor = int8_kernels.FLAVORS[name]
    target = {**flavor.tvm_target, "mcpu": cpu}
    if name == "avxvnni" and " avx_vnni" not in int8_kernels._cpu_flags():
        pytest.skip("this CPU has no AVX-VNNI")
    toolchain, runner = require_emulation(target) if name.startswith("neon") else (None, None)
    rng = np.random.default_rng(1)
    for index, (za, zb) in enumerate(ZERO_POINTS):
        model = _attention_products(za, zb)
        feed = _attention_feed(rng)
        (expected,) = integer_reference.run(model, feed)
        if toolchain is None:
            vm, _ = _build(model, dataclasses.replace(flavor, tvm_target=target))
            (ours,) = _run(vm, feed)
        else:
            library = f"bmm{index}.so"
            link.build_library(
                integer.to_relax(model, flavor, int8_kernels.NEON_FLOAT),
                tvm.target.Target(target),
                tmp_path / library,
                integer.pipeline(),
                cc.cross_compiler(cross.require_compiler(toolchain)),
            )
            (ours,), _ = cross.emulate(
                toolchain, tmp_path, library, list(feed.values()), cpu, flavor.tvm_target["mattr"], runner=runner
            )
        np.testing.assert_array_equal(ours, expected, err_msg=f"{name}, zero points {za}, {zb}")


def _linear_rows(tokens: int, k: int, n: int, za: int, seed: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A linear layer over ``tokens`` rows as the integer lowering writes one: QuantizeLinear, MatMulInteger by
    int8 weights (-128 and 127 included), the int32 sums out as they are and requantized to uint8."""
    rng = np.random.default_rng(seed)
    weights = rng.integers(-128, 128, (k, n), dtype=np.int8)
    weights[0, :] = -128
    weights[1, :] = 127
    initializers = [
        numpy_helper.from_array(np.array(0.05, np.float32), "s"),
        numpy_helper.from_array(np.array(za, np.uint8), "z"),
        numpy_helper.from_array(weights, "w"),
        numpy_helper.from_array(np.array(3e-4, np.float32), "so"),
        numpy_helper.from_array(np.array(128, np.uint8), "zo"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
        helper.make_node("MatMulInteger", ["q", "w", "z"], ["sums"]),
        helper.make_node("Cast", ["sums"], ["wide"], to=TensorProto.FLOAT),
        helper.make_node("QuantizeLinear", ["wide", "so", "zo"], ["codes"]),
    ]
    model = _model(
        nodes,
        initializers,
        {"x": (TensorProto.FLOAT, [1, tokens, k])},
        {"sums": (TensorProto.INT32, [1, tokens, n]), "codes": (TensorProto.UINT8, [1, tokens, n])},
    )
    feed = {"x": rng.uniform(-8, 8, (1, tokens, k)).astype(np.float32)}  # codes that reach 0 and 255
    return model, feed


@pytest.mark.parametrize(
    "tokens, k, n", [(16, 64, 32), (40, 128, 40), (128, 384, 1536), (71, 192, 17), (40, 96, 40), (33, 236, 48)]
)
def test_amx_tiles_compute_linear_layers_bit_exactly(flavor: object, tokens: int, k: int, n: int) -> None:
    """On a CPU with AMX, linear layers over 16 rows or more run on the tile registers (tdpbusd); bit-exact
    with the oracle for one row tile of 16, row counts that are not a multiple of 32 (the last tile starts
    early), column counts that are not a multiple of 16 and 32, input widths that are not a multiple of 64
    (the last step's activations copied, padded), zero points at both ends and in between."""
    if not getattr(flavor, "tiles", False):
        pytest.skip("this CPU has no AMX tiles, or Linux does not grant them")
    for seed, za in enumerate((0, 255, 131)):
        model, feed = _linear_rows(tokens, k, n, za, seed)
        module = integer.to_relax(model, flavor)
        assert any("tdpbusd" in str(function) for function in module.functions.values())
        vm, _ = _build(model, flavor)
        for ours, expected in zip(_run(vm, feed), integer_reference.run(model, feed), strict=True):
            np.testing.assert_array_equal(ours.reshape(expected.shape), expected)


def test_a_value_read_twice_that_rejoins_stays_in_its_producers_epilogue(flavor: object) -> None:
    """GELU reads its input twice (x * (1 + erf(x / sqrt 2)) / 2): the linear layer's kernel computes it in its
    epilogue instead of storing x for a second kernel; a value whose readers do not meet again is stored."""
    rng = np.random.default_rng(4)
    initializers = [
        numpy_helper.from_array(rng.standard_normal((64, 48)).astype(np.float32) * 0.2, "w"),
        numpy_helper.from_array(np.array(np.sqrt(2.0), np.float32), "sqrt2"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
    ]
    gelu = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Div", ["h", "sqrt2"], ["scaled"]),
        helper.make_node("Erf", ["scaled"], ["erf"]),
        helper.make_node("Add", ["erf", "one"], ["shifted"]),
        helper.make_node("Mul", ["h", "shifted"], ["product"]),
        helper.make_node("Mul", ["product", "half"], ["y"]),
    ]
    inputs = {"x": (TensorProto.FLOAT, [1, 16, 64])}
    feed = {"x": rng.standard_normal((1, 16, 64)).astype(np.float32)}
    fused = _model(gelu, initializers, inputs, {"y": (TensorProto.FLOAT, [1, 16, 48])})
    # the same value also read by a second output: its readers do not meet again, so it is stored once
    apart = _model(
        [*gelu, helper.make_node("Neg", ["h"], ["z"])],
        initializers,
        inputs,
        {"y": (TensorProto.FLOAT, [1, 16, 48]), "z": (TensorProto.FLOAT, [1, 16, 48])},
    )
    for model, kernels in ((fused, ["conv"]), (apart, ["conv", "eltwise", "eltwise"])):
        vm, kinds = _build(model, flavor)
        assert sorted(kinds) == kernels
        for ours, expected in zip(_run(vm, feed), _onnxruntime(model, feed), strict=True):
            np.testing.assert_allclose(ours, expected, rtol=0, atol=FLOAT_TOLERANCE * np.abs(expected).max())


def test_a_class_token_is_concatenated_before_the_patches(flavor: object) -> None:
    """Concat of row-major tensors along the sequence axis (a ViT's constant class token, expanded to the
    batch, then its patch rows): the inputs' bytes one after another, the constant one included."""
    rng = np.random.default_rng(5)
    initializers = [
        numpy_helper.from_array(rng.standard_normal((1, 1, 16)).astype(np.float32), "cls"),
        numpy_helper.from_array(np.array([1, 1, 16], np.int64), "expanded"),
        numpy_helper.from_array(rng.standard_normal((1, 5, 16)).astype(np.float32), "positions"),
    ]
    nodes = [
        helper.make_node("Expand", ["cls", "expanded"], ["token"]),
        helper.make_node("Relu", ["x"], ["patches"]),
        helper.make_node("Concat", ["token", "patches"], ["sequence"], axis=1),
        helper.make_node("Add", ["sequence", "positions"], ["y"]),
    ]
    model = _model(nodes, initializers, {"x": (TensorProto.FLOAT, [1, 4, 16])}, {"y": (TensorProto.FLOAT, [1, 5, 16])})
    vm, kinds = _build(model, flavor)
    assert kinds.count("concat") == 2
    feed = {"x": rng.standard_normal((1, 4, 16)).astype(np.float32)}
    (ours,) = _run(vm, feed)
    (expected,) = _onnxruntime(model, feed)
    np.testing.assert_array_equal(ours, expected)


def test_a_fused_projection_is_split_and_cubed_as_gpt2_does(flavor: object) -> None:
    """Split of the last axis by constant sizes (GPT-2's query / key / value), and its tanh GELU's x^3 (Pow by
    3, which onnxruntime computes as x * x * x): equal to onnxruntime's."""
    rng = np.random.default_rng(6)
    initializers = [
        numpy_helper.from_array(np.array([16, 16, 16], np.int64), "sizes"),
        numpy_helper.from_array(np.array(3.0, np.float32), "three"),
    ]
    nodes = [
        helper.make_node("Split", ["x", "sizes"], ["q", "k", "v"], axis=-1),
        helper.make_node("Pow", ["v", "three"], ["cubed"]),
        helper.make_node("Mul", ["q", "k"], ["qk"]),
        helper.make_node("Add", ["qk", "cubed"], ["y"]),
    ]
    model = _model(nodes, initializers, {"x": (TensorProto.FLOAT, [1, 4, 48])}, {"y": (TensorProto.FLOAT, [1, 4, 16])})
    vm, kinds = _build(model, flavor)
    assert "gather" in kinds
    feed = {"x": rng.standard_normal((1, 4, 48)).astype(np.float32) * 3}
    (ours,) = _run(vm, feed)
    (expected,) = _onnxruntime(model, feed)
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("width", [5, 17, 40])  # under one vector, a ViT's 16 patches + class token, 2.5 vectors
def test_rows_of_any_width_are_normalized(flavor: object, width: int) -> None:
    """LayerNorm, Softmax and ReduceMean over rows whose width is not a multiple of 16 (the last ``width % 16``
    channels go one lane at a time), and the mean, sum and 2-norm over the tokens (mean-pooling, an epilogue
    after the sum, ConvNeXt V2's response norm): as onnxruntime computes them, within the float tolerance."""
    rng = np.random.default_rng(width)
    initializers = [
        numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), "beta"),
        numpy_helper.from_array(np.array([-1], np.int64), "last"),
        numpy_helper.from_array(np.array([1], np.int64), "tokens"),
        numpy_helper.from_array(np.array([-1, -3], np.int64), "last_two"),
    ]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["normalized"], axis=-1),
        helper.make_node("Softmax", ["x"], ["probabilities"], axis=-1),
        helper.make_node("ReduceMean", ["x", "last"], ["mean"], keepdims=1),
        helper.make_node("ReduceMean", ["x", "tokens"], ["pooled"], keepdims=0),
        helper.make_node("ReduceSum", ["x", "tokens"], ["summed"], keepdims=1),
        helper.make_node("Mul", ["summed", "gamma"], ["scaled"]),
        helper.make_node("ReduceL2", ["x", "tokens"], ["norm"], keepdims=1),
        helper.make_node("Unsqueeze", ["x", "tokens"], ["lifted"]),  # [1, 1, 7, W]: Swin's pooling input
        helper.make_node("ReduceMean", ["lifted", "last_two"], ["lifted_mean"], keepdims=1),
        helper.make_node("ReduceL2", ["x", "last"], ["row_norm"], keepdims=1),
        helper.make_node("Div", ["x", "row_norm"], ["unit_rows"]),  # F.normalize (SwinV2's cosine attention)
        helper.make_node("ReduceSum", ["x", "last"], ["row_sums"], keepdims=0),  # (WavLM's)
        helper.make_node("GlobalAveragePool", ["x"], ["pooled_1d"]),  # (SwinV2's torchscript pooling)
    ]
    shape = [1, 7, width]
    model = _model(
        nodes,
        initializers,
        {"x": (TensorProto.FLOAT, shape)},
        {
            "normalized": (TensorProto.FLOAT, shape),
            "probabilities": (TensorProto.FLOAT, shape),
            "mean": (TensorProto.FLOAT, [1, 7, 1]),
            "pooled": (TensorProto.FLOAT, [1, width]),
            "scaled": (TensorProto.FLOAT, [1, 1, width]),
            "norm": (TensorProto.FLOAT, [1, 1, width]),
            "lifted_mean": (TensorProto.FLOAT, [1, 1, 7, 1]),
            "unit_rows": (TensorProto.FLOAT, shape),
            "row_sums": (TensorProto.FLOAT, [1, 7]),
            "pooled_1d": (TensorProto.FLOAT, [1, 7, 1]),
        },
    )
    vm, kinds = _build(model, flavor)
    assert {"layernorm", "softmax", "rowmean", "rowl2", "colmean", "colsum", "coll2"} <= set(kinds), kinds
    feed = {"x": (rng.standard_normal(shape) * 4).astype(np.float32)}
    for ours, expected in zip(_run(vm, feed), _onnxruntime(model, feed), strict=True):
        np.testing.assert_allclose(ours, expected, rtol=0, atol=FLOAT_TOLERANCE * np.abs(expected).max())


def _quantized_softmax(rows: int, width: int, scores: bool) -> onnx.ModelProto:
    """Softmax of uint8 codes (``scores`` False) or of a product of two quantized activations (the int32
    accumulator, as a ViT's attention scores reach it), requantized to 1/255 steps: what the integer lowering
    turns into the integer Softmax."""
    constants = {"s": (0.07, np.float32), "z": (131, np.uint8), "sb": (0.05, np.float32), "zb": (7, np.uint8)}
    constants |= {"sy": (1 / 255, np.float32), "zy": (0, np.uint8)}
    initializers = [numpy_helper.from_array(np.array(value, dtype), name) for name, (value, dtype) in constants.items()]
    nodes = [
        helper.make_node("QuantizeLinear", ["a", "s", "z"], ["qa"]),
        helper.make_node("DequantizeLinear", ["qa", "s", "z"], ["da" if scores else "x"]),
    ]
    inputs = {"a": (TensorProto.FLOAT, [1, rows, 32 if scores else width])}
    if scores:
        nodes += [
            helper.make_node("QuantizeLinear", ["b", "sb", "zb"], ["qb"]),
            helper.make_node("DequantizeLinear", ["qb", "sb", "zb"], ["db"]),
            helper.make_node("MatMul", ["da", "db"], ["x"]),
        ]
        inputs["b"] = (TensorProto.FLOAT, [1, 32, width])
    nodes += [
        helper.make_node("Softmax", ["x"], ["p"], axis=-1),
        helper.make_node("QuantizeLinear", ["p", "sy", "zy"], ["y"]),
    ]
    return _model(nodes, initializers, inputs, {"y": (TensorProto.UINT8, [1, rows, width])})


@pytest.mark.parametrize("scores", [False, True], ids=["codes", "accumulator"])
def test_the_integer_softmax_is_one_bit_exact_kernel(flavor: object, scores: bool) -> None:
    """The integer lowering's Softmax (ReduceMax, an exp table, ReduceSum, a rounded integer division) runs as
    one row kernel, equal to the numpy oracle: rows of 5, 16, 17, 39 and 48 (16-lane blocks, a last partial
    vector, both), flat rows (every gap 0) and rows whose codes reach 0 and 255."""
    from qcompile.backends.integer.lowering import lower

    rng = np.random.default_rng(7)
    for width in (5, 16, 17, 39, 48):
        lowered, _ = lower(_quantized_softmax(9, width, scores))
        assert "ReduceMax" in {node.op_type for node in lowered.graph.node}
        vm, kinds = _build(lowered, flavor)
        # the inputs' quantization, [the scores' product, rounded in its epilogue], the Softmax with its
        # requantization fused, the output's dequantization
        expected_kinds = ["eltwise", "eltwise", "bmm"] if scores else ["eltwise"]
        assert kinds == [*expected_kinds, "intsoftmax", "eltwise"], kinds
        for trial in range(3):
            feed = {"a": rng.uniform(-12, 12, (1, 9, 32 if scores else width)).astype(np.float32)}
            if scores:
                feed["b"] = rng.uniform(-8, 8, (1, 32, width)).astype(np.float32)
            if trial == 2:
                feed["a"][0, :3] = 0.0  # flat rows
            (ours,) = _run(vm, feed)
            (expected,) = integer_reference.run(lowered, feed)
            np.testing.assert_array_equal(ours, expected)


def test_an_all_zero_attention_mask_is_read_as_a_scalar(flavor: object) -> None:
    """The dynamo exporter adds a constant all-zero ``[1, 1, S, S]`` mask to the attention scores: a constant
    of one value is that scalar (the scores' product keeps it in its epilogue); another constant mask is read
    as the tensor it is. Both as onnxruntime computes them."""
    rng = np.random.default_rng(8)
    for mask in (np.zeros((1, 6, 6), np.float32), np.triu(np.full((1, 6, 6), -1e4, np.float32), 1)):
        initializers = [numpy_helper.from_array(mask, "mask")]
        nodes = [
            helper.make_node("MatMul", ["q", "k"], ["scores"]),
            helper.make_node("Add", ["scores", "mask"], ["masked"]),
            helper.make_node("Softmax", ["masked"], ["y"], axis=-1),
        ]
        model = _model(
            nodes,
            initializers,
            {"q": (TensorProto.FLOAT, [1, 6, 16]), "k": (TensorProto.FLOAT, [1, 16, 6])},
            {"y": (TensorProto.FLOAT, [1, 6, 6])},
        )
        vm, kinds = _build(model, flavor)
        assert ("eltwise" in kinds) == bool(mask.any()), kinds  # a tensor mask: an add after the product
        feed = {
            name: rng.standard_normal(shape).astype(np.float32)
            for name, shape in (("q", (1, 6, 16)), ("k", (1, 16, 6)))
        }
        (ours,) = _run(vm, feed)
        (expected,) = _onnxruntime(model, feed)
        np.testing.assert_allclose(ours, expected, rtol=0, atol=FLOAT_TOLERANCE)


def test_tokens_reshaped_into_a_map_feed_a_convolution(flavor: object) -> None:
    """SegFormer's and CvT's ``[1, HW, C]`` tokens transposed and reshaped to ``[1, C, H, W]`` for a padded
    convolution, then flattened back into tokens: as onnxruntime computes it (float tolerance)."""
    rng = np.random.default_rng(9)
    initializers = [
        numpy_helper.from_array(rng.standard_normal((8, 24, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array([1, 24, 4, 4], np.int64), "map"),
        numpy_helper.from_array(np.array([1, 8, 16], np.int64), "flat"),
    ]
    nodes = [
        helper.make_node("Transpose", ["x"], ["channels_first"], perm=[0, 2, 1]),
        helper.make_node("Reshape", ["channels_first", "map"], ["image"]),
        helper.make_node("Conv", ["image", "w"], ["mixed"], pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["mixed", "flat"], ["flattened"]),
        helper.make_node("Transpose", ["flattened"], ["y"], perm=[0, 2, 1]),
    ]
    model = _model(nodes, initializers, {"x": (TensorProto.FLOAT, [1, 16, 24])}, {"y": (TensorProto.FLOAT, [1, 16, 8])})
    vm, kinds = _build(model, flavor)
    assert "conv" in kinds
    feed = {"x": rng.standard_normal((1, 16, 24)).astype(np.float32)}
    (ours,) = _run(vm, feed)
    (expected,) = _onnxruntime(model, feed)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=FLOAT_TOLERANCE * np.abs(expected).max())


@pytest.mark.parametrize(("exclusive", "reverse"), [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_position_ids_counted_from_the_padding_mask(flavor: object, exclusive: int, reverse: int) -> None:
    """RoBERTa's position ids: ``cumsum(ids != pad) * (ids != pad) + pad``, a CumSum along the tokens of an
    int32 mask computed at run time (and CumSum's exclusive and reverse forms): equal to onnxruntime's and to
    the integer oracle's."""
    initializers = [
        numpy_helper.from_array(np.array(1, np.int64), "pad"),
        numpy_helper.from_array(np.array(1, np.int64), "axis"),
    ]
    nodes = [
        helper.make_node("Equal", ["ids", "pad"], ["is_pad"]),
        helper.make_node("Not", ["is_pad"], ["real"]),
        helper.make_node("Cast", ["real"], ["mask"], to=TensorProto.INT32),
        helper.make_node("CumSum", ["mask", "axis"], ["counted"], exclusive=exclusive, reverse=reverse),
        helper.make_node("Mul", ["counted", "mask"], ["kept"]),
        helper.make_node("Cast", ["kept"], ["kept64"], to=TensorProto.INT64),
        helper.make_node("Add", ["kept64", "pad"], ["positions"]),
    ]
    model = _model(
        nodes, initializers, {"ids": (TensorProto.INT64, [1, 20])}, {"positions": (TensorProto.INT64, [1, 20])}
    )
    vm, kinds = _build(model, flavor)
    assert "cumsum" in kinds
    ids = np.random.default_rng(10).integers(0, 50, (1, 20)).astype(np.int64)
    ids[0, 14:] = 1  # padding at the end
    ids[0, 3] = 1
    (ours,) = _run(vm, {"ids": ids})
    np.testing.assert_array_equal(ours, _onnxruntime(model, {"ids": ids})[0])
    np.testing.assert_array_equal(ours, integer_reference.run(model, {"ids": ids})[0])  # (the oracle's CumSum)


def test_a_gather_from_a_constant_of_one_value_is_that_constant(flavor: object) -> None:
    """RoBERTa's token types: a zero buffer gathered at position ids computed at run time is zeros whatever
    the positions, then the type embedding of 0 added to the tokens: equal to onnxruntime's."""
    rng = np.random.default_rng(13)
    initializers = [
        numpy_helper.from_array(np.zeros((1, 6), np.int64), "buffer"),
        numpy_helper.from_array(rng.standard_normal((2, 16)).astype(np.float32), "types"),
    ]
    nodes = [
        helper.make_node("GatherElements", ["buffer", "positions"], ["token_types"], axis=1),
        helper.make_node("Gather", ["types", "token_types"], ["typed"]),
        helper.make_node("Add", ["x", "typed"], ["y"]),
    ]
    inputs = {"x": (TensorProto.FLOAT, [1, 6, 16]), "positions": (TensorProto.INT64, [1, 6])}
    model = _model(nodes, initializers, inputs, {"y": (TensorProto.FLOAT, [1, 6, 16])})
    vm, _ = _build(model, flavor)
    feed = {"x": rng.standard_normal((1, 6, 16)).astype(np.float32), "positions": np.array([[2, 3, 4, 5, 0, 1]])}
    (ours,) = _run(vm, feed)
    np.testing.assert_array_equal(ours, _onnxruntime(model, feed)[0])


def test_row_major_data_is_padded_along_the_tokens(flavor: object) -> None:
    """MobileBERT's trigram embedding pads the token embeddings by one token at either end (a gather whose
    padded positions read the pad value): equal to onnxruntime's."""
    rng = np.random.default_rng(11)
    initializers = [
        numpy_helper.from_array(np.array([0, 1, 0, 0, 0, 0], np.int64), "front"),
        numpy_helper.from_array(np.array([0, 0, 0, 0, 1, 0], np.int64), "back"),
        numpy_helper.from_array(np.array(0.5, np.float32), "value"),
    ]
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Pad", ["r", "front", "value"], ["shifted"], mode="constant"),
        helper.make_node("Pad", ["r", "back"], ["unshifted"], mode="constant"),
        helper.make_node("Add", ["shifted", "unshifted"], ["y"]),
    ]
    model = _model(nodes, initializers, {"x": (TensorProto.FLOAT, [1, 6, 16])}, {"y": (TensorProto.FLOAT, [1, 7, 16])})
    vm, kinds = _build(model, flavor)
    assert kinds.count("gather") == 2, kinds
    feed = {"x": rng.standard_normal((1, 6, 16)).astype(np.float32)}
    (ours,) = _run(vm, feed)
    np.testing.assert_array_equal(ours, _onnxruntime(model, feed)[0])


def test_a_constant_query_attends_to_the_tokens(flavor: object) -> None:
    """SigLIP's attention pooling: a learned probe, projected and scaled at build time (so a constant), times
    the keys of the tokens, then Softmax: a product whose first operand is a constant, as onnxruntime computes
    it (float tolerance)."""
    rng = np.random.default_rng(12)
    initializers = [numpy_helper.from_array(rng.standard_normal((1, 2, 16)).astype(np.float32), "probe")]
    nodes = [
        helper.make_node("Transpose", ["x"], ["keys"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["probe", "keys"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["y"], axis=-1),
    ]
    model = _model(nodes, initializers, {"x": (TensorProto.FLOAT, [1, 6, 16])}, {"y": (TensorProto.FLOAT, [1, 2, 6])})
    vm, kinds = _build(model, flavor)
    assert "bmm" in kinds
    feed = {"x": rng.standard_normal((1, 6, 16)).astype(np.float32)}
    (ours,) = _run(vm, feed)
    (expected,) = _onnxruntime(model, feed)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=FLOAT_TOLERANCE * np.abs(expected).max())


def test_one_sided_clips_and_codes_read_both_padded_and_flat(flavor: object) -> None:
    """Clip with one bound (SwinV2's clamp_min; and a clamp_max), equal to onnxruntime's; and quantized rows of
    6 channels read both by a linear layer (which stores them padded to 8 channels) and by a Transpose (which
    reads them flat, from an unpadded copy): bit-exact with the integer oracle."""
    from qcompile.backends.integer.lowering import lower

    rng = np.random.default_rng(14)
    initializers = [
        numpy_helper.from_array(np.array(-0.25, np.float32), "low"),
        numpy_helper.from_array(np.array(0.5, np.float32), "high"),
    ]
    nodes = [
        helper.make_node("Clip", ["x", "low"], ["floored"]),
        helper.make_node("Clip", ["floored", "", "high"], ["y"]),
    ]
    model = _model(nodes, initializers, {"x": (TensorProto.FLOAT, [1, 4, 16])}, {"y": (TensorProto.FLOAT, [1, 4, 16])})
    vm, _ = _build(model, flavor)
    feed = {"x": rng.standard_normal((1, 4, 16)).astype(np.float32)}
    (ours,) = _run(vm, feed)
    np.testing.assert_array_equal(ours, _onnxruntime(model, feed)[0])

    constants = {"s": (0.05, np.float32), "z": (128, np.uint8), "sw": (0.01, np.float32), "zw": (0, np.int8)}
    constants |= {"so": (0.1, np.float32), "zo": (120, np.uint8)}
    initializers = [numpy_helper.from_array(np.array(value, dtype), name) for name, (value, dtype) in constants.items()]
    initializers.append(numpy_helper.from_array(rng.integers(-127, 128, (6, 8)).astype(np.int8), "wq"))
    nodes = [
        helper.make_node("QuantizeLinear", ["a", "s", "z"], ["qa"]),
        helper.make_node("DequantizeLinear", ["qa", "s", "z"], ["da"]),
        helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["w"]),
        helper.make_node("MatMul", ["da", "w"], ["projected"]),
        helper.make_node("QuantizeLinear", ["projected", "so", "zo"], ["y"]),
        helper.make_node("Transpose", ["da"], ["moved"], perm=[0, 2, 1]),
        helper.make_node("QuantizeLinear", ["moved", "s", "z"], ["qt"]),
        helper.make_node("DequantizeLinear", ["qt", "s", "z"], ["t"]),
    ]
    quantized = _model(
        nodes,
        initializers,
        {"a": (TensorProto.FLOAT, [1, 5, 6])},
        {"y": (TensorProto.UINT8, [1, 5, 8]), "t": (TensorProto.FLOAT, [1, 6, 5])},
    )
    lowered, _ = lower(quantized)
    vm, kinds = _build(lowered, flavor)
    assert "unpad" in kinds, kinds
    feed = {"a": rng.uniform(-8, 8, (1, 5, 6)).astype(np.float32)}
    for ours, expected in zip(_run(vm, feed), integer_reference.run(lowered, feed), strict=True):
        np.testing.assert_array_equal(ours, expected)


def test_a_softmax_over_an_axis_only_ones_follow(flavor: object) -> None:
    """ConvBERT's Softmax over k of ``[N, k, 1]``: the rows of ``[N, k]``, as onnxruntime computes it (float
    tolerance)."""
    rng = np.random.default_rng(15)
    initializers = [
        numpy_helper.from_array(np.array([4, 6, 1], np.int64), "kernels"),
        numpy_helper.from_array(np.array([1, 4, 6], np.int64), "back"),
    ]
    nodes = [
        helper.make_node("Reshape", ["x", "kernels"], ["k"]),
        helper.make_node("Softmax", ["k"], ["p"], axis=1),
        helper.make_node("Reshape", ["p", "back"], ["y"]),
    ]
    model = _model(nodes, initializers, {"x": (TensorProto.FLOAT, [1, 4, 6])}, {"y": (TensorProto.FLOAT, [1, 4, 6])})
    vm, kinds = _build(model, flavor)
    assert "softmax" in kinds
    feed = {"x": rng.standard_normal((1, 4, 6)).astype(np.float32) * 3}
    (ours,) = _run(vm, feed)
    (expected,) = _onnxruntime(model, feed)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=FLOAT_TOLERANCE * np.abs(expected).max())


def test_tanh_runs_vectorised_within_float_rounding(flavor: object) -> None:
    """Tanh of a float island (GPT-2's GELU) by its exp form, over large, small and near-zero arguments: within
    3e-7 of onnxruntime's, absolutely (outputs in [-1, 1]: ours is within 1.2e-7 of the exact value, and
    onnxruntime's own approximation adds up to 1.2e-7 more; 3e-7 is five float32 steps below 1)."""
    nodes = [helper.make_node("Tanh", ["x"], ["y"])]
    model = _model(nodes, [], {"x": (TensorProto.FLOAT, [1, 64, 32])}, {"y": (TensorProto.FLOAT, [1, 64, 32])})
    vm, _ = _build(model, flavor)
    values = np.concatenate([np.linspace(-12, 12, 1024), np.linspace(-1e-3, 1e-3, 1024)]).astype(np.float32)
    feed = {"x": values.reshape(1, 64, 32)}
    (ours,) = _run(vm, feed)
    (expected,) = _onnxruntime(model, feed)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=3e-7)


def test_a_kronecker_outer_factor_is_regrouped_into_whole_vectors() -> None:
    """SmolLM2's rotation of 576 = 144 x 4 channels, its outer factor H_12 (x) H_12: regrouped as 12 x 48, the
    same matrix (within float32 rounding of the products); a Paley H_12 outer factor (no Kronecker part) and
    groups already whole vectors stay as they are."""
    sequence = pytest.importorskip("qcompile.backends.tvm.sequence")
    outer, inner, _ = factors(576)
    assert (outer.shape[0], inner.shape[0]) == (144, 4)
    new_inner, new_outer = sequence.regrouped(inner, outer)
    assert (new_outer.shape[0], new_inner.shape[0]) == (12, 48)
    np.testing.assert_allclose(np.kron(new_outer, new_inner), np.kron(outer, inner), rtol=1e-6, atol=0)
    for size in (192, 48):  # 12 x 16 (whole vectors); 12 x 4 (the outer H_12 has no Kronecker part)
        outer, inner, _ = factors(size)
        kept = sequence.regrouped(inner, outer)
        assert kept[0] is inner and kept[1] is outer


def test_a_masked_softmax_computes_no_subnormal_numbers(flavor: object) -> None:
    """Softmax rows with masked positions (-1e4 and -3.4e38 added, as exporters write masks) and sigmoids of
    large arguments: within 5e-7 of onnxruntime (outputs in [0, 1]; exp within 2e-7 relative, the row sum and
    the reciprocal rounded in another order: up to 8 float32 steps below 1), masked positions exactly 0,
    and no output subnormal. exp once returned subnormal numbers near -87, and every operation on them
    costs Intel cores a microcode assist (MiniLM's masked softmax rows: 6x slower)."""
    nodes = [helper.make_node("Softmax", ["x"], ["p"], axis=-1), helper.make_node("Sigmoid", ["x"], ["s"])]
    shape = [1, 64, 48]
    model = _model(
        nodes,
        [],
        {"x": (TensorProto.FLOAT, shape)},
        {"p": (TensorProto.FLOAT, shape), "s": (TensorProto.FLOAT, shape)},
    )
    vm, kinds = _build(model, flavor)
    assert "softmax" in kinds
    rng = np.random.default_rng(3)
    x = rng.normal(0, 4, shape).astype(np.float32)
    x[0, :, 40:] = -1e4
    x[0, ::2, 30:40] = -3.4e38
    x[0, 1::4, :20] += np.linspace(-95, -55, 20, dtype=np.float32)  # across the old subnormal range
    feed = {"x": x}
    ours = _run(vm, feed)
    expected = _onnxruntime(model, feed)
    for got, want in zip(ours, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=5e-7)
        assert not np.any((got != 0) & (np.abs(got) < np.finfo(np.float32).tiny))
    assert np.all(ours[0][0, :, 40:] == 0)


def test_channels_last_blocks_move_between_rows_and_images(flavor: object) -> None:
    """ConvNeXt's pattern: rows [1, H, W, C] transposed to NCHW feed a padded depthwise conv (a view copied into
    the border it needs), the map is averaged without keepdims, normalized and classified; and a conv's map
    transposed channels-last or flattened (its bytes are stored H, W, C: a Flatten used to read them in NCHW
    order and was wrong by the outputs' size)."""
    rng = np.random.default_rng(7)
    weights = numpy_helper.from_array(rng.standard_normal((16, 1, 3, 3)).astype(np.float32), "w")
    initializers = [
        weights,
        numpy_helper.from_array(np.array([1, 4, 4, 16], np.int64), "shape"),
        numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
        numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "g"),
        numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b"),
        numpy_helper.from_array(rng.standard_normal((16, 10)).astype(np.float32), "wc"),
    ]
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Reshape", ["r", "shape"], ["s"]),
        helper.make_node("Transpose", ["s"], ["n"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["n", "w"], ["c"], group=16, pads=[1, 1, 1, 1]),
        helper.make_node("ReduceMean", ["c", "axes"], ["m"], keepdims=0),
        helper.make_node("LayerNormalization", ["m", "g", "b"], ["l"], axis=-1),
        helper.make_node("MatMul", ["l", "wc"], ["y"]),
    ]
    rows = _model(nodes, initializers, {"x": (TensorProto.FLOAT, [1, 16, 16])}, {"y": (TensorProto.FLOAT, [1, 10])})
    image = {"img": (TensorProto.FLOAT, [1, 16, 4, 4])}
    conv = helper.make_node("Conv", ["img", "w"], ["c"], group=16, pads=[1, 1, 1, 1])
    moved = [
        _model([conv, helper.make_node("Transpose", ["c"], ["y"], perm=[0, 2, 3, 1])], [weights], image,
               {"y": (TensorProto.FLOAT, [1, 4, 4, 16])}),
        _model([conv, helper.make_node("Flatten", ["c"], ["y"])], [weights], image,
               {"y": (TensorProto.FLOAT, [1, 256])}),
    ]  # fmt: skip
    cases = [(rows, {"x": rng.standard_normal((1, 16, 16)).astype(np.float32)}, "depthwise")]
    cases += [(model, {"img": rng.standard_normal((1, 16, 4, 4)).astype(np.float32)}, "depthwise") for model in moved]
    for model, feed, kind in cases:
        vm, kinds = _build(model, flavor)
        assert kind in kinds
        (ours,) = _run(vm, feed)
        (expected,) = _onnxruntime(model, feed)
        np.testing.assert_allclose(ours, expected, rtol=0, atol=FLOAT_TOLERANCE * np.abs(expected).max())


def test_the_background_import_is_awaited() -> None:
    """A compile imports TVM in a thread while it quantizes; the build waits for it (two threads importing TVM
    at once handed one a partly initialized module)."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from qcompile.backends import tvm as backend\n"
        "backend.import_in_background()\n"
        "backend.await_import()\n"
        "assert backend._importing is None and 'tvm.relax' in sys.modules\n"
        "from tvm.target import codegen\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stderr


def _encoder_block(seed: int = 0, size: int = 192, heads: int = 4, sequence: int = 16) -> onnx.ModelProto:
    """A float post-norm encoder block as exporters write one: token embeddings gathered at int64 ids plus a
    constant position table, LayerNorm, an online Hadamard rotation (signs, [rows, 12, 16] grid, both factors,
    as :mod:`qcompile.passes.hadamard` inserts it) before the query/key/value projections, heads split by
    Reshape + Transpose, Q K^T scaled, a boolean key mask turned additive by Where, Softmax, its NaN guard,
    P V, heads merged, an erf GELU MLP and the residual LayerNorm."""
    rng = np.random.default_rng(seed)
    head = size // heads
    outer, inner, kind = factors(size)
    assert kind == "kronecker"
    m, p = outer.shape[0], inner.shape[0]

    def constant(name: str, value: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(value), name)

    def weight(name: str, *shape: int, scale: float = 0.2) -> onnx.TensorProto:
        return constant(name, (rng.standard_normal(shape) * scale).astype(np.float32))

    initializers = [
        weight("table", 50, size, scale=1.0), weight("positions", 1, sequence, size, scale=0.5),
        weight("gamma", size, scale=1.0), weight("beta", size),
        constant("signs", rng.choice([-1.0, 1.0], size).astype(np.float32)),
        constant("grid", np.array([-1, m, p], np.int64)), constant("rows", np.array([sequence, size], np.int64)),
        constant("inner", inner.astype(np.float32)), constant("outer", outer.astype(np.float32)),
        weight("wq", size, size), weight("wk", size, size), weight("wv", size, size), weight("wo", size, size),
        weight("w1", size, 2 * size), weight("w2", 2 * size, size),
        constant("split", np.array([1, sequence, heads, head], np.int64)),
        constant("merged", np.array([1, sequence, size], np.int64)),
        constant("scale", np.array(1.0 / np.sqrt(head), np.float32)),
        constant("zero", np.array(0.0, np.float32)), constant("masked", np.array(-np.inf, np.float32)),
        constant("root2", np.array(np.sqrt(2.0), np.float32)), constant("one", np.array(1.0, np.float32)),
        constant("half", np.array(0.5, np.float32)),
    ]  # fmt: skip
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["tokens"]),
        helper.make_node("Add", ["tokens", "positions"], ["embedded"]),
        helper.make_node("LayerNormalization", ["embedded", "gamma", "beta"], ["x"], axis=-1, epsilon=1e-12),
        helper.make_node("Reshape", ["x", "rows"], ["x_rows"]),
        helper.make_node("Mul", ["x_rows", "signs"], ["signed"]),
        helper.make_node("Reshape", ["signed", "grid"], ["gridded"]),
        helper.make_node("MatMul", ["gridded", "inner"], ["mixed_inner"]),
        helper.make_node("Transpose", ["mixed_inner"], ["flipped"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["flipped", "outer"], ["mixed_outer"]),
        helper.make_node("Transpose", ["mixed_outer"], ["unflipped"], perm=[0, 2, 1]),
        helper.make_node("Reshape", ["unflipped", "rows"], ["rotated"]),
    ]
    for name in ("q", "k", "v"):
        nodes += [
            helper.make_node("MatMul", ["rotated", f"w{name}"], [f"{name}_flat"]),
            helper.make_node("Reshape", [f"{name}_flat", "split"], [f"{name}_split"]),
            helper.make_node("Transpose", [f"{name}_split"], [f"{name}_heads"], perm=[0, 2, 1, 3]),
        ]
    nodes += [
        helper.make_node("Transpose", ["k_heads"], ["k_t"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q_heads", "k_t"], ["raw_scores"]),
        helper.make_node("Mul", ["raw_scores", "scale"], ["scores"]),
        helper.make_node("Cast", ["mask"], ["keep"], to=TensorProto.BOOL),
        helper.make_node("Where", ["keep", "zero", "masked"], ["bias"]),
        helper.make_node("Add", ["scores", "bias"], ["biased"]),
        helper.make_node("Softmax", ["biased"], ["probabilities"], axis=-1),
        helper.make_node("IsNaN", ["probabilities"], ["undefined"]),
        helper.make_node("Where", ["undefined", "zero", "probabilities"], ["attention"]),
        helper.make_node("MatMul", ["attention", "v_heads"], ["context"]),
        helper.make_node("Transpose", ["context"], ["context_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["context_t", "merged"], ["context_rows"]),
        helper.make_node("MatMul", ["context_rows", "wo"], ["projected"]),
        helper.make_node("Add", ["projected", "x"], ["residual"]),
        helper.make_node("LayerNormalization", ["residual", "gamma", "beta"], ["y"], axis=-1),
        helper.make_node("MatMul", ["y", "w1"], ["up"]),
        helper.make_node("Div", ["up", "root2"], ["up_scaled"]),
        helper.make_node("Erf", ["up_scaled"], ["erf"]),
        helper.make_node("Add", ["erf", "one"], ["erf_1"]),
        helper.make_node("Mul", ["up", "erf_1"], ["gelu_2"]),
        helper.make_node("Mul", ["gelu_2", "half"], ["gelu"]),
        helper.make_node("MatMul", ["gelu", "w2"], ["down"]),
        helper.make_node("Add", ["down", "y"], ["out"]),
    ]
    return _model(
        nodes,
        initializers,
        {"ids": (TensorProto.INT64, [1, sequence]), "mask": (TensorProto.INT64, [1, 1, 1, sequence])},
        {
            "out": (TensorProto.FLOAT, [1, sequence, size]),
            "attention": (TensorProto.FLOAT, [1, heads, sequence, sequence]),
        },
    )


@pytest.mark.parametrize(
    ("size", "heads"),
    [(192, 4), (576, 9)],  # rotations of 12 x 16 (vector groups) and 144 x 4 (mixed across groups, SmolLM2's)
)
def test_an_encoder_block_runs_on_the_kernels_as_onnxruntime_computes_it(flavor: object, size: int, heads: int) -> None:
    model = _encoder_block(size=size, heads=heads)
    vm, kinds = _build(model, flavor)
    # Each op has its kernel: nothing went to TVM's importer, and the rotation is one kernel.
    assert {"embedding", "layernorm", "softmax", "rotation", "conv", "bmm"} <= set(kinds), kinds
    assert kinds.count("rotation") == 1
    rng = np.random.default_rng(3)
    mask = np.ones((1, 1, 1, 16), np.int64)
    mask[..., 11:] = 0  # padding tokens
    feed = {"ids": rng.integers(-50, 50, (1, 16)).astype(np.int64), "mask": mask}  # (negative ids count back)
    for ours, expected in zip(_run(vm, feed), _onnxruntime(model, feed), strict=True):
        assert ours.shape == expected.shape
        np.testing.assert_allclose(ours, expected, rtol=0, atol=FLOAT_TOLERANCE * np.abs(expected).max())


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_an_exported_bert_compiles_onto_the_kernels(tmp_path: Path, exporter: str) -> None:
    path = intake_zoo.export("bert", exporter, tmp_path / "export")
    calibration = intake_zoo.calibration_feeds("bert", 8, seed=0)
    with keep_every_library():  # (whether a tiny model's library beats onnxruntime is a measurement)
        manifest = api.compile(path, tmp_path / "artifact", calibration_data=calibration, progress=False)
    library = manifest["executors"]["tvm"]
    assert library["lowering"].startswith("qcompile int8 kernels"), library
    assert "tvm_vs_oracle" in manifest["measured"]["accuracy"]
    rotation = next(entry for entry in manifest["passes"] if entry["name"] == "hadamard_rotation")
    assert rotation["enabled"] and rotation["rotations"], rotation  # the host recipe rotates sequence models
    kernels, quantized = runtime.load(tmp_path / "artifact", "tvm"), runtime.load(tmp_path / "artifact", "onnxruntime")
    for feed in intake_zoo.calibration_feeds("bert", 2, seed=1):
        ours, theirs = kernels.run(feed), quantized.run(feed)
        for name, expected in theirs.items():
            produced = ours[name].astype(np.float64).ravel()
            cosine = produced @ expected.ravel() / (np.linalg.norm(produced) * np.linalg.norm(expected))
            assert cosine >= 0.999, (name, cosine)


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.UINT8], ids=["float", "codes"])
def test_a_cache_is_appended_repeated_and_transposed_as_a_decode_step_does(flavor: object, dtype: int) -> None:
    """A decode step's key path: a cache input ``[1, heads, past, dim]`` (row-major, not an image) with the new
    position appended (Concat along positions), each head repeated for grouped queries (an Expand: whole
    heads, copied as runs), transposed per head (``K^T``: blocks transposed without an index map), and a
    Concat along the last axis; float and 8-bit codes alike, exactly."""
    heads, past, dim, repeat = 3, 31, 16, 3
    kind = np.float32 if dtype == TensorProto.FLOAT else np.uint8
    initializers = [
        numpy_helper.from_array(np.array([2], np.int64), "axis2"),
        numpy_helper.from_array(np.array([1, heads, repeat, past + 1, dim], np.int64), "repeated"),
        numpy_helper.from_array(np.array([1, heads * repeat, past + 1, dim], np.int64), "grouped"),
    ]
    nodes = [
        helper.make_node("Concat", ["cache", "new"], ["keys"], axis=-2),
        helper.make_node("Unsqueeze", ["keys", "axis2"], ["keys5"]),
        helper.make_node("Expand", ["keys5", "repeated"], ["expanded"]),
        helper.make_node("Reshape", ["expanded", "grouped"], ["all_heads"]),
        helper.make_node("Transpose", ["all_heads"], ["transposed"], perm=[0, 1, 3, 2]),
        helper.make_node("Concat", ["transposed", "transposed"], ["y"], axis=-1),
    ]
    inputs = {"cache": (dtype, [1, heads, past, dim]), "new": (dtype, [1, heads, 1, dim])}
    model = _model(nodes, initializers, inputs, {"y": (dtype, [1, heads * repeat, dim, 2 * (past + 1)])})
    vm, kinds = _build(model, flavor)
    assert "gather" in kinds and "concat" in kinds
    rng = np.random.default_rng(7)
    if kind is np.float32:
        feed = {name: rng.standard_normal(shape).astype(kind) for name, (_, shape) in inputs.items()}
    else:
        feed = {name: rng.integers(0, 256, shape).astype(kind) for name, (_, shape) in inputs.items()}
    (ours,) = _run(vm, feed)
    keys = np.concatenate([feed["cache"], feed["new"]], axis=2)
    transposed = np.repeat(keys, repeat, axis=1).transpose(0, 1, 3, 2)
    np.testing.assert_array_equal(ours, np.concatenate([transposed, transposed], axis=-1))


def test_rotary_angles_and_an_int8_embedding_table_at_run_time(flavor: object) -> None:
    """A decode step's run-time position: cos and sin of positions times frequencies (float functions, within
    float rounding of onnxruntime: libm's against onnxruntime's), and a token's row of an int8 table scaled by
    its row's scale."""
    rng = np.random.default_rng(3)
    codes = rng.integers(-127, 128, (50, 32)).astype(np.int8)
    scales = rng.uniform(0.01, 0.1, (50, 1)).astype(np.float32)
    initializers = [
        numpy_helper.from_array(rng.uniform(0, 1, (32,)).astype(np.float32), "frequencies"),
        numpy_helper.from_array(codes, "codes"),
        numpy_helper.from_array(scales, "scales"),
    ]
    nodes = [
        helper.make_node("Mul", ["position", "frequencies"], ["angles"]),
        helper.make_node("Cos", ["angles"], ["cos"]),
        helper.make_node("Sin", ["angles"], ["sin"]),
        helper.make_node("Gather", ["codes", "token"], ["row_codes"], axis=0),
        helper.make_node("Cast", ["row_codes"], ["row"], to=TensorProto.FLOAT),
        helper.make_node("Gather", ["scales", "token"], ["row_scale"], axis=0),
        helper.make_node("Mul", ["row", "row_scale"], ["embedded"]),
        helper.make_node("Mul", ["embedded", "cos"], ["a"]),
        helper.make_node("Add", ["a", "sin"], ["y"]),
    ]
    inputs = {"position": (TensorProto.FLOAT, [1, 1, 32]), "token": (TensorProto.INT64, [1, 1])}
    model = _model(nodes, initializers, inputs, {"y": (TensorProto.FLOAT, [1, 1, 32])})
    vm, kinds = _build(model, flavor)
    assert "embedding" in kinds
    for position, token in ((0, 0), (37, 49), (500, 7)):
        feed = {"position": np.full((1, 1, 32), position, np.float32), "token": np.array([[token]], np.int64)}
        (ours,) = _run(vm, feed)
        (expected,) = _onnxruntime(model, feed)
        np.testing.assert_allclose(ours, expected, rtol=0, atol=FLOAT_TOLERANCE * float(np.ptp(expected)) + 1e-6)


@pytest.mark.parametrize("width", [16, 21])
def test_rows_masked_with_the_lowest_float_are_uniform(flavor: object, width: int) -> None:
    """Softmax and the row maximum over rows masked with float32's lowest value (-3.4e38, torch's
    ``masked_fill(mask, finfo.min)`` as DeBERTa writes it): a row holding nothing else gets uniform
    probabilities, as onnxruntime gives them, not NaN, and that lowest value as its maximum."""
    rng = np.random.default_rng(width)
    shape = [1, 6, width]
    nodes = [
        helper.make_node("Softmax", ["x"], ["probabilities"], axis=-1),
        helper.make_node("ReduceMax", ["x", "last"], ["largest"], keepdims=1),
    ]
    model = _model(
        nodes,
        [numpy_helper.from_array(np.array([-1], np.int64), "last")],
        {"x": (TensorProto.FLOAT, shape)},
        {"probabilities": (TensorProto.FLOAT, shape), "largest": (TensorProto.FLOAT, [1, 6, 1])},
    )
    vm, kinds = _build(model, flavor)
    assert {"softmax", "rowmax"} <= set(kinds), kinds
    x = (rng.standard_normal(shape) * 4).astype(np.float32)
    x[rng.random(shape) < 0.3] = np.finfo(np.float32).min
    x[0, 2:4] = np.finfo(np.float32).min  # two rows fully masked
    feed = {"x": x}
    ours, expected = _run(vm, feed), _onnxruntime(model, feed)
    np.testing.assert_allclose(expected[0][0, 2], 1.0 / width, rtol=1e-6)  # onnxruntime's uniform rows
    for produced, reference in zip(ours, expected, strict=True):
        assert not np.isnan(produced).any()
        np.testing.assert_allclose(produced, reference, rtol=0, atol=FLOAT_TOLERANCE * np.abs(reference).max())


def test_a_constant_bool_mask_selects_as_onnxruntime_does(flavor: object) -> None:
    """``Where`` whose condition is a constant bool tensor (a causal or padding mask folded at export), filling
    with float32's lowest value, then Softmax, two rows fully masked: as onnxruntime computes it. The condition
    is read as bool, where a condition stored as bytes is compared with 0."""
    rng = np.random.default_rng(11)
    shape = [1, 6, 21]
    keep = rng.random(shape) < 0.7
    keep[0, 2:4] = False
    initializers = [
        numpy_helper.from_array(keep, "keep"),
        numpy_helper.from_array(np.array(np.finfo(np.float32).min, np.float32), "lowest"),
    ]
    nodes = [
        helper.make_node("Where", ["keep", "x", "lowest"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["y"], axis=-1),
    ]
    model = _model(nodes, initializers, {"x": (TensorProto.FLOAT, shape)}, {"y": (TensorProto.FLOAT, shape)})
    vm, _ = _build(model, flavor)
    feed = {"x": (rng.standard_normal(shape) * 4).astype(np.float32)}
    (ours,), (expected,) = _run(vm, feed), _onnxruntime(model, feed)
    assert not np.isnan(ours).any()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=FLOAT_TOLERANCE)


@pytest.mark.parametrize("rows", [[1, 3], [0, 1, 2, 3]], ids=["some rows", "every row"])
def test_a_scatter_at_constant_indices_writes_as_onnxruntime_does(flavor: object, rows: list[int]) -> None:
    """``ScatterND`` at constant indices (optimum's causal LM exports write the padding mask into the causal
    mask with it) of run-time updates into constant data: some rows written (a gather and a ``Where`` on a
    constant mask), or every row (the gather alone, and a ``Where`` whose condition is then one value), equal to
    onnxruntime's (only moves and selects: exactly)."""
    rng = np.random.default_rng(12)
    shape, width = [1, 4, 6], 6
    initializers = [
        numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), "data"),
        numpy_helper.from_array(np.array([[0, row] for row in rows], np.int64), "indices"),
        numpy_helper.from_array(np.ones(shape, np.bool_), "everywhere"),
        numpy_helper.from_array(np.array(-1.0, np.float32), "other"),
        numpy_helper.from_array(np.array([len(rows), width], np.int64), "slices"),
    ]
    nodes = [
        helper.make_node("Relu", ["u"], ["positive"]),
        helper.make_node("Reshape", ["positive", "slices"], ["updates"]),
        helper.make_node("ScatterND", ["data", "indices", "updates"], ["scattered"]),
        helper.make_node("Add", ["scattered", "x"], ["sum"]),
        helper.make_node("Where", ["everywhere", "sum", "other"], ["y"]),
    ]
    inputs = {"u": (TensorProto.FLOAT, [1, len(rows), width]), "x": (TensorProto.FLOAT, shape)}
    model = _model(nodes, initializers, inputs, {"y": (TensorProto.FLOAT, shape)})
    vm, _ = _build(model, flavor)
    feed = {name: rng.standard_normal(dims).astype(np.float32) for name, (_, dims) in inputs.items()}
    (ours,), (expected,) = _run(vm, feed), _onnxruntime(model, feed)
    np.testing.assert_array_equal(ours, expected)


def test_a_product_whose_second_operand_is_shared_by_every_head(flavor: object) -> None:
    """Multi-query attention (optimum's Falcon export): ``[1, 2, M, K] x [1, 1, K, N]``, one key head for both
    query heads; B is expanded over the heads first. Equal to the numpy oracle, zero points at both ends."""
    rng = np.random.default_rng(13)
    for za, zb in ZERO_POINTS:
        initializers = _product_constants(za, zb, {})
        nodes = [helper.make_node("MatMulInteger", ["a", "b", "za", "zb"], ["scores"])]
        inputs = {"a": (TensorProto.UINT8, [1, 2, 4, 8]), "b": (TensorProto.UINT8, [1, 1, 8, 5])}
        model = _model(nodes, initializers, inputs, {"scores": (TensorProto.INT32, [1, 2, 4, 5])})
        vm, kinds = _build(model, flavor)
        assert "bmm" in kinds, kinds
        feed = {name: rng.integers(0, 256, dims).astype(np.uint8) for name, (_, dims) in inputs.items()}
        (ours,) = _run(vm, feed)
        (expected,) = integer_reference.run(model, feed)
        np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("width", [39, 159, 16, 7])
def test_rows_of_any_width_run_elementwise_as_onnxruntime_does(flavor: object, width: int) -> None:
    """An elementwise chain (GELU's erf, a per-channel scale, a residual add, the quantization after it) over
    rows whose width 16 does not divide: whole vectors, then one more over the last 16 channels overlapping
    the block before (widths under 16 go one lane at a time). The float output as onnxruntime computes it
    (FLOAT_TOLERANCE: erf's vector form differs from onnxruntime's by rounding), the quantized one within one
    step of it (a value on a rounding boundary may land on either side)."""
    rng = np.random.default_rng(14)
    shape = [1, 5, width]
    initializers = [
        numpy_helper.from_array(rng.uniform(0.5, 2.0, width).astype(np.float32), "scale"),
        numpy_helper.from_array(np.array(1 / np.sqrt(2), np.float32), "root"),
        numpy_helper.from_array(np.array(0.05, np.float32), "step"),
        numpy_helper.from_array(np.array(128, np.uint8), "zero"),
    ]
    nodes = [
        helper.make_node("Mul", ["x", "root"], ["scaled"]),
        helper.make_node("Erf", ["scaled"], ["erf"]),
        helper.make_node("Mul", ["erf", "scale"], ["weighted"]),
        helper.make_node("Add", ["weighted", "r"], ["y"]),
        helper.make_node("QuantizeLinear", ["y", "step", "zero"], ["q"]),
    ]
    inputs = {"x": (TensorProto.FLOAT, shape), "r": (TensorProto.FLOAT, shape)}
    outputs = {"y": (TensorProto.FLOAT, shape), "q": (TensorProto.UINT8, shape)}
    model = _model(nodes, initializers, inputs, outputs)
    vm, _ = _build(model, flavor)
    feed = {name: (rng.standard_normal(dims) * 3).astype(np.float32) for name, (_, dims) in inputs.items()}
    (ours, codes), (expected, expected_codes) = _run(vm, feed), _onnxruntime(model, feed)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=FLOAT_TOLERANCE * np.abs(expected).max())
    assert np.abs(codes.astype(np.int32) - expected_codes.astype(np.int32)).max() <= 1
