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
