"""Dynamic dims in the artifact: the onnxruntime executors keep the dims the source model leaves dynamic.

The compiler works on static shapes (calibration, cost models and kernels need them), fixed from the first
calibration sample; the frontend keeps what the graph computes from those dims as computations
(:func:`qcompile.frontend.normalize`). The QDQ and float ONNX files are then written with the source's
symbolic dims back on their inputs, and checked: for each dynamic dim (the inputs that share a dim name vary
together), probe feeds of other sizes (one less, and twice the sample's: those the source model runs) must
run on both files, the float file must equal the source model on it, the quantized file must stay about as
close to it as at the calibration shape (activation ranges calibrated on 32x32 images need not hold at 64x64),
and so must all the dims varied at once. A dim that fails stays
static; the manifest's executor entries name the dims they serve (``dynamic_dims``), and a TVM library, built
for the calibration shapes, names none.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from qcompile import execution, frontend
from qcompile.calibration import Feed
from qcompile.errors import first_line
from qcompile.graph import DYNAMIC_DIMS_KEY

logger = logging.getLogger(__name__)

# The float file on a probe against the source model: the same graph up to folded constants and reassociated
# float sums (BatchNorm folding, MatMul + Add as Gemm), so float32 rounding differences only.
RTOL, ATOL_OF_PEAK = 1e-3, 1e-4
# A quantized file at the probe size against the source: 1 - cosine at most this factor of its value on the
# calibration sample plus this slack. Batch and sequence length leave activation ranges about as calibrated;
# an image of twice the size can push them past the calibrated ranges (a tiny EfficientNet's block-5 activations
# spanned 5.7 against 1.2 calibrated: 1 - cosine 0.34 against 0.004).
DROP_FACTOR, DROP_SLACK = 3.0, 0.005

Dims = dict[str, dict[int, str]]  # input -> axis -> dim name

# A probe the model refuses is an answer, not an error to print.
_QUIET = execution.quiet_run()


def dynamic_dims(model: ir.Model) -> Dims:
    """The dims the frontend kept dynamic in ``model`` (empty when it fixed every shape)."""
    text = model.metadata_props.get(DYNAMIC_DIMS_KEY)
    if not text:
        return {}
    return {name: {int(axis): dim for axis, dim in axes.items()} for name, axes in json.loads(text).items()}


def with_dims(proto: onnx.ModelProto, dims: Dims, source_outputs: dict[str, onnx.TypeProto]) -> onnx.ModelProto:
    """A copy of ``proto`` whose inputs carry ``dims`` as symbolic dims; the intermediate shapes (which hold the
    calibration sizes) are dropped and the outputs take the source model's shapes."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for value in copy.graph.input:
        for axis, name in dims.get(value.name, {}).items():
            dim = value.type.tensor_type.shape.dim[axis]
            dim.Clear()
            dim.dim_param = name
    del copy.graph.value_info[:]
    for value in copy.graph.output:
        source = source_outputs.get(value.name)
        if source is not None and source.HasField("tensor_type") and source.tensor_type.HasField("shape"):
            value.type.tensor_type.shape.CopyFrom(source.tensor_type.shape)
        else:
            value.type.tensor_type.ClearField("shape")
    return copy


def probe(sample: Feed, members: list[tuple[str, int]], double: bool = False) -> Feed:
    """``sample`` with each (input, axis) of ``members`` one shorter (cut), or doubled (tiled) where it is 1 or
    with ``double``."""
    feed = dict(sample)
    for name, axis in members:
        array = np.asarray(feed[name])
        size = array.shape[axis]
        cut = size > 1 and not double
        feed[name] = np.take(array, range(size - 1), axis=axis) if cut else np.concatenate([array, array], axis)
    return feed


def probes(sample: Feed, members: list[tuple[str, int]]) -> list[Feed]:
    """One shorter and twice as long (one probe where the sample's size is 1): smaller and larger sizes, as the
    model takes them (strided convolutions with "same" padding refuse odd image sizes, position tables cap
    lengths)."""
    if all(np.shape(sample[name])[axis] == 1 for name, axis in members):
        return [probe(sample, members)]
    return [probe(sample, members), probe(sample, members, double=True)]


def _cosine_drop(produced: list[np.ndarray], expected: list[np.ndarray]) -> float:
    """1 - cosine, the worst over the outputs."""
    drops = []
    for ours, theirs in zip(produced, expected, strict=True):
        ours, theirs = np.asarray(ours, np.float64).ravel(), np.asarray(theirs, np.float64).ravel()
        norms = float(np.linalg.norm(ours) * np.linalg.norm(theirs))
        drops.append(0.0 if norms == 0.0 else 1.0 - float(ours @ theirs) / norms)
    return max(drops, default=0.0)


def _runs_like_source(
    files: dict[str, onnx.ModelProto], source: Any, reference: str, feeds: list[Feed], base_drop: dict[str, float]
) -> str | None:
    """None if, on every one of ``feeds`` the source model runs (one at least), every file runs, the reference
    file equals ``source``, and the quantized files stay about as close to it as on the calibration sample
    (``base_drop``: their 1 - cosine there); else why not."""
    failures = []
    ran = 0
    sessions: dict[str, Any] = {}  # one per file, opened at its first probe
    for feed in feeds:
        try:
            expected = source.run(None, feed, _QUIET)
        except Exception as error:  # onnxruntime's own error types
            failures.append(first_line(error))
            continue
        ran += 1
        why = _matches(files, sessions, expected, reference, feed, base_drop)
        if why is not None:
            return why
    if not ran:
        return f"the source model itself runs no other size ({'; '.join(failures)})"
    return None


def _matches(
    files: dict[str, onnx.ModelProto],
    sessions: dict[str, Any],
    expected: list[np.ndarray],
    reference: str,
    feed: Feed,
    base_drop: dict[str, float],
) -> str | None:
    for name, proto in files.items():
        try:
            if name not in sessions:
                sessions[name] = execution.session(proto)
            produced = sessions[name].run(None, feed, _QUIET)
        except Exception as error:
            return f"{name} does not run it ({first_line(error)})"
        if [np.shape(array) for array in produced] != [np.shape(array) for array in expected]:
            return f"{name} gives other output shapes than the source model"
        if name == reference:
            for ours, theirs in zip(produced, expected, strict=True):
                peak = float(np.abs(theirs).max()) if np.size(theirs) else 0.0
                if not np.allclose(ours, theirs, rtol=RTOL, atol=ATOL_OF_PEAK * peak + 1e-6):
                    return f"{name} differs from the source model on it (a size was folded into a constant)"
        else:
            drop, allowed = _cosine_drop(produced, expected), DROP_FACTOR * base_drop[name] + DROP_SLACK
            if drop > allowed:
                return (
                    f"{name} is far less accurate at {[np.shape(array) for array in feed.values()]} (1 - cosine "
                    f"{drop:.2g} against {base_drop[name]:.2g} at the calibration shape): its activation ranges "
                    "are calibrated for that shape; calibrate on samples of the sizes it will run"
                )
    return None


def keep_dynamic_dims(
    staging: Path, files: dict[str, str], reference: str, model: ir.Model, source_path: Path, sample: Feed
) -> tuple[Dims, dict[str, str]]:
    """Rewrite the ONNX ``files`` (executor -> file in ``staging``; ``reference`` names the float one) with the
    dynamic dims of ``model`` that pass the probes. Returns the dims kept, and per dim name why it stayed static."""
    dims = dynamic_dims(model)
    if not dims:
        return {}, {}
    groups: dict[str, list[tuple[str, int]]] = {}
    for name, axes in dims.items():
        for axis, dim in axes.items():
            groups.setdefault(dim, []).append((name, axis))
    source_model = frontend.load_model(source_path)
    if execution.is_large(source_model) or execution.is_large(model):
        reason = "the model's weights pass 2 GiB: the dynamic-dims check loads every file into memory"
        return {}, dict.fromkeys(groups, reason)
    source = execution.session(source_model)
    declared = onnx.load(str(source_path), load_external_data=False).graph.output
    source_outputs = {output.name: output.type for output in declared}
    protos = {executor: onnx.load(str(staging / file)) for executor, file in files.items()}
    expected = source.run(None, sample)
    base_drop = {
        executor: _cosine_drop(execution.session(proto).run(None, sample), expected)
        for executor, proto in protos.items()
    }
    static: dict[str, str] = {}
    kept: Dims = {}
    for dim, members in groups.items():
        trial = {name: {axis: dim} for name, axis in members}
        generalized = {executor: with_dims(proto, trial, {}) for executor, proto in protos.items()}
        why = _runs_like_source(generalized, source, reference, probes(sample, members), base_drop)
        if why is None:
            for name, axis in members:
                kept.setdefault(name, {})[axis] = dim
        else:
            static[dim] = why
    if kept:
        everything = [(name, axis) for name, axes in kept.items() for axis in axes]
        generalized = {executor: with_dims(proto, kept, source_outputs) for executor, proto in protos.items()}
        why = _runs_like_source(generalized, source, reference, probes(sample, everything), base_drop)
        if why is not None:
            static.update(dict.fromkeys({dim for axes in kept.values() for dim in axes.values()}, f"together: {why}"))
            return {}, static
        for executor, proto in generalized.items():
            (staging / files[executor]).write_bytes(proto.SerializeToString())
    if static:
        logger.info("dims kept static in the onnxruntime files: %s", static)
    return kept, static
