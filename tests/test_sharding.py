"""tl.sharding and tl.jit's shardings, on the test session's 8 fake CPU devices."""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import optax
import pytest
from conftest import rand
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import toylib as tl
from toylib import nn

RULES = {"batch": "data", "embed": None, "mlp": "model"}


def auto_mesh(shape=(2, 4), names=("data", "model")):
    return tl.sharding.make_mesh(shape, names)


class MLP(tl.Module):
    """Two Linears with logical names on their weights, and a call counter."""

    def __init__(self, rngs, din=16, hidden=32):
        self.l1 = nn.Linear(din, hidden, rngs=rngs)
        self.l2 = nn.Linear(hidden, din, rngs=rngs)
        self.l1.kernel.set_metadata(sharding=("embed", "mlp"))
        self.l1.bias.set_metadata(sharding=("mlp",))
        self.l2.kernel.set_metadata(sharding=("mlp", "embed"))
        self.count = tl.Variable(jnp.array(0))

    def __call__(self, x):
        self.count += 1
        return self.l2(jax.nn.relu(self.l1(x)))


def shardings(obj):
    return {path: v.value.sharding for path, v in tl.iter_variables(obj)}


# -- specs and rules ----------------------------------------------------------------------


def test_specs_map_names_by_rules():
    model = MLP(tl.Rngs(0))
    specs = tl.sharding.specs(model, RULES).flat()
    assert specs[("l1", "kernel")] == P(None, "model")
    assert specs[("l1", "bias")] == P("model")
    assert specs[("l2", "kernel")] == P("model", None)
    assert specs[("l2", "bias")] == P()  # no names: replicated
    assert specs[("count",)] == P()
    assert set(specs) == set(tl.state(model).flat())


def test_rules_take_tuples_of_axes_and_none():
    model = MLP(tl.Rngs(0))
    mesh = auto_mesh()
    specs = tl.sharding.specs(model, {**RULES, "mlp": ("data", "model")}, mesh).flat()
    assert specs[("l1", "kernel")] == P(None, ("data", "model"))
    specs = tl.sharding.specs(model, {"embed": None, "mlp": None}, mesh).flat()
    assert specs[("l1", "kernel")] == P(None, None)


@pytest.mark.parametrize(
    "rules, words",
    [
        ({"embed": None}, ["model.l1.kernel", "'mlp'", "no rule", "'embed' -> None"]),
        (
            {"embed": None, "mlp": "tensor"},
            ["model.l1.kernel", "'tensor'", "('data', 'model')", "(2, 4)"],
        ),
        ({"embed": "model", "mlp": "model"}, ["model.l1.kernel", "'model'", "two dimensions"]),
    ],
)
def test_bad_rules_name_the_variable(rules, words):
    with pytest.raises(ValueError) as info:
        tl.sharding.specs(MLP(tl.Rngs(0)), rules, auto_mesh())
    for word in words:
        assert word in str(info.value)


def test_indivisible_dimension_is_toylibs_error_before_anything_moves():
    mesh = auto_mesh()
    model = MLP(tl.Rngs(0), hidden=30)  # 30 is not a multiple of the 4 'model' devices
    before = {p: (np.asarray(v.value), v.value.sharding) for p, v in tl.iter_variables(model)}
    with pytest.raises(ValueError) as info:
        tl.sharding.shard(model, mesh, RULES)
    text = str(info.value)
    for word in ["model.l1.kernel", "dimension 1", "size 30", "'mlp'", "('model',)", "4"]:
        assert word in text
    for path, v in tl.iter_variables(model):  # nothing was placed, nothing recorded
        np.testing.assert_array_equal(v.value, before[path][0])
        assert v.value.sharding == before[path][1]
        assert v.get_metadata("placement", None) is None


def test_names_of_the_wrong_rank_and_bad_arguments(monkeypatch):
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)  # toylib's own checks
    model = MLP(tl.Rngs(0))
    model.l2.bias.set_metadata(sharding=("embed", "mlp"))
    with pytest.raises(ValueError, match=r"model\.l2\.bias: the sharding names"):
        tl.sharding.specs(model, RULES)
    with pytest.raises(TypeError, match="must be a jax.sharding.Mesh"):
        tl.sharding.shard(MLP(tl.Rngs(0)), "mesh", RULES)
    with pytest.raises(TypeError, match="`rules` must map"):
        tl.sharding.specs(MLP(tl.Rngs(0)), {"mlp": 1})
    with pytest.raises(ValueError, match="no mesh given"):
        tl.sharding.shard(MLP(tl.Rngs(0)), None, RULES)


# -- shard and init -----------------------------------------------------------------------


def test_shard_places_every_variable_and_records_it():
    mesh = auto_mesh()
    model = MLP(tl.Rngs(0))
    model.scale = jnp.ones(16)  # a bare array: replicated on the mesh
    values = {p: np.asarray(v.value) for p, v in tl.iter_variables(model)}
    assert tl.sharding.shard(model, mesh, RULES) is model
    kernel = model.l1.kernel
    assert kernel.value.sharding.spec == P(None, "model")
    assert kernel.placement == NamedSharding(mesh, P(None, "model"))
    assert [s.data.shape for s in kernel.value.addressable_shards] == [(16, 8)] * 8
    assert model.scale.sharding.mesh == mesh and model.scale.sharding.spec == P()
    for path, v in tl.iter_variables(model):
        np.testing.assert_array_equal(v.value, values[path])


def test_init_builds_sharded_without_a_full_copy_and_equals_the_plain_build():
    mesh = auto_mesh()
    model = tl.sharding.init(lambda: MLP(tl.Rngs(0)), mesh, RULES)
    plain = MLP(tl.Rngs(0))
    for (path, v), (_, w) in zip(tl.iter_variables(model), tl.iter_variables(plain), strict=True):
        np.testing.assert_allclose(v.value, w.value, rtol=1e-6)
        spec = tl.sharding.specs(plain, RULES).flat()[path]
        assert v.value.sharding.is_equivalent_to(NamedSharding(mesh, spec), v.value.ndim)
        assert v.placement == NamedSharding(mesh, spec)
        for shard in v.value.addressable_shards:  # each device: its shard only
            assert shard.data.shape == v.value.sharding.shard_shape(v.value.shape)
    assert model.l1.kernel.value.addressable_shards[0].data.shape == (16, 8)
    assert type(model) is MLP and model.l1.kernel.sharding == ("embed", "mlp")


def test_init_refuses_a_make_that_builds_another_model():
    sizes = iter([32, 64])
    with pytest.raises(ValueError, match="built a different model"):
        tl.sharding.init(lambda: MLP(tl.Rngs(0), hidden=next(sizes)), auto_mesh(), RULES)


# -- training keeps placements ------------------------------------------------------------


def _train(model, opt, xs, steps=3):
    @tl.jit
    def step(model, opt, x):
        def loss(m):
            return jnp.mean((m(x) - x) ** 2)

        value, grads = tl.value_and_grad(loss)(model)
        opt.update(model, grads)
        return value

    return [float(step(model, opt, x)) for x in xs[:steps]]


def test_optimizer_state_is_placed_like_its_params():
    mesh = auto_mesh()
    model = tl.sharding.init(lambda: MLP(tl.Rngs(0)), mesh, RULES)
    opt = tl.Optimizer(model, optax.adam(1e-2))
    adam = opt.opt_state[0]
    for moments in (adam[1], adam[2]):  # mu, nu: the params' paths
        assert moments["l1"]["kernel"].value.sharding.spec == P(None, "model")
        assert moments["l1"]["kernel"].placement == model.l1.kernel.placement
        assert moments["l2"]["kernel"].value.sharding.spec == P("model", None)
    assert adam[0].value.sharding == NamedSharding(mesh, P())  # the count: replicated
    assert opt.step.value.sharding == NamedSharding(mesh, P())


def test_a_train_step_keeps_every_placement_and_matches_one_device():
    xs = [rand(i, 8, 16) for i in range(3)]
    model = tl.sharding.init(lambda: MLP(tl.Rngs(0)), auto_mesh(), RULES)
    opt = tl.Optimizer(model, optax.adam(1e-2))
    before = shardings((model, opt))
    data = NamedSharding(auto_mesh(), P("data", None))
    sharded = _train(model, opt, [jax.device_put(x, data) for x in xs])
    after = shardings((model, opt))
    ndims = {path: v.value.ndim for path, v in tl.iter_variables((model, opt))}
    for path in before:  # no gather, no replication: each where it was placed
        assert before[path].is_equivalent_to(after[path], ndims[path]), path
    plain = MLP(tl.Rngs(0))
    single = _train(plain, tl.Optimizer(plain, optax.adam(1e-2)), [jnp.asarray(x) for x in xs])
    np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-6)
    assert int(model.count.value) == 3


def test_explicit_mesh_axes_are_refused_with_the_fix():
    mesh = jax.make_mesh((2, 4), ("data", "model"))  # JAX's default: explicit axes
    for call in (
        lambda: tl.sharding.init(lambda: MLP(tl.Rngs(0)), mesh, RULES),
        lambda: tl.sharding.shard(MLP(tl.Rngs(0)), mesh, RULES),
        lambda: tl.sharding.use(mesh, RULES).__enter__(),
    ):
        with pytest.raises(ValueError, match=r"explicit axes \('data', 'model'\)") as info:
            call()
        assert "tl.sharding.make_mesh((2, 4)" in str(info.value)
    assert tl.sharding.make_mesh((2, 4), ("data", "model")).axis_types == (AxisType.Auto,) * 2


# -- tl.jit's in_shardings and out_shardings ----------------------------------------------


def test_in_shardings_apply_per_argument_not_to_internal_lists():
    # The jax.jit habit: (model's entry, batch's entry). The model keeps its own
    # placement; only the batch gets the batch sharding.
    mesh = auto_mesh()
    model = tl.sharding.init(lambda: MLP(tl.Rngs(0)), mesh, RULES)
    batch = NamedSharding(mesh, P("data", None))
    seen = {}

    @tl.jit(in_shardings=(None, batch))
    def apply(model, x):
        seen["x"] = x
        return model(x), x * 1

    for _ in range(2):  # the second call takes tl.jit's fast path
        out, x_back = apply(model, jnp.ones((8, 16)))
        assert x_back.sharding.is_equivalent_to(batch, 2)
    assert model.l1.kernel.value.sharding.spec == P(None, "model")
    assert out.shape == (8, 16)


def test_in_shardings_take_a_state_for_a_module_and_check_its_paths():
    mesh = auto_mesh()
    model = MLP(tl.Rngs(0))
    specs = tl.sharding.specs(model, RULES, mesh)
    state = jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)
    f = tl.jit(lambda m, x: m(x), in_shardings=(state, None))
    f(model, jnp.ones((8, 16)))
    f(model, jnp.ones((8, 16)))  # the fast path
    assert int(model.count.value) == 2
    # In-place updates stay where in_shardings put the Variables' inputs.
    assert model.count.value.sharding == NamedSharding(mesh, P())
    extra = tl.State.from_flat({**state.flat(), ("nope",): NamedSharding(mesh, P())})
    with pytest.raises(ValueError, match=r"`args\[0\]\.nope`, which the\nargument does not have"):
        tl.jit(lambda m, x: m(x), in_shardings=(extra, None))(model, jnp.ones((8, 16)))
    partial = tl.State.from_flat({("l1", "kernel"): NamedSharding(mesh, P())})
    with pytest.raises(ValueError, match="gives no sharding for"):
        tl.jit(lambda m, x: m(x), in_shardings=(partial, None))(model, jnp.ones((8, 16)))


def test_in_shardings_for_an_argument_that_does_not_exist():
    f = tl.jit(lambda m, x: m(x), in_shardings=(None, None, None))
    with pytest.raises(ValueError, match="entry 2 is for an argument that does not exist"):
        f(MLP(tl.Rngs(0)), jnp.ones((8, 16)))
    with pytest.raises(TypeError, match="in_shardings must be"):
        tl.jit(lambda x: x, in_shardings="data")


def test_out_shardings_place_the_output():
    mesh = auto_mesh()
    model = tl.sharding.init(lambda: MLP(tl.Rngs(0)), mesh, RULES)
    target = NamedSharding(mesh, P("data", "model"))
    f = tl.jit(lambda m, x: {"y": m(x), "n": 1 * x.sum()}, out_shardings={"y": target, "n": None})
    for _ in range(2):  # the second call takes tl.jit's fast path
        out = f(model, jnp.ones((8, 16)))
        assert out["y"].sharding.is_equivalent_to(target, 2)
    one = tl.jit(lambda x: x * 2, out_shardings=target)(jnp.ones((8, 16)))
    assert one.sharding.is_equivalent_to(target, 2)


# -- use, constrain, batch ----------------------------------------------------------------


def test_use_sets_defaults_per_thread():
    mesh = auto_mesh()
    results = {}

    def other():
        results["other"] = tl.sharding.constrain(jnp.ones((8, 4)), ("batch", None)).sharding

    with tl.sharding.use(mesh, RULES):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        inside = tl.sharding.constrain(jnp.ones((8, 4)), ("batch", None)).sharding
        model = tl.sharding.init(lambda: MLP(tl.Rngs(0)))
    assert inside.is_equivalent_to(NamedSharding(mesh, P("data", None)), 2)
    assert len(results["other"].device_set) == 1  # no defaults in the other thread
    assert model.l1.kernel.value.sharding.spec == P(None, "model")


def test_constrain_inside_jit():
    mesh = auto_mesh()

    @tl.jit
    def f(x):
        return tl.sharding.constrain(x * 2, ("batch", "mlp"), mesh=mesh, rules=RULES)

    for _ in range(2):
        y = f(jnp.ones((8, 16)))
        assert y.sharding.is_equivalent_to(NamedSharding(mesh, P("data", "model")), 2)
    with pytest.raises(ValueError, match="does not divide 6"):
        f(jnp.ones((8, 6)))


def test_batch_in_one_process():
    mesh = auto_mesh()
    xs = tl.sharding.batch(np.arange(32.0).reshape(8, 4), ("batch", None), mesh=mesh, rules=RULES)
    assert xs.sharding.spec == P("data", None) and xs.shape == (8, 4)
    np.testing.assert_array_equal(xs, np.arange(32.0).reshape(8, 4))
    with pytest.raises(ValueError, match="does not divide 7"):
        tl.sharding.batch(np.ones((7, 4)), ("batch", None), mesh=mesh, rules=RULES)


def test_names_and_placements_show_in_display(capsys):
    model = tl.sharding.init(lambda: MLP(tl.Rngs(0)), auto_mesh(), RULES)
    tl.display(model)
    text = capsys.readouterr().out
    assert "sharding=('embed', 'mlp') placement=P(None, 'model') on mesh(data=2, model=4)" in text


def test_abstract_is_the_like_that_loads_a_checkpoint_sharded(tmp_path):
    saved = tl.sharding.init(lambda: MLP(tl.Rngs(0)), auto_mesh(), RULES)
    tl.save(tmp_path / "ckpt", saved)
    other = auto_mesh((4, 2))
    like = tl.sharding.abstract(lambda: MLP(tl.Rngs(1)), other, RULES)
    assert isinstance(like.l1.kernel.value, jax.ShapeDtypeStruct)
    loaded = tl.load(tmp_path / "ckpt", like)
    kernel = loaded.l1.kernel.value
    assert kernel.sharding.is_equivalent_to(NamedSharding(other, P(None, "model")), 2)
    assert {s.data.shape for s in kernel.addressable_shards} == {(16, 16)}  # 32 / 2
    assert loaded.l1.kernel.placement == NamedSharding(other, P(None, "model"))
    for (_, v), (_, w) in zip(tl.iter_variables(loaded), tl.iter_variables(saved), strict=True):
        np.testing.assert_array_equal(v.value, w.value)


def test_a_variable_holding_a_named_array_is_placed_by_its_array():
    class Named(tl.Module):
        def __init__(self):
            w = tl.nx.wrap(jnp.ones((8, 16)), "features_in", "features_out")
            self.w = tl.Param(w, sharding=("embed", "mlp"))

        def __call__(self, x):
            return (x @ self.w.value.unwrap("features_in", "features_out")).sum()

    mesh = auto_mesh()
    model = tl.sharding.init(Named, mesh, RULES)
    assert model.w.value.array.sharding.spec == P(None, "model")
    assert model.w.value.names == ("features_in", "features_out")
    opt = tl.Optimizer(model, optax.adam(1e-2))
    step = tl.jit(lambda m, o, x: o.update(m, tl.grad(lambda m: m(x))(m)))
    step(model, opt, jnp.ones((4, 8)))
    assert model.w.value.array.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "model")), 2)
    assert isinstance(model.w.value, tl.nx.NamedArray)


def test_resharding_between_steps_moves_the_state_and_the_step_follows():
    # The placement is structure: shard() onto another mesh drops tl.jit's
    # recorded fast path, and the next step keeps the new placement (not the
    # one the first program was compiled with).
    first, second = auto_mesh((2, 4)), auto_mesh((4, 2))
    model = tl.sharding.init(lambda: MLP(tl.Rngs(0)), first, RULES)
    opt = tl.Optimizer(model, optax.adam(1e-2))
    xs = [rand(i, 8, 16) for i in range(4)]
    losses = _train(model, opt, xs[:2], steps=2)
    tl.sharding.shard((model, opt), second, RULES)
    losses += _train(model, opt, xs[2:], steps=2)
    want = NamedSharding(second, P(None, "model"))
    assert model.l1.kernel.value.sharding.is_equivalent_to(want, 2)
    assert opt.opt_state[0][1]["l1"]["kernel"].value.sharding.is_equivalent_to(want, 2)
    plain = MLP(tl.Rngs(0))
    single = _train(plain, tl.Optimizer(plain, optax.adam(1e-2)), xs, steps=4)
    np.testing.assert_allclose(losses, single, rtol=1e-5, atol=1e-6)


def test_in_shardings_for_a_static_argument_is_an_error():
    mesh = auto_mesh()
    f = tl.jit(lambda x, n: x * n, in_shardings=(None, NamedSharding(mesh, P())))
    with pytest.raises(
        ValueError, match=r"in_shardings\[1\] is a NamedSharding, but args\[1\] holds no array"
    ):
        f(jnp.ones(4), 3)


def test_shardings_deeper_than_a_leaf_are_an_error():
    mesh = auto_mesh()
    everywhere = NamedSharding(mesh, P())
    model = MLP(tl.Rngs(0))
    to_module = tl.jit(lambda m: m, out_shardings=tl.State({"l1": everywhere}))
    with pytest.raises(ValueError, match="goes deeper than `out`, which takes one Sharding"):
        to_module(model)
    on_array = tl.jit(lambda x: x, in_shardings=({"a": everywhere},))
    with pytest.raises(ValueError, match=r"in_shardings\[0\] goes deeper than `args\[0\]`"):
        on_array(jnp.ones(8))
    assert tl.jit(lambda m: m, out_shardings=everywhere)(model) is model  # one Sharding: fine
