"""Attention: masks, dot-product attention and MultiHeadAttention (with a KV cache).

Shapes follow Flax: inputs are ``(*batch, length, features)``; projected
queries, keys and values are ``(*batch, length, heads, head_dim)``; attention
weights and masks are ``(*batch, heads, q_length, kv_length)``, and a mask may
be anything that broadcasts to that (``make_causal_mask`` and
``make_attention_mask`` give ``(*batch, 1, q_length, kv_length)``). A mask is
boolean: True keeps a position, False hides it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.core  # named: jax imports it, but pyright sees only what is imported
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Shaped

from toylib._core.calls import module_path
from toylib._core.module import Module
from toylib._core.rngs import Rngs, RngStream, as_key, as_rngs
from toylib._core.variables import Cache
from toylib.errors import error_if
from toylib.nn._sharding import Names, check_names
from toylib.nn.checks import check_features
from toylib.nn.dtypes import promote_dtype
from toylib.nn.einsum import MergeHeads, ProjectHeads
from toylib.nn.linear import default_kernel_init
from toylib.nn.normalization import LayerNorm

__all__ = [
    "MultiHeadAttention",
    "dot_product_attention",
    "dot_product_attention_weights",
    "make_attention_mask",
    "make_causal_mask",
]

BAD_HEADS = """\
MultiHeadAttention: qkv_features={qkv} must be divisible by num_heads={heads}
(each head gets qkv_features // num_heads features).
Fix: pick sizes that divide, e.g.

    nn.MultiHeadAttention({heads}, in_features, qkv_features={suggest}, rngs=rngs)
"""

BAD_KV_HEADS = """\
MultiHeadAttention(num_heads={heads}, num_kv_heads={kv}): the query heads are shared out
among the key/value heads in equal groups, so num_kv_heads must divide num_heads.
Fix: pick num_kv_heads among the divisors of {heads}: {divisors} (1 is multi-query
attention, {heads} is ordinary multi-head attention).
"""

GROUPED_HEADS = """\
dot_product_attention: the query has {q_heads} heads and the key/value {kv_heads}; grouped-query
attention shares each key/value head among an equal group of query heads, so {kv_heads} must
divide {q_heads}.
Fix: project the keys and values onto a divisor of {q_heads} heads (num_kv_heads=...).
"""

NO_KEPT_RNGS = """\
MultiHeadAttention(dropout_rate={rate}, keep_rngs=False) keeps no random stream, so a
training call needs one.
Fix: pass it per call, or switch to evaluation:

    attn(x, rngs=rngs)                 # or model.eval() / deterministic=True
"""

BAD_MASK = """\
dot_product_attention: a mask of shape {mask} does not broadcast to the attention
weights' shape {weights} (*batch, heads, q_length, kv_length).
Fix: give the mask a heads axis (of size 1) before the two length axes, as
nn.make_attention_mask and nn.make_causal_mask do: (*batch, 1, q_length, kv_length).
"""

NO_LENGTH = """\
{where}: expected input of shape (*batch, length, {features}), got {shape}: there is
no length axis.
Fix: add one, e.g. `x[None]` for a single token, or `x[..., None, :]` for a batch of them.
"""

V_WITHOUT_K = """\
MultiHeadAttention: got `v` but no `k`. `k` defaults to `q` and `v` to `k`, so a
lone `v` is most likely a mistake.
Fix: pass both, `attn(q, k, v)`, or only `k` to use it as the values too: `attn(q, k)`.
"""

LENGTH_MISMATCH = """\
{where}: keys and values must have the same length, got k of shape {k} and v of
shape {v}.
"""

NO_DROPOUT_RNGS = """\
MultiHeadAttention(dropout_rate={rate}) needs random keys in training mode, but has no
stream.
Fix: give it one when building it, or per call, or switch to evaluation:

    nn.MultiHeadAttention(..., dropout_rate={rate}, rngs=rngs)   # keeps rngs.dropout
    attn(x, rngs=rngs)                 # or model.eval() / deterministic=True
"""

NO_CACHE = """\
{where}: decode=True but the KV cache is not allocated.
Fix: allocate it once before decoding (it holds max_length positions):

    attn.init_cache((batch, max_length, {features}))
"""

CACHE_MISMATCH = """\
{where}: decoding with a cache built for batch {batch} and {max_len} positions, but
the new tokens have shape {shape} (*batch, new_tokens, features).
Fix: feed (*batch, new_tokens, features) with the cache's batch shape and at most
{max_len} new tokens, or call init_cache again with the right shape.
"""

DECODE_K_LENGTH = """\
{where}: decode=True writes the keys and values of the new tokens into the cache at
the query's positions, so k and v must have the query's length ({q_len}), got {k_len}.
"""

CACHE_FULL = """\
{where}: the KV cache is full: it holds {max_len} positions, {index} are written,
and {new} new token(s) would go past its end.
Fix: allocate a longer cache (prompt + generated tokens), or start a new sequence:

    nn.init_cache(model, {batch}, max_length)           # every attention layer, or
    attn.init_cache(({batch_text}max_length, {features}))   # this layer only
"""

CACHE_FULL_TRACED = """\
{where}: the KV cache is full: it holds {max_len} positions, and {new} new token(s)
would go past its end (checked inside the transform, where the index is traced).
Fix: allocate a longer cache (prompt + generated tokens) with
`nn.init_cache(model, batch, max_length)`, or start a new sequence.
"""

BAD_CACHE_SHAPE = """\
MultiHeadAttention.init_cache: expected a shape (*batch, max_length, {features}),
got {shape}.
"""


# -- masks ---------------------------------------------------------------------------------


def make_attention_mask(
    query_input: Shaped[ArrayLike, "*#batch q"],
    key_input: Shaped[ArrayLike, "*#batch kv"],
    pairwise_fn: Callable[[Array, Array], Array] = jnp.multiply,
) -> Bool[Array, "*#batch 1 q kv"]:
    """A boolean mask from a pairwise function of query and key positions.

    The usual use is padding: ``make_attention_mask(tokens > 0, tokens > 0)``
    lets a query attend to a key only when both are real tokens.

    Arguments:
        query_input: one value per query position, ``(*batch, q_length)``.
        key_input: one value per key position, ``(*batch, kv_length)``.
        pairwise_fn: combines them, broadcasting (default ``jnp.multiply``,
            an ``and`` for booleans); a nonzero result keeps the pair.

    Returns:
        A boolean ``(*batch, 1, q_length, kv_length)`` mask (the ``1`` is the
        heads axis: every head sees the same mask).

    Example:
        >>> import jax.numpy as jnp
        >>> from toylib import nn
        >>> valid = jnp.array([True, True, False])
        >>> nn.make_attention_mask(valid, valid).astype(int).tolist()
        [[[1, 1, 0], [1, 1, 0], [0, 0, 0]]]
    """
    query_input, key_input = jnp.asarray(query_input), jnp.asarray(key_input)
    pairs = pairwise_fn(query_input[..., :, None], key_input[..., None, :])
    return jnp.asarray(pairs).astype(jnp.bool_)[..., None, :, :]


def make_causal_mask(
    tokens: Shaped[ArrayLike, "*batch length"],
) -> Bool[Array, "*batch 1 length length"]:
    """A causal mask: position ``i`` attends to positions ``j <= i`` only.

    Arguments:
        tokens: any array of shape ``(*batch, length)``; only its shape is used.

    Returns:
        A boolean ``(*batch, 1, length, length)`` lower-triangular mask.

    Example:
        >>> import jax.numpy as jnp
        >>> from toylib import nn
        >>> nn.make_causal_mask(jnp.zeros((2, 3))).shape
        (2, 1, 3, 3)
        >>> nn.make_causal_mask(jnp.zeros(3)).astype(int).tolist()
        [[[1, 0, 0], [1, 1, 0], [1, 1, 1]]]
    """
    shape = jnp.shape(tokens)
    if not shape:
        raise ValueError("make_causal_mask: expected tokens of shape (*batch, length), got ().")
    position = jnp.arange(shape[-1])
    causal = position[:, None] >= position[None, :]
    return jnp.broadcast_to(causal, (*shape[:-1], 1, shape[-1], shape[-1]))


def _causal(q_len: int, kv_len: int) -> Bool[Array, "q kv"]:
    # Query i sees key j <= i (self-attention: q_len == kv_len).
    return jnp.arange(q_len)[:, None] >= jnp.arange(kv_len)[None, :]


def _and_mask(mask: Any, extra: Array) -> Array:
    return extra if mask is None else jnp.logical_and(jnp.asarray(mask), extra)


# -- attention functions ------------------------------------------------------------------


def dot_product_attention_weights(
    query: Float[ArrayLike, "*batch q heads d"],
    key: Float[ArrayLike, "*batch kv kv_heads d"],
    mask: Shaped[ArrayLike, "*mask"] | None = None,
    *,
    bias: Float[ArrayLike, "*bias"] | None = None,
    dtype: Any = None,
    precision: Any = None,
) -> Float[Array, "*batch heads q kv"]:
    """Softmax attention weights ``softmax(q k^T / sqrt(d) + bias)``, masked.

    Masked-out pairs get the most negative finite logit, so a query whose keys
    are all masked attends uniformly (no NaN), as in Flax. The softmax runs in
    at least float32 even for bfloat16 inputs: its exponentials and sum are
    where low precision hurts; the weights come back in the compute dtype.

    Grouped-query attention: ``key`` may have fewer heads than ``query``, a
    divisor ``kv_heads`` of its ``heads``; query head ``i`` then attends with
    key head ``i // (heads // kv_heads)`` (consecutive query heads share one,
    Flax's grouping). The key heads are not copied: the query is viewed as
    ``(kv_heads, group)`` heads.

    Arguments:
        query: ``(*batch, q_length, heads, head_dim)``.
        key: ``(*batch, kv_length, kv_heads, head_dim)``, ``kv_heads`` dividing ``heads``.
        mask: broadcastable to ``(*batch, heads, q_length, kv_length)``;
            True (nonzero) keeps a pair.
        bias: added to the logits before masking (same broadcasting).
        dtype: compute dtype (default: promote query and key).
        precision: ``jax.lax`` precision of the ``q k^T`` contraction (default None).

    Returns:
        Weights of shape ``(*batch, heads, q_length, kv_length)`` summing to 1
        over the last axis.

    Example:
        >>> import jax.numpy as jnp
        >>> from toylib import nn
        >>> w = nn.dot_product_attention_weights(jnp.ones((4, 2, 8)), jnp.ones((5, 2, 8)))
        >>> w.shape, float(w.sum(-1).mean())
        ((2, 4, 5), 1.0)
    """
    query, key = promote_dtype(query, key, dtype=dtype)
    compute = query.dtype
    # Scale the query (Lq x d values), not the logits (Lq x Lk values).
    query = query / jnp.asarray(math.sqrt(query.shape[-1]), compute)
    logits = _grouped_logits(query, key, precision)
    logits = logits.astype(jnp.promote_types(compute, jnp.float32))
    if bias is not None:
        logits = logits + jnp.asarray(bias, logits.dtype)
    if mask is not None:
        mask = _checked_mask(mask, logits.shape)
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    return jax.nn.softmax(logits, axis=-1).astype(compute)


def dot_product_attention(
    query: Float[ArrayLike, "*batch q heads d"],
    key: Float[ArrayLike, "*batch kv kv_heads d"],
    value: Float[ArrayLike, "*batch kv kv_heads dv"],
    mask: Shaped[ArrayLike, "*mask"] | None = None,
    *,
    bias: Float[ArrayLike, "*bias"] | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    broadcast_dropout: bool = True,
    dtype: Any = None,
    precision: Any = None,
) -> Float[Array, "*batch q heads dv"]:
    """Scaled dot-product attention: ``softmax(q k^T / sqrt(d)) v`` per head.

    Arguments:
        query: ``(*batch, q_length, heads, head_dim)``.
        key: ``(*batch, kv_length, kv_heads, head_dim)``; ``kv_heads`` may be a
            divisor of ``heads`` (grouped-query attention, see
            ``dot_product_attention_weights``).
        value: ``(*batch, kv_length, kv_heads, v_head_dim)``.
        mask: broadcastable to ``(*batch, heads, q_length, kv_length)``;
            True (nonzero) keeps a pair.
        bias: added to the logits before masking.
        dropout_rate: probability of dropping an attention weight (the kept
            ones are scaled by ``1 / (1 - rate)``); 0 disables dropout.
        dropout_rng: the key for dropout; required when ``dropout_rate > 0``.
        broadcast_dropout: share one dropout mask over the batch and head
            axes (default True, as in Flax).
        dtype: compute dtype (default: promote query, key and value).
        precision: ``jax.lax`` precision of both contractions (default None).

    Returns:
        ``(*batch, q_length, heads, v_head_dim)``.

    Example:
        >>> import jax.numpy as jnp
        >>> from toylib import nn
        >>> q = jnp.ones((2, 4, 3, 8))                  # batch 2, 4 queries, 3 heads
        >>> kv = jnp.ones((2, 6, 3, 8))                 # 6 keys/values
        >>> nn.dot_product_attention(q, kv, kv).shape
        (2, 4, 3, 8)
    """
    query, key, value = promote_dtype(query, key, value, dtype=dtype)
    weights = dot_product_attention_weights(query, key, mask, bias=bias, precision=precision)
    if dropout_rate >= 1.0:
        weights = jnp.zeros_like(weights)
    elif dropout_rate > 0.0:
        if dropout_rng is None:
            raise ValueError(
                f"dot_product_attention: dropout_rate={dropout_rate} needs dropout_rng=key."
            )
        shape = weights.shape
        if broadcast_dropout:
            shape = (1,) * (weights.ndim - 2) + shape[-2:]
        # Draw the bits flat and reshape: the same values (with JAX's default
        # partitionable threefry) but XLA:CPU compiles a rank-4 draw several
        # times slower (seconds for a (2, 3, 5, 7) mask, JAX 0.10).
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, (math.prod(shape),))
        keep = keep.reshape(shape)
        scaled = weights / jnp.asarray(1.0 - dropout_rate, weights.dtype)
        weights = jnp.where(keep, scaled, jnp.zeros((), weights.dtype))
    return _grouped_values(weights, value, precision)


def _groups(q_heads: int, kv_heads: int) -> int:
    if kv_heads < 1 or q_heads % kv_heads:
        raise ValueError(GROUPED_HEADS.format(q_heads=q_heads, kv_heads=kv_heads))
    return q_heads // kv_heads


def _grouped_logits(query: Array, key: Array, precision: Any) -> Array:
    """``q k^T`` per head, ``(*batch, heads, q, kv)``; key heads shared by groups of query heads."""
    heads, kv_heads = query.shape[-2], key.shape[-2]
    if heads == kv_heads:
        return jnp.einsum("...qhd,...khd->...hqk", query, key, precision=precision)
    g = _groups(heads, kv_heads)
    query = query.reshape(*query.shape[:-2], kv_heads, g, query.shape[-1])
    logits = jnp.einsum("...qhgd,...khd->...hgqk", query, key, precision=precision)
    return logits.reshape(*logits.shape[:-4], heads, *logits.shape[-2:])


def _grouped_values(weights: Array, value: Array, precision: Any) -> Array:
    """The weighted sum of values, ``(*batch, q, heads, dv)``, value heads shared as the keys'."""
    heads, kv_heads = weights.shape[-3], value.shape[-2]
    if heads == kv_heads:
        return jnp.einsum("...hqk,...khd->...qhd", weights, value, precision=precision)
    g = _groups(heads, kv_heads)
    weights = weights.reshape(*weights.shape[:-3], kv_heads, g, *weights.shape[-2:])
    out = jnp.einsum("...hgqk,...khd->...qhgd", weights, value, precision=precision)
    return out.reshape(*out.shape[:-3], heads, out.shape[-1])


def _checked_mask(mask: Any, weights_shape: tuple[int, ...]) -> Array:
    mask = jnp.asarray(mask)
    try:
        fits = jnp.broadcast_shapes(mask.shape, weights_shape) == weights_shape
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(BAD_MASK.format(mask=mask.shape, weights=weights_shape))
    return mask.astype(jnp.bool_)


# -- the layer ----------------------------------------------------------------------------


class MultiHeadAttention(Module):
    """Multi-head dot-product attention, with optional dropout and a decoding KV cache.

    ``attn(q)`` is self-attention; ``attn(q, k)`` attends from ``q`` to ``k``
    (used as the values too); ``attn(q, k, v)`` takes all three. The inputs
    are projected by the ``query``, ``key`` and ``value`` sub-layers
    (``ProjectHeads``, kernels ``(in, heads, head_dim)``), attended with
    ``nn.dot_product_attention`` and projected back by ``out``
    (``MergeHeads``, kernel ``(heads, head_dim, out)``): Flax's layout, so
    weights copy one to one from ``flax.nnx.MultiHeadAttention``.

    Dropout on the attention weights (``dropout_rate > 0``) draws keys from
    the ``rngs.dropout`` stream the layer was built with (``rngs.default``
    without one), like ``nn.Dropout``; a call may pass ``rngs=`` to override,
    and ``deterministic=True`` (set by ``model.eval()``) turns it off.

    Decoding: set ``decode=True`` (a plain attribute) and call
    ``init_cache((*batch, max_length, in_features))`` once. Each call then
    takes the next token(s) ``(*batch, n, in_features)``, writes their keys
    and values into the ``Cache`` Variables ``cached_key``/``cached_value``
    at ``cache_index``, attends causally over everything cached so far and
    advances ``cache_index`` by ``n``. Token-by-token (or chunked) decoding
    gives the full causal forward pass. A ``mask`` given while decoding
    covers the cache: it broadcasts to ``(*batch, heads, n, max_length)``
    (e.g. to hide padded prompt positions). ``k``/``v``, if given, must have
    the new tokens' length (decoding is for self-attention). Inside
    ``tl.jit`` the cache is updated in place and carried out.

    Writing past ``max_length`` is an error. Outside a transform, where
    ``cache_index`` is a concrete number, it is raised before anything is
    computed. Inside ``tl.jit`` (or a ``tl.fori_loop``/``tl.scan``, or an
    ``nn.Stack`` of blocks) the index is traced, and the check is a
    ``tl.error_if`` (a ``lax.cond`` on the index, no host callback unless it
    fails) that raises ``tl.RuntimeCheckError`` when the step runs: without
    it ``lax.dynamic_update_slice`` would clamp the write and the new tokens
    would silently overwrite the end of the cache. ``TOYLIB_ON_ERROR=nothing``
    drops the check (see ``tl.error_if``).

    ``causal=True`` makes self-attention causal without a mask argument:
    query ``i`` sees keys ``j <= i``, and in decode mode every new token sees
    the cache up to its own position. The same model code then serves
    training, a multi-token prefill and token-by-token decoding, and no
    ``(L, L)`` mask is built or passed. A ``mask`` given as well is combined
    with it (both must keep a pair).

    ``nn.init_cache(model, batch, max_length)`` and ``nn.set_decode(model)``
    do the two decoding steps for every attention layer of a whole model,
    inside ``nn.Stack`` too.

    Grouped-query attention (Ainslie et al., 2023): ``num_kv_heads`` below
    ``num_heads`` projects the keys and values onto fewer heads, each shared
    by ``num_heads // num_kv_heads`` consecutive query heads;
    ``num_kv_heads=1`` is multi-query attention. The ``key``/``value``
    kernels are ``(in, num_kv_heads, head_dim)`` and the KV cache holds
    ``num_kv_heads`` heads: ``num_heads / num_kv_heads`` times smaller, which
    is what makes decoding cheaper.

    Arguments:
        num_heads: number of attention (query) heads.
        num_kv_heads: number of key/value heads (default ``num_heads``);
            must divide ``num_heads``.
        in_features: size of the query input's last axis.
        qkv_features: total size of the projected queries/keys/values
            (default ``in_features``); must be divisible by ``num_heads``.
        out_features: size of the output's last axis (default ``in_features``).
        in_kv_features: size of the key/value inputs' last axis (default
            ``in_features``), for cross-attention to a wider or narrower memory.
        dropout_rate: dropout on the attention weights (default 0).
        broadcast_dropout: share the dropout mask over batch and heads (default True).
        normalize_qk: apply a LayerNorm (scale only) over ``head_dim`` to the
            projected queries and keys, ``query_ln``/``key_ln`` (QK
            normalisation, Dehghani et al. 2023: steadier training at high
            learning rates). Default False.
        causal: mask future positions (self-attention), see above (default False).
        deterministic: start in evaluation mode (default False, training).
        decode: start in decoding mode (default False); a call may pass
            ``decode=`` to override it.
        use_bias: biases in the four projections (default True).
        dtype: compute dtype (default: promote inputs and parameters).
        param_dtype: dtype the parameters are stored in (default float32).
        precision: ``jax.lax`` precision of the projections and the attention
            contractions (default None).
        kernel_init: initialiser of the projection kernels (default LeCun
            normal on the equivalent dense shape).
        bias_init: initialiser of the biases (default zeros).
        out_kernel_init, out_bias_init: the output projection's, when it
            should differ (default: ``kernel_init`` / ``bias_init``; e.g. GPT-2
            scales the output projection by ``1 / sqrt(2 * layers)``).
        keep_rngs: keep the ``dropout`` stream in the layer (default True); with
            False the layer holds no random state and a training call with
            dropout takes ``rngs=``.
        kernel_sharding: logical axis names of the ``query`` kernel ``(in,
            heads, head_dim)``, one per dimension (a str, or None: not
            sharded), conventionally ``("embed", "heads", "kv")``; stored as
            its ``sharding`` metadata for ``tl.sharding``; also the ``key``
            and ``value`` kernels' unless ``kv_kernel_sharding`` is given.
            Default None: no names (replicated).
        bias_sharding: the ``(heads, head_dim)`` biases' names, e.g.
            ``("heads", "kv")``; the ``key``/``value`` biases' too unless
            ``kv_bias_sharding`` is given (default None).
        kv_kernel_sharding, kv_bias_sharding: the ``key`` and ``value``
            projections' own names (default: ``kernel_sharding`` /
            ``bias_sharding``). With grouped-query attention their head axis
            has ``num_kv_heads`` entries, which a mesh axis may not divide:
            ``("embed", None, "kv")`` keeps it whole.
        out_kernel_sharding: the ``out`` kernel ``(heads, head_dim, out)``'s
            names, conventionally ``("heads", "kv", "embed")`` (default None).
        out_bias_sharding: the ``out`` bias ``(out,)``'s, e.g. ``("embed",)``
            (default None).
        qk_norm_sharding: the ``(head_dim,)`` scales of ``query_ln`` and
            ``key_ln`` (with ``normalize_qk``), e.g. ``("kv",)`` (default None).
        rngs: ``tl.Rngs``, an int seed or a key; ``params`` draws the weights
            and ``dropout`` is kept when ``dropout_rate > 0``.

    Returns:
        A Module called as ``attn(q, k=None, v=None, *, mask=None,
        deterministic=None, decode=None, rngs=None)`` on ``(*batch, length,
        features)`` inputs, giving ``(*batch, q_length, out_features)``.

    Example:
        >>> import jax.numpy as jnp
        >>> from toylib import nn
        >>> attn = nn.MultiHeadAttention(2, 8, rngs=0)
        >>> x = jnp.ones((3, 5, 8))                          # batch 3, length 5
        >>> attn(x, mask=nn.make_causal_mask(jnp.ones((3, 5)))).shape
        (3, 5, 8)
        >>> gqa = nn.MultiHeadAttention(4, 8, num_kv_heads=2, causal=True, rngs=0)
        >>> gqa.key.kernel.shape, gqa(x).shape        # 2 key/value heads of size 2
        ((8, 2, 2), (3, 5, 8))
        >>> named = nn.MultiHeadAttention(2, 8, kernel_sharding=("embed", "heads", "kv"),
        ...                               out_kernel_sharding=("heads", "kv", "embed"), rngs=0)
        >>> named.query.kernel.sharding, named.value.kernel.sharding, named.out.kernel.sharding
        (('embed', 'heads', 'kv'), ('embed', 'heads', 'kv'), ('heads', 'kv', 'embed'))

        Decoding the same sequence token by token gives the same outputs::

            attn.init_cache((3, 5, 8))       # (batch, max_length, in_features)
            attn.decode = True
            step = tl.jit(lambda attn, token: attn(token))
            outs = [step(attn, x[:, t : t + 1]) for t in range(5)]   # cache_index: 5
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        num_kv_heads: int | None = None,
        qkv_features: int | None = None,
        out_features: int | None = None,
        in_kv_features: int | None = None,
        dropout_rate: float = 0.0,
        broadcast_dropout: bool = True,
        normalize_qk: bool = False,
        causal: bool = False,
        deterministic: bool = False,
        decode: bool = False,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Any = default_kernel_init,
        bias_init: Any = jax.nn.initializers.zeros,
        out_kernel_init: Any = None,
        out_bias_init: Any = None,
        keep_rngs: bool = True,
        kernel_sharding: Names = None,
        bias_sharding: Names = None,
        kv_kernel_sharding: Names = None,
        kv_bias_sharding: Names = None,
        out_kernel_sharding: Names = None,
        out_bias_sharding: Names = None,
        qk_norm_sharding: Names = None,
        rngs: Rngs | int | jax.Array,
    ) -> None:
        rngs = as_rngs(rngs, "MultiHeadAttention(rngs=...)")
        qkv_features = in_features if qkv_features is None else qkv_features
        out_features = in_features if out_features is None else out_features
        in_kv_features = in_features if in_kv_features is None else in_kv_features
        if num_heads < 1 or qkv_features % num_heads:
            suggest = max(num_heads, round(qkv_features / max(num_heads, 1)) * num_heads)
            raise ValueError(BAD_HEADS.format(qkv=qkv_features, heads=num_heads, suggest=suggest))
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            divisors = ", ".join(str(d) for d in range(1, num_heads + 1) if num_heads % d == 0)
            raise ValueError(
                BAD_KV_HEADS.format(heads=num_heads, kv=num_kv_heads, divisors=divisors)
            )
        if not 0.0 <= dropout_rate <= 1.0:
            raise ValueError(f"MultiHeadAttention(dropout_rate={dropout_rate}): must be in [0, 1].")
        head_dim = qkv_features // num_heads
        if kv_kernel_sharding is None:
            kv_kernel_sharding = kernel_sharding
        if kv_bias_sharding is None:
            kv_bias_sharding = bias_sharding
        # Checked here against each projection's shape, so that a wrong count
        # names this layer's argument rather than the sub-layer it goes to.
        q_shape = (in_features, num_heads, head_dim)
        kv_shape = (in_kv_features, num_kv_heads, head_dim)
        out_shape = (num_heads, head_dim, out_features)
        names = {
            argument: check_names(given, shape, layer=self, variable=variable, argument=argument)
            for argument, given, shape, variable in [
                ("kernel_sharding", kernel_sharding, q_shape, "query.kernel"),
                ("bias_sharding", bias_sharding, q_shape[1:], "query.bias"),
                ("kv_kernel_sharding", kv_kernel_sharding, kv_shape, "key.kernel"),
                ("kv_bias_sharding", kv_bias_sharding, kv_shape[1:], "key.bias"),
                ("out_kernel_sharding", out_kernel_sharding, out_shape, "out.kernel"),
                ("out_bias_sharding", out_bias_sharding, out_shape[-1:], "out.bias"),
                ("qk_norm_sharding", qk_norm_sharding, (head_dim,), "query_ln.scale"),
            ]
        }
        common: dict[str, Any] = dict(
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            precision=precision,
            kernel_init=kernel_init,
            bias_init=bias_init,
            rngs=rngs,
        )
        out = {
            **common,
            "kernel_init": kernel_init if out_kernel_init is None else out_kernel_init,
            "bias_init": bias_init if out_bias_init is None else out_bias_init,
        }
        self.query = ProjectHeads(
            in_features,
            num_heads,
            head_dim,
            **common,
            kernel_sharding=names["kernel_sharding"],
            bias_sharding=names["bias_sharding"],
        )
        kv_names: dict[str, Any] = dict(
            kernel_sharding=names["kv_kernel_sharding"], bias_sharding=names["kv_bias_sharding"]
        )
        self.key = ProjectHeads(in_kv_features, num_kv_heads, head_dim, **common, **kv_names)
        self.value = ProjectHeads(in_kv_features, num_kv_heads, head_dim, **common, **kv_names)
        self.out = MergeHeads(
            num_heads,
            head_dim,
            out_features,
            **out,
            kernel_sharding=names["out_kernel_sharding"],
            bias_sharding=names["out_bias_sharding"],
        )
        norm: dict[str, Any] = dict(
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            scale_sharding=names["qk_norm_sharding"],
        )
        self.query_ln = LayerNorm(head_dim, **norm) if normalize_qk else None
        self.key_ln = LayerNorm(head_dim, **norm) if normalize_qk else None
        # Keep the stream (not a key), as nn.Dropout does: every training call
        # draws a fresh key and the counter lives in the user's Rngs.
        self.rngs = rngs.dropout if dropout_rate > 0.0 and keep_rngs else None
        self.cached_key: Cache | None = None
        self.cached_value: Cache | None = None
        self.cache_index: Cache | None = None
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.in_features = in_features
        self.in_kv_features = in_kv_features
        self.qkv_features = qkv_features
        self.out_features = out_features
        self.head_dim = head_dim
        self.dropout_rate = dropout_rate
        self.broadcast_dropout = broadcast_dropout
        self.causal = causal
        self.deterministic = deterministic
        self.decode = decode
        self.dtype = dtype
        self.precision = precision
        self.keep_rngs = keep_rngs

    def __call__(
        self,
        q: Float[ArrayLike, "*batch q_len in"],
        k: Float[ArrayLike, "*batch kv_len kv_in"] | None = None,
        v: Float[ArrayLike, "*batch kv_len kv_in"] | None = None,
        *,
        mask: Shaped[ArrayLike, "*mask"] | None = None,
        deterministic: bool | None = None,
        decode: bool | None = None,
        rngs: Rngs | RngStream | jax.Array | None = None,
    ) -> Float[Array, "*batch q_len out"]:
        """Attend from ``q`` to ``k``/``v``; ``mask`` broadcasts to ``(*batch, heads, Lq, Lk)``."""
        if k is None and v is not None:
            raise ValueError(V_WITHOUT_K)
        q = jnp.asarray(q)
        k = q if k is None else jnp.asarray(k)
        v = k if v is None else jnp.asarray(v)
        self._check_input(q, self.in_features, "in_features")
        self._check_input(k, self.in_kv_features, "in_kv_features")
        self._check_input(v, self.in_kv_features, "in_kv_features")
        if k.shape[-2] != v.shape[-2]:
            raise ValueError(LENGTH_MISMATCH.format(where=module_path(self), k=k.shape, v=v.shape))
        decode = self.decode if decode is None else decode
        if decode:
            self._check_decode(q.shape, k.shape)
        query, key, value = self.query(q), self.key(k), self.value(v)
        if self.query_ln is not None and self.key_ln is not None:
            query, key = self.query_ln(query), self.key_ln(key)
        if decode:
            key, value, mask = self._decode_step(key, value, mask)
        elif self.causal:
            mask = _and_mask(mask, _causal(query.shape[-3], key.shape[-3]))
        deterministic = self.deterministic if deterministic is None else deterministic
        rate = 0.0 if deterministic else self.dropout_rate
        dropout_rng = self._dropout_key(rngs) if 0.0 < rate < 1.0 else None
        x = dot_product_attention(
            query,
            key,
            value,
            mask,
            dropout_rate=rate,
            dropout_rng=dropout_rng,
            broadcast_dropout=self.broadcast_dropout,
            dtype=self.dtype,
            precision=self.precision,
        )
        return self.out(x)

    def init_cache(
        self, input_shape: tuple[int, ...], dtype: Any = None, *, sharding: Names = None
    ) -> None:
        """Allocate the decoding cache for inputs of shape ``(*batch, max_length, in_features)``.

        Creates ``cached_key`` and ``cached_value`` (``Cache`` Variables of
        shape ``(*batch, max_length, num_kv_heads, head_dim)``, zeros) and
        ``cache_index`` (int32 0). Calling it again starts a new sequence.

        Arguments:
            input_shape: the shape of the whole sequence the cache will hold.
            dtype: the cache's dtype (default: the compute ``dtype``, or
                float32 when that is None).
            sharding: logical axis names of ``cached_key``/``cached_value``,
                one per dimension of ``(*batch, max_length, num_kv_heads,
                head_dim)``, e.g. ``("batch", None, "heads", "kv")``; the
                scalar ``cache_index`` is then named ``()``. Default None: no
                names (replicated).

        Example:
            >>> from toylib import nn
            >>> attn = nn.MultiHeadAttention(2, 8, rngs=0)
            >>> attn.init_cache((3, 16, 8), sharding=("batch", None, "heads", "kv"))
            >>> attn.cached_key.sharding, attn.cache_index.sharding
            (('batch', None, 'heads', 'kv'), ())
        """
        input_shape = tuple(input_shape)
        if len(input_shape) < 2 or input_shape[-1] != self.in_features:
            raise ValueError(BAD_CACHE_SHAPE.format(features=self.in_features, shape=input_shape))
        if dtype is None:
            dtype = jnp.float32 if self.dtype is None else self.dtype
        shape = (*input_shape[:-1], self.num_kv_heads, self.head_dim)
        names = check_names(
            sharding,
            shape,
            layer="MultiHeadAttention.init_cache",
            variable="cached_key",
            argument="sharding",
        )
        metadata = {} if names is None else {"sharding": names}
        self.cached_key = Cache(jnp.zeros(shape, dtype), **metadata)
        self.cached_value = Cache(jnp.zeros(shape, dtype), **metadata)
        index = {} if names is None else {"sharding": ()}
        self.cache_index = Cache(jnp.zeros((), jnp.int32), **index)

    def _check_input(self, x: Array, features: int, name: str) -> None:
        check_features(self, x.shape, features, name=name)
        if x.ndim < 2:
            where = module_path(self)
            raise ValueError(NO_LENGTH.format(where=where, features=features, shape=x.shape))

    def _check_decode(self, q_shape: tuple[int, ...], k_shape: tuple[int, ...]) -> None:
        # Checked on the input shapes, before any computation.
        where = module_path(self)
        if self.cached_key is None or self.cached_value is None or self.cache_index is None:
            raise ValueError(NO_CACHE.format(where=where, features=self.in_features))
        if k_shape[-2] != q_shape[-2]:
            raise ValueError(
                DECODE_K_LENGTH.format(where=where, q_len=q_shape[-2], k_len=k_shape[-2])
            )
        *batch, max_len, _, _ = self.cached_key.value.shape
        if k_shape[:-2] != tuple(batch) or k_shape[-2] > max_len:
            raise ValueError(
                CACHE_MISMATCH.format(
                    where=where, batch=tuple(batch), max_len=max_len, shape=k_shape
                )
            )
        index = self.cache_index.value
        # Outside a transform the index is a concrete number: check it (the
        # eager call computes on the spot anyway). A traced index is left
        # alone: see the class docstring.
        if not isinstance(index, jax.core.Tracer) and int(index) + k_shape[-2] > max_len:
            raise ValueError(
                CACHE_FULL.format(
                    where=where,
                    index=int(index),
                    new=k_shape[-2],
                    max_len=max_len,
                    batch=batch[0] if len(batch) == 1 else tuple(batch),
                    batch_text="".join(f"{b}, " for b in batch),
                    features=self.in_features,
                )
            )

    def _decode_step(self, key: Array, value: Array, mask: Any) -> tuple[Array, Array, Array]:
        """Write the new keys/values at ``cache_index``; return the cache and the mask over it."""
        assert self.cached_key is not None and self.cached_value is not None
        assert self.cache_index is not None
        cached_key, cached_value = self.cached_key.value, self.cached_value.value
        *batch, max_len, _, _ = cached_key.shape
        new = key.shape[-3]
        index = self.cache_index.value
        zero = jnp.zeros((), index.dtype)
        start = (zero,) * len(batch) + (index, zero, zero)
        if isinstance(index, jax.core.Tracer):  # concrete indices: _check_decode
            message = CACHE_FULL_TRACED.format(where=module_path(self), max_len=max_len, new=new)
            key = error_if(key, index + new > max_len, message)
        cached_key = jax.lax.dynamic_update_slice(cached_key, key.astype(cached_key.dtype), start)
        cached_value = jax.lax.dynamic_update_slice(
            cached_value, value.astype(cached_value.dtype), start
        )
        self.cached_key.value = cached_key
        self.cached_value.value = cached_value
        self.cache_index.value = index + new
        # New token i sits at position index + i: it sees every cached position
        # up to its own, and neither later new tokens nor the unwritten zeros.
        positions = index + jnp.arange(new)
        visible = jnp.arange(max_len)[None, :] <= positions[:, None]  # (new, max_len)
        return cached_key, cached_value, _and_mask(mask, visible)

    def _dropout_key(self, rngs: Any) -> jax.Array:
        if isinstance(rngs, Rngs):
            return rngs.dropout()
        if isinstance(rngs, RngStream):
            return rngs()
        if rngs is not None:
            return as_key(rngs, "MultiHeadAttention(rngs=...)")
        if self.rngs is None:
            message = NO_DROPOUT_RNGS if self.keep_rngs else NO_KEPT_RNGS
            raise ValueError(message.format(rate=self.dropout_rate))
        return self.rngs()
