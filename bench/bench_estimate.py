"""How far the board estimate's method is from a measurement, checked where both exist: on this machine.

    python bench/bench_estimate.py MODEL.integer.onnx [--mca-cpu icelake-server]

The Arm targets' library estimate (:mod:`qcompile.backends.tvm.estimate`) times each dense kernel as llvm-mca's
cycles for its multiply-accumulate loop times its register-tile steps, over the cores. No board is here to
check that against, but this machine is: each dense kernel of the integer graph (an artifact's
``model.integer.onnx``) is built for this CPU, estimated the same way (llvm-mca with ``--mca-cpu``: LLVM 14 has
no Zen 4 model, so an AVX-512 VNNI Intel model stands in) at the host target file's cores and clock, and
timed alone here (best of 5 x 20 calls). Prints the totals and the spread of measured / estimated.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import onnx

from qcompile import hwmodels
from qcompile.backends.tvm import estimate, int8_kernels, integer


def _timed_ms(function: object, arguments: list[object]) -> float:
    for _ in range(3):
        function(*arguments)  # type: ignore[operator]
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(20):
            function(*arguments)  # type: ignore[operator]
        best = min(best, (time.perf_counter() - started) / 20)
    return best * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="an integer-only graph (an artifact's model.integer.onnx)")
    parser.add_argument("--mca-cpu", default="icelake-server", help="llvm-mca's CPU model for this machine")
    args = parser.parse_args()
    import tvm

    host = hwmodels.load_target("host")
    device = host.device
    flavor, float_flavor, built_for = int8_kernels.target_flavors(host.tvm_target, native=True)
    module = integer.to_relax(onnx.load(args.model), flavor, float_flavor)
    rng = np.random.default_rng(0)
    rows = []
    for global_var, function in module.functions.items():
        attributes = function.attrs if isinstance(function, tvm.tirx.PrimFunc) else None
        if attributes is None or integer.DENSE_STEPS not in attributes:
            continue
        name = global_var.name_hint
        kernel = function.with_attr("global_symbol", name)
        cycles, macs = estimate.dense_loop_cycles(kernel, built_for, args.mca_cpu)
        steps, step_macs = int(attributes[integer.DENSE_STEPS]), int(attributes[integer.STEP_MACS])
        estimated = steps * cycles * step_macs / macs / device.cores / (device.clock_ghz * 1e9) * 1e3
        arguments = []
        for buffer in function.params:
            shape, dtype = [int(dim) for dim in buffer.shape], str(buffer.dtype)
            array = rng.random(shape) if dtype.startswith("float") else rng.integers(0, 100, shape)
            arguments.append(tvm.runtime.tensor(array.astype(dtype)))
        executable = tvm.compile(tvm.IRModule({name: kernel}), target=tvm.target.Target(built_for))
        rows.append((name, estimated, _timed_ms(executable.jit()[name], arguments)))
    estimated_total, measured_total = sum(row[1] for row in rows), sum(row[2] for row in rows)
    ratios = np.array([row[2] / row[1] for row in rows])
    print(
        f"{len(rows)} dense kernels on this machine: estimated {estimated_total:.3f} ms, measured "
        f"{measured_total:.3f} ms (measured / estimated {measured_total / estimated_total:.2f}; per kernel median "
        f"{np.median(ratios):.2f}, p10 {np.percentile(ratios, 10):.2f}, p90 {np.percentile(ratios, 90):.2f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
