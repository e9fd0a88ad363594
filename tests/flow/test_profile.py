"""Profiling maps onnxruntime's kernels back to layers, and calibration fits every layer kind it measures."""

from __future__ import annotations

from pathlib import Path

import pytest

from qcompile import execution, frontend, hwmodels
from qcompile.errors import TargetError
from qcompile.flow import profile
from qcompile.flow.quantize import quantize
from qcompile.hwmodels.cost import CostModel, calibration_path
from qcompile.hwmodels.layers import describe
from qcompile.search.choices import as_pipeline_sees_it


def test_kernels_map_to_every_compute_layer(digits: tuple[Path, float]) -> None:
    import zoo

    train_x = zoo.digits_split()[0]
    feeds = [{"image": train_x[i : i + 1]} for i in range(8)]
    model = frontend.load(digits[0])
    quantized = quantize(model, feeds, progress=False).model
    compute = [spec.name for spec in describe(model) if spec.quantizable]
    for graph in (model, quantized):  # fp32 (ORT fuses Conv + Relu) and QDQ (ORT fuses into QLinearConv)
        times, unattributed = profile.layer_times(graph, execution.kernel_times(graph, feeds[0], runs=3, sessions=1))
        assert all(times.get(name, 0.0) > 0 for name in compute), (times, compute)
        assert unattributed >= 0


def test_calibration_fits_and_is_found_by_the_cost_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QCOMPILE_HOME", str(tmp_path))
    target = hwmodels.load_target("host")
    assert not CostModel.for_target(target).calibrated
    calibration, measurements = profile.calibrate(target, runs=3, progress=False)
    assert {"depthwise/int8", "pointwise/fp32", "gemm/int8", "matmul/fp32", "other/fp32"} <= set(calibration.factors)
    # W8A16 is measured as onnxruntime runs it (float kernels behind 16-bit QuantizeLinear / DequantizeLinear).
    assert {"depthwise/int16", "pointwise/int16", "gemm/int16"} <= set(calibration.factors)
    assert {item.network for item in measurements} == {"mobile CNN", "small transformer", "post-norm transformer"}
    # Row-wise reductions are fitted on their own; the post-norm residual Add is measured inside its norm.
    assert {"softmax/fp32", "norm/fp32", "addnorm/fp32"} <= set(calibration.factors)
    calibration.save(calibration_path("host"))
    model = CostModel.for_target(target)
    assert model.calibrated and model.calibration is not None
    assert model.calibration.factors == pytest.approx(calibration.factors)
    for item in measurements:
        assert model.latency_us(item.layer, item.choice) > 0


def test_only_the_host_can_be_profiled() -> None:
    with pytest.raises(TargetError, match="profiling 'rpi4' needs that device"):
        profile.calibrate(hwmodels.load_target("rpi4"), runs=1, progress=False)


def test_fused_skip_layer_norm_is_charged_to_its_norm() -> None:
    # onnxruntime runs a post-norm residual Add and its LayerNormalization as one SkipLayerNormalization kernel
    # named with a counter: it is found by the value it writes, and the cost model prices the Add inside it.
    model, feeds = profile.bert_like()
    model = as_pipeline_sees_it(model)  # as profiled: MatMul + bias Add as Gemm
    specs = describe(model)
    times, unattributed = profile.layer_times(model, execution.kernel_times(model, feeds[0], runs=3, sessions=1))
    norms = [spec for spec in specs if spec.op_type == "LayerNormalization"]
    assert norms and all(spec.kind == "addnorm" and times.get(spec.name, 0.0) > 0 for spec in norms)
    fused_adds = [spec for spec in specs if spec.op_type == "Add" and spec.free]
    assert len(fused_adds) == len(norms) and not any(spec.name in times for spec in fused_adds)
    assert all(spec.input_elements == 2 * spec.output_elements for spec in norms)  # the Add's two inputs
    assert unattributed == 0
