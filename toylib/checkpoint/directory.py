"""``tl.save(path, obj)`` and ``tl.load(path, like)``: a checkpoint directory, on orbax.

The directory holds orbax's files (one zarr array per stored array, no OCDBT
database, so each file belongs to one array) and ``toylib.json``: the format
version, every stored array's model path, shape and dtype, and the size and
CRC-32C of every file orbax wrote. ``toylib.json`` is written last, inside the
staging directory, so a directory that has it is a whole checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np

from toylib._core.paths import format_path, nest
from toylib.checkpoint import moves, processes
from toylib.checkpoint.entries import (
    DAMAGED,
    Entry,
    Flat,
    Key,
    check_match,
    data_like,
    finish,
    to_store,
)

__all__ = ["load", "save"]

NO_CHECKPOINT = """\
tl.load: there is no checkpoint at {path}: {reason}.
Fix: pass the directory that tl.save wrote, and a `like` of the same structure:

    tl.save("/ckpt/step_100", (model, optimizer))
    model, optimizer = tl.load("/ckpt/step_100", (model, optimizer))
"""

UNREADABLE = """\
tl.load: could not read the checkpoint at {path}: {error}
Nothing was loaded. Every file's size and digest matched what tl.save wrote, so
the files are as saved; the reader failed on them (a version of orbax or
tensorstore that cannot read them, or a file system error). Fix: load it with
the versions that wrote it, or save again.
"""

NAME_CLASH = """\
tl.save: `{first}` and `{second}` would be stored under the same name {name!r}
(checkpoint names join the path's keys with dots, and keys are written as text).
Fix: rename one of the dict keys so the two paths differ as text.
"""

BAD_PATH = """\
{caller}: `path` must be a str or os.PathLike naming a directory, got a {kind}.
Fix: tl.save(path, obj) and obj = tl.load(path, like), path first.
"""

MANIFEST = "toylib.json"
FORMAT = 2
_CHUNK = 1 << 22  # bytes read at a time when computing a digest


# -- save -------------------------------------------------------------------------


def save(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj``'s state to the directory ``path``, atomically.

    ``obj`` is anything toylib's graph view understands: a Module (a
    ``tl.Optimizer`` is one), a State, a Variable, an array, or a tuple, list
    or dict of these. What is stored is every array held by a Variable (or
    directly as an array attribute) under its model path, once per Variable:
    a tied weight is written once and comes back as one object. Python values
    outside Variables (layer sizes, activations, ``tx``) are structure: they
    come from ``like`` when loading. RNG keys and counters are state, so a
    resumed run draws the same dropout masks as one that never stopped.

    The save is atomic and safe to run concurrently: the files are written to
    a staging directory of this call's own, with a CRC-32C of each file, then
    moved into place under an exclusive lock on the parent directory. Saving
    over a checkpoint swaps the two directories in one rename, so ``path``
    always holds one whole checkpoint: the old one, or one of the writers'.
    Only an earlier checkpoint or an empty directory is ever replaced.

    A sharded model is written shard by shard. Under ``jax.distributed``
    every process calls ``tl.save`` with the same arrays: orbax writes from
    each process the shards it holds, the primary process alone does the
    file work above, and every process returns once the checkpoint is in
    place (or raises, if the primary failed).

    Arguments:
        path: the checkpoint directory. If it exists it must hold an earlier
            checkpoint (or be empty).
        obj: a Module, State, Variable or array, or a tuple/list/dict of
            these, e.g. ``(model, optimizer)``.

    Returns:
        None, once the checkpoint is in place (the call blocks; it reads the
        arrays from the device).

    Example:
        >>> import tempfile, toylib as tl
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

    target = as_path(path, "tl.save")
    _, stored = to_store(obj, "tl.save")
    _nest([(p, x) for p, x, _ in stored])  # two paths with one name: an error, before writing
    # orbax cannot store an array with no elements; the manifest's shape and dtype are all of it.
    # With several processes, an array held by this process alone is written from the primary's.
    tree = _nest(
        [(p, np.asarray(x) if processes.host_local(x) else x) for p, x, _ in stored if x.size]
    )
    processes.check_same_path(str(target))
    # Every process calls save; the primary alone checks the path and names the
    # staging directory (its host and pid, so a later save can tell if it died).
    name = processes.on_primary(
        "check the path and make the staging directory", lambda: _stage(target)
    )
    staging = target.with_name(name)
    try:
        if tree:  # orbax writes each process's shards, and waits for all of them
            with moves.quiet_absl(), ocp.Checkpointer(_handler()) as checkpointer:
                checkpointer.save(staging, args=ocp.args.PyTreeSave(tree))
        elif processes.is_primary():
            staging.mkdir()
        # All files are written: the primary digests them and swaps the directory
        # in; the others wait for it, so every process returns once it is in place.
        processes.on_primary(
            "put the checkpoint in place", lambda: _finish(staging, target, stored)
        )
    finally:
        if processes.is_primary():
            moves.remove(staging)  # the new checkpoint if something failed, else the old one


def _stage(target: Path) -> str:
    moves.check_replaceable(target, _is_checkpoint)
    return moves.staging_for(target).name


def _finish(staging: Path, target: Path, stored: list[Entry]) -> str:
    _write_manifest(staging, stored)
    moves.move_into_place(staging, target, _is_checkpoint)
    moves.remove(staging)  # now the old checkpoint, if there was one
    return ""


def _handler() -> Any:
    import orbax.checkpoint as ocp

    # Without OCDBT each array has its own directory, so a damaged file names
    # its array. Without compression (orbax's default is zstd) saves and loads
    # run about twice as fast on trained weights, which shrink by under 10%.
    return ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_compression=False)


def _write_manifest(staging: Path, stored: list[Entry]) -> None:
    leaves = {}
    for path, _, meta in stored:
        leaves[format_path(path)] = {**meta, "name": ".".join(_name(path))}
    written = sorted(p for p in staging.rglob("*") if p.is_file())
    with _pool() as pool:
        crcs = list(pool.map(_crc32c, written))
    files = {
        file.relative_to(staging).as_posix(): [file.stat().st_size, crc]
        for file, crc in zip(written, crcs, strict=True)
    }
    manifest = {"format": FORMAT, "digest": "crc32c", "leaves": leaves, "files": files}
    with open(staging / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _pool() -> ThreadPoolExecutor:
    # Reading a file releases the GIL, so files are read and digested in parallel.
    return ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))


def _crc32c(file: Path) -> int:
    crc = 0
    with open(file, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            crc = google_crc32c.extend(crc, chunk)
    return crc


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


# -- load -------------------------------------------------------------------------


def load(path: str | os.PathLike, like: Any, *, verify: bool = True) -> Any:
    """Read the checkpoint at ``path`` into a new object with ``like``'s structure.

    ``like`` itself is not modified: write ``model = tl.load(path, model)``.
    It may be a live object or an abstract one from ``tl.eval_shape``. The
    checkpoint must match it exactly (the same Variables at the same paths,
    shared ones shared, the same shapes and dtypes), else nothing is loaded.

    Each array is placed as ``like``'s is: read straight into its sharding when
    ``like``'s array is committed to devices or sharded (or an abstract one
    carries a sharding, or its Variable records a ``tl.sharding`` placement),
    each device reading only its own shard, on any mesh and in any number of
    processes, whatever the saving ones were; uncommitted on the default
    device otherwise, as a freshly built model's arrays are, so a ``tl.jit``
    step compiled for fresh objects is not compiled again for loaded ones.

    Arguments:
        path: a directory written by ``tl.save``.
        like: an object of the saved structure, e.g. ``(model, optimizer)``.
        verify: check every file's CRC-32C against the one written at save
            (on by default; it reads each file once more). A file of the wrong
            size is an error either way.

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
    source = as_path(path, "tl.load")
    flat = Flat(like)
    # A shared lock: a concurrent save waits to swap directories until this read is done.
    with moves.locked(source.parent, exclusive=False):
        manifest = _read_manifest(source)
        where = f"the checkpoint at {source}"
        check_match(manifest["leaves"], flat.entries, "tl.load", where)
        _check_files(source, manifest)  # sizes, before anything is read
        with _pool() as pool:
            # The digests are computed while orbax reads; a mismatch discards what it read.
            files = [source / relative for relative in manifest["files"]]
            pending = [pool.submit(_crc32c, file) for file in files] if verify else []
            try:
                values = _restore(source, manifest, flat)
            except Exception as error:  # orbax/tensorstore: a digest may say which file
                _check_files(source, manifest, list(pool.map(_crc32c, files)))
                raise OSError(UNREADABLE.format(path=source, error=error)) from error
            if verify:
                _check_files(source, manifest, [p.result() for p in pending])
    return flat.rebuild(values)


def _restore(source: Path, manifest: dict[str, Any], flat: Flat) -> list[Any]:
    import orbax.checkpoint as ocp

    targets = [(p, data_like(x)) for p, x in flat.entries]
    stored = [(p, t) for p, t in targets if math.prod(t.shape)]  # empty arrays are not stored
    restored: dict = {}
    if stored:
        # Committed arrays are read straight into their sharding; the others as
        # numpy, and `finish` puts them on the default device uncommitted.
        how = [(p, _restore_args(t)) for p, t in stored]
        args = ocp.args.PyTreeRestore(item=_nest(stored), restore_args=_nest(how))
        with moves.quiet_absl(), ocp.Checkpointer(_handler()) as checkpointer:
            restored = checkpointer.restore(source, args=args)
    leaves = manifest["leaves"]
    return [
        finish(
            _fetch(restored, p) if math.prod(t.shape) else np.zeros(t.shape, t.dtype),
            x,
            leaves[format_path(p)],
        )
        for (p, t), (_, x) in zip(targets, flat.entries, strict=True)
    ]


def _restore_args(target: Any) -> Any:
    import orbax.checkpoint as ocp

    if target.sharding is None:
        return ocp.RestoreArgs(restore_type=np.ndarray)
    return ocp.ArrayRestoreArgs(sharding=target.sharding)


def _read_manifest(source: Path) -> dict[str, Any]:
    """``toylib.json`` of ``source``, or NO_CHECKPOINT / DAMAGED saying why not."""
    file = source / MANIFEST
    if file.is_file():
        try:
            manifest = json.loads(file.read_bytes())
            if manifest["format"] == FORMAT:
                return manifest
            problem = f"has format {manifest['format']}, this toylib reads format {FORMAT}"
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
            problem = f"cannot be read ({type(error).__name__}: {error})"
        raise OSError(
            DAMAGED.format(
                caller="tl.load",
                source=f"the checkpoint at {source}",
                file=file,
                holds="the list of arrays and digests",
                problem=problem,
            )
        )
    raise FileNotFoundError(NO_CHECKPOINT.format(path=source, reason=_why_not(source)))


def _why_not(source: Path) -> str:
    if not source.exists():
        reason = "the path does not exist"
        old = moves.parked(source)
        if old.is_dir():
            reason += (
                f" (a save over it was interrupted; the previous checkpoint is complete"
                f" at {old}: rename it back, or save again)"
            )
        return reason
    if not source.is_dir():
        return "it is a file"
    metadata = moves.step_metadata(source)
    if metadata is None:
        return "the directory holds no checkpoint"
    if "toylib" in (metadata.custom_metadata or {}):
        return (
            "it was written by toylib 0.1 (format 1, without digests), which this toylib"
            " does not read; restore its arrays with orbax"
            " (`ocp.StandardCheckpointer().restore(path)`) and save again"
        )
    if metadata.commit_timestamp_nsecs is None:
        return "it is an unfinished save"
    return "it is an orbax checkpoint that tl.save did not write; restore it with orbax"


def _check_files(source: Path, manifest: dict[str, Any], crcs: list[int] | None = None) -> None:
    """Every file of the manifest there, of its size, and of its CRC-32C if ``crcs`` are given."""
    owners = {leaf["name"]: path for path, leaf in manifest["leaves"].items()}
    for i, (relative, (size, crc)) in enumerate(manifest["files"].items()):
        file = source / relative
        problem = None
        if not file.is_file():
            problem = "is missing"
        elif file.stat().st_size != size:
            problem = f"has {file.stat().st_size} bytes, {size} were written"
        elif crcs is not None and crcs[i] != crc:
            problem = "does not match the CRC-32C digest written at save"
        if problem is not None:
            owner = owners.get(relative.split("/")[0])
            holds = f"`{owner}`" if owner else "the checkpoint's metadata"
            raise OSError(
                DAMAGED.format(
                    caller="tl.load",
                    source=f"the checkpoint at {source}",
                    file=file,
                    holds=holds,
                    problem=problem,
                )
            )


def _is_checkpoint(directory: Path) -> bool:
    """Whether ``directory`` holds a checkpoint that a save may replace."""
    return (directory / MANIFEST).is_file() or moves.step_metadata(directory) is not None


def as_path(path: Any, caller: str) -> Path:
    if not isinstance(path, str | os.PathLike):
        raise TypeError(BAD_PATH.format(caller=caller, kind=type(path).__name__))
    return Path(os.path.abspath(os.fspath(path)))
