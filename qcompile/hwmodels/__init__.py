"""Target descriptions (data files in ``targets/``) and the latency / size cost model built on them
(:mod:`qcompile.hwmodels.cost`). What each pipeline runs is :data:`qcompile.flow.compile.PIPELINES`."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from qcompile.errors import TargetError

# The pipelines a target file may name (the stages of each: qcompile.flow.compile.PIPELINES).
PIPELINES = ("w8a8", "w8a8-cross", "w8a8-cuda", "integer-only", "lut")

DTYPES = ("fp32", "fp16", "int16", "int8", "ternary")
_DEVICE_FIGURES = (
    "cores",
    "clock_ghz",
    "memory_bandwidth_gbs",
    "onchip_bandwidth_gbs",
    "onchip_memory_kib",
    "op_overhead_us",
)


@dataclass(frozen=True)
class Device:
    """The figures the cost model needs; each target file states the source of each."""

    cores: int
    clock_ghz: float
    memory_bandwidth_gbs: float
    onchip_bandwidth_gbs: float
    onchip_memory_kib: float
    op_overhead_us: float
    macs_per_cycle: dict[str, float]
    dtypes: tuple[str, ...]
    vector_bits: int = 0
    cache_kib: float = 0.0
    cache_bandwidth_gbs: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def memory_levels(self) -> list[tuple[float, float]]:
        """``(capacity bytes, bandwidth bytes/s)`` from the innermost level (an optional inner cache) out to
        off-chip memory (unbounded)."""
        levels = [(self.cache_kib * 1024, self.cache_bandwidth_gbs * 1e9)] if self.cache_kib else []
        levels.append((self.onchip_memory_kib * 1024, self.onchip_bandwidth_gbs * 1e9))
        levels.append((float("inf"), self.memory_bandwidth_gbs * 1e9))
        return levels

    def peak_macs_per_second(self, dtype: str) -> float:
        return self.macs_per_cycle[dtype] * self.cores * self.clock_ghz * 1e9


@dataclass(frozen=True)
class Target:
    """What a device can do, as read from its target file."""

    name: str
    description: str
    backend: str
    pipeline: str
    tvm_target: dict[str, Any]
    device: Device
    # The graph rewrites the target uses when the command line does not say: smoothquant (off, an alpha or
    # 'auto'), rotate ('none', 'hadamard', 'hadamard-residual' or 'auto': hadamard for sequence models, whose
    # linear layers read many rows), split_layers (true / false).
    recipe: dict[str, Any] = field(default_factory=dict)


def available_targets() -> list[str]:
    folder = resources.files("qcompile.hwmodels").joinpath("targets")
    return sorted(entry.name.removesuffix(".toml") for entry in folder.iterdir() if entry.name.endswith(".toml"))


def _device(name: str, data: dict[str, Any]) -> Device:
    missing = [key for key in (*_DEVICE_FIGURES, "macs_per_cycle", "dtypes") if key not in data]
    if missing:
        raise TargetError(f"target file for '{name}' lacks device figures: {', '.join(missing)}")
    macs = {str(key): float(value) for key, value in data["macs_per_cycle"].items()}
    unknown = sorted(set(macs) - set(DTYPES))
    if unknown:
        raise TargetError(f"target '{name}' gives MACs per cycle for unknown dtypes {unknown}; known: {DTYPES}")
    if any(value <= 0 for value in macs.values()) or any(float(data[key]) <= 0 for key in _DEVICE_FIGURES[:5]):
        raise TargetError(f"target '{name}' has a device figure <= 0")
    known = {*_DEVICE_FIGURES, "macs_per_cycle", "dtypes", "vector_bits", "cache_kib", "cache_bandwidth_gbs"}
    return Device(
        cores=int(data["cores"]),
        clock_ghz=float(data["clock_ghz"]),
        memory_bandwidth_gbs=float(data["memory_bandwidth_gbs"]),
        onchip_bandwidth_gbs=float(data["onchip_bandwidth_gbs"]),
        onchip_memory_kib=float(data["onchip_memory_kib"]),
        op_overhead_us=float(data["op_overhead_us"]),
        macs_per_cycle=macs,
        dtypes=tuple(data["dtypes"]),
        vector_bits=int(data.get("vector_bits", 0)),
        cache_kib=float(data.get("cache_kib", 0.0)),
        cache_bandwidth_gbs=float(data.get("cache_bandwidth_gbs", 0.0)),
        extra={key: value for key, value in data.items() if key not in known},
    )


RECIPE_DEFAULTS: dict[str, Any] = {"smoothquant": "off", "rotate": "none", "split_layers": False}


def _recipe(name: str, data: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(data) - set(RECIPE_DEFAULTS))
    if unknown:
        raise TargetError(f"target '{name}' has unknown recipe entries {unknown}; known: {sorted(RECIPE_DEFAULTS)}")
    recipe = {**RECIPE_DEFAULTS, **data}
    alpha = recipe["smoothquant"]
    if not (alpha in ("off", "auto") or (isinstance(alpha, float | int) and 0 <= alpha <= 1)):
        raise TargetError(f"target '{name}': recipe smoothquant must be 'off', 'auto' or an alpha in [0, 1]")
    if recipe["rotate"] not in ("none", "hadamard", "hadamard-residual", "auto") or not isinstance(
        recipe["split_layers"], bool
    ):
        raise TargetError(
            f"target '{name}': recipe rotate must be 'none', 'hadamard', 'hadamard-residual' or 'auto', "
            "split_layers true/false"
        )
    return recipe


def load_target(name: str) -> Target:
    """The target called ``name``, or the target file at the path ``name`` (ending in .toml, in the format
    of the files in ``targets/``: a board of your own); an unknown name lists the valid ones."""
    if name.endswith(".toml"):
        try:
            text = Path(name).read_text()
        except OSError as error:
            raise TargetError(f"cannot read target file {name}: {error.strerror}") from error
    else:
        valid = available_targets()
        if name not in valid:
            raise TargetError(
                f"unknown target '{name}'; valid targets: {', '.join(valid)} (or the path of a .toml target file)"
            )
        text = resources.files("qcompile.hwmodels").joinpath("targets", f"{name}.toml").read_text()
    try:
        data = tomllib.loads(text)
        target = Target(
            name=data["name"],
            description=data["description"],
            backend=data["backend"],
            pipeline=data["pipeline"],
            tvm_target=dict(data["tvm_target"]),
            device=_device(name, dict(data["device"])),
            recipe=_recipe(name, dict(data.get("recipe", {}))),
        )
    except (tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as error:
        raise TargetError(f"target file for '{name}' is invalid: {error}") from error
    if target.pipeline not in PIPELINES:
        raise TargetError(f"target '{name}' names pipeline '{target.pipeline}'; known: {sorted(PIPELINES)}")
    return target
