"""State: the functional view of a model's Variables.

A State is a nested mapping from attribute names, list indices and dict keys
to sub-States and Variables (or bare arrays, for array attributes that are
not wrapped in a Variable). It is a pytree whose leaves are the arrays, so it
goes straight into ``jax.tree.map``, ``jax.grad``, optax and checkpoints.
As a pytree its keys are visited in sorted order, so two States with the same
paths always have the same structure, however they were built.

Example:
    >>> import jax.numpy as jnp, toylib as tl
    >>> layer = {"kernel": tl.Param(jnp.ones(2)), "mean": tl.BatchStat(jnp.zeros(2))}
    >>> s = tl.State({"layer": layer})
    >>> list(s.flat())
    [('layer', 'kernel'), ('layer', 'mean')]
    >>> params, stats = s.split(tl.Param, ...)
    >>> list(params.flat()), s.layer.kernel.shape
    ([('layer', 'kernel')], (2,))
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any

import jax
from jax.tree_util import DictKey

from toylib._core.filters import check_catch_all_last, filter_repr, to_predicate
from toylib._core.paths import Path, format_path, nest, sorted_keys
from toylib._core.variables import Variable, describe_value

__all__ = ["State"]

UNMATCHED = """\
{caller}: the {kind} at `{path}` matches none of the filters ({filters}).
Every Variable must go to one State. Add a catch-all `...` as the last filter:

    graphdef, {names}, rest = tl.split(model, {first}, ...)
"""


class State(MutableMapping):
    """A nested mapping of Variables, usable as a pytree.

    Arguments:
        mapping: a (nested) mapping; nested plain dicts become States.

    Returns:
        The State. ``state.flat()`` gives ``{path_tuple: Variable}``,
        ``State.from_flat`` is its inverse; ``state.filter(...)`` and
        ``state.split(...)`` select by filters; ``State.merge`` combines.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> state = tl.State({"layer": {"w": tl.Param(jnp.ones(2)), "n": tl.BatchStat(0)}})
        >>> state
        State({
          'layer': State({
            'w': Param(float32[2]),
            'n': BatchStat(0),
          }),
        })
        >>> list(state.filter(tl.Param).flat())
        [('layer', 'w')]
    """

    __slots__ = ("_mapping",)

    def __init__(self, mapping: Any = (), /) -> None:
        items = mapping.items() if hasattr(mapping, "items") else mapping
        self._mapping = {
            k: State(v) if isinstance(v, dict) and not isinstance(v, State) else v for k, v in items
        }

    # -- mapping protocol -----------------------------------------------------

    def __getitem__(self, key: Any) -> Any:
        return self._mapping[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._mapping[key] = value

    def __delitem__(self, key: Any) -> None:
        del self._mapping[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._mapping)

    def __len__(self) -> int:
        return len(self._mapping)

    def __getattr__(self, name: str) -> Any:
        try:
            return object.__getattribute__(self, "_mapping")[name]
        except (KeyError, AttributeError):
            raise AttributeError(f"State has no entry {name!r}") from None

    # Values are arrays, so a State is compared by identity, like a Module.
    __eq__ = object.__eq__
    __hash__ = None  # type: ignore[assignment]

    # -- flat view -------------------------------------------------------------

    def flat(self) -> dict[Path, Any]:
        """``{path: leaf}`` for every Variable (or bare array), depth first."""
        return dict(_flat_items(self, ()))

    @classmethod
    def from_flat(cls, flat: Any) -> State:
        """Build a nested State from ``{path: leaf}`` (or an iterable of pairs)."""
        return nest(flat, cls)

    # -- filters ------------------------------------------------------------------

    def filter(self, *filters: Any) -> State | tuple[State, ...]:
        """The entries matching each filter (one State per filter, no error if unmatched)."""
        flat = self.flat()
        states = tuple(
            State.from_flat((p, v) for p, v in flat.items() if pred(p, v))
            for pred in map(to_predicate, filters)
        )
        return states[0] if len(states) == 1 else states

    def split(self, *filters: Any) -> State | tuple[State, ...]:
        """Partition by filters: each entry goes to the first filter that matches.

        An entry matched by no filter is an error naming its path.
        """
        parts = split_flat(self.flat().items(), filters, caller="State.split")
        states = tuple(State.from_flat(part) for part in parts)
        return states[0] if len(states) == 1 else states

    @staticmethod
    def merge(*states: State) -> State:
        """Combine States; for a path in several, the last one wins."""
        flat: dict[Path, Any] = {}
        for state in states:
            flat.update(state.flat())
        return State.from_flat(flat)

    def __repr__(self) -> str:
        return _repr(self, 0)

    def __treescope_repr__(self, path: str | None, subtree_renderer: Any) -> Any:
        # treescope's protocol: toylib's handlers (and treescope) load on first use.
        from toylib import _treescope

        return _treescope.render_state(self, path, subtree_renderer)


def _flat_items(state: State, prefix: Path) -> Iterator[tuple[Path, Any]]:
    for key, value in state._mapping.items():
        if isinstance(value, State):
            yield from _flat_items(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def split_flat(
    items: Any, filters: tuple, caller: str, strict: bool = True
) -> list[list[tuple[Path, Any]]]:
    """Send each ``(path, leaf)`` to the first matching filter.

    A leaf no filter matches is an error naming its path, or dropped if not ``strict``.
    """
    _check_catch_all_last(filters, caller)
    predicates = [to_predicate(f) for f in filters]
    parts: list[list[tuple[Path, Any]]] = [[] for _ in filters]
    for path, leaf in items:
        for part, pred in zip(parts, predicates, strict=True):
            if pred(path, leaf):
                part.append((path, leaf))
                break
        else:
            if not strict:
                continue
            first = filters[0] if filters else "tl.Param"
            raise ValueError(
                UNMATCHED.format(
                    caller=caller,
                    kind=type(leaf).__name__ if isinstance(leaf, Variable) else "array",
                    path=format_path(path),
                    filters=", ".join(map(filter_repr, filters)),
                    names=", ".join(f"state{i}" for i in range(len(filters))) or "params",
                    first=filter_repr(first),
                )
            )
    return parts


def _check_catch_all_last(filters: tuple, caller: str) -> None:
    def fixed(order: list[int]) -> str:
        listed = ", ".join(filter_repr(filters[j]) for j in order)
        return f"{caller}(model, {listed})" if caller.startswith("tl.") else f"split({listed})"

    check_catch_all_last(filters, caller, fixed)


def _repr(state: State, depth: int) -> str:
    if not state._mapping:
        return "State({})"
    pad = "  " * (depth + 1)
    lines = []
    for key, value in state._mapping.items():
        text = _repr(value, depth + 1) if isinstance(value, State) else _leaf_repr(value)
        lines.append(f"{pad}{key!r}: {text},")
    return "State({\n" + "\n".join(lines) + "\n" + "  " * depth + "})"


def _leaf_repr(leaf: Any) -> str:
    return repr(leaf) if isinstance(leaf, Variable) else describe_value(leaf)


# -- pytree registration ----------------------------------------------------------


def _sorted_items(state: State) -> list[tuple[Any, Any]]:
    mapping = state._mapping
    return [(k, mapping[k]) for k in sorted_keys(mapping)]


def _flatten(state: State) -> tuple[list[Any], tuple]:
    items = _sorted_items(state)
    return [v for _, v in items], tuple(k for k, _ in items)


def _flatten_with_keys(state: State) -> tuple[list[tuple[Any, Any]], tuple]:
    items = _sorted_items(state)
    return [(DictKey(k), v) for k, v in items], tuple(k for k, _ in items)


def _unflatten(keys: tuple, children: Any) -> State:
    state = object.__new__(State)
    state._mapping = dict(zip(keys, children, strict=True))
    return state


jax.tree_util.register_pytree_with_keys(State, _flatten_with_keys, _unflatten, _flatten)
