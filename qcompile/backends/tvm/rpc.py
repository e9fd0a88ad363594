"""Measure an artifact's TVM library on a remote device through TVM's RPC (``tvm.rpc``).

On the board: ``python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090`` (the TVM runtime wheel for the
board's CPU). Here: ``qcompile bench DIR --rpc BOARD:9090``. The library is uploaded, loaded by the remote
Relax VM, run once for its outputs and timed with TVM's time evaluator on the remote clock, so network
round trips are not counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qcompile.errors import BackendError
from qcompile.runtime.bench import Latency

logger = logging.getLogger(__name__)


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BackendError(f"RPC address '{address}' is not HOST:PORT")
    return host, int(port)


def _connect(address: str, timeout_s: int) -> Any:
    from tvm import rpc

    host, port = parse_address(address)
    try:
        return rpc.connect(host, port, session_timeout=timeout_s)
    except Exception as error:  # TVMError / OSError: nothing listening, refused, wrong protocol
        reason = str(error).strip().splitlines()[-1]
        raise BackendError(f"cannot reach a TVM RPC server at {address}: {reason}") from error


def _remote_error(address: str, library: Path, error: Exception) -> BackendError:
    message = str(error).strip().splitlines()
    return BackendError(
        f"the RPC server at {address} could not run {library.name}: {message[-1] if message else error!r} "
        "(is the library built for that device's CPU?)"
    )


def time_libraries(
    libraries: list[tuple[Path, list[np.ndarray]]], address: str, runs: int = 10, timeout_s: int = 600
) -> list[float]:
    """Median microseconds of each ``(library, inputs)`` on the remote device, over one RPC session."""
    import tvm
    from tvm import relax

    session = _connect(address, timeout_s)
    device = session.cpu()
    times = []
    for library, inputs in libraries:
        try:
            session.upload(str(library))
            vm = relax.VirtualMachine(session.load_module(library.name), device)
            arguments = [tvm.runtime.tensor(np.require(array, requirements="C"), device) for array in inputs]
            timer = vm.time_evaluator("main", device, number=1, repeat=runs, min_repeat_ms=0)
            times.append(float(np.median(timer(*arguments).results)) * 1e6)
        except Exception as error:
            raise _remote_error(address, library, error) from error
    return times


@dataclass(frozen=True)
class RemoteRun:
    outputs: list[np.ndarray]
    latency: Latency
    device: str


def run_remote(library: Path, inputs: list[np.ndarray], address: str, runs: int = 20, timeout_s: int = 60) -> RemoteRun:
    """Upload ``library`` to the RPC server at ``address``, run it on ``inputs`` and time ``runs`` calls."""
    import tvm
    from tvm import relax

    session = _connect(address, timeout_s)
    try:
        session.upload(str(library))
        module = session.load_module(library.name)
        device = session.cpu()
        vm = relax.VirtualMachine(module, device)
        arguments = [tvm.runtime.tensor(np.require(array, requirements="C"), device) for array in inputs]
        result = vm["main"](*arguments)
        outputs = [result.numpy()] if hasattr(result, "numpy") else [item.numpy() for item in result]
        timer = vm.time_evaluator("main", device, number=1, repeat=runs)
        seconds = np.array(timer(*arguments).results) * 1e3
    except Exception as error:
        raise _remote_error(address, library, error) from error
    latency = Latency(float(np.median(seconds)), float(np.percentile(seconds, 90)), len(seconds))
    logger.info("remote %s: %.3f ms median over %d runs", address, latency.median_ms, latency.runs)
    return RemoteRun(outputs, latency, f"TVM RPC server at {address}")
