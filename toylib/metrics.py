"""Metrics: running totals kept in Variables, updated in place (also inside ``tl.jit``).

A metric is a ``tl.Module`` whose totals are ``MetricState`` Variables, so it
is passed to ``tl.jit`` next to the model and the compiled step updates it in
place, ``tl.split``/``tl.state`` see its totals, and checkpoints and displays
treat it like any other Module. ``update(**kwargs)`` adds a batch,
``compute()`` returns the value, ``reset()`` zeroes the totals. None of them
wait for the device: inside or outside ``tl.jit`` they only build arrays.

The names follow ``flax.nnx.metrics`` (``Average``, ``Accuracy``,
``MultiMetric``, ``Welford``, ``argname``, ``mask``), so a Flax user knows the
calls; the code is toylib's own.

Example:
    >>> import jax.numpy as jnp, toylib as tl
    >>> metrics = tl.metrics.MultiMetric(
    ...     loss=tl.metrics.Average("loss"), accuracy=tl.metrics.Accuracy()
    ... )
    >>> logits = jnp.array([[2.0, 0.0], [0.0, 1.0]])
    >>> metrics.update(loss=jnp.array(0.5), logits=logits, labels=jnp.array([0, 0]))
    >>> {name: float(value) for name, value in metrics.compute().items()}
    {'loss': 0.5, 'accuracy': 0.5}

Decisions:

* ``compute()`` of an empty metric is NaN (0/0), never an error: telling
  "empty" apart on the host would mean reading a device value on every call.
* Totals are float32 and counts int32 (jax's default precision). A count
  overflows after 2**31 elements; reset per epoch.
* ``mask`` (boolean or integer, broadcastable to the values or labels) drops
  elements from both the total and the count, e.g. the padding of a last
  batch. Float masks are refused: they look like weights, which these
  metrics do not take.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from toylib._core.graph import iter_variables
from toylib._core.module import Module
from toylib._core.variables import Variable

__all__ = ["Accuracy", "Average", "Metric", "MetricState", "MultiMetric", "Statistics", "Welford"]

MISSING_ARGUMENT = """\
{where}.update: expected the keyword argument `{argname}=...`, got {given}.
Fix: pass the values under that name, or build the metric with the name you use:

    metric.update({argname}=batch_values)
    {where}(argname="loss")     # then metric.update(loss=batch_values)
"""

BAD_MASK = """\
{where}.update: the mask (shape {mask_shape}, {mask_dtype}) must be boolean or integer
and broadcast to the {what} (shape {shape}).
Fix: give one entry per element, True where it counts, e.g. for padded batches

    mask = jnp.arange(batch_size) < n_real_examples
"""

FLOAT_LABELS = """\
Accuracy.update: labels must be integer class indices (or booleans), got {dtype}.
Fix: {fix}
"""

MULTICLASS_SHAPES = """\
Accuracy.update: logits of shape (*batch, classes) need integer labels of shape
(*batch,), got logits {logits} and labels {labels}.
Fix: {fix}
"""

BINARY_SHAPES = """\
Accuracy(threshold={threshold}).update: binary scores must have the same shape as
the labels, got logits {logits} and labels {labels}.
Fix: {fix}
"""

BAD_THRESHOLD = """\
Accuracy(threshold={threshold!r}): the threshold must be a real number, got a {kind}.
Fix: Accuracy(threshold=0.5) for probabilities, Accuracy(threshold=0.0) for logits,
or Accuracy() for class scores of shape (*batch, classes).
"""

NOT_A_METRIC = """\
MultiMetric({name}=...): expected a tl.metrics.Metric, got a {kind}.
Fix: MultiMetric({name}=tl.metrics.Average())
"""

RESERVED_NAME = """\
MultiMetric({name}=...): `{name}` is the name of a MultiMetric attribute or method,
so the metric could not be reached as `metrics.{name}`.
Fix: choose another name, e.g. MultiMetric({name}_metric=...)
"""


class MetricState(Variable):
    """A metric's running total or count: updated by ``update``, not trained.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> avg = tl.metrics.Average()
        >>> avg.update(values=jnp.array([1.0, 2.0]))
        >>> state = tl.state(avg, tl.metrics.MetricState)
        >>> float(state["total"].value), int(state["count"].value)
        (3.0, 2)
    """

    __slots__ = ()


class Metric(Module):
    """Base class of metrics: ``update(**kwargs)``, ``compute()``, ``reset()``.

    A subclass keeps its totals in ``MetricState`` Variables and updates them
    in place, so it works inside ``tl.jit``. ``update`` takes keyword
    arguments only and ignores those it does not use, so a ``MultiMetric``
    can hand the same keywords to every metric.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> class Maximum(tl.metrics.Metric):
        ...     def __init__(self):
        ...         self.max = tl.metrics.MetricState(jnp.array(-jnp.inf))
        ...     def update(self, *, values, **_):
        ...         self.max.value = jnp.maximum(self.max.value, jnp.max(values))
        ...     def compute(self):
        ...         return self.max.value
        ...     def reset(self):
        ...         self.max.value = jnp.array(-jnp.inf)
        >>> m = Maximum()
        >>> m.update(values=jnp.array([1.0, 3.0])); m.update(values=jnp.array(2.0))
        >>> float(m.compute())
        3.0
    """

    def update(self, **kwargs: Any) -> None:
        """Add a batch to the totals, in place."""
        raise NotImplementedError(f"{type(self).__name__} must define update(**kwargs).")

    def compute(self) -> Any:
        """The metric's value from the totals so far (arrays; no device wait)."""
        raise NotImplementedError(f"{type(self).__name__} must define compute().")

    def reset(self) -> None:
        """Zero the totals, in place."""
        raise NotImplementedError(f"{type(self).__name__} must define reset().")


def _zero(variable: Variable) -> None:
    variable.value = jnp.zeros_like(variable.value)


def _mask_for(where: str, mask: Any, shape: tuple[int, ...], what: str) -> Array | None:
    """``mask`` as a boolean array of ``shape`` (None stays None), checked statically."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    ok = jnp.issubdtype(mask.dtype, jnp.bool_) or jnp.issubdtype(mask.dtype, jnp.integer)
    if ok:
        try:
            ok = jnp.broadcast_shapes(mask.shape, shape) == tuple(shape)
        except ValueError:
            ok = False
    if not ok:
        raise ValueError(
            BAD_MASK.format(
                where=where, mask_shape=mask.shape, mask_dtype=mask.dtype, what=what, shape=shape
            )
        )
    return jnp.broadcast_to(mask != 0, shape)


def _argument(metric: Metric, argname: str, kwargs: dict) -> Array:
    if argname not in kwargs:
        given = ", ".join(f"`{k}`" for k in kwargs) or "no keywords"
        where = type(metric).__name__
        raise TypeError(MISSING_ARGUMENT.format(where=where, argname=argname, given=given))
    return jnp.asarray(kwargs[argname])


class _Mean(Metric):
    """A total and a count in MetricState; ``compute()`` is their ratio (Average, Accuracy)."""

    def __init__(self) -> None:
        self.total = MetricState(jnp.zeros((), jnp.float32))
        self.count = MetricState(jnp.zeros((), jnp.int32))

    def _add(self, values: Array, mask: Array | None) -> None:
        values = values.astype(self.total.dtype)
        if mask is None:
            total, count = values.sum(), values.size
        else:
            total, count = jnp.where(mask, values, 0).sum(), mask.sum(dtype=self.count.dtype)
        # Both new values exist before either is written: a failure changes nothing.
        new_total, new_count = self.total.value + total, self.count.value + count
        self.total.value, self.count.value = new_total, new_count

    def compute(self) -> Float[Array, ""]:
        """``total / count``: the mean so far (NaN before any update)."""
        return self.total.value / self.count.value

    def reset(self) -> None:
        """Zero the total and the count."""
        _zero(self.total)
        _zero(self.count)


class Average(_Mean):
    """The mean of every value seen: sums and counts them, weighted by batch size.

    ``update(values=x)`` adds ``x``: a scalar counts once, an array adds its
    sum and its size, so ``compute()`` is the mean over all elements seen
    (the same as averaging per-batch means weighted by batch size).

    Arguments:
        argname: the keyword ``update`` reads the values from (default
            ``"values"``), e.g. ``Average("loss")`` takes ``update(loss=...)``.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> loss = tl.metrics.Average()
        >>> float(loss.compute())                       # empty: 0/0
        nan
        >>> loss.update(values=jnp.array([1.0, 2.0, 3.0, 4.0]))
        >>> loss.update(values=jnp.array([5.0, 6.0]))
        >>> float(loss.compute())                       # 21 / 6
        3.5
        >>> loss.reset(); int(loss.count.value)
        0
    """

    def __init__(self, argname: str = "values") -> None:
        self.argname = argname
        super().__init__()

    def update(self, *, mask: ArrayLike | None = None, **kwargs: Any) -> None:
        """Add ``kwargs[argname]`` to the total; other keywords are ignored.

        Arguments:
            mask: optional, broadcastable to the values; elements where it is
                False (0) are neither summed nor counted.
            **kwargs: must hold ``argname``: a scalar or an array.
        """
        values = _argument(self, self.argname, kwargs)
        self._add(values, _mask_for("Average", mask, values.shape, "values"))


class Accuracy(_Mean):
    """The fraction of correct predictions, over every example seen.

    Without ``threshold``, ``logits`` are class scores of shape
    ``(*batch, classes)`` and the prediction is their argmax, compared with
    integer ``labels`` of shape ``(*batch,)``. With ``threshold``, ``logits``
    are binary scores of the labels' shape: predicted positive where
    ``logits >= threshold``, compared with ``labels != 0``.

    Arguments:
        threshold: for binary scores, e.g. 0.5 for probabilities or 0.0 for
            logits; None (default) for class scores.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> acc = tl.metrics.Accuracy()
        >>> logits = jnp.array([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
        >>> acc.update(logits=logits, labels=jnp.array([0, 1, 1]))
        >>> round(float(acc.compute()), 4)
        0.6667
        >>> binary = tl.metrics.Accuracy(threshold=0.5)
        >>> binary.update(logits=jnp.array([0.9, 0.2, 0.6]), labels=jnp.array([1, 0, 0]))
        >>> round(float(binary.compute()), 4)
        0.6667
    """

    def __init__(self, threshold: float | None = None) -> None:
        if threshold is not None:
            if isinstance(threshold, bool) or not isinstance(threshold, int | float):
                raise TypeError(
                    BAD_THRESHOLD.format(threshold=threshold, kind=type(threshold).__name__)
                )
            threshold = float(threshold)
        self.threshold = threshold
        super().__init__()

    def update(  # type: ignore[override]
        self,
        *,
        logits: ArrayLike,
        labels: ArrayLike,
        mask: ArrayLike | None = None,
        **_: Any,
    ) -> None:
        """Count the correct predictions of a batch; other keywords are ignored.

        Arguments:
            logits: ``(*batch, classes)`` scores, or ``(*batch,)`` binary scores
                when the metric has a ``threshold``.
            labels: ``(*batch,)`` integer (or boolean) labels.
            mask: optional, broadcastable to the labels; False (0) entries are
                not counted.
        """
        logits, labels = jnp.asarray(logits), jnp.asarray(labels)
        self._check(logits, labels)
        if self.threshold is None:
            correct = jnp.argmax(logits, axis=-1) == labels
        else:
            correct = (logits >= self.threshold) == (labels != 0)
        self._add(correct, _mask_for("Accuracy", mask, labels.shape, "labels"))

    def _check(self, logits: Array, labels: Array) -> None:
        if not (jnp.issubdtype(labels.dtype, jnp.integer) or labels.dtype == jnp.bool_):
            if labels.shape == logits.shape and self.threshold is None:
                fix = "these look one-hot (the logits' shape): pass `labels.argmax(-1)`."
            else:
                fix = "convert them, e.g. `labels.astype(jnp.int32)`."
            raise TypeError(FLOAT_LABELS.format(dtype=labels.dtype, fix=fix))
        if self.threshold is None:
            if logits.ndim >= 1 and logits.shape[:-1] == labels.shape:
                return
            if logits.shape == labels.shape:
                fix = (
                    "for binary scores of the labels' shape, build "
                    "`Accuracy(threshold=0.5)` (0.0 for logits)."
                )
            else:
                fix = "give one label per row of logits (the same batch axes)."
            shapes = {"logits": logits.shape, "labels": labels.shape}
            raise ValueError(MULTICLASS_SHAPES.format(**shapes, fix=fix))
        if logits.shape == labels.shape:
            return
        if logits.ndim == labels.ndim + 1 and logits.shape[:-1] == labels.shape:
            if logits.shape[-1] == 1:
                fix = "drop the trailing axis of size 1: `logits[..., 0]`."
            else:
                fix = "for class scores, build `Accuracy()` without a threshold."
        else:
            fix = "give one score per label (the same shape)."
        shapes = {"logits": logits.shape, "labels": labels.shape}
        raise ValueError(BINARY_SHAPES.format(threshold=self.threshold, **shapes, fix=fix))


class Statistics(NamedTuple):
    """What ``Welford.compute`` returns (arrays).

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> stats = tl.metrics.Welford()
        >>> stats.update(values=jnp.array([1.0, 3.0]))
        >>> result = stats.compute()
        >>> type(result).__name__, float(result.mean), float(result.std)
        ('Statistics', 2.0, 1.0)
    """

    mean: Array
    std: Array  # population standard deviation (numpy's default, ddof=0)
    sem: Array  # standard error of the mean: sample std (ddof=1) / sqrt(count)


class Welford(Metric):
    """Mean and standard deviation of every value seen, in one numerically stable pass.

    Keeps the count, the mean and the sum of squared deviations (M2), and
    merges each batch's own statistics into them (Chan et al.'s parallel form
    of Welford's update), which does not lose precision the way summing
    squares does. ``compute()`` returns ``Statistics(mean, std, sem)``; all
    three are NaN while empty (``sem`` also after a single value).

    Arguments:
        argname: the keyword ``update`` reads the values from (default ``"values"``).

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> stats = tl.metrics.Welford()
        >>> stats.update(values=jnp.array([1.0, 2.0, 3.0]))
        >>> stats.update(values=jnp.array([4.0, 5.0]))
        >>> mean, std, sem = stats.compute()
        >>> float(mean), round(float(std), 4), round(float(sem), 4)
        (3.0, 1.4142, 0.7071)
    """

    def __init__(self, argname: str = "values") -> None:
        self.argname = argname
        self.count = MetricState(jnp.zeros((), jnp.int32))
        self.mean = MetricState(jnp.zeros((), jnp.float32))
        self.m2 = MetricState(jnp.zeros((), jnp.float32))

    def update(self, *, mask: ArrayLike | None = None, **kwargs: Any) -> None:
        """Merge ``kwargs[argname]`` into the statistics; other keywords are ignored.

        Arguments:
            mask: optional, broadcastable to the values; False (0) entries are skipped.
            **kwargs: must hold ``argname``: a scalar or an array.
        """
        values = _argument(self, self.argname, kwargs).astype(self.mean.dtype)
        weight = _mask_for("Welford", mask, values.shape, "values")
        weight = jnp.ones(values.shape, values.dtype) if weight is None else weight
        weight = weight.astype(values.dtype)
        n_b = weight.sum()
        # Counts in float: n_a * n_b overflows int32 long before the count does.
        mean_b = (weight * values).sum() / jnp.maximum(n_b, 1.0)
        m2_b = (weight * (values - mean_b) ** 2).sum()
        n_a = self.count.value.astype(values.dtype)
        n = jnp.maximum(n_a + n_b, 1.0)  # an empty batch on an empty metric: stays zero
        delta = mean_b - self.mean.value
        new_mean = self.mean.value + delta * (n_b / n)
        new_m2 = self.m2.value + m2_b + delta**2 * (n_a * n_b / n)
        new_count = self.count.value + n_b.astype(self.count.dtype)
        self.count.value, self.mean.value, self.m2.value = new_count, new_mean, new_m2

    def compute(self) -> Statistics:
        """``Statistics(mean, std, sem)`` of the values so far."""
        n = self.count.value.astype(self.mean.dtype)
        mean = jnp.where(n > 0, self.mean.value, jnp.nan)
        return Statistics(
            mean=mean,
            std=jnp.sqrt(self.m2.value / n),
            sem=jnp.sqrt(self.m2.value / (n * (n - 1))),
        )

    def reset(self) -> None:
        """Zero the count, the mean and M2."""
        _zero(self.count)
        _zero(self.mean)
        _zero(self.m2)


class MultiMetric(Metric):
    """Several named metrics updated together: ``update(**kwargs)`` feeds them all.

    Every metric receives all the keywords and takes what it needs (an
    ``Average`` its ``values``, an ``Accuracy`` its ``logits`` and
    ``labels``), so one call updates them all. Each metric is an attribute
    (``metrics.loss``). If one metric rejects the input, none is updated.

    Arguments:
        **metrics: name -> ``Metric``.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> metrics = tl.metrics.MultiMetric(
        ...     loss=tl.metrics.Average(), accuracy=tl.metrics.Accuracy()
        ... )
        >>> metrics.update(
        ...     values=jnp.array([0.5, 1.5]),
        ...     logits=jnp.array([[1.0, 0.0], [1.0, 0.0]]),
        ...     labels=jnp.array([0, 1]),
        ... )
        >>> {k: float(v) for k, v in metrics.compute().items()}
        {'loss': 1.0, 'accuracy': 0.5}
        >>> metrics.reset(); float(metrics.loss.compute())
        nan
    """

    def __init__(self, **metrics: Metric) -> None:
        for name, metric in metrics.items():
            if not isinstance(metric, Metric):
                raise TypeError(NOT_A_METRIC.format(name=name, kind=type(metric).__name__))
            if name == "names" or hasattr(type(self), name):
                raise ValueError(RESERVED_NAME.format(name=name))
        self.names = tuple(metrics)
        for name, metric in metrics.items():
            setattr(self, name, metric)

    def update(self, **kwargs: Any) -> None:
        """Pass every keyword to every metric's ``update``."""
        # Restored if a later metric fails, so a bad batch leaves every total as it was.
        saved = [(v, v.value) for _, v in iter_variables(self)]
        for name in self.names:
            try:
                getattr(self, name).update(**kwargs)
            except (TypeError, ValueError) as error:
                for variable, value in saved:
                    variable.value = value
                raise type(error)(f"MultiMetric.{name}: {error}") from None

    def compute(self) -> dict[str, Any]:
        """``{name: metric.compute()}``, in the order the metrics were given.

        (A dict returned from ``tl.jit`` or ``jax.jit`` comes back with its
        keys sorted: that is how jax rebuilds dicts.)
        """
        return {name: getattr(self, name).compute() for name in self.names}

    def reset(self) -> None:
        """Reset every metric."""
        for name in self.names:
            getattr(self, name).reset()
