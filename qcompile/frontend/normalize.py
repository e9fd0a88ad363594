"""Normalization: one canonical form for every model the passes see.

After :func:`normalize`, a model is at opset :data:`CANONICAL_OPSET`; every graph input has a static
shape; Constant nodes are initializers; constant subexpressions are folded (a Transpose of a constant read as a
MatMul / Gemm weight whatever its size: an LM head tied to the embedding table gets its own transposed
weight, so it is quantized as a weight, not as an activation); BatchNormalization that
follows a Conv or Gemm is folded into its weights; Identity and inference-mode Dropout are gone; every
value has an inferred type and shape; and no floating-point weight is NaN or Inf.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnx.version_converter
import onnx_ir as ir
import onnxscript.optimizer
import onnxscript.version_converter
from onnx_ir.passes.common import (
    IdentityEliminationPass,
    LiftConstantsToInitializersPass,
    RemoveUnusedNodesPass,
    ShapeInferencePass,
    TopologicalSortPass,
)

from qcompile import execution
from qcompile.errors import CalibrationError, InvalidWeightsError, ModelLoadError, UnsupportedModelError, first_line
from qcompile.frontend import rewrite_rules
from qcompile.graph import DYNAMIC_DIMS_KEY, clone, keeps_dynamic_dims

logger = logging.getLogger(__name__)

CANONICAL_OPSET = 18


def parse_input_shapes(specs: list[str] | None) -> dict[str, tuple[int, ...]]:
    """Parse ``name=1x3x224x224`` strings (the CLI's ``--input-shape``)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs or []:
        name, sep, dims = spec.rpartition("=")
        try:
            shape = tuple(int(dim) for dim in dims.lower().split("x"))
        except ValueError:
            shape = ()
        if not sep or not name or not shape or any(dim <= 0 for dim in shape):
            raise UnsupportedModelError(
                f"--input-shape '{spec}': expected NAME=D1xD2x..., e.g. input=1x3x224x224, with positive integer dims"
            )
        shapes[name] = shape
    return shapes


def _apply_input_shapes(model: ir.Model, shapes: dict[str, tuple[int, ...]], name: str) -> None:
    inputs = {value.name: value for value in model.graph.inputs}
    for input_name, shape in shapes.items():
        if input_name not in inputs:
            raise UnsupportedModelError(
                f"{name}: --input-shape names '{input_name}', which is not an input; "
                f"inputs are {sorted(str(key) for key in inputs)}"
            )
        value = inputs[input_name]
        if value.shape is not None and len(value.shape) != len(shape):
            raise UnsupportedModelError(
                f"{name}: input '{input_name}' has rank {len(value.shape)}, but --input-shape gives {len(shape)} dims"
            )
        if value.shape is not None:
            for axis, (old, new) in enumerate(zip(value.shape, shape, strict=True)):
                if isinstance(old, int) and old != new:
                    raise UnsupportedModelError(
                        f"{name}: input '{input_name}' dim {axis} is fixed at {old}; --input-shape cannot make it {new}"
                    )
        value.shape = ir.Shape(shape)
    for value in model.graph.inputs:
        if value.shape is None or not all(isinstance(dim, int) for dim in value.shape):
            raise UnsupportedModelError(
                f"{name}: input '{value.name}' has shape {value.shape} with unknown dims; give it a static "
                f"shape with --input-shape {value.name}=1x... (one integer per dim)"
            )


def shapes_from_sample(
    model: ir.Model, sample: dict[str, np.ndarray], given: dict[str, tuple[int, ...]] | None, name: str
) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """Static shapes for the inputs: ``given`` (``--input-shape``) where it names one, else the shape of the
    first calibration sample for every input with dynamic dims. Returns all shapes, and those taken from the
    sample. A sample that disagrees with a fixed dim, or lacks an input, is an error naming both."""
    given = dict(given or {})
    from_sample: dict[str, tuple[int, ...]] = {}
    for value in model.graph.inputs:
        input_name = str(value.name)
        if input_name in given or (value.shape is not None and all(isinstance(dim, int) for dim in value.shape)):
            continue
        if input_name not in sample:
            raise CalibrationError(
                f"{name}: the first calibration sample has no array for input '{input_name}' (it has "
                f"{sorted(sample)}); its dynamic dims are fixed from the samples"
            )
        shape = tuple(int(dim) for dim in np.shape(sample[input_name]))
        declared = value.shape
        if declared is not None and (
            len(declared) != len(shape)
            or any(isinstance(dim, int) and dim != seen for dim, seen in zip(declared, shape, strict=False))
        ):
            raise CalibrationError(
                f"{name}: input '{input_name}' is declared [{', '.join(str(dim) for dim in declared)}], but the "
                f"first calibration sample has shape {list(shape)}"
            )
        from_sample[input_name] = shape
    if from_sample:
        logger.info("%s: dynamic dims fixed from the first calibration sample: %s", name, from_sample)
    return {**given, **from_sample}, from_sample


def _observe_shapes(model: ir.Model, sample: dict[str, np.ndarray], name: str) -> int:
    """Give every value whose shape inference left unknown the shape and type it has when the float model
    runs on ``sample`` (data-dependent shapes, ops onnx's inference cannot follow). Returns how many."""
    unknown = [
        value
        for node in model.graph
        for value in node.outputs
        if value.shape is None or value.type is None or not all(isinstance(dim, int) for dim in value.shape)
    ]
    if not unknown:
        return 0
    feed = {
        str(value.name): np.asarray(sample[str(value.name)]).astype(value.dtype.numpy(), copy=False)
        for value in model.graph.inputs
        if value.dtype is not None and str(value.name) in sample
    }
    names = [str(value.name) for value in unknown]
    try:
        arrays = execution.session(model, extra_outputs=names).run(names, feed)
    except Exception as error:  # onnxruntime's own error types
        raise UnsupportedModelError(
            f"{name}: onnxruntime cannot run the normalized model on the first calibration sample "
            f"({first_line(error)}); check that the samples match the model's inputs"
        ) from error
    for value, array in zip(unknown, arrays, strict=True):
        value.shape = ir.Shape(np.shape(array))
        if value.type is None:
            value.type = ir.TensorType(ir.DataType.from_numpy(np.asarray(array).dtype))
    logger.info("%s: %d value shapes taken from a run on the first calibration sample", name, len(unknown))
    return len(unknown)


# Inputs of these ops that hold weights (quantized, folded or scaled by the passes): a non-finite value there
# is a broken model. Other constants may hold +-inf on purpose: attention-mask fills (Where / Add of -inf or
# float-min), clamps (Max / Min / Clip bounds).
WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (0, 1, 2),
    "MatMul": (0, 1),
    "Gather": (0,),
    "LayerNormalization": (1, 2),
    "BatchNormalization": (1, 2, 3, 4),
    "InstanceNormalization": (1, 2),
}
# Ops a weight may pass through on its way to its reader (a transposed or reshaped weight).
_WEIGHT_PASSING = frozenset({"Transpose", "Reshape", "Cast", "Squeeze", "Unsqueeze", "Identity"})


def _read_as_weight(value: ir.Value) -> ir.Node | None:
    """The node that reads ``value`` (directly or through layout ops) in one of its weight inputs, or None."""
    stack = [value]
    while stack:
        current = stack.pop()
        for node, index in current.uses():
            if index in WEIGHT_INPUTS.get(node.op_type, ()):
                return node
            if node.op_type in _WEIGHT_PASSING and index == 0:
                stack.extend(node.outputs)
    return None


def check_weights(model: ir.Model, name: str) -> None:
    """Raise :class:`InvalidWeightsError` naming the first floating-point constant that holds NaN, or +-Inf
    in a weight (:data:`WEIGHT_INPUTS`); +-Inf in any other constant (a mask fill, a clamp) is accepted."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or not np.issubdtype(tensor.dtype.numpy(), np.floating):
            continue
        array = tensor.numpy()
        if np.isfinite(array).all():
            continue
        nans = int(np.isnan(array).sum())
        reader = _read_as_weight(value)
        if nans:
            raise InvalidWeightsError(
                f"{name}: constant '{value.name}' holds {nans} NaN values; fix the model (a diverged training "
                "run?) before compiling it"
            )
        if reader is not None:
            raise InvalidWeightsError(
                f"{name}: weight '{value.name}' (read by {reader.op_type} '{reader.name}') holds "
                f"{int(np.isinf(array).sum())} Inf values; fix the model (a diverged training run?) before compiling it"
            )
        logger.info("%s: constant '%s' holds +-inf (a mask fill or clamp): accepted", name, value.name)


def _constant(model: ir.Model, name: str, array: np.ndarray) -> ir.Value:
    """A new initializer ``name`` holding ``array``."""
    constant = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        const_value=ir.tensor(array, name=name),
    )
    model.graph.register_initializer(constant)
    return constant


def _scalar(model: ir.Model, name: str, value: float, dtype: ir.DataType) -> ir.Value:
    return _constant(model, name, np.array(value, dtype=dtype.numpy()))


def _int64s(model: ir.Model, name: str, values: list[int]) -> ir.Value:
    return _constant(model, name, np.array(values, np.int64))


Step = tuple[str, list[ir.Value | int | None], dict[str, Any]]


# The nodes a decomposition writes are opset-18 ops already. They sit in this domain while onnx's converter takes
# the rest of the model down, which it would otherwise try to "adapt" from the model's opset, and has no adapter
# for some ops whose later versions only added types (ConstantOfShape 20 -> 19).
_WRITTEN_OUT = "qcompile.opset18"


def _replace_with(
    model: ir.Model,
    node: ir.Node,
    build: list[Step],
    also: dict[int, int | ir.Value] | None = None,
    domain: str = _WRITTEN_OUT,
) -> None:
    """Replace ``node`` by a chain of ``(op, inputs, attributes)`` in ``domain``: an input ``None`` in the list
    stands for the previous node's output, an integer ``k`` for the output of step ``k``; the last node's output
    takes over ``node``'s first output, and ``also`` maps its other outputs to a step (or to a value)."""
    base = node.name or str(node.outputs[0].name)
    created: list[ir.Node] = []
    previous: ir.Value | None = None
    for index, (op, inputs, attributes) in enumerate(build):
        wired = [
            previous if value is None else created[value].outputs[0] if isinstance(value, int) else value
            for value in inputs
        ]
        created.append(ir.node(op, wired, attributes=attributes, domain=domain, name=f"{base}_{op.lower()}_{index}"))
        previous = created[-1].outputs[0]
    model.graph.insert_after(node, created)
    assert previous is not None
    takeovers: list[tuple[ir.Value, ir.Value]] = [(node.outputs[0], previous)]
    for index, source in (also or {}).items():
        takeovers.append((node.outputs[index], created[source].outputs[0] if isinstance(source, int) else source))
    for old, new in takeovers:
        if new.producer() in created:
            new.name, new.shape, new.type = old.name, old.shape, old.type
        elif old.is_graph_output():  # a graph output that is an input as it is
            new = ir.node("Identity", [new], domain=domain, name=f"{old.name}_identity").outputs[0]
            model.graph.insert_after(created[-1], new.producer())  # type: ignore[arg-type]
            new.name, new.shape, new.type = old.name, old.shape, old.type
        old.replace_all_uses_with(new, replace_graph_outputs=True)
    model.graph.remove(node, safe=True)


def _decompose_gelu(model: ir.Model, node: ir.Node) -> None:
    """Gelu (opset 20) as the erf (or tanh) formula torch's TorchScript exporter writes, which onnxruntime
    fuses back into its Gelu kernel and the integer lowering recognizes."""
    x = node.inputs[0]
    assert x is not None and x.dtype is not None
    base, dtype = node.name or str(node.outputs[0].name), x.dtype
    approximate = node.attributes.get("approximate")
    half, one = _scalar(model, f"{base}_half", 0.5, dtype), _scalar(model, f"{base}_one", 1.0, dtype)
    if approximate is not None and approximate.as_string() == "tanh":
        cube, coefficient = _scalar(model, f"{base}_three", 3.0, dtype), _scalar(model, f"{base}_c", 0.044715, dtype)
        root = _scalar(model, f"{base}_sqrt_2_over_pi", float(np.sqrt(2.0 / np.pi)), dtype)
        chain: list[Step] = [
            ("Pow", [x, cube], {}),
            ("Mul", [None, coefficient], {}),
            ("Add", [x, None], {}),
            ("Mul", [None, root], {}),
            ("Tanh", [None], {}),
        ]
    else:
        chain = [("Div", [x, _scalar(model, f"{base}_sqrt2", float(np.sqrt(2.0)), dtype)], {}), ("Erf", [None], {})]
    _replace_with(model, node, [*chain, ("Add", [None, one], {}), ("Mul", [x, None], {}), ("Mul", [None, half], {})])


def _decompose_rms_norm(model: ir.Model, node: ir.Node) -> None:
    """RMSNormalization (opset 23): ``x / sqrt(mean(x^2 over the normalized axes) + epsilon) * scale``."""
    x, scale = node.inputs[0], node.inputs[1]
    assert x is not None and x.dtype is not None
    rank = x.shape.rank() if x.shape is not None else None
    axis = node.attributes.get("axis")
    first = axis.as_int() if axis is not None else -1
    if first < 0 and rank is None and first != -1:
        raise UnsupportedModelError(
            f"RMSNormalization '{node.name}' normalizes axes {first}.. of a value of unknown rank"
        )
    axes = list(range(first % rank, rank)) if rank is not None else [-1]
    base, dtype = node.name or str(node.outputs[0].name), x.dtype
    epsilon = node.attributes.get("epsilon")
    axes_value = _int64s(model, f"{base}_axes", axes)
    _replace_with(
        model,
        node,
        [
            ("Mul", [x, x], {}),
            ("ReduceMean", [None, axes_value], {"keepdims": 1}),
            ("Add", [None, _scalar(model, f"{base}_epsilon", epsilon.as_float() if epsilon else 1e-5, dtype)], {}),
            ("Sqrt", [None], {}),
            ("Div", [x, None], {}),
            ("Mul", [None, scale], {}),
        ],
    )


def _decompose_attention(model: ir.Model, node: ir.Node) -> None:
    """Attention (opset 23) as the formula it is defined by: ``Softmax(Q K^T * scale [softcapped] + mask
    [+ causal mask]) V``, on 4-D ``[batch, heads, length, head size]`` or 3-D ``[batch, length, heads x head
    size]`` Q, K, V; a boolean mask keeps where True; a KV cache (``past_key`` / ``past_value``) is
    concatenated in front of K / V and returned as ``present_key`` / ``present_value``, and a causal mask then
    lets query ``i`` see the past and keys up to ``i``; grouped K/V heads are repeated (each K/V head serves
    ``q_heads / kv_heads`` consecutive query heads); a row that every key is masked from gives 0, as the op
    defines. The fourth output (the raw scores) and ``nonpad_kv_seqlen`` (opset 24) are refused."""
    q, k, v = node.inputs[0], node.inputs[1], node.inputs[2]
    optional = [*node.inputs[3:], None, None, None, None]
    mask, past_key, past_value, nonpad = optional[0], optional[1], optional[2], optional[3]
    where = f"Attention '{node.name}'"
    if nonpad is not None or (len(node.outputs) > 3 and (node.outputs[3].uses() or node.outputs[3].is_graph_output())):
        raise UnsupportedModelError(f"{where}: nonpad_kv_seqlen and the qk_matmul output are not decomposed yet")
    if (past_key is None) != (past_value is None):
        raise UnsupportedModelError(f"{where}: past_key and past_value must be given together")
    ranks = {value.shape.rank() if value is not None and value.shape is not None else None for value in (q, k, v)}
    if ranks not in ({3}, {4}):
        raise UnsupportedModelError(
            f"{where}: Q, K, V must all be 3-D or all 4-D (their ranks: {sorted(map(str, ranks))})"
        )
    assert q is not None and k is not None and v is not None and q.dtype is not None
    assert q.shape is not None and k.shape is not None and v.shape is not None
    rank = ranks.pop()

    def attribute(name: str, default: int) -> int:
        value = node.attributes.get(name)
        return value.as_int() if value is not None else default

    if rank == 3:
        q_heads, kv_heads = attribute("q_num_heads", 0), attribute("kv_num_heads", 0)
        if not q_heads or not kv_heads:
            raise UnsupportedModelError(f"{where}: 3-D Q, K, V need the q_num_heads and kv_num_heads attributes")
        sizes = [q.shape[2], v.shape[2]]
        head_size = sizes[0] // q_heads if isinstance(sizes[0], int) else None
        value_size = sizes[1] // kv_heads if isinstance(sizes[1], int) else None
    else:
        q_heads, kv_heads = q.shape[1], k.shape[1]  # type: ignore[assignment]
        head_size = q.shape[3] if isinstance(q.shape[3], int) else None
        value_size = v.shape[3] if isinstance(v.shape[3], int) else None
    base, dtype = node.name or str(node.outputs[0].name), q.dtype
    scale_attribute, softcap_attribute = node.attributes.get("scale"), node.attributes.get("softcap")
    if scale_attribute is not None:
        scale = scale_attribute.as_float()
    elif head_size is not None:
        scale = 1.0 / float(np.sqrt(head_size))
    else:
        raise UnsupportedModelError(f"{where}: the head size is unknown and no scale is given")
    zero, blocked = _scalar(model, f"{base}_zero", 0.0, dtype), _scalar(model, f"{base}_blocked", -np.inf, dtype)
    steps: list[Step] = []

    def add(op: str, inputs: list[ir.Value | int | None], **attributes: Any) -> int:
        steps.append((op, inputs, attributes))
        return len(steps) - 1

    def split_heads(value: ir.Value, heads: int, label: str) -> int:
        shape = _int64s(model, f"{base}_{label}_heads", [0, 0, heads, -1])
        return add("Transpose", [add("Reshape", [value, shape])], perm=[0, 2, 1, 3])

    queries: ir.Value | int = split_heads(q, q_heads, "q") if rank == 3 else q
    keys: ir.Value | int = split_heads(k, kv_heads, "k") if rank == 3 else k
    values: ir.Value | int = split_heads(v, kv_heads, "v") if rank == 3 else v
    if past_key is not None:
        keys, values = add("Concat", [past_key, keys], axis=2), add("Concat", [past_value, values], axis=2)
    present = {1: keys, 2: values}
    if q_heads != kv_heads:
        if not (isinstance(q_heads, int) and isinstance(kv_heads, int) and q_heads % kv_heads == 0):
            raise UnsupportedModelError(f"{where}: {q_heads} query heads cannot share {kv_heads} K/V heads")
        if head_size is None or value_size is None:
            raise UnsupportedModelError(f"{where}: grouped K/V heads of unknown head size are not decomposed")
        group = _int64s(model, f"{base}_group", [1, 1, q_heads // kv_heads, 1, 1])
        middle = _int64s(model, f"{base}_middle", [2])

        def repeat(value: ir.Value | int, size: int, label: str) -> int:
            widened = add("Expand", [add("Unsqueeze", [value, middle]), group])
            return add("Reshape", [widened, _int64s(model, f"{base}_{label}_repeated", [0, q_heads, -1, size])])

        keys, values = repeat(keys, head_size, "k"), repeat(values, value_size, "v")
    scores = add("MatMul", [queries, add("Transpose", [keys], perm=[0, 1, 3, 2])])
    scores = add("Mul", [scores, _scalar(model, f"{base}_scale", scale, dtype)])
    softcap = softcap_attribute.as_float() if softcap_attribute is not None else 0.0
    if softcap > 0:
        cap = _scalar(model, f"{base}_softcap", softcap, dtype)
        scores = add("Mul", [add("Tanh", [add("Div", [scores, cap])]), cap])
    if mask is not None and mask.dtype == ir.DataType.BOOL:
        scores = add("Add", [scores, add("Where", [mask, zero, blocked])])
    elif mask is not None:
        scores = add("Add", [scores, mask])
    if attribute("is_causal", 0):
        one = ir.tensor(np.ones(1, dtype.numpy()))
        lengths = add("Concat", [add("Shape", [queries], start=2, end=3), add("Shape", [keys], start=2, end=3)], axis=0)
        allowed: list[ir.Value | int | None] = [add("ConstantOfShape", [lengths], value=one)]
        if past_key is not None:  # query i comes after the cache: it sees keys j <= past + i
            allowed.append(add("Squeeze", [add("Shape", [past_key], start=2, end=3)]))
        visible = add("Trilu", allowed, upper=0)
        scores = add("Add", [scores, add("Where", [add("Equal", [visible, zero]), blocked, zero])])
    output = add("MatMul", [add("Softmax", [scores], axis=-1), values])
    if mask is not None:  # every key masked: softmax of -inf only is NaN, the op defines 0
        output = add("Where", [add("IsNaN", [output]), zero, output])
    if rank == 3:
        merged = add("Transpose", [output], perm=[0, 2, 1, 3])
        add("Reshape", [merged, _int64s(model, f"{base}_merged", [0, 0, -1])])
    used = {
        index: source
        for index, source in present.items()
        if len(node.outputs) > index and (node.outputs[index].uses() or node.outputs[index].is_graph_output())
    }
    _replace_with(model, node, steps, also=used)


# Ops newer than the canonical opset with no older form for onnx's converter to map to: written out in
# opset-18 ops first (exactly: the same formulas the ops are defined by).
DECOMPOSED: dict[str, Callable[[ir.Model, ir.Node], None]] = {
    "Gelu": _decompose_gelu,
    "RMSNormalization": _decompose_rms_norm,
    "Attention": _decompose_attention,
}


def _downgrade(model: ir.Model, opset: int, name: str) -> ir.Model:
    """Opset 19..23 down to the canonical opset: ops that have no older form are decomposed
    (:data:`DECOMPOSED`), then onnx's converter maps the rest (onnxscript's only goes up). A model that cannot be
    taken down (an op with no older form that qcompile does not decompose, or a form of one it does not) stays at
    its own opset: the passes read opset-18 ops, which later opsets keep, and onnxruntime runs the rest."""
    decomposed: dict[str, int] = {}
    if any(node.op_type in DECOMPOSED for node in model.graph):
        try:  # the decompositions need the dtype (and rank) of the values they read
            ShapeInferencePass(strict_mode=False)(model)
        except Exception as error:
            raise ModelLoadError(f"{name}: shape inference failed at opset {opset}: {first_line(error)}") from error
    kept: list[str] = []
    for node in list(model.graph):
        rewrite = DECOMPOSED.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if rewrite is None:
            continue
        try:
            rewrite(model, node)
        except UnsupportedModelError as error:
            kept.append(str(error))
            continue
        decomposed[node.op_type] = decomposed.get(node.op_type, 0) + 1
    if decomposed:
        logger.info("%s: decomposed %s for opset %d", name, decomposed, CANONICAL_OPSET)
        model.opset_imports[_WRITTEN_OUT] = 1
    converted = model
    if not kept:
        try:
            converted = _onnx_convert(model, opset, name, "down")
        except UnsupportedModelError as error:
            reason = first_line(error.__cause__ or error)
            kept.append(reason.split("failed: ", 1)[-1])  # the converter's assertion, without its source line
    for node in converted.graph:
        if node.domain == _WRITTEN_OUT:
            node.domain = ""
    converted.opset_imports.pop(_WRITTEN_OUT, None)
    if kept:
        logger.warning(
            "%s stays at opset %d (%s): its onnxruntime files run at that opset; ops qcompile does not know stay float",
            name,
            opset,
            kept[0],
        )
    return converted


# At opset 13 Squeeze's and Unsqueeze's ``axes``, Split's ``split`` and ReduceSum's ``axes`` moved from attributes
# to inputs. onnxscript's converter bumps such nodes' opset without moving them (onnxruntime then refuses the
# model: "Unrecognized attribute: axes for operator Squeeze"); onnx's own converter has adapters for every step.
AXES_BECAME_INPUTS = 13


def _onnx_convert(model: ir.Model, opset: int, name: str, direction: str) -> ir.Model:
    try:
        converted = onnx.version_converter.convert_version(ir.serde.serialize_model(model), CANONICAL_OPSET)
    except Exception as error:  # the converter raises RuntimeError / ValueError / its own types
        raise UnsupportedModelError(
            f"{name}: cannot convert opset {opset} {direction} to {CANONICAL_OPSET}: {first_line(error)}; "
            f"export the model at opset {CANONICAL_OPSET}, or report the operator to qcompile"
        ) from error
    logger.info("%s: converted opset %d %s to %d", name, opset, direction, CANONICAL_OPSET)
    return ir.serde.deserialize_model(converted)


# Reductions whose ``axes`` became an input at opset 18 (ReduceSum's did at 13).
_AXES_AS_INPUT = frozenset(
    {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum"}
    | {"ReduceLogSumExp", "ReduceSumSquare", "ReduceSum"}
)


def _reduce_axes_to_inputs(model: ir.Model) -> None:
    """Move a reduction's ``axes`` attribute to its input, as opset 18 wants: onnxscript's converter bumps
    the opset of a ReduceMean with an ``axes`` attribute without moving it, and onnxruntime then rejects
    the model ("Unrecognized attribute: axes")."""
    for node in model.graph:
        axes = node.attributes.get("axes")
        if node.op_type not in _AXES_AS_INPUT or axes is None or node.domain not in ("", "ai.onnx"):
            continue
        constant = _int64s(model, f"{node.name or node.outputs[0].name}_axes", list(axes.as_ints()))
        del node.attributes["axes"]
        if len(node.inputs) < 2:
            node.resize_inputs(2)
        node.replace_input_with(1, constant)


def _fold_weight_transposes(model: ir.Model) -> int:
    """Fold ``Transpose(constant)`` nodes whose output only feeds MatMul / Gemm weight inputs (onnxscript's
    folding skips large tensors; a tied LM head is 49152 x 576 in SmolLM2). Returns how many were folded."""
    folded = 0
    for node in list(model.graph):
        source = node.inputs[0] if node.op_type == "Transpose" and node.inputs else None
        if source is None or source.const_value is None or source.is_graph_input():
            continue
        output = node.outputs[0]
        uses = output.uses()
        if (
            not uses
            or output.is_graph_output()
            or any(use.node.op_type not in ("MatMul", "Gemm") or use.idx != 1 for use in uses)
        ):
            continue
        perm = node.attributes.get("perm")
        array = source.const_value.numpy()
        transposed = np.ascontiguousarray(np.transpose(array, perm.as_ints() if perm is not None else None))
        weight = ir.Value(
            name=f"{source.name}_transposed",
            shape=ir.Shape(transposed.shape),
            type=source.type,
            const_value=ir.tensor(transposed, name=f"{source.name}_transposed"),
        )
        model.graph.register_initializer(weight)
        for use in list(uses):
            use.node.replace_input_with(use.idx, weight)
        model.graph.remove(node, safe=True)
        folded += 1
    return folded


def _col2im_as_movement(model: ir.Model) -> int:
    """Rewrite each ``Col2Im`` whose blocks tile the image exactly (strides equal to the block shape, no pads,
    unit dilations, a constant image shape that the blocks divide) as the data movement it then is:
    ``[N, C*kh*kw, Hb*Wb]`` reshaped to ``[N, C, kh, kw, Hb, Wb]``, transposed to ``[N, C, Hb, kh, Wb, kw]`` and
    reshaped to ``[N, C, H, W]`` (no block overlaps another, so nothing is summed). torch exports ``nn.Fold``
    this way (MobileViTv2 folds its patches back with it); the movement is what the integer kernels and the
    quantizer handle, while a ``Col2Im`` kept every layer after it float. Returns how many were rewritten."""
    rewritten = 0
    for node in list(model.graph):
        if node.op_type != "Col2Im" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 3:
            continue
        image, block = (value.const_value if value is not None else None for value in node.inputs[1:])
        if image is None or block is None or image.numpy().size != 2 or block.numpy().size != 2:
            continue
        height, width = (int(v) for v in image.numpy().ravel())
        kh, kw = (int(v) for v in block.numpy().ravel())
        strides, pads, dilations = (node.attributes.get(name) for name in ("strides", "pads", "dilations"))
        if (
            (strides is not None and list(strides.as_ints()) != [kh, kw])
            or (strides is None and (kh, kw) != (1, 1))
            or (pads is not None and any(pads.as_ints()))
            or (dilations is not None and any(d != 1 for d in dilations.as_ints()))
            or height % kh
            or width % kw
        ):
            continue
        base = node.name or str(node.outputs[0].name)
        blocks = [0, -1, kh, kw, height // kh, width // kw]
        _replace_with(
            model,
            node,
            [
                ("Reshape", [node.inputs[0], _int64s(model, f"{base}_blocks", blocks)], {}),
                ("Transpose", [None], {"perm": [0, 1, 4, 2, 5, 3]}),
                ("Reshape", [None, _int64s(model, f"{base}_image", [0, -1, height, width])], {}),
            ],
            domain="",
        )
        rewritten += 1
    return rewritten


def _arranged(
    created: list[ir.Node], base: str, value: ir.Value | None, letters: str, order: list[str]
) -> ir.Value | None:
    """``value``, whose axes are named by ``letters``, with its axes in ``order``: itself, or a Transpose
    appended to ``created``."""
    if list(letters) == order:
        return value
    perm = [letters.index(c) for c in order]
    created.append(ir.node("Transpose", [value], attributes={"perm": perm}, name=f"{base}_t{len(created)}"))
    return created[-1].outputs[0]


def _einsum_as_matmul(model: ir.Model) -> int:
    """Einsum of two operands that is a batched matrix product (CvT's attention ``bhlk,bhtk->bhlt``, linear
    layers written ``bld,dk->blk``) as MatMul between the Transposes that put its operands and result in
    place: the quantizer and the kernels know MatMul. Equations with ellipses, repeated letters, more than one
    contracted letter, or other free letters than one per operand (several in the first where there is no
    batch letter) stay Einsum. Returns how many were rewritten."""
    rewritten = 0
    for node in list(model.graph):
        equation = node.attributes.get("equation") if node.op_type == "Einsum" else None
        if equation is None or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        text = equation.as_string().replace(" ", "")
        if "..." in text or text.count("->") != 1 or text.count(",") != 1:
            continue
        operands, result = text.split("->")
        first, second = operands.split(",")
        if any(len(set(letters)) != len(letters) for letters in (first, second, result)):
            continue
        batch = [c for c in result if c in first and c in second]
        contracted = [c for c in first if c in second and c not in result]
        first_free = [c for c in first if c not in second]
        second_free = [c for c in second if c not in first]
        # (without batch letters the first operand may keep several: a linear layer's tokens, MatMul broadcasts)
        if (
            len(contracted) != 1
            or not first_free
            or (batch and len(first_free) != 1)
            or len(second_free) != 1
            or sorted(result) != sorted(batch + first_free + second_free)
            or len(first) != len(batch) + len(first_free) + 1
            or len(second) != len(batch) + 2
        ):
            continue
        created: list[ir.Node] = []
        base = node.name or str(node.outputs[0].name)
        left = _arranged(created, base, node.inputs[0], first, batch + first_free + contracted)
        right = _arranged(created, base, node.inputs[1], second, batch + contracted + second_free)
        created.append(ir.node("MatMul", [left, right], name=f"{base}_matmul"))
        product = "".join(batch + first_free + second_free)
        output = _arranged(created, base, created[-1].outputs[0], product, list(result))
        assert output is not None
        model.graph.insert_after(node, created)
        old = node.outputs[0]
        output.name, output.shape, output.type = old.name, old.shape, old.type
        old.replace_all_uses_with(output, replace_graph_outputs=True)
        model.graph.remove(node, safe=True)
        rewritten += 1
    return rewritten


def _fold_constant_splits(model: ir.Model) -> int:
    """Fold ``Split`` nodes whose inputs are all constants into one initializer per output (onnxscript's
    folder skips ops with several outputs): a packed query / key / value weight split at run time. Returns
    how many were folded."""
    from onnx.reference import ReferenceEvaluator

    folded = 0
    for node in list(model.graph):
        if node.op_type != "Split" or node.domain not in ("", "ai.onnx"):
            continue
        inputs = [value for value in node.inputs if value is not None]
        if not inputs or any(value.const_value is None or value.is_graph_input() for value in inputs):
            continue
        if any(value.is_graph_output() for value in node.outputs):
            continue
        names = [f"i{index}" if value is not None else "" for index, value in enumerate(node.inputs)]
        proto = ir.serde.serialize_node(node)
        single = onnx.helper.make_node("Split", names, [f"o{k}" for k in range(len(node.outputs))])
        single.attribute.extend(proto.attribute)
        graph = onnx.helper.make_graph(
            [single], "split", [], [onnx.helper.make_tensor_value_info(o, 0, None) for o in single.output]
        )
        evaluator = ReferenceEvaluator(
            onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", model.opset_imports.get("", 18))])
        )
        feeds = {
            name: value.const_value.numpy()
            for name, value in zip(names, node.inputs, strict=True)
            if value is not None and value.const_value is not None
        }
        parts = evaluator.run(None, feeds)
        for output, part in zip(node.outputs, parts, strict=True):
            array = np.ascontiguousarray(part)
            constant = ir.Value(
                name=f"{output.name}_folded", shape=ir.Shape(array.shape), type=output.type,
                const_value=ir.tensor(array, name=f"{output.name}_folded"),
            )  # fmt: skip
            model.graph.register_initializer(constant)
            for use in list(output.uses()):
                use.node.replace_input_with(use.idx, constant)
        model.graph.remove(node, safe=True)
        folded += 1
    return folded


# A ConstantOfShape of at most this many elements is folded (onnxscript keeps every ConstantOfShape, so that a
# large fill does not bloat the file). Exporters build padding amounts and reshape targets from small ones; left
# in, they keep whole shape computations (ConstantOfShape -> Concat -> Reshape -> Slice -> Transpose -> Pad pads)
# out of folding: torch.onnx's TorchScript MobileNetV2 kept 364 such nodes beside its 100 compute nodes.
SMALL_FILL = 1024


# Ops that only move or cut their input: folded on constants of any size (onnxscript's folder skips inputs
# above 1024 elements by default), since the result is no larger than what it reads. A SigLIP attention
# pooling head splits and transposes its in_proj_weight (96 x 32 in the corpus, 2304 x 768 in a base model)
# at run time; left unfolded, the weights were quantized as activations and no kernel read them as weights.
MOVEMENT_FOLDED = frozenset({"Transpose", "Split", "Reshape", "Squeeze", "Unsqueeze", "Slice", "Flatten", "Concat"})


def _fold_small_fills(node: ir.Node) -> bool | None:
    """``should_fold`` for onnxscript's folder (asked once every input is a constant): True for a small
    ConstantOfShape and for a movement op (:data:`MOVEMENT_FOLDED`), else its default rules."""
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type in MOVEMENT_FOLDED:
        return True
    if node.op_type != "ConstantOfShape":
        return None
    shape = node.inputs[0].const_value if node.inputs and node.inputs[0] is not None else None
    if shape is None:
        return None
    return int(np.prod(shape.numpy(), dtype=np.int64)) <= SMALL_FILL or None


def normalize(
    model: ir.Model,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    name: str = "model",
    sample: dict[str, np.ndarray] | None = None,
    dynamic_inputs: frozenset[str] = frozenset(),
) -> ir.Model:
    """Bring ``model`` into canonical form in place (see the module docstring) and return it. With a
    calibration ``sample``, shapes that onnx's inference leaves unknown are taken from a run on it.

    The inputs named in ``dynamic_inputs`` get their static shapes (from ``input_shapes``) only after constant
    folding: what the graph computes from their dynamic dims (reshape targets, masks, position ranges) stays a
    computation, so that the artifact's onnxruntime executors can run other sizes; the model's
    ``metadata_props[DYNAMIC_DIMS_KEY]`` then names those dims (``{input: {axis: name}}``)."""
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    _check_float32(model, name)
    check_weights(model, name)
    dynamic = _dynamic_dims(model, dynamic_inputs)
    if not dynamic:
        _apply_input_shapes(model, input_shapes or {}, name)
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if opset is not None and opset > CANONICAL_OPSET:
        model = _downgrade(model, opset, name)
    elif opset is not None and opset < AXES_BECAME_INPUTS:
        model = _onnx_convert(model, opset, name, "up")  # opset 7..12: paddle2onnx, older converters
    elif opset != CANONICAL_OPSET:
        try:
            onnxscript.version_converter.convert_version(model, CANONICAL_OPSET)
        except Exception as error:
            raise UnsupportedModelError(
                f"{name}: cannot convert opset {opset} to {CANONICAL_OPSET}: {error}"
            ) from error
        if model.opset_imports.get("") != CANONICAL_OPSET:
            raise UnsupportedModelError(f"{name}: opset {opset} could not be converted to {CANONICAL_OPSET}")
        _reduce_axes_to_inputs(model)
        logger.info("%s: converted opset %s to %d", name, opset, CANONICAL_OPSET)
    try:
        _einsum_as_matmul(model)
        _fold_constant_splits(model)
        onnxscript.optimizer.fold_constants(model, onnx_shape_inference=True, should_fold=_fold_small_fills)
        _fold_weight_transposes(model)
        _col2im_as_movement(model)
        _explicit_valid_padding(model)
        rewrite_rules.apply_normalization_rules(model)
    except Exception as error:
        raise ModelLoadError(f"{name}: normalization failed: {error}") from error
    if dynamic:
        _apply_input_shapes(model, input_shapes or {}, name)
        model.metadata_props[DYNAMIC_DIMS_KEY] = json.dumps(dynamic, sort_keys=True)
    try:
        IdentityEliminationPass()(model)
        LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        RemoveUnusedNodesPass()(model)
        TopologicalSortPass()(model)
        ShapeInferencePass(strict_mode=False)(model)
    except Exception as error:
        raise ModelLoadError(f"{name}: normalization failed: {error}") from error
    _check_remaining_ops(model, name)
    if sample is not None:
        _observe_shapes(model, sample, name)
    _check_shapes(model, name)
    _explicit_same_padding(model)
    return model


_WINDOW_OPS = frozenset({"Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool"})


def _explicit_valid_padding(model: ir.Model) -> None:
    """``auto_pad="VALID"`` (no padding, by the spec) written as the default explicit zero pads, so that a zero
    Pad before the window (TF-style "same" padding, as Hugging Face's EfficientNet exports it) folds into it."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type in _WINDOW_OPS and node.domain in ("", "ai.onnx"):
            auto_pad = node.attributes.get("auto_pad")
            if auto_pad is not None and auto_pad.as_string() == "VALID":
                del node.attributes["auto_pad"]


def _explicit_same_padding(model: ir.Model) -> None:
    """``auto_pad="SAME_UPPER"`` / ``"SAME_LOWER"`` on a window whose input's spatial dims are known, written as
    the explicit pads the spec defines: per axis, ``max((ceil(in / stride) - 1) * stride + (k - 1) * dilation +
    1 - in, 0)`` in total, the odd one at the end (UPPER) or the start (LOWER). What reads pads (the integer
    oracle, qcompile's kernels, BN and Pad folding) then needs no auto_pad of its own."""
    for node in model.graph:
        if node.op_type not in _WINDOW_OPS - {"ConvTranspose"} or node.domain not in ("", "ai.onnx"):
            continue
        auto_pad = node.attributes.get("auto_pad")
        mode = auto_pad.as_string() if auto_pad is not None else "NOTSET"
        shape = node.inputs[0].shape if node.inputs and node.inputs[0] is not None else None
        if mode not in ("SAME_UPPER", "SAME_LOWER") or shape is None or len(shape) < 3:
            continue
        kernel = node.attributes.get("kernel_shape")
        weight = node.inputs[1] if node.op_type == "Conv" and len(node.inputs) > 1 else None
        dims: list[Any] = list(kernel.as_ints()) if kernel is not None else []
        if kernel is None and weight is not None and weight.shape is not None:
            dims = list(weight.shape[2:])
        spatial = [dim for dim in shape[2:] if isinstance(dim, int)]
        kernel_dims = [dim for dim in dims if isinstance(dim, int)]
        if len(spatial) != len(shape) - 2 or len(kernel_dims) != len(spatial) or len(dims) != len(spatial):
            continue
        strides = node.attributes.get("strides")
        dilations = node.attributes.get("dilations")
        stride_values = list(strides.as_ints()) if strides is not None else [1] * len(spatial)
        dilation_values = list(dilations.as_ints()) if dilations is not None else [1] * len(spatial)
        begins, ends = [], []
        for size, k, stride, dilation in zip(spatial, kernel_dims, stride_values, dilation_values, strict=True):
            total = max((-(-size // stride) - 1) * stride + (k - 1) * dilation + 1 - size, 0)
            small, large = total // 2, total - total // 2
            begins.append(small if mode == "SAME_UPPER" else large)
            ends.append(large if mode == "SAME_UPPER" else small)
        del node.attributes["auto_pad"]
        node.attributes["pads"] = ir.AttrInt64s("pads", [*begins, *ends])


_HALF = frozenset({ir.DataType.FLOAT16, ir.DataType.BFLOAT16})


def _dynamic_dims(model: ir.Model, inputs: frozenset[str]) -> dict[str, dict[int, str]]:
    """``{input: {axis: name}}``: the dims of ``inputs`` the model leaves dynamic (unnamed ones get a name)."""
    dims: dict[str, dict[int, str]] = {}
    for value in model.graph.inputs:
        if str(value.name) not in inputs or value.shape is None:
            continue
        named = {
            axis: str(dim.value) if isinstance(dim, ir.SymbolicDim) and dim.value else f"{value.name}_{axis}"
            for axis, dim in enumerate(value.shape)
            if not isinstance(dim, int)
        }
        if named:
            dims[str(value.name)] = named
    return dims


# Ops whose folding turns a dynamic graph static: what specialize() folds (int64 shape arithmetic, and the
# masks and ranges built from it); never QuantizeLinear / DequantizeLinear of a weight.
_NEVER_SPECIALIZED = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})


def specialize(model: ir.Model) -> ir.Model:
    """A copy of ``model`` (whose inputs have static shapes) with the computations of shapes folded into
    constants: what TVM and the integer lowering take from a model that keeps dynamic dims for onnxruntime."""
    if not keeps_dynamic_dims(model):
        return model
    copy = clone(model)
    del copy.metadata_props[DYNAMIC_DIMS_KEY]

    def fold(node: ir.Node) -> bool | None:
        return False if node.op_type in _NEVER_SPECIALIZED else _fold_small_fills(node)

    onnxscript.optimizer.fold_constants(copy, onnx_shape_inference=True, should_fold=fold)
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(copy)
    RemoveUnusedNodesPass()(copy)
    return copy


def _check_float32(model: ir.Model, name: str) -> None:
    """qcompile quantizes from float32: a half-precision model is refused with what to do (its scales,
    calibration and QDQ graph would otherwise mix float16 into ops that onnxruntime runs only in float32)."""
    values = [*model.graph.inputs, *model.graph.outputs, *model.graph.initializers.values()]
    half = next((value for value in values if value.dtype in _HALF), None)
    if half is not None:
        raise UnsupportedModelError(
            f"{name}: '{half.name}' is {str(half.dtype).lower()}: qcompile quantizes float32 models; export the "
            "model in float32 (torch: model.float() before export; onnxconverter-common can convert an ONNX file)"
        )


def _check_remaining_ops(model: ir.Model, name: str) -> None:
    for node in model.graph:
        if node.op_type == "BatchNormalization":
            logger.info("%s: BatchNormalization '%s' has no Conv/Gemm to fold into; it stays", name, node.name)
        if node.op_type == "Dropout":
            raise UnsupportedModelError(
                f"{name}: Dropout '{node.name}' is in training mode; export the model in inference mode (model.eval())"
            )


def _check_shapes(model: ir.Model, name: str) -> None:
    """Every input and output of a quantizable node must have a fully known shape."""
    for node in model.graph:
        if node.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        for value in (*node.inputs, *node.outputs):
            if value is None:
                continue
            if value.shape is None or not all(isinstance(dim, int) for dim in value.shape):
                raise UnsupportedModelError(
                    f"{name}: value '{value.name}' of {node.op_type} '{node.name}' has unknown shape "
                    f"{value.shape} after shape inference; pin the dynamic input dims with --input-shape"
                )
