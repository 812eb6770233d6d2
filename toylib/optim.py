"""tl.Optimizer: an optax optimiser whose state lives in Variables.

optax sees the parameters as a ``tl.State``: the one ``tl.state(model, wrt)``
returns (Variables of the parameters' types, bare array attributes as plain
arrays), and the gradients in exactly that structure. Its state is stored in
``OptState`` Variables of the optimizer, which is a Module, so ``tl.jit``,
``tl.save``/``tl.load`` and ``tl.display`` handle it like any model.
"""

from __future__ import annotations

from typing import Any, cast

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from toylib._core.filters import filter_repr, to_predicate
from toylib._core.graph import flatten, parent_of, tree_leaf_paths, write_all
from toylib._core.module import Module
from toylib._core.paths import Path, first_few, format_path, list_paths, sorted_keys
from toylib._core.state import State
from toylib._core.variables import (
    PLACEMENT,
    Param,
    Variable,
    checked_value,
    new_variable,
    placement_of,
    spec_text,
    unwrap,
)
from toylib.sharding import place

__all__ = ["OptState", "Optimizer"]

NO_PARAMS = """\
tl.Optimizer: the wrt filter ({wrt}) selects no Variable or array of the model, so
there is nothing to optimise.
Fix: pass the model that holds the parameters, or another filter, e.g. `wrt=tl.Param`.
"""

NOT_FLOAT = """\
tl.Optimizer: the wrt filter ({wrt}) selects `{path}`, a {kind} of dtype {dtype};
only floating-point values can be optimised with gradients.
Fix: narrow the filter, e.g. `wrt=tl.Param` (RngState keys and counters, step
counts and other integer state are not trainable).
"""

IN_A_TUPLE = """\
tl.Optimizer: the wrt filter ({wrt}) selects the bare array `{path}`, which is
inside a tuple: a tuple cannot change in place, so its new value could not be
written back into the model.
Fix: hold it in a list, or wrap it in a Param (then `wrt=tl.Param` selects it):

    self.{name} = [...]            # instead of a tuple
"""

GRADS_MISMATCH = """\
Optimizer.update: the gradients do not match the parameters the optimizer was
built for.
{details}
Nothing was changed. Fix: take gradients with the same filter as the optimizer's
wrt ({wrt}):

    grads = tl.grad(loss_fn, wrt={wrt})(model, ...)   # a State
    grads = jax.grad(loss_fn)(model, ...)   # or a Module of gradients
    optimizer.update(model, grads)
"""

GRADS_WRONG_VALUE = """\
Optimizer.update: {count} gradient(s) do not fit the parameter at their path:
{details}
Nothing was changed (optax would take them as they are: a gradient of another
shape would be broadcast, silently changing the parameter's shape).
Fix: differentiate this model, with the optimizer's wrt:

    grads = tl.grad(loss_fn, wrt={wrt})(model, ...)   # a State
    grads = jax.grad(loss_fn)(model, ...)   # or a Module of gradients
    optimizer.update(model, grads)

A gradient made by hand needs the parameter's kind, shape and dtype, e.g.
`{fix}` for `{path}`.
"""

GRADS_NOT_A_TREE = """\
Optimizer.update: expected the gradients as a State (what tl.grad returns) or as
a Module of the model's type (what raw jax.grad returns), got a {kind}.
Fix:

    grads = tl.grad(loss_fn)(model, x)        # a State with the parameters' paths
    grads = jax.grad(loss_fn)(model, x)       # or a {model} of gradients
    optimizer.update(model, grads)

(a nested dict keyed by the parameters' paths can be wrapped: `tl.State(grads)`).
"""

MODULE_GRADS_MISMATCH = """\
Optimizer.update: the gradients are a {got} that is not structured like the model
(a {model}): {why}, so its leaves cannot be paired with the model's Variables.
Nothing was changed. Fix: differentiate the model you update, as a whole:

    grads = jax.grad(loss_fn)(model, x)       # not of a submodule or another model
    optimizer.update(model, grads)
"""

MODEL_CHANGED = """\
Optimizer.update: the model's parameters (wrt={wrt}) are not the ones the optimizer
was built for, so its optax state does not fit them.
{details}
Nothing was changed. Fix: update the model the optimizer was made for (or one of
the same structure), or make a new optimizer for this one:

    optimizer = tl.Optimizer(model, tx, wrt={wrt})
"""

BAD_UPDATE = """\
Optimizer.update: the optax transformation returned a new value for `{path}` of
{got}, but the parameter is {expected}.
Nothing was changed. The optax state or the extra arguments ({extra}) do not fit
the parameters. Fix: give extra tree arguments in the parameters' structure
(a State like `tl.state(model, wrt)`, e.g. the gradients themselves:
`grad=grads`), or make a new optimizer for the model as it is now.
"""

STATE_STRUCTURE_CHANGED = """\
Optimizer.update: the optax transformation returned a state of another structure
than its init did, which the optimizer's OptState Variables cannot hold:
  init:   {before}
  update: {after}
Nothing was changed. Fix: use a transformation whose update keeps the structure
of its state (every optax transformation does), or build the optimizer again.
"""

STORAGE_CHANGED = """\
Optimizer.update: the optimizer's stored optax state (`optimizer.opt_state`)
holds {found} OptState Variables, where {expected} were stored; it was changed
by hand, so its leaves cannot be matched to optax's state any more.
Nothing was changed. Fix: leave `optimizer.opt_state` to the optimizer; to
restore one, use tl.load with an optimizer built like the saved one.
"""


class OptState(Variable):
    """A piece of optimiser state (moments, counts): not a Param, not trained.

    Example:
        >>> import optax, toylib as tl
        >>> from toylib import nn
        >>> model = nn.Linear(2, 1, rngs=0)
        >>> optimizer = tl.Optimizer(model, optax.adam(1e-3))
        >>> {type(v).__name__ for _, v in tl.iter_variables(optimizer)}
        {'OptState'}
        >>> tl.state(model, tl.OptState).flat()  # the model holds none
        {}
    """

    __slots__ = ()


class _StateLayout:
    """What ``update`` needs to rebuild optax's pytrees, fixed at init (static data).

    ``order[i]`` is the position, among optax's state leaves, of the value
    held by the i-th ``OptState`` of ``Optimizer.opt_state`` (in
    ``jax.tree.leaves`` order). It is recorded by storing optax's state with
    each leaf replaced by its own position and reading the stored positions
    back, so storage and optax agree by construction, whatever the key types
    or container orders. A plain class, not a dataclass, so that ``tl.display``
    shows it as one line.
    """

    __slots__ = ("_key", "opt_state", "order", "params", "specs")

    def __init__(self, params: Any, specs: tuple, opt_state: Any, order: tuple[int, ...]) -> None:
        self.params = params  # jax.tree.structure of the params State optax sees
        self.specs = specs  # (shape, dtype) of each param, in graph order (optax's state fits)
        self.opt_state = opt_state  # jax.tree.structure of optax's state
        self.order = order
        self._key = (params, specs, opt_state, order)

    # Static data of the Module: it keys tl.jit's cache, so it compares by value.
    def __eq__(self, other: object) -> bool:
        return type(other) is _StateLayout and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return f"StateLayout({len(self.order)} optax leaves)"


class Optimizer(Module):
    """Apply an optax transformation to a model's parameters, in place.

    optax works on the parameters as a ``tl.State``, the one
    ``tl.state(model, wrt)`` returns: Variables of the parameters' types,
    bare array attributes as plain arrays. Its state is kept in ``OptState``
    Variables (``optimizer.opt_state``, with parameters keyed by their path
    in the model), so the optimizer is itself a Module: pass it to ``tl.jit``
    next to the model, save it with the model. The optimizer does not keep a
    reference to the model: ``update`` takes it.

    Arguments:
        model: the model whose parameters to optimise.
        tx: an ``optax.GradientTransformation`` (schedules, ``optax.chain``,
            ``optax.masked`` with a callable mask (it is called on the
            params State), ``optax.contrib`` and ``optax.lbfgs`` work).
        wrt: a filter choosing the parameters (default ``tl.Param``). Filters
            are called as ``pred(path, value)``; for a bare array attribute
            (``self.scale = jnp.ones(3)``) the value is the array, so ``...``
            or a path filter selects it too, while a type filter such as
            ``tl.Param`` matches Variables of that type only, never a bare
            array. Only floating-point values can be selected.

    Returns:
        The optimizer; ``optimizer.step`` counts the updates (an ``OptState``).

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
            raise ValueError(NO_PARAMS.format(wrt=filter_repr(wrt)))
        for path, leaf in params:
            _check_trainable(model, path, leaf, wrt)
        params_state = _as_state(params)
        state = tx.init(params_state)
        leaves, treedef = jax.tree.flatten(state)
        # Store optax's state with each leaf replaced by its position, then read
        # the positions back from the stored OptStates: that is the order map.
        self.opt_state = _to_storage(jax.tree.unflatten(treedef, range(len(leaves))))
        slots = _slots(self.opt_state)
        order = tuple(slot.value for slot in slots)
        if sorted(order) != list(range(len(leaves))):  # every leaf stored exactly once
            raise RuntimeError(f"tl.Optimizer: cannot store this optax state ({treedef}).")
        live = State.from_flat(params)  # the live Variables, in params_state's order
        places, names = _placements(state, params_state, live), _names(state, params_state, live)
        for slot, position in zip(slots, order, strict=True):
            slot.value = leaves[position]
            if names[position] is not None and len(names[position]) == jnp.ndim(slot.value):
                slot.set_metadata(sharding=names[position])
            if places[position] is not None:
                slot.value = place(slot.value, places[position])
                slot.set_metadata(placement=places[position])
        if places and places[0] is not None:  # placed state: the step count beside it
            replicated = NamedSharding(places[0].mesh, PartitionSpec())
            self.step.value = place(self.step.value, replicated)
            self.step.set_metadata(placement=replicated)
        self.state_layout = _StateLayout(
            jax.tree.structure(params_state), _specs(params), treedef, order
        )

    def _params(self, model: Module) -> list[tuple[Path, Any]]:
        """``(path, live Variable or bare array)`` for each parameter, in graph order."""
        predicate = to_predicate(self.wrt)
        _, leaves = flatten(model)
        return [(path, leaf) for path, leaf in leaves if predicate(path, leaf)]

    def update(self, model: Module, grads: State | Module, **extra_args: Any) -> None:
        """Apply one step: ``params += tx.update(grads, opt_state, params)``, in place.

        Everything is checked and computed before anything is written: a
        gradient of the wrong kind, shape or dtype, or a missing one, is an
        error naming its path, and leaves the parameters, the optax state and
        the step count as they were. Works inside ``tl.jit`` (and never waits
        for device values).

        Arguments:
            model: the model the optimizer was built for (or one of the same
                structure: the same parameter paths and kinds).
            grads: the gradients, either a State with the parameters' paths
                (what ``tl.grad`` returns with the optimizer's ``wrt``; its
                leaves may also be plain arrays), or a Module of the model's
                type (what raw ``jax.grad(loss)(model)`` returns: only the
                ``wrt`` entries are used, a tied Variable's gradients are
                summed).
            **extra_args: passed to ``tx.update`` (``value=`` for
                ``optax.contrib.reduce_on_plateau``; ``value=``, ``grad=`` and
                ``value_fn=`` for ``optax.lbfgs``). Tree arguments must have
                the structure optax sees for the parameters, that of
                ``tl.state(model, wrt)``; ``grad=grads`` (this very object) is
                passed as the checked gradients in that structure, whatever
                form they came in. A ``value_fn`` is called with such a State:
                ``tl.merge(graphdef, params, rest)`` rebuilds the model.

        Returns:
            None: the model's parameters, ``opt_state`` and ``step`` change.

        Example:
            >>> import jax, jax.numpy as jnp, optax, toylib as tl
            >>> from toylib import nn
            >>> model = nn.Linear(2, 1, rngs=0)
            >>> opt = tl.Optimizer(model, optax.sgd(0.5))
            >>> grads = jax.grad(lambda m: m(jnp.ones(2)).sum())(model)
            >>> type(grads).__name__
            'Linear'
            >>> opt.update(model, grads)
            >>> model.bias.value.tolist(), int(opt.step.value)
            ([-0.5], 1)
        """
        layout = self.state_layout
        params = self._params(model)
        params_state = _as_state(params)
        if jax.tree.structure(params_state) != layout.params or _specs(params) != layout.specs:
            raise ValueError(
                MODEL_CHANGED.format(
                    wrt=filter_repr(self.wrt), details=_changed_params(layout, params)
                )
            )
        new_grads = self._checked_grads(model, grads, params)
        extra = {k: new_grads if v is grads else v for k, v in extra_args.items()}
        slots = _slots(self.opt_state)
        if len(slots) != len(layout.order) or not all(isinstance(s, Variable) for s in slots):
            raise ValueError(STORAGE_CHANGED.format(found=len(slots), expected=len(layout.order)))
        stored = [slot.value for slot in slots]
        leaves = [None] * len(stored)
        for value, position in zip(stored, layout.order, strict=True):
            leaves[position] = value
        opt_state = jax.tree.unflatten(layout.opt_state, leaves)

        updates, new_state = self.tx.update(new_grads, opt_state, params_state, **extra)
        # (optax types the result as any ArrayTree: it is a State, like params_state)
        new_params = cast(State, optax.apply_updates(params_state, updates)).flat()
        new_leaves, new_treedef = jax.tree.flatten(new_state)
        if new_treedef != layout.opt_state:
            raise ValueError(
                STATE_STRUCTURE_CHANGED.format(before=layout.opt_state, after=new_treedef)
            )
        writes = [_write(model, path, live, new_params[path], extra) for path, live in params]
        # Every Variable to write must accept a write here (it was not closed
        # over from outside a transform): try them all before changing any.
        for variable in [w[0] for w in writes if w[1] is None] + [*slots, self.step]:
            variable.value = variable.value
        # Everything is checked and computed: now write.
        write_all(writes)
        for slot, position in zip(slots, layout.order, strict=True):
            slot.value = new_leaves[position]
        self.step.value = self.step.value + 1

    def _checked_grads(self, model: Module, grads: Any, params: list) -> State:
        """The gradients as a State in the params' structure, every entry checked."""
        if isinstance(grads, State):
            found = {path: [g] for path, g in grads.flat().items()}
        elif isinstance(grads, Module):
            found = _module_grads(model, grads, {path for path, _ in params})
        else:
            raise TypeError(
                GRADS_NOT_A_TREE.format(kind=type(grads).__name__, model=type(model).__name__)
            )
        wrt = filter_repr(self.wrt)
        expected = [path for path, _ in params]
        if set(found) != set(expected):
            raise ValueError(GRADS_MISMATCH.format(details=_details(expected, found), wrt=wrt))
        problems: list[tuple[Path, str, str]] = []
        out = []
        for path, param in params:
            values = []
            for g in found[path]:
                value, problem = _check_grad(param, g, path)
                if problem is None:
                    values.append(value)
                else:
                    problems.append((path, *problem))
            if len(values) == len(found[path]):
                total = values[0]
                for value in values[1:]:  # a tied Variable, reached along several paths
                    total = total + value
                out.append((path, _unplaced(param, total) if _is_variable(param) else total))
        if problems:
            details = first_few((f"  `{format_path(p)}`: {t}" for p, t, _ in problems), lines=True)
            path, _, fix = problems[0]
            raise ValueError(
                GRADS_WRONG_VALUE.format(
                    count=len(problems), details=details, wrt=wrt, fix=fix, path=format_path(path)
                )
            )
        return State.from_flat(out)


def _placement(param: Any) -> NamedSharding | None:
    """Where a parameter was placed: by tl.sharding, or (on a mesh) by the user."""
    if placement_of(param) is not None:
        return placement_of(param)
    sharding = getattr(unwrap(param), "sharding", None)
    if isinstance(sharding, NamedSharding) and len(sharding.device_set) > 1:
        return sharding
    return None


def _placements(state: Any, params: State, live: State) -> list[NamedSharding | None]:
    """For each leaf of optax's ``state``: where to place it (None: leave it).

    A subtree with the parameters' structure (Adam's moments) is placed
    leaf by leaf like the parameters; anything else (counts, scalars) is
    replicated on their mesh. Nothing is placed when no parameter is.
    """
    places = [_placement(p) for p in jax.tree.leaves(live, is_leaf=_is_variable)]
    meshes = [p for p in places if p is not None]
    if not meshes:
        return [None] * len(jax.tree.leaves(state))
    replicated = NamedSharding(meshes[0].mesh, PartitionSpec())
    return _like_params(state, params, [p or replicated for p in places], replicated)


def _names(state: Any, params: State, live: State) -> list[tuple | None]:
    """For each leaf of optax's ``state``: the logical sharding names of its parameter.

    So ``tl.sharding.specs``/``shard``/``abstract`` place the moments like
    their parameters, as ``tl.Optimizer`` itself does.
    """
    names = [
        p.get_metadata("sharding", None) if _is_variable(p) else None
        for p in jax.tree.leaves(live, is_leaf=_is_variable)
    ]
    return _like_params(state, params, names, None)


def _like_params(state: Any, params: State, per_param: list, other: Any) -> list:
    """Per leaf of ``state``: ``per_param``'s entries in the params' subtrees, else ``other``."""
    params_def = jax.tree.structure(params)
    box = [_Entry(x) for x in per_param]  # opaque leaves, whatever the entries are

    def walk(node: Any) -> Any:
        treedef = jax.tree.structure(node)
        if treedef == params_def:
            return jax.tree.unflatten(params_def, box)
        if treedef.num_nodes == 1:  # one leaf (or an empty node: no leaves)
            return jax.tree.unflatten(treedef, [_Entry(other)] * treedef.num_leaves)
        children = jax.tree.leaves(node, is_leaf=lambda x: x is not node)
        node_def = jax.tree.structure(node, is_leaf=lambda x: x is not node)
        return jax.tree.unflatten(node_def, [walk(c) for c in children])

    return [entry.value for entry in jax.tree.leaves(walk(state))]


class _Entry:
    """A value ``jax.tree`` treats as one leaf (None and tuples would be nodes)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def _is_variable(x: Any) -> bool:
    return isinstance(x, Variable)


def _slots(storage: Any) -> list[Any]:
    """The stored OptStates, in ``jax.tree.leaves`` order (the order ``_StateLayout`` maps)."""
    return jax.tree.leaves(storage, is_leaf=_is_variable)


def _as_state(params: list[tuple[Path, Any]]) -> State:
    """The params as optax sees them: ``tl.state``'s layout, with copies of the Variables."""
    return State.from_flat((p, _unplaced(v, v.value) if _is_variable(v) else v) for p, v in params)


def _unplaced(param: Variable, value: Any) -> Variable:
    """A copy of ``param`` holding ``value``, without the record of where it was placed.

    The placement (``tl.sharding``) says where the values live, not what the
    parameters are: moving the model to another mesh keeps its optimizer.
    """
    metadata = {k: v for k, v in param._metadata.items() if k != PLACEMENT}
    return new_variable(type(param), unwrap(value), metadata)


def _to_storage(node: Any) -> Any:
    """optax's state as data a Module can hold: each leaf in an ``OptState``.

    A Module attribute cannot hold a State, nor a Param (it would be trained
    as the optimizer's own): a State or dict becomes a dict, built in
    ``sorted_keys`` order (the order of its pytree and of the tracked Dict it
    becomes), and a Variable gives way to its value. Which types they were is
    kept in the treedef that ``_StateLayout`` records, to rebuild optax's
    structure exactly.
    """
    if isinstance(node, Variable):
        return _to_storage(node.value)
    if isinstance(node, State | dict):
        return {key: _to_storage(node[key]) for key in sorted_keys(node.keys())}
    if isinstance(node, tuple) and hasattr(node, "_fields"):  # optax's states: NamedTuples
        return type(node)(*(_to_storage(item) for item in node))
    if type(node) in (list, tuple):
        return type(node)(_to_storage(item) for item in node)
    if node is None:
        return None
    treedef = jax.tree.structure(node)
    if treedef.num_nodes == 1 and treedef.num_leaves == 1:
        return OptState(node)
    # Another pytree node type: its children, in a tuple (its type is in the treedef).
    children = jax.tree.leaves(node, is_leaf=lambda x: x is not node)
    return tuple(_to_storage(child) for child in children)


def _module_grads(model: Module, grads: Module, wanted: set[Path]) -> dict[Path, list]:
    """``{path: [gradient, ...]}`` from a Module of gradients, for the ``wanted`` paths.

    Raw jax sees the model as a tree: a Variable reachable along two paths
    is two leaves there, each with its part of the gradient. ``tree_leaf_paths``
    names each tree leaf by its graph path, so the parts land under one path.
    """
    if type(grads) is not type(model):
        why = "another type"
    elif jax.tree.structure(grads, is_leaf=_is_variable) != jax.tree.structure(
        model, is_leaf=_is_variable
    ):
        why = "the same type, but other attributes or containers"
    else:
        why = None
    if why is not None:
        raise ValueError(
            MODULE_GRADS_MISMATCH.format(
                got=type(grads).__name__, model=type(model).__name__, why=why
            )
        )
    found: dict[Path, list] = {}
    leaves = jax.tree.leaves(grads, is_leaf=_is_variable)
    for path, leaf in zip(tree_leaf_paths(model), leaves, strict=True):
        if path in wanted:
            found.setdefault(path, []).append(leaf)
    return found


def _dtype(x: Any) -> Any:
    """The dtype jax computes in: a numpy float64 array is float32 unless x64 is on."""
    return jax.dtypes.canonicalize_dtype(x.dtype, allow_extended_dtype=True)


def _kind(x: Any) -> str:
    return f"a {type(x).__name__}" if _is_variable(x) else "a bare array"


def _check_grad(param: Any, grad: Any, path: Path) -> tuple[Any, tuple[str, str] | None]:
    """``(value, None)`` for a gradient that fits ``param``, or ``(None, (problem, fix))``."""
    if _is_variable(grad) and (not _is_variable(param) or type(grad) is not type(param)):
        problem = f"the parameter is {_kind(param)}, the gradient {_kind(grad)}"
        return None, (problem, "grad.value")  # a plain array fits any kind of parameter
    old, new = unwrap(param), unwrap(grad)
    if not (hasattr(old, "shape") and hasattr(old, "dtype")):
        # A Variable holding a pytree: the same structure, leaf by leaf.
        return checked_value(old, new, format_path(path), "Optimizer.update"), None
    if old.shape == () and isinstance(new, bool | int | float):
        return jnp.asarray(new, dtype=old.dtype), None
    dtype = _dtype(old).name
    if hasattr(new, "shape") and hasattr(new, "dtype"):
        if tuple(new.shape) == tuple(old.shape) and _dtype(new) == _dtype(old):
            return new, None
        if tuple(new.shape) != tuple(old.shape):
            fix = "grad.T" if tuple(new.shape)[::-1] == tuple(old.shape) else ""
            fix = fix or f"grad.reshape({tuple(old.shape)})"
        else:
            fix = f"grad.astype(jnp.{dtype})"
    else:
        fix = f"jnp.full({tuple(old.shape)}, grad, jnp.{dtype})"
    return None, (f"the parameter is {spec_text(old)}, the gradient {spec_text(new)}", fix)


def _write(model: Module, path: Path, live: Any, new: Any, extra: dict) -> tuple:
    """The checked write ``(Variable, None, value)`` or ``(parent, key, value)`` of one param."""
    old, new = unwrap(live), unwrap(new)
    if hasattr(old, "shape") and hasattr(old, "dtype"):
        if not (
            hasattr(new, "shape")
            and hasattr(new, "dtype")
            and tuple(new.shape) == tuple(old.shape)
            and _dtype(new) == _dtype(old)
        ):
            raise ValueError(
                BAD_UPDATE.format(
                    path=format_path(path),
                    got=spec_text(new),
                    expected=spec_text(old),
                    extra=", ".join(f"{k}=" for k in extra) or "none given",
                )
            )
    else:
        new = checked_value(old, new, format_path(path), "Optimizer.update")
    if _is_variable(live):
        return live, None, new
    return parent_of(model, path), path[-1], new


def _check_trainable(model: Module, path: Path, leaf: Any, wrt: Any) -> None:
    dtype = getattr(unwrap(leaf), "dtype", None)
    if dtype is not None and not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(
            NOT_FLOAT.format(
                wrt=filter_repr(wrt),
                path=format_path(path),
                kind=type(leaf).__name__ if _is_variable(leaf) else "bare array",
                dtype=dtype,
            )
        )
    if not _is_variable(leaf) and isinstance(parent_of(model, path), tuple):
        name = next((key for key in path if isinstance(key, str)), "values")
        raise ValueError(IN_A_TUPLE.format(wrt=filter_repr(wrt), path=format_path(path), name=name))


def _details(expected: list[Path], grads: dict) -> str:
    missing = [p for p in expected if p not in grads]
    extra = [p for p in grads if p not in set(expected)]
    lines = []
    if missing:
        lines.append("  no gradient for: " + list_paths(missing))
    if extra:
        lines.append("  gradient for a non-parameter: " + list_paths(extra))
    return "\n".join(lines)


def _specs(params: list[tuple[Path, Any]]) -> tuple:
    """``(shape, dtype)`` of each param (None for a non-array value): static under tracing."""
    values = [unwrap(leaf) for _, leaf in params]
    return tuple(
        (tuple(v.shape), _dtype(v)) if hasattr(v, "shape") and hasattr(v, "dtype") else None
        for v in values
    )


def _changed_params(layout: _StateLayout, params: list[tuple[Path, Any]]) -> str:
    """What differs between the params at init (``layout``) and now."""
    treedef = layout.params
    before = jax.tree.unflatten(treedef, [None] * treedef.num_leaves).flat()
    now = dict(params)

    def kind(x: Any) -> Any:
        return type(x) if _is_variable(x) else None  # None: a bare array

    lines = []
    for label, paths in (
        ("gone", [p for p in before if p not in now]),
        ("new", [p for p in now if p not in before]),
        (
            "of another kind",
            [p for p in before if p in now and kind(before[p]) is not kind(now[p])],
        ),
    ):
        if paths:
            lines.append(f"  {label}: {list_paths(paths)}")
    if not lines and len(layout.specs) == len(params):
        for (path, leaf), spec in zip(params, layout.specs, strict=True):
            if _specs([(path, leaf)])[0] != spec:
                was = f"{spec[1].name}[{', '.join(map(str, spec[0]))}]" if spec else "not an array"
                lines.append(f"  `{format_path(path)}` is {spec_text(unwrap(leaf))}, was {was}")
    return "\n".join(lines[:6]) or "  the same paths, but other Variable metadata"
