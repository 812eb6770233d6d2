"""Layers on named axes (``tl.nx``): NamedLinear and NamedMultiHeadAttention.

Their inputs and outputs are ``tl.nx.NamedArray``s with no positional axes;
each layer names the axes it works on and leaves every other named axis
alone (it is vectorised over them with ``tl.nx.nmap``), so batch, length or
head axes never need a position. Their weights are ``Param``s holding
NamedArrays. ``from_positional`` builds each from the positional layer it
mirrors (``nn.Linear``/``nn.LinearGeneral``, ``nn.MultiHeadAttention``),
with the same weights and the same outputs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from toylib import nx
from toylib._core.calls import module_path
from toylib._core.module import Module
from toylib._core.rngs import Rngs, as_rngs
from toylib._core.variables import Param
from toylib.nn._sharding import Names, check_names, named_variable
from toylib.nn.attention import MultiHeadAttention
from toylib.nn.dtypes import promote_dtype
from toylib.nn.einsum import LinearGeneral
from toylib.nn.linear import Linear, default_kernel_init

__all__ = ["NamedLinear", "NamedMultiHeadAttention"]

NOT_NAMED = """\
{where}: expected a tl.nx.NamedArray with named axes {axes}, got a {kind}.
Fix: name the input's axes first, e.g.

    layer(tl.nx.wrap(x).tag("batch", {example}))
"""

WRONG_AXES = """\
{where}: expected named axes {axes} in the input, got named axes {named}
(positional shape {positional}).
Fix: give the input those axes with those sizes, all named (x.tag(...)), or build
the layer with in_axes={named_in}.
"""

NOT_SUPPORTED = """\
NamedMultiHeadAttention.from_positional: {what} is not supported by the named layer.
Fix: build the positional layer without it ({fix}).
"""


def _sizes(axes: Mapping[str, int], what: str) -> dict[str, int]:
    out = {}
    for name, size in dict(axes).items():
        if not isinstance(name, str) or not isinstance(size, int) or size < 1:
            raise TypeError(
                f"NamedLinear({what}={dict(axes)!r}): give {{name: size}} with string names "
                "and positive int sizes."
            )
        out[name] = size
    return out


def _kernel_names(ins: Sequence[str], outs: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """The kernel's axis names: a name both read and written gets ``_in`` / ``_out``."""
    both = set(ins) & set(outs)
    return (
        tuple(f"{n}_in" if n in both else n for n in ins),
        tuple(f"{n}_out" if n in both else n for n in outs),
    )


class NamedLinear(Module):
    """A dense layer on named axes: contracts ``in_axes`` away and adds ``out_axes``.

    ``NamedLinear(in_axes={"features": 8}, out_axes={"features": 16})`` maps
    an input with a named axis ``features`` of size 8 (and any other named
    axes, e.g. ``batch``, ``seq``) to one with ``features`` of size 16 and
    the same other axes. Several axes may be read or written at once
    (``out_axes={"heads": 4, "head_dim": 16}``), and none (``out_axes={}``:
    one number per example). The kernel is a ``Param`` holding a NamedArray
    whose axes are the in and out axes; a name in both is called
    ``name_in``/``name_out`` in the kernel. The bias has the out axes.

    Arguments:
        in_axes: ``{name: size}`` of the axes read (contracted away).
        out_axes: ``{name: size}`` of the axes written.
        use_bias: add a bias over the out axes (default True).
        dtype: compute dtype (default: promote input and parameters).
        param_dtype: dtype the parameters are stored in (default float32).
        precision: ``jax.lax`` precision of the contraction (default None).
        kernel_init: initialiser; it sees the dense shape ``(prod(in), prod(out))``,
            so with the same ``rngs`` the weights are ``nn.Linear``'s.
        bias_init: initialiser of the bias (default zeros).
        kernel_sharding: logical axis names for ``tl.sharding``, one per
            kernel axis (the in axes, then the out axes), e.g.
            ``("embed", "mlp")``; stored as the Param's ``sharding`` metadata
            and applied to the NamedArray's array (default None: replicated).
        bias_sharding: the same for the bias (one per out axis).
        rngs: ``tl.Rngs``, an int seed or a key; the ``params`` stream is used.

    Returns:
        A Module called on NamedArrays with no positional axes.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> from toylib import nn
        >>> layer = nn.NamedLinear(in_axes={"features": 8}, out_axes={"features": 16}, rngs=0)
        >>> layer.kernel.value
        NamedArray(float32[features_in:8, features_out:16])
        >>> x = tl.nx.wrap(jnp.ones((2, 8))).tag("batch", "features")
        >>> layer(x)
        NamedArray(float32[batch:2, features:16])
    """

    def __init__(
        self,
        in_axes: Mapping[str, int],
        out_axes: Mapping[str, int],
        *,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Any = default_kernel_init,
        bias_init: Any = jax.nn.initializers.zeros,
        kernel_sharding: Names = None,
        bias_sharding: Names = None,
        rngs: Rngs | int | jax.Array,
    ) -> None:
        ins, outs = _sizes(in_axes, "in_axes"), _sizes(out_axes, "out_axes")
        rngs = as_rngs(rngs, "NamedLinear(rngs=...)")
        kernel_in, kernel_out = _kernel_names(tuple(ins), tuple(outs))
        dense = (math.prod(ins.values()), math.prod(outs.values()))
        kernel = kernel_init(rngs.params(), dense, param_dtype)
        kernel = jnp.reshape(kernel, (*ins.values(), *outs.values()))
        # The names describe the stored array's axes (those of nx.wrap: all named here).
        kernel = nx.wrap(kernel, *kernel_in, *kernel_out)
        self.kernel = named_variable(self, "kernel", kernel, kernel_sharding)
        self.bias = None
        if use_bias:
            bias = jnp.reshape(
                bias_init(rngs.params(), (dense[1],), param_dtype), (*outs.values(),)
            )
            self.bias = named_variable(self, "bias", nx.wrap(bias, *outs), bias_sharding)
        # Tuples of (name, size) pairs: hashable static attributes.
        self.in_axes = tuple(ins.items())
        self.out_axes = tuple(outs.items())
        self.dtype = dtype
        self.precision = precision

    @classmethod
    def from_positional(
        cls, layer: Linear | LinearGeneral, in_axes: Sequence[str], out_axes: Sequence[str]
    ) -> NamedLinear:
        """The named layer with the weights of ``nn.Linear`` / ``nn.LinearGeneral`` ``layer``.

        Arguments:
            layer: a positional layer whose kernel is ``(*in, *out)`` (and bias ``(*out,)``).
            in_axes: names for the kernel's input axes, in order.
            out_axes: names for its output axes, in order.

        Returns:
            A NamedLinear computing what ``layer`` computes, on named axes.

        Example:
            >>> import jax.numpy as jnp, toylib as tl
            >>> from toylib import nn
            >>> linear = nn.Linear(3, 2, rngs=0)
            >>> named = nn.NamedLinear.from_positional(linear, ["features"], ["out"])
            >>> x = jnp.ones((5, 3))
            >>> y = named(tl.nx.wrap(x).tag("batch", "features")).unwrap("batch", "out")
            >>> bool(jnp.allclose(y, linear(x)))
            True
        """
        kernel = jnp.asarray(layer.kernel.value)
        n_in = len(in_axes)
        sizes = kernel.shape
        if len(sizes) != n_in + len(out_axes):
            raise ValueError(
                f"NamedLinear.from_positional: the kernel has shape {sizes}, so in_axes and "
                f"out_axes must name {len(sizes)} axes in all; got {list(in_axes)} and "
                f"{list(out_axes)}."
            )
        bias = layer.bias
        new = cls(
            dict(zip(in_axes, sizes[:n_in], strict=True)),
            dict(zip(out_axes, sizes[n_in:], strict=True)),
            use_bias=bias is not None,
            dtype=getattr(layer, "dtype", None),
            param_dtype=kernel.dtype,
            precision=getattr(layer, "precision", None),
            kernel_init=jax.nn.initializers.zeros,
            rngs=0,
        )
        kernel_in, kernel_out = _kernel_names(tuple(in_axes), tuple(out_axes))
        new.kernel.value = nx.wrap(kernel, *kernel_in, *kernel_out)
        _copy_names(layer.kernel, new.kernel)
        if bias is not None and new.bias is not None:
            new.bias.value = nx.wrap(jnp.asarray(bias.value), *out_axes)
            _copy_names(bias, new.bias)
        return new

    def __call__(self, x: nx.NamedArray) -> nx.NamedArray:
        """Contract the input's ``in_axes`` with the kernel; other named axes are kept."""
        self._check_input(x)
        ins = [n for n, _ in self.in_axes]
        outs = [n for n, _ in self.out_axes]
        kernel_in, kernel_out = _kernel_names(ins, outs)
        kernel = self.kernel.value
        bias = None if self.bias is None else self.bias.value
        data, k, b = promote_dtype(
            x.array, kernel.array, None if bias is None else bias.array, dtype=self.dtype
        )
        x, kernel = nx.NamedArray(data, x.names), nx.NamedArray(k, kernel.names)
        precision = self.precision

        def contract(a: jax.Array, w: jax.Array) -> jax.Array:
            return jnp.tensordot(a, w, axes=len(ins), precision=precision)

        y = nx.nmap(contract)(x.untag(*ins), kernel.untag(*kernel_in, *kernel_out)).tag(*outs)
        return y if bias is None or b is None else y + nx.NamedArray(b, bias.names)

    def _check_input(self, x: Any) -> None:
        axes = dict(self.in_axes)
        if not isinstance(x, nx.NamedArray):
            example = ", ".join(map(repr, axes))
            raise TypeError(
                NOT_NAMED.format(
                    where=module_path(self), axes=axes, kind=type(x).__name__, example=example
                )
            )
        named = x.named_shape
        if x.positional_shape or any(named.get(n) != s for n, s in axes.items()):
            raise ValueError(
                WRONG_AXES.format(
                    where=module_path(self),
                    axes=axes,
                    named=named,
                    positional=x.positional_shape,
                    named_in={n: named[n] for n in axes if n in named},
                )
            )


class NamedMultiHeadAttention(Module):
    """Multi-head dot-product attention written on named axes.

    The input has named axes ``features`` (size ``in_features``) and
    ``seq`` (the length), plus any others (``batch``...), which the layer
    maps over. Queries, keys and values are ``NamedLinear`` projections onto
    ``heads`` x ``head_dim``; the keys' and values' length axis is renamed
    ``kv_seq``, the logits are ``nmap(jnp.dot)`` over ``head_dim``, the
    softmax runs over ``kv_seq``, and ``out`` projects ``heads`` x
    ``head_dim`` back onto ``features``. What ``nn.MultiHeadAttention``
    computes (without dropout, grouped heads or a KV cache), axis by name.

    Arguments:
        num_heads: the number of heads.
        in_features: size of the input's ``features`` axis.
        qkv_features: heads x head_dim (default ``in_features``); divisible by ``num_heads``.
        out_features: size of the output's ``features`` axis (default ``in_features``).
        causal: each position attends to itself and earlier ones only.
        use_bias, dtype, param_dtype, precision, kernel_init, bias_init:
            as in ``nn.NamedLinear``, for the four projections.
        kernel_sharding, bias_sharding: logical names of the query, key and
            value kernels ``(features, heads, head_dim)`` and biases
            ``(heads, head_dim)``, as ``nn.MultiHeadAttention`` takes them.
        out_kernel_sharding, out_bias_sharding: those of the ``out``
            kernel ``(heads, head_dim, features)`` and bias ``(features,)``.
        rngs: ``tl.Rngs``, an int seed or a key.

    Returns:
        A Module; ``attn(x, mask=None)`` with ``mask`` a boolean NamedArray
        over any of ``seq``, ``kv_seq``, ``heads`` and the batch axes (True keeps).

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> from toylib import nn
        >>> attn = nn.NamedMultiHeadAttention(2, 8, causal=True, rngs=0)
        >>> x = tl.nx.wrap(jnp.ones((3, 5, 8))).tag("batch", "seq", "features")
        >>> attn(x)
        NamedArray(float32[batch:3, seq:5, features:8])
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        qkv_features: int | None = None,
        out_features: int | None = None,
        causal: bool = False,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Any = default_kernel_init,
        bias_init: Any = jax.nn.initializers.zeros,
        kernel_sharding: Names = None,
        bias_sharding: Names = None,
        out_kernel_sharding: Names = None,
        out_bias_sharding: Names = None,
        rngs: Rngs | int | jax.Array,
    ) -> None:
        rngs = as_rngs(rngs, "NamedMultiHeadAttention(rngs=...)")
        qkv_features = in_features if qkv_features is None else qkv_features
        out_features = in_features if out_features is None else out_features
        if num_heads < 1 or qkv_features % num_heads:
            raise ValueError(
                f"NamedMultiHeadAttention: qkv_features={qkv_features} must be divisible by "
                f"num_heads={num_heads} (each head gets qkv_features // num_heads features)."
            )
        head_dim = qkv_features // num_heads
        common: dict[str, Any] = dict(
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
            kernel_init=kernel_init,
            bias_init=bias_init,
            rngs=rngs,
        )
        # Checked here too, so that an error names this layer's own argument.
        projection, output = (in_features, num_heads, head_dim), (num_heads, head_dim, out_features)
        for argument, names, shape, variable in [
            ("kernel_sharding", kernel_sharding, projection, "query.kernel"),
            ("bias_sharding", bias_sharding, projection[1:], "query.bias"),
            ("out_kernel_sharding", out_kernel_sharding, output, "out.kernel"),
            ("out_bias_sharding", out_bias_sharding, output[2:], "out.bias"),
        ]:
            check_names(names, shape, layer=self, variable=variable, argument=argument)
        heads = {"heads": num_heads, "head_dim": head_dim}
        inputs = {"features": in_features}
        qkv = dict(common, kernel_sharding=kernel_sharding, bias_sharding=bias_sharding)
        self.query = NamedLinear(inputs, heads, **qkv)
        self.key = NamedLinear(inputs, heads, **qkv)
        self.value = NamedLinear(inputs, heads, **qkv)
        out = dict(common, kernel_sharding=out_kernel_sharding, bias_sharding=out_bias_sharding)
        self.out = NamedLinear(heads, {"features": out_features}, **out)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.causal = causal

    @classmethod
    def from_positional(cls, attn: MultiHeadAttention) -> NamedMultiHeadAttention:
        """The named layer with the weights of ``nn.MultiHeadAttention`` ``attn``.

        Arguments:
            attn: an ``nn.MultiHeadAttention`` without grouped key/value heads,
                normalised queries and keys, or (non-zero) dropout.

        Returns:
            A NamedMultiHeadAttention giving the same outputs (``features`` and
            ``seq`` named for the positional layer's last two input axes).

        Example:
            >>> import jax.numpy as jnp, toylib as tl
            >>> from toylib import nn
            >>> attn = nn.MultiHeadAttention(2, 8, causal=True, rngs=0)
            >>> named = nn.NamedMultiHeadAttention.from_positional(attn)
            >>> x = jnp.ones((3, 5, 8))
            >>> y = named(tl.nx.wrap(x).tag("batch", "seq", "features"))
            >>> bool(jnp.allclose(y.unwrap("batch", "seq", "features"), attn(x), atol=1e-5))
            True
        """
        if attn.num_kv_heads != attn.num_heads:
            raise ValueError(NOT_SUPPORTED.format(what="grouped heads", fix="num_kv_heads=None"))
        if attn.query_ln is not None:
            raise ValueError(NOT_SUPPORTED.format(what="normalize_qk", fix="normalize_qk=False"))
        if attn.dropout_rate > 0.0 and not attn.deterministic:
            raise ValueError(NOT_SUPPORTED.format(what="dropout", fix="dropout_rate=0, or .eval()"))
        if attn.in_kv_features != attn.in_features:
            raise ValueError(NOT_SUPPORTED.format(what="in_kv_features", fix="in_kv_features=None"))
        new = cls(
            attn.num_heads,
            attn.in_features,
            qkv_features=attn.qkv_features,
            out_features=attn.out_features,
            causal=attn.causal,
            use_bias=attn.query.bias is not None,
            kernel_init=jax.nn.initializers.zeros,
            rngs=0,
        )
        heads = ["heads", "head_dim"]
        new.query = NamedLinear.from_positional(attn.query, ["features"], heads)
        new.key = NamedLinear.from_positional(attn.key, ["features"], heads)
        new.value = NamedLinear.from_positional(attn.value, ["features"], heads)
        new.out = NamedLinear.from_positional(attn.out, heads, ["features"])
        return new

    def __call__(self, x: nx.NamedArray, *, mask: nx.NamedArray | None = None) -> nx.NamedArray:
        """Self-attention over ``seq``; every other named axis but ``features`` is mapped over."""
        if mask is not None and not isinstance(mask, nx.NamedArray):
            raise TypeError(
                f"{module_path(self)}: the mask must be a tl.nx.NamedArray over named axes "
                f"(seq, kv_seq, heads, batch...), got a {type(mask).__name__}.\n"
                'Fix: name its axes, e.g. tl.nx.wrap(mask).tag("batch", "seq", "kv_seq").'
            )
        query = self.query(x) / math.sqrt(self.head_dim)  # scale Lq x d values, not the logits
        key = self.key(x).untag("seq").tag("kv_seq")
        value = self.value(x).untag("seq").tag("kv_seq")
        logits = nx.nmap(jnp.dot)(query.untag("head_dim"), key.untag("head_dim"))
        logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
        if self.causal:
            length = x.named_shape["seq"]
            causal = nx.wrap(jnp.tril(jnp.ones((length, length), jnp.bool_)), "seq", "kv_seq")
            mask = causal if mask is None else mask & causal
        if mask is not None:
            lowest = jnp.finfo(logits.dtype).min
            logits = nx.nmap(lambda z, keep: jnp.where(keep, z, lowest))(logits, mask)
        weights = nx.nmap(jax.nn.softmax)(logits.untag("kv_seq")).tag("kv_seq")
        weights = weights.astype(value.dtype)
        mixed = nx.nmap(jnp.dot)(weights.untag("kv_seq"), value.untag("kv_seq"))
        return self.out(mixed)


def _copy_names(source: Any, target: Param) -> None:
    """The positional layer's ``sharding`` names, onto the named layer's Param."""
    names = source.get_metadata("sharding", None) if hasattr(source, "get_metadata") else None
    if names is not None:
        target.set_metadata(sharding=names)
