"""Convolutions: Conv and ConvTranspose over channels-last inputs, any leading batch axes.

Both layers take ``(*batch, *spatial, channels)`` inputs with as many spatial
axes as ``kernel_size`` has entries (an int ``kernel_size`` means one spatial
axis, as in Flax), and keep the kernel in Flax's layout
``(*kernel_size, in_features // feature_group_count, out_features)``, so
weights move between toylib and ``flax.nnx`` by a plain copy.

Padding is one of the strings ``"SAME"``, ``"VALID"`` (and ``"CIRCULAR"`` for
``Conv``), an int ``p`` (``p`` on both sides of every spatial axis), or one
entry per spatial axis, each an int or a ``(low, high)`` pair.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeGuard

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, ArrayLike, Float

from toylib._core.module import Module
from toylib._core.rngs import Rngs, as_rngs
from toylib.nn._sharding import Names, named_variable
from toylib.nn.checks import check_features
from toylib.nn.dtypes import promote_dtype
from toylib.nn.linear import default_kernel_init

__all__ = ["Conv", "ConvTranspose"]

# A padding after canonicalisation: a mode name, or one (low, high) pair per spatial axis.
Padding = str | tuple[tuple[int, int], ...]
PaddingLike = str | int | Sequence[int | tuple[int, int]]

BAD_KERNEL_SIZE = """\
{where}: kernel_size={value!r} must be a positive int (1-d) or a non-empty sequence
of positive ints, one per spatial axis.
Fix: e.g. kernel_size=3 for a 1-d conv, (3, 3) for 2-d images, (3, 3, 3) for volumes.
"""

BAD_SIZES = """\
{where}: {name}={value!r} must be a positive int or {n} positive ints (one per
spatial axis: {sizes} has {n}).
Fix: e.g. {name}={example}, or {name}=1 for none.
"""

BAD_PADDING = """\
{where}: padding={value!r} is not a padding for {n} spatial {axes}.
Fix: use one of {modes}, an int p (p zeros on both sides of every
spatial axis), or one entry per spatial axis, each an int or a (low, high) pair:

    padding={example}
"""

CIRCULAR_DILATED = """\
Conv(padding="CIRCULAR", input_dilation={input_dilation!r}): circular padding wraps
the input around, which has no meaning once zeros are put between its elements.
Fix: use input_dilation=1 with "CIRCULAR", or pad the input yourself first
(jnp.pad(x, ..., mode="wrap")) and use padding="VALID".
"""

BAD_GROUPS = """\
Conv(in_features={i}, out_features={o}, feature_group_count={g}): both feature counts
must be divisible by feature_group_count (each group maps in_features // {g} input
channels to out_features // {g} output channels).
Fix: pick a feature_group_count that divides both, e.g. a depthwise conv with a
channel multiplier m is Conv(C, C * m, kernel_size, feature_group_count=C).
"""

WRONG_MASK = """\
{cls}(..., mask=...): the mask multiplies the kernel, so it needs the kernel's shape
{kernel} ((*kernel_size, in_features{groups}, out_features)); got {shape}.
Fix: build the mask with the kernel's shape, e.g. a causal 1-d mask over 3 taps:

    mask = jnp.ones({kernel}).at[{last}:].set(0)
"""


def check_mask(cls: str, mask: Any, kernel_shape: tuple[int, ...], groups: str = "") -> Any:
    """``mask`` as an array of the kernel's shape (None passes through), or one clear error."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.shape != kernel_shape:
        raise ValueError(
            WRONG_MASK.format(
                cls=cls,
                kernel=kernel_shape,
                groups=groups,
                shape=mask.shape,
                last=kernel_shape[0] // 2 + 1,
            )
        )
    return mask


def is_int(v: Any) -> TypeGuard[int]:  # (or a numpy integer: one in practice)
    """A Python or numpy integer, not a bool."""
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def per_axis(
    value: int | Sequence[int],
    n: int,
    name: str,
    where: str,
    sizes: tuple[int, ...],
    sizes_name: str = "kernel_size",
) -> tuple[int, ...]:
    """``value`` as ``n`` positive ints: an int is repeated, a sequence must have length ``n``.

    ``sizes`` (named ``sizes_name``) is what fixed ``n``; the error quotes it.
    """
    values = (value,) * n if is_int(value) else value
    if (
        isinstance(values, Sequence)
        and len(values) == n
        and all(is_int(v) and v > 0 for v in values)
    ):
        return tuple(int(v) for v in values)
    example = (2,) * n if n > 1 else 2
    raise ValueError(
        BAD_SIZES.format(
            where=where,
            name=name,
            value=value,
            n=n,
            sizes=f"{sizes_name}={sizes!r}",
            example=example,
        )
    )


def canonical_padding(
    padding: PaddingLike, n: int, where: str, modes: tuple[str, ...] = ("SAME", "VALID")
) -> Padding:
    """A mode name (upper case, one of ``modes``) or ``n`` ``(low, high)`` int pairs.

    The result is hashable, so a layer can keep it as a static attribute.
    """
    if isinstance(padding, str) and padding.upper() in modes:
        return padding.upper()
    if is_int(padding):
        return ((int(padding), int(padding)),) * n
    if isinstance(padding, Sequence) and not isinstance(padding, str) and len(padding) == n:
        pairs = []
        for p in padding:
            if is_int(p):
                pairs.append((int(p), int(p)))
            elif isinstance(p, Sequence) and len(p) == 2 and all(is_int(v) for v in p):
                pairs.append((int(p[0]), int(p[1])))
        if len(pairs) == n:
            return tuple(pairs)
    example = tuple((1, 1) for _ in range(n))
    raise ValueError(
        BAD_PADDING.format(
            where=where,
            value=padding,
            n=n,
            axes="axis" if n == 1 else "axes",
            modes=", ".join(map(repr, modes)),
            example=example,
        )
    )


def canonical_kernel_size(kernel_size: int | Sequence[int], where: str) -> tuple[int, ...]:
    """``kernel_size`` as a tuple: an int means one spatial axis (Flax's convention)."""
    if is_int(kernel_size):
        kernel_size = (kernel_size,)
    if (
        isinstance(kernel_size, Sequence)
        and len(kernel_size) > 0
        and all(is_int(k) and k > 0 for k in kernel_size)
    ):
        return tuple(int(k) for k in kernel_size)
    raise ValueError(BAD_KERNEL_SIZE.format(where=where, value=kernel_size))


def dimension_numbers(n: int) -> lax.ConvDimensionNumbers:
    """lax's axis roles for a ``(batch, *spatial, in)`` input and ``(*spatial, in, out)`` kernel."""
    channels_last = (0, n + 1, *range(1, n + 1))  # (batch, feature, *spatial) positions
    kernel = (n + 1, n, *range(n))  # (out, in, *spatial) positions
    return lax.ConvDimensionNumbers(channels_last, kernel, channels_last)


class Conv(Module):
    """An n-d convolution of channels-last inputs (a cross-correlation: the kernel is not flipped).

    Output size per spatial axis, for an input of size ``n`` (``n' = (n - 1) *
    input_dilation + 1`` once dilated), a kernel ``k`` (``k' = (k - 1) *
    kernel_dilation + 1`` once dilated) and stride ``s``:

    - ``"SAME"``: ``ceil(n' / s)``; zeros are added, the extra one (if odd) at the end.
    - ``"VALID"``: ``ceil((n' - k' + 1) / s)``, no padding.
    - ``(low, high)``: ``floor((n' + low + high - k') / s) + 1``.
    - ``"CIRCULAR"``: ``ceil(n / s)`` like ``"SAME"``, but the input wraps around:
      ``(k' - 1) // 2`` elements before and ``k' // 2`` after come from the other end.

    Arguments:
        in_features: number of input channels (the last axis).
        out_features: number of output channels.
        kernel_size: an int (one spatial axis) or one size per spatial axis.
        strides: an int or one stride per spatial axis (default 1).
        padding: ``"SAME"`` (default), ``"VALID"``, ``"CIRCULAR"`` (not with
            ``input_dilation``), an int, or one int / ``(low, high)`` pair per spatial axis.
        input_dilation: an int or per-axis ints: ``input_dilation - 1`` zeros
            are put between input elements (a fractionally-strided conv).
        kernel_dilation: an int or per-axis ints: the kernel taps are this far
            apart (atrous convolution).
        feature_group_count: split the channels into this many groups, each
            convolved on its own; ``in_features`` gives a depthwise conv. Must
            divide both ``in_features`` and ``out_features``.
        use_bias: add a bias (default True).
        mask: an array of the kernel's shape that multiplies the kernel on
            every call (a masked convolution: zeros cut taps, e.g. causal or
            PixelCNN masks); kept as a plain array, not trained. Default None.
        dtype: compute dtype (default: promote input and parameters).
        param_dtype: dtype the parameters are stored in (default float32).
        precision: ``jax.lax`` precision of the convolution (default None).
        kernel_init: initialiser of the kernel (default LeCun normal; fan-in is
            ``prod(kernel_size) * in_features // feature_group_count``).
        bias_init: initialiser of the bias (default zeros).
        kernel_sharding: logical axis names of the kernel, one per dimension
            (a str, or None: not sharded), e.g. ``(None, None, "in", "out")``
            for a 2-d kernel ``(h, w, in, out)``; stored as its ``sharding``
            metadata for ``tl.sharding``. Default None: no names (replicated).
        bias_sharding: the ``(out_features,)`` bias's names (default None).
        rngs: ``tl.Rngs``, an int seed or a key; the ``params`` stream is used.

    Returns:
        A Module with ``kernel`` ``(*kernel_size, in_features //
        feature_group_count, out_features)`` and ``bias`` ``(out_features,)``
        Params, called on ``(*batch, *spatial, in_features)`` arrays (any number
        of batch axes, including none), giving ``(*batch, *spatial_out,
        out_features)``.

    Example:
        >>> import jax.numpy as jnp
        >>> from toylib import nn
        >>> conv = nn.Conv(16, 32, (3, 3), rngs=0)
        >>> conv.kernel.value.shape
        (3, 3, 16, 32)
        >>> conv(jnp.ones((2, 10, 10, 16))).shape
        (2, 10, 10, 32)
        >>> conv.strides, conv.padding = (2, 2), "VALID"
        >>> conv(jnp.ones((10, 10, 16))).shape
        (4, 4, 32)
        >>> named = nn.Conv(16, 32, (3, 3), kernel_sharding=(None, None, None, "mlp"), rngs=0)
        >>> named.kernel.sharding
        (None, None, None, 'mlp')
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int],
        strides: int | Sequence[int] = 1,
        *,
        padding: PaddingLike = "SAME",
        input_dilation: int | Sequence[int] = 1,
        kernel_dilation: int | Sequence[int] = 1,
        feature_group_count: int = 1,
        use_bias: bool = True,
        mask: ArrayLike | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Any = default_kernel_init,
        bias_init: Any = jax.nn.initializers.zeros,
        kernel_sharding: Names = None,
        bias_sharding: Names = None,
        rngs: Rngs | int | jax.Array,
    ) -> None:
        where = "Conv(...)"
        kernel_size = canonical_kernel_size(kernel_size, where)
        n = len(kernel_size)
        groups = feature_group_count
        if not is_int(groups) or groups < 1 or in_features % groups or out_features % groups:
            raise ValueError(BAD_GROUPS.format(i=in_features, o=out_features, g=groups))
        self.strides = per_axis(strides, n, "strides", where, kernel_size)
        self.input_dilation = per_axis(input_dilation, n, "input_dilation", where, kernel_size)
        self.kernel_dilation = per_axis(kernel_dilation, n, "kernel_dilation", where, kernel_size)
        self.padding = canonical_padding(padding, n, where, ("SAME", "VALID", "CIRCULAR"))
        if self.padding == "CIRCULAR" and self.input_dilation != (1,) * n:
            raise ValueError(CIRCULAR_DILATED.format(input_dilation=input_dilation))
        rngs = as_rngs(rngs, "Conv(rngs=...)")
        shape = (*kernel_size, in_features // groups, out_features)
        self.mask = check_mask("Conv", mask, shape, f" // {groups}" if groups > 1 else "")
        kernel = kernel_init(rngs.params(), shape, param_dtype)
        self.kernel = named_variable(self, "kernel", kernel, kernel_sharding)
        self.bias = (
            named_variable(
                self, "bias", bias_init(rngs.params(), (out_features,), param_dtype), bias_sharding
            )
            if use_bias
            else None
        )
        self.in_features = in_features
        self.out_features = out_features
        self.kernel_size = kernel_size
        self.feature_group_count = groups
        self.dtype = dtype
        self.precision = precision

    def __call__(
        self, x: Float[ArrayLike, "*batch_spatial in"]
    ) -> Float[Array, "*batch_spatial_out out"]:
        x = jnp.asarray(x)
        n = len(self.kernel_size)
        check_features(self, x.shape, self.in_features, spatial=n)
        # lax wants exactly one batch axis: fold all of them (or none) into one.
        batch = x.shape[: x.ndim - n - 1]
        x = x.reshape((math.prod(batch), *x.shape[len(batch) :]))
        padding = self.padding
        if padding == "CIRCULAR":
            dilated = [
                (k - 1) * d + 1 for k, d in zip(self.kernel_size, self.kernel_dilation, strict=True)
            ]
            pads = [(0, 0), *[((k - 1) // 2, k // 2) for k in dilated], (0, 0)]
            x = jnp.pad(x, pads, mode="wrap")
            padding = "VALID"
        elif isinstance(padding, str) and self.input_dilation != (1,) * n:
            # lax takes "SAME"/"VALID" only without input dilation: size them on
            # the dilated input ourselves.
            dilated = [
                (s - 1) * d + 1 for s, d in zip(x.shape[1:-1], self.input_dilation, strict=True)
            ]
            taps = [
                (k - 1) * d + 1 for k, d in zip(self.kernel_size, self.kernel_dilation, strict=True)
            ]
            padding = tuple(lax.padtype_to_pads(dilated, taps, self.strides, padding))
        bias = None if self.bias is None else self.bias.value
        x, kernel, bias = promote_dtype(x, self.kernel.value, bias, dtype=self.dtype)
        if self.mask is not None:
            kernel = kernel * self.mask.astype(kernel.dtype)
        y = lax.conv_general_dilated(
            x,
            kernel,
            window_strides=self.strides,
            padding=padding,
            lhs_dilation=self.input_dilation,
            rhs_dilation=self.kernel_dilation,
            dimension_numbers=dimension_numbers(n),
            feature_group_count=self.feature_group_count,
            precision=self.precision,
        )
        if bias is not None:
            y = y + bias
        return y.reshape((*batch, *y.shape[1:]))


class ConvTranspose(Module):
    """A transposed ("fractionally strided") convolution, as ``flax.nnx.ConvTranspose`` computes it.

    It is ``jax.lax.conv_transpose`` (with ``transpose_kernel=False``): the
    input gets ``stride - 1`` zeros between its elements, is padded, and is
    cross-correlated with the kernel as stored (not flipped), stride 1. So
    with ``"VALID"`` padding input element ``i`` adds ``x[i] @ kernel[t]`` to
    output ``i * stride + (k - 1 - t) * kernel_dilation`` (taps reversed); the
    other paddings crop or extend that result. The kernel layout is
    ``(*kernel_size, in_features, out_features)``, as in ``nnx.ConvTranspose``,
    so its weights copy over unchanged. With the spatial axes of a ``Conv``'s
    kernel flipped and its channel axes swapped, it computes that ``Conv``'s
    input gradient when the sizes line up: the same ``"SAME"`` padding if
    the stride divides the Conv's input size; the same ``"VALID"``, or pads
    ``(k' - 1 - low, k' - 1 - high)`` for the Conv's ``(low, high)``, if the
    stride divides the Conv's padded input size minus ``k'``.

    Output size per spatial axis, for an input of size ``n``, stride ``s``
    and a dilated kernel ``k' = (k - 1) * kernel_dilation + 1``:

    - ``"SAME"``: ``n * s``.
    - ``"VALID"``: ``n * s + max(k' - s, 0)`` (every scattered tap kept).
    - ``(low, high)``: ``(n - 1) * s + low + high - k' + 2``. These pads
      apply to the zero-interleaved input, unlike PyTorch's ``padding``: to
      undo the size change of a ``Conv`` with padding ``p``, pass
      ``k' - 1 - p`` here (PyTorch's ``padding=p`` is ``(k' - 1 - p, k' - 1 - p)``).

    Arguments:
        in_features: number of input channels (the last axis).
        out_features: number of output channels.
        kernel_size: an int (one spatial axis) or one size per spatial axis.
        strides: an int or one stride per spatial axis (default 1): the
            upsampling factor.
        padding: ``"SAME"`` (default), ``"VALID"``, an int, or one int /
            ``(low, high)`` pair per spatial axis.
        kernel_dilation: an int or per-axis ints: the kernel taps are this far apart.
        use_bias: add a bias (default True).
        mask: an array of the kernel's shape that multiplies the kernel on
            every call (default None), as in ``Conv``.
        dtype: compute dtype (default: promote input and parameters).
        param_dtype: dtype the parameters are stored in (default float32).
        precision: ``jax.lax`` precision of the convolution (default None).
        kernel_init: initialiser of the kernel (default LeCun normal).
        bias_init: initialiser of the bias (default zeros).
        kernel_sharding: logical axis names of the kernel, one per dimension
            (a str, or None: not sharded), e.g. ``(None, None, "in", "out")``
            for a 2-d kernel ``(h, w, in, out)``; stored as its ``sharding``
            metadata for ``tl.sharding``. Default None: no names (replicated).
        bias_sharding: the ``(out_features,)`` bias's names (default None).
        rngs: ``tl.Rngs``, an int seed or a key; the ``params`` stream is used.

    Returns:
        A Module with ``kernel`` ``(*kernel_size, in_features, out_features)``
        and ``bias`` ``(out_features,)`` Params, called on ``(*batch, *spatial,
        in_features)`` arrays (any number of batch axes, including none), giving
        ``(*batch, *spatial_out, out_features)``.

    Example:
        >>> import jax.numpy as jnp
        >>> from toylib import nn
        >>> up = nn.ConvTranspose(16, 32, (3, 3), strides=2, rngs=0)
        >>> up(jnp.ones((1, 8, 8, 16))).shape
        (1, 16, 16, 32)
        >>> up.padding = "VALID"  # 8 * 2 + (3 - 2)
        >>> up(jnp.ones((8, 8, 16))).shape
        (17, 17, 32)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int],
        strides: int | Sequence[int] = 1,
        *,
        padding: PaddingLike = "SAME",
        kernel_dilation: int | Sequence[int] = 1,
        use_bias: bool = True,
        mask: ArrayLike | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Any = default_kernel_init,
        bias_init: Any = jax.nn.initializers.zeros,
        kernel_sharding: Names = None,
        bias_sharding: Names = None,
        rngs: Rngs | int | jax.Array,
    ) -> None:
        where = "ConvTranspose(...)"
        kernel_size = canonical_kernel_size(kernel_size, where)
        n = len(kernel_size)
        self.strides = per_axis(strides, n, "strides", where, kernel_size)
        self.kernel_dilation = per_axis(kernel_dilation, n, "kernel_dilation", where, kernel_size)
        self.padding = canonical_padding(padding, n, where)
        rngs = as_rngs(rngs, "ConvTranspose(rngs=...)")
        shape = (*kernel_size, in_features, out_features)
        self.mask = check_mask("ConvTranspose", mask, shape)
        kernel = kernel_init(rngs.params(), shape, param_dtype)
        self.kernel = named_variable(self, "kernel", kernel, kernel_sharding)
        self.bias = (
            named_variable(
                self, "bias", bias_init(rngs.params(), (out_features,), param_dtype), bias_sharding
            )
            if use_bias
            else None
        )
        self.in_features = in_features
        self.out_features = out_features
        self.kernel_size = kernel_size
        self.dtype = dtype
        self.precision = precision

    def __call__(
        self, x: Float[ArrayLike, "*batch_spatial in"]
    ) -> Float[Array, "*batch_spatial_out out"]:
        x = jnp.asarray(x)
        n = len(self.kernel_size)
        check_features(self, x.shape, self.in_features, spatial=n)
        batch = x.shape[: x.ndim - n - 1]
        x = x.reshape((math.prod(batch), *x.shape[len(batch) :]))
        bias = None if self.bias is None else self.bias.value
        x, kernel, bias = promote_dtype(x, self.kernel.value, bias, dtype=self.dtype)
        if self.mask is not None:
            kernel = kernel * self.mask.astype(kernel.dtype)
        y = lax.conv_transpose(
            x,
            kernel,
            strides=self.strides,
            padding=self.padding,
            rhs_dilation=self.kernel_dilation,
            dimension_numbers=dimension_numbers(n),
            precision=self.precision,
        )
        if bias is not None:
            y = y + bias
        return y.reshape((*batch, *y.shape[1:]))
