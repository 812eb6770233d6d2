import re

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import optax
import pytest
from conftest import Block
from hypothesis import given, settings
from hypothesis import strategies as st

import toylib as tl
from toylib import nn


class Twin(tl.Module):
    """Two blocks sharing one Linear, plus a shared Variable and a bare array."""

    def __init__(self):
        shared = nn.Linear(2, 2, rngs=0)
        self.a = Block(shared)
        self.b = Block(shared)
        self.scale = tl.Variable(jnp.array(2.0))
        self.also_scale = self.scale
        self.offset = jnp.ones(2)

    def __call__(self, x):
        return self.b(self.a(x)) * self.scale + self.offset

    def double(self, x):
        return 2 * self(x)


def describe(root):
    """A canonical description: structure, values, and which objects are shared."""
    ids = {}

    def d(x):
        if isinstance(x, tl.Module | tl.Variable):
            if id(x) in ids:
                return ("ref", ids[id(x)])
            ids[id(x)] = len(ids)
            if isinstance(x, tl.Variable):
                value = np.asarray(jax.random.key_data(x.value) if _is_key(x.value) else x.value)
                return ("var", type(x).__name__, value.tolist(), tuple(x.metadata.items()))
            return ("mod", type(x).__name__, tuple((k, d(v)) for k, v in vars(x).items()))
        if isinstance(x, list | tuple):
            return (type(x).__name__, tuple(d(v) for v in x))
        if isinstance(x, dict):
            return ("dict", tuple((k, d(v)) for k, v in x.items()))
        if isinstance(x, jax.Array | np.ndarray):
            return ("array", np.asarray(x).tolist())
        return ("static", x)

    return d(root)


def _is_key(x):
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def objects(root):
    return {id(obj) for _, obj in tl.iter_modules(root)} | {
        id(v) for _, v in tl.iter_variables(root)
    }


# -- the docs/design.md table, as written there --------------------------------------


def test_design_table_examples():
    model = Twin()
    x = jnp.ones((3, 2))

    graphdef, state = tl.split(model)
    assert isinstance(graphdef, tl.GraphDef) and isinstance(state, tl.State)

    graphdef, params, rest = tl.split(model, tl.Param, ...)
    assert all(isinstance(v, tl.Param) for v in params.flat().values())

    merged = tl.merge(graphdef, params, rest)
    assert describe(merged) == describe(model)

    stats = tl.state(model, tl.BatchStat)
    assert all(isinstance(v, tl.BatchStat) for v in stats.flat().values())

    tl.update(model, jax.tree.map(lambda v: v + 1, stats))
    assert float(model.a.bn.mean.value[0]) == 1.0

    model.a.seen = tl.Intermediate(jnp.zeros(1))
    popped = tl.pop(model, tl.Intermediate)
    assert list(popped.flat()) == [("a", "seen")] and not hasattr(model.a, "seen")

    copy = tl.clone(model)
    assert describe(copy) == describe(model) and not objects(copy) & objects(model)

    out, (new_state, new_graphdef) = graphdef.apply(params, rest)(x)
    np.testing.assert_allclose(out, tl.merge(graphdef, params, rest)(x), rtol=1e-6)
    assert isinstance(new_state, tl.State) and new_graphdef == graphdef
    out2, _ = graphdef.apply(params, rest).double(x)
    np.testing.assert_allclose(out2, 2 * out, rtol=1e-6)


# -- split / merge -----------------------------------------------------------------------


def test_shared_references_survive_split_and_merge():
    model = Twin()
    graphdef, state = tl.split(model)
    flat = state.flat()
    # The shared Linear and Variable appear once, at their first path.
    assert ("a", "linear", "kernel") in flat and ("b", "linear", "kernel") not in flat
    assert ("scale",) in flat and ("also_scale",) not in flat
    new = tl.merge(graphdef, state)
    assert new.a.linear is new.b.linear
    assert new.scale is new.also_scale
    assert new.a.linear is not model.a.linear
    assert describe(new) == describe(model)


def test_split_returns_snapshots_and_merge_makes_new_objects():
    model = Twin()
    graphdef, state = tl.split(model)
    assert state.scale is not model.scale
    state.scale.value = jnp.array(5.0)
    assert float(model.scale.value) == 2.0  # the model is untouched
    new = tl.merge(graphdef, state)
    new.scale.value = jnp.array(7.0)
    assert float(state.scale.value) == 5.0  # and the State too


def test_split_with_filters_partitions_and_unmatched_is_an_error():
    model = Twin()
    _, params, stats, rest = tl.split(model, tl.Param, tl.BatchStat, ...)
    assert {type(v) for v in params.flat().values()} == {tl.Param}
    assert {type(v) for v in stats.flat().values()} == {tl.BatchStat}
    assert ("scale",) in rest.flat() and ("offset",) in rest.flat()
    with pytest.raises(ValueError) as info:
        tl.split(model, tl.Param, tl.BatchStat)
    message = str(info.value)
    assert "model.scale" in message and "Variable" in message and "..." in message


def test_first_matching_filter_wins():
    model = nn.BatchNorm(2)
    _, first, second = tl.split(model, tl.Variable, tl.BatchStat)
    assert len(first.flat()) == 4 and len(second.flat()) == 0


def test_merge_with_a_state_that_does_not_fit_is_an_error(monkeypatch):
    # Bad input on purpose: toylib's own message, not the runtime type checker's.
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)
    model = Twin()
    graphdef, params, rest = tl.split(model, tl.Param, ...)
    with pytest.raises(ValueError) as info:
        tl.merge(graphdef, params)
    message = str(info.value)
    assert "missing" in message and "model.a.bn.mean" in message and "tl.split" in message
    extra = tl.State.merge(params, rest, tl.State({"ghost": tl.Param(jnp.ones(1))}))
    with pytest.raises(ValueError, match="not in the graphdef: model.ghost"):
        tl.merge(graphdef, extra)
    with pytest.raises(TypeError, match="expected States"):
        tl.merge(graphdef, {"a": 1})


def test_merge_accepts_bare_arrays_in_the_state():
    model = nn.Linear(2, 3, rngs=0)
    graphdef, state = tl.split(model)
    raw = tl.State.from_flat({p: v.value for p, v in state.flat().items()})
    new = tl.merge(graphdef, raw)
    assert type(new.kernel) is tl.Param
    np.testing.assert_array_equal(new.kernel.value, model.kernel.value)


def test_metadata_survives_split_and_merge():
    class M(tl.Module):
        def __init__(self):
            self.w = tl.Param(jnp.ones((2, 3)), sharding=("embed", "mlp"))

    graphdef, state = tl.split(M())
    assert state.w.sharding == ("embed", "mlp")
    mapped = jax.tree.map(lambda x: x * 0, state)
    assert tl.merge(graphdef, mapped).w.sharding == ("embed", "mlp")


def test_reference_cycles_are_handled():
    class Node(tl.Module):
        def __init__(self, value):
            self.w = tl.Param(jnp.array(value))
            self.children = []

    root = Node(1.0)
    child = Node(2.0)
    root.children.append(child)
    child.parent = root
    root.me = root
    graphdef, state = tl.split(root)
    assert sorted(state.flat()) == [("children", 0, "w"), ("w",)]
    new = tl.merge(graphdef, state)
    assert new.children[0].parent is new and new.me is new
    assert float(new.children[0].w.value) == 2.0
    assert [p for p, _ in tl.iter_modules(root)] == [(), ("children", 0)]


def test_graphdef_is_hashable_and_compares_structure():
    g1, _ = tl.split(nn.MLP([2, 3, 1], rngs=0))
    g2, _ = tl.split(nn.MLP([2, 3, 1], rngs=1))
    g3, _ = tl.split(nn.MLP([2, 4, 1], rngs=0))
    assert g1 == g2 and hash(g1) == hash(g2)
    assert g1 != g3
    assert len({g1, g2, g3}) == 2


def test_split_of_a_non_module_is_an_error():
    with pytest.raises(TypeError, match="expected a Module"):
        tl.split(jnp.ones(2))


def test_split_accepts_containers_of_modules():
    layers = [nn.Linear(2, 2, rngs=0), nn.Linear(2, 2, rngs=1)]
    graphdef, state = tl.split(layers)
    assert sorted(state.flat())[0] == (0, "bias")
    new = tl.merge(graphdef, state)
    assert isinstance(new, list) and len(new) == 2


# -- state / update / pop / clone --------------------------------------------------------------


def test_state_with_several_filters_returns_one_state_each_without_error():
    model = Twin()
    params, caches = tl.state(model, tl.Param, tl.Cache)
    assert len(params.flat()) == 6 and len(caches.flat()) == 0
    everything = tl.state(model)
    assert len(everything.flat()) == 12  # 6 params, 4 stats, 1 variable, 1 array


def test_update_writes_in_place_and_keeps_identity():
    model = Twin()
    kernel = model.a.linear.kernel
    params = tl.state(model, tl.Param)
    tl.update(model, jax.tree.map(jnp.zeros_like, params))
    assert model.a.linear.kernel is kernel and model.b.linear.kernel is kernel
    assert float(jnp.abs(kernel.value).sum()) == 0.0
    tl.update(model, tl.State({"offset": jnp.zeros(2)}))
    assert model.offset.tolist() == [0.0, 0.0]


def test_failed_update_changes_nothing():
    model = Twin()
    before = describe(model)
    bad = tl.State.merge(
        jax.tree.map(jnp.zeros_like, tl.state(model, tl.Param)),
        tl.State({"nowhere": tl.Param(jnp.ones(1))}),
    )
    with pytest.raises(ValueError, match=r"(?s)model\.nowhere.*Nothing was changed"):
        tl.update(model, bad)
    assert describe(model) == before
    wrong_type = tl.State({"scale": tl.BatchStat(jnp.array(1.0))})
    with pytest.raises(ValueError, match="the model has a Variable"):
        tl.update(model, wrong_type)


def test_pop_removes_all_references_and_returns_them():
    model = Twin()
    seen = tl.Intermediate(jnp.ones(3))
    model.a.seen = seen
    model.b.seen_too = seen
    popped = tl.pop(model, tl.Intermediate)
    assert popped.a.seen is seen
    assert not hasattr(model.a, "seen") and not hasattr(model.b, "seen_too")
    empty = tl.pop(model, tl.Intermediate)
    assert len(empty.flat()) == 0


def test_pop_from_a_list_is_an_error_and_removes_nothing():
    class M(tl.Module):
        def __init__(self):
            self.items = [tl.Intermediate(jnp.ones(1))]
            self.other = tl.Intermediate(jnp.ones(1))

    m = M()
    with pytest.raises(ValueError, match=r"model\.items\[0\].*list"):
        tl.pop(m, tl.Intermediate)
    assert hasattr(m, "other") and len(m.items) == 1


def test_pop_with_several_filters():
    model = Twin()
    model.a.hidden = tl.Intermediate(jnp.ones(1))
    interm, stats = tl.pop(model, tl.Intermediate, tl.BatchStat)
    assert len(interm.flat()) == 1 and len(stats.flat()) == 4
    assert not hasattr(model.a.bn, "mean")


def test_clone_is_deep_and_keeps_sharing():
    model = Twin()
    copy = tl.clone(model)
    assert copy.a.linear is copy.b.linear and copy.a.linear is not model.a.linear
    copy.scale.value = jnp.array(9.0)
    assert float(model.scale.value) == 2.0


def test_iter_modules_and_iter_variables_report_each_object_once():
    model = Twin()
    module_paths = [p for p, _ in tl.iter_modules(model)]
    assert module_paths == [(), ("a",), ("a", "linear"), ("a", "bn"), ("b",), ("b", "bn")]
    variables = list(tl.iter_variables(model, tl.Param))
    assert [p for p, _ in variables][:2] == [("a", "linear", "kernel"), ("a", "linear", "bias")]
    assert variables[0][1] is model.a.linear.kernel  # the live objects


# -- graphdef.apply ----------------------------------------------------------------------------


def test_apply_is_pure_and_returns_the_new_state():
    model = Twin()
    graphdef, params, rest = tl.split(model, tl.Param, ...)
    x = jnp.arange(6.0).reshape(3, 2)
    _, (new_state, new_graphdef) = graphdef.apply(params, rest)(x)
    # BatchNorm ran in training mode: its statistics moved in the new state only.
    assert float(jnp.abs(new_state.a.bn.mean.value).sum()) > 0
    assert float(jnp.abs(rest.a.bn.mean.value).sum()) == 0
    assert float(jnp.abs(model.a.bn.mean.value).sum()) == 0
    assert new_graphdef == graphdef


def test_apply_calls_submodules_and_list_items():
    model = nn.Sequential(nn.Linear(2, 3, rngs=0), jax.nn.relu, nn.Linear(3, 1, rngs=1))
    graphdef, state = tl.split(model)
    x = jnp.ones((4, 2))
    out, (new_state, _) = graphdef.apply(state).layers[0](x)
    np.testing.assert_allclose(out, model.layers[0](x), rtol=1e-6)
    assert len(new_state.flat()) == 4
    twin = Twin()
    graphdef, state = tl.split(twin)
    out, _ = graphdef.apply(state).a.linear(jnp.ones(2))
    np.testing.assert_allclose(out, twin.a.linear(jnp.ones(2)), rtol=1e-6)


def test_functional_training_step_with_jax_jit():
    model = nn.MLP([2, 8, 1], rngs=0)
    graphdef, params = tl.split(model)
    x, y = jnp.ones((4, 2)), jnp.zeros((4, 1))
    tx = optax.sgd(0.1)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state):
        def loss_fn(p):
            out, _ = graphdef.apply(p)(x)
            return jnp.mean((out - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        assert isinstance(grads, tl.State)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(5):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    tl.update(model, params)
    np.testing.assert_allclose(model.layers[0].kernel.value, params.layers[0].kernel.value)


# -- State --------------------------------------------------------------------------------------


def test_state_flat_roundtrip_filter_split_merge_and_repr():
    state = tl.State(
        {"layer": {"kernel": tl.Param(jnp.ones(2)), "mean": tl.BatchStat(jnp.zeros(2))}, 0: {}}
    )
    flat = state.flat()
    assert list(flat) == [("layer", "kernel"), ("layer", "mean")]
    assert tl.State.from_flat(flat).flat() == flat
    params = state.filter(tl.Param)
    assert list(params.flat()) == [("layer", "kernel")]
    p, b = state.split(tl.Param, tl.BatchStat)
    assert list(b.flat()) == [("layer", "mean")]
    with pytest.raises(ValueError, match="layer.mean"):
        state.split(tl.Param)
    assert tl.State.merge(p, b).flat().keys() == flat.keys()
    assert state.layer.kernel is flat[("layer", "kernel")]
    assert "'kernel': Param(float32[2] = 1.0)" not in repr(state)
    assert "'kernel': Param(float32[2])" in repr(state)


def test_state_pytree_order_does_not_depend_on_insertion_order():
    a = tl.State({"x": jnp.ones(1), "y": jnp.zeros(1)})
    b = tl.State({"y": jnp.zeros(1), "x": jnp.ones(1)})
    assert jax.tree.structure(a) == jax.tree.structure(b)
    summed = jax.tree.map(lambda u, v: u + v, a, b)
    assert summed["x"].tolist() == [2.0]


def test_grad_through_merge_gives_a_state_of_gradients():
    model = nn.Linear(2, 1, rngs=0)
    graphdef, params = tl.split(model, tl.Param)
    x = jnp.array([[1.0, 2.0]])
    grads = jax.grad(lambda p: tl.merge(graphdef, p)(x).sum())(params)
    assert isinstance(grads, tl.State) and type(grads.kernel) is tl.Param
    np.testing.assert_allclose(grads.kernel.value, [[1.0], [2.0]])


# -- property test: random graphs with shared modules and variables -----------------------


class Node(tl.Module):
    pass


VARIABLE_TYPES = [tl.Param, tl.BatchStat, tl.Variable, tl.Cache]


@st.composite
def graphs(draw):
    modules: list[Node] = []
    variables: list[tl.Variable] = []

    def new_variable():
        kind = draw(st.sampled_from(VARIABLE_TYPES))
        shape = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
        value = np.full(shape, draw(st.floats(-5, 5, allow_nan=False)), np.float32)
        variable = kind(value, tag=draw(st.sampled_from(["a", "b"])))
        variables.append(variable)
        return variable

    def value(depth):
        choice = draw(st.sampled_from(["var", "var", "module", "shared", "list", "dict", "static"]))
        if choice == "var":
            if variables and draw(st.booleans()):
                return draw(st.sampled_from(variables))
            return new_variable()
        if choice == "module" and depth < 3:
            return module(depth + 1)
        if choice == "shared" and modules:
            return draw(st.sampled_from(modules))  # an earlier module: sharing or a cycle
        if choice == "list" and depth < 3:
            return [value(depth + 1) for _ in range(draw(st.integers(0, 3)))]
        if choice == "dict" and depth < 3:
            return {f"k{i}": value(depth + 1) for i in range(draw(st.integers(0, 2)))}
        return draw(st.one_of(st.integers(), st.text(max_size=3), st.none()))

    def module(depth):
        node = Node()
        modules.append(node)
        for i in range(draw(st.integers(0, 4))):
            setattr(node, f"a{i}", value(depth))
        return node

    return module(0)


@settings(max_examples=60, deadline=None)
@given(graphs())
def test_split_merge_roundtrip_preserves_structure_and_sharing(root):
    graphdef, state = tl.split(root)
    new = tl.merge(graphdef, state)
    assert describe(new) == describe(root)
    assert not objects(new) & objects(root)
    # Splitting by filters and merging the pieces gives the same graph.
    graphdef2, params, stats, rest = tl.split(root, tl.Param, tl.BatchStat, ...)
    assert graphdef2 == graphdef
    assert describe(tl.merge(graphdef, rest, stats, params)) == describe(root)
    # The merged graph splits to an equal graphdef, and clone agrees with merge.
    assert tl.split(new)[0] == graphdef
    assert describe(tl.clone(root)) == describe(root)


@settings(max_examples=30, deadline=None)
@given(graphs())
def test_update_roundtrip_on_random_graphs(root):
    state = tl.state(root)
    doubled = jax.tree.map(lambda x: x * 2, state)
    before = {p: np.asarray(v.value) for p, v in tl.iter_variables(root)}
    tl.update(root, doubled)
    for path, variable in tl.iter_variables(root):
        np.testing.assert_array_equal(variable.value, before[path] * 2)


def test_jax_jit_and_vmap_accept_states():
    params = tl.state(nn.Linear(2, 2, rngs=0), tl.Param)
    bumped = jax.jit(lambda s: jax.tree.map(lambda a: a + 1, s))(params)
    assert isinstance(bumped, tl.State) and type(bumped.bias) is tl.Param
    np.testing.assert_allclose(bumped.bias.value, params.bias.value + 1)
    scaled = jax.vmap(lambda s, c: jax.tree.map(lambda a: a * c, s), in_axes=(None, 0))(
        params, jnp.arange(3.0)
    )
    assert scaled.kernel.shape == (3, 2, 2)


def test_update_of_an_array_inside_a_tuple_fails_before_writing_anything():
    class M(tl.Module):
        def __init__(self):
            self.w = tl.Param(jnp.ones(2))
            self.pair = (jnp.ones(1), jnp.ones(1))

    m = M()
    new = jax.tree.map(jnp.zeros_like, tl.state(m))
    with pytest.raises(ValueError, match=r"model\.pair\[0\].*tuple"):
        tl.update(m, new)
    assert m.w.value.tolist() == [1.0, 1.0]


def test_pop_sends_each_variable_to_the_first_matching_filter():
    model = nn.BatchNorm(2)
    stats, everything = tl.pop(model, tl.BatchStat, ...)
    assert len(stats.flat()) == 2 and len(everything.flat()) == 2


def test_a_catch_all_before_other_filters_is_an_error_and_pops_nothing():
    model = nn.BatchNorm(2)
    with pytest.raises(
        ValueError, match=r"(?s)catch-all goes last.*tl\.pop\(model, tl\.BatchStat, \.\.\.\)"
    ):
        tl.pop(model, ..., tl.BatchStat)
    assert len(tl.state(model).flat()) == 4


# -- strict writes: kind, shape and dtype per path, all checked before any write ---------


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("layers", 0, "kernel"), jnp.ones((3, 3)), r"float32\[2, 4\].*float32\[3, 3\].*reshape"),
        (("layers", 0, "kernel"), jnp.ones((2, 4), jnp.int32), r"float32\[2, 4\].*int32.*astype"),
        (("layers", 1, "bias"), "zeros", r"float32\[1\].*a str.*jnp\.asarray"),
        (("layers", 1, "bias"), [0.0], r"float32\[1\].*a list"),
        (("layers", 0, "bias"), tl.BatchStat(jnp.zeros(4)), r"BatchStat.*the model has a Param"),
    ],
)
def test_a_bad_update_names_the_path_and_writes_nothing(path, value, message):
    from conftest import assert_unchanged, snapshot

    model = nn.MLP([2, 4, 1], rngs=0)
    before = snapshot(model)
    good = tl.state(model)  # every other entry is fine: nothing may be written anyway
    flat = good.flat()
    flat[path] = value
    with pytest.raises(ValueError) as info:
        tl.update(model, tl.State.from_flat(flat))
    assert f"`{tl._core.paths.format_path(path)}`" in str(info.value)
    assert re.search(message, str(info.value), re.DOTALL)
    assert_unchanged(model, before)


def test_update_converts_python_numbers_for_scalars_only():
    class Scalars(tl.Module):
        def __init__(self):
            self.step = tl.Variable(jnp.zeros((), jnp.int32))
            self.temp = tl.Variable(jnp.ones(()))

    model = Scalars()
    tl.update(model, tl.State({"step": 3, "temp": 0.5}))
    assert model.step.value.dtype == jnp.int32 and int(model.step.value) == 3
    assert model.temp.value.dtype == jnp.float32 and float(model.temp.value) == 0.5
    with pytest.raises(ValueError, match="float32"):
        tl.update(nn.Linear(2, 2, rngs=0), tl.State({"bias": 1.0}))


def test_update_of_a_bare_array_attribute_is_checked_and_seen_by_jit():
    class Bare(tl.Module):
        def __init__(self):
            self.scale = jnp.ones(2)

    model = Bare()
    step = tl.jit(lambda m: m.scale * 2)
    step(model)
    tl.update(model, tl.State({"scale": jnp.full(2, 3.0)}))
    assert np.asarray(step(model)).tolist() == [6.0, 6.0]
    with pytest.raises(ValueError, match=r"model\.scale.*float32\[2\]"):
        tl.update(model, tl.State({"scale": jnp.ones(3)}))


def test_clone_copies_buffers():
    model = nn.Linear(2, 2, rngs=0)
    copy = tl.clone(model)
    assert copy.kernel.value is not model.kernel.value
    model.kernel.value.delete()  # what a donating step does to the original's buffers
    assert np.asarray(copy.kernel.value).shape == (2, 2)


# -- no reference cycles: a model is freed on `del` with the cycle collector off ------------


@pytest.mark.parametrize(
    "use",
    [
        lambda m: tl.split(m),
        lambda m: tl.merge(*tl.split(m)),
        lambda m: tl.state(m, tl.Param),
        lambda m: tl.clone(m),
        lambda m: list(tl.iter_variables(m)),
        lambda m: tl.pop(m, tl.Intermediate),
        lambda m: repr(m),
        lambda m: jax.tree.map(lambda x: x, m),
        lambda m: [tl.jit(lambda m, x: m(x))(m, jnp.ones((1, 2))) for _ in range(3)],
        lambda m: tl.grad(lambda m: m(jnp.ones((1, 2))).sum())(m),
        lambda m: tl.vmap(lambda m, x: m(x), in_axes=(None, 0))(m, jnp.ones((3, 1, 2))),
        lambda m: tl.Optimizer(m, optax.adam(1e-3)),
        lambda m: tl.summary(m, jnp.ones((1, 2))),
    ],
)
def test_a_model_is_freed_on_del_without_the_cycle_collector(use):
    import gc
    import weakref

    model = nn.Sequential(nn.Linear(2, 3, rngs=0), nn.BatchNorm(3), nn.Dropout(0.5, rngs=1))
    model.eval()
    ref = weakref.ref(model)
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        result = use(model)
        del model, result
        assert ref() is None
    finally:
        if was_enabled:
            gc.enable()


def test_update_refuses_two_states_setting_one_path_to_different_values():
    model = nn.Linear(2, 2, rngs=0)
    _, params, rest = tl.split(model, tl.Param, ...)
    trained = jax.tree.map(lambda x: x + 1.0, params)
    before = model.kernel.value
    with pytest.raises(ValueError, match=r"`model\.kernel` is set by State 1 and by State 2"):
        tl.update(model, trained, tl.state(model))  # the stale full state would win
    assert model.kernel.value is before
    tl.update(model, trained, rest)  # disjoint: fine
    assert np.allclose(np.asarray(model.kernel.value), np.asarray(before) + 1.0)
    same = tl.state(model)
    tl.update(model, same, same)  # the same values twice: nothing to choose
