"""Linear layers quantize their inputs per row at run time: the rewritten QDQ graph against a plain numpy model of
its integer arithmetic, the layers it leaves static, and the choice the options make."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompile.errors import CalibrationError
from qcompile.execution import to_proto
from qcompile.flow.quantize import QuantizeOptions, per_row_activations
from qcompile.passes.dynamic_rows import (
    ROWS_KEY,
    DynamicActivationsPass,
    fuse_rescales,
    quantize_key_columns,
    quantize_probability_rows,
    quantize_rows,
)
from qcompile.passes.last_logits import INPUT, slice_before_head
from qcompile.runtime.executors import session_from_bytes

RNG = np.random.default_rng(0)
W1 = RNG.integers(-127, 128, (8, 6)).astype(np.int8)  # MatMul [K, N], per-channel scales
S1 = RNG.uniform(0.01, 0.02, 6).astype(np.float32)
W2 = RNG.integers(-127, 128, (5, 8)).astype(np.int8)  # Gemm transB [N, K], one scale, an int32 bias
S2 = np.float32(0.015)
BIAS_CODES = RNG.integers(-1000, 1000, 5).astype(np.int32)
BIAS_SCALE = np.float32(0.05 * 0.015)  # the static input scale x the weight scale, as QDQ writes it


def _qdq_model() -> ir.Model:
    """x [2, S, 8] -> Relu -> Q/DQ -> MatMul (y) and -> Gemm over one row (z); a static product Q.K^T (p) reads
    the same codes, so those stay static, and a second Q/DQ feeds the two linear layers alone."""
    nodes = [
        helper.make_node("Relu", ["x"], ["h"]),
        helper.make_node("QuantizeLinear", ["h", "s", "z"], ["hq"]),
        helper.make_node("DequantizeLinear", ["hq", "s", "z"], ["hd"]),
        helper.make_node("MatMul", ["hd", "hd_t"], ["p"]),  # an activation product: static
        helper.make_node("Transpose", ["hd"], ["hd_t"], perm=[0, 2, 1]),
        helper.make_node("Neg", ["x"], ["g"]),
        helper.make_node("QuantizeLinear", ["g", "s", "z"], ["gq"]),
        helper.make_node("DequantizeLinear", ["gq", "s", "z"], ["gd"]),
        helper.make_node("DequantizeLinear", ["w1", "s1", "w1z"], ["w1d"], axis=1),
        helper.make_node("MatMul", ["gd", "w1d"], ["y"]),
        helper.make_node("Reshape", ["g", "rows"], ["g2"]),
        helper.make_node("QuantizeLinear", ["g2", "s", "z"], ["g2q"]),
        helper.make_node("DequantizeLinear", ["g2q", "s", "z"], ["g2d"]),
        helper.make_node("DequantizeLinear", ["w2", "s2", "w2z"], ["w2d"], axis=0),
        helper.make_node("DequantizeLinear", ["b", "bs", "bz"], ["bd"], axis=0),
        helper.make_node("Gemm", ["g2d", "w2d", "bd"], ["zz"], transB=1),
    ]
    initializers = {
        "s": np.float32(0.05),
        "z": np.uint8(128),
        "w1": W1,
        "s1": S1,
        "w1z": np.zeros(6, np.int8),
        "w2": W2,
        "s2": np.array([S2] * 5, np.float32),
        "w2z": np.zeros(5, np.int8),
        "b": BIAS_CODES,
        "bs": np.array([BIAS_SCALE] * 5, np.float32),
        "bz": np.zeros(5, np.int32),
        "rows": np.array([-1, 8], np.int64),
    }
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, "S", 8])],
        [
            helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
            for name in ("p", "y", "zz")  # (shapes left to inference)
        ],
        [numpy_helper.from_array(np.asarray(value), name) for name, value in initializers.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return ir.from_proto(model)


def _run(model: ir.Model, x: np.ndarray) -> dict[str, np.ndarray]:
    session = session_from_bytes(to_proto(model).SerializeToString())
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"x": x}), strict=True))


def test_linear_layers_compute_per_row_codes_bit_exactly_like_the_numpy_model() -> None:
    """Exact equality, no tolerance: the same float32 divisions, roundings and products in the same order, and an
    exact int32 product."""
    x = (RNG.standard_normal((2, 3, 8)) * np.array([[[1.0], [30.0], [0.01]]])).astype(np.float32)
    model = _qdq_model()
    before = _run(model, x)
    rewrite = DynamicActivationsPass()
    rewrite(model)
    assert len(rewrite.layers) == 2  # the MatMul and the Gemm; the product of activations stays static
    after = _run(model, x)
    np.testing.assert_array_equal(after["p"], before["p"])
    static = [node for node in model.graph if node.op_type == "QuantizeLinear" and ROWS_KEY not in node.metadata_props]
    assert len(static) == 1 and [node.op_type for node in model.graph].count("MatMulInteger") == 2

    g = -x
    codes, scale = quantize_rows(g)
    acc = codes.astype(np.int32) @ W1.astype(np.int32)
    np.testing.assert_array_equal(after["y"], acc.astype(np.float32) * S1 * scale)
    rows = g.reshape(-1, 8)
    codes, scale = quantize_rows(rows)
    acc = codes.astype(np.int32) @ W2.T.astype(np.int32)
    bias = (BIAS_CODES.astype(np.float64) * BIAS_SCALE).astype(np.float32)
    np.testing.assert_array_equal(after["zz"], acc.astype(np.float32) * S2 * scale + bias)
    # onnxruntime's file: each product and its rescaling one fused kernel, the same float32 products
    assert fuse_rescales(model) == 2
    assert [node.op_type for node in model.graph].count("MatMulIntegerToFloat") == 2
    fused = _run(model, x)
    for name in ("y", "zz", "p"):
        np.testing.assert_array_equal(fused[name], after[name])
    # the row of 0.01s keeps its resolution: per-tensor codes at 0.05 round it to nothing
    assert np.abs(after["y"][:, 2] - (g[:, 2] @ (W1 * S1))).max() < 0.1 * np.abs(g[:, 2] @ (W1 * S1)).max()
    assert np.abs(before["y"][:, 2]).max() == 0.0


def test_a_zero_row_gives_zero_codes_not_a_division_by_zero() -> None:
    model = _qdq_model()
    DynamicActivationsPass()(model)
    y = _run(model, np.zeros((2, 1, 8), np.float32))["y"]
    assert np.all(y == 0.0) and np.all(np.isfinite(y))


def test_the_lm_head_slices_before_its_row_quantization() -> None:
    """A decoder's prefill slices the head's input rows, in front of the chain every node of which names it."""
    model = _qdq_model()
    model.graph.outputs.pop(2)
    model.graph.outputs.pop(0)
    DynamicActivationsPass()(model)
    output = model.graph.outputs[0]
    output.name, output.shape = "logits", ir.Shape([2, "S", 6])
    assert output.producer() is not None and output.producer().metadata_props[ROWS_KEY] == "g"
    x = RNG.standard_normal((2, 5, 8)).astype(np.float32)
    every = session_from_bytes(to_proto(model).SerializeToString()).run(None, {"x": x})[0]
    assert slice_before_head(model, "logits") == INPUT
    last = session_from_bytes(to_proto(model).SerializeToString()).run(None, {"x": x, INPUT: np.array([4])})[0]
    np.testing.assert_array_equal(last[:, 0], every[:, -1])


def _attention_model() -> ir.Model:
    """scores [1, 2, S, T] -> Softmax -> Where(IsNaN(p), 0, p) -> Q/DQ (zero point 0) -> MatMul by V's static
    codes (v [1, 2, T, 4], zero point 130); the probabilities and V's codes are outputs too, for the numpy model."""
    nodes = [
        helper.make_node("Softmax", ["scores"], ["soft"], axis=-1),
        helper.make_node("IsNaN", ["soft"], ["nan"]),
        helper.make_node("Where", ["nan", "zero", "soft"], ["p"]),
        helper.make_node("QuantizeLinear", ["p", "ps", "pz"], ["pq"]),
        helper.make_node("DequantizeLinear", ["pq", "ps", "pz"], ["pd"]),
        helper.make_node("QuantizeLinear", ["v", "vs", "vz"], ["vq"]),
        helper.make_node("DequantizeLinear", ["vq", "vs", "vz"], ["vd"]),
        helper.make_node("MatMul", ["pd", "vd"], ["o"]),
    ]
    initializers = {
        "zero": np.float32(0.0),
        "ps": np.float32(1.0 / 255),
        "pz": np.uint8(0),
        "vs": np.float32(0.02),
        "vz": np.uint8(130),
    }
    graph = helper.make_graph(
        nodes,
        "attention",
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 2, "S", "T"]),
            helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, 2, "T", 4]),
        ],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("o", "p")]
        + [helper.make_tensor_value_info("vq", TensorProto.UINT8, None)],
        [numpy_helper.from_array(np.asarray(value), name) for name, value in initializers.items()],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def test_attention_probabilities_get_per_row_codes_bit_exactly_like_the_numpy_model() -> None:
    """P V with P per row at run time equals the numpy model exactly (the probabilities and V's codes read from
    the graph, so that only the rewrite's own arithmetic is modelled); a row spread over many positions, whose
    maximum is far below the static scale's range, keeps its resolution."""
    scores = (RNG.standard_normal((1, 2, 3, 200)) * np.array([[[[8.0], [0.01], [2.0]]]])).astype(np.float32)
    scores[0, 1, 2] = -np.inf  # a query that sees no position: a NaN row, which the exporters' guard makes 0
    v = RNG.uniform(-2, 2, (1, 2, 200, 4)).astype(np.float32)

    def run(model: ir.Model) -> dict[str, np.ndarray]:
        session = session_from_bytes(to_proto(model).SerializeToString())
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(None, {"scores": scores, "v": v}), strict=True))

    model = _attention_model()
    before = run(model)
    rewrite = DynamicActivationsPass()
    rewrite(model)
    assert rewrite.products == ["o"] and rewrite.layers == []
    static = [
        node.outputs[0].name
        for node in model.graph
        if node.op_type == "QuantizeLinear" and ROWS_KEY not in node.metadata_props
    ]
    assert static == ["vq"] and [node.op_type for node in model.graph].count("MatMulInteger") == 1
    after = run(model)
    codes, scale = quantize_probability_rows(after["p"])
    acc = codes.astype(np.int32) @ (after["vq"].astype(np.int32) - 130)
    np.testing.assert_array_equal(after["o"], acc.astype(np.float32) * np.float32(0.02) * scale)
    fused_model = ir.from_proto(to_proto(model))
    assert fuse_rescales(fused_model) == 1
    np.testing.assert_array_equal(run(fused_model)["o"], after["o"])
    # the chain reads the Softmax itself: the guard's pass over every probability is left to the output "p" alone
    assert not np.isnan(after["o"]).any() and not after["o"][0, 1, 2].any()
    chain = [node for node in model.graph if node.metadata_props.get(ROWS_KEY) == "soft"]
    assert [node.op_type for node in chain].count("IsNaN") == 1 and len(chain) > 5
    # the flat row (maximum ~1/200): 1/255 static steps leave it 2 levels; per row it has 255
    exact = after["p"] @ ((after["vq"].astype(np.float32) - 130) * np.float32(0.02))
    error_after, error_before = (np.abs(out[0, :, 1] - exact[0, :, 1]).max() for out in (after["o"], before["o"]))
    assert error_after < 0.05 * error_before


def _keys_model() -> ir.Model:
    """q [1, 2, S, 8] and k [1, 2, T, 8]: Q's static codes (zero point 120) times K^T scaled by 1/sqrt(8) and
    quantized statically (zero point 128), as the exporters write attention's scores; K^T scaled is an output
    too, for the numpy model."""
    nodes = [
        helper.make_node("QuantizeLinear", ["q", "qs", "qz"], ["qq"]),
        helper.make_node("DequantizeLinear", ["qq", "qs", "qz"], ["qd"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("Mul", ["kt", "root"], ["kts"]),
        helper.make_node("QuantizeLinear", ["kts", "ks", "kz"], ["kq"]),
        helper.make_node("DequantizeLinear", ["kq", "ks", "kz"], ["kd"]),
        helper.make_node("MatMul", ["qd", "kd"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["attention"], axis=-1),  # what makes K^T the keys
    ]
    initializers = {
        "qs": np.float32(0.03),
        "qz": np.uint8(120),
        "root": np.float32(8**-0.5),
        "ks": np.float32(0.05),
        "kz": np.uint8(128),
    }
    graph = helper.make_graph(
        nodes,
        "keys",
        [
            helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, 2, "S", 8]),
            helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, 2, "T", 8]),
        ],
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("attention", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("kts", TensorProto.FLOAT, [1, 2, 8, "T"]),  # (the rank: known)
            helper.make_tensor_value_info("qq", TensorProto.UINT8, None),
        ],
        [numpy_helper.from_array(np.asarray(value), name) for name, value in initializers.items()],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def test_keys_get_codes_per_position_bit_exactly_like_the_numpy_model() -> None:
    """Q K^T with each key (a column of K^T) at its own run-time scale equals the numpy model exactly (K^T and
    Q's codes read from the graph); a key far smaller than the static range keeps its resolution; the decode
    step's cache quantizer (:func:`cache_row_codes`, on keys as the cache holds them) gives the same codes."""
    from qcompile.passes import dynamic_rows
    from qcompile.runtime import generate
    from qcompile.runtime.generate import cache_row_codes

    assert generate.ROW_FLOOR == dynamic_rows.ROW_FLOOR  # (the runtime keeps its own copy: it imports no compiler)

    q = RNG.uniform(-3, 3, (1, 2, 3, 8)).astype(np.float32)
    k = (RNG.standard_normal((1, 2, 40, 8)) * np.where(np.arange(40) == 5, 0.01, 4.0)[:, None]).astype(np.float32)

    def run(model: ir.Model) -> dict[str, np.ndarray]:
        session = session_from_bytes(to_proto(model).SerializeToString())
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(None, {"q": q, "k": k}), strict=True))

    model = _keys_model()
    before = run(model)
    rewrite = DynamicActivationsPass()
    rewrite(model)
    assert rewrite.keys == ["scores"] and rewrite.products == [] and rewrite.layers == []
    static = [
        node.outputs[0].name
        for node in model.graph
        if node.op_type == "QuantizeLinear" and ROWS_KEY not in node.metadata_props
    ]
    assert static == ["qq"]
    after = run(model)
    codes, scales = quantize_key_columns(after["kts"])
    assert scales.shape == (1, 2, 1, 40)
    acc = (after["qq"].astype(np.int32) - 120) @ codes.astype(np.int32)
    np.testing.assert_array_equal(after["scores"], acc.astype(np.float32) * (scales * np.float32(0.03)))
    # the small key (max ~0.01 against a static step of 0.05): its scores keep their resolution
    exact = ((after["qq"].astype(np.float32) - 120) * np.float32(0.03)) @ after["kts"]
    error_after, error_before = (
        np.abs(out[..., 5] - exact[..., 5]).max() for out in (after["scores"], before["scores"])
    )
    assert error_after < 0.05 * error_before
    # the cache layout [1, heads, positions, head_dim], multiplied by 1/sqrt(8) first: the same codes and scales
    cached, cached_scales = cache_row_codes(k, [8**-0.5, 127.0, 128.0])
    np.testing.assert_array_equal(cached.astype(np.int32) - 128, codes.transpose(0, 1, 3, 2))
    np.testing.assert_array_equal(cached_scales, scales.transpose(0, 1, 3, 2))


def test_a_product_of_activations_that_is_no_attention_keeps_static_keys() -> None:
    """A MatMul of two activations whose result reaches no Softmax (a rotary embedding's frequencies times the
    positions, as optimum's export computes them) is not ``Q K^T``: its right operand stays static."""
    proto = to_proto(_keys_model())
    del proto.graph.node[-1]
    del proto.graph.output[1]
    model = ir.from_proto(proto)
    rewrite = DynamicActivationsPass()
    rewrite(model)
    assert rewrite.keys == [] and [node.op_type for node in model.graph].count("QuantizeLinear") == 2


def test_auto_is_dynamic_for_a_decoder_with_a_cache_and_static_otherwise() -> None:
    def model_with(inputs: list[str], outputs: list[str]) -> ir.Model:
        values = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1]) for name in inputs + outputs]
        nodes = [helper.make_node("Identity", [inputs[0]], [name]) for name in outputs]
        graph = helper.make_graph(nodes, "g", values[: len(inputs)], values[len(inputs) :])
        return ir.from_proto(helper.make_model(graph))

    cache = ["past_key_values.0.key", "past_key_values.0.value"]
    decoder = model_with(["input_ids", *cache], ["logits", "present.0.key", "present.0.value"])
    encoder = model_with(["input_ids"], ["last_hidden_state"])
    assert per_row_activations(decoder, QuantizeOptions())
    assert not per_row_activations(encoder, QuantizeOptions())
    assert per_row_activations(encoder, QuantizeOptions(activations="dynamic"))
    assert not per_row_activations(decoder, QuantizeOptions(activations="static"))
    assert not per_row_activations(decoder, QuantizeOptions(integer_only=True))
    with pytest.raises(CalibrationError, match="float unit"):
        QuantizeOptions(activations="dynamic", integer_only=True)
    with pytest.raises(CalibrationError, match="activations 'rows'"):
        QuantizeOptions(activations="rows")
