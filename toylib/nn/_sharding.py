"""Logical sharding names on layers' Variables: the ``*_sharding=`` arguments.

Every layer with weights takes, for each of its Variables, a tuple of
logical axis names, one per dimension (a str, or None for a dimension that
is never sharded): ``nn.Linear(64, 256, kernel_sharding=("embed", "mlp"))``.
They are stored as the Variable's ``sharding`` metadata, which
``tl.sharding`` maps to mesh axes with rules. The default, None, stores no
metadata at all: the Variable is replicated, and the model's structure is
what it was before names existed.

The names are checked when the layer is built, against the Variable's
actual shape, so a wrong count is one error naming the layer and the
argument rather than a mismatch found later by ``tl.sharding``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from toylib._core.variables import Param, Variable
from toylib.sharding import shape_of

__all__ = ["Names", "check_names", "named_variable"]

Names = Sequence[str | None] | None
"""What a ``*_sharding=`` argument takes: one name (str or None) per dimension, or None."""

SHARDING_NOT_NAMES = """\
{layer}({argument}={names!r}): expected a tuple of logical axis names, one per dimension of
`{variable}` (shape {shape}): each a str, or None for a dimension that is not sharded. Got
{got}.
Fix: e.g. `{argument}={example}` (one entry per dimension; None means not sharded).
"""

SHARDING_WRONG_LENGTH = """\
{layer}({argument}={names!r}): `{variable}` has shape {shape} ({ndim} dimension{s}),
so it takes {ndim} logical name{s}, one per dimension; got {n}.
Fix: give one name (a str, or None) per dimension, e.g. `{argument}={example}`.
"""


def check_names(
    names: Any, shape: Sequence[int], *, layer: Any, variable: str, argument: str | None = None
) -> tuple[str | None, ...] | None:
    """``names`` checked against a Variable's ``shape``: a tuple (a list is converted), or None.

    Arguments:
        names: what the user passed (None: no names).
        shape: the Variable's shape.
        layer: the layer (or its class name), for the message: ``Linear``.
        variable: the Variable's attribute, for the message: ``kernel``.
        argument: the keyword, for the message (default ``{variable}_sharding``).

    Returns:
        The names as a tuple, or None.

    Example:
        >>> check_names(["embed", None], (4, 8), layer="Linear", variable="kernel")
        ('embed', None)
        >>> check_names(("embed",), (4, 8), layer="Linear", variable="kernel")
        Traceback (most recent call last):
        ValueError: Linear(kernel_sharding=('embed',)): `kernel` has shape (4, 8) (2 dimensions),
        so it takes 2 logical names, one per dimension; got 1.
        Fix: give one name (a str, or None) per dimension, e.g. `kernel_sharding=('embed', None)`.
        <BLANKLINE>
    """
    if names is None:
        return None
    shape = tuple(int(n) for n in shape)
    ndim = len(shape)
    fields = dict(
        layer=layer if isinstance(layer, str) else type(layer).__name__,
        argument=f"{variable}_sharding" if argument is None else argument,
        names=names,
        variable=variable,
        shape=shape,
    )
    if isinstance(names, str) or not isinstance(names, list | tuple):
        # A bare string is the usual slip: ("embed") is "embed", not a 1-tuple.
        got = (
            f"the str {names!r} (a one-name tuple needs a comma: ({names!r},))"
            if isinstance(names, str)
            else f"a {type(names).__name__}"
        )
        example = _example((names,) if isinstance(names, str) else (), ndim)
        raise TypeError(SHARDING_NOT_NAMES.format(**fields, got=got, example=example))
    names = tuple(names)
    bad = [n for n in names if not (n is None or isinstance(n, str))]
    if bad:
        got = f"{bad[0]!r}, a {type(bad[0]).__name__}"
        clean = tuple(n if n is None or isinstance(n, str) else None for n in names)
        raise TypeError(SHARDING_NOT_NAMES.format(**fields, got=got, example=_example(clean, ndim)))
    if len(names) != ndim:
        s = "" if ndim == 1 else "s"
        example = _example(names, ndim)
        raise ValueError(
            SHARDING_WRONG_LENGTH.format(**fields, ndim=ndim, s=s, n=len(names), example=example)
        )
    return names


def _example(names: tuple, ndim: int) -> str:
    """``names`` cut or padded with None to ``ndim`` entries, written as Python."""
    return repr((tuple(names[:ndim]) + (None,) * ndim)[:ndim])


def named_variable(
    layer: Any,
    variable: str,
    value: Any,
    names: Any,
    *,
    kind: type[Variable] = Param,
    argument: str | None = None,
) -> Any:
    """A ``kind`` (default ``Param``) holding ``value``, with ``sharding`` metadata if named.

    Without names the Variable has no ``sharding`` metadata at all (replicated).
    ``layer``, ``variable`` and ``argument`` name the place in messages, as in
    ``check_names``.

    Example:
        >>> import jax.numpy as jnp
        >>> w = named_variable("Linear", "kernel", jnp.ones((2, 3)), ("embed", "mlp"))
        >>> w.sharding, named_variable("Linear", "bias", jnp.ones(3), None).metadata
        (('embed', 'mlp'), {})
    """
    # The shape names describe: the array's, or a NamedArray's stored array's.
    checked = check_names(
        names, shape_of(value) or (), layer=layer, variable=variable, argument=argument
    )
    return kind(value) if checked is None else kind(value, sharding=checked)
