"""The plan and the resource / latency model of the table-lookup engine on an edge FPGA.

The engine (emitted as C++ by :mod:`qcompile.backends.lut.hls`) holds ``lanes`` lookup-and-add units,
arranged as ``group_parallel`` groups x ``lanes / group_parallel`` outputs. For one activation row and one
layer ``[K] @ [K, N]`` it walks the ``G = ceil(K / 5)`` groups of 5 activations ``group_parallel`` at a
time: builders write their 122 sign-folded partial sums into LUTRAM tables (``table_builders`` entries per
cycle, double-buffered so the next tables are built while these are read), and the lanes advance through
the packed weight bytes, one lookup and add each:

    cycles(layer, row) = ceil(G / Pg) * max(ceil(N / (lanes / Pg)), ceil(122 * Pg / table_builders))
                         + pipeline_depth

Weights (1.6 bits each) stay on chip when the whole model's packed weights fit the URAM + BRAM left after
the tables; otherwise each layer streams its weights from DDR once per step, and a step takes
``max(compute, weight bytes / (DDR bandwidth x efficiency))``. A decoder's tokens/s is one over the sum of
its layers' step times for one row (the linear layers only, plus, when given, an int8 LM head streamed
from DDR; attention over the KV cache, norms and the host's share are not modelled, so the figure is an
upper bound).

Resources: LUTs = lanes x luts_per_lane + table copies x luts_per_table_copy (one copy per
``lanes_per_table_copy`` lanes) + table_builders x luts_per_builder; FFs = lanes x ffs_per_lane;
BRAM/URAM = packed weights (when on chip) + the accumulators (N x int32 per layer in flight). Every
per-unit figure is an assumption stated in the target file; the device totals come from the device's
data sheet. Nothing here was synthesized.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from qcompile.errors import TargetError
from qcompile.hwmodels import Target
from qcompile.runtime.lut.pack import TRITS5_GROUP, TRITS5_TABLE

ENGINE_FIGURES = (
    "lanes",
    "group_parallel",
    "group",
    "table_builders",
    "luts_per_builder",
    "luts_per_lane",
    "ffs_per_lane",
    "lanes_per_table_copy",
    "luts_per_table_copy",
    "pipeline_depth",
    "dram_efficiency",
    "bram_kib",
    "uram_kib",
)

# Published figures the estimate is set beside (TeLLMe v2, arXiv:2510.15926, AMD KV260, 5 W budget).
TELLME_V2 = {
    "source": "TeLLMe v2 (Qiao et al., arXiv:2510.15926), measured on an AMD KV260",
    "decode_tokens_per_s": 25.0,
    "ttft_s_64_to_128_tokens": [0.45, 0.96],
    "power_w": 5.0,
    "weights": "BitNet b1.58 ternary weights, int8 activations",
}


@dataclass(frozen=True)
class LayerPlan:
    name: str
    k: int
    n: int
    rows: int
    groups: int
    table_entries: int
    lanes: int
    weight_bytes: int
    weights_on_chip: bool
    compute_cycles: int
    weight_stream_us: float
    latency_us: float


def engine_figures(target: Target) -> dict[str, float]:
    """The engine assumptions of ``target``'s file, or a clear error naming what is missing."""
    figures = target.device.extra.get("lut_engine")
    if not isinstance(figures, dict):
        raise TargetError(f"target '{target.name}' has no [device.lut_engine] table for the LUT engine plan")
    missing = [key for key in ENGINE_FIGURES if key not in figures]
    if missing:
        raise TargetError(f"target '{target.name}' [device.lut_engine] lacks {', '.join(missing)}")
    if int(figures["group"]) != TRITS5_GROUP:
        raise TargetError(f"target '{target.name}': the engine packs {TRITS5_GROUP} weights per lookup")
    return {key: float(figures[key]) for key in ENGINE_FIGURES}


def plan(layers: list[tuple[str, int, int, int]], target: Target) -> dict[str, Any]:
    """Plan ``layers`` (``(name, K, N, rows)``) on ``target``: per-layer cycles and placement, resources,
    and the end-to-end latency of one step (every layer once, for ``rows`` rows each)."""
    figures = engine_figures(target)
    device = target.device
    lanes = int(figures["lanes"])
    parallel = int(figures["group_parallel"])
    outputs_per_cycle = lanes // parallel
    clock_hz = device.clock_ghz * 1e9
    stream_bytes_per_s = device.memory_bandwidth_gbs * 1e9 * figures["dram_efficiency"]
    weight_bytes = [n * math.ceil(k / TRITS5_GROUP) for _, k, n, _ in layers]
    accumulator_bytes = max((n * 4 for _, _, n, _ in layers), default=0)
    on_chip_bytes = (figures["bram_kib"] + figures["uram_kib"]) * 1024 - accumulator_bytes
    on_chip = sum(weight_bytes) <= on_chip_bytes
    build_cycles = math.ceil(TRITS5_TABLE * parallel / figures["table_builders"])
    planned = []
    for (name, k, n, rows), size in zip(layers, weight_bytes, strict=True):
        groups = math.ceil(k / TRITS5_GROUP)
        steps = math.ceil(groups / parallel)
        cycles = rows * (steps * max(math.ceil(n / outputs_per_cycle), build_cycles) + int(figures["pipeline_depth"]))
        stream_us = 0.0 if on_chip else size / stream_bytes_per_s * 1e6
        planned.append(
            LayerPlan(
                name=name,
                k=k,
                n=n,
                rows=rows,
                groups=groups,
                table_entries=TRITS5_TABLE,
                lanes=lanes,
                weight_bytes=size,
                weights_on_chip=on_chip,
                compute_cycles=cycles,
                weight_stream_us=stream_us,
                latency_us=max(cycles / clock_hz * 1e6, stream_us),
            )
        )
    copies = math.ceil(lanes / figures["lanes_per_table_copy"])
    luts = (
        lanes * figures["luts_per_lane"]
        + copies * figures["luts_per_table_copy"]
        + figures["table_builders"] * figures["luts_per_builder"]
    )
    resources = {
        "luts": int(luts),
        "luts_available": int(device.extra.get("luts", 0)),
        "flip_flops": int(lanes * figures["ffs_per_lane"]),
        "flip_flops_available": int(device.extra.get("flip_flops", 0)),
        "on_chip_kib": round(((sum(weight_bytes) if on_chip else 0) + accumulator_bytes) / 1024, 1),
        "on_chip_kib_available": figures["bram_kib"] + figures["uram_kib"],
        "dsp_slices": 0,
    }
    if resources["luts_available"] and resources["luts"] > resources["luts_available"]:
        raise TargetError(
            f"the LUT engine with {lanes} lanes needs {resources['luts']} LUTs; {target.name} has "
            f"{resources['luts_available']}: lower lanes in [device.lut_engine]"
        )
    total_us = sum(layer.latency_us for layer in planned)
    return {
        "engine": {**figures, "clock_mhz": device.clock_ghz * 1e3, "table_build_cycles": build_cycles},
        "weights_on_chip": on_chip,
        "weight_bytes": sum(weight_bytes),
        "layers": [asdict(layer) for layer in planned],
        "resources": resources,
        "step_latency_us": total_us,
        "bound": "weight streaming (DDR)"
        if sum(layer.weight_stream_us for layer in planned)
        >= sum(layer.compute_cycles for layer in planned) / clock_hz * 1e6
        else "compute (lookups)",
        "estimate": "a model of the planned engine; no bitstream was synthesized or run",
    }


def decoder_estimate(
    layers: list[tuple[str, int, int]],
    target: Target,
    lm_head: tuple[int, int] | None = None,
    prompts: tuple[int, ...] = (64, 128),
) -> dict[str, Any]:
    """Tokens/s of a decoder whose linear layers are ``layers`` (``(name, K, N)``, one token = one row),
    with an optional int8 LM head ``(K, vocabulary)`` streamed from DDR, and the time to first token of
    ``prompts`` (every prompt token a row of one step, the LM head for the last one); an upper bound."""
    result = plan([(name, k, n, 1) for name, k, n in layers], target)
    head_us = 0.0
    if lm_head is not None:
        figures = engine_figures(target)
        head_bytes = lm_head[0] * lm_head[1]
        head_us = head_bytes / (target.device.memory_bandwidth_gbs * 1e9 * figures["dram_efficiency"]) * 1e6
    token_us = result["step_latency_us"] + head_us
    first_token_s = {
        str(length): (plan([(name, k, n, length) for name, k, n in layers], target)["step_latency_us"] + head_us) / 1e6
        for length in prompts
    }
    return {
        "linear_layers_us": result["step_latency_us"],
        "lm_head_int8_us": head_us,
        "token_latency_us": token_us,
        "tokens_per_s": 1e6 / token_us,
        "time_to_first_token_s": first_token_s,
        "weights_mib": result["weight_bytes"] / 2**20,
        "weights_on_chip": result["weights_on_chip"],
        "bound": result["bound"],
        "resources": result["resources"],
        "not_modelled": "attention over the KV cache, norms, sampling, host transfers: an upper bound",
        "reference": TELLME_V2,
    }
