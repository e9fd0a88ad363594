"""The compile flow's table: every pipeline a target file may name has stages and a summary, and
`qcompile targets` lists every bundled target."""

from __future__ import annotations

import pytest

from qcompile import hwmodels
from qcompile.cli import main
from qcompile.flow.compile import PIPELINE_SUMMARIES, PIPELINES


def test_every_pipeline_has_stages_and_a_summary() -> None:
    assert set(PIPELINES) == set(hwmodels.PIPELINES) == set(PIPELINE_SUMMARIES)
    for stages in PIPELINES.values():
        assert stages and all(callable(stage) and stage.__doc__ for stage in stages)


def test_targets_lists_every_target(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["targets"]) == 0
    printed = capsys.readouterr().out
    for name in hwmodels.available_targets():
        target = hwmodels.load_target(name)
        assert f"{name}  " in printed and target.description in printed
    assert printed.count("builds: ") == len(hwmodels.available_targets())
