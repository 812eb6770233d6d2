"""tl.jit's shardings: jax.jit's per-argument prefixes, mapped onto toylib's leaves.

``jax.jit(f, in_shardings=(a, b))`` gives one entry per positional argument,
each a pytree prefix of that argument. toylib's compiled function takes two
internal lists of leaves instead, so the user's entries are mapped here, leaf
by leaf, through the arguments (a Module argument takes one Sharding for all
its Variables or a State of them, with the paths of ``tl.state``).

Outputs are only known once traced, so ``out_shardings`` are applied inside
the trace as sharding constraints on the returned values, and so is the rule
that keeps state in place: a Variable's new value is constrained to where it
was placed (its ``placement`` metadata, from ``tl.sharding``, or its
``in_shardings`` entry), so a train step never gathers or replicates it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import AxisType, NamedSharding, Sharding

from toylib._core.paths import Path, format_path
from toylib._core.skeleton import is_graph_node
from toylib._core.variables import Variable, placement_of
from toylib.transforms.lifting import plain_key

__all__ = ["check_given", "constrain_returned", "input_shardings", "kept", "output_shardings"]

BAD_SHARDINGS = """\
tl.jit({name}): {which} must be a jax.sharding.Sharding (for every argument), or a
tuple with one entry per positional argument, each a Sharding, None (leave it to
JAX), or a pytree prefix of that argument (a Module argument: one Sharding, or a
State of them as tl.sharding.specs gives); got {got}.
Fix: e.g. `tl.jit(step, in_shardings=(None, batch_sharding))`.
"""

TOO_MANY = """\
tl.jit({name}): in_shardings has {given} entries, but the call passes {n} positional
argument(s), so entry {first} is for an argument that does not exist.
Fix: give one entry per positional argument (None for those JAX may place).
"""

NO_ARRAYS = """\
tl.jit({name}): in_shardings[{arg}] is a {kind}, but args[{arg}] holds no array
(it is {what}: a static value, which is part of the compiled program, not placed).
Fix: give None for it, or pass the value as an array.
"""

NOT_IN_ARGUMENT = """\
tl.jit({name}): in_shardings[{arg}] gives a sharding for `{where}`, which the
argument does not have (its leaves: {known}).
Fix: build the shardings from the argument itself, e.g.
`jax.tree.map(lambda p: NamedSharding(mesh, p), tl.sharding.specs(model, rules))`.
"""

MISSING_IN_PREFIX = """\
tl.jit({name}): {which} gives no sharding for `{where}` (the prefix has no entry
{key!r} there; it has {known}).
Fix: give an entry for it (None leaves it to JAX), or one Sharding for the whole.
"""

TOO_DEEP = """\
tl.jit({name}): {which} goes deeper than `{where}`, which takes one Sharding
(an array, or a Module in the output): its entry there is a {kind}, not a
Sharding or None.
Fix: give one Sharding (or None) for it.
"""


def check_given(given: Any, which: str, name: str) -> None:
    """Refuse, when ``tl.jit`` is made, what cannot be a sharding prefix."""
    if given is None or isinstance(given, Sharding | tuple | list | Mapping):
        return
    raise TypeError(BAD_SHARDINGS.format(name=name, which=which, got=type(given).__name__))


def _is_end(x: Any) -> bool:
    return x is None or isinstance(x, Sharding)


def _descend(entry: Any, keys: Path, used: set, ctx: tuple) -> Any:
    """The Sharding (or None) that the prefix ``entry`` gives the leaf at ``keys``."""
    name, which, root = ctx
    walked: list[Any] = []
    for key in keys:
        if _is_end(entry):
            return entry
        walked.append(key)
        if isinstance(entry, Mapping):
            if key not in entry:
                where = format_path(tuple(walked), root)
                known = ", ".join(map(repr, entry)) or "nothing"
                raise ValueError(
                    MISSING_IN_PREFIX.format(
                        name=name, which=which, where=where, key=key, known=known
                    )
                )
            entry = entry[key]
        elif isinstance(entry, list | tuple) and isinstance(key, int) and key < len(entry):
            entry = entry[key]
        else:
            where = format_path(tuple(walked), root)
            raise ValueError(
                MISSING_IN_PREFIX.format(
                    name=name, which=which, where=where, key=key, known=type(entry).__name__
                )
            )
    if not _is_end(entry):
        where = format_path(tuple(keys), root)
        raise ValueError(
            TOO_DEEP.format(name=name, which=which, where=where, kind=type(entry).__name__)
        )
    used.add(tuple(keys))
    return entry


def _prefix_paths(entry: Any, path: Path = ()) -> list[Path]:
    """The paths at which a prefix gives a Sharding or None."""
    if _is_end(entry):
        return [path]
    items = entry.items() if isinstance(entry, Mapping) else enumerate(entry)
    return [p for key, sub in items for p in _prefix_paths(sub, (*path, key))]


def input_shardings(given: Any, flat: Any, n_args: int, name: str) -> list[Any]:
    """The in_shardings entry of every leaf of ``flat`` (None: JAX places it)."""
    n = len(flat.paths)
    if given is None:
        return [None] * n
    if isinstance(given, Sharding):
        return [given] * n
    if not isinstance(given, tuple | list):
        raise TypeError(
            BAD_SHARDINGS.format(name=name, which="in_shardings", got=type(given).__name__)
        )
    if len(given) > n_args:
        raise ValueError(TOO_MANY.format(name=name, given=len(given), n=n_args, first=n_args))
    used: dict[int, set] = {i: set() for i in range(len(given))}
    out = []
    for path in flat.paths:
        top = path[0]
        arg = flat.origin[top]
        if not isinstance(arg, int) or arg >= len(given):
            out.append(None)  # keywords, and arguments after the last entry
            continue
        keys = (*flat.keypath[top], *path[1:])
        ctx = (name, f"in_shardings[{arg}]", f"args[{arg}]")
        out.append(_descend(given[arg], keys, used[arg], ctx))
    with_leaves = {flat.origin[path[0]] for path in flat.paths}
    for arg, entry in enumerate(given):  # entries for leaves the arguments lack
        if entry is not None and arg not in with_leaves:
            top = _top_of(flat, arg)
            what = f"a {type(flat.tops[top]).__name__}" if top >= 0 else "None or empty"
            raise ValueError(
                NO_ARRAYS.format(name=name, arg=arg, kind=type(entry).__name__, what=what)
            )
        if _is_end(entry):
            continue
        reached = used[arg]
        for path in _prefix_paths(entry):
            if not any(path == r[: len(path)] for r in reached):
                known = ", ".join(
                    format_path(r, "") or "(the argument)" for r in sorted(reached, key=str)[:5]
                )
                raise ValueError(
                    NOT_IN_ARGUMENT.format(
                        name=name,
                        arg=arg,
                        where=format_path(path, f"args[{arg}]"),
                        known=known or "none",
                    )
                )
    return out


def _top_of(flat: Any, arg: int) -> int:
    """The first top-level leaf of positional argument ``arg`` (-1: it has none, e.g. None)."""
    return next((t for t, origin in enumerate(flat.origin) if origin == arg), -1)


def kept(flat: Any, leaf_in: Sequence[Any]) -> dict[tuple, Any]:
    """``{leaf path: sharding}`` for the Variables whose new values must stay in place."""
    out = {}
    for path, leaf, given in zip(flat.paths, flat.leaves, leaf_in, strict=True):
        if not isinstance(leaf, Variable):
            continue
        placed = placement_of(leaf) or given
        if placed is not None:
            out[path] = placed
    return out


def output_shardings(given: Any, out: Any, name: str) -> list[Any]:
    """The out_shardings entry of every top-level output leaf (graph nodes whole)."""
    tops, _ = jax.tree_util.tree_flatten_with_path(out, is_leaf=is_graph_node)
    if given is None:
        return [None] * len(tops)
    result = []
    ctx = (name, "out_shardings", "out")
    for keypath, _ in tops:  # a Module output is one top: it takes one Sharding
        result.append(_descend(given, tuple(plain_key(k) for k in keypath), set(), ctx))
    return result


def _constrain(x: Any, sharding: Any) -> Any:
    if not jax.tree.leaves(x):
        return x  # nothing placed (None, an empty container)
    if isinstance(sharding, NamedSharding) and any(
        t == AxisType.Explicit for t in sharding.mesh.axis_types
    ):
        return jax.sharding.reshard(x, sharding)
    return jax.lax.with_sharding_constraint(x, sharding)


def constrain_returned(
    spec: Any, returned: list, keep: Mapping[tuple, Any], out_tops: Sequence[Any]
) -> list:
    """``returned``, each value constrained where its Variable or output must go."""
    if not keep and not any(s is not None for s in out_tops):
        return returned
    returned = list(returned)
    for path, source in zip(spec.paths, spec.sources, strict=True):
        if source >= 0:
            continue  # an input value left where it was
        where = path[0]
        sharding = keep.get(path[1:]) if where == 0 else out_tops[path[1]]
        if sharding is not None:
            returned[~source] = _constrain(returned[~source], sharding)
    return returned
