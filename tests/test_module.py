import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import toylib as tl
from toylib import nn


class Linear(tl.Module):
    """The docs/design.md example module."""

    def __init__(self, din, dout, *, rngs: tl.Rngs):
        self.w = tl.Param(jax.random.uniform(rngs.params(), (din, dout)))
        self.b = tl.Param(jnp.zeros((dout,)))
        self.count = tl.Variable(jnp.array(0))
        self.din, self.dout = din, dout

    def __call__(self, x):
        self.count += 1
        return x @ self.w + self.b


def test_design_example_counts_calls_and_acts_like_arrays():
    model = Linear(2, 3, rngs=tl.Rngs(0))
    count = model.count
    y = model(jnp.ones(2))
    np.testing.assert_allclose(y, np.ones(2) @ np.asarray(model.w.value), rtol=1e-6)
    assert model.count is count  # the Variable was updated, not replaced
    assert int(model.count.value) == 1


def test_data_and_static_attributes():
    model = Linear(2, 3, rngs=tl.Rngs(0))
    leaves = jax.tree.leaves(model)
    assert len(leaves) == 3  # w, b, count
    _, treedef = jax.tree.flatten(model)
    other = Linear(2, 3, rngs=tl.Rngs(1))
    assert jax.tree.structure(other) == treedef  # static metadata equal
    assert jax.tree.structure(Linear(2, 4, rngs=tl.Rngs(0))) != treedef


def test_children_follow_assignment_order_and_keys_name_paths():
    model = nn.MLP([2, 3, 1], rngs=0)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(model)[0]]
    assert paths == [
        ".layers[0].kernel.value",
        ".layers[0].bias.value",
        ".layers[1].kernel.value",
        ".layers[1].bias.value",
    ]


def test_assigning_to_a_variable_attribute_sets_its_value():
    model = Linear(2, 3, rngs=tl.Rngs(0))
    w = model.w
    model.w = jnp.zeros((2, 3))
    assert model.w is w and float(jnp.abs(w.value).sum()) == 0.0
    replacement = tl.Param(jnp.ones((2, 3)))
    model.w = replacement
    assert model.w is replacement


def test_lists_of_plain_values_become_tuples():
    class M(tl.Module):
        def __init__(self):
            self.features = [32, [64, 128]]
            self.empty = []
            self.layers = [nn.Linear(1, 1, rngs=0)]

    m = M()
    assert m.features == (32, (64, 128))
    assert m.empty == [] and isinstance(m.empty, list)
    m.empty.append(nn.Linear(1, 1, rngs=1))  # an empty list is a container to fill
    assert len(jax.tree.leaves(m)) == 4
    assert isinstance(m.layers, list)


def test_dict_attributes_hold_data_and_plain_values():
    class M(tl.Module):
        def __init__(self):
            self.cfg = {"act": "relu", "width": 3}
            self.parts = {"a": tl.Param(jnp.ones(2)), "b": jnp.zeros(1), "name": "x"}

    m = M()
    leaves, treedef = jax.tree.flatten(m)
    assert len(leaves) == 2
    rebuilt = jax.tree.unflatten(treedef, leaves)
    assert rebuilt.cfg == {"act": "relu", "width": 3}
    assert rebuilt.parts["name"] == "x" and type(rebuilt.parts["a"]) is tl.Param


def test_namedtuple_of_arrays_is_data():
    class Pair(NamedTuple):
        a: jax.Array
        b: int

    class M(tl.Module):
        def __init__(self):
            self.pair = Pair(jnp.ones(2), 3)

    m = M()
    doubled = jax.tree.map(lambda x: x * 2, m)
    assert isinstance(doubled.pair, Pair) and doubled.pair.b == 3
    assert doubled.pair.a.tolist() == [2.0, 2.0]


def test_functions_in_containers_are_static_under_grad():
    model = nn.Sequential(nn.Linear(2, 4, rngs=0), jax.nn.relu, nn.Linear(4, 1, rngs=1))
    grads = jax.grad(lambda m: m(jnp.ones((3, 2))).sum())(model)
    assert type(grads) is nn.Sequential
    assert grads.layers[1] is jax.nn.relu
    assert grads.layers[2].kernel.shape == (4, 1)


def test_unhashable_static_value_is_an_error_naming_the_attribute():
    class M(tl.Module):
        def __init__(self):
            self.tags = {1, 2}

    with pytest.raises(TypeError) as info:
        M()
    message = str(info.value)
    assert "M.tags" in message and "hashable" in message and "Fix" in message


def test_array_hidden_in_a_static_value_is_an_error_with_its_path():
    class Config:
        def __init__(self):
            self.weights = {"a": jnp.ones(3)}

    class M(tl.Module):
        def __init__(self):
            self.cfg = Config()

    with pytest.raises(TypeError) as info:
        M()
    message = str(info.value)
    assert "M.cfg.weights['a']" in message
    assert "tl.Param" in message


def test_array_hidden_in_a_partial_is_an_error():
    class M(tl.Module):
        def __init__(self):
            self.fn = functools.partial(jnp.add, jnp.ones(2))

    with pytest.raises(TypeError, match=r"M\.fn\.args\[0\]"):
        M()


def test_module_hidden_in_a_static_value_is_an_error():
    class Holder:
        def __init__(self):
            self.layer = nn.Linear(1, 1, rngs=0)

    class M(tl.Module):
        def __init__(self):
            self.holder = Holder()

    with pytest.raises(TypeError, match=r"Linear.*M\.holder\.layer"):
        M()


def test_jax_transforms_and_optax_accept_modules():
    model = nn.MLP([3, 8, 1], rngs=0)
    x = jnp.ones((5, 3))

    def loss(m):
        return jnp.mean(m(x) ** 2)

    value, grads = jax.jit(jax.value_and_grad(loss))(model)
    assert type(grads) is nn.MLP and np.isfinite(float(value))
    per_example = jax.vmap(lambda m, row: m(row), in_axes=(None, 0))(model, x)
    np.testing.assert_allclose(per_example, model(x), rtol=1e-6)

    tx = optax.adam(1e-2)
    opt_state = tx.init(model)
    updates, opt_state = tx.update(grads, opt_state, model)
    new_model = optax.apply_updates(model, updates)
    assert type(new_model) is nn.MLP
    assert float(loss(new_model)) < float(value)


def test_grad_returns_same_module_type_holding_gradients():
    model = nn.Linear(2, 1, rngs=0)
    x = jnp.array([[1.0, 2.0]])
    grads = jax.grad(lambda m: jnp.sum(m(x)))(model)
    assert type(grads) is nn.Linear and type(grads.kernel) is tl.Param
    np.testing.assert_allclose(grads.kernel.value, [[1.0], [2.0]])
    np.testing.assert_allclose(grads.bias.value, [1.0])
    assert grads.in_features == 2  # static attributes carried over
    # Integer state (the call counter) is a pytree leaf too: raw jax.grad
    # needs allow_int=True for it, as for any integer input.
    counting = Linear(2, 1, rngs=tl.Rngs(0))
    int_grads = jax.grad(lambda m: jnp.sum(x @ m.w.value), allow_int=True)(counting)
    np.testing.assert_allclose(int_grads.w.value, [[1.0], [2.0]])


def test_jit_compiles_once_for_equal_structures():
    traces = []

    @jax.jit
    def f(m, x):
        traces.append(1)
        return m(x)

    f(nn.Linear(2, 2, rngs=0), jnp.ones(2))
    f(nn.Linear(2, 2, rngs=1), jnp.ones(2))
    assert len(traces) == 1


def test_surgery_is_plain_assignment():
    model = nn.MLP([2, 4, 1], rngs=0)
    new = nn.Linear(2, 4, use_bias=False, rngs=5)
    model.layers[0] = new
    assert model.layers[0] is new
    assert len(jax.tree.leaves(model)) == 3


def test_train_and_eval_flip_flags_on_submodules():
    model = nn.Sequential(nn.Linear(2, 2, rngs=0), nn.Dropout(0.5, rngs=0), nn.BatchNorm(2))
    assert model.eval() is model
    assert model.layers[1].deterministic is True
    assert model.layers[2].use_running_average is True
    model.train()
    assert model.layers[1].deterministic is False
    assert model.layers[2].use_running_average is False
    assert not hasattr(model.layers[0], "deterministic")


def test_properties_with_setters_are_respected():
    class M(tl.Module):
        def __init__(self):
            self._scale = 1.0

        @property
        def scale(self):
            return self._scale

        @scale.setter
        def scale(self, value):
            self._scale = float(value) * 2

    m = M()
    m.scale = 3
    assert m.scale == 6.0


def test_repr_is_readable_and_marks_shared_references():
    shared = nn.Linear(2, 2, rngs=0)
    model = nn.Sequential(shared, jax.nn.relu, shared)
    text = repr(model)
    assert text.startswith("Sequential(\n  layers=[\n    Linear(")
    assert "kernel=Param(float32[2, 2])" in text
    assert "relu" in text and "custom_jvp object" not in text
    assert "Linear(...)  # shared: model.layers[0]" in text


def test_repr_survives_reference_cycles():
    class Node(tl.Module):
        def __init__(self):
            self.w = tl.Param(jnp.ones(1))

    a = Node()
    a.parent = a
    assert "shared: model" in repr(a)


# -- module_path: where a layer sits in the model being called -------------------------------


class _Encoder(tl.Module):
    def __init__(self):
        self.layers = [nn.Linear(3, 3, rngs=0), nn.Linear(3, 2, rngs=1)]
        self.heads = {"out": nn.Linear(2, 4, rngs=2)}

    def __call__(self, x, skip=False):
        for layer in self.layers[1:] if skip else self.layers:
            x = layer(x)
        return self.heads["out"](x)


class _Model(tl.Module):
    def __init__(self):
        self.encoder = _Encoder()

    def __call__(self, x, skip=False):
        return self.encoder(x, skip)


def test_shape_error_names_the_layer_path_inside_the_called_model():
    from toylib._core import calls

    model = _Model()
    with pytest.raises(ValueError, match=r"^model\.encoder\.layers\[0\] \(Linear\): .*\(7, 5\)"):
        model(jnp.ones((7, 5)))
    assert calls.running() == []  # the call stack unwinds on errors
    # The same layer called directly is the root.
    with pytest.raises(ValueError, match=r"^model \(Linear\)"):
        model.encoder.layers[0](jnp.ones((7, 5)))
    # Dict keys, and a call from a submodule: the path starts at the outermost call.
    with pytest.raises(ValueError, match=r"^model\.encoder\.layers\[1\] \(Linear\)"):
        model(jnp.ones((7, 4)), skip=True)
    with pytest.raises(ValueError, match=r"^model\.layers\[1\] \(Linear\)"):
        model.encoder(jnp.ones((7, 4)), skip=True)


def test_shape_error_path_inside_transforms():
    model = _Model()
    with pytest.raises(ValueError, match=r"^model\.encoder\.layers\[0\] \(Linear\)"):
        tl.jit(lambda m, x: m(x))(model, jnp.ones((7, 5)))
    with pytest.raises(ValueError, match=r"^model\.encoder\.layers\[0\] \(Linear\)"):
        jax.jit(lambda m, x: m(x))(model, jnp.ones((7, 5)))
    out = tl.jit(lambda m, x: m(x))(model, jnp.ones((7, 3)))
    assert out.shape == (7, 4)


def test_module_path_of_a_shared_layer_uses_its_first_path():
    class Tied(tl.Module):
        def __init__(self):
            self.a = nn.Linear(3, 3, rngs=0)
            self.b = self.a

        def __call__(self, x):
            return self.b(x)

    with pytest.raises(ValueError, match=r"^model\.a \(Linear\)"):
        Tied()(jnp.ones(4))


def test_call_tracking_keeps_signature_and_subclass_super_calls():
    import inspect

    class Base(tl.Module):
        def __init__(self):
            self.lin = nn.Linear(2, 2, rngs=0)

        def __call__(self, x, *, scale: float = 1.0):
            return self.lin(x) * scale

    class Child(Base):
        def __call__(self, x, *, scale: float = 2.0):
            return super().__call__(x, scale=scale)

    assert list(inspect.signature(Child.__call__).parameters) == ["self", "x", "scale"]
    assert Child()(jnp.ones(2)).shape == (2,)
    with pytest.raises(ValueError, match=r"^model\.lin \(Linear\)"):
        Child()(jnp.ones(3))


# -- call tracking is per thread --------------------------------------------------------


def test_error_paths_stay_right_while_another_thread_runs_a_model():
    from conftest import run_in_threads

    def failing():
        model = _Model()
        messages = set()
        for _ in range(30):
            try:
                model(jnp.ones((7, 5)))
            except ValueError as error:
                messages.add(str(error).split(":")[0])
        return messages

    def busy():
        deep = nn.Sequential(*[nn.MLP([3, 3, 3], rngs=i) for i in range(6)])
        for _ in range(30):
            deep(jnp.ones(3))
        return "done"

    results = run_in_threads(failing, busy, failing)
    assert results[0] == results[2] == {"model.encoder.layers[0] (Linear)"}
    assert results[1] == "done"


def test_nested_labels_on_one_module_restore_the_outer_one():
    from toylib._core import calls

    outer = nn.Linear(2, 2, rngs=0)
    inner = nn.Linear(2, 2, rngs=1)
    with calls.labelled(inner, ".a"):
        with calls.labelled(inner, ".b"):
            assert calls._child_path(outer, inner, calls._labels.get()) == ".b"
        assert calls._child_path(outer, inner, calls._labels.get()) == ".a"
    assert calls._labels.get() in (None, {})


# -- static values: arrays hidden at any depth are found --------------------------------


class _Slotted:
    __slots__ = ("weights",)

    def __init__(self):
        self.weights = jnp.ones(2)


class _Deep:
    def __init__(self, depth):
        self.child = _Deep(depth - 1) if depth else None
        self.leaf = jnp.ones(1) if not depth else 0


def _closure():
    w = jnp.ones(3)
    return lambda x: x @ w


class _Holder:
    def __init__(self):
        self.w = jnp.ones(2)

    def apply(self, x):
        return x * self.w


@pytest.mark.parametrize(
    ("value", "where"),
    [
        (_Slotted(), r"M\.thing\.weights"),
        (_Deep(5), r"M\.thing(\.child){5}\.leaf"),
        (_closure(), r"M\.thing \(closed-over `w`\)"),
        (functools.partial(jnp.add, y=jnp.ones(2)), r"M\.thing\.keywords\['y'\]"),
        (_Holder().apply, r"M\.thing\.__self__\.w"),
        ((lambda x, w=jnp.ones(2): x * w), r"M\.thing\.__defaults__\[0\]"),  # noqa: B008 (the point of the test)
        ({"cfg": [_Slotted()]}, r"M\.thing\['cfg'\]\[0\]\.weights"),
    ],
)
def test_an_array_hidden_anywhere_in_a_static_value_is_an_error(value, where):
    class M(tl.Module):
        pass

    model = M()
    with pytest.raises(TypeError, match=rf"(?s)found an array at `{where}`.*never trained"):
        model.thing = value
    assert "thing" not in vars(model)


def test_cycles_and_plain_objects_in_static_values_are_fine():
    class Config:
        def __init__(self):
            self.me = self
            self.sizes = (1, 2)
            self.fn = jax.nn.relu

    class M(tl.Module):
        def __init__(self):
            self.cfg = Config()
            self.act = jax.nn.gelu
            self.opt = optax.adam(1e-3)

    model = M()
    assert jax.tree.leaves(model) == []


def test_a_module_of_another_framework_is_named():
    from flax import nnx

    class M(tl.Module):
        pass

    with pytest.raises(
        TypeError, match=r"(?s)M\.layer: a Flax object \(Linear\) holds arrays.*tl\.Param"
    ):
        M().layer = nnx.Linear(2, 3, rngs=nnx.Rngs(0))


# -- which attributes are data is decided on assignment ------------------------------------


class _Bare(tl.Module):
    def __init__(self):
        self.arr = jnp.ones(3)
        self.items = [jnp.ones(2), jnp.zeros(2)]
        self.pair = (jnp.ones(1), 2)
        self.table = {"w": jnp.ones(1), "n": 3}
        self.param = tl.Param(jnp.ones(2))
        self.act = jax.nn.relu


@pytest.mark.parametrize("leaf", [True, None, "label", 0])
def test_tree_map_to_any_value_keeps_the_models_structure(leaf):
    model = _Bare()
    mapped = jax.tree.map(lambda x: leaf, model)
    is_leaf = (lambda x: x is None) if leaf is None else None
    assert jax.tree.structure(mapped, is_leaf=is_leaf) == jax.tree.structure(model)
    assert tl.split(mapped)[0] == tl.split(model)[0]  # the graph view agrees
    twice = jax.tree.map(lambda x: x, mapped, is_leaf=is_leaf)
    assert jax.tree.structure(twice, is_leaf=is_leaf) == jax.tree.structure(model)


def test_assigning_to_a_rebuilt_module_decides_again_by_type():
    mapped = jax.tree.map(lambda x: True, _Bare())
    mapped.arr = "now static"
    assert "now static" not in jax.tree.leaves(mapped)
    mapped.items.append(jnp.ones(1))  # a mutated container: its items' types decide
    assert len(jax.tree.leaves(mapped.items)) == 3


def test_masks_and_partitions_from_optax_and_equinox_work_on_any_module():
    import equinox as eqx

    model = _Bare()
    mask = jax.tree.map(lambda x: True, model)
    tx = optax.masked(optax.sgd(0.1), mask)
    updates, _ = tx.update(model, tx.init(model), model)
    assert jax.tree.structure(updates) == jax.tree.structure(model)
    dynamic, static = eqx.partition(model, eqx.is_array)
    back = eqx.combine(dynamic, static)
    assert jax.tree.structure(back) == jax.tree.structure(model)

    @eqx.filter_jit
    def total(m):
        return sum(jnp.sum(x) for x in jax.tree.leaves(m) if eqx.is_array(x))

    for _ in range(2):
        assert float(total(model)) == float(total(back)) == 3 + 2 + 1 + 1 + 2


def test_raw_grad_and_tl_grad_with_wrt_everything_train_bare_arrays():
    model = _Bare()

    def loss(m):
        return jnp.sum(m.arr) + jnp.sum(m.items[0] * 2) + jnp.sum(m.param)

    raw = jax.grad(loss)(model)
    ours = tl.grad(loss, wrt=...)(model)
    assert ours.arr.tolist() == raw.arr.tolist() == [1.0, 1.0, 1.0]
    assert ours["items"][0].tolist() == [2.0, 2.0]
    assert set(ours.flat()) == set(tl.state(model).flat())
    only_params = tl.grad(loss)(model)
    assert list(only_params.flat()) == [("param",)]
