"""Integer-only backend: a QDQ graph lowered to standard ONNX integer ops, and its numpy oracle.

:func:`lower` (:mod:`.lowering`, by the per-op rules of :mod:`.rules` on the arithmetic of
:mod:`.arithmetic`) turns the QDQ graph into one with no float arithmetic between input quantization and
output dequantization; :func:`reference.run <qcompile.backends.integer.reference.run>` evaluates that graph
with the integer semantics of the ONNX specification, the oracle every executor of it is checked against.
"""

from __future__ import annotations

from qcompile.backends.integer import reference
from qcompile.backends.integer.arithmetic import LoweringReport, dyadic
from qcompile.backends.integer.lowering import lower
from qcompile.backends.integer.reference import node_attributes

__all__ = ["LoweringReport", "dyadic", "lower", "node_attributes", "reference"]
