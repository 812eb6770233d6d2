"""tl.jit: stateful, filtered jax.jit (docs/design.md "Transforms", Principles 3-5)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import Block, CountingLinear

import toylib as tl
from toylib import nn


class Pair(tl.Module):
    def __init__(self, first, second):
        self.first = first
        self.second = second

    def __call__(self, x):
        return self.second(self.first(x))


class Probe(tl.Module):
    """Sows an Intermediate on every call (NNX README "capturing intermediates")."""

    def __init__(self, rngs):
        self.linear = nn.Linear(2, 3, rngs=rngs)

    def __call__(self, x):
        y = self.linear(x)
        self.seen = tl.Intermediate(y * 2)
        return y


def _np(x):
    return np.asarray(x)


def _linear_out(layer, x):
    return _np(x) @ _np(layer.kernel.value) + _np(layer.bias.value)


# -- 1. forms ------------------------------------------------------------------


def test_jit_as_function_decorator_and_decorator_factory():
    layer = nn.Linear(2, 3, rngs=0)
    x = jnp.ones((4, 2))
    want = _linear_out(layer, x)

    plain = tl.jit(lambda m, x: m(x))

    @tl.jit
    def bare(m, x):
        return m(x)

    @tl.jit(donate=())
    def factory(m, x):
        return m(x)

    @tl.jit(donate="x")
    def donating(m, x):
        return m(x) + 0 * x.sum()

    for fn in (plain, bare, factory, donating):
        np.testing.assert_allclose(_np(fn(layer, jnp.ones((4, 2)))), want, rtol=1e-6)
    assert bare.__name__ == "bare"


def test_jit_as_method_decorator():
    class Model(tl.Module):
        def __init__(self):
            self.linear = nn.Linear(2, 3, rngs=0)
            self.count = tl.Variable(jnp.array(0))

        @tl.jit
        def forward(self, x):
            self.count += 1
            return self.linear(x)

    model = Model()
    x = jnp.ones((1, 2))
    for i in range(1, 4):
        y = model.forward(x)
        np.testing.assert_allclose(_np(y), _linear_out(model.linear, x), rtol=1e-6)
        assert int(model.count.value) == i
    # Bound to another instance, the same decorated method updates that one.
    other = Model()
    other.forward(x)
    assert int(other.count.value) == 1
    assert int(model.count.value) == 3


# -- 2. the NNX README counter -------------------------------------------------


def test_counter_visible_outside_after_each_call():
    model = CountingLinear(2, 3, rngs=0)
    count = model.count
    step = tl.jit(lambda m, x: m(x))
    x = jnp.arange(2.0)
    for i in (1, 2, 3):
        y = step(model, x)
        np.testing.assert_allclose(_np(y), _np(x) @ _np(model.kernel.value), rtol=1e-6)
        assert int(model.count.value) == i
        assert model.count is count  # the value was written, the Variable kept


# -- 3. argument kinds ---------------------------------------------------------


def test_arguments_module_state_variable_array_and_nesting():
    model = CountingLinear(2, 2, rngs=0)
    var = tl.Variable(jnp.array(10.0))
    params = tl.state(model, tl.Param)
    other = CountingLinear(2, 2, rngs=1)

    @tl.jit
    def f(m, s, v, a, nested):
        m(a)
        v.value = v.value + 1
        nested["mods"][0](a)
        return s.kernel.value.sum() + v.value + nested["pair"][1] + nested["arrs"][0].sum()

    nested = {"mods": [other], "pair": (1.0, jnp.array(5.0)), "arrs": [jnp.ones(3)]}
    out = f(model, params, var, jnp.ones(2), nested)
    want = float(_np(model.kernel.value).sum()) + 11.0 + 5.0 + 3.0
    np.testing.assert_allclose(float(out), want, rtol=1e-6)
    assert float(var.value) == 11.0
    assert int(model.count.value) == 1
    assert int(other.count.value) == 1


def test_static_python_values_retrace_when_changed():
    traces = []

    @tl.jit
    def f(x, n, mode):
        traces.append((n, mode))
        return x * n if mode == "mul" else x + n

    x = jnp.ones(3)
    np.testing.assert_allclose(_np(f(x, 2, "mul")), 2 * np.ones(3))
    np.testing.assert_allclose(_np(f(x, 2, "mul")), 2 * np.ones(3))
    assert len(traces) == 1
    np.testing.assert_allclose(_np(f(x, 3, "mul")), 3 * np.ones(3))
    assert len(traces) == 2
    np.testing.assert_allclose(_np(f(x, 3, "add")), 4 * np.ones(3))
    assert len(traces) == 3
    np.testing.assert_allclose(_np(f(x, 2, "mul")), 2 * np.ones(3))
    assert len(traces) == 3  # cached
    assert traces[0] == (2, "mul") and traces[2] == (3, "add")


def test_static_argnames_with_keyword_and_nested_static_values():
    traces = []

    @tl.jit(static_argnames="cfg")
    def f(x, cfg):
        traces.append(cfg)
        return x * cfg[0]

    x = jnp.ones(2)
    np.testing.assert_allclose(_np(f(x, cfg=(2, "a"))), [2.0, 2.0])
    np.testing.assert_allclose(_np(f(x, cfg=(2, "a"))), [2.0, 2.0])
    np.testing.assert_allclose(_np(f(x, cfg=(5, "a"))), [5.0, 5.0])
    assert traces == [(2, "a"), (5, "a")]


# -- 4. sharing ----------------------------------------------------------------


def test_module_reachable_from_two_arguments_is_one_object_inside():
    model = nn.MLP([2, 4, 1], rngs=0)
    seen = []

    @tl.jit
    def f(m, first):
        seen.append(m.layers[0] is first)
        first.bias.value = first.bias.value + 1.0
        return m(jnp.ones(2))

    before = _np(model.layers[0].bias.value)
    first = model.layers[0]
    f(model, first)
    assert seen == [True]
    assert model.layers[0] is first
    np.testing.assert_allclose(_np(first.bias.value), before + 1.0)
    f(model, first)
    np.testing.assert_allclose(_np(model.layers[0].bias.value), before + 2.0)


def test_two_models_sharing_a_linear_stay_shared():
    shared = CountingLinear(2, 2, rngs=0)
    a = Pair(shared, CountingLinear(2, 2, rngs=1))
    b = Pair(CountingLinear(2, 2, rngs=2), shared)
    seen = []

    @tl.jit
    def f(a, b, x):
        seen.append(a.first is b.second)
        return a(x) + b(x)

    x = jnp.ones(2)
    for _ in range(3):
        f(a, b, x)
    assert seen == [True]  # traced once
    assert a.first is b.second is shared
    assert int(shared.count.value) == 6  # two uses per call, one object
    assert int(a.second.count.value) == 3
    assert int(b.first.count.value) == 3


# -- 5. returning Modules ------------------------------------------------------


def test_returning_an_argument_module_returns_the_same_object():
    model = CountingLinear(2, 2, rngs=0)
    layer = nn.Linear(2, 2, rngs=0)

    @tl.jit
    def f(m, other, x):
        m(x)
        return m, other, m(x)

    for i in (1, 2):
        got, got_other, y = f(model, layer, jnp.ones(2))
        assert got is model
        assert got_other is layer
        assert int(model.count.value) == 2 * i
        assert isinstance(y, jax.Array)


def test_constructor_under_jit_returns_concrete_module():
    layer = tl.jit(lambda: nn.Linear(2, 3, rngs=0))()
    assert isinstance(layer, nn.Linear)
    assert isinstance(layer.kernel, tl.Param)
    assert not isinstance(layer.kernel.value, jax.core.Tracer)
    assert layer.kernel.value.shape == (2, 3)
    eager = nn.Linear(2, 3, rngs=0)
    np.testing.assert_allclose(_np(layer.kernel.value), _np(eager.kernel.value), rtol=1e-6)
    x = jnp.ones((1, 2))
    np.testing.assert_allclose(_np(layer(x)), _linear_out(eager, x), rtol=1e-6)


def test_constructor_with_rngs_argument_advances_stream():
    rngs = tl.Rngs(0)
    make = tl.jit(lambda r: nn.Linear(2, 3, rngs=r))
    a = make(rngs)
    b = make(rngs)
    assert int(rngs.default.count.value) == 4  # kernel + bias, twice
    assert not np.allclose(_np(a.kernel.value), _np(b.kernel.value))
    assert a is not b and a.kernel is not b.kernel


# -- 6. structural changes -----------------------------------------------------


def test_intermediate_set_inside_appears_outside_then_pop():
    model = Probe(0)
    f = tl.jit(lambda m, x: m(x))
    x = jnp.ones((1, 2))
    y = f(model, x)
    assert isinstance(model.seen, tl.Intermediate)
    np.testing.assert_allclose(_np(model.seen.value), 2 * _np(y), rtol=1e-6)
    assert not isinstance(model.seen.value, jax.core.Tracer)
    popped = tl.pop(model, tl.Intermediate)
    np.testing.assert_allclose(_np(popped.seen.value), 2 * _np(y), rtol=1e-6)
    assert not hasattr(model, "seen")
    # And again: the structure changed back and forth.
    y2 = f(model, 2 * x)
    np.testing.assert_allclose(_np(model.seen.value), 2 * _np(y2), rtol=1e-6)


def test_pop_inside_jit_removes_attribute_from_live_model():
    model = Probe(0)
    model(jnp.ones((1, 2)))
    assert hasattr(model, "seen")
    want = _np(model.seen.value)

    @tl.jit
    def f(m):
        return tl.pop(m, tl.Intermediate)

    popped = f(model)
    assert not hasattr(model, "seen")
    np.testing.assert_allclose(_np(popped.seen.value), want, rtol=1e-6)
    assert isinstance(model.linear.kernel, tl.Param)  # the rest is intact


def test_new_submodule_assigned_inside_appears_outside():
    model = Pair(nn.Linear(2, 2, rngs=0), nn.Linear(2, 2, rngs=1))
    old = model.second

    @tl.jit
    def f(m):
        m.second = nn.Linear(2, 2, rngs=5)

    f(model)
    assert model.second is not old
    assert isinstance(model.second, nn.Linear)
    assert not isinstance(model.second.kernel.value, jax.core.Tracer)
    np.testing.assert_allclose(
        _np(model.second.kernel.value), _np(nn.Linear(2, 2, rngs=5).kernel.value), rtol=1e-6
    )


# -- 7. rngs -------------------------------------------------------------------


_apply = tl.jit(lambda m, x: m(x))  # one compiled program for every Dropout below


def _masks(seed, n):
    drop = nn.Dropout(0.5, rngs=tl.Rngs(seed))
    out = [_np(_apply(drop, jnp.ones(64))) for _ in range(n)]
    return drop, out


def test_dropout_under_jit_advances_the_stream():
    drop, (m1, m2, m3) = _masks(0, 3)
    assert set(np.unique(m1)) <= {0.0, 2.0}
    assert not np.array_equal(m1, m2)
    assert not np.array_equal(m2, m3)
    assert int(drop.rngs.count.value) == 3
    _, again = _masks(0, 3)
    for a, b in zip((m1, m2, m3), again, strict=True):
        np.testing.assert_array_equal(a, b)
    _, other = _masks(1, 1)
    assert not np.array_equal(m1, other[0])


def test_dropout_masks_match_eager_sequence():
    _, jitted = _masks(3, 2)
    eager = nn.Dropout(0.5, rngs=tl.Rngs(3))
    for mask in jitted:
        np.testing.assert_array_equal(mask, _np(eager(jnp.ones(64))))


# -- 8. fast path --------------------------------------------------------------


def _traced_forward():
    traces = []

    @tl.jit
    def f(m, x):
        traces.append(1)
        return m(x)

    return f, traces


def _warm(f, model, x):
    """Two calls: the second runs on the fast path, which stays recorded."""
    f(model, x)
    assert f._fast is not None
    fast = f._fast
    f(model, x)
    assert f._fast is fast


def test_fast_path_recorded_and_reused_without_retrace():
    model = CountingLinear(2, 3, rngs=0)
    f, traces = _traced_forward()
    assert f._fast is None
    x = jnp.ones(2)
    f(model, x)
    assert f._fast is not None
    fast = f._fast
    for i in range(2, 6):
        y = f(model, x)
        assert int(model.count.value) == i
        np.testing.assert_allclose(_np(y), _np(x) @ _np(model.kernel.value), rtol=1e-6)
    assert len(traces) == 1
    assert f._fast is fast


def test_fast_path_sees_value_set_outside_between_calls():
    layer = nn.Linear(2, 3, rngs=0)
    f, traces = _traced_forward()
    x = jnp.ones((1, 2))
    _warm(f, layer, x)
    layer.kernel.value = jnp.zeros((2, 3))
    layer.bias.value = jnp.full((3,), 7.0, jnp.float32)
    np.testing.assert_allclose(_np(f(layer, x)), np.full((1, 3), 7.0))
    assert len(traces) == 1


def test_fast_path_reassigned_list_element_uses_new_weights():
    model = nn.MLP([2, 4, 1], rngs=0)
    f, _ = _traced_forward()
    x = jnp.ones((3, 2))
    _warm(f, model, x)
    new = nn.Linear(2, 4, rngs=9)
    model.layers[0] = new
    y = f(model, x)
    want = np.maximum(_linear_out(new, x), 0) @ _np(model.layers[1].kernel.value)
    want = want + _np(model.layers[1].bias.value)
    np.testing.assert_allclose(_np(y), want, rtol=1e-5, atol=1e-6)
    assert model.layers[0] is new


def test_fast_path_append_to_sequential_layers():
    model = nn.Sequential(nn.Linear(2, 3, rngs=0))
    f, _ = _traced_forward()
    x = jnp.ones((1, 2))
    _warm(f, model, x)
    extra = nn.Linear(3, 2, rngs=1)
    model.layers.append(extra)
    y = f(model, x)
    assert y.shape == (1, 2)
    np.testing.assert_allclose(_np(y), _linear_out(extra, _linear_out(model[0], x)), rtol=1e-5)
    y = f(model, x)  # and again, on the new fast path
    np.testing.assert_allclose(_np(y), _linear_out(extra, _linear_out(model[0], x)), rtol=1e-5)


def test_fast_path_append_to_list_attribute_of_module():
    class Chain(tl.Module):
        def __init__(self):
            self.layers = [nn.Linear(2, 2, rngs=0)]

        def __call__(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    model = Chain()
    f, _ = _traced_forward()
    x = jnp.ones((1, 2))
    _warm(f, model, x)
    model.layers.append(nn.Linear(2, 2, rngs=1))
    want = _linear_out(model.layers[1], _linear_out(model.layers[0], x))
    np.testing.assert_allclose(_np(f(model, x)), want, rtol=1e-5)


def test_fast_path_deleted_attribute():
    class Maybe(tl.Module):
        def __init__(self):
            self.linear = nn.Linear(2, 2, rngs=0)
            self.extra = tl.Variable(jnp.full((2,), 100.0))

        def __call__(self, x):
            y = self.linear(x)
            return y + self.extra.value if hasattr(self, "extra") else y

    model = Maybe()
    f, traces = _traced_forward()
    x = jnp.ones((1, 2))
    _warm(f, model, x)
    del model.extra
    np.testing.assert_allclose(_np(f(model, x)), _linear_out(model.linear, x), rtol=1e-6)
    assert len(traces) == 2
    assert not hasattr(model, "extra")


def test_fast_path_replaced_variable_object():
    model = CountingLinear(2, 2, rngs=0)
    f, _ = _traced_forward()
    x = jnp.ones(2)
    _warm(f, model, x)
    old = model.kernel
    model.kernel = tl.Param(jnp.eye(2) * 3.0)
    y = f(model, x)
    np.testing.assert_allclose(_np(y), [3.0, 3.0], rtol=1e-6)
    assert _np(old.value).shape == (2, 2)
    # The count still goes to the live Variable, on the fast path too.
    f(model, x)
    assert int(model.count.value) == 4
    # The new Param is updated in place by later calls that write it.
    g = tl.jit(lambda m: setattr(m, "kernel", m.kernel.value + 1))
    w = model.kernel
    g(model)
    assert model.kernel is w
    np.testing.assert_allclose(_np(model.kernel.value), np.eye(2) * 3.0 + 1.0)


def test_fast_path_replaced_variable_in_shared_submodule():
    shared = nn.Linear(2, 2, rngs=0)
    model = Pair(shared, shared)
    f, _ = _traced_forward()
    x = jnp.ones((1, 2))
    _warm(f, model, x)
    shared.kernel = tl.Param(jnp.eye(2))
    shared.bias = tl.Param(jnp.zeros(2))
    np.testing.assert_allclose(_np(f(model, x)), [[1.0, 1.0]], rtol=1e-6)


def test_fast_path_different_object_falls_back():
    a = CountingLinear(2, 2, rngs=0)
    b = CountingLinear(2, 2, rngs=1)
    f, traces = _traced_forward()
    x = jnp.ones(2)
    _warm(f, a, x)
    y = f(b, x)
    np.testing.assert_allclose(_np(y), _np(x) @ _np(b.kernel.value), rtol=1e-6)
    assert int(a.count.value) == 2 and int(b.count.value) == 1
    assert len(traces) == 1  # same structure: same compiled program


def test_new_input_shape_retraces_and_stays_correct():
    model = CountingLinear(2, 3, rngs=0)
    f, traces = _traced_forward()
    for shape in [(2,), (2,), (4, 2), (4, 2), (2,), (1, 5, 2)]:
        x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
        y = f(model, x)
        assert y.shape == (*shape[:-1], 3)
        np.testing.assert_allclose(_np(y), _np(x) @ _np(model.kernel.value), rtol=1e-5)
    assert len(traces) == 3
    assert int(model.count.value) == 6


def test_retrace_with_new_shape_changing_output_structure():
    class Shapey(tl.Module):
        def __init__(self):
            self.count = tl.Variable(jnp.array(0))

        def __call__(self, x):
            self.count += 1
            if x.ndim == 1:
                return x.sum(), x.max()
            return {"a": x.sum(), "b": x.mean(), "c": x.shape}

    model = Shapey()
    f, traces = _traced_forward()
    assert [float(v) for v in f(model, jnp.ones(3))] == [3.0, 1.0]
    assert f._fast is not None
    assert [float(v) for v in f(model, jnp.ones(3))] == [3.0, 1.0]
    out = f(model, jnp.ones((2, 2)))
    assert sorted(out) == ["a", "b", "c"]
    assert float(out["a"]) == 4.0 and float(out["b"]) == 1.0 and out["c"] == (2, 2)
    out = f(model, 2 * jnp.ones((2, 2)))
    assert float(out["a"]) == 8.0 and out["c"] == (2, 2)
    assert [float(v) for v in f(model, jnp.ones(4))] == [4.0, 1.0]
    assert int(model.count.value) == 5
    assert len(traces) == 3


def test_single_element_output_containers_kept_on_every_call():
    f = tl.jit(lambda x: (x * 2,))
    g = tl.jit(lambda x: [x * 2])
    h = tl.jit(lambda x: {"y": x * 2})
    x = jnp.ones(2)
    for _ in range(3):
        out = f(x)
        assert isinstance(out, tuple) and len(out) == 1
        np.testing.assert_allclose(_np(out[0]), [2.0, 2.0])
        out = g(x)
        assert isinstance(out, list) and len(out) == 1
        out = h(x)
        assert isinstance(out, dict) and list(out) == ["y"]
        np.testing.assert_allclose(_np(out["y"]), [2.0, 2.0])


def test_single_element_output_container_with_module_argument():
    model = CountingLinear(2, 2, rngs=0)
    f = tl.jit(lambda m, x: (m(x),))
    for i in (1, 2, 3):
        (y,) = f(model, jnp.ones(2))
        assert y.shape == (2,)
        assert int(model.count.value) == i


def test_array_argument_on_fast_path_is_not_cached():
    f, traces = _traced_forward()
    layer = nn.Linear(2, 2, rngs=0)
    for i in range(4):
        x = jnp.full((1, 2), float(i))
        np.testing.assert_allclose(_np(f(layer, x)), _linear_out(layer, x), rtol=1e-6)
    assert len(traces) == 1


def test_keyword_arguments_on_fast_path():
    model = CountingLinear(2, 2, rngs=0)
    f, traces = _traced_forward()
    x = jnp.ones(2)
    want = _np(x) @ _np(model.kernel.value)
    calls = (
        lambda: f(model, x=x),
        lambda: f(model, x=x),
        lambda: f(m=model, x=x),
        lambda: f(x=x, m=model),
        lambda: f(model, x),
        lambda: f(x=x, m=model),
    )
    for call in calls:
        np.testing.assert_allclose(_np(call()), want, rtol=1e-6)
    assert int(model.count.value) == 6
    ntraces = len(traces)
    for call in calls:  # every form again: cached, no retrace
        np.testing.assert_allclose(_np(call()), want, rtol=1e-6)
    assert len(traces) == ntraces
    assert int(model.count.value) == 12
    other = CountingLinear(2, 2, rngs=1)
    np.testing.assert_allclose(_np(f(x=x, m=other)), _np(x) @ _np(other.kernel.value), rtol=1e-6)
    assert int(model.count.value) == 12 and int(other.count.value) == 1


def test_containers_and_none_arguments_mutated_between_calls():
    a = CountingLinear(2, 2, rngs=0)
    b = CountingLinear(2, 2, rngs=1)

    @tl.jit
    def f(mods, arrs, extra):
        out = mods["m"](arrs[0])
        return out if extra is None else out + extra

    x = jnp.ones(2)
    mods, arrs = {"m": a}, [x]
    for _ in range(2):
        np.testing.assert_allclose(
            _np(f(mods, arrs, None)), _np(x) @ _np(a.kernel.value), rtol=1e-6
        )
    mods["m"] = b  # the same dict, now holding another model
    arrs[0] = 2 * x  # the same list, now holding another array
    np.testing.assert_allclose(
        _np(f(mods, arrs, None)), 2 * _np(x) @ _np(b.kernel.value), rtol=1e-6
    )
    assert int(a.count.value) == 2 and int(b.count.value) == 1
    np.testing.assert_allclose(
        _np(f(mods, arrs, jnp.ones(2))), 2 * _np(x) @ _np(b.kernel.value) + 1, rtol=1e-6
    )
    np.testing.assert_allclose(
        _np(f(mods, arrs, np.ones(2, np.float32))), 2 * _np(x) @ _np(b.kernel.value) + 1, rtol=1e-6
    )
    assert int(b.count.value) == 3


# -- 9. donation ---------------------------------------------------------------


def _sgd_step(model, x, y):
    def loss_fn(m):
        return jnp.mean((m(x) - y) ** 2)

    loss, grads = tl.value_and_grad(loss_fn)(model)
    for path, g in grads.flat().items():
        target = model
        for key in path:
            target = getattr(target, key) if isinstance(target, tl.Module) else target[key]
        target.value = target.value - 0.1 * g.value
    return loss


def test_donated_train_step_equals_non_donated():
    x = jax.random.normal(jax.random.key(0), (8, 2))
    y = jnp.sum(x, axis=-1, keepdims=True)
    donated_model = nn.MLP([2, 4, 1], rngs=0)
    kept_model = nn.MLP([2, 4, 1], rngs=0)
    donated = tl.jit(_sgd_step, donate=0)
    kept = tl.jit(_sgd_step)
    losses = []
    for _ in range(4):
        a = donated(donated_model, x, y)
        b = kept(kept_model, x, y)
        np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
        losses.append(float(a))
    assert losses[-1] < losses[0]
    for (pa, va), (pb, vb) in zip(
        tl.state(donated_model).flat().items(), tl.state(kept_model).flat().items(), strict=True
    ):
        assert pa == pb
        np.testing.assert_allclose(_np(va.value), _np(vb.value), rtol=1e-6)


def test_donated_optimizer_step_matches():
    x = jax.random.normal(jax.random.key(1), (8, 2))
    y = x[:, :1] - x[:, 1:]

    def step(model, opt, x, y):
        loss, grads = tl.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        opt.update(model, grads)
        return loss

    results = []
    for donate in ((0, 1), ()):
        model = nn.MLP([2, 4, 1], rngs=0)
        opt = tl.Optimizer(model, optax.adam(1e-2))
        f = tl.jit(step, donate=donate)
        losses = [float(f(model, opt, x, y)) for _ in range(3)]
        assert int(opt.step.value) == 3
        results.append((losses, tl.state(model, tl.Param)))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
    for a, b in zip(results[0][1].flat().values(), results[1][1].flat().values(), strict=True):
        np.testing.assert_allclose(_np(a.value), _np(b.value), rtol=1e-6)


# -- 10. the functional pattern ------------------------------------------------


def test_functional_jax_jit_equals_tl_jit_training():
    x = jax.random.normal(jax.random.key(2), (16, 2))
    y = jnp.sin(x[:, :1])
    lr = 0.05

    model = nn.MLP([2, 8, 1], rngs=0)
    graphdef, params, rest = tl.split(model, tl.Param, ...)

    @jax.jit
    def functional_step(params, rest, x, y):
        def loss_fn(params):
            out, _ = graphdef.apply(params, rest)(x)
            return jnp.mean((out - y) ** 2)

        grads = jax.grad(loss_fn)(params)
        return jax.tree.map(lambda p, g: p - lr * g, params, grads)

    stateful = nn.MLP([2, 8, 1], rngs=0)
    opt = tl.Optimizer(stateful, optax.sgd(lr))

    @tl.jit
    def stateful_step(model, opt, x, y):
        grads = tl.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        opt.update(model, grads)

    manual = nn.MLP([2, 8, 1], rngs=0)

    @tl.jit
    def manual_step(model, x, y):
        grads = tl.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        for path, g in grads.flat().items():
            layer = model.layers[path[1]]
            var = getattr(layer, path[2])
            var.value = var.value - lr * g.value

    for _ in range(3):
        params = functional_step(params, rest, x, y)
        stateful_step(stateful, opt, x, y)
        manual_step(manual, x, y)

    want = params.flat()
    for other in (stateful, manual):
        got = tl.state(other, tl.Param).flat()
        assert set(got) == set(want)
        for path, var in want.items():
            np.testing.assert_allclose(_np(got[path].value), _np(var.value), rtol=1e-6, atol=1e-6)
    # The parameters did move.
    start = tl.state(nn.MLP([2, 8, 1], rngs=0), tl.Param).flat()
    assert any(not np.allclose(_np(start[p].value), _np(v.value)) for p, v in want.items())


def test_graphdef_apply_returns_new_state_and_graphdef():
    model = CountingLinear(2, 2, rngs=0)
    graphdef, params, rest = tl.split(model, tl.Param, ...)

    @jax.jit
    def f(params, rest, x):
        out, (new_state, new_graphdef) = graphdef.apply(params, rest)(x)
        assert new_graphdef == graphdef
        return out, new_state

    out, new_state = f(params, rest, jnp.ones(2))
    np.testing.assert_allclose(_np(out), np.ones(2) @ _np(model.kernel.value), rtol=1e-6)
    assert int(new_state.count.value) == 1
    assert int(model.count.value) == 0  # raw jax.jit: the live model is untouched
    tl.update(model, new_state)
    assert int(model.count.value) == 1


# -- 11. shared Linear with BatchNorm ------------------------------------------


def test_shared_linear_two_batchnorm_blocks_train_step():
    shared = nn.Linear(3, 3, rngs=0)
    shared.bias.value = jnp.full((3,), 0.5, jnp.float32)  # so block 2 sees a non-zero mean
    model = Pair(Block(shared), Block(shared))
    assert model.first.bn.use_running_average is False
    opt = tl.Optimizer(model, optax.sgd(0.1))
    params_before = {p: _np(v.value) for p, v in tl.state(model, tl.Param).flat().items()}
    stats_before = {p: _np(v.value) for p, v in tl.state(model, tl.BatchStat).flat().items()}
    x = jax.random.normal(jax.random.key(0), (8, 3)) * 2 + 1
    y = jax.random.normal(jax.random.key(1), (8, 3))

    @tl.jit
    def step(model, opt, x, y):
        loss, grads = tl.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        opt.update(model, grads)
        return loss

    loss = step(model, opt, x, y)
    assert np.isfinite(float(loss))
    assert model.first.linear is model.second.linear is shared
    stats_after = tl.state(model, tl.BatchStat).flat()
    assert set(stats_after) == set(stats_before) and len(stats_after) == 4
    for p, v in stats_after.items():
        assert not np.allclose(_np(v.value), stats_before[p]), p
    params_after = tl.state(model, tl.Param).flat()
    # The shared kernel appears once in the graph view.
    assert sum(1 for p in params_after if p[-1] == "kernel") == 1
    # Biases followed by a BatchNorm get no gradient; every other Param moved.
    no_grad = {("first", "linear", "bias"), ("first", "bn", "bias")}
    assert no_grad < set(params_after)
    for p, v in params_after.items():
        if p in no_grad:
            np.testing.assert_allclose(_np(v.value), params_before[p], atol=1e-6)
        else:
            assert not np.allclose(_np(v.value), params_before[p], atol=1e-4), p
    assert int(opt.step.value) == 1
    # A second step keeps working and keeps the sharing.
    step(model, opt, x, y)
    assert model.first.linear is model.second.linear
    assert int(opt.step.value) == 2


# -- 12. errors ----------------------------------------------------------------


def test_unhashable_static_argument_names_it():
    f = tl.jit(lambda x, s: x)
    with pytest.raises(TypeError, match=r"`args\[1\]` is a set"):
        f(jnp.ones(2), {1, 2})

    class NoHash:
        __hash__ = None

    with pytest.raises(TypeError, match=r"`args\[1\]` is a NoHash"):
        f(jnp.ones(2), NoHash())
    with pytest.raises(TypeError, match=r"args\[2\]\[0\]"):
        tl.jit(lambda x, n, s: x)(jnp.ones(2), 1, [NoHash()])
    # Nothing was cached: a hashable value works afterwards.
    np.testing.assert_allclose(_np(f(jnp.ones(2), frozenset({1, 2}))), [1.0, 1.0])


def test_unhashable_static_keyword_argument_names_it():
    f = tl.jit(lambda x, *, opts: x)
    with pytest.raises(TypeError, match="opts"):
        f(jnp.ones(2), opts={3, 4})


def test_closed_over_module_update_is_an_error_and_changes_nothing():
    model = CountingLinear(2, 2, rngs=0)
    f = tl.jit(lambda x: model(x))
    with pytest.raises(RuntimeError, match="as an argument"):
        f(jnp.ones(2))
    assert int(model.count.value) == 0
    assert not isinstance(model.count.value, jax.core.Tracer)
    # Passing it as an argument is the fix.
    tl.jit(lambda m, x: m(x))(model, jnp.ones(2))
    assert int(model.count.value) == 1


def test_leaked_tracer_in_module_is_an_error():
    holder = []

    @jax.jit
    def leak(x):
        layer = nn.Linear(2, 2, rngs=0)
        layer.bias = tl.Param(x * jnp.ones(2))
        holder.append(layer)
        return x

    leak(1.0)
    layer = holder[0]
    assert isinstance(layer.bias.value, jax.core.Tracer)
    with pytest.raises(RuntimeError, match="tracer"):
        tl.jit(lambda m, x: m(x))(layer, jnp.ones(2))
    with pytest.raises(RuntimeError, match=r"args\[0\]\.(kernel|bias)"):
        tl.jit(lambda m, x: m(x))(layer, jnp.ones(2))


def test_leaked_tracer_in_variable_argument_is_an_error():
    holder = []

    @jax.jit
    def leak(x):
        holder.append(tl.Param(x))
        return x

    leak(jnp.ones(2))
    with pytest.raises(RuntimeError, match="tracer"):
        tl.jit(lambda v: v.value * 2)(holder[0])


def test_failing_function_leaves_model_unchanged():
    model = CountingLinear(2, 2, rngs=0)
    w = _np(model.kernel.value)
    f = tl.jit(lambda m, x: m(x))
    f(model, jnp.ones(2))
    assert int(model.count.value) == 1

    @tl.jit
    def bad(m, x):
        m(x)
        m.kernel.value = m.kernel.value * 0
        m.new = tl.Intermediate(x)
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        bad(model, jnp.ones(2))
    assert int(model.count.value) == 1
    np.testing.assert_array_equal(_np(model.kernel.value), w)
    assert not hasattr(model, "new")
    assert not isinstance(model.count.value, jax.core.Tracer)
    # A shape error in the model also leaves it usable and unchanged.
    with pytest.raises(ValueError, match=r"expected input of shape \(..., 2\)"):
        f(model, jnp.ones(5))
    assert int(model.count.value) == 1
    f(model, jnp.ones(2))
    assert int(model.count.value) == 2


# -- the fast path is invalidated per object, and writes back every change -------------


class Scaled(tl.Module):
    def __init__(self):
        self.w = tl.Param(jnp.ones(2), scale=1.0)

    def __call__(self, x):
        return x * self.w * self.w.scale


def test_variable_metadata_written_in_place_recompiles():
    model = Scaled()
    step = tl.jit(lambda m, x: m(x))
    for _ in range(2):
        assert _np(step(model, jnp.ones(2))).tolist() == [1.0, 1.0]
    model.w.scale = 10.0  # metadata is static: a new program, not the stale one
    for _ in range(2):
        assert _np(step(model, jnp.ones(2))).tolist() == [10.0, 10.0]


def test_a_structural_change_elsewhere_keeps_this_fast_path():
    model = nn.MLP([2, 4, 2], rngs=0)
    step = tl.jit(lambda m, x: m(x))
    step(model, jnp.ones(2))
    step(model, jnp.ones(2))
    fast = step._fast
    other = nn.MLP([2, 4, 2], rngs=1)
    other.extra = 3  # another model's attribute
    other.layers.append(nn.Linear(2, 2, rngs=0))  # another model's list
    tl.metrics.Average()  # building anything at all
    step(model, jnp.ones(2))
    assert step._fast is fast and fast.valid


@pytest.mark.parametrize(
    "change",
    [
        lambda m: setattr(m, "extra", 1),
        lambda m: setattr(m.layers[0], "note", "x"),
        lambda m: setattr(m, "final_activation", jax.nn.tanh),
        lambda m: m.layers.append(nn.Linear(2, 2, rngs=3)),
        lambda m: m.layers.insert(0, nn.Linear(2, 2, rngs=5)),
        lambda m: m.layers.__setitem__(1, nn.Linear(4, 2, rngs=4)),
    ],
)
def test_a_structural_change_to_this_model_drops_the_fast_path(change):
    model = nn.MLP([2, 4, 2], rngs=0)
    step = tl.jit(lambda m, x: m(x))
    step(model, jnp.ones(2))
    fast = step._fast
    change(model)
    assert not fast.valid
    for _ in range(2):
        assert np.allclose(_np(step(model, jnp.ones(2))), _np(model(jnp.ones(2))))


class Slots(tl.Module):
    def __init__(self):
        self.a = tl.Variable(jnp.zeros(2))
        self.b = tl.Variable(jnp.ones(2))
        self.last = tl.Variable(jnp.zeros(2))
        self.table = {"x": tl.Variable(jnp.zeros(2)), "y": tl.Variable(jnp.full(2, 5.0))}


@pytest.mark.parametrize("donate", [(), 0])
def test_values_taken_from_other_inputs_are_written_on_every_call(donate):
    @tl.jit(donate=donate)
    def step(m, x):
        m.a.value, m.b.value = m.b.value, m.a.value  # a swap
        m.last.value = x  # an argument stored as it is
        m.table["x"].value = m.table["y"].value  # a copy
        m.table["y"].value = m.table["y"].value + 1

    model = Slots()
    a, b = np.zeros(2), np.ones(2)
    y = np.full(2, 5.0)
    for i in range(4):
        step(model, jnp.full(2, float(i)))
        a, b = b, a
        x, y = y, y + 1
        assert _np(model.a.value).tolist() == a.tolist()
        assert _np(model.b.value).tolist() == b.tolist()
        assert _np(model.last.value).tolist() == [float(i)] * 2
        assert _np(model.table["x"].value).tolist() == x.tolist()
        assert _np(model.table["y"].value).tolist() == y.tolist()
    assert step._fast is not None  # the later calls ran on the fast path


def test_python_value_passed_through_is_returned():
    step = tl.jit(lambda x, y: (x, y + 1))
    for _ in range(3):
        x, y = step(jnp.ones(2), jnp.zeros(2))
        assert _np(x).tolist() == [1.0, 1.0] and _np(y).tolist() == [1.0, 1.0]


class Dicts(tl.Module):
    def __init__(self):
        import collections

        self.ordered = collections.OrderedDict(b=tl.Param(jnp.ones(1)), a=tl.Param(jnp.zeros(1)))
        self.default = collections.defaultdict(list, w=tl.Param(jnp.full(1, 2.0)))

    def __call__(self, x):
        return x * self.ordered["b"] + self.ordered["a"] + self.default["w"]


def test_ordered_dict_and_defaultdict_attributes_rebuild_and_are_tracked():
    import collections

    model = Dicts()
    assert isinstance(model.ordered, collections.OrderedDict)
    assert isinstance(model.default, collections.defaultdict)
    assert list(model.ordered) == ["b", "a"]  # insertion order kept
    mapped = jax.tree.map(lambda x: x + 1, model)  # raw jax rebuilds them
    assert mapped.default.default_factory is list and list(mapped.ordered) == ["b", "a"]
    assert list(tl.clone(model).ordered) == ["b", "a"]
    step = tl.jit(lambda m, x: m(x))
    assert _np(step(model, jnp.ones(1))).tolist() == [3.0]
    fast = step._fast
    model.ordered["a"] = tl.Param(jnp.full(1, 10.0))
    assert not fast.valid
    assert _np(step(model, jnp.ones(1))).tolist() == [13.0]
    step(model, jnp.ones(1))
    model.default["new"].append(1)  # a missing key inserts a default: a mutation too
    assert not step._fast.valid


def test_a_list_subclass_holding_arrays_is_refused():
    class MyList(list):
        pass

    model = nn.Linear(2, 2, rngs=0)
    with pytest.raises(
        TypeError, match=r"(?s)Linear\.layers: a MyList cannot be stored.*list\(value\)"
    ):
        model.layers = MyList([nn.Linear(2, 2, rngs=1)])
    assert not hasattr(model, "layers")


def test_unknown_static_argnames_is_an_error():
    def step(model, x, *, train=False):
        return x

    with pytest.raises(ValueError, match=r"(?s)no parameter 'trian'.*model, x, train"):
        tl.jit(step, static_argnames=("trian",))
    tl.jit(step, static_argnames="train")  # known names are fine
    tl.jit(lambda **kw: 0, static_argnames="anything")  # **kwargs takes any name


def test_a_changing_python_number_warns_once_after_eight_programs():
    @tl.jit
    def step(x, i):
        return x * i

    with pytest.warns(UserWarning, match=r"(?s)compiled 8 times.*`args\[1\]`.*jnp\.asarray\(i\)"):
        for i in range(8):
            step(jnp.ones(1), i)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: no second warning
        for i in range(8, 12):
            step(jnp.ones(1), i)
        for _ in range(10):
            step(jnp.ones(1), jnp.asarray(3))  # traced: one program, no warning


def test_a_new_optax_transformation_per_optimizer_warns_naming_the_attribute():
    import optax

    @tl.jit
    def step(model, opt, x):
        grads = tl.grad(lambda m: (m(x) ** 2).mean())(model)
        opt.update(model, grads)

    with pytest.warns(UserWarning, match=r"(?s)compiled 8 times.*`args\[1\]\.tx`.*once") as seen:
        for run in range(8):  # a sweep that remakes optax.sgd each run: 8 programs
            model = nn.Linear(2, 2, rngs=run)
            step(model, tl.Optimizer(model, optax.sgd(0.1), wrt=tl.Param), jnp.ones((1, 2)))
    assert seen[0].filename == __file__, [w.filename for w in seen]  # the caller's line
    tx = optax.sgd(0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for run in range(8):  # the same transformation object: one program
            model = nn.Linear(2, 2, rngs=run)
            step(model, tl.Optimizer(model, tx, wrt=tl.Param), jnp.ones((1, 2)))


def test_jitted_function_is_named_like_the_function_and_lowers():
    def train_step(model, x):
        """Docs of the step."""
        return model(x)

    step = tl.jit(train_step)
    assert step.__name__ == "train_step" and step.__wrapped__ is train_step
    assert step.__doc__ == "Docs of the step." and "train_step" in step.__qualname__
    assert repr(step) == "<tl.jit(train_step)>"
    model = nn.Linear(2, 2, rngs=0)
    text = step.lower(model, jnp.ones(2)).as_text()
    assert "jit_train_step" in text
    assert step.lower(model, jnp.ones(2)).compile() is not None


def test_jit_used_as_a_method_decorator_binds_self():
    class Model(tl.Module):
        def __init__(self):
            self.linear = nn.Linear(2, 2, rngs=0)

        @tl.jit
        def forward(self, x):
            return self.linear(x)

    model = Model()
    assert _np(model.forward(jnp.ones(2))).tolist() == _np(model.linear(jnp.ones(2))).tolist()


def test_a_clone_survives_a_donating_step():
    model = nn.MLP([2, 4, 1], rngs=0)
    before = tl.clone(model)
    snapshot_state = tl.state(model)  # shares buffers: donation may delete them
    step = tl.jit(_sgd_step, donate=0)
    step(model, jnp.ones((3, 2)), jnp.ones((3, 1)))
    assert all(np.isfinite(_np(v.value)).all() for v in tl.state(before).flat().values())
    del snapshot_state


def test_closed_over_variable_error_names_its_path_and_the_transform():
    model = CountingLinear(2, 2, rngs=0)

    @tl.jit
    def predict(x):
        return model(x)

    with pytest.raises(
        RuntimeError, match=r"(?s)^model\.count: this Variable .*outside tl\.jit\(predict\)"
    ):
        predict(jnp.ones(2))


def test_threads_each_run_their_own_model():
    from conftest import run_in_threads

    step = tl.jit(lambda m, x: m(x))

    def work(seed):
        model = CountingLinear(2, 2, rngs=seed)
        outs = [step(model, jnp.ones(2)) for _ in range(20)]
        expected = _np(jnp.ones(2) @ model.kernel.value + model.bias.value)
        assert all(np.allclose(_np(o), expected) for o in outs)
        return int(model.count.value)

    assert run_in_threads(*(lambda s=s: work(s) for s in range(4))) == [20] * 4


def test_toylib_frames_are_hidden_from_errors_raised_in_the_step():
    import traceback

    @tl.jit
    def step(m, x):
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom") as info:
        step(nn.Linear(2, 2, rngs=0), jnp.ones(2))
    files = [frame.filename for frame in traceback.extract_tb(info.value.__traceback__)]
    assert not any("/toylib/" in f for f in files), files
