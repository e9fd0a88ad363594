"""The Python face of qcompile: ``compile`` a model into an artifact, ``load`` one, ``gate`` it against
budgets, ``verify`` it. Thin: each calls its driver in :mod:`qcompile.flow`."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qcompile.calibration import Feed, Preprocess
from qcompile.flow import gate as gate_flow
from qcompile.flow import verify as verify_flow
from qcompile.flow.compile import (
    INTEGER_ONNX,
    QUANTIZED_ONNX,
    REFERENCE_ONNX,
    REPORT_HTML,
    TERNARY_ONNX,
    compile_model,
    targets,
    version,
)
from qcompile.flow.quantize import QuantizeOptions
from qcompile.runtime import Session
from qcompile.runtime import load as load_artifact


def compile(
    model_path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    target: str = "host",
    calibration_data: str | os.PathLike[str] | Iterable[Feed] | None = None,
    eval_data: str | os.PathLike[str] | Iterable[Feed] | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    options: QuantizeOptions | None = None,
    preprocess: Preprocess | None = None,
    build_tvm: bool = True,
    force: bool = False,
    progress: bool = True,
    tokenizer: str | os.PathLike[str] | None = None,
    decode_step: str = "auto",
) -> dict[str, Any]:
    """Compile the ONNX model at ``model_path`` for ``target`` into the artifact folder ``output``.

    ``calibration_data`` (and ``eval_data``, held out for the accuracy report) is a folder of samples or an
    iterable of feeds; ``options`` default to the target's recipe. A causal LM with a KV cache
    (:mod:`qcompile.flow.decoder`) takes samples of ``input_ids`` alone, and ships ``tokenizer`` (default: the
    ``tokenizer.json`` beside the model) for :meth:`qcompile.runtime.Session.generate`; for such a model on a CPU
    target the kernels' decode-step library is built and shipped when it measures faster than onnxruntime's
    step (``decode_step='auto'``), always (``'always'``: still checked against the oracle) or never (``'off'``).
    Returns the manifest
    as written to ``manifest.json`` (:class:`qcompile.runtime.manifest.Manifest` reads it back typed). On
    any error nothing is left at ``output``.
    """
    manifest = compile_model(
        model_path,
        output,
        target,
        calibration_data,
        eval_data,
        input_shapes,
        options,
        preprocess,
        build_tvm,
        force,
        progress,
        tokenizer,
        decode_step,
    )
    return manifest.to_json()


# Budgets against an artifact: measured here, on a board over RPC, or predicted (see the function's doc).
gate = gate_flow.check
# File checksums, ELF headers, and emulated runs of cross-compiled libraries (see the function's doc).
verify = verify_flow.check


def load(path: str | os.PathLike[str], executor: str | None = None) -> Session:
    """Verify and load an artifact (see :func:`qcompile.runtime.load`)."""
    return load_artifact(Path(path), executor)


__all__ = [
    "INTEGER_ONNX",
    "QUANTIZED_ONNX",
    "REFERENCE_ONNX",
    "REPORT_HTML",
    "TERNARY_ONNX",
    "compile",
    "gate",
    "load",
    "targets",
    "verify",
    "version",
]
