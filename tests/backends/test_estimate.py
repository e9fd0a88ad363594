"""The board estimate of a library of qcompile's kernels (qcompile.backends.tvm.estimate): loops read from
assembly, llvm-mca's cycles for them, and the sums. The end-to-end use (a cross artifact's manifest and default
executor) is checked in tests/edge/test_cross.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from qcompile import api, hwmodels
from qcompile.backends import tvm as tvm_backend
from qcompile.backends.tvm import estimate, integer

ASSEMBLY = """
k001_conv:
\tmov\tx8, xzr
.LBB0_1:
\tmov\tx9, xzr
.LBB0_2:
\tldr\tq0, [x1, x9]
\tdup\tv1.4s, w3
\tsdot\tv2.4s, v0.16b, v1.16b
\tsdot\tv3.4s, v0.16b, v1.16b
\tadd\tx9, x9, #16
\tcmp\tx9, #256
\tb.ne\t.LBB0_2
\tstr\tq2, [x2, x8]
\tadd\tx8, x8, #1
\tcmp\tx8, #8
\tb.lo\t.LBB0_1
\tret
"""


def test_the_innermost_loop_and_its_products_are_read_from_assembly() -> None:
    loops = estimate.innermost_loops(ASSEMBLY)
    assert len(loops) == 1  # the outer loop holds the inner one
    (body,) = loops
    assert body[0].split()[0] == "ldr" and body[-1].split()[0] == "b.ne"
    assert estimate.loop_macs(body) == 32  # two sdot of 4 lanes x 4 products
    x86 = ASSEMBLY.replace("\tb.ne\t", "\tjne\t").replace("\tb.lo\t", "\tjb\t")  # x86-64 branches close loops too
    assert [len(loop) for loop in estimate.innermost_loops(x86)] == [len(body)]


@pytest.fixture(scope="module")
def lowered(
    digits: tuple[Path, float], digits_calibration: Path, tmp_path_factory: pytest.TempPathFactory
) -> onnx.ModelProto:
    """The digits CNN's integer-only graph (int8-npu: every layer int8), as the lowering writes it."""
    folder = tmp_path_factory.mktemp("digits_npu") / "digits.int8-npu"
    api.compile(digits[0], folder, target="int8-npu", calibration_data=digits_calibration, progress=False)
    return onnx.load(str(folder / api.INTEGER_ONNX))


def _dense_macs(model: onnx.ModelProto) -> int:
    """The products of the graph's ConvInteger / MatMulInteger nodes."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {
        value.name: [dim.dim_value for dim in value.type.tensor_type.shape.dim]
        for value in [*inferred.graph.value_info, *inferred.graph.output]
    }
    weights = {tensor.name: tensor.dims for tensor in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type in ("ConvInteger", "MatMulInteger"):
            total += (
                int(np.prod(shapes[node.output[0]]))
                * int(np.prod(weights[node.input[1]]))
                // weights[node.input[1]][0 if node.op_type == "ConvInteger" else -1]
            )
    return total


@pytest.mark.skipif(estimate.mca_program() is None, reason="llvm-mca is not installed (Debian's llvm packages)")
def test_a_cnn_is_estimated_from_llvm_mca_on_each_arm_target(lowered: onnx.ModelProto) -> None:
    model = lowered
    macs = _dense_macs(lowered)
    results = {}
    for name in ("rpi4", "cortex-a76"):
        target = hwmodels.load_target(name)
        summary = tvm_backend.estimate_library(model, target.tvm_target, target.device)
        results[name] = summary
        assert summary["source"].startswith("estimate, not a measurement")
        assert target.tvm_target["mcpu"] in summary["source"]
        assert 0.0 < summary["dense_fraction_of_int8_peak"] <= 1.0
        # No faster than the target's int8 peak on every core allows, plus one kernel call's overhead.
        device = target.device
        floor_ms = macs / (device.macs_per_cycle["int8"] * device.cores * device.clock_ghz * 1e9) * 1e3
        assert summary["dense_ms"] >= floor_ms
    # The A76 (sdot, 2.4 GHz) is estimated faster than the A72 (widening multiply-adds, 1.5 GHz).
    assert results["cortex-a76"]["estimated_ms"] < results["rpi4"]["estimated_ms"]


def test_the_dense_kernels_carry_their_work(lowered: onnx.ModelProto) -> None:
    from qcompile.backends.tvm import int8_kernels

    target = hwmodels.load_target("cortex-a76")
    flavor, float_flavor, _ = int8_kernels.target_flavors(target.tvm_target, native=False)
    module = integer.to_relax(lowered, flavor, float_flavor)
    dense = [f for f in module.functions.values() if f.attrs is not None and integer.DENSE_STEPS in f.attrs]
    work = sum(int(f.attrs[integer.DENSE_STEPS]) * int(f.attrs[integer.STEP_MACS]) for f in dense)
    assert work >= _dense_macs(lowered)  # the tiles' products, padding included
