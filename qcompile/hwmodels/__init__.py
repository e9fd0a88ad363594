"""Target descriptions (data files in ``targets/``) and the table mapping a target to its pipeline."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from qcompile.errors import TargetError

# One table: which compile pipeline each pipeline name in a target file means.
PIPELINES = {
    "w8a8": ("frontend", "calibrate", "sensitivity", "annotate", "bias_correction", "qdq", "onnxruntime", "tvm")
}


@dataclass(frozen=True)
class Target:
    """What a device can do, as read from its target file."""

    name: str
    description: str
    backend: str
    pipeline: str
    tvm_target: dict[str, Any]
    device: dict[str, Any] = field(default_factory=dict)


def available_targets() -> list[str]:
    folder = resources.files("qcompile.hwmodels").joinpath("targets")
    return sorted(entry.name.removesuffix(".toml") for entry in folder.iterdir() if entry.name.endswith(".toml"))


def load_target(name: str) -> Target:
    """The target called ``name``; an unknown name lists the valid ones."""
    valid = available_targets()
    if name not in valid:
        raise TargetError(f"unknown target '{name}'; valid targets: {', '.join(valid)}")
    text = resources.files("qcompile.hwmodels").joinpath("targets", f"{name}.toml").read_text()
    try:
        data = tomllib.loads(text)
        target = Target(
            name=data["name"],
            description=data["description"],
            backend=data["backend"],
            pipeline=data["pipeline"],
            tvm_target=dict(data["tvm_target"]),
            device=dict(data.get("device", {})),
        )
    except (tomllib.TOMLDecodeError, KeyError) as error:
        raise TargetError(f"target file for '{name}' is invalid: {error}") from error
    if target.pipeline not in PIPELINES:
        raise TargetError(f"target '{name}' names pipeline '{target.pipeline}'; known: {sorted(PIPELINES)}")
    return target
