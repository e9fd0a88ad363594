"""The TVM executor hands its outputs out without copying them and refills its inputs in place: an output is
the caller's to keep, through later runs, even one that is an input as given."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")


def test_outputs_outlive_the_next_run_even_when_one_is_an_input(tmp_path: Path) -> None:
    from tvm.script import relax as R

    from qcompile.runtime.executors import TVMExecutor

    @tvm.script.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor((2, 3), "float32"), y: R.Tensor((2, 3), "float32")):  # type: ignore[no-untyped-def]
            total = R.add(x, y)
            return (x, total)

    tvm.compile(Module, target="llvm").export_library(str(tmp_path / "identity.so"))
    executor = TVMExecutor(tmp_path / "identity.so", ["x", "y"])
    x, y = np.ones((2, 3), np.float32), np.full((2, 3), 2.0, np.float32)
    first = executor.run({"x": x, "y": y})
    second = executor.run({"x": x * 5, "y": y})
    np.testing.assert_array_equal(first[0], x)  # the input as given: copied out, not the refilled tensor
    np.testing.assert_array_equal(first[1], x + y)
    np.testing.assert_array_equal(second[0], x * 5)
    np.testing.assert_array_equal(second[1], x * 5 + y)
    with pytest.raises(KeyError):
        executor.run({"x": x})  # (a missing input: the session names it before it gets here)


def test_a_library_reads_its_lifted_weights_from_their_file(tmp_path: Path) -> None:
    """Constants lifted out of a library into a weights file, read back into tensors and passed after the
    inputs: outputs identical to the library that keeps them inside (integer arithmetic, exact); small constants
    stay inside; a truncated weights file is an ArtifactError."""
    from tvm import relax

    from qcompile.backends.tvm import lifted
    from qcompile.errors import ArtifactError
    from qcompile.runtime import weights
    from qcompile.runtime.executors import TVMExecutor, release_constant_pages

    rng = np.random.default_rng(0)
    large = rng.integers(-128, 128, size=(256, 512)).astype(np.int32)  # 512 KB: lifted
    small = rng.integers(-128, 128, size=(512,)).astype(np.int32)  # 2 KB: stays inside
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((256, 512), "int32"))
    with builder.function("main", [x]):
        with builder.dataflow():
            total = builder.emit(relax.op.add(x, relax.const(large)))
            scaled = builder.emit(relax.op.multiply(total, relax.const(large)))
            out = builder.emit_output(relax.op.add(scaled, relax.const(small)))
        builder.emit_func_output(out)
    module = builder.get()
    moved, arrays = lifted.lift_constants(module)
    assert len(arrays) == 1 and np.array_equal(arrays[0], large)  # one parameter for the constant used twice
    assert [str(param.name) for param in moved["main"].params] == ["x", "weight0"]
    target = tvm.target.Target("llvm")
    tvm.compile(module, target=target).export_library(str(tmp_path / "inside.so"))
    tvm.compile(moved, target=target).export_library(str(tmp_path / "outside.so"))
    weights.write(tmp_path / "outside.weights", arrays)
    feeds = {"x": rng.integers(-1000, 1000, size=(256, 512)).astype(np.int32)}
    inside = TVMExecutor(tmp_path / "inside.so", ["x"])  # (held: its library stays mapped)
    (expected,) = inside.run(feeds)
    (produced,) = TVMExecutor(tmp_path / "outside.so", ["x"], weights_file=tmp_path / "outside.weights").run(feeds)
    np.testing.assert_array_equal(produced, (feeds["x"] + large) * large + small)
    np.testing.assert_array_equal(produced, expected)
    # the library that keeps them inside: loading copied them to its tensors, and the file's pages are released
    assert release_constant_pages(tmp_path / "inside.so", minimum=256 << 10) >= 256 << 10
    data = (tmp_path / "outside.weights").read_bytes()
    (tmp_path / "cut.weights").write_bytes(data[: len(data) - 1000])
    with pytest.raises(ArtifactError, match="truncated"):
        TVMExecutor(tmp_path / "outside.so", ["x"], weights_file=tmp_path / "cut.weights")


def test_a_library_built_for_instructions_this_cpu_lacks_is_refused(tmp_path: Path) -> None:
    """The instruction-set flags recorded at build time are checked without LLVM (the runtime loads TVM's
    runtime alone): a missing one is named. isa_flags keeps the instruction sets of /proc/cpuinfo's flags (x86)
    or Features (aarch64) line, not the machine's other flags."""
    from tvm.script import relax as R

    from qcompile.errors import ArtifactError
    from qcompile.runtime import tvm_runtime
    from qcompile.runtime.executors import TVMExecutor

    @tvm.script.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor((2,), "float32")):  # type: ignore[no-untyped-def]
            return R.add(x, x)

    tvm.compile(Module, target="llvm").export_library(str(tmp_path / "double.so"))
    here = tvm_runtime.isa_flags()
    TVMExecutor(tmp_path / "double.so", ["x"], cpu="some-cpu", flags=here)  # the flags match: the name is not checked
    with pytest.raises(ArtifactError, match="instructions this CPU lacks \\(avx10_9\\)"):
        TVMExecutor(tmp_path / "double.so", ["x"], cpu="some-cpu", flags=[*here, "avx10_9"])
    x86 = "processor\t: 0\nflags\t\t: fpu hypervisor sse2 avx2 avx512_vnni amx_int8 constant_tsc\n"
    assert tvm_runtime.isa_flags(x86) == ["amx_int8", "avx2", "avx512_vnni", "sse2"]
    arm = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes asimddp i8mm cpuid\n"
    assert tvm_runtime.isa_flags(arm) == ["aes", "asimd", "asimddp", "i8mm"]
