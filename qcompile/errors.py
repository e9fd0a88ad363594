"""Every user-facing failure of qcompile.

The CLI prints ``error: <message>`` on one line and exits 2 for any ``QCompileError``; a message names
the model, node or value at fault and says what to do about it.
"""

from __future__ import annotations


class QCompileError(Exception):
    """Base class of every error qcompile reports to a user."""


class ModelLoadError(QCompileError):
    """The model file cannot be read, parsed, checked or normalized."""


class UnsafeModelError(ModelLoadError):
    """The model refers to files outside its own folder."""


class UnsupportedModelError(QCompileError):
    """The model uses an operator, opset or shape that qcompile cannot handle."""


class InvalidWeightsError(QCompileError):
    """A weight holds NaN or Inf."""


class CalibrationError(QCompileError):
    """Calibration data is missing, empty or does not match the model's inputs."""


class TargetError(QCompileError):
    """The target is unknown or its description is invalid."""


class ArtifactError(QCompileError):
    """An artifact cannot be written, or a written one fails verification."""


class BackendError(QCompileError):
    """A backend failed to build or run the model."""


class BudgetError(QCompileError):
    """No choice of bit-widths meets the latency / size budget."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (tools raise multi-line ones), or its type's name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
