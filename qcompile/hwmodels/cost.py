"""Latency and size of each layer at each bit-width on a target: a roofline with calibrated efficiencies.

For a layer and a choice of weight / activation format, the roofline time is

    max(MACs / peak MAC rate of the compute dtype,  bytes moved / bandwidth)

where the compute dtype is fp32 when either side stays float, int16 for 16-bit activations, ternary for
ternary weights on a device with a ternary engine, and int8 otherwise, and the bandwidth is that of the
innermost memory level (inner cache, on-chip memory, off-chip memory) that holds the layer's bytes. Weights
are read at the width the backend keeps them in: int4, int2 and ternary codes are stored and read as int8
by the QDQ and TVM backends (they save neither MACs nor bytes moved there), and read packed only where the
target's ``dtypes`` lists the format (the LUT engine's ternary weights).

The predicted latency is ``a * roofline + b + c * activation elements + d * weight elements``, with an
efficiency ``1 / a``, a per-node overhead ``b``, a per-element cost ``c`` (layout changes, requantization,
cache misses on large feature maps) and a per-weight cost ``d`` (measured here: onnxruntime's int8 1x1
Convs follow their weight count more than their MACs) per (layer kind, compute dtype): depthwise
convolutions reach a small fraction of the peak, large GEMMs most of it. Uncalibrated, ``a`` comes from
:data:`DEFAULT_EFFICIENCY`, ``b`` from the target file's ``op_overhead_us`` and ``c`` and ``d`` are 0;
``qcompile profile`` fits all four to measurements (:mod:`qcompile.flow.profile`) and stores them as a
:class:`Calibration`.

Sizes count weight codes at their bit-width, as a deployment packing them would store them (ternary packs 5
trits per byte: 1.6 bits; qcompile's host and TVM artifacts keep int8 codes), a float32 scale
per output channel and an int32 bias per output channel for quantized layers, float32 otherwise.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qcompile.errors import TargetError
from qcompile.hwmodels import Target
from qcompile.hwmodels.layers import LayerSpec

WEIGHT_BITS = {"fp32": 32.0, "int8": 8.0, "int4": 4.0, "int2": 2.0, "ternary": 1.6}
ACTIVATION_BITS = {"fp32": 32.0, "int16": 16.0, "int8": 8.0}
# Fraction of the peak MAC rate reached before calibration, by layer kind (typical of CPU libraries).
DEFAULT_EFFICIENCY = {
    "conv": 0.5,
    "pointwise": 0.5,
    "depthwise": 0.1,
    "gemm": 0.5,
    "matmul": 0.3,
    "softmax": 0.2,
    "norm": 0.2,
    "addnorm": 0.2,
    "other": 0.5,
}


@dataclass(frozen=True)
class Choice:
    """The formats of one layer's weights and activations (inputs and output)."""

    weights: str = "int8"
    activations: str = "int8"

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_BITS:
            raise TargetError(f"weight format '{self.weights}' is not one of {sorted(WEIGHT_BITS)}")
        if self.activations not in ACTIVATION_BITS:
            raise TargetError(f"activation format '{self.activations}' is not one of {sorted(ACTIVATION_BITS)}")

    @property
    def is_float(self) -> bool:
        return self.weights == "fp32" or self.activations == "fp32"

    def label(self) -> str:
        return "fp32" if self.is_float else f"w{self.weights.removeprefix('int')}a{self.activations[3:]}"


FLOAT = Choice("fp32", "fp32")
INT8 = Choice("int8", "int8")
W8A16 = Choice("int8", "int16")


def compute_dtype(choice: Choice, target: Target) -> str | None:
    """The dtype the target's MAC units run ``choice`` in, or None when the target cannot run it."""
    rates = target.device.macs_per_cycle
    if choice.is_float:
        return "fp32" if "fp32" in rates else ("fp16" if "fp16" in rates else None)
    if choice.activations == "int16":
        return "int16" if "int16" in rates else None
    if choice.weights == "ternary" and "ternary" in rates:
        return "ternary"
    return "int8" if "int8" in rates else None


@dataclass
class Calibration:
    """Fitted ``(scale a, overhead b in us, us per activation element c, us per weight d)`` per ``kind/dtype``,
    and where they were measured."""

    target: str
    factors: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)
    node_overhead_us: float = 0.0  # time between kernels, per executed node: in wall time, in no kernel
    transition: tuple[float, float] = (0.0, 0.0)  # (us per element, us) where a float and an int8 layer meet
    machine: dict[str, Any] = field(default_factory=dict)
    fit: dict[str, Any] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path) -> Calibration:
        try:
            data = json.loads(path.read_text())
            # Calibrations stored before the per-weight term have three factors: theirs is 0.
            data["factors"] = {
                key: tuple(float(value) for value in (*values, 0.0)[:4]) for key, values in data["factors"].items()
            }
            data["transition"] = tuple(float(value) for value in data.get("transition", (0.0, 0.0)))
            return cls(**data)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise TargetError(
                f"cost-model calibration {path} is unreadable: {error}; run `qcompile profile`"
            ) from error


def calibration_path(target: str) -> Path:
    """Where ``qcompile profile`` stores a target's calibration: ``$QCOMPILE_HOME/profiles`` or the user cache."""
    home = os.environ.get("QCOMPILE_HOME")
    base = Path(home) if home else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qcompile"
    return base / "profiles" / f"{target}.json"


class CostModel:
    """Predicted latency (us) and size (bytes) of layers on ``target``."""

    def __init__(self, target: Target, calibration: Calibration | None = None) -> None:
        self.target = target
        self.calibration = calibration

    @classmethod
    def for_target(cls, target: Target) -> CostModel:
        """The target's model, calibrated when ``qcompile profile`` has stored a calibration for it."""
        path = calibration_path(target.name)
        return cls(target, Calibration.load(path) if path.exists() else None)

    @property
    def calibrated(self) -> bool:
        return self.calibration is not None

    def bytes_moved(self, layer: LayerSpec, choice: Choice) -> float:
        """Weight bytes as the kernels read them, and activation bytes in and out."""
        activation_bytes = ACTIVATION_BITS[choice.activations] / 8
        packed = choice.weights == "fp32" or choice.weights in self.target.device.dtypes
        read = self.weight_bytes(layer, choice) if packed else layer.weight_elements
        return read + (layer.input_elements + layer.output_elements) * activation_bytes

    def weight_bytes(self, layer: LayerSpec, choice: Choice) -> float:
        return layer.weight_elements * WEIGHT_BITS[choice.weights] / 8

    def size_bytes(self, layer: LayerSpec, choice: Choice) -> float:
        """Bytes the artifact stores for this layer: weight codes, and scales and biases per channel."""
        per_channel = 4.0 if choice.is_float else 8.0  # float bias | float32 scale + int32 bias
        return math.ceil(self.weight_bytes(layer, choice)) + layer.output_channels * per_channel

    def roofline_us(self, layer: LayerSpec, choice: Choice) -> float:
        """The roofline time in microseconds; ``inf`` when the target cannot run ``choice``."""
        device = self.target.device
        dtype = compute_dtype(choice, self.target)
        if dtype is None:
            return math.inf
        moved = self.bytes_moved(layer, choice)
        bandwidth = next(speed for capacity, speed in device.memory_levels() if moved <= capacity)
        compute = layer.macs / device.peak_macs_per_second(dtype) if layer.macs else 0.0
        return max(compute, moved / bandwidth) * 1e6

    def factors(self, layer: LayerSpec, choice: Choice) -> tuple[float, float, float, float]:
        """``(a, b, c, d)``: scale of the roofline, fixed overhead (us), cost per activation element and per
        weight (us)."""
        dtype = compute_dtype(choice, self.target)
        if self.calibration is not None:
            # A row-wise reduction the calibration did not measure at this dtype is priced as measured in
            # float, or else as an elementwise node.
            fallbacks = () if layer.quantizable else (f"{layer.kind}/fp32", f"other/{dtype}")
            for key in (f"{layer.kind}/{dtype}", *fallbacks):
                if key in self.calibration.factors:
                    return self.calibration.factors[key]
        return 1.0 / DEFAULT_EFFICIENCY[layer.kind], self.target.device.op_overhead_us, 0.0, 0.0

    def latency_us(self, layer: LayerSpec, choice: Choice) -> float:
        """Predicted time of one layer; 0 for nodes fused into their producer or that only relabel memory."""
        if layer.free:
            return 0.0
        scale, overhead, per_element, per_weight = self.factors(layer, choice)
        elements = layer.input_elements + layer.output_elements
        roofline = scale * self.roofline_us(layer, choice)
        return roofline + overhead + per_element * elements + per_weight * layer.weight_elements

    def transition_us(self, elements: int) -> float:
        """Time to change a tensor of ``elements`` between float and int8 where a float layer meets an int8
        one: a (De)QuantizeLinear and, on CPUs, a layout change. Uncalibrated: both read and write the tensor
        (1 + 4 bytes an element) twice from on-chip memory, plus two node overheads."""
        if self.calibration is not None and any(self.calibration.transition):
            per_element, fixed = self.calibration.transition
            return per_element * elements + fixed
        device = self.target.device
        return 2 * elements * 5 / (device.onchip_bandwidth_gbs * 1e3) + 2 * device.op_overhead_us

    def model_latency_ms(
        self,
        layers: list[LayerSpec],
        choices: dict[str, Choice],
        default: Choice = FLOAT,
        edges: list[tuple[str, str, int]] | None = None,
    ) -> float:
        """End to end: every node at its choice (``default`` where none is given), the executor's time
        between kernels, and a transition on each of ``edges`` (see :func:`layer_edges`) whose two layers
        differ in being float."""
        running = [layer for layer in layers if not layer.free]
        total = sum(self.latency_us(layer, choices.get(layer.name, default)) for layer in running)
        between = self.calibration.node_overhead_us if self.calibration else 0.0
        for producer, consumer, elements in edges or []:
            if choices.get(producer, default).is_float != choices.get(consumer, default).is_float:
                total += self.transition_us(elements)
        return (total + between * len(running)) / 1e3


def fit_factors(
    roofline_us: np.ndarray, elements: np.ndarray, weight_elements: np.ndarray, measured_us: np.ndarray
) -> tuple[tuple[float, float, float, float], float]:
    """``a, b, c, d >= 0`` minimising the relative error of ``a * roofline + b + c * elements + d * weights``;
    and its RMS."""
    import scipy.optimize  # only `qcompile profile` fits: every compile would pay the 0.6 s import

    scale = 1.0 / measured_us
    matrix = np.stack([roofline_us * scale, scale, elements * scale, weight_elements * scale], axis=1)
    solution, _ = scipy.optimize.nnls(matrix, np.ones_like(measured_us))
    predicted = matrix @ solution / scale
    error = float(np.sqrt(np.mean(((predicted - measured_us) / measured_us) ** 2)))
    return (float(solution[0]), float(solution[1]), float(solution[2]), float(solution[3])), error
