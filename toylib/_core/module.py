"""Module: an ordinary mutable Python object that is also a JAX pytree.

Attributes come in two kinds:

* *data*: arrays (jax and numpy), Variables, Modules, and list/tuple/dict
  containers holding any of them. These are the pytree children.
* *static*: everything else (ints, strings, functions, configs). These are the
  pytree's auxiliary data, so they key ``jax.jit``'s cache and must be
  hashable. A non-empty list of plain values is frozen to a tuple on
  assignment; a dict is always a container (its plain values are static).

Which is which is decided on assignment (``assignment.py`` checks the value,
``skeleton.py`` describes it). Containers are taken apart element by element:
the data elements become children, the plain elements stay in the structure.
So ``Sequential([Linear(...), jax.nn.relu, Linear(...)])`` works under
``jax.grad`` with ``relu`` kept static.

Every subclass is registered as a pytree when it is defined. The children are
the data attributes in the order they were first assigned. Raw ``jax``
transforms see a *tree*: a Module reachable twice is flattened twice. toylib's
own functions (``tl.split``, ``tl.jit``...) see the *graph*, see ``graph.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import jax
from jax.tree_util import GetAttrKey

from toylib._core.assignment import SIMPLE, normalize
from toylib._core.calls import call_path, track_calls
from toylib._core.containers import LAYOUT
from toylib._core.paths import Path, format_path
from toylib._core.skeleton import (
    HOLE,
    Static,
    _Hole,
    attribute_skeletons,
    is_array,
    items_of,
    iter_graph,
    rebuild,
    walk,
)
from toylib._core.variables import Variable, describe_value
from toylib._core.watchers import SLOT, changed

__all__ = ["Module", "blank"]

_MISSING = object()

SOW_CLASH = """\
{path}.sow({type}, {name!r}, ...): `{name}` already holds a {kind}, not a {type},
so there is nothing to append to.
Fix: sow under another name, or remove the attribute first (`tl.pop(model, tl.{type})`
for sown values, `del module.{name}` otherwise).
"""


def _initial(init_fn: Callable[[], Any] | None) -> Any:
    if init_fn is None:
        raise TypeError("Module.sow(..., reduce_fn=...) needs init_fn, the starting value.")
    return init_fn()


# (a TypeVar, not typing.Self: beartype rejects Self on a method checked alone)
_M = TypeVar("_M", bound="Module")


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

    # Outside `vars()`, so neither pytree nor repr sees them: the caches
    # watching this object (watchers.py) and, for a rebuilt object, the
    # skeleton it was rebuilt from (skeleton.py).
    __slots__ = ("__dict__", "__weakref__", LAYOUT, SLOT)
    _toylib_node = True  # a node of the graph view (skeleton.is_graph_node)

    def __new__(cls: type[_M], *args: Any, **kwargs: Any) -> _M:  # `nn.Linear(...)` is a Linear
        return blank(cls)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _register(cls)
        if "__call__" in vars(cls):
            cls.__call__ = track_calls(vars(cls)["__call__"])

    def __setattr__(self, name: str, value: Any) -> None:
        attributes = vars(self)
        current = attributes.get(name, _MISSING)
        if isinstance(current, Variable) and not isinstance(value, Variable):
            current.value = value
            return
        if hasattr(getattr(type(self), name, None), "__set__"):  # property, slot
            object.__setattr__(self, name, value)
        elif type(value) in SIMPLE:  # the common static values: nothing to check
            attributes[name] = value
        else:
            attributes[name], _ = normalize(value, f"{type(self).__name__}.{name}", name)
        if getattr(self, LAYOUT, None) is not None:
            self._forget_layout(name)
        if getattr(self, SLOT, None):
            changed(self)  # after the write: a cache checking now sees the new structure

    def __delattr__(self, name: str) -> None:
        object.__delattr__(self, name)
        self._forget_layout(name)
        changed(self)

    def _forget_layout(self, name: str) -> None:
        # What is assigned is classified by its own type (skeleton.py).
        layout = getattr(self, LAYOUT, None)
        if layout is not None:
            object.__setattr__(self, LAYOUT, tuple(item for item in layout if item[0] != name))

    def __getstate__(self) -> dict[str, Any]:
        # copy and pickle take the attributes, not the caches watching them.
        return dict(vars(self))

    def sow(
        self,
        variable_type: type[Variable],
        name: str,
        value: Any,
        *,
        reduce_fn: Callable[[Any, Any], Any] | None = None,
        init_fn: Callable[[], Any] | None = None,
    ) -> None:
        """Record ``value`` in the ``variable_type`` Variable ``self.<name>``, appending.

        As NNX's ``sow``: the first call creates ``variable_type((value,))``,
        later calls append to the tuple (or, with ``reduce_fn``, store
        ``reduce_fn(current, value)``, starting from ``init_fn()``). Inside
        ``tl.jit`` and the other transforms the new Variable appears on the
        caller's Module afterwards; take the values out with ``tl.pop``.

        Arguments:
            variable_type: the Variable type, typically ``tl.Intermediate``.
            name: the attribute name.
            value: what to record.
            reduce_fn, init_fn: combine values instead of appending.

        Example:
            >>> import jax.numpy as jnp, toylib as tl
            >>> class Block(tl.Module):
            ...     def __call__(self, x):
            ...         self.sow(tl.Intermediate, "acts", x * 2)
            ...         return x
            >>> block = Block()
            >>> _ = tl.jit(lambda b, x: b(x))(block, jnp.ones(2))
            >>> _ = block(jnp.zeros(2))
            >>> [a.tolist() for a in tl.pop(block, tl.Intermediate).acts.value]
            [[2.0, 2.0], [0.0, 0.0]]
        """
        current = vars(self).get(name, _MISSING)
        if current is _MISSING:
            start = (value,) if reduce_fn is None else reduce_fn(_initial(init_fn), value)
            setattr(self, name, variable_type(start))
        elif isinstance(current, variable_type):
            old = current.value
            current.value = (*old, value) if reduce_fn is None else reduce_fn(old, value)
        else:
            kind = type(current).__name__
            raise TypeError(
                SOW_CLASH.format(
                    path=call_path(self),
                    name=name,
                    kind=kind,
                    type=variable_type.__name__,
                )
            )

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

    def __treescope_repr__(self, path: str | None, subtree_renderer: Any) -> Any:
        # treescope's protocol: toylib's handlers (and treescope) load on first use.
        from toylib import _treescope

        return _treescope.render_module(self, path, subtree_renderer)


def blank(cls: type) -> Any:
    """A new ``cls`` with no attributes and no ``__init__`` call (for rebuilding)."""
    module = object.__new__(cls)
    object.__setattr__(module, LAYOUT, None)
    object.__setattr__(module, SLOT, None)
    return module


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


class _Children:
    """Collects a Module's children for jax (a class: see skeleton._Collector)."""

    __slots__ = ("children", "keyed")

    def __init__(self, keyed: bool) -> None:
        self.children: list[Any] = []
        self.keyed = keyed

    def visit(self, path: Path, node: Any) -> _Hole:
        if self.keyed:
            self.children.append((GetAttrKey(format_path(path, root="")[1:]), node))
        else:
            self.children.append(node)
        return HOLE


def _flatten(module: Module) -> tuple[list[Any], tuple]:
    collect = _Children(False)
    return collect.children, attribute_skeletons(module, collect.visit)


def _flatten_with_keys(module: Module) -> tuple[list[tuple[Any, Any]], tuple]:
    collect = _Children(True)
    return collect.children, attribute_skeletons(module, collect.visit)


def _register(cls: type) -> None:
    def unflatten(layout: tuple, children: Any) -> Module:
        # No checks and no __init__: jax rebuilds with tracers, None or sentinels.
        # The module remembers its layout, so those positions stay data.
        module = blank(cls)
        object.__setattr__(module, LAYOUT, layout)
        take: Callable[[], Any] = iter(children).__next__
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
