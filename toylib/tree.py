"""Tree routines: Equinox's pytree tools, for any pytree including Modules.

``tl.filter``, ``tl.partition`` and ``tl.combine`` work on the *tree* view,
the one raw ``jax`` and Equinox see (Principle 3 of the design): a Variable
reachable twice is flattened twice, and the halves keep the tree's own
structure, so they mix freely with ``eqx.filter``/``eqx.partition``/
``eqx.combine`` and with ``jax.tree.map``. For the graph view (shared
references kept, state by Variable type) use ``tl.split``/``tl.merge``.

``tl.tree_at`` is graph-aware: a tied weight replaced through one of its
paths stays tied, and the result is a new object graph (the old one is left
as it was; unchanged arrays are shared, since arrays are immutable).

Example:
    >>> import jax.numpy as jnp, toylib as tl
    >>> from toylib import nn
    >>> model = nn.Linear(2, 3, rngs=0)
    >>> params, rest = tl.partition(model, tl.is_array)
    >>> tl.tree_equal(tl.combine(params, rest), model)
    True
    >>> zeroed = tl.tree_at(lambda m: m.bias, model, jnp.ones(3))
    >>> zeroed.bias.value.tolist(), model.bias.value.tolist()
    ([1.0, 1.0, 1.0], [0.0, 0.0, 0.0])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.core  # named: jax imports it, but pyright sees only what is imported
import jax.numpy as jnp
import numpy as np

from toylib._core import graph
from toylib._core.filters import BaseFilter, to_predicate
from toylib._core.graph import ModuleDef, Ref, VariableDef
from toylib._core.paths import Path, format_path
from toylib._core.skeleton import Map, Seq, is_array, is_graph_node, rebuild
from toylib._core.variables import Variable, set_value, unwrap
from toylib.transforms.lifting import plain_key

__all__ = ["combine", "filter", "is_array", "partition", "tree_at", "tree_equal"]

BAD_FILTER_SPEC = """\
tl.filter: a filter_spec leaf must be a bool or a function `leaf -> bool`, got a
{kind} (at {where}).
Fix: pass a predicate such as `tl.is_array`, a Variable type such as `tl.Param`,
or a pytree of bools/predicates with the tree's structure (a prefix of it).
"""

WHERE_NOT_IN_TREE = """\
tl.tree_at: `where` returned {what}, which is not a part of the tree.
`where` must only pick parts of the tree it is given (attributes, list items,
Variables, Modules), not compute new values from them.
Fix: e.g. `tl.tree_at(lambda m: m.layers[0].kernel, model, new_kernel)`.
"""

WHERE_STATIC = """\
tl.tree_at: `where` returned {what}, a static value of a Module (part of its
structure, not of its data), which tl.tree_at cannot replace.
Fix: build the Module anew, or assign the attribute on a copy:

    new = tl.clone(model); new.<attribute> = value
"""

WHERE_TWICE = """\
tl.tree_at: `where` picked the same part of the tree twice ({what}), so what to
replace it with is ambiguous. Fix: name each part once.
"""

REPLACE_ARGS = """\
tl.tree_at: give exactly one of `replace` (the new value(s)) and `replace_fn`
(a function from the old value to the new one).
"""

REPLACE_STRUCTURE = """\
tl.tree_at: `where` picked {n} parts, so `replace` must have the structure of
what `where` returned ({structure}); got {got}.
Fix: e.g. `tl.tree_at(lambda m: (m.a, m.b), model, (new_a, new_b))`.
"""

_MISSING = object()


# -- filter / partition / combine -------------------------------------------------


def _is_graph_filter(spec: Any) -> bool:
    """A toylib filter (a Variable type, a BaseFilter, ``...``): selects by Variable and path."""
    return (
        spec is Ellipsis
        or isinstance(spec, BaseFilter)
        or (isinstance(spec, type) and issubclass(spec, Variable))
    )


def _mask(tree: Any, spec: Any, is_leaf: Callable | None) -> Any:
    """A tree of bools with ``tree``'s structure (a prefix of it at the Variables)."""
    if _is_graph_filter(spec):
        return _graph_mask(tree, to_predicate(spec))

    def expand(s: Any, sub: Any, where: str) -> Any:
        if isinstance(s, bool | np.bool_):
            return jax.tree.map(lambda _: bool(s), sub, is_leaf=is_leaf)
        if callable(s) and not is_graph_node(s):
            return jax.tree.map(lambda leaf: bool(s(leaf)), sub, is_leaf=is_leaf)
        raise TypeError(BAD_FILTER_SPEC.format(kind=type(s).__name__, where=where))

    pairs, treedef = jax.tree_util.tree_flatten_with_path(spec)
    subs = treedef.flatten_up_to(tree)
    expanded = [
        expand(s, sub, jax.tree_util.keystr(p) or "the root")
        for (p, s), sub in zip(pairs, subs, strict=True)
    ]
    return jax.tree.unflatten(treedef, expanded)


def _graph_mask(tree: Any, predicate: Callable) -> Any:
    """Bools at each Variable (and bare array) of ``tree``: ``predicate(path, leaf)``."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_graph_node)
    tops = []
    for keys, top in with_paths:
        prefix = tuple(plain_key(k) for k in keys)
        if is_graph_node(top):
            leaves, structure = jax.tree.flatten(top, is_leaf=lambda x: isinstance(x, Variable))
            paths = graph.tree_leaf_paths(top)
            bools = [predicate((*prefix, *p), leaf) for p, leaf in zip(paths, leaves, strict=True)]
            tops.append(jax.tree.unflatten(structure, bools))
        else:
            tops.append(bool(predicate(prefix, top)))
    return jax.tree.unflatten(treedef, tops)


def filter(  # Equinox's name, shadowing the builtin here only
    tree: Any,
    filter_spec: Any,
    inverse: bool = False,
    replace: Any = None,
    is_leaf: Callable[[Any], bool] | None = None,
) -> Any:
    """The leaves of ``tree`` that ``filter_spec`` selects; the others become ``replace``.

    Arguments:
        tree: any pytree (Modules, Variables, States included).
        filter_spec: a predicate on leaves (``tl.is_array``, ``eqx.is_array``),
            a bool, a pytree of those shaped like (a prefix of) ``tree``, as in
            ``eqx.filter``; or a toylib filter (``tl.Param``, ``tl.PathContains``,
            ``...``), which selects Variables by type and path: the values of the
            matching Variables are kept.
        inverse: keep the leaves *not* selected instead.
        replace: what the dropped leaves become (``None``, as in Equinox).
        is_leaf: as in ``jax.tree.map``.

    Returns:
        A tree of ``tree``'s structure (Variables hold ``replace`` where dropped).

    Example:
        >>> import toylib as tl
        >>> from toylib import nn
        >>> model = nn.Sequential(nn.Linear(2, 2, rngs=0), nn.BatchNorm(2))
        >>> stats = tl.filter(model, tl.BatchStat)
        >>> stats.layers[1].mean.shape, stats.layers[0].kernel.value
        ((2,), None)
    """
    mask = _mask(tree, filter_spec, is_leaf)
    keep = (lambda m: not m) if inverse else bool

    def pick(m: bool, sub: Any) -> Any:
        return jax.tree.map(lambda x: x if keep(m) else replace, sub, is_leaf=is_leaf)

    return jax.tree.map(pick, mask, tree, is_leaf=is_leaf)


def partition(
    tree: Any,
    filter_spec: Any,
    replace: Any = None,
    is_leaf: Callable[[Any], bool] | None = None,
) -> tuple[Any, Any]:
    """``(selected, rest)``: ``tl.filter`` and its inverse; ``tl.combine`` undoes it.

    Example:
        >>> import toylib as tl
        >>> from toylib import nn
        >>> params, rest = tl.partition(nn.Linear(2, 2, rngs=0), tl.Param)
        >>> params.kernel.shape, rest.kernel.value
        ((2, 2), None)
    """
    return (
        filter(tree, filter_spec, replace=replace, is_leaf=is_leaf),
        filter(tree, filter_spec, inverse=True, replace=replace, is_leaf=is_leaf),
    )


def combine(*trees: Any, is_leaf: Callable[[Any], bool] | None = None) -> Any:
    """Merge trees of one structure: each leaf is the first one that is not ``None``.

    Example:
        >>> import toylib as tl
        >>> tl.combine({"a": 1, "b": None}, {"a": None, "b": 2})
        {'a': 1, 'b': 2}
    """
    if not trees:
        raise TypeError("tl.combine needs at least one tree, e.g. tl.combine(params, rest).")

    def leaf_or_none(x: Any) -> bool:
        return x is None or (is_leaf is not None and is_leaf(x))

    def first(*leaves: Any) -> Any:
        return next((leaf for leaf in leaves if leaf is not None), None)

    return jax.tree.map(first, *trees, is_leaf=leaf_or_none)


# -- tree_equal --------------------------------------------------------------------


def tree_equal(
    *trees: Any, typematch: bool = False, rtol: float = 0.0, atol: float = 0.0
) -> bool | jax.Array:
    """Whether the trees have the same structure and equal leaves.

    Arrays are equal when their shapes and dtypes match and their values do
    (within ``rtol``/``atol`` if given); other leaves compare with ``==``.
    Modules compare by their pytree structure (types and static attributes)
    and their data. Inside a trace, returns a traced boolean scalar.

    Arguments:
        *trees: the pytrees to compare.
        typematch: also require leaves to be of the same Python type.
        rtol, atol: tolerances for inexact arrays.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> tl.tree_equal({"a": jnp.ones(2)}, {"a": jnp.ones(2)}), tl.tree_equal(1, 2)
        (True, False)
    """
    first, *rest = trees
    leaves, treedef = jax.tree.flatten(first)
    out: bool | jax.Array = True
    for other in rest:
        other_leaves, other_def = jax.tree.flatten(other)
        if other_def != treedef:
            return False
        for a, b in zip(leaves, other_leaves, strict=True):
            if typematch and type(a) is not type(b):
                return False
            same = _leaf_equal(a, b, rtol, atol)
            if same is False:
                return False
            if same is not True:
                out = same if out is True else out & same
    return out


def _leaf_equal(a: Any, b: Any, rtol: float, atol: float) -> bool | jax.Array:
    if is_array(a) or is_array(b):
        if not (is_array(a) and is_array(b)):
            return False
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if isinstance(a, jax.ShapeDtypeStruct) or isinstance(b, jax.ShapeDtypeStruct):
            return type(a) is type(b)
        if isinstance(a, jax.core.Tracer) or isinstance(b, jax.core.Tracer):
            if (rtol or atol) and jnp.issubdtype(a.dtype, jnp.inexact):
                return jnp.allclose(a, b, rtol=rtol, atol=atol)
            return jnp.all(a == b)
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        a, b = np.asarray(a), np.asarray(b)
        if (rtol or atol) and np.issubdtype(a.dtype, np.inexact):
            return bool(np.allclose(a, b, rtol=rtol, atol=atol))
        return bool(np.array_equal(a, b))
    try:
        return bool(a == b)
    except Exception:  # an object whose == is not a truth value
        return a is b


# -- tree_at -----------------------------------------------------------------------


class _Marker:
    """Stands in for one leaf while ``where`` runs, so that ``tree_at`` knows which it picked."""

    __slots__ = ("key",)

    def __init__(self, key: Any) -> None:
        self.key = key

    def __repr__(self) -> str:
        return f"<leaf {self.key!r}>"


def tree_at(
    where: Callable[[Any], Any],
    tree: Any,
    replace: Any = _MISSING,
    *,
    replace_fn: Callable[[Any], Any] | None = None,
    is_leaf: Callable[[Any], bool] | None = None,
) -> Any:
    """A new tree with the part(s) ``where`` picks replaced: functional surgery.

    ``tree`` is not changed. ``where(tree)`` names the part(s): a leaf array,
    a Variable (replaced by a Variable, or given a new value by anything
    else, keeping its type and metadata), a sub-Module or container
    (replaced whole), or a tuple/list of those. Shared objects stay shared:
    a tied weight replaced through one path is replaced everywhere.

    Arguments:
        where: a function from the tree to the part(s) to replace.
        tree: any pytree (Modules, Variables, States included).
        replace: the new value(s), shaped like what ``where`` returns.
        replace_fn: instead of ``replace``, a function of the old value.
        is_leaf: as in ``jax.tree.map``: subtrees to treat as one leaf.

    Returns:
        The new tree.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> from toylib import nn
        >>> mlp = nn.MLP([2, 4, 1], rngs=0)
        >>> new = tl.tree_at(lambda m: m.layers[1].bias, mlp, replace_fn=lambda b: b + 1)
        >>> float(new.layers[1].bias.value[0]), float(mlp.layers[1].bias.value[0])
        (1.0, 0.0)
    """
    if (replace is _MISSING) == (replace_fn is None):
        raise TypeError(REPLACE_ARGS)
    tops, treedef = jax.tree.flatten(
        tree, is_leaf=lambda x: is_graph_node(x) or (is_leaf is not None and is_leaf(x))
    )
    node_tops = tuple(t if is_graph_node(t) else None for t in tops)
    nodes: list[Any] = []
    graphdef, pairs = graph.flatten(node_tops, nodes)
    values = {path: unwrap(leaf) for path, leaf in pairs}

    # The probe: the same structure with a marker in every leaf position.
    probe_nodes: dict[int, Any] = {}
    probe_graph = graph.unflatten(
        graphdef, {path: _Marker(path) for path in values}, nodes=probe_nodes
    )
    probe_tops = [
        probe_graph[t] if is_graph_node(top) else _Marker(("top", t)) for t, top in enumerate(tops)
    ]
    number = {id(obj): j for j, obj in probe_nodes.items()}
    try:
        found = where(jax.tree.unflatten(treedef, probe_tops))
    except (TypeError, AttributeError) as error:  # it computed with a leaf's placeholder
        raise ValueError(
            WHERE_NOT_IN_TREE.format(what=f"nothing: it raised {type(error).__name__}: {error}")
        ) from error
    picked, picked_def = jax.tree.flatten(
        found, is_leaf=lambda x: isinstance(x, _Marker) or is_graph_node(x)
    )
    targets = [_target(x, number) for x in picked]
    _check_unique(targets)

    if replace_fn is not None:
        old = [_old(t, values, tops, nodes) for t in targets]
        new = [replace_fn(o) for o in old]
    elif picked_def.num_leaves == 1 and picked_def.num_nodes == 1:
        new = [replace]
    else:
        try:
            new = picked_def.flatten_up_to(replace)
        except (ValueError, TypeError):
            raise ValueError(
                REPLACE_STRUCTURE.format(
                    n=len(targets), structure=picked_def, got=type(replace).__name__
                )
            ) from None

    top_values = list(tops)
    swaps: dict[int, Any] = {}
    for (kind, key), value in zip(targets, new, strict=True):
        if kind == "top":
            top_values[key] = value
        elif kind == "leaf":
            values[key] = value
        elif isinstance(nodes[key], Variable) and not isinstance(value, Variable):
            swaps[key] = _NewValue(value)  # a Variable given a new value: same type, metadata
        else:
            swaps[key] = value
    built = _Rebuilder(graphdef, values, swaps).root()
    out_tops = [built[t] if is_graph_node(top) else top_values[t] for t, top in enumerate(tops)]
    return jax.tree.unflatten(treedef, out_tops)


def _target(x: Any, number: dict[int, int]) -> tuple[str, Any]:
    if isinstance(x, _Marker):
        if isinstance(x.key, tuple) and x.key[:1] == ("top",):
            return "top", x.key[1]
        return "leaf", x.key
    if is_graph_node(x) and id(x) in number:
        return "node", number[id(x)]
    what = f"a {type(x).__name__}" + (f" ({x!r})" if isinstance(x, int | float | str) else "")
    if isinstance(x, bool | int | float | str | tuple | type(None)) or callable(x):
        raise ValueError(WHERE_STATIC.format(what=what))
    raise ValueError(WHERE_NOT_IN_TREE.format(what=what))


def _check_unique(targets: list[tuple[str, Any]]) -> None:
    seen: set = set()
    for target in targets:
        if target in seen:
            kind, key = target
            what = format_path(key) if kind == "leaf" else f"{kind} {key}"
            raise ValueError(WHERE_TWICE.format(what=what))
        seen.add(target)


def _old(target: tuple[str, Any], values: dict[Path, Any], tops: list, nodes: list) -> Any:
    kind, key = target
    if kind == "top":
        return tops[key]
    if kind == "leaf":
        return values[key]
    return nodes[key]


class _NewValue:
    """A swap that keeps the Variable and gives it ``value``."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class _Rebuilder(graph._Builder):
    """``graph.unflatten`` with some nodes swapped for other objects (``tree_at``).

    A node first reached inside a swapped-out Module but referenced elsewhere
    too is built where the next reference finds it, so it stays in the graph.
    """

    def __init__(self, graphdef: graph.GraphDef, leaves: dict[Path, Any], swaps: dict) -> None:
        super().__init__(leaves, {}, {})
        self.graphdef, self.swaps = graphdef, swaps
        self.defs: dict[int, tuple[Path, Any]] = {}
        _index_defs(graphdef.root, (), self.defs)

    def root(self) -> Any:
        return rebuild(self.graphdef.root, (), self.build)

    def build(self, path: Path, node: Any) -> Any:
        kind = type(node)
        index = node.index if kind in (ModuleDef, VariableDef, Ref) else None
        swap = self.swaps.get(index, _MISSING) if index is not None else _MISSING
        if swap is not _MISSING and not isinstance(swap, _NewValue):
            return swap
        if kind is Ref and index not in self.nodes:
            first_path, definition = self.defs[node.index]
            return self.build(first_path, definition)
        out = super().build(path, node)
        if isinstance(swap, _NewValue) and kind is VariableDef:
            set_value(out, unwrap(swap.value))
        return out


def _index_defs(skeleton: Any, path: Path, out: dict[int, tuple[Path, Any]]) -> None:
    """``{node number: (first path, definition)}`` over a GraphDef's skeleton."""
    kind = type(skeleton)
    if kind is Seq:
        for i, item in enumerate(skeleton.items):
            _index_defs(item, (*path, i), out)
    elif kind is Map:
        for key, item in skeleton.items:
            _index_defs(item, (*path, key), out)
    elif kind in (ModuleDef, VariableDef) and skeleton.index not in out:
        out[skeleton.index] = (path, skeleton)
        if kind is ModuleDef:
            for name, item in skeleton.attributes:
                _index_defs(item, (*path, name), out)
