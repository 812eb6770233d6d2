"""One process of the many-process test (tests/test_multiprocess.py), and the code it runs.

Run by ``distributed.launch`` as 2 processes x 4 CPU devices, it trains a small
MLP for three steps data x model parallel on a ("data", "model") = (2, 4)
mesh, each process feeding its own rows of the batch; saves the model and
optimizer with ``tl.save``; loads them back in both processes onto the same
mesh and onto a (4, 2) one, and loads one that a single process saved; and
prints what it saw as JSON lines. The test runs ``train`` itself, in one
process with 8 devices, saves that checkpoint, and compares.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import toylib as tl
from toylib import nn
from toylib.checkpoint import directory

ROWS, FEATURES, HIDDEN, OUT = 16, 8, 32, 4
STEPS = 3
# Data parallel over "data" (the batch's rows), model parallel over "model" (the hidden units).
RULES = {"batch": "data", "embed": None, "mlp": "model"}
TX = optax.adam(1e-2)  # one transformation: a static attribute of tl.Optimizer


class MLP(tl.Module):
    def __init__(self) -> None:
        # Fixed numpy weights: the same model in every process, without a random compile.
        rng = np.random.default_rng(0)
        self.l1 = nn.Linear(
            FEATURES, HIDDEN, rngs=0, kernel_sharding=("embed", "mlp"), bias_sharding=("mlp",)
        )
        # l2.bias: no names, replicated
        self.l2 = nn.Linear(HIDDEN, OUT, rngs=0, kernel_sharding=("mlp", "embed"))
        self.l1.kernel.value = jnp.asarray(rng.normal(size=(FEATURES, HIDDEN)), jnp.float32)
        self.l2.kernel.value = jnp.asarray(rng.normal(size=(HIDDEN, OUT)) * 0.2, jnp.float32)

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x)))


def mesh(shape: tuple[int, int]) -> jax.sharding.Mesh:
    return tl.sharding.make_mesh(shape, ("data", "model"))


def make(the_mesh: jax.sharding.Mesh | None) -> tuple[MLP, tl.Optimizer]:
    """The model, placed on ``the_mesh`` (None: not placed), and its optimizer.

    Every process builds the same full values; ``shard`` keeps each one's own shards.
    """
    model = MLP()
    if the_mesh is not None:
        tl.sharding.shard(model, the_mesh, RULES)
    return model, tl.Optimizer(model, TX)  # its state placed like the Params


def data() -> tuple[np.ndarray, np.ndarray]:
    """The whole batch (every process can make it; each feeds only its rows)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(ROWS, FEATURES)).astype(np.float32)
    return x, np.sin(x[:, :OUT]).astype(np.float32)


def batch(rows: np.ndarray, the_mesh: jax.sharding.Mesh) -> jax.Array:
    """A global array of ROWS rows from this process's own ``rows``."""
    return tl.sharding.batch(rows, ("batch", None), mesh=the_mesh, rules=RULES)


def my_rows() -> slice:
    """The rows this process feeds: the "data" axis of mesh((2, 4)) runs across processes."""
    per = ROWS // jax.process_count()
    return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


@tl.jit
def train_step(model, optimizer, x, y):
    loss, grads = tl.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss


def train(the_mesh: jax.sharding.Mesh) -> tuple[MLP, tl.Optimizer, list[float]]:
    """STEPS steps on ``the_mesh``, each process feeding its own rows; the losses."""
    model, optimizer = make(the_mesh)
    x, y = data()
    xs, ys = batch(x[my_rows()], the_mesh), batch(y[my_rows()], the_mesh)
    losses = [float(train_step(model, optimizer, xs, ys)) for _ in range(STEPS)]
    return model, optimizer, losses


def shards_equal(a: jax.Array, b: jax.Array) -> bool:
    """Whether this process's shards of ``a`` and ``b`` (sharded alike) hold the same values."""
    pairs = zip(a.addressable_shards, b.addressable_shards, strict=True)
    return all(np.array_equal(np.asarray(s.data), np.asarray(t.data)) for s, t in pairs)


def shards_close(a: jax.Array, b: jax.Array) -> bool:
    """``shards_equal`` within 1e-5 (another process count may round differently)."""
    pairs = zip(a.addressable_shards, b.addressable_shards, strict=True)
    return all(np.allclose(s.data, t.data, rtol=1e-5, atol=1e-5) for s, t in pairs)


def main(path: str, saved_by_one: str) -> None:
    import distributed  # tests/distributed.py, on PYTHONPATH

    distributed.initialize()
    report = lambda **fields: print(json.dumps(fields), flush=True)  # noqa: E731
    report(process=jax.process_index(), devices=len(jax.devices()), local=jax.local_device_count())
    rows = batch(data()[0][my_rows()], mesh((2, 4)))
    report(rows=sorted({s.index[0].start for s in rows.addressable_shards}))

    # Built directly sharded in every process (one compiled constructor): the
    # values shard() placed from each process's full copy.
    built, placed = tl.sharding.init(MLP, mesh((2, 4)), RULES), make(mesh((2, 4)))[0]
    pairs = zip(jax.tree.leaves(built), jax.tree.leaves(placed), strict=True)
    report(init_equals_shard=all(a.sharding == b.sharding and shards_equal(a, b) for a, b in pairs))

    model, optimizer, losses = train(mesh((2, 4)))
    report(losses=losses)
    tl.save(path, (model, optimizer))  # every process writes its own shards
    trained = jax.tree.leaves((model, optimizer))

    # A checkpoint saved by one process with 8 devices, after the same training.
    one = jax.tree.leaves(tl.load(saved_by_one, (model, optimizer)))
    report(from_one=all(shards_close(a, b) for a, b in zip(one, trained, strict=True)))

    # Back onto the same mesh: each process reads its shards only.
    loaded = jax.tree.leaves(tl.load(path, (model, optimizer)))
    report(same_mesh=all(shards_equal(a, b) for a, b in zip(loaded, trained, strict=True)))
    # Onto a (4, 2) mesh, checked against the whole arrays read into each process.
    other = tl.load(path, make(mesh((4, 2))))
    fresh = make(None)
    whole = tl.load(path, fresh)  # uncommitted like: the full arrays, in each process
    same = all(
        np.array_equal(np.asarray(s.data), np.asarray(w)[s.index])
        for a, w in zip(jax.tree.leaves(other), jax.tree.leaves(whole), strict=True)
        for s in a.addressable_shards
    )
    kernel = other[0].l1.kernel.value
    report(
        other_mesh=same,
        spec=str(kernel.sharding.spec),
        shard_shapes=sorted({s.data.shape for s in kernel.addressable_shards}),
    )

    # One process's blob cannot hold another's shards; a blob loads onto the mesh.
    report(blob=error_of(lambda: tl.save_bytes(model)))
    blob = tl.load_bytes(tl.save_bytes(whole), make(mesh((2, 4))))
    report(
        blob_loaded=all(
            shards_equal(a, b) for a, b in zip(jax.tree.leaves(blob), trained, strict=True)
        )
    )

    # Saves that fail on the primary: every process raises, nothing is replaced.
    not_a_checkpoint = os.path.join(os.path.dirname(path), "a_file")
    if jax.process_index() == 0:
        open(not_a_checkpoint, "w").close()
    report(refused=error_of(lambda: tl.save(not_a_checkpoint, fresh)))
    mine = f"{path}_{jax.process_index()}"
    report(paths_differ=error_of(lambda: tl.save(mine, fresh)))

    def broken(*_: Any) -> None:  # the primary alone writes toylib.json
        raise OSError("disk full (injected)")

    directory._write_manifest = broken
    report(failed=error_of(lambda: tl.save(path, fresh)))
    kept = jax.tree.leaves(tl.load(path, (model, optimizer)))
    report(kept=all(shards_equal(a, b) for a, b in zip(kept, trained, strict=True)))


def error_of(save: Any) -> list[str]:
    """The type and the lines of what ``save()`` raised."""
    try:
        save()
    except Exception as error:
        return [type(error).__name__, *str(error).splitlines()]
    return []


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
