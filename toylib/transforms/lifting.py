"""Lifting: how every toylib transform passes Python objects through a JAX transform.

A transformed call goes through four steps, shared by all transforms:

1. ``flatten_call`` (outside): the arguments become a hashable ``Layout``
   (the pytree structure with Modules and Variables as leaves, plus the
   ``GraphDef`` of those, so shared objects are counted once) and a flat list
   of array values. Anything that is not an array, Module or Variable is
   static and part of the Layout, as in Equinox's filtered transforms.
2. ``unflatten_call`` (inside the JAX trace): fresh Modules and Variables are
   built around the traced values, and the user's function runs on them.
3. ``flatten_result`` (inside): the inside objects and the function's output
   are flattened again, which yields an ``OutSpec``: the new structure, which
   inside objects are the caller's objects (by node number), and for every
   leaf whether it is returned from the transform or is an unchanged input.
4. ``write_back`` (outside): ``graph.unflatten`` with ``reuse=`` writes the new
   values, and any structural change (a new ``Intermediate``, a popped
   Variable), into the caller's live objects, and builds the output.

``tl.jit`` adds a fast path on top of this (see ``jit.py``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, ParamSpec, TypeVar

import jax
import jax.core  # named: jax imports it, but pyright sees only what is imported
from jax._src import traceback_util
from jax._src.core import get_opaque_trace_state  # not jax.extend's: see variables.py
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

from toylib._core import calls, graph
from toylib._core.paths import Path, format_path
from toylib._core.skeleton import is_array, is_graph_node
from toylib._core.variables import Variable, unwrap
from toylib._core.variables import _outside_trace as outside_trace

__all__ = [
    "Flat",
    "Layout",
    "OutSpec",
    "Transform",
    "call_inside",
    "flatten_call",
    "flatten_result",
    "unflatten_call",
    "write_back",
]

# toylib's own frames are hidden from the tracebacks of errors raised in user
# code under a transform, as jax hides its own (and Equinox its own).
traceback_util.register_exclusion(os.path.dirname(os.path.dirname(__file__)))

UNHASHABLE_ARGUMENT = """\
{caller}: `{where}` is a {kind}. toylib transforms trace arrays and treat every
other value as static (it keys the compilation cache, like jax.jit's
static_argnums), so it must be hashable, and this one is not.
Fix: pass numbers and arrays as jax arrays (`jnp.asarray(...)`), or make the
value hashable (a tuple instead of a list, a frozen dataclass, a frozenset).
"""

LEAKED_TRACER = """\
{caller}: `{where}` holds a JAX tracer, a value that escaped from an earlier
transform (for example a Module built or updated inside raw jax.jit and kept
after it returned). Its real value is gone.
Fix: let transforms return what they compute, or use toylib's transforms,
which write in-place changes back as concrete arrays:

    model = tl.jit(lambda: Model(rngs=tl.Rngs(0)))()
"""


# The wrapped function's parameters and result: `tl.jit(f)` has `f`'s signature
# for a type checker (and an editor's completion).
P = ParamSpec("P")
R = TypeVar("R")


class Transform(Generic[P, R]):
    """Base of the callables toylib's transforms return.

    They keep the wrapped function's ``__name__``, ``__qualname__``,
    ``__doc__`` and ``__module__`` (and ``__wrapped__`` for ``inspect``),
    print as ``tl.jit(step)``, and bind like methods when used as decorators
    inside a class.
    """

    kind = "tl.transform"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__call__" in vars(cls):  # jax hides the excluded (toylib's) frames past here
            cls.__call__ = traceback_util.api_boundary(vars(cls)["__call__"])

    def __init__(self, fn: Callable[P, R]) -> None:
        functools.update_wrapper(self, fn, updated=())
        self._fn = fn

    @property
    def label(self) -> str:
        """``tl.jit(step)``: how messages name this transform."""
        return f"{self.kind}({getattr(self._fn, '__name__', type(self._fn).__name__)})"

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        return self if obj is None else functools.partial(self, obj)

    def __repr__(self) -> str:
        return f"<{self.label}>"


def reraise_check(error: BaseException) -> None:
    """Raise ``tl.RuntimeCheckError`` if a jax runtime error carries a failed ``tl.error_if``."""
    from toylib.errors import reraise  # here: toylib.errors builds on the transforms

    reraise(error)


def call_inside(label: str, fn: Callable, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """Run the user's function inside a transform, known by ``label`` to error messages."""
    with calls.transform(label):
        return fn(*args, **kwargs)


def named(fn: Callable, like: Callable) -> Callable:
    """``fn`` under ``like``'s name, so that compiled programs and profiles show it."""

    def run(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    run.__name__ = getattr(like, "__name__", "fn")
    run.__qualname__ = getattr(like, "__qualname__", run.__name__)
    return run


@dataclass(frozen=True)
class StaticArg:
    """An argument marked static (``static_argnames``): kept whole in the Layout."""

    value: Any


@dataclass(frozen=True)
class Layout:
    """The static part of a call's arguments: hashable, the compilation key."""

    treedef: Any  # (args, kwargs) with Modules/Variables/arrays/statics as leaves
    graphdef: graph.GraphDef  # over the tuple of those leaves ("tops")


@dataclass
class Flat:
    """A call's arguments, flattened (outside a trace).

    ``paths[i]``/``values[i]``/``leaves[i]`` describe leaf ``i``; a path starts
    with the index of the top-level leaf it belongs to. ``nodes`` are the live
    Modules and Variables by node number; ``origin[t]`` says which argument
    top-level leaf ``t`` came from (an int position or a keyword name) and
    ``keypath[t]`` its path inside that argument.
    """

    layout: Layout
    paths: list[Path]
    leaves: list[Any]  # the live Variable, or the array itself
    values: list[Any]
    nodes: list[Any]
    origin: list[Any]
    keypath: list[Path]
    tops: tuple

    @functools.cached_property
    def position(self) -> dict[Path, int]:
        """``{path: leaf index}``."""
        return {path: i for i, path in enumerate(self.paths)}

    def describe(self, path: Path) -> str:
        """``args[1].layers[0]``: a path (top-level leaf index first) from its argument."""
        return _describe(self.origin, self.keypath, path)

    def arg_path(self, i: int) -> Path:
        """Path of leaf ``i`` relative to its argument (for filters and grads)."""
        path = self.paths[i]
        return (*self.keypath[path[0]], *path[1:])


def plain_key(k: Any) -> Any:
    if isinstance(k, SequenceKey):
        return k.idx
    if isinstance(k, DictKey):
        return k.key
    if isinstance(k, GetAttrKey):
        return k.name
    if isinstance(k, FlattenedIndexKey):
        return k.key
    return str(k)


def flatten_call(
    args: Sequence[Any], kwargs: dict[str, Any], caller: str, check_leaks: bool = True
) -> Flat:
    """Step 1: the Layout and leaves of ``f(*args, **kwargs)``'s arguments."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(
        (tuple(args), kwargs), is_leaf=is_graph_node
    )
    tops = tuple(leaf for _, leaf in with_paths)
    origin = [plain_key(p[1]) for p, _ in with_paths]
    keypath = [tuple(plain_key(k) for k in p[2:]) for p, _ in with_paths]
    nodes: list[Any] = []
    try:
        graphdef, pairs = graph.flatten(tops, nodes)
        layout = Layout(treedef, graphdef)
        hash(layout)
    except TypeError:
        _raise_unhashable(tops, origin, keypath, caller)
    paths = [path for path, _ in pairs]
    leaves = [leaf for _, leaf in pairs]
    values = [unwrap(leaf) for leaf in leaves]
    if check_leaks and not _tracing():
        for i, value in enumerate(values):
            if isinstance(value, jax.core.Tracer):
                where = _describe(origin, keypath, paths[i])
                raise RuntimeError(LEAKED_TRACER.format(caller=caller, where=where))
    return Flat(layout, paths, leaves, values, nodes, origin, keypath, tops)


_TOP_TRACE = get_opaque_trace_state()


def _tracing() -> bool:
    return get_opaque_trace_state() != _TOP_TRACE


def _describe(origin: list[Any], keypath: list[Path], path: Path) -> str:
    top = path[0]
    name = f"args[{origin[top]}]" if isinstance(origin[top], int) else origin[top]
    return format_path((*keypath[top], *path[1:]), root=name)


def _raise_unhashable(tops: tuple, origin: list, keypath: list, caller: str) -> None:
    for t, top in enumerate(tops):
        if is_graph_node(top) or is_array(top):
            continue
        if isinstance(top, StaticArg):
            top = top.value
        try:
            hash(top)
        except TypeError:
            where = _describe(origin, keypath, (t,))
            raise TypeError(
                UNHASHABLE_ARGUMENT.format(caller=caller, where=where, kind=type(top).__name__)
            ) from None
    raise TypeError(
        f"{caller}: a static value inside an argument (a Module attribute or Variable "
        "metadata) is not hashable. Fix: store it as a tuple, frozenset or frozen dataclass."
    )


def interleave(n: int, *parts: tuple[Sequence[int], Sequence[Any]]) -> list[Any]:
    """One list of ``n`` values from ``(positions, values)`` parts (e.g. carry and xs)."""
    values: list[Any] = [None] * n
    for positions, part in parts:
        for i, value in zip(positions, part, strict=True):
            values[i] = value
    return values


def unflatten_call(layout: Layout, paths: Sequence[Path], values: Sequence[Any]) -> tuple:
    """Step 2: ``(args, kwargs, tops, inside_nodes)`` built around ``values``."""
    nodes: dict[int, Any] = {}
    tops = graph.unflatten(layout.graphdef, dict(zip(paths, values, strict=True)), nodes=nodes)
    args, kwargs = jax.tree.unflatten(layout.treedef, tops)
    args = tuple(a.value if isinstance(a, StaticArg) else a for a in args)
    kwargs = {k: v.value if isinstance(v, StaticArg) else v for k, v in kwargs.items()}
    return args, kwargs, tops, nodes


@dataclass(eq=True)
class OutSpec:
    """What a traced call produced, recorded at trace time (step 3).

    ``sources[k]`` for each leaf of ``graphdef``: ``i >= 0`` means "input
    leaf ``i``, at the same path, still holding its own input value" (nothing
    to write back); ``~r`` (negative) means "returned value ``r``": every
    other leaf, including one that now holds *another* input's value (a
    stored argument, a swap, a copy). ``reuse`` maps new node numbers to
    input node numbers.
    """

    graphdef: graph.GraphDef  # over (tops, output tops)
    paths: tuple[Path, ...]
    sources: tuple[int, ...]
    reuse: tuple[tuple[int, int], ...]
    out_treedef: Any
    same_structure: bool  # the inputs' structure and objects are unchanged
    output_is_plain: bool  # the output holds no Module or Variable


def flatten_result(
    layout: Layout,
    position: dict[Path, int],
    tops: tuple,
    out: Any,
    inside_nodes: dict[int, Any],
    in_values: Sequence[Any],
    always_return: Callable[[int], bool] = lambda i: False,
) -> tuple[OutSpec, list[Any], list[tuple[Path, Any]]]:
    """Step 3: the OutSpec, the values to return from the JAX transform, and the leaves.

    ``leaves`` are ``(path, leaf)`` for every leaf of the OutSpec's graphdef
    (the inside Variables and arrays): transforms that place new Variables by
    type (``tl.vmap``'s ``StateAxes``) read them. ``position`` is the input's
    ``{path: leaf index}`` (``Flat.position``).
    """
    out_tops, out_treedef = jax.tree.flatten(out, is_leaf=is_graph_node)
    nodes: list[Any] = []
    graphdef, pairs = graph.flatten((tops, tuple(out_tops)), nodes)
    number = {id(obj): i for i, obj in inside_nodes.items()}
    reuse = tuple((j, number[id(obj)]) for j, obj in enumerate(nodes) if id(obj) in number)
    sources: list[int] = []
    returned: list[Any] = []
    for path, leaf in pairs:
        value = unwrap(leaf)
        i = position.get(path[1:], -1) if path[0] == 0 else -1
        if i >= 0 and value is in_values[i] and not always_return(i):
            sources.append(i)  # this leaf kept its own input value
            continue
        sources.append(~len(returned))
        returned.append(value)
    same = graphdef.root.items[0] == layout.graphdef.root and all(
        nodes[i] is inside_nodes.get(i) for i in range(len(inside_nodes))
    )
    plain = not any(is_graph_node(t) for t in out_tops)
    spec = OutSpec(
        graphdef,
        tuple(p for p, _ in pairs),
        tuple(sources),
        reuse,
        out_treedef,
        same,
        plain,
    )
    return spec, returned, pairs


def write_back(
    spec: OutSpec,
    flat: Flat,
    returned: Sequence[Any],
    *,
    update: bool = True,
    with_tops: bool = False,
) -> Any:
    """Step 4: update the caller's objects from ``returned`` and build the output.

    With ``update=False`` nothing of the caller's is touched and the output
    is built from new objects (``tl.eval_shape``). With ``with_tops`` returns
    ``(argument tops, output)``: the arguments' top-level leaves after the
    call (``tl.scan`` reads its final carry there).
    """
    if update:
        check_owned(spec, flat)
    leaves = {
        path: flat.values[s] if s >= 0 else returned[~s]
        for path, s in zip(spec.paths, spec.sources, strict=True)
    }
    reuse = {j: flat.nodes[i] for j, i in spec.reuse} if update else {}
    tops, out_tops = graph.unflatten(spec.graphdef, leaves, reuse=reuse)
    out = jax.tree.unflatten(spec.out_treedef, out_tops)
    return (tops, out) if with_tops else out


def check_owned(spec: OutSpec, flat: Flat) -> None:
    """Refuse to write results into Variables created outside the current trace.

    A transform called inside another trace can be handed a live Module that
    the outer function closed over (``tl.grad(lambda x: inner(model, x))``,
    or a raw ``jax.jit``/``checkify`` around a toylib transform): the results
    are then tracers of the outer trace, and writing them would leave the
    model holding tracers after the outer transform returns.
    """
    now = get_opaque_trace_state()
    for leaf, source in zip(flat.leaves, spec.sources, strict=False):
        if source < 0 and isinstance(leaf, Variable) and leaf._trace != now:
            raise RuntimeError(outside_trace(leaf))


def write_values(flat: Flat, values: Sequence[Any]) -> tuple[tuple, dict]:
    """Write new values (same structure) into the caller's objects: ``(args, kwargs)``."""
    now = get_opaque_trace_state()
    for leaf, old, new in zip(flat.leaves, flat.values, values, strict=True):
        if new is not old and isinstance(leaf, Variable) and leaf._trace != now:
            raise RuntimeError(outside_trace(leaf))  # as check_owned
    reuse = dict(enumerate(flat.nodes))
    leaves = dict(zip(flat.paths, values, strict=True))
    tops = graph.unflatten(flat.layout.graphdef, leaves, reuse=reuse)
    return jax.tree.unflatten(flat.layout.treedef, tops)


def layout_of(tree: Any) -> tuple[Layout, list[Any]]:
    """The Layout and leaf values of a pytree of objects (a loop's carry)."""
    tops, treedef = jax.tree.flatten(tree, is_leaf=is_graph_node)
    graphdef, pairs = graph.flatten(tuple(tops))
    values = [unwrap(leaf) for _, leaf in pairs]
    return Layout(treedef, graphdef), values
