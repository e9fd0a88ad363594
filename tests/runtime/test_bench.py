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


def test_speedup_pairs_the_rounds_that_ran_back_to_back() -> None:
    """Each round's ratio counts once: a slow moment that hit both callables cancels out."""
    baseline = bench.Latency(2.0, 4.0, 40, (1.0, 1.0, 4.0, 4.0, 4.0))
    other = bench.Latency(1.5, 4.0, 40, (0.5, 0.5, 5.0, 5.0, 5.0))
    assert bench.speedup(baseline, other) == 0.8  # faster in two rounds, slower in three
    assert bench.speedup(bench.Latency(2.0, 4.0, 40), bench.Latency(1.0, 2.0, 40)) == 2.0  # no rounds: the medians
    timed = bench.compare({"a": lambda: None, "b": lambda: None}, rounds=4, round_seconds=0.0, min_runs=3)
    assert len(timed["a"].round_medians_ms) == len(timed["b"].round_medians_ms) == 4
    assert "round_medians_ms" not in timed["a"].as_dict()
