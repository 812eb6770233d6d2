"""tl.while_loop, tl.custom_vjp, tl.jvp, tl.vjp and tl.scan's single-value axes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_unchanged, snapshot

import toylib as tl
from toylib import nn

# -- while_loop ---------------------------------------------------------------------


def test_while_loop_carries_a_model_and_an_optimizer():
    model = nn.Linear(2, 1, rngs=0)
    opt = tl.Optimizer(model, optax.sgd(0.1))
    x, y = jnp.ones((4, 2)), jnp.zeros((4, 1))

    def loss_fn(m):
        return ((m(x) - y) ** 2).mean()

    start = float(loss_fn(model))

    def body(carry):
        m, o, i = carry
        o.update(m, tl.grad(loss_fn)(m))
        return m, o, i + 1

    @tl.jit
    def train(m, o):
        return tl.while_loop(lambda c: (c[2] < 5) & (loss_fn(c[0]) > 1e-6), body, (m, o, 0))[2]

    steps = train(model, opt)
    assert int(steps) == 5
    assert float(loss_fn(model)) < start  # the caller's model was trained in place
    assert int(opt.step.value) == 5


def test_while_loop_eagerly_with_rngs_state():
    drop = nn.Dropout(0.5, rngs=0)

    def body(carry):
        d, x = carry
        return d, d(x)

    tl.while_loop(lambda c: jnp.any(c[1] != 0), body, (drop, jnp.ones(8)))
    assert int(drop.rngs.count.value) >= 1


def test_while_loop_body_changing_structure_names_the_path():
    class Counter(tl.Module):
        def __init__(self):
            self.n = tl.Variable(jnp.array(0))

    def body(c):
        c.extra = tl.Intermediate(c.n.value)
        c.n.value = c.n.value + 1
        return c

    counter = Counter()
    before = snapshot(counter)
    with pytest.raises(ValueError, match=r"`init_val.extra` was added") as info:
        tl.while_loop(lambda c: c.n.value < 3, body, counter)
    assert "Fix:" in str(info.value)
    assert_unchanged(counter, before)


def test_while_loop_cond_must_not_change_state():
    drop = nn.Dropout(0.5, rngs=0)
    with pytest.raises(ValueError, match="cond_fun changed"):
        tl.while_loop(lambda d: d(jnp.ones(2)).sum() > 10, lambda d: d, drop)


# -- custom_vjp ---------------------------------------------------------------------


def test_custom_vjp_on_a_module():
    @tl.custom_vjp
    def clipped(m, x):
        return m(x)

    def fwd(m, x):
        return m(x), x

    def bwd(x, g):
        grads = tl.State({"kernel": tl.Param(jnp.clip(jnp.outer(x, g), -0.5, 0.5))})
        return grads, jnp.zeros_like(x)

    clipped.defvjp(fwd, bwd)
    model = nn.Linear(2, 1, rngs=0)
    x = jnp.array([3.0, -0.1])
    assert np.allclose(clipped(model, x), model(x))
    grads = tl.grad(lambda m: clipped(m, x).sum())(model)
    assert grads.kernel.value.tolist() == [[0.5], [-0.10000000149011612]]
    assert grads.bias.value.tolist() == [0.0]  # left out of the State: zero
    dx = tl.grad(lambda x: clipped(model, x).sum())(x)
    assert dx.tolist() == [0.0, 0.0]
    jitted = tl.jit(tl.grad(lambda m: clipped(m, x).sum()))(model)
    assert np.allclose(jitted.kernel.value, grads.kernel.value)


def test_custom_vjp_carries_state_updates():
    @tl.custom_vjp
    def norm(m, x):
        return m(x)

    norm.defvjp(lambda m, x: (m(x), None), lambda res, g: (None, g))
    bn = nn.BatchNorm(2)
    x = jnp.arange(8.0).reshape(4, 2)
    dx = tl.grad(lambda x, bn: norm(bn, x).sum())(x, bn)
    assert dx.shape == (4, 2) and float(bn.mean.value[0]) > 0  # statistics updated
    with pytest.raises(TypeError, match="one cotangent per positional argument"):
        bad = tl.custom_vjp(lambda m, x: m(x))
        bad.defvjp(lambda m, x: (m(x), None), lambda res, g: g)
        tl.grad(lambda x, bn: bad(bn, x).sum())(x, bn)
    with pytest.raises(TypeError, match="defvjp"):
        tl.custom_vjp(lambda x: x)(jnp.ones(1))


# -- jvp / vjp ---------------------------------------------------------------------


def test_jvp_matches_jax_on_the_params():
    model = nn.Linear(3, 2, rngs=0)
    x = jnp.arange(3.0)
    tangent = jax.tree.map(jnp.ones_like, tl.state(model, tl.Param))
    out, dout = tl.jvp(lambda m, x: jnp.tanh(m(x)), (model, x), (tangent, None))
    _, expected = jax.jvp(
        lambda k, b: jnp.tanh(x @ k + b),
        (model.kernel.value, model.bias.value),
        (jnp.ones((3, 2)), jnp.ones(2)),
    )
    assert np.allclose(dout, expected) and np.allclose(out, jnp.tanh(model(x)))
    _, dx = tl.jvp(lambda m, x: m(x), (model, x), (None, jnp.ones(3)))
    assert np.allclose(dx, model.kernel.value.sum(0))
    with pytest.raises(TypeError, match="State"):
        tl.jvp(lambda m, x: m(x), (model, x), (jnp.ones(3), None))


def test_vjp_gives_states_and_carries_state():
    model = nn.Sequential(nn.Linear(2, 2, rngs=0), nn.BatchNorm(2))
    x = jnp.arange(8.0).reshape(4, 2)
    out, back, aux = tl.vjp(lambda m, x: (m(x).sum(), 1.0), model, x, has_aux=True)
    assert float(abs(model.layers[1].mean.value).sum()) > 0  # written back on the call
    grads, dx = back(jnp.ones(()))
    expected = tl.grad(lambda m: m(x).sum())(tl.clone(model))
    assert grads.layers[0].kernel.shape == (2, 2) and dx.shape == (4, 2) and aux == 1.0
    assert type(grads.layers[0].kernel) is tl.Param
    assert "mean" not in str(list(grads.flat())) and out.shape == ()
    assert np.allclose(grads.layers[0].kernel.value, expected.layers[0].kernel.value, atol=1e-5)
    with pytest.raises(TypeError, match="returned a"):
        tl.vjp(lambda m: m, model)


# -- scan: single-value axes ---------------------------------------------------------


def test_scan_with_single_value_axes():
    ys = tl.scan(lambda x: x * 2, in_axes=0, out_axes=0)(jnp.arange(3.0))
    assert ys.tolist() == [0.0, 2.0, 4.0]
    counter = tl.Variable(jnp.array(0))

    def bump(c):
        c.value = c.value + 1
        return c

    tl.scan(bump, in_axes=tl.Carry, out_axes=tl.Carry, length=4)(counter)
    assert int(counter.value) == 4
