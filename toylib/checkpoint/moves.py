"""Putting a finished checkpoint in place: staging names, the lock, the atomic swap.

A save writes into a staging directory next to ``path`` whose name is its own
(``<name>.toylib-tmp.<host>.<pid>.<random>``), so concurrent saves never touch
each other's files. Only the last step, swapping the staging directory with
``path``, runs under an exclusive ``flock`` on the parent directory; a load
holds a shared one, so it never reads a directory that is being swapped out.
Staging directories of processes that died (same host, pid gone) are removed
by the next save under the lock; live ones are left alone.

Saving over an existing checkpoint swaps the two directories in one atomic
rename (Linux ``renameat2(RENAME_EXCHANGE)``). Where the filesystem cannot,
the old checkpoint is first parked at ``<path>.toylib-old``; the next save
puts it back if a crash left ``path`` empty, and ``tl.load`` points to it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import secrets
import shutil
import socket
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

STAGING = ".toylib-tmp"  # the new checkpoint (orbax adds its own tmp suffix to it)
OLD = ".toylib-old"  # the old one, only where directories cannot be swapped atomically

NOT_A_CHECKPOINT_DIR = """\
tl.save: {path} exists and is not a checkpoint ({reason}). tl.save replaces an
earlier checkpoint or an empty directory, never other files.
Fix: save to a new path (e.g. one directory per step: f"{{root}}/step_{{step}}"),
or remove {path} yourself if it can go.
"""

UNWRITABLE = """\
tl.save: cannot write the checkpoint {path}: {error}.
Nothing was written, and a checkpoint already at {path} is unchanged. Fix: save
into a directory you can write to (check its permissions and free space).
"""

NO_LOCK = """\
tl.save/tl.load: the file system of {directory} does not support flock ({error}),
so concurrent saves to one path there are not protected against each other.
A single writer at a time is still safe (each save is atomic).
"""


def staging_for(target: Path) -> Path:
    """This save's own staging path next to ``target``; UNWRITABLE if it cannot be made."""
    name = f"{target.name}{STAGING}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}"
    staging = target.with_name(name)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()  # a probe: orbax wants to create the directory itself
        staging.rmdir()
    except OSError as error:
        kind = PermissionError if isinstance(error, PermissionError) else OSError
        raise kind(UNWRITABLE.format(path=target, error=error)) from error
    return staging


def check_replaceable(target: Path, is_checkpoint: Callable[[Path], bool]) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise FileExistsError(NOT_A_CHECKPOINT_DIR.format(path=target, reason="it is a file"))
    if any(target.iterdir()) and not is_checkpoint(target):
        reason = "a directory with other files in it"
        raise FileExistsError(NOT_A_CHECKPOINT_DIR.format(path=target, reason=reason))


def move_into_place(staging: Path, target: Path, is_checkpoint: Callable[[Path], bool]) -> None:
    """Move the finished checkpoint at ``staging`` to ``target``, under the lock.

    Afterwards ``staging`` holds the old checkpoint, if there was one, to be deleted.
    """
    with locked(target.parent, exclusive=True):
        _recover(target)
        check_replaceable(target, is_checkpoint)  # again: another save may have run
        _remove_stale(target)
        if not target.exists():
            os.replace(staging, target)  # atomic
        elif not exchange(staging, target):
            # No atomic swap here: park the old checkpoint where `_recover` and
            # tl.load's error look for it, so a crash in between loses nothing.
            old = parked(target)
            os.replace(target, old)
            try:
                os.replace(staging, target)
            except BaseException:
                os.replace(old, target)
                raise
            os.replace(old, staging)


@contextlib.contextmanager
def locked(directory: Path, exclusive: bool) -> Iterator[None]:
    """Hold a ``flock`` on ``directory`` (exclusive to swap, shared to read).

    flock locks belong to one open file description, so two threads of one
    process exclude each other as two processes do.
    """
    try:
        fd = os.open(directory, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        yield  # nothing there to protect; the caller reports the missing path
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            warnings.warn(NO_LOCK.format(directory=directory, error=error), stacklevel=4)
        yield
    finally:
        os.close(fd)  # releases the lock


def parked(target: Path) -> Path:
    return target.with_name(target.name + OLD)


def remove(staging: Path) -> None:
    """Delete ``staging`` and orbax's temporary directory for it, if any."""
    if staging.parent.is_dir():
        for sibling in staging.parent.iterdir():
            if sibling.name == staging.name or sibling.name.startswith(staging.name + "."):
                shutil.rmtree(sibling, ignore_errors=True)


def _recover(target: Path) -> None:
    """Undo a swap that a crash interrupted: put the parked old checkpoint back."""
    old = parked(target)
    if not target.exists() and old.is_dir():
        os.replace(old, target)


def _remove_stale(target: Path) -> None:
    """Delete staging directories left by saves whose process is gone."""
    prefix = target.name + STAGING
    for sibling in target.parent.iterdir():
        if sibling.name.startswith(prefix) and not _owner_alive(sibling.name[len(prefix) :]):
            shutil.rmtree(sibling, ignore_errors=True)


def _owner_alive(suffix: str) -> bool:
    """Whether the save that named its staging ``<target><STAGING><suffix>`` may still run."""
    fields = suffix.split(".orbax-checkpoint-tmp")[0].rsplit(".", 2)
    if len(fields) != 3 or not fields[0].startswith(".") or not fields[1].isdigit():
        return False  # not a name of this format: left by an older toylib
    if fields[0][1:] != socket.gethostname():
        return True  # another machine's save (a shared file system): not ours to judge
    try:
        os.kill(int(fields[1]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange(a: Path, b: Path) -> bool:
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


def step_metadata(directory: Path) -> Any:
    """orbax's StepMetadata of ``directory``, or None if it has none."""
    import orbax.checkpoint as ocp

    # orbax logs a warning before raising for a missing file; toylib reports it itself.
    with quiet_absl():
        try:
            return ocp.metadata.get_step_metadata(directory)
        except (ValueError, FileNotFoundError, OSError):
            return None


@contextlib.contextmanager
def quiet_absl() -> Iterator[None]:
    """Drop orbax's absl warnings logged by this thread during the block.

    toylib reports what matters itself; the ones orbax logs here are about its
    optional features (e.g. "skipping merge of OCDBT checkpoints", as toylib
    turns OCDBT off) or precede an exception toylib turns into its own error.
    A filter of this thread's records, not a change of the logger's level:
    another thread's warnings still show.
    """
    logger = logging.getLogger("absl")
    thread = threading.get_ident()

    def keep(record: logging.LogRecord) -> bool:
        return record.thread != thread or record.levelno >= logging.ERROR

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)
