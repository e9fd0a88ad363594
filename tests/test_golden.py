"""Golden bytes (tinygrad's replay idea): the frontend, annotation + QDQ and the integer lowering of a small
CNN give the same bytes as when the hashes were stored (tests/golden/hashes.json, recorded before the
restructuring into flow/ and backends/integer/). A change that moves these bytes must say why, and store
new hashes with ``python tests/golden/build.py > tests/golden/hashes.json``.

The build uses no onnxruntime and no calibration run, only numpy arithmetic on seeded weights, so the
bytes do not depend on the CPU's kernels. End-to-end artifact hashes of real models (whose calibration
runs onnxruntime) are compared on one machine by bench/golden.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import onnx
import pytest

GOLDEN = Path(__file__).resolve().parent / "golden"
sys.path.insert(0, str(GOLDEN))

import build  # noqa: E402


@pytest.fixture(scope="module")
def built() -> dict[str, bytes]:
    return build.build()


@pytest.mark.parametrize("stage", ["normalized", "qdq", "integer"])
def test_bytes_match_the_stored_hashes(built: dict[str, bytes], stage: str) -> None:
    import hashlib

    stored = json.loads((GOLDEN / "hashes.json").read_text())
    assert hashlib.sha256(built[stage]).hexdigest() == stored[stage], f"the {stage} model's bytes changed"


def test_golden_models_are_valid_and_quantized(built: dict[str, bytes]) -> None:
    """The hashes guard real graphs: both check, the QDQ one quantizes every layer, the integer one has no float
    compute left."""
    qdq, lowered = (onnx.ModelProto.FromString(built[stage]) for stage in ("qdq", "integer"))
    for model in (qdq, lowered):
        model.ir_version = 10
        onnx.checker.check_model(model, full_check=True)
    assert sum(node.op_type == "QuantizeLinear" for node in qdq.graph.node) >= 4
    ops = {node.op_type for node in lowered.graph.node}
    assert {"ConvInteger", "MatMulInteger"} <= ops and not ops & {"Conv", "Gemm", "MatMul", "BatchNormalization"}
