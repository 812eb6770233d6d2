"""Tests for tl.Optimizer (toylib/optim.py): strict atomic updates, the gradient forms,
bare arrays, optax's view of the parameters and the storage of its state."""

import inspect
import itertools
import re

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import optax
import pytest

import toylib as tl
from toylib import nn, optim

TOL = {"rtol": 1e-6, "atol": 1e-6}

X = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.float32)
Y = jnp.asarray(np.random.default_rng(1).normal(size=(8, 2)), jnp.float32)


def close(a, b, **tol):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), **(tol or TOL))


def mse(model, x=X, y=Y):
    return jnp.mean((model(x) - y) ** 2)


def is_variable(x):
    return isinstance(x, tl.Variable)


class Bare(tl.Module):
    """A Param next to bare array attributes (one directly, one in a list)."""

    def __init__(self):
        self.w = tl.Param(jnp.full((3, 2), 0.5))
        self.scale = jnp.ones(2)  # a bare array: data, not a Variable
        self.shifts = [jnp.zeros(2)]

    def __call__(self, x):
        return (x @ self.w) * self.scale + self.shifts[0]


class Tied(tl.Module):
    """Two Linears sharing one kernel Variable (reachable along two paths)."""

    def __init__(self):
        self.first = nn.Linear(3, 3, rngs=0)
        self.second = nn.Linear(3, 2, rngs=1)
        self.second.kernel = tl.Param(self.first.kernel.value[:, :2])
        self.third = nn.Linear(3, 3, rngs=2)
        self.third.kernel = self.first.kernel  # a Variable assigned: the same object

    def __call__(self, x):
        return self.second(jnp.tanh(self.third(jnp.tanh(self.first(x)))))


class MixedKeys(tl.Module):
    """A dict attribute with int and str keys, inserted out of sorted order."""

    def __init__(self):
        self.table = {
            "b": tl.Param(jnp.full((3, 2), 0.1)),
            0: tl.Param(jnp.full((2,), -0.2)),
            "a": tl.Param(jnp.linspace(0.0, 1.0, 6).reshape(3, 2)),
            1: tl.Param(jnp.asarray(0.3)),
        }

    def __call__(self, x):
        t = self.table
        return jnp.tanh(x @ t["a"]) * t[0] + (x**2) @ t["b"] * t[1]


def snapshot(*objects):
    """Every leaf (as raw jax sees it: Variables and bare arrays), with a copy of its value."""
    out = []
    for obj in objects:
        for leaf in jax.tree.leaves(obj, is_leaf=is_variable):
            out.append((leaf, np.array(leaf.value if is_variable(leaf) else leaf)))
    return out


def assert_unchanged(before, *objects):
    after = snapshot(*objects)
    assert len(after) == len(before)
    for (old, old_value), (new, new_value) in zip(before, after, strict=True):
        assert new is old  # the same Variable objects (and the same bare arrays)
        np.testing.assert_array_equal(new_value, old_value)


def hand_loop(make_model, tx, loss_fn, steps, wrt=tl.Param, extra=None):
    """optax by hand on the State ``tl.split`` gives: the reference for tl.Optimizer."""
    graphdef, params, rest = tl.split(make_model(), wrt, ...)

    def value_fn(p):
        return loss_fn(tl.merge(graphdef, p, rest))

    # One compiled step: eager optax (L-BFGS's line search above all) would
    # compile its loops anew on every step.
    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(value_fn)(params)
        kwargs = extra(loss, grads, value_fn) if extra else {}
        updates, state = tx.update(grads, state, params, **kwargs)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params, state, value_fn


def assert_params_equal(model, params, wrt=tl.Param, **tol):
    got = tl.state(model, wrt).flat()
    want = params.flat()
    assert set(got) == set(want)
    for path, value in want.items():
        close(got[path].value, value.value, **tol)


# -- 1. strict, atomic updates -------------------------------------------------------------


def reshape_last(grads):
    flat = grads.flat()
    path = list(flat)[-1]
    flat[path] = flat[path].replace(value=flat[path].value[None])  # (2,) -> (1, 2): broadcasts
    return tl.State.from_flat(flat)


def test_wrong_shape_gradient_names_the_path_what_was_expected_what_came_and_the_fix():
    model = nn.MLP([3, 4, 2], rngs=0)
    opt = tl.Optimizer(model, optax.sgd(0.1))
    grads = tl.grad(mse)(model)
    grads["layers"][0]["kernel"] = grads.layers[0].kernel.replace(value=grads.layers[0].kernel.T)
    with pytest.raises(ValueError) as info:
        opt.update(model, grads)
    text = str(info.value)
    assert "`model.layers[0].kernel`" in text
    assert "the parameter is float32[3, 4], the gradient float32[4, 3]" in text
    assert "grad.T" in text and "Nothing was changed" in text
    assert "tl.grad(loss_fn, wrt=tl.Param)" in text

    # A gradient that would broadcast (the old behaviour reshaped the bias to (4, 4)).
    grads = tl.grad(mse)(model)
    grads["layers"][0]["bias"] = grads.layers[0].bias.replace(value=jnp.ones((4, 1)))
    with pytest.raises(ValueError, match=re.escape("grad.reshape((4,))")):
        opt.update(model, grads)
    assert model.layers[0].bias.value.shape == (4,)


def test_wrong_dtype_and_wrong_kind_gradients_are_errors():
    model = nn.Linear(3, 2, rngs=0)
    opt = tl.Optimizer(model, optax.sgd(0.1))
    grads = tl.grad(mse)(model)
    low = jax.tree.map(lambda g: g.astype(jnp.bfloat16), grads)
    with pytest.raises(ValueError, match=r"float32\[3, 2\], the gradient bfloat16\[3, 2\]"):
        opt.update(model, low)
    stats = tl.State.from_flat({p: tl.BatchStat(g.value) for p, g in grads.flat().items()})
    with pytest.raises(ValueError, match="the parameter is a Param, the gradient a BatchStat"):
        opt.update(model, stats)
    assert int(opt.step.value) == 0


def test_a_bare_array_parameter_rejects_a_variable_gradient():
    model = Bare()
    opt = tl.Optimizer(model, optax.sgd(0.1), wrt=...)
    g = jax.grad(mse)(model)
    grads = tl.State({"w": g.w, "scale": tl.Param(g.scale), "shifts": {0: g.shifts[0]}})
    with pytest.raises(ValueError, match=r"`model.scale`: the parameter is a bare array"):
        opt.update(model, grads)


def bad_transform(kind):
    """An optax transformation whose update goes wrong after the gradients were checked."""

    def init(params):
        return {"count": jnp.zeros((), jnp.int32)}

    def update(updates, state, params=None):
        if kind == "raises":
            raise FloatingPointError("boom")
        if kind == "shape":  # an update that would broadcast every parameter
            return jax.tree.map(lambda u: jnp.zeros((5, *u.shape)), updates), state
        return updates, {"count": state["count"], "extra": state["count"]}

    return optax.GradientTransformation(init, update)


@pytest.mark.parametrize(
    "case",
    ["last_wrong_shape", "missing", "extra", "wrong_kind", "tx_raises", "tx_shape", "tx_state"],
)
def test_a_failed_update_changes_no_parameter_no_optstate_and_not_the_step(case):
    model = nn.Sequential(nn.Linear(3, 4, rngs=0), nn.BatchNorm(4), nn.Linear(4, 2, rngs=1))
    tx = {"tx_raises": "raises", "tx_shape": "shape", "tx_state": "state"}.get(case)
    opt = tl.Optimizer(model, bad_transform(tx) if tx else optax.adam(0.1))
    if not tx:  # a few good steps first, so the state is not all zeros
        for _ in range(2):
            opt.update(model, tl.grad(mse)(model))
    # Gradients first: taking them updates the batch statistics.
    grads = tl.grad(mse)(model)
    wider = tl.grad(mse, wrt=tl.Any(tl.Param, tl.BatchStat))(model)
    before = snapshot(model, opt)
    if case == "last_wrong_shape":  # every earlier gradient is fine: checked before writing
        grads = reshape_last(grads)
    elif case == "missing":
        del grads.layers[2]["bias"]
    elif case == "extra":
        grads = wider
    elif case == "wrong_kind":
        grads["layers"][2]["bias"] = tl.BatchStat(grads.layers[2].bias.value)
    error = FloatingPointError if case == "tx_raises" else ValueError
    with pytest.raises(error, match="boom|Nothing was changed"):
        opt.update(model, grads)
    assert_unchanged(before, model, opt)


def test_a_failed_update_leaves_bare_array_parameters_as_they_were():
    model = Bare()
    opt = tl.Optimizer(model, optax.adam(0.1), wrt=...)
    opt.update(model, jax.grad(mse)(model))
    before = snapshot(model, opt)
    grads = jax.grad(mse)(model)
    grads.w = tl.Param(jnp.ones((2, 3)))  # the first parameter's gradient is wrong
    with pytest.raises(ValueError, match=r"`model.w`"):
        opt.update(model, grads)
    assert_unchanged(before, model, opt)


def test_a_model_with_other_parameter_shapes_is_an_error_not_a_broadcast():
    model = nn.MLP([3, 4, 2], rngs=0)
    opt = tl.Optimizer(model, optax.adam(0.1))
    other = nn.MLP([3, 5, 2], rngs=0)
    with pytest.raises(ValueError, match=r"`model.layers\[0\].kernel` is float32\[3, 5\], was "):
        opt.update(other, tl.grad(mse)(other))
    deeper = nn.MLP([3, 4, 2, 2], rngs=0)
    with pytest.raises(ValueError, match=r"new: model.layers\[2\].kernel"):
        opt.update(deeper, tl.grad(lambda m: mse(m))(deeper))
    assert int(opt.step.value) == 0


def test_a_python_number_is_accepted_for_a_scalar_parameter():
    model = MixedKeys()
    opt = tl.Optimizer(model, optax.sgd(0.5))
    grads = tl.state(model, tl.Param)
    grads = jax.tree.map(jnp.zeros_like, grads)
    grads.table[1] = 2.0  # the scalar Param's gradient as a plain Python float
    opt.update(model, grads)
    close(model.table[1].value, 0.3 - 1.0)
    assert model.table[1].value.dtype == jnp.float32


def test_update_outside_its_trace_writes_nothing():
    # The model is closed over (not passed): its Param cannot take a traced value.
    # The bare array comes first in graph order; it must not be written either.
    class ArrayFirst(tl.Module):
        def __init__(self):
            self.a = jnp.ones(2)
            self.b = tl.Param(jnp.ones(2))

        def __call__(self):
            return (self.a * self.b).sum()

    model = ArrayFirst()
    opt = tl.Optimizer(model, optax.sgd(0.1), wrt=...)
    before = snapshot(model, opt)

    @tl.jit
    def step(opt):
        opt.update(model, jax.grad(lambda m: m())(model))

    with pytest.raises(RuntimeError, match="created outside"):
        step(opt)
    assert_unchanged(before, model, opt)


# -- 2. the forms of gradients ------------------------------------------------------------


@pytest.mark.parametrize("form", ["tl.grad", "plain arrays", "jax.grad"])
def test_every_gradient_form_gives_the_same_steps(form):
    def grads_of(model):
        if form == "jax.grad":
            grads = jax.grad(mse)(model)
            assert type(grads) is nn.MLP
            return grads
        grads = tl.grad(mse)(model)
        if form == "plain arrays":
            grads = tl.State.from_flat({p: g.value for p, g in grads.flat().items()})
        return grads

    model = nn.MLP([3, 4, 2], rngs=0)
    tx = optax.adam(0.05)
    opt = tl.Optimizer(model, tx)
    for _ in range(3):
        opt.update(model, grads_of(model))
    params, _, _ = hand_loop(lambda: nn.MLP([3, 4, 2], rngs=0), tx, mse, 3)
    assert_params_equal(model, params)
    assert int(opt.step.value) == 3


def test_a_module_of_gradients_uses_only_the_wrt_paths():
    model = nn.Sequential(nn.Linear(3, 4, rngs=0), nn.BatchNorm(4), nn.Linear(4, 2, rngs=1))
    opt = tl.Optimizer(model, optax.sgd(0.1))
    stats = {p: np.asarray(v.value) for p, v in tl.state(model, tl.BatchStat).flat().items()}
    kernel = model.layers[0].kernel.value
    # Raw jax.grad differentiates everything, BatchStats included; the call also
    # updates the statistics only inside jax.grad (raw jax writes nothing back).
    grads = jax.grad(mse)(model)
    assert type(grads.layers[1].mean) is tl.BatchStat
    opt.update(model, grads)
    for path, v in tl.state(model, tl.BatchStat).flat().items():
        np.testing.assert_array_equal(np.asarray(v.value), stats[path])
    close(model.layers[0].kernel.value, kernel - 0.1 * grads.layers[0].kernel.value)


def test_a_tied_variable_gets_the_sum_of_its_tree_gradients():
    model = Tied()
    assert model.third.kernel is model.first.kernel
    opt = tl.Optimizer(model, optax.sgd(1.0))
    kernel = model.first.kernel.value
    grads = jax.grad(mse)(model)
    both = grads.first.kernel.value + grads.third.kernel.value  # two tree leaves, one Variable
    opt.update(model, grads)
    close(model.first.kernel.value, kernel - both)
    assert model.third.kernel is model.first.kernel
    # tl.grad sums them too: both forms agree.
    again = Tied()
    tl.Optimizer(again, optax.sgd(1.0)).update(again, tl.grad(mse)(again))
    close(again.first.kernel.value, model.first.kernel.value)


def test_a_module_of_gradients_of_another_structure_is_an_error(monkeypatch):
    # Bad input on purpose: toylib's own message, not the runtime type checker's.
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)
    model = nn.MLP([3, 4, 2], rngs=0)
    opt = tl.Optimizer(model, optax.sgd(0.1))
    linear = nn.Linear(3, 2, rngs=0)
    with pytest.raises(ValueError, match="are a Linear that is not structured like the model"):
        opt.update(model, jax.grad(mse)(linear))
    deeper = nn.MLP([3, 4, 4, 2], rngs=0)
    with pytest.raises(ValueError, match="other attributes or containers"):
        opt.update(model, jax.grad(mse)(deeper))
    with pytest.raises(TypeError, match="got a dict"):
        opt.update(model, {"layers": {}})
    assert int(opt.step.value) == 0


# -- 3. bare arrays are data ----------------------------------------------------------------


def test_a_filter_matching_bare_arrays_optimises_them_and_a_type_filter_does_not():
    model = Bare()
    scale, shift, w = model.scale, model.shifts[0], model.w.value
    grads = jax.grad(mse)(model)
    opt = tl.Optimizer(model, optax.sgd(0.1), wrt=...)
    opt.update(model, grads)
    close(model.scale, scale - 0.1 * grads.scale)
    close(model.shifts[0], shift - 0.1 * grads.shifts[0])
    close(model.w.value, w - 0.1 * grads.w.value)
    assert isinstance(model.scale, jax.Array) and not is_variable(model.scale)

    # tl.Param matches Variables only: the arrays are left alone.
    typed = Bare()
    opt = tl.Optimizer(typed, optax.sgd(0.1, momentum=0.9))
    stored = [p for p in tl.state(opt, tl.OptState).flat() if p[0] == "opt_state"]
    assert stored == [("opt_state", 0, 0, "w")]  # the momentum of w only
    opt.update(typed, jax.grad(mse)(typed))
    close(typed.scale, scale)
    close(typed.w.value, w - 0.1 * grads.w.value)

    # A path filter, with the gradients as a State of plain arrays.
    chosen = Bare()
    opt = tl.Optimizer(chosen, optax.sgd(0.1), wrt=tl.PathContains("scale"))
    opt.update(chosen, tl.State({"scale": grads.scale}))
    close(chosen.scale, scale - 0.1 * grads.scale)
    close(chosen.w.value, w)


def test_bare_arrays_are_trained_inside_tl_jit():
    eager, jitted = Bare(), Bare()
    tx = optax.adam(0.1)
    opts = tl.Optimizer(eager, tx, wrt=...), tl.Optimizer(jitted, tx, wrt=...)

    @tl.jit
    def step(model, opt):
        opt.update(model, jax.grad(mse)(model))

    for _ in range(3):
        opts[0].update(eager, jax.grad(mse)(eager))
        step(jitted, opts[1])
    assert not isinstance(jitted.scale, jax.core.Tracer)
    close(jitted.scale, eager.scale, rtol=1e-5, atol=1e-6)
    close(jitted.shifts[0], eager.shifts[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(jitted.scale), 1.0)
    assert int(opts[1].step.value) == 3


def test_optimiser_construction_errors_name_the_path():
    class InTuple(tl.Module):
        def __init__(self):
            self.w = tl.Param(jnp.ones(2))
            self.pair = (jnp.ones(2), 3)

    with pytest.raises(ValueError, match=r"bare array `model.pair\[0\]`, which is\ninside a tuple"):
        tl.Optimizer(InTuple(), optax.sgd(0.1), wrt=...)
    with pytest.raises(TypeError, match=r"selects `model.rngs.key`, a RngState of dtype key"):
        tl.Optimizer(nn.Dropout(0.5, rngs=0), optax.sgd(0.1), wrt=...)
    with pytest.raises(ValueError, match="selects no Variable or array"):
        tl.Optimizer(Bare(), optax.sgd(0.1), wrt=tl.BatchStat)


# -- 4. what optax sees --------------------------------------------------------------------


def recording_transform(seen):
    """optax.sgd(0.1), recording the trees its init and update are given."""
    inner = optax.sgd(0.1)

    def init(params):
        seen.append(("init", params))
        return inner.init(params)

    def update(updates, state, params=None):
        seen.append(("update", updates, params))
        return inner.update(updates, state, params)

    return optax.GradientTransformation(init, update)


@pytest.mark.parametrize("form", ["variables", "plain arrays", "jax.grad"])
def test_optax_sees_the_params_and_gradients_as_the_state_tl_state_returns(form):
    model = Bare()
    seen = []
    opt = tl.Optimizer(model, recording_transform(seen), wrt=...)
    g = jax.grad(mse)(model)
    if form == "jax.grad":
        grads = g
    else:
        w = g.w if form == "variables" else g.w.value
        grads = tl.State({"w": w, "scale": g.scale, "shifts": {0: g.shifts[0]}})
    opt.update(model, grads)
    want = jax.tree.structure(tl.state(model, ...))
    (_, init_params), (_, got_grads, got_params) = seen
    for tree in (init_params, got_grads, got_params):
        assert isinstance(tree, tl.State)
        assert jax.tree.structure(tree) == want
    assert type(got_grads.w) is tl.Param and isinstance(got_grads.scale, jax.Array)


def quadratic_problem():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(32, 3)), jnp.float32)
    y = x @ jnp.asarray([[1.0], [-2.0], [0.5]]) + 0.25

    def loss_fn(model):
        return jnp.mean((model(x) - y) ** 2)

    return (lambda: nn.Linear(3, 1, rngs=0)), loss_fn


@pytest.mark.parametrize("jit", [False, True])
def test_lbfgs_with_value_grad_and_value_fn_reduces_the_loss(jit):
    make, loss_fn = quadratic_problem()
    model = make()
    tx = optax.lbfgs()
    opt = tl.Optimizer(model, tx)
    graphdef, _, rest = tl.split(model, tl.Param, ...)

    def value_fn(params):  # optax calls it with a State, as tl.state(model, tl.Param) gives
        assert isinstance(params, tl.State)
        return loss_fn(tl.merge(graphdef, params, rest))

    def step(model, opt):
        loss, grads = tl.value_and_grad(loss_fn)(model)
        opt.update(model, grads, value=loss, grad=grads, value_fn=value_fn)
        return loss

    step = tl.jit(step) if jit else step
    losses = [float(step(model, opt)) for _ in range(3)]  # 3: the loss is down 1000x
    losses.append(float(loss_fn(model)))
    assert losses[-1] < losses[0] / 100
    assert all(b <= a for a, b in itertools.pairwise(losses))
    # Exactly the hand-run optax loop (its many state leaves are stored and read
    # back in optax's order).
    extra = lambda loss, grads, fn: {"value": loss, "grad": grads, "value_fn": fn}  # noqa: E731
    params, _, _ = hand_loop(make, tx, loss_fn, 3, extra=extra)
    assert_params_equal(model, params, rtol=1e-5, atol=1e-6)


def test_lbfgs_takes_grad_equal_to_a_module_of_gradients():
    make, loss_fn = quadratic_problem()
    model = make()
    opt = tl.Optimizer(model, optax.lbfgs())
    graphdef, _, rest = tl.split(model, tl.Param, ...)
    first = float(loss_fn(model))
    for _ in range(3):
        loss, grads = jax.value_and_grad(loss_fn)(model)  # a Linear of gradients
        opt.update(
            model,
            grads,
            value=loss,
            grad=grads,  # passed to optax as the checked State of gradients
            value_fn=lambda p: loss_fn(tl.merge(graphdef, p, rest)),
        )
    assert float(loss_fn(model)) < first / 100


SCHEDULE = optax.exponential_decay(0.1, transition_steps=1, decay_rate=0.7)
TRANSFORMS = {
    "adam": optax.adam(0.05),
    "clip+adamw+schedule": optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(SCHEDULE, weight_decay=0.1)
    ),
    "masked(callable)": optax.masked(
        optax.adam(0.1), lambda params: jax.tree.map(lambda p: p.ndim == 2, params)
    ),
    "inject_hyperparams": optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9),
    "contrib.schedule_free_adamw": optax.contrib.schedule_free_adamw(0.1),
    "contrib.reduce_on_plateau": optax.chain(
        optax.adam(0.1), optax.contrib.reduce_on_plateau(patience=1, factor=0.5)
    ),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_optax_transformations_match_a_hand_written_loop_on_the_state(name):
    tx = TRANSFORMS[name]
    needs_value = name == "contrib.reduce_on_plateau"
    make = lambda: nn.MLP([3, 4, 2], rngs=0)  # noqa: E731
    model = make()
    opt = tl.Optimizer(model, tx)
    for _ in range(4):
        loss, grads = tl.value_and_grad(mse)(model)
        opt.update(model, grads, **({"value": loss} if needs_value else {}))
    extra = (lambda loss, grads, fn: {"value": loss}) if needs_value else None
    params, _, _ = hand_loop(make, tx, mse, 4, extra=extra)
    assert_params_equal(model, params)
    if name == "masked(callable)":  # the biases (1-d) were passed through as raw gradients
        assert not np.allclose(np.asarray(model.layers[0].bias.value), 0.0)


# -- 5. storage of the optax state ----------------------------------------------------------


def test_the_optax_state_is_stored_in_optstate_variables_keyed_by_parameter_path():
    model = nn.MLP([3, 4, 2], rngs=0)
    opt = tl.Optimizer(model, optax.adam(0.1))
    assert len(tl.state(opt, tl.Param).flat()) == 0  # optax's Param-typed moments are OptStates
    stored = tl.state(opt, tl.OptState).flat()
    assert all(type(v) is tl.OptState for v in stored.values())
    assert ("opt_state", 0, 1, "layers", 1, "kernel") in stored  # 1: ScaleByAdamState.mu
    assert len(stored) == 1 + 1 + 2 * 4  # step, adam's count, mu and nu of 4 params
    # No State inside the Module: a tracked Dict.
    assert type(opt.opt_state[0].mu).__name__ == "Dict"
    tl.display(opt)  # draws (a Module of Variables and containers)


def test_mixed_int_and_str_keys_store_each_moment_under_its_parameter():
    model = MixedKeys()
    tx = optax.adam(0.05)
    opt = tl.Optimizer(model, tx)
    for _ in range(3):
        opt.update(model, tl.grad(lambda m: mse(m, y=Y[:, :2]))(model))
    params, state, _ = hand_loop(MixedKeys, tx, lambda m: mse(m, y=Y[:, :2]), 3)
    assert_params_equal(model, params)
    # The stored moment at each path is optax's moment for that parameter.
    stored, want = opt.opt_state[0], state[0]
    for key in ("b", 0, "a", 1):
        close(stored.mu["table"][key].value, want.mu["table"][key].value)
        close(stored.nu["table"][key].value, want.nu["table"][key].value)
    assert int(opt.opt_state[0].count.value) == 3


class Pair(tl.Module):
    def __init__(self):
        self.mixed = MixedKeys()
        self.tied = Tied()


def test_mixed_keys_and_tied_variables_train_in_jit_and_survive_save_and_load(tmp_path):
    make = Pair

    def loss(pair):
        return mse(pair.mixed, y=Y) + mse(pair.tied, y=Y)

    tx = optax.adam(0.05)

    @tl.jit
    def step(models, opt):
        opt.update(models, tl.grad(loss)(models))

    straight = make()
    straight_opt = tl.Optimizer(straight, tx)
    for _ in range(4):
        step(straight, straight_opt)

    first = make()
    first_opt = tl.Optimizer(first, tx)
    for _ in range(2):
        step(first, first_opt)
    tl.save(tmp_path / "ckpt", (first, first_opt))
    like = make()
    resumed, resumed_opt = tl.load(tmp_path / "ckpt", (like, tl.Optimizer(like, tx)))
    for _ in range(2):
        step(resumed, resumed_opt)

    assert resumed.tied.third.kernel is resumed.tied.first.kernel
    assert int(resumed_opt.step.value) == 4
    for a, b in ((resumed, straight), (resumed_opt, straight_opt)):
        flat_a, flat_b = tl.state(a).flat(), tl.state(b).flat()
        assert list(flat_a) == list(flat_b)
        for path, v in flat_a.items():
            close(v.value, flat_b[path].value)
    # The tied kernel has one moment (at its first path), not two.
    mu = tl.state(straight_opt, tl.OptState).flat()
    assert ("opt_state", 0, 1, "tied", "first", "kernel") in mu
    assert ("opt_state", 0, 1, "tied", "third", "bias") in mu
    assert ("opt_state", 0, 1, "tied", "third", "kernel") not in mu
    params, _, _ = hand_loop(make, tx, loss, 4)
    assert_params_equal(straight, params, rtol=1e-5, atol=1e-6)


# -- 6. inside tl.jit, without blocking ----------------------------------------------------


@pytest.mark.parametrize("form", ["tl.grad", "plain arrays", "jax.grad"])
def test_update_inside_tl_jit_matches_eager_for_every_gradient_form(form):
    def step(model, opt):
        if form == "jax.grad":
            grads = jax.grad(mse)(model)
        else:
            grads = tl.grad(mse)(model)
            if form == "plain arrays":
                grads = tl.State.from_flat({p: g.value for p, g in grads.flat().items()})
        opt.update(model, grads)

    tx = optax.adam(0.05)
    eager, jitted = nn.MLP([3, 4, 2], rngs=0), nn.MLP([3, 4, 2], rngs=0)
    eager_opt, jitted_opt = tl.Optimizer(eager, tx), tl.Optimizer(jitted, tx)
    jit_step = tl.jit(step)
    for _ in range(3):
        step(eager, eager_opt)
        jit_step(jitted, jitted_opt)
    for a, b in ((jitted, eager), (jitted_opt, eager_opt)):
        want = tl.state(b).flat()
        for path, v in tl.state(a).flat().items():
            assert not isinstance(v.value, jax.core.Tracer)
            close(v.value, want[path].value, rtol=1e-5, atol=1e-6)


def test_library_code_never_waits_for_device_values():
    source = inspect.getsource(optim)
    for blocking in ("float(", ".item(", "block_until_ready", " np.asarray(", ".tolist()"):
        code = [line for line in source.splitlines() if blocking in line and ">>>" not in line]
        assert code == [], blocking
