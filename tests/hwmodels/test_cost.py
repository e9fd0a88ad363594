"""Target files, layer descriptions and the cost model's arithmetic, against hand computation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import parse_model, save_model

from qcompile import frontend, hwmodels
from qcompile.errors import TargetError
from qcompile.hwmodels.cost import FLOAT, INT8, Calibration, Choice, CostModel, fit_factors
from qcompile.hwmodels.layers import LayerSpec, describe, layer_edges

SMALL = """
<ir_version: 8, opset_import: ["" : 18]>
g (float[1, 8, 10, 10] x) => (float[1, 5] y)
  <float[8, 1, 3, 3] dw = {dw}, float[16, 8, 1, 1] pw = {pw}, float[5, 16] fc = {fc}> {{
    a = Conv <group: int = 8, pads: ints = [1, 1, 1, 1]> (x, dw)
    b = Conv (a, pw)
    r = Relu (b)
    p = GlobalAveragePool (r)
    f = Flatten (p)
    y = Gemm <transB: int = 1> (f, fc)
}}
"""


def small_model(tmp_path: Path) -> Path:
    def values(count: int) -> str:
        return "{" + ", ".join("0.1" for _ in range(count)) + "}"

    text = SMALL.format(dw=values(72), pw=values(128), fc=values(80))
    return save_model(parse_model(text), tmp_path / "small.onnx")


def test_every_target_loads_with_positive_figures(tmp_path: Path) -> None:
    names = hwmodels.available_targets()
    assert set(names) >= {"host", "cortex-a76", "rpi4", "armv7", "riscv64", "jetson-orin-nano", "int8-npu", "fpga-lut"}
    for name in names:
        target = hwmodels.load_target(name)
        assert target.device.clock_ghz > 0 and target.device.macs_per_cycle
        assert all(rate > 0 for rate in target.device.macs_per_cycle.values())
    with pytest.raises(TargetError, match=r"valid targets: .*rpi4"):
        hwmodels.load_target("pdp11")
    with pytest.raises(TargetError, match="cannot read target file"):
        hwmodels.load_target(str(tmp_path / "missing.toml"))


def test_describe_counts_macs_and_kinds(tmp_path: Path) -> None:
    specs = {spec.name: spec for spec in describe(frontend.load(small_model(tmp_path)))}
    kinds = {spec.op_type: spec for spec in specs.values()}
    gemm = kinds["Gemm"]
    convs = [spec for spec in specs.values() if spec.op_type == "Conv"]
    depthwise, pointwise = sorted(convs, key=lambda spec: spec.kind)
    assert (depthwise.kind, depthwise.macs, depthwise.weight_elements) == ("depthwise", 8 * 10 * 10 * 9, 72)
    assert (pointwise.kind, pointwise.macs, pointwise.output_channels) == ("pointwise", 16 * 10 * 10 * 8, 16)
    assert (gemm.kind, gemm.macs, gemm.weight_elements) == ("gemm", 5 * 16, 80)
    assert kinds["Relu"].free  # fused into the Conv before it
    assert depthwise.input_elements == 800 and depthwise.output_elements == 800


def test_roofline_and_size_by_hand() -> None:
    target = hwmodels.load_target("rpi4")
    device = target.device
    model = CostModel(target)
    big = LayerSpec(
        "big",
        "Gemm",
        "gemm",
        macs=10**9,
        weight_elements=10**6,
        output_channels=1000,
        input_elements=1000,
        output_elements=1000,
    )
    # Compute-bound: 1e9 MACs at the int8 peak (16 MAC/cycle x 4 cores x 1.5 GHz = 96 GMAC/s).
    assert model.roofline_us(big, INT8) == pytest.approx(1e9 / device.peak_macs_per_second("int8") * 1e6)
    assert model.roofline_us(big, FLOAT) == pytest.approx(1e9 / device.peak_macs_per_second("fp32") * 1e6)
    # Memory-bound: few MACs, 4 MB of fp32 weights beyond the 1 MiB L2 stream from DRAM (12.8 GB/s).
    wide = LayerSpec(
        "wide",
        "Gemm",
        "gemm",
        macs=10**6,
        weight_elements=10**6,
        output_channels=1000,
        input_elements=1000,
        output_elements=1000,
    )
    assert model.roofline_us(wide, FLOAT) == pytest.approx((4e6 + 8000) / 12.8e9 * 1e6)
    # int4 weights halve the weight bytes of int8; ternary packs 5 per byte.
    assert model.weight_bytes(wide, Choice("int4", "int8")) == 0.5 * model.weight_bytes(wide, INT8) == 5e5
    assert model.weight_bytes(wide, Choice("ternary", "int8")) == pytest.approx(2e5)
    # A CPU reads int4 codes as the int8 it keeps them in; the LUT engine reads its ternary weights packed.
    assert model.roofline_us(wide, Choice("int4", "int8")) == model.roofline_us(wide, INT8)
    lut = CostModel(hwmodels.load_target("fpga-lut"))
    assert lut.bytes_moved(wide, Choice("ternary", "int8")) == pytest.approx(2e5 + 2000)
    assert model.size_bytes(wide, INT8) == 1e6 + 1000 * 8  # codes + float32 scale and int32 bias per channel
    assert model.size_bytes(wide, FLOAT) == 4e6 + 1000 * 4
    # An integer-only NPU cannot run float layers at all.
    npu = CostModel(hwmodels.load_target("int8-npu"))
    assert math.isinf(npu.latency_us(wide, FLOAT)) and math.isfinite(npu.latency_us(wide, INT8))
    with pytest.raises(TargetError, match="weight format 'int3'"):
        Choice("int3", "int8")


def test_fit_recovers_known_factors_and_calibration_round_trips(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    roofline = rng.uniform(1, 100, 40)
    elements = rng.uniform(0, 1e5, 40)
    weights = rng.uniform(0, 1e6, 40)
    measured = 1.7 * roofline + 12.0 + 2e-4 * elements + 3e-5 * weights
    factors, error = fit_factors(roofline, elements, weights, measured)
    assert factors == pytest.approx((1.7, 12.0, 2e-4, 3e-5), rel=1e-6) and error < 1e-9
    calibration = Calibration("host", {"gemm/int8": factors}, node_overhead_us=3.0, machine={"cpu": "x"})
    calibration.save(tmp_path / "host.json")
    loaded = Calibration.load(tmp_path / "host.json")
    assert loaded.factors == calibration.factors and loaded.node_overhead_us == 3.0
    # A calibration stored with three factors (before the per-weight one) still loads, with no weight cost.
    old = json.loads((tmp_path / "host.json").read_text())
    old["factors"] = {"gemm/int8": [1.7, 12.0, 2e-4]}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert Calibration.load(tmp_path / "old.json").factors == {"gemm/int8": (1.7, 12.0, 2e-4, 0.0)}
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(TargetError, match=r"unreadable.*qcompile profile"):
        Calibration.load(tmp_path / "bad.json")


def test_edges_join_layers_through_pass_through_ops(tmp_path: Path) -> None:
    model = frontend.load(small_model(tmp_path))
    names = [spec.name for spec in describe(model) if spec.quantizable]
    dw, pw, fc = names
    edges = {(producer, consumer): elements for producer, consumer, elements in layer_edges(model, names)}
    # dw -> pw directly; pw -> Relu -> GlobalAveragePool -> Flatten -> Gemm: 16 pooled values cross.
    assert edges == {(dw, pw): 800, (pw, fc): 16}
    costs = CostModel(hwmodels.load_target("host"))
    specs = describe(model)
    mixed = {dw: FLOAT, pw: INT8, fc: FLOAT}
    with_edges = costs.model_latency_ms(specs, mixed, edges=layer_edges(model, names))
    without = costs.model_latency_ms(specs, mixed)
    assert with_edges == pytest.approx(without + (costs.transition_us(800) + costs.transition_us(16)) / 1e3)


def test_target_recipes_are_read_and_checked(tmp_path: Path) -> None:
    for name in hwmodels.available_targets():
        recipe = hwmodels.load_target(name).recipe
        assert set(recipe) == {"smoothquant", "rotate", "split_layers"}
    for name in ("host", "rpi4", "cortex-a76"):  # sequence models rotated, CNNs not
        assert hwmodels.load_target(name).recipe["rotate"] == "auto"
    host = (Path(hwmodels.__file__).parent / "targets" / "host.toml").read_text()
    text = host.split("\n[recipe]")[0]  # host's own recipe off: each case below declares one
    board = tmp_path / "board.toml"
    board.write_text(text + '\n[recipe]\nsmoothquant = "auto"\nrotate = "hadamard"\n')
    expected = {"smoothquant": "auto", "rotate": "hadamard", "split_layers": False}
    assert hwmodels.load_target(str(board)).recipe == expected
    board.write_text(text + '\n[recipe]\nrotate = "givens"\n')
    with pytest.raises(TargetError, match="recipe rotate must be"):
        hwmodels.load_target(str(board))
    board.write_text(text + "\n[recipe]\nfuse = true\n")
    with pytest.raises(TargetError, match="unknown recipe entries"):
        hwmodels.load_target(str(board))
