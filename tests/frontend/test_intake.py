"""Intake: tiny Hugging Face models, exported as users export them, compile from calibration data alone.

A fast slice of ``bench/intake.py`` (which runs the whole corpus of ``examples/intake_zoo.py``): BERT and
MobileNetV2 through torch's TorchScript exporter (opset 17, ``dynamic_axes``) and its dynamo exporter (opset
20, ``dynamic_shapes``, weights in external data). Both exports leave batch and sequence symbolic; the compiler
is given nothing but 8 batch-1 samples and must take its shapes from them.
"""

from __future__ import annotations

from pathlib import Path

import intake_zoo
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime
import pytest

from qcompile import api, execution, frontend, runtime
from qcompile.backends import integer as integer_lowering
from qcompile.backends.integer import reference as integer_reference
from qcompile.flow.dynamic import probe

SAMPLES = 8
# Mean cosine of each output, int8 against the artifact's own float model, over 8 held-out samples.
MIN_COSINE = 0.98


def cosine(ours: np.ndarray, theirs: np.ndarray) -> float:
    ours, theirs = ours.astype(np.float64).ravel(), theirs.astype(np.float64).ravel()
    return float(ours @ theirs / (np.linalg.norm(ours) * np.linalg.norm(theirs)))


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("name", ["bert", "mobilenet_v2"])
def test_exported_model_compiles_from_calibration_data_alone(tmp_path: Path, name: str, exporter: str) -> None:
    path = intake_zoo.export(name, exporter, tmp_path / "export")
    onnx.checker.check_model(str(path), full_check=True)
    exported = onnx.load(str(path), load_external_data=False)
    # The export really is dynamic: every input's batch axis is symbolic.
    assert all(value.type.tensor_type.shape.dim[0].dim_param for value in exported.graph.input)
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    for index, feed in enumerate(intake_zoo.calibration_feeds(name, SAMPLES, seed=0)):
        np.savez(calibration / f"{index:03d}.npz", **feed)

    manifest = api.compile(path, tmp_path / "artifact", calibration_data=calibration, build_tvm=False, progress=False)

    evaluation = intake_zoo.calibration_feeds(name, SAMPLES, seed=1)
    assert {info["name"]: tuple(info["shape"]) for info in manifest["inputs"]} == {
        input_name: array.shape for input_name, array in evaluation[0].items()
    }
    quantized_layers = [layer for layer in manifest["layers"] if not layer["float_reason"]]
    assert quantized_layers, manifest["layers"]
    int8_model = onnx.load(str(tmp_path / "artifact" / manifest["executors"]["onnxruntime"]["file"]))
    assert any(node.op_type == "QuantizeLinear" for node in int8_model.graph.node)

    quantized = runtime.load(tmp_path / "artifact", "onnxruntime")
    reference = runtime.load(tmp_path / "artifact", "onnxruntime-fp32")
    source = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    source_outputs = [output.name for output in source.get_outputs()]
    assert [info.name for info in quantized.outputs] == source_outputs
    cosines: dict[str, list[float]] = {output: [] for output in source_outputs}
    for feed in evaluation:
        ours, theirs = quantized.run(feed), reference.run(feed)
        for output, expected in zip(source_outputs, source.run(None, feed), strict=True):
            # The float artifact is the exported model up to float reassociation (BN folding, Gemm fusion).
            np.testing.assert_allclose(theirs[output], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
            cosines[output].append(cosine(ours[output], theirs[output]))
    means = {output: float(np.mean(values)) for output, values in cosines.items()}
    assert min(means.values()) >= MIN_COSINE, means

    # The onnxruntime files keep the export's dynamic dims: the int8 model runs two samples as one batch (and,
    # for text, a shorter sequence) and matches the export there.
    declared = {
        value.name: {str(axis) for axis, dim in enumerate(value.type.tensor_type.shape.dim) if dim.dim_param}
        for value in exported.graph.input
    }
    served = manifest["executors"]["onnxruntime"]["dynamic_dims"]
    assert {name: set(axes) for name, axes in served.items()} == declared
    members = [(name, int(axis)) for name, axes in served.items() for axis in axes]
    other = probe(evaluation[0], members, double=True)
    ours = quantized.run(other)
    for output, expected in zip(source_outputs, source.run(None, other), strict=True):
        assert ours[output].shape == expected.shape and cosine(ours[output], expected) >= MIN_COSINE

    # A host build lowers the quantized graph with float islands (what has no integer form stays float: GELU's
    # erf, the attention mask's arithmetic, layers kept float): its numpy oracle computes what the QDQ graph
    # computes (cosine 0.9999: dyadic against float requantization, a code apart at most).
    specialized = ir.load(str(tmp_path / "artifact" / manifest["executors"]["onnxruntime"]["file"]))
    for value in specialized.graph.inputs:
        value.shape = ir.Shape(list(evaluation[0][value.name].shape))
    graph = execution.to_proto(frontend.specialize(specialized))
    lowered, _ = integer_lowering.lower(graph, float_islands=True)
    oracle = integer_reference.run(lowered, evaluation[0])
    for output, produced in zip(source_outputs, oracle, strict=True):
        assert cosine(produced, quantized.run(evaluation[0])[output]) >= 0.9999, output
