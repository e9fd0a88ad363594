"""Hadamard rotation: orthogonal for every size the models need, exact in float on real models (online
transforms), folded into a linear producer where one can take it, and refusals said.

Tolerance: 1e-5 of the largest output magnitude. A rotation only reorders float sums (x Q)(Q^T W); measured
1.2e-6 on all-MiniLM-L6-v2, 1.5e-6 on the pre-norm transformer, 3e-7 on EfficientNet-Lite0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import zoo

from qcompile import frontend
from qcompile.backends import ort as ort_backend
from qcompile.errors import CalibrationError
from qcompile.passes.hadamard import HadamardRotationPass, factors, rotation
from qcompile.passes.matmul_to_gemm import MatMulAddToGemmPass
from qcompile.passes.pipeline import QuantizeOptions
from qcompile.search import sensitivity

TOLERANCE = 1e-5


@pytest.mark.parametrize(
    ("size", "kind"),
    [
        (256, "sylvester"),
        (384, "kronecker"),
        (1536, "kronecker"),
        (160, "kronecker"),
        (576, "kronecker"),
        (72, "block-diagonal"),
    ],
)
def test_rotations_are_orthogonal(size: int, kind: str) -> None:
    q = rotation(size)
    assert factors(size)[2] == kind
    np.testing.assert_allclose(q @ q.T, np.eye(size), atol=1e-12)
    if kind != "block-diagonal":  # a full Hadamard mixes every channel into every other
        assert np.all(np.abs(q) > 0)


def _rotate(model: ir.Model, feeds: list[dict[str, np.ndarray]]) -> tuple[HadamardRotationPass, float]:
    MatMulAddToGemmPass()(model)
    references = sensitivity.run_all(model, feeds)
    rotator = HadamardRotationPass()
    rotator(model)
    onnx.checker.check_model(ort_backend.to_proto(model), full_check=True)
    outputs = sensitivity.run_all(model, feeds)
    worst = max(float(np.abs(o - r).max() / np.abs(r).max()) for o, r in zip(outputs, references, strict=True))
    return rotator, worst


def test_minilm_online_rotations_are_exact(minilm: Path) -> None:
    model = frontend.load(minilm)
    rotator, worst = _rotate(model, list(zoo.minilm_feeds(zoo.pydoc_sentences(2, offset=1000))))
    assert worst < TOLERANCE
    done = [item for item in rotator.rotations if item.reason is None]
    assert len(done) == 36 and {item.kind for item in done} == {"kronecker"}  # 384 = 12 x 32, 1536 = 12 x 128
    ops = {node.op_type for node in model.graph if "hadamard" in str(node.name)}
    assert ops == {"Mul", "Reshape", "MatMul", "Transpose"}  # standard ONNX ops: onnxruntime and TVM run them


def test_efficientnet_convs_are_left_alone_with_a_reason(efficientnet: Path) -> None:
    model = frontend.load(efficientnet)
    rotator, worst = _rotate(model, [{"input": crop[None]} for crop in zoo.photo_crops(2, seed=2)])
    assert worst < TOLERANCE
    refused = [item for item in rotator.rotations if item.reason is not None]
    assert refused and all("Conv reads its channels on axis 1" in item.reason for item in refused)  # type: ignore[operator]
    assert sum(1 for item in rotator.rotations if item.reason is None) == 1  # the classifier Gemm


def test_rotation_folds_into_a_linear_producer() -> None:
    rng = np.random.default_rng(0)

    def constant(name: str, array: np.ndarray) -> ir.Value:
        return ir.Value(
            name=name,
            shape=ir.Shape(array.shape),
            type=ir.TensorType(ir.DataType.FLOAT),
            const_value=ir.tensor(array.astype(np.float32), name=name),
        )

    x = ir.Value(name="x", shape=ir.Shape([4, 20]), type=ir.TensorType(ir.DataType.FLOAT))
    w1, b1, w2 = (
        constant("w1", rng.standard_normal((20, 48))),
        constant("b1", rng.standard_normal(48)),
        constant("w2", rng.standard_normal((48, 8))),
    )
    hidden = ir.Value(name="hidden", shape=ir.Shape([4, 48]), type=ir.TensorType(ir.DataType.FLOAT))
    y = ir.Value(name="y", shape=ir.Shape([4, 8]), type=ir.TensorType(ir.DataType.FLOAT))
    first = ir.node("Gemm", [x, w1, b1], outputs=[hidden], name="first")
    second = ir.node("MatMul", [hidden, w2], outputs=[y], name="second")
    graph = ir.Graph([x], [y], nodes=[first, second], initializers=[w1, b1, w2], opset_imports={"": 18}, name="chain")
    model = ir.Model(graph, ir_version=10)
    feeds = [{"x": rng.standard_normal((4, 20)).astype(np.float32)}]
    rotator, worst = _rotate(model, feeds)
    assert worst < TOLERANCE
    folded = [item for item in rotator.rotations if item.folded_into]
    assert [(item.value, item.folded_into, item.kind) for item in folded] == [
        ("hidden", "first", "kronecker")
    ]  # 48 = 12 x 4
    # "hidden" is rotated by folding (no transform); only the graph input x, feeding "first", is rotated online.
    online = {str(node.name).split("_hadamard")[0] for node in model.graph if "_hadamard" in str(node.name)}
    assert online == {"x"}


def test_option_is_validated() -> None:
    with pytest.raises(CalibrationError, match="not hadamard"):
        QuantizeOptions(rotate="givens")
