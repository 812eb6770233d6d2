"""tl.vmap and tl.scan: batching and looping over Modules' state.

Both choose an axis for every leaf of the arguments: an int or ``None``
for a whole argument, or per filter for a Module with ``tl.StateAxes``.
``tl.scan`` adds ``tl.Carry`` for the carried argument.

A Module or Variable reachable from two arguments is one object inside the
transform (lifting.py), so it has one axis: two arguments that give it two
axes are an error rather than a silent choice. Plain arrays are values, not
objects, and may be passed twice with different axes, as in ``jax.vmap``.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, overload

import jax
import jax.numpy as jnp

from toylib._core import graph
from toylib._core.filters import check_catch_all_last, filter_repr, to_predicate
from toylib._core.paths import Path, format_path
from toylib._core.skeleton import iter_graph
from toylib._core.variables import RngState, Variable
from toylib.transforms.lifting import (
    Flat,
    OutSpec,
    P,
    R,
    Transform,
    call_inside,
    flatten_call,
    flatten_result,
    interleave,
    is_graph_node,
    reraise_check,
    unflatten_call,
    write_back,
)
from toylib.transforms.stacking import check_stacked_name, named_leaves, restack, strip_axis

__all__ = ["Carry", "Scanned", "StateAxes", "Vmapped", "scan", "vmap"]

NO_AXIS = """\
{caller}: `{path}` ({kind}) matches none of the filters of its StateAxes ({filters}).
Fix: end the StateAxes with a catch-all, e.g. `tl.StateAxes({{tl.Param: 0, ...: None}})`.
"""

BAD_STATE_AXIS = """\
tl.StateAxes: the axis of {filter} is {axis!r}; an axis is an int (the axis mapped
or scanned over), None (broadcast) or tl.Carry (carried by tl.scan).
Fix: e.g. `tl.StateAxes({{tl.Param: 0, ...: None}})`.
"""

BAD_AXES = """\
{caller}: in_axes has {given} entries but the function got {n} positional arguments.
Fix: give one axis (an int, None, tl.StateAxes{carry}) per positional argument.
"""

BAD_AXIS = """\
{caller}: {where} is {value!r}; expected {expected}.
Fix: e.g. `{example}`.
"""
_EXPECTED_VMAP_AXIS = "an int, None, or a tl.StateAxes of ints and None (tl.Carry is tl.scan's)"
_EXPECTED_SCAN_AXIS = "an int, None, tl.Carry or a tl.StateAxes of those"

BAD_OUT_AXIS = """\
{caller}: out_axes entries must be ints or None (an axis, or broadcast), got {value!r}.
Fix: e.g. `out_axes=0`, or `out_axes=(0, None)` for a pair of outputs.
"""

TWO_AXES = """\
{caller}: `{here}` is the same {kind} object as `{there}`: one object inside the
transform, with one axis. Expected the same axis from both arguments; got
{axis_there!r} for `{there}` and {axis_here!r} for `{here}` (at `{leaf}`).
Fix: give both arguments the same axis for it (a tl.StateAxes can match the other
argument's axes), pass it once and reach it through the other argument, or pass
a copy to map it separately: `f(model, tl.clone(model))`.
"""

VMAP_OUT_AXES = """\
{caller}: out_axes={out_axes!r} has {n} entries, so the function must return a tuple
of {n}; it returned {got}.
Fix: return a tuple of {n}, or give one axis for the whole output (`out_axes=0`).
"""

SCAN_STRUCTURE = """\
tl.scan: the structure of the arguments changed inside the loop body (a
Variable or attribute was added, removed or replaced). A loop carries the
same structure from one step to the next.
Fix: create Variables before the loop, or collect values through the
body's outputs instead of new attributes.
"""

BAD_SCAN_OUTPUT = """\
tl.scan: out_axes is {out_axes!r}, so the body must return {expected}; got a {kind}.
Fix: return `(carry, y)`, or say what the body returns: `out_axes=tl.Carry`
(the carry only) or `out_axes=0` (ys only, with no tl.Carry in in_axes).
"""

BAD_SCAN_OUT_AXES = """\
{caller}: out_axes={out_axes!r} is not one tl.scan knows:
{problem}.
out_axes says what the body returns: `(tl.Carry, 0)` for `(carry, y)` (ys stacked
along axis 0, or another int), `tl.Carry` for the carry only, `0` for ys only.
Fix: e.g. `tl.scan(body, in_axes=(tl.Carry, 0), out_axes=(tl.Carry, 0))`.
"""

_NOT_AN_AXIS = "ys are stacked along an axis (an int); they cannot be broadcast (None)"

CARRY_IN_NOT_OUT = """\
{caller}: in_axes={in_axes!r} carries an argument (tl.Carry) but out_axes={out_axes!r}
has no tl.Carry, so the carry the body returns would be lost.
Fix: `out_axes=(tl.Carry, {ys})` (the body returns `(carry, y)`) or `out_axes=tl.Carry`
(the carry only).
"""

CARRY_OUT_NOT_IN = """\
{caller}: out_axes={out_axes!r} returns a carry (tl.Carry) but in_axes={in_axes!r}
marks no argument tl.Carry, so there is no carry to start from.
Fix: mark the carried argument, e.g. `in_axes=(tl.Carry, 0)`, or return ys only
(`out_axes=0`).
"""

MANY_CARRIES = """\
{caller}: in_axes marks {n} arguments tl.Carry ({where});
a scan has one carry.
Fix: carry them together as one argument, a tuple:

    tl.scan(body, in_axes=(tl.Carry, 0))((h, c), xs)   # body(carry, x) -> (carry, y)
"""


class _CarryType:
    def __repr__(self) -> str:
        return "tl.Carry"


Carry = _CarryType()
"""Marks the carried argument (in ``in_axes``) and output (in ``out_axes``) of ``tl.scan``.

Example:
    >>> import jax.numpy as jnp, toylib as tl
    >>> def body(total, x):
    ...     return total + x, total
    >>> scanned = tl.scan(body, in_axes=(tl.Carry, 0), out_axes=(tl.Carry, 0))
    >>> total, before = scanned(jnp.array(0.0), jnp.arange(4.0))
    >>> float(total), before.tolist(), tl.Carry
    (6.0, [0.0, 0.0, 1.0, 3.0], tl.Carry)
"""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class StateAxes:
    """Per-filter axes for a Module's state in ``tl.vmap`` / ``tl.scan``.

    Arguments:
        axes: ``{filter: axis}`` in priority order; each Variable takes the
            axis of the first filter it matches (an int, ``None`` for
            broadcast, or ``tl.Carry`` in ``tl.scan``). A catch-all
            (``...``) goes last.

    Example:
        >>> import toylib as tl
        >>> tl.StateAxes({tl.Param: 0, ...: None})
        tl.StateAxes({tl.Param: 0, ...: None})
    """

    def __init__(self, axes: Mapping[Any, Any]) -> None:
        self.axes = tuple(axes.items())
        _check_catch_all_last(self.axes)
        for f, axis in self.axes:
            if not (_is_int(axis) or axis is None or axis is Carry):
                raise ValueError(BAD_STATE_AXIS.format(filter=filter_repr(f), axis=axis))
        self._predicates = tuple((to_predicate(f), axis) for f, axis in self.axes)

    def axis_for(self, path: tuple, leaf: Any, caller: str) -> Any:
        for predicate, axis in self._predicates:
            if predicate(path, leaf):
                return axis
        filters = ", ".join(filter_repr(f) for f, _ in self.axes)
        kind = type(leaf).__name__ if isinstance(leaf, Variable) else "array"
        raise ValueError(
            NO_AXIS.format(caller=caller, path=format_path(path), kind=kind, filters=filters)
        )

    def values(self) -> list[Any]:
        """Every axis this StateAxes can give."""
        return [axis for _, axis in self.axes]

    def __repr__(self) -> str:
        return f"tl.StateAxes({{{', '.join(f'{filter_repr(f)}: {a!r}' for f, a in self.axes)}}})"


def _check_catch_all_last(items: tuple) -> None:
    def fixed(order: list[int]) -> str:
        entries = ", ".join(f"{filter_repr(items[j][0])}: {items[j][1]!r}" for j in order)
        return f"tl.StateAxes({{{entries}}})"

    check_catch_all_last([f for f, _ in items], "tl.StateAxes", fixed)


# -- axes of the arguments --------------------------------------------------------------------


def _check_in_axes(in_axes: Any, caller: str, scan: bool) -> None:
    """Every in_axes entry is an int, None, a StateAxes (or tl.Carry for tl.scan)."""
    entries = in_axes if isinstance(in_axes, list | tuple) else [in_axes]
    for i, axis in enumerate(entries):
        if isinstance(axis, StateAxes):
            # tl.Carry inside a StateAxes is state carried from step to step: loops only.
            ok = scan or Carry not in axis.values()
        else:
            ok = _is_int(axis) or axis is None or (scan and axis is Carry)
        if not ok:
            where = f"in_axes[{i}]" if isinstance(in_axes, list | tuple) else "in_axes"
            raise ValueError(
                BAD_AXIS.format(
                    caller=caller,
                    where=where,
                    value=axis,
                    expected=_EXPECTED_SCAN_AXIS if scan else _EXPECTED_VMAP_AXIS,
                    example="in_axes=(tl.Carry, 0)" if scan else "in_axes=(0, None)",
                )
            )


INCONSISTENT_SIZES = """\
{caller}: the mapped axes have different sizes:
{sizes}
Every leaf mapped over must have the batch size along its axis.{rng_hint}
"""

SPLIT_RNGS_HINT = """
Fix: give the Rngs streams one key per example, as many as the batch:
`with tl.split_rngs(model, n=batch_size): ...`, or do not map their RngState
(`tl.StateAxes({...: None})`)."""


UNBATCHED_UPDATE = """\
{caller}: `{where}` came out with one value per example, but it is not mapped
(its in_axes entry is None): the caller holds one value shared by every example,
so there is no single value to write back. Nothing was changed.
Fix: map that state too, e.g. `in_axes=(tl.StateAxes({{tl.BatchStat: 0, ...: None}}), 0)`,
or reduce it over the examples inside the function with a named axis:

    tl.vmap(f, in_axes=(None, 0), axis_name="batch")   # and in f:
    value = jax.lax.pmean(value, "batch")               # BatchNorm(axis_name="batch") does this
"""


def _unbatched_message(record: tuple, flat: Flat, jax_message: str, caller: str) -> str | None:
    """UNBATCHED_UPDATE for jax's "axis spec None but output was batched", or None.

    jax names the offending output as ``out_axes[group][k]``: the k-th value
    returned in that axis group, which ``record`` maps back to its path.
    """
    found = re.search(r"out_axes\[(\d+)\]\[(\d+)\]", jax_message)
    if found is None:
        return None
    group, k = int(found[1]), int(found[2])
    spec, where = record
    paths = [path for path, s in zip(spec.paths, spec.sources, strict=True) if s < 0]
    in_group = [path for path, g in zip(paths, where, strict=True) if g == group]
    if k >= len(in_group) or in_group[k][0] != 0:
        return None  # an output: jax's own message names out_axes
    return UNBATCHED_UPDATE.format(caller=caller, where=flat.describe(in_group[k][1:]))


def _sizes_message(flat: Flat, axes: list[Any], caller: str) -> str:
    """INCONSISTENT_SIZES: which leaves have which size along their mapped axis."""
    by_size: dict[int, list[int]] = {}
    for i, axis in enumerate(axes):
        if isinstance(axis, int):
            shape = getattr(flat.values[i], "shape", ())
            if len(shape) > axis:
                by_size.setdefault(shape[axis], []).append(i)
    lines = []
    for size, leaves in by_size.items():
        names = ", ".join(f"`{flat.describe(flat.paths[i])}`" for i in leaves[:3])
        more = f" and {len(leaves) - 3} more" if len(leaves) > 3 else ""
        lines.append(f"  size {size}: {names}{more}")
    rng = any(isinstance(flat.leaves[i], RngState) for ls in by_size.values() for i in ls)
    hint = SPLIT_RNGS_HINT if rng else ""
    return INCONSISTENT_SIZES.format(caller=caller, sizes="\n".join(lines), rng_hint=hint)


def _arg_specs(in_axes: Any, n_args: int, caller: str, scan: bool) -> dict[Any, Any]:
    """``{argument position: its in_axes entry}`` (keyword arguments, absent, get 0)."""
    if not isinstance(in_axes, list | tuple):
        return dict.fromkeys(range(n_args), in_axes)
    if len(in_axes) != n_args:
        suffix = " or tl.Carry" if scan else ""
        raise ValueError(BAD_AXES.format(caller=caller, given=len(in_axes), n=n_args, carry=suffix))
    return dict(enumerate(in_axes))


def _axis_of(spec: Any, path: Path, leaf: Any, caller: str) -> Any:
    """The axis an argument's in_axes entry gives one of its leaves (at ``path`` in it)."""
    return spec.axis_for(path, leaf, caller) if isinstance(spec, StateAxes) else spec


def _leaf_axes(flat: Flat, specs: dict[Any, Any], caller: str) -> list[Any]:
    """The axis of every leaf of the arguments."""
    return [
        _axis_of(specs.get(flat.origin[path[0]], 0), flat.arg_path(i), leaf, caller)
        for i, (path, leaf) in enumerate(zip(flat.paths, flat.leaves, strict=True))
    ]


def _check_one_axis(flat: Flat, specs: dict[Any, Any], caller: str) -> None:
    """Raise TWO_AXES if an object reachable from two arguments gets two axes.

    ``graph.flatten`` reports a shared object once, at its first path, so
    without this check the first argument's axis would silently win.
    """
    tops = [t for t, top in enumerate(flat.tops) if is_graph_node(top)]
    if len(tops) < 2:
        return  # one argument holds every object (the usual case): no walk needed
    reach = {t: {id(node): (path, node) for path, node in iter_graph(flat.tops[t])} for t in tops}
    count = Counter(key for nodes in reach.values() for key in nodes)
    if all(n == 1 for n in count.values()):
        return  # nothing is shared between arguments (the usual case): nothing to compare
    first: dict[Any, tuple[int, Path, Any]] = {}
    for t in tops:
        spec = specs.get(flat.origin[t], 0)
        for path, leaf, owner, key in _keyed_leaves(flat.tops[t], reach[t]):
            if count[owner] < 2:
                continue
            axis = _axis_of(spec, (*flat.keypath[t], *path), leaf, caller)
            seen = first.setdefault(key, (t, path, axis))
            if seen[2] != axis:
                _raise_two_axes(flat, reach, seen, (t, path, axis), caller)


def _keyed_leaves(top: Any, reached: dict[int, tuple[Path, Any]]) -> list[tuple]:
    """``(path, leaf, owner id, key)`` for the leaves of one top-level argument leaf.

    The key names the leaf whichever argument it is reached from: a Variable
    is itself; a bare array attribute is its Module and its place in it.
    """
    modules = {path: node for path, node in reached.values() if not isinstance(node, Variable)}
    out = []
    for path, leaf in graph.flatten(top)[1]:
        if isinstance(leaf, Variable):
            out.append((path, leaf, id(leaf), id(leaf)))
            continue
        cut = max(j for j in range(len(path)) if path[:j] in modules)
        owner = id(modules[path[:cut]])
        out.append((path, leaf, owner, (owner, path[cut:])))
    return out


def _raise_two_axes(flat: Flat, reach: dict, there: tuple, here: tuple, caller: str) -> None:
    """TWO_AXES, naming the outermost object the two arguments share on the way to the leaf."""
    t1, _, axis1 = there
    t2, leaf_path2, axis2 = here
    by_path = {path: node for path, node in reach[t2].values()}
    for j in range(len(leaf_path2) + 1):
        node = by_path.get(leaf_path2[:j])
        if node is not None and id(node) in reach[t1]:
            break
    path2 = leaf_path2[:j]
    path1 = reach[t1][id(node)][0]
    raise ValueError(
        TWO_AXES.format(
            caller=caller,
            here=flat.describe((t2, *path2)),
            there=flat.describe((t1, *path1)),
            kind=type(node).__name__,
            axis_here=axis2,
            axis_there=axis1,
            leaf=flat.describe((t2, *leaf_path2)),
        )
    )


# -- vmap -------------------------------------------------------------------------------------


class Vmapped(Transform[P, R]):
    """The callable ``tl.vmap`` returns. See ``vmap``."""

    kind = "tl.vmap"

    def __init__(
        self,
        fn: Callable[P, R],
        in_axes: Any,
        out_axes: Any,
        axis_size: int | None,
        axis_name: Any,
        stacked_name: str | None = "layers",
    ) -> None:
        super().__init__(fn)
        _check_in_axes(in_axes, self.label, scan=False)
        check_stacked_name(stacked_name, self.label)
        self._stacked_name = stacked_name
        values = list(out_axes) if isinstance(out_axes, list | tuple) else [out_axes]
        for value in values:
            if not (_is_int(value) or value is None):
                raise TypeError(BAD_OUT_AXIS.format(caller=self.label, value=value))
        self.in_axes, self.out_axes = in_axes, out_axes
        self._out_values = values
        self._axis_size, self._axis_name = axis_size, axis_name

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        flat = flatten_call(args, kwargs, self.label)
        specs = _arg_specs(self.in_axes, len(args), self.label, scan=False)
        axes = _leaf_axes(flat, specs, self.label)
        _check_one_axis(flat, specs, self.label)
        groups = self._groups(axes, specs)
        named = named_leaves(flat, axes) if self._stacked_name is not None else []
        record: list[tuple[OutSpec, list[int]]] = []

        # A one-argument closure under the user's name, not a partial: jax
        # reads the signature of what it vmaps on every call (for its error
        # messages), and a partial of a bound method costs 3x as much to read.
        def traced(values: list) -> tuple:
            return self._traced(flat, specs, axes, groups, named, record, values)

        traced.__name__ = traced.__qualname__ = getattr(self._fn, "__name__", "fn")
        vmapped = jax.vmap(
            traced,
            in_axes=(axes,),
            out_axes=tuple(groups),
            axis_size=self._axis_size,
            axis_name=self._axis_name,
        )
        try:
            placed = vmapped(list(flat.values))
        except ValueError as error:
            if "inconsistent sizes" in str(error):
                raise ValueError(_sizes_message(flat, axes, self.label)) from None
            if record and "but output was batched" in str(error):
                message = _unbatched_message(record[-1], flat, str(error), self.label)
                if message is not None:
                    raise ValueError(message) from None
            raise
        spec, where = record[-1]
        grouped = [iter(group) for group in placed]
        return write_back(spec, flat, [next(grouped[g]) for g in where])

    def _groups(self, axes: list[Any], specs: dict[Any, Any]) -> list[Any]:
        """Every axis a returned leaf can have, known before tracing (``jax.vmap``'s out_axes).

        The values come back grouped by axis. A Variable created inside takes
        its argument's axis, which may be one no input leaf has (a StateAxes
        entry, or the axis of a Module with no state yet): those count too.
        """
        possible = {*axes, *self._out_values, 0}  # 0: keyword arguments
        for spec in specs.values():
            possible.update(spec.values() if isinstance(spec, StateAxes) else [spec])
        return sorted(possible, key=repr)

    def _traced(
        self,
        flat: Flat,
        specs: dict,
        axes: list,
        groups: list,
        named: list,
        record: list,
        values: list,
    ) -> tuple:
        """The function jax.vmap traces: the returned values, grouped by their axis."""
        args, kwargs, tops, inside = unflatten_call(flat.layout, flat.paths, values)
        taken = strip_axis(inside, named) if named else {}
        out = call_inside(self.label, self._fn, args, kwargs)
        spec, returned, pairs = flatten_result(
            flat.layout, flat.position, tops, out, inside, values
        )
        out_axis = self._output_axes(spec, out)
        input_leaf = _input_leaves(flat, inside)

        def axis_of(k: int, path: Path, leaf: Any) -> Any:
            s = spec.sources[k]
            if s >= 0:
                return axes[s]  # an input leaf, unchanged: it keeps its axis
            if path[0] == 1:
                return out_axis[path[1]]
            return _returned_axis(flat, specs, axes, input_leaf, path, leaf, self.label)

        if self._stacked_name is not None and restack(pairs, axis_of, taken, self._stacked_name):
            # The names are part of the structure: flatten again to record them.
            spec, returned, pairs = flatten_result(
                flat.layout, flat.position, tops, out, inside, values
            )
        placed: list[list] = [[] for _ in groups]
        where = []  # the group of each returned value, to put them back in order outside
        for k, ((path, leaf), s) in enumerate(zip(pairs, spec.sources, strict=True)):
            if s < 0:
                where.append(groups.index(axis_of(k, path, leaf)))
                placed[where[-1]].append(returned[~s])
        record.append((spec, where))
        return tuple(placed)

    def _output_axes(self, spec: OutSpec, out: Any) -> dict[int, Any]:
        """Axis per output top-level leaf, from ``out_axes`` (one, or one per tuple item)."""
        out_axes = self.out_axes
        if not isinstance(out_axes, list | tuple):
            return dict.fromkeys(range(spec.out_treedef.num_leaves), out_axes)
        if not (isinstance(out, list | tuple) and len(out) == len(out_axes)):
            got = _describe_output(out)
            raise ValueError(
                VMAP_OUT_AXES.format(caller=self.label, out_axes=out_axes, n=len(out_axes), got=got)
            )
        axes: list[Any] = []
        for item, axis in zip(out, out_axes, strict=True):
            axes += [axis] * len(jax.tree.leaves(item, is_leaf=is_graph_node))
        return dict(enumerate(axes))


def _describe_output(out: Any) -> str:
    """``a tuple of 3``, ``an array``, ``a Linear``: what a function returned, for messages."""
    if isinstance(out, list | tuple):
        return f"a {type(out).__name__} of {len(out)}"
    return "an array" if isinstance(out, jax.Array) else f"a {type(out).__name__}"


def _input_leaves(flat: Flat, inside: dict[int, Any]) -> dict[int, int]:
    """``{id(inside Variable): input leaf index}``: where each inside Variable came from."""
    number = {id(node): n for n, node in enumerate(flat.nodes)}
    return {
        id(inside[number[id(leaf)]]): i
        for i, leaf in enumerate(flat.leaves)
        if isinstance(leaf, Variable)
    }


def _returned_axis(
    flat: Flat, specs: dict, axes: list, input_leaf: dict, path: Path, leaf: Any, caller: str
) -> Any:
    """The axis of a returned leaf of the arguments (``path`` starts ``(0, top, ...)``).

    An input Variable keeps the axis it went in with, wherever it now is; a
    bare array at an input path keeps that path's. Anything else was created
    inside: it takes what its argument's in_axes gives it, so with a
    StateAxes the axis of its type's entry (NNX's vmapped ``__init__``: a
    BatchStat under ``{tl.Param: 0, ...: None}`` is not stacked).
    """
    i = input_leaf.get(id(leaf)) if isinstance(leaf, Variable) else flat.position.get(path[1:])
    if i is not None:
        return axes[i]
    top = path[1]
    spec = specs.get(flat.origin[top], 0)
    return _axis_of(spec, (*flat.keypath[top], *path[2:]), leaf, caller)


# Typed for editors as keeping `fn`'s signature: the arguments and results are
# the same kinds of objects (Modules, arrays), batched.
@overload
def vmap(
    fn: Callable[P, R],
    *,
    in_axes: Any = 0,
    out_axes: Any = 0,
    axis_size: int | None = None,
    axis_name: Any = None,
    stacked_name: str | None = "layers",
) -> Vmapped[P, R]: ...
@overload
def vmap(
    fn: None = None,
    *,
    in_axes: Any = 0,
    out_axes: Any = 0,
    axis_size: int | None = None,
    axis_name: Any = None,
    stacked_name: str | None = "layers",
) -> Callable[[Callable[P, R]], Vmapped[P, R]]: ...
def vmap(
    fn: Callable | None = None,
    *,
    in_axes: Any = 0,
    out_axes: Any = 0,
    axis_size: int | None = None,
    axis_name: Any = None,
    stacked_name: str | None = "layers",
) -> Any:
    """Like ``jax.vmap``, for functions of Modules, with state written back.

    Arguments:
        fn: the function to vectorise.
        in_axes: one axis for all arguments, or one per positional argument:
            an int, ``None`` (broadcast), or ``tl.StateAxes`` for a Module.
            Keyword arguments are mapped over axis 0. A Module or Variable
            reachable from two arguments must get the same axis from both.
        out_axes: one axis for the whole output, or one per item of a tuple
            output. Modules created inside (a vmapped constructor) get their
            state stacked along it; an unmapped array returned as it is
            comes back broadcast along it, as in ``jax.vmap``.
        axis_size: the batch size, needed when no input is mapped.
        axis_name: names the mapped axis for collectives
            (``BatchNorm(axis_name=...)`` averages statistics over it).
        stacked_name: the logical axis name of the mapped axis in Variables'
            ``sharding`` names (default ``"layers"``). A Variable with names
            (one per dimension) that is mapped over loses the mapped axis's
            entry inside ``fn``, where its value is one slice, and gets it
            back outside; a Variable that comes out with a new axis (built
            by a vmapped constructor) and names for its slice gets
            ``stacked_name`` inserted at its out axis. Variables without
            names stay without. A ``placement`` (``NamedSharding``) is cut
            and extended the same way (replicated along a new axis). None
            leaves all names as they are.

    Returns:
        The vectorised function (a ``Vmapped``: named like ``fn``, printed as
        ``<tl.vmap(fn)>``; ``@tl.vmap(in_axes=...)`` decorates functions and
        methods). Updates to the arguments' Variables come back with the
        axis they went in with; new Variables created on an argument take
        the axis its in_axes entry gives them: with a ``tl.StateAxes``, the
        axis of the first filter they match.

    Example:
        >>> import toylib as tl
        >>> from toylib import nn
        >>> make = tl.vmap(lambda rngs: nn.Linear(2, 3, rngs=rngs))
        >>> stacked = make(tl.Rngs(0).split(4))
        >>> stacked.kernel.shape
        (4, 2, 3)
        >>> class Model(tl.Module):
        ...     @tl.vmap(in_axes=(tl.StateAxes({tl.Param: 0, ...: None}), 0))
        ...     def __init__(self, rngs):
        ...         self.linear = nn.Linear(2, 2, rngs=rngs)
        ...         self.norm = nn.BatchNorm(2)
        >>> model = Model(tl.Rngs(0).split(4))
        >>> model.linear.kernel.shape, model.norm.mean.shape   # BatchStat: not stacked
        ((4, 2, 2), (2,))
        >>> make = tl.vmap(lambda r: nn.Linear(2, 3, kernel_sharding=("embed", "mlp"), rngs=r))
        >>> make(tl.Rngs(0).split(4)).kernel.sharding       # the stacked axis is named
        ('layers', 'embed', 'mlp')
    """
    if fn is None:
        return lambda f: Vmapped(f, in_axes, out_axes, axis_size, axis_name, stacked_name)
    return Vmapped(fn, in_axes, out_axes, axis_size, axis_name, stacked_name)


# -- scan -------------------------------------------------------------------------------------


def _is_carried(axis: Any) -> bool:
    return axis is Carry or axis is None


def _ys_axis(in_axes: Any, out_axes: Any, caller: str) -> int | None:
    """The axis ys are stacked along (None: the body returns no ys), after checking that
    in_axes and out_axes declare the carry consistently (as Flax NNX requires)."""
    entries = in_axes if isinstance(in_axes, list | tuple) else [in_axes]
    carries = [i for i, axis in enumerate(entries) if axis is Carry]
    if len(carries) > 1:
        where = ", ".join(f"in_axes[{i}]" for i in carries)
        raise ValueError(MANY_CARRIES.format(caller=caller, n=len(carries), where=where))
    if out_axes is Carry:
        carry_out, ys = True, None
    elif _is_int(out_axes):
        carry_out, ys = False, out_axes
    elif isinstance(out_axes, list | tuple):
        _check_out_pair(out_axes, caller)
        carry_out, ys = True, out_axes[1]
    else:
        raise ValueError(
            BAD_SCAN_OUT_AXES.format(caller=caller, out_axes=out_axes, problem=_NOT_AN_AXIS)
        )
    if carries and not carry_out:
        raise ValueError(
            CARRY_IN_NOT_OUT.format(caller=caller, in_axes=in_axes, out_axes=out_axes, ys=out_axes)
        )
    if carry_out and not carries:
        raise ValueError(CARRY_OUT_NOT_IN.format(caller=caller, in_axes=in_axes, out_axes=out_axes))
    return ys


def _check_out_pair(out_axes: Sequence[Any], caller: str) -> None:
    """A tuple out_axes is ``(tl.Carry, axis)``: what a body returning ``(carry, y)`` needs."""
    if len(out_axes) != 2:
        problem = f"a tuple out_axes is the pair (tl.Carry, axis), not {len(out_axes)} entries"
    elif out_axes[1] is Carry:
        problem = "tl.Carry is only ever first in the pair, as the body returns (carry, y)"
    elif out_axes[0] is not Carry:
        problem = "a tuple out_axes is the pair (tl.Carry, axis): the carry comes first"
    elif not _is_int(out_axes[1]):
        problem = _NOT_AN_AXIS
    else:
        return
    raise ValueError(BAD_SCAN_OUT_AXES.format(caller=caller, out_axes=out_axes, problem=problem))


class Scanned(Transform):
    """The callable ``tl.scan`` returns. See ``scan``."""

    kind = "tl.scan"

    def __init__(
        self,
        fn: Callable,
        in_axes: Any,
        out_axes: Any,
        length: int | None,
        reverse: bool,
        unroll: int | bool,
        stacked_name: str | None = "layers",
    ) -> None:
        super().__init__(fn)
        _check_in_axes(in_axes, self.label, scan=True)
        check_stacked_name(stacked_name, self.label)
        self._stacked_name = stacked_name
        self._ys_axis = _ys_axis(in_axes, out_axes, self.label)
        self.in_axes, self.out_axes = in_axes, out_axes
        self._scan_kwargs = {"length": length, "reverse": reverse, "unroll": unroll}

    def __call__(self, *args: Any) -> Any:
        flat = flatten_call(args, {}, self.label)
        specs = _arg_specs(self.in_axes, len(args), self.label, scan=True)
        carry_arg = [i for i, spec in specs.items() if spec is Carry]
        if len(carry_arg) > 1:  # one in_axes=tl.Carry for several arguments
            where = ", ".join(f"args[{i}]" for i in carry_arg)
            raise ValueError(MANY_CARRIES.format(caller=self.label, n=len(carry_arg), where=where))
        axes = _leaf_axes(flat, specs, self.label)
        _check_one_axis(flat, specs, self.label)
        carried = [i for i, axis in enumerate(axes) if _is_carried(axis)]
        scanned = [i for i, axis in enumerate(axes) if not _is_carried(axis)]
        named = named_leaves(flat, axes) if self._stacked_name is not None else []
        record: list[tuple[OutSpec, list]] = []
        body = functools.partial(self._body, flat, axes, carried, scanned, carry_arg, named, record)
        try:
            final, stacked = jax.lax.scan(
                body,
                [flat.values[i] for i in carried],
                # lax.scan scans the leading axis: bring each leaf's axis there.
                [_move(flat.values[i], axes[i], 0) for i in scanned],
                **self._scan_kwargs,
            )
        except Exception as error:  # a failed tl.error_if, run eagerly
            reraise_check(error)
            raise
        spec, where = record[-1]
        returned = [final[j] if axis is None else _move(stacked[j], 0, axis) for axis, j in where]
        args_tops, ys = write_back(spec, flat, returned, with_tops=True)
        return _assemble_output(flat, args_tops, carry_arg, ys, self.out_axes)

    def _body(
        self,
        flat: Flat,
        axes: list,
        carried: list,
        scanned: list,
        carry_arg: list,
        named: list,
        record: list,
        carry: list,
        xs: list,
    ) -> tuple[list, list]:
        """The loop body lax.scan traces: ``(next carry, values stacked per step)``."""
        values = interleave(len(flat.values), (carried, carry), (scanned, xs))
        args, _, tops, inside = unflatten_call(flat.layout, flat.paths, values)
        taken = strip_axis(inside, named) if named else {}
        out = call_inside(self.label, self._fn, args, {})
        new_carry, ys = _split_output(out, self.out_axes)
        if carry_arg:
            tops = _replace_carry(flat, tops, carry_arg[0], new_carry)

        def flatten() -> tuple[OutSpec, list, list]:
            # Carried leaves are always returned: lax.scan's carry keeps its shape.
            return flatten_result(
                flat.layout,
                flat.position,
                tops,
                ys,
                inside,
                values,
                lambda i: _is_carried(axes[i]),
            )

        def axis_of(k: int, path: Path, leaf: Any) -> Any:
            if path[0] == 1:
                return self._ys_axis  # a Module returned as a y: stacked like the ys
            i = flat.position.get(path[1:])
            return None if i is None else axes[i]

        spec, returned, pairs = flatten()
        if self._stacked_name is not None and restack(pairs, axis_of, taken, self._stacked_name):
            spec, returned, pairs = flatten()  # the names are structure: record them
        if not spec.same_structure:
            raise ValueError(SCAN_STRUCTURE)
        next_carry, stacked, where = _place(spec, returned, axes, set(carried), self._ys_axis)
        record.append((spec, where))
        return next_carry, stacked


def _place(
    spec: OutSpec, returned: list, axes: list, carried: set[int], ys_axis: int | None
) -> tuple[list, list, list[tuple[Any, int]]]:
    """Split a step's returned values into lax.scan's next carry and its per-step outputs.

    ``where[r]`` says where returned value ``r`` went: ``(None, j)`` for
    ``next_carry[j]``, ``(axis, j)`` for ``stacked[j]``, to be moved to that
    axis after the loop (a scanned leaf's own axis, or out_axes' for ys).
    """
    next_carry, stacked, where = [], [], []
    # Same structure: the OutSpec's first leaves are the input leaves, in order.
    for k, s in enumerate(spec.sources):
        if s >= 0:
            continue
        if spec.paths[k][0] == 0 and k in carried:
            where.append((None, len(next_carry)))
            next_carry.append(returned[~s])
        else:
            where.append((axes[k] if spec.paths[k][0] == 0 else ys_axis, len(stacked)))
            stacked.append(returned[~s])
    return next_carry, stacked, where


def _move(value: Any, source: int, destination: int) -> Any:
    """``jnp.moveaxis``, skipped (no copy) when the axis is already in place."""
    return value if source == destination else jnp.moveaxis(value, source, destination)


def scan(
    fn: Callable | None = None,
    *,
    in_axes: Any = (Carry, 0),
    out_axes: Any = (Carry, 0),
    length: int | None = None,
    reverse: bool = False,
    unroll: int | bool = 1,
    stacked_name: str | None = "layers",
) -> Any:
    """Like ``jax.lax.scan``, for functions of Modules, with state written back.

    Arguments:
        fn: the loop body, called with the arguments of the wrapped function.
        in_axes: one entry per positional argument (or one for all):
            ``tl.Carry`` (carried from step to step; at most one argument),
            an int (scanned over that axis: arrays, or the stacked state of a
            Module), ``None`` (the same every step; a Module's state updated
            inside, e.g. an Rngs counter, is carried), or ``tl.StateAxes``
            mapping filters to those. A Module or Variable reachable from two
            arguments must get the same axis from both.
        out_axes: ``(tl.Carry, 0)``: the body returns ``(carry, y)`` and the
            scan returns ``(final carry, stacked ys)``; ``tl.Carry``: the body
            returns the carry only; ``0``: the body returns ``y`` only. Another
            int stacks the ys along that axis. ``tl.Carry`` is in out_axes
            exactly when it is in in_axes.
        length, reverse, unroll: as in ``jax.lax.scan``.
        stacked_name: the logical axis name of a scanned axis in Variables'
            ``sharding`` names (default ``"layers"``). A scanned Variable
            with names (one per dimension) loses the scanned axis's entry
            inside the body, where its value is one step's slice, and gets
            it back after the loop (as ``tl.vmap`` does; a ``placement`` is
            cut the same way). A Module returned as a y, built in the body
            with names, gets ``stacked_name`` at the ys' axis. None leaves
            all names as they are.

    Returns:
        The looped function (a ``Scanned``: named like ``fn``, printed as
        ``<tl.scan(fn)>``). Scanned Modules' state updated in the body
        (BatchNorm statistics, Rngs counters) comes back stacked along the
        axis it was scanned over; carried state comes back as its final value.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> from toylib import nn
        >>> layers = tl.vmap(lambda r: nn.Linear(3, 3, rngs=r))(tl.Rngs(0).split(5))
        >>> def body(x, layer):
        ...     return jnp.tanh(layer(x)), None
        >>> y, _ = tl.scan(body)(jnp.ones(3), layers)
        >>> y.shape
        (3,)
        >>> cumsum = tl.scan(lambda c, x: (c + x, c + x), out_axes=(tl.Carry, 1))
        >>> total, partial = cumsum(jnp.zeros(2), jnp.ones((4, 2)))
        >>> partial.shape
        (2, 4)
    """
    if fn is None:
        return lambda f: Scanned(f, in_axes, out_axes, length, reverse, unroll, stacked_name)
    return Scanned(fn, in_axes, out_axes, length, reverse, unroll, stacked_name)


def _split_output(out: Any, out_axes: Any) -> tuple[Any, Any]:
    if out_axes is Carry:
        return out, None
    if isinstance(out_axes, list | tuple):
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(
                BAD_SCAN_OUTPUT.format(
                    out_axes=out_axes, expected="a pair (carry, y)", kind=type(out).__name__
                )
            )
        return out
    return None, out


def _replace_carry(flat: Flat, tops: tuple, arg: int, new_carry: Any) -> tuple:
    """The inside tops with the carried argument's replaced by the returned carry."""
    positions = [t for t, o in enumerate(flat.origin) if o == arg]
    new_tops = jax.tree.leaves(new_carry, is_leaf=is_graph_node)
    if len(new_tops) != len(positions):
        raise ValueError(SCAN_STRUCTURE)
    replaced = list(tops)
    for t, new in zip(positions, new_tops, strict=True):
        replaced[t] = new
    return tuple(replaced)


def _assemble_output(flat: Flat, args_tops: tuple, carry_arg: list, ys: Any, out_axes: Any) -> Any:
    carry = None
    if carry_arg:
        arg = carry_arg[0]
        positions = [t for t, o in enumerate(flat.origin) if o == arg]
        treedef = jax.tree.structure(
            jax.tree.unflatten(flat.layout.treedef, list(args_tops))[0][arg], is_leaf=is_graph_node
        )
        carry = jax.tree.unflatten(treedef, [args_tops[t] for t in positions])
    if out_axes is Carry:
        return carry
    if isinstance(out_axes, list | tuple):
        return carry, ys
    return ys
