"""The three outlier rewrites on SmolLM2-135M (first 2 decoder layers, real text): exact in float, and folded
where a Llama-style graph allows.

Tolerance: 1e-5 of the largest logit magnitude (float32 rounding of rescaled, rotated or split weights;
measured 3.8e-7 SmoothQuant, 6.5e-7 Hadamard, 5.4e-7 split).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from qcompile import execution, frontend
from qcompile.flow.quantize import QuantizeOptions, quantize
from qcompile.passes.hadamard import HadamardRotationPass
from qcompile.passes.matmul_to_gemm import MatMulAddToGemmPass
from qcompile.passes.smoothquant import SmoothQuantPass, producer_statistics
from qcompile.passes.split_layers import SplitLayersPass
from qcompile.search import sensitivity

TOLERANCE = 1e-5


def _worst(before: list[np.ndarray], after: list[np.ndarray]) -> float:
    return max(float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(after, before, strict=True))


@pytest.mark.parametrize("which", ["smoothquant", "hadamard", "hadamard-residual", "split"])
def test_smollm2_rewrites_are_exact(which: str, smollm2: tuple[Path, list[dict[str, np.ndarray]]]) -> None:
    path, feeds = smollm2
    model = frontend.load(path)
    MatMulAddToGemmPass()(model)
    references = sensitivity.run_all(model, feeds)
    if which == "smoothquant":
        absmax, rows = producer_statistics(model, feeds)
        smoother = SmoothQuantPass(absmax.get, "auto", rows.get)
        smoother(model)
        folded = [d for d in smoother.decisions if d.reason is None]
        # Per layer: the input RMSNorm weight (Q, K, V), the post-attention RMSNorm weight (gate, up), and
        # the up projection through the SwiGLU Mul (down); then the final RMSNorm weight (the LM head, whose
        # weight the frontend untied from the embedding table).
        assert len(folded) == 2 * 3 + 1
        assert sum(len(d.consumers) for d in folded) == 2 * (3 + 2 + 1) + 1
        refused = [d for d in smoother.decisions if d.reason is not None]
        # o_proj reads the attention output through Transpose / Reshape: no producer can take its scale.
        assert len(refused) == 2 and all(d.value in d.reason and "Transpose" in d.reason for d in refused)
    elif which.startswith("hadamard"):
        rotator = HadamardRotationPass(residual=which == "hadamard-residual")
        rotator(model)
        rotated = [r for r in rotator.rotations if r.reason is None]
        assert {r.size for r in rotated} == {576, 1536}
        assert {r.kind for r in rotated} == {"kronecker"}  # 576 = 12 x 12 x 4, 1536 = 12 x 128
        online = [r for r in rotated if not r.folded_into]
        if which == "hadamard-residual":
            # The residual stream is rotated offline: Q, K, V, gate, up of both layers and the LM head read it
            # through RMSNorms whose weights are folded in; only o_proj's and down's inputs stay online.
            (stream,) = [r for r in rotated if r.folded_into]
            assert len(stream.consumers) == 2 * 5 + 1 and "4 residual writers, 5 RMSNorms" in str(stream.folded_into)
            assert len(online) == 2 * 2
        else:
            assert len(online) == 2 * 4 + 1  # norm outputs (shared by Q/K/V, gate/up), o, down; the head
    else:
        splitter = SplitLayersPass()
        splitter(model)
        assert len(splitter.splits) >= 2 * 7
    outputs = sensitivity.run_all(model, feeds)
    assert _worst(references, outputs) < TOLERANCE
    onnx.checker.check_model(execution.to_proto(model), full_check=True)


def test_smollm2_w4a4_quantizes_with_clamped_codes(smollm2: tuple[Path, list[dict[str, np.ndarray]]]) -> None:
    """W4A4 with rotation runs end to end on real text; the quantized model holds one code Clip per
    activation point, and its logits still point the same way as float's (cosine > 0.5: 4-bit activations
    cost much accuracy, as the bench figures show; this only guards against a broken graph)."""
    path, feeds = smollm2
    model = frontend.load(path)
    options = QuantizeOptions(bits="4", activation_bits=4, rotate="hadamard", float_threshold=0, sensitivity_samples=2)
    result = quantize(model, feeds, options, progress=False)
    proto = execution.to_proto(result.model)
    clips = sum(1 for node in proto.graph.node if node.name.endswith("_ClipCodes"))
    quantizers = sum(1 for node in proto.graph.node if node.op_type == "QuantizeLinear")
    assert clips == quantizers > 0
    assert result.error["mean_cosine"] > 0.5
