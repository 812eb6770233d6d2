"""Filters: select state by Variable type, by path, or by any predicate.

A filter is one of

* a type, e.g. ``tl.Param``: matches instances of that type;
* ``...`` or ``True``: matches everything; ``None`` or ``False``: nothing;
* a callable ``(path, value) -> bool``; ``path`` is a tuple of attribute
  names, list indices and dict keys, ``value`` the Variable (or bare array);
* ``tl.PathContains('attn')``: the path has this element;
* ``tl.Any(a, b)``, ``tl.All(a, b)``, ``tl.Not(a)``; a tuple or list of
  filters means ``tl.Any``.

``to_predicate`` turns each into a predicate object (``OfType``,
``Everything``, ``Nothing``, or the combinators) that compares by value and
hashes, so equal filters key caches alike, and that prints as the code that
makes it (``filter_repr``), in every message.

Example:
    >>> import toylib as tl
    >>> keep = tl.All(tl.Param, tl.Not(tl.PathContains("bias")))
    >>> tl.filters.to_predicate(keep)(("layer", "kernel"), tl.Param(1.0))
    True
    >>> tl.filters.to_predicate(tl.Param) == tl.filters.to_predicate(tl.Param)
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import EllipsisType
from typing import Any as _Any
from typing import TypeAlias, cast

__all__ = [
    "All",
    "Any",
    "BaseFilter",
    "Everything",
    "Filter",
    "Not",
    "Nothing",
    "OfType",
    "PathContains",
    "check_catch_all_last",
    "filter_repr",
    "is_catch_all",
    "to_predicate",
]

Predicate = Callable[[tuple, _Any], bool]

BAD_FILTER = """\
{filter!r} is not a filter. A filter is a Variable type (tl.Param), `...`
(everything), None (nothing), True/False, a predicate `(path, value) -> bool`,
tl.PathContains(name), tl.Any(...), tl.All(...), tl.Not(...), or a tuple of
filters. For example:

    tl.split(model, tl.Param, ...)
"""


class BaseFilter:
    """A predicate ``(path, value) -> bool`` that compares and hashes by its arguments.

    Subclass it for a filter of your own: equal arguments give equal filters,
    so transforms' caches treat two of them alike.

    Example:
        >>> import toylib as tl
        >>> class Named(tl.filters.BaseFilter):
        ...     def __call__(self, path, value):
        ...         return bool(path) and path[-1] == self.args[0]
        >>> Named("bias") == Named("bias"), Named("bias")(("layer", "bias"), None)
        (True, True)
    """

    __slots__ = ("args",)

    def __init__(self, *args: _Any) -> None:
        self.args = args

    def __call__(self, path: tuple, value: _Any) -> bool:
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.args == other.args  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self.args))

    def __repr__(self) -> str:
        return f"tl.filters.{type(self).__name__}({', '.join(map(filter_repr, self.args))})"


# What a filter argument may be (see the module docstring), for signatures and
# editors. Nested tuples/lists stay `tuple`/`list`: a recursive alias is more
# than beartype (the runtime checks in the tests) resolves.
Filter: TypeAlias = (
    type | EllipsisType | bool | BaseFilter | Predicate | tuple[_Any, ...] | list[_Any] | None
)
"""What a filter argument may be, for annotations: ``def f(model, wrt: Filter = tl.Param)``.

Example:
    >>> import toylib as tl
    >>> Filter = tl.filters.Filter
    >>> def count(model, wrt: Filter = tl.Param) -> int:
    ...     return len(tl.state(model, wrt).flat())
    >>> from toylib import nn
    >>> count(nn.Linear(2, 3, rngs=0)), count(nn.Linear(2, 3, rngs=0), tl.PathContains("bias"))
    (2, 1)
"""


class OfType(BaseFilter):
    """Matches instances of a type: what the filter ``tl.Param`` means.

    Example:
        >>> import toylib as tl
        >>> is_param = tl.filters.to_predicate(tl.Param)
        >>> type(is_param).__name__, is_param((), tl.Param(1.0)), is_param((), tl.BatchStat(1.0))
        ('OfType', True, False)
    """

    __slots__ = ()

    def __call__(self, path: tuple, value: _Any) -> bool:
        return isinstance(value, self.args[0])

    def __repr__(self) -> str:
        return filter_repr(self.args[0])


class Everything(BaseFilter):
    """Matches everything: what ``...`` and ``True`` mean.

    Example:
        >>> import toylib as tl
        >>> everything = tl.filters.to_predicate(...)
        >>> type(everything).__name__, everything(("any", "path"), tl.Cache(0.0))
        ('Everything', True)
    """

    __slots__ = ()

    def __call__(self, path: tuple, value: _Any) -> bool:
        return True

    def __repr__(self) -> str:
        return "..."


class Nothing(BaseFilter):
    """Matches nothing: what ``None`` and ``False`` mean.

    Example:
        >>> import toylib as tl
        >>> nothing = tl.filters.to_predicate(None)
        >>> type(nothing).__name__, nothing(("kernel",), tl.Param(1.0))
        ('Nothing', False)
    """

    __slots__ = ()

    def __call__(self, path: tuple, value: _Any) -> bool:
        return False

    def __repr__(self) -> str:
        return "None"


def to_predicate(filter: _Any) -> Predicate:
    """Turn a filter into a predicate ``(path, value) -> bool`` (a hashable ``BaseFilter``).

    Example:
        >>> import toylib as tl
        >>> in_attn = tl.filters.to_predicate(tl.PathContains("attn"))
        >>> in_attn(("blocks", 0, "attn", "kernel"), tl.Param(1.0)), in_attn(("mlp",), None)
        (True, False)
        >>> in_attn == tl.filters.to_predicate(tl.PathContains("attn"))  # keys caches alike
        True
    """
    if isinstance(filter, BaseFilter):
        return filter
    if isinstance(filter, type):
        return OfType(filter)
    if filter is Ellipsis or filter is True:
        return Everything()
    if filter is None or filter is False:
        return Nothing()
    if isinstance(filter, tuple | list):
        return Any(*filter)
    if callable(filter):
        return cast(Predicate, filter)  # what it returns is the user's to get right
    raise TypeError(BAD_FILTER.format(filter=filter))


CATCH_ALL_NOT_LAST = """\
{caller}: the filter {catch_all} (everything) comes before {rest}, which could then
never match anything. The catch-all goes last:

    {fixed}
"""


def check_catch_all_last(
    filters: Sequence[_Any], caller: str, fixed: Callable[[list[int]], str]
) -> None:
    """A catch-all followed by more filters is an error; ``fixed(order)`` shows the fix.

    ``order`` lists the filters' positions with the catch-all moved last.

    Example:
        >>> import toylib as tl
        >>> tl.filters.check_catch_all_last([tl.Param, ...], "split", str)  # fine
        >>> tl.filters.check_catch_all_last([..., tl.Param], "split", str)
        Traceback (most recent call last):
        ValueError: split: ...
    """
    for i, f in enumerate(filters[:-1]):
        if is_catch_all(f):
            order = [j for j in range(len(filters)) if j != i] + [i]
            raise ValueError(
                CATCH_ALL_NOT_LAST.format(
                    caller=caller,
                    catch_all=filter_repr(f),
                    rest=", ".join(map(filter_repr, filters[i + 1 :])),
                    fixed=fixed(order),
                )
            )


def is_catch_all(filter: _Any) -> bool:
    """Whether ``filter`` matches everything (``...``, ``True``, ``Everything()``).

    Example:
        >>> import toylib as tl
        >>> [tl.filters.is_catch_all(f) for f in (..., True, tl.Param, None)]
        [True, True, False, False]
    """
    return filter is Ellipsis or filter is True or isinstance(filter, Everything)


def filter_repr(filter: _Any) -> str:
    """The filter as code: ``tl.Param``, ``...``, ``tl.Any(tl.Param, ...)``.

    Example:
        >>> import toylib as tl
        >>> tl.filters.filter_repr(tl.Param), tl.filters.filter_repr(...)
        ('tl.Param', '...')
        >>> print(tl.filters.filter_repr(tl.Any(tl.Param, tl.PathContains("attn"))))
        tl.Any(tl.Param, tl.PathContains('attn'))
    """
    if filter is Ellipsis:
        return "..."
    if isinstance(filter, type):
        prefix = "tl." if filter.__module__.startswith("toylib") else ""
        return prefix + filter.__name__
    return repr(filter)


class _Combinator(BaseFilter):
    """Filters built from filters: their predicates are made once."""

    __slots__ = ("_predicates",)

    def __init__(self, *filters: _Any) -> None:
        super().__init__(*filters)
        self._predicates = tuple(to_predicate(f) for f in filters)

    @property
    def filters(self) -> tuple:
        return self.args

    def __repr__(self) -> str:
        return f"tl.{type(self).__name__}({', '.join(map(filter_repr, self.args))})"


class Any(_Combinator):
    """Matches when at least one of the filters matches.

    Example:
        >>> import toylib as tl
        >>> tl.Any(tl.Param, tl.BatchStat)
        tl.Any(tl.Param, tl.BatchStat)
    """

    __slots__ = ()

    def __call__(self, path: tuple, value: _Any) -> bool:
        return any(p(path, value) for p in self._predicates)


class All(_Combinator):
    """Matches when every filter matches.

    Example:
        >>> import toylib as tl
        >>> from toylib import nn
        >>> model = nn.Linear(2, 3, rngs=0)
        >>> kernels = tl.All(tl.Param, tl.PathContains("kernel"))
        >>> [p for p, _ in tl.iter_variables(model, kernels)]
        [('kernel',)]
    """

    __slots__ = ()

    def __call__(self, path: tuple, value: _Any) -> bool:
        return all(p(path, value) for p in self._predicates)


class Not(_Combinator):
    """Matches when the filter does not.

    Example:
        >>> import toylib as tl
        >>> tl.filters.to_predicate(tl.Not(tl.Param))((), tl.BatchStat(0.0))
        True
    """

    __slots__ = ()

    def __init__(self, filter: _Any) -> None:
        super().__init__(filter)

    def __call__(self, path: tuple, value: _Any) -> bool:
        return not self._predicates[0](path, value)


class PathContains(BaseFilter):
    """Matches values whose path has ``key`` as one of its elements.

    Example:
        >>> import toylib as tl
        >>> tl.PathContains("attn")(("blocks", 2, "attn", "kernel"), None)
        True
    """

    __slots__ = ()

    def __init__(self, key: _Any) -> None:
        super().__init__(key)

    @property
    def key(self) -> _Any:
        return self.args[0]

    def __call__(self, path: tuple, value: _Any) -> bool:
        return self.args[0] in path

    def __repr__(self) -> str:
        return f"tl.PathContains({self.args[0]!r})"
