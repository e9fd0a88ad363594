"""TVM's CPU thread pool, set up for the hand-written parallel kernels; importing this module does it.

TVM sizes its thread pool once, from TVM_NUM_THREADS or else half the logical CPUs (it assumes SMT): on a
two-core machine without SMT that is one thread. Use every CPU this process may run on, unless the user
said otherwise. TVM also pins its workers to cores but not the calling thread, which the OS then often
runs on a worker's core: parallel kernels measured erratic here (7.5 to 17 us for the 1 x 576 x 1536 LUT
matmul) until TVM_BIND_THREADS=0 left placement to the OS (7.5 us, steady). Both must be set before TVM's
first parallel call in the process.
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
os.environ.setdefault("TVM_BIND_THREADS", "0")


def count() -> int:
    """The threads TVM's pool has (or will have) in this process."""
    return max(1, int(os.environ.get("TVM_NUM_THREADS") or 1))
