"""Module: an ordinary mutable Python object that is also a JAX pytree.

Attributes come in two kinds:

* *data*: arrays (jax and numpy), Variables, Modules, and list/tuple/dict
  containers holding any of them. These are the pytree children.
* *static*: everything else (ints, strings, functions, configs). These are the
  pytree's auxiliary data, so they key ``jax.jit``'s cache and must be
  hashable. A non-empty list of plain values is frozen to a tuple on
  assignment; a dict is always a container (its plain values are static).

Containers are taken apart element by element: the data elements become
children, the plain elements stay in the structure. So
``Sequential([Linear(...), jax.nn.relu, Linear(...)])`` works under
``jax.grad`` with ``relu`` kept static.

Every subclass is registered as a pytree when it is defined. The children are
the data attributes in the order they were first assigned. Raw ``jax``
transforms see a *tree*: a Module reachable twice is flattened twice. toylib's
own functions (``tl.split``, ``tl.jit``...) see the *graph*, see ``graph.py``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import types
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.tree_util import GetAttrKey

from toylib._core.variables import Variable, describe_value

__all__ = ["Dict", "List", "Module", "format_path", "iter_graph", "module_path"]

Path = tuple[Any, ...]

ARRAY_IN_STATIC = """\
{where}: found {what} at `{inner}` inside a {kind}, which toylib treats as a
static value (part of the pytree structure). It would be baked into compiled
programs as a constant and never trained or updated.
Fix: store arrays directly on a Module, in a Variable, or in a list/tuple/dict:

    self.{name} = tl.Param(array)          # or a list/dict of arrays
"""

UNHASHABLE_STATIC = """\
{where}: static attributes must be hashable because they key jax.jit's cache,
but got a {kind} ({value}).
Fix: use a hashable value instead, e.g. a tuple, a frozenset or a frozen
dataclass:

    self.{name} = tuple(...)
"""


# -- structure version -------------------------------------------------------------
# Bumped by every structural change to any Module (an attribute assigned or
# deleted, a tracked list or dict mutated). tl.jit's fast path reuses a cached
# flattening while the version it recorded is current: one integer compare
# instead of a walk over the object graph. Setting a Variable's value is not
# structural and does not bump it.
graph_version = [0]


def structure_changed() -> None:
    """Invalidate cached flattenings (see ``graph_version``)."""
    graph_version[0] += 1


class List(list):
    """The list a Module stores for a list attribute: a list that reports mutation.

    ``self.layers = [...]`` stores a ``List`` so that ``model.layers.append(x)``
    is seen by tl.jit's structure cache. It is a ``list`` in every other way
    and a pytree like one.
    """

    __slots__ = ()


class Dict(dict):
    """The dict a Module stores for a dict attribute: a dict that reports mutation."""

    __slots__ = ()


def _tracked(method: Callable) -> Callable:
    @functools.wraps(method)
    def mutate(self: Any, *args: Any, **kwargs: Any) -> Any:
        graph_version[0] += 1
        return method(self, *args, **kwargs)

    return mutate


for _name in (
    "__setitem__ __delitem__ __iadd__ __imul__ append extend insert pop remove clear sort reverse"
).split():
    setattr(List, _name, _tracked(getattr(list, _name)))
for _name in "__setitem__ __delitem__ __ior__ pop popitem clear update setdefault".split():
    setattr(Dict, _name, _tracked(getattr(dict, _name)))
jax.tree_util.register_pytree_with_keys(
    List,
    lambda x: ([(jax.tree_util.SequenceKey(i), v) for i, v in enumerate(x)], None),
    lambda _, children: List(children),
    lambda x: (list(x), None),
)


def _dict_keys(d: dict) -> tuple:
    # Sorted, as jax orders a dict's children, so a Dict and a dict with the
    # same keys list their leaves in the same order.
    try:
        return tuple(sorted(d))
    except TypeError:
        return tuple(d)


jax.tree_util.register_pytree_with_keys(
    Dict,
    lambda x: ([(jax.tree_util.DictKey(k), x[k]) for k in _dict_keys(x)], _dict_keys(x)),
    lambda keys, children: Dict(zip(keys, children, strict=True)),
    lambda x: ([x[k] for k in _dict_keys(x)], _dict_keys(x)),
)


def is_array(x: Any) -> bool:
    """Whether ``x`` is a data leaf: a jax or numeric numpy array, or its abstract
    stand-in ``jax.ShapeDtypeStruct`` (what ``tl.eval_shape`` leaves in a model)."""
    return isinstance(x, jax.Array | jax.ShapeDtypeStruct) or (
        isinstance(x, np.ndarray) and x.dtype != object
    )


def is_node(x: Any) -> bool:
    """Whether ``x`` is data on its own: an array, a Variable or a Module."""
    kind = _KINDS.get(type(x)) or _kind(type(x))
    return kind is _NODE or (kind is _NDARRAY and x.dtype != object)


# What a value is, decided once per type: flattening runs on every jax call
# that takes a Module, so it must not repeat isinstance chains per attribute.
_NODE, _NDARRAY, _LIST, _TUPLE, _DICT, _STATIC = (
    "node",
    "ndarray",
    "list",
    "tuple",
    "dict",
    "static",
)
_KINDS: dict[type, str] = {}


def _kind(t: type) -> str:
    kind = _KINDS.get(t)
    if kind is None:
        # ShapeDtypeStruct: the abstract stand-in for an array (tl.eval_shape, tl.load).
        if issubclass(t, Module | Variable | jax.Array | jax.core.Tracer | jax.ShapeDtypeStruct):
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


def format_path(path: Path, root: str = "model") -> str:
    """Render a path tuple as ``model.layers[0].kernel``."""
    out = root
    for key in path:
        if isinstance(key, str) and key.isidentifier():
            out += "." + key
        else:
            out += f"[{key!r}]"
    return out


# -- container skeletons ----------------------------------------------------------
# A data attribute is described by a hashable skeleton: Static for a plain
# value, Seq/Map for containers, and whatever `visit` returns for a node
# (an array, Variable or Module). Both the pytree view and the graph view
# use this one walker, so they always agree on what is data.


class Static(NamedTuple):
    value: Any


class Seq(NamedTuple):
    type: type
    items: tuple


class Map(NamedTuple):
    type: type
    items: tuple  # ((key, skeleton), ...)


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
        return Map(type(value), tuple((k, walk(v, (*path, k), visit)) for k, v in value.items()))
    return Static(value)


def rebuild(skeleton: Any, path: Path, build: Callable[[Path, Any], Any]) -> Any:
    """Inverse of ``walk``: ``build(path, item)`` makes each node back."""
    kind = type(skeleton)
    if kind is Static:
        return skeleton.value
    if kind is Seq:
        items = [rebuild(s, (*path, i), build) for i, s in enumerate(skeleton.items)]
        if hasattr(skeleton.type, "_fields"):  # a NamedTuple
            return skeleton.type(*items)
        return skeleton.type(items)
    if kind is Map:
        return skeleton.type((k, rebuild(s, (*path, k), build)) for k, s in skeleton.items)
    return build(path, skeleton)


def iter_graph(root: Any) -> Iterator[tuple[Path, Module | Variable]]:
    """Every Module and Variable reachable from ``root``, once each, depth first.

    A node reachable along several paths is reported at the first one;
    reference cycles are followed once. The list is taken before iteration
    starts, so the loop body may change the model.
    """
    found: list[tuple[Path, Any]] = []
    seen: set[int] = set()

    def visit(path: Path, node: Any) -> None:
        if id(node) in seen or is_array(node):
            return
        seen.add(id(node))
        found.append((path, node))
        if isinstance(node, Module):
            attribute_skeletons(node, visit, path)

    walk(root, (), visit)
    return iter(found)


# -- assignment checks -----------------------------------------------------------


def _hidden_state(value: Any, depth: int, seen: set[int]) -> tuple[str, str] | None:
    """Find an array, Variable or Module inside a plain object: (inner path, what)."""
    if is_node(value):
        return "", "an array" if is_array(value) else f"a {type(value).__name__}"
    if depth > 3 or id(value) in seen:
        return None
    if isinstance(value, str | bytes | int | float | complex | type | types.ModuleType):
        return None
    seen.add(id(value))
    if isinstance(value, list | tuple | set | frozenset):
        children = enumerate(value)
        fmt = "[{}]"
    elif isinstance(value, dict):
        children = value.items()
        fmt = "[{!r}]"
    elif isinstance(value, functools.partial):
        children = [*enumerate(value.args), *value.keywords.items()]
        fmt = "({!r})"
    elif isinstance(getattr(value, "__dict__", None), dict):
        children = vars(value).items()
        fmt = ".{}"
    else:
        return None
    for key, item in children:
        found = _hidden_state(item, depth + 1, seen)
        if found is not None:
            return fmt.format(key) + found[0], found[1]
    return None


def _normalize(value: Any, where: str, name: str) -> tuple[Any, bool]:
    """Check an assigned value; freeze plain lists. Returns (value, is_container)."""
    if is_node(value):
        return value, True
    if isinstance(value, list | tuple | dict):
        pairs = list(items_of(value))
        normal = [(k, *_normalize(v, f"{where}[{k!r}]", name)) for k, v in pairs]
        changed = any(new is not old for (_, new, _), (_, old) in zip(normal, pairs, strict=True))
        if isinstance(value, dict):  # always a container; plain values stay static
            kind = Dict if type(value) is dict else type(value)
            if changed or kind is not type(value):
                value = kind((k, v) for k, v, _ in normal)
            return value, True
        values = [v for _, v, _ in normal]
        dynamic = any(flag for *_, flag in normal)
        if isinstance(value, list):
            if value and not dynamic:  # a list of plain values is frozen (hashable)
                return tuple(values), False
            kind = List if type(value) is list else type(value)
            return (kind(values) if changed or kind is not type(value) else value), True
        if changed:
            value = type(value)(*values) if hasattr(value, "_fields") else type(value)(values)
        return value, dynamic
    hidden = _hidden_state(value, 0, set())
    if hidden is not None:
        raise TypeError(
            ARRAY_IN_STATIC.format(
                where=where,
                what=hidden[1],
                inner=f"{where}{hidden[0]}",
                kind=type(value).__name__,
                name=name,
            )
        )
    try:
        hash(value)
    except TypeError:
        text = repr(value)
        text = text if len(text) < 60 else text[:57] + "..."
        raise TypeError(
            UNHASHABLE_STATIC.format(where=where, kind=type(value).__name__, value=text, name=name)
        ) from None
    return value, False


def items_of(container: Any) -> Any:
    return container.items() if isinstance(container, dict) else enumerate(container)


_MISSING = object()


class Module:
    """Base class of models: assign attributes in ``__init__``, define ``__call__``.

    A Module is an ordinary mutable object (``model.layers[0] = other``
    works) and a pytree, so ``jax.jit``, ``jax.grad``, ``jax.tree.map`` and
    optax accept it directly.

    Assigning a non-Variable to an attribute that holds a Variable sets the
    Variable's value (``self.count += 1``); assign a Variable to replace it.

    Example:
        >>> import jax, jax.numpy as jnp, toylib as tl
        >>> class Scale(tl.Module):
        ...     def __init__(self, n):
        ...         self.w = tl.Param(jnp.ones(n))
        ...         self.n = n                      # static
        ...     def __call__(self, x):
        ...         return x * self.w
        >>> m = Scale(3)
        >>> m(jnp.full(3, 2.0)).tolist()
        [2.0, 2.0, 2.0]
        >>> m.w = jnp.zeros(3)                      # sets m.w.value
        >>> grads = jax.grad(lambda m: m(jnp.ones(3)).sum())(m)
        >>> type(grads).__name__, grads.w.value.tolist()
        ('Scale', [1.0, 1.0, 1.0])
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _register(cls)
        if "__call__" in vars(cls):
            cls.__call__ = _track_calls(vars(cls)["__call__"])

    def __setattr__(self, name: str, value: Any) -> None:
        current = vars(self).get(name, _MISSING)
        if isinstance(current, Variable) and not isinstance(value, Variable):
            current.value = value
            return
        graph_version[0] += 1
        if hasattr(getattr(type(self), name, None), "__set__"):  # property etc.
            object.__setattr__(self, name, value)
            return
        value, _ = _normalize(value, f"{type(self).__name__}.{name}", name)
        vars(self)[name] = value

    def __delattr__(self, name: str) -> None:
        graph_version[0] += 1
        object.__delattr__(self, name)

    def train(self) -> Module:
        """Training mode: ``deterministic=False``, ``use_running_average=False``.

        Sets these flags on every submodule that has them (like PyTorch's
        ``model.train()``) and returns ``self``.
        """
        return self._set_flags(deterministic=False, use_running_average=False)

    def eval(self) -> Module:
        """Evaluation mode: ``deterministic=True``, ``use_running_average=True``."""
        return self._set_flags(deterministic=True, use_running_average=True)

    def _set_flags(self, **flags: Any) -> Module:
        for _, node in iter_graph(self):
            if isinstance(node, Module):
                for flag, value in flags.items():
                    if flag in vars(node):
                        setattr(node, flag, value)
        return self

    def __repr__(self) -> str:
        return _repr(self, 0, {}, ())


# -- call stack -------------------------------------------------------------------
# The Modules whose __call__ is running, outermost first. A layer that rejects
# its input names itself by its path from the outermost one
# (`model.blocks[2].attn`), which it cannot know on its own: Modules hold no
# parent links. Only Python-level calls pay for this (eagerly, or once per
# trace); compiled code never sees it.
_calls: list[Any] = []
# Names for Modules rebuilt inside a jax transform, which identity lookup
# cannot find (nn.Stack labels the block it scans over `blocks[*]`).
_labels: dict[int, str] = {}
# Wrappers that run every Module call while they are installed (tl.summary
# records its rows with one); empty, a call costs one list check more.
_interceptors: list[Callable] = []


@contextlib.contextmanager
def labelled(module: Any, label: str) -> Iterator[None]:
    """Within the block, ``module_path`` shows ``module`` as ``label`` (e.g. ``.blocks[*]``)."""
    _labels[id(module)] = label
    try:
        yield
    finally:
        del _labels[id(module)]


@contextlib.contextmanager
def intercept_calls(wrapper: Callable) -> Iterator[None]:
    """Within the block, every Module call runs as ``wrapper(call, module, args, kwargs)``.

    ``call(module, *args, **kwargs)`` is the Module's own ``__call__``; the
    wrapper returns the output. A ``super().__call__`` inside an overriding
    ``__call__`` reaches the wrapper again with the same module.
    """
    _interceptors.append(wrapper)
    try:
        yield
    finally:
        _interceptors.remove(wrapper)


def _track_calls(call: Callable) -> Callable:
    if getattr(call, "_tracks_calls", False):
        return call

    @functools.wraps(call)
    def tracked(self: Any, *args: Any, **kwargs: Any) -> Any:
        _calls.append(self)
        try:
            if _interceptors:
                return _interceptors[-1](call, self, args, kwargs)
            return call(self, *args, **kwargs)
        finally:
            _calls.pop()

    tracked._tracks_calls = True  # type: ignore[attr-defined]
    return tracked


def module_path(module: Module) -> str:
    """Where ``module`` sits in the model being called: ``model.blocks[2].attn (Attention)``.

    The path runs from the outermost Module whose ``__call__`` is running.
    A step whose child cannot be found by identity (a copy rebuilt inside a
    jax transform, e.g. one block of ``nn.Stack``) is shown as ``<Type>``.
    Outside any call it is ``model (Type)``. Layers use it in error messages.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> from toylib import nn
        >>> mlp = nn.MLP([3, 4, 2], rngs=0)
        >>> mlp(jnp.ones((1, 5)))
        Traceback (most recent call last):
        ValueError: model.layers[0] (Linear): expected input of shape (..., 3), got (1, 5).
        ...
    """
    return f"{call_path(module)} ({type(module).__name__})"


def call_path(module: Module) -> str:
    """``module_path`` without the type: ``model.blocks[2].attn``."""
    chain = [m for i, m in enumerate(_calls) if i == 0 or m is not _calls[i - 1]]
    if not chain or chain[-1] is not module:
        chain.append(module)
    text = "model"
    for parent, child in itertools.pairwise(chain):
        text += _child_path(parent, child)
    return text


def _child_path(parent: Any, child: Any) -> str:
    for path, node in iter_graph(parent):
        if node is child:
            return format_path(path, root="")
    return _labels.get(id(child), f".<{type(child).__name__}>")


# -- repr -------------------------------------------------------------------------


def _ignore(path: Path, node: Any) -> None:
    return None


def _repr(value: Any, depth: int, seen: dict[int, Path], path: Path) -> str:
    if isinstance(value, Module | Variable):
        if id(value) in seen:
            return f"{type(value).__name__}(...)  # shared: {format_path(seen[id(value)])}"
        seen[id(value)] = path
        if isinstance(value, Variable):
            return repr(value)
        items = list(vars(value).items())
        opening, closing = f"{type(value).__name__}(", ")"
        fmt = "{}={}"
    elif is_array(value):
        return describe_value(value)
    elif isinstance(value, list | tuple | dict) and type(walk(value, (), _ignore)) is not Static:
        items = list(items_of(value))
        opening, closing = (
            ("[", "]")
            if isinstance(value, list)
            else ("{", "}")
            if isinstance(value, dict)
            else ("(", ")")
        )
        fmt = "{!r}: {}" if isinstance(value, dict) else "{1}"
        if isinstance(value, tuple) and not hasattr(value, "_fields"):
            closing = ",)" if len(items) == 1 else ")"
    elif callable(value) and not isinstance(value, type) and hasattr(value, "__name__"):
        return value.__name__  # functions (activations) by name, not by address
    else:
        return repr(value)
    if not items:
        return opening + closing
    pad = "  " * (depth + 1)
    lines = [pad + fmt.format(k, _repr(v, depth + 1, seen, (*path, k))) + "," for k, v in items]
    return "\n".join([opening, *lines, "  " * depth + closing])


# -- pytree registration ------------------------------------------------------------


class _Hole(NamedTuple):
    """Marks where a child goes in a Module's pytree skeleton."""


HOLE = _Hole()


def attribute_skeletons(
    module: Module, visit: Callable[[Path, Any], Any], prefix: Path = ()
) -> tuple:
    """``((name, skeleton), ...)`` for a Module's attributes, paths under ``prefix``.

    ``walk`` with its two common cases (a node, a plain value) inlined: this
    runs for every Module on every raw jax call that takes one.
    """
    layout = []
    for name, value in vars(module).items():
        kind = _KINDS.get(type(value)) or _kind(type(value))
        if kind is _NODE:
            layout.append((name, visit((*prefix, name), value)))
        elif kind is _STATIC:
            layout.append((name, Static(value)))
        else:
            layout.append((name, walk(value, (*prefix, name), visit)))
    return tuple(layout)


def _flatten(module: Module) -> tuple[list[Any], tuple]:
    children: list[Any] = []

    def visit(path: Path, node: Any) -> _Hole:
        children.append(node)
        return HOLE

    return children, attribute_skeletons(module, visit)


def _flatten_with_keys(module: Module) -> tuple[list[tuple[Any, Any]], tuple]:
    children: list[tuple[Any, Any]] = []

    def visit(path: Path, node: Any) -> _Hole:
        children.append((GetAttrKey(format_path(path, root="")[1:]), node))
        return HOLE

    return children, attribute_skeletons(module, visit)


def _register(cls: type) -> None:
    def unflatten(layout: tuple, children: Any) -> Module:
        # No checks and no __init__: jax rebuilds with tracers, None or sentinels.
        module = object.__new__(cls)
        take = iter(children).__next__
        attributes = vars(module)
        for name, skeleton in layout:
            kind = type(skeleton)
            if kind is _Hole:
                attributes[name] = take()
            elif kind is Static:
                attributes[name] = skeleton.value
            else:
                attributes[name] = rebuild(skeleton, (), lambda path, hole: take())
        return module

    jax.tree_util.register_pytree_with_keys(cls, _flatten_with_keys, unflatten, _flatten)


_register(Module)
