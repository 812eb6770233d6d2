"""What ``Module.__setattr__`` checks and converts before it stores a value.

* Lists and dicts become tracked containers (``containers.py``); a
  non-empty list of plain values is frozen to a tuple (it is static).
* A static value must be hashable (it keys jax.jit's cache) and must not
  hide arrays anywhere inside it: in an object's ``__dict__`` or
  ``__slots__`` at any depth, a ``functools.partial``, a closure cell, a
  function's defaults, a bound method's object. Such an array would be baked
  into compiled programs as a constant and never trained: an error names
  where it is, and a module of another framework (Flax, Equinox, Penzai) is
  named as such.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import numpy as np

from toylib._core.containers import new_mapping, tracked
from toylib._core.skeleton import is_array, is_graph_node, is_node, items_of
from toylib._core.variables import Variable

__all__ = ["SIMPLE", "find_arrays", "normalize"]

ARRAY_IN_STATIC = """\
{where}: found {what} at `{inner}` inside a {kind}, which toylib treats as a
static value (part of the pytree structure). It would be baked into compiled
programs as a constant and never trained or updated.
Fix: store arrays directly on a Module, in a Variable, or in a list/tuple/dict:

    self.{name} = tl.Param(array)          # or a list/dict of arrays
"""

FOREIGN_MODULE = """\
{where}: a {framework} object ({kind}) holds arrays (at `{inner}`), but toylib
cannot see into another framework's modules: it would treat the whole object
as a static constant, baked into compiled programs and never trained.
Fix: build the layer with toylib.nn (or as a tl.Module with tl.Param
attributes), or keep its arrays in toylib Variables, e.g. for {framework}:

    {example}
"""

_FRAMEWORKS = {
    "flax": ("Flax", "self.kernel = tl.Param(flax_layer.kernel.value)"),
    "equinox": ("Equinox", "self.weight = tl.Param(eqx_layer.weight)"),
    "penzai": ("Penzai", "self.w = tl.Param(pz_layer.w.value.unwrap(...))"),
    "haiku": ("Haiku", "self.w = tl.Param(params['linear']['w'])"),
}

UNHASHABLE_STATIC = """\
{where}: static attributes must be hashable because they key jax.jit's cache,
but got a {kind} ({value}).
Fix: use a hashable value instead, e.g. a tuple, a frozenset or a frozen
dataclass:

    self.{name} = tuple(...)
"""

# Values that hold nothing: the search stops here.
_ATOMIC = (
    str,
    bytes,
    int,
    float,
    complex,
    type(None),
    type,
    types.ModuleType,
    types.BuiltinFunctionType,
    types.CodeType,
    np.dtype,
    np.generic,
    range,
    slice,
)


def _children(value: Any) -> list[tuple[str, Any]]:
    """``(suffix, child)`` for everything ``value`` refers to that could hold an array."""
    if isinstance(value, dict):
        return [(f"[{k!r}]", v) for k, v in value.items()]
    if isinstance(value, list | tuple):
        return [(f"[{i}]", v) for i, v in enumerate(value)]
    if isinstance(value, set | frozenset):
        return [("{...}", v) for v in value]
    if isinstance(value, Variable):
        return [(".value", value._value)]
    if isinstance(value, np.ndarray):  # an object array: its elements
        return [(f"[{i}]", v) for i, v in enumerate(value.flat)]
    out: list[tuple[str, Any]] = []
    if isinstance(value, functools.partial):
        out += [(".func", value.func)]
        out += [(f".args[{i}]", v) for i, v in enumerate(value.args)]
        out += [(f".keywords[{k!r}]", v) for k, v in value.keywords.items()]
    elif isinstance(value, types.FunctionType):
        names = value.__code__.co_freevars
        for name, cell in zip(names, value.__closure__ or (), strict=True):
            try:
                out.append((f" (closed-over `{name}`)", cell.cell_contents))
            except ValueError:  # an empty cell
                pass
        out += [(f".__defaults__[{i}]", v) for i, v in enumerate(value.__defaults__ or ())]
        out += [(f".__kwdefaults__[{k!r}]", v) for k, v in (value.__kwdefaults__ or {}).items()]
    elif isinstance(value, types.MethodType):
        out += [(".__self__", value.__self__), (".__func__", value.__func__)]
    attributes = getattr(value, "__dict__", None)
    if isinstance(attributes, dict):
        out += [(f".{k}", v) for k, v in attributes.items()]
    for cls in type(value).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for slot in (slots,) if isinstance(slots, str) else slots:
            if slot not in ("__dict__", "__weakref__") and hasattr(value, slot):
                out.append((f".{slot}", getattr(value, slot)))
    return out


def find_arrays(value: Any) -> tuple[str, str, Any] | None:
    """The first array inside ``value``: ``(inner path, what holds it, outermost foreign object)``.

    ``what`` names the array, or the Module/Variable holding it. Follows
    everything ``_children`` lists, at any depth, each object once (cycles
    are fine). Returns None when ``value`` holds no array.
    """
    # Depth first, without recursion: (object, index of its parent, suffix).
    stack: list[tuple[Any, int, str]] = [(value, -1, "")]
    visited: list[tuple[Any, int, str]] = []
    seen: set[int] = set()
    while stack:
        obj, parent, suffix = stack.pop()
        if id(obj) in seen or isinstance(obj, _ATOMIC):
            continue
        seen.add(id(obj))
        me = len(visited)
        visited.append((obj, parent, suffix))
        if is_array(obj) or (is_node(obj) and not is_graph_node(obj)):
            return _describe(visited, me)
        stack += [(child, me, s) for s, child in reversed(_children(obj))]
    return None


def _describe(visited: list[tuple[Any, int, str]], index: int) -> tuple[str, str, Any]:
    chain = []
    while index >= 0:
        chain.append(visited[index])
        index = visited[index][1]
    chain.reverse()
    inner = "".join(suffix for _, _, suffix in chain)
    holder = next((obj for obj, _, _ in chain[1:] if is_graph_node(obj)), None)
    what = "an array" if holder is None else f"a {type(holder).__name__} holding an array"
    foreign = next((obj for obj, _, _ in chain if _framework(obj) is not None), None)
    return inner, what, foreign


def _framework(obj: Any) -> tuple[str, str] | None:
    return _FRAMEWORKS.get(type(obj).__module__.partition(".")[0])


def _check_static(value: Any, where: str, name: str) -> None:
    found = find_arrays(value)
    if found is not None:
        inner, what, foreign = found
        if foreign is not None:
            framework, example = _framework(foreign)  # type: ignore[misc]
            raise TypeError(
                FOREIGN_MODULE.format(
                    where=where,
                    framework=framework,
                    kind=type(foreign).__name__,
                    inner=f"{where}{inner}",
                    example=example,
                )
            )
        raise TypeError(
            ARRAY_IN_STATIC.format(
                where=where,
                what=what,
                inner=f"{where}{inner}",
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


SIMPLE = frozenset((bool, int, float, complex, str, bytes, type(None)))


def normalize(value: Any, where: str, name: str) -> tuple[Any, bool]:
    """Check an assigned value; track containers, freeze plain lists. ``(value, is_data)``."""
    if type(value) in SIMPLE:  # the common static values: hashable, holding nothing
        return value, False
    if is_node(value):
        return value, True
    if not isinstance(value, list | tuple | dict):
        _check_static(value, where, name)
        return value, False
    pairs = list(items_of(value))
    normal = [(k, *normalize(v, f"{where}[{k!r}]", name)) for k, v in pairs]
    changed = any(new is not old for (_, new, _), (_, old) in zip(normal, pairs, strict=True))
    if isinstance(value, dict):  # always a container; plain values stay static
        container = tracked(value, where, name)
        if changed:
            factory = getattr(value, "default_factory", None)
            container = new_mapping(type(container), [(k, v) for k, v, _ in normal], factory)
        return container, True
    values = [v for _, v, _ in normal]
    dynamic = any(flag for *_, flag in normal)
    if isinstance(value, list):
        if value and not dynamic:  # a list of plain values is frozen (hashable)
            return tuple(values), False
        container = tracked(value, where, name)
        return (type(container)(values) if changed else container), True
    if changed:
        value = type(value)(*values) if hasattr(value, "_fields") else type(value)(values)
    return value, dynamic
