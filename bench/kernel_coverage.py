"""What keeps each compiled model off qcompile's int8 kernels: the first obstacle, per artifact.

    python bench/kernel_coverage.py DIR [DIR ...]

For every artifact under the folders given (``**/manifest.json``: e.g. the work folder of bench/intake.py), its
quantized graph is specialized to the artifact's input shapes, as a host build does, then lowered to integers
(:func:`qcompile.backends.integer.lower`, with float islands as a host build lowers it) and to the int8
kernels' Relax module (:func:`qcompile.backends.tvm.integer.to_relax`, this CPU's flavor). Prints one row per
artifact with what stopped it: the ops the integer lowering has no form for (counted), or the first thing the
kernels do not cover, or "covered". Then the ops counted over all artifacts, most frequent first: the coverage
work list. Nothing is built or timed.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import re
import warnings
from pathlib import Path

import onnx_ir as ir

from qcompile import execution, frontend
from qcompile.backends import integer as integer_lowering
from qcompile.backends.tvm import int8_kernels, integer
from qcompile.errors import QCompileError

REFUSED = re.compile(r"arithmetic \((?P<ops>[^)]*)\)")
KERNEL_OP = re.compile(r"\((\w+)\) has no kernel")


def obstacle(folder: Path) -> str:
    manifest = json.loads((folder / "manifest.json").read_text())
    model = ir.load(str(folder / "model.int8.onnx"))
    shapes = {info["name"]: info["shape"] for info in manifest["inputs"]}
    for value in model.graph.inputs:
        value.shape = ir.Shape(shapes[value.name])
    proto = execution.to_proto(frontend.specialize(model))
    try:
        lowered, _ = integer_lowering.lower(proto, float_islands=True)
    except QCompileError as error:
        found = REFUSED.search(str(error))
        return f"lowering: {found.group('ops') if found else str(error).splitlines()[0]}"
    try:
        integer.to_relax(lowered, int8_kernels.host_flavor())
    except integer.NotLowerable as error:
        return f"kernels: {str(error).splitlines()[0]}"
    return "covered"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    counted: collections.Counter[str] = collections.Counter()
    print("| artifact | first obstacle |\n|---|---|")
    for root in args.folders:
        for manifest in sorted(root.glob("**/manifest.json")):
            folder = manifest.parent
            try:
                reason = obstacle(folder)
            except Exception as error:  # a crash is a row too (and a bug to fix)
                reason = f"crash: {type(error).__name__}: {error}"
            print(f"| {folder.relative_to(root)} | {reason} |", flush=True)
            if reason.startswith("lowering: "):
                for item in reason.removeprefix("lowering: ").split(", "):
                    op, _, count = item.rpartition(" x")
                    counted[op] += int(count) if count.isdigit() else 1
            elif reason.startswith("kernels: "):  # the op the kernels lack, else what they do not cover
                found = KERNEL_OP.search(reason)
                counted[f"kernels: {found.group(1)}" if found else reason.split(":", 2)[-1].strip()[:60]] += 1
            else:
                counted[reason.split(":")[0]] += 1
    print("\n| op (or outcome) | over all artifacts |\n|---|---|")
    for op, count in counted.most_common():
        print(f"| {op} | {count} |")


if __name__ == "__main__":
    main()
