"""EMA: an exponential moving average of a model's weights, kept as a model of its own."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from toylib._core.calls import module_path
from toylib._core.filters import filter_repr
from toylib._core.graph import clone, iter_variables
from toylib._core.module import Module
from toylib._core.paths import format_path, list_paths
from toylib._core.variables import BatchStat, Param, Variable

__all__ = ["EMA"]

OTHER_MODEL = """\
{where}: the model given to update() does not have the Variables this EMA was built from
({filter}): {details}.
Fix: update the EMA with the model it was built from (or one of the same structure);
after changing the model's structure, start a new average:

    ema = nn.EMA(model, decay={decay})
"""

BAD_DECAY = """\
EMA(decay={decay}): the decay must be in [0, 1]: the weight of the old average in
average = decay * average + (1 - decay) * weights.
Fix: e.g. decay=0.999 (an average over about 1000 steps).
"""


class EMA(Module):
    """An exponential moving average of a model's Params: ``avg = d * avg + (1 - d) * w``.

    ``EMA(model)`` keeps a copy of the model (``ema.model``, a ``tl.clone``)
    whose Variables selected by ``wrt`` (Params by default) are averages of
    the live model's; ``ema.update(model)`` after each optimiser step folds
    the current weights in. The averaged model is an ordinary model:
    evaluate it with ``ema.model(x)``, save it with ``tl.save``. ``update``
    writes Variables in place, so it works inside ``tl.jit`` with the EMA
    passed as an argument. Variables selected by ``copy`` (``BatchStat`` by
    default: running statistics belong to the current weights) are copied
    as they are.

    With ``warmup=True`` the decay is ``min(decay, (1 + n) / (10 + n))`` at
    update ``n``, so early averages are not dominated by the random
    initialisation (TensorFlow's ``num_updates``).

    Keep the EMA beside the model, not inside it: its copy holds ``Param``s,
    which an optimiser over a container holding both would train.

    Arguments:
        model: the model to average (it is copied; later updates read it).
        decay: the weight of the old average, in ``[0, 1]`` (default 0.999).
        wrt: the Variables to average (a filter, default ``tl.Param``).
        copy: the Variables to copy on each update (default ``tl.BatchStat``).
        warmup: ramp the decay up over the first updates (default False).

    Returns:
        A Module with ``model`` (the averages) and ``count`` (updates so far).

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> from toylib import nn
        >>> model = nn.Linear(2, 1, rngs=0)
        >>> ema = nn.EMA(model, decay=0.5)
        >>> model.bias.value = jnp.ones(1)
        >>> tl.jit(lambda ema, model: ema.update(model))(ema, model)
        >>> ema.model.bias.value.tolist(), int(ema.count.value)
        ([0.5], 1)
    """

    def __init__(
        self,
        model: Module,
        *,
        decay: float = 0.999,
        wrt: Any = Param,
        copy: Any = BatchStat,
        warmup: bool = False,
    ) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(BAD_DECAY.format(decay=decay))
        self.model = clone(model)
        self.count = Variable(jnp.zeros((), jnp.int32))
        self.decay = decay
        self.wrt = wrt
        self.copy = copy
        self.warmup = warmup

    def current_decay(self) -> Any:
        """The decay the next ``update`` uses (a traced value under ``tl.jit`` with warmup)."""
        if not self.warmup:
            return self.decay
        n = self.count.value.astype(jnp.float32)
        return jnp.minimum(self.decay, (1.0 + n) / (10.0 + n))

    def update(self, model: Module) -> None:
        """Fold ``model``'s current weights into the averages (in place)."""
        decay = self.current_decay()
        averaged = self._pairs(model, self.wrt)
        copied = self._pairs(model, self.copy)
        for avg, live in averaged:
            new = decay * avg.value + (1.0 - decay) * live.value
            avg.value = jnp.asarray(new, avg.value.dtype)
        for mine, live in copied:
            mine.value = live.value
        self.count.value = self.count.value + 1

    def _pairs(self, model: Module, filter: Any) -> list[tuple[Variable, Variable]]:
        mine = dict(iter_variables(self.model, filter))
        live = dict(iter_variables(model, filter))
        problems = []
        if mine.keys() != live.keys():
            missing = [p for p in mine if p not in live]
            extra = [p for p in live if p not in mine]
            if missing:
                problems.append(f"missing {list_paths(missing)}")
            if extra:
                problems.append(f"new {list_paths(extra)}")
        else:
            problems = [
                f"{format_path(p)} is {tuple(live[p].shape)}, was {tuple(v.shape)}"
                for p, v in mine.items()
                if jnp.shape(v.value) != jnp.shape(live[p].value)
            ][:3]
        if problems:
            raise ValueError(
                OTHER_MODEL.format(
                    where=module_path(self),
                    filter=filter_repr(filter),
                    details="; ".join(problems),
                    decay=self.decay,
                )
            )
        return [(v, live[p]) for p, v in mine.items()]
