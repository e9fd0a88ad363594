"""MatMul + bias Add -> Reshape, Gemm, Reshape: exact, so that the bias is quantized with the layer.

A linear layer exported from PyTorch is ``Add(MatMul(x, W), b)`` with ``x`` of shape ``[..., K]``, ``W``
constant ``[K, N]`` and ``b`` constant ``[N]``. It equals ``Reshape(Gemm(Reshape(x, [-1, K]), W, b), [..., N])``
exactly (the same products and sums, in the same order per output element). As a Gemm, the bias becomes an
int32 input of the quantized kernel (QGemm in onnxruntime); left as a float Add after a quantized MatMul,
onnxruntime's MatMul+Add fusion would instead turn the pair into a float Gemm that dequantizes the weights
on every run.

After this pass, no MatMul with a constant 2-D weight feeds a sole Add of a constant bias.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.graph import add_initializer, is_constant, keeps_dynamic_dims
from qcompile.passes.annotate import require_unannotated

_INT64 = ir.TensorType(ir.DataType.INT64)


def _static(shape: ir.Shape | None) -> list[int] | None:
    if shape is None or not all(isinstance(dim, int) for dim in shape):
        return None
    return [int(dim) for dim in shape]  # type: ignore[arg-type]


def _bias_of(node: ir.Node, columns: int) -> tuple[ir.Node, ir.Value] | None:
    output = node.outputs[0]
    uses = list(output.uses())
    if len(uses) != 1 or output.is_graph_output():
        return None
    add = uses[0].node
    if add.op_type != "Add":
        return None
    other = add.inputs[1 - uses[0].idx]
    if other is None or not is_constant(other):
        return None
    bias = other.const_value.numpy()  # type: ignore[union-attr]
    if bias.size != columns or bias.shape[-1] != columns:
        return None
    return add, other


class MatMulAddToGemmPass(ir.passes.InPlacePass):
    """After this pass, every MatMul(x, W) + b with constant W [K, N] and b [N] is a Gemm between Reshapes."""

    def requires(self, model: ir.Model) -> None:
        require_unannotated(model, "MatMulAddToGemmPass")

    def ensures(self, model: ir.Model) -> None:
        for node in model.graph:
            if node.op_type != "MatMul" or not is_constant(node.inputs[1]):
                continue
            weight = node.inputs[1].const_value  # type: ignore[union-attr]
            shape = _static(node.inputs[0].shape) if node.inputs[0] is not None else None
            if (
                weight is not None
                and weight.shape.rank() == 2
                and shape is not None
                and _bias_of(node, int(weight.shape.numpy()[1]))
            ):
                raise ir.passes.PostconditionError(f"MatMul '{node.name}' still feeds a bias Add")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        rewritten = 0
        for node in list(graph):
            if node.op_type != "MatMul" or not is_constant(node.inputs[1]):
                continue
            weight, activation = node.inputs[1], node.inputs[0]
            if weight.const_value.shape.rank() != 2 or activation is None or activation.shape is None:  # type: ignore[union-attr]
                continue
            columns = int(weight.const_value.shape.numpy()[1])  # type: ignore[union-attr]
            found = _bias_of(node, columns)
            output_shape = _static(found[0].outputs[0].shape) if found else None
            input_shape = _static(activation.shape)
            if found is None or output_shape is None or input_shape is None:
                continue
            add, bias = found
            rows = int(weight.const_value.shape.numpy()[0])  # type: ignore[union-attr]
            base = node.name or str(node.outputs[0].name)
            flat_shape = ir.Value(
                name=f"{base}_flat_shape",
                const_value=ir.tensor(np.array([-1, rows], np.int64), name=f"{base}_flat_shape"),
                shape=ir.Shape([2]),
                type=ir.TensorType(ir.DataType.INT64),
            )
            shape_nodes: list[ir.Node] = []
            if keeps_dynamic_dims(model):
                # [..., N] from the activation's own leading dims, so another batch or length still runs.
                leading = ir.node("Shape", [activation], attributes={"end": -1}, name=f"{base}_leading_dims")
                leading.outputs[0].shape, leading.outputs[0].type = ir.Shape([len(output_shape) - 1]), _INT64
                width = add_initializer(graph, f"{base}_columns", np.array([columns], np.int64))
                joined = ir.node("Concat", [leading.outputs[0], width], attributes={"axis": 0}, name=f"{base}_out_dims")
                joined.outputs[0].shape, joined.outputs[0].type = ir.Shape([len(output_shape)]), _INT64
                shape_nodes, out_shape = [leading, joined], joined.outputs[0]
            else:
                out_shape = ir.Value(
                    name=f"{base}_out_shape",
                    const_value=ir.tensor(np.array(output_shape, np.int64), name=f"{base}_out_shape"),
                    shape=ir.Shape([len(output_shape)]),
                    type=_INT64,
                )
            bias_vector = ir.Value(
                name=f"{base}_bias",
                const_value=ir.tensor(bias.const_value.numpy().reshape(-1), name=f"{base}_bias"),  # type: ignore[union-attr]
                shape=ir.Shape([columns]),
                type=bias.type,
            )
            for value in (flat_shape, out_shape, bias_vector):
                if value.const_value is not None:
                    graph.register_initializer(value)
            flat = ir.Value(
                name=f"{base}_flat_input",
                shape=ir.Shape([int(np.prod(input_shape)) // rows, rows]),
                type=activation.type,
            )
            product = ir.Value(
                name=f"{base}_gemm",
                shape=ir.Shape([int(np.prod(input_shape)) // rows, columns]),
                type=add.outputs[0].type,
            )
            reshape_in = ir.node("Reshape", [activation, flat_shape], outputs=[flat], name=f"{base}_reshape_input")
            gemm = ir.node("Gemm", [flat, weight, bias_vector], outputs=[product], name=base)
            result = add.outputs[0]
            reshape_out = ir.node("Reshape", [product, out_shape], name=f"{base}_reshape_output")
            graph.insert_after(add, [*shape_nodes, reshape_in, gemm, reshape_out])
            result.replace_all_uses_with(reshape_out.outputs[0], replace_graph_outputs=True)
            graph.remove([add, node], safe=True)
            reshape_out.outputs[0].name = result.name
            reshape_out.outputs[0].shape, reshape_out.outputs[0].type = result.shape, result.type
            rewritten += 1
        if rewritten:
            graph.sort()
        return ir.passes.PassResult(model, modified=rewritten > 0)
