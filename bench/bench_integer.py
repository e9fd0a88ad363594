"""Integer-only lowering on real models: bit-exactness of onnxruntime and TVM against the numpy oracle,
accuracy against the QDQ graph, and latency against onnxruntime, in one run.

    python bench/bench_integer.py [--crops 120] [--sentences 100] [--oracle 8]

Each model is compiled for ``int8-npu`` (every layer quantized, the integer-only graph lowered from it, and
that graph built with TVM: on qcompile's int8 kernels where they cover it, else TVM's ONNX importer).
EfficientNet-Lite0: ``--crops`` held-out photo crops (calibrated on 32 others); top-1 agreement and cosine
against fp32 for the QDQ graph and the integer graph, the integer graph's outputs against the numpy oracle
under onnxruntime and the TVM library on the first ``--oracle`` crops. ResNet-18 (the architecture with
torch's initial weights, BatchNorm statistics from photos: for speed and exactness; its top-1 agreement is
with its own fp32 model). The digits CNN: the 397 held-out digits, accuracy against the labels.
all-MiniLM-L6-v2: ``--sentences`` held-out pydoc sentences, mean-pooled embedding cosine to fp32.

Latency (EfficientNet-Lite0, ResNet-18, batch 1): onnxruntime fp32, onnxruntime int8 (its own
``quantize_static``, QDQ, per channel), qcompile's QDQ graph on onnxruntime, the integer graph on
onnxruntime's integer kernels, and the TVM library, all in this process, in interleaved rounds with a pause
before each (onnxruntime's and TVM's worker threads spin after a run). Then the TVM library's per-kernel
profile: each kernel timed alone on its real constants.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import zoo
from bench_spine import quantize_static

from qcompile import api, runtime
from qcompile.backends import tvm as tvm_backend
from qcompile.backends.integer import reference as integer_reference
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
    stats["default_executor"] = sessions["tvm"].manifest.default_executor
    stats["lowering"] = sessions["tvm"].manifest.executors["tvm"].lowering
    return stats


def report(name: str, stats: dict[str, Any]) -> None:
    print(f"\n{name}: integer graph = numpy oracle on {stats['exact_ort']}/{stats['checked']} inputs (onnxruntime), "
          f"{stats['exact_tvm']}/{stats['checked']} (TVM)")  # fmt: skip
    print(f"  top-1 agreement with fp32: QDQ {stats['top1_onnxruntime']:.4f}, integer {stats['top1_integer']:.4f}; "
          f"mean cosine: QDQ {stats['cosine_onnxruntime']:.5f}, integer {stats['cosine_integer']:.5f}")  # fmt: skip
    if "accuracy_integer" in stats:
        print(f"  accuracy on labels: fp32 {stats['accuracy_onnxruntime-fp32']:.4f}, QDQ "
              f"{stats['accuracy_onnxruntime']:.4f}, integer {stats['accuracy_integer']:.4f}")  # fmt: skip
    print(f"  TVM library: {stats['lowering']}; the artifact's default executor: {stats['default_executor']}")


def latency(name: str, artifact: Path, model: Path, calibration: list[dict[str, np.ndarray]], work: Path) -> None:
    """Batch-1 medians of every executor in this process, with ratios against onnxruntime fp32 and int8."""
    sessions = {key: runtime.load(artifact, key) for key in ("onnxruntime-fp32", "onnxruntime", "integer", "tvm")}
    theirs = quantize_static(model, calibration, work / f"{model.stem}_ort_int8.onnx")
    feed = calibration[0]
    runs: dict[str, Any] = {
        "onnxruntime fp32": lambda: sessions["onnxruntime-fp32"].run(feed),
        "onnxruntime int8 (quantize_static)": lambda: theirs.run(None, feed),
        "qcompile QDQ on onnxruntime": lambda: sessions["onnxruntime"].run(feed),
        "integer graph on onnxruntime": lambda: sessions["integer"].run(feed),
        "TVM library": lambda: sessions["tvm"].run(feed),
    }
    timed = bench.compare(runs, rounds=5, round_seconds=0.5, pause_seconds=0.3)
    ours = timed["TVM library"].median_ms
    print(f"\n{name} latency, batch 1 (median ms of {min(t.runs for t in timed.values())}+ runs each):")
    print("| executor | median ms | p90 ms | TVM library is faster by |")
    print("|---|---|---|---|")
    for key, value in timed.items():
        print(f"| {key} | {value.median_ms:.3f} | {value.p90_ms:.3f} | {value.median_ms / ours:.2f}x |")
    profile(artifact)


def profile(artifact: Path, top: int = 8) -> None:
    """Each kernel of the TVM library timed alone (its real constants, random activations), largest first."""
    import time

    import tvm
    from tvm import relax

    from qcompile.backends.tvm import integer

    manifest = runtime.load(artifact, "tvm").manifest
    target = manifest.executors["tvm"].target or {}
    flavor, float_flavor, _ = tvm_backend.kernel_flavors({"kind": "llvm"})
    flavor = dataclasses.replace(flavor, tiles=any(f.startswith("+amx") for f in target.get("mattr", [])))
    module = integer.to_relax(onnx.load(str(artifact / api.INTEGER_ONNX)), flavor, float_flavor)
    functions = {gv.name_hint: f for gv, f in module.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    library = tvm.compile(tvm.IRModule(functions), target=tvm.target.Target(target))
    rng = np.random.default_rng(0)
    rows = []
    for block in module["main"].body.blocks:
        for binding in block.bindings:
            call = binding.value
            if not isinstance(call, relax.Call) or "call_tir" not in str(call.op):
                continue
            arguments = list(call.args[1].fields) + ([] if "inplace" in str(call.op) else [binding.var])
            tensors = []
            for argument in arguments:
                if isinstance(argument, tvm.ir.expr.GenericConst):
                    tensors.append(argument.value)
                    continue
                ty = argument.ty
                shape, dtype = tuple(int(d) for d in ty.shape.values), str(ty.dtype)
                data = rng.integers(0, 256, shape).astype(dtype) if dtype == "uint8" else np.zeros(shape, dtype)
                tensors.append(tvm.runtime.tensor(data))
            function = library[call.args[0].name_hint]
            timings = []
            for index in range(25):
                started = time.perf_counter()
                function(*tensors)
                if index >= 5:
                    timings.append((time.perf_counter() - started) * 1e6)
            rows.append((float(np.median(timings)), call.args[0].name_hint, tensors[0].shape, tensors[-1].shape))
    total = sum(row[0] for row in rows)
    kinds: dict[str, float] = {}
    for microseconds, label, _, _ in rows:
        kind = label.split("_", 1)[1]
        kinds[kind] = kinds.get(kind, 0.0) + microseconds
    by_kind = ", ".join(f"{kind} {value:.0f} us" for kind, value in sorted(kinds.items(), key=lambda kv: -kv[1]))
    print(f"  per-kernel profile: {len(rows)} kernel calls, {total:.0f} us summed; by kind: {by_kind}")
    for microseconds, label, source, result in sorted(rows, reverse=True)[:top]:
        print(f"    {microseconds:7.1f} us  {label:24s} {tuple(source)} -> {tuple(result)}")


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
        latency("EfficientNet-Lite0", artifact, model, calibration, work)
        # ResNet-18
        model = zoo.export_resnet18(work / "resnet18.onnx")
        artifact = work / "resnet18.int8-npu"
        api.compile(model, artifact, target="int8-npu", calibration_data=calibration, progress=False)
        report(f"ResNet-18 ({args.crops} held-out photo crops)", compare(artifact, feeds, args.oracle, None))
        latency("ResNet-18", artifact, model, calibration, work)
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
    timings = {
        name: bench.measure(lambda s=session: s.run(sample), runs=30 if name != "tvm" else 3, warmup=2).median_ms
        for name, session in sessions.items()
    }
    print(f"\nall-MiniLM-L6-v2 ({sentences} sentences): integer graph = numpy oracle on {exact['onnxruntime']}/"
          f"{min(oracle, sentences)} (onnxruntime), {exact['tvm']}/{min(oracle, sentences)} (TVM)")  # fmt: skip
    qdq, integer = cosines["onnxruntime"], cosines["integer"]
    print(f"  mean-pooled cosine to fp32: QDQ {np.mean(qdq):.4f} (min {min(qdq):.4f}), "
          f"integer {np.mean(integer):.4f} (min {min(integer):.4f})")  # fmt: skip
    print("  latency ms (median, batch 1): " + ", ".join(f"{key} {value:.3f}" for key, value in timings.items()))


if __name__ == "__main__":
    main()
