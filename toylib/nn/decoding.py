"""Decoding helpers for whole models: allocate every KV cache, switch every layer to decode mode."""

from __future__ import annotations

from typing import Any

from toylib._core.graph import iter_modules
from toylib._core.module import Module
from toylib.nn._sharding import Names
from toylib.nn.attention import MultiHeadAttention
from toylib.nn.containers import Stack
from toylib.transforms.batching import vmap

__all__ = ["init_cache", "set_decode"]

NO_ATTENTION = """\
nn.init_cache: found no nn.MultiHeadAttention in this {kind}, so there is no cache to
allocate.
Fix: pass the model that holds the attention layers (e.g. the whole GPT, not its
embedding), or call `attn.init_cache((*batch, max_length, features))` on your own layer.
"""

NO_DECODE_FLAG = """\
nn.set_decode: no layer of this {kind} has a `decode` attribute, so nothing was switched.
Fix: pass the model that holds the attention layers (nn.MultiHeadAttention has one).
"""


def init_cache(
    model: Module,
    batch: int | tuple[int, ...],
    max_length: int,
    *,
    dtype: Any = None,
    sharding: Names = None,
) -> Module:
    """Allocate a fresh KV cache in every ``MultiHeadAttention`` of ``model``.

    Each attention layer gets ``cached_key``/``cached_value`` for
    ``(*batch, max_length)`` positions and ``cache_index = 0`` (calling it
    again starts new sequences). Blocks inside ``nn.Stack`` get stacked
    caches (one per block, leading axis ``n``), allocated under ``tl.vmap``
    as the blocks were built. ``decode`` is not switched on: use
    ``nn.set_decode(model)``.

    Arguments:
        model: any Module; attention layers are found at any depth.
        batch: the batch size, or a tuple for several batch axes.
        max_length: positions each cache holds (prompt + generated tokens).
        dtype: the caches' dtype (default: each layer's compute dtype, or
            float32).
        sharding: logical axis names of every cache, one per dimension of
            ``(*batch, max_length, num_kv_heads, head_dim)``, e.g.
            ``("batch", None, "heads", "kv")`` (see
            ``MultiHeadAttention.init_cache``); inside ``nn.Stack`` the
            stacked caches get the stack's name in front, as its weights do.
            Default None: no names.

    Returns:
        ``model``, changed in place.

    Example:
        >>> import jax.numpy as jnp
        >>> from toylib import nn
        >>> attn = nn.MultiHeadAttention(2, 8, causal=True, rngs=0)
        >>> model = nn.set_decode(nn.init_cache(nn.Sequential(attn), 3, 16))
        >>> attn.cached_key.value.shape, model(jnp.ones((3, 4, 8))).shape, int(attn.cache_index)
        ((3, 16, 2, 4), (3, 4, 8), 4)
        >>> stack = nn.Stack(lambda r: nn.MultiHeadAttention(2, 8, causal=True, rngs=r), 2, rngs=0)
        >>> _ = nn.init_cache(stack, 3, 16, sharding=("batch", None, "heads", "kv"))
        >>> stack.blocks.cached_key.sharding, stack.blocks.cache_index.sharding
        (('layers', 'batch', None, 'heads', 'kv'), ('layers',))
    """
    batch = (batch,) if isinstance(batch, int) else tuple(batch)
    if not _init_cache(model, batch, max_length, dtype, sharding):
        raise ValueError(NO_ATTENTION.format(kind=type(model).__name__))
    return model


def _init_cache(
    model: Module, batch: tuple[int, ...], max_length: int, dtype: Any, sharding: Names
) -> int:
    """Allocate the caches under ``model``; return how many layers got one."""
    found = 0
    inside: list[tuple[Any, ...]] = []  # paths of Stacks already handled (with their blocks)
    for path, module in iter_modules(model):
        if any(path[: len(p)] == p for p in inside):
            continue
        if isinstance(module, Stack):
            inside.append(path)
            # Allocated per block, as the blocks were built: under vmap.
            vmap(
                lambda blocks: _init_cache(blocks, batch, max_length, dtype, sharding) and None,
                stacked_name=module.stacked_name,
            )(module.blocks)
            found += sum(isinstance(m, MultiHeadAttention) for _, m in iter_modules(module))
        elif isinstance(module, MultiHeadAttention):
            module.init_cache((*batch, max_length, module.in_features), dtype, sharding=sharding)
            found += 1
    return found


def set_decode(model: Module, decode: bool = True) -> Module:
    """Switch every layer of ``model`` with a ``decode`` flag to decoding (or back).

    Like ``model.eval()`` for ``deterministic``: the flag is set on every
    submodule that has one (``nn.MultiHeadAttention``, inside ``nn.Stack``
    too, and user layers that follow the convention).

    Arguments:
        model: any Module.
        decode: the new value (default True; False returns to the full
            forward pass used in training).

    Returns:
        ``model``, changed in place.

    Example:
        >>> from toylib import nn
        >>> attn = nn.MultiHeadAttention(2, 8, rngs=0)
        >>> nn.set_decode(nn.Sequential(attn)).layers[0].decode
        True
    """
    switched = 0
    for _, module in iter_modules(model):
        if "decode" in vars(module):
            module.decode = decode
            switched += 1
    if not switched:
        raise ValueError(NO_DECODE_FLAG.format(kind=type(model).__name__))
    return model
