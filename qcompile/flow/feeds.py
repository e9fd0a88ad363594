"""Where the flow's samples come from: a folder of files, or any iterable of feeds given through the API."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from qcompile import calibration
from qcompile.calibration import Feed, Preprocess
from qcompile.errors import CalibrationError
from qcompile.runtime import Session


def feeds_from(
    source: str | os.PathLike[str] | Iterable[Feed] | None,
    inputs: list[calibration.InputSpec],
    preprocess: Preprocess | None,
    what: str,
) -> Iterable[Feed]:
    """The samples of ``source`` for a model with ``inputs``; ``what`` names them in errors."""
    if source is None:
        raise CalibrationError(
            f"no {what} data; pass a folder of .npy/.npz/images (--calibration DIR) "
            "or an iterable of feeds through the API"
        )
    if isinstance(source, str | os.PathLike):
        return calibration.from_folder(Path(source), inputs, preprocess)
    return source


def session_inputs(session: Session) -> list[calibration.InputSpec]:
    """The input specs of a loaded artifact, for reading samples for it."""
    return [calibration.InputSpec(info.name, info.shape, np.dtype(info.dtype)) for info in session.inputs]
