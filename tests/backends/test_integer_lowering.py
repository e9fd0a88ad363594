"""The integer graph on qcompile's int8 kernels (qcompile.backends.tvm.integer): bit-exact with the numpy
oracle (no tolerance: integer outputs compared for equality), including the requantization's fast path at
the int32 extremes; ResNet-18 end to end on the VNNI flavor (the artifact), the AVX2 flavor (run here) and
the aarch64 sdot flavor (under qemu); the fallback and its reasons; a library for another CPU refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
import zoo
from conftest import emulation_toolchain
from onnx import TensorProto, helper, numpy_helper

from qcompile import api, runtime
from qcompile.backends import tvm as tvm_backend
from qcompile.backends.integer import reference as integer_reference
from qcompile.backends.tvm import cross, link
from qcompile.errors import ArtifactError, BackendError
from qcompile.runtime.executors import TVMExecutor

tvm = pytest.importorskip("tvm")
integer = pytest.importorskip("qcompile.backends.tvm.integer")
int8_kernels = pytest.importorskip("qcompile.backends.tvm.int8_kernels")

CHANNELS = 64


@pytest.fixture(scope="module")
def vnni() -> dict:
    try:
        return int8_kernels.require_vnni()
    except BackendError as error:
        pytest.skip(str(error))


def _requantize_graph(shifts: np.ndarray, seed: int = 0) -> onnx.ModelProto:
    """int32 [1, C] -> the requantization chain exactly as qcompile.backends.integer writes it: per channel
    ``M0`` in [2**29, 2**30), ``R = 2**61 + 2**(n-1)``, ``Div 2**n``, ``U = 2**61 / 2**n - z``, Clip to a
    ReLU6-like [z, hi], Cast to uint8."""
    rng = np.random.default_rng(seed)
    zero = rng.integers(0, 200, CHANNELS).astype(np.int64)
    constants = {
        **_requantize_constants(rng, shifts.astype(np.int64), zero),
        "lo": zero.copy(),
        "hi": np.full(CHANNELS, 255, np.int64) - rng.integers(0, 20, CHANNELS),
    }
    initializers = [numpy_helper.from_array(value.reshape(1, CHANNELS), name) for name, value in constants.items()]
    nodes = _requantize_nodes()
    graph = helper.make_graph(
        nodes,
        "requantize",
        [helper.make_tensor_value_info("acc", TensorProto.INT32, [1, CHANNELS])],
        [helper.make_tensor_value_info("q", TensorProto.UINT8, [1, CHANNELS])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _requantize_constants(rng: np.random.Generator, shifts: np.ndarray, zero: np.ndarray) -> dict[str, np.ndarray]:
    """Per channel ``m0`` (drawn from ``rng``), ``round``, ``divisor`` and ``unbias`` for shifts ``n`` and zero
    points ``zero``, as :func:`_requantize_graph` describes them."""
    return {
        "m0": rng.integers(2**29, 2**30, shifts.size).astype(np.int64),
        "round": (2**61 + np.left_shift(np.int64(1), shifts - 1)).astype(np.int64),
        "divisor": np.left_shift(np.int64(1), shifts).astype(np.int64),
        "unbias": (2**61 // np.left_shift(np.int64(1), shifts) - zero).astype(np.int64),
    }


def _requantize_nodes() -> list[onnx.NodeProto]:
    """int32 ``acc`` to uint8 ``q`` through the constants ``m0``, ``round``, ``divisor``, ``unbias``, ``lo``, ``hi``."""
    return [
        helper.make_node("Cast", ["acc"], ["wide"], to=TensorProto.INT64),
        helper.make_node("Mul", ["wide", "m0"], ["scaled"]),
        helper.make_node("Add", ["scaled", "round"], ["biased"]),
        helper.make_node("Div", ["biased", "divisor"], ["divided"]),
        helper.make_node("Sub", ["divided", "unbias"], ["shifted"]),
        helper.make_node("Clip", ["shifted", "lo", "hi"], ["clamped"]),
        helper.make_node("Cast", ["clamped"], ["q"], to=TensorProto.UINT8),
    ]


def _build(model: onnx.ModelProto, target: dict, folder: Path) -> TVMExecutor:
    folder.mkdir(parents=True, exist_ok=True)
    built = tvm_backend.build_integer(model, {"kind": "llvm"}, folder)
    files, host, lowering, _ = built
    assert host["mcpu"] == target["mcpu"] and lowering.startswith(tvm_backend.INTEGER_KERNELS)
    return TVMExecutor(folder / files[0], [item.name for item in model.graph.input], host["mcpu"])


def _accumulators(rng: np.random.Generator, rows: int) -> list[np.ndarray]:
    """The int32 extremes and their neighbours in every lane, then uniformly random int32 rows."""
    edges = [-(2**31), -(2**31) + 1, -1, 0, 1, 2**31 - 2, 2**31 - 1]
    values = [np.full((1, CHANNELS), edge, np.int32) for edge in edges]
    values += [rng.integers(-(2**31), 2**31, (1, CHANNELS), dtype=np.int64).astype(np.int32) for _ in range(rows)]
    values += [rng.integers(-(2**12), 2**12, (1, CHANNELS)).astype(np.int32) for _ in range(rows)]  # near zero
    return values


def test_requantization_fast_path_is_exact_at_the_int32_extremes(
    vnni: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shifts 33..61 take the vpmuldq fast path (checked by watching it), 33..40 with the zero point folded
    into its rounding term, 29..32 the generic int64 expression; every one equals the oracle on every lane
    for the extremes, 300 random rows and small values."""
    taken = []
    original = integer.fast_requantize

    def watched(value: object) -> object:
        result = original(value)
        taken.append(result is not None)
        return result

    monkeypatch.setattr(integer, "fast_requantize", watched)
    rng = np.random.default_rng(1)
    cases = (rng.integers(33, 62, CHANNELS), rng.integers(33, 41, CHANNELS), rng.integers(29, 33, CHANNELS))
    for case, shifts in enumerate(cases):
        model = _requantize_graph(shifts, seed=case)
        executor = _build(model, vnni, tmp_path / f"case{case}")
        assert taken[-1] == (case < 2)
        for accumulators in _accumulators(rng, 300):
            (produced,) = executor.run({"acc": accumulators})
            expected = integer_reference.run(model, {"acc": accumulators})[0]
            assert produced.dtype == np.uint8 and np.array_equal(produced, expected), accumulators


def test_resnet18_runs_on_the_int8_kernels_bit_exactly(vnni: dict, tmp_path: Path) -> None:
    """Stem 7 x 7 / 2 over three channels (stored as four), max pooling, 3 x 3 convolutions, strided 1 x 1
    shortcuts, residual Add + ReLU, the H x W mean and the classifier, all on the kernels."""
    from tvm import relax

    model = zoo.export_resnet18(tmp_path / "resnet18.onnx")
    crops = zoo.photo_crops(6, seed=2)
    output = tmp_path / "resnet18.int8-npu"
    manifest = api.compile(
        model, output, target="int8-npu", calibration_data=[{"input": crop[None]} for crop in crops[:4]],
        progress=False,
    )  # fmt: skip
    assert manifest["executors"]["tvm"]["lowering"].startswith(tvm_backend.INTEGER_KERNELS)
    assert manifest["measured"]["accuracy"]["tvm_vs_oracle"].startswith("bit-exact")
    lowered = onnx.load(str(output / api.INTEGER_ONNX))
    assert {"MaxPool", "ConvInteger", "MatMulInteger", "ReduceSum"} <= {node.op_type for node in lowered.graph.node}
    session = runtime.load(output, "tvm")
    # The same graph on the AVX2 flavor (built for Haswell: no AVX-512; depthwise-free, so every conv on
    # vpmaddwd, the 1000-wide classifier ending in a partial block of 8 lanes), and on AVX-VNNI (Alder Lake:
    # 256-bit vpdpbusd) where this CPU has it.
    machines = []
    for name, cpu in (("avx2", "haswell"), ("avxvnni", "alderlake")):
        if name == "avxvnni" and " avx_vnni" not in int8_kernels._cpu_flags():
            continue
        flavor = dataclasses.replace(int8_kernels.FLAVORS[name], tvm_target={"kind": "llvm", "mcpu": cpu})
        executable = relax.build(
            integer.to_relax(lowered, flavor),
            target=tvm.target.Target(flavor.tvm_target),
            relax_pipeline=integer.pipeline(),
        )
        machines.append(relax.VirtualMachine(executable, tvm.cpu()))
    for crop in crops[4:]:
        feed = {"input": crop[None]}
        expected = integer_reference.run(lowered, feed)[0]
        assert np.array_equal(session.run(feed)["logits"], expected)
        for machine in machines:
            assert np.array_equal(machine["main"](tvm.runtime.tensor(feed["input"])).numpy(), expected)
    for name, cpu in (("neon-dot", "cortex-a76"), ("neon", "cortex-a72")):
        _check_aarch64_under_qemu(lowered, {"input": crops[5][None]}, tmp_path, name, cpu)


def _check_aarch64_under_qemu(
    lowered: onnx.ModelProto, feed: dict[str, np.ndarray], folder: Path, name: str, cpu: str
) -> None:
    """The whole graph on an aarch64 flavor (sdot, or the widening multiply-adds of CPUs without it),
    cross-compiled and run by the artifact runner under qemu as ``cpu``, against the oracle."""
    from tvm.support import cc

    flavor = int8_kernels.FLAVORS[name]
    toolchain = emulation_toolchain(flavor.tvm_target)
    if toolchain is None:
        return  # without the cross toolchain (qcompile toolchains --install) only the host flavors are checked
    # the kernels in three modules built side by side, linked with the cross compiler (as a compile does)
    link.build_library(
        integer.to_relax(lowered, flavor, int8_kernels.NEON_FLOAT),
        tvm.target.Target({**flavor.tvm_target, "mcpu": cpu}),
        folder / "neon.so",
        integer.pipeline(),
        cc.cross_compiler(cross.require_compiler(toolchain)),
        parts=3,
    )
    runner = cross.build_runner(toolchain)
    outputs, _ = cross.emulate(
        toolchain, folder, "neon.so", list(feed.values()), cpu, flavor.tvm_target["mattr"], runner=runner
    )
    assert np.array_equal(outputs[0], integer_reference.run(lowered, feed)[0]), name


def test_a_graph_the_kernels_do_not_cover_says_why_and_falls_back(vnni: dict, tmp_path: Path) -> None:
    model = _requantize_graph(np.full(CHANNELS, 40))
    model.graph.node.insert(0, helper.make_node("Neg", ["acc"], ["negated"], name="the_neg"))
    model.graph.node[1].input[0] = "negated"
    with pytest.raises(integer.NotLowerable, match=r"the_neg \(Neg\)"):
        integer.to_relax(model)
    with pytest.raises(tvm_backend.KernelsNotUsed, match=r"the_neg \(Neg\)"):
        tvm_backend.build_integer(model, {"kind": "llvm"}, tmp_path)
    riscv = {"kind": "llvm", "mtriple": "riscv64-linux-gnu"}
    with pytest.raises(tvm_backend.KernelsNotUsed, match="no flavor for riscv64"):
        tvm_backend.build_integer(_requantize_graph(np.full(CHANNELS, 40)), riscv, tmp_path)


def test_a_library_built_for_another_cpu_is_refused(vnni: dict, tmp_path: Path) -> None:
    model = _requantize_graph(np.full(CHANNELS, 40))
    _build(model, vnni, tmp_path)
    with pytest.raises(ArtifactError, match="built for the imaginary-cpu CPU"):
        TVMExecutor(tmp_path / tvm_backend.LIBRARY_FILE, ["acc"], "imaginary-cpu")


def test_a_library_with_amx_tiles_is_refused_where_they_are_not_granted(
    vnni: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A library built with AMX features (the manifest target's ``mattr``) needs Linux's grant of the tile
    state; without it the first tile instruction would kill the process, so loading it is refused."""
    from qcompile.runtime import amx

    model = _requantize_graph(np.full(CHANNELS, 40))
    _build(model, vnni, tmp_path)
    monkeypatch.setattr(amx, "enable", lambda: False)
    with pytest.raises(ArtifactError, match="AMX tiles"):
        TVMExecutor(tmp_path / tvm_backend.LIBRARY_FILE, ["acc"], vnni["mcpu"], ["+amx-tile", "+amx-int8"])
    TVMExecutor(tmp_path / tvm_backend.LIBRARY_FILE, ["acc"], vnni["mcpu"], [])  # no tiles: loads


@pytest.mark.parametrize("fill", [None, np.array([7], np.int64), np.array([0.5], np.float32)])
def test_the_oracle_fills_a_constant_of_shape_as_onnx_says(fill: np.ndarray | None) -> None:
    """``ConstantOfShape`` (torch's ``full_like``, which TorchScript's export of WavLM keeps in its position
    buckets): the value's dtype and the shape read from the input, float32 zeros by default; as
    ``onnx.reference`` computes it."""
    from onnx.reference import ReferenceEvaluator

    attributes = {} if fill is None else {"value": numpy_helper.from_array(fill)}
    node = helper.make_node("ConstantOfShape", ["shape"], ["y"], **attributes)
    model = helper.make_model(
        helper.make_graph(
            [node],
            "fill",
            [helper.make_tensor_value_info("shape", TensorProto.INT64, [3])],
            [helper.make_empty_tensor_value_info("y")],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    feed = {"shape": np.array([2, 1, 3], np.int64)}
    (ours,) = integer_reference.run(model, feed)
    (expected,) = ReferenceEvaluator(model).run(None, feed)
    assert ours.dtype == expected.dtype and ours.shape == (2, 1, 3)
    np.testing.assert_array_equal(ours, expected)


def test_constants_broadcast_as_onnx_says() -> None:
    """Shapes align on the right: [C] is per channel for a [1, C] value but runs along W of [1, C, H, W]."""
    per_channel = integer._Lowering._per_channel
    assert per_channel(np.arange(8), (1, 8)).tolist() == list(range(8))
    assert per_channel(np.arange(8).reshape(8, 1, 1), (1, 8, 4, 8)).tolist() == list(range(8))
    assert per_channel(np.array([[[[3]]]]), (1, 8, 4, 8)) is None  # a scalar
    for shape in ((8,), (1, 1, 1, 8)):
        with pytest.raises(integer.NotLowerable, match="does not broadcast per channel"):
            per_channel(np.zeros(shape), (1, 8, 4, 8))


@pytest.mark.parametrize(
    ("channels", "pixels"), [(129, (4, 1)), (130, (3, 3)), (131, (1, 5)), (17, (2, 2)), (129, (8, 8))]
)
def test_a_partial_last_block_of_channels_is_stored_exactly(
    vnni: dict, tmp_path: Path, channels: int, pixels: tuple[int, int]
) -> None:
    """A 1 x 1 convolution over 64 channels into 129, 130, 131 or 17 (1, 2 or 3 channels past whole blocks of
    16) on maps of 4 to 64 pixels (64: the AMX kernel where the CPU has it), requantized to uint8: bit-exact
    with the oracle on every pixel. Stored lane by lane from int64, LLVM wrote the single live lane of such a
    block as 8 bytes, zeroing the next pixel's first seven channels."""
    rng = np.random.default_rng(channels)
    shifts = rng.integers(33, 45, channels).astype(np.int64)
    zero = rng.integers(0, 200, channels).astype(np.int64)
    constants = _requantize_constants(rng, shifts, zero)
    initializers = [
        numpy_helper.from_array(value.reshape(1, channels, 1, 1), name) for name, value in constants.items()
    ]
    initializers += [
        numpy_helper.from_array(rng.integers(-127, 128, (channels, CHANNELS, 1, 1)).astype(np.int8), "w"),
        numpy_helper.from_array(np.array(128, np.uint8), "xz"),
        numpy_helper.from_array(np.array(0, np.int64), "lo"),
        numpy_helper.from_array(np.array(255, np.int64), "hi"),
    ]
    nodes = [helper.make_node("ConvInteger", ["x", "w", "xz"], ["acc"], kernel_shape=[1, 1]), *_requantize_nodes()]
    graph = helper.make_graph(
        nodes,
        "partial_block",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, CHANNELS, *pixels])],
        [helper.make_tensor_value_info("q", TensorProto.UINT8, [1, channels, *pixels])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    executor = _build(model, vnni, tmp_path)
    for _ in range(3):
        feed = {"x": rng.integers(0, 256, (1, CHANNELS, *pixels)).astype(np.uint8)}
        (produced,) = executor.run(feed)
        expected = integer_reference.run(model, feed)[0]
        assert np.array_equal(produced, expected), np.argwhere(produced != expected)[:8].tolist()
