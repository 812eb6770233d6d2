"""The graph view: split a model into structure + State, and back.

toylib's functions see the model as a *graph*: a Module or Variable reachable
along two paths is one object, reported once (at its first path), and
restored as one shared object by ``merge``; reference cycles are fine.

``GraphDef`` is the hashable structure (types, static attributes, where the
shared references go); ``State`` holds the Variables. ``split``/``state``
return *snapshots*: fresh Variable objects with the same values, so editing
the State does not touch the model (use ``update`` for that) and vice versa.

Example:
    >>> import jax.numpy as jnp, toylib as tl
    >>> from toylib import nn
    >>> model = nn.Linear(2, 3, rngs=0)
    >>> graphdef, params = tl.split(model, tl.Param)
    >>> twin = tl.merge(graphdef, params)
    >>> bool((twin(jnp.ones(2)) == model(jnp.ones(2))).all())
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

import jax
import numpy as np

from toylib._core.containers import LAYOUT, is_tracked
from toylib._core.filters import Filter, to_predicate
from toylib._core.module import Module, blank
from toylib._core.paths import Path, format_path, list_paths
from toylib._core.skeleton import (
    Map,
    Seq,
    Static,
    attribute_skeletons,
    is_graph_node,
    items_of,
    iter_graph,
    rebuild,
    walk,
)
from toylib._core.state import State, split_flat
from toylib._core.variables import Variable, checked_value, new_variable, set_value, unwrap
from toylib._core.watchers import changed, watch

__all__ = [
    "GraphDef",
    "clone",
    "flatten",
    "iter_modules",
    "iter_variables",
    "merge",
    "parent_of",
    "pop",
    "split",
    "state",
    "tree_leaf_paths",
    "unflatten",
    "update",
    "watch_graph",
]

MERGE_MISMATCH = """\
tl.merge: the State does not fit the GraphDef ({graph}).
{details}
Fix: merge with the States that tl.split returned for this graphdef, all of
them (e.g. both `params` and `rest`):

    graphdef, params, rest = tl.split(model, tl.Param, ...)
    model = tl.merge(graphdef, params, rest)
"""

UPDATE_MISMATCH = """\
tl.update: the State has {what} at `{path}`, but {found}.
Nothing was changed. Fix: update with a State taken from this model
(`tl.state(model)`, `tl.split(model)`), or from a model of the same structure.
"""

POP_FROM_SEQUENCE = """\
tl.pop: the {kind} at `{path}` is an element of a {container}; removing it
would renumber the others. Nothing was removed.
Fix: keep Variables you pop (e.g. Intermediates) as Module attributes:

    self.features = tl.Intermediate(x)
"""

BAD_ROOT = """\
{caller}: expected a Module (or a list/tuple/dict of Modules), got a {kind}.
Fix: pass the model itself, e.g. `tl.split(model)`.
"""


# -- structure ---------------------------------------------------------------------
# Definitions are frozen dataclasses rather than NamedTuples so that, say, a
# reference to node 3 never compares equal to a static attribute equal to (3,).


@dataclass(frozen=True, slots=True)
class ModuleDef:
    type: type
    index: int
    attributes: tuple  # ((name, skeleton), ...)


@dataclass(frozen=True, slots=True)
class VariableDef:
    type: type
    index: int
    metadata: tuple


@dataclass(frozen=True, slots=True)
class ArrayDef:
    """A bare array attribute (not wrapped in a Variable)."""


@dataclass(frozen=True, slots=True)
class Ref:
    """A second reference to the node numbered ``index``."""

    index: int


_ARRAY = ArrayDef()

# The type of the model a GraphDef rebuilds: `tl.merge(tl.split(model)[0], ...)`
# has the type of `model` for a type checker (at run time a GraphDef is untyped).
M = TypeVar("M")


class GraphDef(Generic[M]):
    """The static structure of a graph of Modules: hashable, immutable.

    ``graphdef.apply(*states)(x)`` calls the merged model and returns
    ``(out, (new_state, new_graphdef))``; ``.apply(*states).method(x)`` and
    ``.apply(*states).submodule(x)`` call a method or a submodule instead.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> from toylib import nn
        >>> graphdef, state = tl.split(nn.Linear(2, 1, rngs=0))
        >>> out, (new_state, new_graphdef) = graphdef.apply(state)(jnp.ones(2))
        >>> out.shape, new_graphdef == graphdef
        ((1,), True)
        >>> graphdef == tl.split(nn.Linear(2, 1, rngs=1))[0]  # structure, not values
        True
    """

    __slots__ = ("_cache", "_hash", "root")

    def __init__(self, root: Any) -> None:
        self.root = root
        self._hash = hash(root)
        self._cache: tuple[tuple[Path, ...], dict[int, ModuleDef]] | None = None

    def __eq__(self, other: object) -> bool:
        return self is other or (
            type(other) is GraphDef and self._hash == other._hash and self.root == other.root
        )

    def __hash__(self) -> int:
        return self._hash

    @property
    def leaf_paths(self) -> tuple[Path, ...]:
        """The paths of all Variables (and bare arrays), as ``State.flat()`` lists them."""
        return self._index()[0]

    def _index(self) -> tuple[tuple[Path, ...], dict[int, ModuleDef]]:
        """One walk over the structure: leaf paths, and ModuleDefs by node number."""
        if self._cache is None:
            index = _Index()
            _walk_defs(self.root, (), index.record)
            self._cache = (tuple(index.paths), index.modules)
        return self._cache

    def apply(self, *states: State) -> _Apply:
        """A pure call: merge, call, split. See the class docstring."""
        return _Apply(self, states, ())

    def __repr__(self) -> str:
        root = self.root
        name = root.type.__name__ if isinstance(root, ModuleDef) else type(root).__name__
        return f"GraphDef({name}, {len(self.leaf_paths)} leaves)"


def _walk_defs(skeleton: Any, path: Path, record: Callable[[Path, Any], None]) -> None:
    """Call ``record(path, definition)`` on every node definition of a skeleton."""
    kind = type(skeleton)
    if kind is Seq:
        for i, item in enumerate(skeleton.items):
            _walk_defs(item, (*path, i), record)
    elif kind is Map:
        for key, item in skeleton.items:
            _walk_defs(item, (*path, key), record)
    elif kind is not Static:
        record(path, skeleton)


class _Index:
    """Leaf paths and ModuleDefs of a GraphDef (a class: see skeleton._Collector)."""

    def __init__(self) -> None:
        self.paths: list[Path] = []
        self.modules: dict[int, ModuleDef] = {}

    def record(self, path: Path, node: Any) -> None:
        if type(node) is ModuleDef and node.index not in self.modules:
            self.modules[node.index] = node
            for name, skeleton in node.attributes:
                _walk_defs(skeleton, (*path, name), self.record)
        elif type(node) in (VariableDef, ArrayDef):
            self.paths.append(path)


class _Flattener:
    """The state of one ``flatten``: numbered nodes and the leaves found."""

    def __init__(self, nodes: list[Any]) -> None:
        self.index: dict[int, int] = {}
        self.leaves: list[tuple[Path, Any]] = []
        self.nodes = nodes

    def visit(self, path: Path, obj: Any) -> Any:
        if not is_graph_node(obj):  # an array, or what a rebuilt object holds in its place
            self.leaves.append((path, obj))
            return _ARRAY
        seen = self.index.get(id(obj))
        if seen is not None:
            return Ref(seen)
        self.index[id(obj)] = number = len(self.index)
        self.nodes.append(obj)
        if isinstance(obj, Variable):
            self.leaves.append((path, obj))
            return VariableDef(type(obj), number, tuple(obj._metadata.items()))
        return ModuleDef(type(obj), number, attribute_skeletons(obj, self.visit, path))


def flatten(node: Any, nodes: list[Any] | None = None) -> tuple[GraphDef, list[tuple[Path, Any]]]:
    """``(graphdef, [(path, leaf), ...])`` with the live Variables (and bare arrays).

    ``nodes``, if given, receives every Module and Variable in numbering order
    (``nodes[i]`` is the object a ``Ref(i)`` points to).
    """
    flattener = _Flattener([] if nodes is None else nodes)
    root = walk(node, (), flattener.visit)
    return GraphDef(root), flattener.leaves


def unflatten(
    graphdef: GraphDef,
    leaves: dict[Path, Any],
    *,
    reuse: dict[int, Any] | None = None,
    nodes: dict[int, Any] | None = None,
) -> Any:
    """Build the objects of ``graphdef`` from ``{path: leaf}`` (validated by the caller).

    Arguments:
        graphdef: the structure.
        leaves: a Variable or array for each leaf path.
        reuse: ``{node number: live object}``: update these objects in place
            (values, metadata, attributes) instead of making new ones. This is
            how the transforms carry changes made inside back to the caller.
        nodes: if given, filled with ``{node number: object}``.

    Returns:
        The rebuilt root.
    """
    builder = _Builder(leaves, {} if nodes is None else nodes, reuse or {})
    return rebuild(graphdef.root, (), builder.build)


class _Builder:
    """The state of one ``unflatten`` (a class: see skeleton._Collector)."""

    def __init__(self, leaves: dict[Path, Any], nodes: dict[int, Any], reuse: dict) -> None:
        self.leaves, self.nodes, self.reuse = leaves, nodes, reuse

    def build(self, path: Path, node: Any) -> Any:
        kind = type(node)
        if kind is Ref:
            return self.nodes[node.index]
        if kind is ArrayDef:
            return unwrap(self.leaves[path])
        live = self.reuse.get(node.index)
        if live is not None and type(live) is not node.type:
            live = None  # replaced by an object of another type: make a new one
        if kind is VariableDef:
            value = unwrap(self.leaves[path])
            if live is None:
                live = new_variable(node.type, value, node.metadata)
            else:
                set_value(live, value)
                if tuple(live._metadata.items()) != node.metadata:
                    object.__setattr__(live, "_metadata", dict(node.metadata))
                    changed(live)
            self.nodes[node.index] = live
            return live
        module = blank(node.type) if live is None else live
        self.nodes[node.index] = module
        attributes = {name: rebuild(sk, (*path, name), self.build) for name, sk in node.attributes}
        if live is None:
            vars(module).update(attributes)
            # Rebuilt: its data positions stay data whatever they hold (skeleton.py).
            object.__setattr__(module, LAYOUT, node.attributes)
        else:
            _assign(module, attributes)
        return module


def _assign(module: Module, attributes: dict[str, Any]) -> None:
    """Give a live Module these attributes, keeping the objects that did not change."""
    current = vars(module)
    changed_any = False
    for name in [name for name in current if name not in attributes]:
        del current[name]
        module._forget_layout(name)
        changed_any = True
    for name, value in attributes.items():
        if not _same(current.get(name, _ABSENT), value):
            current[name] = value
            module._forget_layout(name)
            changed_any = True
    if changed_any:
        changed(module)


def _same(old: Any, new: Any) -> bool:
    """Whether a rebuilt attribute holds exactly the objects the live one holds."""
    if old is new:
        return True
    if type(old) is not type(new) or not isinstance(old, list | tuple | dict):
        return False
    if isinstance(old, dict):
        return old.keys() == new.keys() and all(_same(old[k], new[k]) for k in old)
    return len(old) == len(new) and all(_same(a, b) for a, b in zip(old, new, strict=True))


def watch_graph(nodes: list[Any], token: Any) -> None:
    """Register ``token`` (``watchers.watch``) on these Modules and Variables and on
    every tracked container their attributes hold."""
    for node in nodes:
        watch(node, token)
        if isinstance(node, Module):
            todo = [v for v in vars(node).values() if isinstance(v, list | tuple | dict)]
            while todo:
                container = todo.pop()
                if is_tracked(container):
                    watch(container, token)
                values = container.values() if isinstance(container, dict) else container
                todo += [v for v in values if isinstance(v, list | tuple | dict)]


def _graph_leaves(node: Any, caller: str) -> tuple[GraphDef, list[tuple[Path, Any]]]:
    if not isinstance(node, Module | list | tuple | dict):
        raise TypeError(BAD_ROOT.format(caller=caller, kind=type(node).__name__))
    return flatten(node)


def _snapshot(leaf: Any) -> Any:
    return leaf.copy() if isinstance(leaf, Variable) else leaf


# -- the functional API ---------------------------------------------------------------


@overload
def split(node: M, /) -> tuple[GraphDef[M], State]: ...
@overload
def split(node: M, filter: Filter, /) -> tuple[GraphDef[M], State]: ...
@overload
def split(node: M, filter: Filter, filter2: Filter, /) -> tuple[GraphDef[M], State, State]: ...
@overload
def split(
    node: M, filter: Filter, filter2: Filter, filter3: Filter, /
) -> tuple[GraphDef[M], State, State, State]: ...
@overload
def split(node: M, /, *filters: Filter) -> tuple[GraphDef[M], *tuple[State, ...]]: ...
def split(node: Any, *filters: Filter) -> tuple[Any, ...]:
    """Split a model into its GraphDef and State(s).

    Arguments:
        node: a Module (or a list/tuple/dict of Modules).
        *filters: none for one State of everything; otherwise one State per
            filter, each Variable going to the first filter it matches. A
            Variable matched by no filter is an error; end with ``...`` to
            catch the rest.

    Returns:
        ``(graphdef, state)`` or ``(graphdef, state_1, ..., state_n)``.

    Example:
        >>> import toylib as tl
        >>> from toylib import nn
        >>> model = nn.Sequential(nn.Linear(2, 2, rngs=0), nn.BatchNorm(2))
        >>> graphdef, params, stats = tl.split(model, tl.Param, tl.BatchStat)
        >>> sorted(p[-1] for p in stats.flat())
        ['mean', 'var']
    """
    graphdef, leaves = _graph_leaves(node, "tl.split")
    snapshot = [(path, _snapshot(leaf)) for path, leaf in leaves]
    if not filters:
        return graphdef, State.from_flat(snapshot)
    parts = split_flat(snapshot, filters, caller="tl.split")
    return (graphdef, *(State.from_flat(part) for part in parts))


def state(node: Any, *filters: Filter) -> State | tuple[State, ...]:
    """A snapshot State of the Variables matching the filter(s) (all if none).

    Unlike ``split``, Variables matching no filter are simply left out. With
    several filters, returns one State per filter.

    Example:
        >>> import toylib as tl
        >>> from toylib import nn
        >>> params = tl.state(nn.Linear(2, 3, rngs=0), tl.Param)
        >>> params.kernel.shape
        (2, 3)
    """
    _, leaves = _graph_leaves(node, "tl.state")
    snapshot = State.from_flat((p, _snapshot(leaf)) for p, leaf in leaves)
    return snapshot.filter(*filters) if filters else snapshot


def merge(graphdef: GraphDef[M], *states: State) -> M:
    """Rebuild a model from its GraphDef and States, shared references restored.

    The result is a new object graph with new Variables: it shares nothing
    mutable with the States.

    Example:
        >>> import toylib as tl
        >>> from toylib import nn
        >>> graphdef, params, rest = tl.split(nn.Dropout(0.5, rngs=0), tl.Param, ...)
        >>> type(tl.merge(graphdef, params, rest)).__name__
        'Dropout'
    """
    flat: dict[Path, Any] = {}
    for s in states:
        if not isinstance(s, State):
            raise TypeError(
                f"tl.merge: expected States after the graphdef, got a {type(s).__name__}. "
                "Fix: tl.merge(graphdef, *states) with the States from tl.split."
            )
        flat.update(s.flat())
    expected = graphdef.leaf_paths
    if len(expected) != len(flat) or not all(p in flat for p in expected):
        raise ValueError(MERGE_MISMATCH.format(graph=repr(graphdef), details=_diff(expected, flat)))
    return unflatten(graphdef, flat)


def _diff(expected: tuple[Path, ...], given: dict[Path, Any]) -> str:
    missing = [p for p in expected if p not in given]
    unexpected = [p for p in given if p not in set(expected)]
    lines = []
    for label, paths in (("missing", missing), ("not in the graphdef", unexpected)):
        if paths:
            lines.append(f"  {label}: {list_paths(paths)}")
    return "\n".join(lines)


UPDATE_OVERLAP = """\
tl.update: `{path}` is set by State {first} and by State {second}, to different values;
only one of them can be written. Nothing was changed.
Fix: pass each Variable once, e.g. the parts of one split, or drop the stale copy:

    graphdef, params, rest = tl.split(model, tl.Param, ...)
    tl.update(model, new_params, rest)        # not new_params plus a full old state
"""


def update(node: Any, *states: State) -> None:
    """Write the States' values into the live Variables of ``node``, in place.

    Every entry is checked before anything is written, so a bad State changes
    nothing: its path must exist in ``node``; a Variable in the State must be
    of the type the model has there; the value must have the shape and dtype
    of the one it replaces (a Python number for a 0-d array is converted).
    Only values change: the model keeps its own Variable objects, so other
    references to them see the new values. Two States that set the same path
    to different values are an error (NNX keeps the last one silently, which
    loses trained values in ``tl.update(model, trained_params, full_state)``).

    Example:
        >>> import jax, toylib as tl
        >>> from toylib import nn
        >>> model = nn.Linear(2, 3, rngs=0)
        >>> zeros = jax.tree.map(lambda x: x * 0, tl.state(model))
        >>> tl.update(model, zeros)
        >>> float(abs(model.kernel.value).sum())
        0.0
    """
    _, leaves = _graph_leaves(node, "tl.update")
    live = dict(leaves)
    for s in states:
        if not isinstance(s, State):
            raise TypeError(
                f"tl.update: expected States after the model, got a {type(s).__name__}. "
                "Fix: tl.update(model, state) with a State from tl.state or tl.split."
            )
    given: dict[Path, tuple[int, Any]] = {}
    for number, s in enumerate(states, 1):
        for path, new in s.flat().items():
            first = given.setdefault(path, (number, new))
            if first[0] != number and unwrap(first[1]) is not unwrap(new):
                raise ValueError(
                    UPDATE_OVERLAP.format(path=format_path(path), first=first[0], second=number)
                )
    writes = [_planned_write(node, live, path, new) for path, (_, new) in given.items()]
    write_all(writes)


def _planned_write(node: Any, live: dict[Path, Any], path: Path, new: Any) -> tuple:
    """``(Variable or parent, key, value)`` for one checked State entry."""
    target = live.get(path, _ABSENT)
    if target is _ABSENT:
        _update_error(path, new, "the model has no Variable or array there")
    if isinstance(new, Variable) and type(new) is not type(target):
        kind = type(target).__name__ if isinstance(target, Variable) else "bare array"
        _update_error(path, new, f"the model has a {kind}")
    value = checked_value(unwrap(target), new, format_path(path), "tl.update")
    if isinstance(target, Variable):
        return target, None, value
    parent = parent_of(node, path)
    if isinstance(parent, tuple):
        _update_error(path, new, "it is inside a tuple, which cannot change in place")
    return parent, path[-1], value


def parent_of(node: Any, path: Path) -> Any:
    """The Module or container holding the value at ``path`` (a bare array's parent)."""
    parent = node
    for key in path[:-1]:
        parent = vars(parent)[key] if isinstance(parent, Module) else parent[key]
    return parent


def write_all(writes: list[tuple[Any, Any, Any]]) -> None:
    """Carry out checked writes ``(Variable, None, value)`` / ``(parent, key, value)``."""
    for target, key, value in writes:
        if key is None:
            target.value = value
        elif isinstance(target, Module):
            vars(target)[key] = value  # a bare array: the same structure, a new value
            changed(target)
        else:
            target[key] = value  # a tracked container reports this itself


_ABSENT = object()


def _update_error(path: Path, new: Any, found: str) -> None:
    what = f"a {type(new).__name__}" if isinstance(new, Variable) else "a value"
    raise ValueError(UPDATE_MISMATCH.format(what=what, path=format_path(path), found=found))


def pop(node: Any, *filters: Filter) -> State | tuple[State, ...]:
    """Remove the Variables matching the filter(s) from ``node`` and return them.

    Typical use: collect ``Intermediate`` values sown during a forward pass.
    A Variable referenced from several places is removed from all of them.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> class Probe(tl.Module):
        ...     def __call__(self, x):
        ...         self.seen = tl.Intermediate(x * 2)
        ...         return x
        >>> model = Probe()
        >>> _ = model(jnp.ones(2))
        >>> tl.pop(model, tl.Intermediate).seen.value.tolist(), hasattr(model, "seen")
        ([2.0, 2.0], False)
    """
    if not filters:
        raise TypeError("tl.pop needs a filter, e.g. tl.pop(model, tl.Intermediate).")
    _, leaves = _graph_leaves(node, "tl.pop")
    variables = [(p, v) for p, v in leaves if isinstance(v, Variable)]
    parts = split_flat(variables, filters, caller="tl.pop", strict=False)
    doomed = {id(v) for part in parts for _, v in part}
    sites = _references(node, doomed)
    for path, container, _ in sites:
        if isinstance(container, list | tuple):
            kind = type(container[path[-1]]).__name__
            raise ValueError(
                POP_FROM_SEQUENCE.format(
                    kind=kind,
                    path=format_path(path),
                    container="list" if isinstance(container, list) else "tuple",
                )
            )
    for _, container, key in sites:
        if isinstance(container, Module):
            delattr(container, key)
        else:
            del container[key]
    states = tuple(State.from_flat(part) for part in parts)
    return states[0] if len(states) == 1 else states


def _references(root: Any, ids: set[int]) -> list[tuple[Path, Any, Any]]:
    """Every (path, container, key) where one of the Variables ``ids`` is stored."""
    sites: list[tuple[Path, Any, Any]] = []
    if not ids:
        return sites
    todo: list[tuple[Any, Path]]  # Modules and the containers on their attributes
    todo = [(obj, path) for path, obj in iter_graph(root) if isinstance(obj, Module)]
    if isinstance(root, list | tuple | dict):
        todo.append((root, ()))
    while todo:
        container, path = todo.pop()
        items = vars(container).items() if isinstance(container, Module) else items_of(container)
        for key, value in list(items):
            if id(value) in ids:
                sites.append(((*path, key), container, key))
            elif isinstance(value, list | tuple | dict):
                todo.append((value, (*path, key)))
    return sites


def clone(node: Any) -> Any:
    """A deep copy of the graph: new Modules, Variables *and buffers*, sharing preserved.

    As ``copy.deepcopy`` or PyTorch's ``deepcopy(model)``: the copy owns its
    arrays, so a donating ``tl.jit`` step on the original cannot delete them.
    Copying is asynchronous, as any jax operation.

    Example:
        >>> import toylib as tl
        >>> from toylib import nn
        >>> a = nn.Linear(2, 2, rngs=0)
        >>> b = tl.clone(a)
        >>> b.kernel is a.kernel, bool((b.kernel.value == a.kernel.value).all())
        (False, True)
    """
    graphdef, leaves = _graph_leaves(node, "tl.clone")
    return unflatten(graphdef, {path: _copy(unwrap(leaf)) for path, leaf in leaves})


def _copy(value: Any) -> Any:
    if isinstance(value, jax.Array | np.ndarray):
        return value.copy()
    if isinstance(value, jax.ShapeDtypeStruct):
        return value
    return jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array | np.ndarray) else x, value)


def tree_leaf_paths(node: Any) -> list[Path]:
    """For each leaf of ``node`` as raw jax sees it (a tree), its path in the graph view.

    ``jax.tree.leaves(node, is_leaf=<is a Variable>)`` and this list run in
    the same order; a Variable reachable twice appears twice, both times at
    its first path. Pairs a Module of gradients from raw ``jax.grad`` with the
    model's State.
    """
    walker = _TreePaths()
    walk(node, (), walker.visit)
    return walker.paths


class _TreePaths:
    def __init__(self) -> None:
        self.first: dict[int, Path] = {}
        self.paths: list[Path] = []

    def visit(self, path: Path, node: Any) -> None:
        if not is_graph_node(node):
            self.paths.append(path)
            return
        first = self.first.setdefault(id(node), path)
        if isinstance(node, Variable):
            self.paths.append(first)
        else:
            attribute_skeletons(node, self.visit, first)


def iter_modules(node: Any) -> Iterator[tuple[Path, Module]]:
    """``(path, module)`` for every Module reachable from ``node`` (itself first, path ``()``).

    Example:
        >>> import toylib as tl
        >>> from toylib import nn
        >>> [p for p, _ in tl.iter_modules(nn.MLP([2, 4, 1], rngs=0))]
        [(), ('layers', 0), ('layers', 1)]
    """
    return ((p, m) for p, m in iter_graph(node) if isinstance(m, Module))


def iter_variables(node: Any, filter: Filter = ...) -> Iterator[tuple[Path, Variable]]:
    """``(path, variable)`` for every Variable matching ``filter`` (the live objects).

    Example:
        >>> import toylib as tl
        >>> from toylib import nn
        >>> [p for p, _ in tl.iter_variables(nn.Linear(2, 3, rngs=0), tl.Param)]
        [('kernel',), ('bias',)]
    """
    pred = to_predicate(filter)
    return ((p, v) for p, v in iter_graph(node) if isinstance(v, Variable) and pred(p, v))


# -- graphdef.apply ---------------------------------------------------------------------


class _Apply:
    """What ``graphdef.apply(*states)`` returns: call it, a method, or a submodule."""

    __slots__ = ("_graphdef", "_path", "_states")

    def __init__(self, graphdef: GraphDef, states: tuple, path: Path) -> None:
        self._graphdef, self._states, self._path = graphdef, states, path

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if _is_submodule(self._graphdef, (*self._path, name)):
            return _Apply(self._graphdef, self._states, (*self._path, name))
        return lambda *args, **kwargs: self._run(lambda t: getattr(t, name)(*args, **kwargs))

    def __getitem__(self, key: Any) -> _Apply:
        return _Apply(self._graphdef, self._states, (*self._path, key))

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[Any, tuple[State, GraphDef]]:
        return self._run(lambda target: target(*args, **kwargs))

    def _run(self, call: Callable[[Any], Any]) -> tuple[Any, tuple[State, GraphDef]]:
        model = merge(self._graphdef, *self._states)
        target = model
        for key in self._path:
            target = vars(target)[key] if isinstance(target, Module) else target[key]
        out = call(target)
        new_graphdef, new_state = split(model)
        return out, (new_state, new_graphdef)


def _is_submodule(graphdef: GraphDef, path: Path) -> bool:
    """Whether ``path`` leads to a Module or container in the structure."""
    modules = graphdef._index()[1]
    node = graphdef.root
    for key in path:
        if type(node) is Ref:
            node = modules[node.index]
        if type(node) is ModuleDef:
            node = dict(node.attributes).get(key)
        elif type(node) is Seq and isinstance(key, int) and key < len(node.items):
            node = node.items[key]
        elif type(node) is Map:
            node = dict(node.items).get(key)
        else:
            return False
    return type(node) in (ModuleDef, Ref, Seq, Map)
