"""TVM backend: build the quantized graph into a shared library for a target with Relax.

The ONNX frontend of TVM 0.27 imports QDQ as dequantize -> float compute -> quantize, so the library
computes what the QDQ model means, with float requantization rounding (outputs can differ from
onnxruntime's integer kernels by about one quantization step). Without MetaSchedule tuning the default
CPU build is unscheduled and slow; the artifact records its measured latency, and the runtime picks the
faster executor. tvm is imported lazily: it takes seconds, and only this backend and its executor need it.

An integer-only graph built for this machine's CPU goes through :func:`build_integer` first: qcompile's own
int8 kernels (:mod:`qcompile.backends.tvm.integer`), bit-exact and fast, where they cover the graph.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import onnx

from qcompile.backends.tvm import cross, cuda, link
from qcompile.errors import BackendError, first_line
from qcompile.runtime import (
    threads,  # noqa: F401  (sets up TVM's thread pool)
    tvm_runtime,
)

tvm_runtime.require_compiler()  # a process that loaded TVM's runtime alone cannot compile

logger = logging.getLogger(__name__)

LIBRARY_FILE = "model.tvm.so"


# The thread importing TVM in the background, while it may still run (see import_in_background).
_importing: threading.Thread | None = None


def import_in_background() -> None:
    """Start importing TVM in a daemon thread, for a compile that will build a library after quantizing.

    ``import tvm`` takes 4-5 s on the 2-core machines measured here, most of it while quantization's
    onnxruntime and numpy work leave the interpreter free; overlapped, about 2 s of it is hidden. Code that
    uses TVM must first call :func:`await_import`: two threads importing TVM's modules at once can each hold
    a module the other needs, and Python then hands one of them a partly initialized module (a tiny model's
    compile reached the build within a second and failed so). A failure is left to the later import, which
    reports it."""
    global _importing

    def load() -> None:
        try:
            import tvm.relax  # noqa: F401
        except Exception:  # the build's own import raises it, with the context to say why
            logger.debug("importing TVM in the background failed", exc_info=True)

    _importing = threading.Thread(target=load, name="qcompile-import-tvm", daemon=True)
    _importing.start()


def await_import() -> None:
    """Wait for :func:`import_in_background`'s import to end, if one was started."""
    global _importing
    if _importing is not None:
        _importing.join()
        _importing = None


def build(
    proto: onnx.ModelProto, tvm_target: dict[str, Any], out_dir: Path, file_name: str = LIBRARY_FILE
) -> tuple[list[str], str | None]:
    """Compile ``proto`` for ``tvm_target`` into ``out_dir / file_name``; returns the files written (the
    library first) and, for a GPU target, a line saying how far its kernels were built.

    A target whose (host) ``mtriple`` names another CPU than this machine's is linked with that CPU's GNU
    cross compiler (:mod:`qcompile.backends.tvm.cross`) and its ELF header checked. A CUDA target gets
    default GPU schedules and its kernels written beside the library (:mod:`qcompile.backends.tvm.cuda`).
    """
    try:
        import tvm
        import tvm.relax.frontend.onnx
        from tvm import relax
        from tvm.support import cc
    except ImportError as error:
        raise BackendError(f"the TVM backend needs apache-tvm: {error}") from error
    toolchain = cross.toolchain_for(tvm_target)
    compiler = cross.require_compiler(toolchain) if toolchain else None
    started = time.perf_counter()
    files, note = [file_name], None
    try:
        target = tvm.target.Target(tvm_target)
        module = _import_onnx(proto)
        if tvm_target.get("kind") == "cuda":
            module = cuda.schedule(module, target)
        executable = relax.build(module, target=target)
        if tvm_target.get("kind") == "cuda":
            kernels, note = cuda.write_kernels(executable, str(tvm_target.get("arch", "sm_80")), out_dir)
            files += kernels
        if compiler:
            executable.export_library(str(out_dir / file_name), fcompile=cc.cross_compiler(compiler))
        else:
            executable.export_library(str(out_dir / file_name))
    except BackendError:
        raise
    except Exception as error:  # TVM raises its own TVMError and plain Python errors alike
        raise BackendError(f"TVM could not build the model for {tvm_target}: {first_line(error)}") from error
    if toolchain:
        cross.check_elf(out_dir / file_name, toolchain)
    logger.info("TVM build for %s took %.1f s", tvm_target, time.perf_counter() - started)
    return files, note


INTEGER_KERNELS = "qcompile int8 kernels (NHWC, requantization fused into each layer)"


class KernelsNotUsed(Exception):
    """qcompile's int8 kernels do not cover a graph or a target; the message says why."""


class IntegerLibrary(NamedTuple):
    """What :func:`build_integer` wrote: the files, the TVM target they were built for, a description naming the
    dot-product flavor, and for a cross build given a device, the board estimate (else None)."""

    files: list[str]
    built_for: dict[str, Any]
    lowering: str
    estimate: dict[str, Any] | None = None


def kernel_flavors(tvm_target: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """The int8 and fp32 flavors of qcompile's kernels for ``tvm_target`` and the TVM target to build them for
    (:func:`qcompile.backends.tvm.int8_kernels.target_flavors`), or :class:`KernelsNotUsed` saying why none."""
    from qcompile.backends.tvm import int8_kernels

    if tvm_target.get("kind") != "llvm":
        raise KernelsNotUsed(f"{tvm_target} is not a CPU target")
    try:
        return int8_kernels.target_flavors(tvm_target, native=cross.toolchain_for(tvm_target) is None)
    except BackendError as reason:
        raise KernelsNotUsed(str(reason)) from reason


def _kernel_module(proto: onnx.ModelProto, tvm_target: dict[str, Any]) -> tuple[Any, str, dict[str, Any]]:
    """The Relax module of ``proto`` on qcompile's kernels for ``tvm_target``, the flavor's name and the TVM
    target to build it for; :class:`KernelsNotUsed` when the kernels do not cover the graph or the target."""
    from qcompile.backends.tvm import integer

    flavor, float_flavor, built_for = kernel_flavors(tvm_target)
    try:
        return integer.to_relax(proto, flavor, float_flavor), flavor.title, built_for
    except (BackendError, integer.NotLowerable) as reason:
        raise KernelsNotUsed(str(reason)) from reason
    except Exception as error:  # a bug in an optional speed-up: the onnxruntime files still carry the model
        logger.warning("qcompile's kernels failed on this graph (please report it): %s", error, exc_info=True)
        raise KernelsNotUsed(
            f"internal error in qcompile's kernels ({type(error).__name__}: {first_line(error)}); please report it"
        ) from error


def build_integer(
    proto: onnx.ModelProto,
    tvm_target: dict[str, Any],
    out_dir: Path,
    file_name: str = LIBRARY_FILE,
    device: Any = None,
    weights_file: str | None = None,
) -> IntegerLibrary:
    """Build the integer-only graph ``proto`` on qcompile's int8 kernels for ``tvm_target``: this machine's CPU
    (AVX-512 VNNI or AVX2; built for its CPU model, so that LLVM may use its instructions) or an aarch64 CPU
    (``sdot`` where the target has the dot product, else widening multiply-adds; cross-compiled and linked
    with the target's toolchain), and for a cross build given ``device`` (a target file's), estimate its latency
    there (:func:`estimated`). With ``weights_file`` (a host build), the library takes its weights as
    parameters after its inputs, written to that file (:mod:`qcompile.runtime.weights`), which follows the
    library in the returned files. Raises :class:`KernelsNotUsed` with the reason when the kernels do not cover
    the graph or the target."""
    from qcompile.backends.tvm import integer, lifted
    from qcompile.runtime import weights

    module, flavor, built_for = _kernel_module(proto, tvm_target)
    toolchain = cross.toolchain_for(tvm_target)
    if weights_file is not None:
        if toolchain is not None:
            raise BackendError("a cross-compiled library keeps its weights inside: its runner reads no weights file")
        module, arrays = lifted.lift_constants(module)
        weights.write(out_dir / weights_file, arrays)
    import tvm
    from tvm.support import cc

    started = time.perf_counter()
    try:
        fcompile = cc.cross_compiler(cross.require_compiler(toolchain)) if toolchain is not None else None
        link.build_library(module, tvm.target.Target(built_for), out_dir / file_name, integer.pipeline(), fcompile)
    except BackendError:
        raise
    except Exception as error:  # TVM raises its own TVMError and plain Python errors alike
        raise BackendError(f"TVM could not build the integer kernels for {built_for}: {first_line(error)}") from error
    if toolchain is not None:
        cross.check_elf(out_dir / file_name, toolchain)
    logger.info("integer kernels built for %s in %.1f s", built_for, time.perf_counter() - started)
    board = estimated(module, built_for, device) if toolchain is not None and device is not None else None
    files = [file_name] if weights_file is None else [file_name, weights_file]
    return IntegerLibrary(files, built_for, f"{INTEGER_KERNELS}, {flavor} dot products", board)


def estimated(module: Any, built_for: dict[str, Any], device: Any) -> dict[str, Any] | None:
    """The board estimate of a kernels ``module`` (:mod:`qcompile.backends.tvm.estimate`) as the manifest
    records it, or None (with a warning) where it cannot be made: the library is then shipped, not chosen."""
    from qcompile.backends.tvm import estimate

    started = time.perf_counter()
    try:
        result = estimate.estimate(module, built_for, device)
    except BackendError as error:  # no llvm-mca here
        logger.warning("no estimate of the library for %s: %s", built_for.get("mcpu"), error)
        return None
    except Exception as error:  # a bug in an optional estimate
        logger.warning("the estimate for %s failed (please report it): %s", built_for.get("mcpu"), error, exc_info=True)
        return None
    logger.info("%s estimated at %.2f ms in %.1f s", built_for.get("mcpu"), result.ms, time.perf_counter() - started)
    return result.summary()


def estimate_library(proto: onnx.ModelProto, tvm_target: dict[str, Any], device: Any) -> dict[str, Any] | None:
    """The board estimate of the integer graph ``proto`` on qcompile's kernels for ``tvm_target`` on ``device``
    (as :func:`build_integer` makes it for a cross build), without building the library."""
    module, _, built_for = _kernel_module(proto, tvm_target)
    return estimated(module, built_for, device)


def _conv_integer_converter() -> Any:
    """A Relax converter for ONNX ``ConvInteger``, which TVM 0.27's ONNX importer lacks: both operands
    widened to int32 less their zero points, then an int32 ``conv1d`` / ``conv2d`` (exact: int8 x int8 products
    summed in int32, as the ONNX spec and onnxruntime define it)."""
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend

    class ConvInteger(onnx_frontend.OnnxOpConverter):  # type: ignore[misc]
        @classmethod
        def _impl_v10(cls, bb: Any, inputs: list[Any], attr: dict[str, Any], params: Any) -> Any:
            if attr.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                raise ValueError("ConvInteger with auto_pad is not supported; give explicit pads")
            data = relax.op.astype(inputs[0], "int32")
            weight = relax.op.astype(inputs[1], "int32")
            if len(inputs) > 2 and inputs[2] is not None:
                data = relax.op.subtract(data, relax.op.astype(inputs[2], "int32"))
            if len(inputs) > 3 and inputs[3] is not None:
                weight = relax.op.subtract(weight, relax.op.astype(inputs[3], "int32"))
            kernel = attr.get("kernel_shape")
            spatial = len(kernel) if kernel is not None else bb.normalize(inputs[0]).struct_info.ndim - 2
            if spatial not in (1, 2):
                raise ValueError(f"ConvInteger over {spatial} spatial dims is not supported (1 or 2 are)")
            convolution = relax.op.nn.conv1d if spatial == 1 else relax.op.nn.conv2d
            return convolution(
                data,
                weight,
                strides=attr.get("strides", [1] * spatial),
                padding=attr.get("pads", [0] * 2 * spatial),
                dilation=attr.get("dilations", [1] * spatial),
                groups=attr.get("group", 1),
                out_dtype="int32",
            )

    return ConvInteger


def _import_onnx(proto: onnx.ModelProto) -> Any:
    """``from_onnx`` with a ``ConvInteger`` converter added (TVM 0.27 has no public hook for converters, so
    the importer's private converter table is extended for the duration of the call)."""
    import tvm.relax.frontend.onnx
    from tvm.relax.frontend.onnx import onnx_frontend

    if not any(node.op_type == "ConvInteger" for node in proto.graph.node):
        return tvm.relax.frontend.onnx.from_onnx(proto, keep_params_in_input=False)
    original = onnx_frontend._get_convert_map
    converter = _conv_integer_converter()
    onnx_frontend._get_convert_map = lambda: {**original(), "ConvInteger": converter}
    try:
        return tvm.relax.frontend.onnx.from_onnx(proto, keep_params_in_input=False)
    finally:
        onnx_frontend._get_convert_map = original
