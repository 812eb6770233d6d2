"""Checkpoints: ``tl.save(path, obj)`` and ``tl.load(path, like)``, on orbax-checkpoint.

``obj`` is anything toylib's graph view understands: a Module (a
``tl.Optimizer`` is one), a State, a Variable, an array, or a tuple/list/dict
of these, e.g. ``(model, optimizer)``. What is stored is every array held by a
Variable (or held directly as an array attribute), under its model path
(``layers.0.kernel``), once per Variable: a tied weight is written once and
comes back as one object. Python values outside Variables (layer sizes,
activation functions, ``tx``) are structure, not state: they come from
``like`` when loading. Random-number streams are state (``RngState`` keys and
counters), so a run resumed from a checkpoint draws the same dropout masks as
one that never stopped; typed PRNG keys are stored as their key data and
rebuilt with their implementation (orbax does this).

Writes are atomic. orbax writes the checkpoint into a temporary directory and
renames it when it is complete; toylib has it write next to ``path`` and then
moves it into place. Saving over an existing checkpoint swaps the two
directories in one atomic rename (Linux ``renameat2(RENAME_EXCHANGE)``) and
then deletes the old one, so ``path`` always holds either the whole old
checkpoint or the whole new one. Where the filesystem cannot swap atomically,
the old checkpoint is first renamed to ``<path>.toylib-old``; the next
``tl.save`` to ``path`` puts it back if a crash left ``path`` empty, and
``tl.load`` points to it. A save that fails removes what it wrote. Only an
earlier checkpoint or an empty directory is ever replaced: ``tl.save`` will
not delete other files.

Both functions block until the files are written or read (one process; for
asynchronous or multi-host checkpointing use orbax's ``CheckpointManager``
on ``tl.state(model)``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from toylib._core import graph
from toylib._core.paths import first_few, format_path, nest
from toylib._core.skeleton import is_array, is_graph_node
from toylib._core.variables import unwrap
from toylib.transforms.lifting import plain_key

__all__ = ["load", "save"]

Key = tuple[Any, ...]

NO_CHECKPOINT = """\
tl.load: there is no checkpoint at {path}: {reason}.
Fix: pass the directory that tl.save wrote, and a `like` of the same structure:

    tl.save("/ckpt/step_100", (model, optimizer))
    model, optimizer = tl.load("/ckpt/step_100", (model, optimizer))
"""

STRUCTURE_MISMATCH = """\
tl.load: the checkpoint at {path} does not have the structure of `like`.
{details}
Nothing was loaded. Fix: pass as `like` an object built like the saved one (the
same layers, Variables and shared references, in the same container), e.g. a
fresh model made with the same configuration, or an abstract one:

    model = tl.load(path, tl.eval_shape(lambda: Model(config, rngs=tl.Rngs(0))))
"""

SHAPE_MISMATCH = """\
tl.load: shapes in the checkpoint at {path} differ from `like`:
{details}
Nothing was loaded. Fix: build `like` with the configuration the checkpoint was
saved with (layer sizes, number of heads, vocabulary size...).
"""

DTYPE_MISMATCH = """\
tl.load: dtypes in the checkpoint at {path} differ from `like`:
{details}
Nothing was loaded (toylib does not cast silently). Fix: build `like` with the
dtypes that were saved, e.g. `Model(..., param_dtype=jnp.float32)`, and convert
the loaded model afterwards if you need another dtype.
"""

UNSAVEABLE = """\
tl.save: `{where}` holds {what}, which a checkpoint cannot store.
{hint}
"""

NOTHING_TO_SAVE = """\
tl.save: the {kind} given holds no arrays, so there is nothing to save.
Fix: save the objects that hold the state, e.g. `tl.save(path, (model, optimizer))`.
"""

NAME_CLASH = """\
tl.save: `{first}` and `{second}` would be stored under the same name {name!r}
(checkpoint names join the path's keys with dots, and keys are written as text).
Fix: rename one of the dict keys so the two paths differ as text.
"""

NOT_A_CHECKPOINT_DIR = """\
tl.save: {path} exists and is not a checkpoint ({reason}). tl.save replaces an
earlier checkpoint or an empty directory, never other files.
Fix: save to a new path (e.g. one directory per step: f"{{root}}/step_{{step}}"),
or remove {path} yourself if it can go.
"""

BAD_PATH = """\
{caller}: `path` must be a str or os.PathLike naming a directory, got a {kind}.
Fix: tl.save(path, obj) and obj = tl.load(path, like), path first.
"""

# Key in orbax's per-checkpoint custom metadata; its value records, for every
# stored array, the model path (as text), shape and dtype, so that a mismatch
# is reported in toylib's terms before orbax reads anything.
_METADATA = "toylib"
_FORMAT = 1
# Suffixes of the directories next to `path` that a save writes through.
_STAGING = ".toylib-tmp"  # the new checkpoint (orbax adds its own tmp suffix to it)
_OLD = ".toylib-old"  # the old one, only where directories cannot be swapped atomically


# -- flattening -------------------------------------------------------------------


class _Flat:
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
            self.entries += [((*base, *map(plain_key, sub)), x) for sub, x in parts]
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


def _name(path: Key) -> tuple[str, ...]:
    """The keys of ``path`` as text: orbax stores a tree of str-keyed dicts."""
    return tuple(str(k) for k in path) or ("",)


def _nest(flat: list[tuple[Key, Any]]) -> dict:
    """``[(path, x)]`` as nested str-keyed dicts; two paths with one name are an error."""
    joined: dict[str, Key] = {}  # orbax's name for each array: the keys joined by dots
    leaves: dict[tuple[str, ...], Key] = {}
    prefixes: dict[tuple[str, ...], Key] = {}  # every prefix of a name -> a path with it
    for path, _ in flat:
        name = _name(path)
        # One orbax name, or a name that is an array for one path and a dict for another.
        clashes = [joined.get(".".join(name)), prefixes.get(name)]
        clashes += [leaves.get(name[:i]) for i in range(1, len(name))]
        other = next((c for c in clashes if c is not None), None)
        if other is not None:
            raise ValueError(
                NAME_CLASH.format(
                    first=format_path(other), second=format_path(path), name=".".join(name)
                )
            )
        joined[".".join(name)] = leaves[name] = path
        for i in range(1, len(name) + 1):
            prefixes.setdefault(name[:i], path)
    return nest((_name(path), x) for path, x in flat)


def _fetch(tree: dict, path: Key) -> Any:
    for key in _name(path):
        tree = tree[key]
    return tree


def _spec(x: Any) -> tuple[tuple[int, ...], str]:
    """``(shape, dtype name)`` of an array, abstract array or Python number."""
    if not hasattr(x, "dtype"):
        x = np.asarray(x)
    return tuple(x.shape), str(x.dtype)


# -- save -------------------------------------------------------------------------


def save(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj``'s state to the directory ``path``, atomically.

    Arguments:
        path: the checkpoint directory. If it exists it must hold an earlier
            checkpoint (or be empty); the new checkpoint replaces it in one
            step, and until then the old one stays complete and loadable.
        obj: a Module, State, Variable or array, or a tuple/list/dict of these,
            e.g. ``(model, optimizer)``. Rngs counters and keys are included.

    Returns:
        None, once the checkpoint is written (the call blocks; it reads the
        arrays from the device).

    Example:
        >>> import tempfile, jax.numpy as jnp, toylib as tl
        >>> from toylib import nn
        >>> model = nn.Linear(2, 3, rngs=0)
        >>> tmp = tempfile.TemporaryDirectory()
        >>> tl.save(tmp.name + "/step_1", model)
        >>> restored = tl.load(tmp.name + "/step_1", nn.Linear(2, 3, rngs=1))
        >>> bool((restored.kernel.value == model.kernel.value).all())
        True
        >>> tmp.cleanup()
    """
    import orbax.checkpoint as ocp

    target = _as_path(path, "tl.save")
    flat = _Flat(obj)
    if not flat.entries:
        raise ValueError(NOTHING_TO_SAVE.format(kind=type(obj).__name__))
    stored = [(p, _saveable(p, x)) for p, x in flat.entries]
    tree = _nest(stored)
    leaves = {}
    for p, x in stored:
        shape, dtype = _spec(x)
        leaves[format_path(p)] = {"shape": list(shape), "dtype": dtype}
    metadata = {_METADATA: {"format": _FORMAT, "leaves": leaves}}

    _recover(target)
    _check_replaceable(target)
    staging = target.with_name(target.name + _STAGING)
    _clean(target)  # what a crashed save may have left next to `path`
    try:
        with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
            checkpointer.save(staging, args=ocp.args.StandardSave(tree), custom_metadata=metadata)
        _move_into_place(staging, target)
    finally:
        # The new checkpoint if something failed, the old one after a swap.
        _clean(target)


def _saveable(path: Key, x: Any) -> Any:
    if isinstance(x, jax.core.Tracer):
        hint = (
            "It is a traced value: tl.save was called inside a transform (jit, grad,\n"
            "vmap...). Fix: save outside it, after the step returns."
        )
        raise TypeError(UNSAVEABLE.format(where=format_path(path), what="a tracer", hint=hint))
    if isinstance(x, jax.ShapeDtypeStruct):
        hint = (
            "An abstract model (from tl.eval_shape) has shapes but no values. Fix: save\n"
            "a live model; use the abstract one as `like` in tl.load."
        )
        raise TypeError(
            UNSAVEABLE.format(where=format_path(path), what="a ShapeDtypeStruct", hint=hint)
        )
    if is_array(x) or isinstance(x, np.generic):
        return x
    if isinstance(x, bool | int | float | complex):
        return np.asarray(x)
    hint = (
        "A checkpoint stores arrays (jax or numpy) and Python numbers held in\n"
        "Variables. Fix: keep other values as plain (static) attributes of a Module,\n"
        "where they are part of the structure and come from `like` when loading."
    )
    what = f"a {type(x).__name__}"
    raise TypeError(UNSAVEABLE.format(where=format_path(path), what=what, hint=hint))


def _check_replaceable(target: Path) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise FileExistsError(NOT_A_CHECKPOINT_DIR.format(path=target, reason="it is a file"))
    if any(target.iterdir()) and _step_metadata(target) is None:
        reason = "a directory with other files in it"
        raise FileExistsError(NOT_A_CHECKPOINT_DIR.format(path=target, reason=reason))


def _move_into_place(staging: Path, target: Path) -> None:
    """Move the finished checkpoint at ``staging`` to ``target``.

    Afterwards ``staging`` holds the old checkpoint, if there was one, to be deleted.
    """
    if not target.exists():
        os.replace(staging, target)  # atomic
    elif not _exchange(staging, target):
        # No atomic swap here: park the old checkpoint where `_recover` and
        # tl.load's error look for it, so a crash in between loses nothing.
        old = target.with_name(target.name + _OLD)
        os.replace(target, old)
        try:
            os.replace(staging, target)
        except BaseException:
            os.replace(old, target)
            raise
        os.replace(old, staging)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux ``renameat2``); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError, TypeError):  # not glibc / not Linux
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # this filesystem cannot swap
        return False
    raise OSError(code, os.strerror(code), str(b))


def _recover(target: Path) -> None:
    """Undo a swap that a crash interrupted: put the parked old checkpoint back."""
    old = target.with_name(target.name + _OLD)
    if not target.exists() and old.is_dir():
        os.replace(old, target)


def _clean(target: Path) -> None:
    """Delete the staging directories of ``target`` (ours, and orbax's temporary one)."""
    prefix = target.name + _STAGING
    if target.parent.is_dir():
        for sibling in target.parent.iterdir():
            if sibling.name.startswith(prefix) and sibling.is_dir():
                shutil.rmtree(sibling, ignore_errors=True)


# -- load -------------------------------------------------------------------------


def load(path: str | os.PathLike, like: Any) -> Any:
    """Read the checkpoint at ``path`` into a new object with ``like``'s structure.

    ``like`` itself is not modified: write ``model = tl.load(path, model)``.
    It may be a live object or an abstract one from ``tl.eval_shape`` (no
    memory is allocated for it); shapes, dtypes and shardings come from
    ``like``, and each array is read directly into ``like``'s sharding (the
    default device when it has none). The checkpoint must match ``like``
    exactly: the same Variables at the same paths (shared ones shared), the
    same shapes and dtypes; a mismatch is an error and nothing is loaded.

    Arguments:
        path: a directory written by ``tl.save``.
        like: an object of the saved structure, e.g. ``(model, optimizer)``.

    Returns:
        New Modules, Variables, States and containers holding the saved values;
        Python values outside Variables are ``like``'s.

    Example:
        >>> import tempfile, optax, toylib as tl
        >>> from toylib import nn
        >>> model = nn.Linear(2, 3, rngs=0)
        >>> optimizer = tl.Optimizer(model, optax.adam(1e-3))
        >>> tmp = tempfile.TemporaryDirectory()
        >>> path = tmp.name + "/ckpt"
        >>> tl.save(path, (model, optimizer))
        >>> abstract = tl.eval_shape(lambda: nn.Linear(2, 3, rngs=0))
        >>> abstract_opt = tl.eval_shape(lambda m: tl.Optimizer(m, optax.adam(1e-3)), abstract)
        >>> model2, optimizer2 = tl.load(path, (abstract, abstract_opt))
        >>> bool((model2.kernel.value == model.kernel.value).all()), int(optimizer2.step.value)
        (True, 0)
        >>> tmp.cleanup()
    """
    import orbax.checkpoint as ocp

    source = _as_path(path, "tl.load")
    saved = _saved_leaves(source)
    flat = _Flat(like)
    _check_match(source, saved, flat.entries)
    targets = [(p, _restore_target(x)) for p, x in flat.entries]
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(source, args=ocp.args.StandardRestore(_nest(targets)))
    values = [_like_kind(_fetch(restored, p), x) for p, x in flat.entries]
    return flat.rebuild(values)


def _saved_leaves(source: Path) -> dict[str, Any]:
    """The checkpoint's ``{path text: {shape, dtype}}``, or NO_CHECKPOINT saying why not."""
    reason = None
    if not source.exists():
        reason = "the path does not exist"
        old = source.with_name(source.name + _OLD)
        if old.is_dir():
            reason += (
                f" (a save over it was interrupted; the previous checkpoint is complete"
                f" at {old}: rename it back, or save again)"
            )
    elif not source.is_dir():
        reason = "it is a file"
    else:
        metadata = _step_metadata(source)
        if metadata is None:
            reason = "the directory holds no checkpoint"
        elif metadata.commit_timestamp_nsecs is None:
            reason = "it is an unfinished save"
        elif _METADATA not in (metadata.custom_metadata or {}):
            reason = "it is an orbax checkpoint that tl.save did not write; restore it with orbax"
        else:
            return metadata.custom_metadata[_METADATA]["leaves"]
    raise FileNotFoundError(NO_CHECKPOINT.format(path=source, reason=reason))


def _check_match(source: Path, saved: dict[str, Any], entries: list[tuple[Key, Any]]) -> None:
    expected = {format_path(p): _spec(x) for p, x in entries}
    missing = [name for name in expected if name not in saved]
    extra = [name for name in saved if name not in expected]
    if missing or extra:
        details = [
            _listing("in `like`, not in the checkpoint", missing),
            _listing("in the checkpoint, not in `like`", extra),
        ]
        text = "\n".join(d for d in details if d)
        raise ValueError(STRUCTURE_MISMATCH.format(path=source, details=text))
    for kind, message in (("shape", SHAPE_MISMATCH), ("dtype", DTYPE_MISMATCH)):
        wrong = []
        for name, (shape, dtype) in expected.items():
            ours = shape if kind == "shape" else dtype
            theirs = tuple(saved[name]["shape"]) if kind == "shape" else saved[name]["dtype"]
            if ours != theirs:
                wrong.append(f"  `{name}`: {ours} in `like`, {theirs} saved")
        if wrong:
            raise ValueError(message.format(path=source, details=first_few(wrong, lines=True)))


def _listing(label: str, names: list[str]) -> str:
    if not names:
        return ""
    return f"  {label}: {first_few(f'`{n}`' for n in names)}"


def _restore_target(x: Any) -> Any:
    """What orbax restores ``like``'s leaf ``x`` as: its shape, dtype and sharding."""
    if isinstance(x, jax.Array | jax.ShapeDtypeStruct):
        sharding = x.sharding
        if sharding is None:  # an abstract array with no placement: the default device
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    shape, _ = _spec(x)
    return jax.ShapeDtypeStruct(shape, np.asarray(x).dtype)  # no sharding: numpy


def _like_kind(value: Any, x: Any) -> Any:
    """Give a restored value the kind of ``like``'s leaf (a Python number stays one)."""
    if isinstance(x, bool | int | float | complex):
        return type(x)(np.asarray(value).item())
    if isinstance(x, np.generic):
        return np.asarray(value)[()]
    return value


# -- paths and orbax metadata --------------------------------------------------------


def _as_path(path: Any, caller: str) -> Path:
    if not isinstance(path, str | os.PathLike):
        raise TypeError(BAD_PATH.format(caller=caller, kind=type(path).__name__))
    return Path(os.path.abspath(os.fspath(path)))


def _step_metadata(directory: Path) -> Any:
    """orbax's StepMetadata of ``directory``, or None if it has none."""
    import orbax.checkpoint as ocp

    # orbax logs a warning before raising for a missing file; toylib reports it itself.
    with _quiet_absl():
        try:
            return ocp.metadata.get_step_metadata(directory)
        except (ValueError, FileNotFoundError, OSError):
            return None


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
