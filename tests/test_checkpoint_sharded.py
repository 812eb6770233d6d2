"""tl.save / tl.load of sharded models: a checkpoint saved on one mesh loads onto another.

The test session has eight fake CPU devices (tests/conftest.py). A model and
its optimizer are sharded on a ("data", "model") = (2, 4) mesh, trained one
step and saved; they are loaded into `like`s on a (4, 2) mesh, on single
devices, and into an abstract `like` that carries shardings. Each loaded array
must have `like`'s sharding, hold only its own shard on each device, and equal
what was saved. Many processes: tests/test_multiprocess.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import np_init
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import toylib as tl
from toylib import nn

# Each Variable's spec, by the end of its path: the optimizer's moments
# (`opt_state[0][1].l1.kernel`) end as their parameter does, so they are placed
# like it. Everything else (the last bias, step counts) is replicated.
SPECS = {
    "l1.kernel": P("data", "model"),
    "l1.bias": P("model"),
    "l2.kernel": P("model", None),
    "l2.bias": P(None),
    "l3.kernel": P(None, "data"),
}
TX = optax.adam(1e-2)


class MLP(tl.Module):
    def __init__(self, seed: int, width: int = 16) -> None:
        # numpy initialisers: no random-number compile per shape (conftest.np_init)
        self.l1 = nn.Linear(8, width, kernel_init=np_init(seed), rngs=0)
        self.l2 = nn.Linear(width, 16, kernel_init=np_init(seed + 1), rngs=0)
        self.l3 = nn.Linear(16, 8, kernel_init=np_init(seed + 2), rngs=0)

    def __call__(self, x):
        return self.l3(jax.nn.relu(self.l2(jax.nn.relu(self.l1(x)))))


def make(seed: int, width: int = 16) -> tuple[MLP, tl.Optimizer]:
    model = MLP(seed, width)
    return model, tl.Optimizer(model, TX)


def mesh(shape: tuple[int, int]) -> jax.sharding.Mesh:
    return jax.make_mesh(shape, ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def sharding_of(path, mesh: jax.sharding.Mesh) -> NamedSharding:
    name = jax.tree_util.keystr(path)  # e.g. "[1].opt_state[0][1].l1.kernel.value"
    spec = next((s for k, s in SPECS.items() if name.endswith(f".{k}.value")), P())
    return NamedSharding(mesh, spec)


# TODO(tl.sharding): once it lands, build these with nn.Linear(kernel_sharding=...)
# and tl.sharding.shard(model, mesh, rules); until then each array is placed here.
def on(mesh: jax.sharding.Mesh, tree):
    """``tree`` (Modules included) with each array placed on ``mesh`` by SPECS."""
    return jax.tree.map_with_path(lambda p, x: jax.device_put(x, sharding_of(p, mesh)), tree)


def abstract_on(mesh: jax.sharding.Mesh, tree):
    """An abstract ``tree`` whose ShapeDtypeStructs carry SPECS' shardings on ``mesh``.

    (tl.eval_shape gives none on Auto meshes: jax.eval_shape reports shardings
    only for Explicit axes, so they are attached here.)
    """
    return jax.tree.map_with_path(
        lambda p, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_of(p, mesh)), tree
    )


@tl.jit
def train_step(model, optimizer, x, y):
    loss, grads = tl.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A (model, optimizer) sharded on a (2, 4) mesh, one step trained, and its checkpoint."""
    model, optimizer = on(mesh((2, 4)), make(0))
    x = jax.device_put(np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8))
    train_step(model, optimizer, x, jnp.sin(x))
    assert model.l1.kernel.value.sharding.spec == P("data", "model")  # the step kept it
    path = tmp_path_factory.mktemp("sharded") / "ckpt"
    tl.save(path, (model, optimizer))
    return path, [np.asarray(x) for x in jax.tree.leaves((model, optimizer))]


def check_loaded(loaded, like, values) -> None:
    """Every array of ``loaded``: ``like``'s sharding, only its own shards, the saved values."""
    got, want = jax.tree.leaves(loaded), jax.tree.leaves(like)
    assert len(got) == len(want) == len(values)
    for array, target, value in zip(got, want, values, strict=True):
        assert isinstance(array, jax.Array)
        assert array.sharding == target.sharding
        # Read straight into the sharding: each device holds its shard, not a full copy.
        shard_shape = target.sharding.shard_shape(target.shape)
        assert len(array.addressable_shards) == len(target.sharding.device_set)
        for shard in array.addressable_shards:
            assert shard.data.shape == shard_shape
            np.testing.assert_array_equal(np.asarray(shard.data), value[shard.index])
        np.testing.assert_array_equal(np.asarray(array), value)


def test_a_model_saved_on_2x4_loads_onto_4x2(saved):
    path, values = saved
    like = on(mesh((4, 2)), make(1))
    loaded = tl.load(path, like)
    check_loaded(loaded, like, values)
    kernel = loaded[0].l1.kernel.value
    assert kernel.sharding.spec == P("data", "model") and kernel.sharding.mesh.shape["data"] == 4
    assert {s.data.shape for s in kernel.addressable_shards} == {(2, 8)}  # of (8, 16), on 4x2
    # The optimizer's moments come back placed like their parameter.
    moment = jax.tree.leaves(tl.state(loaded[1]))[2]
    assert moment.shape == (8, 16) and moment.sharding == kernel.sharding


def test_a_sharded_checkpoint_loads_onto_one_device(saved):
    path, values = saved
    # A fresh model (uncommitted on the default device) and one committed to device 3.
    fresh = make(1)
    check_loaded(tl.load(path, fresh), fresh, values)
    assert not any(x.committed for x in jax.tree.leaves(tl.load(path, fresh)))
    device = jax.devices()[3]
    pinned = jax.tree.map(lambda x: jax.device_put(x, device), make(1))
    loaded = tl.load(path, pinned)
    check_loaded(loaded, pinned, values)
    assert all(x.devices() == {device} and x.committed for x in jax.tree.leaves(loaded))


def test_an_abstract_like_with_shardings(saved):
    path, values = saved
    abstract = tl.eval_shape(lambda: make(1))
    like = abstract_on(mesh((4, 2)), abstract)
    loaded = tl.load(path, like)
    check_loaded(loaded, like, values)
    assert isinstance(loaded[0], MLP) and isinstance(loaded[1], tl.Optimizer)
    # On the saving mesh shape too, with the other mesh's device order.
    like = abstract_on(mesh((2, 4)), abstract)
    check_loaded(tl.load(path, like), like, values)


def test_a_like_of_another_shape_is_refused_before_reading(saved):
    path, _ = saved
    like = on(mesh((4, 2)), make(1, width=32))
    with pytest.raises(ValueError, match="shapes in the checkpoint at") as info:
        tl.load(path, like)
    message = str(info.value)
    assert "`model[0].l1.kernel`: (8, 32) in `like`, (8, 16) saved" in message
    assert "Nothing was loaded" in message
