"""The bit-width search inside the pipeline: measure each candidate's sensitivity, price it with the
target's cost model, and allocate formats under the budgets (:mod:`qcompile.search.allocate`)."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompile.calibration import Feed
from qcompile.hwmodels import Target
from qcompile.hwmodels.cost import FLOAT, Choice, CostModel
from qcompile.hwmodels.layers import describe, layer_edges
from qcompile.hwmodels.profile import quantized_choices
from qcompile.passes.annotate import layer_name
from qcompile.search import sensitivity
from qcompile.search.allocate import (
    CANDIDATES,
    Allocation,
    LayerCosts,
    Problem,
    allocate,
    pareto_front,
    uniform,
)

logger = logging.getLogger(__name__)


@dataclass
class SearchResult:
    chosen: Allocation
    front: list[Allocation]
    problem: Problem
    cost_model: str
    seconds: float


def _build_as(build: Callable[[str, str], ir.Model], candidate: str, layer: str) -> ir.Model:
    return build(layer, candidate)


def candidate_choice(candidate: str) -> Choice:
    return FLOAT if candidate == "fp32" else Choice(candidate, "int8")


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

    Every layer's sensitivity is measured at int8. With ``ratios`` (layer -> format -> second-order weight
    error relative to int8's, :func:`qcompile.search.sensitivity.hessian_ratios`), a layer that has them
    gets its other formats' sensitivities by scaling its int8 one instead of measuring them.
    """
    started = time.perf_counter()
    ratios = ratios or {}
    errors: dict[str, dict[str, float]] = {name: {"fp32": 0.0} for name in names}
    for candidate in CANDIDATES[1:]:
        pending = [(name, op) for name, op in zip(names, op_types, strict=True) if candidate not in errors[name]]
        if candidate != "int8":
            for name, _ in pending:
                if name in ratios:
                    errors[name][candidate] = errors[name]["int8"] * ratios[name][candidate]
            pending = [(name, op) for name, op in pending if name not in ratios]
        measured = sensitivity.measure(
            [name for name, _ in pending],
            [op for _, op in pending],
            functools.partial(_build_as, build, candidate),
            feeds,
            references,
            progress,
        )
        for item in measured:
            errors[item.layer][candidate] = item.error
    cost = CostModel.for_target(target)
    specs = {spec.name: spec for spec in describe(model)}
    costs = [
        LayerCosts(
            name,
            errors[name],
            {candidate: cost.latency_us(specs[name], candidate_choice(candidate)) for candidate in CANDIDATES},
            {candidate: cost.size_bytes(specs[name], candidate_choice(candidate)) for candidate in CANDIDATES},
        )
        for name in names
    ]
    fixed_ms, fixed_mb = fixed_costs(model, names, cost)
    transitions = [
        (producer, consumer, cost.transition_us(elements)) for producer, consumer, elements in layer_edges(model, names)
    ]
    problem = Problem(costs, transitions, fixed_ms, fixed_mb)
    chosen = allocate(problem, latency_budget_ms, size_budget_mb)
    anchors = [uniform(problem, "int8"), uniform(problem, "int4")]
    front = pareto_front(problem, size_budget_mb=size_budget_mb, anchors=anchors)
    state = "calibrated" if cost.calibrated else "uncalibrated"
    seconds = time.perf_counter() - started
    logger.info("bit-width search: %s in %.1f s", chosen.summary(), seconds)
    return SearchResult(chosen, front, problem, f"{target.name} ({state})", seconds)
