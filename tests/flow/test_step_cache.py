"""A decode step's cache of 8-bit codes (:func:`qcompile.flow.decoder.quantize_cache`): keys quantized per
position keep their codes and a float cache of their scales, and the step computes what it computed on the float
cache, bit for bit."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from qcompile.execution import ORT_IR_VERSION
from qcompile.flow import decoder
from qcompile.passes.dynamic_rows import DynamicActivationsPass
from qcompile.runtime.executors import session_from_bytes
from qcompile.runtime.generate import cache_row_codes

CAPACITY, HEADS, GROUPS, WIDTH = 6, 2, 2, 4  # GROUPS query heads per key head, as grouped-query attention
PAST, PRESENT = "past_key_values.0.key", "present.0.key"
RNG = np.random.default_rng(3)


def _step_model() -> onnx.ModelProto:
    """One attention score row of a decode step: the new key appended to the past keys, repeated for the grouped
    heads, transposed and scaled by 1/sqrt(sqrt(head_dim)) (the exporters' order), quantized statically, times the
    query's static codes; then the keys quantized per position (the pass). The present output is the new key
    alone, as :func:`qcompile.flow.decoder.step_graph` writes it."""
    heads = HEADS * GROUPS
    nodes = [
        helper.make_node("Identity", ["k"], [PRESENT]),
        helper.make_node("Concat", [PAST, PRESENT], [PRESENT + ".appended"], axis=2),
        helper.make_node("Unsqueeze", [PRESENT + ".appended", "two"], ["u"]),
        helper.make_node("Expand", ["u", "grouped"], ["e"]),
        helper.make_node("Reshape", ["e", "flat"], ["r"]),
        helper.make_node("Transpose", ["r"], ["t"], perm=[0, 1, 3, 2]),
        helper.make_node("Mul", ["t", "root"], ["m"]),
        helper.make_node("QuantizeLinear", ["m", "ks", "kz"], ["mq"]),
        helper.make_node("DequantizeLinear", ["mq", "ks", "kz"], ["md"]),
        helper.make_node("QuantizeLinear", ["q", "qs", "qz"], ["qq"]),
        helper.make_node("DequantizeLinear", ["qq", "qs", "qz"], ["qd"]),
        helper.make_node("MatMul", ["qd", "md"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["attention"], axis=-1),
    ]
    constants = {
        "two": np.array([2], np.int64),
        "grouped": np.array([1, HEADS, GROUPS, CAPACITY + 1, WIDTH], np.int64),
        "flat": np.array([1, heads, CAPACITY + 1, WIDTH], np.int64),
        "root": np.float32(WIDTH**-0.25),
        "ks": np.float32(0.05),
        "kz": np.uint8(128),
        "qs": np.float32(0.03),
        "qz": np.uint8(120),
    }
    graph = helper.make_graph(
        nodes,
        "step",
        [
            helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, heads, 1, WIDTH]),
            helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, HEADS, 1, WIDTH]),
            helper.make_tensor_value_info(PAST, TensorProto.FLOAT, [1, HEADS, CAPACITY, WIDTH]),
        ],
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, heads, 1, CAPACITY + 1]),
            helper.make_tensor_value_info("attention", TensorProto.FLOAT, [1, heads, 1, CAPACITY + 1]),
            helper.make_tensor_value_info(PRESENT, TensorProto.FLOAT, [1, HEADS, 1, WIDTH]),
        ],
        [numpy_helper.from_array(np.asarray(value), name) for name, value in constants.items()],
        value_info=[helper.make_tensor_value_info("m", TensorProto.FLOAT, [1, heads, WIDTH, CAPACITY + 1])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    rewritten = ir.from_proto(model)
    rewrite = DynamicActivationsPass()
    rewrite(rewritten)
    assert rewrite.keys == ["scores"]
    return ir.to_proto(rewritten)


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    model.ir_version = ORT_IR_VERSION
    session = session_from_bytes(model.SerializeToString())
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds), strict=True))


def test_keys_per_position_move_before_the_cache_with_a_cache_of_their_scales() -> None:
    model = _step_model()
    q = RNG.uniform(-2, 2, (1, HEADS * GROUPS, 1, WIDTH)).astype(np.float32)
    k = RNG.uniform(-3, 3, (1, HEADS, 1, WIDTH)).astype(np.float32)
    # positions of very different ranges (a first token's key is large), one of them zero
    past = (RNG.standard_normal((1, HEADS, CAPACITY, WIDTH)) * RNG.uniform(0.01, 20, (1, HEADS, CAPACITY, 1))).astype(
        np.float32
    )
    past[0, 1, 3] = 0
    before = _run(model, {"q": q, "k": k, PAST: past})
    coded = onnx.ModelProto()
    coded.CopyFrom(model)
    layout = decoder.Layout("input_ids", "scores", [(PAST, PRESENT)], None, None)
    cache = decoder.quantize_cache(coded, layout)
    assert cache is not None
    scales_in, scales_out = PAST + decoder.SCALES_SUFFIX, PRESENT + decoder.SCALES_SUFFIX
    assert cache.scales == {PAST: [scales_in, scales_out]}
    assert cache.codes[PAST] == [np.float32(WIDTH**-0.25), 127.0, 128.0]
    inputs = {value.name: value.type.tensor_type.elem_type for value in coded.graph.input}
    assert inputs[PAST] == TensorProto.UINT8 and inputs[scales_in] == TensorProto.FLOAT
    # the runtime quantizes a prefill's float cache as the graph quantizes each new key
    codes, scales = cache_row_codes(past, cache.codes[PAST])
    after = _run(coded, {"q": q, "k": k, PAST: codes, scales_in: scales})
    np.testing.assert_array_equal(after["scores"], before["scores"])
    new_codes, new_scales = cache_row_codes(k, cache.codes[PAST])
    np.testing.assert_array_equal(after[PRESENT], new_codes)
    np.testing.assert_array_equal(after[scales_out], new_scales)
    # 8-bit keys in, no float key read: the cache's Concat appends codes, the moves carry codes
    producers = {output: node for node in coded.graph.node for output in node.output}
    assert producers[PRESENT + ".appended"].input[1] == PRESENT


def test_a_cache_whose_moves_mix_rows_keeps_floats() -> None:
    """A reduction that is not over the key's own head_dim values (here: the keys' moves swap head_dim with the
    heads) has no per-position scale to keep: the cache stays as it is."""
    model = _step_model()
    for node in model.graph.node:
        if node.op_type == "Transpose" and list(node.output) == ["t"]:
            del node.attribute[:]
            node.attribute.append(helper.make_attribute("perm", [0, 3, 1, 2]))  # [1, W, heads, C+1]: heads reduced
    layout = decoder.Layout("input_ids", "scores", [(PAST, PRESENT)], None, None)
    assert decoder.quantize_cache(model, layout) is None
