"""Load, run and benchmark qcompile artifacts.

``load(path)`` verifies every file of the artifact against the sha256 in its manifest before it loads
any model or library, then returns a :class:`Session` on the manifest's default executor (or the one
asked for). The onnxruntime executors of a model exported with dynamic dims run other sizes of them
(``dynamic_dims`` in the manifest); a session on the default executor routes a call its executor cannot
run to one that can.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from qcompile.errors import ArtifactError
from qcompile.runtime.artifact import verify
from qcompile.runtime.generate import Generation, Generator
from qcompile.runtime.manifest import Manifest, TensorInfo

if TYPE_CHECKING:
    from qcompile.runtime.executors import TVMExecutor


class Session:
    """A loaded artifact: ``run(feeds)`` returns ``{output name: array}``."""

    def __init__(self, folder: Path, manifest: Manifest, executor: str, route: bool = False) -> None:
        self.folder = folder
        self.manifest = manifest
        self.executor = executor
        self.inputs = list(manifest.inputs)
        self.outputs = list(manifest.outputs)
        # route: a call whose shapes this executor does not run goes to another executor that runs them.
        self.route = route
        self._routes: dict[str, Session] = {}
        # What entry.serves said of each set of input shapes seen (a call costs microseconds; models run in tens)
        self._verdicts: dict[tuple[tuple[int, ...], ...], str | None] = {}
        self._generator: Generator | None = None
        self.library: TVMExecutor | None = None  # a TVM library's executor (its input buffers)
        entry = manifest.executors.get(executor)
        if entry is None:
            raise ArtifactError(f"{folder}: no executor '{executor}'; it has {sorted(manifest.executors)}")
        self.entry = entry
        own = entry.input_dtypes or {}
        for name, output in entry.state or []:  # state the caller carries from one call to the next
            shape, dtype = tuple((entry.input_shapes or {})[name]), own[name]
            self.inputs.append(TensorInfo(name, shape, dtype))
            self.outputs.append(TensorInfo(output, shape, dtype))
        self._dtypes = [(info.name, np.dtype(own.get(info.name, info.dtype))) for info in self.inputs]
        # an input the onnxruntime files take besides the model's own, with a default (Decoder.logits_from)
        decoder = manifest.decoder
        self._optional = decoder.logits_from if decoder is not None and entry.kind == "onnxruntime" else None
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
            features = list((entry.target or {}).get("mattr", []))
            self.library = TVMExecutor(
                path,
                [info.name for info in self.inputs],
                entry.requires_cpu,
                features,
                entry.requires_flags,
                folder / entry.weights if entry.weights else None,
            )
            self._run = self.library.run
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
        """The feeds as this executor takes them (dtype, contiguous); an error if one is missing or of a shape
        it does not run."""
        checked = self._converted(feeds)
        problem = self._verdict(checked)
        if problem is not None:
            raise ArtifactError(f"executor '{self.executor}': {problem}{self._others_hint(checked)}")
        return checked

    def _verdict(self, checked: dict[str, np.ndarray]) -> str | None:
        shapes = tuple(array.shape for array in checked.values())
        if shapes not in self._verdicts:
            self._verdicts[shapes] = self.entry.serves(self.inputs, dict(zip(checked, shapes, strict=True)))
        return self._verdicts[shapes]

    def _converted(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        checked = {}
        optional = self._optional
        if optional is not None and optional in feeds:  # a decoder's prefill slicing the LM head's input
            checked[optional] = np.asarray(feeds[optional], dtype=np.int64).reshape(1)
        for name, dtype in self._dtypes:
            array = feeds.get(name)
            if array is None:
                raise ArtifactError(f"input '{name}' is missing from the feeds (given: {sorted(feeds)})")
            if not (isinstance(array, np.ndarray) and array.dtype == dtype and array.flags.c_contiguous):
                array = np.require(np.asarray(array).astype(dtype, copy=False), requirements="C")
            checked[name] = array
        return checked

    def serving(self, feeds: dict[str, np.ndarray]) -> list[str]:
        """The executors runnable here that run ``feeds``' shapes, quickest measured first (the float model
        last, unless it is the default)."""
        shapes = {name: np.shape(array) for name, array in feeds.items()}
        latency = self.manifest.measured.latency_ms if self.manifest.measured else {}
        default = self.manifest.default_executor

        def order(name: str) -> tuple[bool, float]:
            float_fallback = name == "onnxruntime-fp32" and default != name
            return float_fallback, latency.get(name, {}).get("median_ms", float("inf"))

        return sorted(
            (
                name
                for name, entry in self.manifest.executors.items()
                if entry.cannot_run is None and self.runnable_here(name) and entry.serves(self.inputs, shapes) is None
            ),
            key=order,
        )

    def _others_hint(self, feeds: dict[str, np.ndarray]) -> str:
        others = [name for name in self.serving(feeds) if name != self.executor]
        if others:
            return f"; executor(s) {', '.join(others)} of this artifact run these shapes (load it with one of them)"
        return "; no executor of this artifact runs these shapes (compile with samples of this shape)"

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
        if not self.route:
            results = self._run(self.check_feeds(feeds))
        else:
            checked = self._converted(feeds)
            if self._verdict(checked) is None:
                results = self._run(checked)
            else:
                return self._routed(checked).run(checked)
        return {info.name: np.asarray(value) for info, value in zip(self.outputs, results, strict=True)}

    def generate(
        self,
        prompt: str | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        seed: int = 0,
        prompt_ids: list[int] | None = None,
        on_text: Callable[[str], None] | None = None,
        chat: bool = False,
        system: str | None = None,
    ) -> Generation:
        """Generate text after ``prompt`` with a decoder artifact's KV cache (see :mod:`qcompile.runtime.generate`):
        greedy at temperature 0, else sampled (``top_k`` > 0 keeps the likeliest k), seeded by ``seed``;
        ``on_text`` receives the text as it grows; with ``chat``, the prompt is the user's message in the
        artifact's chat template (after ``system``'s instructions). Runs on this session's executor if it serves
        every length, else on the best one that does (decode steps on the artifact's decode-step library, if any).
        """
        if self._generator is None:
            self._generator = Generator(self)
        return self._generator.generate(
            prompt, max_new_tokens, temperature, top_k, seed, prompt_ids, on_text, chat, system
        )

    def _routed(self, feeds: dict[str, np.ndarray]) -> Session:
        serving = self.serving(feeds)
        if not serving:
            self.check_feeds(feeds)  # raises, naming the input and what the executor runs
        name = serving[0]
        if name not in self._routes:
            self._routes[name] = Session(self.folder, self.manifest, name)
        return self._routes[name]


def load(path: str | Path, executor: str | None = None) -> Session:
    """Verify the artifact at ``path`` and load it on ``executor`` (default: the manifest's choice)."""
    folder = Path(path)
    manifest = verify(folder)
    chosen = executor or manifest.default_executor
    if chosen is None:
        raise ArtifactError(f"{folder}: the manifest names no default executor; name one, or recompile")
    # On the default executor, a call of shapes it does not run (another batch or length than a TVM library
    # was built for) goes to the quickest executor that runs them; a named executor runs its shapes or fails.
    return Session(folder, manifest, chosen, route=executor is None)


__all__ = ["Generation", "Manifest", "Session", "TensorInfo", "load"]
