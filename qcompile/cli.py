"""Command-line interface: argument parsing only; the work is done by :mod:`qcompile.api`.

qcompile MODEL.onnx --calibration DIR [-o OUT] [--target host]   compile (the default command)
qcompile run OUT --input x.npy                                    run an artifact
qcompile bench OUT                                                latency beside onnxruntime fp32
qcompile gate OUT --max-latency-ms X [--max-accuracy-drop Y] ...  CI budgets: exit 0 pass, 1 fail
qcompile profile --target host                                    calibrate the cost model here
qcompile verify OUT [--emulate]                                   checksums, ELF, run under qemu vs host
qcompile toolchains [--install]                                   cross compilers, qemu, device runtimes
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import traceback
from pathlib import Path

import numpy as np

from qcompile.errors import QCompileError

COMMANDS = ("compile", "run", "generate", "bench", "gate", "profile", "verify", "toolchains", "targets")
EXIT_BUDGET_FAILED = 1
EXIT_ERROR = 2
EXIT_INTERNAL = 3


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="store_true", help="log each stage (and tracebacks of internal errors)"
    )
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return common


def _input_argument(parser: argparse.ArgumentParser, help_text: str, required: bool = False) -> None:
    parser.add_argument("-i", "--input", action="append", required=required, metavar="[NAME=]FILE", help=help_text)


def _alpha(text: str) -> float | str:
    if text in ("auto", "off"):
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number in [0, 1] or 'auto'") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not in [0, 1]")
    return value


def _compile_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "compile",
        parents=[_common()],
        help="compile an ONNX model into a verified int8 artifact (the default command)",
        description="Load, check and normalize MODEL, calibrate it on sample data, quantize it to int8 "
        "(W8A8), build it for the target, measure it, and write an artifact folder.",
    )
    parser.add_argument("model", help="path of the ONNX model (external data must sit in its folder)")
    parser.add_argument("-o", "--output", help="artifact folder to write (default: MODEL-STEM.TARGET beside the cwd)")
    parser.add_argument(
        "-t", "--target", default="host", help="target device (default: host); an unknown name lists the valid ones"
    )
    parser.add_argument(
        "-c",
        "--calibration",
        metavar="DIR",
        required=True,
        help="folder of calibration samples: .npy (single-input models), .npz (one array per "
        "input name) or images (with --preprocess); a leading batch dim is split",
    )
    parser.add_argument(
        "--eval",
        metavar="DIR",
        dest="eval_data",
        help="optional held-out folder (same format) to report accuracy against the float model",
    )
    parser.add_argument(
        "--input-shape",
        action="append",
        metavar="NAME=DxDx...",
        default=[],
        help="static shape for an input with dynamic dims, e.g. input_ids=1x128 (repeatable)",
    )
    parser.add_argument(
        "--preprocess",
        metavar="JSON",
        help='image preprocessing: {"size": [224, 224], "mean": [...], "std": [...], '
        '"layout": "NCHW"} (defaults: 224x224, ImageNet mean/std, NCHW)',
    )
    parser.add_argument(
        "--calibration-method",
        choices=("minmax", "percentile", "mse"),
        default="mse",
        help="activation range: min/max, 99.99th percentile, or MSE-optimal clipping (default)",
    )
    parser.add_argument(
        "--max-calibration-samples", type=int, metavar="N", help="stop calibrating after N samples (default: all)"
    )
    parser.add_argument(
        "--weight-rounding",
        choices=("gptq", "nearest"),
        default="gptq",
        help="int8 weight rounding: GPTQ error compensation, kept only where it beats "
        "round-to-nearest on held-out calibration rows (default), or round-to-nearest",
    )
    parser.add_argument(
        "--smoothquant",
        nargs="?",
        const=0.5,
        type=_alpha,
        metavar="ALPHA|auto|off",
        help="fold SmoothQuant scales max|x|^ALPHA / max|W|^(1-ALPHA) into the producers of MatMul/Gemm/Conv "
        "inputs (LayerNorm, linear layers), exact in float; 'auto' searches ALPHA per producer (default off; "
        "0.5 when given without a value; default: the target's recipe). Producers that cannot absorb a scale "
        "are left alone and listed in the manifest",
    )
    parser.add_argument(
        "--rotate",
        choices=("hadamard", "hadamard-residual", "auto", "none"),
        help="rotate MatMul/Gemm inputs by randomized Hadamard matrices (QuaRot style), folded into a linear "
        "producer where possible, else an online transform in standard ONNX ops; exact in float. "
        "hadamard-residual also rotates a pre-norm transformer's residual stream offline (embedding, residual "
        "writers, RMSNorm readers with the norm weights folded in): fewer online transforms, less accurate "
        "with static activation scales at 4-bit weights; auto rotates sequence models (linear layers reading "
        "many rows: transformers) and leaves single-row heads (CNN classifiers) alone (default: the target's "
        "recipe; host's is auto)",
    )
    parser.add_argument(
        "--split-layers",
        action=argparse.BooleanOptionalAction,
        help="SplitQuant: split each Conv/Gemm/MatMul into three layers holding the low, middle and high k-means "
        "clusters of its weights, summed after, each with its own scales (exact in float; 3x those layers' MACs; "
        "default: the target's recipe)",
    )
    parser.add_argument(
        "--equalize",
        nargs="?",
        const=0.5,
        type=float,
        metavar="ALPHA",
        help="fold per-channel scales s = max|x|^ALPHA / max|W|^(1-ALPHA) into the writers and readers of "
        "residual streams (exact in float; ALPHA defaults to 0.5; off unless given)",
    )
    parser.add_argument(
        "--bias-correction",
        choices=("sequential", "expected", "none"),
        default="sequential",
        help="sequential (default): fold the expected weight-rounding shift into the biases, then refit each "
        "Conv/Gemm bias in graph order so that its output mean in the quantized model equals the float "
        "model's (one onnxruntime session per layer; covers activation clipping too); expected: the first "
        "step only; none: leave biases alone",
    )
    parser.add_argument(
        "--bias-samples",
        type=int,
        default=32,
        metavar="N",
        help="calibration samples kept for the sequential bias refit (default 32)",
    )
    parser.add_argument(
        "--float-threshold",
        type=float,
        default=1e-3,
        metavar="ERR",
        help="keep a layer in float when quantizing it alone moves the outputs by more than this "
        "relative squared error (default 1e-3; 0 quantizes every layer)",
    )
    parser.add_argument(
        "--sensitivity-samples",
        type=int,
        default=16,
        metavar="N",
        help="calibration samples kept to measure per-layer sensitivity and error (default 16)",
    )
    parser.add_argument(
        "--bits",
        choices=("8", "4", "2", "auto"),
        default="8",
        help="weight width: 8 (default), 4, 2 (codes -1/0/1 with an MSE-fitted scale per channel: for accuracy "
        "studies, e.g. with --split-layers), or auto: per-layer formats (fp32, int8, int4, ternary weights; "
        "int8 activations) chosen by measured sensitivity and the target's cost model under the budgets",
    )
    parser.add_argument(
        "--weight-block",
        type=int,
        metavar="N",
        help="group-wise weights: one scale per output channel and block of N input channels of every 2-D "
        "MatMul/Gemm weight (e.g. 32 or 64 with --bits 4); default one scale per output channel",
    )
    parser.add_argument(
        "--ternary-scales",
        choices=("channel", "tensor"),
        default="channel",
        help="target fpga-lut only: the absmean scale of ternary weights per output channel (default) or one "
        "per weight matrix (BitNet b1.58); activations are int8 per row, scaled at run time",
    )
    parser.add_argument(
        "--activation-bits",
        type=int,
        choices=(8, 4, 16),
        default=8,
        help="activation width: 8 (uint8, default), 4 (uint4 codes stored in uint8 and clamped by a Clip; "
        "for accuracy studies such as W4A4: onnxruntime has no 4-bit kernels, so it is not faster) or 16 "
        "(uint16, opset 21 QuantizeLinear: W8A16; onnxruntime and TVM compute such layers in float, so it is "
        "slower than fp32 here, for accuracy studies and 16x8 integer hardware)",
    )
    parser.add_argument(
        "--activations",
        choices=("auto", "static", "dynamic"),
        default="auto",
        help="how linear layers with int8 weights quantize their inputs: 'static' (one scale per tensor, from "
        "calibration), 'dynamic' (one scale per row, i.e. per token, computed at run time: MatMulInteger, then "
        "float rescaling; needs a float unit) or 'auto' (default): dynamic for a causal LM with a KV cache, "
        "static otherwise. Attention products and other quantization points stay static",
    )
    parser.add_argument(
        "--latency-budget-ms",
        type=float,
        metavar="X",
        help="with --bits auto: end-to-end latency budget on the target, as the cost model predicts it",
    )
    parser.add_argument(
        "--size-budget-mb",
        type=float,
        metavar="Z",
        help="with --bits auto: budget for the bytes of weights and constants, in MB (1e6 bytes)",
    )
    parser.add_argument(
        "--max-accuracy-drop",
        type=float,
        metavar="Y",
        help="with --bits auto: accuracy budget in percentage points against the float model (top-1 "
        "disagreement for classifiers, 100 x (1 - mean cosine) otherwise), measured on the calibration samples "
        "held in memory (max of --sensitivity-samples and --bias-samples): the fastest Pareto point within the "
        "other budgets that meets it is chosen",
    )
    parser.add_argument(
        "--sensitivity",
        choices=("measured", "hessian"),
        default="measured",
        help="with --bits auto: how each layer's error per format is obtained: 'measured' (every format of "
        "every layer run on the calibration samples; default) or 'hessian' (int8 and w8a16 measured, int4 / "
        "int2 / ternary scaled from int8 by the Hessian-weighted weight-error ratio: about 40 %% of the runs)",
    )
    parser.add_argument("--no-tvm", action="store_true", help="skip the TVM library (onnxruntime executor only)")
    parser.add_argument(
        "--tokenizer",
        metavar="FILE",
        help="for a causal LM with a KV cache (past_key_values.* inputs, present.* outputs): the tokenizer.json "
        "to ship in the artifact for `qcompile generate` (default: tokenizer.json beside the model; its "
        "config.json there gives the context length and end-of-sequence tokens). Such a model's calibration "
        "samples need only input_ids: an empty cache, a mask of ones and positions from 0 are filled in",
    )
    parser.add_argument(
        "--decode-step",
        choices=("auto", "always", "off"),
        default="auto",
        help="for a causal LM with a KV cache on a CPU target: a library of qcompile's kernels for decode steps "
        "(one token on a cache of up to 511 positions, kept as 8-bit codes; `qcompile generate` decodes on it "
        "and goes on with onnxruntime past that), checked bit for bit against the numpy oracle. 'auto' "
        "(default) ships it when its step measured faster than onnxruntime's here; 'always' ships it "
        "regardless; 'off' builds none",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing artifact folder at --output")


def _run_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "run",
        parents=[_common()],
        help="run an artifact on inputs from .npy/.npz files",
        description="Verify the artifact's checksums, load it and run it once.",
    )
    parser.add_argument("artifact", help="artifact folder written by qcompile")
    _input_argument(
        parser, "input array: FILE.npy for a single-input model, NAME=FILE.npy per input, or one .npz", True
    )
    parser.add_argument("-o", "--output", metavar="FILE.npz", help="save the outputs to this .npz file")
    parser.add_argument("--executor", help="executor to use (default: the one the manifest names)")


def _generate_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "generate",
        parents=[_common()],
        help="generate text with a causal LM artifact (KV cache), streaming tokens to stdout",
        description="Verify the artifact, tokenize the prompt with the artifact's tokenizer, run the prefill, "
        "then one decode step per new token on the KV cache, printing the text as it grows; prefill and "
        "decode tokens per second go to stderr at the end.",
    )
    parser.add_argument("artifact", help="artifact folder of a decoder with a KV cache")
    parser.add_argument("-p", "--prompt", required=True, help="the text to continue ('-' reads standard input)")
    parser.add_argument(
        "-n", "--max-new-tokens", type=int, default=64, help="stop after this many new tokens (default 64)"
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 picks the likeliest token (greedy, the default); above 0 samples from softmax(logits / T)",
    )
    parser.add_argument(
        "--top-k", type=int, default=0, help="sample from the K likeliest tokens only (default 0: all of them)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampler (default 0)")
    parser.add_argument(
        "--chat",
        action="store_true",
        help="the prompt is a user's message: write it into the model's chat template (shipped in the artifact "
        "when the model folder had one) and generate the assistant's reply",
    )
    parser.add_argument("--system", help="with --chat: the system message before the user's (default: the template's)")
    parser.add_argument(
        "--executor",
        help="executor to run (default: the quantized model; it must run every sequence and cache length)",
    )


def _bench_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "bench",
        parents=[_common()],
        help="median and p90 latency beside onnxruntime fp32, in one run",
        description="Time the artifact's executor and onnxruntime running the float "
        "model the artifact was compiled from, in the same process.",
    )
    parser.add_argument("artifact", help="artifact folder written by qcompile")
    parser.add_argument("--executor", help="executor to time (default: the one the manifest names)")
    parser.add_argument("--runs", type=int, default=100, help="timed runs per executor (default 100)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed warm-up runs (default 10)")
    _input_argument(parser, "input to time with (default: random data of the input shapes)")
    parser.add_argument(
        "--rpc",
        metavar="HOST:PORT",
        help="time the artifact's TVM library on a remote device through a TVM RPC server "
        "(`python -m tvm.exec.rpc_server --port PORT` on the device); its outputs are checked against "
        "the quantized model run here",
    )


def _gate_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "gate",
        parents=[_common()],
        help="check an artifact against latency, accuracy and size budgets (exit 0 pass, 1 fail)",
        description="Measure the artifact (or, for --target another device, predict its latency with the "
        "target's cost model), print a table of every budget, optionally write JUnit XML, and exit 0 when "
        "every budget holds, 1 when any fails, 2 on an error.",
    )
    parser.add_argument("artifact", help="artifact folder written by qcompile")
    parser.add_argument("--max-latency-ms", type=float, metavar="X", help="median latency budget in milliseconds")
    parser.add_argument(
        "--max-accuracy-drop",
        type=float,
        metavar="Y",
        help="accuracy budget in percentage points against the float model: top-1 disagreement for "
        "classifiers, 100 x (1 - mean cosine) otherwise",
    )
    parser.add_argument(
        "--max-size-mb", type=float, metavar="Z", help="size budget of the deployed file, in MB (1e6 bytes)"
    )
    parser.add_argument(
        "--data",
        metavar="DIR",
        help="held-out samples (.npy/.npz/images) to measure accuracy on now; default: the figures the "
        "manifest recorded at compile time",
    )
    parser.add_argument(
        "-t",
        "--target",
        help="device to hold to the latency budget (default: the artifact's own, measured here); another "
        "target's latency is predicted by its cost model and labelled so",
    )
    parser.add_argument("--executor", help="executor to hold to the budgets (default: the one the manifest names)")
    parser.add_argument("--runs", type=int, default=100, help="timed runs for the latency (default 100)")
    parser.add_argument("--junit", metavar="FILE.xml", help="also write the checks as JUnit XML")
    parser.add_argument(
        "--rpc",
        metavar="HOST:PORT",
        help="measure the latency of the artifact's TVM library on a remote device through a TVM RPC server",
    )


def _profile_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "profile",
        parents=[_common()],
        help="measure layers on this machine and calibrate the target's cost model",
        description="Run the sweep networks (a MobileNetV2-style CNN, a pre-norm and a post-norm transformer; "
        "fp32, W8A8 and W8A16) under onnxruntime's profiler, fit the cost model's efficiencies per layer kind "
        "and dtype, and store them where the cost model finds them ($QCOMPILE_HOME/profiles or "
        "~/.cache/qcompile/profiles).",
    )
    parser.add_argument(
        "-t", "--target", default="host", help="target to calibrate (the host here, any other with --rpc)"
    )
    parser.add_argument("--runs", type=int, default=60, help="profiled runs per network and session (default 60)")
    parser.add_argument("-o", "--output", metavar="FILE.json", help="write the calibration here instead")
    parser.add_argument(
        "--rpc",
        metavar="HOST:PORT",
        help="measure on a remote board through its TVM RPC server: every distinct compute layer of the sweep "
        "networks, alone, fp32 and W8A8, built by TVM for --target and timed on the board",
    )


def build_parser() -> argparse.ArgumentParser:
    from qcompile.api import version

    parser = argparse.ArgumentParser(
        prog="qcompile",
        description="A quantizing compiler for edge devices. "
        "'qcompile MODEL.onnx ...' is short for 'qcompile compile MODEL.onnx ...'.",
    )
    parser.add_argument("--version", action="version", version=f"qcompile {version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    _compile_parser(subparsers)
    _run_parser(subparsers)
    _generate_parser(subparsers)
    _bench_parser(subparsers)
    _gate_parser(subparsers)
    _profile_parser(subparsers)
    _verify_parser(subparsers)
    _toolchains_parser(subparsers)
    subparsers.add_parser(
        "targets",
        parents=[_common()],
        help="list the targets: what each builds and where it runs",
        description="List every bundled target, one line each: its name (for --target), the device, and what "
        "its pipeline writes. A target file of your own (--target path.toml) follows the format of "
        "qcompile/hwmodels/targets/.",
    )
    return parser


def _verify_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "verify",
        parents=[_common()],
        help="check an artifact's files, and run cross-compiled libraries under emulation",
        description="Check every file's sha256 against the manifest and the ELF header (machine, class, "
        "float ABI) of every cross-compiled library. With --emulate, run each aarch64 library with the "
        "artifact's own runner under qemu-user as the target's CPU and compare its outputs with the same "
        "graph built for and run on this machine (tolerance 1e-5 x max(1, max |output|); bit-exact "
        "expected). Exit 0 when every check passes, 1 when one fails, 2 on an error.",
    )
    parser.add_argument("artifact", help="artifact folder written by qcompile")
    parser.add_argument("--emulate", action="store_true", help="run aarch64 libraries under qemu-aarch64")
    parser.add_argument(
        "--cpu",
        help="qemu CPU model to emulate (default: the target's mcpu, e.g. cortex-a72 for rpi4); one that "
        "lacks a feature the library uses fails with the feature named",
    )
    _input_argument(parser, "input to run (default: seeded random data of the input shapes)")


def _toolchains_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "toolchains",
        parents=[_common()],
        help="show (or install) the cross compilers, qemu and device runtimes of the edge targets",
        description="List, per architecture (aarch64, armv7, riscv64), the GNU cross compiler, the qemu "
        "emulator and the TVM device runtime that cross targets need. --install installs the missing "
        "Debian packages with apt-get (as root, or through sudo) and takes the aarch64 TVM runtime "
        "(libtvm_runtime.so, libtvm_ffi.so, tvm-ffi headers) from the official wheels of the installed "
        "TVM version on PyPI, into $QCOMPILE_HOME/runtimes (default ~/.cache/qcompile/runtimes).",
    )
    parser.add_argument("--install", action="store_true", help="install what is missing")
    parser.add_argument("--arch", action="append", help="only this architecture (repeatable; default: all of them)")


def _read_inputs(specs: list[str], input_names: list[str]) -> dict[str, np.ndarray]:
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        name, sep, file_name = spec.rpartition("=")
        path = Path(file_name)
        if not path.is_file():
            raise QCompileError(f"input file {path} does not exist")
        try:
            loaded = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise QCompileError(f"input file {path}: not a .npy/.npz array ({error})") from error
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                feeds.update({key: loaded[key] for key in loaded.files})
        elif sep:
            feeds[name] = loaded
        elif len(input_names) == 1:
            feeds[input_names[0]] = loaded
        else:
            raise QCompileError(f"the model has inputs {input_names}; give each as NAME=FILE.npy")
    return feeds


def _command_compile(args: argparse.Namespace) -> int:
    from qcompile import api
    from qcompile.calibration import Preprocess
    from qcompile.flow.quantize import FROM_TARGET, QuantizeOptions
    from qcompile.frontend import parse_input_shapes
    from qcompile.runtime.manifest import Manifest

    # Outlier rewrites a flag does not name are the target's recipe (resolved in the compile flow).
    smoothquant = {None: FROM_TARGET, "off": None}.get(args.smoothquant, args.smoothquant)  # type: ignore[call-overload]
    rotate = {None: FROM_TARGET, "none": None}.get(args.rotate, args.rotate)
    options = QuantizeOptions(
        calibration=args.calibration_method,
        bias_correction=args.bias_correction,
        bias_samples=args.bias_samples,
        weight_rounding=args.weight_rounding,
        smoothquant=smoothquant,
        split_layers=FROM_TARGET if args.split_layers is None else bool(args.split_layers),
        rotate=rotate,
        equalize=args.equalize is not None,
        equalize_alpha=0.5 if args.equalize is None else args.equalize,
        float_threshold=args.float_threshold,
        max_calibration_samples=args.max_calibration_samples,
        sensitivity_samples=args.sensitivity_samples,
        bits=args.bits,
        activation_bits=args.activation_bits,
        activations=args.activations,
        weight_block=args.weight_block,
        latency_budget_ms=args.latency_budget_ms,
        size_budget_mb=args.size_budget_mb,
        max_accuracy_drop=args.max_accuracy_drop,
        sensitivity=args.sensitivity,
        ternary_scales=args.ternary_scales,
    )
    output = args.output or f"{Path(args.model).stem}.{args.target}"
    written = api.compile(
        args.model,
        output,
        target=args.target,
        calibration_data=args.calibration,
        eval_data=args.eval_data,
        input_shapes=parse_input_shapes(args.input_shape),
        options=options,
        preprocess=Preprocess.from_json(args.preprocess) if args.preprocess else None,
        build_tvm=not args.no_tvm,
        force=args.force,
        progress=not args.quiet,
        tokenizer=args.tokenizer,
        decode_step=args.decode_step,
    )
    manifest = Manifest.from_json(written)
    measured = manifest.measured
    assert measured is not None  # a compile always measures
    layers = manifest.layers
    floats = [layer for layer in layers if layer["float_reason"]]
    print(f"wrote {output}: {len(layers) - len(floats)}/{len(layers)} layers quantized, target {args.target}")
    for layer in floats:
        print(f"  float: {layer['name']} ({layer['op_type']}): {layer['float_reason']}")
    for scope, metrics in measured.accuracy.items():
        if isinstance(metrics, dict):
            figures = ", ".join(f"{key} {value:.4g}" for key, value in metrics.items() if isinstance(value, float))
            print(f"  accuracy vs fp32 ({scope}): {figures}")
            for output, per_output in metrics.get("per_output", {}).items():
                print(f"    output {output}: " + ", ".join(f"{key} {value:.4g}" for key, value in per_output.items()))
    reference = measured.latency_ms["onnxruntime-fp32"]["median_ms"]
    for name, latency in measured.latency_ms.items():
        print(
            f"  latency {name}: {latency['median_ms']:.2f} ms median ({reference / latency['median_ms']:.2f}x "
            "vs onnxruntime fp32)"
        )
    agreement = measured.accuracy.get("lut_vs_onnxruntime_max_abs_diff")
    if agreement is not None:
        print(f"  lut vs onnxruntime: max |diff| {agreement:g} (the same integer products)")
    if manifest.lut is not None:
        plan = manifest.lut
        resources = plan["resources"]
        print(
            f"  {args.target} estimate (not synthesized): {plan['step_latency_us']:.2f} us per step, "
            f"{plan['bound']}; {resources['luts']}/{resources['luts_available']} LUTs, "
            f"{resources['on_chip_kib']}/{resources['on_chip_kib_available']} KiB on chip; plan: {output}/lut/plan.json"
        )
    print(f"  default executor: {manifest.default_executor} ({measured.default_reason})")
    search = manifest.pass_entry("bit_search")
    if search is not None:
        predicted = search["predicted"]
        print(
            f"  bit-width search ({search['cost_model']}): predicted {predicted['latency_ms']:.2f} ms, "
            f"{predicted['size_mb']:.2f} MB, layers {predicted['layers']}; report: {output}/report.html"
        )
    return 0


def _command_run(args: argparse.Namespace) -> int:
    from qcompile import runtime

    session = runtime.load(args.artifact, args.executor)
    outputs = session.run(_read_inputs(args.input, [info.name for info in session.inputs]))
    for name, value in outputs.items():
        summary = f"{name}: shape {tuple(value.shape)} {value.dtype}"
        if value.ndim == 2 and value.shape[1] > 1:
            summary += f", argmax {value.argmax(axis=1).tolist()}"
        print(summary)
    if args.output:
        np.savez(args.output, **outputs)  # type: ignore[arg-type]
        print(f"saved {args.output}")
    return 0


def _command_generate(args: argparse.Namespace) -> int:
    from qcompile import runtime
    from qcompile.runtime.generate import GenerationError

    if args.system is not None and not args.chat:
        raise GenerationError("--system is the chat's system message: it takes effect with --chat only")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    session = runtime.load(args.artifact, args.executor)

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    result = session.generate(
        prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        on_text=show,
        chat=args.chat,
        system=args.system,
    )
    show("\n")
    print(
        f"[{result.executor}] prompt {result.prompt_tokens} tokens: prefill "
        f"{result.prefill_tokens_per_s:.1f} tokens/s ({result.prefill_s * 1e3:.0f} ms); {len(result.tokens)} new "
        f"tokens: decode {result.decode_tokens_per_s:.1f} tokens/s; stopped at {result.stopped}",
        file=sys.stderr,
    )
    return 0


def _command_bench(args: argparse.Namespace) -> int:
    from qcompile import runtime
    from qcompile.runtime import bench

    if args.rpc:
        return _bench_remote(args)
    session = runtime.load(args.artifact, args.executor)
    names = [info.name for info in session.inputs]
    feeds = _read_inputs(args.input, names) if args.input else session.random_feeds()
    reference = session.with_executor("onnxruntime-fp32")
    timed = {
        f"{session.executor} (artifact default)" if args.executor is None else session.executor: session,
        "onnxruntime fp32 (source model)": reference,
    }
    results = {
        name: bench.measure(functools.partial(s.run, feeds), runs=args.runs, warmup=args.warmup, max_seconds=60)
        for name, s in timed.items()
    }
    base = results["onnxruntime fp32 (source model)"].median_ms
    print(f"machine: {bench.machine()['cpu']}, {bench.machine()['cores']} cores")
    print(f"{'executor':<40} {'median ms':>10} {'p90 ms':>10} {'speedup':>8}")
    for name, latency in results.items():
        print(f"{name:<40} {latency.median_ms:>10.3f} {latency.p90_ms:>10.3f} {base / latency.median_ms:>7.2f}x")
    return 0


def _bench_remote(args: argparse.Namespace) -> int:
    from qcompile import runtime
    from qcompile.backends.tvm import rpc

    local = runtime.load(args.artifact, "onnxruntime")
    executor = args.executor or "tvm"
    entry = local.manifest.executors.get(executor)
    if entry is None or entry.kind != "tvm":
        raise QCompileError(f"--rpc times a TVM library; the artifact has no TVM executor '{executor}'")
    feeds = local.check_feeds(
        _read_inputs(args.input, [info.name for info in local.inputs]) if args.input else local.random_feeds()
    )
    remote = rpc.run_remote(
        local.folder / entry.file, [feeds[info.name] for info in local.inputs], args.rpc, runs=args.runs
    )
    here = local.run(feeds)
    difference = max(
        float(np.abs(a.astype(np.float64) - b).max()) for a, b in zip(remote.outputs, here.values(), strict=True)
    )
    latency = remote.latency
    print(f"device: {remote.device} ({entry.arch or 'host'} library, target {entry.target})")
    print(f"{'executor':<40} {'median ms':>10} {'p90 ms':>10} {'runs':>6}")
    print(f"{executor + ' (remote)':<40} {latency.median_ms:>10.3f} {latency.p90_ms:>10.3f} {latency.runs:>6}")
    print(f"outputs vs the quantized model run here (onnxruntime): max |diff| {difference:.3g}")
    return 0


def _command_gate(args: argparse.Namespace) -> int:
    from qcompile import api
    from qcompile.runtime import gate

    checks = api.gate(
        args.artifact,
        max_latency_ms=args.max_latency_ms,
        max_accuracy_drop=args.max_accuracy_drop,
        max_size_mb=args.max_size_mb,
        data=args.data,
        target=args.target,
        runs=args.runs,
        executor=args.executor,
        rpc=args.rpc,
    )
    print(gate.table(checks))
    if args.junit:
        gate.write_junit(checks, Path(args.junit), Path(args.artifact).name)
        print(f"wrote {args.junit}")
    failed = [check for check in checks if not check.passed]
    print("gate: " + ("PASS" if not failed else "FAIL: " + "; ".join(check.message() for check in failed)))
    return EXIT_BUDGET_FAILED if failed else 0


def _command_profile(args: argparse.Namespace) -> int:
    from qcompile import hwmodels
    from qcompile.flow import profile
    from qcompile.hwmodels.cost import calibration_path

    target = hwmodels.load_target(args.target)
    if args.rpc:
        calibration, measurements = profile.calibrate_remote(target, args.rpc, runs=args.runs, progress=not args.quiet)
    else:
        calibration, measurements = profile.calibrate(target, runs=args.runs, progress=not args.quiet)
    path = Path(args.output) if args.output else calibration_path(target.name)
    calibration.save(path)
    print(
        f"profiled {len(measurements)} nodes of {len(profile.default_sweep())} networks in "
        f"{calibration.fit['seconds']:.1f} s; wrote {path}"
    )
    print(f"{'kind/dtype':<18} {'nodes':>5} {'efficiency':>10} {'overhead us':>11} {'rms error':>9}")
    for key, (scale, overhead, *_per_element_and_weight) in sorted(calibration.factors.items()):
        fit = calibration.fit[key]
        print(
            f"{key:<18} {fit['layers']:>5} {f'{1 / scale:.3f}' if scale else '-':>10} {overhead:>11.1f} "
            f"{fit['rms_relative_error']:>9.2f}"
        )
    return 0


def _command_verify(args: argparse.Namespace) -> int:
    from qcompile import api, runtime

    feeds = None
    if args.input:
        names = [info.name for info in runtime.load(args.artifact, "onnxruntime-fp32").inputs]
        feeds = _read_inputs(args.input, names)
    records = api.verify(args.artifact, emulate=args.emulate, cpu=args.cpu, feeds=feeds)
    for record in records:
        state = {True: "ok", False: "FAIL", None: "not run"}[record["passed"]]
        print(f"{state:<8} {record['check']:<28} {record['detail']}")
    failed = [record for record in records if record["passed"] is False]
    print("verify: " + ("PASS" if not failed else f"FAIL ({len(failed)} checks)"))
    return EXIT_BUDGET_FAILED if failed else 0


def _command_toolchains(args: argparse.Namespace) -> int:
    from qcompile.backends.tvm import cross

    unknown = sorted(set(args.arch or []) - set(cross.TOOLCHAINS))
    if unknown:
        raise QCompileError(f"unknown architecture {unknown}; known: {sorted(cross.TOOLCHAINS)}")
    for arch in args.arch or list(cross.TOOLCHAINS):
        toolchain = cross.TOOLCHAINS[arch]
        if args.install:
            for line in cross.install(toolchain):
                print(f"{arch}: {line}")
        state = cross.status(toolchain)
        runtime = state["runtime"] or ("missing" if toolchain.runnable else "none published (build and check only)")
        print(
            f"{arch:<8} compiler {state['compiler'] or 'missing'}; "
            f"qemu {state['qemu'] or ('missing' if toolchain.qemu else '-')}; runtime {runtime}"
        )
    return 0


def _command_targets(_args: argparse.Namespace) -> int:
    from qcompile import api

    rows = api.targets()
    width = max(len(name) for name, _, _ in rows)
    for name, description, builds in rows:
        print(f"{name:<{width}}  {description}\n{'':<{width}}  builds: {builds}")
    return 0


def main(argv: list[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    leading = []
    while arguments and arguments[0] in ("-v", "--verbose", "-q", "--quiet"):
        leading.append(arguments.pop(0))
    if arguments and arguments[0] not in (*COMMANDS, "-h", "--help", "--version"):
        arguments.insert(0, "compile")
    if leading and arguments and arguments[0] in COMMANDS:
        arguments[1:1] = leading  # global-looking flags belong to the command
    args = build_parser().parse_args(arguments)
    if args.command is None:
        build_parser().print_help(sys.stderr)
        return EXIT_ERROR
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    handlers = {
        "compile": _command_compile,
        "run": _command_run,
        "generate": _command_generate,
        "bench": _command_bench,
        "gate": _command_gate,
        "profile": _command_profile,
        "verify": _command_verify,
        "toolchains": _command_toolchains,
        "targets": _command_targets,
    }
    try:
        return handlers[args.command](args)
    except QCompileError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a bug in qcompile, not bad input: one line, traceback with -v
        if args.verbose:
            traceback.print_exc()
        print(f"error: internal error ({type(error).__name__}: {error}); rerun with -v and report it", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
