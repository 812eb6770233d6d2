"""tl.remat, tl.cond, tl.switch, tl.fori_loop, tl.eval_shape: the stateful versions."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

from toylib.transforms.lifting import (
    OutSpec,
    Transform,
    call_inside,
    flatten_call,
    flatten_result,
    layout_of,
    named,
    reraise_check,
    unflatten_call,
    write_back,
    write_values,
)

__all__ = ["Rematted", "cond", "eval_shape", "fori_loop", "remat", "switch"]

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


class Rematted(Transform):
    """The callable ``tl.remat`` returns. See ``remat``."""

    kind = "tl.remat"

    def __init__(self, fn: Callable, policy: Callable | None, prevent_cse: bool) -> None:
        super().__init__(fn)
        self._policy, self._prevent_cse = policy, prevent_cse

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
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
    except jax.errors.JaxRuntimeError as error:  # a failed tl.error_if, run eagerly
        reraise_check(error)
        raise
    (out,), _ = write_values(flat, final)
    return out


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
