"""Integer-only lowering of a QDQ model: no float arithmetic between input quantization and output
dequantization.

From the QDQ graph of :mod:`qcompile.passes.qdq` (activations uint8 with zero point, weights int8 symmetric
per output channel, int32 biases at scale ``s_x * s_w``) this builds a graph of standard ONNX integer ops:

- Conv / Gemm / MatMul: ``ConvInteger`` / ``MatMulInteger`` (uint8 x int8 -> int32, the activation's zero
  point as an input), plus the int32 bias: an int32 accumulator at scale ``s_x * s_w[c]``.
- Requantization (at each ``QuantizeLinear``): the real multiplier ``M = s_acc[c] / s_y`` becomes a dyadic
  number ``M0[c] * 2**-n[c]`` with ``2**29 <= M0 < 2**30`` (relative error < 2**-29), and
  ``q = clamp(floor((acc * M0 + 2**(n-1)) / 2**n) + z_y, lo, hi)`` in int64: round half up, saturating.
  ONNX integer ``Div`` truncates toward zero, so a constant ``C = 2**61`` (a multiple of ``2**n``) is added
  before the division and ``C / 2**n`` subtracted after: the dividend is never negative, and the result is
  the floor, for any int32 accumulator.
- ReLU / Clip on an accumulator move the clamp bounds to ``round(bound / s_y) + z_y`` (the same codes the
  QDQ graph gives); on a uint8 value, ReLU is ``Max(q, z)``.
- MaxPool, Flatten, Reshape, Transpose, Squeeze, Unsqueeze run on the uint8 codes (order-preserving, same
  scale). Sigmoid, Tanh, HardSigmoid, HardSwish on uint8 codes become a 256-entry uint8 table built from
  the input and output quantization parameters (``Gather``), and so does an erf GELU as exporters write
  it (Div, Erf, Add, Mul, Mul: recognised as one); Concat rescales each input to the output's
  scale (requantization) where they differ.
- GlobalAveragePool / ReduceMean over H, W: ``ReduceSum`` of ``q - z`` in int32, an accumulator at scale
  ``s / (H * W)`` (of an accumulator: clamped to its ReLU / Clip bounds, summed in int64).
- Add of two uint8 values: each ``q - z`` times an integer approximation of ``s_input / s_unit``
  (``s_unit`` = the finer scale / 2**k, k as large as int32 allows), summed in int32.
- Graph outputs: an accumulator is dequantized (``Cast`` to float, ``Mul`` by its scales); a uint8 value
  by ``DequantizeLinear``.

Static overflow analysis: for every accumulator, ``255 * sum_k |w[c, k]| + |bias[c]|`` bounds ``|acc|``. A
layer whose bound passes the int32 range has its reduction split (input channels of a Conv, rows of a
MatMul weight) into parts whose partial sums each fit int32, summed in int64 (``Slice`` of the input, one
``ConvInteger`` / ``MatMulInteger`` per part); the requantization then uses fewer multiplier bits so that
``acc * M0`` stays below 2**60. A grouped Conv is not split (an error names it). The report lists every
layer's bound and number of parts.

Anything else (Softmax, LayerNorm, GELU, Sigmoid, float ops between quantized values) cannot be lowered:
:func:`lower` raises one error listing every such node, with its op and the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx.shape_inference
from onnx import TensorProto, helper, numpy_helper

from qcompile.errors import UnsupportedModelError
from qcompile.passes.integer_reference import node_attributes

ACCUMULATOR_LIMIT = 2**31 - 1  # the int32 accumulator's range
OFFSET_EXPONENT = 61  # C = 2**61 keeps acc * M0 + C positive and below 2**63 for any int32 acc, M0 < 2**30
MULTIPLIER_BITS = 30  # M0 in [2**29, 2**30): 30 significant bits
LAYOUT_OPS = frozenset({"Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze"})
INTEGRAL_TYPES = frozenset(
    {TensorProto.INT64, TensorProto.INT32, TensorProto.INT16, TensorProto.INT8, TensorProto.UINT8}
    | {TensorProto.UINT16, TensorProto.UINT32, TensorProto.UINT64, TensorProto.BOOL}
)


# Ops this pass has an integer form for (given quantized inputs); any other op is listed when refused.
def _gelu(x: np.ndarray, _attributes: dict[str, Any]) -> np.ndarray:
    from scipy.special import erf

    return np.asarray(x * 0.5 * (1.0 + erf(x / np.sqrt(2.0))))


TABLE_FUNCTIONS = {
    "Gelu": _gelu,
    "Sigmoid": lambda x, a: 1.0 / (1.0 + np.exp(-x)),
    "Tanh": lambda x, a: np.tanh(x),
    "HardSigmoid": lambda x, a: np.clip(a.get("alpha", 0.2) * x + a.get("beta", 0.5), 0.0, 1.0),
    "HardSwish": lambda x, a: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0),
}
LOWERABLE_OPS = frozenset(
    {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm", "MatMul", "Relu", "Clip", "MaxPool", "GlobalAveragePool"}
    | {"ReduceMean", "Add", "Concat", "Softmax", "LayerNormalization", "Gather", "Mul", "Where", "IsNaN"}
    | LAYOUT_OPS
    | set(TABLE_FUNCTIONS)
)
EXP_FRACTION_BITS = 16  # the exp table of the integer Softmax holds round(exp(-s * d) * 2**16)
NORM_FRACTION_BITS = 16  # LayerNorm's output scale and offset as integers * 2**16
NORM_OFFSET = 2**20  # keeps LayerNorm's rounded division's dividend non-negative (|y / s_y| < 2**20)
CONV_ATTRIBUTES = ("pads", "strides", "dilations", "group", "kernel_shape", "auto_pad")


def dyadic(multiplier: np.ndarray, bits: int = MULTIPLIER_BITS) -> tuple[np.ndarray, np.ndarray]:
    """``M`` (positive float64) -> int64 ``(M0, n)`` with ``M ~= M0 * 2**-n`` and ``2**(bits-1) <= M0 < 2**bits``
    (30 bits by default: relative error below 2**-29)."""
    values = np.asarray(multiplier, np.float64)
    if (values <= 0).any() or not np.isfinite(values).all():
        raise UnsupportedModelError(f"requantization multipliers must be positive and finite, got {values.min()}")
    mantissa, exponent = np.frexp(values)  # values = mantissa * 2**exponent, mantissa in [0.5, 1)
    m0 = np.round(mantissa * 2.0**bits).astype(np.int64)
    shift = (bits - exponent).astype(np.int64)
    carry = m0 == 2**bits
    m0 = np.where(carry, m0 // 2, m0)
    shift = np.where(carry, shift - 1, shift)
    if (shift < 1).any() or (shift > OFFSET_EXPONENT).any():
        raise UnsupportedModelError(f"requantization multiplier {values.max():.3g} is outside the dyadic range")
    return m0, shift


@dataclass(frozen=True)
class Codes:
    """An activation held as uint8 codes: real = scale * (q - zero_point)."""

    name: str
    scale: float
    zero_point: int


@dataclass(frozen=True)
class Accumulator:
    """An int32 value: real = scales[c] * acc (zero point 0), c along ``axis`` of a rank-``rank`` tensor;
    ``clip`` holds the real bounds a ReLU / Clip after it imposes, applied when it is requantized."""

    name: str
    scales: np.ndarray
    axis: int
    rank: int
    bound: float
    clip: tuple[float, float] = (-math.inf, math.inf)


@dataclass(frozen=True)
class Deferred:
    """An op on uint8 codes whose integer form needs the scale of the QuantizeLinear after it: a table
    activation (``sources`` one value) or a Concat (its inputs rescaled to the output scale)."""

    op: str
    sources: tuple[Codes, ...]
    attributes: dict[str, Any]


@dataclass
class LoweringReport:
    layers: list[dict[str, Any]] = field(default_factory=list)
    requantizations: int = 0


class _Builder:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.taken = {value for node in model.graph.node for value in (*node.input, *node.output)}
        self.taken |= {tensor.name for tensor in model.graph.initializer}

    def name(self, base: str) -> str:
        candidate, index = base, 0
        while candidate in self.taken:
            index += 1
            candidate = f"{base}_{index}"
        self.taken.add(candidate)
        return candidate

    def const(self, array: np.ndarray, base: str) -> str:
        name = self.name(base)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], base: str, **attributes: Any) -> str:
        output = self.name(base)
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output


def _channel_shape(count: int, axis: int, rank: int) -> list[int]:
    shape = [1] * rank
    shape[axis % rank] = count
    return shape


def lower(model: onnx.ModelProto) -> tuple[onnx.ModelProto, LoweringReport]:
    """The integer-only form of the QDQ ``model``; raises one error listing every node that cannot be lowered."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {
        info.name: [dim.dim_value for dim in info.type.tensor_type.shape.dim]
        for info in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)
    }
    element_types = {
        info.name: info.type.tensor_type.elem_type
        for info in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)
    }
    constants = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    element_types.update({name: helper.np_dtype_to_tensor_dtype(array.dtype) for name, array in constants.items()})
    build = _Builder(model)
    report = LoweringReport()
    values: dict[str, Codes | Accumulator | Deferred | tuple[np.ndarray, np.ndarray, int]] = {}
    refused: list[str] = []
    failed: set[str] = set()  # values downstream of a refused node
    quantized_as: dict[str, Codes] = {}  # a deferred op's float output -> its codes after the QuantizeLinear
    dependent = 0

    def refuse(node: onnx.NodeProto, message: str) -> None:
        refused.append(message)
        failed.update(node.output)

    graph_inputs = {value.name for value in model.graph.input}

    def constant(name: str) -> np.ndarray | None:
        return constants.get(name)

    def requantize(source: Accumulator, scale: float, zero_point: int, base: str) -> str:
        # acc * M0 must stay below 2**60 (C = 2**61 is added): fewer multiplier bits past the int32 range.
        bits = min(MULTIPLIER_BITS, 60 - math.ceil(math.log2(source.bound + 1)))
        m0, shift = dyadic(source.scales.astype(np.float64) / scale, bits)
        shape = _channel_shape(m0.size, source.axis, source.rank) if m0.size > 1 else []
        offset = np.int64(2) ** OFFSET_EXPONENT
        wide = build.node("Cast", [source.name], f"{base}_int64", to=TensorProto.INT64)
        scaled = build.node("Mul", [wide, build.const(m0.reshape(shape), f"{base}_m0")], f"{base}_scaled")
        rounding = (np.int64(1) << (shift - 1)) + offset
        biased = build.node("Add", [scaled, build.const(rounding.reshape(shape), f"{base}_round")], f"{base}_biased")
        divisor = np.int64(1) << shift
        floored = build.node("Div", [biased, build.const(divisor.reshape(shape), f"{base}_divisor")], f"{base}_div")
        shifted = (offset >> shift) - zero_point
        centred = build.node("Sub", [floored, build.const(shifted.reshape(shape), f"{base}_unbias")], f"{base}_zp")
        low = max(0, int(np.round(source.clip[0] / scale)) + zero_point) if math.isfinite(source.clip[0]) else 0
        high = min(255, int(np.round(source.clip[1] / scale)) + zero_point) if math.isfinite(source.clip[1]) else 255
        clamped = build.node(
            "Clip",
            [
                centred,
                build.const(np.array(low, np.int64), f"{base}_lo"),
                build.const(np.array(high, np.int64), f"{base}_hi"),
            ],
            f"{base}_clamp",
        )
        report.requantizations += 1
        return build.node("Cast", [clamped], f"{base}_q", to=TensorProto.UINT8)

    def resolve(deferred: Deferred, scale: float, zero_point: int, base: str) -> str:
        if deferred.op == "Concat":
            parts = [
                part.name
                if math.isclose(part.scale, scale, rel_tol=1e-7) and part.zero_point == zero_point
                else requantize(as_accumulator(part, f"{base}_{index}"), scale, zero_point, f"{base}_{index}")
                for index, part in enumerate(deferred.sources)
            ]
            return build.node("Concat", parts, f"{base}_q", axis=int(deferred.attributes.get("axis", 0)))
        if deferred.op == "GatherTable":
            # The constant float table quantized as the QuantizeLinear after the lookup quantizes its rows.
            table = deferred.attributes["table"].astype(np.float32)
            codes_table = np.clip(np.round(table / np.float32(scale)) + zero_point, 0, 255).astype(np.uint8)
            original = deferred.attributes["node"]
            gathered = build.name(f"{base}_q")
            lookup = helper.make_node(
                "Gather",
                [build.const(codes_table, f"{base}_table"), deferred.attributes["indices"]],
                [gathered],
                name=gathered,
            )
            lookup.attribute.extend(original.attribute)
            build.nodes.append(lookup)
            return gathered
        if deferred.op == "Softmax":
            first = deferred.sources[0] if deferred.sources else None
            return integer_softmax(first, scale, zero_point, base, deferred.attributes)
        if deferred.op == "LayerNormalization":
            held = deferred.sources[0] if deferred.sources else deferred.attributes["accumulator"]
            return integer_layer_norm(held, deferred.attributes, scale, zero_point, base)
        (codes,) = deferred.sources
        # Every input code's real value through the function, quantized as the QuantizeLinear after it does.
        real = np.float32(codes.scale) * (np.arange(256, dtype=np.float32) - np.float32(codes.zero_point))
        function = TABLE_FUNCTIONS[deferred.op](real.astype(np.float64), deferred.attributes)
        levels = np.round(function.astype(np.float32) / np.float32(scale)) + zero_point
        table = np.clip(levels, 0, 255).astype(np.uint8)
        index = build.node("Cast", [codes.name], f"{base}_index", to=TensorProto.INT32)
        return build.node("Gather", [build.const(table, f"{base}_table"), index], f"{base}_q", axis=0)

    def const64(value: Any, base: str) -> str:
        return build.const(np.asarray(value, np.int64), base)

    def saturate(value: str, zero_point: int, base: str) -> str:
        shifted = build.node("Add", [value, const64(zero_point, f"{base}_z")], f"{base}_shift")
        clamped = build.node("Clip", [shifted, const64(0, f"{base}_lo"), const64(255, f"{base}_hi")], f"{base}_clamp")
        return build.node("Cast", [clamped], f"{base}_q", to=TensorProto.UINT8)

    def rounded(source: Accumulator, bits: int, base: str) -> tuple[str, float]:
        """A scalar-scale accumulator in int64, rounded (half up) to ``|x| < 2**bits``; returns the value and
        its scale. The dividend is offset by 2**33 so that truncating division floors."""
        drop = max(0, math.ceil(math.log2(source.bound + 1)) - bits)
        x = build.node("Cast", [source.name], f"{base}_x64", to=TensorProto.INT64)
        if drop:
            biased = build.node("Add", [x, const64((1 << 33) + (1 << (drop - 1)), f"{base}_bias")], f"{base}_xb")
            shifted = build.node("Div", [biased, const64(1 << drop, f"{base}_step")], f"{base}_xs")
            x = build.node("Sub", [shifted, const64(1 << (33 - drop), f"{base}_unbias")], f"{base}_xr")
        return x, float(source.scales.reshape(-1)[0]) * 2.0**drop

    def integer_softmax(codes: Codes | None, scale: float, zero_point: int, base: str, options: dict[str, Any]) -> str:
        """exp(x - max) from a table of the distance to the row's maximum (256 entries for uint8 codes; for
        an int32 accumulator, rounded to 12 bits first, 4097), in 2**-16 units; y = e / sum(e), rounded half
        up by an integer division: e * M0 / (sum * 2**n). With an attention mask, masked positions are
        left out of the maximum and take exp 0 in the sum."""
        if codes is not None:
            x = build.node("Cast", [codes.name], f"{base}_x64", to=TensorProto.INT64)
            input_scale, entries, hidden = codes.scale, 256, 0
        else:
            x, input_scale = rounded(options["accumulator"], 11, base)  # |x| < 2**11
            entries, hidden = 4097, -(1 << 13)
        valid = None
        if "condition" in options:
            valid = options["condition"]
            if not options["keep_when"]:
                valid = build.node("Not", [valid], f"{base}_valid")
            x = build.node("Where", [valid, x, const64(hidden, f"{base}_hidden")], f"{base}_visible")
        peak = build.node("ReduceMax", [x, const64([-1], f"{base}_axis")], f"{base}_max", keepdims=1)
        gap = build.node("Sub", [peak, x], f"{base}_gap")
        limits = [const64(0, f"{base}_d0"), const64(entries - 1, f"{base}_d1")]
        distance = build.node("Clip", [gap, *limits], f"{base}_distance")
        exponent = -input_scale * np.arange(entries, dtype=np.float64)
        table = np.round(np.exp(exponent) * 2**EXP_FRACTION_BITS).astype(np.int64)
        exps = build.node("Gather", [build.const(table, f"{base}_exp"), distance], f"{base}_e", axis=0)
        if valid is not None:
            exps = build.node("Where", [valid, exps, const64(0, f"{base}_masked")], f"{base}_e_masked")
        total = build.node("ReduceSum", [exps, const64([-1], f"{base}_axis2")], f"{base}_sum", keepdims=1)
        (m0,), (shift,) = dyadic(np.array([1.0 / scale]))
        numerator = build.node(
            "Add",
            [
                build.node("Mul", [exps, const64(m0, f"{base}_m0")], f"{base}_scaled"),
                build.node("Mul", [total, const64(1 << (int(shift) - 1), f"{base}_half")], f"{base}_round"),
            ],
            f"{base}_numerator",
        )
        denominator = build.node("Mul", [total, const64(1 << int(shift), f"{base}_unit")], f"{base}_denominator")
        report.requantizations += 1
        return saturate(build.node("Div", [numerator, denominator], f"{base}_ratio"), zero_point, base)

    def integer_layer_norm(
        source: Codes | Accumulator, attributes: dict[str, Any], scale: float, zero_point: int, base: str
    ) -> str:
        """LayerNorm in integers: c = N * x - sum(x) (the centred input, times N), V = sum(c**2),
        D = isqrt(V / N + eps * N**2 / s**2) by Newton's method (fixed iterations from above, the floor
        square root), then y / s_y = (G * c + B * D) / (D * 2**16) rounded half up, G = gamma / s_y * 2**16,
        B = beta / s_y * 2**16 (integers). ``x`` is uint8 codes, or an int32 accumulator (a residual sum,
        as I-BERT keeps it: not re-quantized to 8 bits first) rounded to 16 bits."""
        width = int(attributes["width"])
        epsilon = float(attributes.get("epsilon", 1e-5))
        if isinstance(source, Codes):
            x = build.node("Cast", [source.name], f"{base}_x64", to=TensorProto.INT64)
            input_scale, levels = source.scale, 255
        else:
            x, input_scale = rounded(source, 15, base)  # 16 bits of the accumulator
            levels = 2**15
        axis = const64([-1], f"{base}_axis")
        total = build.node("ReduceSum", [x, axis], f"{base}_sum", keepdims=1)
        centred = build.node(
            "Sub", [build.node("Mul", [x, const64(width, f"{base}_n")], f"{base}_nx"), total], f"{base}_c"
        )
        energy = build.node(
            "ReduceSum", [build.node("Mul", [centred, centred], f"{base}_c2"), axis], f"{base}_v", keepdims=1
        )
        floor_term = max(1, round(epsilon * width**2 / input_scale**2))
        radicand = build.node(
            "Add",
            [
                build.node("Div", [energy, const64(width, f"{base}_n2")], f"{base}_vn"),
                const64(floor_term, f"{base}_eps"),
            ],
            f"{base}_r",
        )
        largest = (levels * width) ** 2 + floor_term  # V / N <= (levels * N)**2, plus the eps term
        estimate = const64(1 << ((largest.bit_length() + 1) // 2), f"{base}_x0")  # >= sqrt(largest)
        iterations = largest.bit_length() // 2 + 6
        previous = estimate
        for step in range(iterations):
            quotient = build.node("Div", [radicand, previous], f"{base}_q{step}")
            summed = build.node("Add", [previous, quotient], f"{base}_s{step}")
            current = build.node("Div", [summed, const64(2, f"{base}_two{step}")], f"{base}_x{step + 1}")
            if step < iterations - 1:
                previous = current
        root = build.node("Min", [previous, current], f"{base}_root")  # floor(sqrt): the smaller of the last two
        gamma = np.broadcast_to(np.asarray(attributes["gamma"], np.float64).reshape(-1), (width,))
        beta = np.broadcast_to(np.asarray(attributes["beta"], np.float64).reshape(-1), (width,))
        gains = np.round(gamma / scale * 2**NORM_FRACTION_BITS).astype(np.int64)
        offsets = np.round(beta / scale * 2**NORM_FRACTION_BITS).astype(np.int64) + NORM_OFFSET * 2**NORM_FRACTION_BITS
        unit = build.node("Mul", [root, const64(1 << NORM_FRACTION_BITS, f"{base}_unit")], f"{base}_d")
        numerator = build.node(
            "Add",
            [
                build.node("Mul", [centred, const64(gains, f"{base}_g")], f"{base}_gc"),
                build.node(
                    "Mul", [root, const64(offsets + (1 << (NORM_FRACTION_BITS - 1)), f"{base}_b")], f"{base}_bd"
                ),
            ],
            f"{base}_numerator",
        )
        ratio = build.node("Div", [numerator, unit], f"{base}_ratio")
        report.requantizations += 1
        return saturate(
            build.node("Sub", [ratio, const64(NORM_OFFSET, f"{base}_unoffset")], f"{base}_y"), zero_point, base
        )

    def as_accumulator(codes: Codes, base: str) -> Accumulator:
        wide = build.node("Cast", [codes.name], f"{base}_int32", to=TensorProto.INT32)
        centred = build.node("Sub", [wide, build.const(np.array(codes.zero_point, np.int32), f"{base}_z")], f"{base}_c")
        rank = len(shapes.get(codes.name, [0, 0, 0, 0]))
        return Accumulator(centred, np.array([codes.scale]), 0, rank, 255.0)

    scale: Any  # names reused below for constants, floats and value names
    zero: Any
    scales: Any
    gelus = _gelu_chains(model, constants)
    inside_gelu: set[str] = set()  # the other nodes (by output) of the GELU chains lowered as tables
    for node in model.graph.node:
        op, name = node.op_type, node.name or node.output[0]
        inputs = list(node.input)
        if node.output[0] in inside_gelu:
            continue  # handled with the chain's Div
        if node.output[0] in gelus and isinstance(values.get(inputs[0]), Codes):
            codes = values[inputs[0]]
            assert isinstance(codes, Codes)
            members, output = gelus[node.output[0]]
            values[output] = Deferred("Gelu", (codes,), {})
            inside_gelu |= members
            continue
        if failed.intersection(inputs):
            failed.update(node.output)
            if op in LOWERABLE_OPS:
                dependent += 1
            else:
                refused.append(f"{name} ({op}): no integer form for this op")
            continue
        if op == "DequantizeLinear":
            data = constant(inputs[0])
            scale = constant(inputs[1])
            zero = constant(inputs[2]) if len(inputs) > 2 and inputs[2] else None
            if data is not None:  # a weight or a bias
                if zero is not None and np.any(zero != 0):
                    refuse(node, f"{name} (DequantizeLinear): constant with a nonzero zero point")
                    continue
                axis = next((attribute.i for attribute in node.attribute if attribute.name == "axis"), 1)
                values[node.output[0]] = (data, np.asarray(scale, np.float64).reshape(-1), axis)
            elif inputs[0] in values and isinstance(values[inputs[0]], Codes):
                values[node.output[0]] = values[inputs[0]]
            else:
                refuse(node, f"{name} (DequantizeLinear): input '{inputs[0]}' is not quantized")
            continue
        if op == "QuantizeLinear":
            scale = float(np.asarray(constant(inputs[1])).reshape(-1)[0])
            zero = constant(inputs[2]) if len(inputs) > 2 and inputs[2] else np.array(0, np.uint8)
            if zero is None or zero.dtype != np.uint8 or np.asarray(constant(inputs[1])).size != 1:
                refuse(node, f"{name} (QuantizeLinear): only per-tensor uint8 activations are lowered")
                continue
            zero_point = int(zero)
            source = values.get(inputs[0])
            if inputs[0] in graph_inputs:  # input quantization stays as it is
                build.nodes.append(node)
                values[node.output[0]] = Codes(node.output[0], scale, zero_point)
            elif isinstance(source, Accumulator):
                values[node.output[0]] = Codes(requantize(source, scale, zero_point, name), scale, zero_point)
            elif isinstance(source, Deferred):
                values[node.output[0]] = Codes(resolve(source, scale, zero_point, name), scale, zero_point)
                quantized_as[inputs[0]] = values[node.output[0]]  # type: ignore[assignment]
            elif isinstance(source, Codes):
                if math.isclose(source.scale, scale, rel_tol=1e-7) and source.zero_point == zero_point:
                    values[node.output[0]] = source
                else:
                    rescaled = requantize(as_accumulator(source, name), scale, zero_point, name)
                    values[node.output[0]] = Codes(rescaled, scale, zero_point)
            else:
                refuse(node, f"{name} (QuantizeLinear): its input '{inputs[0]}' is computed in float")
            continue
        arguments = [values.get(value) for value in inputs if value]
        if (
            inputs
            and all(value == "" or element_types.get(value) in INTEGRAL_TYPES for value in inputs)
            and all(element_types.get(value) in INTEGRAL_TYPES for value in node.output)
        ):
            # Integer and boolean arithmetic on integer inputs (masks, position ids) is already integer-only.
            build.nodes.append(node)
            continue
        if op == "Gather" and constant(inputs[0]) is not None and constant(inputs[0]).dtype.kind == "f":  # type: ignore[union-attr]
            values[node.output[0]] = Deferred(
                "GatherTable", (), {"table": constant(inputs[0]), "indices": inputs[1], "node": node}
            )
            continue
        if op == "Where" and element_types.get(inputs[0]) == TensorProto.BOOL and inputs[0] not in values:
            branches = [constant(value) for value in inputs[1:3]]
            if all(branch is not None and branch.size == 1 for branch in branches):
                kept, dropped = (float(branch.reshape(-1)[0]) for branch in branches)  # type: ignore[union-attr]
                if (kept == 0.0 and dropped <= -1e9) or (dropped == 0.0 and kept <= -1e9):
                    # An attention mask: 0 where attended, -inf (or a huge negative) elsewhere.
                    values[node.output[0]] = Deferred("Mask", (), {"condition": inputs[0], "keep_when": kept == 0.0})
                    continue
        if (
            op == "Add"
            and len(arguments) == 2
            and any(isinstance(item, Deferred) and item.op == "Mask" for item in arguments)
        ):
            scores = next((item for item in arguments if isinstance(item, Codes | Accumulator)), None)
            mask = next(item for item in arguments if isinstance(item, Deferred))
            if isinstance(scores, Codes):
                values[node.output[0]] = Deferred("Masked", (scores,), mask.attributes)
                continue
            if isinstance(scores, Accumulator) and scores.scales.size == 1:
                values[node.output[0]] = Deferred("Masked", (), mask.attributes | {"accumulator": scores})
                continue
        if op == "IsNaN" and arguments and isinstance(arguments[0], Codes):
            values[node.output[0]] = Deferred("NotNaN", (), {})  # integer codes are never NaN
            continue
        if op == "Where" and isinstance(values.get(inputs[0]), Deferred) and values[inputs[0]].op == "NotNaN":  # type: ignore[union-attr]
            kept_value = values.get(inputs[2])
            if isinstance(kept_value, Codes):
                values[node.output[0]] = kept_value  # Where(isnan(p), 0, p) is p
                continue
        if op == "Mul" and len(arguments) == 2 and isinstance(arguments[0], Codes | Accumulator):
            factor = constant(inputs[1])
            if factor is not None and factor.size == 1 and float(factor.reshape(-1)[0]) > 0:
                scaled = float(factor.reshape(-1)[0])
                factor_of = arguments[0]
                if isinstance(factor_of, Codes):
                    values[node.output[0]] = Codes(factor_of.name, factor_of.scale * scaled, factor_of.zero_point)
                else:
                    values[node.output[0]] = Accumulator(
                        factor_of.name, factor_of.scales * scaled, factor_of.axis, factor_of.rank, factor_of.bound
                    )
                continue
        if op == "MatMul" and len(arguments) == 2 and all(isinstance(item, Codes) for item in arguments):
            left, right = arguments
            assert isinstance(left, Codes) and isinstance(right, Codes)
            zeros = [
                build.const(np.array(item.zero_point, np.uint8), f"{name}_z{index}")
                for index, item in enumerate((left, right))
            ]
            product = build.node("MatMulInteger", [left.name, right.name, *zeros], f"{name}_acc")
            depth = shapes.get(inputs[0], [0])[-1]
            rank = len(shapes.get(node.output[0], [0, 0]))
            bound = 255.0 * 255.0 * depth
            if bound > ACCUMULATOR_LIMIT:
                refuse(
                    node,
                    f"{name} ({op}): its int32 accumulator can reach {bound:.3g}; an activation product is not split",
                )
                continue
            values[node.output[0]] = Accumulator(product, np.array([left.scale * right.scale]), -1, max(2, rank), bound)
            report.layers.append(
                {"name": name, "op_type": "MatMul", "accumulator_bound": bound, "limit": ACCUMULATOR_LIMIT, "parts": 1}
            )
            continue
        if op in ("Conv", "Gemm", "MatMul") and len(arguments) >= 2 and isinstance(arguments[0], Codes):
            weight = arguments[1]
            if not isinstance(weight, tuple):
                refuse(node, f"{name} ({op}): its weight is not a quantized constant")
                continue
            codes, (weights, weight_scales, _axis) = arguments[0], weight
            attributes = node_attributes(node)
            if op == "Gemm":
                if (
                    attributes.get("transA", 0)
                    or attributes.get("alpha", 1.0) != 1.0
                    or attributes.get("beta", 1.0) != 1.0
                ):
                    refuse(node, f"{name} (Gemm): transA / alpha / beta are not lowered")
                    continue
                matrix = weights.T if attributes.get("transB", 0) else weights
            else:
                matrix = weights
            zero = build.const(np.array(codes.zero_point, np.uint8), f"{name}_xz")
            if op == "Conv":
                channels = weights.shape[0]
                geometry = {key: value for key, value in attributes.items() if key in CONV_ATTRIBUTES}
                # |w| summed over the kernel window: [Cin per group, Cout], the reduction axis first.
                contributions = np.abs(weights.astype(np.int64)).sum(axis=(2, 3)).T
                axis, rank, input_axis = 1, 4, 1
            else:
                if matrix.ndim != 2:
                    refuse(node, f"{name} ({op}): only 2-D weights are lowered")
                    continue
                channels = matrix.shape[1]
                geometry = {}
                contributions = np.abs(matrix.astype(np.int64))
                axis, rank, input_axis = -1, max(2, len(shapes.get(node.output[0], [0, 0]))), -1
            scales = codes.scale * np.broadcast_to(weight_scales, (channels,)).astype(np.float64)
            bias = None
            bias_bound = np.zeros(channels)
            if len(arguments) > 2 and isinstance(arguments[2], tuple):
                bias = arguments[2][0].astype(np.int64).reshape(-1)
                bias_bound = np.abs(bias.astype(np.float64))
            bound = float((255.0 * contributions.sum(axis=0) + bias_bound).max())
            parts = _split_reduction(contributions, bias_bound)
            if len(parts) > 1 and op == "Conv" and int(attributes.get("group", 1)) != 1:
                refuse(node, f"{name} ({op}): its int32 accumulator can reach {bound:.3g}; a grouped conv is not split")
                continue
            report.layers.append(
                {
                    "name": name,
                    "op_type": op,
                    "accumulator_bound": bound,
                    "limit": ACCUMULATOR_LIMIT,
                    "parts": len(parts),
                }
            )
            partials: list[str] = []
            for index, (start, stop) in enumerate(parts):
                piece = f"{name}_part{index}" if len(parts) > 1 else name
                operand = codes.name
                if len(parts) > 1:
                    limits = [
                        build.const(np.array([value], np.int64), f"{piece}_{tag}")
                        for value, tag in ((start, "start"), (stop, "stop"))
                    ]
                    operand = build.node(
                        "Slice",
                        [operand, *limits, build.const(np.array([input_axis], np.int64), f"{piece}_axis")],
                        f"{piece}_x",
                    )
                if op == "Conv":
                    sliced = np.ascontiguousarray(weights[:, start:stop])
                    product = build.node(
                        "ConvInteger", [operand, build.const(sliced, f"{piece}_w"), zero], f"{piece}_acc", **geometry
                    )
                else:
                    sliced = np.ascontiguousarray(matrix[start:stop])
                    product = build.node(
                        "MatMulInteger", [operand, build.const(sliced, f"{piece}_w"), zero], f"{piece}_acc"
                    )
                partials.append(product)
            accumulated = partials[0]
            bias_type: type[np.signedinteger[Any]] = np.int32
            if len(parts) > 1:  # partial sums in int32 each, their total in int64
                widened = [
                    build.node("Cast", [partial], f"{partial}_int64", to=TensorProto.INT64) for partial in partials
                ]
                accumulated = widened[0]
                for index, partial_sum in enumerate(widened[1:]):
                    accumulated = build.node("Add", [accumulated, partial_sum], f"{name}_sum{index}")
                bias_type = np.int64
            if bias is not None:
                shaped = bias.astype(bias_type).reshape(_channel_shape(channels, axis, rank))
                accumulated = build.node("Add", [accumulated, build.const(shaped, f"{name}_b")], f"{name}_biased")
            values[node.output[0]] = Accumulator(accumulated, scales, axis, rank, bound)
            continue
        source = arguments[0] if arguments else None
        if op in ("Relu", "Clip") and isinstance(source, Accumulator):
            low, high = source.clip
            if op == "Relu":
                low = max(low, 0.0)
            else:
                bounds = [constant(value) for value in inputs[1:3]] + [None, None]
                low = max(low, float(bounds[0])) if bounds[0] is not None and inputs[1:2] and inputs[1] else low
                high = min(high, float(bounds[1])) if len(inputs) > 2 and inputs[2] and bounds[1] is not None else high
            values[node.output[0]] = Accumulator(
                source.name, source.scales, source.axis, source.rank, source.bound, (low, high)
            )
            continue
        if op in ("GlobalAveragePool", "ReduceMean") and isinstance(source, Accumulator):
            # A float mean of an accumulator (the QDQ graph quantizes only after it): clamp the int32 values
            # to the ReLU / Clip bounds in accumulator units, sum them in int64, scale by 1 / (H * W).
            shape = shapes.get(node.output[0] if op == "GlobalAveragePool" else inputs[0], [])
            axes = [2, 3] if op == "GlobalAveragePool" else _reduce_axes(node, constants)
            spatial = shapes.get(inputs[0], [])
            if source.rank != 4 or len(spatial) != 4 or sorted(a % 4 for a in axes) != [2, 3] or source.axis != 1:
                refuse(node, f"{name} ({op}): only a mean over H and W of an NCHW accumulator is lowered")
                continue
            channel = _channel_shape(source.scales.size, 1, 4) if source.scales.size > 1 else []
            held = source.name
            if math.isfinite(source.clip[0]):
                low_codes = np.ceil(source.clip[0] / source.scales).astype(np.int32).reshape(channel)
                held = build.node("Max", [held, build.const(low_codes, f"{name}_lo")], f"{name}_floor")
            if math.isfinite(source.clip[1]):
                high_codes = np.floor(source.clip[1] / source.scales).astype(np.int32).reshape(channel)
                held = build.node("Min", [held, build.const(high_codes, f"{name}_hi")], f"{name}_ceiling")
            wide = build.node("Cast", [held], f"{name}_int64", to=TensorProto.INT64)
            keep = 1 if op == "GlobalAveragePool" else next((a.i for a in node.attribute if a.name == "keepdims"), 1)
            axes_name = build.const(np.array([2, 3], np.int64), f"{name}_axes")
            total = build.node("ReduceSum", [wide, axes_name], f"{name}_sum", keepdims=keep)
            count = spatial[2] * spatial[3]
            values[node.output[0]] = Accumulator(
                total, source.scales / count, 1, 4 if keep else 2, source.bound, (-math.inf, math.inf)
            )
            continue
        if op in ("Flatten", "Reshape") and isinstance(source, Accumulator):
            before, after = shapes.get(inputs[0], []), shapes.get(node.output[0], [])
            squeezed = source.axis == 1 and len(after) == 2 and before[:2] == after and all(d == 1 for d in before[2:])
            channels_last = bool(before and after) and source.axis % source.rank == source.rank - 1
            channels_last = channels_last and before[-1] == after[-1]
            if not (squeezed or channels_last or source.scales.size == 1):
                refuse(node, f"{name} ({op}): a reshape of an accumulator must keep its channel axis")
                continue
            copied = helper.make_node(op, [source.name, *inputs[1:]], [build.name(f"{name}_acc")], name=f"{name}_acc")
            copied.attribute.extend(node.attribute)
            build.nodes.append(copied)
            axis = 1 if squeezed else -1
            values[node.output[0]] = Accumulator(
                copied.output[0], source.scales, axis, max(2, len(after)), source.bound, source.clip
            )
            continue
        if op in TABLE_FUNCTIONS and isinstance(source, Codes):
            attributes = node_attributes(node)
            values[node.output[0]] = Deferred(op, (source,), attributes)
            continue
        if op == "Softmax" and isinstance(source, Deferred) and source.op == "Masked":
            attributes = node_attributes(node)
            values[node.output[0]] = Deferred("Softmax", source.sources, attributes | source.attributes)
            continue
        scalar_accumulator = isinstance(source, Accumulator) and source.scales.size == 1
        if op in ("Softmax", "LayerNormalization") and (isinstance(source, Codes) or scalar_accumulator):
            # On uint8 codes, or on an int32 accumulator with one scale (a residual sum, attention scores).
            attributes = node_attributes(node)
            rank = len(shapes.get(inputs[0], []))
            if rank == 0 or int(attributes.get("axis", -1)) % rank != rank - 1:
                refuse(node, f"{name} ({op}): only the last axis is lowered")
                continue
            if op == "LayerNormalization":
                gamma = constant(inputs[1])
                beta = constant(inputs[2]) if len(inputs) > 2 and inputs[2] else np.zeros(1, np.float32)
                if gamma is None or beta is None:
                    refuse(node, f"{name} ({op}): its scale and bias must be constants")
                    continue
                attributes |= {"gamma": gamma, "beta": beta, "width": shapes[inputs[0]][-1]}
            if isinstance(source, Codes):
                values[node.output[0]] = Deferred(op, (source,), attributes)
            else:
                values[node.output[0]] = Deferred(op, (), attributes | {"accumulator": source})
            continue
        if op == "Concat" and arguments and all(isinstance(item, Codes) for item in arguments):
            attributes = node_attributes(node)
            values[node.output[0]] = Deferred(
                op, tuple(item for item in arguments if isinstance(item, Codes)), attributes
            )
            continue
        if op == "Relu" and isinstance(source, Codes):
            floor = build.const(np.array(source.zero_point, np.uint8), f"{name}_z")
            values[node.output[0]] = Codes(
                build.node("Max", [source.name, floor], f"{name}_q"), source.scale, source.zero_point
            )
            continue
        if op in LAYOUT_OPS and inputs and inputs[0] in graph_inputs:
            # Reshaping the float input before its quantization moves values, it computes nothing.
            build.nodes.append(node)
            graph_inputs.update(node.output)
            continue
        if (op == "MaxPool" or op in LAYOUT_OPS) and isinstance(source, Codes):
            if op == "MaxPool" and len(node.output) > 1 and node.output[1]:
                refuse(node, f"{name} (MaxPool): the indices output is not lowered")
                continue
            copied = helper.make_node(op, [source.name, *inputs[1:]], [build.name(f"{name}_q")], name=f"{name}_q")
            copied.attribute.extend(node.attribute)
            build.nodes.append(copied)
            values[node.output[0]] = Codes(copied.output[0], source.scale, source.zero_point)
            continue
        if op in ("GlobalAveragePool", "ReduceMean") and isinstance(source, Codes):
            shape = shapes.get(inputs[0], [])
            axes = [2, 3] if op == "GlobalAveragePool" else _reduce_axes(node, constants)
            if len(shape) != 4 or sorted(a % 4 for a in axes) != [2, 3] or any(dim <= 0 for dim in shape):
                refuse(node, f"{name} ({op}): only a mean over H and W of a static NCHW tensor is lowered")
                continue
            keep = 1 if op == "GlobalAveragePool" else next((a.i for a in node.attribute if a.name == "keepdims"), 1)
            centred = as_accumulator(source, name)
            total = build.node(
                "ReduceSum",
                [centred.name, build.const(np.array([2, 3], np.int64), f"{name}_axes")],
                f"{name}_sum",
                keepdims=keep,
            )
            count = shape[2] * shape[3]
            values[node.output[0]] = Accumulator(
                total, np.array([source.scale / count]), 0, 4 if keep else 2, 255.0 * count
            )
            continue
        if op == "Add" and len(arguments) == 2 and all(isinstance(item, Codes) for item in arguments):
            first, second = arguments  # type: ignore[misc]
            assert isinstance(first, Codes) and isinstance(second, Codes)
            ratio = max(first.scale, second.scale) / min(first.scale, second.scale)
            exponent = math.floor(math.log2((2**29) / (255.0 * ratio)))
            unit = min(first.scale, second.scale) / 2.0**exponent
            terms = []
            for index, term in enumerate((first, second)):
                centred = as_accumulator(term, f"{name}_{index}")
                factor = np.array(round(term.scale / unit), np.int32)
                terms.append(
                    build.node("Mul", [centred.name, build.const(factor, f"{name}_{index}_f")], f"{name}_{index}_t")
                )
            summed = build.node("Add", terms, f"{name}_sum")
            rank = len(shapes.get(node.output[0], [0, 0, 0, 0]))
            values[node.output[0]] = Accumulator(summed, np.array([unit]), 0, rank, 2.0**30)
            continue
        kinds = ", ".join(_kind(item) for item in arguments) or "none"
        reason = "no integer form for this op" if op not in LOWERABLE_OPS else "no integer form for these inputs"
        refuse(node, f"{name} ({op}): {reason} ({kinds})")
    outputs = []
    for output in model.graph.output:
        result = values.get(output.name)
        if isinstance(result, Deferred) and output.name in quantized_as:
            result = quantized_as[output.name]  # the float output of an integer op: its quantized codes
        if isinstance(result, Accumulator):
            floating = build.node("Cast", [result.name], f"{output.name}_float", to=TensorProto.FLOAT)
            shape = _channel_shape(result.scales.size, result.axis, result.rank) if result.scales.size > 1 else []
            factors = build.const(result.scales.astype(np.float32).reshape(shape), f"{output.name}_scales")
            build.nodes.append(
                helper.make_node("Mul", [floating, factors], [output.name], name=f"{output.name}_dequantize")
            )
        elif isinstance(result, Codes):
            step = build.const(np.array(result.scale, np.float32), f"{output.name}_scale")
            offset = build.const(np.array(result.zero_point, np.uint8), f"{output.name}_zero")
            build.nodes.append(helper.make_node("DequantizeLinear", [result.name, step, offset], [output.name]))
        elif output.name not in failed:
            refused.append(f"graph output '{output.name}' is not computed in integers")
        outputs.append(output)
    if refused:
        downstream = f"\n  (and {dependent} node(s) after them, which read their outputs)" if dependent else ""
        by_op: dict[str, int] = {}
        for message in refused:
            kind = message.split(" (", 1)[1].split(")", 1)[0] if " (" in message else "output"
            by_op[kind] = by_op.get(kind, 0) + 1
        summary = ", ".join(f"{kind} x{count}" for kind, count in sorted(by_op.items(), key=lambda item: -item[1]))
        raise UnsupportedModelError(
            f"{len(refused)} node(s) cannot be lowered to integer-only arithmetic ({summary}):\n  "
            + "\n  ".join(refused)
            + downstream
        )
    # Constants the copied nodes (input quantization, layout ops) read keep their names.
    present = {tensor.name for tensor in build.initializers}
    read = {value for node in build.nodes for value in node.input}
    build.initializers += [tensor for tensor in model.graph.initializer if tensor.name in read - present]
    graph = helper.make_graph(
        build.nodes, f"{model.graph.name}_integer", list(model.graph.input), outputs, build.initializers
    )
    lowered = helper.make_model(graph, opset_imports=list(model.opset_import))
    lowered.ir_version = model.ir_version
    return lowered, report


def _split_reduction(contributions: np.ndarray, bias_bound: np.ndarray) -> list[tuple[int, int]]:
    """Ranges of the reduction axis (rows of ``contributions``, ``|w|`` per input and output channel) whose
    partial accumulators each stay within int32: one range when the whole sum (with the bias) does."""
    totals = 255.0 * contributions.sum(axis=0) + bias_bound
    if totals.max() <= ACCUMULATOR_LIMIT:
        return [(0, contributions.shape[0])]
    parts, start, running = [], 0, np.zeros(contributions.shape[1])
    for row in range(contributions.shape[0]):
        step = 255.0 * contributions[row]
        if (running + step).max() > ACCUMULATOR_LIMIT and row > start:
            parts.append((start, row))
            start, running = row, np.zeros_like(running)
        running = running + step
    parts.append((start, contributions.shape[0]))
    return parts


def _gelu_chains(model: onnx.ModelProto, constants: dict[str, np.ndarray]) -> dict[str, tuple[set[str], str]]:
    """Erf GELUs as exporters write them (Div by sqrt 2, Erf, Add 1, Mul by x, Mul by 0.5 in either order):
    for each chain's Div node (by its output's name), its other nodes (by output name) and its output."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for value in node.input:
            readers.setdefault(value, []).append(node)

    def sole(value: str, op: str) -> onnx.NodeProto | None:
        found = readers.get(value, [])
        return found[0] if len(found) == 1 and found[0].op_type == op else None

    def scalar(value: str) -> float | None:
        array = constants.get(value)
        return float(array.reshape(-1)[0]) if array is not None and array.size == 1 else None

    chains = {}
    for node in model.graph.node:
        divisor = scalar(node.input[1]) if node.op_type == "Div" and len(node.input) == 2 else None
        if divisor is None or abs(divisor - 2**0.5) > 1e-3:
            continue
        x = node.input[0]
        erf = sole(node.output[0], "Erf")
        add = sole(erf.output[0], "Add") if erf else None
        if add is None or erf is None:
            continue
        chain, value, by_x = {erf.output[0], add.output[0]}, add.output[0], False
        for _ in range(2):
            mul = sole(value, "Mul")
            if mul is None:
                break
            other = mul.input[1] if mul.input[0] == value else mul.input[0]
            half = scalar(other)
            if other == x:
                by_x = True
            elif half is None or abs(half - 0.5) > 1e-6:
                break
            chain.add(mul.output[0])
            value = mul.output[0]
        else:
            if by_x:
                chains[node.output[0]] = (chain, value)
    return chains


def _kind(item: object) -> str:
    if isinstance(item, Codes):
        return "uint8"
    if isinstance(item, Accumulator):
        return "int32 accumulator"
    return "constant" if isinstance(item, tuple) else "float"


def _reduce_axes(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> list[int]:
    for attribute in node.attribute:
        if attribute.name == "axes":
            return list(attribute.ints)
    if len(node.input) > 1 and node.input[1] in constants:
        return [int(axis) for axis in constants[node.input[1]]]
    return []
