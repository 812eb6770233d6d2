"""tl.remat, tl.cond, tl.switch, tl.fori_loop, tl.while_loop, tl.eval_shape: stateful versions."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, overload

import jax
import jax.numpy as jnp

from toylib.transforms.lifting import (
    OutSpec,
    P,
    R,
    Transform,
    call_inside,
    flatten_call,
    flatten_result,
    is_graph_node,
    layout_of,
    named,
    reraise_check,
    unflatten_call,
    write_back,
    write_values,
)

__all__ = ["Rematted", "cond", "eval_shape", "fori_loop", "remat", "switch", "while_loop"]

BRANCH_STRUCTURE = """\
{caller}: the branches leave the operands with different structures (one adds,
removes or replaces a Variable or attribute, or they return different kinds of
output). Both branches of a conditional must produce the same structure.
Fix: create the Variables before the conditional and only set their values
inside the branches.
"""

LOOP_STRUCTURE = """\
tl.fori_loop: the body returned a value whose structure differs from init_val
(a Variable or attribute was added, removed or replaced, or a value of another
structure was returned). The loop carries one structure from step to step.
Fix: return the (updated) carry itself, e.g. `return model` or `return (model, x)`.
"""


def _lift(
    fn: Callable, flat: Any, record: list, label: str, always_return: bool = False
) -> Callable:
    """``fn`` as a pure function of the leaf values, recording its OutSpec."""

    def pure(values: list) -> list:
        inner_args, inner_kwargs, tops, inside = unflatten_call(flat.layout, flat.paths, values)
        out = call_inside(label, fn, inner_args, inner_kwargs)
        spec, returned, _ = flatten_result(
            flat.layout,
            flat.position,
            tops,
            out,
            inside,
            values,
            (lambda i: True) if always_return else _never,
        )
        record.append(spec)
        return returned

    return named(pure, fn)


def _never(i: int) -> bool:
    return False


@overload
def remat(
    fn: Callable[P, R],
    *,
    policy: Callable | None = None,
    prevent_cse: bool = True,
) -> Rematted[P, R]: ...
@overload
def remat(
    fn: None = None,
    *,
    policy: Callable | None = None,
    prevent_cse: bool = True,
) -> Callable[[Callable[P, R]], Rematted[P, R]]: ...
def remat(
    fn: Callable | None = None,
    *,
    policy: Callable | None = None,
    prevent_cse: bool = True,
) -> Any:
    """Like ``jax.checkpoint``: recompute ``fn``'s activations in the backward pass.

    Arguments:
        fn: the function (typically a block's forward pass).
        policy: a ``jax.checkpoint_policies`` policy saying what to keep.
        prevent_cse: as in ``jax.checkpoint``.

    Returns:
        The rematerialised function; state changes are written back.

    Example:
        >>> import jax, jax.numpy as jnp, toylib as tl
        >>> from toylib import nn
        >>> block = nn.Linear(3, 3, rngs=0)
        >>> f = tl.remat(lambda m, x: jnp.sin(m(x)).sum())
        >>> tl.grad(f)(block, jnp.ones(3)).kernel.shape
        (3, 3)
    """
    if fn is None:
        return lambda f: remat(f, policy=policy, prevent_cse=prevent_cse)
    return Rematted(fn, policy, prevent_cse)


class Rematted(Transform[P, R]):
    """The callable ``tl.remat`` returns. See ``remat``."""

    kind = "tl.remat"

    def __init__(self, fn: Callable[P, R], policy: Callable | None, prevent_cse: bool) -> None:
        super().__init__(fn)
        self._policy, self._prevent_cse = policy, prevent_cse

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        flat = flatten_call(args, kwargs, self.label)
        record: list[OutSpec] = []
        pure = jax.checkpoint(
            _lift(self._fn, flat, record, self.label),
            policy=self._policy,
            prevent_cse=self._prevent_cse,
        )
        returned = pure(list(flat.values))
        return write_back(record[-1], flat, returned)


def switch(index: Any, branches: Sequence[Callable], *operands: Any) -> Any:
    """Like ``jax.lax.switch``: run ``branches[index](*operands)``, state written back.

    All branches must leave the operands with the same structure and return
    the same kind of output.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> count = tl.Variable(jnp.array(0))
        >>> def add(c, n):
        ...     c.value = c.value + n
        ...     return c.value
        >>> out = tl.switch(1, [lambda c: add(c, 1), lambda c: add(c, 10)], count)
        >>> int(out), int(count.value)
        (10, 10)
    """
    flat = flatten_call(operands, {}, "tl.switch")
    record: list[OutSpec] = []
    pures = [_lift(b, flat, record, "tl.switch", always_return=True) for b in branches]
    try:
        returned = jax.lax.switch(index, pures, list(flat.values))
    except TypeError:  # jax compares the branches first: say what differs in toylib terms
        _check_same(record[-len(branches) :], "tl.switch")
        raise
    except Exception as error:  # a failed tl.error_if, run eagerly
        reraise_check(error)
        raise
    _check_same(record[-len(branches) :], "tl.switch")
    return write_back(record[-1], flat, returned)


def cond(pred: Any, true_fn: Callable, false_fn: Callable, *operands: Any) -> Any:
    """Like ``jax.lax.cond``: ``true_fn(*operands)`` if ``pred`` else ``false_fn(*operands)``.

    State changes made by the branch taken are written back; both branches
    must leave the operands with the same structure.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> from toylib import nn
        >>> drop = nn.Dropout(0.5, rngs=0)
        >>> y = tl.cond(True, lambda m, x: m(x), lambda m, x: x, drop, jnp.ones(4))
        >>> int(drop.rngs.count.value)      # the taken branch drew a key
        1
    """
    flat = flatten_call(operands, {}, "tl.cond")
    record: list[OutSpec] = []
    pure_true = _lift(true_fn, flat, record, "tl.cond", always_return=True)
    pure_false = _lift(false_fn, flat, record, "tl.cond", always_return=True)
    try:
        returned = jax.lax.cond(pred, pure_true, pure_false, list(flat.values))
    except TypeError:  # jax compares the branches first: say what differs in toylib terms
        _check_same(record[-2:], "tl.cond")
        raise
    except Exception as error:  # a failed tl.error_if, run eagerly
        reraise_check(error)
        raise
    _check_same(record[-2:], "tl.cond")
    return write_back(record[-1], flat, returned)


def _check_same(specs: list[OutSpec], caller: str) -> None:
    first = specs[0]
    for spec in specs[1:]:
        if spec.graphdef != first.graphdef or spec.sources != first.sources:
            raise ValueError(BRANCH_STRUCTURE.format(caller=caller))


def fori_loop(
    lower: Any, upper: Any, body_fun: Callable, init_val: Any, *, unroll: Any = None
) -> Any:
    """Like ``jax.lax.fori_loop``: ``val = body_fun(i, val)``; Modules may be carried.

    The body must return the carry with the same structure (typically the
    same Modules, updated in place). The caller's objects in ``init_val``
    hold the final state afterwards.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> count = tl.Variable(jnp.array(0))
        >>> def body(i, c):
        ...     c.value = c.value + i
        ...     return c
        >>> _ = tl.fori_loop(0, 5, body, count)
        >>> int(count.value)
        10
    """
    flat = flatten_call((init_val,), {}, "tl.fori_loop")

    def body(i: Any, values: list) -> list:
        (val,), _, _, _ = unflatten_call(flat.layout, flat.paths, values)
        layout, new_values = layout_of(((call_inside("tl.fori_loop", body_fun, (i, val), {}),), {}))
        if layout != flat.layout:
            raise ValueError(LOOP_STRUCTURE)
        return new_values

    try:
        final = jax.lax.fori_loop(lower, upper, body, list(flat.values), unroll=unroll)
    except Exception as error:  # a failed tl.error_if, run eagerly
        reraise_check(error)
        raise
    (out,), _ = write_values(flat, final)
    return out


WHILE_STRUCTURE = """\
tl.while_loop: the body changed the structure of the carry: {details}
The loop carries one structure from step to step.
Fix: create every Variable before the loop and only set values inside it, and
return the carry itself (e.g. `return (model, opt, i + 1)`).
"""

WHILE_COND_STATE = """\
tl.while_loop: cond_fun changed `{path}`; the condition is evaluated for its
result only, so the change would be lost.
Fix: make cond_fun read the carry only (draw keys or count steps in body_fun).
"""


def while_loop(cond_fun: Callable, body_fun: Callable, init_val: Any) -> Any:
    """Like ``jax.lax.while_loop``: ``while cond_fun(val): val = body_fun(val)``; Modules carried.

    ``init_val`` may hold Modules, Variables and arrays (typically a model,
    an optimizer and a counter). The body returns the carry with the same
    structure (the same Modules, updated in place, or new values of the same
    shapes); the caller's objects hold the final state afterwards. As in
    jax, the loop cannot be reverse-differentiated (use ``tl.scan``).

    Arguments:
        cond_fun: ``val -> bool`` scalar; must not change state.
        body_fun: ``val -> val``.
        init_val: the initial carry.

    Returns:
        The final carry (the caller's objects, holding the final values).

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> count = tl.Variable(jnp.array(1))
        >>> def body(c):
        ...     c.value = c.value * 2
        ...     return c
        >>> _ = tl.while_loop(lambda c: c.value < 100, body, count)
        >>> int(count.value)
        128
    """
    # Python numbers in the carry become arrays, as jax.lax.while_loop makes them
    # (a counter `0` is traced, not static); Modules and Variables stay as they are.
    init_val = jax.tree.map(_as_array, init_val, is_leaf=is_graph_node)
    flat = flatten_call((init_val,), {}, "tl.while_loop")

    def cond(values: list) -> Any:
        (val,), _, _, _ = unflatten_call(flat.layout, flat.paths, values)
        out = call_inside("tl.while_loop", cond_fun, (val,), {})
        layout, after = layout_of(((val,), {}))
        for i, (old, new) in enumerate(zip(values, after, strict=False)):
            if old is not new or layout != flat.layout:
                raise ValueError(WHILE_COND_STATE.format(path=flat.describe(flat.paths[i])))
        return out

    def body(values: list) -> list:
        (val,), _, _, _ = unflatten_call(flat.layout, flat.paths, values)
        out = call_inside("tl.while_loop", body_fun, (val,), {})
        layout, new_values = layout_of(((out,), {}))
        if layout != flat.layout:
            raise ValueError(WHILE_STRUCTURE.format(details=_structure_diff(flat, out)))
        return new_values

    try:
        final = jax.lax.while_loop(cond, body, list(flat.values))
    except Exception as error:  # a failed tl.error_if, run eagerly
        reraise_check(error)
        raise
    (out,), _ = write_values(flat, final)
    return out


def _as_array(x: Any) -> Any:
    return jnp.asarray(x) if isinstance(x, bool | int | float | complex) else x


def _structure_diff(flat: Any, out: Any) -> str:
    """Which paths of the carry the body added or removed (or that it changed kind)."""
    new = flatten_call((out,), {}, "tl.while_loop", check_leaks=False)

    def name(f: Any, p: Any) -> str:
        return f.describe(p).replace("args[0]", "init_val", 1)

    before = {name(flat, p): flat.leaves[i] for i, p in enumerate(flat.paths)}
    after = {name(new, p): new.leaves[i] for i, p in enumerate(new.paths)}
    lines = [f"`{p}` was added" for p in after if p not in before]
    lines += [f"`{p}` was removed" for p in before if p not in after]
    lines += [
        f"`{p}` was a {type(before[p]).__name__}, is now a {type(after[p]).__name__}"
        for p in before
        if p in after and type(before[p]) is not type(after[p])
    ]
    if len(new.tops) == len(flat.tops):
        lines += [
            f"`{name(flat, (t,))}` was a {type(a).__name__}, is now a {type(b).__name__}"
            for t, (a, b) in enumerate(zip(flat.tops, new.tops, strict=True))
            if type(a) is not type(b) and not (is_graph_node(a) or is_graph_node(b))
        ]
    if not lines:
        lines = ["a static attribute or the kind of value returned differs"]
    return "; ".join(lines[:5]) + ("." if len(lines) <= 5 else f" (and {len(lines) - 5} more).")


def eval_shape(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """The output of ``fn(*args, **kwargs)`` with ``jax.ShapeDtypeStruct`` values.

    Nothing is computed or allocated: use it for an abstract model (to
    restore a checkpoint into, or to count parameters). The arguments are not
    changed, and the output is made of new objects.

    Example:
        >>> import toylib as tl
        >>> from toylib import nn
        >>> abstract = tl.eval_shape(lambda: nn.Linear(1024, 1024, rngs=0))
        >>> abstract.kernel.value
        ShapeDtypeStruct(shape=(1024, 1024), dtype=float32)
    """
    flat = flatten_call(args, kwargs, "tl.eval_shape")
    record: list[OutSpec] = []
    # Everything is returned, so unchanged inputs come back abstract too.
    pure = _lift(fn, flat, record, "tl.eval_shape", always_return=True)
    returned = jax.eval_shape(pure, list(flat.values))
    return write_back(record[-1], flat, returned, update=False)
