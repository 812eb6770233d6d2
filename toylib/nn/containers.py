"""Containers: Sequential (a chain of callables), MLP (Linear layers) and Stack (scanned blocks)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from toylib._core.calls import labelled
from toylib._core.module import Module
from toylib._core.rngs import Rngs, as_rngs
from toylib.nn._sharding import Names
from toylib.nn.linear import Linear
from toylib.transforms.batching import Carry, scan, vmap
from toylib.transforms.stacking import check_stacked_name

__all__ = ["MLP", "Sequential", "Stack"]

MLP_FEATURES_SHARDING = """\
MLP(features_sharding={names!r}): expected one logical axis name (a str, or None: not
sharded) per entry of features={features}, {n} in all; got {got}.
Fix: e.g. `features_sharding={example}`: layer i's kernel is then named (names[i], names[i + 1]).
"""


class Sequential(Module):
    """Apply layers in order: ``Sequential(a, b, c)(x) == c(b(a(x)))``.

    Layers may be Modules or plain functions (``jax.nn.relu``); functions are
    static. Index, iterate and assign into it like a list.

    Arguments:
        *layers: the callables, applied first to last.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from toylib import nn
        >>> model = nn.Sequential(nn.Linear(2, 8, rngs=0), jax.nn.relu, nn.Linear(8, 1, rngs=1))
        >>> model(jnp.ones((5, 2))).shape
        (5, 1)
        >>> model[0] = nn.Linear(2, 8, rngs=2)       # surgery is plain assignment
    """

    def __init__(self, *layers: Callable) -> None:
        self.layers = list(layers)

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        """Apply each layer; extra arguments go to the first layer only."""
        for i, layer in enumerate(self.layers):
            x = layer(x, *args, **kwargs) if i == 0 else layer(x)
        return x

    def __getitem__(self, index: int) -> Callable:
        return self.layers[index]

    def __setitem__(self, index: int, layer: Callable) -> None:
        # Rebuild rather than assign in place: a Sequential of plain functions
        # holds them in a (static) tuple, and the new layer may be a Module.
        layers = list(self.layers)
        layers[index] = layer
        self.layers = layers

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[Callable]:
        return iter(self.layers)


class MLP(Module):
    """A multi-layer perceptron: Linear layers with an activation between them.

    Arguments:
        features: sizes from input to output, e.g. ``[784, 128, 10]`` makes
            two Linear layers (784->128, 128->10).
        activation: applied after every layer but the last (default relu).
        final_activation: applied after the last layer (default none).
        use_bias, dtype, param_dtype: passed to every Linear.
        features_sharding: one logical axis name (a str, or None: not
            sharded) per entry of ``features``, e.g. ``("embed", "mlp",
            "embed")`` for ``[d, 4 * d, d]``: layer ``i``'s kernel is named
            ``(names[i], names[i + 1])`` and its bias ``(names[i + 1],)``, so
            the size between two layers has one name for both. Default None:
            no names (replicated). For other layouts, build the Linear layers
            yourself with their own ``kernel_sharding``.
        rngs: ``tl.Rngs``, an int seed or a key.

    Returns:
        A Module mapping ``(*batch, features[0])`` to ``(*batch, features[-1])``.

    Example:
        >>> import jax.numpy as jnp
        >>> from toylib import nn
        >>> mlp = nn.MLP([4, 32, 32, 2], rngs=0)
        >>> mlp(jnp.ones((8, 4))).shape, len(mlp.layers)
        ((8, 2), 3)
        >>> named = nn.MLP([4, 16, 4], features_sharding=("embed", "mlp", "embed"), rngs=0)
        >>> named.layers[0].kernel.sharding, named.layers[1].kernel.sharding
        (('embed', 'mlp'), ('mlp', 'embed'))
    """

    def __init__(
        self,
        features: Sequence[int],
        *,
        activation: Callable = jax.nn.relu,
        final_activation: Callable | None = None,
        use_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        features_sharding: Names = None,
        rngs: Rngs | int | jax.Array,
    ) -> None:
        if len(features) < 2:
            raise ValueError(
                f"MLP(features={list(features)}): give at least an input and an output size, "
                "e.g. MLP([in_features, hidden, out_features])."
            )
        names = _feature_names(features_sharding, list(features))
        rngs = as_rngs(rngs, "MLP(rngs=...)")
        pairs = itertools.pairwise(names) if names is not None else itertools.repeat(None)
        self.layers: list[Linear] = [
            Linear(
                a,
                b,
                use_bias=use_bias,
                dtype=dtype,
                param_dtype=param_dtype,
                kernel_sharding=pair,
                bias_sharding=None if pair is None else pair[1:],
                rngs=rngs,
            )
            for (a, b), pair in zip(itertools.pairwise(features), pairs, strict=False)
        ]
        self.activation = activation
        self.final_activation = final_activation

    def __call__(self, x: Float[ArrayLike, "*batch din"]) -> Float[Array, "*batch dout"]:
        *hidden, last = self.layers
        for layer in hidden:
            x = self.activation(layer(x))
        x = last(x)
        return x if self.final_activation is None else self.final_activation(x)


def _feature_names(names: Any, features: list[int]) -> tuple[str | None, ...] | None:
    """``features_sharding`` as a tuple of one name per size (MLP_FEATURES_SHARDING if not)."""
    if names is None:
        return None
    n = len(features)
    if isinstance(names, list | tuple) and not isinstance(names, str):
        entries = tuple(names)
        if len(entries) == n and all(e is None or isinstance(e, str) for e in entries):
            return entries
        # A wrong count is a ValueError, a wrong kind a TypeError, as for a layer's names.
        error: type[Exception] = ValueError if len(entries) != n else TypeError
        got = f"{len(entries)} entries" if len(entries) != n else "entries that are not str or None"
        start = tuple(e if e is None or isinstance(e, str) else None for e in entries)
    else:
        error, got = TypeError, f"a {type(names).__name__}"
        start = (names,) if isinstance(names, str) else ()
    example = (start[:n] + (None,) * n)[:n]
    raise error(
        MLP_FEATURES_SHARDING.format(names=names, features=features, n=n, got=got, example=example)
    )


class Stack(Module):
    """``n`` identical blocks, built with ``vmap`` and applied in order with ``scan``.

    Every Variable of the blocks is stored once with a leading axis of size
    ``n`` (``stack.blocks.attn.query.kernel.shape == (n, ...)``), so tracing
    and compiling cost the same for 4 blocks or 64: one block is traced, and
    XLA sees one loop. Each block gets its own random keys (the ``rngs``
    streams are split ``n`` ways), and state a block updates when called
    (BatchNorm statistics, dropout key counters, caches) is written back
    stacked.

    Arguments:
        make_block: ``make_block(rngs) -> Module``, called once under
            ``tl.vmap`` with per-block random streams.
        n: the number of blocks.
        rngs: ``tl.Rngs``, an int seed or a key.
        unroll: blocks per loop iteration, passed to ``jax.lax.scan``
            (default 1; ``True`` or ``n`` unrolls the whole loop). A plain
            attribute, settable later. Unrolling trades compile time for
            step time: XLA:CPU runs a scanned loop markedly slower than the
            same blocks unrolled (benchmarks/README.md measures both), while
            compile time grows with the number of blocks in one iteration.
        stacked_name: the logical axis name of the stacked axis (default
            ``"layers"``): every Variable of the blocks that has ``sharding``
            names (a layer built with ``*_sharding=``) gets it in front,
            ``("layers", "embed", "mlp")``, and inside each block's call it
            is taken off again, so a block sees the names it was built with.
            Variables without names stay without (replicated). None leaves
            the names as the blocks made them. See ``tl.vmap``.

    Returns:
        A Module; ``stack(x, *args, **kwargs)`` computes
        ``x = block_i(x, *args, **kwargs)`` for ``i = 0..n-1``. ``args`` are
        the same for every block (e.g. a mask); each block must return
        an ``x`` of the shape and dtype it was given.

    To do something to every block, vmap over them:
    ``tl.vmap(lambda b: b.attn.init_cache(shape))(stack.blocks)``;
    ``nn.init_cache(model, batch, max_length)`` does exactly that for the KV
    caches of a whole model.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from toylib import nn
        >>> stack = nn.Stack(lambda rngs: nn.Linear(4, 4, rngs=rngs), 3, rngs=0)
        >>> stack.blocks.kernel.shape
        (3, 4, 4)
        >>> stack(jnp.ones((2, 4))).shape
        (2, 4)
        >>> named = nn.Stack(lambda r: nn.Linear(4, 4, kernel_sharding=("embed", "mlp"), rngs=r),
        ...                  3, rngs=0)
        >>> named.blocks.kernel.sharding, named.blocks.bias.get_metadata("sharding", None)
        (('layers', 'embed', 'mlp'), None)
    """

    def __init__(
        self,
        make_block: Callable[[Rngs], Module],
        n: int,
        *,
        rngs: Rngs | int | jax.Array,
        unroll: int | bool = 1,
        stacked_name: str | None = "layers",
    ) -> None:
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"Stack(n={n!r}): n must be a positive int (the number of blocks).")
        whole = unroll is True
        if not whole and (isinstance(unroll, bool) or not isinstance(unroll, int) or unroll < 1):
            raise ValueError(
                f"Stack(unroll={unroll!r}): give a positive int (blocks per loop "
                "iteration) or True (unroll all of them)."
            )
        check_stacked_name(stacked_name, "nn.Stack")
        rngs = as_rngs(rngs, "Stack(rngs=...)")
        self.blocks = vmap(make_block, stacked_name=stacked_name)(rngs.split(n))
        self.n = n
        self.unroll = unroll
        self.stacked_name = stacked_name

    def __call__(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        def body(x: Any, block: Module, *args: Any) -> tuple[Any, None]:
            # `block` is one slice, rebuilt inside the scan: label it so a
            # shape error names `model.<stack>.blocks[*].<layer>`.
            with labelled(block, ".blocks[*]"):
                return block(x, *args, **kwargs), None

        # Extra arguments are broadcast (axis None), not closed over, so a
        # Module among them may still update its state inside.
        in_axes = (Carry, 0, *([None] * len(args)))
        scanned = scan(body, in_axes=in_axes, unroll=self.unroll, stacked_name=self.stacked_name)
        x, _ = scanned(x, self.blocks, *args)
        return x

    def __len__(self) -> int:
        return self.n
