"""qcompile gate: passes and fails on the right side of each budget, JUnit XML parses, bad calls exit 2."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

from qcompile import api
from qcompile.cli import main


def test_budgets_pass_and_fail_on_the_right_side(artifact: Path) -> None:
    generous = api.gate(
        artifact, max_latency_ms=1000, max_accuracy_drop=50, max_size_mb=100, runs=20, executor="onnxruntime"
    )
    assert [check.name for check in generous] == ["latency", "accuracy drop", "size"]
    assert all(check.passed for check in generous)
    latency, drop, size = generous
    assert "measured here" in latency.source and latency.value > 0
    tight = api.gate(
        artifact, max_latency_ms=latency.value / 1000, max_size_mb=size.value / 2, runs=20, executor="onnxruntime"
    )
    assert [check.passed for check in tight] == [False, False]
    assert "calibration samples at compile time" in drop.source


def test_accuracy_measured_on_data(artifact: Path, digits_calibration: Path) -> None:
    (check,) = api.gate(artifact, max_accuracy_drop=5, data=digits_calibration, executor="onnxruntime")
    assert check.passed and "measured here on 32 samples" in check.source and check.value <= 5


def test_cross_target_latency_is_predicted(artifact: Path) -> None:
    (check,) = api.gate(artifact, max_latency_ms=1000, target="rpi4")
    assert check.source.startswith("predicted for rpi4 by the cost model") and check.value > 0


def test_cli_exit_codes_and_junit(artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junit = tmp_path / "reports" / "gate.xml"
    assert (
        main(
            [
                "gate",
                str(artifact),
                "--max-latency-ms",
                "1000",
                "--max-size-mb",
                "1e-6",
                "--runs",
                "10",
                "--junit",
                str(junit),
            ]
        )
        == 1
    )
    printed = capsys.readouterr().out
    assert "PASS" in printed and "FAIL" in printed and "gate: FAIL: size" in printed
    suite = ElementTree.parse(junit).getroot().find("testsuite")
    assert suite is not None and suite.get("tests") == "2" and suite.get("failures") == "1"
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    assert cases["size"].find("failure") is not None and cases["latency"].find("failure") is None
    assert main(["gate", str(artifact), "--max-latency-ms", "1000", "--runs", "10"]) == 0
    assert main(["gate", str(artifact)]) == 2
    assert "give at least one budget" in capsys.readouterr().err
    assert main(["gate", str(artifact), "--max-latency-ms", "-1"]) == 2
    assert main(["gate", str(tmp_path / "missing"), "--max-latency-ms", "1"]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["gate", str(artifact), "--max-accuracy-drop", "1", "--data", str(empty)]) == 2
