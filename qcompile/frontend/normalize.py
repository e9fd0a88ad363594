"""Normalization: one canonical form for every model the passes see.

After :func:`normalize`, a model is at opset :data:`CANONICAL_OPSET`; every graph input has a static
shape; Constant nodes are initializers; constant subexpressions are folded (a Transpose of a constant read as a
MatMul / Gemm weight whatever its size: an LM head tied to the embedding table gets its own transposed
weight, so it is quantized as a weight, not as an activation); BatchNormalization that
follows a Conv or Gemm is folded into its weights; Identity and inference-mode Dropout are gone; every
value has an inferred type and shape; and no floating-point weight is NaN or Inf.
"""

from __future__ import annotations

import logging

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

from qcompile.errors import InvalidWeightsError, ModelLoadError, UnsupportedModelError
from qcompile.frontend import rewrite_rules

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


def check_weights(model: ir.Model, name: str) -> None:
    """Raise :class:`InvalidWeightsError` naming the first floating-point weight with NaN or Inf."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or not np.issubdtype(tensor.dtype.numpy(), np.floating):
            continue
        array = tensor.numpy()
        if not np.isfinite(array).all():
            bad = int((~np.isfinite(array)).sum())
            raise InvalidWeightsError(
                f"{name}: weight '{value.name}' holds {bad} NaN/Inf values; fix the "
                "model (a diverged training run?) before compiling it"
            )


def _downgrade(model: ir.Model, opset: int, name: str) -> ir.Model:
    """Opset 19..23 down to the canonical opset with onnx's converter (onnxscript's only goes up)."""
    try:
        converted = onnx.version_converter.convert_version(ir.serde.serialize_model(model), CANONICAL_OPSET)
    except Exception as error:  # the converter raises RuntimeError / ValueError / its own types
        raise UnsupportedModelError(
            f"{name}: cannot convert opset {opset} down to {CANONICAL_OPSET}: {error}; "
            f"export the model at opset {CANONICAL_OPSET}"
        ) from error
    logger.info("%s: converted opset %d down to %d", name, opset, CANONICAL_OPSET)
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
        values = np.array(axes.as_ints(), np.int64)
        constant = ir.Value(
            name=f"{node.name or node.outputs[0].name}_axes",
            shape=ir.Shape(values.shape),
            type=ir.TensorType(ir.DataType.INT64),
            const_value=ir.tensor(values, name=f"{node.name or node.outputs[0].name}_axes"),
        )
        model.graph.register_initializer(constant)
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


def normalize(model: ir.Model, input_shapes: dict[str, tuple[int, ...]] | None = None, name: str = "model") -> ir.Model:
    """Bring ``model`` into canonical form in place (see the module docstring) and return it."""
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    check_weights(model, name)
    _apply_input_shapes(model, input_shapes or {}, name)
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if opset is not None and opset > CANONICAL_OPSET:
        model = _downgrade(model, opset, name)
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
        onnxscript.optimizer.fold_constants(model, onnx_shape_inference=True)
        _fold_weight_transposes(model)
        rewrite_rules.apply_normalization_rules(model)
        IdentityEliminationPass()(model)
        LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        RemoveUnusedNodesPass()(model)
        TopologicalSortPass()(model)
        ShapeInferencePass(strict_mode=False)(model)
    except Exception as error:
        raise ModelLoadError(f"{name}: normalization failed: {error}") from error
    _check_remaining_ops(model, name)
    _check_shapes(model, name)
    return model


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
