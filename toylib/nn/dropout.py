"""Dropout: zero a fraction of activations while training."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike

from toylib._core.module import Module
from toylib._core.rngs import Rngs, RngStream, as_key, as_rngs

__all__ = ["Dropout"]

NO_RNGS = """\
Dropout(rate={rate}) needs random keys in training mode, but has no stream.
Fix: give it one when building it, or per call, or switch to evaluation:

    nn.Dropout({rate}, rngs=rngs)     # keeps rngs.dropout (or rngs.default)
    layer(x, rngs=rngs)               # or model.eval() / deterministic=True
"""


class Dropout(Module):
    """Randomly zero elements with probability ``rate``, scaling the rest by ``1/(1-rate)``.

    The layer keeps a reference to the random stream it was built with
    (``rngs.dropout``, or ``rngs.default`` when there is no dropout stream),
    so ``model(x)`` needs no key; a call may pass ``rngs=`` (Rngs, a stream or
    a key) to override it. ``deterministic=True`` (set by ``model.eval()``)
    makes it the identity.

    Arguments:
        rate: probability of zeroing an element, in ``[0, 1]``.
        broadcast_dims: axes along which the same mask is shared.
        deterministic: start in evaluation mode (default False, training).
        rngs: ``tl.Rngs``, an int seed or a key; None to pass keys per call.

    Example:
        >>> import jax.numpy as jnp
        >>> from toylib import nn
        >>> drop = nn.Dropout(0.5, rngs=0)
        >>> y = drop(jnp.ones(1000))
        >>> sorted(set(y.tolist()))
        [0.0, 2.0]
        >>> bool((drop.eval()(jnp.ones(3)) == 1).all())
        True
    """

    def __init__(
        self,
        rate: float,
        *,
        broadcast_dims: Sequence[int] = (),
        deterministic: bool = False,
        rngs: Rngs | int | jax.Array | None = None,
    ) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"Dropout(rate={rate}): rate must be in [0, 1].")
        self.rate = rate
        self.broadcast_dims = tuple(broadcast_dims)
        self.deterministic = deterministic
        self.rngs = None if rngs is None else as_rngs(rngs, "Dropout(rngs=...)").dropout

    def __call__(
        self,
        x: ArrayLike,
        *,
        deterministic: bool | None = None,
        rngs: Rngs | RngStream | jax.Array | None = None,
    ) -> Array:
        x = jnp.asarray(x)
        deterministic = self.deterministic if deterministic is None else deterministic
        if deterministic or self.rate == 0.0:
            return x
        if self.rate == 1.0:
            return jnp.zeros_like(x)
        key = self._key(rngs)
        shape = tuple(1 if i in self._broadcast_axes(x.ndim) else n for i, n in enumerate(x.shape))
        # Drawn flat and reshaped: the same values, but XLA:CPU compiles a
        # rank-4 bernoulli several times slower than a rank-1 one.
        keep = jax.random.bernoulli(key, 1.0 - self.rate, (math.prod(shape),)).reshape(shape)
        return jnp.where(keep, x / (1.0 - self.rate), jnp.zeros_like(x))

    def _broadcast_axes(self, ndim: int) -> set[int]:
        return {d % ndim for d in self.broadcast_dims}

    def _key(self, rngs: Any) -> jax.Array:
        if isinstance(rngs, Rngs):
            return rngs.dropout()
        if isinstance(rngs, RngStream):
            return rngs()
        if rngs is not None:
            return as_key(rngs, "Dropout(rngs=...)")
        if self.rngs is None:
            raise ValueError(NO_RNGS.format(rate=self.rate))
        return self.rngs()
