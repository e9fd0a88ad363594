"""What runs an artifact's models: onnxruntime sessions and TVM libraries, with nothing of the compiler.

Every onnxruntime session qcompile opens, at compile time (:mod:`qcompile.execution`) or from an artifact,
is made here, so that all of them run the same graph optimizations. onnx 1.23 writes IR version 14, which
onnxruntime 1.31 rejects: every model handed over is stamped with :data:`ORT_IR_VERSION`.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from qcompile.errors import ArtifactError
from qcompile.runtime import amx, tvm_runtime, weights
from qcompile.runtime import threads as _tvm_threads  # noqa: F401  (sets up TVM's thread pool before its first use)

ORT_IR_VERSION = 10

# onnxruntime's WeightBiasQuantization (a basic-level graph optimization) quantizes the float weights and bias
# of a Conv / Gemm / MatMul whose activation input comes from a DequantizeLinear, so that the node fuses into
# an integer kernel. A layer qcompile keeps float between int8 layers is float on purpose (sensitive, or
# chosen by the search); onnxruntime's quantization of it is coarser than qcompile's int8: keeping one
# EfficientNet-Lite0 depthwise Conv float raised the output error 1.19e-2 -> 3.60e-2 with it, lowered it to
# 1.09e-2 without.
DISABLED_OPTIMIZERS = ["WeightBiasQuantization"]


def create_session(source: bytes | str, options: ort.SessionOptions) -> ort.InferenceSession:
    """An onnxruntime CPU session on a serialized model or a model file."""
    return ort.InferenceSession(
        source, options, providers=["CPUExecutionProvider"], disabled_optimizers=DISABLED_OPTIMIZERS
    )


def session_options(threads: int = 0) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return options


def session_from_bytes(data: bytes, threads: int = 0) -> ort.InferenceSession:
    return create_session(data, session_options(threads))


def session_from_path(path: Path, threads: int = 0) -> ort.InferenceSession:
    return create_session(str(path), session_options(threads))


# A library's constants (its weights) lie in a read-only segment of the .so, which loading copies into the
# VM's tensors and never reads again; the segment's pages stay resident meanwhile (SmolLM2's decode-step
# library when it kept its weights inside: 167 MB of 186). Segments this large are released after loading
# (reread from the file if touched). (A library with a weights file has none.)
RELEASED_SEGMENT_BYTES = 16 << 20
_MADV_DONTNEED = 4


def release_constant_pages(library: Path, minimum: int = RELEASED_SEGMENT_BYTES) -> int:
    """Drop from memory the resident pages of ``library``'s large read-only mappings that hold nothing written
    (Linux; no anonymous page, i.e. no copy-on-write copy, so the file holds every byte of them: relocated data
    is never released); returns the bytes of the mappings released (0 elsewhere, or when nothing is that
    large: ``minimum`` bytes). (A page of a freshly written file counts as dirty until written back; only a copy
    is anonymous.)"""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return 0
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return 0
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    target = str(library.resolve())
    mappings: list[list[int]] = []  # low, high, anonymous kB
    current: list[int] | None = None
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) >= 5 and "-" in fields[0] and ":" in fields[3]:  # a mapping's header line
            current = None
            if len(fields) == 6 and fields[5] == target and fields[1] == "r--p":
                low, high = (int(bound, 16) for bound in fields[0].split("-"))
                current = [low, high, 0]
                mappings.append(current)
        elif current is not None and fields[0] == "Anonymous:":
            current[2] += int(fields[1])
    released = 0
    for low, high, copied in mappings:
        if high - low >= minimum and copied == 0 and libc.madvise(low, high - low, _MADV_DONTNEED) == 0:
            released += high - low
    return released


class TVMExecutor:
    """Runs a library built by :func:`qcompile.backends.tvm.build` with the Relax virtual machine on the host CPU."""

    def __init__(
        self,
        library: Path,
        input_names: list[str],
        cpu: str | None = None,
        features: list[str] | None = None,
        flags: list[str] | None = None,
        weights_file: Path | None = None,
    ) -> None:
        # TVM's runtime alone where the library can be checked without LLVM (tvm_runtime says when)
        tvm = tvm_runtime.load(compiler=bool(cpu) and flags is None)
        from tvm.runtime.vm import VirtualMachine

        if flags is not None:
            missing = sorted(set(flags) - set(tvm_runtime.isa_flags()))
            if missing:
                raise ArtifactError(
                    f"{library.name} is built for the {cpu} CPU, with instructions this CPU lacks "
                    f"({', '.join(missing)}); run the artifact's 'integer' executor here, or compile it again "
                    "on this machine"
                )
        elif cpu:  # an artifact from before the flags were recorded: LLVM names this CPU
            from tvm.target import codegen

            here = codegen.llvm_get_system_cpu()
            if cpu != here:
                raise ArtifactError(
                    f"{library.name} is built for the {cpu} CPU and may use instructions this {here} CPU lacks; "
                    "run the artifact's 'integer' executor here, or compile it again on this machine"
                )
        # a library with AMX tile kernels (the features it was built with name them) needs Linux's grant first
        if any(feature.startswith("+amx") for feature in features or []) and not amx.enable():
            raise ArtifactError(
                f"{library.name} runs matmuls on AMX tiles, which this CPU lacks or Linux does not grant; run "
                "the artifact's 'integer' executor here, or compile it again with QCOMPILE_AMX=0"
            )

        self._tvm = tvm
        self._device = tvm.cpu()
        self._vm = VirtualMachine(tvm.runtime.load_module(str(library)), self._device)
        release_constant_pages(library)  # the weights were copied into the VM's tensors
        self._main = self._vm["main"]
        # a library built with its weights as parameters: each read from its file into a tensor once, passed after
        # the inputs on every call
        self._weights = weights.read(weights_file, self._new_tensor) if weights_file is not None else []
        self._input_names = input_names
        # Input tensors allocated once per thread, each with a numpy view of its bytes, and refilled each run:
        # allocating them took 24 us a call here, and filling one with Tensor.copyfrom 6 us, against 0.3 us
        # through the view. Sub-millisecond models run in tens of microseconds.
        self._inputs = threading.local()

    def _new_tensor(self, shape: tuple[int, ...], dtype: str) -> tuple[Any, np.ndarray]:
        tensor = self._tvm.runtime.empty(shape, dtype, self._device)
        return tensor, np.from_dlpack(tensor)

    def _held(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> tuple[Any, np.ndarray]:
        """This thread's input tensor of ``name`` and its numpy view, (re)allocated for ``shape`` and ``dtype``."""
        held = self._inputs
        if not hasattr(held, "pairs"):
            held.pairs, held.pointers = {}, set()
        pair = held.pairs.get(name)
        if pair is None or pair[1].shape != shape or pair[1].dtype != dtype:
            pair = held.pairs[name] = self._new_tensor(shape, str(dtype))
            held.pointers = {tensor.data_ptr() for tensor, _ in held.pairs.values()}
        return pair

    def input_buffer(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """The numpy view of the tensor this thread passes as input ``name``: a caller that writes its input there
        and feeds the view itself saves the copy (a decode step's cache of tens of megabytes)."""
        return self._held(name, tuple(shape), np.dtype(dtype))[1]

    def _arguments(self, feeds: dict[str, np.ndarray]) -> list[Any]:
        arguments = []
        for name in self._input_names:
            array = feeds[name]
            tensor, view = self._held(name, array.shape, array.dtype)
            if array is not view:
                view[...] = array
            arguments.append(tensor)
        return arguments

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self._main(*self._arguments(feeds), *self._weights)
        outputs = [result] if hasattr(result, "__dlpack__") else list(result)
        # The outputs are fresh tensors of the VM's: viewed through DLPack, not copied (.numpy() took 6 us each).
        # An output that is an input as given (an identity graph) is copied, since the next run refills it.
        inputs = self._inputs.pointers
        return [np.from_dlpack(item).copy() if item.data_ptr() in inputs else np.from_dlpack(item) for item in outputs]
