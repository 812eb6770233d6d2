"""Activations with learned parameters: PReLU. (The plain ones are ``jax.nn``'s, re-exported.)"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike

from toylib._core.module import Module
from toylib.nn._sharding import Names, named_variable
from toylib.nn.dtypes import as_array

__all__ = ["PReLU"]


class PReLU(Module):
    """Parametric ReLU (He et al., 2015): ``x`` where ``x >= 0``, else ``negative_slope * x``.

    The slope is one learned scalar, ``negative_slope`` (a ``Param``), as in
    ``flax.nnx.PReLU`` (PyTorch's ``nn.PReLU()`` default, one slope shared by
    every channel).

    The output keeps the input's dtype unless ``dtype`` is given: an
    activation should not turn bfloat16 activations into float32 because its
    one parameter is stored in float32 (Flax does the same; this is the one
    layer where ``dtype=None`` does not mean "promote").

    Arguments:
        negative_slope_init: the slope's starting value (default 0.01).
        dtype: compute dtype (default: the input's).
        param_dtype: dtype the slope is stored in (default float32).
        negative_slope_sharding: the slope's logical axis names: a scalar
            has no dimensions, so the only names are ``()``, which mark it as
            named (``nn.Stack`` then names its stacked axis, ``("layers",)``).
            Default None: no names (replicated).
        rngs: accepted for uniformity with other layers; unused.

    Returns:
        A Module with a scalar ``negative_slope`` Param, called on any array.

    Example:
        >>> import jax.numpy as jnp
        >>> from toylib import nn
        >>> nn.PReLU(0.25)(jnp.array([-2.0, 3.0])).tolist()
        [-0.5, 3.0]
    """

    def __init__(
        self,
        negative_slope_init: float = 0.01,
        *,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        negative_slope_sharding: Names = None,
        rngs: Any = None,
    ) -> None:
        del rngs  # a constant initial value: nothing to draw
        slope = jnp.asarray(negative_slope_init, param_dtype)
        self.negative_slope = named_variable(self, "negative_slope", slope, negative_slope_sharding)
        self.dtype = dtype

    def __call__(self, x: ArrayLike) -> Array:
        x = as_array(x)
        if self.dtype is not None:
            x = x.astype(self.dtype)
        elif not jnp.issubdtype(x.dtype, jnp.inexact):
            x = x.astype(jnp.promote_types(x.dtype, self.negative_slope.value.dtype))
        slope = self.negative_slope.value.astype(x.dtype)
        return jnp.where(x >= 0, x, jax.lax.mul(slope, x))
