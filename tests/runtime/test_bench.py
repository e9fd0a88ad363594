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


def test_compare_stops_once_settled_but_not_before_min_rounds() -> None:
    seen: list[int] = []

    def settled(round_medians: object) -> bool:
        seen.append(len(round_medians["a"]))  # type: ignore[index]
        return True

    timed = bench.compare({"a": lambda: None}, rounds=10, round_seconds=0.0, min_runs=1, settled=settled, min_rounds=3)
    assert seen == [3] and len(timed["a"].round_medians_ms) == 3
    never = bench.compare({"a": lambda: None}, rounds=4, round_seconds=0.0, min_runs=1, settled=lambda _: False)
    assert len(never["a"].round_medians_ms) == 4


def test_default_is_settled_only_when_the_rounds_agree() -> None:
    from qcompile.flow.measure import _default_settled

    fp32 = [5.0] * 5
    # tvm beat onnxruntime in 5 of 5 rounds, both clearly faster than float: decided
    assert _default_settled({"onnxruntime-fp32": fp32, "onnxruntime": [3.0] * 5, "tvm": [2.0, 2.1, 2.0, 2.2, 2.0]})
    # one round in which onnxruntime was faster: 4 of 5 could be chance (p = 0.19)
    assert not _default_settled({"onnxruntime-fp32": fp32, "onnxruntime": [3.0] * 5, "tvm": [2.0, 2.1, 3.5, 2.0, 2.0]})
    # 8 of 9 is not (p = 0.02)
    nine = [2.0] * 8 + [3.5]
    assert _default_settled({"onnxruntime-fp32": [5.0] * 9, "onnxruntime": [3.0] * 9, "tvm": nine})
    # faster than float by 1.1x in some rounds, not in others: the float default is undecided
    assert not _default_settled({"onnxruntime-fp32": fp32, "onnxruntime": [4.0, 4.0, 4.8, 4.0, 4.9]})
    # never clearly faster: float stays the default, whichever quantized executor leads
    assert _default_settled({"onnxruntime-fp32": fp32, "onnxruntime": [4.9, 5.0, 4.8, 5.1, 4.7]})
