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

import heapq
import json
import logging
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompile.calibration import Feed, InputSpec
from qcompile.errors import ArtifactError, CalibrationError
from qcompile.graph import clone
from qcompile.runtime.manifest import Decoder

logger = logging.getLogger(__name__)

TOKENIZER_JSON = "tokenizer.json"
CHAT_TEMPLATE = "chat_template.jinja"
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


def decoder_entry(found: Layout, **fields: Any) -> Decoder:
    """The manifest's decoder entry of the layout ``found``, with ``fields`` (the executors, and what more is
    known)."""
    return Decoder(
        input_ids=found.input_ids,
        logits=found.logits,
        cache=[[past, present] for past, present in found.cache],
        cache_axis=CACHE_AXIS,
        attention_mask=found.attention_mask,
        position_ids=found.position_ids,
        **fields,
    )


def context_of(source: Path) -> int | None:
    """The most positions the model was trained for (``max_position_embeddings`` in ``config.json`` beside it)."""
    context = _json_beside(source, "config.json").get("max_position_embeddings")
    return int(context) if isinstance(context, int) else None


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
    context = context_of(source)
    template, special = chat_template(source)
    if template is not None:
        (staging / CHAT_TEMPLATE).write_text(template)
    eos = _token_ids(generation.get("eos_token_id", config.get("eos_token_id")))
    decoder = decoder_entry(
        found,
        executors=serving,
        context=context,
        eos_token_ids=eos,
        tokenizer=TOKENIZER_JSON if tokenizer is not None else None,
        chat_template=CHAT_TEMPLATE if template is not None else None,
        special_tokens=special or None,
    )
    return decoder, None


def chat_template(source: Path) -> tuple[str | None, dict[str, str]]:
    """The model's chat template (``chat_template.jinja`` beside it, or ``chat_template`` in its
    ``tokenizer_config.json``, as transformers and optimum write them) and the tokenizer's special token strings,
    checked by rendering a short conversation; (None, {}) if it has none."""
    from qcompile.runtime.generate import render_chat

    settings = _json_beside(source, "tokenizer_config.json")
    special = {key: value for key in ("bos_token", "eos_token") if isinstance(value := settings.get(key), str)}
    path = source.parent / CHAT_TEMPLATE
    template = path.read_text() if path.is_file() else settings.get("chat_template")
    if not isinstance(template, str) or not template.strip():
        return None, {}
    try:
        render_chat(template, [{"role": "user", "content": "Hello"}], special)
    except Exception as error:  # Jinja's own error types
        raise ArtifactError(f"the chat template beside {source.name} cannot render a conversation: {error}") from error
    return template, special


class NoStepGraph(Exception):
    """Why a decoder graph has no fixed-shape decode step (the message says what the graph does instead)."""


def step_graph(model: ir.Model, found: Layout, capacity: int) -> ir.Model:
    """A copy of the decoder ``model`` that runs one decode step on a cache of ``capacity`` positions, every
    shape static, so that qcompile's kernels can run it.

    Its inputs are one token (``input_ids`` and ``position_ids`` ``[1, 1]``), the cache inputs ``[1, heads,
    capacity, head_dim]`` and ``attention_mask`` ``[1, capacity + 1]``, whose zeros mask the cache positions not
    filled yet (the attention is the same as on a cache of the filled positions alone: a masked position's weight
    is exactly 0). Each ``present`` output is the new token's entry alone, ``[1, heads, 1, head_dim]`` (the second
    input of the ``Concat`` that appends it to the past), which the runtime writes into its cache in place.
    Raises :class:`NoStepGraph` when a present output is not such a ``Concat`` of its past input."""
    step = clone(model)
    graph = step.graph
    inputs = {str(value.name): value for value in graph.inputs}
    outputs = [str(value.name) for value in graph.outputs]
    shapes: dict[str, list[int]] = {found.input_ids: [1, 1]}
    if found.position_ids is not None:
        shapes[found.position_ids] = [1, 1]
    if found.attention_mask is not None:
        shapes[found.attention_mask] = [1, capacity + 1]
    for past, present in found.cache:
        value = graph.outputs[outputs.index(present)]
        node = value.producer()
        axis = node.attributes.get_int("axis", 0) if node is not None and node.op_type == "Concat" else None
        past_value = inputs[past]
        rank = len(past_value.shape) if past_value.shape is not None else 0
        if node is None or axis is None or len(node.inputs) != 2 or node.inputs[0] is not past_value:
            raise NoStepGraph(f"'{present}' is not a Concat of '{past}' and the new positions")
        if axis % max(rank, 1) != CACHE_AXIS or rank != 4:
            raise NoStepGraph(f"'{present}' appends along axis {axis}, not the cache's position axis {CACHE_AXIS}")
        new = node.inputs[1]
        assert new is not None
        if new in graph.outputs or new.is_graph_input():
            raise NoStepGraph(f"the new positions of '{present}' are another output or an input")
        # the appended entry becomes the output, under the present output's name
        value.name = f"{present}.appended"
        new.name = present
        graph.outputs[outputs.index(present)] = new
        assert past_value.shape is not None  # (rank 4, checked above)
        heads, width = past_value.shape[1], past_value.shape[3]
        if not isinstance(heads, int) or not isinstance(width, int):
            raise NoStepGraph(f"'{past}' has shape {past_value.shape}: its heads and head_dim must be fixed")
        shapes[past] = [1, heads, capacity, width]
    for name, shape in shapes.items():
        inputs[name].shape = ir.Shape(shape)
    # the shapes in between held the calibration sample's sizes: inferred again for the step's
    graph_inputs = set(graph.inputs)
    for node in graph:
        for value in node.outputs:
            if value not in graph_inputs:
                value.shape = None
    return step


# Ops that only move or repeat elements: a quantization after them equals one before them.
_MOVEMENT = frozenset({"Unsqueeze", "Squeeze", "Expand", "Reshape", "Transpose", "Flatten", "Identity"})
SCALES_SUFFIX = ".scales"
SMALL_CONSTANT = 64  # elements


@dataclass(frozen=True)
class CacheCodes:
    """How a decode step's cache holds 8-bit codes (:func:`quantize_cache`).

    Attributes:
        codes: per past input, ``[multiplier, ..., scale, zero point]`` for a cache quantized at one static scale;
            for one quantized per position, ``[multiplier, ..., limit, zero point]`` (the scale of a position is
            ``max |x * multiplier ...| / limit`` over its row).
        scales: per past input quantized per position, ``[its scales' past input, their present output]``: a
            float cache ``[1, heads, capacity, 1]`` beside the codes, appended to like them.
    """

    codes: dict[str, list[float]]
    scales: dict[str, list[str]]

    @staticmethod
    def decoder_fields(coded: CacheCodes | None) -> dict[str, Any]:
        """The decoder entry's fields for a step cache coded as ``coded`` (None: a float cache)."""
        return {
            "step_cache_codes": coded.codes if coded else None,
            "step_cache_scales": (coded.scales or None) if coded else None,
        }


@dataclass
class _Plan:
    past: str
    present: str
    concat: Any
    chain: list[Any]  # the moves and scalar Muls between the Concat and the quantization
    quantize: Any  # the static QuantizeLinear, or the per-position chain's
    rows: dict[str, Any] | None = None  # the per-position chain's nodes by role


def _row_chain(
    value: str, users: list[Any], readers: dict[str, list[Any]], scalars: dict[str, float]
) -> dict[str, Any] | None:
    """The per-position chain (:func:`qcompile.passes.dynamic_rows.row_codes`, over one axis with keepdims) that
    quantizes ``value``, read by ``users``, by role; None if that is not what reads it."""

    def only(name: str, op: str) -> Any:
        nodes = readers.get(name, [])
        return nodes[0] if len(nodes) == 1 and nodes[0].op_type == op else None

    absolute = next((node for node in users if node.op_type == "Abs"), None)
    multiply = next((node for node in users if node.op_type == "Mul"), None)
    if len(users) != 2 or absolute is None or multiply is None or list(multiply.input)[:1] != [value]:
        return None
    reduce = only(absolute.output[0], "ReduceMax")
    bound = only(reduce.output[0], "Max") if reduce is not None else None
    if bound is None or len(reduce.input) != 2 or bound.input[1] not in scalars:
        return None
    keepdims = next((a.i for a in reduce.attribute if a.name == "keepdims"), 1)
    divisions = readers.get(bound.output[0], [])
    inverse = next((n for n in divisions if n.op_type == "Div" and n.input[1] == bound.output[0]), None)
    scale = next((n for n in divisions if n.op_type == "Div" and n.input[0] == bound.output[0]), None)
    if not keepdims or len(divisions) != 2 or inverse is None or scale is None:
        return None
    if inverse.output[0] != multiply.input[1]:
        return None
    quantize = only(multiply.output[0], "QuantizeLinear")
    if quantize is None or inverse.input[0] not in scalars or scale.input[1] != inverse.input[0]:
        return None
    roles = ("abs", "reduce", "max", "inverse", "mul", "quantize", "scale")
    return dict(zip(roles, (absolute, reduce, bound, inverse, multiply, quantize, scale), strict=True))


def _scale_index(plan: _Plan, proto: Any, constants: dict[str, np.ndarray], shape: list[int]) -> np.ndarray | None:
    """Where each column scale of a per-position chain comes from: the moves between the cache's ``Concat``
    (of ``shape``) and the chain applied to the positions, then, per slice along the reduced axis, the cache
    row (``[heads, positions]`` flattened) that slice is; None unless each slice is one whole row."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    width = shape[-1]
    moves = [node for node in plan.chain if node.op_type != "Mul"]
    nodes, previous = [], "positions"
    for index, node in enumerate(moves):
        if any(name not in constants for name in node.input[1:] if name):
            return None
        copied = onnx.NodeProto()
        copied.CopyFrom(node)
        copied.input[0], copied.output[0] = previous, f"moved{index}"
        nodes.append(copied)
        previous = copied.output[0]
    if not nodes:
        nodes.append(onnx.helper.make_node("Identity", ["positions"], ["moved0"]))
        previous = "moved0"
    parameters = {name for node in nodes for name in node.input[1:] if name}
    model = onnx.helper.make_model(
        onnx.helper.make_graph(
            nodes,
            "moves",
            [onnx.helper.make_tensor_value_info("positions", onnx.TensorProto.INT64, shape)],
            [onnx.helper.make_tensor_value_info(previous, onnx.TensorProto.INT64, None)],
            [onnx.numpy_helper.from_array(constants[name], name) for name in parameters],
        ),
        opset_imports=list(proto.opset_import),
    )
    positions = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
    moved = np.asarray(ReferenceEvaluator(model).run(None, {"positions": positions})[0])  # type: ignore[index]
    axes = constants.get(plan.rows["reduce"].input[1]) if plan.rows is not None else None
    if axes is None or np.asarray(axes).size != 1:
        return None
    axis = int(np.asarray(axes).reshape(-1)[0]) % moved.ndim
    if moved.shape[axis] != width:
        return None
    rows, columns = moved // width, moved % width
    first = np.take(rows, [0], axis=axis)
    if not np.array_equal(rows, np.broadcast_to(first, rows.shape)):
        return None
    along = np.arange(width).reshape([width if a == axis else 1 for a in range(moved.ndim)])
    if not np.array_equal(np.sort(columns, axis=axis), np.broadcast_to(along, moved.shape)):
        return None  # a slice must hold each element of its row once
    return first


def quantize_cache(proto: Any, found: Layout) -> CacheCodes | None:
    """Rewrite a decode step's integer graph (``proto``, of :func:`step_graph`) so that its cache holds 8-bit
    codes: where each cache input is appended to by a ``Concat`` whose result only moves (``Expand``,
    ``Transpose``, ``Reshape``, ...) and is multiplied by scalars before a quantization, that quantization (and
    the scalars) move before the ``Concat``, onto the new entries alone: the past input and the present output
    become the codes, and the step reads and moves a quarter of the bytes. The quantization is either one
    ``QuantizeLinear`` with a scalar scale, or the per-position chain of the keys
    (:mod:`qcompile.passes.dynamic_rows`: a scale per cached position, the maximum over its row); for the
    latter the step gains a float cache of those scales (an input and an output of its own) and reads the
    scales moved as the codes are (one gather by a constant index map). The results are the same codes and
    scales as before (the moves, and a row's maximum, commute with the quantization). Returns how the cache is
    coded (the runtime quantizes a prefill's float cache with it), or None with the graph untouched when some
    cache input is read otherwise."""
    import onnx

    graph = proto.graph
    # the small constants: scalars, and the moves' shapes, axes and permutations (not the weights)
    constants = {
        tensor.name: onnx.numpy_helper.to_array(tensor)
        for tensor in graph.initializer
        if int(np.prod(tensor.dims)) <= SMALL_CONSTANT
    }
    scalars = {name: float(array.reshape(-1)[0]) for name, array in constants.items() if array.size == 1}
    zero_points = {tensor.name for tensor in graph.initializer if tensor.data_type == onnx.TensorProto.UINT8}
    producers = {output: node for node in graph.node for output in node.output}
    readers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {value.name for value in graph.output}
    shapes = {value.name: [dim.dim_value for dim in value.type.tensor_type.shape.dim] for value in graph.input}
    plans = []
    for past, present in found.cache:
        concat = producers.get(present + ".appended") or next(
            (node for node in readers.get(past, []) if node.op_type == "Concat"), None
        )
        if concat is None or list(concat.input)[:1] != [past] or len(readers.get(past, [])) != 1:
            return None
        chain, value = [], concat.output[0]
        while True:
            users = readers.get(value, [])
            if value in outputs or not users:
                return None
            node = users[0]
            moves = node.op_type in _MOVEMENT or (node.op_type == "Mul" and node.input[1] in scalars)
            if len(users) == 1 and node.input[0] == value and moves:
                chain.append(node)
            elif len(users) == 1 and node.op_type == "QuantizeLinear" and node.input[0] == value:
                if node.input[1] not in scalars or node.input[2] not in zero_points:
                    return None
                plans.append(_Plan(past, present, concat, chain, node))
                break
            elif (rows := _row_chain(value, users, readers, scalars)) is not None:
                plan = _Plan(past, present, concat, chain, rows["quantize"], rows)
                shape = list(shapes[past])
                shape[CACHE_AXIS] += 1
                gather = _scale_index(plan, proto, constants, shape)
                if gather is None or rows["quantize"].input[2] not in zero_points:
                    return None
                rows["index"] = gather
                plans.append(plan)
                break
            else:
                return None
            value = node.output[0]
    codes: dict[str, list[float]] = {}
    scales: dict[str, list[str]] = {}
    removed, renamed = [], {}
    for plan in plans:
        past, present, concat, chain, quantize = plan.past, plan.present, plan.concat, plan.chain, plan.quantize
        new, coded = concat.input[1], f"{present}.codes"
        scaled = new
        for index, node in enumerate(node for node in chain if node.op_type == "Mul"):
            # x * a, now on the new entries alone: the same float32 products; the Mul of the chain goes
            product = f"{present}.scaled{index + 1}"
            graph.node.append(onnx.helper.make_node("Mul", [scaled, node.input[1]], [product]))
            scaled = product
            removed.append(node)
        multipliers = [scalars[node.input[1]] for node in chain if node.op_type == "Mul"]
        if plan.rows is None:
            graph.node.append(onnx.helper.make_node("QuantizeLinear", [scaled, *quantize.input[1:]], [coded]))
            removed.append(quantize)
            codes[past] = [*multipliers, scalars[quantize.input[1]], scalars[quantize.input[2]]]
        else:
            moved_scales = _quantize_rows_before(proto, plan, scaled, coded)
            removed += [node for role, node in plan.rows.items() if role != "index"]
            renamed[plan.rows["scale"].output[0]] = moved_scales
            limit = scalars[plan.rows["inverse"].input[0]]
            codes[past] = [*multipliers, limit, scalars[quantize.input[2]]]
            scales[past] = [past + SCALES_SUFFIX, present + SCALES_SUFFIX]
        concat.input[1] = coded
        previous = concat.output[0]  # the moves now carry codes, and the last of them is the quantized value
        for node in chain:
            if node.op_type != "Mul":
                node.input[0] = previous
                previous = node.output[0]
        # the float new entries keep a name of their own; the present output is the new entry's codes
        renamed.update({quantize.output[0]: previous, new: f"{present}.float", coded: present})
        for value in [*graph.output, *graph.input]:
            if value.name in (present, past):
                value.type.tensor_type.elem_type = onnx.TensorProto.UINT8
    for node in removed:
        graph.node.remove(node)
    for node in graph.node:
        for names in (node.input, node.output):
            for index, name in enumerate(names):
                names[index] = renamed.get(name, name)
    del graph.value_info[:]
    sort_nodes(graph)
    return CacheCodes(codes, scales)


def _add_float_islands(proto: Any, names: list[str]) -> None:
    """Name ``names`` among the nodes of ``proto`` the lowering keeps in float (the oracle's float islands)."""
    from qcompile.backends.integer.reference import FLOAT_ISLANDS

    entry = next((prop for prop in proto.metadata_props if prop.key == FLOAT_ISLANDS), None)
    if entry is None:
        entry = proto.metadata_props.add()
        entry.key = FLOAT_ISLANDS
    entry.value = "\n".join(filter(None, [entry.value, *names]))


def _quantize_rows_before(proto: Any, plan: _Plan, scaled: str, coded: str) -> str:
    """The per-position chain of ``plan`` on the new entries ``scaled`` alone (codes ``coded``, scales the
    present output ``{present}.scales``), the cache of scales as an input and output of the step, and the
    scales of every cached position gathered as the moves place their codes; returns that gathered value."""
    import onnx

    rows, past, present, graph = plan.rows, plan.past, plan.present, proto.graph
    assert rows is not None
    helper = onnx.helper
    limit, floor = rows["inverse"].input[0], rows["max"].input[1]
    axes, flat, index = (f"{present}{SCALES_SUFFIX}.{name}" for name in ("axes", "flat", "index"))
    graph.initializer.extend(
        [
            onnx.numpy_helper.from_array(np.array([-1], np.int64), axes),
            onnx.numpy_helper.from_array(np.array([-1], np.int64), flat),
            onnx.numpy_helper.from_array(rows["index"].astype(np.int64), index),
        ]
    )
    name = f"{present}{SCALES_SUFFIX}"
    steps = [
        helper.make_node("Abs", [scaled], [f"{name}.abs"]),
        helper.make_node("ReduceMax", [f"{name}.abs", axes], [f"{name}.max"], keepdims=1),
        helper.make_node("Max", [f"{name}.max", floor], [f"{name}.bounded"]),
        helper.make_node("Div", [limit, f"{name}.bounded"], [f"{name}.inverse"]),
        helper.make_node("Mul", [scaled, f"{name}.inverse"], [f"{name}.codes_in"]),
        helper.make_node("QuantizeLinear", [f"{name}.codes_in", *plan.quantize.input[1:]], [coded]),
        helper.make_node("Div", [f"{name}.bounded", limit], [name]),
        helper.make_node("Concat", [past + SCALES_SUFFIX, name], [f"{name}.all"], axis=CACHE_AXIS),
        helper.make_node("Reshape", [f"{name}.all", flat], [f"{name}.rows"]),
        helper.make_node("Gather", [f"{name}.rows", index], [f"{name}.moved"], axis=0),
    ]
    for node in steps:
        node.name = node.output[0]
    graph.node.extend(steps)
    # float nodes, as the chain they replace: the oracle runs them on onnxruntime (float islands)
    _add_float_islands(proto, [node.name for node in steps if node.op_type != "QuantizeLinear"])
    past_info = next(value for value in graph.input if value.name == past)
    dims = [dim.dim_value for dim in past_info.type.tensor_type.shape.dim]
    graph.input.append(helper.make_tensor_value_info(past + SCALES_SUFFIX, onnx.TensorProto.FLOAT, [*dims[:-1], 1]))
    new_dims = [*dims[:-1], 1]
    new_dims[CACHE_AXIS] = 1
    graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, new_dims))
    return f"{name}.moved"


def sort_nodes(graph: Any) -> None:
    """Order ``graph``'s nodes so that each comes after the producers of its inputs (Kahn's order, stable)."""
    producer = {output: index for index, node in enumerate(graph.node) for output in node.output}
    nodes = list(graph.node)
    waiting = [0] * len(nodes)
    dependents: dict[int, list[int]] = {}
    for index, node in enumerate(nodes):
        for name in set(node.input):
            if name in producer:
                waiting[index] += 1
                dependents.setdefault(producer[name], []).append(index)
    ready = [index for index, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    ordered = []
    while ready:
        index = heapq.heappop(ready)
        ordered.append(nodes[index])
        for dependent in dependents.get(index, []):
            waiting[dependent] -= 1
            if waiting[dependent] == 0:
                heapq.heappush(ready, dependent)
    if len(ordered) != len(nodes):
        raise ValueError("the graph has a cycle")
    del graph.node[:]
    graph.node.extend(ordered)


def float_weight_share(proto: Any, islands: frozenset[str]) -> float:
    """The share of a lowered graph's MatMul / Gemm / Conv weight elements that its float islands (``islands``:
    node names) multiply in float: a decode step is as fast as the weight bytes it streams."""
    sizes = {tensor.name: int(np.prod(tensor.dims)) for tensor in proto.graph.initializer}
    producers = {output: node for node in proto.graph.node for output in node.output}
    total = floating = 0
    for node in proto.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv", "MatMulInteger", "ConvInteger") or len(node.input) < 2:
            continue
        weight = node.input[1]
        # a float island's weight may come dequantized from int4 codes: count what it was made of
        while weight not in sizes and weight in producers and producers[weight].input:
            weight = producers[weight].input[0]
        size = sizes.get(weight, 0)
        total += size
        if node.name in islands:
            floating += size
    return floating / total if total else 0.0
