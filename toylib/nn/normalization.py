"""Normalisation layers: BatchNorm."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from toylib._core.module import Module
from toylib._core.variables import BatchStat, Param
from toylib.nn.checks import check_features
from toylib.nn.dtypes import promote_dtype

__all__ = ["BatchNorm"]


class BatchNorm(Module):
    """Batch normalisation over every axis but the feature axis.

    In training mode (``use_running_average=False``, the default, like
    PyTorch) it normalises with the batch statistics and updates the running
    ``mean`` and ``var`` (``BatchStat``): ``running = momentum * running +
    (1 - momentum) * batch``. The variance is the biased batch variance.
    In evaluation mode (``model.eval()``) it uses the running statistics.
    Under ``tl.vmap(..., axis_name=name)`` pass ``axis_name=name`` to average
    the statistics over the vmapped batch too.

    Arguments:
        num_features: size of the feature axis.
        use_running_average: evaluation mode (default False).
        axis: the feature axis (default -1, channels-last).
        momentum: running-average momentum (default 0.99).
        epsilon: added to the variance (default 1e-5).
        dtype, param_dtype: compute and storage dtypes.
        use_bias, use_scale: learn a shift ``bias`` / a factor ``scale``.
        axis_name: a vmapped axis to reduce statistics over.
        rngs: accepted for uniformity with other layers; unused.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> from toylib import nn
        >>> bn = nn.BatchNorm(3)
        >>> y = bn(jnp.arange(12.0).reshape(4, 3))
        >>> [round(v, 3) for v in y.mean(0).tolist()], bn.mean.value.shape
        ([0.0, 0.0, 0.0], (3,))
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool = False,
        axis: int = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        axis_name: str | None = None,
        rngs: Any = None,
    ) -> None:
        self.mean = BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = BatchStat(jnp.ones((num_features,), jnp.float32))
        self.scale = Param(jnp.ones((num_features,), param_dtype)) if use_scale else None
        self.bias = Param(jnp.zeros((num_features,), param_dtype)) if use_bias else None
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.axis_name = axis_name

    def __call__(
        self, x: Float[ArrayLike, "*shape"], *, use_running_average: bool | None = None
    ) -> Float[Array, "*shape"]:
        x = jnp.asarray(x)
        check_features(self, x.shape, self.num_features, name="num_features", axis=self.axis)
        axis = self.axis % x.ndim
        if use_running_average is None:
            use_running_average = self.use_running_average
        reduce = tuple(i for i in range(x.ndim) if i != axis)
        feature_shape = [1] * x.ndim
        feature_shape[axis] = self.num_features
        if use_running_average:
            mean, var = self.mean.value, self.var.value
        else:
            stats = jnp.asarray(x, jnp.promote_types(x.dtype, jnp.float32))
            mean = stats.mean(reduce)
            if self.axis_name is not None:
                mean = jax.lax.pmean(mean, self.axis_name)
            # Two passes (mean, then mean squared deviation) stay accurate for
            # inputs far from zero, where E[x^2] - E[x]^2 cancels badly.
            var = jnp.square(stats - mean.reshape(feature_shape)).mean(reduce)
            if self.axis_name is not None:
                var = jax.lax.pmean(var, self.axis_name)
            m = self.momentum
            self.mean.value = m * self.mean.value + (1 - m) * mean
            self.var.value = m * self.var.value + (1 - m) * var
        scale = None if self.scale is None else self.scale.value
        bias = None if self.bias is None else self.bias.value
        x, mean, var, scale, bias = promote_dtype(x, mean, var, scale, bias, dtype=self.dtype)
        y = (x - mean.reshape(feature_shape)) * jax.lax.rsqrt(
            var.reshape(feature_shape) + self.epsilon
        )
        if scale is not None:
            y = y * scale.reshape(feature_shape)
        if bias is not None:
            y = y + bias.reshape(feature_shape)
        return y
