"""Pooling: max and average over spatial windows of channels-last inputs.

``max_pool`` / ``avg_pool`` are functions of ``(*batch, *spatial, channels)``
arrays, with as many spatial axes as ``window_shape`` has entries (an int
means one, as for ``Conv``'s ``kernel_size``) and any number of batch axes,
including none. ``MaxPool`` / ``AvgPool`` wrap them as parameter-free Modules
for ``Sequential``.

``strides`` default to ``window_shape`` (non-overlapping windows), as in
PyTorch and Keras, not to 1 as in Flax: a pooling layer is almost always
there to downsample, and ``nn.MaxPool((2, 2))`` should halve an image rather
than shrink it by one pixel. Pass ``strides=1`` for Flax's default.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, ArrayLike

from toylib._core.calls import module_path
from toylib._core.module import Module
from toylib.nn.conv import Padding, PaddingLike, canonical_padding, is_int, per_axis

__all__ = ["AvgPool", "MaxPool", "avg_pool", "max_pool"]

BAD_WINDOW = """\
{where}: window_shape={value!r} must be a positive int (1-d) or a non-empty
sequence of positive ints, one per spatial axis.
Fix: e.g. window_shape=(2, 2) to pool 2x2 patches of (*batch, height, width, channels) images.
"""

TOO_FEW_AXES = """\
{where}: window_shape={window} pools {n} spatial {axes}, so the input needs at least
{need} axes (*batch, {spatial}, channels); got shape {shape}.
Fix: add a channels axis (x[..., None]), or give one window size per spatial axis.
"""


def _window(window_shape: int | Sequence[int], where: str) -> tuple[int, ...]:
    if is_int(window_shape):
        window_shape = (window_shape,)
    if (
        isinstance(window_shape, Sequence)
        and len(window_shape) > 0
        and all(is_int(w) and w > 0 for w in window_shape)
    ):
        return tuple(int(w) for w in window_shape)
    raise ValueError(BAD_WINDOW.format(where=where, value=window_shape))


def _pool_args(
    where: str,
    window_shape: int | Sequence[int],
    strides: int | Sequence[int] | None,
    padding: PaddingLike,
) -> tuple[tuple[int, ...], tuple[int, ...], Padding]:
    """Validated ``(window, strides, padding)``: strides default to the window."""
    window = _window(window_shape, where)
    n = len(window)
    strides = (
        window
        if strides is None
        else per_axis(strides, n, "strides", where, window, "window_shape")
    )
    return window, strides, canonical_padding(padding, n, where)


def _check_axes(x: Array, window: tuple[int, ...], where: str) -> None:
    n = len(window)
    if x.ndim < n + 1:
        spatial = ", ".join(f"s{i}" for i in range(n))
        raise ValueError(
            TOO_FEW_AXES.format(
                where=where,
                window=window,
                n=n,
                axes="axis" if n == 1 else "axes",
                need=n + 1,
                spatial=spatial,
                shape=x.shape,
            )
        )


def _reduce(
    x: Array,
    init: Any,
    op: Any,
    window: tuple[int, ...],
    strides: tuple[int, ...],
    padding: Padding,
) -> Array:
    """``lax.reduce_window`` over the spatial axes only: batch axes and channels get window 1."""
    batch = x.ndim - len(window) - 1
    dims = (1,) * batch + window + (1,)
    steps = (1,) * batch + strides + (1,)
    if not isinstance(padding, str):
        padding = ((0, 0),) * batch + padding + ((0, 0),)
    return lax.reduce_window(x, init, op, dims, steps, padding)


# Initial values are numpy scalars, not jax arrays: lax recognises a concrete
# identity (0 for add, -inf for max) and then uses its differentiable
# reduce_window_sum/max; a traced init (jnp.array under jit) has no gradient rule.
def _lowest(dtype: Any) -> np.ndarray:
    """The identity of ``max`` for ``dtype``: padding with it never wins a window."""
    if jnp.issubdtype(dtype, jnp.floating):
        return np.array(-np.inf, dtype)
    if jnp.issubdtype(dtype, jnp.integer):
        return np.array(jnp.iinfo(dtype).min, dtype)
    return np.array(False, dtype)


def max_pool(
    x: ArrayLike,
    window_shape: int | Sequence[int],
    strides: int | Sequence[int] | None = None,
    padding: PaddingLike = "VALID",
) -> Array:
    """The maximum over each spatial window of a channels-last array; padding never wins.

    Arguments:
        x: ``(*batch, *spatial, channels)``, any number of batch axes.
        window_shape: an int (one spatial axis) or one size per spatial axis.
        strides: an int or one stride per spatial axis (default: ``window_shape``,
            non-overlapping windows, as in PyTorch).
        padding: ``"VALID"`` (default), ``"SAME"`` (output size ``ceil(n / stride)``),
            an int, or one int / ``(low, high)`` pair per spatial axis.

    Returns:
        ``(*batch, *spatial_out, channels)``, the dtype of ``x``.

    Example:
        >>> import jax.numpy as jnp
        >>> from toylib import nn
        >>> x = jnp.arange(16.0).reshape(4, 4, 1)
        >>> nn.max_pool(x, (2, 2))[..., 0].tolist()
        [[5.0, 7.0], [13.0, 15.0]]
    """
    x = jnp.asarray(x)
    window, strides, padding = _pool_args("max_pool(...)", window_shape, strides, padding)
    _check_axes(x, window, "max_pool(...)")
    return _reduce(x, _lowest(x.dtype), lax.max, window, strides, padding)


def avg_pool(
    x: ArrayLike,
    window_shape: int | Sequence[int],
    strides: int | Sequence[int] | None = None,
    padding: PaddingLike = "VALID",
    count_include_pad: bool = True,
) -> Array:
    """The mean over each spatial window of a channels-last array.

    Arguments:
        x: ``(*batch, *spatial, channels)``, any number of batch axes.
        window_shape: an int (one spatial axis) or one size per spatial axis.
        strides: an int or one stride per spatial axis (default: ``window_shape``,
            non-overlapping windows, as in PyTorch).
        padding: ``"VALID"`` (default), ``"SAME"`` (output size ``ceil(n / stride)``),
            an int, or one int / ``(low, high)`` pair per spatial axis.
        count_include_pad: divide by the full window size, counting padded zeros
            (default True, like PyTorch and Flax); False divides by the number
            of real input elements in each window, so borders are not darkened
            (a window holding padding only gives 0).

    Returns:
        ``(*batch, *spatial_out, channels)``.

    Example:
        >>> import jax.numpy as jnp
        >>> from toylib import nn
        >>> x = jnp.ones((3, 1))
        >>> nn.avg_pool(x, 2, strides=1, padding="SAME")[:, 0].tolist()
        [1.0, 1.0, 0.5]
        >>> nn.avg_pool(x, 2, strides=1, padding="SAME", count_include_pad=False)[:, 0].tolist()
        [1.0, 1.0, 1.0]
    """
    x = jnp.asarray(x)
    window, strides, padding = _pool_args("avg_pool(...)", window_shape, strides, padding)
    _check_axes(x, window, "avg_pool(...)")
    total = _reduce(x, np.array(0, x.dtype), lax.add, window, strides, padding)
    if count_include_pad:
        return total / math.prod(window)
    # How many real elements each window covers: the same sum over an array of ones
    # (spatial axes only, so it is a small constant XLA folds away).
    spatial = x.shape[x.ndim - len(window) - 1 : -1]
    ones = jnp.ones((*spatial, 1), x.dtype)
    counts = _reduce(ones, np.array(0, x.dtype), lax.add, window, strides, padding)
    # A window lying wholly in the padding averages nothing: give 0, not 0/0 = NaN
    # (whose gradient would poison every parameter upstream).
    return total / jnp.maximum(counts, 1)


class MaxPool(Module):
    """``max_pool`` as a Module (no parameters), e.g. for ``nn.Sequential``.

    Arguments:
        window_shape: an int (one spatial axis) or one size per spatial axis.
        strides: default ``window_shape`` (see ``max_pool``).
        padding: ``"VALID"`` (default), ``"SAME"``, an int or per-axis pairs.

    Returns:
        A Module called on ``(*batch, *spatial, channels)`` arrays.

    Example:
        >>> import jax.numpy as jnp
        >>> from toylib import nn
        >>> nn.MaxPool((2, 2))(jnp.ones((8, 6, 6, 3))).shape
        (8, 3, 3, 3)
    """

    def __init__(
        self,
        window_shape: int | Sequence[int],
        strides: int | Sequence[int] | None = None,
        *,
        padding: PaddingLike = "VALID",
    ) -> None:
        window, strides, padding = _pool_args("MaxPool(...)", window_shape, strides, padding)
        self.window_shape = window
        self.strides = strides
        self.padding = padding

    def __call__(self, x: ArrayLike) -> Array:
        x = jnp.asarray(x)
        _check_axes(x, self.window_shape, module_path(self))
        return max_pool(x, self.window_shape, self.strides, self.padding)


class AvgPool(Module):
    """``avg_pool`` as a Module (no parameters), e.g. for ``nn.Sequential``.

    Arguments:
        window_shape: an int (one spatial axis) or one size per spatial axis.
        strides: default ``window_shape`` (see ``avg_pool``).
        padding: ``"VALID"`` (default), ``"SAME"``, an int or per-axis pairs.
        count_include_pad: count padded zeros in the mean (default True).

    Returns:
        A Module called on ``(*batch, *spatial, channels)`` arrays.

    Example:
        >>> import jax.numpy as jnp
        >>> from toylib import nn
        >>> nn.AvgPool((2, 2), padding="SAME")(jnp.ones((5, 5, 3))).shape
        (3, 3, 3)
    """

    def __init__(
        self,
        window_shape: int | Sequence[int],
        strides: int | Sequence[int] | None = None,
        *,
        padding: PaddingLike = "VALID",
        count_include_pad: bool = True,
    ) -> None:
        window, strides, padding = _pool_args("AvgPool(...)", window_shape, strides, padding)
        self.window_shape = window
        self.strides = strides
        self.padding = padding
        self.count_include_pad = count_include_pad

    def __call__(self, x: ArrayLike) -> Array:
        x = jnp.asarray(x)
        _check_axes(x, self.window_shape, module_path(self))
        return avg_pool(x, self.window_shape, self.strides, self.padding, self.count_include_pad)
