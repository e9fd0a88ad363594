"""Latency measurement: warm-up runs, then timed runs; median and p90 in milliseconds."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Latency:
    median_ms: float
    p90_ms: float
    runs: int
    # The median of each round of :func:`compare` (its rounds run the callables in turn): what
    # :func:`speedup` pairs. Not written to manifests.
    round_medians_ms: tuple[float, ...] = field(default=(), compare=False)

    def as_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if key != "round_medians_ms"}


def speedup(baseline: Latency, other: Latency) -> float:
    """How many times faster ``other`` runs than ``baseline``: the median, over the rounds of one
    :func:`compare`, of each round's ``baseline / other`` (the two ran back to back in it), else the ratio of
    medians. Pairing rounds matters for sub-millisecond models on few cores: their times move together by
    tens of percent from one moment to the next (onnxruntime's thread pool, frequency), which a ratio of
    overall medians mixes in; measured on a 0.1 ms model, five ratios of medians spread over 0.62..1.06 where
    the paired median stayed within 0.78..0.96."""
    if baseline.round_medians_ms and len(baseline.round_medians_ms) == len(other.round_medians_ms):
        pairs = np.array(baseline.round_medians_ms) / np.array(other.round_medians_ms)
        return float(np.median(pairs))
    return baseline.median_ms / other.median_ms


def measure(run: Callable[[], object], runs: int = 50, warmup: int = 5, max_seconds: float = 10.0) -> Latency:
    """Time ``run``; stops early (after at least 3 timed runs) once ``max_seconds`` have passed."""
    for _ in range(warmup):
        run()
    timings: list[float] = []
    deadline = time.perf_counter() + max_seconds
    while len(timings) < runs and (len(timings) < 3 or time.perf_counter() < deadline):
        started = time.perf_counter()
        run()
        timings.append((time.perf_counter() - started) * 1e3)
    values = np.array(timings)
    return Latency(float(np.median(values)), float(np.percentile(values, 90)), len(timings))


def compare(
    runs: Mapping[str, Callable[[], object]],
    rounds: int = 5,
    round_seconds: float = 0.05,
    min_runs: int = 10,
    pause_seconds: float = 0.0,
    settled: Callable[[Mapping[str, Sequence[float]]], bool] | None = None,
    min_rounds: int = 5,
) -> dict[str, Latency]:
    """Time several callables in interleaved rounds (a, b, a, b, ...), so that drift (warming caches, clock
    changes, other load) falls on each alike; a round times each for ``min_runs`` runs or ``round_seconds``,
    whichever is longer, so microsecond-scale models get thousands of runs. Medians over every run.

    ``pause_seconds`` sleeps before each callable's round and then runs it untimed a few times: runtimes with
    their own thread pools (onnxruntime, TVM) keep their workers spinning for a while after a run, and on a
    machine with few cores those workers would otherwise take the next runtime's cores.

    ``settled``, given each callable's round medians so far, may end the rounds early, after ``min_rounds``:
    when what the timing is for is already decided by every round alike."""
    timings: dict[str, list[float]] = {name: [] for name in runs}
    round_medians: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()  # a first run (allocations, lazy initialization) is never timed
    for done in range(1, rounds + 1):
        for name, run in runs.items():
            if pause_seconds:
                time.sleep(pause_seconds)
                for _ in range(3):
                    run()
            deadline = time.perf_counter() + round_seconds
            this_round: list[float] = []
            while len(this_round) < min_runs or time.perf_counter() < deadline:
                started = time.perf_counter()
                run()
                this_round.append((time.perf_counter() - started) * 1e3)
            timings[name] += this_round
            round_medians[name].append(float(np.median(this_round)))
        if settled is not None and done >= min_rounds and done < rounds and settled(round_medians):
            break
    return {
        name: Latency(
            float(np.median(values)), float(np.percentile(values, 90)), len(values), tuple(round_medians[name])
        )
        for name, values in timings.items()
    }


def machine() -> dict[str, Any]:
    """What the measurements ran on: CPU model, core count, OS."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "system": platform.system(), "machine": platform.machine()}
