"""Helpers and small models shared by the tests."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import toylib as tl
from toylib import nn
from toylib._core import graph
from toylib._core.variables import unwrap

# Eight fake CPU devices for the sharding tests (tl.sharding, sharded
# checkpoints), set before JAX starts its backend
# (read when the first array is made, not at import). Arrays still go to device 0
# unless placed, so the single-device tests run as they would on one device.
DEVICES = 8
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
    ).strip()


# -- data -----------------------------------------------------------------------------------


def rand(seed, *shape):
    """A float32 numpy array of standard normals, fixed by ``seed``."""
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def np_init(seed):
    """An initialiser from numpy: fixed values, and no XLA compile per new shape.

    (``jax.random`` compiles a threefry kernel for every new shape, seconds each
    on a busy 2-core machine, so only the default-initialiser tests use it.)
    """
    return lambda key, shape, dtype=jnp.float32: jnp.asarray(rand(seed, *shape), dtype)


# -- models ---------------------------------------------------------------------------------


class Block(tl.Module):
    """A Linear (which may be shared between blocks) then a BatchNorm."""

    def __init__(self, linear: nn.Linear):
        self.linear = linear
        self.bn = nn.BatchNorm(linear.out_features)

    def __call__(self, x):
        return self.bn(self.linear(x))


class DropBlock(tl.Module):
    """Linear, BatchNorm, Dropout, gelu: one of each kind of state (NNX's ScanMLP block)."""

    def __init__(self, dim: int, *, rngs):
        self.linear = nn.Linear(dim, dim, rngs=rngs)
        self.bn = nn.BatchNorm(dim)
        self.dropout = nn.Dropout(0.5, rngs=rngs)

    def __call__(self, x, *, scale=1.0):
        return jax.nn.gelu(self.dropout(self.bn(self.linear(x)))) * scale


class Counter(tl.Module):
    """Counts its calls in an integer Variable; doubles its input."""

    def __init__(self, start=0):
        self.count = tl.Variable(jnp.array(start))

    def __call__(self, x):
        self.count += 1
        return x * 2.0


class CountingLinear(nn.Linear):
    """NNX README's counting Linear: a Linear with a call counter in a plain Variable."""

    def __init__(self, in_features: int, out_features: int, *, rngs):
        super().__init__(in_features, out_features, rngs=rngs)
        self.count = tl.Variable(jnp.array(0))

    def __call__(self, x):
        self.count += 1
        return super().__call__(x)


class Tied(tl.Module):
    """An embedding whose table is also the output projection (one Variable, two places)."""

    def __init__(self, *, rngs, param_dtype=jnp.float32) -> None:
        self.embed = nn.Embed(5, 4, rngs=rngs)
        self.head = nn.Linear(4, 5, param_dtype=param_dtype, rngs=rngs)
        self.head.kernel = self.embed.embedding  # a Variable assigned: replaced, so shared


# -- assertions -----------------------------------------------------------------------------


def assert_trees_close(got: Any, want: Any, *, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """``got`` and ``want`` have the same tree structure, leaf shapes and close values.

    Any pytrees: arrays, tuples, Modules, ``tl.State``. Values are compared in
    float32 (so bfloat16 leaves compare too), the first differing leaf named.
    """
    got_leaves, got_tree = jax.tree.flatten(got)
    want_leaves, want_tree = jax.tree.flatten(want)
    assert got_tree == want_tree, f"tree structures differ:\n{got_tree}\n{want_tree}"
    for i, (g, w) in enumerate(zip(got_leaves, want_leaves, strict=True)):
        assert np.shape(g) == np.shape(w), f"leaf {i}: shape {np.shape(g)} != {np.shape(w)}"
        np.testing.assert_allclose(
            np.asarray(g, np.float32),
            np.asarray(w, np.float32),
            rtol=rtol,
            atol=atol,
            err_msg=f"leaf {i}",
        )


# -- state checks ---------------------------------------------------------------------------


def snapshot(obj: Any) -> list[tuple[Any, Any, Any]]:
    """``(path, leaf object, value object)`` for every leaf of ``obj`` (graph view).

    Compared by identity with ``assert_unchanged``: a failed call that wrote
    anything (a new value, a new Variable, a removed attribute) shows up,
    without reading a value back from the device.
    """
    _, leaves = graph.flatten(obj)
    return [(path, leaf, unwrap(leaf)) for path, leaf in leaves]


def assert_unchanged(obj: Any, before: list[tuple[Any, Any, Any]]) -> None:
    after = snapshot(obj)
    assert [p for p, _, _ in after] == [p for p, _, _ in before], "the structure changed"
    for (path, leaf, value), (_, old_leaf, old_value) in zip(after, before, strict=True):
        assert leaf is old_leaf, f"{path}: the Variable was replaced"
        assert value is old_value, f"{path}: the value was written"


def run_in_threads(*fns: Callable[[], Any], timeout: float = 120) -> list[Any]:
    """Run each function in its own thread, started together; their results (or errors)."""
    barrier = threading.Barrier(len(fns))
    results: list[Any] = [None] * len(fns)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fns[i]()
        except BaseException as error:  # reported to the caller, not lost in the thread
            results[i] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a thread did not finish"
    return results
