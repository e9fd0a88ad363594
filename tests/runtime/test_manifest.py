"""The typed manifest: a written manifest reads back equal, and a damaged one is refused with the field named."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from qcompile.errors import ArtifactError
from qcompile.runtime.artifact import MANIFEST
from qcompile.runtime.manifest import Executor, Manifest


@pytest.fixture
def written(artifact: Path) -> dict[str, Any]:
    return json.loads((artifact / MANIFEST).read_text())


def test_round_trip_is_exact(written: dict[str, Any]) -> None:
    manifest = Manifest.from_json(written)
    assert manifest.to_json() == written
    assert isinstance(manifest.executors["onnxruntime"], Executor)
    assert manifest.measured is not None and manifest.default_executor == manifest.measured.default_executor
    assert manifest.inputs[0].name == "image" and manifest.pass_entry("qdq") is not None


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda m: m.update(schema_version=0), "schema version 0 is not 1"),
        (lambda m: m.pop("executors"), "'executors' is missing"),
        (lambda m: m["executors"]["onnxruntime"].update(kind="npu"), "kind 'npu' is not one of"),
        (lambda m: m["executors"]["onnxruntime"].update(speed="fast"), "unknown field"),
        (lambda m: m.update(default_executor="gpu"), "default executor 'gpu' is not one of"),
        (lambda m: m["files"].update({"model.int8.onnx": "abc"}), "is not 64 hex digits"),
        (lambda m: m["inputs"][0].update(shape=["batch", 8]), "not an integer"),
        (lambda m: m["measured"].update(extra=1), "measured: unknown field"),
    ],
)
def test_damage_is_named(written: dict[str, Any], damage: Any, message: str) -> None:
    damaged = copy.deepcopy(written)
    damage(damaged)
    with pytest.raises(ArtifactError, match=message):
        Manifest.from_json(damaged)
