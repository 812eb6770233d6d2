"""tl.sharding: logical axis names on Variables, placed on a device mesh by rules.

toylib adds no runtime for scale: placement is JAX's (``jax.sharding.Mesh``,
``NamedSharding``, the SPMD partitioner), and many hosts are
``jax.distributed``. What this module adds is the naming. A Variable carries
logical names for its dimensions as metadata (``sharding=("embed", "mlp")``,
set by every layer's ``*_sharding=`` arguments); *rules* map each name to a
mesh axis, a tuple of mesh axes, or None (replicated); so one model runs on
1, 8 or 2x4 devices by changing only the mesh and the rules.

* ``specs(model, rules)``: the ``PartitionSpec`` of every Variable.
* ``shard(model, mesh, rules)``: place a built model, in place.
* ``init(make, mesh, rules)``: build a model directly sharded (no device ever
  holds a full copy of a sharded Variable); ``abstract(make, mesh, rules)``:
  the same with nothing allocated, the ``like`` for ``tl.load``.
* ``use(mesh, rules)``: the defaults for the calls below it (and JAX's mesh).
* ``constrain(x, names)``: a sharding constraint inside ``tl.jit``.
* ``batch(local, names)``: a global array from each process's own rows.
* ``named(names)``: the ``NamedSharding`` of some names (for ``tl.jit``'s
  ``in_shardings``).

A placed Variable also records where it was placed (metadata ``placement``,
a ``NamedSharding``): ``tl.jit`` constrains its new value there, so a train
step keeps every Variable where it was (XLA's propagation alone may choose
otherwise, e.g. replicate a value computed from a reduction), and
``tl.Optimizer`` places its state with the Params it belongs to. Move a
placed Variable with ``shard`` (which updates the record), not with a bare
``jax.device_put``.

Meshes have automatic axes (``make_mesh`` here, or ``jax.make_mesh(...,
axis_types=(AxisType.Auto,) * n)``): toylib places the state and the inputs,
and XLA's SPMD partitioner shards everything in between (GSPMD, as in Flax
and MaxText). JAX's newer explicit axes (``jax.make_mesh``'s default) type
every intermediate value and make each matmul over a sharded dimension name
its output sharding, which toylib's layers do not do: such a mesh is refused
with that fix, never half supported.

Example:
    >>> import toylib as tl
    >>> from toylib import nn
    >>> mesh = tl.sharding.make_mesh((1, 1), ("data", "model"))
    >>> rules = {"embed": None, "mlp": "model"}
    >>> make = lambda: nn.Linear(4, 8, rngs=0)
    >>> model = tl.sharding.init(make, mesh, rules)
    >>> model.kernel.value.sharding.spec  # no names on this Linear: replicated
    P()
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import jax
import jax.core  # named: jax imports it, but pyright sees only what is imported
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from toylib._core.graph import flatten, update
from toylib._core.paths import Path, format_path
from toylib._core.state import State
from toylib._core.variables import PLACEMENT, Variable, placement_of, unwrap
from toylib.transforms.control import eval_shape

__all__ = [
    "Rules",
    "abstract",
    "batch",
    "constrain",
    "init",
    "make_mesh",
    "named",
    "shard",
    "specs",
    "use",
]

M = TypeVar("M")

Rules = Mapping[str, "str | tuple[str, ...] | None"]
"""Logical name -> a mesh axis, a tuple of mesh axes (split over their product), or None.

Example:
    >>> import toylib as tl
    >>> rules: tl.sharding.Rules = {"batch": "data", "mlp": ("data", "model"), "embed": None}
    >>> tl.sharding.named(("batch", "mlp"), tl.sharding.make_mesh((1, 1), ("data", "model")),
    ...                   {"batch": None, "mlp": ("data", "model")}).spec
    P(None, ('data', 'model'))
"""


UNMAPPED = """\
{where}: the logical name {name!r} (names {names}) has no rule.
The rules map: {known}.
Fix: add a rule for it, e.g. `rules = {{..., {name!r}: None}}` (None replicates
that dimension; a mesh axis name or a tuple of them shards it).
"""

NO_MESH_AXIS = """\
{where}: the rule {name!r} -> {axes!r} names the mesh axis {axis!r}, but the mesh
has axes {mesh_axes} (sizes {sizes}).
Fix: map {name!r} to one of the mesh's axes, or to None to replicate it.
"""

INDIVISIBLE = """\
{where}: dimension {dim} (size {size}, name {name!r}, names {names}) is sharded
over mesh axes {axes} of total size {parts}, which does not divide {size}.
Nothing was placed. Fix: make the dimension a multiple of {parts}, or map
{name!r} to another mesh axis (or None) in the rules.
"""

RANK = """\
{where}: the sharding names {names} give {n} dimensions, but the value has shape
{shape} ({ndim} dimensions).
Fix: give one name (or None) per dimension, e.g. sharding={fix}.
"""

AXIS_TWICE = """\
{where}: the mesh axis {axis!r} would shard two dimensions (names {names} under
the rules give {spec}); an axis can split only one dimension of an array.
Fix: map one of the names to another mesh axis, or to None.
"""

NO_MESH = """\
{caller}: no mesh given and none in use.
Fix: pass one, or set the defaults for a block of code:

    mesh = tl.sharding.make_mesh((2, 4), ("data", "model"))
    with tl.sharding.use(mesh, rules):
        ...
"""

EXPLICIT_AXES = """\
{caller}: the mesh has explicit axes ({axes}), JAX's default for jax.make_mesh.
Explicit axes make every matmul over a sharded dimension name its output
sharding, which toylib's layers do not do; toylib shards with automatic axes
(XLA's partitioner fills in the intermediate values).
Fix: make the mesh with automatic axes:

    mesh = tl.sharding.make_mesh((2, 4), ("data", "model"))
    # or: jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
"""

NOT_A_MESH = """\
{caller}: `mesh` must be a jax.sharding.Mesh, got {got}.
Fix: make one, e.g. `tl.sharding.make_mesh((2, 4), ("data", "model"))`.
"""

BAD_RULES = """\
{caller}: `rules` must map logical names (str) to a mesh axis (str), a tuple of
mesh axes, or None; got {got}.
Fix: e.g. `rules = {{"batch": "data", "mlp": "model", "embed": None}}`.
"""

INIT_CHANGED = """\
tl.sharding.init: `make` built a different model the second time (under jax.jit)
than the first (under tl.eval_shape), so the shardings computed for the first
cannot be applied:
{details}
Fix: make `make` deterministic: the same structure on every call (take seeds
from its arguments or a tl.Rngs made inside, not from a global counter).
"""

# (mesh, rules) set by `use`; per thread and per async task.
_DEFAULTS: contextvars.ContextVar[tuple[Mesh | None, dict] | None] = contextvars.ContextVar(
    "toylib.sharding", default=None
)


# -- resolving names ----------------------------------------------------------------------


def _defaults(mesh: Mesh | None, rules: Rules | None, caller: str) -> tuple[Mesh | None, dict]:
    """The mesh and rules to use: the arguments, else those of ``use``."""
    current = _DEFAULTS.get()
    if mesh is None and current is not None:
        mesh = current[0]
    if rules is None:
        rules = current[1] if current is not None else {}
    if mesh is not None:
        _check_mesh(mesh, caller)
    return mesh, _checked_rules(rules, caller)


def _check_mesh(mesh: Any, caller: str) -> None:
    if not isinstance(mesh, Mesh):
        raise TypeError(NOT_A_MESH.format(caller=caller, got=_kind(mesh)))
    explicit = [
        n for n, t in zip(mesh.axis_names, mesh.axis_types, strict=True) if t != AxisType.Auto
    ]
    if explicit:
        raise ValueError(EXPLICIT_AXES.format(caller=caller, axes=", ".join(map(repr, explicit))))


def _checked_rules(rules: Any, caller: str) -> dict:
    if not isinstance(rules, Mapping):
        raise TypeError(BAD_RULES.format(caller=caller, got=_kind(rules)))
    for name, axes in rules.items():
        ok_axes = axes is None or isinstance(axes, str)
        ok_axes = ok_axes or (isinstance(axes, tuple) and all(isinstance(a, str) for a in axes))
        if not isinstance(name, str) or not ok_axes:
            raise TypeError(BAD_RULES.format(caller=caller, got=f"{name!r}: {axes!r}"))
    return dict(rules)


def _kind(x: Any) -> str:
    return f"{type(x).__name__} {x!r}" if isinstance(x, str | int | float) else type(x).__name__


def resolve(
    names: Sequence[str | None] | None,
    shape: tuple[int, ...] | None,
    rules: Mapping,
    mesh: Mesh | None,
    where: str,
) -> PartitionSpec:
    """The PartitionSpec of ``names`` under ``rules``, checked against ``mesh`` and ``shape``.

    No names: replicated (``PartitionSpec()``). Every check happens here,
    before anything is placed, so a bad rule never leaves a model half moved.
    """
    if names is None:
        return PartitionSpec()
    names = tuple(names)
    if shape is not None and len(names) != len(shape):
        fix = tuple(names[: len(shape)]) + (None,) * max(0, len(shape) - len(names))
        raise ValueError(
            RANK.format(
                where=where, names=names, n=len(names), shape=shape, ndim=len(shape), fix=fix
            )
        )
    entries: list[Any] = []
    used: set[str] = set()
    for dim, name in enumerate(names):
        if name is None:
            entries.append(None)
            continue
        if name not in rules:
            known = ", ".join(f"{k!r} -> {v!r}" for k, v in rules.items()) or "nothing"
            raise ValueError(UNMAPPED.format(where=where, name=name, names=names, known=known))
        axes = rules[name]
        if axes is None or axes == ():
            entries.append(None)
            continue
        group = (axes,) if isinstance(axes, str) else tuple(axes)
        if mesh is not None:
            for axis in group:
                if axis not in mesh.shape:
                    raise ValueError(
                        NO_MESH_AXIS.format(
                            where=where,
                            name=name,
                            axes=axes,
                            axis=axis,
                            mesh_axes=tuple(mesh.axis_names),
                            sizes=tuple(mesh.shape.values()),
                        )
                    )
            parts = math.prod(mesh.shape[a] for a in group)
            if shape is not None and shape[dim] % parts:
                raise ValueError(
                    INDIVISIBLE.format(
                        where=where,
                        dim=dim,
                        size=shape[dim],
                        name=name,
                        names=names,
                        axes=group,
                        parts=parts,
                    )
                )
        for axis in group:
            if axis in used:
                spec = tuple(rules.get(n) if n is not None else None for n in names)
                raise ValueError(AXIS_TWICE.format(where=where, axis=axis, names=names, spec=spec))
            used.add(axis)
        entries.append(axes if isinstance(axes, str) else group)
    return PartitionSpec(*entries)


def _names(leaf: Any) -> tuple | None:
    return leaf.get_metadata("sharding", None) if isinstance(leaf, Variable) else None


def shape_of(value: Any) -> tuple[int, ...] | None:
    """The shape names describe: the array's, or that of a pytree's one array (a NamedArray)."""
    shape = getattr(value, "shape", None)
    if shape is None:
        leaves = jax.tree.leaves(value)
        shape = getattr(leaves[0], "shape", None) if len(leaves) == 1 else None
    return tuple(shape) if shape is not None else None


def _resolved(model: Any, mesh: Mesh | None, rules: dict) -> list[tuple[Path, Any, PartitionSpec]]:
    """``(path, leaf, spec)`` for every Variable and bare array of ``model``, checked."""
    _, leaves = flatten(model)
    return [
        (path, leaf, resolve(_names(leaf), shape_of(unwrap(leaf)), rules, mesh, format_path(path)))
        for path, leaf in leaves
    ]


# -- public API ---------------------------------------------------------------------------


def make_mesh(
    shape: Sequence[int], names: Sequence[str], *, devices: Sequence[Any] | None = None
) -> Mesh:
    """A device mesh with automatic axes, the kind toylib shards on (``jax.make_mesh``).

    Arguments:
        shape: devices along each axis, e.g. ``(2, 4)``; their product is the
            number of devices used.
        names: one name per axis, e.g. ``("data", "model")``.
        devices: which devices (default: all of them, every process's).

    Returns:
        A ``jax.sharding.Mesh`` whose axes are all ``AxisType.Auto``.

    Example:
        >>> import toylib as tl
        >>> mesh = tl.sharding.make_mesh((1,), ("data",))
        >>> dict(mesh.shape), mesh.axis_types
        ({'data': 1}, (Auto,))
    """
    auto = (AxisType.Auto,) * len(shape)
    return jax.make_mesh(tuple(shape), tuple(names), axis_types=auto, devices=devices)


def specs(model: Any, rules: Rules | None = None, mesh: Mesh | None = None) -> State:
    """The ``PartitionSpec`` of every Variable (and bare array) of ``model``, as a State.

    Paths are those of ``tl.state(model)``. A Variable without ``sharding``
    names is replicated (``PartitionSpec()``). With a mesh (given, or from
    ``use``), mesh axes and divisibility are checked too.

    Arguments:
        model: a Module (or anything ``tl.state`` takes), concrete or abstract.
        rules: logical name -> mesh axis, tuple of mesh axes, or None.
            Default: those of ``use``.
        mesh: checks axis names and sizes when given (default: that of ``use``).

    Returns:
        A State with a ``jax.sharding.PartitionSpec`` per Variable.

    Example:
        >>> import toylib as tl
        >>> from toylib import nn
        >>> lin = nn.Linear(4, 8, rngs=0)
        >>> lin.kernel.set_metadata(sharding=("embed", "mlp"))
        >>> tl.sharding.specs(lin, {"embed": None, "mlp": "model"}).flat()
        {('kernel',): P(None, 'model'), ('bias',): P()}
    """
    mesh, rules = _defaults(mesh, rules, "tl.sharding.specs")
    return State.from_flat((path, spec) for path, _, spec in _resolved(model, mesh, rules))


def named(
    names: Sequence[str | None] | None, mesh: Mesh | None = None, rules: Rules | None = None
) -> NamedSharding:
    """The ``NamedSharding`` that logical ``names`` map to (e.g. for ``tl.jit``'s in_shardings).

    Example:
        >>> import jax, toylib as tl
        >>> mesh = tl.sharding.make_mesh((1,), ("data",))
        >>> tl.sharding.named(("batch", None), mesh, {"batch": "data"}).spec
        P('data', None)
    """
    mesh, rules = _defaults(mesh, rules, "tl.sharding.named")
    if mesh is None:
        raise ValueError(NO_MESH.format(caller="tl.sharding.named"))
    return NamedSharding(mesh, resolve(names, None, rules, mesh, f"names {names}"))


def place(value: Any, sharding: NamedSharding) -> Any:
    """``value`` on ``sharding``; in many processes, each process builds its own shards.

    A value every process holds whole (the same seed, the same code) is cut
    into the shards of each process's own devices: no transfer between
    hosts (``jax.device_put`` cannot move one process's array onto another
    process's devices). Random keys are placed through their key data.
    """
    if isinstance(value, jax.core.Tracer):  # built inside a transform (tl.eval_shape)
        return jax.lax.with_sharding_constraint(value, sharding)
    if isinstance(value, jax.Array) and value.sharding == sharding:
        return value
    if isinstance(value, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)
    if not hasattr(value, "shape"):
        if jax.tree.leaves(value) == [value]:  # a Python number
            return jax.device_put(value, sharding)
        # A pytree (a NamedArray): each of its arrays placed.
        return jax.tree.map(lambda leaf: place(leaf, sharding), value)
    if jax.process_count() == 1 or (
        isinstance(value, jax.Array) and not value.is_fully_addressable
    ):
        return jax.device_put(value, sharding)
    if jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
        data = place(jax.random.key_data(value), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(value))
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _record(leaf: Any, sharding: NamedSharding) -> None:
    if placement_of(leaf) != sharding:
        leaf.set_metadata(**{PLACEMENT: sharding})


def shard(model: M, mesh: Mesh | None = None, rules: Rules | None = None) -> M:
    """Place every Variable of ``model`` on ``mesh`` by its names, in place.

    Each Variable goes to ``NamedSharding(mesh, spec)`` (replicated over the
    mesh when it has no names) and records it (metadata ``placement``) so that
    ``tl.jit`` keeps it there. Every name, rule and size is checked before
    anything moves: an error leaves the model as it was. In many processes,
    each process must hold the same full values (built with the same seed);
    to build a large model without a full copy anywhere, use ``init``.

    Arguments:
        model: the Module to place.
        mesh: the device mesh (default: that of ``use``).
        rules: logical name -> mesh axis / axes / None (default: those of ``use``).

    Returns:
        ``model`` itself.

    Example:
        >>> import jax, toylib as tl
        >>> from toylib import nn
        >>> mesh = tl.sharding.make_mesh((1,), ("model",))
        >>> lin = nn.Linear(4, 8, rngs=0)
        >>> lin.kernel.set_metadata(sharding=("embed", "mlp"))
        >>> _ = tl.sharding.shard(lin, mesh, {"embed": None, "mlp": "model"})
        >>> lin.kernel.value.sharding.spec
        P(None, 'model')
    """
    mesh, rules = _defaults(mesh, rules, "tl.sharding.shard")
    if mesh is None:
        raise ValueError(NO_MESH.format(caller="tl.sharding.shard"))
    resolved = _resolved(model, mesh, rules)  # every check first: nothing moved yet
    shardings = [NamedSharding(mesh, spec) for _, _, spec in resolved]
    values = [place(unwrap(leaf), s) for (_, leaf, _), s in zip(resolved, shardings, strict=True)]
    _fill(model, resolved, values, shardings)
    return model


def init(make: Callable[[], M], mesh: Mesh | None = None, rules: Rules | None = None) -> M:
    """Build ``make()`` directly sharded: abstract first, then one compiled constructor.

    ``make`` runs twice: under ``tl.eval_shape`` (nothing allocated) to learn
    every Variable's shape and names, then under ``jax.jit`` with
    ``out_shardings``, so each device computes only its own shards of the
    random initial values and no device ever holds a full copy of a sharded
    Variable. Each Variable records its placement, as with ``shard``. In many
    processes, every process calls ``init`` with the same ``make``.

    Arguments:
        make: builds the model, e.g. ``lambda: GPT(cfg, rngs=tl.Rngs(0))``;
            it must build the same structure each time.
        mesh: the device mesh (default: that of ``use``).
        rules: logical name -> mesh axis / axes / None (default: those of ``use``).

    Returns:
        The model, every Variable placed.

    Example:
        >>> import jax, toylib as tl
        >>> from toylib import nn
        >>> mesh = tl.sharding.make_mesh((1,), ("model",))
        >>> model = tl.sharding.init(lambda: nn.Linear(4, 8, rngs=0), mesh, {})
        >>> dict(model.kernel.value.sharding.mesh.shape)
        {'model': 1}
    """
    abstract, resolved, shardings = _planned(make, mesh, rules, "tl.sharding.init")
    graphdef = flatten(abstract)[0]
    seen: list[Any] = []

    def build() -> list[Any]:
        built = flatten(make())
        seen.append(built[0])
        return [unwrap(leaf) for _, leaf in built[1]]

    values = jax.jit(build, out_shardings=shardings)()
    if seen[0] != graphdef:
        details = _graph_difference(graphdef, seen[0])
        raise ValueError(INIT_CHANGED.format(details=details))
    _fill(abstract, resolved, values, shardings)
    return abstract


def abstract(make: Callable[[], M], mesh: Mesh | None = None, rules: Rules | None = None) -> M:
    """``make()`` with nothing allocated: ``ShapeDtypeStruct`` values carrying their shardings.

    The ``like`` to restore a checkpoint into a sharded model (``tl.load``
    reads each array straight into its shard on each device), or to look at
    a model too big to build. Each Variable records its placement, as with
    ``init``; a plain ``tl.eval_shape`` has the names but no placement, so a
    checkpoint loaded into it would land on one device.

    Arguments:
        make: builds the model (it is traced, never run on devices).
        mesh, rules: as for ``init`` (default: those of ``use``).

    Returns:
        The abstract model.

    Example:
        >>> import toylib as tl
        >>> from toylib import nn
        >>> mesh = tl.sharding.make_mesh((1,), ("model",))
        >>> like = tl.sharding.abstract(lambda: nn.Linear(4, 8, rngs=0), mesh, {})
        >>> like.kernel.value.shape, like.kernel.value.sharding.spec
        ((4, 8), P())
    """
    like, resolved, shardings = _planned(make, mesh, rules, "tl.sharding.abstract")
    values = [
        jax.ShapeDtypeStruct(unwrap(leaf).shape, unwrap(leaf).dtype, sharding=sharding)
        for (_, leaf, _), sharding in zip(resolved, shardings, strict=True)
    ]
    _fill(like, resolved, values, shardings)
    return like


def _planned(make: Callable[[], M], mesh: Mesh | None, rules: Rules | None, caller: str) -> tuple:
    """``make`` traced abstractly, and every leaf's checked sharding."""
    mesh, rules = _defaults(mesh, rules, caller)
    if mesh is None:
        raise ValueError(NO_MESH.format(caller=caller))
    model = eval_shape(make)
    resolved = _resolved(model, mesh, rules)
    return model, resolved, [NamedSharding(mesh, spec) for _, _, spec in resolved]


def _fill(model: Any, resolved: list, values: list, shardings: list) -> None:
    """Set each leaf of ``model`` to its new value, recording Variables' placements."""
    bare = {}
    for (path, leaf, _), value, sharding in zip(resolved, values, shardings, strict=True):
        if isinstance(leaf, Variable):
            leaf.value = value
            _record(leaf, sharding)
        else:
            bare[path] = value
    if bare:
        update(model, State.from_flat(bare))


def _graph_difference(a: Any, b: Any) -> str:
    pa, pb = set(a.leaf_paths), set(b.leaf_paths)
    lines = [f"  only the first has {format_path(p)}" for p in sorted(pa - pb, key=str)[:3]]
    lines += [f"  only the second has {format_path(p)}" for p in sorted(pb - pa, key=str)[:3]]
    return "\n".join(lines) or "  the same paths, but other static attributes or metadata"


@contextlib.contextmanager
def use(mesh: Mesh, rules: Rules | None = None) -> Iterator[Mesh]:
    """Set the default mesh and rules for ``specs``/``shard``/``init``/``constrain``/``batch``.

    Also enters JAX's own mesh context (``jax.set_mesh``), so bare
    ``PartitionSpec``s work below it too. Per thread: another thread does not
    see this thread's defaults. The defaults are read when a function is
    traced: JAX traces anew under another mesh, but a ``tl.jit`` function
    traced under other rules with the same mesh keeps those (pass ``rules=``
    explicitly where they vary).

    Arguments:
        mesh: the device mesh.
        rules: logical name -> mesh axis / axes / None.

    Returns:
        A context manager yielding the mesh.

    Example:
        >>> import jax, jax.numpy as jnp, toylib as tl
        >>> mesh = tl.sharding.make_mesh((1,), ("data",))
        >>> with tl.sharding.use(mesh, {"batch": "data"}):
        ...     x = tl.sharding.constrain(jnp.ones((4, 2)), ("batch", None))
        >>> x.sharding.spec
        P('data', None)
    """
    _check_mesh(mesh, "tl.sharding.use")
    token = _DEFAULTS.set((mesh, _checked_rules(rules or {}, "tl.sharding.use")))
    try:
        with jax.set_mesh(mesh):
            yield mesh
    finally:
        _DEFAULTS.reset(token)


def constrain(
    x: Any,
    names: Sequence[str | None] | None,
    *,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
) -> Any:
    """Constrain ``x`` to the sharding its logical ``names`` map to (inside ``tl.jit``).

    ``jax.lax.with_sharding_constraint``; outside a trace the array is
    moved there. Without a mesh (none given, none in ``use``) this is the
    identity, so layer code can call it and still run on one device.

    Arguments:
        x: an array (or a Variable: its value).
        names: one logical name (or None) per dimension of ``x``.
        mesh, rules: default: those of ``use``.

    Returns:
        ``x``, constrained.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> tl.sharding.constrain(jnp.ones(3), ("batch",)).shape  # no mesh: unchanged
        (3,)
    """
    mesh, rules = _defaults(mesh, rules, "tl.sharding.constrain")
    x = unwrap(x)
    if mesh is None:
        return x
    spec = resolve(names, shape_of(x), rules, mesh, f"tl.sharding.constrain(names={names})")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch(
    local: Any,
    names: Sequence[str | None],
    *,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
) -> jax.Array:
    """A global array from each process's own rows (``jax.make_array_from_process_local_data``).

    In one process this is ``jax.device_put`` to the sharding of ``names``.
    In many, each process passes the rows it loaded (the same number in
    each); the global array stacks them in process order along the sharded
    dimension(s).

    Arguments:
        local: this process's rows (a numpy or jax array).
        names: one logical name (or None) per dimension, e.g. ``("batch", None)``.
        mesh, rules: default: those of ``use``.

    Returns:
        The global ``jax.Array``, sharded as ``names`` say.

    Example:
        >>> import jax, numpy as np, toylib as tl
        >>> mesh = tl.sharding.make_mesh((1,), ("data",))
        >>> xs = tl.sharding.batch(np.ones((8, 3)), ("batch", None), mesh=mesh,
        ...                        rules={"batch": "data"})
        >>> xs.shape, xs.sharding.spec
        ((8, 3), P('data', None))
    """
    mesh, rules = _defaults(mesh, rules, "tl.sharding.batch")
    if mesh is None:
        raise ValueError(NO_MESH.format(caller="tl.sharding.batch"))
    one = jax.process_count() == 1
    # In one process the rows are the whole array, so its sizes are checked
    # here (toylib's message); in many they are one part, which JAX checks.
    where = f"tl.sharding.batch(names={tuple(names)})"
    sharding = NamedSharding(
        mesh, resolve(names, shape_of(local) if one else None, rules, mesh, where)
    )
    if one:
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, np.asarray(local))
