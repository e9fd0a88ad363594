"""Calibration data sources. Each yields feeds (``{input name: array}``) one sample at a time.

Three sources: a folder of ``.npy`` / ``.npz`` files, a folder of images with a preprocessing spec, and
any Python iterable (through the API). Feeds are checked against the model's inputs as they stream, and
an empty source is an error, so a wrong folder never yields a silently uncalibrated model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qcompile.errors import CalibrationError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class InputSpec:
    """A model input: its name, static shape and numpy dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype[Any]


@dataclass(frozen=True)
class Preprocess:
    """How to turn an image file into a model input: resize, scale to [0, 1], normalize, lay out."""

    size: tuple[int, int] = (224, 224)  # height, width
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        if self.layout not in ("NCHW", "NHWC"):
            raise CalibrationError(f"preprocessing layout '{self.layout}' must be NCHW or NHWC")
        if any(value <= 0 for value in self.std):
            raise CalibrationError(f"preprocessing std {self.std} must be positive")
        if any(value <= 0 for value in self.size):
            raise CalibrationError(f"preprocessing size {self.size} must be positive")

    @classmethod
    def from_json(cls, text: str) -> Preprocess:
        """Parse the CLI's ``--preprocess`` JSON, e.g. ``{"size": [224, 224], "layout": "NCHW"}``."""
        try:
            fields = json.loads(text)
            return cls(
                size=tuple(fields.get("size", cls.size)),
                mean=tuple(fields.get("mean", cls.mean)),
                std=tuple(fields.get("std", cls.std)),
                layout=fields.get("layout", cls.layout),
            )
        except (ValueError, TypeError, AttributeError) as error:
            raise CalibrationError(f"--preprocess '{text}' is not a valid spec: {error}") from error

    def apply(self, path: Path) -> np.ndarray:
        from PIL import Image

        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB").resize((self.size[1], self.size[0]), Image.Resampling.BILINEAR)
        except OSError as error:
            raise CalibrationError(f"calibration image {path}: cannot be read ({error})") from error
        pixels = (np.asarray(rgb, dtype=np.float32) / 255.0 - np.array(self.mean, np.float32)) / np.array(
            self.std, np.float32
        )
        array = pixels.transpose(2, 0, 1) if self.layout == "NCHW" else pixels
        return array[None].astype(np.float32)


def _folder_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise CalibrationError(f"calibration data {folder}: not a folder")
    return sorted(path for path in folder.iterdir() if path.is_file())


def from_folder(folder: str | Path, inputs: list[InputSpec], preprocess: Preprocess | None = None) -> Iterator[Feed]:
    """Feeds from ``.npy`` files (single-input models), ``.npz`` files (one array per input name) or images."""
    files = _folder_files(Path(folder))
    usable = [path for path in files if path.suffix.lower() in {".npy", ".npz"} | IMAGE_SUFFIXES]
    if not usable:
        raise CalibrationError(f"calibration data {folder}: no .npy, .npz or image files in it")
    for path in usable:
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            if len(inputs) != 1:
                raise CalibrationError(f"calibration image {path.name}: images need a single-input model")
            yield {inputs[0].name: (preprocess or Preprocess()).apply(path)}
            continue
        try:
            loaded = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise CalibrationError(f"calibration file {path.name}: cannot be read ({error})") from error
        if suffix == ".npy":
            if len(inputs) != 1:
                raise CalibrationError(
                    f"calibration file {path.name}: a .npy holds one array, but the model "
                    f"has inputs {[spec.name for spec in inputs]}; use .npz files"
                )
            yield {inputs[0].name: loaded}
        else:
            with loaded:
                yield {key: loaded[key] for key in loaded.files}


def split_batch(feed: Feed, inputs: list[InputSpec]) -> Iterator[Feed]:
    """A feed whose leading dim is a multiple of the model's batch dim becomes several feeds."""
    first = inputs[0]
    array = feed.get(first.name)
    if (
        array is None
        or array.ndim != len(first.shape)
        or first.shape[0] <= 0
        or array.shape[0] == first.shape[0]
        or array.shape[0] % first.shape[0]
    ):
        yield feed
        return
    parts = array.shape[0] // first.shape[0]
    if not all(name in feed and feed[name].shape[0] == array.shape[0] for name in (s.name for s in inputs)):
        yield feed
        return
    step = first.shape[0]
    for part in range(parts):
        yield {name: value[part * step : (part + 1) * step] for name, value in feed.items()}


def checked(feeds: Iterable[Feed], inputs: list[InputSpec], source: str = "calibration data") -> Iterator[Feed]:
    """Check every feed against the model's inputs, split batches to the model's batch size, cast dtypes."""
    count = 0
    for raw in feeds:
        if not isinstance(raw, dict):
            raise CalibrationError(f"{source}: sample {count} is a {type(raw).__name__}, not a dict of arrays")
        for feed in split_batch({key: np.asarray(value) for key, value in raw.items()}, inputs):
            for spec in inputs:
                if spec.name not in feed:
                    raise CalibrationError(
                        f"{source}: sample {count} has no array for input '{spec.name}' (it has {sorted(feed)})"
                    )
                array = feed[spec.name]
                if tuple(array.shape) != spec.shape:
                    raise CalibrationError(
                        f"{source}: sample {count} gives input '{spec.name}' shape "
                        f"{tuple(array.shape)}, the model expects {spec.shape} (dims the model leaves dynamic "
                        "are fixed from the first calibration sample: the samples must agree)"
                    )
                if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
                    raise CalibrationError(f"{source}: sample {count} input '{spec.name}' holds NaN/Inf")
                feed[spec.name] = array.astype(spec.dtype, copy=False)
            count += 1
            yield {spec.name: feed[spec.name] for spec in inputs}
    if count == 0:
        raise CalibrationError(f"{source}: no samples; give at least one calibration sample")
