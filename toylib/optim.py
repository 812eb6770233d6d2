"""tl.Optimizer: an optax optimiser whose state lives in Variables."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from toylib._core.filters import to_predicate
from toylib._core.graph import iter_variables
from toylib._core.module import Module
from toylib._core.paths import format_path
from toylib._core.state import State
from toylib._core.variables import Param, Variable

__all__ = ["OptState", "Optimizer"]

NO_PARAMS = """\
tl.Optimizer: the wrt filter ({wrt!r}) selects no Variable of the model, so there
is nothing to optimise.
Fix: pass the model that holds the parameters, or another filter, e.g. `wrt=tl.Param`.
"""

GRADS_MISMATCH = """\
Optimizer.update: the gradients do not match the parameters the optimizer was
built for.
{details}
Fix: take gradients with the same filter as the optimizer's wrt ({wrt!r}):

    grads = tl.grad(loss_fn, wrt={wrt_name})(model, ...)
    optimizer.update(model, grads)
"""


class OptState(Variable):
    """A piece of optimiser state (moments, counts): not a Param, not trained."""

    __slots__ = ()


class Optimizer(Module):
    """Apply an optax transformation to a model's Variables, in place.

    The optax state is stored in ``OptState`` Variables (nested like the
    optax state, with parameters keyed by their path in the model), so the
    optimizer is itself a Module: pass it to ``tl.jit`` next to the model,
    save it with the model. The optimizer does not keep a reference to the
    model: ``update`` takes it.

    Arguments:
        model: the model whose Variables to optimise.
        tx: an ``optax.GradientTransformation``.
        wrt: a filter choosing the Variables (default ``tl.Param``).

    Example:
        >>> import jax.numpy as jnp, optax, toylib as tl
        >>> from toylib import nn
        >>> model = nn.Linear(2, 1, rngs=0)
        >>> opt = tl.Optimizer(model, optax.sgd(0.1))
        >>> before = model.bias.value
        >>> grads = tl.grad(lambda m: m(jnp.ones(2)).sum())(model)
        >>> opt.update(model, grads)
        >>> (model.bias.value - before).tolist(), int(opt.step.value)
        ([-0.10000000149011612], 1)
    """

    def __init__(
        self, model: Module, tx: optax.GradientTransformation, *, wrt: Any = Param
    ) -> None:
        self.tx = tx
        self.wrt = wrt
        self.step = OptState(jnp.zeros((), jnp.uint32))
        params = self._params(model)
        if not params:
            raise ValueError(NO_PARAMS.format(wrt=wrt))
        state = tx.init(_nest(params))
        # The optax pytree's structure, to hand optax plain dicts back
        # (a Module stores dicts as tracked Dicts).
        self.opt_treedef = jax.tree.structure(state)
        self.opt_state = jax.tree.map(OptState, state)

    def _params(self, model: Module) -> dict:
        predicate = to_predicate(self.wrt)
        return {p: v for p, v in iter_variables(model) if predicate(p, v)}

    def update(self, model: Module, grads: State, **extra_args: Any) -> None:
        """Apply one step: ``params += tx.update(grads, opt_state, params)``.

        Arguments:
            model: the model (the one the optimizer was built for, or one of
                the same structure).
            grads: a State of gradients with the parameters' paths, as
                ``tl.grad`` returns for ``wrt`` equal to the optimizer's.
            **extra_args: passed to ``tx.update`` (e.g. ``value`` for
                ``optax.contrib`` line searches).
        """
        params = self._params(model)
        flat_grads = grads.flat() if isinstance(grads, State) else grads
        if set(flat_grads) != set(params):
            raise ValueError(
                GRADS_MISMATCH.format(
                    details=_details(params, flat_grads),
                    wrt=self.wrt,
                    wrt_name=getattr(self.wrt, "__name__", repr(self.wrt)),
                )
            )
        grad_values = {p: g.value if isinstance(g, Variable) else g for p, g in flat_grads.items()}
        values = {p: v.value for p, v in params.items()}
        slots = jax.tree.leaves(self.opt_state, is_leaf=_is_variable)
        opt_state = jax.tree.unflatten(self.opt_treedef, [v.value for v in slots])
        updates, new_state = self.tx.update(
            _nest(grad_values), opt_state, _nest(values), **extra_args
        )
        new_params = optax.apply_updates(_nest(values), updates)
        # Everything is computed: now write (a failure above changes nothing).
        for path, variable in params.items():
            variable.value = _get(new_params, path)
        for slot, new in zip(slots, jax.tree.leaves(new_state), strict=True):
            slot.value = new
        self.step.value = self.step.value + 1


def _is_variable(x: Any) -> bool:
    return isinstance(x, Variable)


def _nest(flat: dict) -> dict:
    """``{path: value}`` as nested dicts keyed by the path's parts (optax's pytree)."""
    root: dict = {}
    for path, value in flat.items():
        node = root
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value.value if isinstance(value, Variable) else value
    return root


def _get(nested: dict, path: tuple) -> Any:
    for key in path:
        nested = nested[key]
    return nested


def _details(params: dict, grads: dict) -> str:
    missing = [format_path(p) for p in params if p not in grads][:5]
    extra = [format_path(p) for p in grads if p not in params][:5]
    lines = []
    if missing:
        lines.append("  no gradient for: " + ", ".join(missing))
    if extra:
        lines.append("  gradient for a non-parameter: " + ", ".join(extra))
    return "\n".join(lines)
