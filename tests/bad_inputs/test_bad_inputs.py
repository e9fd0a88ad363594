"""Every bad input gets one ``error:`` line naming the problem, exit code 2, and no artifact."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import pytest
from conftest import parse_model, save_model

from qcompile import errors
from qcompile.cli import main

CONV = """
<ir_version: 8, opset_import: ["" : {opset}]>
g (float[{batch}, 2, 5, 5] x) => (float[{batch}, 3, 5, 5] y)
  <float[3, 2, 3, 3] w = {weights}, float[3] b = {{0.1, 0.2, 0.3}}> {{
    c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    y = Relu (c)
}}
"""


def conv_text(opset: int = 18, batch: str = "1", fill: float | None = None) -> str:
    values = np.random.default_rng(0).standard_normal(54)
    if fill is not None:
        values[7] = fill
    weights = "{" + ", ".join("nan" if np.isnan(v) else ("inf" if np.isinf(v) else f"{v:.4f}") for v in values) + "}"
    return CONV.format(opset=opset, batch=batch, weights=weights)


def good_model(folder: Path) -> Path:
    return save_model(parse_model(conv_text()), folder / "conv.onnx")


def calibration_folder(folder: Path, shape: tuple[int, ...] = (1, 2, 5, 5), count: int = 4) -> Path:
    data = folder / "calibration"
    data.mkdir(exist_ok=True)
    for index in range(count):
        np.save(data / f"{index}.npy", np.random.default_rng(index).standard_normal(shape).astype(np.float32))
    return data


def external_model(folder: Path, location: str) -> Path:
    """A valid model whose weight 'w' claims to live at ``location``."""
    proto = parse_model(conv_text())
    weight = next(tensor for tensor in proto.graph.initializer if tensor.name == "w")
    weight.ClearField("raw_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(54 * 4))):
        weight.external_data.append(onnx.StringStringEntryProto(key=key, value=value))
    proto.ir_version = 10
    path = folder / "ext.onnx"
    path.write_bytes(proto.SerializeToString())
    return path


def write_bytes(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(data)
        return path

    return make


def truncated(folder: Path) -> Path:
    data = good_model(folder).read_bytes()
    path = folder / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    return path


def checker_failure(folder: Path) -> Path:
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["missing"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    proto.ir_version = 10
    path = folder / "broken.onnx"
    path.write_bytes(proto.SerializeToString())
    return path


def custom_op(folder: Path) -> Path:
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("FancyOp", ["x"], ["y"], domain="com.example", name="fancy")],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
    )
    proto = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", 18), onnx.helper.make_opsetid("com.example", 1)]
    )
    proto.ir_version = 10
    path = folder / "custom.onnx"
    path.write_bytes(proto.SerializeToString())
    return path


def symlink_escape(folder: Path) -> Path:
    outside = folder.parent / f"{folder.name}_outside"
    outside.mkdir()
    (outside / "w.bin").write_bytes(np.zeros(54, np.float32).tobytes())
    (folder / "w.bin").symlink_to(outside / "w.bin")
    return external_model(folder, "w.bin")


def short_external(folder: Path) -> Path:
    (folder / "w.bin").write_bytes(b"\0" * 16)
    return external_model(folder, "w.bin")


def _float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its inputs, outputs and weights in float16."""
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    for index, tensor in enumerate(model.graph.initializer):
        half = onnx.numpy_helper.to_array(tensor).astype(np.float16)
        model.graph.initializer[index].CopyFrom(onnx.numpy_helper.from_array(half, tensor.name))
    return model


def inf_in_constant(folder: Path) -> Path:
    """A MatMul weight written as a Constant node, one of its values Inf."""
    proto = parse_model("""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[1, 3] x) => (float[1, 2] y) {
        k = Constant <value = float[3, 2] {1.0, inf, 2.0, 0.5, 1.0, 3.0}> ()
        y = MatMul (x, k)
    }""")
    return save_model(proto, folder / "inf.onnx")


MODEL_CASES: list[tuple[str, Callable[[Path], Path], type[errors.QCompileError], str]] = [
    ("missing file", lambda folder: folder / "nope.onnx", errors.ModelLoadError, "no such file"),
    ("directory", lambda folder: folder, errors.ModelLoadError, "not a file"),
    ("empty file", write_bytes("empty.onnx", b""), errors.ModelLoadError, "the file is empty"),
    ("truncated", truncated, errors.ModelLoadError, "truncated"),
    (
        "not protobuf",
        write_bytes("text.onnx", b"this is not a model at all\n" * 10),
        errors.ModelLoadError,
        "not a valid ONNX protobuf|holds no graph",
    ),
    ("checker failure", checker_failure, errors.ModelLoadError, "fails onnx.checker"),
    (
        "external data with ..",
        lambda folder: external_model(folder, "../w.bin"),
        errors.UnsafeModelError,
        "climbs out with '..'",
    ),
    (
        "external data absolute",
        lambda folder: external_model(folder, "/etc/passwd"),
        errors.UnsafeModelError,
        "absolute path",
    ),
    ("external data symlink escape", symlink_escape, errors.UnsafeModelError, "outside"),
    (
        "external data missing",
        lambda folder: external_model(folder, "absent.bin"),
        errors.ModelLoadError,
        "does not exist",
    ),
    ("external data short", short_external, errors.ModelLoadError, "shorter"),
    ("custom operator", custom_op, errors.UnsupportedModelError, "com.example::FancyOp"),
    (
        "opset too old",
        lambda folder: save_model(parse_model(conv_text(opset=9)), folder / "old.onnx"),
        errors.UnsupportedModelError,
        "opset 9 is outside 11..23",
    ),
    (
        "NaN weight",
        lambda folder: save_model(parse_model(conv_text(fill=float("nan"))), folder / "nan.onnx"),
        errors.InvalidWeightsError,
        "constant 'w' holds 1 NaN values",
    ),
    (
        "float16 model",
        lambda folder: save_model(_float16(parse_model(conv_text())), folder / "half.onnx"),
        errors.UnsupportedModelError,
        "is float16: qcompile quantizes float32 models",
    ),
    ("Inf in a Constant node", inf_in_constant, errors.InvalidWeightsError, r"\(read by MatMul '.*'\) holds 1 Inf"),
]


def run_cli(capsys: pytest.CaptureFixture[str], arguments: list[str]) -> str:
    code = main(arguments)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def expect_error(
    model: Path,
    calibration: Path,
    output: Path,
    error_type: type[errors.QCompileError],
    message: str,
    capsys: pytest.CaptureFixture[str],
    extra: list[str] | None = None,
) -> None:
    from qcompile import api

    with pytest.raises(error_type, match=message):
        api.compile(model, output, calibration_data=calibration, build_tvm=False, progress=False, input_shapes=None)
    assert not output.exists()
    line = run_cli(capsys, [str(model), "-c", str(calibration), "-o", str(output), "--no-tvm", "-q", *(extra or [])])
    assert any(part in line for part in message.split("|")) or __import__("re").search(message, line), line
    assert not output.exists()
    assert not any(entry.name.startswith(f".{output.name}.") for entry in output.parent.iterdir())


@pytest.mark.parametrize(("case", "make", "error_type", "message"), MODEL_CASES, ids=[case[0] for case in MODEL_CASES])
def test_bad_model(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    make: Callable[[Path], Path],
    error_type: type[errors.QCompileError],
    message: str,
) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    expect_error(make(folder), calibration_folder(tmp_path), tmp_path / "out", error_type, message, capsys)


def test_bad_input_shape_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = save_model(parse_model(conv_text(batch="N")), tmp_path / "dyn.onnx")
    line = run_cli(
        capsys,
        [
            str(model),
            "-c",
            str(calibration_folder(tmp_path)),
            "-o",
            str(tmp_path / "out"),
            "--no-tvm",
            "-q",
            "--input-shape",
            "image=1x2x5x5",
        ],
    )
    assert "names 'image', which is not an input" in line
    assert not (tmp_path / "out").exists()


CALIBRATION_CASES: list[tuple[str, Callable[[Path], Path], str]] = [
    ("empty folder", lambda folder: _empty_folder(folder), "no .npy, .npz or image files"),
    ("missing folder", lambda folder: folder / "absent", "not a folder"),
    ("wrong shape", lambda folder: calibration_folder(folder, shape=(1, 3, 5, 5)), r"shape \(1, 3, 5, 5\)"),
    ("corrupt npy", lambda folder: _corrupt_folder(folder), "cannot be read"),
    ("NaN sample", lambda folder: _nan_folder(folder), "NaN/Inf"),
]


def test_samples_that_disagree_on_a_dynamic_dim(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Dynamic image dims are fixed from the first sample; a later sample of another size is named with both
    shapes. (Another batch would not be: a stacked batch is split into samples of the fixed batch.)"""
    text = conv_text().replace("float[1, 2, 5, 5] x", "float[1, 2, H, W] x")
    text = text.replace("float[1, 3, 5, 5] y", "float[1, 3, H, W] y")
    model = save_model(parse_model(text), tmp_path / "dyn.onnx")
    data = calibration_folder(tmp_path, shape=(1, 2, 5, 5), count=2)
    np.save(data / "2.npy", np.zeros((1, 2, 7, 7), np.float32))
    message = r"sample 2 gives input 'x' shape \(1, 2, 7, 7\), the model expects \(1, 2, 5, 5\)"
    expect_error(model, data, tmp_path / "out", errors.CalibrationError, message, capsys)


def test_a_run_with_a_shape_the_artifact_does_not_serve(tmp_path: Path) -> None:
    """The batch the model leaves dynamic stays dynamic in the onnxruntime files; the TVM library is built for
    the calibration batch. A session on the default executor routes another batch to an executor that runs
    it; a session on the library refuses it naming who runs it; a size nobody runs is refused."""
    from conftest import keep_every_library

    from qcompile import api, runtime

    model = save_model(parse_model(conv_text(batch="N")), tmp_path / "dyn.onnx")
    # The library of this 2 x 5 x 5 conv is no faster than onnxruntime fp32 and would not be shipped
    # (test_float_islands checks that); here it is kept, to be routed around.
    with keep_every_library():
        manifest = api.compile(model, tmp_path / "out", calibration_data=calibration_folder(tmp_path), progress=False)
    assert manifest["executors"]["onnxruntime"]["dynamic_dims"] == {"x": {"0": "N"}}
    assert "dynamic_dims" not in manifest["executors"]["tvm"]
    four = {"x": np.zeros((4, 2, 5, 5), np.float32)}
    assert runtime.load(tmp_path / "out").run(four)["y"].shape == (4, 3, 5, 5)
    with pytest.raises(
        errors.ArtifactError,
        match=r"executor 'tvm': input 'x' has shape \(4, 2, 5, 5\); this "
        r"executor runs \(1, 2, 5, 5\) only; executor\(s\) onnxruntime.* run these shapes",
    ):
        runtime.load(tmp_path / "out", "tvm").run(four)
    with pytest.raises(errors.ArtifactError, match=r"runs \[\*, 2, 5, 5\] \(\* any size\); no executor of this"):
        runtime.load(tmp_path / "out", "onnxruntime").run({"x": np.zeros((1, 2, 6, 6), np.float32)})


def _empty_folder(folder: Path) -> Path:
    (folder / "empty").mkdir()
    return folder / "empty"


def _corrupt_folder(folder: Path) -> Path:
    data = folder / "corrupt"
    data.mkdir()
    (data / "0.npy").write_bytes(b"\x93NUMPY garbage")
    return data


def _nan_folder(folder: Path) -> Path:
    data = folder / "nan"
    data.mkdir()
    np.save(data / "0.npy", np.full((1, 2, 5, 5), np.nan, np.float32))
    return data


@pytest.mark.parametrize(("case", "make", "message"), CALIBRATION_CASES, ids=[case[0] for case in CALIBRATION_CASES])
def test_bad_calibration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, make: Callable[[Path], Path], message: str
) -> None:
    data = make(tmp_path)
    expect_error(good_model(tmp_path), data, tmp_path / "out", errors.CalibrationError, message, capsys)


def compile_with_good_inputs(capsys: pytest.CaptureFixture[str], tmp_path: Path, output: Path, *extra: str) -> str:
    """Run the CLI on a valid model and calibration set; return its one error line."""
    model, data = good_model(tmp_path), calibration_folder(tmp_path)
    return run_cli(capsys, [str(model), "-c", str(data), "-o", str(output), "--no-tvm", "-q", *extra])


def test_unknown_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = compile_with_good_inputs(capsys, tmp_path, tmp_path / "out", "--target", "toaster")
    assert "unknown target 'toaster'; valid targets: " in line and "host" in line
    assert not (tmp_path / "out").exists()


def test_dynamic_activations_on_an_integer_only_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Per-row scales are float: an integer-only device cannot compute them (its 'auto' is static)."""
    line = compile_with_good_inputs(
        capsys, tmp_path, tmp_path / "out", "--target", "int8-npu", "--activations", "dynamic"
    )
    assert "dynamic activations" in line and "float unit" in line
    assert not (tmp_path / "out").exists()


def test_output_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "taken"
    output.write_text("not a folder")
    assert "exists and is not an empty folder" in compile_with_good_inputs(capsys, tmp_path, output)
    assert output.read_text() == "not a folder"


def test_unwritable_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "cannot write to" in compile_with_good_inputs(capsys, tmp_path, blocker / "out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_read_only_parent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert "cannot write to" in compile_with_good_inputs(capsys, tmp_path, locked / "out")


def test_model_without_quantizable_layers_compiles_as_float(tmp_path: Path) -> None:
    """Not an error: nothing to quantize is reported in the manifest, and the artifact still runs."""
    from qcompile import api, runtime

    model = save_model(
        parse_model("""
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[1, 2, 5, 5] x) => (float[1, 2, 5, 5] y) {
            y = Relu (x)
        }"""),
        tmp_path / "relu.onnx",
    )
    manifest = api.compile(
        model, tmp_path / "out", calibration_data=calibration_folder(tmp_path), build_tvm=False, progress=False
    )
    assert manifest["layers"] == []
    x = np.random.default_rng(0).standard_normal((1, 2, 5, 5)).astype(np.float32)
    np.testing.assert_array_equal(runtime.load(tmp_path / "out").run({"x": x})["y"], np.maximum(x, 0))


def test_a_bug_in_the_integer_lowering_does_not_fail_a_host_compile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host's int8-kernel library is a speed-up over files that already run: an unexpected exception in the
    integer lowering (an AxisError on 1-D convolutions once) leaves the artifact without it, with the reason in
    the manifest, instead of ending the compile with a traceback."""
    from qcompile import api
    from qcompile.backends import integer as integer_lowering

    def broken(_model: onnx.ModelProto, float_islands: bool = False) -> None:
        raise IndexError("list index out of range")

    monkeypatch.setattr(integer_lowering, "lower", broken)
    model = good_model(tmp_path)
    manifest = api.compile(model, tmp_path / "out", calibration_data=calibration_folder(tmp_path), progress=False)
    assert "tvm" not in manifest["executors"]
    assert "internal error in the integer lowering (IndexError" in manifest["skipped"]["tvm"]
