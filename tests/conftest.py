"""Shared fixtures: real models exported once per test session, and helpers for tiny graphs."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnx.parser
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import zoo  # noqa: E402


def emulation_toolchain(tvm_target: dict) -> object | None:
    """The cross toolchain of ``tvm_target`` when its compiler and qemu are installed (`qcompile toolchains
    --install`), else None: tests that run code under qemu skip, or check only the host, without them."""
    import shutil

    from qcompile.backends.tvm import cross

    toolchain = cross.toolchain_for(tvm_target)
    assert toolchain is not None, f"{tvm_target} is not a cross target"
    if shutil.which(toolchain.compiler) is None or toolchain.qemu is None or shutil.which(toolchain.qemu) is None:
        return None
    return toolchain


def require_emulation(tvm_target: dict) -> tuple[object, Path]:
    """The cross toolchain of ``tvm_target`` and the runner built with it, or skip the test."""
    from qcompile.backends.tvm import cross

    toolchain = emulation_toolchain(tvm_target)
    if toolchain is None:
        pytest.skip("needs the cross toolchain and qemu: qcompile toolchains --install")
    return toolchain, cross.build_runner(toolchain)  # type: ignore[arg-type]


def save_model(model: onnx.ModelProto, path: Path) -> Path:
    """Check and save a test model (IR 10, which every tool here reads)."""
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def parse_model(text: str) -> onnx.ModelProto:
    """Parse onnx text syntax; initializers are rewritten as raw data (as exporters write them)."""
    model = onnx.parser.parse_model(text)
    for index, tensor in enumerate(model.graph.initializer):
        model.graph.initializer[index].CopyFrom(
            onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor), tensor.name)
        )
    return model


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def digits(models_dir: Path) -> tuple[Path, float]:
    """A CNN trained here on scikit-learn's digits (BatchNorm kept as nodes), and its fp32 accuracy."""
    return zoo.train_digits_cnn(models_dir / "digits.onnx")


@pytest.fixture(scope="session")
def digits_calibration(models_dir: Path) -> Path:
    train_x, _, _, _ = zoo.digits_split()
    folder = models_dir / "digits_calibration"
    folder.mkdir()
    for index in range(32):
        np.save(folder / f"{index:03d}.npy", train_x[index : index + 1])
    return folder


@pytest.fixture(scope="session")
def artifact(digits: tuple[Path, float], digits_calibration: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits CNN compiled for the host (with its TVM library: kept although this 0.03 ms model runs no
    faster on it than on onnxruntime fp32, for the tests of artifacts that carry one)."""
    from qcompile import api

    output = tmp_path_factory.mktemp("artifacts") / "digits.host"
    with keep_every_library():
        api.compile(digits[0], output, calibration_data=digits_calibration, progress=False)
    return output


@pytest.fixture(scope="module")
def flavor() -> object:
    """This CPU's int8 dot-product flavor of qcompile's TVM kernels (tests using it skip without TVM or one)."""
    from qcompile.errors import BackendError

    int8_kernels = pytest.importorskip("qcompile.backends.tvm.int8_kernels")
    try:
        return int8_kernels.host_flavor()
    except BackendError as error:
        pytest.skip(str(error))


@contextlib.contextmanager
def keep_every_library() -> Iterator[None]:
    """Compiles in this block ship their host library whatever it measured (drop_slow_library is skipped)."""
    from qcompile.flow import compile as compile_flow

    stages = tuple(stage for stage in compile_flow.PIPELINES["w8a8"] if stage is not compile_flow.drop_slow_library)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(compile_flow.PIPELINES, "w8a8", stages)
        yield


@pytest.fixture(scope="session")
def efficientnet(models_dir: Path) -> Path:
    return zoo.export_efficientnet_lite0(models_dir / "efficientnet_lite0.onnx")


@pytest.fixture(scope="session")
def minilm(models_dir: Path) -> Path:
    return zoo.export_minilm(models_dir / "minilm.onnx")


@pytest.fixture(scope="session")
def smollm2(models_dir: Path) -> tuple[Path, list[dict[str, np.ndarray]]]:
    """SmolLM2-135M-Instruct cut to its first 2 decoder layers (the final norm and tied LM head kept), 64-token
    windows; with 4 windows of real text (tokens of ``pydoc_data.topics``). Full-model figures are in bench/."""
    model, tokenizer = zoo.load_smollm2(layers=2)
    del model
    path = zoo.export_smollm2(models_dir / "smollm2_2layers.onnx", seq_len=64, layers=2)
    return path, zoo.token_windows(zoo.pydoc_tokens(tokenizer, 256), 64)
