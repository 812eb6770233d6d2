"""Filters: select state by Variable type, by path, or by any predicate.

A filter is one of

* a type, e.g. ``tl.Param``: matches instances of that type;
* ``...`` or ``True``: matches everything; ``None`` or ``False``: nothing;
* a callable ``(path, value) -> bool``; ``path`` is a tuple of attribute
  names, list indices and dict keys, ``value`` the Variable (or bare array);
* ``tl.PathContains('attn')``: the path has this element;
* ``tl.Any(a, b)``, ``tl.All(a, b)``, ``tl.Not(a)``; a tuple or list of
  filters means ``tl.Any``.

All filter objects compare by value and hash, so they can key caches.

Example:
    >>> import toylib as tl
    >>> keep = tl.All(tl.Param, tl.Not(tl.PathContains("bias")))
    >>> tl.filters.to_predicate(keep)(("layer", "kernel"), tl.Param(1.0))
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any as _Any

__all__ = ["All", "Any", "Not", "PathContains", "to_predicate"]

Predicate = Callable[[tuple, _Any], bool]

BAD_FILTER = """\
{filter!r} is not a filter. A filter is a Variable type (tl.Param), `...`
(everything), None (nothing), True/False, a predicate `(path, value) -> bool`,
tl.PathContains(name), tl.Any(...), tl.All(...), tl.Not(...), or a tuple of
filters. For example:

    tl.split(model, tl.Param, ...)
"""


def to_predicate(filter: _Any) -> Predicate:
    """Turn a filter into a function ``(path, value) -> bool``."""
    if isinstance(filter, type):
        return lambda path, value: isinstance(value, filter)
    if filter is Ellipsis or filter is True:
        return lambda path, value: True
    if filter is None or filter is False:
        return lambda path, value: False
    if isinstance(filter, tuple | list):
        return Any(*filter)
    if callable(filter):
        return filter
    raise TypeError(BAD_FILTER.format(filter=filter))


class _Combinator:
    """Shared equality, hashing and repr for the filter objects below."""

    def __init__(self, *filters: _Any) -> None:
        self.filters = tuple(filters)
        self._predicates = tuple(to_predicate(f) for f in filters)

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.filters == other.filters

    def __hash__(self) -> int:
        return hash((type(self), self.filters))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(_name, self.filters))})"


def _name(filter: _Any) -> str:
    if filter is Ellipsis:
        return "..."
    return filter.__name__ if isinstance(filter, type) else repr(filter)


class Any(_Combinator):
    """Matches when at least one of the filters matches.

    Example:
        >>> import toylib as tl
        >>> tl.Any(tl.Param, tl.BatchStat)
        Any(Param, BatchStat)
    """

    def __call__(self, path: tuple, value: _Any) -> bool:
        return any(p(path, value) for p in self._predicates)


class All(_Combinator):
    """Matches when every filter matches."""

    def __call__(self, path: tuple, value: _Any) -> bool:
        return all(p(path, value) for p in self._predicates)


class Not(_Combinator):
    """Matches when the filter does not.

    Example:
        >>> import toylib as tl
        >>> tl.filters.to_predicate(tl.Not(tl.Param))((), tl.BatchStat(0.0))
        True
    """

    def __init__(self, filter: _Any) -> None:
        super().__init__(filter)

    def __call__(self, path: tuple, value: _Any) -> bool:
        return not self._predicates[0](path, value)


class PathContains(_Combinator):
    """Matches values whose path has ``key`` as one of its elements.

    Example:
        >>> import toylib as tl
        >>> tl.PathContains("attn")(("blocks", 2, "attn", "kernel"), None)
        True
    """

    def __init__(self, key: _Any) -> None:
        self.filters = (key,)
        self.key = key

    def __call__(self, path: tuple, value: _Any) -> bool:
        return self.key in path

    def __repr__(self) -> str:
        return f"PathContains({self.key!r})"
