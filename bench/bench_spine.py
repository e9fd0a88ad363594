"""The spine's figures in one run: qcompile against onnxruntime's quantize_static on real models.

    python bench/bench_spine.py [--work DIR] [--eval-crops 240] [--sentences 200]

For EfficientNet-Lite0 (240 held-out photo crops), all-MiniLM-L6-v2 (200 pydoc sentences) and a digits
CNN trained here: accuracy against fp32, and batch-1 latency of onnxruntime fp32, qcompile's default
executor and onnxruntime int8 (quantize_static, QDQ, per-channel, defaults), all measured in this process.
Prints a markdown table; nothing is asserted (tests prove behaviour, this measures it).
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import zoo

from qcompile import api, execution, runtime
from qcompile.runtime import bench


def quantize_static(model: Path, feeds: list[dict[str, np.ndarray]], output: Path) -> Any:
    """onnxruntime's own static quantizer with its defaults (QDQ, per-channel as the issue states)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds: Iterator[dict[str, np.ndarray]] = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    proto = onnx.load(str(model))
    proto.ir_version = execution.ORT_IR_VERSION
    source = output.with_suffix(".fp32.onnx")
    onnx.save(proto, str(source))
    quantize_static(str(source), str(output), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    return execution.session(onnx.load(str(output)))


class OrtRunner:
    def __init__(self, session: Any) -> None:
        self.session = session

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [output.name for output in self.session.get_outputs()]
        return dict(zip(names, self.session.run(None, feed), strict=True))


def default_executor(session: runtime.Session) -> str:
    """The executor the artifact's manifest chose at compile time (the row itself always runs int8)."""
    return str(session.manifest.default_executor)


def default_row(model: str, session: runtime.Session, feed: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """When compile time chose another executor than int8 onnxruntime, a row measuring that default too."""
    name = default_executor(session)
    if name == session.executor:
        return []
    chosen = session.with_executor(name)
    return [{"model": model, "method": f"qcompile default executor ({name})", "latency_ms": latency(chosen, feed)}]


def latency(runner: Any, feed: dict[str, np.ndarray]) -> Callable[[], object]:
    """What a row times; :func:`time_rows` times a model's rows together."""
    return functools.partial(runner.run, feed)


def time_rows(rows: list[dict[str, Any]]) -> None:
    """Replace each row's callable by its median latency, timing one model's rows in interleaved rounds
    (so warm-up and drift fall on every method alike: the digits CNN differs by microseconds)."""
    for model in dict.fromkeys(row["model"] for row in rows):
        timed = {row["method"]: row["latency_ms"] for row in rows if row["model"] == model and "latency_ms" in row}
        results = bench.compare(timed, rounds=10, round_seconds=0.3)
        for row in rows:
            if row["model"] == model and "latency_ms" in row:
                row["latency_ms"] = results[row["method"]].median_ms


def efficientnet(work: Path, crops: int) -> list[dict[str, Any]]:
    model = zoo.export_efficientnet_lite0(work / "efficientnet_lite0.onnx")
    calibration = [{"input": image[None]} for image in zoo.photo_crops(32, seed=2)]
    evaluation = [{"input": image[None]} for image in zoo.photo_crops(crops, seed=1)]
    started = time.perf_counter()
    api.compile(model, work / "effnet", calibration_data=calibration, build_tvm=False, progress=False)
    compile_no_tvm = time.perf_counter() - started
    started = time.perf_counter()
    api.compile(model, work / "effnet_tvm", calibration_data=calibration, progress=False)
    compile_with_tvm = time.perf_counter() - started
    ours = runtime.load(work / "effnet_tvm", "onnxruntime")
    fp32 = ours.with_executor("onnxruntime-fp32")
    theirs = OrtRunner(quantize_static(model, calibration, work / "effnet_ort_int8.onnx"))
    reference = np.concatenate([fp32.run(feed)["logits"] for feed in evaluation])
    probabilities = np.sort(np.exp(reference - reference.max(1, keepdims=True)), axis=1)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    confident = probabilities[:, -1] - probabilities[:, -2] >= 0.1
    rows = [{"model": "EfficientNet-Lite0", "method": "onnxruntime fp32", "latency_ms": latency(fp32, evaluation[0])}]
    for name, runner in (
        (f"qcompile W8A8 int8 ({default_executor(ours)} is the default)", ours),
        ("ORT quantize_static", theirs),
    ):
        logits = np.concatenate([runner.run(feed)["logits"] for feed in evaluation])
        agree = logits.argmax(1) == reference.argmax(1)
        top5 = np.mean([reference[i].argmax() in np.argsort(logits[i])[-5:] for i in range(len(logits))])
        rows.append(
            {
                "model": "EfficientNet-Lite0",
                "method": name,
                "latency_ms": latency(runner, evaluation[0]),
                "accuracy": f"top-1 {agree.mean() * 100:.1f} % all / {agree[confident].mean() * 100:.1f} % "
                f"confident ({confident.sum()}), top-5 {top5 * 100:.1f} %",
            }
        )
    rows += default_row("EfficientNet-Lite0", ours, evaluation[0])
    rows.append(
        {
            "model": "EfficientNet-Lite0",
            "method": "compile time (32 images)",
            "accuracy": f"{compile_no_tvm:.1f} s without TVM, {compile_with_tvm:.1f} s with the TVM library",
        }
    )
    return rows


def minilm(work: Path, sentences: int) -> list[dict[str, Any]]:
    model = zoo.export_minilm(work / "minilm.onnx")
    calibration = list(zoo.minilm_feeds(zoo.pydoc_sentences(32, offset=1000)))
    evaluation = list(zoo.minilm_feeds(zoo.pydoc_sentences(sentences)))
    api.compile(model, work / "minilm", calibration_data=calibration, build_tvm=False, progress=False)
    ours = runtime.load(work / "minilm", "onnxruntime")
    fp32 = ours.with_executor("onnxruntime-fp32")
    theirs = OrtRunner(quantize_static(model, calibration, work / "minilm_ort_int8.onnx"))

    def embeddings(runner: Any) -> np.ndarray:
        return np.concatenate(
            [zoo.mean_pool(runner.run(feed)["hidden"], feed["attention_mask"]) for feed in evaluation]
        )

    reference = embeddings(fp32)
    rows = [{"model": "all-MiniLM-L6-v2", "method": "onnxruntime fp32", "latency_ms": latency(fp32, evaluation[0])}]
    for name, runner in (
        (f"qcompile W8A8 int8 ({default_executor(ours)} is the default)", ours),
        ("ORT quantize_static", theirs),
    ):
        values = embeddings(runner)
        cosine = (values * reference).sum(1) / np.linalg.norm(values, axis=1) / np.linalg.norm(reference, axis=1)
        rows.append(
            {
                "model": "all-MiniLM-L6-v2",
                "method": name,
                "latency_ms": latency(runner, evaluation[0]),
                "accuracy": f"mean cosine {cosine.mean():.4f} (min {cosine.min():.4f}) on {len(evaluation)} sentences",
            }
        )
    rows += default_row("all-MiniLM-L6-v2", ours, evaluation[0])
    return rows


def digits(work: Path) -> list[dict[str, Any]]:
    model, _ = zoo.train_digits_cnn(work / "digits.onnx")
    train_x, _, test_x, test_y = zoo.digits_split()
    calibration = [{"image": train_x[i : i + 1]} for i in range(32)]
    api.compile(model, work / "digits", calibration_data=calibration, build_tvm=False, progress=False)
    ours = runtime.load(work / "digits", "onnxruntime")
    fp32 = ours.with_executor("onnxruntime-fp32")
    theirs = OrtRunner(quantize_static(model, calibration, work / "digits_ort_int8.onnx"))
    rows = []
    for name, runner in (
        ("onnxruntime fp32", fp32),
        (f"qcompile W8A8 int8 ({default_executor(ours)} is the default)", ours),
        ("ORT quantize_static", theirs),
    ):
        predictions = np.array(
            [runner.run({"image": test_x[i : i + 1]})["logits"].argmax() for i in range(len(test_x))]
        )
        rows.append(
            {
                "model": "digits CNN",
                "method": name,
                "latency_ms": latency(runner, {"image": test_x[:1]}),
                "accuracy": f"accuracy {(predictions == test_y).mean() * 100:.2f} % on {len(test_y)} digits",
            }
        )
    rows += default_row("digits CNN", ours, {"image": test_x[:1]})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="working folder (default: a temporary one)")
    parser.add_argument("--eval-crops", type=int, default=240)
    parser.add_argument("--sentences", type=int, default=200)
    args = parser.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="qcompile-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = efficientnet(work, args.eval_crops) + minilm(work, args.sentences) + digits(work)
    time_rows(rows)
    machine = bench.machine()
    print(
        f"\nmachine: {machine['cpu']}, {machine['cores']} cores; batch 1; median over 10 interleaved rounds "
        "of 0.3 s (or 10 runs) per method\n"
    )
    print("| model | method | latency ms | vs ORT fp32 | accuracy against fp32 |")
    print("|---|---|---|---|---|")
    base: dict[str, float] = {}
    for row in rows:
        if row["method"] == "onnxruntime fp32":
            base[row["model"]] = row["latency_ms"]
        value = row.get("latency_ms")
        ratio = f"{base[row['model']] / value:.2f}x" if value else ""
        print(
            f"| {row['model']} | {row['method']} | {value:.2f} | {ratio} | {row.get('accuracy', '')} |"
            if value
            else f"| {row['model']} | {row['method']} | | | {row.get('accuracy', '')} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
