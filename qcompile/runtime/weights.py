"""A library's weights in a file of their own, read straight into the tensors that hold them.

A TVM library keeps its constants inside the ``.so``; loading it maps the file, copies the constants' blob and
builds the tensors from the copy: three times the weights in memory at the peak (SmolLM2-135M's decode-step
library, 178 MB of weights: 628 MB more resident while it loaded, 317 MB after). A library built with its
weights as parameters (:func:`qcompile.backends.tvm.lifted.lift_constants`) keeps them here instead, and the
runtime reads each one into a tensor it allocated: the weights are in memory once, from the start.

Format: ``QCWEIGHTS`` and a little-endian uint64 header length, a JSON header (``[{"dtype", "shape", "offset"},
...]`` in parameter order), then each array's bytes at its offset (a multiple of 64 from the file's start).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from qcompile.errors import ArtifactError

MAGIC = b"QCWEIGHTS"
ALIGN = 64


def write(path: Path, arrays: list[np.ndarray]) -> None:
    entries, offset = [], 0
    for array in arrays:
        entries.append({"dtype": array.dtype.name, "shape": list(array.shape), "offset": offset})
        offset += -(-array.nbytes // ALIGN) * ALIGN
    header = json.dumps(entries).encode()
    start = -(-(len(MAGIC) + 8 + len(header)) // ALIGN) * ALIGN
    with open(path, "wb") as handle:
        handle.write(MAGIC + struct.pack("<Q", len(header)) + header)
        for entry, array in zip(entries, arrays, strict=True):
            handle.seek(start + int(entry["offset"]))  # type: ignore[call-overload]
            handle.write(np.ascontiguousarray(array).tobytes())


def read(path: Path, allocate: Callable[[tuple[int, ...], str], tuple[Any, np.ndarray]]) -> list[Any]:
    """The arrays of ``path``, each read into the buffer ``allocate(shape, dtype)`` returns as (tensor, its
    writable numpy view); returns the tensors."""
    with open(path, "rb") as handle:
        if handle.read(len(MAGIC)) != MAGIC:
            raise ArtifactError(f"{path.name} is not a weights file (no {MAGIC.decode()} header)")
        (length,) = struct.unpack("<Q", handle.read(8))
        try:
            entries = json.loads(handle.read(length))
        except ValueError as error:
            raise ArtifactError(f"{path.name}: unreadable header ({error})") from error
        start = -(-(len(MAGIC) + 8 + length) // ALIGN) * ALIGN
        tensors = []
        for entry in entries:
            tensor, view = allocate(tuple(entry["shape"]), entry["dtype"])
            handle.seek(start + entry["offset"])
            if handle.readinto(view.reshape(-1).view(np.uint8).data) != view.nbytes:
                raise ArtifactError(f"{path.name} is truncated")
            tensors.append(tensor)
    return tensors
