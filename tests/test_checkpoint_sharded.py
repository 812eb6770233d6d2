"""tl.save / tl.load of sharded models: a checkpoint saved on one mesh loads onto another.

The test session has eight fake CPU devices (tests/conftest.py). A model and
its optimizer are sharded on a ("data", "model") = (2, 4) mesh, trained one
step and saved; they are loaded into `like`s on a (4, 2) mesh, on single
devices, and into abstract `like`s (nothing allocated). Each loaded array
must have `like`'s sharding, hold only its own shard on each device, and equal
what was saved. Many processes: tests/test_multiprocess.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import np_init
from jax.sharding import PartitionSpec as P

import toylib as tl
from toylib import nn

# Logical names per dimension, and the rules that map them to mesh axes:
# l1.kernel is split over both axes, l3.kernel over "data" only.
RULES = {"in": "data", "mlp": "model", "embed": None}
TX = optax.adam(1e-2)


class MLP(tl.Module):
    def __init__(self, seed: int, width: int = 16) -> None:
        # numpy initialisers: no random-number compile per shape (conftest.np_init)
        self.l1 = nn.Linear(
            8,
            width,
            kernel_init=np_init(seed),
            rngs=0,
            kernel_sharding=("in", "mlp"),
            bias_sharding=("mlp",),
        )
        self.l2 = nn.Linear(
            width,
            16,
            kernel_init=np_init(seed + 1),
            rngs=0,
            kernel_sharding=("mlp", "embed"),
            bias_sharding=("embed",),
        )
        # l3.bias: no names, replicated
        self.l3 = nn.Linear(
            16, 8, kernel_init=np_init(seed + 2), rngs=0, kernel_sharding=("embed", "in")
        )

    def __call__(self, x):
        return self.l3(jax.nn.relu(self.l2(jax.nn.relu(self.l1(x)))))


def mesh(shape: tuple[int, int]) -> jax.sharding.Mesh:
    return tl.sharding.make_mesh(shape, ("data", "model"))


def make(seed: int, shape: tuple[int, int] | None, width: int = 16) -> tuple[MLP, tl.Optimizer]:
    """A model and its optimizer, placed on a mesh of ``shape`` (None: left unplaced)."""
    model = MLP(seed, width)
    if shape is not None:
        tl.sharding.shard(model, mesh(shape), RULES)
    return model, tl.Optimizer(model, TX)  # its state placed like the Params


def shardings(tree) -> list:
    return [x.sharding for x in jax.tree.leaves(tree)]


def abstract(tree):
    """``tree`` with each array replaced by a ShapeDtypeStruct of its shape, dtype and sharding."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


@tl.jit
def train_step(model, optimizer, x, y):
    loss, grads = tl.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A (model, optimizer) sharded on a (2, 4) mesh, one step trained, and its checkpoint."""
    model, optimizer = make(0, (2, 4))
    x = jax.device_put(np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8))
    train_step(model, optimizer, x, jnp.sin(x))
    assert model.l1.kernel.value.sharding.spec == P("data", "model")  # the step kept it
    path = tmp_path_factory.mktemp("sharded") / "ckpt"
    tl.save(path, (model, optimizer))
    return path, [np.asarray(x) for x in jax.tree.leaves((model, optimizer))]


def check_loaded(loaded, want: list, values: list) -> None:
    """Every array of ``loaded``: sharded as ``want``, only its own shards, the saved values."""
    got = jax.tree.leaves(loaded)
    assert len(got) == len(want) == len(values)
    for array, sharding, value in zip(got, want, values, strict=True):
        assert isinstance(array, jax.Array)
        assert array.sharding == sharding
        # Read straight into the sharding: each device holds its shard, not a full copy.
        shard_shape = sharding.shard_shape(value.shape)
        assert len(array.addressable_shards) == len(sharding.device_set)
        for shard in array.addressable_shards:
            assert shard.data.shape == shard_shape
            np.testing.assert_array_equal(np.asarray(shard.data), value[shard.index])
        np.testing.assert_array_equal(np.asarray(array), value)


def test_a_model_saved_on_2x4_loads_onto_4x2(saved):
    path, values = saved
    like = make(1, (4, 2))
    loaded = tl.load(path, like)
    check_loaded(loaded, shardings(like), values)
    kernel = loaded[0].l1.kernel
    assert kernel.value.sharding.spec == P("data", "model")
    assert kernel.value.sharding.mesh.shape["data"] == 4
    assert {s.data.shape for s in kernel.value.addressable_shards} == {(2, 8)}  # of (8, 16)
    assert kernel.placement == kernel.value.sharding  # like's record: tl.jit keeps it there
    # The optimizer's moments come back placed like their parameter.
    moment = jax.tree.leaves(tl.state(loaded[1]))[2]
    assert moment.shape == (8, 16) and moment.sharding == kernel.value.sharding


def test_a_sharded_checkpoint_loads_onto_one_device(saved):
    path, values = saved
    # A fresh model (uncommitted on the default device) and one committed to device 3.
    fresh = make(1, None)
    loaded = tl.load(path, fresh)
    check_loaded(loaded, shardings(fresh), values)
    assert not any(x.committed for x in jax.tree.leaves(loaded))
    device = jax.devices()[3]
    pinned = jax.tree.map(lambda x: jax.device_put(x, device), make(1, None))
    loaded = tl.load(path, pinned)
    check_loaded(loaded, shardings(pinned), values)
    assert all(x.devices() == {device} and x.committed for x in jax.tree.leaves(loaded))


def test_an_abstract_like_loads_straight_into_its_placements(saved):
    path, values = saved
    live = make(1, (4, 2))
    # Workaround: neither route gives an abstract optimizer placed like its
    # Params (tl.eval_shape(lambda m: tl.Optimizer(m, TX), model) fails on a
    # placed model: tl.sharding.place reads a tracer's .sharding; and
    # tl.sharding.abstract of (model, optimizer) replicates the moments), so the
    # abstract optimizer takes its shardings from a live one.
    optimizer = abstract(live[1])
    models = [
        tl.sharding.abstract(lambda: MLP(1), mesh((4, 2)), RULES),  # values carry shardings
        # tl.eval_shape's values carry none, but each Variable records its placement.
        tl.eval_shape(lambda: tl.sharding.init(lambda: MLP(1), mesh((4, 2)), RULES)),
    ]
    assert models[1].l1.kernel.value.sharding is None
    for model in models:  # nothing allocated until the load
        loaded = tl.load(path, (model, optimizer))
        check_loaded(loaded, shardings(live), values)
        assert isinstance(loaded[0], MLP) and isinstance(loaded[1], tl.Optimizer)


def test_an_abstract_like_with_shardings(saved):
    path, values = saved
    # Any ShapeDtypeStruct's own sharding is used: on (4, 2) and on the saving mesh's shape.
    for shape in ((4, 2), (2, 4)):
        live = make(1, shape)
        check_loaded(tl.load(path, abstract(live)), shardings(live), values)


def test_a_like_of_another_shape_is_refused_before_reading(saved):
    path, _ = saved
    like = make(1, (4, 2), width=32)
    with pytest.raises(ValueError, match="shapes in the checkpoint at") as info:
        tl.load(path, like)
    message = str(info.value)
    assert "`model[0].l1.kernel`: (8, 32) in `like`, (8, 16) saved" in message
    assert "Nothing was loaded" in message
