"""Skeletons: what is data and what is static in a Module's attributes.

A data attribute is described by a hashable *skeleton*: ``Static`` for a
plain value, ``Seq``/``Map`` for containers, and whatever the caller's
``visit`` returns for a node (an array, Variable or Module). The pytree view
(``module.py``) and the graph view (``graph.py``) both use this one walker,
so they always agree on what is data.

Which items are data is decided when they are assigned, by their type. An
object that toylib or jax *rebuilds* (``jax.tree.map``, ``tl.merge``)
remembers the skeleton it was rebuilt from (its ``_toylib_layout``), and its
data positions stay data whatever value they now hold: so
``jax.tree.map(lambda x: True, model)`` has the model's own structure, as
``optax.masked`` and ``eqx.partition`` need. Assigning to such an object
(``setattr``, a list mutation) decides again by type, for what was assigned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.core  # named: jax imports it, but pyright sees only what is imported
import numpy as np

from toylib._core.containers import LAYOUT, is_tracked, new_mapping
from toylib._core.paths import Path
from toylib._core.variables import Variable

__all__ = [
    "HOLE",
    "Map",
    "Seq",
    "Static",
    "attribute_skeletons",
    "is_array",
    "is_graph_node",
    "is_node",
    "items_of",
    "iter_graph",
    "rebuild",
    "walk",
]


def is_array(x: Any) -> bool:
    """Whether ``x`` is a data leaf: a jax or numeric numpy array, or a stand-in for one.

    The stand-in is ``jax.ShapeDtypeStruct``, what ``tl.eval_shape`` leaves in a model.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, toylib as tl
        >>> tl.is_array(jnp.ones(2)), tl.is_array(np.ones(2)), tl.is_array(1.0)
        (True, True, False)
        >>> tl.is_array(jax.ShapeDtypeStruct((2,), jnp.float32))
        True
    """
    return isinstance(x, jax.Array | jax.ShapeDtypeStruct) or (
        isinstance(x, np.ndarray) and x.dtype != object
    )


def is_graph_node(x: Any) -> bool:
    """Whether ``x`` is a Module or a Variable (an object of the graph view)."""
    return getattr(type(x), "_toylib_node", False)


def is_node(x: Any) -> bool:
    """Whether ``x`` is data on its own: an array, a Variable or a Module."""
    kind = _KINDS.get(type(x)) or _kind(type(x))
    return kind is _NODE or (kind is _NDARRAY and x.dtype != object)


def items_of(container: Any) -> Any:
    return container.items() if isinstance(container, dict) else enumerate(container)


# What a value is, decided once per type: flattening runs on every jax call
# that takes a Module, so it must not repeat isinstance chains per attribute.
_NODE, _NDARRAY, _LIST, _TUPLE, _DICT, _STATIC = "node ndarray list tuple dict static".split()
_KINDS: dict[type, str] = {}


def _kind(t: type) -> str:
    kind = _KINDS.get(t)
    if kind is None:
        # ShapeDtypeStruct: the abstract stand-in for an array (tl.eval_shape, tl.load).
        if getattr(t, "_toylib_node", False) or issubclass(
            t, jax.Array | jax.core.Tracer | jax.ShapeDtypeStruct
        ):
            kind = _NODE
        elif issubclass(t, np.ndarray):
            kind = _NDARRAY  # data unless its dtype is object
        elif issubclass(t, list):
            kind = _LIST
        elif issubclass(t, tuple):
            kind = _TUPLE
        elif issubclass(t, dict):
            kind = _DICT
        else:
            kind = _STATIC
        _KINDS[t] = kind
    return kind


class Static(NamedTuple):
    value: Any


class Seq(NamedTuple):
    type: type
    items: tuple


class Map(NamedTuple):
    type: type
    items: tuple  # ((key, skeleton), ...)
    factory: Any = None  # a defaultdict's default_factory


class _Hole(NamedTuple):
    """Marks where a child goes in a Module's pytree skeleton."""


HOLE = _Hole()
_CONTAINERS = (Static, Seq, Map)


def walk(value: Any, path: Path, visit: Callable[[Path, Any], Any]) -> Any:
    """Describe ``value`` as a skeleton, calling ``visit(path, node)`` on each node."""
    kind = _KINDS.get(type(value)) or _kind(type(value))
    if kind is _STATIC:
        return Static(value)
    if kind is _NODE or (kind is _NDARRAY and value.dtype != object):
        return visit(path, value)
    if kind is _LIST or kind is _TUPLE:
        items = tuple(walk(v, (*path, i), visit) for i, v in enumerate(value))
        if kind is _TUPLE and all(type(s) is Static for s in items):
            return Static(value)
        return Seq(type(value), items)
    if kind is _DICT:
        items = tuple((k, walk(v, (*path, k), visit)) for k, v in value.items())
        return Map(type(value), items, getattr(value, "default_factory", None))
    return Static(value)


def guided(skeleton: Any, value: Any, path: Path, visit: Callable[[Path, Any], Any]) -> Any:
    """``walk`` for a rebuilt object: the positions ``skeleton`` marks as data stay data.

    A container whose shape no longer fits the skeleton (it was mutated) is
    walked by type instead.
    """
    kind = type(skeleton)
    if kind not in _CONTAINERS:
        return visit(path, value)  # a data position, whatever it holds now
    if kind is Static or type(value) is not skeleton.type:
        return walk(value, path, visit)
    items = getattr(value, LAYOUT, None) if is_tracked(value) else skeleton.items
    if items is None or len(items) != len(value):
        return walk(value, path, visit)
    if kind is Seq:
        out = tuple(
            guided(s, v, (*path, i), visit)
            for i, (s, v) in enumerate(zip(items, value, strict=True))
        )
        if isinstance(value, tuple) and all(type(s) is Static for s in out):
            return Static(value)
        return Seq(skeleton.type, out)
    if any(k not in value for k, _ in items):
        return walk(value, path, visit)
    out = tuple((k, guided(s, value[k], (*path, k), visit)) for k, s in items)
    return Map(skeleton.type, out, skeleton.factory)


def rebuild(skeleton: Any, path: Path, build: Callable[[Path, Any], Any]) -> Any:
    """Inverse of ``walk``: ``build(path, item)`` makes each node back.

    Rebuilt tracked containers remember ``skeleton`` (see the module docstring).
    """
    kind = type(skeleton)
    if kind is Static:
        return skeleton.value
    if kind is Seq:
        items = [rebuild(s, (*path, i), build) for i, s in enumerate(skeleton.items)]
        if hasattr(skeleton.type, "_fields"):  # a NamedTuple
            return skeleton.type(*items)
        new = skeleton.type(items)
    elif kind is Map:
        pairs = [(k, rebuild(s, (*path, k), build)) for k, s in skeleton.items]
        new = new_mapping(skeleton.type, pairs, skeleton.factory)
    else:
        return build(path, skeleton)
    if is_tracked(new):
        object.__setattr__(new, LAYOUT, skeleton.items)
    return new


def attribute_skeletons(module: Any, visit: Callable[[Path, Any], Any], prefix: Path = ()) -> tuple:
    """``((name, skeleton), ...)`` for a Module's attributes, paths under ``prefix``.

    ``walk`` with its two common cases (a node, a plain value) inlined: this
    runs for every Module on every raw jax call that takes one.
    """
    layout = getattr(module, LAYOUT, None)
    if layout is not None:
        return _rebuilt_skeletons(module, layout, visit, prefix)
    out = []
    for name, value in vars(module).items():
        kind = _KINDS.get(type(value)) or _kind(type(value))
        if kind is _NODE:
            out.append((name, visit((*prefix, name), value)))
        elif kind is _STATIC:
            out.append((name, Static(value)))
        else:
            out.append((name, walk(value, (*prefix, name), visit)))
    return tuple(out)


def _rebuilt_skeletons(module: Any, layout: tuple, visit: Callable, prefix: Path) -> tuple:
    attributes = vars(module)
    # Assigned to since it was rebuilt (`_forget_layout` dropped those entries):
    # the attributes the layout still knows keep their data positions.
    if len(layout) != len(attributes) or any(name not in attributes for name, _ in layout):
        known = dict(layout)
        return tuple(
            (name, guided(known[name], v, (*prefix, name), visit))
            if name in known
            else (name, walk(v, (*prefix, name), visit))
            for name, v in attributes.items()
        )
    out = []
    for item in layout:
        name, skeleton = item
        value = attributes[name]
        kind = type(skeleton)
        if kind is Static and value is skeleton.value:
            out.append(item)  # the common cases inlined, as in attribute_skeletons
        elif kind not in _CONTAINERS:
            out.append((name, visit((*prefix, name), value)))
        else:
            out.append((name, guided(skeleton, value, (*prefix, name), visit)))
    return tuple(out)


class _Collector:
    """Every Module and Variable reachable from a root, once each (see ``iter_graph``).

    A class rather than a recursive closure: a closure that refers to itself
    is a reference cycle, which would keep the model alive after ``del``
    until the cycle collector runs.
    """

    def __init__(self) -> None:
        self.found: list[tuple[Path, Any]] = []
        self.seen: set[int] = set()

    def visit(self, path: Path, node: Any) -> None:
        if id(node) in self.seen or not is_graph_node(node):
            return
        self.seen.add(id(node))
        self.found.append((path, node))
        if not isinstance(node, Variable):
            attribute_skeletons(node, self.visit, path)


def iter_graph(root: Any) -> Iterator[tuple[Path, Any]]:
    """Every Module and Variable reachable from ``root``, once each, depth first.

    A node reachable along several paths is reported at the first one;
    reference cycles are followed once. The list is taken before iteration
    starts, so the loop body may change the model.
    """
    collector = _Collector()
    walk(root, (), collector.visit)
    return iter(collector.found)
