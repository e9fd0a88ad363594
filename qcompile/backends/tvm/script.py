"""``prim_func``: TVMScript's ``@T.prim_func`` decorator without its cost of looking at the call stack.

``T.prim_func`` starts with ``inspect.stack()``, which reads the source line of every frame on the stack
(``inspect.getmodule`` scans ``sys.modules`` for each one). Under qcompile's flow that stack is 40 frames
deep, so each kernel paid about 60 ms before its parsing began: 4.5 s of an EfficientNet-Lite0 compile's 79
kernels. The stack is needed only to find the names used in a kernel's string annotations (PEP 563) in the
functions that enclose it; this decorator hands the parser the frames themselves, without their source.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any


def prim_func(function: Callable[..., Any]) -> Any:
    """The PrimFunc TVMScript parses from ``function`` (a kernel defined inside the function that builds
    it, as with ``@T.prim_func``)."""
    from tvm.script.parser._core import parse, utils

    # The stack as inspect.stack() gives it (this frame first, then its callers), minus the source lines.
    frames = []
    frame: FrameType | None = sys._getframe(0)
    while frame is not None:
        code = frame.f_code
        frames.append(inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name, None, None))
        frame = frame.f_back
    names = utils.inspect_function_capture(function)
    utils.resolve_closure_vars(function, names, frames)
    return parse(function, names, check_well_formed=True)


prim_func.dispatch_token = "tirx"  # type: ignore[attr-defined]  # the parser reads the dialect off the decorator
