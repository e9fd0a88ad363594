"""What a value is during the lowering, and the integer arithmetic the rules of
:mod:`qcompile.backends.integer.rules` emit for it.

A value of the QDQ graph is, once lowered, one of: :class:`Codes` (uint8, ``real = s * (q - z)``),
:class:`Accumulator` (int32 or int64, ``real = s[c] * acc``), :class:`Deferred` (an op whose integer form
needs the scale of the ``QuantizeLinear`` after it), or a quantized constant ``(data, scales, axis)`` (a
weight or bias read through its ``DequantizeLinear``). :class:`Lowering` holds them by name, with the graph
being built, and emits:

- Requantization (at each ``QuantizeLinear``): the real multiplier ``M = s_acc[c] / s_y`` becomes a dyadic
  number ``M0[c] * 2**-n[c]`` with ``2**29 <= M0 < 2**30`` (relative error < 2**-29), and
  ``q = clamp(floor((acc * M0 + 2**(n-1)) / 2**n) + z_y, lo, hi)`` in int64: round half up, saturating.
  ONNX integer ``Div`` truncates toward zero, so a constant ``C = 2**61`` (a multiple of ``2**n``) is added
  before the division and ``C / 2**n`` subtracted after: the dividend is never negative, and the result is
  the floor, for any int32 accumulator. An accumulator past the int32 range (a split reduction) uses fewer
  multiplier bits so that ``acc * M0`` stays below 2**60.
- Tables: a function of uint8 codes (Sigmoid, Tanh, HardSigmoid, HardSwish, GELU) is a 256-entry uint8
  table built from the input and output quantization parameters (``Gather``); a ``Gather`` from a constant
  float table gathers from that table quantized as its ``QuantizeLinear`` quantizes its rows.
- Concat: each input rescaled (requantized) to the output's scale where they differ.
- Softmax and LayerNormalization in integers (:meth:`Lowering.integer_softmax`,
  :meth:`Lowering.integer_layer_norm` derive theirs).
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

ACCUMULATOR_LIMIT = 2**31 - 1  # the int32 accumulator's range
OFFSET_EXPONENT = 61  # C = 2**61 keeps acc * M0 + C positive and below 2**63 for any int32 acc, M0 < 2**30
MULTIPLIER_BITS = 30  # M0 in [2**29, 2**30): 30 significant bits
EXP_FRACTION_BITS = 16  # the exp table of the integer Softmax holds round(exp(-s * d) * 2**16)
NORM_FRACTION_BITS = 16  # LayerNorm's output scale and offset as integers * 2**16
NORM_OFFSET = 2**20  # keeps LayerNorm's rounded division's dividend non-negative (|y / s_y| < 2**20)


def _gelu(x: np.ndarray, _attributes: dict[str, Any]) -> np.ndarray:
    from scipy.special import erf

    return np.asarray(x * 0.5 * (1.0 + erf(x / np.sqrt(2.0))))


TABLE_FUNCTIONS = {
    "Gelu": _gelu,
    "Sigmoid": lambda x, a: 1.0 / (1.0 + np.exp(-x)),
    "Tanh": lambda x, a: np.tanh(x),
    "HardSigmoid": lambda x, a: np.clip(a.get("alpha", 0.2) * x + a.get("beta", 0.5), 0.0, 1.0),
    "HardSwish": lambda x, a: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0),
    "LeakyRelu": lambda x, a: np.where(x >= 0, x, a.get("alpha", 0.01) * x),
}


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


# A weight or bias read through its DequantizeLinear: (integer data, scales, axis).
QuantizedConstant = tuple[np.ndarray, np.ndarray, int]
Value = Codes | Accumulator | Deferred | QuantizedConstant


@dataclass
class LoweringReport:
    """Every lowered layer's accumulator bound and number of reduction parts, and the count of
    requantizations emitted."""

    layers: list[dict[str, Any]] = field(default_factory=list)
    requantizations: int = 0
    float_nodes: list[str] = field(default_factory=list)  # nodes kept in float (``float_islands``), by name


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


def channel_shape(count: int, axis: int, rank: int) -> list[int]:
    shape = [1] * rank
    shape[axis % rank] = count
    return shape


def label(node: onnx.NodeProto) -> str:
    """The name a node's messages and emitted values go by."""
    return node.name or node.output[0]


class Lowering:
    """The state of one :func:`~qcompile.backends.integer.lowering.lower` call: the QDQ model's shapes and
    constants, what each of its values is now (``values``), the integer graph being built (``build``), the
    refusals so far, and the arithmetic the rules emit."""

    def __init__(self, model: onnx.ModelProto, float_islands: bool = False) -> None:
        inferred = onnx.shape_inference.infer_shapes(model)
        infos = (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)
        self.shapes = {info.name: [dim.dim_value for dim in info.type.tensor_type.shape.dim] for info in infos}
        self.element_types = {info.name: info.type.tensor_type.elem_type for info in infos}
        self.constants = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
        self.element_types.update(
            {name: helper.np_dtype_to_tensor_dtype(array.dtype) for name, array in self.constants.items()}
        )
        self.build = _Builder(model)
        self.report = LoweringReport()
        self.values: dict[str, Value] = {}
        self.refused: list[str] = []
        self.failed: set[str] = set()  # values downstream of a refused node
        self.quantized_as: dict[str, Codes] = {}  # a deferred op's float output -> its codes after the QuantizeLinear
        self.dependent = 0  # lowerable nodes that read a refused node's output
        self.graph_inputs = {value.name for value in model.graph.input}
        self.gelus = _gelu_chains(model, self.constants)
        self.inside_gelu: set[str] = set()  # the other nodes (by output) of the GELU chains lowered as tables
        self.float_islands = float_islands
        self.floats: set[str] = set()  # values computed in float by kept float nodes (float_islands)
        self.as_float: dict[str, str] = {}  # a lowered value's name -> its dequantized float copy

    def refuse(self, node: onnx.NodeProto, message: str) -> None:
        """``node`` has no integer form: refused, or with ``float_islands`` kept as the float op it is
        (when every input has a float form), its inputs dequantized where they are integers."""
        if self.float_islands and self.keep_float(node):
            return
        self.refused.append(message)
        self.failed.update(node.output)

    def keep_float(self, node: onnx.NodeProto) -> bool:
        """Emit ``node`` unchanged on float forms of its inputs: codes through ``DequantizeLinear``, an
        accumulator cast and scaled (its ReLU / Clip bounds applied), a quantized constant as float, a
        deferred op (table function, Concat, Softmax, LayerNorm, embedding lookup, attention mask) as the op
        itself on float inputs. False (nothing emitted) when an input has no float form (a refused value)."""
        inputs = self.float_inputs(node)
        if inputs is None:
            return False
        kept = onnx.NodeProto()
        kept.CopyFrom(node)
        del kept.input[:]
        kept.input.extend(inputs)
        self.build.nodes.append(kept)
        self.floats.update(node.output)
        for output in node.output:
            self.values.pop(output, None)
        self.report.float_nodes.append(label(node))
        return True

    def float_inputs(self, node: onnx.NodeProto) -> list[str] | None:
        """The float forms of ``node``'s inputs ("" for an omitted one), or None when one has none."""
        inputs: list[str] = []
        for name in node.input:
            converted = self.float_form(name) if name else ""
            if converted is None:
                return None
            inputs.append(converted)
        return inputs

    def float_form(self, name: str) -> str | None:
        """The name of ``name``'s value in float (itself when it is float, a constant or an integer input of
        the graph), or None when it has none."""
        if name in self.failed:
            return None
        value = self.values.get(name)
        if value is None:
            return name
        if name in self.as_float:
            return self.as_float[name]
        build = self.build
        base = f"{name}_float"
        if isinstance(value, Codes):
            converted = self.codes_as_float(value, base)
        elif isinstance(value, Accumulator):
            converted = self.dequantize_accumulator(value, base)
        elif isinstance(value, tuple):  # a quantized constant: its float values
            data, scales, axis = value
            shape = channel_shape(scales.size, axis, data.ndim) if scales.size > 1 else []
            real = data.astype(np.float32) * scales.astype(np.float32).reshape(shape)
            converted = build.const(real.astype(np.float32), base)
        elif isinstance(value, Deferred) and value.op == "Gelu":  # a chain of nodes: written out in float
            first = len(build.nodes)
            converted = self.float_gelu(self.codes_as_float(value.sources[0], f"{base}_x"), base)
            self.report.float_nodes += [node.name for node in build.nodes[first:]]
        elif isinstance(value, Deferred) and "node" in value.attributes:
            # The op that was deferred (a table function, Concat, Softmax, LayerNorm, an embedding lookup, an
            # attention mask and the masked scores), emitted again on the float forms of its inputs.
            original = value.attributes["node"]
            inputs = self.float_inputs(original)
            if inputs is None:
                return None
            converted = build.name(base)
            reemitted = helper.make_node(original.op_type, inputs, [converted], name=converted)
            reemitted.attribute.extend(original.attribute)
            build.nodes.append(reemitted)
            self.report.float_nodes.append(converted)
        else:
            return None
        self.as_float[name] = converted
        return converted

    def codes_as_float(self, codes: Codes, base: str) -> str:
        """uint8 codes dequantized (once per codes tensor)."""
        key = f"codes:{codes.name}:{codes.scale!r}:{codes.zero_point}"  # (a folded Mul rescales the same codes)
        if key not in self.as_float:
            build = self.build
            step = build.const(np.array(codes.scale, np.float32), f"{base}_scale")
            offset = build.const(np.array(codes.zero_point, np.uint8), f"{base}_zero")
            self.as_float[key] = build.node("DequantizeLinear", [codes.name, step, offset], base)
        return self.as_float[key]

    def float_gelu(self, x: str, base: str) -> str:
        """GELU of float ``x`` written out with erf, as exporters write it (the Gelu op is newer than the
        graph's opset)."""
        build = self.build
        scaled = build.node("Div", [x, build.const(np.array(math.sqrt(2.0), np.float32), f"{base}_sqrt2")], base)
        erf = build.node("Erf", [scaled], f"{base}_erf")
        shifted = build.node("Add", [erf, build.const(np.array(1.0, np.float32), f"{base}_one")], f"{base}_1p")
        halved = build.node("Mul", [x, build.const(np.array(0.5, np.float32), f"{base}_half")], f"{base}_x2")
        return build.node("Mul", [halved, shifted], f"{base}_gelu")

    def dequantize_accumulator(self, value: Accumulator, base: str) -> str:
        """An accumulator as float: ``Cast``, ``Mul`` by its scales, then its ReLU / Clip bounds if any."""
        build = self.build
        floating = build.node("Cast", [value.name], f"{base}_cast", to=TensorProto.FLOAT)
        shape = channel_shape(value.scales.size, value.axis, value.rank) if value.scales.size > 1 else []
        factors = build.const(value.scales.astype(np.float32).reshape(shape), f"{base}_scales")
        scaled = build.node("Mul", [floating, factors], base)
        low, high = value.clip
        if math.isinf(low) and math.isinf(high):
            return scaled
        bounds = [
            build.const(np.array(bound, np.float32), f"{base}_{tag}") for bound, tag in ((low, "lo"), (high, "hi"))
        ]
        return build.node("Clip", [scaled, *bounds], f"{base}_clip")

    def constant(self, name: str) -> np.ndarray | None:
        return self.constants.get(name)

    def arguments(self, node: onnx.NodeProto) -> list[Value | None]:
        """What each of the node's (non-empty) inputs is now; None for a float value."""
        return [self.values.get(value) for value in node.input if value]

    def const64(self, value: Any, base: str) -> str:
        return self.build.const(np.asarray(value, np.int64), base)

    def requantize(self, source: Accumulator, scale: float, zero_point: int, base: str) -> str:
        build = self.build
        # acc * M0 must stay below 2**60 (C = 2**61 is added): fewer multiplier bits past the int32 range.
        bits = min(MULTIPLIER_BITS, 60 - math.ceil(math.log2(source.bound + 1)))
        m0, shift = dyadic(source.scales.astype(np.float64) / scale, bits)
        shape = channel_shape(m0.size, source.axis, source.rank) if m0.size > 1 else []
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
        self.report.requantizations += 1
        return build.node("Cast", [clamped], f"{base}_q", to=TensorProto.UINT8)

    def resolve(self, deferred: Deferred, scale: float, zero_point: int, base: str) -> str:
        """The uint8 codes (at ``scale``, ``zero_point``: the QuantizeLinear after it) of a deferred op."""
        build = self.build
        if deferred.op == "Concat":
            parts = [
                part.name
                if math.isclose(part.scale, scale, rel_tol=1e-7) and part.zero_point == zero_point
                else self.requantize(self.as_accumulator(part, f"{base}_{index}"), scale, zero_point, f"{base}_{index}")
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
            return self.integer_softmax(first, scale, zero_point, base, deferred.attributes)
        if deferred.op == "LayerNormalization":
            held = deferred.sources[0] if deferred.sources else deferred.attributes["accumulator"]
            return self.integer_layer_norm(held, deferred.attributes, scale, zero_point, base)
        (codes,) = deferred.sources
        # Every input code's real value through the function, quantized as the QuantizeLinear after it does.
        real = np.float32(codes.scale) * (np.arange(256, dtype=np.float32) - np.float32(codes.zero_point))
        function = TABLE_FUNCTIONS[deferred.op](real.astype(np.float64), deferred.attributes)
        levels = np.round(function.astype(np.float32) / np.float32(scale)) + zero_point
        table = np.clip(levels, 0, 255).astype(np.uint8)
        index = build.node("Cast", [codes.name], f"{base}_index", to=TensorProto.INT32)
        return build.node("Gather", [build.const(table, f"{base}_table"), index], f"{base}_q", axis=0)

    def saturate(self, value: str, zero_point: int, base: str) -> str:
        build = self.build
        shifted = build.node("Add", [value, self.const64(zero_point, f"{base}_z")], f"{base}_shift")
        clamped = build.node(
            "Clip", [shifted, self.const64(0, f"{base}_lo"), self.const64(255, f"{base}_hi")], f"{base}_clamp"
        )
        return build.node("Cast", [clamped], f"{base}_q", to=TensorProto.UINT8)

    def rounded(self, source: Accumulator, bits: int, base: str) -> tuple[str, float]:
        """A scalar-scale accumulator in int64, rounded (half up) to ``|x| < 2**bits``; returns the value and
        its scale. The dividend is offset by 2**33 so that truncating division floors."""
        build, const64 = self.build, self.const64
        drop = max(0, math.ceil(math.log2(source.bound + 1)) - bits)
        x = build.node("Cast", [source.name], f"{base}_x64", to=TensorProto.INT64)
        if drop:
            biased = build.node("Add", [x, const64((1 << 33) + (1 << (drop - 1)), f"{base}_bias")], f"{base}_xb")
            shifted = build.node("Div", [biased, const64(1 << drop, f"{base}_step")], f"{base}_xs")
            x = build.node("Sub", [shifted, const64(1 << (33 - drop), f"{base}_unbias")], f"{base}_xr")
        return x, float(source.scales.reshape(-1)[0]) * 2.0**drop

    def integer_softmax(
        self, codes: Codes | None, scale: float, zero_point: int, base: str, options: dict[str, Any]
    ) -> str:
        """exp(x - max) from a table of the distance to the row's maximum (256 entries for uint8 codes; for
        an int32 accumulator, rounded to 12 bits first, 4097), in 2**-16 units; y = e / sum(e), rounded half
        up by an integer division: e * M0 / (sum * 2**n). With an attention mask, masked positions are
        left out of the maximum and take exp 0 in the sum."""
        build, const64 = self.build, self.const64
        if codes is not None:
            x = build.node("Cast", [codes.name], f"{base}_x64", to=TensorProto.INT64)
            input_scale, entries, hidden = codes.scale, 256, 0
        else:
            x, input_scale = self.rounded(options["accumulator"], 11, base)  # |x| < 2**11
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
        self.report.requantizations += 1
        return self.saturate(build.node("Div", [numerator, denominator], f"{base}_ratio"), zero_point, base)

    def integer_layer_norm(
        self, source: Codes | Accumulator, attributes: dict[str, Any], scale: float, zero_point: int, base: str
    ) -> str:
        """LayerNorm in integers: c = N * x - sum(x) (the centred input, times N), V = sum(c**2),
        D = isqrt(V / N + eps * N**2 / s**2) by Newton's method (fixed iterations from above, the floor
        square root), then y / s_y = (G * c + B * D) / (D * 2**16) rounded half up, G = gamma / s_y * 2**16,
        B = beta / s_y * 2**16 (integers). ``x`` is uint8 codes, or an int32 accumulator (a residual sum,
        as I-BERT keeps it: not re-quantized to 8 bits first) rounded to 16 bits."""
        build, const64 = self.build, self.const64
        width = int(attributes["width"])
        epsilon = float(attributes.get("epsilon", 1e-5))
        if isinstance(source, Codes):
            x = build.node("Cast", [source.name], f"{base}_x64", to=TensorProto.INT64)
            input_scale, levels = source.scale, 255
        else:
            x, input_scale = self.rounded(source, 15, base)  # 16 bits of the accumulator
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
        self.report.requantizations += 1
        return self.saturate(
            build.node("Sub", [ratio, const64(NORM_OFFSET, f"{base}_unoffset")], f"{base}_y"), zero_point, base
        )

    def as_accumulator(self, codes: Codes, base: str) -> Accumulator:
        """``q - z`` in int32: the codes as an accumulator at their scale."""
        build = self.build
        wide = build.node("Cast", [codes.name], f"{base}_int32", to=TensorProto.INT32)
        centred = build.node("Sub", [wide, build.const(np.array(codes.zero_point, np.int32), f"{base}_z")], f"{base}_c")
        rank = len(self.shapes.get(codes.name, [0, 0, 0, 0]))
        return Accumulator(centred, np.array([codes.scale]), 0, rank, 255.0)


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
