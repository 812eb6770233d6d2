"""Variables: small mutable boxes that hold a model's state.

The type of a Variable is its collection: ``Param`` for trainable weights,
``BatchStat`` for running statistics, ``Cache`` for decoding caches,
``Intermediate`` for captured activations and ``RngState`` for random-number
streams. Filters select state by these types, and users add their own by
subclassing.

A Variable acts like the array it holds in arithmetic, indexing, comparisons
and ``jax.numpy`` functions, so layer code reads ``x @ self.kernel``. Reading
``v.value`` (or ``v[...]``) gives the array, assigning it changes the array in
place: every Module that refers to this Variable sees the change.

A Variable is also a pytree node with the value as its one child and its type
and metadata as static data, so raw ``jax`` transforms see straight through
it. Metadata (for instance the logical sharding names ``sharding=('embed',
'mlp')``) is kept by ``split``/``merge`` and by ``jax.tree.map``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import jax
import jax.core  # named: jax imports it, but pyright sees only what is imported
import jax.numpy as jnp
import numpy as np

# jax.extend.core re-exports this function from jax._src.core; importing
# jax.extend also imports Pallas (~0.1 s, a quarter of `import toylib`).
from jax._src.core import get_opaque_trace_state
from jax.tree_util import GetAttrKey

from toylib._core.watchers import changed

__all__ = [
    "BatchStat",
    "PLACEMENT",
    "checked_value",
    "placement_of",
    "spec_text",
    "unwrap",
    "Cache",
    "Intermediate",
    "Param",
    "RngState",
    "Variable",
]

UNHASHABLE_METADATA = """\
{cls}(..., {name}={value!r}): Variable metadata must be hashable, because it is
part of the pytree structure that keys jax.jit's cache. Got a {kind}.
Fix: pass a hashable value, e.g. a tuple instead of a list:

    tl.Param(w, {name}=tuple(...))
"""

OUTSIDE_TRACE = """\
{where}: this {cls} was created outside {transform}, which is tracing now (it
was closed over, not passed in), so a value set here would leak a traced value
out of the transform and the update would be lost.
Fix: pass the Module (or Variable) as an argument of the transformed function,
so that toylib carries the change back out:

    @tl.jit
    def step(model, x):          # not `def step(x)` using a global `model`
        return model(x)
"""

WRONG_VALUE = """\
{caller}: `{path}` holds {expected}, but the new value is {got}.
Nothing was changed. Fix: give a value of the same shape and dtype, e.g.

    {fix}
"""

_KEEP = object()


def unwrap(x: Any) -> Any:
    """The value of a Variable; anything else as it is."""
    return x._value if isinstance(x, Variable) else x


# The metadata in which tl.sharding records where it placed a Variable (a
# NamedSharding): tl.jit keeps new values there, tl.Optimizer places its state
# there, tl.load reads an abstract like's arrays there.
PLACEMENT = "placement"


def placement_of(x: Any) -> Any:
    """Where ``tl.sharding`` placed a Variable (a NamedSharding), or None."""
    return x._metadata.get(PLACEMENT) if isinstance(x, Variable) else None


class Variable:
    """A mutable box holding one array (or any value) and hashable metadata.

    Arguments:
        value: the array (or pytree) held.
        **metadata: hashable annotations kept alongside the value, e.g.
            ``sharding=('embed', 'mlp')``. Read them as attributes.

    Returns:
        A Variable; subclasses (``Param``, ``BatchStat``...) name the collection.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> count = tl.Variable(jnp.array(0))
        >>> count += 1              # updates count.value in place
        >>> int(count.value)
        1
        >>> w = tl.Param(jnp.ones((2, 3)), sharding=("embed", "mlp"))
        >>> (w.shape, w.sharding)
        ((2, 3), ('embed', 'mlp'))
    """

    # `_trace` is the JAX trace the Variable was created in: setting its value
    # from inside another trace is the closed-over-mutation error (OUTSIDE_TRACE).
    # `_toylib_watchers`: caches to tell when the metadata changes (watchers.py).
    __slots__ = ("__weakref__", "_metadata", "_toylib_watchers", "_trace", "_value")
    _toylib_node = True  # a node of the graph view (skeleton.is_graph_node)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _register(cls)

    def __init__(self, value: Any, **metadata: Any) -> None:
        for name, item in metadata.items():
            _check_metadata(type(self), name, item)
        if type(value) is list:  # tl.Param([1.0, 2.0]): the array, as jnp.asarray gives it
            value = jnp.asarray(value)
        object.__setattr__(self, "_value", unwrap(value))
        object.__setattr__(self, "_metadata", metadata)
        object.__setattr__(self, "_trace", get_opaque_trace_state())
        object.__setattr__(self, "_toylib_watchers", None)

    # -- value and metadata ------------------------------------------------

    @property
    def value(self) -> Any:
        """The held value; assigning it updates the Variable in place."""
        return self._value

    @value.setter
    def value(self, new: Any) -> None:
        if self._trace != get_opaque_trace_state():
            raise RuntimeError(_outside_trace(self))
        object.__setattr__(self, "_value", unwrap(new))

    @property
    def metadata(self) -> dict[str, Any]:
        """A copy of the metadata as a dict."""
        return dict(self._metadata)

    def get_value(self) -> Any:
        """The held value (NNX's accessor; the same as ``v.value``)."""
        return self._value

    def set_value(self, value: Any) -> None:
        """Set the held value in place (NNX's accessor; the same as ``v.value = value``)."""
        self.value = value

    def get_metadata(self, name: str | None = None, default: Any = _KEEP) -> Any:
        """All metadata as a dict, or the entry ``name`` (``default`` if absent and given).

        Example:
            >>> import jax.numpy as jnp, toylib as tl
            >>> w = tl.Param(jnp.ones(2), sharding=("embed",))
            >>> w.get_metadata(), w.get_metadata("sharding"), w.get_metadata("tag", None)
            ({'sharding': ('embed',)}, ('embed',), None)
        """
        if name is None:
            return dict(self._metadata)
        if name in self._metadata:
            return self._metadata[name]
        if default is not _KEEP:
            return default
        raise KeyError(
            f"{type(self).__name__} has no metadata {name!r} (it has: "
            f"{sorted(self._metadata) or 'none'}). Fix: set it with v.set_metadata({name}=...)."
        )

    def set_metadata(self, *args: Any, **metadata: Any) -> None:
        """Add or change metadata in place: ``v.set_metadata(tag="a")`` or ``("tag", "a")``.

        Metadata is structure (it keys the compilation cache), so this is a
        structural change: ``tl.jit`` functions that saw this Variable compile
        anew on their next call.

        Example:
            >>> import jax.numpy as jnp, toylib as tl
            >>> w = tl.Param(jnp.ones(2))
            >>> w.set_metadata(sharding=("embed",))
            >>> w.sharding
            ('embed',)
        """
        if args:
            if len(args) != 2 or metadata:
                raise TypeError(
                    "Variable.set_metadata takes (name, value) or keywords: "
                    "v.set_metadata('tag', 1) or v.set_metadata(tag=1)."
                )
            metadata = {args[0]: args[1]}
        for name, item in metadata.items():
            if name in Variable.__dict__ or name == "value":
                raise ValueError(
                    f"Variable.set_metadata: {name!r} is a Variable attribute, not a metadata "
                    "name. Fix: choose another name."
                )
            _check_metadata(type(self), name, item)
        self._metadata.update(metadata)
        changed(self)  # metadata is structure: it keys the jit cache

    def replace(self, value: Any = _KEEP, **metadata: Any) -> Variable:
        """A new Variable of the same type; the value and metadata given override.

        Example:
            >>> import jax.numpy as jnp, toylib as tl
            >>> tl.Param(jnp.zeros(2), tag="a").replace(jnp.ones(2)).tag
            'a'
        """
        new_value = self._value if value is _KEEP else unwrap(value)
        return new_variable(type(self), new_value, {**self._metadata, **metadata})

    def copy(self) -> Variable:
        """A new Variable of the same type, value and metadata."""
        return self.replace()

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: metadata first, then the
        # value's own attributes (shape, dtype, T, sum, ...).
        if name.startswith("__"):
            raise AttributeError(name)
        metadata = object.__getattribute__(self, "_metadata")
        if name in metadata:
            return metadata[name]
        return getattr(object.__getattribute__(self, "_value"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "value":
            Variable.value.__set__(self, value)
        elif name in Variable.__slots__:  # copy/pickle restore slots this way
            object.__setattr__(self, name, value)
        elif name in self._metadata:
            _check_metadata(type(self), name, value)
            self._metadata[name] = value
            changed(self)  # metadata is structure: it keys the jit cache
        else:
            raise AttributeError(
                f"{type(self).__name__} has no attribute {name!r}: set the value with "
                f"`v.value = ...` and add metadata with `v.replace(..., {name}=...)`."
            )

    # -- array protocol ------------------------------------------------------

    # `numpy_array @ variable` (or + - * ...): without this numpy computes the
    # op itself through __array__, which returns a numpy array eagerly and
    # fails on a traced value; jax.Array's own priority makes numpy defer to
    # the Variable's reflected operator instead, so the result is a jax Array.
    __array_priority__ = 100

    def __jax_array__(self) -> Any:
        return self._value

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self._value, dtype=dtype)

    def __getitem__(self, index: Any) -> Any:
        if index is Ellipsis:
            return self._value
        return self._value[index]

    def __setitem__(self, index: Any, new: Any) -> None:
        if index is Ellipsis:
            self.value = new
        elif isinstance(self._value, np.ndarray):
            updated = self._value.copy()
            updated[index] = unwrap(new)
            self.value = updated
        else:
            self.value = self._value.at[index].set(unwrap(new))

    def __len__(self) -> int:
        return len(self._value)

    def __iter__(self):
        return iter(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)

    def __int__(self) -> int:
        return int(self._value)

    def __float__(self) -> float:
        return float(self._value)

    def __index__(self) -> int:
        return operator.index(self._value)

    def __complex__(self) -> complex:
        return complex(self._value)

    def __reduce__(self) -> tuple:
        # Rebuilt (copy, deepcopy, pickle) in the trace where it is restored.
        return new_variable, (type(self), self._value, self._metadata)

    # Comparisons forward to the value (elementwise, like arrays), so a
    # Variable is hashed by identity, as Modules are.
    __hash__ = object.__hash__

    def __repr__(self) -> str:
        parts = [describe_value(self._value)]
        parts += [f"{k}={v!r}" for k, v in self._metadata.items()]
        return f"{type(self).__name__}({', '.join(parts)})"

    def __treescope_repr__(self, path: str | None, subtree_renderer: Any) -> Any:
        # treescope's protocol: toylib's handlers (and treescope) load on first use.
        from toylib import _treescope

        return _treescope.render_variable(self, path, subtree_renderer)


RAW_TRANSFORM = """\
{where}: this {cls} is being set inside a raw jax transform that is tracing now
(jax.jit, jax.experimental.checkify, jax.vmap...), but it was created outside
it: either the function closed over it, or the Module holding it was passed to
the raw transform, which cannot carry in-place updates (BatchNorm statistics,
Rngs counters) back out. The update would be lost.
Fix: use toylib's transform, which carries the change out, and pass the Module
as an argument: tl.jit, tl.checkify (for jax.experimental.checkify), tl.vmap,
tl.scan, tl.grad... e.g.

    err, out = tl.checkify(step)(model, x)     # not checkify.checkify(step)
"""


def _outside_trace(variable: Variable) -> str:
    from toylib._core import calls  # calls.py builds on the graph walker, which needs us

    path = calls.find_path(variable)
    where = path if path is not None else f"a {describe_value(variable._value)}"
    transform = calls.transform_name()
    if transform is None:
        return RAW_TRANSFORM.format(where=where, cls=type(variable).__name__)
    return OUTSIDE_TRACE.format(where=where, cls=type(variable).__name__, transform=transform)


def spec_text(x: Any) -> str:
    """``float32[3, 4]`` for an array (abstract or traced too), ``a str`` for anything else."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"{getattr(x.dtype, 'name', x.dtype)}[{', '.join(map(str, x.shape))}]"
    return f"a {type(x).__name__}"


def checked_value(old: Any, new: Any, path: str, caller: str) -> Any:
    """``new`` ready to replace ``old``: same kind, shape and dtype, or ``WRONG_VALUE``.

    A Python number replacing a 0-d array is converted to the array's dtype.
    A value that is not an array (a Python number, a pytree) accepts any value
    of the same pytree structure whose array leaves match.
    """
    new = unwrap(new)
    if hasattr(old, "shape") and hasattr(old, "dtype"):
        if old.shape == () and isinstance(new, bool | int | float | complex):
            array = np if isinstance(old, np.ndarray) else jnp
            return array.asarray(new, dtype=old.dtype)
        if hasattr(new, "shape") and hasattr(new, "dtype"):
            if tuple(new.shape) == tuple(old.shape) and new.dtype == old.dtype:
                return new
            fix = (
                f"x.reshape({tuple(old.shape)})"
                if new.dtype == old.dtype
                else (f"x.astype(jnp.{getattr(old.dtype, 'name', old.dtype)})")
            )
        else:
            fix = f"jnp.asarray(x, dtype=jnp.{getattr(old.dtype, 'name', old.dtype)})"
        raise ValueError(
            WRONG_VALUE.format(
                caller=caller,
                path=path,
                expected=spec_text(old),
                got=spec_text(new),
                fix=fix,
            )
        )
    old_leaves, old_def = jax.tree.flatten(old)
    new_leaves, new_def = jax.tree.flatten(new)
    if old_def != new_def:
        raise ValueError(
            WRONG_VALUE.format(
                caller=caller,
                path=path,
                expected=f"a value of structure {old_def}",
                got=f"of structure {new_def}",
                fix="a value of the same pytree structure",
            )
        )
    if old_def.num_leaves == 1 and old_def.num_nodes == 1:
        return new
    checked = [
        checked_value(o, n, path, caller) for o, n in zip(old_leaves, new_leaves, strict=True)
    ]
    return jax.tree.unflatten(old_def, checked)


def _check_metadata(cls: type, name: str, value: Any) -> None:
    try:
        hash(value)
    except TypeError:
        text = UNHASHABLE_METADATA.format(
            cls=cls.__name__, name=name, value=value, kind=type(value).__name__
        )
        raise TypeError(text) from None


def describe_value(value: Any) -> str:
    """A compact description of an array: ``float32[3, 4]``, small ones with values.

    Abstract arrays (``jax.ShapeDtypeStruct``) show dtype and shape only.
    """
    if isinstance(value, jax.core.Tracer):
        return f"{value.aval.str_short()} (traced)"
    if isinstance(value, jax.ShapeDtypeStruct):
        return f"{value.dtype.name}[{', '.join(map(str, value.shape))}]"
    if isinstance(value, jax.Array | np.ndarray):
        dtype = getattr(value.dtype, "name", str(value.dtype))
        shape = ", ".join(map(str, value.shape))
        text = f"{dtype}[{shape}]"
        if value.size == 1 and not jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
            text += f" = {np.asarray(value).item()!r}"
        return text
    return repr(value)


def _binary(op: Callable) -> Callable:
    def forward(self: Variable, other: Any) -> Any:
        return op(self._value, unwrap(other))

    return forward


def _reflected(op: Callable) -> Callable:
    def forward(self: Variable, other: Any) -> Any:
        return op(unwrap(other), self._value)

    return forward


def _inplace(op: Callable) -> Callable:
    def update(self: Variable, other: Any) -> Variable:
        self.value = op(self._value, unwrap(other))
        return self

    return update


def _unary(op: Callable) -> Callable:
    def forward(self: Variable) -> Any:
        return op(self._value)

    return forward


_BINARY = {
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "matmul": operator.matmul,
    "truediv": operator.truediv,
    "floordiv": operator.floordiv,
    "mod": operator.mod,
    "pow": operator.pow,
    "and": operator.and_,
    "or": operator.or_,
    "xor": operator.xor,
    "lshift": operator.lshift,
    "rshift": operator.rshift,
}
for _name, _op in _BINARY.items():
    setattr(Variable, f"__{_name}__", _binary(_op))
    setattr(Variable, f"__r{_name}__", _reflected(_op))
    setattr(Variable, f"__i{_name}__", _inplace(_op))
for _name in ("lt", "le", "eq", "ne", "gt", "ge"):
    setattr(Variable, f"__{_name}__", _binary(getattr(operator, _name)))
for _name, _op in {
    "neg": operator.neg,
    "pos": operator.pos,
    "abs": abs,
    "invert": operator.invert,
}.items():
    setattr(Variable, f"__{_name}__", _unary(_op))
Variable.__divmod__ = _binary(divmod)  # type: ignore[attr-defined]
Variable.__rdivmod__ = _reflected(divmod)  # type: ignore[attr-defined]


# -- pytree registration --------------------------------------------------------

_VALUE_KEY = GetAttrKey("value")


def _flatten(v: Variable) -> tuple[tuple[Any], tuple]:
    return (v._value,), tuple(v._metadata.items()) if v._metadata else ()


def _flatten_with_keys(v: Variable) -> tuple[tuple[tuple[Any, Any]], tuple]:
    return ((_VALUE_KEY, v._value),), tuple(v._metadata.items()) if v._metadata else ()


def new_variable(cls: type[Variable], value: Any, metadata: Any) -> Variable:
    """Make a ``cls`` holding ``value`` without checks (metadata already validated)."""
    new = object.__new__(cls)
    object.__setattr__(new, "_value", value)
    object.__setattr__(new, "_metadata", dict(metadata))
    object.__setattr__(new, "_trace", get_opaque_trace_state())
    object.__setattr__(new, "_toylib_watchers", None)
    return new


# Fast slot access for the transforms' hot path (no checks, no trace lookup).
get_value = operator.attrgetter("_value")
set_value = Variable._value.__set__  # type: ignore[attr-defined]


def _register(cls: type) -> None:
    def unflatten(metadata: tuple, children: Any) -> Variable:
        # No checks here: jax rebuilds nodes with tracers, None or sentinels.
        return new_variable(cls, children[0], metadata)

    jax.tree_util.register_pytree_with_keys(cls, _flatten_with_keys, unflatten, _flatten)


_register(Variable)


class Param(Variable):
    """A trainable parameter: the default ``wrt`` of gradients and optimisers.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> from toylib import nn
        >>> w = tl.Param(jnp.ones(2))
        >>> w, (w * 2).tolist()
        (Param(float32[2]), [2.0, 2.0])
        >>> sorted(tl.state(nn.Linear(2, 3, rngs=0), tl.Param).flat())
        [('bias',), ('kernel',)]
    """

    __slots__ = ()


class BatchStat(Variable):
    """A running statistic (BatchNorm's mean and variance): updated, not trained.

    Example:
        >>> import toylib as tl
        >>> from toylib import nn
        >>> sorted(tl.state(nn.BatchNorm(3), tl.BatchStat).flat())
        [('mean',), ('var',)]
    """

    __slots__ = ()


class Cache(Variable):
    """A decoding cache (attention keys and values).

    Example:
        >>> import toylib as tl
        >>> from toylib import nn
        >>> attn = nn.MultiHeadAttention(num_heads=1, in_features=4, rngs=0)
        >>> attn.init_cache((1, 8, 4))  # batch 1, up to 8 tokens
        >>> sorted(tl.state(attn, tl.Cache).flat())
        [('cache_index',), ('cached_key',), ('cached_value',)]
    """

    __slots__ = ()


class Intermediate(Variable):
    """A captured activation, typically removed afterwards with ``tl.pop``.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> class Net(tl.Module):
        ...     def __call__(self, x):
        ...         self.sow(tl.Intermediate, "hidden", x * 2)
        ...         return x + 1
        >>> net = Net()
        >>> _ = net(jnp.ones(2))
        >>> captured = tl.pop(net, tl.Intermediate)
        >>> captured["hidden"].value[0].tolist(), hasattr(net, "hidden")
        ([2.0, 2.0], False)
    """

    __slots__ = ()


class RngState(Variable):
    """The key or counter of a random-number stream (see ``tl.Rngs``).

    Example:
        >>> import toylib as tl
        >>> [(p, type(v).__name__) for p, v in tl.iter_variables(tl.Rngs(0))]
        [(('default', 'key'), 'RngState'), (('default', 'count'), 'RngState')]
    """

    __slots__ = ()
