"""Golden artifact hashes: the sha256 of every ONNX file that compiling the digits CNN, EfficientNet-Lite0
and all-MiniLM-L6-v2 writes, for proving that a refactor changed nothing (tinygrad's replay idea).

    python bench/golden.py --models /tmp/golden-models > before.json   # on the old commit
    python bench/golden.py --models /tmp/golden-models > after.json    # on the new one, same machine
    diff before.json after.json

The models are exported once into ``--models`` (reused when present), so both runs compile the same bytes.
ONNX files only: calibration runs onnxruntime, whose float kernels differ between CPUs, so the hashes are
comparable on one machine; TVM libraries embed build paths and are left out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import numpy as np
import zoo

from qcompile import api

# (model, target, build the TVM library): every target kind that writes ONNX files of its own.
CASES = (
    ("digits", "host", True),
    ("digits", "int8-npu", False),
    ("digits", "fpga-lut", False),
    ("efficientnet", "host", False),
    ("efficientnet", "int8-npu", False),
    ("minilm", "host", False),
)


def _models(folder: Path) -> dict[str, tuple[Path, list[dict[str, np.ndarray]]]]:
    folder.mkdir(parents=True, exist_ok=True)
    digits = folder / "digits.onnx"
    if not digits.exists():
        zoo.train_digits_cnn(digits)
    effnet = folder / "efficientnet_lite0.onnx"
    if not effnet.exists():
        zoo.export_efficientnet_lite0(effnet)
    minilm = folder / "minilm.onnx"
    if not minilm.exists():
        zoo.export_minilm(minilm)
    train_x = zoo.digits_split()[0]
    return {
        "digits": (digits, [{"image": train_x[i : i + 1]} for i in range(32)]),
        "efficientnet": (effnet, [{"input": image[None]} for image in zoo.photo_crops(16, seed=2)]),
        "minilm": (minilm, list(zoo.minilm_feeds(zoo.pydoc_sentences(16, offset=1000)))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "qcompile-golden-models")
    parser.add_argument("--only", help="one model name")
    args = parser.parse_args()
    models = _models(args.models)
    hashes: dict[str, dict[str, str]] = {}
    for name, target, build_tvm in CASES:
        if args.only and name != args.only:
            continue
        path, feeds = models[name]
        with tempfile.TemporaryDirectory() as scratch:
            out = Path(scratch) / "out"
            api.compile(path, out, target=target, calibration_data=feeds, build_tvm=build_tvm, progress=False)
            hashes[f"{name}/{target}"] = {
                str(file.relative_to(out)): hashlib.sha256(file.read_bytes()).hexdigest()
                for file in sorted(out.rglob("*.onnx"))
            }
        print(f"{name}/{target}: {hashes[f'{name}/{target}']}", file=sys.stderr)
    print(json.dumps(hashes, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
