"""Integer-only lowering on real models: bit-exactness of onnxruntime and TVM against the numpy oracle,
accuracy against the QDQ graph, and latency, in one run.

    python bench/bench_integer.py [--crops 120] [--sentences 100] [--oracle 8]

Each model is compiled for ``int8-npu`` (every layer quantized, the integer-only graph lowered from it,
built with TVM too). EfficientNet-Lite0: ``--crops`` held-out photo crops (calibrated on 32 others); top-1
agreement and cosine against fp32 for the QDQ graph and the integer graph, the integer graph's outputs
against the numpy oracle and the TVM library on the first ``--oracle`` crops. The digits CNN: the 397
held-out digits, accuracy against the labels. all-MiniLM-L6-v2: ``--sentences`` held-out pydoc
sentences, mean-pooled embedding cosine to fp32 for the QDQ and the integer graph. Latency: batch-1
medians of onnxruntime fp32, the QDQ graph, the integer graph (onnxruntime's integer kernels) and the TVM
library (default, unscheduled build), all in this process.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import zoo

from qcompile import api, runtime
from qcompile.passes import integer_reference
from qcompile.runtime import bench


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))


def compare(
    artifact: Path, feeds: list[dict[str, np.ndarray]], oracle: int, labels: np.ndarray | None
) -> dict[str, Any]:
    sessions = {name: runtime.load(artifact, name) for name in ("onnxruntime-fp32", "onnxruntime", "integer", "tvm")}
    lowered = onnx.load(str(artifact / api.INTEGER_ONNX))
    stats: dict[str, Any] = {"exact_ort": 0, "exact_tvm": 0, "checked": 0}
    agreement = {"onnxruntime": 0, "integer": 0}
    cosines: dict[str, list[float]] = {"onnxruntime": [], "integer": []}
    correct = {"onnxruntime-fp32": 0, "onnxruntime": 0, "integer": 0}
    for index, feed in enumerate(feeds):
        outputs = {name: next(iter(session.run(feed).values())) for name, session in sessions.items() if name != "tvm"}
        if index < oracle:
            expected = integer_reference.run(lowered, feed)[0]
            stats["checked"] += 1
            stats["exact_ort"] += int(np.array_equal(outputs["integer"], expected))
            stats["exact_tvm"] += int(np.array_equal(next(iter(sessions["tvm"].run(feed).values())), expected))
        reference = outputs["onnxruntime-fp32"]
        for name in ("onnxruntime", "integer"):
            agreement[name] += int(outputs[name].argmax() == reference.argmax())
            cosines[name].append(cosine(outputs[name].ravel(), reference.ravel()))
        if labels is not None:
            for name in correct:
                correct[name] += int(outputs[name].argmax() == labels[index])
    count = len(feeds)
    stats.update({f"top1_{name}": agreement[name] / count for name in agreement})
    stats.update({f"cosine_{name}": float(np.mean(cosines[name])) for name in cosines})
    if labels is not None:
        stats.update({f"accuracy_{name}": correct[name] / count for name in correct})
    sample = feeds[0]
    stats["latency_ms"] = {
        name: bench.measure(lambda s=session: s.run(sample), runs=50 if name != "tvm" else 5, warmup=3).median_ms
        for name, session in sessions.items()
    }
    return stats


def report(name: str, stats: dict[str, Any]) -> None:
    latency = stats["latency_ms"]
    print(f"\n{name}: integer graph = numpy oracle on {stats['exact_ort']}/{stats['checked']} inputs (onnxruntime), "
          f"{stats['exact_tvm']}/{stats['checked']} (TVM)")  # fmt: skip
    print(f"  top-1 agreement with fp32: QDQ {stats['top1_onnxruntime']:.4f}, integer {stats['top1_integer']:.4f}; "
          f"mean cosine: QDQ {stats['cosine_onnxruntime']:.5f}, integer {stats['cosine_integer']:.5f}")  # fmt: skip
    if "accuracy_integer" in stats:
        print(f"  accuracy on labels: fp32 {stats['accuracy_onnxruntime-fp32']:.4f}, QDQ "
              f"{stats['accuracy_onnxruntime']:.4f}, integer {stats['accuracy_integer']:.4f}")  # fmt: skip
    print("  latency ms (median, batch 1): " + ", ".join(f"{key} {value:.3f}" for key, value in latency.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crops", type=int, default=120)
    parser.add_argument("--oracle", type=int, default=8)
    parser.add_argument("--sentences", type=int, default=100)
    args = parser.parse_args()
    print(f"machine: {bench.machine()}")
    with tempfile.TemporaryDirectory(prefix="bench-integer-") as scratch:
        work = Path(scratch)
        # digits CNN
        model, _ = zoo.train_digits_cnn(work / "digits.onnx")
        train_x, _, test_x, test_y = zoo.digits_split()
        artifact = work / "digits.int8-npu"
        calibration = [{"image": train_x[i : i + 1]} for i in range(32)]
        api.compile(model, artifact, target="int8-npu", calibration_data=calibration, progress=False)
        feeds = [{"image": test_x[i : i + 1]} for i in range(len(test_x))]
        report("digits CNN (397 held-out digits)", compare(artifact, feeds, args.oracle, test_y))
        # EfficientNet-Lite0
        model = zoo.export_efficientnet_lite0(work / "efficientnet_lite0.onnx")
        calibration = [{"input": image[None]} for image in zoo.photo_crops(32, seed=2)]  # type: ignore[misc]
        artifact = work / "efficientnet.int8-npu"
        api.compile(model, artifact, target="int8-npu", calibration_data=calibration, progress=False)
        feeds = [{"input": image[None]} for image in zoo.photo_crops(args.crops, seed=1)]
        report(f"EfficientNet-Lite0 ({args.crops} held-out photo crops)", compare(artifact, feeds, args.oracle, None))
        # all-MiniLM-L6-v2: every node in integers
        model = zoo.export_minilm(work / "minilm.onnx")
        artifact = work / "minilm.int8-npu"
        sentences = list(zoo.minilm_feeds(zoo.pydoc_sentences(16)))
        api.compile(model, artifact, target="int8-npu", calibration_data=sentences, progress=False)
        minilm(artifact, args.sentences, args.oracle)


def minilm(artifact: Path, sentences: int, oracle: int) -> None:
    """Mean-pooled embedding cosine to fp32 (the spine's metric) for the QDQ and the integer graph."""
    sessions = {name: runtime.load(artifact, name) for name in ("onnxruntime-fp32", "onnxruntime", "integer", "tvm")}
    lowered = onnx.load(str(artifact / api.INTEGER_ONNX))
    cosines: dict[str, list[float]] = {"onnxruntime": [], "integer": []}
    exact = {"onnxruntime": 0, "tvm": 0}
    feeds = list(zoo.minilm_feeds(zoo.pydoc_sentences(sentences, offset=100)))
    for index, feed in enumerate(feeds):
        mask = feed["attention_mask"][0].astype(bool)
        outputs = {name: next(iter(session.run(feed).values())) for name, session in sessions.items() if name != "tvm"}
        if index < oracle:
            expected = integer_reference.run(lowered, feed)[0]
            exact["onnxruntime"] += int(np.array_equal(outputs["integer"], expected))
            exact["tvm"] += int(np.array_equal(next(iter(sessions["tvm"].run(feed).values())), expected))
        reference = outputs["onnxruntime-fp32"][0][mask].mean(0)
        for name in cosines:
            cosines[name].append(cosine(outputs[name][0][mask].mean(0), reference))
    sample = feeds[0]
    latency = {
        name: bench.measure(lambda s=session: s.run(sample), runs=30 if name != "tvm" else 3, warmup=2).median_ms
        for name, session in sessions.items()
    }
    print(f"\nall-MiniLM-L6-v2 ({sentences} sentences): integer graph = numpy oracle on {exact['onnxruntime']}/"
          f"{min(oracle, sentences)} (onnxruntime), {exact['tvm']}/{min(oracle, sentences)} (TVM)")  # fmt: skip
    qdq, integer = cosines["onnxruntime"], cosines["integer"]
    print(f"  mean-pooled cosine to fp32: QDQ {np.mean(qdq):.4f} (min {min(qdq):.4f}), "
          f"integer {np.mean(integer):.4f} (min {min(integer):.4f})")  # fmt: skip
    print("  latency ms (median, batch 1): " + ", ".join(f"{key} {value:.3f}" for key, value in latency.items()))


if __name__ == "__main__":
    main()
