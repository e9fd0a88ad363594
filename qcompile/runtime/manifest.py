"""The typed manifest of an artifact: what ``manifest.json`` holds, validated when it is read.

The compile flow builds one :class:`Manifest` and writes it once it is complete; the runtime, ``gate``,
``verify`` and the CLI read the same object. ``to_json`` / ``from_json`` are the only translation to and
from the file. The sections whose contents differ from pass to pass (``options``, ``passes``, ``layers``,
``accuracy``, ``lut``) stay JSON objects: each pass documents its own entry.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from qcompile.errors import ArtifactError

SCHEMA_VERSION = 1
EXECUTOR_KINDS = ("onnxruntime", "tvm", "lut")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class TensorInfo:
    """An input or output of the compiled graph; -1 marks a dim that is not fixed."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: Any, where: str) -> TensorInfo:
        entry = _object(data, where)
        shape = _required(entry, "shape", list, where)
        if not all(isinstance(dim, int) for dim in shape):
            raise ArtifactError(f"{where}: shape {shape} holds a dim that is not an integer")
        return cls(_required(entry, "name", str, where), tuple(shape), _required(entry, "dtype", str, where))


def _served(info: TensorInfo, free: set[int]) -> str:
    if not free:
        return f"this executor runs {info.shape} only"
    pattern = ", ".join("*" if axis in free else str(size) for axis, size in enumerate(info.shape))
    return f"this executor runs [{pattern}] (* any size)"


@dataclass(frozen=True)
class Source:
    file: str
    sha256: str


@dataclass(frozen=True)
class TargetInfo:
    name: str
    description: str
    backend: str
    tvm_target: dict[str, Any]


@dataclass
class Executor:
    """One way to run the artifact.

    Attributes:
        kind: 'onnxruntime' (an ONNX file), 'tvm' (a TVM library) or 'lut' (the table-lookup package).
        file: the file it runs, relative to the artifact folder.
        description: what it is, for people.
        target: the TVM target the library was built for.
        lowering: how the TVM library was produced (importer build, or qcompile's integer kernels).
        requires_cpu: the LLVM CPU name a library was built with every instruction of: it runs only there.
        requires_flags: the instruction-set flags of the CPU it was built on (``/proc/cpuinfo``): a CPU with
            all of them runs it (what the runtime checks; LLVM, which names CPUs, is in TVM's compiler).
        kernels: the CUDA kernel files of a GPU build, or the LUT kernel library.
        cannot_run: why nothing can run it here (a GPU build, a target without a published runtime).
        arch: the CPU architecture of a cross-compiled library.
        runner: the Python-free runner bundled for that architecture.
        dynamic_dims: ``{input: {axis: name}}``, the input dims it runs at any size (the manifest's input
            shapes give the size of every other dim); None: it runs the manifest's input shapes only.
        input_shapes: ``{input: shape}``, the shapes it runs where they are not the manifest's (a decoder's
            decode-step library: one token on a cache of fixed size).
        input_dtypes: ``{input: dtype}``, the types it takes where they are not the manifest's (that library's
            cache of 8-bit codes).
        weights: the file of a TVM library's weights, which it takes as parameters after its inputs
            (:mod:`qcompile.runtime.weights`); None: they are inside the library.
        state: ``[[input, output], ...]``, inputs of its own beyond the model's, each the output of its pair
            carried from a call to the next (the decode-step library's cache of per-position key scales), in the
            library's order (a list: the manifest's objects are written with sorted keys): they follow the model's
            inputs, their shapes and types in ``input_shapes`` / ``input_dtypes``, and their outputs follow the
            model's outputs.
    """

    kind: str
    file: str
    description: str
    target: dict[str, Any] | None = None
    lowering: str | None = None
    requires_cpu: str | None = None
    requires_flags: list[str] | None = None
    kernels: str | list[str] | None = None
    cannot_run: str | None = None
    arch: str | None = None
    runner: str | None = None
    dynamic_dims: dict[str, dict[str, str]] | None = None
    input_shapes: dict[str, list[int]] | None = None
    input_dtypes: dict[str, str] | None = None
    weights: str | None = None
    state: list[list[str]] | None = None

    def serves(self, inputs: list[TensorInfo], shapes: dict[str, tuple[int, ...]]) -> str | None:
        """None if it runs inputs of ``shapes``; else which input and dim it cannot take."""
        own = self.input_shapes or {}
        for info in inputs:
            shape = shapes[info.name]
            if info.name in own:
                info = TensorInfo(info.name, tuple(own[info.name]), info.dtype)
            free = {int(axis) for axis in (self.dynamic_dims or {}).get(info.name, {})}
            if len(shape) != len(info.shape):
                return f"input '{info.name}' has shape {shape}, of rank {len(info.shape)} in the artifact"
            pairs = enumerate(zip(shape, info.shape, strict=True))
            if any(size != expected and axis not in free for axis, (size, expected) in pairs):
                return f"input '{info.name}' has shape {shape}; {_served(info, free)}"
        return None

    def to_json(self) -> dict[str, Any]:
        return _set_fields(self)

    @classmethod
    def from_json(cls, data: Any, where: str) -> Executor:
        entry = _object(data, where)
        _known_fields(cls, entry, where)
        executor = cls(**entry)
        if executor.kind not in EXECUTOR_KINDS:
            raise ArtifactError(f"{where}: kind '{executor.kind}' is not one of {', '.join(EXECUTOR_KINDS)}")
        if not isinstance(executor.file, str) or not executor.file:
            raise ArtifactError(f"{where}: no file")
        dims = executor.dynamic_dims
        if dims is not None and not (
            isinstance(dims, dict)
            and all(isinstance(axes, dict) and all(str(axis).isdigit() for axis in axes) for axes in dims.values())
        ):
            raise ArtifactError(f"{where}: dynamic_dims {dims!r} is not {{input: {{axis: name}}}}")
        state, shapes, dtypes = executor.state, executor.input_shapes or {}, executor.input_dtypes or {}
        if state is not None and not (
            isinstance(state, list)
            and all(isinstance(pair, list) and len(pair) == 2 for pair in state)
            and all(pair[0] in shapes and pair[0] in dtypes for pair in state)
        ):
            raise ArtifactError(
                f"{where}: state {state!r} is not [[input, output], ...] of inputs with a shape and dtype of their own"
            )
        return executor


@dataclass(frozen=True)
class Decoder:
    """How a causal LM with a KV cache is driven token by token (``qcompile generate``).

    Attributes:
        input_ids, logits: the token input ``[batch, sequence]`` and the logits output ``[batch, sequence, vocab]``.
        attention_mask: ``[batch, past + sequence]`` of ones, if the graph takes one.
        position_ids: ``[batch, sequence]`` positions ``past .. past + sequence - 1``, if the graph takes them.
        cache: ``[past input, present output]`` pairs; each present output is its past input for the next step.
        cache_axis: the axis of the cache tensors that holds the positions.
        context: the most positions the model was trained for (prompt and new tokens), if known.
        eos_token_ids: the tokens that end a generation.
        tokenizer: the artifact's ``tokenizer.json`` (Hugging Face tokenizers format), if it carries one.
        executors: the executors that run every sequence and past length, best first.
        step_executor: the executor of decode steps on a cache of ``step_capacity`` positions (qcompile's kernels,
            every shape static): past inputs ``[batch 1, heads, step_capacity, head_dim]`` whose unfilled positions
            ``attention_mask`` (``[1, step_capacity + 1]``) masks out, one token in, and present outputs that are
            the new token's entries alone (the caller writes them into its cache); None if there is none.
        step_capacity: the positions its cache holds; a generation longer than that decodes on ``executors``.
        chat_template: the artifact's Jinja chat template (``chat_template.jinja``: the model's, from beside it),
            which ``generate --chat`` renders a conversation with; None if the model came without one.
        special_tokens: the tokenizer's ``bos_token`` / ``eos_token`` strings, which templates may use.
        step_cache_codes: ``{past input: [multiplier, ..., scale, zero point]}`` when that cache holds 8-bit codes:
            a float entry ``x`` is ``clip(round(x * multiplier ... / scale) + zero point, 0, 255)``, as
            ``QuantizeLinear`` rounds (the decode step's own quantization of its keys and values, moved before the
            cache: :func:`qcompile.flow.decoder.quantize_cache`); for a cache in ``step_cache_scales``, ``[multiplier,
            ..., limit, zero point]``, each position's row at its own scale ``max |x * multiplier ...| / limit``.
        step_cache_scales: ``{past input: [scales input, scales output]}`` for the caches quantized per position:
            the step executor's float cache of those scales (``[1, heads, step_capacity, 1]``, in its ``state``),
            appended to like the codes.
        logits_from: an input of the onnxruntime executors (``int64 [1]``, default 0) from which position on the
            logits are computed: a prefill that needs the last position's feeds ``sequence - 1`` (the LM head then
            multiplies one position, not all); None if the files have none.
    """

    input_ids: str
    logits: str
    cache: list[list[str]]
    cache_axis: int
    executors: list[str]
    attention_mask: str | None = None
    position_ids: str | None = None
    context: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    tokenizer: str | None = None
    step_executor: str | None = None
    step_capacity: int | None = None
    chat_template: str | None = None
    special_tokens: dict[str, str] | None = None
    step_cache_codes: dict[str, list[float]] | None = None
    logits_from: str | None = None
    step_cache_scales: dict[str, list[str]] | None = None

    def to_json(self) -> dict[str, Any]:
        return _set_fields(self)

    @classmethod
    def from_json(cls, data: Any, where: str) -> Decoder:
        entry = _object(data, where)
        _known_fields(cls, entry, where)
        try:
            decoder = cls(**entry)
        except TypeError as error:
            raise ArtifactError(f"{where}: {error}") from error
        if not all(isinstance(pair, list) and len(pair) == 2 for pair in decoder.cache):
            raise ArtifactError(f"{where}: cache {decoder.cache!r} is not a list of [past input, present output]")
        return decoder


@dataclass
class Measured:
    """What was measured on the build machine when the artifact was written (not byte-reproducible).

    Attributes:
        latency_ms: per executor, the figures of :class:`qcompile.runtime.bench.Latency`.
        default_executor: the executor chosen as the default, and ``default_reason`` why.
        accuracy: metrics against the float model ('calibration', 'evaluation', oracle checks).
        machine: the build machine (:func:`qcompile.runtime.bench.machine`).
        latency_scope: set when the latencies are not the target's (a cross target).
        predicted_latency_ms: the cost model's prediction for a target nothing here can measure.
    """

    latency_ms: dict[str, dict[str, float]]
    default_executor: str
    default_reason: str
    accuracy: dict[str, Any]
    machine: dict[str, Any]
    latency_scope: str | None = None
    predicted_latency_ms: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return _set_fields(self)


@dataclass
class Manifest:
    """Everything an artifact says about itself; every file it lists carries its sha256."""

    qcompile_version: str
    source: Source
    target: TargetInfo
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    options: dict[str, Any]
    passes: list[dict[str, Any]]
    layers: list[dict[str, Any]]
    executors: dict[str, Executor]
    files: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    lut: dict[str, Any] | None = None
    measured: Measured | None = None
    default_executor: str | None = None
    decoder: Decoder | None = None
    schema_version: int = SCHEMA_VERSION

    def pass_entry(self, name: str) -> dict[str, Any] | None:
        """The manifest entry of the pass called ``name``, if it ran."""
        return next((entry for entry in self.passes if entry.get("name") == name), None)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "schema_version": self.schema_version,
            "qcompile_version": self.qcompile_version,
            "source": dataclasses.asdict(self.source),
            "target": dataclasses.asdict(self.target),
            "inputs": [info.to_json() for info in self.inputs],
            "outputs": [info.to_json() for info in self.outputs],
            "options": self.options,
            "passes": self.passes,
            "layers": self.layers,
            "executors": {name: executor.to_json() for name, executor in self.executors.items()},
            "skipped": self.skipped,
            "files": self.files,
        }
        if self.lut is not None:
            data["lut"] = self.lut
        if self.measured is not None:
            data["measured"] = self.measured.to_json()
        if self.default_executor is not None:
            data["default_executor"] = self.default_executor
        if self.decoder is not None:
            data["decoder"] = self.decoder.to_json()
        return data

    @classmethod
    def from_json(cls, data: Any, where: str = "manifest") -> Manifest:
        """Read and validate; any problem is an ArtifactError that names the field."""
        manifest = _object(data, where)
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ArtifactError(
                f"{where}: schema version {version} is not {SCHEMA_VERSION}; recompile with this qcompile"
            )
        source = _object(manifest.get("source"), f"{where}: source")
        target = _object(manifest.get("target"), f"{where}: target")
        executors = _required(manifest, "executors", dict, where)
        files = _required(manifest, "files", dict, where)
        for name, digest in files.items():
            if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
                raise ArtifactError(f"{where}: the sha256 of file '{name}' is not 64 hex digits")
        measured, decoder = manifest.get("measured"), manifest.get("decoder")
        parsed = cls(
            schema_version=version,
            qcompile_version=_required(manifest, "qcompile_version", str, where),
            source=Source(_required(source, "file", str, where), _required(source, "sha256", str, where)),
            target=TargetInfo(
                _required(target, "name", str, where),
                _required(target, "description", str, where),
                _required(target, "backend", str, where),
                _required(target, "tvm_target", dict, where),
            ),
            inputs=[
                TensorInfo.from_json(item, f"{where}: inputs") for item in _required(manifest, "inputs", list, where)
            ],
            outputs=[
                TensorInfo.from_json(item, f"{where}: outputs") for item in _required(manifest, "outputs", list, where)
            ],
            options=_required(manifest, "options", dict, where),
            passes=_required(manifest, "passes", list, where),
            layers=_required(manifest, "layers", list, where),
            executors={
                name: Executor.from_json(entry, f"{where}: executor '{name}'") for name, entry in executors.items()
            },
            files=files,
            skipped=manifest.get("skipped", {}),
            lut=manifest.get("lut"),
            measured=_measured(measured, f"{where}: measured") if measured is not None else None,
            default_executor=manifest.get("default_executor"),
            decoder=Decoder.from_json(decoder, f"{where}: decoder") if decoder is not None else None,
        )
        if parsed.default_executor is not None and parsed.default_executor not in parsed.executors:
            raise ArtifactError(
                f"{where}: the default executor '{parsed.default_executor}' is not one of {sorted(parsed.executors)}"
            )
        return parsed


def _measured(data: Any, where: str) -> Measured:
    entry = _object(data, where)
    _known_fields(Measured, entry, where)
    try:
        return Measured(**entry)
    except TypeError as error:
        raise ArtifactError(f"{where}: {error}") from error


def _known_fields(kind: type, entry: dict[str, Any], where: str) -> None:
    unknown = sorted(set(entry) - {item.name for item in dataclasses.fields(kind)})
    if unknown:
        raise ArtifactError(f"{where}: unknown field(s) {', '.join(unknown)}; recompile with this qcompile")


def _set_fields(instance: Any) -> dict[str, Any]:
    """A dataclass as JSON, without the fields that are None."""
    return {key: value for key, value in dataclasses.asdict(instance).items() if value is not None}


def _object(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ArtifactError(f"{where}: expected a JSON object, found {type(data).__name__}")
    return data


def _required(entry: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = entry.get(key)
    if not isinstance(value, kind):
        raise ArtifactError(f"{where}: '{key}' is missing or not a {kind.__name__}; recompile with this qcompile")
    return value
