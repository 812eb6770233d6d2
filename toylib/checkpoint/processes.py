"""Saving from many processes (``jax.distributed``): who does what, and agreeing on it.

Every process calls ``tl.save`` with the same global arrays, and orbax writes
from each process the shards that process holds. toylib's own file work (the
checks, the staging directory's name, ``toylib.json``, the atomic swap) is done
by the primary process (``jax.process_index() == 0``, orbax's primary too)
alone; its outcome is broadcast, so every process returns once the checkpoint
is in place, or raises if the primary failed. In one process (the usual case)
these are plain calls: nothing is broadcast.
"""

from __future__ import annotations

import hashlib
import textwrap
from collections.abc import Callable

import jax
import numpy as np

PRIMARY_FAILED = """\
tl.save: the primary process (jax.process_index() == 0), which does a save's file
work for every process, failed to {step}:
{error}
Nothing was replaced: a checkpoint already at the path is unchanged. Fix: see the
error above (in full in the primary's own output), then save again, from every
process together.
"""

PATHS_DIFFER = """\
tl.save: the processes were given different paths (this one: {path}); every
process must pass the same one, on a file system they all see: each writes its
own shards into it.
Fix: build the path from values every process shares, e.g. f"{{root}}/step_{{step}}",
not from jax.process_index() or a local temporary directory.
"""

_SIZE = 4096  # bytes broadcast: a staging name, or the start of the primary's error


def many() -> bool:
    """Whether this program runs as several JAX processes."""
    return jax.process_count() > 1


def is_primary() -> bool:
    return jax.process_index() == 0


def on_primary(step: str, fn: Callable[[], str]) -> str:
    """``fn()`` run by the primary process; its result (a str) in every process.

    If ``fn`` raises on the primary, the primary raises its own error and the
    others raise PRIMARY_FAILED quoting it. Every process must call this
    together (it is a collective), with the same ``step``.
    """
    if not many():
        return fn()
    result, error = "", None
    if is_primary():
        try:
            result = fn()
        except BaseException as caught:  # re-raised below, after the others have heard
            error = caught
            result = f"{type(caught).__name__}: {caught}"
    ok, text = _broadcast(error is None, result)
    if error is not None:
        raise error
    if not ok:
        error_text = textwrap.indent(text.strip(), "    ")
        raise RuntimeError(PRIMARY_FAILED.format(step=step, error=error_text))
    return text


def check_same_path(path: str) -> None:
    """PATHS_DIFFER in every process unless all of them pass this ``path``.

    Each process writes its shards where it is told; with different paths the
    primary's checkpoint would lack the others' files. A collective: every
    process calls it.
    """
    if not many():
        return
    from jax.experimental import multihost_utils

    digest = np.frombuffer(hashlib.sha256(path.encode()).digest(), np.uint8)
    every = np.asarray(multihost_utils.process_allgather(digest))  # (processes, 32)
    if not (every == every[0]).all():
        raise ValueError(PATHS_DIFFER.format(path=path))


def _broadcast(ok: bool, text: str) -> tuple[bool, str]:
    """The primary's ``(ok, text)`` in every process (text cut to ``_SIZE - 1`` bytes)."""
    from jax.experimental import multihost_utils

    data = text.encode()[: _SIZE - 1]
    buffer = np.zeros(_SIZE + 1, np.uint8)
    buffer[0] = ok
    buffer[1 : 1 + len(data)] = np.frombuffer(data, np.uint8)
    got = np.asarray(multihost_utils.broadcast_one_to_all(buffer, is_source=is_primary()))
    return bool(got[0]), bytes(got[1:]).rstrip(b"\0").decode(errors="replace")


def host_local(x: object) -> bool:
    """Whether ``x`` is a jax array that lives on this process's devices only.

    With several processes orbax refuses such arrays (each process holds its own
    copy: a fresh model's, or a counter made outside a jitted step). toylib
    writes the primary's copy, as a numpy array, which orbax writes from the
    primary alone. SPMD programs keep these copies equal on every process.
    """
    return many() and isinstance(x, jax.Array) and x.is_fully_addressable
