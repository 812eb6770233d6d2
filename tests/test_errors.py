"""tl.error_if, tl.branched_error_if, tl.checkify: runtime checks through the transforms."""

from __future__ import annotations

import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_unchanged, run_in_threads, snapshot
from jax.experimental import checkify

import toylib as tl
from toylib import nn


class Checked(tl.Module):
    """A model that updates its own state (BatchNorm, Dropout's Rngs) and checks its output."""

    def __init__(self):
        self.linear = nn.Linear(2, 2, rngs=0)
        self.norm = nn.BatchNorm(2)
        self.drop = nn.Dropout(0.5, rngs=1)

    def __call__(self, x, limit):
        y = self.drop(self.norm(self.linear(x)))
        return tl.error_if(y, jnp.abs(y) > limit, "activation too large")


def test_error_if_inside_jit_on_a_batchnorm_model_leaves_it_unchanged():
    model = Checked()
    step = tl.jit(lambda m, x, limit: m(x, limit).sum())
    x = jnp.arange(8.0).reshape(4, 2)
    step(model, x, jnp.asarray(1e6))  # compiles, passes, updates the statistics
    before = snapshot(model)
    with pytest.raises(tl.RuntimeCheckError, match="activation too large") as info:
        step(model, x, jnp.asarray(0.0))
    assert "model.<Checked>" in info.value.where or "Checked" in info.value.where
    assert "tl.jit" in info.value.where
    assert "CpuCallback" not in str(info.value)
    assert_unchanged(model, before)  # the failed step wrote nothing back
    step(model, x, jnp.asarray(1e6))  # and the model still works
    assert int(model.drop.rngs.count.value) == 2


def test_error_if_passes_and_fails_eagerly_and_under_each_transform():
    x = jnp.array([1.0, 2.0, 3.0])

    def check(v):
        return tl.error_if(v, v > 2.5, "over")

    assert check(jnp.ones(2)).tolist() == [1.0, 1.0]
    with pytest.raises(tl.RuntimeCheckError, match="over"):
        check(x)
    with pytest.raises(tl.RuntimeCheckError, match="over"):
        tl.vmap(check)(x)
    assert tl.vmap(check)(jnp.ones(3)).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(tl.RuntimeCheckError, match="over"):
        tl.jit(tl.vmap(check))(x)
    with pytest.raises(tl.RuntimeCheckError, match="over"):
        tl.grad(lambda v: check(v).sum())(x)
    # Compiled, the check runs when its value is used: value_and_grad returns the loss.
    with pytest.raises(tl.RuntimeCheckError, match="over"):
        tl.jit(tl.value_and_grad(lambda v: check(v).sum()))(x)
    assert tl.grad(lambda v: (check(v) ** 2).sum())(jnp.ones(2)).tolist() == [2.0, 2.0]

    counter = tl.Variable(jnp.array(0.0))

    @tl.scan(in_axes=(tl.Carry, 0), out_axes=(tl.Carry, 0))
    def body(c, xi):
        c.value = check(c.value + xi)
        return c, c.value

    with pytest.raises(tl.RuntimeCheckError, match="over"):
        body(counter, x)
    assert float(counter.value) == 0.0  # the scan raised before writing back
    with pytest.raises(tl.RuntimeCheckError, match="over"):
        tl.jit(lambda c, xs: body(c, xs))(counter, x)
    with pytest.raises(tl.RuntimeCheckError, match="over"):
        tl.fori_loop(0, 3, lambda i, c: check(c + 1.0), jnp.asarray(0.0))


def test_error_if_on_pytrees_and_values_without_arrays():
    f = tl.jit(lambda t: tl.error_if(t, t["a"] < 0, "negative"))
    tree = {"a": jnp.ones(2), "n": jnp.arange(2), "flag": jnp.array([True, False])}
    out = f(tree)
    assert out["n"].dtype == jnp.int32 and out["flag"].tolist() == [True, False]
    with pytest.raises(tl.RuntimeCheckError, match="negative"):
        f({**tree, "a": -jnp.ones(2)})

    @tl.jit
    def keys_only(key, x):
        return tl.error_if(key, x < 0, "negative"), x  # no number to tie to: an effect

    with pytest.raises(tl.RuntimeCheckError, match="negative"):
        keys_only(jax.random.key(0), -jnp.ones(()))


def test_branched_error_if_picks_the_message():
    f = tl.jit(lambda x: tl.branched_error_if(x, x > 1, jnp.where(x > 10, 1, 0), ("big", "huge")))
    assert f(jnp.zeros(2)).tolist() == [0.0, 0.0]
    with pytest.raises(tl.RuntimeCheckError, match="^big"):
        f(jnp.array([0.0, 5.0]))
    with pytest.raises(tl.RuntimeCheckError, match="^huge"):
        f(jnp.array([50.0, 0.0]))
    with pytest.raises(TypeError, match="sequence of strings"):
        tl.branched_error_if(jnp.ones(1), jnp.array([True]), 0, "one string")


def test_non_boolean_predicate_is_a_clear_error_naming_the_module():
    with pytest.raises(TypeError, match="must be a boolean array") as info:
        tl.error_if(jnp.ones(2), jnp.ones(2), "x")
    assert "x < 0" in str(info.value)

    class Bad(tl.Module):
        def __call__(self, x):
            return tl.error_if(x, x.sum(), "bad")

    with pytest.raises(TypeError, match=r"model \(Bad\)"):
        tl.jit(lambda m, x: m(x))(Bad(), jnp.ones(2))


def test_nan_and_nothing_modes_per_thread():
    bad = jnp.array([True, False])
    with tl.errors.on_error("nan"):
        assert np.isnan(np.asarray(tl.error_if(jnp.ones(2), bad, "m"))).all()
        assert tl.error_if(jnp.ones(2, jnp.int32), bad, "m").tolist() == [1, 1]
        f = tl.jit(tl.vmap(lambda x: tl.error_if(x, x > 1, "m")))
        assert np.isnan(np.asarray(f(jnp.array([0.0, 2.0])))).tolist() == [False, True]
    with tl.errors.on_error("nothing"):
        assert tl.error_if(jnp.ones(2), bad, "m").tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="must be one of"):
        tl.errors.on_error("warn")

    def in_nan_mode():
        with tl.errors.on_error("nan"):
            return np.asarray(tl.error_if(jnp.ones(1), jnp.array([True]), "m")).tolist()

    def default_mode():
        try:
            tl.error_if(jnp.ones(1), jnp.array([True]), "m")
        except tl.RuntimeCheckError:
            return "raised"
        return "no error"

    nan, raised = run_in_threads(in_nan_mode, default_mode)
    assert np.isnan(nan[0]) and raised == "raised"


def test_environment_variable_selects_the_mode():
    code = (
        "import jax.numpy as jnp, toylib as tl;"
        "print(tl.error_if(jnp.ones(1), jnp.array([True]), 'm').tolist())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "TOYLIB_ON_ERROR": "nan"},
        check=True,
    )
    assert out.stdout.strip() == "[nan]"


def test_equinox_error_if_under_tl_jit_gets_its_own_message():
    f = tl.jit(lambda x: eqx.error_if(x, x > 1, "eqx says no"))
    with pytest.raises(tl.RuntimeCheckError, match="eqx says no"):
        f(jnp.full(2, 2.0))


def test_checkify_carries_state_and_returns_errors():
    model = Checked()
    x = jnp.arange(8.0).reshape(4, 2)

    def step(m, x, limit):
        y = m(x, limit)
        checkify.check(jnp.all(jnp.isfinite(y)), "not finite")
        return y.sum()

    err, loss = tl.checkify(step)(model, x, jnp.asarray(1e6))
    assert err.get() is None and loss.shape == ()
    assert int(model.drop.rngs.count.value) == 1  # state came out
    assert float(model.norm.mean.value[0]) != 0.0
    err, _ = tl.checkify(step)(model, x, jnp.asarray(0.0))
    assert "activation too large" in err.get()
    with pytest.raises(Exception, match="activation too large"):
        err.throw()
    jitted = tl.jit(tl.checkify(step))
    err, _ = jitted(model, x, jnp.asarray(0.0))
    assert "activation too large" in err.get()
    assert int(model.drop.rngs.count.value) == 3


def test_raw_checkify_on_a_stateful_model_points_to_tl_checkify():
    model = Checked()
    with pytest.raises(RuntimeError, match="tl.checkify"):
        checkify.checkify(lambda m, x: m(x, 1e6).sum())(model, jnp.ones((4, 2)))


def test_error_if_in_a_training_step_with_an_optimizer():
    model = nn.Linear(2, 1, rngs=0)
    opt = tl.Optimizer(model, optax.sgd(0.1))

    @tl.jit
    def train(model, opt, x):
        def loss_fn(m):
            loss = ((m(x)) ** 2).mean()
            return tl.error_if(loss, ~jnp.isfinite(loss), "loss is not finite")

        loss, grads = tl.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    train(model, opt, jnp.ones((3, 2)))
    before = snapshot((model, opt))
    with pytest.raises(tl.RuntimeCheckError, match="not finite"):
        train(model, opt, jnp.full((3, 2), jnp.nan))
    assert_unchanged((model, opt), before)


def test_raw_checkify_around_tl_jit_never_leaves_tracers_in_the_model():
    model = Checked()
    step = tl.jit(lambda m, x: m(x, jnp.asarray(1e6)).sum())
    for _ in range(2):  # the general path, then the fast path
        before = snapshot(model)
        with pytest.raises(RuntimeError, match="tl.checkify"):
            checkify.checkify(step)(model, jnp.ones((4, 2)))
        assert_unchanged(model, before)
        step(model, jnp.ones((4, 2)))  # records the fast path for the next round
    assert not isinstance(model.norm.mean.value, jax.core.Tracer)
