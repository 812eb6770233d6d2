"""Rngs: named random-number streams whose state lives in Variables.

Each stream holds a key and a counter in ``RngState`` Variables; drawing a key
folds the counter into the key and increments the counter. Because the
counter is a Variable, drawing inside ``tl.jit`` advances it outside too, and
the same seed always gives the same sequence.

``rngs.params()`` draws from the ``params`` stream, falling back to
``default`` when there is no such stream; ``rngs()`` draws from ``default``.

Example:
    >>> import jax, toylib as tl
    >>> rngs = tl.Rngs(0, dropout=1)      # a default stream and a dropout stream
    >>> k1, k2 = rngs.params(), rngs.params()   # 'params' falls back to default
    >>> bool((jax.random.key_data(k1) != jax.random.key_data(k2)).any())
    True
    >>> int(rngs.default.count.value)
    2
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from toylib._core.module import Module
from toylib._core.variables import RngState

__all__ = ["RngStream", "Rngs", "as_key", "as_rngs"]

UNKNOWN_STREAM = """\
Rngs has no stream {name!r} and no 'default' stream to fall back on
(streams: {streams}).
Fix: create the stream, or a default one that every stream falls back on:

    rngs = tl.Rngs({name}=0)      # or tl.Rngs(0)
"""

BAD_SEED = """\
{where}: expected an int seed, a jax.random key or tl.Rngs, got {got}.
Fix: e.g. `rngs=0`, `rngs=jax.random.key(0)` or `rngs=tl.Rngs(params=0)`.
"""


def as_key(seed: Any, where: str = "tl.Rngs") -> jax.Array:
    """A typed jax.random key from an int seed, a typed key or a raw uint32 key."""
    if isinstance(seed, int | np.integer) and not isinstance(seed, bool):
        return jax.random.key(int(seed))
    if isinstance(seed, jax.Array | np.ndarray):
        if jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key):
            return seed
        if seed.dtype == jnp.uint32 and seed.shape[-1:] == (2,):
            return jax.random.wrap_key_data(seed)
        if jnp.issubdtype(seed.dtype, jnp.integer) and seed.ndim == 0:
            return jax.random.key(seed)
    raise TypeError(BAD_SEED.format(where=where, got=repr(seed)[:80]))


class RngStream(Module):
    """One stream: a key and a counter (both ``RngState``). Call it for a fresh key.

    Arguments:
        key: a typed key (or a batch of keys, e.g. from ``split``).
        tag: the stream's name.

    Example:
        >>> import jax, toylib as tl
        >>> stream = tl.RngStream(jax.random.key(0), tag="dropout")
        >>> stream().shape, int(stream.count.value)
        ((), 1)
    """

    def __init__(self, key: jax.Array, *, tag: str = "default") -> None:
        self.key = RngState(key)
        self.count = RngState(jnp.zeros(key.shape, jnp.uint32))
        self.tag = tag

    def __call__(self) -> jax.Array:
        key, count = self.key.value, self.count.value
        if key.ndim == 0:
            new = jax.random.fold_in(key, count)
        else:  # a batch of streams (after split): one fresh key each
            new = jax.vmap(jax.random.fold_in)(key.reshape(-1), count.reshape(-1))
            new = new.reshape(key.shape)
        self.count.value = count + 1
        return new

    def split(self, n: int) -> RngStream:
        """A new stream holding ``n`` independent keys (for vmapped init)."""
        if self.key.value.ndim != 0:
            raise ValueError(
                f"RngStream.split: stream {self.tag!r} already holds keys of shape "
                f"{self.key.value.shape}; split the unsplit Rngs instead."
            )
        return RngStream(jax.random.split(self(), n), tag=self.tag)

    def fork(self) -> RngStream:
        """A new, independent stream seeded from this one."""
        return RngStream(self(), tag=self.tag)


class Rngs(Module):
    """Named random-number streams: ``Rngs(0)``, ``Rngs(params=0, dropout=1)``.

    Arguments:
        default: seed of the ``default`` stream (int, key, or RngStream).
        **streams: seeds of named streams.

    Returns:
        An Rngs; ``rngs.<name>()`` gives a fresh key from that stream (or from
        ``default`` if it has none), ``rngs()`` from ``default``.

    Example:
        >>> import toylib as tl
        >>> rngs = tl.Rngs(params=0, dropout=1)
        >>> rngs.dropout().shape
        ()
        >>> len(tl.Rngs(0).split(4).default.key.value)   # 4 streams, for vmap
        4
    """

    def __init__(self, default: Any = None, /, **streams: Any) -> None:
        if default is not None:
            streams = {"default": default, **streams}
        for name, seed in streams.items():
            if hasattr(Rngs, name):
                raise ValueError(f"tl.Rngs: {name!r} cannot name a stream (it is a method).")
            if isinstance(seed, RngStream):
                setattr(self, name, seed)
            else:
                setattr(self, name, RngStream(as_key(seed, f"tl.Rngs({name}=...)"), tag=name))

    def __getattr__(self, name: str) -> RngStream:
        # Only reached for names that are not attributes: fall back to default.
        if name.startswith("_"):
            raise AttributeError(name)
        streams = vars(self)
        if "default" in streams:
            return streams["default"]
        raise AttributeError(UNKNOWN_STREAM.format(name=name, streams=sorted(streams) or "none"))

    def __getitem__(self, name: str) -> RngStream:
        return getattr(self, name)

    def __call__(self) -> jax.Array:
        return self.default()

    def streams(self) -> dict[str, RngStream]:
        """The streams by name."""
        return {k: v for k, v in vars(self).items() if isinstance(v, RngStream)}

    def split(self, n: int) -> Rngs:
        """New Rngs whose every stream holds ``n`` keys: vmap a constructor over it."""
        return Rngs(**{name: stream.split(n) for name, stream in self.streams().items()})

    def fork(self) -> Rngs:
        """New, independent Rngs with the same stream names."""
        return Rngs(**{name: stream.fork() for name, stream in self.streams().items()})


def as_rngs(rngs: Any, where: str = "rngs") -> Rngs:
    """Accept ``Rngs``, an int seed, a key or an RngStream where layers take ``rngs=``."""
    if isinstance(rngs, Rngs):
        return rngs
    if isinstance(rngs, RngStream):
        return Rngs(rngs)
    return Rngs(as_key(rngs, where))
