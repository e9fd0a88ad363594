"""The bit-width search's HTML report, written beside the artifact: the Pareto front, the chosen point,
and per-layer formats and predicted latency, as inline SVG (no plotting library, nothing fetched)."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

COLOURS = {
    "fp32": "#7f7f7f",
    "int8": "#1f77b4",
    "w8a16": "#2ca02c",
    "int4": "#ff7f0e",
    "int2": "#9467bd",
    "ternary": "#d62728",
}


def _label(layer: Any) -> str:
    """The search candidate a layer record stands for (int8 weights read at 16 bits: 'w8a16')."""
    if layer.weight_format == "int8" and layer.activation_bits == 16:
        return "w8a16"
    return str(layer.weight_format or "fp32")


WIDTH, HEIGHT, MARGIN = 640, 320, 56


def _scale(values: Sequence[float], low_pixel: float, high_pixel: float, log: bool = False) -> Any:
    data = [math.log10(v) if log else v for v in values]
    low, high = min(data), max(data)
    span = (high - low) or 1.0

    def place(value: float) -> float:
        value = math.log10(value) if log else value
        return low_pixel + (value - low) / span * (high_pixel - low_pixel)

    return place


def pareto_svg(
    front: list[dict[str, Any]],
    chosen: dict[str, Any],
    others: dict[str, dict[str, Any]] | None = None,
    error_label: str = "sum of layer errors (log)",
) -> str:
    """The front as a line of dots (latency against error, log scale, a decade tick each; an error of 0,
    fp32's, drawn on the floor a decade below the least other), ``chosen`` ringed, and ``others`` (labelled
    reference points such as uniform allocations) as labelled squares."""
    others = others or {}
    points = [*front, chosen, *others.values()]
    positive = [point["error"] for point in points if point["error"] > 0]
    floor = min(positive) / 10 if positive else 1e-9

    def err(point: dict[str, Any]) -> float:
        return max(point["error"], floor)

    top = 28
    x = _scale([point["latency_ms"] for point in points], MARGIN + 8, WIDTH - 80)
    y = _scale([err(point) for point in points], HEIGHT - MARGIN, top, log=True)
    dots = "".join(
        f'<circle cx="{x(p["latency_ms"]):.1f}" cy="{y(err(p)):.1f}" r="4" fill="#1f77b4">'
        f"<title>{p['latency_ms']:.3f} ms, error {p['error']:.3g}, {html.escape(str(p['layers']))}</title></circle>"
        for p in front
    )
    path = " ".join(f"{'M' if i == 0 else 'L'}{x(p['latency_ms']):.1f},{y(err(p)):.1f}" for i, p in enumerate(front))
    mark = (
        f'<circle cx="{x(chosen["latency_ms"]):.1f}" cy="{y(err(chosen)):.1f}" r="7" fill="none" '
        'stroke="#d62728" stroke-width="2"><title>chosen</title></circle>'
    )
    for label, point in others.items():
        px, py = x(point["latency_ms"]), y(err(point))
        mark += (
            f'<rect x="{px - 5:.1f}" y="{py - 5:.1f}" width="10" height="10" fill="#ff7f0e"><title>'
            f"{html.escape(label)}: {point['latency_ms']:.3f} ms, error {point['error']:.3g}</title></rect>"
            f'<text x="{px + 8:.1f}" y="{py + 4:.1f}" font-size="11">{html.escape(label)}</text>'
        )
    axes = (
        f'<line x1="{MARGIN}" y1="{HEIGHT - MARGIN}" x2="{WIDTH - 16}" y2="{HEIGHT - MARGIN}" stroke="black"/>'
        f'<line x1="{MARGIN}" y1="16" x2="{MARGIN}" y2="{HEIGHT - MARGIN}" stroke="black"/>'
        f'<text x="{WIDTH / 2}" y="{HEIGHT - 16}" text-anchor="middle">predicted latency (ms)</text>'
        f'<text x="12" y="{HEIGHT / 2}" transform="rotate(-90 12 {HEIGHT / 2})" text-anchor="middle">'
        f"{html.escape(error_label)}</text>"
    )
    ticks = "".join(
        f'<text x="{x(v):.1f}" y="{HEIGHT - MARGIN + 16}" text-anchor="middle" font-size="11">{v:.2f}</text>'
        for v in sorted({round(p["latency_ms"], 2) for p in points})[:: max(1, len(points) // 6)]
    )
    low, high = math.ceil(math.log10(min(map(err, points)))), math.floor(math.log10(max(map(err, points))))
    ticks += "".join(
        f'<text x="{MARGIN - 4}" y="{y(10.0**d) + 4:.1f}" text-anchor="end" font-size="11">1e{d}</text>'
        for d in range(low, high + 1)
    )
    return (
        f'<svg width="{WIDTH}" height="{HEIGHT}" xmlns="http://www.w3.org/2000/svg" font-family="sans-serif">'
        f'{axes}{ticks}<path d="{path}" fill="none" stroke="#1f77b4"/>{dots}{mark}</svg>'
    )


def layers_svg(layers: list[Any]) -> str:
    """One bar per layer: height = predicted latency, colour = format."""
    values = [layer.predicted_latency_us or 0.0 for layer in layers]
    top = max([*values, 1e-9])
    width = max(4.0, (WIDTH - 2 * MARGIN) / max(len(layers), 1))
    bars = "".join(
        f'<rect x="{MARGIN + i * width:.1f}" y="{HEIGHT - MARGIN - v / top * (HEIGHT - MARGIN - 16):.1f}" '
        f'width="{width * 0.9:.1f}" height="{v / top * (HEIGHT - MARGIN - 16):.1f}" '
        f'fill="{COLOURS.get(_label(layer), "#000")}"><title>{html.escape(layer.name)}: '
        f"{_label(layer)}, {v:.1f} us</title></rect>"
        for i, (layer, v) in enumerate(zip(layers, values, strict=True))
    )
    legend = "".join(
        f'<rect x="{MARGIN + 90 * i}" y="{HEIGHT - 30}" width="10" height="10" fill="{colour}"/>'
        f'<text x="{MARGIN + 90 * i + 14}" y="{HEIGHT - 21}" font-size="11">{name}</text>'
        for i, (name, colour) in enumerate(COLOURS.items())
    )
    return (
        f'<svg width="{WIDTH}" height="{HEIGHT}" xmlns="http://www.w3.org/2000/svg" font-family="sans-serif">'
        f'{bars}{legend}<text x="{MARGIN}" y="12" font-size="11">predicted latency per layer, max {top:.0f} us'
        "</text></svg>"
    )


def render(model: str, target: str, search: dict[str, Any], layers: list[Any]) -> str:
    chosen = search["predicted"]
    rows = "".join(
        f"<tr><td>{html.escape(layer.name)}</td><td>{layer.op_type}</td><td>{_label(layer)}</td>"
        f"<td>{(layer.predicted_latency_us or 0):.1f}</td><td>{(layer.sensitivity or 0):.2e}</td></tr>"
        for layer in layers
    )
    front_rows = "".join(
        f"<tr><td>{p['latency_ms']:.3f}</td><td>{p['size_mb']:.2f}</td><td>{p['error']:.3g}</td>"
        f"<td>{html.escape(str(p['layers']))}</td></tr>"
        for p in search["pareto_front"]
    )
    budgets = ", ".join(
        f"{name} {value:g}"
        for name, value in (
            ("latency <= ms", search["latency_budget_ms"]),
            ("size <= MB", search["size_budget_mb"]),
            ("accuracy drop <= points", search.get("max_accuracy_drop")),
        )
        if value is not None
    )
    checks = search.get("accuracy_checks") or []
    accuracy = (
        "<h2>Accuracy budget</h2><p>Pareto points measured (round-to-nearest weights, on the calibration samples "
        "held in memory), fastest first; the chosen one is the fastest within the budget.</p>"
        "<table><tr><th>latency ms</th><th>sum of errors</th><th>accuracy drop (points)</th><th>samples</th></tr>"
        + "".join(
            f"<tr><td>{c['latency_ms']:.3f}</td><td>{c['error']:.3g}</td><td>{c['accuracy_drop']:.2f}</td>"
            f"<td>{c['samples']}</td></tr>"
            for c in sorted(checks, key=lambda c: c["latency_ms"])
        )
        + "</table>"
        if checks
        else ""
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>qcompile bit-width search: {html.escape(model)}</title>
<style>body{{font-family:sans-serif;max-width:980px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}td:first-child{{text-align:left}}</style></head>
<body><h1>Bit-width search: {html.escape(model)} for {html.escape(target)}</h1>
<p>Budgets: {html.escape(budgets)}. Cost model: {html.escape(search["cost_model"])}. Chosen: predicted
{chosen["latency_ms"]:.3f} ms, {chosen["size_mb"]:.2f} MB, sum of layer errors {chosen["error"]:.3g},
layers {html.escape(str(chosen["layers"]))}. Search took {search["seconds"]:.1f} s.</p>
<h2>Pareto front</h2>{pareto_svg(search["pareto_front"], chosen)}
<table><tr><th>latency ms</th><th>size MB</th><th>sum of errors</th><th>layers</th></tr>{front_rows}</table>
{accuracy}<h2>Per layer</h2>{layers_svg(layers)}
<table><tr><th>layer</th><th>op</th><th>format</th><th>predicted us</th><th>error alone</th></tr>{rows}</table>
</body></html>
"""
