"""Intel AMX tile registers for the int8 kernels: whether this machine has them, and asking Linux for them.

AMX (Sapphire Rapids and later Xeons) multiplies a 16 x 64 tile of uint8 activations by a 16 x 16 x 4 tile of
int8 weights into a 16 x 16 tile of int32 sums in one instruction (``tdpbusd``). Linux (5.16 and later) lends
the 8 KB of tile state to a process only after it asks, once, with ``arch_prctl(ARCH_REQ_XCOMP_PERM,
XFEATURE_XTILEDATA)``; the grant covers every thread of the process. A tile instruction before the grant
kills the process (SIGILL), so everything that builds or loads a library with tile kernels calls
:func:`enable` first.

``QCOMPILE_AMX=0`` in the environment keeps the compiler from using the tiles (the kernels are then the
AVX-512 VNNI register tiles); it does not stop an artifact built with them from running.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform

from qcompile.runtime import cpu

ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18
SYS_ARCH_PRCTL = 158  # x86-64 Linux
FLAGS = (" amx_tile", " amx_int8")


def present() -> bool:
    """Whether the CPU reports AMX tiles with int8 products (``/proc/cpuinfo``)."""
    reported = cpu.flags()
    return all(flag in reported for flag in FLAGS)


@functools.cache
def enable() -> bool:
    """Ask Linux for the tile state, once per process; whether tile instructions may run here."""
    if platform.system() != "Linux" or platform.machine() != "x86_64" or not present():
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)) == 0


def wanted() -> bool:
    """Whether a host build should use the tiles: they are here and granted, and ``QCOMPILE_AMX`` is not 0."""
    return os.environ.get("QCOMPILE_AMX", "1") != "0" and enable()
