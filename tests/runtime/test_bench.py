"""Interleaved timing: every callable runs in every round, in turn, and is never timed on its first call."""

from __future__ import annotations

from qcompile.runtime import bench


def test_compare_interleaves_rounds_and_skips_first_calls() -> None:
    calls: list[str] = []
    runs = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
    results = bench.compare(runs, rounds=3, round_seconds=0.0, min_runs=2)
    assert calls == ["a", "b"] + ["a", "a", "b", "b"] * 3  # one untimed call each, then rounds in turn
    assert {name: result.runs for name, result in results.items()} == {"a": 6, "b": 6}
    assert all(result.p90_ms >= result.median_ms >= 0.0 for result in results.values())
