"""Logical names of the stacked axis, for tl.vmap, tl.scan and nn.Stack.

A Variable's `sharding` metadata names each of its dimensions (and its
`placement`, a NamedSharding, places each). Inside tl.vmap / tl.scan a
mapped Variable has one dimension fewer, so its names must too: otherwise
a layer that reads them (or tl.sharding, inside the body) would see one
name too many. The entry of the mapped axis is taken out on the way in and
put back on the way out, and a Variable that comes out with a new axis (a
vmapped constructor) gets `stacked_name` there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jax.sharding import NamedSharding, PartitionSpec

from toylib._core.paths import Path
from toylib._core.variables import PLACEMENT, Variable
from toylib.transforms.lifting import Flat

__all__ = ["check_stacked_name", "named_leaves", "restack", "strip_axis"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


SHARDING = "sharding"

BAD_STACKED_NAME = """\
{caller}: stacked_name={value!r}; expected the logical axis name (a str) given to the
stacked axis of Variables that have sharding names, or None to leave names alone.
Fix: e.g. `stacked_name="layers"` (the default).
"""


def check_stacked_name(value: Any, caller: str) -> None:
    """Raise BAD_STACKED_NAME unless ``value`` is a str or None (``nn.Stack`` checks its own)."""
    if value is not None and not isinstance(value, str):
        raise TypeError(BAD_STACKED_NAME.format(caller=caller, value=value))


def named_leaves(flat: Flat, axes: list[Any]) -> list[tuple[int, int, int]]:
    """``(node number, axis, ndim)`` of the input Variables with names and a mapped axis.

    Found outside the trace, once per call; most calls have none (no
    metadata), and then nothing is done inside.
    """
    number: dict[int, int] | None = None
    found = []
    for leaf, value, axis in zip(flat.leaves, flat.values, axes, strict=True):
        ndim = getattr(value, "ndim", None)
        if not (_is_int(axis) and ndim and isinstance(leaf, Variable) and leaf._metadata):
            continue
        if SHARDING in leaf._metadata or PLACEMENT in leaf._metadata:
            if number is None:
                number = {id(node): n for n, node in enumerate(flat.nodes)}
            found.append((number[id(leaf)], axis, ndim))
    return found


def strip_axis(inside: dict[int, Any], named: list[tuple[int, int, int]]) -> dict[int, dict]:
    """Take the mapped axis's entry out of the names of the inside Variables in ``named``.

    Returns ``{id(inside Variable): {metadata name: the entry taken}}``, to
    put the same entries back on the way out.
    """
    taken: dict[int, dict] = {}
    for n, axis, ndim in named:
        variable = inside[n]
        position = axis % ndim
        metadata, removed = dict(variable._metadata), {}
        names = metadata.get(SHARDING)
        if isinstance(names, tuple) and len(names) == ndim:
            removed[SHARDING] = names[position]
            metadata[SHARDING] = names[:position] + names[position + 1 :]
        placement = metadata.get(PLACEMENT)
        if isinstance(placement, NamedSharding):
            metadata[PLACEMENT], removed[PLACEMENT] = _spec_without(placement, position)
        if removed:
            object.__setattr__(variable, "_metadata", metadata)
            taken[id(variable)] = removed
    return taken


def restack(
    pairs: list[tuple[Path, Any]],
    axis_of: Callable[[int, Path, Any], Any],
    taken: dict[int, dict],
    stacked_name: str,
) -> bool:
    """Put the stacked axis back into the names of the Variables that leave with one.

    ``axis_of(k, path, leaf)`` is the axis leaf ``k`` leaves with. A Variable
    whose names describe its slice (as many as the slice's dimensions) gets
    the entry taken on the way in, or ``stacked_name`` if it had none (it
    was made inside, or named inside). Returns whether anything changed.
    """
    changed_any = False
    for k, (path, leaf) in enumerate(pairs):
        if not (isinstance(leaf, Variable) and leaf._metadata):
            continue
        names, placement = leaf._metadata.get(SHARDING), leaf._metadata.get(PLACEMENT)
        if names is None and placement is None:
            continue
        ndim = getattr(leaf._value, "ndim", None)
        axis = axis_of(k, path, leaf)
        if ndim is None or not _is_int(axis):
            continue
        position = axis % (ndim + 1)
        removed = taken.get(id(leaf), {})
        metadata = dict(leaf._metadata)
        if isinstance(names, tuple) and len(names) == ndim:
            entry = removed.get(SHARDING, stacked_name)
            metadata[SHARDING] = (*names[:position], entry, *names[position:])
        if isinstance(placement, NamedSharding) and len(placement.spec) <= ndim:
            # A Variable made inside gets None: replicated along the new axis.
            metadata[PLACEMENT] = _spec_with(placement, position, removed.get(PLACEMENT))
        if metadata != leaf._metadata:
            object.__setattr__(leaf, "_metadata", metadata)
            changed_any = True
    return changed_any


# A PartitionSpec may be shorter than the array (the missing trailing entries
# are None), and P("a") is not equal to P("a", None): the spec is only
# spliced where it has entries, so that a round trip gives back an equal one.


def _spec_without(sharding: NamedSharding, position: int) -> tuple[NamedSharding, Any]:
    """``sharding`` without the entry for dimension ``position``, and that entry."""
    spec = tuple(sharding.spec)
    if position >= len(spec):
        return sharding, None
    rest = spec[:position] + spec[position + 1 :]
    return sharding.update(spec=PartitionSpec(*rest)), spec[position]


def _spec_with(sharding: NamedSharding, position: int, entry: Any) -> NamedSharding:
    """``sharding`` with ``entry`` for a new dimension at ``position``."""
    spec = tuple(sharding.spec)
    if entry is None and position >= len(spec):
        return sharding
    spec += (None,) * (position - len(spec))
    return sharding.update(spec=PartitionSpec(*spec[:position], entry, *spec[position:]))
