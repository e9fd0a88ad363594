"""Per-layer sensitivity runs only the part of the model a layer's quantization changes, from the float
model's values at its edge: the figures equal those of running every layer's model whole."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import save_model
from onnx import helper, numpy_helper

from qcompile import frontend
from qcompile.flow.quantize import QuantizeOptions, quantize
from qcompile.search import sensitivity


def residual_model(path: Path) -> Path:
    """A residual block with a shared input (two layers read ``b``), a second output computed before the
    block (no layer after the first changes it) and a Softmax at the end."""
    rng = np.random.default_rng(3)
    weights = {name: rng.standard_normal((8, 8)).astype(np.float32) / 3 for name in ("w0", "w1", "w2", "w3", "w4")}
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["side"], name="side_layer"),
        helper.make_node("MatMul", ["x", "w1"], ["a"], name="first"),
        helper.make_node("Relu", ["a"], ["b"], name="relu"),
        helper.make_node("MatMul", ["b", "w2"], ["c"], name="left"),
        helper.make_node("MatMul", ["b", "w3"], ["d"], name="right"),
        helper.make_node("Add", ["c", "d"], ["e"], name="join"),
        helper.make_node("Add", ["e", "a"], ["f"], name="residual"),
        helper.make_node("MatMul", ["f", "w4"], ["g"], name="last"),
        helper.make_node("Softmax", ["g"], ["y"], name="softmax"),
    ]
    graph = helper.make_graph(
        nodes,
        "residual",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 8])],
        [
            helper.make_tensor_value_info("side", onnx.TensorProto.FLOAT, [4, 8]),
            helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 8]),
        ],
        [numpy_helper.from_array(array, name) for name, array in weights.items()],
    )
    return save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


@pytest.mark.parametrize("values_per_group", [24, 1])  # one float run for all layers, or one per layer
def test_cut_sensitivities_equal_whole_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, values_per_group: int
) -> None:
    model_path = residual_model(tmp_path / "residual.onnx")
    rng = np.random.default_rng(4)
    feeds = [{"x": rng.standard_normal((4, 8)).astype(np.float32)} for _ in range(8)]
    options = QuantizeOptions(float_threshold=1.0, weight_rounding="nearest", bias_correction="none")
    cuts: list[int] = []
    run_cut = sensitivity._run_cut

    def counting(cut, *args):  # type: ignore[no-untyped-def]
        cuts.append(len(list(cut.model.graph)))
        return run_cut(cut, *args)

    monkeypatch.setattr(sensitivity, "_run_cut", counting)
    monkeypatch.setattr(sensitivity, "GROUP_VALUES", values_per_group)
    found = {record.name: record.sensitivity for record in quantize(frontend.load(model_path), feeds, options).layers}
    monkeypatch.setattr(sensitivity, "_regions", lambda model, layers: {})  # every layer's model run whole
    wholes: list[int] = []
    run_all = sensitivity.run_all

    def counting_whole(model, *args):  # type: ignore[no-untyped-def]
        wholes.append(len(list(model.graph)))
        return run_all(model, *args)

    monkeypatch.setattr(sensitivity, "run_all", counting_whole)
    whole = {record.name: record.sensitivity for record in quantize(frontend.load(model_path), feeds, options).layers}
    assert set(found) == {"side_layer", "first", "left", "right", "last"} and found.keys() == whole.keys()
    # float32 rounding only: onnxruntime fuses a cut graph's nodes differently from the whole one's
    for name, error in whole.items():
        assert error is not None and error > 0
        assert found[name] == pytest.approx(error, rel=1e-5)
    # Every layer ran cut: the layers reading the input whole but for the first output's float MatMul
    # (side_layer's quantized input is first's too), the later ones on fewer nodes each.
    sizes = wholes[1:6]  # the layers' whole models (after the float references, before the final check)
    assert len(cuts) == 5 and all(cut < size for cut, size in zip(cuts, sizes, strict=True))
    assert cuts[2] == cuts[3] < cuts[1] and cuts[4] < cuts[3], (cuts, wholes)
