"""The bit-width search inside the pipeline: measure each candidate's sensitivity, price it with the
target's cost model, and allocate formats under the budgets (:mod:`qcompile.search.allocate`)."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from qcompile.calibration import Feed
from qcompile.errors import BudgetError
from qcompile.graph import layer_name
from qcompile.hwmodels import Target
from qcompile.hwmodels.cost import FLOAT, Choice, CostModel
from qcompile.hwmodels.layers import describe, layer_edges
from qcompile.passes.quant_spec import WEIGHT_FORMATS
from qcompile.search import sensitivity
from qcompile.search.allocate import (
    CANDIDATES,
    Allocation,
    LayerCosts,
    Problem,
    allocate,
    candidate_formats,
    pareto_front,
    uniform,
)
from qcompile.search.choices import quantized_choices

logger = logging.getLogger(__name__)


@dataclass
class SearchResult:
    chosen: Allocation
    front: list[Allocation]
    problem: Problem
    cost_model: str
    seconds: float
    # With an accuracy budget: each Pareto point measured, as (latency ms, error, accuracy drop in points).
    accuracy_checks: list[tuple[float, float, float]] = field(default_factory=list)
    # Candidates not measured because fp32 beats them on latency and no size budget is set.
    dominated: int = 0


def within_accuracy(
    result: SearchResult,
    latency_budget_ms: float | None,
    max_drop: float,
    drop_of: Callable[[Allocation], float],
    samples: int,
) -> Allocation:
    """The fastest Pareto point within the latency budget whose measured accuracy drop (``drop_of``, in
    percentage points) is at most ``max_drop``; :class:`BudgetError` when not even the most accurate one is.

    The points are ordered by predicted latency and bisected on the assumption that a slower point of the
    front (less total sensitivity) does not drop more: about log2 of the front's size models are built and
    measured, and the point returned is always one that was measured within the budget."""
    points = [point for point in result.front if latency_budget_ms is None or point.latency_ms <= latency_budget_ms]
    if not any(point.formats == result.chosen.formats for point in points):
        points.append(result.chosen)  # the least error within the budgets: the most accurate candidate
    points.sort(key=lambda point: (point.latency_ms, point.error))
    drops: dict[int, float] = {}

    def passes(index: int) -> bool:
        if index not in drops:
            drops[index] = drop_of(points[index])
            point = points[index]
            result.accuracy_checks.append((point.latency_ms, point.error, drops[index]))
            logger.info(
                "accuracy budget: %.3g ms predicted, %s -> drop %.2f pt",
                point.latency_ms,
                point.summary()["layers"],
                drops[index],
            )
        return drops[index] <= max_drop

    low, high = 0, len(points) - 1
    if not passes(high):
        best = points[high]
        within = f" within {latency_budget_ms:g} ms" if latency_budget_ms is not None else ""
        raise BudgetError(
            f"no bit-width allocation{within} keeps the accuracy drop within {max_drop:g} points on the "
            f"{samples} calibration samples held: the most accurate one ({best.latency_ms:.3g} ms predicted, "
            f"{best.size_mb:.3g} MB) drops {drops[high]:.2f} points"
        )
    while low < high:
        middle = (low + high) // 2
        if passes(middle):
            high = middle
        else:
            low = middle + 1
    return points[high]


def _build_as(build: Callable[[str, str], ir.Model], candidate: str, layer: str) -> ir.Model:
    return build(layer, candidate)


def candidate_choice(candidate: str) -> Choice:
    if candidate == "fp32":
        return FLOAT
    weights, activation_bits = candidate_formats(candidate)
    return Choice(weights, f"int{activation_bits}")


def fixed_costs(model: ir.Model, names: Sequence[str], cost: CostModel) -> tuple[float, float]:
    """Latency (ms) of every node that is not a searched layer, and bytes (MB) of the constants they hold."""
    searched = set(names)
    others = [spec for spec in describe(model) if spec.name not in searched]
    latency = cost.model_latency_ms(others, quantized_choices(model))
    layer_constants = {id(value) for node in model.graph if layer_name(node) in searched for value in node.inputs[1:]}
    size = sum(
        value.const_value.nbytes
        for value in model.graph.initializers.values()
        if value.const_value is not None and id(value) not in layer_constants
    )
    return latency, size / 1e6


def search(
    model: ir.Model,
    names: Sequence[str],
    op_types: Sequence[str],
    build: Callable[[str, str], ir.Model],
    feeds: Sequence[Feed],
    references: Sequence[np.ndarray],
    target: Target,
    latency_budget_ms: float | None,
    size_budget_mb: float | None,
    progress: bool = True,
    ratios: dict[str, dict[str, float]] | None = None,
) -> SearchResult:
    """``build(layer, format)`` returns ``model`` with only ``layer`` quantized in ``format``.

    Every layer's sensitivity is measured at int8. With ``ratios`` (layer -> weight format -> second-order
    weight error relative to int8's, :func:`qcompile.search.sensitivity.hessian_ratios`), a layer that has
    them gets those formats' sensitivities by scaling its int8 one instead of measuring them (int16
    activations are always measured: the ratio describes weights only).
    """
    started = time.perf_counter()
    ratios = ratios or {}
    cost = CostModel.for_target(target)
    specs = {spec.name: spec for spec in describe(model)}
    latency = {name: {c: cost.latency_us(specs[name], candidate_choice(c)) for c in CANDIDATES} for name in names}
    transitions = [
        (producer, consumer, cost.transition_us(elements)) for producer, consumer, elements in layer_edges(model, names)
    ]
    crossings = dict.fromkeys(names, 0.0)
    for producer, consumer, us in transitions:
        crossings[producer] += us
        crossings[consumer] += us
    # Not candidates: weight formats other than int8 for a layer without constant weights (the same model as
    # int8; uniform allocations read such a layer as int8). Not measured: with no size budget, a candidate
    # that fp32 (error 0) matches or beats on latency, even after every float/int8 crossing the layer can
    # add, is never in an optimal allocation (the uniform anchors int8 and int4 are always kept).
    dominated = {
        name: {
            c
            for c in CANDIDATES
            if c not in ("fp32", "int8", "int4") and latency[name][c] >= latency[name]["fp32"] + crossings[name]
        }
        if size_budget_mb is None
        else set()
        for name in names
    }
    narrow_weights = {c for c in CANDIDATES if c in WEIGHT_FORMATS and c != "int8"}
    skipped = {
        name: dominated[name] | (narrow_weights if specs[name].weight_elements == 0 else set()) for name in names
    }
    errors: dict[str, dict[str, float]] = {name: {"fp32": 0.0} for name in names}
    for candidate in CANDIDATES[1:]:
        pending = [(name, op) for name, op in zip(names, op_types, strict=True) if candidate not in skipped[name]]
        for name, _ in pending:
            if candidate in ratios.get(name, {}):
                errors[name][candidate] = errors[name]["int8"] * ratios[name][candidate]
        pending = [(name, op) for name, op in pending if candidate not in errors[name]]
        measured = sensitivity.measure(
            [name for name, _ in pending],
            [op for _, op in pending],
            functools.partial(_build_as, build, candidate),
            feeds,
            references,
            progress,
            reference=model,
        )
        for item in measured:
            errors[item.layer][candidate] = item.error
    slower = sum(len(found) for found in dominated.values())
    if slower:
        logger.info("bit-width search: %d candidates not measured: slower than fp32 with no size budget", slower)
    costs = [
        LayerCosts(
            name,
            errors[name],
            {candidate: latency[name][candidate] for candidate in errors[name]},
            {candidate: cost.size_bytes(specs[name], candidate_choice(candidate)) for candidate in errors[name]},
        )
        for name in names
    ]
    fixed_ms, fixed_mb = fixed_costs(model, names, cost)
    problem = Problem(costs, transitions, fixed_ms, fixed_mb)
    chosen = allocate(problem, latency_budget_ms, size_budget_mb)
    anchors = [uniform(problem, "int8"), uniform(problem, "int4")]
    front = pareto_front(problem, size_budget_mb=size_budget_mb, anchors=anchors)
    state = "calibrated" if cost.calibrated else "uncalibrated"
    seconds = time.perf_counter() - started
    logger.info("bit-width search: %s in %.1f s", chosen.summary(), seconds)
    return SearchResult(chosen, front, problem, f"{target.name} ({state})", seconds, dominated=slower)
