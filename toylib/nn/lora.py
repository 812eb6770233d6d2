"""Low-rank adapters (Hu et al., 2021): LoRA, LoRALinear, and their own Variable type LoRAParam.

A LoRA adapter adds ``scale * x @ lora_a @ lora_b`` to a layer's output, with
``lora_a`` ``(in, rank)`` and ``lora_b`` ``(rank, out)``; ``lora_b`` starts at
zero, so an adapted model starts out computing what the base model does.
The adapters are ``LoRAParam``s, a subclass of ``tl.Param``: ``wrt=tl.Param``
still trains everything, ``wrt=nn.LoRAParam`` trains the adapters only and
leaves the base weights frozen::

    grads = tl.grad(loss, wrt=nn.LoRAParam)(model, batch)
    optimizer = tl.Optimizer(model, optax.adam(1e-3), wrt=nn.LoRAParam)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from toylib._core.calls import module_path
from toylib._core.module import Module
from toylib._core.rngs import Rngs, as_rngs
from toylib._core.variables import Param, Variable
from toylib.nn._sharding import Names, check_names, named_variable
from toylib.nn.checks import check_features
from toylib.nn.dtypes import as_array, promote_dtype
from toylib.nn.linear import Linear, default_kernel_init

__all__ = ["LoRA", "LoRALinear", "LoRAParam"]

# He uniform for the down projection, zeros for the up projection: the
# adapter's output starts at zero (Flax's and PEFT's defaults).
default_a_init = jax.nn.initializers.he_uniform()
default_b_init = jax.nn.initializers.zeros

NOT_CALLABLE = """\
{where}: base_module is a {kind}, which cannot be called.
Fix: pass the layer to adapt (a Module called as base_module(x)), or None for an adapter alone.
"""

BAD_RANK = """\
LoRA(lora_rank={rank}): the rank must be a positive int.
Fix: e.g. lora_rank=8; it is the size of the bottleneck between lora_a and lora_b.
"""


class LoRAParam(Param):
    """A trainable weight of a low-rank adapter: a ``Param``, selectable on its own.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> from toylib import nn
        >>> isinstance(nn.LoRAParam(jnp.zeros(2)), tl.Param)
        True
    """


def _scale(alpha: float | None, rank: int) -> float:
    # The paper's alpha / rank keeps the update's size steady when the rank
    # changes; without alpha the adapter is unscaled (Flax's nnx.LoRA).
    return 1.0 if alpha is None else float(alpha) / rank


class LoRA(Module):
    """A low-rank adapter ``scale * x @ lora_a @ lora_b``, alone or added to a base layer.

    With ``base_module`` the call is ``base_module(x, ...) + scale * x @
    lora_a @ lora_b``: wrap any layer mapping ``in_features`` to
    ``out_features`` (a Linear, an MLP...). ``scale`` is ``alpha / lora_rank``
    (the paper's), or 1 without ``alpha`` (Flax's ``nnx.LoRA``, whose
    weights copy one to one).

    Arguments:
        in_features: size of the input's last axis.
        lora_rank: the rank of the update (the bottleneck size).
        out_features: size of the output's last axis.
        base_module: a layer to adapt, called with the input and any extra
            call arguments (default None: the adapter alone).
        alpha: the scale numerator, ``scale = alpha / lora_rank`` (default
            None: scale 1).
        dtype: compute dtype (default: promote input and parameters).
        param_dtype: dtype the adapters are stored in (default float32).
        precision: ``jax.lax`` precision of the two matmuls (default None).
        a_initializer: initialiser of ``lora_a`` ``(in, rank)`` (default He uniform).
        b_initializer: initialiser of ``lora_b`` ``(rank, out)`` (default zeros).
        lora_param_type: the Variable type of the adapters (default ``LoRAParam``).
        lora_a_sharding, lora_b_sharding: logical axis names of ``lora_a``
            ``(in, rank)`` and ``lora_b`` ``(rank, out)``, one per dimension
            (a str, or None: not sharded), e.g. ``("embed", None)`` and
            ``(None, "mlp")``: the rank is small, so it is usually left
            whole. Stored as their ``sharding`` metadata for ``tl.sharding``.
            Default None: no names (replicated).
        rngs: ``tl.Rngs``, an int seed or a key; the ``params`` stream is used.

    Returns:
        A Module with ``lora_a`` and ``lora_b`` (``LoRAParam``) and
        ``base_module``, called as ``lora(x, *args, **kwargs)``.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> from toylib import nn
        >>> base = nn.Linear(3, 4, rngs=0)
        >>> adapted = nn.LoRA(3, 2, 4, base_module=base, alpha=4.0, rngs=1)
        >>> bool((adapted(jnp.ones((5, 3))) == base(jnp.ones((5, 3)))).all())   # lora_b is 0
        True
        >>> [p for p, _ in tl.iter_variables(adapted, nn.LoRAParam)]
        [('lora_a',), ('lora_b',)]
    """

    def __init__(
        self,
        in_features: int,
        lora_rank: int,
        out_features: int,
        *,
        base_module: Callable[..., Any] | None = None,
        alpha: float | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        a_initializer: Any = default_a_init,
        b_initializer: Any = default_b_init,
        lora_param_type: type[Variable] = LoRAParam,
        lora_a_sharding: Names = None,
        lora_b_sharding: Names = None,
        rngs: Rngs | int | jax.Array,
    ) -> None:
        if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1:
            raise ValueError(BAD_RANK.format(rank=lora_rank))
        rngs = as_rngs(rngs, "LoRA(rngs=...)")
        a = a_initializer(rngs.params(), (in_features, lora_rank), param_dtype)
        self.lora_a = named_variable(self, "lora_a", a, lora_a_sharding, kind=lora_param_type)
        b = b_initializer(rngs.params(), (lora_rank, out_features), param_dtype)
        self.lora_b = named_variable(self, "lora_b", b, lora_b_sharding, kind=lora_param_type)
        self.base_module = base_module
        self.in_features = in_features
        self.lora_rank = lora_rank
        self.out_features = out_features
        self.alpha = alpha
        self.dtype = dtype
        self.precision = precision

    def __call__(
        self, x: Float[ArrayLike, "*batch in"], *args: Any, **kwargs: Any
    ) -> Float[Array, "*batch out"]:
        x = as_array(x)
        check_features(self, x.shape, self.in_features)
        xs, a, b = promote_dtype(x, self.lora_a.value, self.lora_b.value, dtype=self.dtype)
        down = jnp.matmul(xs, a, precision=self.precision)
        out = jnp.matmul(down, b, precision=self.precision) * _scale(self.alpha, self.lora_rank)
        if self.base_module is None:
            return out
        if not callable(self.base_module):
            raise TypeError(
                NOT_CALLABLE.format(where=module_path(self), kind=type(self.base_module).__name__)
            )
        return self.base_module(x, *args, **kwargs) + out


class LoRALinear(Linear):
    """An ``nn.Linear`` with a low-rank adapter: ``x @ kernel + bias + scale * x @ A @ B``.

    Its ``kernel`` and ``bias`` are where ``nn.Linear`` keeps them, so a
    Linear's weights (or a checkpoint of them) load as they are, and the
    adapter sits in ``lora`` (``lora.lora_a``, ``lora.lora_b``). As
    ``nnx.LoRALinear``, with ``lora_alpha`` added (``scale = lora_alpha /
    lora_rank``; 1 without it).

    Arguments:
        in_features, out_features: as in ``nn.Linear``.
        lora_rank: the rank of the update.
        lora_alpha: the scale numerator (default None: scale 1).
        use_bias, dtype, param_dtype, kernel_init, bias_init: the base
            Linear's, as in ``nn.Linear``.
        precision: ``jax.lax`` precision of the base and adapter matmuls (default None).
        lora_dtype, lora_param_dtype: the adapter's compute and storage dtypes.
        a_initializer, b_initializer, lora_param_type: as in ``nn.LoRA``.
        kernel_sharding, bias_sharding: the base weights' logical axis names,
            as in ``nn.Linear`` (default None: no names).
        lora_a_sharding, lora_b_sharding: the adapter's, as in ``nn.LoRA``
            (default None).
        rngs: ``tl.Rngs``, an int seed or a key; the base weights are drawn
            first, then the adapter's.

    Returns:
        A Module with ``kernel``/``bias`` Params and a ``lora`` adapter.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> from toylib import nn
        >>> layer = nn.LoRALinear(3, 4, lora_rank=2, rngs=0)
        >>> layer(jnp.ones((5, 3))).shape, layer.lora.lora_a.shape
        ((5, 4), (3, 2))
        >>> [p for p, _ in tl.iter_variables(layer, nn.LoRAParam)]
        [('lora', 'lora_a'), ('lora', 'lora_b')]
        >>> named = nn.LoRALinear(3, 4, lora_rank=2, kernel_sharding=("embed", "mlp"),
        ...                       lora_a_sharding=("embed", None), rngs=0)
        >>> named.kernel.sharding, named.lora.lora_a.sharding
        (('embed', 'mlp'), ('embed', None))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        lora_rank: int,
        lora_alpha: float | None = None,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Any = default_kernel_init,
        bias_init: Any = jax.nn.initializers.zeros,
        lora_dtype: Any = None,
        lora_param_dtype: Any = jnp.float32,
        a_initializer: Any = default_a_init,
        b_initializer: Any = default_b_init,
        lora_param_type: type[Variable] = LoRAParam,
        kernel_sharding: Names = None,
        bias_sharding: Names = None,
        lora_a_sharding: Names = None,
        lora_b_sharding: Names = None,
        rngs: Rngs | int | jax.Array,
    ) -> None:
        rngs = as_rngs(rngs, "LoRALinear(rngs=...)")
        # Checked here too, so that a wrong count names LoRALinear, the layer called.
        check_names(
            lora_a_sharding,
            (in_features, lora_rank),
            layer=self,
            variable="lora.lora_a",
            argument="lora_a_sharding",
        )
        check_names(
            lora_b_sharding,
            (lora_rank, out_features),
            layer=self,
            variable="lora.lora_b",
            argument="lora_b_sharding",
        )
        super().__init__(
            in_features,
            out_features,
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
        self.lora = LoRA(
            in_features,
            lora_rank,
            out_features,
            alpha=lora_alpha,
            dtype=lora_dtype,
            param_dtype=lora_param_dtype,
            precision=precision,
            a_initializer=a_initializer,
            b_initializer=b_initializer,
            lora_param_type=lora_param_type,
            lora_a_sharding=lora_a_sharding,
            lora_b_sharding=lora_b_sharding,
            rngs=rngs,
        )

    def __call__(self, x: Float[ArrayLike, "*batch in"]) -> Float[Array, "*batch out"]:
        return super().__call__(x) + self.lora(x)
