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
from graph_helpers import constant

from qcompile import execution, frontend
from qcompile.errors import CalibrationError
from qcompile.flow.quantize import QuantizeOptions, quantize
from qcompile.passes.hadamard import HadamardRotationPass, channels_in_grid_order, factors, rotation
from qcompile.passes.matmul_to_gemm import MatMulAddToGemmPass
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


def _rotate(
    model: ir.Model, feeds: list[dict[str, np.ndarray]], residual: bool = False
) -> tuple[HadamardRotationPass, float]:
    MatMulAddToGemmPass()(model)
    references = sensitivity.run_all(model, feeds)
    rotator = HadamardRotationPass(residual=residual)
    rotator(model)
    onnx.checker.check_model(execution.to_proto(model), full_check=True)
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
    # Standard ONNX ops that onnxruntime and TVM run; the Shape keeps the model's dynamic dims.
    assert ops == {"Mul", "Reshape", "MatMul", "Transpose", "Shape"}


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


def _tiny_decoder(
    extra_reader: str | None = None, layer_norm: bool = False
) -> tuple[ir.Model, list[dict[str, np.ndarray]]]:
    """A pre-norm decoder at opset 18 as exporters write it: embedding Gather, RMSNorm (Pow / ReduceMean /
    Add / Sqrt / Reciprocal / Mul, then * gamma) feeding two projections, a residual Add written by a linear
    layer, a final RMSNorm and a head. ``extra_reader``: an op that also reads the stream (a refusal case)."""
    rng = np.random.default_rng(1)
    width, vocab = 48, 40

    ids = ir.Value(name="ids", shape=ir.Shape([1, 6]), type=ir.TensorType(ir.DataType.INT64))
    nodes = []

    def op(kind: str, inputs: list[ir.Value], name: str) -> ir.Value:
        out = ir.Value(name=name)
        nodes.append(ir.node(kind, inputs, outputs=[out], name=f"node_{name}"))
        return out

    def rmsnorm(x: ir.Value, name: str) -> ir.Value:
        gamma = rng.uniform(0.5, 2.0, width) * np.where(np.arange(width) % 12 == 0, 10.0, 1.0)
        if layer_norm:  # a LayerNormalization instead (pre-LN GPT / OPT style)
            beta = constant(f"{name}_beta", rng.normal(0, 0.5, width))
            return op("LayerNormalization", [x, constant(f"{name}_gamma", gamma), beta], f"{name}_out")
        squared = op("Pow", [x, constant(f"{name}_two", np.array(2.0))], f"{name}_sq")
        mean = op("ReduceMean", [squared, constant(f"{name}_axes", np.array([-1], np.int64))], f"{name}_ms")
        root = op("Sqrt", [op("Add", [mean, constant(f"{name}_eps", np.array(1e-6))], f"{name}_eps_add")], f"{name}_rt")
        scaled = op("Mul", [x, op("Reciprocal", [root], f"{name}_inv")], f"{name}_scaled")
        return op("Mul", [constant(f"{name}_gamma", gamma), scaled], f"{name}_out")

    table = constant("table", rng.standard_normal((vocab, width)))
    stream = op("Gather", [table, ids], "embedded")
    normed = rmsnorm(stream, "norm1")
    up = op("MatMul", [normed, constant("w_up", rng.standard_normal((width, 2 * width)) / 8)], "up")
    gate = op("MatMul", [normed, constant("w_gate", rng.standard_normal((width, 2 * width)) / 8)], "gate")
    hidden = op("Mul", [op("Relu", [gate], "relu"), up], "hidden")
    written = op("MatMul", [hidden, constant("w_down", rng.standard_normal((2 * width, width)) / 8)], "down")
    stream2 = op("Add", [stream, written], "residual")
    head = op("MatMul", [rmsnorm(stream2, "norm2"), constant("w_head", rng.standard_normal((width, vocab)))], "logits")
    outputs = [head]
    if extra_reader is not None:
        outputs.append(op(extra_reader, [stream2], "extra"))
    initializers = [
        value for node in nodes for value in node.inputs if value is not None and value.const_value is not None
    ]
    graph = ir.Graph([ids], outputs, nodes=nodes, initializers=initializers, opset_imports={"": 18}, name="decoder")
    model = frontend.normalize(ir.Model(graph, ir_version=10), name="tiny decoder")
    feeds = [{"ids": rng.integers(0, vocab, (1, 6)).astype(np.int64)} for _ in range(3)]
    return model, feeds


def test_residual_stream_is_rotated_offline_through_rmsnorm() -> None:
    """QuaRot's fold (``residual=True``): the embedding table, the residual writer and every RMSNorm reader
    are rotated offline (gamma folded into the readers), so the only online transform left is the down
    projection's input."""
    model, feeds = _tiny_decoder()
    rotator, worst = _rotate(model, feeds, residual=True)
    assert worst < TOLERANCE
    stream = [item for item in rotator.rotations if item.folded_into and "residual stream" in item.folded_into]
    assert len(stream) == 1 and sorted(stream[0].consumers) == ["node_gate", "node_logits", "node_up"]
    assert "1 residual writers, 2 RMSNorms" in stream[0].folded_into  # type: ignore[operator]
    online = {str(node.name).split("_hadamard")[0] for node in model.graph if "_hadamard" in str(node.name)}
    assert online == {"hidden"}
    # gamma is folded into the readers: its Mul and initializer are gone.
    assert not any(str(name).endswith("_gamma") for name in model.graph.initializers)
    assert not any(str(node.name).endswith("_out") and node.op_type == "Mul" for node in model.graph)


def test_residual_stream_read_by_another_op_stays_online_with_a_reason() -> None:
    model, feeds = _tiny_decoder(extra_reader="Sigmoid")
    rotator, worst = _rotate(model, feeds, residual=True)
    assert worst < TOLERANCE
    refused = [item.reason for item in rotator.rotations if item.reason and "residual stream" in item.reason]
    assert refused == ["residual stream not rotated: 'node_extra' (Sigmoid) reads the residual stream 'residual'"]
    assert all(not item.folded_into or "residual" not in item.folded_into for item in rotator.rotations)


def test_layer_norm_stream_is_centred_and_rotated_as_rmsnorm() -> None:
    """QuaRot's LayerNorm conversion: the embedding and the writers are centred (every stream row then has
    zero mean), each LayerNorm becomes an RMSNorm with its scale folded into the readers' rows and its bias
    into their outputs, and the stream is rotated offline as with RMSNorms."""
    model, feeds = _tiny_decoder(layer_norm=True)
    rotator, worst = _rotate(model, feeds, residual=True)
    assert worst < TOLERANCE
    (stream,) = [item for item in rotator.rotations if item.folded_into and "residual stream" in item.folded_into]
    assert "2 LayerNorms turned RMSNorms" in str(stream.folded_into)
    assert not any(node.op_type == "LayerNormalization" for node in model.graph)
    online = {str(node.name).split("_hadamard")[0] for node in model.graph if "_hadamard" in str(node.name)}
    assert online == {"hidden"}


@pytest.mark.parametrize("activations", ["static", "dynamic"])
def test_onnxruntimes_file_reads_rotated_rows_in_grid_order(activations: str) -> None:
    """Exact (no tolerance): without the last Transpose of a Kronecker rotation, the rotated row's channels come
    in grid order, and the integer weights reading it, their rows permuted the same way, make the same int32
    products; a row's quantization (static per tensor, or its largest magnitude at run time) is the same."""
    model, feeds = _tiny_decoder()
    options = QuantizeOptions(
        rotate="hadamard", activations=activations, float_threshold=0, bias_correction="none", smoothquant=None
    )
    quantized = quantize(model, feeds, options, progress=False).model
    before = sensitivity.run_all(quantized, feeds)
    transposes = sum(node.op_type == "Transpose" for node in quantized.graph)
    changed = channels_in_grid_order(quantized)
    assert changed >= 1
    assert sum(node.op_type == "Transpose" for node in quantized.graph) == transposes - changed
    for ours, theirs in zip(sensitivity.run_all(quantized, feeds), before, strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_a_gemm_with_a_bias_reads_rotated_rows_in_grid_order() -> None:
    """The same for a Gemm (a MatMul with its bias, as exporters write BERT's layers): exact."""
    rng = np.random.default_rng(2)
    x = ir.Value(name="x", shape=ir.Shape([6, 48]), type=ir.TensorType(ir.DataType.FLOAT))
    w1, b1, w2 = (
        constant(name, rng.standard_normal(shape)) for name, shape in (("w1", (48, 24)), ("b1", (24,)), ("w2", (24, 8)))
    )
    hidden, y = (
        ir.Value(name="hidden"),
        ir.Value(name="y", shape=ir.Shape([6, 8]), type=ir.TensorType(ir.DataType.FLOAT)),
    )
    nodes = [ir.node("Gemm", [x, w1, b1], outputs=[hidden], name="first"), ir.node("MatMul", [hidden, w2], outputs=[y])]
    graph = ir.Graph([x], [y], nodes=nodes, initializers=[w1, b1, w2], opset_imports={"": 18}, name="gemm")
    model = frontend.normalize(ir.Model(graph, ir_version=10), name="gemm")
    feeds = [{"x": rng.standard_normal((6, 48)).astype(np.float32)} for _ in range(3)]
    options = QuantizeOptions(rotate="hadamard", activations="static", float_threshold=0, smoothquant=None)
    quantized = quantize(model, feeds, options, progress=False).model
    before = sensitivity.run_all(quantized, feeds)
    assert channels_in_grid_order(quantized) == 1
    for ours, theirs in zip(sensitivity.run_all(quantized, feeds), before, strict=True):
        np.testing.assert_array_equal(ours, theirs)
