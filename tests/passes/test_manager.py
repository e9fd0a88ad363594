"""The pass order is checked when passes run: out of order is refused, by the log and by each pass's
``requires``; every subsequence of the order is allowed."""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir
import pytest
from test_qdq import residual_model

from qcompile.passes.annotate import AnnotatePass
from qcompile.passes.bias_correction import BiasCorrectionPass
from qcompile.passes.hadamard import HadamardRotationPass
from qcompile.passes.manager import ORDER, PassLog, PassOrderError, check_order
from qcompile.passes.matmul_to_gemm import MatMulAddToGemmPass
from qcompile.passes.qdq import QDQPass
from qcompile.passes.smoothquant import SmoothQuantPass
from qcompile.passes.split_layers import SplitLayersPass


def _fixed_range(_name: str, _levels: int = 256) -> tuple[float, float]:
    return (-1.0, 1.0)


def test_order_holds_the_documented_sequence() -> None:
    names = [kind.__name__ for kind in ORDER]
    assert names.index("SmoothQuantPass") < names.index("HadamardRotationPass") < names.index("SplitLayersPass")
    assert names.index("SplitLayersPass") < names.index("AnnotatePass") < names.index("QDQPass")
    check_order([MatMulAddToGemmPass, SplitLayersPass, AnnotatePass, QDQPass])  # optional passes skipped


@pytest.mark.parametrize(
    ("sequence", "message"),
    [
        ([HadamardRotationPass, SmoothQuantPass], "SmoothQuantPass cannot run after HadamardRotationPass"),
        ([AnnotatePass, SplitLayersPass], "SplitLayersPass cannot run after AnnotatePass"),
        ([QDQPass, BiasCorrectionPass], "BiasCorrectionPass cannot run after QDQPass"),
        ([AnnotatePass, AnnotatePass], "AnnotatePass cannot run after AnnotatePass"),
    ],
)
def test_out_of_order_is_refused(sequence: list[type[ir.passes.PassBase]], message: str) -> None:
    with pytest.raises(PassOrderError, match=message):
        check_order(sequence)


def test_log_runs_passes_and_refuses_a_late_rewrite(tmp_path: Path) -> None:
    model = residual_model(tmp_path)
    log = PassLog()
    log.run(MatMulAddToGemmPass(), model)
    copy = model.clone(deep_copy=True)
    forked = log.fork()
    forked.run(AnnotatePass(_fixed_range), copy)
    forked.run(QDQPass(), copy)
    assert forked.ran == [MatMulAddToGemmPass, AnnotatePass, QDQPass]
    assert log.ran == [MatMulAddToGemmPass]  # the original's log is its own
    with pytest.raises(PassOrderError, match="SplitLayersPass cannot run after QDQPass"):
        forked.run(SplitLayersPass(), copy)
    assert "QuantizeLinear" in {node.op_type for node in copy.graph}


def test_requires_refuses_a_float_rewrite_of_an_annotated_model(tmp_path: Path) -> None:
    """Without the log, each pass's own precondition still stops a rewrite after annotation."""
    model = residual_model(tmp_path)
    AnnotatePass(_fixed_range)(model)
    with pytest.raises(ir.passes.PreconditionError, match="run it before AnnotatePass"):
        SplitLayersPass()(model)
    fresh = residual_model(tmp_path)
    with pytest.raises(ir.passes.PreconditionError, match="run AnnotatePass first"):
        QDQPass()(fresh)
