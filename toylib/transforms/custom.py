"""tl.jvp, tl.vjp and tl.custom_vjp: forward/reverse derivatives of functions of Modules.

All three follow ``tl.grad``'s conventions: the derivative of a Module
argument is taken with respect to its ``wrt`` Variables (``tl.Param`` by
default) and is a ``State`` of Variables of the same types and paths; a
plain array argument is differentiated whole. State the function updates
(BatchNorm statistics, Rngs counters) is written back to the caller's
objects, as every toylib transform does. Outputs must be arrays (pytrees of
arrays): return a Module's state with ``tl.state`` if you need it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from toylib._core.filters import filter_repr, to_predicate
from toylib._core.state import State
from toylib._core.variables import Param, Variable, unwrap
from toylib.transforms.lifting import (
    Flat,
    Transform,
    call_inside,
    flatten_call,
    flatten_result,
    interleave,
    is_graph_node,
    named,
    unflatten_call,
    write_back,
)

__all__ = ["CustomVjp", "custom_vjp", "jvp", "vjp"]

OUTPUT_HOLDS_MODULE = """\
{caller}: the function returned a {kind} in its output; derivatives are taken of
arrays only.
Fix: return arrays (e.g. `model(x)`), or the state as a State: `tl.state(model)`.
"""

NOTHING_SELECTED = """\
{caller}: nothing to differentiate: the wrt filter ({wrt}) selects no
floating-point Variable, and no argument is a floating-point array.
Fix: pass the Module holding the Params, or widen `wrt=`.
"""

BAD_TANGENT = """\
{caller}: the tangent for `{where}` must be {expected}, got a {got}.
Fix: e.g. `tl.jvp(f, (model, x), (tangent_state, dx))` where `tangent_state`
is a State of the Module's Params (`jax.tree.map(jnp.ones_like, tl.state(model, tl.Param))`);
a missing entry means a zero tangent.
"""

BAD_COTANGENTS = """\
tl.custom_vjp({name}): bwd must return one cotangent per positional argument
({n} here) as a tuple, got {got}. For a Module argument return a State of its
gradients (entries left out are zero) or None; for an array argument an array.
"""

NO_VJP = """\
tl.custom_vjp({name}): no backward rule. Fix: `{name}.defvjp(fwd, bwd)` with
`fwd(*args) -> (out, residuals)` and `bwd(residuals, g) -> (cotangent per argument)`.
"""


def _is_float(value: Any) -> bool:
    dtype = getattr(value, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def _argument(flat: Flat, i: int) -> Any:
    return flat.origin[flat.paths[i][0]]


def _module_args(flat: Flat) -> set:
    return {o for o, top in zip(flat.origin, flat.tops, strict=True) if is_graph_node(top)}


def _selected(flat: Flat, wrt: Any, caller: str, argnums: Sequence[int] | None = None) -> list[int]:
    """Leaves to differentiate: ``wrt``-matching floats in Module arguments, float arrays."""
    predicate, modules = to_predicate(wrt), _module_args(flat)
    chosen = []
    for i, leaf in enumerate(flat.leaves):
        arg = _argument(flat, i)
        if argnums is not None and arg not in argnums:
            continue
        if not _is_float(flat.values[i]):
            continue
        if arg in modules and not predicate(flat.arg_path(i), leaf):
            continue
        chosen.append(i)
    if not chosen:
        raise ValueError(NOTHING_SELECTED.format(caller=caller, wrt=filter_repr(wrt)))
    return chosen


def _per_leaf(
    flat: Flat, chosen: list[int], per_arg: Sequence[Any], caller: str, what: str
) -> list[Any]:
    """Values for the chosen leaves from one pytree/State per argument (zeros where absent)."""
    modules = _module_args(flat)
    out = []
    flat_states: dict[Any, dict] = {}
    for i in chosen:
        arg = _argument(flat, i)
        given = per_arg[arg]
        zero = jnp.zeros_like(flat.values[i])
        if given is None:
            out.append(zero)
        elif arg in modules and isinstance(given, State):
            entries = flat_states.setdefault(arg, given.flat())
            entry = entries.get(flat.arg_path(i))
            out.append(zero if entry is None else jnp.asarray(unwrap(entry), zero.dtype))
        elif arg in modules and isinstance(given, Variable) and flat.arg_path(i) == ():
            out.append(jnp.asarray(given.value, zero.dtype))
        elif arg not in modules:
            leaves = jax.tree.leaves(given)
            tops = [t for t, o in enumerate(flat.origin) if o == arg]
            if len(leaves) != len(tops):
                raise TypeError(
                    BAD_TANGENT.format(
                        caller=caller,
                        where=f"args[{arg}]",
                        expected=f"{what} of the argument's structure",
                        got=type(given).__name__,
                    )
                )
            out.append(leaves[tops.index(flat.paths[i][0])])
        else:
            raise TypeError(
                BAD_TANGENT.format(
                    caller=caller,
                    where=f"args[{arg}]",
                    expected=f"a State ({what} of its Variables) or None",
                    got=type(given).__name__,
                )
            )
    return out


def _by_argument(flat: Flat, chosen: list[int], values: list[Any], args: tuple) -> tuple:
    """One result per argument: a State for Module arguments, the pytree for plain ones."""
    modules = _module_args(flat)
    out = []
    for arg in range(len(args)):
        picked = [(i, g) for i, g in zip(chosen, values, strict=True) if _argument(flat, i) == arg]
        if arg in modules:
            if len(picked) == 1 and flat.arg_path(picked[0][0]) == ():
                i, g = picked[0]
                out.append(flat.leaves[i].replace(value=g))
                continue
            out.append(
                State.from_flat(
                    (
                        flat.arg_path(i),
                        flat.leaves[i].replace(value=g)
                        if isinstance(flat.leaves[i], Variable)
                        else g,
                    )
                    for i, g in picked
                )
            )
        else:
            by_top = {flat.paths[i][0]: g for i, g in picked}
            leaves = [by_top.get(t) for t, o in enumerate(flat.origin) if o == arg]
            out.append(jax.tree.unflatten(jax.tree.structure(args[arg]), leaves))
    return tuple(out)


def _check_plain(out: Any, caller: str) -> None:
    for leaf in jax.tree.leaves(out, is_leaf=is_graph_node):
        if is_graph_node(leaf):
            raise TypeError(OUTPUT_HOLDS_MODULE.format(caller=caller, kind=type(leaf).__name__))


def _pure(
    fn: Callable, flat: Flat, chosen: list[int], caller: str, specs: list
) -> tuple[Callable, list[int]]:
    """``(diff values, other values) -> (output, state values)``, recording the OutSpec;
    and the positions of the other (not differentiated) leaves."""
    others = [i for i in range(len(flat.values)) if i not in set(chosen)]

    def pure(diff: list, rest: list) -> tuple:
        values = interleave(len(flat.values), (chosen, diff), (others, rest))
        args, kwargs, tops, inside = unflatten_call(flat.layout, flat.paths, values)
        out = call_inside(caller, fn, args, kwargs)
        _check_plain(out, caller)
        spec, returned, _ = flatten_result(flat.layout, flat.position, tops, None, inside, values)
        specs.append(spec)
        return out, returned

    return named(pure, fn), others


def jvp(
    fn: Callable, primals: Sequence[Any], tangents: Sequence[Any], *, wrt: Any = Param
) -> tuple[Any, Any]:
    """Like ``jax.jvp``: ``(fn(*primals), directional derivative along tangents)``.

    Arguments:
        fn: a function of Modules and arrays returning arrays.
        primals: the arguments, as a tuple.
        tangents: one per argument: for a Module, a ``State`` of tangents for
            its ``wrt`` Variables (missing entries are zero) or ``None``; for
            an array argument an array (``None`` for zero).
        wrt: which Variables of Module arguments the tangents are for.

    Returns:
        ``(out, out_tangent)``; state ``fn`` updated is written back.

    Example:
        >>> import jax, jax.numpy as jnp, toylib as tl
        >>> from toylib import nn
        >>> model = nn.Linear(2, 1, rngs=0)
        >>> ones = jax.tree.map(jnp.ones_like, tl.state(model, tl.Param))
        >>> y, dy = tl.jvp(lambda m, x: m(x), (model, jnp.ones(2)), (ones, None))
        >>> dy.tolist()        # d/dw (x @ w + b) along all-ones: sum(x) + 1
        [3.0]
    """
    primals, tangents = tuple(primals), tuple(tangents)
    if len(tangents) != len(primals):
        raise TypeError(
            f"tl.jvp: {len(primals)} primals but {len(tangents)} tangents; give one per "
            "argument (None for no tangent)."
        )
    flat = flatten_call(primals, {}, "tl.jvp")
    chosen = _selected(flat, wrt, "tl.jvp")
    tangent_values = _per_leaf(flat, chosen, tangents, "tl.jvp", "tangents")
    specs: list = []
    pure, others = _pure(fn, flat, chosen, f"tl.jvp({getattr(fn, '__name__', 'fn')})", specs)
    rest = [flat.values[i] for i in others]
    diff = [flat.values[i] for i in chosen]
    (out, returned), (out_tangent, _) = jax.jvp(lambda d: pure(d, rest), (diff,), (tangent_values,))
    write_back(specs[-1], flat, returned)
    return out, out_tangent


def vjp(fn: Callable, *primals: Any, wrt: Any = Param, has_aux: bool = False) -> tuple:
    """Like ``jax.vjp``: ``(out, vjp_fn)``; ``vjp_fn(g)`` gives one cotangent per argument.

    Arguments:
        fn: a function of Modules and arrays returning arrays (``(out, aux)``
            with ``has_aux``).
        *primals: the arguments.
        wrt: which Variables of Module arguments to differentiate.
        has_aux: whether ``fn`` returns ``(out, aux)``; aux is not differentiated.

    Returns:
        ``(out, vjp_fn)`` (``(out, vjp_fn, aux)`` with ``has_aux``). For a
        Module argument the cotangent is a ``State`` (as ``tl.grad`` gives);
        for an array argument, an array. State ``fn`` updated is written back
        when ``tl.vjp`` is called.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> from toylib import nn
        >>> model = nn.Linear(2, 1, rngs=0)
        >>> y, back = tl.vjp(lambda m, x: m(x), model, jnp.ones(2))
        >>> grads, dx = back(jnp.ones(1))
        >>> grads.kernel.value.tolist(), dx.shape
        ([[1.0], [1.0]], (2,))
    """
    flat = flatten_call(primals, {}, "tl.vjp")
    chosen = _selected(flat, wrt, "tl.vjp")
    specs: list = []
    caller = f"tl.vjp({getattr(fn, '__name__', 'fn')})"

    def split_aux(*values: Any) -> Any:
        out = fn(*values)
        if not has_aux:
            return out, None
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(f"{caller}(..., has_aux=True): fn must return (out, aux).")
        return out

    pure, others = _pure(split_aux, flat, chosen, caller, specs)
    rest = [flat.values[i] for i in others]
    diff = [flat.values[i] for i in chosen]
    ((out, aux), returned), back = jax.vjp(lambda d: pure(d, rest), diff)
    write_back(specs[-1], flat, returned)
    zeros_state = jax.tree.map(jnp.zeros_like, returned)

    def vjp_fn(g: Any) -> tuple:
        aux_zero = jax.tree.map(jnp.zeros_like, aux)
        (cotangents,) = back(((g, aux_zero), zeros_state))
        return _by_argument(flat, chosen, cotangents, primals)

    return (out, vjp_fn, aux) if has_aux else (out, vjp_fn)


def custom_vjp(fn: Callable | None = None) -> Any:
    """Like ``jax.custom_vjp``, for functions of Modules: define the backward pass.

    ``f = tl.custom_vjp(f)`` then ``f.defvjp(fwd, bwd)``: ``fwd(*args)``
    returns ``(out, residuals)`` and ``bwd(residuals, g)`` a tuple with one
    cotangent per positional argument: a ``State`` of gradients for a Module
    argument (entries left out are zero, ``None`` for all zero), an array for
    an array argument. Every floating-point Variable of a Module argument is
    an input of the rule; ``tl.grad`` then keeps those its ``wrt`` selects.
    State the function (or ``fwd``) updates is written back, as ``tl.jit`` does.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> from toylib import nn
        >>> @tl.custom_vjp
        ... def apply(m, x):
        ...     return m(x)
        >>> def fwd(m, x):
        ...     return m(x), x
        >>> def bwd(x, g):                      # a straight-through kernel gradient
        ...     grads = tl.State({"kernel": tl.Param(jnp.outer(x, g) * 0 + 7.0)})
        ...     return grads, None
        >>> apply.defvjp(fwd, bwd)
        <tl.custom_vjp(apply)>
        >>> model = nn.Linear(2, 1, rngs=0)
        >>> grads = tl.grad(lambda m: apply(m, jnp.ones(2)).sum())(model)
        >>> grads.kernel.value.tolist(), grads.bias.value.tolist()
        ([[7.0], [7.0]], [0.0])
    """
    if fn is None:
        return custom_vjp
    return CustomVjp(fn)


class CustomVjp(Transform):
    """The callable ``tl.custom_vjp`` returns. See ``custom_vjp``."""

    kind = "tl.custom_vjp"

    def __init__(self, fn: Callable) -> None:
        super().__init__(fn)
        self._fwd: Callable | None = None
        self._bwd: Callable | None = None

    def defvjp(self, fwd: Callable, bwd: Callable) -> CustomVjp:
        """Set the forward (``-> (out, residuals)``) and backward (``-> cotangents``) rules."""
        self._fwd, self._bwd = fwd, bwd
        return self

    def __call__(self, *args: Any) -> Any:
        name = getattr(self._fn, "__name__", "fn")
        if self._fwd is None or self._bwd is None:
            raise TypeError(NO_VJP.format(name=name))
        flat = flatten_call(args, {}, self.label)
        chosen = [i for i, v in enumerate(flat.values) if _is_float(v)]
        specs: list = []
        res_box: list = []
        fwd, bwd, label = self._fwd, self._bwd, self.label

        def with_residuals(*values: Any) -> Any:
            out, res = fwd(*values)
            res_box.append(res)
            return out

        primal, others = _pure(self._fn, flat, chosen, label, specs)
        forward, _ = _pure(with_residuals, flat, chosen, label, specs)

        @jax.custom_vjp
        def core(diff: list, rest: list) -> tuple:
            return primal(diff, rest)

        def core_fwd(diff: list, rest: list) -> tuple:
            result = forward(diff, rest)
            return result, res_box[-1]

        def core_bwd(res: Any, cts: tuple) -> tuple:
            g, _ = cts
            given = bwd(res, g)
            if not isinstance(given, tuple) or len(given) != len(args):
                raise TypeError(
                    BAD_COTANGENTS.format(name=name, n=len(args), got=type(given).__name__)
                )
            return _per_leaf(flat, chosen, given, label, "cotangents"), None

        core.defvjp(core_fwd, core_bwd)
        out, returned = core([flat.values[i] for i in chosen], [flat.values[i] for i in others])
        write_back(specs[-1], flat, returned)
        return out
