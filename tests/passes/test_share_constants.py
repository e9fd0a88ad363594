"""Equal constants stored once, transposed copies rebuilt by a Transpose: the files shrink, the outputs do not
change."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from qcompile.execution import to_proto
from qcompile.passes.share_constants import share_constants
from qcompile.runtime.executors import session_from_bytes


def _model() -> tuple[ir.Model, np.ndarray]:
    """A tied table read by a Gather and, transposed, by a MatMul (as exporters write an LM head), and one
    rotation matrix stored once per use, as the online Hadamard rotation adds it."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((4096, 64)).astype(np.float32)  # 1 MB: a transposed copy worth a node
    rotation = rng.standard_normal((64, 64)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0),
            helper.make_node("MatMul", ["rows", "rotation_a"], ["turned"]),
            helper.make_node("MatMul", ["turned", "rotation_b"], ["twice"]),
            helper.make_node("MatMul", ["twice", "table_t"], ["logits"]),
        ],
        "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, 4096])],
        [
            numpy_helper.from_array(table, "table"),
            numpy_helper.from_array(np.ascontiguousarray(table.T), "table_t"),
            numpy_helper.from_array(rotation, "rotation_a"),
            numpy_helper.from_array(rotation.copy(), "rotation_b"),
        ],
    )
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])), table


def test_tied_and_repeated_constants_are_stored_once_with_the_same_outputs() -> None:
    """Bit-identical logits: the Transpose onnxruntime folds moves values, it computes nothing."""
    model, table = _model()
    ids = np.array([[1, 4095, 1]], np.int64)
    (before,) = session_from_bytes(to_proto(model).SerializeToString()).run(None, {"ids": ids})
    done = share_constants(model)
    assert done == {"shared": 1, "transposed": 1, "bytes_saved": table.nbytes + 64 * 64 * 4}
    proto = to_proto(model)
    assert sorted(init.name for init in proto.graph.initializer) == ["rotation_a", "table"]
    assert proto.graph.node[0].op_type == "Transpose"
    (after,) = session_from_bytes(proto.SerializeToString()).run(None, {"ids": ids})
    np.testing.assert_array_equal(after, before)


def test_graph_outputs_and_unequal_constants_are_left_alone() -> None:
    model, _ = _model()
    model.graph.initializers["rotation_b"].const_value = ir.tensor(np.eye(64, dtype=np.float32))
    model.graph.outputs.append(model.graph.initializers["table_t"])
    assert share_constants(model) == {"shared": 0, "transposed": 0, "bytes_saved": 0}
