"""``tl.save_bytes(obj)`` and ``tl.load_bytes(blob, like)``: a checkpoint as one ``bytes``.

For sending a model over the wire or keeping it in a database. It stores what
``tl.save`` stores and ``tl.load_bytes`` runs ``tl.load``'s checks. The format
(version 1) is documented so that other code can read it; it holds no pickle,
only JSON and raw array bytes:

=========  ================================================================
bytes      content
=========  ================================================================
0-7        the magic ``b"\\x89TOYLIB\\n"``
8-15       ``n``, the header's length in bytes (unsigned, little-endian)
16-16+n    the header: UTF-8 JSON ``{"format": 1, "digest": "crc32c",
           "leaves": {model path: {"shape", "dtype", ["key"], "data"}}}``
then       the arrays' bytes, C order, each at ``data.offset`` (counted
           from the end of the header, 64-byte aligned), ``data.nbytes``
           long, with ``data.dtype`` / ``data.shape`` (a PRNG key is stored
           as its key data, ``key`` naming its implementation) and
           ``data.crc32c``, the CRC-32C of those bytes
=========  ================================================================
"""

from __future__ import annotations

import json
import struct
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from google_crc32c import value as crc32c

from toylib._core.paths import format_path
from toylib.checkpoint.entries import DAMAGED, Flat, check_match, finish, to_store

__all__ = ["load_bytes", "save_bytes"]

MAGIC = b"\x89TOYLIB\n"
FORMAT = 1
_ALIGN = 64
_SOURCE = "the blob given to tl.load_bytes"

NOT_A_BLOB = """\
tl.load_bytes: {what} is not a checkpoint written by tl.save_bytes ({reason}).
Fix: pass the bytes that tl.save_bytes returned, unchanged, and a `like` of the
saved structure: `model = tl.load_bytes(blob, model)`.
"""


SPANS_PROCESSES = """\
tl.save_bytes: `{path}` is sharded over the devices of several processes, and this
process holds only its own shards of it, so one process's blob cannot hold it.
Fix: save with tl.save(path, obj), which writes each shard from the process that
holds it (every process calls it), or gather the arrays into every process first
(jax.experimental.multihost_utils.process_allgather).
"""


def save_bytes(obj: Any) -> bytes:
    """``obj``'s state as one ``bytes`` object, in toylib's blob format (version 1).

    It stores what ``tl.save`` stores: every array held by a Variable once
    (a tied weight once), dtypes as they are, PRNG keys with their
    implementation, and a CRC-32C of each array. Python values outside
    Variables are structure and come from ``like`` when loading.

    Arguments:
        obj: a Module, State, Variable or array, or a tuple/list/dict of these.

    Returns:
        The blob (it reads the arrays from the device).

    Example:
        >>> import toylib as tl
        >>> from toylib import nn
        >>> model = nn.Linear(2, 3, rngs=0)
        >>> blob = tl.save_bytes(model)
        >>> blob[:8]
        b'\\x89TOYLIB\\n'
        >>> restored = tl.load_bytes(blob, nn.Linear(2, 3, rngs=1))
        >>> bool((restored.kernel.value == model.kernel.value).all())
        True
    """
    _, stored = to_store(obj, "tl.save_bytes")
    for path, x, _ in stored:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            raise ValueError(SPANS_PROCESSES.format(path=format_path(path)))
    hosts = jax.device_get([x for _, x, _ in stored])  # one transfer for all arrays
    leaves, chunks, offset = {}, [], 0
    for (path, _, meta), host in zip(stored, hosts, strict=True):
        data = np.ascontiguousarray(host).tobytes()
        pad = -offset % _ALIGN
        chunks += [b"\0" * pad, data]
        offset += pad
        leaves[format_path(path)] = {
            **meta,
            "data": {
                "dtype": str(host.dtype),
                "shape": list(np.shape(host)),
                "offset": offset,
                "nbytes": len(data),
                "crc32c": crc32c(data),
            },
        }
        offset += len(data)
    header = json.dumps({"format": FORMAT, "digest": "crc32c", "leaves": leaves}).encode()
    header += b" " * (-(len(MAGIC) + 8 + len(header)) % _ALIGN)  # arrays start aligned
    return b"".join([MAGIC, struct.pack("<Q", len(header)), header, *chunks])


def load_bytes(blob: bytes | bytearray | memoryview, like: Any, *, verify: bool = True) -> Any:
    """Read a blob from ``tl.save_bytes`` into a new object with ``like``'s structure.

    The checks, errors and placement are ``tl.load``'s: the blob must match
    ``like`` exactly (paths, shared Variables, shapes, dtypes), ``like`` is not
    modified, and each array is committed to ``like``'s sharding when
    ``like``'s is committed, uncommitted otherwise.

    Arguments:
        blob: the bytes ``tl.save_bytes`` returned.
        like: an object of the saved structure, live or from ``tl.eval_shape``.
        verify: check each array's CRC-32C (on by default). A blob cut short is
            an error either way.

    Returns:
        New Modules, Variables, States and containers holding the saved values.

    Example:
        >>> import optax, toylib as tl
        >>> from toylib import nn
        >>> model = nn.Linear(2, 3, rngs=0)
        >>> optimizer = tl.Optimizer(model, optax.adam(1e-3))
        >>> blob = tl.save_bytes((model, optimizer))
        >>> like = nn.Linear(2, 3, rngs=5)
        >>> model2, optimizer2 = tl.load_bytes(blob, (like, tl.Optimizer(like, optax.adam(1e-3))))
        >>> bool((model2.kernel.value == model.kernel.value).all()), int(optimizer2.step.value)
        (True, 0)
    """
    if not isinstance(blob, bytes | bytearray | memoryview):
        what = f"a {type(blob).__name__}"
        raise TypeError(NOT_A_BLOB.format(what=what, reason="it is not bytes"))
    view = memoryview(blob).cast("B")
    header, start = _header(view)
    flat = Flat(like)
    check_match(header["leaves"], flat.entries, "tl.load_bytes", _SOURCE)
    values = []
    for path, x in flat.entries:
        meta = header["leaves"][format_path(path)]
        values.append(finish(_array(view, start, format_path(path), meta, verify), x, meta))
    return flat.rebuild(values)


def _header(view: memoryview) -> tuple[dict[str, Any], int]:
    """The blob's header and where its arrays start, or NOT_A_BLOB / DAMAGED."""
    if len(view) < len(MAGIC) + 8 or view[: len(MAGIC)] != MAGIC:
        reason = "it does not start with toylib's magic bytes"
        raise ValueError(NOT_A_BLOB.format(what=f"the {len(view)} bytes given", reason=reason))
    (length,) = struct.unpack("<Q", view[len(MAGIC) : len(MAGIC) + 8])
    start = len(MAGIC) + 8 + length
    problem = None
    if start > len(view):
        problem = f"is cut short: {len(view)} bytes, the header alone needs {start}"
    else:
        try:
            header = json.loads(bytes(view[len(MAGIC) + 8 : start]))
            if header["format"] != FORMAT:
                problem = f"has format {header['format']}, this toylib reads format {FORMAT}"
        except (ValueError, KeyError, TypeError) as error:
            problem = f"cannot be read ({type(error).__name__}: {error})"
    if problem is not None:
        raise ValueError(
            DAMAGED.format(
                caller="tl.load_bytes",
                source=_SOURCE,
                file="its header",
                holds="the list of arrays and digests",
                problem=problem,
            )
        )
    return header, start


def _array(view: memoryview, start: int, name: str, meta: dict, verify: bool) -> np.ndarray:
    """The host array stored for ``name``, checked against its size and digest."""
    data = meta["data"]
    begin = start + data["offset"]
    end = begin + data["nbytes"]
    problem = None
    if end > len(view):
        problem = f"is cut short: the blob has {len(view)} bytes, this array ends at {end}"
    else:
        raw = np.frombuffer(view[begin:end], np.uint8)  # no copy
        if verify and crc32c(raw) != data["crc32c"]:
            problem = "does not match the CRC-32C digest written at save"
    if problem is not None:
        raise ValueError(
            DAMAGED.format(
                caller="tl.load_bytes",
                source=_SOURCE,
                file=f"bytes {begin}-{end}",
                holds=f"`{name}`",
                problem=problem,
            )
        )
    dtype = jnp.dtype(data["dtype"])  # knows bfloat16 and the other ml_dtypes
    return raw.view(dtype).reshape(data["shape"])
