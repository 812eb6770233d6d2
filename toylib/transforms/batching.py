"""tl.vmap and tl.scan: batching and looping over Modules' state.

Both choose an axis for every leaf of the arguments: an int or ``None``
for a whole argument, or per filter for a Module with ``tl.StateAxes``.
``tl.scan`` adds ``tl.Carry`` for the carried argument.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from toylib._core.filters import to_predicate
from toylib._core.paths import format_path
from toylib.transforms.lifting import (
    Flat,
    OutSpec,
    flatten_call,
    flatten_result,
    interleave,
    is_graph_node,
    unflatten_call,
    write_back,
)

__all__ = ["Carry", "StateAxes", "scan", "vmap"]

NO_AXIS = """\
{caller}: `{path}` ({kind}) matches none of the filters of its StateAxes ({filters}).
Fix: end the StateAxes with a catch-all, e.g. `tl.StateAxes({{tl.Param: 0, ...: None}})`.
"""

BAD_AXES = """\
{caller}: in_axes has {given} entries but the function got {n} positional arguments.
Fix: give one axis (an int, None, tl.StateAxes{carry}) per positional argument.
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
"""


class _CarryType:
    def __repr__(self) -> str:
        return "tl.Carry"


Carry = _CarryType()
"""Marks the carried argument (in ``in_axes``) and output (in ``out_axes``) of ``tl.scan``."""


class StateAxes:
    """Per-filter axes for a Module's state in ``tl.vmap`` / ``tl.scan``.

    Arguments:
        axes: ``{filter: axis}`` in priority order; each Variable takes the
            axis of the first filter it matches (an int, ``None`` for
            broadcast, or ``tl.Carry`` in ``tl.scan``).

    Example:
        >>> import toylib as tl
        >>> tl.StateAxes({tl.Param: 0, ...: None})
        StateAxes({Param: 0, Ellipsis: None})
    """

    def __init__(self, axes: Mapping[Any, Any]) -> None:
        self.axes = tuple(axes.items())
        self._predicates = tuple((to_predicate(f), axis) for f, axis in self.axes)

    def axis_for(self, path: tuple, leaf: Any, caller: str) -> Any:
        for predicate, axis in self._predicates:
            if predicate(path, leaf):
                return axis
        filters = ", ".join(_name(f) for f, _ in self.axes)
        raise ValueError(
            NO_AXIS.format(
                caller=caller, path=format_path(path), kind=type(leaf).__name__, filters=filters
            )
        )

    def __repr__(self) -> str:
        return f"StateAxes({{{', '.join(f'{_name(f)}: {a!r}' for f, a in self.axes)}}})"


def _name(f: Any) -> str:
    return f.__name__ if isinstance(f, type) else repr(f)


def _leaf_axes(flat: Flat, in_axes: Any, n_args: int, caller: str, carry: bool) -> list[Any]:
    """The axis of every leaf, from per-argument (or one global) axes."""
    if isinstance(in_axes, list | tuple):
        if len(in_axes) != n_args:
            suffix = " or tl.Carry" if carry else ""
            raise ValueError(
                BAD_AXES.format(caller=caller, given=len(in_axes), n=n_args, carry=suffix)
            )
        per_arg = dict(enumerate(in_axes))
    else:
        per_arg = dict.fromkeys(range(n_args), in_axes)
    axes = []
    for i, leaf in enumerate(flat.leaves):
        spec = per_arg.get(flat.origin[flat.paths[i][0]], 0)  # keyword arguments: 0
        if isinstance(spec, StateAxes):
            spec = spec.axis_for(flat.arg_path(i), leaf, caller)
        axes.append(spec)
    return axes


def _output_axes(spec: OutSpec, out_axes: Any, out: Any) -> dict[int, Any]:
    """Axis per output top-level leaf, from ``out_axes`` (one, or one per tuple item)."""
    n = spec.out_treedef.num_leaves
    if isinstance(out_axes, list | tuple) and isinstance(out, tuple) and len(out) == len(out_axes):
        axes: list[Any] = []
        for item, axis in zip(out, out_axes, strict=True):
            axes += [axis] * len(jax.tree.leaves(item, is_leaf=is_graph_node))
        return dict(enumerate(axes))
    return dict.fromkeys(range(n), out_axes)


def vmap(
    fn: Callable | None = None,
    *,
    in_axes: Any = 0,
    out_axes: Any = 0,
    axis_size: int | None = None,
    axis_name: Any = None,
) -> Any:
    """Like ``jax.vmap``, for functions of Modules, with state written back.

    Arguments:
        fn: the function to vectorise.
        in_axes: one axis for all arguments, or one per positional argument:
            an int, ``None`` (broadcast), or ``tl.StateAxes`` for a Module.
            Keyword arguments are mapped over axis 0.
        out_axes: one axis for the whole output, or one per item of a tuple
            output. Modules created inside (a vmapped constructor) get their
            state stacked along it.
        axis_size: the batch size, needed when no input is mapped.
        axis_name: names the mapped axis for collectives
            (``BatchNorm(axis_name=...)`` averages statistics over it).

    Returns:
        The vectorised function. Updates to the arguments' Variables come
        back with the axis they went in with; new Variables created on an
        argument take that argument's axis.

    Example:
        >>> import toylib as tl
        >>> from toylib import nn
        >>> make = tl.vmap(lambda rngs: nn.Linear(2, 3, rngs=rngs))
        >>> stacked = make(tl.Rngs(0).split(4))
        >>> stacked.kernel.shape
        (4, 2, 3)
    """
    if fn is None:
        return lambda f: vmap(
            f, in_axes=in_axes, out_axes=out_axes, axis_size=axis_size, axis_name=axis_name
        )

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        flat = flatten_call(args, kwargs, "tl.vmap")
        axes = _leaf_axes(flat, in_axes, len(args), "tl.vmap", carry=False)
        groups = sorted({*axes, *_axis_values(out_axes)}, key=repr)
        record: list[tuple[OutSpec, list[int]]] = []

        def pure(values: list) -> tuple:
            inner_args, inner_kwargs, tops, inside = unflatten_call(flat.layout, flat.paths, values)
            out = fn(*inner_args, **inner_kwargs)
            spec, returned, _ = flatten_result(
                flat.layout, flat.position, tops, out, inside, values
            )
            out_axis = _output_axes(spec, out_axes, out)
            placed: list[list] = [[] for _ in groups]
            where = []
            in_axis = dict(zip(flat.paths, axes, strict=True))
            for path, s in zip(spec.paths, spec.sources, strict=True):
                if s >= 0:
                    continue
                if path[0] == 1:
                    axis = out_axis[path[1]]
                elif path[1:] in in_axis:
                    axis = in_axis[path[1:]]
                else:
                    axis = _new_axis(path, flat, axes)
                g = groups.index(axis)
                where.append(g)
                placed[g].append(returned[~s])
            record.append((spec, where))
            return tuple(placed)

        vmapped = jax.vmap(
            pure,
            in_axes=(axes,),
            out_axes=tuple(groups),
            axis_size=axis_size,
            axis_name=axis_name,
        )
        placed = vmapped(list(flat.values))
        spec, where = record[-1]
        counters = [0] * len(placed)
        returned = []
        for g in where:
            returned.append(placed[g][counters[g]])
            counters[g] += 1
        return write_back(spec, flat, returned)

    return wrapper


def _axis_values(out_axes: Any) -> list[Any]:
    values = list(out_axes) if isinstance(out_axes, list | tuple) else [out_axes]
    for value in values:
        if not (value is None or isinstance(value, int)):
            raise TypeError(f"tl.vmap: out_axes entries must be ints or None, got {value!r}.")
    return values


def _new_axis(path: tuple, flat: Flat, axes: list) -> Any:
    """Axis of a Variable created inside on an argument: that argument's axis."""
    for leaf_path, axis in zip(flat.paths, axes, strict=True):
        if leaf_path[0] == path[1]:
            return axis
    return 0


def scan(
    fn: Callable | None = None,
    *,
    in_axes: Sequence[Any] = (Carry, 0),
    out_axes: Any = (Carry, 0),
    length: int | None = None,
    reverse: bool = False,
    unroll: int | bool = 1,
) -> Any:
    """Like ``jax.lax.scan``, for functions of Modules, with state written back.

    Arguments:
        fn: the loop body, called with the arguments of the wrapped function.
        in_axes: one entry per positional argument: ``tl.Carry`` (carried
            from step to step), ``0`` (scanned over its leading axis: arrays,
            or the stacked state of a Module), ``None`` (the same every step;
            a Module's state updated inside, e.g. an Rngs counter, is carried),
            or ``tl.StateAxes`` mapping filters to those.
        out_axes: ``(tl.Carry, 0)``: the body returns ``(carry, y)`` and the
            scan returns ``(final carry, stacked ys)``; ``tl.Carry``: the body
            returns the carry only; ``0``: the body returns ``y`` only.
        length, reverse, unroll: as in ``jax.lax.scan``.

    Returns:
        The looped function. Scanned Modules' state updated in the body
        (BatchNorm statistics, Rngs counters) comes back stacked along axis
        0; carried state comes back as its final value.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> from toylib import nn
        >>> layers = tl.vmap(lambda r: nn.Linear(3, 3, rngs=r))(tl.Rngs(0).split(5))
        >>> def body(x, layer):
        ...     return jnp.tanh(layer(x)), None
        >>> y, _ = tl.scan(body)(jnp.ones(3), layers)
        >>> y.shape
        (3,)
    """
    if fn is None:
        return lambda f: scan(
            f, in_axes=in_axes, out_axes=out_axes, length=length, reverse=reverse, unroll=unroll
        )

    def wrapper(*args: Any) -> Any:
        flat = flatten_call(args, {}, "tl.scan")
        axes = _leaf_axes(flat, tuple(in_axes), len(args), "tl.scan", carry=True)
        carried = [i for i, a in enumerate(axes) if a is Carry or a is None]
        scanned = [i for i, a in enumerate(axes) if not (a is Carry or a is None)]
        for i in scanned:
            if axes[i] != 0:
                raise ValueError(
                    f"tl.scan: axis {axes[i]!r}: only 0, None and tl.Carry are supported."
                )
        carried_set = set(carried)
        carry_arg = [i for i, a in enumerate(in_axes) if a is Carry]
        record: list[tuple[OutSpec, list[int]]] = []

        def body(carry: list, xs: list) -> tuple:
            values = interleave(len(flat.values), (carried, carry), (scanned, xs))
            inner_args, _, tops, inside = unflatten_call(flat.layout, flat.paths, values)
            out = fn(*inner_args)
            new_carry, ys = _split_output(out, out_axes)
            if carry_arg:
                tops = _replace_carry(flat, tops, carry_arg[0], new_carry)
            spec, returned, _ = flatten_result(
                flat.layout,
                flat.position,
                tops,
                ys,
                inside,
                values,
                lambda i: axes[i] is Carry or axes[i] is None,
            )
            if not spec.same_structure:
                raise ValueError(SCAN_STRUCTURE)
            next_carry, stacked, where = [], [], []
            for k, s in enumerate(spec.sources):
                if s >= 0:
                    continue
                if spec.paths[k][0] == 0 and k in carried_set:
                    where.append((0, len(next_carry)))
                    next_carry.append(returned[~s])
                else:
                    where.append((1, len(stacked)))
                    stacked.append(returned[~s])
            record.append((spec, where))
            return next_carry, stacked

        final, stacked = jax.lax.scan(
            body,
            [flat.values[i] for i in carried],
            [flat.values[i] for i in scanned],
            length=length,
            reverse=reverse,
            unroll=unroll,
        )
        spec, where = record[-1]
        returned = [final[j] if kind == 0 else stacked[j] for kind, j in where]
        tops_out = write_back(spec, flat, returned, with_tops=True)
        args_tops, ys = tops_out
        return _assemble_output(flat, args_tops, carry_arg, ys, out_axes)

    return wrapper


def _split_output(out: Any, out_axes: Any) -> tuple[Any, Any]:
    if out_axes is Carry:
        return out, None
    if isinstance(out_axes, tuple) and len(out_axes) == 2 and out_axes[0] is Carry:
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
    tops = list(tops)
    for t, new in zip(positions, new_tops, strict=True):
        tops[t] = new
    return tuple(tops)


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
    if isinstance(out_axes, tuple) and len(out_axes) == 2 and out_axes[0] is Carry:
        return carry, ys
    return ys
