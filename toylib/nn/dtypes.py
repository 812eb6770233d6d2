"""dtype handling shared by layers: ``dtype`` (compute) vs ``param_dtype`` (storage)."""

from __future__ import annotations

from typing import Any, overload

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


def as_array(x: Any) -> jax.Array:
    """``x`` as a jax array: an array (or tracer) as it is, anything else converted.

    A layer's input is usually already an array. ``jnp.asarray`` on one is a
    no-op that still costs a ``convert_element_type`` under eager autodiff
    and vmap (a JVP rule, a tracer), so it is called only when needed.
    """
    return x if isinstance(x, jax.Array) else jnp.asarray(x)


# Typed for the callers' sake: the first array (a layer's input) and a pair come
# back as arrays; further ones may be None (an absent bias) and stay Any.
@overload
def promote_dtype(x: ArrayLike, /, *, dtype: Any = None) -> tuple[jax.Array]: ...
@overload
def promote_dtype(
    x: ArrayLike, y: ArrayLike, /, *, dtype: Any = None
) -> tuple[jax.Array, jax.Array]: ...
@overload
def promote_dtype(
    x: ArrayLike, y: ArrayLike, z: ArrayLike, /, *, dtype: Any = None
) -> tuple[jax.Array, jax.Array, jax.Array]: ...
@overload
def promote_dtype(
    x: ArrayLike, /, *arrays: ArrayLike | None, dtype: Any = None
) -> tuple[jax.Array, *tuple[Any, ...]]: ...
def promote_dtype(*arrays: Any, dtype: Any = None) -> tuple[Any, ...]:
    """Cast arrays (None passes through) to ``dtype``, or to their common dtype if None.

    This is how every layer honours ``dtype``: parameters stay stored in
    ``param_dtype`` and are cast for the computation only. An array already
    of the target dtype (and not weakly typed) is returned as it is, with
    no conversion op: under eager ``tl.grad`` or ``tl.vmap`` each one costs
    a traced op.

    Example:
        >>> import jax.numpy as jnp
        >>> x, w = promote_dtype(jnp.ones(2, jnp.bfloat16), jnp.ones(2), dtype=jnp.bfloat16)
        >>> str(w.dtype)
        'bfloat16'
    """
    present = [None if a is None else as_array(a) for a in arrays]
    if dtype is None:
        target = jnp.result_type(*(a for a in present if a is not None))
    else:
        target = jnp.dtype(dtype)
    return tuple(None if a is None else _cast(a, target) for a in present)


def _cast(array: jax.Array, target: Any) -> jax.Array:
    aval = jax.typeof(array)
    if aval.dtype == target and not aval.weak_type:
        return array
    return jnp.asarray(array, target)
