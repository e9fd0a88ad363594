"""The order of the passes, checked when they run.

Each pass states what it needs of the model in ``requires`` (a float rewrite needs a model nobody has
annotated yet; QDQ insertion needs annotations) and onnx-ir checks it on every call. What ``requires``
cannot see from the graph alone is the order among passes that each leave a valid model: SmoothQuant's
scales are chosen from activation statistics that a rotation would change, a rotation must see the layers
before splitting multiplies them, GPTQ rounds the weights bias correction then measures. :data:`ORDER`
is that order; a :class:`PassLog` runs passes on one model and refuses one that comes after a pass it
must precede. Passes are optional: any subsequence of :data:`ORDER` is a valid run.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import onnx_ir as ir

from qcompile.passes.annotate import AnnotatePass
from qcompile.passes.bias_correction import BiasCorrectionPass
from qcompile.passes.equalize import ResidualEqualizationPass
from qcompile.passes.gptq import GPTQPass
from qcompile.passes.hadamard import HadamardRotationPass
from qcompile.passes.matmul_to_gemm import MatMulAddToGemmPass
from qcompile.passes.qdq import QDQPass
from qcompile.passes.smoothquant import SmoothQuantPass
from qcompile.passes.split_layers import SplitLayersPass
from qcompile.passes.ternarize import TernarizePass

# Float rewrites first (exact in float; SmoothQuant before rotation before splitting), then annotation and
# the passes that read it. Ternarization is the LUT pipeline's quantizer instead of annotation and QDQ.
ORDER: tuple[type[ir.passes.PassBase], ...] = (
    MatMulAddToGemmPass,
    SmoothQuantPass,
    HadamardRotationPass,
    SplitLayersPass,
    ResidualEqualizationPass,
    TernarizePass,
    AnnotatePass,
    GPTQPass,
    BiasCorrectionPass,
    QDQPass,
)
_POSITION = {kind: index for index, kind in enumerate(ORDER)}


class PassOrderError(RuntimeError):
    """A pass ran after one that must follow it: a bug in a flow, not in the user's input."""


@dataclass
class PassLog:
    """The passes run so far on one model, in order; :meth:`run` runs the next one if the order allows."""

    ran: list[type[ir.passes.PassBase]] = field(default_factory=list)

    def run(self, step: ir.passes.PassBase, model: ir.Model) -> ir.passes.PassResult:
        check_order([*self.ran, type(step)])
        result = step(model)
        self.ran.append(type(step))
        return result

    def fork(self) -> PassLog:
        """The log of a copy of the model: the passes that made it, and room for its own."""
        return PassLog(list(self.ran))


def check_order(kinds: Sequence[type[ir.passes.PassBase]]) -> None:
    """Raise :class:`PassOrderError` unless ``kinds`` (pass classes in the order they run) follow
    :data:`ORDER`, each at most once."""
    for earlier, later in itertools.pairwise(kinds):
        for kind in (earlier, later):
            if kind not in _POSITION:
                raise PassOrderError(f"{kind.__name__} has no place in qcompile.passes.manager.ORDER; add it there")
        if _POSITION[later] <= _POSITION[earlier]:
            raise PassOrderError(
                f"{later.__name__} cannot run after {earlier.__name__}: the order is "
                + " -> ".join(kind.__name__ for kind in ORDER)
            )
