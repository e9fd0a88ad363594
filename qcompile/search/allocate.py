"""Bit-width allocation: one format per layer, least total sensitivity under latency and size budgets.

Each layer ``l`` has candidates ``c`` (fp32; int8 activations with int8 / int4 / int2 / ternary weights; int8
weights with int16 activations),
each with a measured sensitivity ``e[l, c]`` (the output error when only that layer is quantized so), a
predicted latency ``t[l, c]`` and a size ``s[l, c]`` from the target's cost model. Where a float layer
feeds an int8 one or the reverse, the tensor between them changes representation at a cost ``t_uv``
(:meth:`qcompile.hwmodels.cost.CostModel.transition_us`); ``z_uv >= |f_u - f_v|`` with ``f_l = x[l, fp32]``
charges it. With binary ``x[l, c]``:

    minimise   sum e[l, c] x[l, c]
    subject to sum_c x[l, c] = 1                                            for every layer
               T_fixed + sum t[l, c] x[l, c] + sum t_uv z_uv <= latency budget
               S_fixed + sum s[l, c] x[l, c] <= size budget

solved exactly by HiGHS through :func:`scipy.optimize.milp`. Summing per-layer errors is the usual
additive approximation (errors of different layers are close to independent); the pipeline measures the
chosen model's real error afterwards. A Pareto front comes from solving at a sweep of latency budgets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from qcompile.errors import BudgetError

CANDIDATES = ("fp32", "int8", "w8a16", "int4", "int2", "ternary")
# Every candidate but these is a weight format read with int8 activations; these pair int8 weights with wider
# activations: (weight format, activation bits).
WIDE_ACTIVATIONS = {"w8a16": ("int8", 16)}


def candidate_formats(candidate: str) -> tuple[str, int]:
    """``(weight format, activation bits)`` of a non-float candidate."""
    return WIDE_ACTIVATIONS.get(candidate, (candidate, 8))


@dataclass(frozen=True)
class LayerCosts:
    """What each candidate format costs one layer: sensitivity, predicted latency (us), size (bytes)."""

    name: str
    error: dict[str, float]
    latency_us: dict[str, float]
    size_bytes: dict[str, float]


@dataclass(frozen=True)
class Problem:
    """The layers, their float/int8 transitions ``(producer, consumer, us)``, and the fixed costs."""

    layers: list[LayerCosts]
    transitions: list[tuple[str, str, float]] = field(default_factory=list)
    fixed_ms: float = 0.0
    fixed_mb: float = 0.0


@dataclass
class Allocation:
    formats: dict[str, str]
    error: float
    latency_ms: float
    size_mb: float
    per_layer_latency_us: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        counts = {candidate: sum(1 for f in self.formats.values() if f == candidate) for candidate in CANDIDATES}
        return {"error": self.error, "latency_ms": self.latency_ms, "size_mb": self.size_mb, "layers": counts}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate(problem: Problem, formats: dict[str, str]) -> Allocation:
    """The additive error, latency and size of ``formats``."""
    per_layer = {layer.name: layer.latency_us[formats[layer.name]] for layer in problem.layers}
    crossings = sum(
        cost
        for producer, consumer, cost in problem.transitions
        if (formats[producer] == "fp32") != (formats[consumer] == "fp32")
    )
    return Allocation(
        formats=formats,
        error=float(sum(layer.error[formats[layer.name]] for layer in problem.layers)),
        latency_ms=problem.fixed_ms + (sum(per_layer.values()) + crossings) / 1e3,
        size_mb=problem.fixed_mb + sum(layer.size_bytes[formats[layer.name]] for layer in problem.layers) / 1e6,
        per_layer_latency_us=per_layer,
    )


def uniform(problem: Problem, candidate: str) -> Allocation:
    """Every layer in ``candidate``; a layer that does not have it (a weight format for a layer without
    weights) in int8."""
    return evaluate(
        problem, {layer.name: candidate if candidate in layer.error else "int8" for layer in problem.layers}
    )


def _solve(
    problem: Problem,
    objective: str,
    latency_budget_ms: float | None,
    size_budget_mb: float | None,
    error_budget: float | None = None,
) -> Allocation | None:
    # scipy.optimize is imported here: it loads HiGHS and takes about 0.6 s, which only a bit search needs
    import scipy.optimize
    import scipy.sparse

    layers = problem.layers
    names = [(index, candidate) for index, layer in enumerate(layers) for candidate in layer.error]
    position = {(layers[index].name, candidate): column for column, (index, candidate) in enumerate(names)}
    count, extra = len(names), len(problem.transitions)
    latency = np.array(
        [layers[index].latency_us[candidate] / 1e3 for index, candidate in names]
        + [cost / 1e3 for _, _, cost in problem.transitions]
    )
    size = np.array([layers[index].size_bytes[candidate] / 1e6 for index, candidate in names] + [0.0] * extra)
    error = np.array([layers[index].error[candidate] for index, candidate in names] + [0.0] * extra)
    cost = {"error": error, "latency": latency, "size": size}[objective]
    rows, columns = zip(*((index, column) for column, (index, _) in enumerate(names)), strict=True)
    one_each = scipy.sparse.csr_array((np.ones(count), (rows, columns)), shape=(len(layers), count + extra))
    constraints = [scipy.optimize.LinearConstraint(one_each, 1, 1)]
    if extra:  # z_uv >= f_u - f_v and z_uv >= f_v - f_u
        link = scipy.sparse.lil_array((2 * extra, count + extra))
        for edge, (producer, consumer, _) in enumerate(problem.transitions):
            u, v = position[(producer, "fp32")], position[(consumer, "fp32")]
            link[2 * edge, [count + edge, u, v]] = [1, -1, 1]
            link[2 * edge + 1, [count + edge, u, v]] = [1, 1, -1]
        constraints.append(scipy.optimize.LinearConstraint(link.tocsr(), 0, np.inf))
    if latency_budget_ms is not None:
        constraints.append(
            scipy.optimize.LinearConstraint(latency[None], -np.inf, latency_budget_ms - problem.fixed_ms)
        )
    if size_budget_mb is not None:
        constraints.append(scipy.optimize.LinearConstraint(size[None], -np.inf, size_budget_mb - problem.fixed_mb))
    if error_budget is not None:
        constraints.append(scipy.optimize.LinearConstraint(error[None], -np.inf, error_budget))
    integrality = np.concatenate([np.ones(count), np.zeros(extra)])
    result = scipy.optimize.milp(
        cost, constraints=constraints, integrality=integrality, bounds=scipy.optimize.Bounds(0, 1)
    )
    if result.status != 0 or result.x is None:
        return None
    chosen = np.round(result.x[:count]).astype(bool)
    formats = {layers[index].name: candidate for (index, candidate), taken in zip(names, chosen, strict=True) if taken}
    return evaluate(problem, formats)


def fastest(problem: Problem) -> Allocation:
    found = _solve(problem, "latency", None, None)
    assert found is not None  # unconstrained: always feasible
    return found


def smallest(problem: Problem) -> Allocation:
    found = _solve(problem, "size", None, None)
    assert found is not None
    return found


def allocate(
    problem: Problem, latency_budget_ms: float | None = None, size_budget_mb: float | None = None
) -> Allocation:
    """The least-error allocation within the budgets; :class:`BudgetError` when none exists."""
    found = _solve(problem, "error", latency_budget_ms, size_budget_mb)
    if found is None:
        quick, small = fastest(problem), smallest(problem)
        asked = " and ".join(
            text
            for text in (
                f"latency <= {latency_budget_ms:g} ms" if latency_budget_ms is not None else "",
                f"size <= {size_budget_mb:g} MB" if size_budget_mb is not None else "",
            )
            if text
        )
        raise BudgetError(
            f"no bit-width allocation meets {asked}: the fastest reachable configuration takes "
            f"{quick.latency_ms:.3g} ms ({quick.size_mb:.3g} MB), the smallest is {small.size_mb:.3g} MB "
            f"({small.latency_ms:.3g} ms)"
        )
    return found


def pareto_front(
    problem: Problem, points: int = 12, size_budget_mb: float | None = None, anchors: Sequence[Allocation] = ()
) -> list[Allocation]:
    """Least-error allocations at ``points`` latency budgets from the fastest configuration to the slowest
    useful one (every layer float), plus, for each of ``anchors`` (say uniform int8), the least error at
    its latency and the least latency at its error; dominated and repeated points dropped."""
    low = fastest(problem).latency_ms
    high = max(uniform(problem, "fp32").latency_ms, low)
    found = [
        _solve(problem, "error", float(budget) * (1 + 1e-9), size_budget_mb)
        for budget in np.linspace(low, high, points)
    ]
    for anchor in anchors:
        found.append(_solve(problem, "error", anchor.latency_ms * (1 + 1e-9), size_budget_mb))
        found.append(_solve(problem, "latency", None, size_budget_mb, error_budget=anchor.error * (1 + 1e-9)))
    front: list[Allocation] = []
    for point in found:
        if point is not None and not any(other.formats == point.formats for other in front):
            front.append(point)
    front.sort(key=lambda point: point.latency_ms)
    return [
        point
        for point in front
        if not any(
            (other.latency_ms <= point.latency_ms and other.error < point.error)
            or (other.latency_ms < point.latency_ms and other.error <= point.error)
            for other in front
            if other is not point
        )
    ]
