"""tl.nx: named axes, as Penzai has them.

A ``NamedArray`` is one array whose axes are either *positional* (reached by
position, as in any array) or *named* (reached by name only, in no order).
Functions written for positional arrays (``jnp.dot``, ``jax.nn.softmax``)
act on the positional axes; ``nmap(fn)`` runs them once for every index of
every named axis (with ``jax.vmap``), so the named axes never need to be
tracked by hand.

* ``wrap(array)`` makes every axis positional; ``x.tag("batch", "features")``
  names them (one name per positional axis, in order); ``x.untag("features")``
  makes named axes positional again, in the order given; ``x.unwrap()`` gives
  the array back once no axis is named (``x.unwrap("batch")`` untags first).
* ``nmap(fn)(*args)``: the named axes of all NamedArray arguments (at any
  depth of the argument pytrees) are lined up by name; an argument lacking
  a name is broadcast along it; ``fn`` sees plain arrays of the positional
  shapes; every array it returns comes back as a NamedArray with all the
  names. Arguments that are not NamedArrays are passed as they are.
* Arithmetic between NamedArrays (``x + y``, ``x * 2``, ``x < y``, ``x[0]``)
  is ``nmap`` of the operator: aligned by name, numpy broadcasting on the
  positional axes. ``sum(x, "batch")`` (also ``mean``, ``max``, ``min``)
  reduces named axes away.
* A NamedArray is a pytree: the array is its one child, the names are static
  (aux data), so ``jax.jit``/``grad``/``vmap``, toylib's transforms, optax and
  checkpoints see one array. The array's layout is
  ``(*positional, *named)``: ``vmap`` over axis 0 maps a positional axis and
  stacking (``vmap`` construction, ``nn.Stack``) adds a positional one.

Errors: a name used twice, one name with two sizes, and untagging a name the
array does not have each raise a ``ValueError`` saying which name and how to
fix it. See docs/named_axes.md for the rules.

Example:
    >>> import jax.numpy as jnp, toylib as tl
    >>> x = tl.nx.wrap(jnp.ones((4, 3))).tag("batch", "features")
    >>> w = tl.nx.wrap(jnp.arange(3.0)).tag("features")
    >>> y = tl.nx.nmap(jnp.dot)(x.untag("features"), w.untag("features"))
    >>> y
    NamedArray(float32[batch:4])
    >>> y.unwrap("batch").tolist()
    [3.0, 3.0, 3.0, 3.0]
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import GetAttrKey

from toylib._core.variables import Variable, unwrap

__all__ = ["NamedArray", "is_named", "max", "mean", "min", "nmap", "sum", "wrap"]

NOT_A_NAME = """\
tl.nx: axis names are strings, got {name!r} (a {kind}) in {call}.
Fix: name the axis with a string, e.g. x.tag("batch", "features").
"""

NAME_TWICE = """\
tl.nx: the axis name {name!r} is used twice in {call}: {why}.
A name stands for one axis. Fix: pick another name for one of them, e.g. rename an
axis first with x.untag({name!r}).tag({name!r} + "_2").
"""

TAG_COUNT = """\
tl.nx: {call} gives {n} name(s), but the array has {m} positional axes
(positional shape {shape}): tag names every positional axis, in order.
Fix: give exactly {m} names, e.g. x.tag({example}).
"""

NOT_THERE = """\
tl.nx: {call}: the array has no named axis {name!r}; its named axes are {named}.
Fix: use one of those names, or tag the axis first: x.tag(...).
"""

UNTAG_POSITIONAL = """\
tl.nx: {call} on an array that still has positional axes (positional shape {shape}):
the new positional axes would have no defined place among them.
Fix: name the positional axes first, x.tag(...).untag(...), or work on them inside
tl.nx.nmap(fn).
"""

STILL_NAMED = """\
tl.nx: unwrap() on an array with named axes {named}: an array has positional axes only.
Fix: say the order they take, x.unwrap({example}), or reduce them away first
(tl.nx.sum(x, ...)).
"""

SIZE_MISMATCH = """\
tl.nx.nmap: the axis {name!r} has size {size} in {first} but {other_size} in {other}.
An axis name stands for one axis, so every argument that has it must agree on its size.
Fix: give the axes different names, or slice one argument to size {size}.
"""

LOST_AXIS = """\
tl.nx: a NamedArray with names {names} holds an array of shape {shape}, which has
fewer axes than names: a transform (jax.vmap or tl.vmap with in_axes=0) mapped over
one of its named axes and the array lost it.
Fix: map named axes with tl.nx.nmap, or untag the axis before vmapping over it
(x.untag("batch") gives it position 0).
"""


def _check_name(name: Any, call: str) -> str:
    if not isinstance(name, str):
        raise TypeError(NOT_A_NAME.format(name=name, kind=type(name).__name__, call=call))
    return name


def _call_text(method: str, names: Iterable[Any]) -> str:
    return f"{method}({', '.join(map(repr, names))})"


def _binary(op: Callable[[Any, Any], Any]) -> Callable[[NamedArray, Any], NamedArray]:
    def forward(self: NamedArray, other: Any) -> NamedArray:
        return nmap(op)(self, other)

    return forward


def _reflected(op: Callable[[Any, Any], Any]) -> Callable[[NamedArray, Any], NamedArray]:
    def backward(self: NamedArray, other: Any) -> NamedArray:
        return nmap(op)(other, self)

    return backward


def _unary(op: Callable[[Any], Any]) -> Callable[[NamedArray], NamedArray]:
    def forward(self: NamedArray) -> NamedArray:
        return nmap(op)(self)

    return forward


class NamedArray:
    """An array with positional and named axes (Penzai's ``NamedArray``).

    Build one with ``tl.nx.wrap(array).tag(...)`` rather than the
    constructor. The array's layout is ``(*positional, *named)``: its last
    ``len(names)`` axes are the named ones, in the order of ``names``, which
    is storage detail (operations align axes by name, never by that order).

    Arguments:
        array: the data (anything ``jnp.asarray`` takes).
        names: the names of the array's last ``len(names)`` axes.

    Returns:
        A NamedArray; a pytree with ``array`` as its child and ``names`` static.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> x = tl.nx.NamedArray(jnp.zeros((2, 4, 3)), ("batch", "features"))
        >>> x.positional_shape, x.named_shape
        ((2,), {'batch': 4, 'features': 3})
    """

    __slots__ = ("array", "names")
    array: Any
    names: tuple[str, ...]

    def __init__(self, array: Any, names: Iterable[str] = ()) -> None:
        names = tuple(names)
        call = f"NamedArray(..., names={names!r})"
        for i, name in enumerate(names):
            if _check_name(name, call) in names[:i]:
                raise ValueError(NAME_TWICE.format(name=name, call=call, why="given twice"))
        array = array if isinstance(array, jax.Array | np.ndarray) else jnp.asarray(array)
        if array.ndim < len(names):
            raise ValueError(LOST_AXIS.format(names=names, shape=array.shape))
        object.__setattr__(self, "array", array)
        object.__setattr__(self, "names", names)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(
            f"NamedArray is immutable: build a new one (tl.nx.NamedArray(array, names)), "
            f"not x.{name} = ..."
        )

    # -- shapes ------------------------------------------------------------------------

    def _split(self) -> int:
        """How many positional axes the array has (checked against the names)."""
        ndim = len(self.array.shape)
        if ndim < len(self.names):
            raise ValueError(LOST_AXIS.format(names=self.names, shape=tuple(self.array.shape)))
        return ndim - len(self.names)

    @property
    def positional_shape(self) -> tuple[int, ...]:
        """The sizes of the positional axes, in order."""
        return tuple(self.array.shape[: self._split()])

    @property
    def named_shape(self) -> dict[str, int]:
        """``{name: size}`` for the named axes."""
        k = self._split()
        return dict(zip(self.names, self.array.shape[k:], strict=True))

    @property
    def dtype(self) -> Any:
        """The array's dtype."""
        return self.array.dtype

    # -- naming ------------------------------------------------------------------------

    def tag(self, *names: str) -> NamedArray:
        """Name the positional axes, one name each, in order.

        Arguments:
            *names: one new name per positional axis.

        Returns:
            A NamedArray with no positional axes.

        Example:
            >>> import jax.numpy as jnp, toylib as tl
            >>> tl.nx.wrap(jnp.zeros((4, 3))).tag("batch", "features")
            NamedArray(float32[batch:4, features:3])
        """
        call = _call_text("tag", names)
        shape = self.positional_shape
        if len(names) != len(shape):
            example = ", ".join(f'"axis{i}"' for i in range(len(shape)))
            raise ValueError(
                TAG_COUNT.format(
                    call=call, n=len(names), m=len(shape), shape=shape, example=example
                )
            )
        for i, name in enumerate(names):
            _check_name(name, call)
            if name in names[:i]:
                raise ValueError(NAME_TWICE.format(name=name, call=call, why="given twice"))
            if name in self.names:
                why = f"the array already has a named axis {name!r}"
                raise ValueError(NAME_TWICE.format(name=name, call=call, why=why))
        # Layout (*positional, *named): the positional axes, now named, move
        # after the named ones, so the names read in the order they were given.
        array = self.array
        if self.names:
            k = len(shape)
            array = jnp.moveaxis(array, tuple(range(k)), tuple(range(-k, 0)))
        return NamedArray(array, self.names + names)

    def untag(self, *names: str) -> NamedArray:
        """Make named axes positional, in the order given.

        The array must have no positional axes (the new ones would have no
        defined place among them): tag first, or work inside ``nmap``.
        ``untag()`` with no names returns the array as it is.

        Arguments:
            *names: named axes of the array.

        Returns:
            A NamedArray whose positional axes are ``names``, in that order.

        Example:
            >>> import jax.numpy as jnp, toylib as tl
            >>> x = tl.nx.wrap(jnp.zeros((4, 3))).tag("batch", "features")
            >>> x.untag("features").positional_shape
            (3,)
        """
        if not names:
            return self
        call = _call_text("untag", names)
        shape = self.positional_shape
        for i, name in enumerate(names):
            _check_name(name, call)
            if name in names[:i]:
                raise ValueError(NAME_TWICE.format(name=name, call=call, why="given twice"))
            if name not in self.names:
                raise ValueError(NOT_THERE.format(call=call, name=name, named=self.named_shape))
        if shape:
            raise ValueError(UNTAG_POSITIONAL.format(call=call, shape=shape))
        rest = tuple(n for n in self.names if n not in names)
        order = [self.names.index(n) for n in (*names, *rest)]
        array = self.array if order == sorted(order) else jnp.transpose(self.array, order)
        return NamedArray(array, rest)

    def unwrap(self, *names: str) -> jax.Array:
        """The array, once no axis is named; ``unwrap(*names)`` is ``untag(*names).unwrap()``.

        Arguments:
            *names: named axes to untag first, in the order they take.

        Returns:
            The positional array.

        Example:
            >>> import jax.numpy as jnp, toylib as tl
            >>> x = tl.nx.wrap(jnp.zeros((4, 3))).tag("batch", "features")
            >>> x.unwrap("features", "batch").shape
            (3, 4)
        """
        x = self.untag(*names) if names else self
        if x.names:
            example = ", ".join(map(repr, x.names))
            raise ValueError(STILL_NAMED.format(named=x.named_shape, example=example))
        return x.array

    def astype(self, dtype: Any) -> NamedArray:
        """The same axes with the array cast to ``dtype``.

        Example:
            >>> import jax.numpy as jnp, toylib as tl
            >>> tl.nx.wrap(jnp.zeros(3)).tag("a").astype(jnp.int32)
            NamedArray(int32[a:3])
        """
        return NamedArray(self.array.astype(dtype), self.names)

    # -- display -----------------------------------------------------------------------

    def describe(self) -> str:
        """``float32[3 | batch:4, features:8]``: dtype, positional shape, then named axes.

        Example:
            >>> import jax.numpy as jnp, toylib as tl
            >>> tl.nx.wrap(jnp.zeros((4, 3))).tag("batch", "features").untag("batch").describe()
            'float32[4 | features:3]'
        """
        array = self.array
        if not (hasattr(array, "shape") and hasattr(array, "dtype")):
            return repr(array)  # a leaf replaced by jax.tree.map (a mask, a sentinel)
        dtype = getattr(array.dtype, "name", str(array.dtype))
        if len(array.shape) < len(self.names):
            return f"{dtype}{list(array.shape)} (names {self.names} do not fit)"
        positional = ", ".join(map(str, self.positional_shape))
        named = ", ".join(f"{n}:{s}" for n, s in self.named_shape.items())
        inside = " | ".join(p for p in (positional, named) if p) if named else positional
        return f"{dtype}[{inside}]"

    def __repr__(self) -> str:
        return f"NamedArray({self.describe()})"

    def __treescope_repr__(self, path: str | None, subtree_renderer: Any) -> Any:
        from toylib import _treescope  # imports treescope: only when something is drawn

        return _treescope.render_named_array(self, path, subtree_renderer)

    def __treescope_ndarray_adapter__(self) -> Any:
        from toylib import _treescope

        return _treescope.NamedArrayAdapter()

    # -- operators: nmap of the positional operator ------------------------------------

    def __getitem__(self, index: Any) -> NamedArray:
        return nmap(lambda a: a[index])(self)

    __add__, __radd__ = _binary(operator.add), _reflected(operator.add)
    __sub__, __rsub__ = _binary(operator.sub), _reflected(operator.sub)
    __mul__, __rmul__ = _binary(operator.mul), _reflected(operator.mul)
    __truediv__, __rtruediv__ = _binary(operator.truediv), _reflected(operator.truediv)
    __floordiv__, __rfloordiv__ = _binary(operator.floordiv), _reflected(operator.floordiv)
    __mod__, __rmod__ = _binary(operator.mod), _reflected(operator.mod)
    __pow__, __rpow__ = _binary(operator.pow), _reflected(operator.pow)
    __matmul__, __rmatmul__ = _binary(operator.matmul), _reflected(operator.matmul)
    __and__, __rand__ = _binary(operator.and_), _reflected(operator.and_)
    __or__, __ror__ = _binary(operator.or_), _reflected(operator.or_)
    __xor__, __rxor__ = _binary(operator.xor), _reflected(operator.xor)
    __lt__, __le__ = _binary(operator.lt), _binary(operator.le)
    __gt__, __ge__ = _binary(operator.gt), _binary(operator.ge)
    __neg__, __pos__ = _unary(operator.neg), _unary(operator.pos)
    __abs__, __invert__ = _unary(operator.abs), _unary(operator.invert)

    __hash__ = object.__hash__  # identity, as for arrays (== is not overloaded)


_ARRAY_KEY = GetAttrKey("array")
jax.tree_util.register_pytree_with_keys(
    NamedArray,
    lambda x: (((_ARRAY_KEY, x.array),), x.names),
    # Rebuilt without checks: jax.tree.map may put anything in place of the
    # array (a bool mask, None, a sentinel); the names are checked when used.
    lambda names, children: _rebuilt(*children, names=names),
    flatten_func=lambda x: ((x.array,), x.names),
)


def _rebuilt(array: Any, names: tuple[str, ...]) -> NamedArray:
    new = object.__new__(NamedArray)
    object.__setattr__(new, "array", array)
    object.__setattr__(new, "names", names)
    return new


def is_named(x: Any) -> bool:
    """Whether ``x`` is a NamedArray.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> tl.nx.is_named(tl.nx.wrap(jnp.ones(2))), tl.nx.is_named(jnp.ones(2))
        (True, False)
    """
    return isinstance(x, NamedArray)


def wrap(array: Any, *names: str) -> NamedArray:
    """A NamedArray with every axis positional; ``wrap(array, *names)`` also tags them.

    Arguments:
        array: an array (or anything ``jnp.asarray`` takes, or a Variable).
        *names: if given, one name per axis (``wrap(a).tag(*names)``).

    Returns:
        A NamedArray.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> tl.nx.wrap(jnp.ones((2, 3)))
        NamedArray(float32[2, 3])
        >>> tl.nx.wrap(jnp.ones((2, 3)), "rows", "cols").named_shape
        {'rows': 2, 'cols': 3}
    """
    array = unwrap(array)
    x = array if isinstance(array, NamedArray) else NamedArray(array)
    return x.tag(*names) if names else x


def nmap(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Vectorise ``fn`` over every named axis of its NamedArray arguments.

    ``nmap(fn)(*args, **kwargs)`` finds the NamedArrays in the arguments (at
    any depth, also inside Variables), lines their named axes up by name
    (each name must have one size) and calls ``fn`` under one ``jax.vmap``
    per name, an argument without that name being broadcast along it. ``fn``
    sees the positional arrays; each array it returns comes back as a
    NamedArray named with every name of the inputs. Other arguments reach
    ``fn`` unchanged.

    Arguments:
        fn: a function of positional arrays.

    Returns:
        The vectorised function.

    Example:
        >>> import jax, jax.numpy as jnp, toylib as tl
        >>> logits = tl.nx.wrap(jnp.zeros((2, 5))).tag("batch", "classes")
        >>> probs = tl.nx.nmap(jax.nn.softmax)(logits.untag("classes")).tag("classes")
        >>> probs.named_shape
        {'batch': 2, 'classes': 5}
        >>> bias = tl.nx.wrap(jnp.ones(5)).tag("classes")   # no batch axis: broadcast
        >>> (logits + bias).unwrap("batch", "classes").shape
        (2, 5)
    """

    def mapped(*args: Any, **kwargs: Any) -> Any:
        with_paths, treedef = jax.tree_util.tree_flatten_with_path(
            (args, kwargs), is_leaf=lambda x: isinstance(x, Variable | NamedArray)
        )
        # A Variable holding a NamedArray counts as the NamedArray; any other
        # leaf (a Variable of a plain array too) reaches `fn` as it is.
        leaves = [_named_value(leaf) for _, leaf in with_paths]
        named = [
            (path, leaf)
            for (path, _), leaf in zip(with_paths, leaves, strict=True)
            if isinstance(leaf, NamedArray)
        ]
        order, sizes, where = [], {}, {}
        for path, x in named:
            for name, size in x.named_shape.items():
                if name not in sizes:
                    order.append(name)
                    sizes[name], where[name] = size, path
                elif sizes[name] != size:
                    raise ValueError(
                        SIZE_MISMATCH.format(
                            name=name,
                            size=sizes[name],
                            first=_argument(where[name]),
                            other_size=size,
                            other=_argument(path),
                        )
                    )
        # Each argument's named axes to the front, in `order`: every vmap
        # level then maps axis 0 of the arguments that have its name.
        data = []
        for _, x in named:
            k = len(x.positional_shape)
            front = [k + x.names.index(n) for n in order if n in x.names]
            permutation = [*front, *range(k)]
            moved = permutation != list(range(len(permutation)))
            data.append(jnp.transpose(x.array, permutation) if moved else x.array)

        def call(*arrays: Any) -> Any:
            given = iter(arrays)
            new = [next(given) if isinstance(leaf, NamedArray) else leaf for leaf in leaves]
            inner_args, inner_kwargs = jax.tree.unflatten(treedef, new)
            return fn(*inner_args, **inner_kwargs)

        f = call
        for level in reversed(range(len(order))):
            name = order[level]
            in_axes = tuple(0 if name in x.names else None for _, x in named)
            # Each output axis lands before the inner levels' ones: the
            # output's layout is (*positional, *order).
            f = jax.vmap(f, in_axes=in_axes, out_axes=level - len(order))
        out = f(*data)
        names = tuple(order)
        return jax.tree.map(lambda y: NamedArray(y, names), out)

    return mapped


def _named_value(leaf: Any) -> Any:
    if isinstance(leaf, Variable) and isinstance(leaf.value, NamedArray):
        return leaf.value
    return leaf


def _argument(path: tuple[Any, ...]) -> str:
    """``args[0]``, ``kwargs['mask']``, ``args[1][2]``: where a NamedArray was passed."""
    head = "args" if path[0].idx == 0 else "kwargs"
    return head + jax.tree_util.keystr(tuple(path[1:]))


def _reducer(op: Callable[..., Any], label: str) -> Callable[..., NamedArray]:
    def reduce(x: NamedArray, *names: str) -> NamedArray:
        call = f"tl.nx.{label}(x, {', '.join(map(repr, names))})"
        x = wrap(x)
        k = len(x.positional_shape)
        for i, name in enumerate(names):
            _check_name(name, call)
            if name in names[:i]:
                raise ValueError(NAME_TWICE.format(name=name, call=call, why="given twice"))
            if name not in x.names:
                raise ValueError(NOT_THERE.format(call=call, name=name, named=x.named_shape))
        axes = tuple(k + x.names.index(n) for n in names)
        rest = tuple(n for n in x.names if n not in names)
        return NamedArray(op(x.array, axis=axes), rest)

    reduce.__name__ = reduce.__qualname__ = label
    return reduce


def sum(x: NamedArray, *names: str) -> NamedArray:
    """Sum over the named axes ``names``, which disappear.

    Arguments:
        x: a NamedArray.
        *names: named axes of ``x``.

    Returns:
        A NamedArray without those axes.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> x = tl.nx.wrap(jnp.ones((4, 3))).tag("batch", "features")
        >>> tl.nx.sum(x, "batch")
        NamedArray(float32[features:3])
    """
    return _sum(x, *names)


def mean(x: NamedArray, *names: str) -> NamedArray:
    """Mean over the named axes ``names``, which disappear.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> x = tl.nx.wrap(jnp.arange(6.0).reshape(2, 3)).tag("a", "b")
        >>> tl.nx.mean(x, "a", "b").unwrap().tolist()
        2.5
    """
    return _mean(x, *names)


def max(x: NamedArray, *names: str) -> NamedArray:
    """Maximum over the named axes ``names``, which disappear.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> x = tl.nx.wrap(jnp.arange(6.0).reshape(2, 3)).tag("a", "b")
        >>> tl.nx.max(x, "b").unwrap("a").tolist()
        [2.0, 5.0]
    """
    return _max(x, *names)


def min(x: NamedArray, *names: str) -> NamedArray:
    """Minimum over the named axes ``names``, which disappear.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> x = tl.nx.wrap(jnp.arange(6.0).reshape(2, 3)).tag("a", "b")
        >>> tl.nx.min(x, "a").unwrap("b").tolist()
        [0.0, 1.0, 2.0]
    """
    return _min(x, *names)


_sum, _mean, _max, _min = (
    _reducer(jnp.sum, "sum"),
    _reducer(jnp.mean, "mean"),
    _reducer(jnp.max, "max"),
    _reducer(jnp.min, "min"),
)
