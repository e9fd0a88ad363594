"""SmoothQuant scale folding: move activation outliers into the weights, without adding a node.

For a layer ``y = x W`` whose input channels ``j`` have very different ranges, ``x W = (x / s) (s W)`` for
any positive ``s``: dividing the activation channel by ``s_j`` flattens its range for one per-tensor 8-bit
scale, and multiplying row ``j`` of the weight by ``s_j`` moves the difficulty into the weights, which are
quantized per output channel. ``s_j = max|x_j|^alpha / max|W_j|^(1 - alpha)`` (Xiao et al., "SmoothQuant",
2023), with ``max|W_j|`` over every consumer's row ``j``.

The division is folded into the producer of ``x``, never inserted as a runtime Mul:

- LayerNormalization over the last axis with constant scale (and bias): both divided by ``s``;
- Mul by a constant per-channel vector (the weight of an RMSNorm decomposed at opset 18, as Llama-style
  models such as SmolLM2 export): the vector divided by ``s``;
- MatMul / Gemm with a constant weight (and Gemm's constant bias): output columns divided by ``s``;
- Conv with a constant weight (and bias): output channels divided by ``s``;
- through a gating Mul of two activations (the SwiGLU MLP of Llama-style models: ``silu(x G) * (x U)``, read
  by the down projection): the MatMul / Gemm producing one factor, read by that Mul alone, divides its output
  columns by ``s`` (elementwise products are scaled channel by channel, so the Mul's output is too).

Between producer and consumers only Reshapes that keep the channel axis (the last one) may stand; every
reader of the producer's output must be a consumer that can take the scale (a MatMul / Gemm with a constant
weight reading it as its left operand, or a dense Conv), and they share one joint scale (one LayerNorm
feeding Q, K and V). Where no producer can absorb it (a GELU, a ReLU6, a residual Add, a graph input), the
layer is left alone and :attr:`SmoothQuantPass.decisions` says why, naming the value.

``alpha = "auto"`` searches ``alpha`` in 0.1 .. 0.9 per producer, minimising the consumers' output error
after fake quantization (activations uint8 per tensor, weights int8 per output channel) on calibration rows.

After this pass, the model computes what it computed in float (to rounding: measured 1e-6 relative on
all-MiniLM-L6-v2), and every folded activation's calibration range must be measured again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from qcompile.graph import (
    channel_readers,
    consumer_rows,
    int_attribute,
    is_constant,
    scale_consumer_rows,
    single_use_constant,
)
from qcompile.passes.annotate import require_unannotated

logger = logging.getLogger(__name__)

SCALE_LIMITS = (1e-5, 1e5)
AUTO_ALPHAS = tuple(round(0.1 * step, 1) for step in range(1, 10))


@dataclass
class Decision:
    """What the pass did with one group of consumers (or why it left them alone)."""

    value: str
    consumers: list[str]
    producer: str | None
    alpha: float | None = None
    reason: str | None = None
    max_scale: float | None = None
    channels: int = 0
    errors: dict[str, float] = field(default_factory=dict)


def _producer_channels(node: ir.Node) -> int | None:
    """Output channels a producer can divide (constant parameters used by it alone), else None."""
    bias_ok = len(node.inputs) < 3 or node.inputs[2] is None or single_use_constant(node.inputs[2])
    if node.op_type == "LayerNormalization":
        rank = node.inputs[0].shape.rank() if node.inputs[0] is not None and node.inputs[0].shape else 0
        last_axis = int_attribute(node, "axis", -1) in (-1, rank - 1)
        if not (single_use_constant(node.inputs[1]) and bias_ok and last_axis):
            return None
        return int(node.inputs[1].const_value.numpy().shape[-1])  # type: ignore[union-attr]
    if node.op_type == "Mul" and len(node.inputs) == 2:
        # The weight of a decomposed RMSNorm (Llama / SmolLM2 at opset 18): x * gamma, gamma per last-axis channel.
        constants = [value for value in node.inputs if value is not None and is_constant(value)]
        if len(constants) != 1 or not single_use_constant(constants[0]):
            return None
        array = constants[0].const_value.numpy()  # type: ignore[union-attr]
        return int(array.shape[-1]) if array.ndim >= 1 and array.size == array.shape[-1] > 1 else None
    if node.op_type in ("MatMul", "Gemm", "Conv") and len(node.inputs) > 1 and single_use_constant(node.inputs[1]):
        weight = node.inputs[1].const_value.numpy()  # type: ignore[union-attr]
        if node.op_type == "MatMul" and weight.ndim != 2:
            return None
        if node.op_type == "Gemm" and int_attribute(node, "transA", 0):
            return None
        if not bias_ok:
            return None
        if node.op_type == "Conv" or (node.op_type == "Gemm" and int_attribute(node, "transB", 0)):
            return int(weight.shape[0])
        return int(weight.shape[-1])
    return None


def _absorber(node: ir.Node) -> ir.Node | None:
    """The node whose constant parameters can take a scale of ``node``'s output channels: ``node`` itself,
    or, for a Mul of two activations of one shape, a channels-last linear producer of one factor that only
    this Mul reads; None when there is none."""
    if _producer_channels(node) is not None:
        return node
    if node.op_type != "Mul" or len(node.inputs) != 2 or any(v is None or is_constant(v) for v in node.inputs):
        return None
    left, right = node.inputs
    if left is None or right is None or left.shape is None or left.shape != right.shape:
        return None
    for factor in (right, left):
        producer = factor.producer()
        if (
            producer is not None
            and producer.op_type in ("MatMul", "Gemm")
            and _producer_channels(producer) is not None
            and len(factor.uses()) == 1
            and not factor.is_graph_output()
        ):
            return producer
    return None


def _divide_producer(node: ir.Node, scale: np.ndarray) -> None:
    def divide(value: ir.Value, array_fn: Callable[[np.ndarray], np.ndarray]) -> None:
        array = value.const_value.numpy()  # type: ignore[union-attr]
        value.const_value = ir.tensor(array_fn(array).astype(array.dtype), name=value.name)

    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if node.op_type == "Mul":
        gamma = next(value for value in node.inputs if value is not None and single_use_constant(value))
        divide(gamma, lambda a: a / scale.reshape(a.shape))
        return
    if node.op_type == "LayerNormalization":
        divide(node.inputs[1], lambda a: a / scale)  # type: ignore[arg-type]
    elif node.op_type == "Conv":
        divide(node.inputs[1], lambda a: a / scale.reshape(-1, *([1] * (a.ndim - 1))))  # type: ignore[arg-type]
    elif node.op_type == "Gemm" and int_attribute(node, "transB", 0):
        divide(node.inputs[1], lambda a: a / scale[:, None])  # type: ignore[arg-type]
    else:
        divide(node.inputs[1], lambda a: a / scale[None, :])  # type: ignore[arg-type]
    if bias is not None:
        divide(bias, lambda a: a / scale)


def fake_quant_error(
    x: np.ndarray, weights: list[np.ndarray], scale: np.ndarray, products: list[np.ndarray] | None = None
) -> float:
    """Squared output error of ``(x / s) (s W)`` with ``x / s`` uint8 per tensor and ``s W`` int8 per output
    column, against ``x W`` (``products``, when the caller has them), summed over ``weights`` (rows of ``x``:
    samples, columns: channels)."""
    smoothed = x / scale
    low, high = min(float(smoothed.min()), 0.0), max(float(smoothed.max()), 0.0)
    step = max(high - low, 1e-12) / 255.0
    zero = np.round(-low / step)
    x_q = (np.clip(np.round(smoothed / step) + zero, 0, 255) - zero) * step
    total = 0.0
    for index, weight in enumerate(weights):
        scaled = weight * scale[:, None]
        w_step = np.maximum(np.abs(scaled).max(axis=0), 1e-12) / 127.0
        w_q = np.clip(np.round(scaled / w_step), -127, 127) * w_step
        exact = products[index] if products is not None else x @ weight
        total += float(np.sum((x_q @ w_q - exact) ** 2))
    return total


class SmoothQuantPass(ir.passes.InPlacePass):
    """After this pass, each foldable consumer group has its SmoothQuant scale folded into its producer.

    ``channel_absmax(name)`` gives ``max |x_c|`` per channel of an activation (from calibration);
    ``rows(name)`` gives calibration rows ``[samples, channels]`` of it, needed only for ``alpha="auto"``.
    """

    def requires(self, model: ir.Model) -> None:
        require_unannotated(model, "SmoothQuantPass")

    def __init__(
        self,
        channel_absmax: Callable[[str], np.ndarray | None],
        alpha: float | str = 0.5,
        rows: Callable[[str], np.ndarray | None] | None = None,
    ) -> None:
        super().__init__()
        if alpha != "auto" and not (isinstance(alpha, float | int) and 0.0 <= float(alpha) <= 1.0):
            raise ValueError(f"SmoothQuant alpha must be in [0, 1] or 'auto', got {alpha!r}")
        if alpha == "auto" and rows is None:
            raise ValueError("SmoothQuant alpha 'auto' needs calibration rows")
        self.channel_absmax = channel_absmax
        self.alpha = alpha
        self.rows = rows
        self.decisions: list[Decision] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.decisions = []
        covered: set[int] = set()
        for node in list(model.graph):
            absorber = _absorber(node)
            channels = _producer_channels(absorber) if absorber is not None else None
            if absorber is None or channels is None:
                continue
            output = node.outputs[0]
            channels_last = absorber.op_type != "Conv"
            readers = channel_readers(output, channels_last)
            if not readers:
                continue
            eligible = [(reader, index) for reader, index in readers if consumer_rows(reader, index) is not None]
            if not eligible:
                continue
            for reader, _ in eligible:
                covered.add(id(reader))
            names = [str(reader.name) for reader, _ in eligible]
            blocking = [reader for reader, index in readers if consumer_rows(reader, index) is None]
            conv_readers = {reader.op_type == "Conv" for reader, _ in eligible}
            if blocking:
                other = blocking[0]
                reason = (
                    f"value '{output.name}' also feeds {other.op_type} '{other.name}', which cannot take a "
                    "per-channel scale"
                )
                self.decisions.append(Decision(str(output.name), names, str(node.name), reason=reason))
            elif conv_readers != {not channels_last}:
                reason = f"value '{output.name}' is read with its channels on another axis than its producer's"
                self.decisions.append(Decision(str(output.name), names, str(node.name), reason=reason))
            else:
                self._fold(absorber, output, eligible, channels)
        for node in model.graph:
            if id(node) in covered or consumer_rows(node, 0) is None:
                continue
            source = node.inputs[0]
            producer = source.producer() if source is not None else None
            while producer is not None and producer.op_type == "Reshape":
                producer = producer.inputs[0].producer() if producer.inputs[0] is not None else None
            what = f"{producer.op_type} '{producer.name}'" if producer is not None else "a graph input"
            reason = (
                f"input '{source.name if source is not None else '?'}' is produced by {what}, which cannot absorb "
                "a per-channel scale (no constant per-channel parameters, or a nonlinearity): left alone"
            )
            self.decisions.append(Decision(str(source.name) if source else "?", [str(node.name)], None, reason=reason))
        folded = sum(1 for decision in self.decisions if decision.reason is None)
        logger.info("SmoothQuant folded %d groups; %d left alone", folded, len(self.decisions) - folded)
        return ir.passes.PassResult(model, modified=folded > 0)

    def _fold(self, producer: ir.Node, output: ir.Value, consumers: list[tuple[ir.Node, int]], channels: int) -> None:
        names = [str(node.name) for node, _ in consumers]
        absmax = self.channel_absmax(str(output.name))
        weights = [consumer_rows(node, index) for node, index in consumers]
        if absmax is None or absmax.shape != (channels,) or any(w is None or w.shape[0] != channels for w in weights):
            reason = f"no per-channel range of '{output.name}' matching its {channels} channels"
            self.decisions.append(Decision(str(output.name), names, str(producer.name), reason=reason))
            return
        weight_max = np.max([np.abs(w).max(axis=1) for w in weights if w is not None], axis=0).astype(np.float64)
        activation_max = absmax.astype(np.float64)

        def scale_for(alpha: float) -> np.ndarray:
            raw = np.power(np.maximum(activation_max, 1e-8), alpha) / np.power(np.maximum(weight_max, 1e-8), 1 - alpha)
            return np.clip(raw, *SCALE_LIMITS)

        errors: dict[str, float] = {}
        if self.alpha == "auto":
            rows = self.rows(str(output.name)) if self.rows else None
            if rows is None or rows.shape[-1] != channels:
                reason = f"no calibration rows of '{output.name}' to choose alpha from"
                self.decisions.append(Decision(str(output.name), names, str(producer.name), reason=reason))
                return
            matrices = [w.reshape(channels, -1).astype(np.float64) for w in weights]  # type: ignore[union-attr]
            products = [rows @ matrix for matrix in matrices]  # the float products, once for every alpha
            errors = {f"{a:.1f}": fake_quant_error(rows, matrices, scale_for(a), products) for a in AUTO_ALPHAS}
            alpha = float(min(errors, key=lambda key: errors[key]))
        else:
            alpha = float(self.alpha)
        scale = scale_for(alpha)
        _divide_producer(producer, scale.astype(np.float32))
        for node, _ in consumers:
            scale_consumer_rows(node, scale.astype(np.float32))
        self.decisions.append(
            Decision(
                str(output.name),
                names,
                str(producer.name),
                alpha=alpha,
                max_scale=float(scale.max() / scale.min()),
                channels=channels,
                errors=errors,
            )
        )


def producer_statistics(
    model: ir.Model, feeds: list[dict[str, np.ndarray]], max_rows: int = 4096
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per-channel ``max |x|`` of every possible producer's output over ``feeds``, and up to ``max_rows``
    rows ``[rows, channels]`` of each (a fixed random subset), for :class:`SmoothQuantPass`."""
    from qcompile import execution

    axes = {
        str(node.outputs[0].name): (1 if node.op_type == "Conv" else -1)
        for node in model.graph
        if _absorber(node) is not None and not node.outputs[0].is_graph_output()
    }
    if not axes or not feeds:
        return {}, {}
    names = sorted(axes)
    session = execution.session(model, extra_outputs=names)
    collected: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed), strict=True):
            array = np.moveaxis(np.asarray(value, np.float32), axes[name], -1)
            collected[name].append(array.reshape(-1, array.shape[-1]))
    rng = np.random.default_rng(0)
    absmax, rows = {}, {}
    for name, parts in collected.items():
        stacked = np.concatenate(parts)
        absmax[name] = np.abs(stacked).max(axis=0)
        pick = rng.choice(len(stacked), size=min(max_rows, len(stacked)), replace=False)
        rows[name] = stacked[np.sort(pick)].astype(np.float64)
    return absmax, rows
