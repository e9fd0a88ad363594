"""Load, run and benchmark qcompile artifacts.

``load(path)`` verifies every file of the artifact against the sha256 in its manifest before it loads
any model or library, then returns a :class:`Session` on the manifest's default executor (or the one
asked for).
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from qcompile.errors import ArtifactError
from qcompile.runtime.artifact import verify
from qcompile.runtime.manifest import Manifest, TensorInfo


class Session:
    """A loaded artifact: ``run(feeds)`` returns ``{output name: array}``."""

    def __init__(self, folder: Path, manifest: Manifest, executor: str) -> None:
        self.folder = folder
        self.manifest = manifest
        self.executor = executor
        self.inputs = list(manifest.inputs)
        self.outputs = list(manifest.outputs)
        entry = manifest.executors.get(executor)
        if entry is None:
            raise ArtifactError(f"{folder}: no executor '{executor}'; it has {sorted(manifest.executors)}")
        path = folder / entry.file
        if not self.runnable_here(executor):
            raise ArtifactError(
                f"{folder}: executor '{executor}' is built for {entry.arch}, not for this {platform.machine()} "
                f"machine; run it on the device (its runner is {entry.runner or 'not bundled'}), or here "
                "with `qcompile verify --emulate`"
            )
        if entry.kind == "onnxruntime":
            from qcompile.runtime.executors import session_from_path

            session = session_from_path(path)
            self._run = lambda feeds: session.run(None, feeds)
        elif entry.kind == "tvm":
            from qcompile.runtime.executors import TVMExecutor

            # requires_cpu: a library tuned for one CPU model (the integer kernels) runs only on that model
            self._run = TVMExecutor(path, [info.name for info in self.inputs], entry.requires_cpu).run
        else:  # "lut": Manifest.from_json admits no other kind
            from qcompile.runtime.lut import LutExecutor

            self._run = LutExecutor(folder, entry).run

    def runnable_here(self, executor: str) -> bool:
        """Whether ``executor`` can run on this machine (a cross-compiled library cannot)."""
        arch = self.manifest.executors[executor].arch
        return arch is None or arch == platform.machine()

    def with_executor(self, executor: str) -> Session:
        """The same artifact, already verified, on another executor."""
        return Session(self.folder, self.manifest, executor)

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        checked = {}
        for info in self.inputs:
            if info.name not in feeds:
                raise ArtifactError(f"input '{info.name}' is missing from the feeds (given: {sorted(feeds)})")
            array = np.asarray(feeds[info.name])
            if tuple(array.shape) != info.shape:
                raise ArtifactError(
                    f"input '{info.name}' has shape {tuple(array.shape)}; the artifact expects {info.shape}"
                )
            checked[info.name] = np.require(array.astype(info.dtype, copy=False), requirements="C")
        return checked

    def random_feeds(self, seed: int = 0) -> dict[str, np.ndarray]:
        """Inputs of the right shapes and dtypes (normal floats, ones for integers), for timing."""
        rng = np.random.default_rng(seed)
        return {
            info.name: (
                rng.standard_normal(info.shape) if np.dtype(info.dtype).kind == "f" else np.ones(info.shape)
            ).astype(info.dtype)
            for info in self.inputs
        }

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self._run(self.check_feeds(feeds))
        return {info.name: np.asarray(value) for info, value in zip(self.outputs, results, strict=True)}


def load(path: str | Path, executor: str | None = None) -> Session:
    """Verify the artifact at ``path`` and load it on ``executor`` (default: the manifest's choice)."""
    folder = Path(path)
    manifest = verify(folder)
    chosen = executor or manifest.default_executor
    if chosen is None:
        raise ArtifactError(f"{folder}: the manifest names no default executor; name one, or recompile")
    return Session(folder, manifest, chosen)


__all__ = ["Manifest", "Session", "TensorInfo", "load"]
