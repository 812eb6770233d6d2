"""What a checkpoint holds: ``obj`` as (model path, array) entries, checked against ``like``.

Both formats (the orbax directory of ``tl.save`` and the blob of
``tl.save_bytes``) store the same entries and run the same checks, so they
give the same errors; only the bytes on disk differ.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.core  # named: jax imports it, but pyright sees only what is imported
import numpy as np

from toylib._core import graph
from toylib._core.paths import first_few, format_path
from toylib._core.skeleton import is_array, is_graph_node
from toylib._core.variables import placement_of, unwrap
from toylib.transforms.lifting import plain_key

Key = tuple[Any, ...]
# One stored array: its model path, the array written (a PRNG key as its key
# data), and what `like` must match (shape, dtype, and a key's implementation).
Entry = tuple[Key, Any, dict[str, Any]]

STRUCTURE_MISMATCH = """\
{caller}: {source} does not have the structure of `like`.
{details}
Nothing was loaded. Fix: pass as `like` an object built like the saved one (the
same layers, Variables and shared references, in the same container), e.g. a
fresh model made with the same configuration, or an abstract one:

    model = tl.load(path, tl.eval_shape(lambda: Model(config, rngs=tl.Rngs(0))))
"""

SHAPE_MISMATCH = """\
{caller}: shapes in {source} differ from `like`:
{details}
Nothing was loaded. Fix: build `like` with the configuration the checkpoint was
saved with (layer sizes, number of heads, vocabulary size...).
"""

DTYPE_MISMATCH = """\
{caller}: dtypes in {source} differ from `like`:
{details}
Nothing was loaded (toylib does not cast silently). Fix: build `like` with the
dtypes that were saved, e.g. `Model(..., param_dtype=jnp.float32)`, and convert
the loaded model afterwards if you need another dtype.
"""

DAMAGED = """\
{caller}: {source} is damaged: {file}, which holds {holds}, {problem}.
Nothing was loaded. The file changed after it was written (a disk or copy error,
an interrupted transfer, or an edit). Fix: load an earlier checkpoint, or save
again from a live model. (`verify=False` skips the digest check, but the values
read may then be wrong.)
"""

UNSAVEABLE = """\
{caller}: `{where}` holds {what}, which a checkpoint cannot store.
{hint}
"""

NOTHING_TO_SAVE = """\
{caller}: the {kind} given holds no arrays, so there is nothing to save.
Fix: save the objects that hold the state, e.g. `tl.save(path, (model, optimizer))`.
"""


class Flat:
    """``obj`` seen as a graph: what to store, and how to rebuild an object like it.

    ``entries`` are ``(path, array)`` pairs: the path runs from ``obj`` through
    containers, Modules and Variables (and into a Variable's value if that is
    itself a pytree). A Module or Variable reachable twice is visited once.
    """

    def __init__(self, obj: Any) -> None:
        # jax.tree takes the containers (and States) apart, toylib's graph
        # view the Modules and Variables: together they see every object once.
        with_paths, self.treedef = jax.tree_util.tree_flatten_with_path(obj, is_leaf=is_graph_node)
        self.tops = [leaf for _, leaf in with_paths]
        keypaths = [tuple(plain_key(k) for k in keypath) for keypath, _ in with_paths]
        # Arrays (and abstract ones) outside any Module are entries of their own;
        # other leaves (numbers, strings) are static and stay as they are.
        self.positions = [i for i, top in enumerate(self.tops) if is_graph_node(top)]
        self.direct = [i for i, top in enumerate(self.tops) if is_array(top)]
        self.graphdef, self.leaves = graph.flatten(tuple(self.tops[i] for i in self.positions))
        self.value_defs: list[Any] = []
        self.entries: list[tuple[Key, Any]] = []
        self.counts: list[int] = []
        for (index, *rest), leaf in self.leaves:
            base = (*keypaths[self.positions[index]], *rest)
            value = unwrap(leaf)
            parts, value_def = jax.tree_util.tree_flatten_with_path(value)
            self.value_defs.append(value_def)
            self.counts.append(len(parts))
            # A Variable holding one array may record where it belongs (tl.sharding).
            recorded = placement_of(leaf) if len(parts) == 1 else None
            self.entries += [
                ((*base, *map(plain_key, sub)), _with_recorded(x, recorded)) for sub, x in parts
            ]
        self.entries += [(keypaths[i], self.tops[i]) for i in self.direct]

    def rebuild(self, values: list[Any]) -> Any:
        """A new object of this structure holding ``values`` (one per entry)."""
        take = iter(values)
        new_leaves = {
            path: jax.tree_util.tree_unflatten(value_def, [next(take) for _ in range(count)])
            for (path, _), value_def, count in zip(
                self.leaves, self.value_defs, self.counts, strict=True
            )
        }
        nodes = graph.unflatten(self.graphdef, new_leaves)
        tops = list(self.tops)
        for position, node in zip(self.positions, nodes, strict=True):
            tops[position] = node
        for position in self.direct:
            tops[position] = next(take)
        return jax.tree_util.tree_unflatten(self.treedef, tops)


def _with_recorded(x: Any, recorded: Any) -> Any:
    """An abstract leaf without a sharding, given the one its Variable records.

    ``tl.eval_shape`` gives ShapeDtypeStructs without shardings (JAX reports
    them only on explicit mesh axes), but a Variable placed by
    ``tl.sharding.shard``/``init`` records its placement (metadata
    ``placement``), which ``tl.eval_shape`` keeps. So the abstract model of
    ``tl.eval_shape(lambda: tl.sharding.init(make, mesh, rules))`` loads each
    array straight into its shards, not whole onto one device.
    """
    if (
        isinstance(x, jax.ShapeDtypeStruct)
        and x.sharding is None
        and isinstance(recorded, jax.sharding.Sharding)
    ):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=recorded)
    return x


# -- save: what is written ---------------------------------------------------------------


def to_store(obj: Any, caller: str) -> tuple[Flat, list[Entry]]:
    """``obj``'s entries as they are written, or UNSAVEABLE / NOTHING_TO_SAVE."""
    flat = Flat(obj)
    if not flat.entries:
        raise ValueError(NOTHING_TO_SAVE.format(caller=caller, kind=type(obj).__name__))
    stored = []
    for path, x in flat.entries:
        x = _saveable(path, x, caller)
        meta = describe(x)
        if "key" in meta:  # stored as key data; its implementation is kept in `meta`
            x = jax.random.key_data(x)
        stored.append((path, x, meta))
    return flat, stored


def describe(x: Any) -> dict[str, Any]:
    """What ``like`` must match for ``x``: shape, dtype, and a PRNG key's implementation."""
    if not hasattr(x, "dtype"):
        x = np.asarray(x)
    meta: dict[str, Any] = {"shape": list(x.shape), "dtype": str(x.dtype)}
    if jax.numpy.issubdtype(x.dtype, jax.dtypes.prng_key):
        meta["key"] = str(jax.random.key_impl(x))
    return meta


def _saveable(path: Key, x: Any, caller: str) -> Any:
    if isinstance(x, jax.core.Tracer):
        hint = (
            "It is a traced value: the save was called inside a transform (jit, grad,\n"
            "vmap...). Fix: save outside it, after the step returns."
        )
        what = "a tracer"
    elif isinstance(x, jax.ShapeDtypeStruct):
        hint = (
            "An abstract model (from tl.eval_shape) has shapes but no values. Fix: save\n"
            "a live model; use the abstract one as `like` when loading."
        )
        what = "a ShapeDtypeStruct"
    elif is_array(x) or isinstance(x, np.generic):
        return x
    elif isinstance(x, bool | int | float | complex):
        return np.asarray(x)
    else:
        hint = (
            "A checkpoint stores arrays (jax or numpy) and Python numbers held in\n"
            "Variables. Fix: keep other values as plain (static) attributes of a Module,\n"
            "where they are part of the structure and come from `like` when loading."
        )
        what = f"a {type(x).__name__}"
    raise TypeError(UNSAVEABLE.format(caller=caller, where=format_path(path), what=what, hint=hint))


# -- load: checks and placement ----------------------------------------------------------


def check_match(
    saved: dict[str, dict[str, Any]], entries: list[tuple[Key, Any]], caller: str, source: str
) -> None:
    """Raise STRUCTURE/SHAPE/DTYPE_MISMATCH unless ``saved`` has exactly ``like``'s entries."""
    expected = {format_path(p): describe_like(x) for p, x in entries}
    missing = [name for name in expected if name not in saved]
    extra = [name for name in saved if name not in expected]
    if missing or extra:
        details = [
            _listing("in `like`, not in the checkpoint", missing),
            _listing("in the checkpoint, not in `like`", extra),
        ]
        text = "\n".join(d for d in details if d)
        raise ValueError(STRUCTURE_MISMATCH.format(caller=caller, source=source, details=text))
    for field, message in (("shape", SHAPE_MISMATCH), ("dtype", DTYPE_MISMATCH)):
        wrong = []
        for name, ours in expected.items():
            theirs = saved[name][field]
            if ours[field] != theirs:
                show = (lambda v: tuple(v)) if field == "shape" else (lambda v: v)
                wrong.append(f"  `{name}`: {show(ours[field])} in `like`, {show(theirs)} saved")
        if wrong:
            details = first_few(wrong, lines=True)
            raise ValueError(message.format(caller=caller, source=source, details=details))


def describe_like(x: Any) -> dict[str, Any]:
    """``describe`` for one of ``like``'s leaves, which may be abstract."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return {"shape": list(x.shape), "dtype": str(x.dtype)}
    return describe(x)


def _listing(label: str, names: list[str]) -> str:
    if not names:
        return ""
    return f"  {label}: {first_few(f'`{n}`' for n in names)}"


def placement(x: Any) -> jax.sharding.Sharding | None:
    """Where a loaded array goes: ``like``'s sharding if it is committed, else None.

    A fresh model's arrays are uncommitted (on the default device, free to move),
    and jax.jit caches on committedness: a loaded array committed where the
    fresh ones are not would compile a step again. So committedness is kept.
    """
    if isinstance(x, jax.ShapeDtypeStruct):
        return x.sharding  # None (uncommitted) unless it or its Variable says where (Flat)
    if isinstance(x, jax.Array) and (x.committed or len(x.sharding.device_set) > 1):
        return x.sharding
    return None


def data_like(x: Any) -> jax.ShapeDtypeStruct:
    """The array written for ``like``'s leaf ``x`` (a key's key data), with its placement."""
    if not hasattr(x, "dtype"):
        x = np.asarray(x)
    shape, dtype = x.shape, x.dtype
    if jax.numpy.issubdtype(dtype, jax.dtypes.prng_key):
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(shape, dtype))
        shape, dtype = data.shape, data.dtype
    return jax.ShapeDtypeStruct(shape, dtype, sharding=placement(x))


def finish(value: Any, x: Any, meta: dict[str, Any]) -> Any:
    """A value read for ``like``'s leaf ``x``, made the kind of thing ``x`` is.

    Python numbers stay numbers and numpy arrays numpy arrays. Host data for a
    jax array goes to ``placement(x)`` (uncommitted if None); a PRNG key is
    rebuilt from its key data with the saved implementation.
    """
    if isinstance(x, bool | int | float | complex):
        return type(x)(np.asarray(value).item())
    if isinstance(x, np.generic):
        return np.asarray(value)[()]
    if isinstance(x, np.ndarray):
        return np.asarray(value)
    if not isinstance(value, jax.Array):
        value = jax.device_put(value, placement(x))
    if "key" in meta:
        value = jax.random.wrap_key_data(value, impl=meta["key"])
    return value
