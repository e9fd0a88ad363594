"""Edge targets: cross-compiled artifacts on qcompile's kernels (aarch64 flavors), runs under qemu-user compared
with the numpy oracle (or, for an importer build, with the host build), SIGILL caught with
the missing feature named, armv7 / riscv64 ELF checks, and measurement through TVM RPC on loopback.

Needs the cross toolchains, qemu and the aarch64 TVM runtime: `qcompile toolchains --install` (part of the
README's test command). Tolerance of the emulated runs: none; the host reference is built with FMA
contraction as AArch64 code is, and the outputs must be bit-identical.
"""

from __future__ import annotations

import platform
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from qcompile import api, runtime
from qcompile.backends import tvm as tvm_backend
from qcompile.backends.tvm import cross, estimate
from qcompile.cli import main
from qcompile.errors import ArtifactError, BackendError
from qcompile.flow.quantize import QuantizeOptions

TARGETS = Path(__file__).resolve().parents[2] / "qcompile" / "hwmodels" / "targets"
# Sensitivity measurement does not change what is being checked here (the build), and halves the time.
FAST = QuantizeOptions(float_threshold=0.0)


@pytest.fixture(scope="module")
def efficientnet_calibration(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import zoo

    folder = tmp_path_factory.mktemp("effnet_calibration")
    for index, crop in enumerate(zoo.photo_crops(8, seed=0)):
        np.save(folder / f"{index:02d}.npy", crop[None])
    return folder


def _compile(model: Path, calibration: Path, target: str, folder: Path) -> Path:
    output = folder / f"{model.stem}.{Path(target).stem}"
    api.compile(model, output, target=target, calibration_data=calibration, options=FAST, progress=False)
    return output


@pytest.mark.slow
@pytest.mark.parametrize("target", ["rpi4", "cortex-a76"])
def test_efficientnet_runs_bit_exact_under_qemu(
    target: str, efficientnet: Path, efficientnet_calibration: Path, tmp_path: Path
) -> None:
    folder = _compile(efficientnet, efficientnet_calibration, target, tmp_path)
    manifest = runtime.load(folder, "onnxruntime").manifest
    entry = manifest.executors["tvm"]
    assert entry.arch == "aarch64" and entry.runner == "device/qcompile-runner"
    # Built on qcompile's kernels in the flavor of the target's CPU (the A72 has no dot product), and checked
    # at compile time under qemu against the numpy oracle of the integer graph, which the artifact carries.
    flavor = {"rpi4": "neon dot products", "cortex-a76": "neon-dot dot products"}[target]
    assert entry.lowering is not None and entry.lowering.startswith(tvm_backend.INTEGER_KERNELS)
    assert entry.lowering.split("; ")[0].endswith(flavor), entry.lowering
    assert "model.integer.onnx" in manifest.files and entry.requires_cpu is None
    assert manifest.measured.accuracy["tvm_vs_oracle"].startswith("bit-exact"), manifest.measured.accuracy
    for name in ("device/qcompile-runner", "device/libtvm_runtime.so", "device/libtvm_ffi.so"):
        assert name in manifest.files
        assert cross.elf_info(folder / name).machine == 183
    assert manifest.measured is not None and manifest.measured.predicted_latency_ms is not None
    assert "cross target" in manifest.measured.default_reason
    # The library's speed on the board is estimated (llvm-mca on the target's CPU model), and says so.
    predicted = manifest.measured.predicted_latency_ms
    if estimate.mca_program() is not None:
        assert predicted["tvm"] > 0 and predicted["tvm_estimate"]["source"].startswith("estimate, not a measurement")
        assert manifest.default_executor == min(("onnxruntime", "onnxruntime-fp32", "tvm"), key=predicted.get)

    records = api.verify(folder, emulate=True)
    run = next(record for record in records if record["check"] == "tvm: emulated run")
    mcpu = {"rpi4": "cortex-a72", "cortex-a76": "cortex-a76"}[target]
    assert run["passed"] and run["bit_exact"], run
    assert f"-cpu {mcpu}" in run["detail"]


def test_aarch64_library_is_refused_on_this_machine(
    tmp_path: Path, digits: tuple[Path, float], digits_calibration: Path
) -> None:
    folder = _compile(digits[0], digits_calibration, "rpi4", tmp_path)
    assert platform.machine() != "aarch64"
    with pytest.raises(ArtifactError, match=r"built for aarch64.*verify --emulate"):
        runtime.load(folder, "tvm")
    # The portable executors still run here, and the quantized one agrees with its own emulated library.
    session = runtime.load(folder)
    assert session.executor in ("onnxruntime", "onnxruntime-fp32")
    assert main(["verify", str(folder), "--emulate"]) == 0


def test_sigill_names_the_feature_the_cpu_lacks(
    tmp_path: Path, digits: tuple[Path, float], digits_calibration: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A board file that claims SVE: LLVM then vectorizes with SVE, which a Cortex-A72 does not have.
    text = (TARGETS / "cortex-a76.toml").read_text()
    board = tmp_path / "a76-sve.toml"
    board.write_text(
        text.replace('name = "cortex-a76"', 'name = "a76-sve"').replace('"+fullfp16"]', '"+fullfp16", "+sve"]')
    )
    folder = _compile(digits[0], digits_calibration, str(board), tmp_path)
    records = api.verify(folder, emulate=True, cpu="cortex-a72")
    run = next(record for record in records if record["check"] == "tvm: emulated run")
    assert run["passed"] is False
    assert "SIGILL" in run["detail"] and "+sve" in run["detail"] and "cortex-a72" in run["detail"]
    assert main(["verify", str(folder), "--emulate", "--cpu", "cortex-a72"]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("target", "machine", "bits", "abi"), [("armv7", 40, 32, "hard"), ("riscv64", 243, 64, "double")]
)
def test_build_only_targets_are_linked_and_checked(
    target: str, machine: int, bits: int, abi: str, tmp_path: Path, digits: tuple[Path, float], digits_calibration: Path
) -> None:
    folder = _compile(digits[0], digits_calibration, target, tmp_path)
    info = cross.elf_info(folder / "model.tvm.so")
    assert (info.machine, info.bits, info.float_abi) == (machine, bits, abi)
    records = api.verify(folder, emulate=True)
    assert [record["passed"] for record in records] == [True, True, None]
    assert "cannot be run here" in records[-1]["detail"]


def test_elf_check_rejects_a_library_for_another_machine(tmp_path: Path) -> None:
    library = tmp_path / "host.so"
    host_library = next(Path(np.__file__).parent.glob("_core/_multiarray_umath*.so"))
    with pytest.raises(BackendError, match="not for aarch64"):
        cross.check_elf(host_library, cross.TOOLCHAINS["aarch64"])
    library.write_bytes(b"not an elf file at all")
    with pytest.raises(BackendError, match="not an ELF file"):
        cross.elf_info(library)


def test_missing_cross_compiler_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cross, "_which", lambda program: None)
    with pytest.raises(BackendError, match="toolchains --install"):
        cross.require_compiler(cross.TOOLCHAINS["aarch64"])


@pytest.fixture(scope="module")
def rpc_server() -> Iterator[str]:
    """A TVM RPC server on loopback, standing in for a board (it runs host libraries)."""
    from tvm import rpc as tvm_rpc

    server = tvm_rpc.Server(host="127.0.0.1", port=9190, port_end=9290)
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        server.terminate()


def test_rpc_bench_on_loopback(artifact: Path, rpc_server: str, capsys: pytest.CaptureFixture[str]) -> None:
    from qcompile.backends.tvm import rpc
    from qcompile.runtime.executors import TVMExecutor

    session = runtime.load(artifact, "onnxruntime")
    feeds = session.random_feeds()
    inputs = [feeds[info.name] for info in session.inputs]
    remote = rpc.run_remote(artifact / "model.tvm.so", inputs, rpc_server, runs=5)
    local = TVMExecutor(artifact / "model.tvm.so", [info.name for info in session.inputs]).run(feeds)
    np.testing.assert_array_equal(remote.outputs[0], local[0])  # the same library on the same CPU
    assert remote.latency.runs == 5 and remote.latency.median_ms > 0
    assert main(["bench", str(artifact), "--rpc", rpc_server, "--runs", "3"]) == 0
    assert "tvm (remote)" in capsys.readouterr().out
    checks = api.gate(artifact, max_latency_ms=1e6, rpc=rpc_server, runs=3)
    assert checks[0].passed and "TVM RPC server" in checks[0].source


def test_profile_through_rpc_calibrates_the_cost_model(rpc_server: str) -> None:
    from qcompile import hwmodels
    from qcompile.flow import profile
    from qcompile.hwmodels.cost import CostModel

    target = hwmodels.load_target("host")
    calibration, measurements = profile.calibrate_remote(target, rpc_server, runs=3, max_layers=2, progress=False)
    # Two distinct layers of each sweep network, each fp32 and W8A8, timed on the server.
    assert len(measurements) == 4 * len(profile.default_sweep()) and all(item.measured_us > 0 for item in measurements)
    assert {"conv/fp32", "conv/int8", "gemm/fp32", "gemm/int8"} <= set(calibration.factors)
    assert calibration.machine["via"] == "TVM RPC" and calibration.node_overhead_us > 0
    fitted = CostModel(target, calibration)
    for item in measurements:  # the fit reproduces what it was fitted to (2 layers per group: within 2x)
        assert 0.5 < fitted.latency_us(item.layer, item.choice) / item.measured_us < 2.0


def test_rpc_errors_are_clear(artifact: Path) -> None:
    from qcompile.backends.tvm import rpc

    with pytest.raises(BackendError, match="not HOST:PORT"):
        rpc.run_remote(artifact / "model.tvm.so", [], "localhost")
    with pytest.raises(BackendError, match="cannot reach a TVM RPC server"):
        rpc.run_remote(artifact / "model.tvm.so", [], "127.0.0.1:1")
    assert main(["profile", "--target", "rpi4", "--rpc", "127.0.0.1:1", "-o", "unused.json"]) == 2


def test_jetson_kernels_are_generated_and_compiled_by_nvcc(
    tmp_path: Path, digits: tuple[Path, float], digits_calibration: Path
) -> None:
    folder = _compile(digits[0], digits_calibration, "jetson-orin-nano", tmp_path)
    manifest = runtime.load(folder, "onnxruntime").manifest
    entry = manifest.executors["tvm"]
    assert entry.arch == "aarch64" and entry.runner is None  # host code for the Orin's Cortex-A78AE
    assert "__global__" in (folder / "kernels.cu").read_text()
    if shutil.which("nvcc"):
        assert entry.kernels == ["kernels.cu", "kernels.fatbin"]
        assert (folder / "kernels.fatbin").read_bytes()[:4] == bytes.fromhex("50ed55ba")  # fatbin magic
    records = api.verify(folder, emulate=True)
    assert records[-1]["passed"] is None and "no GPU" in records[-1]["detail"]
