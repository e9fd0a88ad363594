"""The bit-width allocation is the exact optimum, budgets it cannot meet are clear errors, and the
pipeline records and reports what the search chose."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from qcompile import api
from qcompile.cli import main
from qcompile.errors import BudgetError
from qcompile.flow.quantize import QuantizeOptions
from qcompile.search.allocate import CANDIDATES, LayerCosts, Problem, allocate, evaluate, pareto_front
from qcompile.search.bits import SearchResult, within_accuracy


def random_problem(seed: int) -> Problem:
    rng = np.random.default_rng(seed)
    layers = []
    for index in range(5):
        base = rng.uniform(50, 200)
        layers.append(
            LayerCosts(
                f"l{index}",
                {
                    "fp32": 0.0,
                    "int8": rng.uniform(1e-4, 1e-3),
                    "w8a16": rng.uniform(1e-5, 1e-4),
                    "int4": rng.uniform(1e-3, 1e-2),
                    "int2": rng.uniform(5e-3, 5e-2),
                    "ternary": rng.uniform(0.01, 0.1),
                },
                {
                    "fp32": base,
                    "int8": base * rng.uniform(0.3, 0.6),
                    "w8a16": base * rng.uniform(0.6, 0.9),
                    "int4": base * 0.35,
                    "int2": base * 0.32,
                    "ternary": base * 0.3,
                },
                {"fp32": 4e5, "int8": 1e5, "w8a16": 1e5, "int4": 5e4, "int2": 2.5e4, "ternary": 2e4},
            )
        )
    transitions = [(f"l{i}", f"l{i + 1}", rng.uniform(5, 40)) for i in range(4)]
    return Problem(layers, transitions, fixed_ms=0.1, fixed_mb=0.01)


def brute_force(problem: Problem, latency_ms: float, size_mb: float) -> float:
    best = np.inf
    for formats in itertools.product(CANDIDATES, repeat=len(problem.layers)):
        point = evaluate(problem, dict(zip([layer.name for layer in problem.layers], formats, strict=True)))
        if point.latency_ms <= latency_ms and point.size_mb <= size_mb:
            best = min(best, point.error)
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_milp_matches_brute_force(seed: int) -> None:
    problem = random_problem(seed)
    fp32 = evaluate(problem, {layer.name: "fp32" for layer in problem.layers})
    for fraction in (0.5, 0.7, 0.9):
        latency, size = fp32.latency_ms * fraction, fp32.size_mb * 0.6
        expected = brute_force(problem, latency, size)
        if np.isinf(expected):
            with pytest.raises(BudgetError):
                allocate(problem, latency, size)
            continue
        found = allocate(problem, latency, size)
        assert found.latency_ms <= latency + 1e-9 and found.size_mb <= size + 1e-9
        assert found.error == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_impossible_budget_names_the_reachable_extremes() -> None:
    with pytest.raises(BudgetError, match=r"fastest reachable configuration takes [0-9.]+ ms .*the smallest is"):
        allocate(random_problem(0), latency_budget_ms=1e-6)


def test_front_is_sorted_and_non_dominated() -> None:
    front = pareto_front(random_problem(1))
    assert len(front) >= 2
    assert [point.latency_ms for point in front] == sorted(point.latency_ms for point in front)
    assert all(a.error > b.error for a, b in itertools.pairwise(front))


def test_options_are_validated() -> None:
    with pytest.raises(BudgetError, match="needs a budget"):
        QuantizeOptions(bits="auto")
    with pytest.raises(BudgetError, match="add --bits auto"):
        QuantizeOptions(latency_budget_ms=3.0)
    with pytest.raises(BudgetError, match="positive"):
        QuantizeOptions(bits="auto", size_budget_mb=-1.0)
    with pytest.raises(BudgetError, match="add --bits auto"):
        QuantizeOptions(max_accuracy_drop=1.0)
    with pytest.raises(BudgetError, match="percentage points"):
        QuantizeOptions(bits="auto", max_accuracy_drop=-1.0)
    QuantizeOptions(bits="auto", max_accuracy_drop=1.0)  # an accuracy budget alone is a budget


def test_accuracy_budget_picks_the_fastest_point_that_meets_it() -> None:
    problem = random_problem(2)
    front = pareto_front(problem)
    result = SearchResult(allocate(problem), front, problem, "test", 0.0)
    drop = {id(point): 1e3 * point.error for point in front}  # a drop that falls as the error does
    for budget in sorted(drop.values()):
        result.accuracy_checks.clear()
        chosen = within_accuracy(result, None, budget, lambda point: drop.get(id(point), 0.0), 8)
        meeting = [point for point in front if drop[id(point)] <= budget]
        assert chosen.latency_ms == min(point.latency_ms for point in meeting)
        assert len(result.accuracy_checks) <= 1 + int(np.ceil(np.log2(len(front) + 1)))  # bisected, not scanned
    slowest = front[-1].latency_ms
    with pytest.raises(BudgetError, match=r"keeps the accuracy drop within 0 points on the 8 .* drops"):
        within_accuracy(result, slowest * 0.999, 0.0, lambda point: drop.get(id(point), 1.0), 8)


def test_compile_with_search_records_and_reports(
    digits: tuple[Path, float], digits_calibration: Path, tmp_path: Path
) -> None:
    output = tmp_path / "auto"
    manifest = api.compile(
        digits[0],
        output,
        calibration_data=digits_calibration,
        build_tvm=False,
        progress=False,
        options=QuantizeOptions(bits="auto", size_budget_mb=0.02),
    )
    search = next(entry for entry in manifest["passes"] if entry["name"] == "bit_search")
    assert search["predicted"]["size_mb"] <= 0.02 and search["pareto_front"]
    candidates = search["candidates"]
    assert all(set(layer["error"]) == set(CANDIDATES) for layer in candidates.values())
    # Reading a layer's input at 16 bits instead of 8 removes most of its activation rounding.
    assert sum(layer["error"]["w8a16"] for layer in candidates.values()) < sum(
        layer["error"]["int8"] for layer in candidates.values()
    )
    formats = {layer["name"]: layer["weight_format"] for layer in manifest["layers"]}
    # The float model holds 0.06 MB of weights: 0.02 MB forces most layers into integers.
    assert set(formats.values()) <= set(CANDIDATES) and list(formats.values()).count("fp32") < len(formats)
    assert all(layer["predicted_latency_us"] > 0 for layer in manifest["layers"])
    report = (output / "report.html").read_text()
    assert "<svg" in report and "Pareto front" in report and "report.html" in manifest["files"]
    assert json.loads((output / "manifest.json").read_text())["layers"] == manifest["layers"]


def compile_digits_auto(digits: tuple[Path, float], calibration: Path, output: Path, *budgets: str) -> int:
    return main(
        [str(digits[0]), "-c", str(calibration), "-o", str(output), "--bits", "auto", *budgets, "--no-tvm", "-q"]
    )


def test_accuracy_budget_compiles_the_fastest_point_within_it(
    digits: tuple[Path, float], digits_calibration: Path, tmp_path: Path
) -> None:
    output = tmp_path / "drop"
    assert compile_digits_auto(digits, digits_calibration, output, "--max-accuracy-drop", "3") == 0
    manifest = json.loads((output / "manifest.json").read_text())
    search = next(entry for entry in manifest["passes"] if entry["name"] == "bit_search")
    assert search["max_accuracy_drop"] == 3.0
    checks = search["accuracy_checks"]
    picked = next(check for check in checks if check["latency_ms"] == search["predicted"]["latency_ms"])
    assert picked["accuracy_drop"] <= 3.0 and picked["samples"] == 32
    # The chosen point is the fastest measured one within the budget: every measured point faster than it failed.
    assert all(check["accuracy_drop"] > 3.0 for check in checks if check["latency_ms"] < picked["latency_ms"])
    formats = {layer["name"]: layer["weight_format"] for layer in manifest["layers"]}
    assert list(formats.values()).count("fp32") == search["predicted"]["layers"]["fp32"]
    assert "Accuracy budget" in (output / "report.html").read_text()


def test_cli_impossible_budget_exits_2_without_artifact(
    digits: tuple[Path, float], digits_calibration: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "none"
    code = compile_digits_auto(digits, digits_calibration, output, "--latency-budget-ms", "1e-6")
    assert code == 2 and not output.exists()
    assert "no bit-width allocation meets latency <= 1e-06 ms" in capsys.readouterr().err


def test_candidates_fp32_beats_on_latency_are_not_measured_without_a_size_budget(
    digits: tuple[Path, float], digits_calibration: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no size budget, a candidate slower than fp32 plus every crossing its layer can add is never
    optimal (fp32's error is 0): it is not measured. Priced here so that W8A16 is that slow, as onnxruntime
    runs it on the host; with a size budget (where its int8-sized weights could matter) it is measured."""
    from qcompile import frontend
    from qcompile.flow.quantize import quantize
    from qcompile.hwmodels.cost import CostModel

    prices = {"fp32": 10.0, "int16": 60.0}
    monkeypatch.setattr(CostModel, "latency_us", lambda self, layer, choice: prices.get(choice.activations, 5.0))
    model = frontend.load(digits[0])
    feeds = [{"image": np.load(path)} for path in sorted(digits_calibration.glob("*.npy"))]
    for budget, expect_measured in (
        (QuantizeOptions(bits="auto", latency_budget_ms=1.0), False),
        (QuantizeOptions(bits="auto", size_budget_mb=1.0), True),
    ):
        result = quantize(model, feeds, budget, progress=False)
        assert result.search is not None
        layers = result.search.problem.layers
        assert all(("w8a16" in layer.error) == expect_measured for layer in layers)
        assert result.search.dominated == (0 if expect_measured else len(layers))
        assert all({"fp32", "int8", "int4", "int2", "ternary"} <= set(layer.error) for layer in layers)
