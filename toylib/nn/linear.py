"""Linear (``x @ kernel + bias`` on the last axis), Identity, Embed (lookup, tied output)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int

from toylib._core.calls import module_path
from toylib._core.module import Module
from toylib._core.rngs import Rngs, as_rngs
from toylib.nn._sharding import Names, named_variable
from toylib.nn.checks import check_features
from toylib.nn.dtypes import as_array, promote_dtype

__all__ = ["Embed", "Identity", "Linear", "default_embed_init", "default_kernel_init"]

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
        precision: ``jax.lax`` precision of the matmul (default None: the
            backend's default; ``"highest"`` for full float32 on TPU/GPU).
        kernel_init: initialiser of the ``(in, out)`` kernel (default LeCun normal).
        bias_init: initialiser of the bias (default zeros).
        kernel_sharding: logical axis names of the ``(in, out)`` kernel, one
            per dimension (a str, or None: not sharded), e.g. ``("embed",
            "mlp")``; stored as its ``sharding`` metadata for
            ``tl.sharding``. Default None: no names (replicated).
        bias_sharding: the ``(out,)`` bias's names, e.g. ``("mlp",)``
            (default None).
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
        >>> up = nn.Linear(3, 4, kernel_sharding=("embed", "mlp"), bias_sharding=("mlp",), rngs=0)
        >>> up.kernel.sharding, up.bias.sharding
        (('embed', 'mlp'), ('mlp',))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
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
        rngs = as_rngs(rngs, "Linear(rngs=...)")
        kernel = kernel_init(rngs.params(), (in_features, out_features), param_dtype)
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
        self.dtype = dtype
        self.precision = precision

    def __call__(self, x: Float[ArrayLike, "*batch in"]) -> Float[Array, "*batch out"]:
        x = as_array(x)
        check_features(self, x.shape, self.in_features)
        bias = None if self.bias is None else self.bias.value
        x, kernel, bias = promote_dtype(x, self.kernel.value, bias, dtype=self.dtype)
        y = jnp.matmul(x, kernel, precision=self.precision)
        return y if bias is None else y + bias


class Identity(Module):
    """Returns its input unchanged: a placeholder where a layer is optional.

    Both the constructor and the call accept and ignore any extra arguments,
    so Identity can stand in for any layer class or instance without changing
    the code that builds or calls it (``Sequential`` passes its extra call
    arguments to its first layer; a model may call ``norm(x, mask=...)``).

    Returns:
        A Module with no state; ``identity(x, *args, **kwargs)`` is ``x``.

    Example:
        >>> import jax.numpy as jnp
        >>> from toylib import nn
        >>> norm = (nn.LayerNorm if False else nn.Identity)(3, rngs=0)
        >>> norm(jnp.ones(3), mask=None).tolist()
        [1.0, 1.0, 1.0]
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        del args, kwargs  # accepted so Identity can replace any layer class

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        return x


# Variance 1/features per entry (variance scaling, fan-in along the features
# axis), Flax's default: each embedding vector has norm about 1, and
# ``attend`` logits start at the scale of the query.
default_embed_init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)

NOT_INTEGER_IDS = """\
{where}: expected integer ids (token indices), got a {dtype} array of shape {shape}.
Fix: cast ids to an integer dtype, e.g. `embed(ids.astype(jnp.int32))`; to project
real-valued inputs use nn.Linear, or `embed.attend(x)` for the tied output projection.
"""

IDS_NOT_AN_ARRAY = """\
{where}: expected integer ids as an array, got a Python {kind}.
Fix: make it an array first, e.g. `embed(jnp.asarray(ids))` (jnp functions, such
as the jnp.take of the lookup, do not convert lists either).
"""


class Embed(Module):
    """A lookup table of ``num_embeddings`` vectors of size ``features``.

    ``embed(ids)`` gathers rows of the ``embedding`` table for integer ids of
    any shape; ``embed.attend(query)`` is ``query @ embedding.T``, the logits
    over the vocabulary of a tied output projection. Like ``jnp.take``
    (Flax's Embed too), negative ids count from the end and ids outside
    ``[-num_embeddings, num_embeddings)`` give rows of NaN rather than an
    error, which could not be raised under ``tl.jit``.

    Arguments:
        num_embeddings: the number of rows (vocabulary size).
        features: the size of each embedding vector.
        dtype: compute dtype (default: the parameters' dtype for lookups,
            promotion with the query for ``attend``).
        param_dtype: dtype the table is stored in (default float32).
        precision: ``jax.lax`` precision of ``attend``'s matmul (default None).
        embedding_init: initialiser of the ``(num_embeddings, features)``
            table (default normal with variance ``1 / features``, Flax's).
        embedding_sharding: logical axis names of the ``(num_embeddings,
            features)`` table, one per dimension (a str, or None: not
            sharded), e.g. ``("vocab", "embed")``; stored as its
            ``sharding`` metadata for ``tl.sharding``. Default None: no
            names (replicated).
        rngs: ``tl.Rngs``, an int seed or a key; the ``params`` stream is used.

    Returns:
        A Module with an ``embedding`` ``Param``; called on integer ids of
        shape ``S``, it gives ``(*S, features)``.

    Example:
        >>> import jax.numpy as jnp
        >>> from toylib import nn
        >>> embed = nn.Embed(10, 4, rngs=0)
        >>> embed(jnp.array([[1, 2, 3]])).shape, embed.attend(jnp.ones((2, 4))).shape
        ((1, 3, 4), (2, 10))
        >>> nn.Embed(10, 4, embedding_sharding=("vocab", "embed"), rngs=0).embedding.sharding
        ('vocab', 'embed')
    """

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        embedding_init: Any = default_embed_init,
        embedding_sharding: Names = None,
        rngs: Rngs | int | jax.Array,
    ) -> None:
        rngs = as_rngs(rngs, "Embed(rngs=...)")
        shape = (num_embeddings, features)
        table = embedding_init(rngs.params(), shape, param_dtype)
        self.embedding = named_variable(self, "embedding", table, embedding_sharding)
        self.num_embeddings = num_embeddings
        self.features = features
        self.dtype = dtype
        self.precision = precision

    def __call__(self, ids: Int[ArrayLike, "*ids"]) -> Float[Array, "*ids features"]:
        if isinstance(ids, list | tuple):  # ArrayLike has no lists: JAX's rule, Flax's too
            raise TypeError(
                IDS_NOT_AN_ARRAY.format(where=module_path(self), kind=type(ids).__name__)
            )
        ids = as_array(ids)
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise TypeError(
                NOT_INTEGER_IDS.format(where=module_path(self), dtype=ids.dtype, shape=ids.shape)
            )
        (embedding,) = promote_dtype(self.embedding.value, dtype=self.dtype)
        return jnp.take(embedding, ids, axis=0)

    def attend(self, query: Float[ArrayLike, "*batch features"]) -> Float[Array, "*batch vocab"]:
        """Logits over the vocabulary: ``query @ embedding.T`` (a tied output projection).

        Arguments:
            query: ``(*batch, features)`` vectors.

        Returns:
            ``(*batch, num_embeddings)`` scores, one per row of the table.
        """
        query = as_array(query)
        check_features(self, query.shape, self.features, name="features")
        query, embedding = promote_dtype(query, self.embedding.value, dtype=self.dtype)
        return jnp.matmul(query, embedding.T, precision=self.precision)
