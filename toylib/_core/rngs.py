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

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from toylib._core.module import Module
from toylib._core.skeleton import iter_graph
from toylib._core.variables import RngState

__all__ = ["RngStream", "Rngs", "SplitRngs", "as_key", "as_rngs", "split_rngs"]

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
        if isinstance(seed, jax.Array) and jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
            return seed  # (a numpy array cannot hold typed keys)
        if seed.dtype == jnp.uint32 and seed.shape[-1:] == (2,):
            return jax.random.wrap_key_data(jnp.asarray(seed))
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

    def normal(self, shape: tuple[int, ...] = (), dtype: Any = jnp.float32) -> jax.Array:
        """Standard normal values drawn with a fresh key from this stream."""
        return jax.random.normal(self(), shape, dtype)

    def uniform(
        self,
        shape: tuple[int, ...] = (),
        dtype: Any = jnp.float32,
        minval: float = 0.0,
        maxval: float = 1.0,
    ) -> jax.Array:
        """Uniform values in ``[minval, maxval)`` drawn with a fresh key from this stream."""
        return jax.random.uniform(self(), shape, dtype, minval, maxval)

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
        default_seed: seed of the ``default`` stream (int, key, or RngStream).
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

    # Not `default, /`: inspect.Signature.bind (Python 3.11; the tests' runtime type
    # checks bind every call) refuses a keyword named like a positional-only parameter.
    def __init__(self, default_seed: Any = None, /, **streams: Any) -> None:
        if default_seed is not None:
            streams = {"default": default_seed, **streams}
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

    def split(self, n: int | dict[str, int]) -> Rngs:
        """New Rngs whose streams hold ``n`` keys each: vmap a constructor over it.

        ``n`` may be a dict ``{stream name: n}``: those streams are split, the
        others forked (independent, one key each).

        Example:
            >>> import toylib as tl
            >>> rngs = tl.Rngs(params=0, dropout=1).split({"dropout": 3})
            >>> rngs.dropout.key.shape, rngs.params.key.shape
            ((3,), ())
        """
        counts = n if isinstance(n, dict) else dict.fromkeys(self.streams(), n)
        unknown = sorted(set(counts) - set(self.streams()))
        if unknown:
            raise ValueError(
                UNKNOWN_STREAM.format(name=unknown[0], streams=sorted(self.streams()) or "none")
            )
        return Rngs(
            **{
                name: stream.split(counts[name]) if name in counts else stream.fork()
                for name, stream in self.streams().items()
            }
        )

    def fork(self) -> Rngs:
        """New, independent Rngs with the same stream names."""
        return Rngs(**{name: stream.fork() for name, stream in self.streams().items()})

    def normal(self, shape: tuple[int, ...] = (), dtype: Any = jnp.float32) -> jax.Array:
        """Standard normal values from the ``default`` stream (``rngs.<name>.normal`` for another).

        Example:
            >>> import toylib as tl
            >>> tl.Rngs(0).normal((2, 3)).shape
            (2, 3)
        """
        return self.default.normal(shape, dtype)

    def uniform(
        self,
        shape: tuple[int, ...] = (),
        dtype: Any = jnp.float32,
        minval: float = 0.0,
        maxval: float = 1.0,
    ) -> jax.Array:
        """Uniform values in ``[minval, maxval)`` from the ``default`` stream."""
        return self.default.uniform(shape, dtype, minval, maxval)


def as_rngs(rngs: Any, where: str = "rngs") -> Rngs:
    """Accept ``Rngs``, an int seed, a key or an RngStream where layers take ``rngs=``."""
    if isinstance(rngs, Rngs):
        return rngs
    if isinstance(rngs, RngStream):
        return Rngs(rngs)
    return Rngs(as_key(rngs, where))


ALREADY_SPLIT = """\
tl.split_rngs: stream {tag!r} at `{path}` already holds keys of shape {shape}
(it is split already, by an enclosing tl.split_rngs or by Rngs.split).
Fix: split once, with the batch size of the vmap or the length of the scan.
"""

NO_STREAMS = """\
tl.split_rngs: found no Rngs stream{which} in the {kind} given.
Fix: pass the model (or Rngs) whose streams the vmapped or scanned call draws from,
e.g. `with tl.split_rngs(model, 4): ...`.
"""


class SplitRngs:
    """What ``tl.split_rngs`` returns: a context manager, and a decorator. See ``split_rngs``."""

    def __init__(self, node: Any, n: int, only: Any) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"tl.split_rngs: n must be a positive int, got {n!r}.")
        self.node, self.n, self.only = node, n, only
        self._saved: list[list[tuple[RngStream, Any, Any]]] = []

    def _streams(self, node: Any) -> list[tuple[str, RngStream]]:
        only = self.only
        names = None if only is Ellipsis else {only} if isinstance(only, str) else set(only)
        found = [
            (".".join(map(str, path)) or "rngs", obj)
            for path, obj in iter_graph(node)
            if isinstance(obj, RngStream) and (names is None or obj.tag in names)
        ]
        if not found:
            which = "" if names is None else f" named {sorted(names)}"
            raise ValueError(NO_STREAMS.format(which=which, kind=type(node).__name__))
        return found

    def __enter__(self) -> Any:
        streams = self._streams(self.node)
        for path, stream in streams:
            if stream.key.value.ndim != 0:
                raise ValueError(
                    ALREADY_SPLIT.format(tag=stream.tag, path=path, shape=stream.key.value.shape)
                )
        saved = []
        for _, stream in streams:
            keys = jax.random.split(stream(), self.n)  # advances the stream once
            saved.append((stream, stream.key.value, stream.count.value))
            stream.key.value = keys
            stream.count.value = jnp.zeros((self.n,), jnp.uint32)
        self._saved.append(saved)
        return self.node

    def __exit__(self, *exc: Any) -> None:
        for stream, key, count in self._saved.pop():
            stream.key.value = key
            stream.count.value = count

    def __call__(self, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            with self:
                return fn(*args, **kwargs)

        return run


class _SplitArguments:
    """``@tl.split_rngs(n=4)``: split the streams found in each call's arguments."""

    def __init__(self, n: int, only: Any) -> None:
        self.n, self.only = n, only

    def __call__(self, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            with SplitRngs((args, kwargs), self.n, self.only):
                return fn(*args, **kwargs)

        return run


def split_rngs(node: Any = None, n: int | None = None, *, only: Any = ...) -> Any:
    """Give each vmapped example (or scanned step) its own keys, for a block or a call.

    Within the block every Rngs stream of ``node`` (or those named in
    ``only``) holds ``n`` keys, split from one fresh key of the stream; map
    them with ``tl.StateAxes({tl.RngState: 0, ...: None})`` in ``tl.vmap``'s
    (or ``tl.scan``'s) in_axes, so that example ``i`` draws from key ``i``.
    Afterwards the streams hold their own key again, advanced by one draw, so
    the next block gets new keys.

    Arguments:
        node: a Module (or Rngs, or a pytree of them). Leave it out to use as
            a decorator that splits the streams of each call's arguments:
            ``@tl.split_rngs(n=4)``.
        n: the number of keys: the vmapped batch size or the scan length.
        only: a stream name or names to split (default: all).

    Returns:
        A context manager (also usable as a decorator).

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> from toylib import nn
        >>> drop = nn.Dropout(0.5, rngs=0)
        >>> axes = (tl.StateAxes({tl.RngState: 0, ...: None}), 0)
        >>> with tl.split_rngs(drop, 4):
        ...     y = tl.vmap(lambda d, x: d(x), in_axes=axes)(drop, jnp.ones((4, 8)))
        >>> len({tuple(row) for row in y.tolist()}) > 1     # a different mask per example
        True
        >>> drop.rngs.key.shape                               # restored
        ()
    """
    if n is None:
        raise TypeError("tl.split_rngs needs n, the number of keys: tl.split_rngs(model, n=4).")
    if node is None:
        return _SplitArguments(n, only)
    return SplitRngs(node, n, only)
