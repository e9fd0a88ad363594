"""A Relax module's large constants as parameters of its ``main``, to be stored beside the library
(:mod:`qcompile.runtime.weights`) instead of inside it."""

from __future__ import annotations

from typing import Any

import numpy as np

from qcompile.graph import array_digest

# Smaller constants (scales, column sums, index maps) stay in the library: the virtual machine spends about 0.2 us
# per parameter on every call (500 parameters: 108 us a call here), and the weight matrices are what is large.
MIN_BYTES = 64 << 10


def lift_constants(module: Any, min_bytes: int = MIN_BYTES) -> tuple[Any, list[np.ndarray]]:
    """``module`` with every constant of ``min_bytes`` or more in ``main`` replaced by a new parameter appended
    after the inputs (one per distinct value, in first-use order), and those values."""
    from tvm import relax

    arrays: list[np.ndarray] = []
    params: list[Any] = []
    lifted: dict[str, Any] = {}

    @relax.expr_functor.mutator  # type: ignore[misc]
    class Lifter(relax.PyExprMutator):  # type: ignore[misc]
        def visit_generic_const_(self, constant: Any) -> Any:
            array = constant.value.numpy()
            if array.nbytes < min_bytes:
                return constant
            key = array_digest(array)
            if key not in lifted:  # equal constants (the same weights read twice) become one parameter
                lifted[key] = relax.Var(f"weight{len(params)}", constant.ty)
                arrays.append(array)
                params.append(lifted[key])
            return lifted[key]

    main_var = module.get_global_var("main")
    main = module[main_var]
    body = Lifter(module).visit_expr(main.body)
    if not params:
        return module, []
    function = relax.Function(list(main.params) + params, body, main.ret_ty, main.is_pure, main.attrs)
    module = module.clone() if hasattr(module, "clone") else module
    module.update_func(main_var, function)
    return module, arrays
