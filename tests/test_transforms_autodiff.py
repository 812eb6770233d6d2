"""Tests for tl.grad / tl.value_and_grad (toylib/transforms/autodiff.py) and tl.Optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import CountingLinear, rand

import toylib as tl
from toylib import nn

TOL = {"rtol": 1e-6, "atol": 1e-6}


X = jnp.asarray(rand(0, 4, 3))  # inputs of a Linear(3, 2)
Y = jnp.asarray(rand(1, 4, 2))  # targets


def pure_loss(kernel, bias, x):
    """The loss of ``linear_loss`` written on plain arrays."""
    return ((jnp.tanh(x @ kernel + bias) - Y) ** 2).sum()


def linear_loss(model, x):
    return ((jnp.tanh(model(x)) - Y) ** 2).sum()


def close(a, b, **tol):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), **(tol or TOL))


class Scale(tl.Variable):
    """A user Variable type, trainable on request."""


# -- tl.grad / tl.value_and_grad against jax.grad ------------------------------------------


def test_grad_default_wrt_param_is_a_state_of_params_matching_jax_grad():
    model = nn.Linear(3, 2, rngs=0)
    kernel, bias = model.kernel.value, model.bias.value
    grads = tl.grad(linear_loss)(model, X)
    assert isinstance(grads, tl.State)
    assert set(grads.flat()) == {("kernel",), ("bias",)}
    assert type(grads.kernel) is tl.Param and type(grads.bias) is tl.Param
    assert grads.kernel is not model.kernel  # new Variables, the model is untouched
    gk, gb = jax.grad(pure_loss, argnums=(0, 1))(kernel, bias, X)
    assert grads.kernel.value.shape == (3, 2)
    close(grads.kernel.value, gk)
    close(grads.bias.value, gb)
    close(model.kernel.value, kernel)
    close(model.bias.value, bias)


def test_value_and_grad_returns_loss_and_grads():
    model = nn.MLP([3, 4, 2], rngs=0)
    loss, grads = tl.value_and_grad(linear_loss)(model, X)

    def pure(params, x):
        (k0, b0), (k1, b1) = params
        return ((jnp.tanh(jax.nn.relu(x @ k0 + b0) @ k1 + b1) - Y) ** 2).sum()

    params = [(layer.kernel.value, layer.bias.value) for layer in model.layers]
    want_loss, want = jax.value_and_grad(pure)(params, X)
    close(loss, want_loss)
    assert set(grads.flat()) == {
        ("layers", 0, "kernel"),
        ("layers", 0, "bias"),
        ("layers", 1, "kernel"),
        ("layers", 1, "bias"),
    }
    for i, (gk, gb) in enumerate(want):
        assert isinstance(grads.layers[i].kernel, tl.Param)
        close(grads.layers[i].kernel.value, gk)
        close(grads.layers[i].bias.value, gb)


def test_grad_argnums_int_on_a_plain_array_gives_an_array_of_its_shape():
    model = nn.Linear(3, 2, rngs=0)
    gx = tl.grad(linear_loss, argnums=1)(model, X)
    assert isinstance(gx, jax.Array) and gx.shape == X.shape
    close(gx, jax.grad(pure_loss, argnums=2)(model.kernel.value, model.bias.value, X))


def test_grad_argnums_tuple_gives_one_result_per_argument():
    model = nn.Linear(3, 2, rngs=0)
    gm, gx = tl.grad(linear_loss, argnums=(0, 1))(model, X)
    gk, gb, want_gx = jax.grad(pure_loss, argnums=(0, 1, 2))(
        model.kernel.value, model.bias.value, X
    )
    assert isinstance(gm, tl.State)
    close(gm.kernel.value, gk)
    close(gm.bias.value, gb)
    assert gx.shape == X.shape
    close(gx, want_gx)
    # A one-element tuple still gives a tuple.
    (only,) = tl.grad(linear_loss, argnums=(1,))(model, X)
    close(only, want_gx)


def test_grad_of_a_pytree_argument_keeps_its_structure():
    model = nn.Linear(3, 2, rngs=0)

    def loss(model, batch):
        return linear_loss(model, batch["x"] * batch["s"][0])

    s = jnp.asarray([2.0])
    g = tl.grad(loss, argnums=1)(model, {"x": X, "s": [s]})
    assert isinstance(g, dict) and set(g) == {"x", "s"}
    assert isinstance(g["s"], list) and g["s"][0].shape == (1,)
    k, b = model.kernel.value, model.bias.value
    want = jax.grad(lambda batch: pure_loss(k, b, batch["x"] * batch["s"][0]))({"x": X, "s": [s]})
    close(g["x"], want["x"])
    close(g["s"][0], want["s"][0])


def test_grad_of_a_function_of_arrays_only():
    x = jnp.asarray([1.0, -2.0, 3.0])
    close(tl.grad(lambda x: (x**3).sum())(x), 3 * x**2)
    value, g = tl.value_and_grad(lambda x, y: (x * y).sum(), argnums=1)(x, 2 * x)
    close(value, 2 * (x**2).sum())
    close(g, x)


def test_grad_of_a_state_argument_is_a_state_of_the_same_paths():
    x = jnp.asarray([1.0, -2.0, 3.0])
    state = tl.State({"w": tl.Param(x), "inner": {"v": tl.Param(2 * x)}})
    grads = tl.grad(lambda s: (s["w"].value ** 2).sum() + (s["inner"]["v"] * s["w"]).sum())(state)
    assert isinstance(grads, tl.State)
    assert set(grads.flat()) == {("w",), ("inner", "v")}
    close(grads["w"].value, 2 * x + 2 * x)
    close(grads["inner"]["v"].value, x)


def test_grad_of_a_bare_variable_argument_is_that_variable_type_holding_the_gradient():
    # docs/design.md "Transforms": every transform takes Variables in any argument position.
    x = jnp.asarray([1.0, -2.0, 3.0])
    param = tl.Param(x)
    g = tl.grad(lambda p: (p.value**2).sum())(param)
    assert type(g) is tl.Param and g is not param
    close(g.value, 2 * x)
    value, (g0, g1) = tl.value_and_grad(lambda p, q: (p * q).sum(), argnums=(0, 1))(
        param, tl.Param(3 * x)
    )
    close(value, 3 * (x**2).sum())
    close(g0.value, 3 * x)
    close(g1.value, x)


def test_second_order_grad():
    x = jnp.asarray([1.0, -2.0, 3.0])
    close(tl.grad(lambda x: tl.grad(lambda y: (y**3).sum())(x).sum())(x), 6 * x)


def test_has_aux_returns_aux_with_arrays_and_python_values():
    model = nn.Linear(3, 2, rngs=0)

    def loss(model, x):
        y = model(x)
        out = linear_loss(model, x)
        return out, {"y": y, "name": "mse", "n": 4}

    grads, aux = tl.grad(loss, has_aux=True)(model, X)
    (value, aux2), grads2 = tl.value_and_grad(loss, has_aux=True)(model, X)
    close(aux["y"], model(X))
    assert aux["name"] == "mse" and aux["n"] == 4
    close(aux2["y"], model(X))
    assert aux2["name"] == "mse" and aux2["n"] == 4
    close(value, linear_loss(model, X))
    gk, gb = jax.grad(pure_loss, argnums=(0, 1))(model.kernel.value, model.bias.value, X)
    for g in (grads, grads2):
        close(g.kernel.value, gk)
        close(g.bias.value, gb)


def test_has_aux_with_a_bare_loss_is_a_type_error():
    model = nn.Linear(3, 2, rngs=0)
    with pytest.raises(TypeError, match="must return a pair"):
        tl.grad(linear_loss, has_aux=True)(model, X)


def test_grad_and_value_and_grad_as_decorator_factories():
    model = nn.Linear(3, 2, rngs=0)

    @tl.grad(argnums=(0, 1))
    def both(model, x):
        return linear_loss(model, x)

    @tl.value_and_grad(has_aux=True)
    def with_aux(model, x):
        return linear_loss(model, x), "aux"

    @tl.grad
    def plain(model, x):
        return linear_loss(model, x)

    gk, gb, gx = jax.grad(pure_loss, argnums=(0, 1, 2))(model.kernel.value, model.bias.value, X)
    gm, g_x = both(model, X)
    close(gm.kernel.value, gk)
    close(g_x, gx)
    (value, aux), g = with_aux(model, X)
    assert aux == "aux"
    close(value, linear_loss(model, X))
    close(g.bias.value, gb)
    close(plain(model, X).kernel.value, gk)


# -- wrt filters ----------------------------------------------------------------------------


class Scaled(tl.Module):
    def __init__(self):
        self.layers = [nn.Linear(3, 3, rngs=0), nn.Linear(3, 2, rngs=1)]
        self.head = nn.Linear(2, 2, rngs=2)
        self.scale = Scale(jnp.asarray(1.5))

    def __call__(self, x):
        for layer in self.layers:
            x = jnp.tanh(layer(x))
        return self.head(x) * self.scale


def scaled_pure(params, x):
    """``Scaled`` on a flat dict of arrays keyed by path."""
    for i in range(2):
        x = jnp.tanh(x @ params[("layers", i, "kernel")] + params[("layers", i, "bias")])
    y = (x @ params[("head", "kernel")] + params[("head", "bias")]) * params[("scale",)]
    return ((y - Y) ** 2).sum()


def scaled_loss(model, x):
    return ((model(x) - Y) ** 2).sum()


@pytest.mark.parametrize(
    ("wrt", "want"),
    [
        (tl.Param, {"layers", "head"}),
        (Scale, {"scale"}),
        (tl.PathContains("layers"), {"layers"}),
        (tl.Any(Scale, tl.PathContains("head")), {"scale", "head"}),
        (..., {"layers", "head", "scale"}),
    ],
    ids=["param", "custom-type", "path", "any", "all"],
)
def test_wrt_filters_select_the_variables_differentiated(wrt, want):
    model = Scaled()
    grads = tl.grad(scaled_loss, wrt=wrt)(model, X)
    values = {p: v.value for p, v in tl.iter_variables(model)}
    expected = jax.grad(scaled_pure)(values, X)
    flat = grads.flat()
    assert {p[0] for p in flat} == want
    assert set(flat) == {p for p in values if p[0] in want}
    for path, g in flat.items():
        live = dict(tl.iter_variables(model))[path]
        assert type(g) is type(live)
        close(g.value, expected[path])


def test_wrt_selecting_nothing_is_a_value_error():
    model = nn.Linear(3, 2, rngs=0)
    with pytest.raises(ValueError, match="selects no Variable"):
        tl.grad(linear_loss, wrt=tl.BatchStat)(model, X)
    with pytest.raises(ValueError, match="selects no Variable"):
        tl.value_and_grad(linear_loss, wrt=tl.PathContains("nope"))(model, X)


def test_wrt_selecting_integer_state_is_a_type_error():
    model = CountingLinear(3, 2, rngs=0)
    with pytest.raises(TypeError, match="floating-point"):
        tl.grad(lambda m, x: m(x).sum(), wrt=...)(model, X)
    rngs = tl.Rngs(0)
    with pytest.raises(TypeError, match="floating-point"):
        tl.grad(lambda m, r: m(X).sum(), argnums=(0, 1), wrt=...)(nn.Linear(3, 2, rngs=0), rngs)
    with pytest.raises(TypeError, match="floating-point"):
        tl.grad(lambda m: m(X).sum(), wrt=tl.PathContains("count"))(model)
    # Nothing was run: the counter did not move.
    assert int(model.count.value) == 0


# -- tied weights ---------------------------------------------------------------------------


class TiedLinear(tl.Module):
    def __init__(self):
        lin = nn.Linear(3, 3, rngs=0)
        self.encoder = lin
        self.decoder = lin  # the same object

    def __call__(self, x):
        return self.decoder(jnp.tanh(self.encoder(x)))


def test_tied_module_gradient_appears_once_and_sums_both_uses():
    model = TiedLinear()
    grads = tl.grad(lambda m, x: (m(x) ** 2).sum())(model, X)
    assert set(grads.flat()) == {("encoder", "kernel"), ("encoder", "bias")}
    assert "decoder" not in grads

    def pure(k, b, x):
        return ((jnp.tanh(x @ k + b) @ k + b) ** 2).sum()

    gk, gb = jax.grad(pure, argnums=(0, 1))(model.encoder.kernel.value, model.encoder.bias.value, X)
    close(grads.encoder.kernel.value, gk)
    close(grads.encoder.bias.value, gb)


class TiedParam(tl.Module):
    def __init__(self):
        self.w = tl.Param(jnp.asarray(rand(2, 3, 3)))
        self.w_again = self.w

    def __call__(self, x):
        return jnp.tanh(x @ self.w) @ self.w_again.value.T


def test_tied_param_gradient_is_summed_once():
    model = TiedParam()
    assert model.w is model.w_again
    grads = tl.grad(lambda m, x: (m(x) ** 2).sum())(model, X)
    assert set(grads.flat()) == {("w",)}

    def pure(w, x):
        return ((jnp.tanh(x @ w) @ w.T) ** 2).sum()

    close(grads.w.value, jax.grad(pure)(model.w.value, X))


# -- other state flows and is updated ----------------------------------------------------------


def test_batchnorm_statistics_are_updated_under_grad():
    model = nn.Sequential(nn.Linear(3, 2, rngs=0), nn.BatchNorm(2))
    bn = model[1]
    kernel, bias = model[0].kernel.value, model[0].bias.value
    loss, grads = tl.value_and_grad(lambda m, x: ((m(x) - Y) ** 2).sum())(model, X)
    # Only Params are differentiated; the statistics are not in grads.
    assert set(grads.flat()) == {
        ("layers", 0, "kernel"),
        ("layers", 0, "bias"),
        ("layers", 1, "scale"),
        ("layers", 1, "bias"),
    }
    h = X @ kernel + bias
    close(bn.mean.value, 0.01 * h.mean(0), rtol=1e-5, atol=1e-6)
    close(bn.var.value, 0.99 + 0.01 * h.var(0), rtol=1e-5, atol=1e-6)
    assert not isinstance(bn.mean.value, jax.core.Tracer)

    def pure(k, b, x):
        h = x @ k + b
        y = (h - h.mean(0)) * jax.lax.rsqrt(h.var(0) + 1e-5)
        return ((y - Y) ** 2).sum()

    want_loss, (gk, gb) = jax.value_and_grad(pure, argnums=(0, 1))(kernel, bias, X)
    close(loss, want_loss, rtol=1e-5, atol=1e-5)
    close(grads.layers[0].kernel.value, gk, rtol=1e-5, atol=1e-5)
    close(grads.layers[0].bias.value, gb, rtol=1e-4, atol=1e-5)


def test_dropout_rng_counter_advances_under_grad():
    drop = nn.Dropout(0.5, rngs=tl.Rngs(0))
    x = jnp.ones((64,))
    assert int(drop.rngs.count.value) == 0
    g1 = tl.grad(lambda d, x: d(x).sum(), argnums=1)(drop, x)
    assert int(drop.rngs.count.value) == 1
    g2 = tl.grad(lambda d, x: d(x).sum(), argnums=1)(drop, x)
    assert int(drop.rngs.count.value) == 2
    # The gradient is the mask scaled by 1/(1-rate); fresh keys give fresh masks.
    assert set(np.unique(np.asarray(g1)).tolist()) == {0.0, 2.0}
    assert not np.array_equal(np.asarray(g1), np.asarray(g2))
    # The first call drew the same key as an eager call on a fresh layer would.
    close(g1, nn.Dropout(0.5, rngs=tl.Rngs(0))(x))


def test_call_counter_is_incremented_under_grad_and_value_and_grad():
    model = CountingLinear(3, 2, rngs=0)
    grads = tl.grad(lambda m, x: m(x).sum())(model, X)
    assert int(model.count.value) == 1
    assert set(grads.flat()) == {("kernel",), ("bias",)}
    tl.value_and_grad(lambda m, x: m(x).sum() + m(x).sum())(model, X)
    assert int(model.count.value) == 3
    assert isinstance(model.count, tl.Variable)


# -- inside tl.jit ---------------------------------------------------------------------------


def test_grad_inside_jit_matches_eager():
    model = CountingLinear(3, 2, rngs=0)
    eager_loss, eager = tl.value_and_grad(lambda m, x: linear_loss(m, x))(model, X)

    @tl.jit
    def step(model, x):
        return tl.value_and_grad(lambda m, x: linear_loss(m, x))(model, x)

    loss, grads = step(model, X)
    assert isinstance(grads, tl.State)
    assert set(grads.flat()) == set(eager.flat())
    close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for path, g in eager.flat().items():
        assert type(grads.flat()[path]) is tl.Param
        close(grads.flat()[path].value, g.value, rtol=1e-5, atol=1e-6)
    # The counter updated inside grad inside jit comes back out, twice.
    assert int(model.count.value) == 2
    step(model, X)
    assert int(model.count.value) == 3


# -- tl.Optimizer -----------------------------------------------------------------------------


def test_optimizer_sgd_step_is_params_minus_lr_grads():
    model = nn.MLP([3, 4, 2], rngs=0)
    before = {p: v.value for p, v in tl.iter_variables(model, tl.Param)}
    opt = tl.Optimizer(model, optax.sgd(0.1))
    assert int(opt.step.value) == 0
    grads = tl.grad(linear_loss)(model, X)
    opt.update(model, grads)
    assert int(opt.step.value) == 1
    flat = grads.flat()
    for path, v in tl.iter_variables(model, tl.Param):
        close(v.value, before[path] - 0.1 * flat[path].value)


def test_optimizer_adam_matches_hand_run_optax():
    model = nn.Linear(3, 2, rngs=0)
    opt = tl.Optimizer(model, optax.adam(0.05))
    tx = optax.adam(0.05)
    params = {"kernel": model.kernel.value, "bias": model.bias.value}
    state = tx.init(params)
    pure = jax.grad(lambda p, x: pure_loss(p["kernel"], p["bias"], x))
    for _ in range(3):
        opt.update(model, tl.grad(linear_loss)(model, X))
        updates, state = tx.update(pure(params, X), state, params)
        params = optax.apply_updates(params, updates)
    assert int(opt.step.value) == 3
    close(model.kernel.value, params["kernel"])
    close(model.bias.value, params["bias"])
    # The moments live in the optimizer's OptState Variables.
    mu = [v.value for p, v in tl.iter_variables(opt, tl.OptState) if "kernel" in p]
    assert any(np.allclose(np.asarray(m), np.asarray(state[0].mu["kernel"])) for m in mu)


def test_optimizer_state_lives_in_optstate_variables():
    model = nn.Linear(3, 2, rngs=0)
    opt = tl.Optimizer(model, optax.adam(0.1))
    opt_state = tl.state(opt, tl.OptState)
    assert len(opt_state.flat()) > 3  # step, adam count, mu and nu of kernel and bias
    assert all(type(v) is tl.OptState for v in opt_state.flat().values())
    assert not issubclass(tl.OptState, tl.Param)
    assert len(tl.state(opt, tl.Param).flat()) == 0
    # Differentiating the optimizer's Params is therefore an error, not a silent no-op.
    with pytest.raises(ValueError, match="selects no Variable"):
        tl.grad(lambda o: 0.0)(opt)


def test_optimizer_with_a_wrt_filter_updates_only_those_variables():
    model = nn.Linear(3, 2, rngs=0)
    bias = model.bias.value
    wrt = tl.PathContains("kernel")
    opt = tl.Optimizer(model, optax.sgd(0.1), wrt=wrt)
    grads = tl.grad(linear_loss, wrt=wrt)(model, X)
    kernel = model.kernel.value
    opt.update(model, grads)
    close(model.kernel.value, kernel - 0.1 * grads.kernel.value)
    close(model.bias.value, bias)


def test_optimizer_in_jit_matches_eager_loop():
    def train_step(model, opt, x):
        grads = tl.grad(linear_loss)(model, x)
        opt.update(model, grads)

    jitted = tl.jit(train_step)
    eager_model = nn.MLP([3, 4, 2], rngs=0)
    eager_opt = tl.Optimizer(eager_model, optax.adam(0.05))
    model = nn.MLP([3, 4, 2], rngs=0)
    opt = tl.Optimizer(model, optax.adam(0.05))
    for _ in range(5):
        train_step(eager_model, eager_opt, X)
        jitted(model, opt, X)
    assert int(opt.step.value) == 5 and int(eager_opt.step.value) == 5
    eager = dict(tl.iter_variables(eager_model, tl.Param))
    for path, v in tl.iter_variables(model, tl.Param):
        assert not isinstance(v.value, jax.core.Tracer)
        close(v.value, eager[path].value, rtol=1e-5, atol=1e-6)
    eager_state = dict(tl.iter_variables(eager_opt, tl.OptState))
    for path, v in tl.iter_variables(opt, tl.OptState):
        close(v.value, eager_state[path].value, rtol=1e-5, atol=1e-6)


def test_optimizer_mismatched_grads_name_the_path_and_change_nothing():
    model = nn.Linear(3, 2, rngs=0)
    opt = tl.Optimizer(model, optax.adam(0.1))
    snapshot = {p: v.value for p, v in tl.iter_variables(model)}
    opt_snapshot = {p: v.value for p, v in tl.iter_variables(opt)}

    missing = tl.grad(linear_loss)(model, X)
    del missing["bias"]
    with pytest.raises(ValueError, match=r"no gradient for: model\.bias"):
        opt.update(model, missing)

    extra = tl.grad(linear_loss, wrt=...)(Scaled(), X)  # other paths entirely
    with pytest.raises(ValueError, match=r"non-parameter: .*model\.layers\[0\]\.kernel"):
        opt.update(model, extra)

    for path, v in tl.iter_variables(model):
        close(v.value, snapshot[path])
    for path, v in tl.iter_variables(opt):
        np.testing.assert_array_equal(np.asarray(v.value), np.asarray(opt_snapshot[path]))
    assert int(opt.step.value) == 0


def test_optimizer_wrt_selecting_nothing_is_a_value_error():
    model = nn.Linear(3, 2, rngs=0)
    with pytest.raises(ValueError, match="selects no Variable"):
        tl.Optimizer(model, optax.sgd(0.1), wrt=tl.BatchStat)


# -- end to end: linear regression ------------------------------------------------------------


def test_linear_regression_training_loop_reduces_the_loss():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 10)).astype(np.float32)
    w_true = rng.normal(size=(10, 1)).astype(np.float32)
    y = x @ w_true + 0.5 + 0.1 * rng.normal(size=(256, 1)).astype(np.float32)
    x, y = jnp.asarray(x), jnp.asarray(y)

    model = nn.Linear(10, 1, rngs=0)
    opt = tl.Optimizer(model, optax.adam(0.05))

    def mse(model, x, y):
        return ((model(x) - y) ** 2).mean()

    @tl.jit
    def train_step(model, opt, x, y):
        loss, grads = tl.value_and_grad(mse)(model, x, y)
        opt.update(model, grads)
        return loss

    first = float(mse(model, x, y))
    for _ in range(200):
        train_step(model, opt, x, y)
    last = float(mse(model, x, y))
    assert last < first / 10
    assert int(opt.step.value) == 200
    close(model.kernel.value, w_true, rtol=0, atol=0.1)


def test_grad_and_remat_are_named_callables():
    def loss_fn(model, x):
        """The loss."""
        return model(x).sum()

    for transform, kind in (
        (tl.grad, "tl.grad"),
        (tl.value_and_grad, "tl.value_and_grad"),
        (tl.remat, "tl.remat"),
    ):
        wrapped = transform(loss_fn)
        assert wrapped.__name__ == "loss_fn" and wrapped.__wrapped__ is loss_fn
        assert wrapped.__doc__ == "The loss." and repr(wrapped) == f"<{kind}(loss_fn)>"
    model = nn.Linear(2, 1, rngs=0)
    assert tl.grad(tl.remat(loss_fn))(model, jnp.ones(2)).kernel.shape == (2, 1)


def test_a_closed_over_variable_set_inside_grad_is_named_and_nothing_changes():
    from conftest import assert_unchanged, snapshot

    counter = tl.Variable(jnp.array(0))
    model = nn.Linear(2, 1, rngs=0)
    holder = tl.Module()
    holder.count = counter
    before = snapshot(holder)

    def loss_fn(m):
        counter.value = counter.value + 1
        return m(jnp.ones(2)).sum()

    with pytest.raises(
        RuntimeError, match=r"(?s)this Variable was created outside tl\.grad\(loss_fn\)"
    ):
        tl.grad(loss_fn)(model)
    assert_unchanged(holder, before)
