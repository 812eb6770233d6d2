"""Tracked containers: the lists and dicts a Module stores report their mutations.

``self.layers = [...]`` stores a ``List``: a ``list`` in every way (and a
pytree like one) whose mutating methods (``append``, ``__setitem__``,
``sort``...) tell the watchers registered on it (``watchers.py``) that it
changed, so ``model.layers.append(block)`` invalidates tl.jit's cached
flattening of ``model``. A ``dict`` becomes a ``Dict``, an ``OrderedDict``
a ``TrackedOrderedDict`` and a ``defaultdict`` a ``TrackedDefaultDict``;
they keep the behaviour of what was assigned. Other list or dict subclasses
cannot be tracked (their constructors and methods are unknown): assigning
one is an error that says so (``UNTRACKABLE``).

Each tracked container also has a ``_toylib_layout`` slot: set when toylib
or jax rebuilds it, it says which items are data (see ``skeleton.py``); a
mutation clears it, and the items' own types decide again.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable
from typing import Any

import jax
from jax.tree_util import DictKey, SequenceKey

from toylib._core.paths import sorted_keys
from toylib._core.watchers import SLOT, changed

__all__ = [
    "LAYOUT",
    "Dict",
    "List",
    "TrackedDefaultDict",
    "TrackedOrderedDict",
    "is_tracked",
    "new_mapping",
    "tracked",
    "untracked",
]

LAYOUT = "_toylib_layout"

UNTRACKABLE = """\
{where}: a {kind} cannot be stored as a Module attribute. toylib tracks
in-place changes to the lists and dicts a Module holds (so that tl.jit sees
`model.layers.append(...)`), which it can do for list, dict, OrderedDict and
defaultdict, but not for a subclass it does not know.
Fix: store a plain {base} (or a tuple), e.g.

    self.{name} = {base}(value)
"""


def _tracked(method: Callable) -> Callable:
    @functools.wraps(method)
    def mutate(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        finally:  # after the change: a cache checking now sees the new structure
            object.__setattr__(self, LAYOUT, None)
            changed(self)

    return mutate


def _track(cls: type, base: type, names: str) -> None:
    for name in names.split():
        setattr(cls, name, _tracked(getattr(base, name)))


class List(list):
    """The list a Module stores for a list attribute: a list that reports mutation."""

    __slots__ = (LAYOUT, SLOT)

    def __reduce__(self) -> tuple:
        return List, (list(self),)


class Dict(dict):
    """The dict a Module stores for a dict attribute: a dict that reports mutation."""

    __slots__ = (LAYOUT, SLOT)

    def __reduce__(self) -> tuple:
        return Dict, (dict(self),)


class TrackedOrderedDict(collections.OrderedDict):
    """The OrderedDict a Module stores for an OrderedDict attribute."""

    __slots__ = (LAYOUT, SLOT)

    def __reduce__(self) -> tuple:
        return TrackedOrderedDict, (list(self.items()),)


class TrackedDefaultDict(collections.defaultdict):
    """The defaultdict a Module stores for a defaultdict attribute."""

    __slots__ = (LAYOUT, SLOT)

    def __reduce__(self) -> tuple:
        return TrackedDefaultDict, (self.default_factory, list(self.items()))


_LIST_METHODS = "__setitem__ __delitem__ __iadd__ __imul__ append extend insert pop remove clear"
_DICT_METHODS = "__setitem__ __delitem__ __ior__ pop popitem clear update setdefault"
_track(List, list, _LIST_METHODS + " sort reverse")
_track(Dict, dict, _DICT_METHODS)
_track(TrackedOrderedDict, collections.OrderedDict, _DICT_METHODS + " move_to_end")
# A missing key inserts the default: a mutation too.
_track(TrackedDefaultDict, collections.defaultdict, _DICT_METHODS + " __missing__")

_TRACKED = {
    list: List,
    dict: Dict,
    collections.OrderedDict: TrackedOrderedDict,
    collections.defaultdict: TrackedDefaultDict,
}
_PLAIN = {tracked: plain for plain, tracked in _TRACKED.items()}


def is_tracked(value: Any) -> bool:
    return type(value) in _PLAIN


def new_mapping(kind: type, pairs: Any, factory: Any = None) -> Any:
    """A mapping of type ``kind`` from ``(key, value)`` pairs (a defaultdict needs its factory)."""
    if issubclass(kind, collections.defaultdict):
        return kind(factory, pairs)
    return kind(pairs)


def tracked(value: list | dict, where: str, name: str) -> Any:
    """The tracked container for ``value`` (itself if it is one already).

    Raises ``TypeError`` (``UNTRACKABLE``) for list and dict subclasses toylib does not know.
    """
    kind = type(value)
    if kind in _PLAIN:
        return value
    new = _TRACKED.get(kind)
    if new is None:
        base = "list" if isinstance(value, list) else "dict"
        raise TypeError(UNTRACKABLE.format(where=where, kind=kind.__name__, base=base, name=name))
    if isinstance(value, collections.defaultdict):  # (new is TrackedDefaultDict)
        return TrackedDefaultDict(value.default_factory, value)
    return new(value)


def untracked(value: Any) -> Any:
    """The plain list/dict/OrderedDict/defaultdict a tracked container stands for (deep)."""
    plain = _PLAIN.get(type(value))
    if plain is None:
        return value
    if plain is list:
        return [untracked(v) for v in value]
    items = [(k, untracked(v)) for k, v in value.items()]
    return new_mapping(plain, items, getattr(value, "default_factory", None))


# -- pytree registration: each like the jax container it stands for -------------------


def _register_mapping(kind: type, order: Callable[[Any], list]) -> None:
    def flatten_with_keys(d: Any) -> tuple:
        keys = tuple(order(d))
        return [(DictKey(k), d[k]) for k in keys], (keys, getattr(d, "default_factory", None))

    def flatten(d: Any) -> tuple:
        keys = tuple(order(d))
        return [d[k] for k in keys], (keys, getattr(d, "default_factory", None))

    def unflatten(aux: tuple, children: Any) -> Any:
        keys, factory = aux
        return new_mapping(kind, zip(keys, children, strict=True), factory)

    jax.tree_util.register_pytree_with_keys(kind, flatten_with_keys, unflatten, flatten)


jax.tree_util.register_pytree_with_keys(
    List,
    lambda x: ([(SequenceKey(i), v) for i, v in enumerate(x)], None),
    lambda _, children: List(children),
    lambda x: (list(x), None),
)
_register_mapping(Dict, sorted_keys)
_register_mapping(TrackedDefaultDict, sorted_keys)
_register_mapping(TrackedOrderedDict, list)  # insertion order, as jax orders an OrderedDict
