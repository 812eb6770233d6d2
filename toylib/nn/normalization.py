"""Normalisation layers: BatchNorm, LayerNorm, RMSNorm, GroupNorm, InstanceNorm.

Statistics are taken in at least float32. The variance is two-pass by default
(the mean, then the mean squared deviation), which stays accurate for inputs
far from zero; ``use_fast_variance=True`` takes ``E[x^2] - E[x]^2`` in one
pass instead (Flax's default: one fused reduction, but it cancels badly when
the mean is large against the spread), clipped at zero.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Real

from toylib._core.calls import module_path
from toylib._core.module import Module
from toylib._core.rngs import Rngs, as_rngs
from toylib._core.variables import BatchStat, Param
from toylib.nn._sharding import Names, check_names, named_variable
from toylib.nn.checks import check_features
from toylib.nn.dtypes import promote_dtype

__all__ = ["BatchNorm", "GroupNorm", "InstanceNorm", "LayerNorm", "RMSNorm"]


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
        use_fast_variance: one-pass ``E[x^2] - E[x]^2`` variance (default
            False: two passes, see the module docstring; Flax's default is True).
        scale_init, bias_init: initialisers (default ones and zeros).
        scale_sharding, bias_sharding: logical axis names of the
            ``(num_features,)`` ``scale`` / ``bias``, e.g. ``("embed",)``;
            stored as their ``sharding`` metadata for ``tl.sharding``.
            Default None: no names (replicated).
        stats_sharding: the names of the running ``mean`` and ``var``
            (``BatchStat``, ``(num_features,)``). Default None: those of
            ``scale_sharding``, else of ``bias_sharding``, so the statistics
            sit with the features they describe; no names if neither is given.
        rngs: ``tl.Rngs``, an int seed or a key, only needed by a random
            initialiser (without it the initialisers get a fixed key).

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> from toylib import nn
        >>> bn = nn.BatchNorm(3)
        >>> y = bn(jnp.arange(12.0).reshape(4, 3))
        >>> [round(v, 3) for v in y.mean(0).tolist()], bn.mean.value.shape
        ([0.0, 0.0, 0.0], (3,))
        >>> named = nn.BatchNorm(3, scale_sharding=("embed",), bias_sharding=("embed",))
        >>> named.scale.sharding, named.mean.sharding, named.var.sharding   # stats follow
        (('embed',), ('embed',), ('embed',))
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
        use_fast_variance: bool = False,
        scale_init: Any = jax.nn.initializers.ones,
        bias_init: Any = jax.nn.initializers.zeros,
        scale_sharding: Names = None,
        bias_sharding: Names = None,
        stats_sharding: Names = None,
        rngs: Rngs | int | jax.Array | None = None,
    ) -> None:
        key = _init_keys(rngs, "BatchNorm(rngs=...)")
        shape = (num_features,)
        # The running statistics are per feature, like scale and bias: they
        # follow the features' names unless given their own. (The features'
        # names are checked first, so that a wrong one is named as given.)
        check_names(scale_sharding, shape, layer=self, variable="scale")
        check_names(bias_sharding, shape, layer=self, variable="bias")
        if stats_sharding is None:
            stats_sharding = scale_sharding if scale_sharding is not None else bias_sharding
        self.mean = named_variable(
            self,
            "mean",
            jnp.zeros(shape, jnp.float32),
            stats_sharding,
            kind=BatchStat,
            argument="stats_sharding",
        )
        self.var = named_variable(
            self,
            "var",
            jnp.ones(shape, jnp.float32),
            stats_sharding,
            kind=BatchStat,
            argument="stats_sharding",
        )
        param = functools.partial(_param, self, key, shape, param_dtype)
        self.scale = param("scale", use_scale, scale_init, scale_sharding)
        self.bias = param("bias", use_bias, bias_init, bias_sharding)
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.axis_name = axis_name
        self.use_fast_variance = use_fast_variance

    def __call__(
        self, x: Real[ArrayLike, "*shape"], *, use_running_average: bool | None = None
    ) -> Float[Array, "*shape"]:
        x = jnp.asarray(x)
        check_features(self, x.shape, self.num_features, name="num_features", axis=self.axis)
        axis = self.axis % x.ndim
        if use_running_average is None:
            use_running_average = self.use_running_average
        reduce = tuple(i for i in range(x.ndim) if i != axis)
        feature_shape = [1] * x.ndim
        feature_shape[axis] = self.num_features
        scale = None if self.scale is None else self.scale.value
        bias = None if self.bias is None else self.bias.value
        # As the other norms: cast to the compute dtype, then take statistics
        # and normalise in at least float32, and cast the result back.
        x, scale, bias = promote_dtype(x, scale, bias, dtype=self.dtype)
        x = _compute_dtype(x)
        stats = _stats_input(x)
        if use_running_average:
            centred = stats - self.mean.value.reshape(feature_shape)
            var = self.var.value.reshape(feature_shape)
        else:
            mean, var, centred = _mean_var(stats, reduce, self.use_fast_variance, self.axis_name)
            m = self.momentum
            self.mean.value = m * self.mean.value + (1 - m) * mean.reshape(-1)
            self.var.value = m * self.var.value + (1 - m) * var.reshape(-1)
        y = centred * jax.lax.rsqrt(var + self.epsilon)
        if scale is not None:
            y = y * scale.reshape(feature_shape)
        if bias is not None:
            y = y + bias.reshape(feature_shape)
        return y.astype(x.dtype)


# -- LayerNorm, RMSNorm, GroupNorm ---------------------------------------------------------------

Axes = int | Sequence[int]

BAD_AXIS = """\
{where}: {name}={axes} is out of range for an input of shape {shape}.
Fix: give axes in [-{ndim}, {ndim}), e.g. {name}=-1 for the last axis.
"""

WRONG_FEATURE_AXES = """\
{where}: feature_axes={axes} of an input of shape {shape} hold {got} values, \
but the layer was built with num_features={features}.
Fix: num_features is the product of the feature axes' sizes: build it with \
num_features={got}, or change feature_axes.
"""

BAD_GROUPS = """\
GroupNorm(num_features={features}, num_groups={groups}): {features} channels \
cannot be split into {groups} equal groups.
Fix: pick num_groups among the divisors of {features}: {divisors}.
"""

NO_GROUPS = """\
GroupNorm(num_features={features}): num_groups and group_size are both None.
Fix: give one, e.g. nn.GroupNorm({features}, num_groups=1) or group_size=...
"""

BAD_GROUP_SIZE = """\
GroupNorm(num_features={features}, group_size={size}): {features} channels \
cannot be split into groups of {size}.
Fix: pick group_size among the divisors of {features}: {divisors}.
"""

GROUPS_AND_SIZE = """\
GroupNorm(num_features={features}, num_groups={groups}, group_size={size}): \
{groups} groups of {size} channels is not {features} channels.
Fix: give one of them; to set group_size, pass num_groups=None:

    nn.GroupNorm({features}, num_groups=None, group_size={size})
"""

NEEDS_BATCH_AXIS = """\
{where}: with num_spatial=None the first axis is the batch, so the input needs \
at least 2 axes (batch, ..., channels); got shape {shape}.
Fix: say how many spatial axes precede the channels; every axis before them is \
batch (none, one or several, e.g. under tl.vmap):

    nn.GroupNorm({features}, num_groups={groups}, num_spatial=0)   # (*batch, channels)
    nn.GroupNorm({features}, num_groups={groups}, num_spatial=2)   # (*batch, h, w, channels)
"""


def _as_axes(axes: Axes) -> tuple[int, ...]:
    # A tuple keeps the attribute hashable (static) whatever the caller passed.
    return tuple(int(a) for a in axes) if isinstance(axes, Iterable) else (int(axes),)


def _canonical_axes(module: Module, axes: tuple[int, ...], shape: tuple, name: str) -> tuple:
    ndim = len(shape)
    if not all(-ndim <= a < ndim for a in axes):
        spelled = axes[0] if len(axes) == 1 else axes
        raise ValueError(
            BAD_AXIS.format(
                where=module_path(module), name=name, axes=spelled, shape=shape, ndim=ndim
            )
        )
    return tuple(sorted({a % ndim for a in axes}))


def _check_feature_axes(
    module: Module, shape: tuple, num_features: int, feature_axes: tuple[int, ...]
) -> None:
    if len(feature_axes) == 1:
        check_features(module, shape, num_features, name="num_features", axis=feature_axes[0])
        return
    axes = _canonical_axes(module, feature_axes, shape, "feature_axes")
    got = math.prod(shape[a] for a in axes)
    if got != num_features:
        raise ValueError(
            WRONG_FEATURE_AXES.format(
                where=module_path(module),
                axes=feature_axes,
                shape=shape,
                got=got,
                features=num_features,
            )
        )


def _init_keys(rngs: Rngs | int | jax.Array | None, where: str) -> Callable[[], jax.Array]:
    """Keys for the initialisers: from ``rngs.params``, or a fixed key without rngs.

    The default initialisers (ones, zeros) ignore the key, so the norm layers
    need no ``rngs``; a random custom initialiser wants one.
    """
    if rngs is None:
        return lambda: jax.random.key(0)
    return as_rngs(rngs, where).params


def _param(
    layer: Module,
    key: Callable[[], jax.Array],
    shape: tuple[int, ...],
    dtype: Any,
    name: str,
    use: bool,
    init: Any,
    names: Names,
) -> Param | None:
    """The ``scale`` or ``bias`` Param (with ``names`` as its sharding), or None if not ``use``d."""
    if not use:
        check_names(names, shape, layer=layer, variable=name)  # a wrong name is still an error
        return None
    return named_variable(layer, name, init(key(), shape, dtype), names)


def _stats_input(x: Array) -> Array:
    # Mean and variance in at least float32: in bfloat16 (8 bits of mantissa)
    # they lose too much; float64 and wider inputs are kept as they are.
    return jnp.asarray(x, jnp.promote_types(x.dtype, jnp.float32))


def _mean_var(
    stats: Array, reduce: tuple[int, ...], fast: bool, axis_name: str | None = None
) -> tuple[Array, Array, Array]:
    """Mean, biased variance (both kept as size-1 axes) and ``stats - mean``, over ``reduce``.

    Two passes unless ``fast``: ``E[x^2] - E[x]^2`` loses everything to
    cancellation once the mean is large against the spread (see the module
    docstring), so it is only taken when asked for. ``axis_name``: also
    average over that vmapped axis. The centred input is returned so that
    callers normalise with the very array the variance was taken from:
    written twice, ``stats - mean`` is one subtraction in the forward pass
    (XLA merges them) but two in the backward pass, and that extra cotangent
    traffic cost the GPT train step 10% more bytes on XLA:CPU
    (benchmarks/README.md, gpt.py).
    """

    def mean(v: Array) -> Array:
        m = v.mean(reduce, keepdims=True)
        return m if axis_name is None else jax.lax.pmean(m, axis_name)

    mu = mean(stats)
    centred = stats - mu
    if fast:
        return mu, jnp.maximum(0.0, mean(jnp.square(stats)) - jnp.square(mu)), centred
    return mu, mean(jnp.square(centred)), centred


def _compute_dtype(x: Array) -> Array:
    # An integer input with no float parameters (use_scale=use_bias=False)
    # still gives a float result.
    return x if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.asarray(x, jnp.float32)


def _feature_shape(shape: tuple, features: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(n if i in features else 1 for i, n in enumerate(shape))


@jax.custom_jvp
def _materialized_cotangent(x: Array) -> Array:
    """The identity, but the gradient flowing back into ``x`` is materialised as one array.

    The backward pass of a standardisation ends in ``d_centred -
    mean(d_centred)``: an elementwise step after a reduction, so XLA cannot
    fuse it into the fusion that made ``d_centred``, and left free it fuses it
    into every consumer instead. In a residual network those consumers are the
    next block's gradient sums, so the unmaterialised terms pile up block after
    block and each fusion re-reads all of them: on XLA:CPU the GPT train step
    read 10% more bytes than with this barrier (benchmarks/README.md, gpt.py).
    An optimization barrier on the tangent (and so on the cotangent, its
    transpose) makes XLA write the finished gradient once. The values, and
    every derivative (forward, reverse, higher order), are unchanged.
    """
    return x


@_materialized_cotangent.defjvp
def _materialized_cotangent_jvp(
    primals: tuple[Array], tangents: tuple[Array]
) -> tuple[Array, Array]:
    return primals[0], jax.lax.optimization_barrier(tangents[0])


def _standardize(
    norm: Any, x: jax.Array, reduce: tuple[int, ...], features: tuple[int, ...]
) -> jax.Array:
    """``(x - mean) / sqrt(var + epsilon) * scale + bias`` over ``reduce`` (Layer/InstanceNorm)."""
    scale = None if norm.scale is None else norm.scale.value
    bias = None if norm.bias is None else norm.bias.value
    x, scale, bias = promote_dtype(_materialized_cotangent(x), scale, bias, dtype=norm.dtype)
    x = _compute_dtype(x)
    stats = _stats_input(x)
    _, var, centred = _mean_var(stats, reduce, norm.use_fast_variance)
    y = centred * jax.lax.rsqrt(var + norm.epsilon)
    shape = _feature_shape(x.shape, features)
    if scale is not None:
        y = y * scale.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y.astype(x.dtype)


class LayerNorm(Module):
    """Layer normalisation: ``(x - mean) / sqrt(var + epsilon) * scale + bias``.

    ``mean`` and the (biased) ``var`` are taken over ``reduction_axes`` of
    each example. The input is cast to the compute dtype, then normalised,
    scaled and shifted in at least float32 (as Flax does: bfloat16 statistics
    lose too much), and the result is cast back to the compute dtype. ``scale``
    and ``bias`` hold ``num_features`` values, broadcast along
    ``feature_axes`` (several feature axes: ``num_features`` is the product of
    their sizes, the parameters are stored flat, as Flax does).

    Arguments:
        num_features: size of the feature axis (the product, for several).
        epsilon: added to the variance (default 1e-6, Flax's; PyTorch uses 1e-5).
        use_bias, use_scale: learn a shift ``bias`` / a factor ``scale`` (default True).
        reduction_axes: axes the statistics are taken over (default -1).
        feature_axes: axes ``scale`` and ``bias`` vary along (default -1).
        use_fast_variance: one-pass ``E[x^2] - E[x]^2`` variance (default
            False: two passes, see the module docstring; Flax's default is True).
        dtype: compute dtype (default: promote input and parameters).
        param_dtype: dtype the parameters are stored in (default float32).
        scale_init, bias_init: initialisers (default ones and zeros).
        scale_sharding, bias_sharding: logical axis names of the
            ``(num_features,)`` ``scale`` / ``bias``, e.g. ``("embed",)``;
            stored as their ``sharding`` metadata for ``tl.sharding``.
            Default None: no names (replicated).
        rngs: ``tl.Rngs``, an int seed or a key, only needed by a random
            initialiser (without it the initialisers get a fixed key).

    Returns:
        A Module called on ``(*batch, num_features)`` arrays (by default),
        giving an array of the same shape in the compute dtype.

    Example:
        >>> import jax.numpy as jnp
        >>> from toylib import nn
        >>> y = nn.LayerNorm(4)(jnp.array([[1.0, 2.0, 3.0, 6.0]]))
        >>> round(float(y.mean()), 4), round(float(y.var()), 4)
        (0.0, 1.0)
        >>> nn.LayerNorm(4, scale_sharding=("embed",)).scale.sharding
        ('embed',)
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        use_bias: bool = True,
        use_scale: bool = True,
        reduction_axes: Axes = -1,
        feature_axes: Axes = -1,
        use_fast_variance: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        scale_init: Any = jax.nn.initializers.ones,
        bias_init: Any = jax.nn.initializers.zeros,
        scale_sharding: Names = None,
        bias_sharding: Names = None,
        rngs: Rngs | int | jax.Array | None = None,
    ) -> None:
        key = _init_keys(rngs, "LayerNorm(rngs=...)")
        shape = (num_features,)
        param = functools.partial(_param, self, key, shape, param_dtype)
        self.scale = param("scale", use_scale, scale_init, scale_sharding)
        self.bias = param("bias", use_bias, bias_init, bias_sharding)
        self.num_features = num_features
        self.epsilon = epsilon
        self.reduction_axes = _as_axes(reduction_axes)
        self.feature_axes = _as_axes(feature_axes)
        self.use_fast_variance = use_fast_variance
        self.dtype = dtype

    def __call__(self, x: Real[ArrayLike, "*shape"]) -> Float[Array, "*shape"]:
        x = jnp.asarray(x)
        _check_feature_axes(self, x.shape, self.num_features, self.feature_axes)
        reduce = _canonical_axes(self, self.reduction_axes, x.shape, "reduction_axes")
        features = _canonical_axes(self, self.feature_axes, x.shape, "feature_axes")
        return _standardize(self, x, reduce, features)


class RMSNorm(Module):
    """Root-mean-square normalisation: ``x / sqrt(mean(x**2) + epsilon) * scale``.

    Like LayerNorm without centring and without a bias (Zhang & Sennrich,
    2019). The mean square is taken over ``reduction_axes`` in at least
    float32; ``scale`` holds ``num_features`` values broadcast along
    ``feature_axes``.

    Arguments:
        num_features: size of the feature axis (the product, for several).
        epsilon: added to the mean square (default 1e-6, Flax's; PyTorch's
            ``RMSNorm`` uses the dtype's machine epsilon).
        use_scale: learn a factor ``scale`` (default True).
        reduction_axes: axes the mean square is taken over (default -1).
        feature_axes: axes ``scale`` varies along (default -1).
        use_fast_variance: accepted for parity with the other norms and Flax;
            it changes nothing, the mean square is one pass anyway.
        dtype: compute dtype (default: promote input and parameters).
        param_dtype: dtype the parameters are stored in (default float32).
        scale_init: initialiser of ``scale`` (default ones).
        scale_sharding: logical axis names of the ``(num_features,)``
            ``scale``, e.g. ``("embed",)``; stored as its ``sharding``
            metadata for ``tl.sharding``. Default None: no names (replicated).
        rngs: ``tl.Rngs``, an int seed or a key, only needed by a random
            initialiser (without it the initialiser gets a fixed key).

    Returns:
        A Module called on ``(*batch, num_features)`` arrays (by default),
        giving an array of the same shape in the compute dtype.

    Example:
        >>> import jax.numpy as jnp
        >>> from toylib import nn
        >>> y = nn.RMSNorm(2)(jnp.array([3.0, 4.0]))
        >>> [round(v, 4) for v in (y**2).mean(keepdims=True).tolist()]
        [1.0]
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        use_scale: bool = True,
        reduction_axes: Axes = -1,
        feature_axes: Axes = -1,
        use_fast_variance: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        scale_init: Any = jax.nn.initializers.ones,
        scale_sharding: Names = None,
        rngs: Rngs | int | jax.Array | None = None,
    ) -> None:
        key = _init_keys(rngs, "RMSNorm(rngs=...)")
        shape = (num_features,)
        param = functools.partial(_param, self, key, shape, param_dtype)
        self.scale = param("scale", use_scale, scale_init, scale_sharding)
        self.num_features = num_features
        self.epsilon = epsilon
        self.reduction_axes = _as_axes(reduction_axes)
        self.feature_axes = _as_axes(feature_axes)
        self.use_fast_variance = use_fast_variance
        self.dtype = dtype

    def __call__(self, x: Real[ArrayLike, "*shape"]) -> Float[Array, "*shape"]:
        x = jnp.asarray(x)
        _check_feature_axes(self, x.shape, self.num_features, self.feature_axes)
        reduce = _canonical_axes(self, self.reduction_axes, x.shape, "reduction_axes")
        features = _canonical_axes(self, self.feature_axes, x.shape, "feature_axes")
        scale = None if self.scale is None else self.scale.value
        x, scale = promote_dtype(x, scale, dtype=self.dtype)
        x = _compute_dtype(x)
        stats = _stats_input(x)
        mean_square = jnp.square(stats).mean(reduce, keepdims=True)
        y = stats * jax.lax.rsqrt(mean_square + self.epsilon)
        if scale is not None:
            y = y * scale.reshape(_feature_shape(x.shape, features))
        return y.astype(x.dtype)


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


class GroupNorm(Module):
    """Group normalisation (Wu & He, 2018) of channels-last ``(*batch, *spatial, C)`` inputs.

    The ``C`` channels are split into ``num_groups`` groups of consecutive
    channels; each example is normalised per group, with the mean and
    (biased) variance taken over the spatial axes and the group's channels,
    in at least float32. ``scale`` and ``bias`` are per channel.
    ``num_groups=1`` is LayerNorm over all non-batch axes; ``num_groups=C``
    is instance normalisation.

    Which axes are batch: with ``num_spatial=None`` (the default, Flax's
    convention) the first axis is the batch and every axis between it and
    the channels is spatial, so the input needs at least 2 axes. With
    ``num_spatial=k`` the ``k`` axes before the channels are spatial and all
    axes before them are batch: zero, one or several, as under ``tl.vmap``
    where the layer sees one example (``num_spatial=2`` for images).

    Arguments:
        num_features: the number of channels ``C`` (last axis).
        num_groups: the number of groups (default 32); must divide ``C``.
        group_size: channels per group, instead of ``num_groups`` (pass
            ``num_groups=None``, or a consistent ``num_groups``).
        num_spatial: the number of spatial axes, or None (see above).
        epsilon: added to the variance (default 1e-6, Flax's; PyTorch uses 1e-5).
        use_bias, use_scale: learn a shift ``bias`` / a factor ``scale`` (default True).
        use_fast_variance: one-pass ``E[x^2] - E[x]^2`` variance (default
            False: two passes, see the module docstring; Flax's default is True).
        dtype: compute dtype (default: promote input and parameters).
        param_dtype: dtype the parameters are stored in (default float32).
        scale_init, bias_init: initialisers (default ones and zeros).
        scale_sharding, bias_sharding: logical axis names of the
            ``(num_features,)`` ``scale`` / ``bias``, e.g. ``("embed",)``;
            stored as their ``sharding`` metadata for ``tl.sharding``.
            Default None: no names (replicated).
        rngs: ``tl.Rngs``, an int seed or a key, only needed by a random
            initialiser (without it the initialisers get a fixed key).

    Returns:
        A Module called on ``(*batch, *spatial, num_features)`` arrays, giving
        an array of the same shape in the compute dtype.

    Example:
        >>> import jax.numpy as jnp
        >>> from toylib import nn
        >>> gn = nn.GroupNorm(4, num_groups=2)
        >>> y = gn(jnp.arange(24.0).reshape(1, 3, 2, 4))   # (batch, h, w, channels)
        >>> y.shape, round(float(y[..., :2].mean()), 4), round(float(y[..., :2].var()), 4)
        ((1, 3, 2, 4), 0.0, 1.0)
    """

    def __init__(
        self,
        num_features: int,
        *,
        num_groups: int | None = 32,
        group_size: int | None = None,
        num_spatial: int | None = None,
        epsilon: float = 1e-6,
        use_bias: bool = True,
        use_scale: bool = True,
        use_fast_variance: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        scale_init: Any = jax.nn.initializers.ones,
        bias_init: Any = jax.nn.initializers.zeros,
        scale_sharding: Names = None,
        bias_sharding: Names = None,
        rngs: Rngs | int | jax.Array | None = None,
    ) -> None:
        divisors = _divisors(num_features)
        if group_size is not None:
            if group_size <= 0 or num_features % group_size:
                raise ValueError(
                    BAD_GROUP_SIZE.format(features=num_features, size=group_size, divisors=divisors)
                )
            if num_groups is not None and num_groups * group_size != num_features:
                raise ValueError(
                    GROUPS_AND_SIZE.format(
                        features=num_features, groups=num_groups, size=group_size
                    )
                )
            num_groups = num_features // group_size
        elif num_groups is None:
            raise ValueError(NO_GROUPS.format(features=num_features))
        elif num_groups <= 0 or num_features % num_groups:
            raise ValueError(
                BAD_GROUPS.format(features=num_features, groups=num_groups, divisors=divisors)
            )
        if num_spatial is not None and num_spatial < 0:
            raise ValueError(f"GroupNorm(num_spatial={num_spatial}): must be >= 0 or None.")
        key = _init_keys(rngs, "GroupNorm(rngs=...)")
        shape = (num_features,)
        param = functools.partial(_param, self, key, shape, param_dtype)
        self.scale = param("scale", use_scale, scale_init, scale_sharding)
        self.bias = param("bias", use_bias, bias_init, bias_sharding)
        self.num_features = num_features
        self.num_groups = num_groups
        self.group_size = num_features // num_groups
        self.num_spatial = num_spatial
        self.epsilon = epsilon
        self.use_fast_variance = use_fast_variance
        self.dtype = dtype

    def __call__(
        self, x: Real[ArrayLike, "*batch_and_spatial C"]
    ) -> Float[Array, "*batch_and_spatial C"]:
        x = jnp.asarray(x)
        spatial = self.num_spatial
        if spatial is None:
            check_features(self, x.shape, self.num_features, name="num_features")
            if x.ndim < 2:
                raise ValueError(
                    NEEDS_BATCH_AXIS.format(
                        where=module_path(self),
                        shape=x.shape,
                        features=self.num_features,
                        groups=self.num_groups,
                    )
                )
            spatial = x.ndim - 2
        else:
            check_features(self, x.shape, self.num_features, name="num_features", spatial=spatial)
        scale = None if self.scale is None else self.scale.value
        bias = None if self.bias is None else self.bias.value
        x, scale, bias = promote_dtype(x, scale, bias, dtype=self.dtype)
        x = _compute_dtype(x)
        grouped = _stats_input(x).reshape(*x.shape[:-1], self.num_groups, self.group_size)
        # grouped is (*batch, *spatial, groups, group_size): reduce over the
        # spatial axes and group_size, keep batch and groups.
        first_spatial = x.ndim - 1 - spatial
        reduce = (*range(first_spatial, x.ndim - 1), x.ndim)
        _, var, centred = _mean_var(grouped, reduce, self.use_fast_variance)
        y = (centred * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        if scale is not None:
            y = y * scale
        if bias is not None:
            y = y + bias
        return y.astype(x.dtype)


FEATURES_ON_BATCH_AXIS = """\
{where}: feature_axes={axes} includes axis 0 of an input of shape {shape}, but with
num_spatial=None axis 0 is the batch (each example is normalised on its own).
Fix: pick feature axes after the first, or say how many spatial axes precede the
channels (every axis before them is batch):

    nn.InstanceNorm({features}, num_spatial=2)   # (*batch, h, w, channels)
"""

INSTANCE_NEEDS_BATCH = """\
{where}: with num_spatial=None the first axis is the batch, so the input needs
at least 2 axes (batch, ..., channels); got shape {shape}.
Fix: say how many spatial axes precede the channels; every axis before them is
batch (none, one or several, e.g. under tl.vmap):

    nn.InstanceNorm({features}, num_spatial=1)   # (*batch, length, channels)
    nn.InstanceNorm({features}, num_spatial=2)   # (*batch, h, w, channels)
"""

SPATIAL_WITH_FEATURE_AXES = """\
InstanceNorm(num_spatial={spatial}, feature_axes={axes}): num_spatial counts the axes
just before the channels, so the channels must be the last axis.
Fix: leave feature_axes=-1 with num_spatial, or use num_spatial=None (axis 0 is
the batch, every axis but the feature axes is reduced).
"""


class InstanceNorm(Module):
    """Instance normalisation (Ulyanov et al., 2016): each example and channel on its own.

    The mean and (biased) variance are taken over the spatial axes of each
    example, separately for every channel, in at least float32; ``scale``
    and ``bias`` are per channel. It is ``GroupNorm`` with one channel per
    group, and ``LayerNorm`` over the spatial axes only.

    Which axes are batch, as in ``GroupNorm``: with ``num_spatial=None`` (the
    default, Flax's convention) axis 0 is the batch and every other axis
    that is not a feature axis is reduced. With ``num_spatial=k`` the ``k``
    axes before the channels (the last axis) are reduced and every axis before
    them is batch: zero, one or several, as under ``tl.vmap``.

    Arguments:
        num_features: the number of channels (the product, for several feature axes).
        epsilon: added to the variance (default 1e-6, Flax's; PyTorch uses 1e-5).
        use_bias, use_scale: learn a shift ``bias`` / a factor ``scale`` (default True).
        feature_axes: the channel axes (default -1); not axis 0 (the batch).
        num_spatial: the number of spatial axes, or None (see above).
        use_fast_variance: one-pass ``E[x^2] - E[x]^2`` variance (default
            False: two passes, see the module docstring; Flax's default is True).
        dtype: compute dtype (default: promote input and parameters).
        param_dtype: dtype the parameters are stored in (default float32).
        scale_init, bias_init: initialisers (default ones and zeros).
        scale_sharding, bias_sharding: logical axis names of the
            ``(num_features,)`` ``scale`` / ``bias``, e.g. ``("embed",)``;
            stored as their ``sharding`` metadata for ``tl.sharding``.
            Default None: no names (replicated).
        rngs: ``tl.Rngs``, an int seed or a key, only needed by a random
            initialiser (without it the initialisers get a fixed key).

    Returns:
        A Module called on ``(batch, *spatial, num_features)`` arrays (by
        default), giving an array of the same shape in the compute dtype.

    Example:
        >>> import jax.numpy as jnp
        >>> from toylib import nn
        >>> y = nn.InstanceNorm(3)(jnp.arange(24.0).reshape(2, 4, 3) ** 2)
        >>> [round(v, 4) for v in y.mean(1).ravel().tolist()[:3]], y.shape
        ([0.0, 0.0, 0.0], (2, 4, 3))
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        use_bias: bool = True,
        use_scale: bool = True,
        feature_axes: Axes = -1,
        num_spatial: int | None = None,
        use_fast_variance: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        scale_init: Any = jax.nn.initializers.ones,
        bias_init: Any = jax.nn.initializers.zeros,
        scale_sharding: Names = None,
        bias_sharding: Names = None,
        rngs: Rngs | int | jax.Array | None = None,
    ) -> None:
        feature_axes = _as_axes(feature_axes)
        if num_spatial is not None:
            if num_spatial < 0:
                raise ValueError(f"InstanceNorm(num_spatial={num_spatial}): must be >= 0 or None.")
            if feature_axes != (-1,):
                raise ValueError(
                    SPATIAL_WITH_FEATURE_AXES.format(spatial=num_spatial, axes=feature_axes)
                )
        key = _init_keys(rngs, "InstanceNorm(rngs=...)")
        shape = (num_features,)
        param = functools.partial(_param, self, key, shape, param_dtype)
        self.scale = param("scale", use_scale, scale_init, scale_sharding)
        self.bias = param("bias", use_bias, bias_init, bias_sharding)
        self.num_features = num_features
        self.epsilon = epsilon
        self.feature_axes = feature_axes
        self.num_spatial = num_spatial
        self.use_fast_variance = use_fast_variance
        self.dtype = dtype

    def __call__(self, x: Real[ArrayLike, "*shape"]) -> Float[Array, "*shape"]:
        x = jnp.asarray(x)
        if self.num_spatial is None:
            if x.ndim < 2:
                raise ValueError(
                    INSTANCE_NEEDS_BATCH.format(
                        where=module_path(self), shape=x.shape, features=self.num_features
                    )
                )
            _check_feature_axes(self, x.shape, self.num_features, self.feature_axes)
            features = _canonical_axes(self, self.feature_axes, x.shape, "feature_axes")
            if 0 in features:
                raise ValueError(
                    FEATURES_ON_BATCH_AXIS.format(
                        where=module_path(self),
                        axes=self.feature_axes,
                        shape=x.shape,
                        features=self.num_features,
                    )
                )
            reduce = tuple(i for i in range(1, x.ndim) if i not in features)
        else:
            spatial = self.num_spatial
            check_features(self, x.shape, self.num_features, name="num_features", spatial=spatial)
            features = (x.ndim - 1,)
            reduce = tuple(range(x.ndim - 1 - spatial, x.ndim - 1))
        return _standardize(self, x, reduce, features)
