"""4-bit blocked weights packed two to a byte into onnxruntime's MatMulNBits; embedding tables as int8 rows or
4-bit blocks."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from qcompile.execution import to_proto
from qcompile.passes import embedding
from qcompile.passes.pack_int4 import pack, pack_int4_weights, unpack
from qcompile.passes.quant_spec import SCALE_TABLE, QuantSpec, on_scale_grid
from qcompile.runtime.executors import session_from_bytes


def test_packing_round_trips_every_code() -> None:
    codes = np.random.default_rng(0).integers(-8, 8, size=(6, 64)).astype(np.int8)
    codes[0, :16] = np.arange(-8, 8)
    packed = pack(codes, 32)
    assert packed.shape == (6, 2, 16) and packed.dtype == np.uint8
    assert packed[0, 0, 0] == (0 | (1 << 4))  # codes -8, -7 -> nibbles 0 (low), 1 (high)
    np.testing.assert_array_equal(unpack(packed), codes)


def _blocked_matmul(codes: np.ndarray, scales: np.ndarray, block: int) -> ir.Model:
    """x [3, K] @ W [K, N], W rebuilt as the QDQ pass writes a blocked weight: DequantizeLinear of [N * K /
    block, block] rows (axis 0), Reshape [N, K], Transpose."""
    n, k = codes.shape
    rows = codes.reshape(-1, block)
    graph = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["codes", "scales", "zero"], ["rows"], axis=0),
            helper.make_node("Reshape", ["rows", "shape"], ["matrix"]),
            helper.make_node("Transpose", ["matrix"], ["w"], perm=[1, 0]),
            helper.make_node("MatMul", ["x", "w"], ["y"], name="linear"),
        ],
        "blocked",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
        [
            numpy_helper.from_array(rows, "codes"),
            numpy_helper.from_array(scales.reshape(-1).astype(np.float32), "scales"),
            numpy_helper.from_array(np.zeros(rows.shape[0], np.int8), "zero"),
            numpy_helper.from_array(np.array([n, k], np.int64), "shape"),
        ],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def test_matmulnbits_computes_the_blocked_product() -> None:
    """The packed node's output against the QDQ graph's on onnxruntime. Tolerance: onnxruntime's kernel
    (accuracy level 4) rounds the float activations to int8 per block of 32 inputs, half a step of
    max|x| / 127 per input; over K = 128 random terms that stays under 1 % of the output's peak."""
    rng = np.random.default_rng(1)
    codes = rng.integers(-8, 8, size=(16, 128)).astype(np.int8)
    scales = rng.uniform(0.01, 0.1, size=(16, 4)).astype(np.float32)
    x = rng.standard_normal((3, 128)).astype(np.float32)
    model = _blocked_matmul(codes, scales, 32)
    (expected,) = session_from_bytes(to_proto(model).SerializeToString()).run(None, {"x": x})
    np.testing.assert_allclose(expected, x @ (codes * np.repeat(scales, 32, axis=1)).T, rtol=1e-5, atol=1e-5)
    assert pack_int4_weights(model) == {4: 1, 8: 0}
    proto = to_proto(model)
    assert [node.op_type for node in proto.graph.node] == ["MatMulNBits"]  # the float rebuild is gone
    assert proto.graph.output[0].name == "y"
    weights = [numpy_helper.to_array(init) for init in proto.graph.initializer]
    assert sum(array.nbytes for array in weights if array.dtype == np.uint8) == codes.size // 2
    assert [array.dtype for array in weights if array.dtype != np.uint8] == [np.float32]  # off the grid: float32
    (packed,) = session_from_bytes(proto.SerializeToString()).run(None, {"x": x})
    assert np.abs(packed - expected).max() <= 0.01 * np.abs(expected).max()


def test_wider_codes_become_8_bit_and_small_blocks_are_left_alone() -> None:
    """A blocked layer that took int8 weights (int4 cost it too much) is an 8-bit MatMulNBits, one code per
    byte: left as DequantizeLinear rows, onnxruntime dequantizes it on every run. Same tolerance as above."""
    rng = np.random.default_rng(2)
    codes = rng.integers(-128, 128, size=(4, 64)).astype(np.int8)
    np.testing.assert_array_equal(unpack(pack(codes, 32), bits=8), codes)
    model = _blocked_matmul(codes, np.full((4, 2), 0.05, np.float32), 32)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    (expected,) = session_from_bytes(to_proto(model).SerializeToString()).run(None, {"x": x})
    assert pack_int4_weights(model) == {4: 0, 8: 1}
    (packed,) = session_from_bytes(to_proto(model).SerializeToString()).run(None, {"x": x})
    assert np.abs(packed - expected).max() <= 0.01 * np.abs(expected).max()
    small_blocks = _blocked_matmul(codes[:, :48], np.full((4, 6), 0.05, np.float32), 8)  # blocks of 8
    assert pack_int4_weights(small_blocks) == {4: 0, 8: 0}


def test_embedding_rows_round_within_half_a_step() -> None:
    table = np.random.default_rng(3).standard_normal((8, 5)).astype(np.float32)
    table[2] = 0
    codes, scales = embedding.quantize_rows(table)
    assert codes.dtype == np.int8 and scales.shape == (8, 1) and scales[2, 0] == 1
    assert np.abs(codes).max() == 127
    assert np.all(np.abs(codes * scales - table) <= scales / 2 + 1e-7)


def test_block_scales_on_the_grid_are_stored_in_one_byte() -> None:
    """Block scales on the quantizer's grid (QuantSpec puts every blocked weight's there) are stored as one
    uint8 code each and a float32 peak per output channel, read back by a Gather and a Mul onnxruntime folds at
    load: the product is unchanged (bit-identical output to the same scales stored as float32)."""
    rng = np.random.default_rng(4)
    codes = rng.integers(-8, 8, size=(16, 128)).astype(np.int8)
    spec = QuantSpec(bits=4, scale_rule="mse", axis=0, block_size=32)
    scales = spec.weight_scales(rng.standard_normal((16, 128)).astype(np.float32) * rng.uniform(0.01, 1, (16, 1)))
    np.testing.assert_array_equal(on_scale_grid(scales), scales)
    x = rng.standard_normal((3, 128)).astype(np.float32)
    model = _blocked_matmul(codes, scales, 32)
    exact = _blocked_matmul(codes, scales * np.float32(1 + 1e-6), 32)  # off the grid: float32
    assert pack_int4_weights(model) == {4: 1, 8: 0} and pack_int4_weights(exact) == {4: 1, 8: 0}
    proto = to_proto(model)
    assert [node.op_type for node in proto.graph.node] == ["Cast", "Gather", "Mul", "Reshape", "MatMulNBits"]
    stored = {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}
    codes_stored = next(array for name, array in stored.items() if name.endswith("_codes"))
    assert codes_stored.dtype == np.uint8 and codes_stored.shape == (16, 4)
    assert sum(array.nbytes for array in stored.values()) == 16 * 128 // 2 + 16 * 4 + 16 * 4 + 256 * 4 + 8
    (narrow,) = session_from_bytes(proto.SerializeToString()).run(None, {"x": x})
    wide = to_proto(exact)  # the same scales, stored as float32
    (kept,) = [init for init in wide.graph.initializer if init.data_type == TensorProto.FLOAT]
    kept.CopyFrom(numpy_helper.from_array(scales.reshape(-1), kept.name))
    (expected,) = session_from_bytes(wide.SerializeToString()).run(None, {"x": x})
    np.testing.assert_array_equal(narrow, expected)


def test_the_scale_grid_moves_a_scale_by_at_most_a_half_step() -> None:
    """16 steps an octave: a scale moves by at most 2**(1/32) - 1 (2.2 %); each row's largest is kept exactly,
    and scales 2**-16 below it or less go to the grid's floor."""
    rng = np.random.default_rng(6)
    scales = np.exp(rng.uniform(-8, 0, size=(64, 18))).astype(np.float32)
    grid = on_scale_grid(scales)
    assert np.all(np.abs(grid / scales - 1) <= 2 ** (1 / 32) - 1 + 1e-6)
    np.testing.assert_array_equal(grid.max(axis=1), scales.max(axis=1))
    np.testing.assert_array_equal(on_scale_grid(grid), grid)
    tiny = np.array([[1.0, 1e-9]], np.float32)
    np.testing.assert_allclose(on_scale_grid(tiny), [[1.0, 2.0**-15.9375]], rtol=1e-6)


def test_int4_tables_are_gathered_from_4_bit_blocks() -> None:
    """With a block size the table takes 4-bit codes per block of a row, as the model's int4 weights do;
    onnxruntime's GatherBlockQuantized returns exactly codes x scale (float32 products of the stored values),
    and each value is within half a step of the table where its block's scale clips nothing."""
    rng = np.random.default_rng(5)
    table = rng.standard_normal((1 << 15, 64)).astype(np.float32)  # 2M values: over embedding.MIN_ELEMENTS
    ids = np.array([[0, 7, 32767, 7]], np.int64)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0)],
        "lookup",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, [1, 4, 64])],
        [numpy_helper.from_array(table, "table")],
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    (done,) = embedding.quantize_embeddings(model, block=32)
    assert done["format"] == "int4, blocks of 32"
    proto = to_proto(model)
    assert [node.op_type for node in proto.graph.node] == ["Cast", "Gather", "Mul", "Reshape", "GatherBlockQuantized"]
    stored = {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}
    codes = unpack(stored["table_int4_rows"].reshape(1 << 15, 2, 16))
    scales = SCALE_TABLE[stored["table_block_scales_codes"]] * stored["table_block_scales_peaks"]
    rows = 1 << 15
    assert sum(array.nbytes for array in stored.values()) == table.size // 2 + table.size // 32 + rows * 4 + 1024 + 16
    (rows,) = session_from_bytes(proto.SerializeToString()).run(None, {"ids": ids})
    dequantized = (codes.reshape(-1, 2, 32) * scales[..., None]).reshape(table.shape)
    np.testing.assert_array_equal(rows[0], dequantized[ids[0]])
    step = np.repeat(scales, 32, axis=1)
    inside = np.abs(table) <= 7 * step
    assert np.all(np.abs(dequantized - table)[inside] <= step[inside] / 2 + 1e-7)
