"""The table-lookup ternary path: kernel speed at SmolLM2-135M shapes, the ternary-trained digits model, and
the fpga-lut estimate for a SmolLM2-sized decoder.

    python bench/bench_lut.py [--runs 2000] [--skip-digits]

1. Kernel: ``[rows, K] @ [K, N]`` for the MLP shapes of SmolLM2-135M (576 x 1536 and 1536 x 576) at 1 and 8
   rows. onnxruntime's fp32 ``MatMul`` and int8 ``MatMulInteger`` (int8 x int8, the same ternary weights)
   against qcompile's TVM LUT kernel, all called from Python in this process, median of ``--runs`` calls.
   onnxruntime runs with its default thread pool and with one thread; the kernel with TVM_NUM_THREADS
   (default: every CPU of the process). Each side is timed twice, interleaved, after a pause (both thread
   pools spin after a run), and keeps its better median. The per-call floor of each runtime (an
   onnxruntime Identity graph, the TVM call on a 1 x 4 x 1 kernel) is printed beside them.
2. Digits: an MLP trained here for ternary weights (straight-through estimator), compiled with
   ``--target fpga-lut``; accuracy of the trained model itself and of the compiled model (onnxruntime and
   the LUT executor) on the 397 held-out digits; every layer's int32 products on those digits' real
   activations: numpy reference = TVM kernel = C++ simulation of the HLS engine.
3. The fpga-lut plan for a decoder with SmolLM2-135M's 30 x 7 linear layers (one token = one row) and an
   int8 LM head streamed from DDR, beside TeLLMe v2's published figures. An estimate, labelled as such.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import zoo

from qcompile import api, hwmodels, runtime
from qcompile.backends.lut import fpga, hls, kernel, reference
from qcompile.runtime import bench
from qcompile.runtime.executors import ORT_IR_VERSION
from qcompile.runtime.lut import layout as lut_layout
from qcompile.runtime.lut import pack

SHAPES = [(576, 1536), (1536, 576)]
ROWS = [1, 8]
SMOLLM2_LAYER = [("q", 576, 576), ("k", 576, 192), ("v", 576, 192), ("o", 576, 576),
                 ("gate", 576, 1536), ("up", 576, 1536), ("down", 1536, 576)]  # fmt: skip


def median_us(call: Any, runs: int) -> float:
    for _ in range(max(20, runs // 20)):
        call()
    timings = np.empty(runs)
    for index in range(runs):
        started = time.perf_counter()
        call()
        timings[index] = time.perf_counter() - started
    return float(np.median(timings) * 1e6)


def ort_session(op: str, x_shape: list[int], types: tuple[int, int], weights: np.ndarray | None, threads: int) -> Any:
    """onnxruntime running one node ``y = op(x[, w])``; ``types`` are the input's and the output's."""
    inputs = ["x", "w"] if weights is not None else ["x"]
    graph = helper.make_graph(
        [helper.make_node(op, inputs, ["y"])],
        "g",
        [helper.make_tensor_value_info("x", types[0], x_shape)],
        [helper.make_tensor_value_info("y", types[1], None)],
        [numpy_helper.from_array(weights, "w")] if weights is not None else [],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = ORT_IR_VERSION
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def ort_timings(weights: np.ndarray, rows: int, threads: int, runs: int, rng: np.random.Generator) -> dict[str, float]:
    k, _ = weights.shape
    x_float = rng.standard_normal((rows, k)).astype(np.float32)
    x_int = rng.integers(-127, 128, (rows, k)).astype(np.int8)
    fp32 = ort_session("MatMul", [rows, k], (TensorProto.FLOAT, TensorProto.FLOAT), weights.astype(np.float32), threads)
    int8 = ort_session(
        "MatMulInteger", [rows, k], (TensorProto.INT8, TensorProto.INT32), weights.astype(np.int8), threads
    )
    assert np.array_equal(int8.run(None, {"x": x_int})[0], reference.dense(x_int, weights))
    return {
        "fp32": median_us(lambda: fp32.run(None, {"x": x_float}), runs),
        "int8": median_us(lambda: int8.run(None, {"x": x_int}), runs),
    }


def ort_floor(threads: int, runs: int) -> float:
    identity = ort_session("Identity", [1, 4], (TensorProto.FLOAT, TensorProto.FLOAT), None, threads)
    x = np.zeros((1, 4), np.float32)
    return median_us(lambda: identity.run(None, {"x": x}), runs)


def kernel_section(runs: int) -> None:
    rng = np.random.default_rng(0)
    cases = [(rows, k, n, rng.integers(-1, 2, (k, n)).astype(np.int8)) for k, n in SHAPES for rows in ROWS]
    default = 0  # onnxruntime's default: one thread per core
    flavor = lut_layout.host_flavor()
    started = time.perf_counter()
    shapes = {f"m{r}k{k}n{n}": (r, k, n) for r, k, n, _ in cases} | {"floor": (1, 4, 1)}
    module = kernel.build(shapes, flavor)
    print(f"TVM build of {len(shapes)} LUT kernels ({flavor.arch}, {flavor.lanes}-byte vectors, {flavor.shuffle}"
          f"{', and triplet words with vpermw' if flavor.words else ''}): "
          f"{time.perf_counter() - started:.1f} s; TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}")  # fmt: skip
    import tvm

    device = tvm.cpu()

    def settle() -> None:
        # Both runtimes' idle workers spin for a while after a run; let them stop before the other is timed.
        gc.collect()
        time.sleep(0.5)

    def lut_us(rows: int, k: int, n: int, weights: np.ndarray) -> tuple[float, str]:
        matmul = lut_layout.LutMatMul(module, f"m{rows}k{k}n{n}", weights, rows, flavor)
        x = rng.integers(-127, 128, (rows, k)).astype(np.int8)
        assert np.array_equal(matmul(x), reference.dense(x, weights)), "LUT kernel is not exact"
        tensor = tvm.runtime.tensor(x, device)
        words = matmul.chosen.partition(lut_layout.WORDS)[2]
        layout = f"words, tiles of {lut_layout.word_plan(rows, k, n).tile_rows} x {words} blocks" if words else "pairs"
        variant = f"{layout}, {'serial' if lut_layout.SERIAL in matmul.chosen else 'parallel'}"
        return median_us(lambda: matmul.run_tensor(tensor), runs), variant

    floors = {t: ort_floor(t, runs) for t in (default, 1)}
    settle()
    floor_kernel = lut_layout.LutMatMul(module, "floor", np.ones((4, 1), np.int8), 1, flavor)
    floor_tensor = tvm.runtime.tensor(np.ones((1, 4), np.int8), device)
    tvm_floor = median_us(lambda: floor_kernel.run_tensor(floor_tensor), runs)
    print(f"\nper-call floor: onnxruntime Identity {floors[default]:.1f} us (default threads), {floors[1]:.1f} us "
          f"(1 thread); TVM LUT kernel 1x4x1 {tvm_floor:.1f} us")  # fmt: skip
    print("\n| rows | K x N | LUT kernel us | ORT fp32 us (default / 1 thr) | ORT int8 us (default / 1 thr) "
          "| vs fp32 (default / 1 thr) | vs int8 (default / 1 thr) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for rows, k, n, weights in cases:
        # Each side is timed twice, interleaved (ORT, LUT, ORT, LUT), and keeps its better median.
        measured: dict[str, list[float]] = {}
        lut_runs: list[tuple[float, str]] = []
        for _ in range(2):
            settle()
            for threads in (default, 1):
                for kind, value in ort_timings(weights, rows, threads, runs, rng).items():
                    measured.setdefault(f"{kind}{threads}", []).append(value)
            settle()
            lut_runs.append(lut_us(rows, k, n, weights))
        best = {key: min(values) for key, values in measured.items()}
        ours, variant = min(lut_runs)
        print(
            f"| {rows} | {k} x {n} | {ours:.1f} ({variant}) | {best['fp320']:.1f} / {best['fp321']:.1f} | "
            f"{best['int80']:.1f} / {best['int81']:.1f} | {best['fp320'] / ours:.2f}x / "
            f"{best['fp321'] / ours:.2f}x | {best['int80'] / ours:.2f}x / {best['int81'] / ours:.2f}x |"
        )


def digits_section() -> None:
    _, _, test_x, test_y = zoo.digits_split()
    with tempfile.TemporaryDirectory(prefix="bench-lut-") as scratch:
        folder = Path(scratch)
        model, qat_accuracy = zoo.train_digits_ternary(folder / "digits_ternary.onnx")
        train_x, _, _, _ = zoo.digits_split()
        calibration = [{"image": train_x[index : index + 1]} for index in range(8)]
        artifact = folder / "digits.fpga-lut"
        manifest = api.compile(model, artifact, target="fpga-lut", calibration_data=calibration, progress=False)
        accuracies = {}
        for executor in ("onnxruntime", "lut", "onnxruntime-fp32"):
            session = runtime.load(artifact, executor)
            predictions = [session.run({"image": test_x[i : i + 1]})["logits"].argmax() for i in range(len(test_x))]
            accuracies[executor] = float(np.mean(np.array(predictions) == test_y))
        print(f"\ndigits MLP 64-128-128-10, ternary-trained: float-QAT accuracy {qat_accuracy:.4f}; compiled "
              f"(fpga-lut) onnxruntime {accuracies['onnxruntime']:.4f}, LUT executor {accuracies['lut']:.4f} "
              f"({100 * (accuracies['lut'] - qat_accuracy):+.2f} points); the latent float weights alone "
              f"{accuracies['onnxruntime-fp32']:.4f}")  # fmt: skip
        print(f"  LUT executor vs onnxruntime outputs: max |diff| "
              f"{manifest['measured']['accuracy']['lut_vs_onnxruntime_max_abs_diff']}")  # fmt: skip
        exact_layers(artifact, test_x)


def exact_layers(artifact: Path, images: np.ndarray) -> None:
    """Each layer's int8 input codes on real digits (from the ternary graph), then numpy = TVM = C++."""
    import json

    from qcompile.backends import lut

    proto = onnx.load(str(artifact / api.TERNARY_ONNX))
    layers = lut.ternary_layers(proto)
    codes_names = [node.input[0] for node in proto.graph.node if node.op_type == "MatMulInteger"]
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.INT8, None) for name in codes_names)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    rows = [session.run(codes_names, {"image": images[i : i + 1]}) for i in range(len(images))]
    plan = json.loads((artifact / lut.PLAN).read_text())
    flavor = lut_layout.host_flavor()
    with tempfile.TemporaryDirectory(prefix="bench-lut-sim-") as scratch:
        simulation = hls.compile_simulation(artifact / lut.FOLDER, Path(scratch) / "sim")
        import tvm

        module = tvm.runtime.load_module(str(artifact / lut.KERNELS))
        for index, layer in enumerate(layers):
            x = np.concatenate([row[index].reshape(-1, layer.k) for row in rows])
            packed = np.fromfile(artifact / plan["files"][layer.name], np.uint8).reshape(layer.n, -1)
            expected = reference.dense(x, layer.weights)
            table = reference.lut_matmul(x, packed)
            matmul = lut_layout.LutMatMul(module, layer.function, pack.unpack_trits5(packed, layer.k), 1, flavor)
            tvm_out = np.concatenate([matmul(x[i : i + 1]) for i in range(len(x))])
            cpp = hls.simulate(simulation, index, x, packed)
            same = (
                np.array_equal(expected, table) and np.array_equal(expected, tvm_out) and np.array_equal(expected, cpp)
            )
            print(f"  layer {layer.name} [{layer.k} x {layer.n}] on {len(x)} rows: numpy dense = numpy LUT = TVM = "
                  f"C++ simulation: {same}")  # fmt: skip


def fpga_section() -> None:
    target = hwmodels.load_target("fpga-lut")
    layers = [(f"{block}.{name}", k, n) for block in range(30) for name, k, n in SMOLLM2_LAYER]
    estimate = fpga.decoder_estimate(layers, target, lm_head=(576, 49152))
    resources = estimate["resources"]
    print("\nfpga-lut ESTIMATE (a model of the planned engine, not a synthesized design), SmolLM2-135M shapes, "
          "ternary linear layers + int8 LM head:")  # fmt: skip
    print(f"  {estimate['tokens_per_s']:.0f} tokens/s upper bound ({estimate['token_latency_us'] / 1e3:.2f} ms/token: "
          f"linear layers {estimate['linear_layers_us'] / 1e3:.2f} ms, {estimate['bound']}; LM head "
          f"{estimate['lm_head_int8_us'] / 1e3:.2f} ms); ternary weights {estimate['weights_mib']:.1f} MiB "
          f"({'on chip' if estimate['weights_on_chip'] else 'streamed from DDR'}); time to first token "
          + ", ".join(f"{s:.3f} s ({n} tokens)" for n, s in estimate["time_to_first_token_s"].items()))  # fmt: skip
    print(f"  resources: {resources['luts']} / {resources['luts_available']} LUTs, {resources['flip_flops']} / "
          f"{resources['flip_flops_available']} FFs, {resources['on_chip_kib']} / "
          f"{resources['on_chip_kib_available']} KiB BRAM+URAM, {resources['dsp_slices']} DSPs")  # fmt: skip
    reference_figures = estimate["reference"]
    print(f"  beside: {reference_figures['source']}: {reference_figures['decode_tokens_per_s']} tokens/s decode, "
          f"TTFT {reference_figures['ttft_s_64_to_128_tokens']} s for 64-128-token prompts, "
          f"{reference_figures['power_w']} W; {estimate['not_modelled']}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--skip-digits", action="store_true")
    args = parser.parse_args()
    print(f"machine: {bench.machine()}; onnxruntime {ort.__version__}")
    kernel_section(args.runs)
    if not args.skip_digits:
        digits_section()
    fpga_section()


if __name__ == "__main__":
    main()
