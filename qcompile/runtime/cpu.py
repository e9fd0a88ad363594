"""The CPU's feature flags, as Linux reports them: what the kernel flavors are chosen by."""

from __future__ import annotations

from pathlib import Path


def flags() -> str:
    """``/proc/cpuinfo`` as text (empty where there is none); test a flag as ``" avx512_vnni" in flags()``."""
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.read_text() if cpuinfo.exists() else ""
