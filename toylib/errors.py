"""Runtime checks: ``tl.error_if``, ``tl.branched_error_if`` and ``tl.checkify``.

``tl.error_if(x, pred, msg)`` returns ``x`` and raises ``tl.RuntimeCheckError``
carrying ``msg`` when ``pred`` holds anywhere, eagerly or inside ``tl.jit``,
``tl.vmap``, ``tl.scan``, ``tl.grad`` and the control-flow transforms, on CPU
and on accelerators. The check is a host callback in the taken branch of a
``lax.cond`` on ``any(pred)``, tied to the returned ``x`` by a data
dependence: **use the value error_if returns** (as with ``eqx.error_if``), or
XLA may drop the check with the unused value. In the happy path no callback
runs and ``tl.jit`` keeps its fast dispatch; under ``tl.vmap`` the predicate
is batched, so the callback runs on every call (once for the whole batch).

What a failed step leaves (the async dispatch rule): the error is raised
when the computation runs. On CPU that is during the call, so ``tl.jit``
raises before writing anything back, and the model and optimizer hold the
values from before the step. On an accelerator the call may return first
(asynchronous dispatch); the Variables it wrote then hold the failed
step's outputs, which are *poisoned*: every later use of them (the next
step, ``float(loss)``, a checkpoint) raises the same error again, so nothing
continues silently from bad state. To keep a model you can resume from,
block on the step's output (``jax.block_until_ready(loss)``) before
``tl.clone``-ing or saving it.

Production: set ``TOYLIB_ON_ERROR=nan`` to turn failed checks into NaNs in
the floating-point leaves of ``x`` (no callback at all), or ``nothing`` to
drop the checks; ``raise`` is the default. ``tl.errors.on_error(mode)``
overrides it for one block, per thread. The mode is read when a function is
traced, so ``tl.jit`` functions compiled before a change keep their mode.

Under ``tl.checkify`` the checks are functional instead: they become
``jax.experimental.checkify`` errors, returned as values.

Example:
    >>> import jax.numpy as jnp, toylib as tl
    >>> @tl.jit
    ... def safe_log(x):
    ...     x = tl.error_if(x, x <= 0, "log of a non-positive number")
    ...     return jnp.log(x)
    >>> safe_log(jnp.ones(2)).tolist()
    [0.0, 0.0]
    >>> safe_log(jnp.zeros(2))
    Traceback (most recent call last):
    toylib.errors.RuntimeCheckError: log of a non-positive number
    ...
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from toylib._core import calls
from toylib._core.variables import unwrap
from toylib.transforms.lifting import (
    Transform,
    call_inside,
    flatten_call,
    flatten_result,
    named,
    unflatten_call,
    write_back,
)

__all__ = [
    "ON_ERROR_ENV",
    "Checkified",
    "RuntimeCheckError",
    "branched_error_if",
    "checkify",
    "error_if",
    "on_error",
    "reraise",
]

ON_ERROR_ENV = "TOYLIB_ON_ERROR"
"""The environment variable setting the on-error mode: ``raise`` (default), ``nan`` or ``nothing``.

Read when a check is traced; ``tl.errors.on_error(mode)`` overrides it in one thread.

Example:
    >>> import os, toylib as tl
    >>> tl.errors.ON_ERROR_ENV
    'TOYLIB_ON_ERROR'
    >>> os.environ.get(tl.errors.ON_ERROR_ENV, "raise") in ("raise", "nan", "nothing")
    True
"""
_MODES = ("raise", "nan", "nothing")

NOT_BOOLEAN = """\
{caller}{where}: the predicate must be a boolean array (true where the error
is), got {got}.
Fix: compare to make it boolean, e.g. `tl.error_if(x, x < 0, "negative")` or
`tl.error_if(x, jnp.isnan(x), "NaN")`; for a count use `count > 0`.
"""

BAD_MODE = """\
{where}: the on-error mode must be one of {modes}, got {mode!r}.
Fix: e.g. `TOYLIB_ON_ERROR=nan` (NaNs instead of errors) or `nothing` (no checks).
"""

BAD_MESSAGES = """\
tl.branched_error_if: msgs must be a non-empty sequence of strings (one per
value of index), got {got}.
Fix: e.g. `tl.branched_error_if(x, pred, index, ("too small", "too large"))`.
"""

# How the message travels through XLA's error text: between these markers.
_START, _IN, _END = "<<toylib.error_if>>", "<<in>>", "<</toylib.error_if>>"
_FOUND = re.compile(re.escape(_START) + "(.*?)" + re.escape(_END), re.DOTALL)

# Equinox's checks (eqx.error_if) report through the same channel with their own text.
_EQUINOX = re.compile(r"_EquinoxRuntimeError: (.*?)(?:\n\n\n-{20}|\Z)", re.DOTALL)

_mode: ContextVar[str | None] = ContextVar("toylib_on_error", default=None)


class RuntimeCheckError(RuntimeError):
    """A ``tl.error_if`` check failed: ``str(error)`` is the message given to it.

    ``error.where`` says where the check was written (the Module and the
    transform running when it was traced).

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> try:
        ...     tl.error_if(jnp.array([1.0, -1.0]), jnp.array([False, True]), "negative")
        ... except tl.RuntimeCheckError as error:
        ...     print(error)
        negative
          (tl.error_if)
    """

    def __init__(self, message: str, where: str = "") -> None:
        super().__init__(message + (f"\n  ({where})" if where else ""))
        self.message, self.where = message, where


class _Failure(Exception):
    """Raised in the host callback; its text is what XLA reports (see ``reraise``)."""


class _DropDuplicateLog(logging.Filter):
    """jax logs a failing debug callback before raising it; toylib's error says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        info = record.exc_info
        return not (info and isinstance(info[1], _Failure))


for _logger in ("jax._src.debugging", "jax._src.callback"):
    logging.getLogger(_logger).addFilter(_DropDuplicateLog())


def current_mode() -> str:
    """``raise``, ``nan`` or ``nothing``: ``on_error`` if set, else ``$TOYLIB_ON_ERROR``."""
    mode = _mode.get() or os.environ.get(ON_ERROR_ENV, "raise")
    if mode not in _MODES:
        raise ValueError(BAD_MODE.format(where=f"${ON_ERROR_ENV}", modes=_MODES, mode=mode))
    return mode


def on_error(mode: str) -> contextlib.AbstractContextManager[None]:
    """Within the block (this thread only), failed checks ``raise``, give ``nan`` or do ``nothing``.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> with tl.errors.on_error("nan"):
        ...     y = tl.error_if(jnp.ones(2), jnp.array([True, False]), "bad")
        >>> y.tolist()
        [nan, nan]
    """
    if mode not in _MODES:
        raise ValueError(BAD_MODE.format(where="tl.errors.on_error", modes=_MODES, mode=mode))
    return calls.scoped(_mode, mode)


def error_if(x: Any, pred: Any, msg: str) -> Any:
    """Return ``x``; raise ``tl.RuntimeCheckError(msg)`` if ``pred`` is true anywhere.

    Works eagerly and inside every toylib transform (see the module docstring
    for what a failed step leaves, and for ``TOYLIB_ON_ERROR``).

    Arguments:
        x: an array or pytree of arrays, returned (as NaNs in ``nan`` mode).
        pred: a boolean array (or Python bool): where the error is.
        msg: the error message.

    Returns:
        ``x``.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> tl.error_if(jnp.ones(2), jnp.array([False, False]), "never").tolist()
        [1.0, 1.0]
        >>> tl.error_if(jnp.ones(2), jnp.array([False, True]), "second is bad")
        Traceback (most recent call last):
        toylib.errors.RuntimeCheckError: second is bad
        ...
    """
    return branched_error_if(x, pred, 0, (msg,), _caller="tl.error_if")


def branched_error_if(
    x: Any, pred: Any, index: Any, msgs: Sequence[str], *, _caller: str = "tl.branched_error_if"
) -> Any:
    """``error_if`` with one of several messages: ``msgs[index]`` (``index`` may be traced).

    Arguments:
        x: an array or pytree of arrays, returned.
        pred: a boolean array: where the error is.
        index: an integer (array) choosing the message, broadcast with ``pred``.
        msgs: the messages.

    Returns:
        ``x``.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> x = jnp.array([5.0])
        >>> tl.branched_error_if(x, x > 1, jnp.where(x > 3, 1, 0), ("large", "huge"))
        Traceback (most recent call last):
        toylib.errors.RuntimeCheckError: huge
        ...
    """
    if isinstance(msgs, str) or not msgs or not all(isinstance(m, str) for m in msgs):
        raise TypeError(BAD_MESSAGES.format(got=repr(msgs)[:80]))
    where = _where()
    pred = _boolean(pred, _caller, where)
    index = jnp.broadcast_to(jnp.asarray(unwrap(index), jnp.int32), pred.shape)
    mode = current_mode()
    if mode == "nothing":
        return x
    if (calls.transform_name() or "").startswith("tl.checkify("):  # directly under it
        from jax.experimental import checkify as jax_checkify

        for i, msg in enumerate(msgs):
            jax_checkify.check(~jnp.any(pred & (index == i)), msg)
        return x
    flag = jnp.any(pred)
    if mode == "nan":
        return jax.tree.map(lambda leaf: _nan_where(flag, leaf), x)
    report = _Reporter(tuple(msgs), where, pred.ndim)
    try:
        return _checked(x, flag, pred, index, report)
    except Exception as error:  # eager (also tl.grad, tl.vmap): jax wraps the failure
        reraise(error)
        raise


def _checked(x: Any, flag: Any, pred: Any, index: Any, report: _Reporter) -> Any:
    """``x``, tied to a host callback that runs (and raises) when ``flag`` is true.

    The callback sits in the taken branch of a ``lax.cond`` and returns a zero
    that is added to ``x``'s leaves there: a data dependence, so the check
    runs whenever the returned ``x`` is used, and a pure one, so ``jax.jit``
    keeps its fast C++ dispatch (an effect such as ``jax.debug.callback``
    would cost a slow Python dispatch on every call). If nothing of ``x`` can
    carry the dependence (no numeric array), the check is an effect instead.
    """
    leaves, treedef = jax.tree.flatten(x)
    tied = [i for i, leaf in enumerate(leaves) if _tieable(leaf)]
    if not tied:
        jax.lax.cond(flag, lambda: jax.debug.callback(report.effect, pred, index), lambda: None)
        return x
    token = jax.ShapeDtypeStruct((), jnp.float32)

    def failing(values: list) -> list:
        zero = jax.pure_callback(report, token, pred, index, vmap_method="broadcast_all")
        return [_add(v, zero) for v in values]

    values = jax.lax.cond(flag, failing, lambda v: v, [jnp.asarray(leaves[i]) for i in tied])
    for i, value in zip(tied, values, strict=True):
        leaves[i] = value
    return jax.tree.unflatten(treedef, leaves)


def _tieable(leaf: Any) -> bool:
    """A leaf that can carry the check's data dependence: a number or numeric array."""
    if isinstance(leaf, bool | int | float | complex):
        return True
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and (
        jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_)
    )


def _add(value: Any, zero: Any) -> Any:
    if value.dtype == jnp.bool_:
        return value | zero.astype(jnp.bool_)
    return value + zero.astype(value.dtype)


def _nan_where(flag: Any, leaf: Any) -> Any:
    leaf = unwrap(leaf)
    if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact):
        return jnp.where(flag, jnp.nan, leaf)
    return leaf


def _boolean(pred: Any, caller: str, where: str) -> jax.Array:
    pred = unwrap(pred)
    if isinstance(pred, bool | np.bool_):
        return jnp.asarray(pred)
    dtype = getattr(pred, "dtype", None)
    if dtype is None or dtype != jnp.bool_:
        got = f"{dtype} array" if dtype is not None else f"a {type(pred).__name__}"
        at = f" ({where})" if where else ""
        raise TypeError(NOT_BOOLEAN.format(caller=caller, where=at, got=got))
    return jnp.asarray(pred)


def _where() -> str:
    """``in model.layers[1] (BatchNorm), inside tl.jit(step)``: known at trace time."""
    parts = []
    running = calls.running()
    if running:
        parts.append(f"in {calls.module_path(running[-1])}")
    name = calls.transform_name()
    if name:
        parts.append(f"inside {name}")
    return ", ".join(parts)


class _Reporter:
    """The host callback: raises for the examples whose predicate holds."""

    def __init__(self, msgs: tuple[str, ...], where: str, ndim: int) -> None:
        self.msgs, self.where, self.ndim = msgs, where, ndim

    def effect(self, pred: Any, index: Any) -> None:
        """The check as an effect (``jax.debug.callback``): the zeros are dropped."""
        self(pred, index)

    def __call__(self, pred: Any, index: Any) -> np.ndarray:
        pred, index = np.asarray(pred), np.asarray(index)
        if not pred.any():  # one zero per vmapped example (the leading batch axes)
            return np.zeros(pred.shape[: pred.ndim - self.ndim], np.float32)
        i = int(index[pred].flat[0]) if pred.ndim else int(index)
        msg = self.msgs[min(max(i, 0), len(self.msgs) - 1)]
        where = f"tl.error_if {self.where}".strip()
        raise _Failure(f"{_START}{msg}{_IN}{where}{_END}")


def reraise(error: BaseException) -> None:
    """Raise ``RuntimeCheckError`` if ``error`` (from jax) carries a failed check; else return.

    The transforms call it on ``jax.errors.JaxRuntimeError``; the original
    error stays attached as ``__cause__``.

    Example:
        >>> import toylib as tl
        >>> try:
        ...     raise ValueError("not a check")
        ... except ValueError as error:
        ...     tl.errors.reraise(error)  # returns: the caller re-raises its own error
        ...     print("not converted:", error)
        not converted: not a check
    """
    if isinstance(error, RuntimeCheckError):
        return
    text = str(error)
    found = _FOUND.search(text)
    if found is not None:
        msg, _, where = found.group(1).partition(_IN)
        raise RuntimeCheckError(msg, where) from None
    found = _EQUINOX.search(text)
    if found is not None:  # eqx.error_if under tl.jit: its message, not XLA's wrapping
        raise RuntimeCheckError(found.group(1).strip(), "eqx.error_if") from None


# -- tl.checkify -------------------------------------------------------------------


def checkify(fn: Callable | None = None, *, errors: Any = None) -> Any:
    """``jax.experimental.checkify`` for functions of Modules: ``(error, out)``, state carried.

    Raw ``checkify`` cannot carry a Module's in-place updates (BatchNorm
    statistics, Rngs counters) out of its trace; this one does, as
    ``tl.jit`` does. ``checkify.check`` calls and ``tl.error_if`` checks made
    directly under it become functional errors: ``error.get()`` is the
    message or ``None``, ``error.throw()`` raises. Nothing is raised by the
    call itself, so the state it wrote back is that of the step as it ran.

    Arguments:
        fn: the function.
        errors: which errors to check (``checkify.user_checks`` by default;
            e.g. ``checkify.all_checks`` adds NaN, index and division checks).

    Returns:
        A function returning ``(error, out)``.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> from toylib import nn
        >>> bn = nn.BatchNorm(2)
        >>> def step(m, x):
        ...     y = m(x)
        ...     return tl.error_if(y, jnp.isnan(y), "NaN in the output")
        >>> err, y = tl.checkify(step)(bn, jnp.ones((4, 2)))
        >>> err.get() is None, bool(bn.mean.value[0] > 0)   # the statistics were updated
        (True, True)
    """
    if fn is None:
        return lambda f: checkify(f, errors=errors)
    from jax.experimental import checkify as jax_checkify  # only when used: it costs an import

    return Checkified(fn, jax_checkify.user_checks if errors is None else errors)


class Checkified(Transform):
    """The callable ``tl.checkify`` returns. See ``checkify``.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> checked = tl.checkify(lambda x: tl.error_if(x, x < 0, "negative"))
        >>> type(checked).__name__, checked
        ('Checkified', <tl.checkify(<lambda>)>)
        >>> err, out = checked(jnp.array(-1.0))
        >>> print(err.get())
        negative...
    """

    kind = "tl.checkify"

    def __init__(self, fn: Callable, errors: Any) -> None:
        super().__init__(fn)
        self._errors = errors

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        flat = flatten_call(args, kwargs, self.label)
        specs: list = []

        def pure(values: list) -> list:
            inner_args, inner_kwargs, tops, inside = unflatten_call(flat.layout, flat.paths, values)
            out = call_inside(self.label, self._fn, inner_args, inner_kwargs)
            spec, returned, _ = flatten_result(
                flat.layout, flat.position, tops, out, inside, values
            )
            specs.append(spec)
            return returned

        from jax.experimental import checkify as jax_checkify

        checked = jax_checkify.checkify(named(pure, self._fn), errors=self._errors)
        err, returned = checked(list(flat.values))
        return err, write_back(specs[-1], flat, returned)
