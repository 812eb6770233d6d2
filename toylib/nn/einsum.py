"""Einsum (an einsum equation with a learned kernel) and LinearGeneral (dense over several axes).

``LinearGeneral`` contracts any axes of the input with a kernel of shape
``(*batch_sizes, *in_features, *out_features)``; ``ProjectHeads`` and
``MergeHeads`` are the two attention projections built on it, kernels
``(in, heads, head_dim)`` and ``(heads, head_dim, out)``. ``Einsum`` takes the
contraction as an equation, ``"...d,dhk->...hk"``, for any other layout. The
layouts and the arithmetic are Flax's (``nnx.Einsum``, ``nnx.LinearGeneral``),
so weights copy one to one from ``flax.nnx``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, ArrayLike, Float

from toylib._core.calls import module_path
from toylib._core.module import Module
from toylib._core.rngs import Rngs, as_rngs
from toylib.nn._sharding import Names, named_variable
from toylib.nn.dtypes import as_array, promote_dtype
from toylib.nn.linear import default_kernel_init

__all__ = ["Einsum", "LinearGeneral", "MergeHeads", "ProjectHeads"]

# `precision=` as jax.lax takes it: None, a lax.Precision, a string such as
# "highest", or a pair of them (one per operand).
PrecisionLike = Any

BAD_EQUATION = """\
{where}: einsum_str={equation!r} is not an equation this layer can use: {why}.
Fix: write one input, a comma, the kernel, '->' and the output, each axis one letter,
'...' for any batch axes of the input, e.g.

    nn.Einsum("...d,dhk->...hk", (d, h, k), (h, k), rngs=rngs)
"""

WRONG_KERNEL_RANK = """\
{where}: einsum_str={equation!r} gives the kernel {rank} axes ({spec!r}),
but kernel_shape={shape} has {n}.
Fix: give one kernel size per letter after the comma, or change the equation.
"""

WRONG_BIAS_SHAPE = """\
{where}: bias_shape={bias_shape} does not fit einsum_str={equation!r}: the bias is added to
the output's kernel axes {letters!r}, which have sizes {expected}.
Fix: bias_shape={expected}, or bias_shape=None for no bias.
"""

WRONG_EINSUM_INPUT = """\
{where}: expected an input matching {spec!r} of einsum_str={equation!r} ({expected}), got {shape}.
Fix: {fix}
"""

MISMATCHED_AXES = """\
LinearGeneral(in_features={in_features}, axis={axis}): one input axis is needed per entry of
in_features, got {n_in} sizes and {n_axis} axes.
Fix: give as many axes as sizes, e.g. nn.LinearGeneral((4, 5), 8, axis=(-2, -1), rngs=rngs).
"""

BAD_BATCH_AXIS = """\
LinearGeneral(batch_axis={batch_axis}): batch axes must be the leading axes 0, 1, ..., each
mapped to its size.
Fix: e.g. batch_axis={{0: 3}} for a kernel per entry of the input's first axis.
"""

WRONG_GENERAL_INPUT = """\
{where}: expected input axes {axes} of sizes {expected}, got shape {shape}.
Fix: {fix}
"""


def _as_tuple(value: int | Sequence[int]) -> tuple[int, ...]:
    return tuple(int(v) for v in value) if isinstance(value, Sequence) else (int(value),)


def _parse(equation: str, where: str) -> tuple[str, str, str]:
    """``(input, kernel, output)`` specs of an explicit two-operand equation, spaces removed."""
    equation = equation.replace(" ", "")
    if "->" not in equation:
        why = "it has no '->' (the output must be spelled out)"
    elif equation.count(",") != 1:
        why = f"it has {equation.count(',') + 1} operands, not two (input, kernel)"
    else:
        operands, output = equation.split("->")
        lhs, kernel = operands.split(",")
        if "." in kernel:
            why = "the kernel has a fixed shape, so it cannot take '...'"
        elif not all(c.isalpha() for c in (lhs + output).replace("...", "") + kernel):
            why = "axes must be single letters"
        else:
            return lhs, kernel, output
    raise ValueError(BAD_EQUATION.format(where=where, equation=equation, why=why))


def _bias_axes(kernel_spec: str, output_spec: str, kernel_shape: tuple[int, ...]) -> tuple:
    """The output letters that come from the kernel, and their sizes: the bias's shape."""
    letters = "".join(c for c in output_spec if c in kernel_spec)
    return letters, tuple(kernel_shape[kernel_spec.index(c)] for c in letters)


class Einsum(Module):
    """A learned contraction given as an einsum equation: ``einsum(eq, x, kernel) + bias``.

    The equation has two operands, the input and the kernel, and an explicit
    output: ``"btd,dhk->bthk"``. The input may use ``...`` for any number of
    batch axes (``"...d,dhk->...hk"``); the kernel's axes are fixed by
    ``kernel_shape``. The bias (if ``bias_shape`` is given) is added along the
    output axes that come from the kernel, so its shape is their sizes in
    output order (``(h, k)`` above). Weights copy one to one from
    ``flax.nnx.Einsum``.

    Arguments:
        einsum_str: the equation ``"<input>,<kernel>-><output>"``; may be left
            to the call instead (``layer(x, einsum_str)``).
        kernel_shape: the kernel's shape, one size per kernel letter.
        bias_shape: the bias's shape, or None (default) for no bias.
        dtype: compute dtype (default: promote input and parameters).
        param_dtype: dtype the parameters are stored in (default float32).
        precision: ``jax.lax`` precision of the contraction (default None: the
            backend's default; ``"highest"`` for full float32 on TPU/GPU).
        kernel_init: initialiser of the kernel (default LeCun normal; fan-in
            and fan-out are read from ``kernel_shape``'s last two axes, as
            ``jax.nn.initializers`` do).
        bias_init: initialiser of the bias (default zeros).
        kernel_sharding: logical axis names of the kernel, one per kernel
            letter (a str, or None: not sharded), e.g. ``("embed", "heads",
            "kv")`` for ``"...d,dhk->...hk"``; stored as its ``sharding``
            metadata for ``tl.sharding``. Default None: no names (replicated).
        bias_sharding: the bias's names, one per ``bias_shape`` entry
            (default None).
        rngs: ``tl.Rngs``, an int seed or a key; the ``params`` stream is used.

    Returns:
        A Module with ``kernel`` (and ``bias``) ``Param``s, called as
        ``layer(x, einsum_str=None)``.

    Example:
        >>> import jax.numpy as jnp
        >>> from toylib import nn
        >>> layer = nn.Einsum("...d,dhk->...hk", (6, 2, 3), (2, 3), rngs=0)
        >>> layer(jnp.ones((4, 5, 6))).shape, layer.bias.shape
        ((4, 5, 2, 3), (2, 3))
        >>> named = nn.Einsum("...d,dhk->...hk", (6, 2, 3), (2, 3), rngs=0,
        ...                   kernel_sharding=("embed", "heads", "kv"),
        ...                   bias_sharding=("heads", "kv"))
        >>> named.kernel.sharding, named.bias.sharding
        (('embed', 'heads', 'kv'), ('heads', 'kv'))
    """

    def __init__(
        self,
        einsum_str: str | None,
        kernel_shape: Sequence[int],
        bias_shape: Sequence[int] | None = None,
        *,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: PrecisionLike = None,
        kernel_init: Any = default_kernel_init,
        bias_init: Any = jax.nn.initializers.zeros,
        kernel_sharding: Names = None,
        bias_sharding: Names = None,
        rngs: Rngs | int | jax.Array,
    ) -> None:
        kernel_shape = _as_tuple(kernel_shape)
        bias_shape = None if bias_shape is None else _as_tuple(bias_shape)
        if einsum_str is not None:
            einsum_str = einsum_str.replace(" ", "")
            self._check_equation(einsum_str, kernel_shape, bias_shape, "Einsum(...)")
        rngs = as_rngs(rngs, "Einsum(rngs=...)")
        kernel = kernel_init(rngs.params(), kernel_shape, param_dtype)
        self.kernel = named_variable(self, "kernel", kernel, kernel_sharding)
        self.bias = (
            None
            if bias_shape is None
            else named_variable(
                self, "bias", bias_init(rngs.params(), bias_shape, param_dtype), bias_sharding
            )
        )
        self.einsum_str = einsum_str
        self.kernel_shape = kernel_shape
        self.bias_shape = bias_shape
        self.dtype = dtype
        self.precision = precision

    @staticmethod
    def _check_equation(
        equation: str,
        kernel_shape: tuple[int, ...],
        bias_shape: tuple[int, ...] | None,
        where: str,
    ) -> tuple[str, str, str]:
        lhs, kernel_spec, output = _parse(equation, where)
        if len(kernel_spec) != len(kernel_shape):
            raise ValueError(
                WRONG_KERNEL_RANK.format(
                    where=where,
                    equation=equation,
                    rank=len(kernel_spec),
                    spec=kernel_spec,
                    shape=kernel_shape,
                    n=len(kernel_shape),
                )
            )
        letters, expected = _bias_axes(kernel_spec, output, kernel_shape)
        if bias_shape is not None and bias_shape != expected:
            raise ValueError(
                WRONG_BIAS_SHAPE.format(
                    where=where,
                    bias_shape=bias_shape,
                    equation=equation,
                    letters=letters,
                    expected=expected,
                )
            )
        return lhs, kernel_spec, output

    def __call__(self, x: Float[ArrayLike, "*shape"], einsum_str: str | None = None) -> Array:
        x = as_array(x)
        where = module_path(self)
        equation = einsum_str if einsum_str is not None else self.einsum_str
        if equation is None:
            raise ValueError(
                BAD_EQUATION.format(
                    where=where, equation=None, why="none was given to the constructor or the call"
                )
            )
        equation = equation.replace(" ", "")
        lhs, kernel_spec, output = self._check_equation(
            equation, self.kernel_shape, self.bias_shape, where
        )
        self._check_input(x.shape, lhs, kernel_spec, equation, where)
        bias = None if self.bias is None else self.bias.value
        x, kernel, bias = promote_dtype(x, self.kernel.value, bias, dtype=self.dtype)
        y = jnp.einsum(equation, x, kernel, precision=self.precision)
        if bias is None:
            return y
        # The bias spans the output's kernel axes; every other axis (batch,
        # the input's free axes, `...`) broadcasts.
        size = lambda c: self.kernel_shape[kernel_spec.index(c)] if c in kernel_spec else 1  # noqa: E731
        head, *tail = output.split("...")
        shape = [size(c) for c in head]
        if tail:
            shape += [1] * (y.ndim - len(output) + 3) + [size(c) for c in tail[0]]
        return y + bias.reshape(shape)

    def _check_input(
        self, shape: tuple[int, ...], lhs: str, kernel_spec: str, equation: str, where: str
    ) -> None:
        named = lhs.replace("...", "")
        sizes = {c: self.kernel_shape[kernel_spec.index(c)] for c in named if c in kernel_spec}
        expected = ", ".join(f"{c}={sizes.get(c, '?')}" for c in named)
        if "..." in lhs:
            ok = len(shape) >= len(named)
            head = lhs.index("...")
            positions = list(range(head)) + list(
                range(len(shape) - (len(named) - head), len(shape))
            )
        else:
            ok = len(shape) == len(named)
            positions = list(range(len(named)))
        if ok:
            mismatch = [
                (c, shape[p])
                for c, p in zip(named, positions, strict=True)
                if sizes.get(c, shape[p]) != shape[p]
            ]
            if not mismatch:
                return
            c, got = mismatch[0]
            fix = (
                f"axis {c!r} of the input is contracted with the kernel's, of size {sizes[c]}; "
                f"feed {sizes[c]} there, or build the layer with that kernel axis {got}."
            )
        else:
            fix = (
                f"the input needs {'at least ' if '...' in lhs else ''}{len(named)} axes "
                f"({lhs!r}); use '...' in the equation for any number of batch axes."
            )
        raise ValueError(
            WRONG_EINSUM_INPUT.format(
                where=where, spec=lhs, equation=equation, expected=expected, shape=shape, fix=fix
            )
        )


class LinearGeneral(Module):
    """A dense layer over several input axes, giving several output axes.

    The input's ``axis`` axes (sizes ``in_features``) are contracted with a
    kernel ``(*batch_sizes, *in_features, *out_features)``; the output is the
    input's other axes followed by ``out_features``. ``LinearGeneral(n, m)``
    is ``Linear(n, m)``; ``LinearGeneral(n, (h, d))`` projects onto heads;
    ``LinearGeneral((h, d), m, axis=(-2, -1))`` merges them. With
    ``batch_axis={0: b}`` each entry of the input's first axis gets its own
    kernel (the kernel gains a leading axis of size ``b``, and the batch axes
    come first in the output).

    ``kernel_init`` and ``bias_init`` see the equivalent dense shapes,
    ``(prod(batch) * prod(in_features), prod(out_features))`` and
    ``(prod(batch) * prod(out_features),)``, and their results are reshaped:
    fan-in based initialisers then see all the contracted inputs, and the
    weights drawn equal ``nnx.LinearGeneral``'s for the same key.

    Arguments:
        in_features: the size of each contracted input axis (an int or a tuple).
        out_features: the size of each output feature axis (an int or a tuple).
        axis: the contracted input axes, one per entry of ``in_features``
            (default -1).
        batch_axis: a mapping ``{axis: size}`` of leading input axes that get a
            kernel each (default none).
        use_bias: add a bias of shape ``(*batch_sizes, *out_features)`` (default True).
        dtype: compute dtype (default: promote input and parameters).
        param_dtype: dtype the parameters are stored in (default float32).
        precision: ``jax.lax`` precision of the contraction (default None).
        kernel_init: initialiser of the kernel (default LeCun normal).
        bias_init: initialiser of the bias (default zeros).
        kernel_sharding: logical axis names of the ``(*batch_sizes,
            *in_features, *out_features)`` kernel, one per dimension (a str,
            or None: not sharded); stored as its ``sharding`` metadata for
            ``tl.sharding``. Default None: no names (replicated).
        bias_sharding: the ``(*batch_sizes, *out_features)`` bias's names
            (default None).
        rngs: ``tl.Rngs``, an int seed or a key; the ``params`` stream is used.

    Returns:
        A Module with ``kernel`` (and ``bias``) ``Param``s.

    Example:
        >>> import jax.numpy as jnp
        >>> from toylib import nn
        >>> layer = nn.LinearGeneral((2, 3), (4, 5), axis=(1, -1), rngs=0)
        >>> layer.kernel.shape, layer(jnp.ones((16, 2, 3))).shape
        ((2, 3, 4, 5), (16, 4, 5))
    """

    def __init__(
        self,
        in_features: int | Sequence[int],
        out_features: int | Sequence[int],
        *,
        axis: int | Sequence[int] = -1,
        batch_axis: Mapping[int, int] | None = None,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: PrecisionLike = None,
        kernel_init: Any = default_kernel_init,
        bias_init: Any = jax.nn.initializers.zeros,
        kernel_sharding: Names = None,
        bias_sharding: Names = None,
        rngs: Rngs | int | jax.Array,
    ) -> None:
        in_features, out_features, axis = (
            _as_tuple(in_features),
            _as_tuple(out_features),
            _as_tuple(axis),
        )
        if len(in_features) != len(axis):
            raise ValueError(
                MISMATCHED_AXES.format(
                    in_features=in_features, axis=axis, n_in=len(in_features), n_axis=len(axis)
                )
            )
        # A tuple of (axis, size) pairs: hashable, so a static attribute.
        batch = tuple(sorted((int(a), int(n)) for a, n in dict(batch_axis or {}).items()))
        if [a for a, _ in batch] != list(range(len(batch))):
            raise ValueError(BAD_BATCH_AXIS.format(batch_axis=dict(batch_axis or {})))
        batch_sizes = tuple(n for _, n in batch)
        rngs = as_rngs(rngs, f"{type(self).__name__}(rngs=...)")
        dense = (math.prod(batch_sizes) * math.prod(in_features), math.prod(out_features))
        kernel = kernel_init(rngs.params(), dense, param_dtype)
        kernel = jnp.reshape(kernel, (*batch_sizes, *in_features, *out_features))
        self.kernel = named_variable(self, "kernel", kernel, kernel_sharding)
        bias_shape = (*batch_sizes, *out_features)
        self.bias = (
            named_variable(
                self,
                "bias",
                jnp.reshape(
                    bias_init(rngs.params(), (math.prod(bias_shape),), param_dtype), bias_shape
                ),
                bias_sharding,
            )
            if use_bias
            else None
        )
        self.in_features = in_features
        self.out_features = out_features
        self.axis = axis
        self.batch_axis = batch
        self.dtype = dtype
        self.precision = precision

    def __call__(self, x: Float[ArrayLike, "*shape"]) -> Array:
        x = as_array(x)
        ndim = x.ndim
        self._check_input(x.shape)
        axis = tuple(a % ndim for a in self.axis)
        batch_axes = tuple(a for a, _ in self.batch_axis)
        n_batch = len(batch_axes)
        bias = None if self.bias is None else self.bias.value
        x, kernel, bias = promote_dtype(x, self.kernel.value, bias, dtype=self.dtype)
        contract = tuple(range(n_batch, n_batch + len(axis)))
        y = lax.dot_general(
            x,
            kernel,
            ((axis, contract), (batch_axes, tuple(range(n_batch)))),
            precision=self.precision,
        )
        if bias is None:
            return y
        # dot_general puts the batch axes first, then the input's free axes,
        # then the output features: the bias varies along the first and last.
        free = [i for i in range(ndim) if i not in axis and i not in batch_axes]
        shape = (*bias.shape[:n_batch], *([1] * len(free)), *self.out_features)
        return y + bias.reshape(shape)

    def _check_input(self, shape: tuple[int, ...]) -> None:
        ndim = len(shape)
        axes = self.axis + tuple(a for a, _ in self.batch_axis)
        expected = self.in_features + tuple(n for _, n in self.batch_axis)
        in_range = all(-ndim <= a < ndim for a in axes)
        if in_range and len({a % ndim for a in axes}) == len(axes):
            got = tuple(shape[a] for a in axes)
            if got == expected:
                return
            fix = (
                f"feed sizes {expected} on axes {axes} (in_features={self.in_features}), "
                f"or build the layer with in_features={got[: len(self.axis)]}."
            )
        else:
            fix = (
                f"give an input with axes {axes} (at least {max(-min(axes), max(axes) + 1)} axes)."
            )
        raise ValueError(
            WRONG_GENERAL_INPUT.format(
                where=module_path(self), axes=axes, expected=expected, shape=shape, fix=fix
            )
        )


class ProjectHeads(LinearGeneral):
    """A dense layer onto heads: ``(*batch, in) -> (*batch, heads, head_dim)``.

    ``LinearGeneral(in_features, (num_heads, head_dim))``: the kernel is
    ``(in_features, num_heads, head_dim)`` (Flax's attention layout), so each
    head's slice can be sharded or inspected on its own; ``kernel_init`` sees
    the dense shape ``(in_features, num_heads * head_dim)``.

    Arguments:
        in_features: size of the input's last axis.
        num_heads, head_dim: the output's two last axes.
        use_bias, dtype, param_dtype, precision, kernel_init, bias_init, rngs:
            as in ``nn.LinearGeneral``.
        kernel_sharding: the ``(heads, head_dim, out)`` kernel's logical axis
            names, e.g. ``("heads", "kv", "embed")`` (default None: no names).
        bias_sharding: the ``(out,)`` bias's, e.g. ``("embed",)`` (default None).
        kernel_sharding: the ``(in, heads, head_dim)`` kernel's logical axis
            names, e.g. ``("embed", "heads", "kv")`` (default None: no names).
        bias_sharding: the ``(heads, head_dim)`` bias's, e.g. ``("heads",
            "kv")`` (default None).

    Example:
        >>> import jax.numpy as jnp
        >>> from toylib import nn
        >>> nn.ProjectHeads(5, 2, 3, rngs=0)(jnp.ones((4, 5))).shape
        (4, 2, 3)
    """

    def __init__(
        self,
        in_features: int,
        num_heads: int,
        head_dim: int,
        *,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: PrecisionLike = None,
        kernel_init: Any = default_kernel_init,
        bias_init: Any = jax.nn.initializers.zeros,
        kernel_sharding: Names = None,
        bias_sharding: Names = None,
        rngs: Rngs | int | jax.Array,
    ) -> None:
        super().__init__(
            in_features,
            (num_heads, head_dim),
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
            kernel_init=kernel_init,
            bias_init=bias_init,
            kernel_sharding=kernel_sharding,
            bias_sharding=bias_sharding,
            rngs=rngs,
        )
        self.num_heads = num_heads
        self.head_dim = head_dim


class MergeHeads(LinearGeneral):
    """A dense layer from heads: ``(*batch, heads, head_dim) -> (*batch, out)``.

    ``LinearGeneral((num_heads, head_dim), out_features, axis=(-2, -1))``:
    the kernel is ``(num_heads, head_dim, out_features)``; ``kernel_init``
    sees the dense shape ``(num_heads * head_dim, out_features)``.

    Arguments:
        num_heads, head_dim: the input's two last axes.
        out_features: size of the output's last axis.
        use_bias, dtype, param_dtype, precision, kernel_init, bias_init, rngs:
            as in ``nn.LinearGeneral``.

    Example:
        >>> import jax.numpy as jnp
        >>> from toylib import nn
        >>> nn.MergeHeads(2, 3, 5, rngs=0)(jnp.ones((4, 2, 3))).shape
        (4, 5)
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        out_features: int,
        *,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: PrecisionLike = None,
        kernel_init: Any = default_kernel_init,
        bias_init: Any = jax.nn.initializers.zeros,
        kernel_sharding: Names = None,
        bias_sharding: Names = None,
        rngs: Rngs | int | jax.Array,
    ) -> None:
        super().__init__(
            (num_heads, head_dim),
            out_features,
            axis=(-2, -1),
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
            kernel_init=kernel_init,
            bias_init=bias_init,
            kernel_sharding=kernel_sharding,
            bias_sharding=bias_sharding,
            rngs=rngs,
        )
        self.num_heads = num_heads
        self.head_dim = head_dim
