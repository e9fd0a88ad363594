"""A decoder's LM head reads the sequence from a position the caller may give: every position's logits by
default, the last one's alone when a prefill asks."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from qcompile.execution import to_proto
from qcompile.passes.last_logits import INPUT, slice_before_head
from qcompile.runtime.executors import session_from_bytes


def _head(op: str = "MatMul") -> ir.Model:
    """hidden [1, S, 8] -> QuantizeLinear -> DequantizeLinear -> MatMul [8, 16] -> logits, as a QDQ LM head."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["hidden"], ["h"]),
            helper.make_node("QuantizeLinear", ["h", "scale", "zero"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["dq"]),
            helper.make_node(op, ["dq", "w"] if op == "MatMul" else ["dq"], ["logits"]),
        ],
        "head",
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, "sequence", 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "sequence", 16 if op == "MatMul" else 8])],
        [
            numpy_helper.from_array(np.float32(0.02), "scale"),
            numpy_helper.from_array(np.uint8(128), "zero"),
            numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w"),
        ],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def test_the_head_computes_every_position_by_default_and_the_last_alone_when_asked() -> None:
    """Exact: the slice moves rows, the product of each row is the same."""
    model = _head()
    hidden = np.random.default_rng(1).standard_normal((1, 5, 8)).astype(np.float32)
    (before,) = session_from_bytes(to_proto(model).SerializeToString()).run(None, {"hidden": hidden})
    assert slice_before_head(model, "logits") == INPUT
    proto = to_proto(model)
    ops = [node.op_type for node in proto.graph.node]
    assert ops == ["Relu", "Slice", "QuantizeLinear", "DequantizeLinear", "MatMul"]  # before the head's quantization
    session = session_from_bytes(proto.SerializeToString())
    (every,) = session.run(None, {"hidden": hidden})
    (last,) = session.run(None, {"hidden": hidden, INPUT: np.array([4], np.int64)})
    np.testing.assert_array_equal(every, before)
    assert last.shape == (1, 1, 16)
    np.testing.assert_array_equal(last[0, 0], before[0, -1])
    assert slice_before_head(model, "logits") is None  # once


def test_logits_not_from_a_linear_layer_are_left_alone() -> None:
    model = _head("Softmax")
    assert slice_before_head(model, "logits") is None
    assert INPUT not in model.graph.initializers
