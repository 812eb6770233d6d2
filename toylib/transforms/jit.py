"""tl.jit: jax.jit for functions of Modules, with in-place updates carried out.

Two paths:

* The general path (``Jitted._call``) flattens the arguments into a Layout
  and leaves (``lifting.flatten_call``), calls one ``jax.jit`` per Layout,
  and writes the returned values and any structural change back into the
  caller's objects (``lifting.write_back``). It runs on the first call, after
  a structural change, and whenever the fast path does not apply.
* The fast path (``_Fast``) is recorded after a general call whose arguments
  are Modules, Variables, arrays and plain static values, whose structure did
  not change inside, and whose output holds no Modules. It keeps the live
  Variables in a list and is registered on every object it flattened
  (``watchers.py``), so a call is: check the arguments are the same objects
  and that none of *those* objects changed structure since (one flag), read
  the Variables' values, call the compiled function (JAX's C++ dispatch),
  write the returned values back. No walk over the object graph, no blocking
  on results, and nothing another model does can invalidate it.
"""

from __future__ import annotations

import inspect
import operator
import os
import sys
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any, overload

import jax
import jax.core  # named: jax imports it, but pyright sees only what is imported
import jaxtyping
import numpy as np

from toylib._core.graph import ModuleDef, watch_graph
from toylib._core.paths import Path
from toylib._core.skeleton import Map, Seq, Static, is_graph_node, rebuild
from toylib._core.variables import Variable, get_value, set_value
from toylib.transforms import placement
from toylib.transforms.lifting import (
    Flat,
    Layout,
    OutSpec,
    P,
    R,
    StaticArg,
    Transform,
    call_inside,
    flatten_call,
    flatten_result,
    interleave,
    named,
    reraise_check,
    unflatten_call,
    write_back,
)

__all__ = ["Jitted", "jit"]

UNKNOWN_STATIC_ARGNAMES = """\
tl.jit({name}): static_argnames={names!r}, but {name} has no parameter {missing}
(its parameters: {params}).
Fix: name parameters of the function, e.g. `tl.jit({name}, static_argnames=({first!r},))`.
"""

RETRACING = """\
tl.jit({name}) has compiled {count} times because the Python value passed as
`{where}` keeps changing (now {value!r}). toylib treats Python values as static,
as Equinox does: each new value is a new program.
Fix: pass it as an array, which is traced and compiled once, e.g.

    {name}(..., jnp.asarray({where_name}))

or, if it really selects different programs, keep it static but pass only a few values.
"""

RETRACING_ATTRIBUTE = """\
tl.jit({name}) has compiled {count} times because `{where}`, a Python value held
by an argument, keeps changing (now {value}). Python values in Modules are
static, as in Equinox and NNX: each new value is a new program.
Fix: keep the same value from call to call (e.g. make the optax transformation
once and give that object to every tl.Optimizer: two `optax.adam(1e-3)` are
different functions), or hold it as data (an array, or a tl.Variable), which is
traced and compiled once. If each value really is another model (a sweep over
layer settings), the programs are needed: one tl.jit per model keeps them apart.
"""

RETRACE_WARNING_AT = 8


_OWN_FILES = (
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),  # toylib
    os.path.dirname(os.path.abspath(jax.__file__)),
    os.path.dirname(os.path.abspath(jaxtyping.__file__)),  # its runtime checks wrap calls
)


def _user_frame(frame: Any) -> int:
    """``warnings.warn``'s stacklevel, from ``frame`` (its caller), of the user's code.

    The first frame outside toylib, jax and jaxtyping. Counted, not fixed:
    runtime type checkers (jaxtyping + beartype in the tests; beartype's
    wrappers are generated ``<...>`` code) and jax's API wrappers add frames.
    """
    level = 1
    while frame is not None:
        name = frame.f_code.co_filename
        if not (name.startswith(_OWN_FILES) or name.startswith("<")):
            return level
        frame, level = frame.f_back, level + 1
    return 1


def _short(value: Any, limit: int = 100) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def static_change(old: Any, new: Any, path: Path = ()) -> tuple[Path, Any] | None:
    """The first Python value that differs between two layouts: ``(path, new value)``.

    Walks the skeletons and ModuleDefs of two GraphDef roots in step; None
    when the difference is not a changed Python value (new attributes, other
    types, array shapes).
    """
    kind = type(old)
    if kind is not type(new):
        return None
    if kind is Static:
        return (path, new.value) if old != new else None
    if kind is Seq:
        pairs = list(enumerate(zip(old.items, new.items, strict=False)))
    elif kind is Map or kind is ModuleDef:
        named_old = dict(old.items if kind is Map else old.attributes)
        named_new = dict(new.items if kind is Map else new.attributes)
        pairs = [(k, (a, named_new[k])) for k, a in named_old.items() if k in named_new]
    else:
        return None
    for key, (a, b) in pairs:
        found = static_change(a, b, (*path, key))
        if found is not None:
            return found
    return None


_ARRAYS = (jax.Array, np.ndarray)
_OBJ, _ARR, _STATIC = "obj", "arr", "static"


def _signature(values: Sequence[Any]) -> tuple:
    """What jax.jit's cache sees of the values: shape, dtype, weak type."""
    out = []
    for value in jax.tree.leaves(values):
        aval = jax.typeof(value)
        out.append((aval.shape, aval.dtype, getattr(aval, "weak_type", False)))
    return tuple(out)


class _Trace:
    """What the traced function needs, and what its traces recorded.

    Kept apart from ``_Compiled`` so that the jitted function does not refer
    back to what holds it (no reference cycle).
    """

    def __init__(
        self, fn: Callable, label: str, flat: Flat, donated: list[bool], shardings: tuple
    ) -> None:
        self.fn, self.label, self.donated = fn, label, donated
        # Where Variables' new values and the outputs must go (placement.py).
        self.keep, self.out_shardings = shardings
        # Of the first call only what every call with this Layout shares: no
        # live objects, so the cache does not keep a model alive.
        self.layout, self.paths, self.position = flat.layout, flat.paths, flat.position
        is_var = [isinstance(leaf, Variable) for leaf in flat.leaves]
        # Argument order of the compiled function: donated leaves then kept
        # ones, Variables before bare arrays in each (the fast path's order).
        groups = [
            [i for i in range(len(donated)) if donated[i] == d and is_var[i] == v]
            for d in (True, False)
            for v in (True, False)
        ]
        self.order = [i for group in groups for i in group]
        self.n_donated = len(groups[0]) + len(groups[1])
        self.specs: dict[tuple, OutSpec] = {}
        self.last: OutSpec | None = None
        self.ntraces = 0
        self.stable = True  # every trace so far produced the same OutSpec

    def __call__(self, donated: list, kept: list) -> list:
        values = interleave(len(self.order), (self.order, donated + kept))
        args, kwargs, tops, inside = unflatten_call(self.layout, self.paths, values)
        out = call_inside(self.label, self.fn, args, kwargs)
        spec, returned, _ = flatten_result(
            self.layout, self.position, tops, out, inside, values, self.donated.__getitem__
        )
        name = getattr(self.fn, "__name__", "fn")
        out_tops = placement.output_shardings(self.out_shardings, out, name)
        returned = placement.constrain_returned(spec, returned, self.keep, out_tops)
        # A retrace (new shapes) may change what comes out: record per signature.
        self.specs[_signature(values)] = spec
        if self.last is not None and spec != self.last:
            self.stable = False
        self.last = spec
        self.ntraces += 1
        return returned


class _Compiled:
    """One ``jax.jit`` for one Layout of the arguments."""

    def __init__(
        self, fn: Callable, label: str, flat: Flat, donated: list[bool], shardings: tuple
    ) -> None:
        given_in, given_out = shardings
        n_args = len(flat.layout.treedef.children()[0].children())  # the positional tuple
        name = getattr(fn, "__name__", "fn")
        leaf_in = placement.input_shardings(given_in, flat, n_args, name)
        keep = placement.kept(flat, leaf_in)
        self.trace = trace = _Trace(fn, label, flat, donated, (keep, given_out))
        self.order, self.n_donated = trace.order, trace.n_donated
        donate = (0,) if trace.n_donated else ()
        kwargs = {}
        if any(s is not None for s in leaf_in):  # per leaf, in the two lists' order
            ordered = [leaf_in[i] for i in self.order]
            kwargs["in_shardings"] = (ordered[: self.n_donated], ordered[self.n_donated :])
        self.jitted = jax.jit(named(trace, fn), donate_argnums=donate, **kwargs)

    def arguments(self, flat: Flat) -> tuple[list, list]:
        """The compiled function's two arguments: donated and kept leaf values."""
        ordered = [flat.values[i] for i in self.order]
        return ordered[: self.n_donated], ordered[self.n_donated :]

    def call(self, flat: Flat) -> tuple[Any, OutSpec]:
        before = self.trace.ntraces
        returned = self.jitted(*self.arguments(flat))
        spec = self.spec_after(before, flat.values)
        return write_back(spec, flat, returned), spec

    def spec_after(self, before: int, values: Sequence[Any]) -> OutSpec:
        """The OutSpec of the call just made (which may or may not have traced)."""
        trace = self.trace
        if trace.ntraces != before or trace.stable:
            return trace.last  # type: ignore[return-value]
        return trace.specs.get(_signature(values), trace.last)  # type: ignore[return-value]


class _Fast:
    """A recorded call that can be repeated without flattening (see module docstring)."""

    __slots__ = (
        "__weakref__",
        "compiled",
        "d_arr",
        "d_vars",
        "k_arr",
        "k_vars",
        "kinds",
        "kw",
        "n",
        "out",
        "refs",
        "spec",
        "valid",
        "write_rets",
        "write_vars",
    )


class Jitted(Transform[P, R]):
    """The callable ``tl.jit`` returns. See ``jit``."""

    kind = "tl.jit"

    def __init__(
        self,
        fn: Callable[P, R],
        donate: int | str | Sequence[int | str],
        static_argnames: str | Sequence[str],
        shardings: tuple = (None, None),
    ) -> None:
        super().__init__(fn)
        self._donate = {donate} if isinstance(donate, int | str) else set(donate)
        names = (static_argnames,) if isinstance(static_argnames, str) else tuple(static_argnames)
        self._static_names = frozenset(names)
        self._static_nums = frozenset(_positions(fn, names))
        self._shardings = shardings  # (in_shardings, out_shardings) as the user gave them
        self._compiled: dict[Layout, _Compiled] = {}
        self._fast: _Fast | None = None
        self._previous: Layout | None = None  # the last Layout compiled, to explain retraces
        self._retraces: dict[Any, int] = {}

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        try:  # free unless raised: a failed tl.error_if check comes out as its own error
            fast = self._fast
            if fast is not None and fast.valid:
                values = (*args, *kwargs.values()) if kwargs else args
                if len(values) == fast.n and tuple(kwargs) == fast.kw:
                    for value, kind, ref in zip(values, fast.kinds, fast.refs, strict=True):
                        if kind is _OBJ:
                            if value is not ref():
                                break
                        elif kind is _ARR:
                            if not isinstance(value, _ARRAYS):
                                break
                        elif value is not ref and (type(value) is not type(ref) or value != ref):
                            break
                    else:
                        return self._run_fast(fast, values, args, kwargs)
            return self._call(args, kwargs)
        except Exception as error:
            reraise_check(error)
            raise

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        """``jax.jit(...).lower``: the compiled program for these arguments (``.as_text()``)."""
        flat = self._flatten(args, kwargs)
        compiled = self._compiled_for(flat)
        return compiled.jitted.lower(*compiled.arguments(flat))

    def _run_fast(self, fast: _Fast, values: tuple, args: tuple, kwargs: dict) -> Any:
        donated = list(map(get_value, fast.d_vars))
        if fast.d_arr:
            donated += [values[i] for i in fast.d_arr]
        kept = list(map(get_value, fast.k_vars))
        if fast.k_arr:
            kept += [values[i] for i in fast.k_arr]
        compiled = fast.compiled
        trace = compiled.trace
        before = trace.ntraces
        returned = compiled.jitted(donated, kept)
        if trace.ntraces != before and trace.last != fast.spec:
            # New shapes traced to a different result structure: general write-back.
            self._fast = None
            return write_back(trace.last, self._flatten(args, kwargs), returned)  # type: ignore[arg-type]
        if fast.write_rets and isinstance(returned[fast.write_rets[0]], jax.core.Tracer):
            # Inside another trace (e.g. raw checkify around tl.jit): write_back
            # refuses to write its tracers into Variables that live outside it.
            return write_back(fast.spec, self._flatten(args, kwargs), returned)
        # `any` drains the map: one C-level loop that writes every value.
        any(map(set_value, fast.write_vars, map(returned.__getitem__, fast.write_rets)))
        return fast.out(returned)

    def _flatten(self, args: tuple, kwargs: dict) -> Flat:
        """``flatten_call`` with the ``static_argnames`` arguments kept whole."""
        args = tuple(StaticArg(a) if i in self._static_nums else a for i, a in enumerate(args))
        kwargs = {k: StaticArg(v) if k in self._static_names else v for k, v in kwargs.items()}
        return flatten_call(args, kwargs, self.label)

    def _compiled_for(self, flat: Flat) -> _Compiled:
        compiled = self._compiled.get(flat.layout)
        if compiled is None:
            donated = [self._is_donated(flat, i) for i in range(len(flat.paths))]
            compiled = _Compiled(self._fn, self.label, flat, donated, self._shardings)
            self._compiled[flat.layout] = compiled
            self._note_retrace(flat)
        return compiled

    def _call(self, args: tuple, kwargs: dict) -> Any:
        flat = self._flatten(args, kwargs)
        compiled = self._compiled_for(flat)
        out, spec = compiled.call(flat)
        self._fast = self._record(compiled, spec, flat, args, kwargs)
        return out

    def _is_donated(self, flat: Flat, i: int) -> bool:
        return flat.origin[flat.paths[i][0]] in self._donate

    def _note_retrace(self, flat: Flat) -> None:
        """Warn once per Python value whose changes keep forcing new programs.

        The value is found anywhere in the arguments: a top-level Python
        argument, or a static attribute deep inside a Module (an optax
        transformation made anew for every ``tl.Optimizer``).
        """
        previous, self._previous = self._previous, flat.layout
        if previous is None or previous.treedef != flat.layout.treedef:
            return
        found = static_change(previous.graphdef.root, flat.layout.graphdef.root)
        if found is None:
            return
        path, value = found
        count = self._retraces.get(path, 1) + 1
        self._retraces[path] = count
        if count == RETRACE_WARNING_AT:
            self._warn_retrace(flat, path, value, count)

    def _warn_retrace(self, flat: Flat, path: Path, value: Any, count: int) -> None:
        name = getattr(self._fn, "__name__", "fn")
        value = value.value if isinstance(value, StaticArg) else value
        top, *inner = path
        if inner:  # inside a Module or container argument
            message = RETRACING_ATTRIBUTE.format(
                name=name, count=count, where=flat.describe(path), value=_short(value)
            )
            warnings.warn(message, stacklevel=_user_frame(sys._getframe()))
            return
        where = flat.origin[top]
        text = f"args[{where}]" if isinstance(where, int) else where
        try:
            params = list(inspect.signature(self._fn).parameters)
            where_name = params[where] if isinstance(where, int) else where
        except (TypeError, ValueError, IndexError):
            where_name = text
        message = RETRACING.format(
            name=name, count=count, where=text, value=value, where_name=where_name
        )
        warnings.warn(message, stacklevel=_user_frame(sys._getframe()))

    def _record(
        self, compiled: _Compiled, spec: OutSpec, flat: Flat, args: tuple, kwargs: dict
    ) -> _Fast | None:
        """A _Fast for repeating this call, or None when it does not qualify."""
        if not (compiled.trace.stable and spec.same_structure and spec.output_is_plain):
            return None
        values = (*args, *kwargs.values())
        kinds, refs = [], []
        for i, value in enumerate(values):
            static = (
                i in self._static_nums
                if i < len(args)
                else (list(kwargs)[i - len(args)] in self._static_names)
            )
            if static or not (is_graph_node(value) or isinstance(value, _ARRAYS)):
                treedef = jax.tree.structure(value)
                if not static and (treedef.num_nodes != 1 or treedef.num_leaves != 1):
                    return None  # a container or None: not one leaf
                kinds.append(_STATIC)
                refs.append(value)
            elif isinstance(value, _ARRAYS):
                kinds.append(_ARR)
                refs.append(None)
            else:
                kinds.append(_OBJ)
                refs.append(weakref.ref(value, self._forget))
        # Every top-level leaf is one argument: arguments in order, then the
        # keywords sorted by name (jax's dict order).
        value_of_top = list(range(len(args)))
        value_of_top += [len(args) + list(kwargs).index(k) for k in sorted(kwargs)]
        fast = _Fast()
        fast.compiled, fast.spec, fast.valid = compiled, spec, True
        fast.kw, fast.n = tuple(kwargs), len(values)
        fast.kinds, fast.refs = tuple(kinds), tuple(refs)
        fast.d_vars, fast.d_arr, fast.k_vars, fast.k_arr = [], [], [], []
        for position, i in enumerate(compiled.order):  # grouped as _Compiled orders them
            leaf, donated = flat.leaves[i], position < compiled.n_donated
            if isinstance(leaf, Variable):
                (fast.d_vars if donated else fast.k_vars).append(leaf)
            elif len(flat.paths[i]) == 1:
                (fast.d_arr if donated else fast.k_arr).append(value_of_top[flat.paths[i][0]])
            else:
                return None  # a bare array inside a container or Module
        # Same structure: the arguments' leaves come first in the OutSpec, in
        # order; every leaf not holding its own input value is returned.
        writes = [
            (leaf, ~s)
            for leaf, s in zip(flat.leaves, spec.sources, strict=False)
            if s < 0 and isinstance(leaf, Variable)
        ]
        fast.write_vars = [v for v, _ in writes]
        fast.write_rets = [r for _, r in writes]
        fast.out = _output_builder(spec)
        watch_graph(flat.nodes, fast)  # any structural change to these drops `fast`
        return fast

    def _forget(self, _: Any) -> None:
        self._fast = None


def _top_skeletons(layout: Layout) -> tuple:
    """The skeleton of each top-level argument leaf (a Python value: ``Static``)."""
    root = layout.graphdef.root
    if type(root) is Seq:
        return root.items
    return tuple(Static(v) for v in root.value)


def _output_builder(spec: OutSpec) -> Callable[[list], Any]:
    """Build the output from the returned values (plain outputs only)."""
    out_paths = [(p, ~s) for p, s in zip(spec.paths, spec.sources, strict=True) if p[0] == 1]
    skeleton = spec.graphdef.root.items[1]
    treedef = spec.out_treedef
    single = treedef.num_leaves == 1 and treedef.num_nodes == 1  # a bare array output
    if single and len(out_paths) == 1 and out_paths[0][0] == (1, 0):
        return operator.itemgetter(out_paths[0][1])
    where = dict(out_paths)

    def build(returned: list) -> Any:
        tops = rebuild(skeleton, (1,), lambda path, _: returned[where[path]])
        return jax.tree.unflatten(treedef, tops)

    return build


def _positions(fn: Callable, names: tuple[str, ...]) -> list[int]:
    """Positions of the ``static_argnames``; unknown names are an error, as in jax.jit."""
    if not names:
        return []
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return []  # no signature to check against (a builtin): names apply to keywords
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        known = list(params)
    else:
        missing = [n for n in names if n not in params]
        if missing:
            name = getattr(fn, "__name__", "fn")
            raise ValueError(
                UNKNOWN_STATIC_ARGNAMES.format(
                    name=name,
                    names=names,
                    missing=", ".join(map(repr, missing)),
                    params=", ".join(params) or "none",
                    first=next(iter(params), "x"),
                )
            )
        known = list(params)
    return [
        known.index(n)
        for n in names
        if n in known and params[n].kind is not inspect.Parameter.KEYWORD_ONLY
    ]


@overload
def jit(
    fn: Callable[P, R],
    *,
    donate: int | str | Sequence[int | str] = (),
    static_argnames: str | Sequence[str] = (),
    in_shardings: Any = None,
    out_shardings: Any = None,
) -> Jitted[P, R]: ...
@overload
def jit(
    fn: None = None,
    *,
    donate: int | str | Sequence[int | str] = (),
    static_argnames: str | Sequence[str] = (),
    in_shardings: Any = None,
    out_shardings: Any = None,
) -> Callable[[Callable[P, R]], Jitted[P, R]]: ...
def jit(
    fn: Callable | None = None,
    *,
    donate: int | str | Sequence[int | str] = (),
    static_argnames: str | Sequence[str] = (),
    in_shardings: Any = None,
    out_shardings: Any = None,
) -> Any:
    """Compile ``fn`` with ``jax.jit``; Modules in, in-place changes out.

    Arguments may be Modules, Variables, States, arrays or any Python values,
    in any position and nested in lists, tuples and dicts. Arrays (and the
    values of Variables) are traced; everything else is static and keys the
    compilation cache, so it must be hashable. Python numbers are static too
    (Equinox's rule, see docs/transforms.md): a call with a new number
    compiles anew, and after 8 such programs for one argument toylib warns
    and suggests ``jnp.asarray``. Changes ``fn`` makes to the Variables of
    its arguments (``self.count += 1``, BatchNorm statistics, Rngs counters,
    an optimizer step) are written back to the caller's objects, and so are
    structural changes (a new ``Intermediate`` attribute, a popped Variable).
    A Module reachable from two arguments is one object inside and stays one
    object outside. Returning an argument Module returns the caller's object.

    Variables that ``fn`` closes over (rather than receives) are constants of
    the compiled program; setting one inside raises an error that says to
    pass its Module as an argument. Containers passed as arguments (a list
    of Modules) are rebuilt inside, so appending to them is not carried out;
    change Modules' attributes instead.

    Arguments:
        fn: the function.
        donate: argument positions and/or keyword names whose arrays may be
            donated (their buffers reused for the results, ``jax.jit``'s
            ``donate_argnums``): typically the model and optimizer. Donated
            buffers are gone after the call: a ``tl.state`` snapshot taken
            before it shares them and cannot be read afterwards (take a
            ``tl.clone`` to keep a copy).
        static_argnames: parameters to treat as static even if they hold
            arrays (they must be hashable). A name ``fn`` does not have is an
            error, as in ``jax.jit``.
        in_shardings: what ``jax.jit`` takes: one ``Sharding`` for every
            argument, or a tuple with one entry per positional argument, each
            None (JAX places it: a committed array stays where it is), a
            Sharding, or a pytree prefix of the argument; a Module argument
            takes one Sharding or a State of them (paths as ``tl.state``,
            e.g. built from ``tl.sharding.specs``). An entry for an argument or
            a path that does not exist is an error.
        out_shardings: the same for the output (a Module in the output takes
            one Sharding). Applied as sharding constraints at the end of the
            trace. Variables of the arguments need none: a new value is
            constrained to where the Variable was placed (by ``tl.sharding``
            or by ``in_shardings``), so state never moves.

    Returns:
        The compiled function (also usable as ``@tl.jit`` or ``@tl.jit(...)``),
        named like ``fn`` (in profiles and in ``.lower(...).as_text()`` too).

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> class Counter(tl.Module):
        ...     def __init__(self):
        ...         self.count = tl.Variable(jnp.array(0))
        ...     def __call__(self, x):
        ...         self.count += 1
        ...         return x * 2
        >>> counter = Counter()
        >>> @tl.jit
        ... def step(m, x):
        ...     return m(x)
        >>> _ = step(counter, jnp.ones(2)); _ = step(counter, jnp.ones(2))
        >>> int(counter.count.value), step
        (2, <tl.jit(step)>)
    """

    def make(f: Callable) -> Jitted:
        name = getattr(f, "__name__", "fn")
        placement.check_given(in_shardings, "in_shardings", name)
        placement.check_given(out_shardings, "out_shardings", name)
        return Jitted(f, donate, static_argnames, (in_shardings, out_shardings))

    return make if fn is None else make(fn)
