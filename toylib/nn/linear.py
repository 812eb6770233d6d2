"""Linear: ``y = x @ kernel + bias`` over the last axis, any leading batch axes."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from toylib._core.module import Module
from toylib._core.rngs import Rngs, as_rngs
from toylib._core.variables import Param
from toylib.nn.checks import check_features
from toylib.nn.dtypes import promote_dtype

__all__ = ["Linear", "default_kernel_init"]

# LeCun normal (variance 1/fan_in), Flax's default: keeps activations at unit
# scale through tanh/SELU-like networks; ReLU networks train fine with it too.
default_kernel_init = jax.nn.initializers.lecun_normal()


class Linear(Module):
    """A dense layer: ``x @ kernel + bias`` on the last axis of ``x``.

    Arguments:
        in_features: size of the input's last axis.
        out_features: size of the output's last axis.
        use_bias: add a bias (default True).
        dtype: compute dtype (default: promote input and parameters).
        param_dtype: dtype the parameters are stored in (default float32).
        kernel_init: initialiser of the ``(in, out)`` kernel (default LeCun normal).
        bias_init: initialiser of the bias (default zeros).
        rngs: ``tl.Rngs``, an int seed or a key; the ``params`` stream is used.

    Returns:
        A Module with ``kernel`` (and ``bias``) ``Param``s, called on
        ``(*batch, in_features)`` arrays, giving ``(*batch, out_features)``.

    Example:
        >>> import jax.numpy as jnp
        >>> from toylib import nn
        >>> layer = nn.Linear(3, 4, rngs=0)
        >>> layer(jnp.ones((2, 3))).shape
        (2, 4)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        kernel_init: Any = default_kernel_init,
        bias_init: Any = jax.nn.initializers.zeros,
        rngs: Rngs | int | jax.Array,
    ) -> None:
        rngs = as_rngs(rngs, "Linear(rngs=...)")
        self.kernel = Param(kernel_init(rngs.params(), (in_features, out_features), param_dtype))
        self.bias = (
            Param(bias_init(rngs.params(), (out_features,), param_dtype)) if use_bias else None
        )
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype

    def __call__(self, x: Float[ArrayLike, "*batch in"]) -> Float[Array, "*batch out"]:
        x = jnp.asarray(x)
        check_features(self, x.shape, self.in_features)
        bias = None if self.bias is None else self.bias.value
        x, kernel, bias = promote_dtype(x, self.kernel.value, bias, dtype=self.dtype)
        y = x @ kernel
        return y if bias is None else y + bias
