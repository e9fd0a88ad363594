"""Causal LMs with a KV cache: recognize the layout, complete their samples, describe them in the manifest.

The layout is the one the standard exporters write (optimum-onnx's decoder-with-past and merged models,
onnxruntime-genai's, and ``torch.onnx.export`` of a wrapper that follows them): a token input
``input_ids [batch, sequence]``, optional ``attention_mask [batch, past + sequence]`` and ``position_ids
[batch, sequence]``, and per layer ``past_key_values.{i}.key`` / ``.value`` ``[batch, heads, past, head_dim]``;
outputs ``logits [batch, sequence, vocab]`` and ``present.{i}.key`` / ``.value`` with ``past + sequence``
positions. One graph with dynamic ``sequence`` and ``past`` runs both the prefill (past 0) and every decode
step (sequence 1): the onnxruntime executors keep those dims dynamic (:mod:`qcompile.flow.dynamic`), and
``qcompile generate`` feeds each step's ``present`` back as the next step's ``past``.

Samples for such a model need only ``input_ids``: a missing cache is empty (past 0, the prefill), a missing
mask all ones and missing positions ``0 .. sequence - 1``, so a folder of ``.npz`` token windows or a list
of ``{"input_ids": ...}`` calibrates it. The tokenizer (``tokenizer.json`` beside the model, or
``--tokenizer``) and the context length and end-of-sequence tokens (``config.json`` /
``generation_config.json`` beside the model) travel in the artifact, so the device needs nothing else.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qcompile.calibration import Feed, InputSpec
from qcompile.errors import ArtifactError, CalibrationError
from qcompile.runtime.manifest import Decoder

logger = logging.getLogger(__name__)

TOKENIZER_JSON = "tokenizer.json"
_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)")
# Where each exporter writes the updated cache of ``past_key_values.{i}.{kind}``.
_PRESENT = ("present.{i}.{kind}", "present_key_values.{i}.{kind}")
CACHE_AXIS = 2  # [batch, heads, positions, head_dim]


@dataclass(frozen=True)
class Layout:
    """The decoder's input and output names."""

    input_ids: str
    logits: str
    cache: list[tuple[str, str]]
    attention_mask: str | None
    position_ids: str | None


def layout(inputs: list[str], outputs: list[str]) -> Layout | None:
    """The decoder layout of a graph with these input and output names, or None if it is not one."""
    cache = []
    for name in inputs:
        match = _PAST.fullmatch(name)
        if match is None:
            continue
        index, kind = match.groups()
        present = next(
            (p.format(i=index, kind=kind) for p in _PRESENT if p.format(i=index, kind=kind) in outputs), None
        )
        if present is None:
            return None
        cache.append((name, present))
    if not cache or "input_ids" not in inputs or "logits" not in outputs:
        return None
    return Layout(
        "input_ids",
        "logits",
        cache,
        "attention_mask" if "attention_mask" in inputs else None,
        "position_ids" if "position_ids" in inputs else None,
    )


def completed(feeds: Iterable[Feed], found: Layout, specs: list[InputSpec]) -> Iterator[Feed]:
    """The samples with what a prefill needs filled in: an empty cache, a mask of ones, positions from 0."""
    shapes = {spec.name: spec for spec in specs}
    for feed in feeds:
        if not isinstance(feed, dict) or found.input_ids not in feed:
            yield feed  # the checks downstream name what is wrong
            continue
        feed = dict(feed)
        ids = np.asarray(feed[found.input_ids])
        if ids.ndim != 2:
            raise CalibrationError(f"input '{found.input_ids}' has shape {ids.shape}; a decoder takes [batch, tokens]")
        batch, tokens = ids.shape
        past = 0
        for name, _ in found.cache:
            if name in feed:
                past = int(np.asarray(feed[name]).shape[CACHE_AXIS])
                continue
            spec = shapes[name]
            if len(spec.shape) != 4 or spec.shape[1] <= 0 or spec.shape[3] <= 0:
                raise CalibrationError(
                    f"input '{name}' has shape {spec.shape}; give it in the samples (qcompile fills in an empty "
                    "cache only for [batch, heads, past, head_dim] with fixed heads and head_dim)"
                )
            feed[name] = np.zeros((batch, spec.shape[1], 0, spec.shape[3]), dtype=spec.dtype)
        if found.attention_mask is not None and found.attention_mask not in feed:
            feed[found.attention_mask] = np.ones((batch, past + tokens), dtype=shapes[found.attention_mask].dtype)
        if found.position_ids is not None and found.position_ids not in feed:
            positions = np.arange(past, past + tokens, dtype=shapes[found.position_ids].dtype)
            feed[found.position_ids] = np.broadcast_to(positions, (batch, tokens)).copy()
        yield feed


def _json_beside(model: Path, name: str) -> dict[str, Any]:
    path = model.parent / name
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ArtifactError(f"{path}: not a JSON file ({error})") from error
    return data if isinstance(data, dict) else {}


def _token_ids(value: Any) -> list[int]:
    values = value if isinstance(value, list) else [value]
    return [int(item) for item in values if isinstance(item, int)]


def check_tokenizer(path: Path, vocabulary: int | None) -> None:
    """A tokenizer file the runtime can load, whose tokens the logits cover."""
    try:
        import tokenizers
    except ImportError as error:  # pragma: no cover - a dependency of qcompile
        raise ArtifactError("the 'tokenizers' package is needed to ship a tokenizer: pip install tokenizers") from error
    try:
        tokenizer = tokenizers.Tokenizer.from_file(str(path))
    except Exception as error:  # the Rust library raises plain Exceptions
        raise ArtifactError(f"tokenizer {path}: cannot be loaded ({error})") from error
    size = tokenizer.get_vocab_size()
    if vocabulary is not None and size > vocabulary:
        raise ArtifactError(f"tokenizer {path}: {size} tokens, but the model's logits cover {vocabulary}")


def describe(
    found: Layout,
    source: Path,
    staging: Path,
    executors: dict[str, Any],
    tokenizer: Path | None,
    vocabulary: int | None,
) -> tuple[Decoder | None, str | None]:
    """The manifest's decoder entry (the tokenizer copied into ``staging``), or None and why generation
    cannot run from this artifact."""
    serving = []
    past = found.cache[0][0]
    for name in ("onnxruntime", "onnxruntime-fp32"):  # best first: the quantized graph, then the float one
        entry = executors.get(name)
        dims = (entry.dynamic_dims or {}) if entry is not None else {}
        if str(CACHE_AXIS) in dims.get(past, {}) and "1" in dims.get(found.input_ids, {}):
            serving.append(name)
    if not serving:
        return None, (
            "no executor runs other sequence and cache lengths than the calibration sample's (the dims are "
            "static in the model, or the dynamic-dims check failed: see the input_shapes pass)"
        )
    if tokenizer is None and (source.parent / TOKENIZER_JSON).is_file():
        tokenizer = source.parent / TOKENIZER_JSON
    if tokenizer is not None:
        if not tokenizer.is_file():
            raise ArtifactError(f"tokenizer {tokenizer}: no such file")
        check_tokenizer(tokenizer, vocabulary)
        shutil.copyfile(tokenizer, staging / TOKENIZER_JSON)
    else:
        logger.warning(
            "%s is a decoder with a KV cache but no tokenizer.json lies beside it (or --tokenizer): the artifact "
            "generates from token ids only",
            source.name,
        )
    config = _json_beside(source, "config.json")
    generation = _json_beside(source, "generation_config.json")
    context = config.get("max_position_embeddings")
    eos = _token_ids(generation.get("eos_token_id", config.get("eos_token_id")))
    decoder = Decoder(
        input_ids=found.input_ids,
        logits=found.logits,
        cache=[[past, present] for past, present in found.cache],
        cache_axis=CACHE_AXIS,
        executors=serving,
        attention_mask=found.attention_mask,
        position_ids=found.position_ids,
        context=int(context) if isinstance(context, int) else None,
        eos_token_ids=eos,
        tokenizer=TOKENIZER_JSON if tokenizer is not None else None,
    )
    return decoder, None
