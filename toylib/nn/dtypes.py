"""dtype handling shared by layers: ``dtype`` (compute) vs ``param_dtype`` (storage)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp


def promote_dtype(*arrays: Any, dtype: Any = None) -> tuple[Any, ...]:
    """Cast arrays (None passes through) to ``dtype``, or to their common dtype if None.

    This is how every layer honours ``dtype``: parameters stay stored in
    ``param_dtype`` and are cast for the computation only.

    Example:
        >>> import jax.numpy as jnp
        >>> x, w = promote_dtype(jnp.ones(2, jnp.bfloat16), jnp.ones(2), dtype=jnp.bfloat16)
        >>> str(w.dtype)
        'bfloat16'
    """
    present = [jnp.asarray(a) for a in arrays if a is not None]
    target = dtype if dtype is not None else jnp.result_type(*present)
    return tuple(None if a is None else jnp.asarray(a, target) for a in arrays)
