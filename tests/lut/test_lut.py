"""The table-lookup ternary path: packing, the numpy reference, the TVM kernel (host, and aarch64 under qemu),
the HLS-style C++ engine, the ternarize pass, and a ternary-trained digits MLP compiled for fpga-lut.

Every integer product is compared for equality (no tolerance): int8 x ternary in int32 is exact in every
engine. Float outputs of the ternary graph are compared with a numpy model of the same arithmetic at
1e-6 relative (float32 rescaling; the integer part is exact).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import zoo
from conftest import require_emulation, save_model
from onnx import TensorProto, helper, numpy_helper

from qcompile import api, hwmodels, runtime
from qcompile.backends import lut
from qcompile.backends.lut import fpga, hls, kernel, reference
from qcompile.backends.tvm import cross, threads
from qcompile.cli import main
from qcompile.errors import BackendError, CalibrationError, TargetError, UnsupportedModelError
from qcompile.execution import to_proto
from qcompile.passes.dynamic_rows import quantize_rows
from qcompile.passes.ternarize import TernarizePass, ternarize_weights
from qcompile.runtime.executors import session_from_bytes
from qcompile.runtime.lut import layout as lut_layout
from qcompile.runtime.lut import pack

# (rows, K, N): SmolLM2's MLP shape, and shapes the packing must pad (K not a multiple of 4 or 5, N not of
# the vector width, a single weight).
SHAPES = [(1, 576, 1536), (3, 7, 5), (2, 130, 77), (1, 1, 1)]


def _case(rows: int, k: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    activations = rng.integers(-128, 128, (rows, k)).astype(np.int8)
    activations[0, : min(k, 3)] = -128  # the extreme code: pair sums reach -256
    return activations, rng.integers(-1, 2, (k, n)).astype(np.int8)


@pytest.mark.parametrize("shape", SHAPES)
def test_packing_round_trips_and_the_table_reference_is_exact(shape: tuple[int, int, int]) -> None:
    activations, weights = _case(*shape)
    packed = pack.pack_trits5(weights)
    assert packed.shape == (shape[2], -(-shape[1] // 5)) and packed.max() < 243
    assert np.array_equal(pack.unpack_trits5(packed, shape[1]), weights)
    assert np.array_equal(reference.lut_matmul(activations, packed), reference.dense(activations, weights))


def test_packing_refuses_weights_that_are_not_ternary() -> None:
    with pytest.raises(BackendError, match="must be -1, 0 or \\+1"):
        pack.pack_trits5(np.array([[0, 2]]))
    with pytest.raises(BackendError, match="2-D"):
        pack.pack_pairs(np.zeros((0, 3)), 32)
    with pytest.raises(BackendError, match="16, 32 or 64"):
        pack.lane_order(24)


def test_host_kernel_is_bit_exact() -> None:
    flavor = lut_layout.host_flavor()
    module = kernel.build({f"case{index}": shape for index, shape in enumerate(SHAPES)}, flavor)
    for index, shape in enumerate(SHAPES):
        activations, weights = _case(*shape, seed=index)
        matmul = lut_layout.LutMatMul(module, f"case{index}", weights, shape[0], flavor)
        assert np.array_equal(matmul(activations), reference.dense(activations, weights)), shape
    with pytest.raises(BackendError, match=r"int8 \[1, 1\] activations"):
        matmul(np.zeros((1, 2), np.int8))


def test_every_host_kernel_variant_is_bit_exact_at_the_extremes() -> None:
    """Each variant (pairs / triplet words of each tile width, parallel / serial), called directly, on the
    padded shapes (rows that do not fill a tile included) and on the largest sums: every activation -128 and
    every weight -1 over K = 1536, where the 16-bit partial sums of a chunk come closest to overflowing
    (pairs: 126 x 512; words: 42 x 2 x 384)."""
    import tvm

    flavor = lut_layout.host_flavor()
    shapes = [*SHAPES, (2, 1536, 40), (6, 1536, 200), (13, 100, 70)]
    module = kernel.build({f"case{index}": shape for index, shape in enumerate(shapes)}, flavor)
    layouts = {
        "": lut_layout.arguments,
        lut_layout.WORDS: lambda weights, rows, _flavor: lut_layout.word_arguments(weights, rows),
    }
    for index, (rows, k, n) in enumerate(shapes):
        activations, weights = _case(rows, k, n, seed=index)
        if k == 1536:
            activations[:], weights[:] = -128, -1
        for variant, layout in lut_layout.variant_layouts(f"case{index}", flavor).items():
            arrays = [tvm.runtime.tensor(array) for array in [activations, *layouts[layout](weights, rows, flavor)]]
            module[variant](*arrays)
            result = arrays[lut_layout.OUTPUT_ARGUMENT].numpy()
            assert np.array_equal(result, reference.dense(activations, weights)), (variant, rows, k, n)


def test_word_kernel_tables_do_not_grow_with_rows() -> None:
    """The parallel parts are at most one per thread, each walking a range of row tiles with one tile's
    tables: a 2048-row prefill at K = 1536 needs a few hundred KB of tables, not 2048 rows of them."""
    plan = lut_layout.word_plan(2048, 1536, 576)
    assert plan.parts <= threads.count() and plan.row_parts * -(-plan.row_tiles // plan.row_parts) >= plan.row_tiles
    table = lut_layout.word_arguments(np.zeros((1536, 576), np.int8), 2048)[2]
    assert table.shape == (plan.parts, lut_layout.WORD_TILE_ROWS, 512, 32)


def test_triplet_words_hold_two_indices_per_output_lane() -> None:
    weights = np.array([[1, -1], [0, 0], [-1, 1], [1, 1], [1, 0], [1, -1], [-1, 0]], np.int8)  # K = 7, N = 2
    words = pack.pack_triplet_words(weights)
    assert words.shape == (1, 2, 32) and words.dtype == np.uint16
    digits = weights.astype(int) + 1
    first = 9 * digits[0] + 3 * digits[1] + digits[2]
    second = 9 * digits[3] + 3 * digits[4] + digits[5]
    third = 9 * digits[6] + 3 * 1 + 1  # padded with zero weights (digit 1)
    assert np.array_equal(words[0, 0, :2], first | (second << 8))
    assert np.array_equal(words[0, 1, :2], third | (13 << 8))  # 13: three zero weights
    assert (words[0, :, 2:] == 13 | (13 << 8)).all()  # padded outputs hold zero weights


def test_aarch64_kernel_is_bit_exact_under_qemu(tmp_path: Path) -> None:
    flavor = lut_layout.FLAVORS["aarch64"]
    toolchain, runner = require_emulation(flavor.tvm_target)
    shape = (2, 130, 77)
    kernel.export(kernel.build({"lut": shape}, flavor), tmp_path / "lut.so", flavor)
    assert cross.elf_info(tmp_path / "lut.so").machine == cross.check_elf(tmp_path / "lut.so", toolchain).machine
    activations, weights = _case(*shape)
    outputs, _ = cross.emulate(
        toolchain, tmp_path, "lut.so", [activations, *lut_layout.arguments(weights, shape[0], flavor)], "cortex-a72",
        ["+neon"], function="lut", runner=runner,
    )  # fmt: skip
    assert np.array_equal(outputs[lut_layout.OUTPUT_ARGUMENT], reference.dense(activations, weights))


def test_cpp_simulation_of_the_engine_is_bit_exact(tmp_path: Path) -> None:
    layers = [hls.EngineLayer(f"layer{index}", k, n, 16, 4) for index, (_, k, n) in enumerate(SHAPES)]
    hls.emit(layers, tmp_path)
    binary = hls.compile_simulation(tmp_path, tmp_path / "sim")
    for index, shape in enumerate(SHAPES):
        activations, weights = _case(shape[0] + 1, *shape[1:], seed=index)
        packed = pack.pack_trits5(weights)
        assert np.array_equal(
            hls.simulate(binary, index, activations, packed), reference.lut_matmul(activations, packed)
        )


def _linear_model(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    """x [2, 3, 8] -> MatMul W1 [8, 6] -> Relu -> Gemm(transB) W2 [4, 6] + b -> y."""
    rng = np.random.default_rng(3)
    w1 = rng.standard_normal((8, 6)).astype(np.float32)
    w2 = rng.standard_normal((4, 6)).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="first"),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Reshape", ["r", "flat"], ["f"]),
            helper.make_node("Gemm", ["f", "w2", "b"], ["y"], name="second", transB=1),
        ],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [6, 4])],
        [
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(w2, "w2"),
            numpy_helper.from_array(bias, "b"),
            numpy_helper.from_array(np.array([6, 6], np.int64), "flat"),
        ],
    )
    path = save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "linear.onnx")
    return path, w1, w2, bias


def test_ternarize_pass_computes_the_ternary_arithmetic(tmp_path: Path) -> None:
    path, w1, w2, bias = _linear_model(tmp_path)
    model = ir.load(path)
    ternarize = TernarizePass()
    ternarize(model)
    assert [(layer.name, layer.k, layer.n) for layer in ternarize.layers] == [("first", 8, 6), ("second", 6, 4)]
    proto = to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    assert {node.op_type for node in proto.graph.node} >= {"MatMulInteger", "ReduceMax", "QuantizeLinear"}
    assert not {"MatMul", "Gemm"} & {node.op_type for node in proto.graph.node}
    x = np.random.default_rng(4).standard_normal((2, 3, 8)).astype(np.float32)
    (y,) = session_from_bytes(proto.SerializeToString()).run(None, {"x": x})

    def layer(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
        trits, scales = ternarize_weights(weights)
        codes, row_scale = quantize_rows(values)
        return (
            reference.dense(codes.reshape(-1, weights.shape[0]), trits)
            .reshape(*values.shape[:-1], -1)
            .astype(np.float32)
            * row_scale
            * scales
        )

    expected = layer(np.maximum(layer(x, w1), 0).reshape(6, 6), w2.T) + bias
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())
    with pytest.raises(ValueError, match="granularity"):
        TernarizePass("row")


def test_ternarize_refuses_a_model_without_linear_layers(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    path = save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "relu.onnx")
    with pytest.raises(UnsupportedModelError, match="no MatMul / Gemm"):
        TernarizePass()(ir.load(path))
    with pytest.raises(UnsupportedModelError, match="no MatMul / Gemm"):
        api.compile(path, tmp_path / "out", target="fpga-lut", calibration_data=[{"x": np.ones((1, 4), np.float32)}])
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def ternary_digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float, Path]:
    """The MLP trained here for ternary weights, its float-QAT accuracy, and its fpga-lut artifact."""
    folder = tmp_path_factory.mktemp("ternary")
    model, accuracy = zoo.train_digits_ternary(folder / "digits_ternary.onnx")
    train_x, _, _, _ = zoo.digits_split()
    output = folder / "digits.fpga-lut"
    api.compile(
        model, output, target="fpga-lut", calibration_data=[{"image": train_x[i : i + 1]} for i in range(4)],
        progress=False,
    )  # fmt: skip
    return model, accuracy, output


def test_ternary_digits_keep_their_qat_accuracy_and_lut_equals_onnxruntime(
    ternary_digits: tuple[Path, float, Path],
) -> None:
    _, qat_accuracy, artifact = ternary_digits
    _, _, test_x, test_y = zoo.digits_split()
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert (
        manifest["target"]["name"] == "fpga-lut"
        and manifest["measured"]["accuracy"]["lut_vs_onnxruntime_max_abs_diff"] == 0
    )
    assert {layer["weight_format"] for layer in manifest["layers"]} == {"ternary"}
    session = runtime.load(artifact, "lut")
    sample = {"image": test_x[:1]}
    assert np.array_equal(session.run(sample)["logits"], runtime.load(artifact, "onnxruntime").run(sample)["logits"])
    assert qat_accuracy > 0.93
    # The compiled model computes what the quantization-aware model trained: within 1 point of it.
    session = runtime.load(artifact, "onnxruntime")
    full = np.array([session.run({"image": test_x[i : i + 1]})["logits"].argmax() for i in range(len(test_x))])
    assert abs(float(np.mean(full == test_y)) - qat_accuracy) <= 0.01


def test_weights_that_are_ternary_already_keep_their_codes_and_scale(
    ternary_digits: tuple[Path, float, Path], tmp_path: Path
) -> None:
    """The digits MLP exported with its ternary weights themselves ({-a, 0, a} per output channel, a third
    or more of them zero), as a model trained ternary ships: the artifact's trits and scales are exactly
    those, so it computes what the float model computes up to its int8 activation rows (absmean scales had
    kept 85 % argmax agreement on such an MLP)."""
    model = onnx.load(str(ternary_digits[0]))
    exact = {}
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.ndim == 2:  # Gemm(transB) weights [N, K]; ternarized per output channel from the latent ones
            trits, scales = ternarize_weights(array.T)
            exact[init.name] = (trits, scales)
            init.CopyFrom(numpy_helper.from_array((trits * scales).T.astype(np.float32), init.name))
    assert all((trits == 0).mean() > 0.2 for trits, _ in exact.values())
    path = save_model(model, tmp_path / "ternary_weights.onnx")
    train_x, _, test_x, _ = zoo.digits_split()
    api.compile(path, tmp_path / "out", target="fpga-lut", calibration_data=[{"image": train_x[:1]}], progress=False)
    ternary = onnx.load(str(tmp_path / "out" / api.TERNARY_ONNX))
    stored = [numpy_helper.to_array(init) for init in ternary.graph.initializer if init.name.endswith("_scales")]
    for layer, (trits, scales) in zip(lut.ternary_layers(ternary), exact.values(), strict=True):
        np.testing.assert_array_equal(layer.weights, trits)
        assert any(np.array_equal(found, scales) for found in stored)
    ours, theirs = runtime.load(tmp_path / "out", "lut"), runtime.load(tmp_path / "out", "onnxruntime-fp32")
    agree = [
        ours.run({"image": x[None]})["logits"].argmax() == theirs.run({"image": x[None]})["logits"].argmax()
        for x in test_x
    ]
    assert np.mean(agree) >= 0.99


def test_every_engine_agrees_on_the_digits_layers(ternary_digits: tuple[Path, float, Path], tmp_path: Path) -> None:
    _, _, artifact = ternary_digits
    proto = onnx.load(str(artifact / api.TERNARY_ONNX))
    layers = lut.ternary_layers(proto)
    plan = json.loads((artifact / lut.PLAN).read_text())
    binary = hls.compile_simulation(artifact / lut.FOLDER, tmp_path / "sim")
    _, _, test_x, _ = zoo.digits_split()
    first, _ = quantize_rows(test_x[:16].reshape(16, 64))
    layer = layers[0]
    packed = np.fromfile(artifact / plan["files"][layer.name], np.uint8).reshape(layer.n, -1)
    expected = reference.dense(first, layer.weights)
    assert np.array_equal(hls.simulate(binary, 0, first, packed), expected)
    assert np.array_equal(reference.lut_matmul(first, packed), expected)
    assert plan["resources"]["luts"] <= plan["resources"]["luts_available"] and plan["weights_on_chip"]
    assert [entry["k"] for entry in plan["layers"]] == [64, 128, 128]
    if plan["device_kernels"] == lut.DEVICE_KERNELS:
        assert cross.elf_info(artifact / lut.DEVICE_KERNELS).machine == 183  # EM_AARCH64


def test_cli_compiles_for_fpga_lut(
    ternary_digits: tuple[Path, float, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, _, _ = ternary_digits
    train_x, _, _, _ = zoo.digits_split()
    (tmp_path / "calibration").mkdir()
    np.save(tmp_path / "calibration" / "sample.npy", train_x[:1])
    np.save(tmp_path / "sample.npy", train_x[:1])
    output = tmp_path / "cli.fpga-lut"
    assert (
        main(
            [
                str(model),
                "--target",
                "fpga-lut",
                "-o",
                str(output),
                "--calibration",
                str(tmp_path / "calibration"),
                "--quiet",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "fpga-lut estimate" in printed and "lut vs onnxruntime: max |diff| 0" in printed
    assert main(["run", str(output), "--executor", "lut", "--input", str(tmp_path / "sample.npy")]) == 0
    assert main(["verify", str(output)]) == 0
    (check,) = api.gate(output, max_latency_ms=1.0)  # the FPGA is not here: the plan's estimate
    assert check.passed and "estimated for fpga-lut by the LUT engine plan" in check.source


def test_fpga_estimate_for_a_smollm2_sized_decoder() -> None:
    target = hwmodels.load_target("fpga-lut")
    shapes = [
        ("q", 576, 576),
        ("k", 576, 192),
        ("v", 576, 192),
        ("o", 576, 576),
        ("gate", 576, 1536),
        ("up", 576, 1536),
        ("down", 1536, 576),
    ]
    layers = [(f"{block}.{name}", k, n) for block in range(30) for name, k, n in shapes]
    estimate = fpga.decoder_estimate(layers, target, lm_head=(576, 49152))
    # 106M ternary weights at 1.6 bits do not fit the 2.9 MiB of BRAM + URAM: streamed, DDR-bound.
    assert not estimate["weights_on_chip"] and estimate["bound"] == "weight streaming (DDR)"
    assert 19 < estimate["weights_mib"] < 21
    assert 0 < estimate["tokens_per_s"] < 1e4 and estimate["reference"]["decode_tokens_per_s"] == 25.0
    # A 128-token prompt is 128 rows per layer: compute-bound, longer than 64 tokens, shorter than 128 decodes.
    first = estimate["time_to_first_token_s"]
    assert first["64"] < first["128"] < 128 / estimate["tokens_per_s"]
    assert estimate["resources"]["luts"] <= estimate["resources"]["luts_available"]


def test_impossible_engine_and_bad_options_are_clear_errors(tmp_path: Path) -> None:
    text = (Path(hwmodels.__file__).parent / "targets" / "fpga-lut.toml").read_text()
    board = tmp_path / "tiny-fpga.toml"
    board.write_text(text.replace('name = "fpga-lut"', 'name = "tiny-fpga"').replace("luts = 117120", "luts = 1000"))
    with pytest.raises(TargetError, match="needs 47616 LUTs; tiny-fpga has 1000"):
        fpga.plan([("layer", 64, 64, 1)], hwmodels.load_target(str(board)))
    with pytest.raises(CalibrationError, match="ternary scales"):
        from qcompile.flow.quantize import QuantizeOptions

        QuantizeOptions(ternary_scales="row")
