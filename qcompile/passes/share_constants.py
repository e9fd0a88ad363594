"""Constants stored once in the ONNX files an artifact ships.

Passes add constants per use: the online Hadamard rotation adds its matrices before every linear layer it
rotates (SmolLM2-135M W8A8: 91 copies of one 144 x 144 matrix, 9.5 MB), and exporters write a tied weight
twice, once for each reader (SmolLM2's embedding table ``[V, H]`` for the ``Gather`` and its transpose
``[H, V]`` for the LM head's ``MatMul``: 113 MB of a 626 MB float file). Here initializers with the same
type, shape and bytes become one value, and a large 2-D float initializer that is another's transpose becomes
a ``Transpose`` of it, which onnxruntime folds once when it loads the model. The computation is unchanged;
only the files shrink.

Only for files written out: the graphs the other stages read keep one constant per use (several passes
rewrite a linear layer's weight only where nothing else reads it).
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from qcompile.graph import array_digest

logger = logging.getLogger(__name__)

MIN_TRANSPOSED_BYTES = 1 << 20  # smaller transposed copies are not worth a node


def _shareable(value: ir.Value) -> bool:
    return value.const_value is not None and not value.is_graph_input() and not value.is_graph_output()


def share_constants(model: ir.Model, transposed: bool = True) -> dict[str, int]:
    """Merge equal initializers of ``model``'s main graph (and, with ``transposed``, turn transposed copies into
    ``Transpose`` nodes); returns how many of each and the bytes saved."""
    graph = model.graph
    kept: dict[tuple[str, tuple[int, ...], str], ir.Value] = {}
    done = {"shared": 0, "transposed": 0, "bytes_saved": 0}
    for value in list(graph.initializers.values()):
        if not _shareable(value):
            continue
        array = value.const_value.numpy()  # type: ignore[union-attr]
        key = (str(array.dtype), tuple(array.shape), array_digest(array))
        first = kept.setdefault(key, value)
        if first is value:
            continue
        value.replace_all_uses_with(first)
        del graph.initializers[value.name]  # type: ignore[arg-type]
        done["shared"] += 1
        done["bytes_saved"] += array.nbytes
    if transposed:
        _transposed_copies(graph, kept, done)
    if done["shared"] or done["transposed"]:
        logger.info(
            "constants: %d stored once, %d as a transpose of another (%.1f MB saved)",
            done["shared"],
            done["transposed"],
            done["bytes_saved"] / 1e6,
        )
    return done


def _transposed_copies(
    graph: ir.Graph, kept: dict[tuple[str, tuple[int, ...], str], ir.Value], done: dict[str, int]
) -> None:
    """Replace each large 2-D float initializer equal to another's transpose by a ``Transpose`` of that one."""
    by_shape: dict[tuple[str, tuple[int, ...]], list[tuple[str, ir.Value]]] = {}
    for (dtype, shape, digest), value in kept.items():
        if len(shape) == 2 and dtype in ("float32", "float16") and value.name in graph.initializers:
            by_shape.setdefault((dtype, shape), []).append((digest, value))
    first_node = next(iter(graph), None)
    for (dtype, shape), entries in by_shape.items():
        partners = by_shape.get((dtype, (shape[1], shape[0])))
        if not partners or shape[0] == shape[1] or shape[0] > shape[1]:
            continue  # each pair once: the wide one is rebuilt from the tall one
        for _, value in entries:
            array = value.const_value.numpy()  # type: ignore[union-attr]
            if array.nbytes < MIN_TRANSPOSED_BYTES:
                continue
            digest = array_digest(array.T)
            source = next((other for other_digest, other in partners if other_digest == digest), None)
            if source is None:
                continue
            output = ir.Value(name=f"{value.name}_from_transpose", shape=value.shape, type=value.type)
            node = ir.node("Transpose", [source], {"perm": [1, 0]}, outputs=[output], name=f"{value.name}_shared")
            if first_node is None:
                graph.append(node)
            else:
                graph.insert_before(first_node, node)
            value.replace_all_uses_with(output)
            del graph.initializers[value.name]  # type: ignore[arg-type]
            done["transposed"] += 1
            done["bytes_saved"] += array.nbytes
