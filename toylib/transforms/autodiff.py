"""tl.grad and tl.value_and_grad: gradients with respect to a Module's Params."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, overload

import jax

from toylib._core.filters import filter_repr, to_predicate
from toylib._core.paths import format_path
from toylib._core.state import State
from toylib._core.variables import Param, Variable
from toylib.transforms.lifting import (
    P,
    R,
    Transform,
    call_inside,
    flatten_call,
    flatten_result,
    interleave,
    is_graph_node,
    unflatten_call,
    write_back,
)

__all__ = ["Differentiated", "grad", "value_and_grad"]

NOTHING_TO_DIFFERENTIATE = """\
{caller}: the wrt filter ({wrt}) selects no Variable in argument(s) {argnums}, so
there is nothing to differentiate.
Fix: differentiate the argument that holds the Params, or widen the filter:

    tl.grad(loss_fn, argnums=0, wrt=tl.Param)(model, x, y)
"""

NOT_FLOAT = """\
{caller}: wrt selects `{path}`, a {kind} of dtype {dtype}; only floating-point
values can be differentiated.
Fix: narrow the filter, e.g. `wrt=tl.Param` (RngState keys and counters,
step counts and other integer state are not trainable).
"""

BAD_AUX = """\
{caller}(..., has_aux=True): the function must return a pair (loss, aux), got a {kind}.
"""


# Typed for editors: the result takes `fn`'s arguments; value_and_grad returns
# `(fn's result, grads)`, grad returns grads (or `(grads, aux)`: not `fn`'s type).
@overload
def value_and_grad(
    fn: Callable[P, R],
    argnums: int | Sequence[int] = 0,
    *,
    wrt: Any = Param,
    has_aux: bool = False,
) -> Differentiated[P, tuple[R, Any]]: ...
@overload
def value_and_grad(
    fn: None = None,
    argnums: int | Sequence[int] = 0,
    *,
    wrt: Any = Param,
    has_aux: bool = False,
) -> Callable[[Callable[P, R]], Differentiated[P, tuple[R, Any]]]: ...
def value_and_grad(
    fn: Callable | None = None,
    argnums: int | Sequence[int] = 0,
    *,
    wrt: Any = Param,
    has_aux: bool = False,
) -> Any:
    """Like ``jax.value_and_grad``, for functions of Modules.

    Arguments:
        fn: returns a scalar loss (or ``(loss, aux)`` with ``has_aux``).
        argnums: which argument(s) to differentiate.
        wrt: a filter: which Variables of those arguments to differentiate
            (default ``tl.Param``). Bare array attributes of Modules are data
            too: a filter that matches them (``...``) differentiates them, and
            their gradients appear in the State as plain arrays; type filters
            (``tl.Param``) match Variables of that type only. Plain array
            arguments are differentiated whole, as ``jax.grad`` does.
        has_aux: whether ``fn`` returns ``(loss, aux)``.

    Returns:
        A function returning ``(loss, grads)`` (``((loss, aux), grads)`` with
        ``has_aux``). For an argument holding Modules, ``grads`` is a ``State``
        of Variables of the same types and paths as the selected ones (a tied
        weight appears once, its gradient summed over its uses). Other state
        that ``fn`` updates (BatchNorm statistics, Rngs counters) is written
        back to the arguments, as ``tl.jit`` does. A Variable reachable from
        several arguments belongs to the first one.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> from toylib import nn
        >>> model = nn.Linear(2, 1, rngs=0)
        >>> loss, grads = tl.value_and_grad(lambda m, x: m(x).sum())(model, jnp.ones((4, 2)))
        >>> grads.kernel.value.tolist(), type(grads.kernel).__name__
        ([[4.0], [4.0]], 'Param')
    """
    if fn is None:
        return lambda f: value_and_grad(f, argnums, wrt=wrt, has_aux=has_aux)
    return _differentiate(fn, argnums, wrt, has_aux, "tl.value_and_grad", with_value=True)


@overload
def grad(
    fn: Callable[P, Any],
    argnums: int | Sequence[int] = 0,
    *,
    wrt: Any = Param,
    has_aux: bool = False,
) -> Differentiated[P, Any]: ...
@overload
def grad(
    fn: None = None,
    argnums: int | Sequence[int] = 0,
    *,
    wrt: Any = Param,
    has_aux: bool = False,
) -> Callable[[Callable[P, Any]], Differentiated[P, Any]]: ...
def grad(
    fn: Callable | None = None,
    argnums: int | Sequence[int] = 0,
    *,
    wrt: Any = Param,
    has_aux: bool = False,
) -> Any:
    """Like ``jax.grad``, for functions of Modules; see ``value_and_grad``.

    Returns:
        A function returning ``grads`` (``(grads, aux)`` with ``has_aux``).

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> from toylib import nn
        >>> model = nn.Linear(3, 2, rngs=0)
        >>> grads = tl.grad(lambda m: (m(jnp.ones(3)) ** 2).sum())(model)
        >>> sorted(k[0] for k in grads.flat())
        ['bias', 'kernel']
    """
    if fn is None:
        return lambda f: grad(f, argnums, wrt=wrt, has_aux=has_aux)
    return _differentiate(fn, argnums, wrt, has_aux, "tl.grad", with_value=False)


def _differentiate(
    fn: Callable, argnums: Any, wrt: Any, has_aux: bool, caller: str, with_value: bool
) -> Differentiated:
    return Differentiated(fn, argnums, wrt, has_aux, caller, with_value)


class Differentiated(Transform[P, R]):
    """The callable ``tl.grad`` and ``tl.value_and_grad`` return. See ``value_and_grad``."""

    def __init__(
        self,
        fn: Callable[P, Any],
        argnums: Any,
        wrt: Any,
        has_aux: bool,
        caller: str,
        with_value: bool,
    ) -> None:
        super().__init__(fn)
        self.kind = caller
        self._argnums = argnums
        self._nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
        self._wrt, self._predicate = wrt, to_predicate(wrt)
        self._has_aux, self._with_value = has_aux, with_value

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        flat = flatten_call(args, kwargs, self.label)
        has_nodes = {o for o, top in zip(flat.origin, flat.tops, strict=True) if is_graph_node(top)}
        chosen = self._chosen(flat, has_nodes)
        chosen_set = set(chosen)
        others = [i for i in range(len(flat.values)) if i not in chosen_set]
        specs: list = []
        pure = self._pure(flat, chosen, others, specs)
        diff = [flat.values[i] for i in chosen]
        rest = [flat.values[i] for i in others]
        (loss, returned), grads = jax.value_and_grad(pure, has_aux=True)(diff, rest)
        aux = write_back(specs[-1], flat, returned)
        by_arg = _grads_by_argument(flat, chosen, grads, self._nums, has_nodes, args, kwargs)
        result = by_arg[0] if isinstance(self._argnums, int) else tuple(by_arg)
        value = (loss, aux) if self._has_aux else loss
        out: Any = (value, result)  # Any: R is what value_and_grad / grad declare
        if not self._with_value:
            out = (result, aux) if self._has_aux else result
        return out

    def _chosen(self, flat: Any, has_nodes: set) -> list[int]:
        """The leaves to differentiate: ``wrt`` matches in Module arguments, plain arrays whole.

        Bare arrays inside Modules are data like Variables: a filter that
        matches them (``...``) differentiates them; type filters do not.
        """
        chosen: list[int] = []
        for i, leaf in enumerate(flat.leaves):
            arg = flat.origin[flat.paths[i][0]]
            if arg not in self._nums:
                continue
            if arg in has_nodes:
                if not self._predicate(flat.arg_path(i), leaf):
                    continue
                # Every array of the value: a Variable may hold a pytree (tl.nx.NamedArray).
                dtypes = [jax.typeof(x).dtype for x in jax.tree.leaves(flat.values[i])]
                dtype = next(
                    (d for d in dtypes if not jax.numpy.issubdtype(d, jax.numpy.inexact)), None
                )
                if dtype is not None:
                    raise TypeError(
                        NOT_FLOAT.format(
                            caller=self.kind,
                            path=format_path(flat.arg_path(i), root=f"args[{arg}]"),
                            kind=type(leaf).__name__ if isinstance(leaf, Variable) else "array",
                            dtype=dtype,
                        )
                    )
            chosen.append(i)
        if not chosen:
            raise ValueError(
                NOTHING_TO_DIFFERENTIATE.format(
                    caller=self.kind, wrt=filter_repr(self._wrt), argnums=self._nums
                )
            )
        return chosen

    def _pure(self, flat: Any, chosen: list[int], others: list[int], specs: list) -> Callable:
        def pure(diff: list, rest: list) -> tuple:
            values = interleave(len(flat.values), (chosen, diff), (others, rest))
            inner_args, inner_kwargs, tops, inside = unflatten_call(flat.layout, flat.paths, values)
            out = call_inside(self.label, self._fn, inner_args, inner_kwargs)
            if self._has_aux:
                if not (isinstance(out, tuple) and len(out) == 2):
                    raise TypeError(BAD_AUX.format(caller=self.kind, kind=type(out).__name__))
                loss, aux = out
            else:
                loss, aux = out, None
            spec, returned, _ = flatten_result(
                flat.layout, flat.position, tops, aux, inside, values
            )
            specs.append(spec)
            return loss, returned

        # Named like the user's function (profiles, compiled programs). Renamed
        # in place rather than wrapped by `named`: jax reads the signature of
        # what it differentiates on every call, and a *args wrapper costs more.
        pure.__name__ = pure.__qualname__ = getattr(self._fn, "__name__", "fn")
        return pure


def _like(leaf: Any, gradient: Any) -> Any:
    """The gradient in the leaf's kind: a Variable of its type, or a bare array."""
    return leaf.replace(value=gradient) if isinstance(leaf, Variable) else gradient


def _grads_by_argument(
    flat: Any,
    chosen: list[int],
    grads: list,
    nums: tuple,
    has_nodes: set,
    args: tuple,
    kwargs: dict,
) -> list[Any]:
    out = []
    for arg in nums:
        picked = [
            (i, g)
            for i, g in zip(chosen, grads, strict=True)
            if flat.origin[flat.paths[i][0]] == arg
        ]
        if arg in has_nodes and len(picked) == 1 and flat.arg_path(picked[0][0]) == ():
            i, g = picked[0]  # the argument is a Variable: its gradient, same type
            out.append(flat.leaves[i].replace(value=g))
        elif arg in has_nodes:
            out.append(
                State.from_flat((flat.arg_path(i), _like(flat.leaves[i], g)) for i, g in picked)
            )
        else:  # a plain pytree of arrays: gradients in its own structure (None if static)
            value = args[arg] if isinstance(arg, int) else kwargs[arg]
            by_top = {flat.paths[i][0]: g for i, g in picked}
            leaves = [by_top.get(t) for t, origin in enumerate(flat.origin) if origin == arg]
            out.append(jax.tree.unflatten(jax.tree.structure(value), leaves))
    return out
