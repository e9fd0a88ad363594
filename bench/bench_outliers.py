"""The outlier rewrites (SmoothQuant, Hadamard rotation, SplitQuant) on real models: exact in float, and what
they do to low-bit accuracy on SmolLM2-135M.

    python bench/bench_outliers.py [--work DIR] [--seq 512] [--configs w8a8+none,w4a8+rot+sq,...] [--skip-exactness]
        [--skip-minilm]

1. Exactness: each pass alone on the fp32 EfficientNet-Lite0, all-MiniLM-L6-v2 and SmolLM2-135M-Instruct
   (all 30 layers); the largest output difference relative to the largest output magnitude.
2. Perplexity of SmolLM2-135M-Instruct on the first 2048 tokens of ``pydoc_data.topics`` (4 windows of 512
   tokens, fp32 about 15.3), calibrated on 8 other windows (tokens 4096..8191; --calibration-windows N for
   more), for W8A8, W4A8 (int4 per-channel weights; g32: one scale per 32 inputs; head8: the LM head int8,
   quantized a second time from the same calibration) and W4A4 (uint4 activations), with no rewrite, each
   pass, and combinations ('all' = SmoothQuant auto + Hadamard + split; 'rotres' = Hadamard with the residual
   stream rotated offline, --rotate hadamard-residual). GPTQ weights (the default). Every
   layer is quantized (``float_threshold=0``: the per-layer float fallback would measure 211 layers).
3. all-MiniLM-L6-v2: mean cosine of mean-pooled embeddings to fp32 on 200 pydoc sentences, W8A8 with no
   rewrite, SmoothQuant and rotation, and int4 / 2-bit weights (every layer quantized; round-to-nearest and
   GPTQ) without and with SplitQuant.

Runs on the CPU; 3 to 10 minutes per configuration on 2 cores (SmoothQuant's alpha search and GPTQ
over 211 layers dominate).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import zoo

from qcompile import execution, frontend
from qcompile.flow.quantize import QuantizeOptions, quantize
from qcompile.passes.hadamard import HadamardRotationPass
from qcompile.passes.matmul_to_gemm import MatMulAddToGemmPass
from qcompile.passes.smoothquant import SmoothQuantPass, producer_statistics
from qcompile.passes.split_layers import SplitLayersPass
from qcompile.runtime import bench
from qcompile.search import sensitivity

# Name -> QuantizeOptions fields. 'sq' = SmoothQuant with alpha searched per producer.
REWRITES: dict[str, dict[str, Any]] = {
    "none": {},
    "sq": {"smoothquant": "auto"},
    "rot": {"rotate": "hadamard"},
    "split": {"split_layers": True},
    # Round-to-nearest weights: GPTQ's Hessians for the 633 split layers of the full SmolLM2 exceed 24 GB here.
    "split-rtn": {"split_layers": True, "weight_rounding": "nearest"},
    "none-rtn": {"weight_rounding": "nearest"},
    "rot+sq-rtn": {"rotate": "hadamard", "smoothquant": "auto", "weight_rounding": "nearest"},
    "all-rtn": {"rotate": "hadamard", "smoothquant": "auto", "split_layers": True, "weight_rounding": "nearest"},
    "rot+sq": {"rotate": "hadamard", "smoothquant": "auto"},
    "rotres": {"rotate": "hadamard-residual"},
    "rotres+sq": {"rotate": "hadamard-residual", "smoothquant": "auto"},
    "all": {"rotate": "hadamard", "smoothquant": "auto", "split_layers": True},
}
# 'g32': one weight scale per output channel and block of 32 inputs (--weight-block 32).
WIDTHS: dict[str, dict[str, Any]] = {
    "w8a8": {},
    "w4a8": {"bits": "4"},
    # int4 decoder layers, int8 LM head (QuaRot and GPTQ report with the head in higher precision).
    "w4a8-head8": {"bits": "4"},
    "w4g32a8": {"bits": "4", "weight_block": 32},
    "w4a4": {"bits": "4", "activation_bits": 4},
    "w4g32a4": {"bits": "4", "weight_block": 32, "activation_bits": 4},
}
DEFAULT_CONFIGS = "w8a8+none,w8a8+sq,w8a8+rot,w8a8+split,w8a8+rot+sq,w8a8+all,w4a8+none,w4a8+rot+sq,w4a4+rot+sq"


def rewrite(model: Any, which: str, feeds: list[dict[str, np.ndarray]]) -> str:
    """Apply one pass in place; a short description of what it did."""
    MatMulAddToGemmPass()(model)
    if which == "smoothquant":
        absmax, rows = producer_statistics(model, feeds)
        smoother = SmoothQuantPass(absmax.get, "auto", rows.get)
        smoother(model)
        folded = sum(1 for d in smoother.decisions if d.reason is None)
        return f"{folded} groups folded, {len(smoother.decisions) - folded} left alone"
    if which.startswith("hadamard"):
        rotator = HadamardRotationPass(residual=which == "hadamard-residual")
        rotator(model)
        done = [r for r in rotator.rotations if r.reason is None]
        folded = sum(1 for r in done if r.folded_into)
        stream = [r for r in done if r.folded_into and "residual stream" in r.folded_into]
        readers = f", residual stream: {len(stream[0].consumers)} readers" if stream else ""
        return f"{len(done)} rotations ({folded} folded{readers}, {len(done) - folded} online)"
    splitter = SplitLayersPass()
    splitter(model)
    return f"{len(splitter.splits)} layers split"


def _die_with_parent() -> None:
    """A child's first act: ask Linux to end it when its parent ends (a killed bench left an 18 GB child)."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


def in_child(function: Any, *args: Any) -> Any:
    """``function(*args)`` in a fresh process. Every heavy step runs this way, so the parent holds no model:
    the memory of a finished step is not all returned to the system, and the all-combined SmolLM2
    configuration alone peaks near 19 GB of the machine's 24 (it was OOM-killed beside a parent that had
    kept the exactness table's models)."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=_die_with_parent) as pool:
        return pool.submit(function, *args).result()


def fp32_latency_ms(model: Any, feed: dict[str, np.ndarray]) -> float:
    """Median onnxruntime latency of a float model (what a rewrite's runtime ops cost before quantization)."""
    session = execution.session(model)
    return bench.measure(lambda: session.run(None, feed), runs=50, warmup=3, max_seconds=15).median_ms


def exactness(models: dict[str, tuple[Path, list[dict[str, np.ndarray]]]]) -> list[str]:
    """Each pass alone in float: its largest output change, what it did, its time, and the fp32 latency of
    the rewritten model beside the original's (the cost of any online transform), in the same process."""
    lines = [
        "| model | pass | max relative difference | what it did | pass s | fp32 ms: original / rewritten |",
        "|---|---|---|---|---|---|",
    ]
    for name, (path, feeds) in models.items():
        source = frontend.load(path)
        references = sensitivity.run_all(source, feeds)
        original_ms = fp32_latency_ms(source, feeds[0])
        for which in ("smoothquant", "hadamard", "hadamard-residual", "split"):
            model = frontend.load(path)
            started = time.perf_counter()
            did = rewrite(model, which, feeds)
            seconds = time.perf_counter() - started
            outputs = sensitivity.run_all(model, feeds)
            worst = max(float(np.abs(o - r).max() / np.abs(r).max()) for o, r in zip(outputs, references, strict=True))
            rewritten_ms = fp32_latency_ms(model, feeds[0])
            lines.append(
                f"| {name} | {which} | {worst:.1e} | {did} | {seconds:.1f} | {original_ms:.2f} / {rewritten_ms:.2f} |"
            )
            print(lines[-1], flush=True)
    return lines


def exactness_table(work: Path, smollm2: Path, seq: int) -> list[str]:
    """:func:`exactness` on the three models (their exports and inputs made here, in the child)."""
    _, tokenizer = zoo.load_smollm2(layers=1)
    efficientnet = zoo.export_efficientnet_lite0(work / "efficientnet_lite0.onnx")
    minilm = zoo.export_minilm(work / "minilm.onnx")
    crops = zoo.photo_crops(8, seed=5)
    return exactness(
        {
            "EfficientNet-Lite0": (efficientnet, [{"input": crop[None]} for crop in crops]),
            "all-MiniLM-L6-v2": (minilm, list(zoo.minilm_feeds(zoo.pydoc_sentences(8)))),
            "SmolLM2-135M": (smollm2, zoo.token_windows(zoo.pydoc_tokens(tokenizer, 2 * seq), seq)),
        }
    )


def quantized_perplexity(path: Path, seq: int, config: str, windows: int) -> tuple[float, float]:
    """Perplexity of ``path`` quantized as ``config``, and the quantization's seconds (run in a child process:
    see :func:`perplexities`)."""
    _, tokenizer = zoo.load_smollm2(layers=1)
    evaluation = zoo.token_windows(zoo.pydoc_tokens(tokenizer, 2048), seq)
    calibration = zoo.token_windows(zoo.pydoc_tokens(tokenizer, windows * seq, offset=4096), seq)
    source = frontend.load(path)
    width, _, rewrites = config.partition("+")
    options = QuantizeOptions(float_threshold=0, sensitivity_samples=4, **WIDTHS[width], **REWRITES[rewrites])
    start = time.perf_counter()
    result = quantize(source, calibration, options, progress=False)
    model = result.model
    if width.endswith("-head8") and result.variant is not None:
        head = [record.name for record in result.layers if record.weight_bits is not None][-1]
        model = result.variant({record.name: "int8" if record.name == head else "int4" for record in result.layers})
    seconds = time.perf_counter() - start
    return zoo.perplexity(sensitivity.run_all(model, evaluation), evaluation), seconds


def fp32_perplexity(path: Path, seq: int) -> float:
    _, tokenizer = zoo.load_smollm2(layers=1)
    evaluation = zoo.token_windows(zoo.pydoc_tokens(tokenizer, 2048), seq)
    return zoo.perplexity(sensitivity.run_all(frontend.load(path), evaluation), evaluation)


def perplexities(path: Path, seq: int, configs: list[str], windows: int = 8) -> list[str]:
    """The perplexity table; fp32 and each configuration in a fresh child process (:func:`in_child`)."""
    fp32 = in_child(fp32_perplexity, path, seq)
    lines = [
        f"fp32 perplexity {fp32:.3f}",
        "",
        "| weights/activations | rewrites | perplexity | vs fp32 | quantize s |",
        "|---|---|---|---|---|",
    ]
    print(lines[0], flush=True)
    for config in configs:
        width, _, rewrites = config.partition("+")
        value, seconds = in_child(quantized_perplexity, path, seq, config, windows)
        change = 100 * (value / fp32 - 1)
        lines.append(f"| {width.upper()} | {rewrites} | {value:.3f} | {change:+.1f} % | {seconds:.0f} |")
        print(lines[-1], flush=True)
    return lines


# MiniLM rows: (weight bits, rounding, rewrites). W8A8 with the default options (float fallback on); int4 and
# 2-bit weights with every layer quantized, each with and without SplitQuant.
MINILM_CONFIGS = [("8", "gptq", "none"), ("8", "gptq", "sq"), ("8", "gptq", "rot")] + [
    (bits, rounding, rewrites)
    for bits in ("4", "2")
    for rounding in ("nearest", "gptq")
    for rewrites in ("none", "split")
]


def minilm_cosines(work: Path, sentences: int = 200) -> list[str]:
    """Mean cosine of mean-pooled embeddings to fp32 on pydoc sentences (calibration: 32 other sentences)."""
    path = work / "minilm.onnx"
    if not path.exists():
        zoo.export_minilm(path)
    source = frontend.load(path)
    calibration = list(zoo.minilm_feeds(zoo.pydoc_sentences(32, offset=1000)))
    evaluation = list(zoo.minilm_feeds(zoo.pydoc_sentences(sentences)))

    def embeddings(model: Any) -> np.ndarray:
        outputs = sensitivity.run_all(model, evaluation)
        pooled = [zoo.mean_pool(out, feed["attention_mask"]) for out, feed in zip(outputs, evaluation, strict=True)]
        return np.concatenate(pooled)

    reference = embeddings(source)
    lines = [
        f"all-MiniLM-L6-v2, mean cosine of mean-pooled embeddings to fp32 on {sentences} pydoc sentences",
        "| weights | rounding | rewrites | mean cosine (min) | quantize s |",
        "|---|---|---|---|---|",
    ]
    for bits, rounding, rewrites in MINILM_CONFIGS:
        options: dict[str, Any] = {"weight_rounding": rounding, **REWRITES[rewrites]}
        if bits != "8":
            options.update(bits=bits, float_threshold=0, sensitivity_samples=8)
        start = time.perf_counter()
        model = quantize(source, calibration, QuantizeOptions(**options), progress=False).model
        seconds = time.perf_counter() - start
        values = embeddings(model)
        cosine = (values * reference).sum(1) / np.linalg.norm(values, axis=1) / np.linalg.norm(reference, axis=1)
        label = {"8": "int8", "4": "int4", "2": "2-bit"}[bits]
        lines.append(
            f"| {label} | {rounding} | {rewrites} | {cosine.mean():.4f} ({cosine.min():.4f}) | {seconds:.0f} |"
        )
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="folder for exported models (default: a temporary one)")
    parser.add_argument("--seq", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated WIDTH+REWRITES entries")
    parser.add_argument("--skip-exactness", action="store_true", help="no exactness table")
    parser.add_argument("--skip-minilm", action="store_true", help="no MiniLM cosine table")
    parser.add_argument(
        "--calibration-windows",
        type=int,
        default=8,
        help="calibration windows of --seq tokens, from token 4096 on (default 8; GPTQ's int4 Hessians gain from more)",
    )
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_outliers_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; work folder {work}")
    configs = [entry for entry in dict.fromkeys(args.configs.split(",")) if entry]
    for config in configs:
        width, _, rewrites = config.partition("+")
        if width not in WIDTHS or rewrites not in REWRITES:
            parser.error(f"unknown configuration {config!r}: WIDTH in {sorted(WIDTHS)}, REWRITES in {sorted(REWRITES)}")
    smollm2 = work / f"smollm2_{args.seq}.onnx"
    if (configs or not args.skip_exactness) and not smollm2.exists():
        in_child(zoo.export_smollm2, smollm2, args.seq)
    report: list[str] = []
    if not args.skip_exactness:
        report += in_child(exactness_table, work, smollm2, args.seq)
        report.append("")
    if configs:
        report += perplexities(smollm2, args.seq, configs, args.calibration_windows)
        report.append("")
    if not args.skip_minilm:
        report += in_child(minilm_cosines, work)
    print("\n".join(report))


if __name__ == "__main__":
    main()
