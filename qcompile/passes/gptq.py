"""GPTQ weight rounding: round one input column at a time and push its error onto the columns not yet rounded.

For a layer ``y = W x`` with input second moment ``H = E[x x^T]`` (over im2col patches for a Conv), the
output error of rounded weights is ``E||(W_q - W) x||^2 = tr((W_q - W) H (W_q - W)^T)``. Rounding column
``i`` to ``q_i`` and updating the remaining columns by ``-(w_i - q_i) / [H^-1]_ii * [H^-1]_{i, i+1:}`` is the
optimal compensation for that column (Optimal Brain Surgeon); with the Cholesky factor of ``H^-1`` the whole
sweep is one pass (Frantar et al., "GPTQ", 2023). Rows where GPTQ does not beat round-to-nearest on
held-out calibration samples keep round-to-nearest (see :func:`validated_round`). Per-channel scales are
fixed beforehand from max |W| (as round-to-nearest would use), so the result stays on the int8 grid the QDQ
pass emits.

Depthwise convolutions have one tiny ``H`` per channel (``k*k`` square) and are solved batched. ``H`` is
damped by 1 % of its mean diagonal, the usual choice; a layer with fewer input rows than columns keeps
round-to-nearest, since its ``H`` would be too rank-deficient to trust.

After this pass, every annotated weight with a Hessian holds values on its int8 grid, its scales are in
``value.meta[SCALES_KEY]`` and its original values in ``value.meta[ORIGINAL_KEY]``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from numpy.lib.stride_tricks import sliding_window_view

from qcompile import execution
from qcompile.calibration import Feed
from qcompile.graph import layer_name
from qcompile.passes.annotate import require_annotated
from qcompile.passes.quant_spec import ORIGINAL_KEY, SCALES_KEY, SPEC_KEY, QuantSpec

logger = logging.getLogger(__name__)

DAMPING = 0.01
LAZY_BLOCK = 128


def _ints(node: ir.Node, name: str, default: list[int]) -> list[int]:
    attribute = node.attributes.get(name)
    return list(attribute.as_ints()) if attribute is not None else default


def conv_patches(node: ir.Node, activation: np.ndarray, kernel: tuple[int, int]) -> np.ndarray:
    """im2col of a 2-D Conv input, one column per output pixel: ``[groups, channels_per_group * kh * kw,
    rows]`` (the rows last: the copy then runs along output rows, twice as fast as with the window's
    3 x 3 elements innermost)."""
    group = node.attributes.get("group")
    groups = group.as_int() if group is not None else 1
    strides = _ints(node, "strides", [1, 1])
    dilations = _ints(node, "dilations", [1, 1])
    pads = _ints(node, "pads", [0, 0, 0, 0])
    padded = np.pad(activation, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    extent = ((kernel[0] - 1) * dilations[0] + 1, (kernel[1] - 1) * dilations[1] + 1)
    windows = sliding_window_view(padded, extent, axis=(2, 3))[
        :, :, :: strides[0], :: strides[1], :: dilations[0], :: dilations[1]
    ]
    batch, channels, out_h, out_w = windows.shape[:4]
    per_group = channels // groups
    # [batch, groups, per_group, out_h, out_w, kh, kw] -> [groups, per_group*kh*kw, batch*out_h*out_w]
    grouped = windows.reshape(batch, groups, per_group, out_h, out_w, kernel[0], kernel[1])
    return np.ascontiguousarray(grouped.transpose(1, 2, 5, 6, 0, 3, 4)).reshape(
        groups, per_group * kernel[0] * kernel[1], batch * out_h * out_w
    )


@dataclass
class Hessian:
    """Running ``sum x x^T`` (per group) over all samples, and over the even and the odd samples apart."""

    matrix: np.ndarray
    even: np.ndarray
    odd: np.ndarray
    rows: int = 0


def _pointwise(node: ir.Node) -> bool:
    """A 1x1 Conv of one group, stride 1 and no padding: its patches are the input's pixels as they are."""
    weight = node.inputs[1].const_value  # type: ignore[union-attr]
    group = node.attributes.get("group")
    return (
        weight is not None
        and tuple(weight.shape.numpy()[2:4]) == (1, 1)
        and (group is None or group.as_int() == 1)
        and all(stride == 1 for stride in _ints(node, "strides", [1, 1]))
        and not any(_ints(node, "pads", [0, 0, 0, 0]))
    )


def _supported(node: ir.Node) -> bool:
    """2-D Convs with explicit padding, Gemms whose activation is not transposed, and MatMuls with a 2-D
    constant weight (the linear layers of transformers without biases, as Llama-style models export them)."""
    weight = node.inputs[1].const_value if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if weight is None or node.inputs[0] is None:
        return False
    if node.op_type == "Conv":
        auto_pad = node.attributes.get("auto_pad")
        return weight.shape.rank() == 4 and (auto_pad is None or auto_pad.as_string() in ("NOTSET", ""))
    if node.op_type == "MatMul":
        return weight.shape.rank() == 2
    trans_a = node.attributes.get("transA")
    return node.op_type == "Gemm" and not (trans_a is not None and trans_a.as_int())


def _input_key(node: ir.Node) -> tuple[str, ...]:
    """Layers with equal keys see the same rows (same input; for a Conv, the same windows), so they share
    one Hessian: Q, K and V, a gate and an up projection, the parts of a split layer."""
    key = (str(node.inputs[0].name),)  # type: ignore[union-attr]
    if node.op_type != "Conv":
        return key
    shape = node.inputs[1].const_value.shape  # type: ignore[union-attr]
    attributes = [tuple(shape.numpy()[2:4])] + [
        _ints(node, name, default) for name, default in (("strides", [1, 1]), ("dilations", [1, 1]), ("pads", [0] * 4))
    ]
    group = node.attributes.get("group")
    return (*key, repr(attributes), str(group.as_int() if group is not None else 1), str(shape.numpy()[1]))


class HessianCollector:
    """Accumulates the input second moments of each Conv (2-D) / Gemm / MatMul layer of ``layers`` (see
    :func:`_supported`) on the float model; layers that read the same rows share one (see :func:`_input_key`).

    Samples are observed one at a time (:meth:`tap` wraps a calibration stream), so memory stays bounded by
    the Hessians themselves whatever the number of samples.
    """

    def __init__(self, model: ir.Model, layers: list[ir.Node]) -> None:
        self.targets = {layer_name(node): node for node in layers if _supported(node)}
        self.keys = {name: _input_key(node) for name, node in self.targets.items()}
        self.readers = {key: self.targets[name] for name, key in self.keys.items()}  # one layer per key
        self.names = sorted({str(node.inputs[0].name) for node in self.targets.values()})  # type: ignore[union-attr]
        self.session = execution.session(model, extra_outputs=self.names) if self.targets else None
        # per key: the sums of x x^T over the even and over the odd samples, and the rows seen
        self.shared: dict[tuple[str, ...], tuple[list[np.ndarray], int]] = {}
        self._summed: dict[tuple[str, ...], Hessian] | None = None
        self.samples = 0

    @property
    def hessians(self) -> dict[str, Hessian]:
        """Each layer's Hessian (shared objects: read them, never change them in place)."""
        if self._summed is None:  # made once after the samples: observe keeps the two halves only
            self._summed = {
                key: Hessian(halves[0] + halves[1], halves[0], halves[1], rows)
                for key, (halves, rows) in self.shared.items()
            }
        return {name: self._summed[key] for name, key in self.keys.items() if key in self._summed}

    def observe(self, feed: Feed) -> None:
        if self.session is None:
            return
        values = dict(zip(self.names, self.session.run(self.names, feed), strict=True))
        for key, node in self.readers.items():
            # One sample's products in float32 (relative error ~1e-7 of each sum: far below GPTQ's 1 % damping;
            # float64 patches cost twice the copying and the products, 3 s of EfficientNet-Lite0's compile),
            # summed over samples in float64.
            activation = np.asarray(values[key[0]], np.float32)
            if node.op_type == "Conv" and _pointwise(node):
                # a 1x1 convolution's rows are the pixels: X X^T on [C, pixels] without copying them out
                pixels = np.moveaxis(activation, 1, 0).reshape(activation.shape[1], -1)
                moment = (pixels @ pixels.T)[None].astype(np.float64)
                count = pixels.shape[1]
            else:
                if node.op_type == "Conv":
                    shape = node.inputs[1].const_value.shape  # type: ignore[union-attr]
                    columns = conv_patches(node, activation, tuple(shape.numpy()[2:4]))
                else:
                    columns = activation.reshape(1, -1, activation.shape[-1]).transpose(0, 2, 1)
                moment = np.matmul(columns, columns.transpose(0, 2, 1)).astype(np.float64)  # BLAS per group
                count = columns.shape[2]
            half = self.samples % 2  # the even and the odd samples' sums are kept apart (GPTQ validates on them)
            entry = self.shared.get(key)
            if entry is None:  # the first sample's products become its half's sum (no zeroed copy to add to)
                halves = [moment, np.zeros_like(moment)] if half == 0 else [np.zeros_like(moment), moment]
                self.shared[key] = (halves, count)
            else:
                entry[0][half] += moment
                self.shared[key] = (entry[0], entry[1] + count)
        self._summed = None
        self.samples += 1

    def tap(self, feeds: Iterable[Feed]) -> Iterator[Feed]:
        """Yield ``feeds`` unchanged, observing each one as it passes; the onnxruntime session (a full copy
        of the model's weights) is released when the stream ends or is abandoned."""
        try:
            for feed in feeds:
                self.observe(feed)
                yield feed
        finally:
            self.session = None


def gptq_round(
    weight: np.ndarray, hessian: np.ndarray, scales: np.ndarray, bounds: tuple[int, int], act_order: bool = False
) -> np.ndarray:
    """GPTQ rounding of ``weight`` ``[groups, out, cols]`` with ``hessian`` ``[groups, cols, cols]``.

    ``scales`` is ``[groups, out]``, or ``[groups, out, cols]`` for block scales (one per input column).
    ``act_order`` rounds the columns with the largest ``H_ii`` (the most active inputs) first, so that their
    error is compensated by every other column rather than by few (GPTQ's "act-order"; the scales stay
    fixed, so the grid is unchanged). ``bounds`` are the least and greatest integer codes. Returns the rounded
    weights (on the grid ``scales * integer``).
    """
    if act_order:
        order = np.argsort(-np.einsum("gii->gi", hessian), axis=1, kind="stable")  # [groups, cols]
        permuted = gptq_round(
            np.take_along_axis(weight, order[:, None, :], axis=2),
            np.take_along_axis(np.take_along_axis(hessian, order[:, :, None], axis=1), order[:, None, :], axis=2),
            np.take_along_axis(scales, order[:, None, :], axis=2) if scales.ndim == 3 else scales,
            bounds,
        )
        result = np.empty_like(permuted)
        np.put_along_axis(result, np.broadcast_to(order[:, None, :], permuted.shape), permuted, axis=2)
        return result
    weight = weight.astype(np.float64).copy()
    hessian = hessian.astype(np.float64).copy()
    cols = weight.shape[2]
    diagonal = np.einsum("gii->gi", hessian)
    dead = diagonal <= 0
    weight[np.broadcast_to(dead[:, None, :], weight.shape)] = 0.0
    hessian[:, np.arange(cols), np.arange(cols)] += np.where(dead, 1.0, 0.0)
    damp = DAMPING * np.einsum("gii->gi", hessian).mean(axis=1)
    hessian[:, np.arange(cols), np.arange(cols)] += damp[:, None]
    inverse = np.linalg.inv(hessian)
    inverse = (inverse + inverse.transpose(0, 2, 1)) / 2
    upper = np.linalg.cholesky(inverse).transpose(0, 2, 1)  # H^-1 = U^T U, U upper triangular
    scale = (scales if scales.ndim == 3 else scales[:, :, None]).astype(np.float64)
    # Lazy batches (as the GPTQ paper does): the column-by-column updates stay inside a block of columns;
    # the block's accumulated errors reach the columns after it in one matrix product.
    for start in range(0, cols, LAZY_BLOCK):
        stop = min(start + LAZY_BLOCK, cols)
        block = weight[:, :, start:stop].copy()
        errors = np.zeros_like(block)
        for offset in range(stop - start):
            column = start + offset
            current = block[:, :, offset]
            step = scale[:, :, column if scale.shape[2] > 1 else 0]
            rounded = np.clip(np.rint(current / step), *bounds) * step
            error = (current - rounded) / upper[:, column, column][:, None]
            block[:, :, offset] = rounded
            block[:, :, offset + 1 :] -= error[:, :, None] * upper[:, None, column, column + 1 : stop]
            errors[:, :, offset] = error
        weight[:, :, start:stop] = block
        if stop < cols:
            weight[:, :, stop:] -= np.matmul(errors, upper[:, start:stop, stop:])
    return weight


def _row_costs(weight: np.ndarray, rounded: np.ndarray, hessian: np.ndarray) -> np.ndarray:
    """Output error ``e_o H e_o^T`` of each output row ``o`` of each group: ``[groups, out]``."""
    error = rounded - weight
    return (np.matmul(error, hessian) * error).sum(axis=2)


def validated_round(
    weight: np.ndarray, hessian: Hessian, scales: np.ndarray, bounds: tuple[int, int], act_order: bool = False
) -> tuple[np.ndarray, float]:
    """GPTQ where it generalizes, round-to-nearest elsewhere; returns the weights and the GPTQ share.

    Each output row of each group is an independent GPTQ problem. It is solved on the even calibration
    samples and scored on the odd ones against round-to-nearest; rows where GPTQ wins are solved again
    on all samples, the others are rounded to nearest. Small per-channel problems (depthwise layers over
    a few late, mostly-zero feature maps) otherwise overfit: GPTQ's in-sample gain turns into a loss.
    """
    full = scales if scales.ndim == 3 else scales[:, :, None]
    nearest = np.clip(np.rint(weight / full), *bounds) * full
    trial = gptq_round(weight, hessian.even, scales, bounds, act_order)
    wins = _row_costs(weight, trial, hessian.odd) < _row_costs(weight, nearest, hessian.odd)
    if not wins.any():
        return nearest, 0.0
    final = gptq_round(weight, hessian.matrix, scales, bounds, act_order)
    return np.where(wins[:, :, None], final, nearest), float(wins.mean())


class GPTQPass(ir.passes.InPlacePass):
    """After this pass, annotated weights with a trusted Hessian are GPTQ-rounded onto their int8 grid."""

    def __init__(self, hessians: dict[str, Hessian]) -> None:
        super().__init__()
        self.hessians = hessians
        self.shares: dict[str, float] = {}

    def requires(self, model: ir.Model) -> None:
        require_annotated(model, type(self).__name__)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        rounded = 0
        for node in model.graph:
            entry = self.hessians.get(layer_name(node))
            weight = node.inputs[1] if len(node.inputs) > 1 else None
            if entry is None or weight is None or SPEC_KEY not in weight.meta or weight.const_value is None:
                continue
            groups, cols = entry.matrix.shape[0], entry.matrix.shape[1]
            if entry.rows < cols or len(weight.uses()) != 1:
                continue
            spec: QuantSpec = weight.meta[SPEC_KEY]
            original = weight.const_value.numpy().astype(np.float32)
            scales = spec.weight_scales(original)
            if node.op_type == "Conv":
                matrix = original.reshape(groups, original.shape[0] // groups, cols)
            else:  # Gemm / MatMul: rows of the matrix must be output channels
                matrix = (original if spec.axis == 0 else original.T)[None]
            if spec.block_size is not None:  # one scale per input column: [1, out, cols]
                per_column = np.repeat(scales, spec.block_size, axis=1)[None]
            else:
                per_column = scales.reshape(groups, -1)
            # Act-order for 4-bit and narrower weights, where it pays; int8 keeps the natural order.
            result, share = validated_round(
                matrix.astype(np.float64), entry, per_column.astype(np.float64), (spec.qmin, spec.qmax), spec.bits <= 4
            )
            self.shares[layer_name(node)] = share
            if node.op_type == "Conv":
                new = result.reshape(original.shape)
            else:
                new = result[0] if spec.axis == 0 else result[0].T
            weight.const_value = ir.tensor(new.astype(np.float32), name=weight.name)
            weight.meta[SCALES_KEY] = scales
            weight.meta[ORIGINAL_KEY] = original
            rounded += 1
        logger.info("GPTQ rounded %d layers", rounded)
        return ir.passes.PassResult(model, modified=rounded > 0)
