"""MatMul + bias Add becomes Reshape -> Gemm -> Reshape with identical outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import parse_model, save_model

from qcompile import execution, frontend
from qcompile.passes.matmul_to_gemm import MatMulAddToGemmPass


def test_rewrite_is_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    weights = "{" + ", ".join(f"{v:.5f}" for v in rng.standard_normal(4 * 3)) + "}"
    text = f"""
    <ir_version: 8, opset_import: ["" : 18]>
    g (float[2, 5, 4] x) => (float[2, 5, 3] y) <float[4, 3] w = {weights}, float[3] b = {{0.5, -1.0, 2.0}}> {{
        m = MatMul (x, w)
        y = Add (b, m)
    }}"""
    model = frontend.load(save_model(parse_model(text), tmp_path / "linear.onnx"))
    x = rng.standard_normal((2, 5, 4)).astype(np.float32)
    expected = execution.session(model).run(None, {"x": x})[0]
    assert MatMulAddToGemmPass()(model).modified
    assert [node.op_type for node in model.graph] == ["Reshape", "Gemm", "Reshape"]
    assert model.graph.outputs[0].name == "y"
    actual = execution.session(model).run(None, {"x": x})[0]
    # The same products summed in the same order per element; allow float32 round-off of the backends.
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6)
