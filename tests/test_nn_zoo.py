"""Behaviour of the layer zoo beyond flax parity: errors, dtypes, filters, transforms, EMA."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import toylib as tl
from toylib import nn

BF16 = jnp.bfloat16


def rand(seed, *shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def np_init(seed):
    return lambda key, shape, dtype=jnp.float32: jnp.asarray(rand(seed, *shape), dtype)


# -- Einsum / LinearGeneral ----------------------------------------------------------------------


def test_einsum_equals_the_written_out_contraction():
    layer = nn.Einsum("...d,dhk->...hk", (4, 2, 3), (2, 3), bias_init=np_init(1), rngs=0)
    x = rand(0, 5, 4)
    want = np.einsum("bd,dhk->bhk", x, np.asarray(layer.kernel.value)) + np.asarray(
        layer.bias.value
    )
    np.testing.assert_allclose(np.asarray(layer(x)), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("equation", "message"),
    [
        ("ab,bc", "no '->'"),
        ("ab,bc,cd->ad", "3 operands"),
        ("ab,b...->a", "cannot take '...'"),
    ],
)
def test_einsum_bad_equations_are_clear_errors(equation, message):
    with pytest.raises(ValueError, match=message):
        nn.Einsum(equation, (3, 4), rngs=0)


def test_einsum_kernel_bias_and_input_errors():
    with pytest.raises(
        ValueError, match=r"(?s)gives the kernel 2 axes .* kernel_shape=\(3,\) has 1"
    ):
        nn.Einsum("ab,bc->ac", (3,), rngs=0)
    with pytest.raises(ValueError, match=r"Fix: bias_shape=\(4,\)"):
        nn.Einsum("ab,bc->ac", (3, 4), (3,), rngs=0)
    layer = nn.Einsum("ab,bc->ac", (3, 4), rngs=0)
    with pytest.raises(ValueError, match=r"(?s)model \(Einsum\).*axis 'b'.*size 3"):
        layer(jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="needs 2 axes"):
        layer(jnp.ones((2, 2, 3)))
    with pytest.raises(ValueError, match="none was given"):
        nn.Einsum(None, (3, 4), rngs=0)(jnp.ones((2, 3)))


def test_linear_general_errors_and_linear_equivalence():
    with pytest.raises(ValueError, match="one input axis is needed per entry"):
        nn.LinearGeneral((2, 3), 4, axis=-1, rngs=0)
    with pytest.raises(ValueError, match="leading axes 0, 1"):
        nn.LinearGeneral(3, 4, batch_axis={1: 2}, rngs=0)
    layer = nn.LinearGeneral((2, 3), 4, axis=(-2, -1), rngs=0)
    with pytest.raises(ValueError, match=r"model \(LinearGeneral\): expected input axes"):
        layer(jnp.ones((5, 3, 3)))
    dense = nn.Linear(3, 4, rngs=1)
    general = nn.LinearGeneral(3, 4, rngs=1)
    x = rand(0, 2, 3)
    np.testing.assert_array_equal(np.asarray(general.kernel.value), np.asarray(dense.kernel.value))
    np.testing.assert_allclose(np.asarray(general(x)), np.asarray(dense(x)), rtol=1e-6)


def test_linear_general_bf16_compute_and_grad():
    layer = nn.LinearGeneral(4, (2, 3), dtype=BF16, rngs=0)
    y = layer(jnp.ones((5, 4)))
    assert y.dtype == BF16 and layer.kernel.value.dtype == jnp.float32
    grads = tl.grad(lambda m: m(jnp.ones((5, 4))).astype(jnp.float32).sum())(layer)
    assert grads.kernel.value.dtype == jnp.float32


def test_precision_reaches_the_contraction():
    # "highest" vs "default" gives the same numbers on CPU; check it is passed on.
    for layer in (
        nn.Einsum("ab,bc->ac", (3, 4), precision="highest", rngs=0),
        nn.LinearGeneral(3, 4, precision="highest", rngs=0),
        nn.LoRA(3, 2, 4, precision="highest", rngs=0),
    ):
        text = str(jax.make_jaxpr(layer)(jnp.ones((2, 3))))
        assert "HIGHEST" in text, text


# -- LoRA -----------------------------------------------------------------------------------------


def test_lora_alpha_scales_the_update():
    a = nn.LoRA(3, 2, 4, b_initializer=np_init(1), rngs=0)
    b = nn.LoRA(3, 2, 4, alpha=8.0, b_initializer=np_init(1), rngs=0)
    x = rand(0, 5, 3)
    np.testing.assert_allclose(np.asarray(b(x)), 4.0 * np.asarray(a(x)), rtol=1e-5, atol=1e-6)


def test_lora_param_trains_only_the_adapters():
    model = nn.Sequential(
        nn.LoRALinear(3, 5, lora_rank=2, rngs=0), nn.relu, nn.LoRALinear(5, 1, lora_rank=2, rngs=1)
    )
    frozen = {p: np.asarray(v.value) for p, v in tl.iter_variables(model, tl.Param)}
    optimizer = tl.Optimizer(model, optax.sgd(0.1), wrt=nn.LoRAParam)
    x, y = rand(0, 8, 3), rand(1, 8, 1)

    @tl.jit
    def step(model, optimizer, x, y):
        loss = lambda m: jnp.mean((m(x) - y) ** 2)  # noqa: E731
        grads = tl.grad(loss, wrt=nn.LoRAParam)(model)
        optimizer.update(model, grads)
        return loss(model)

    losses = [float(step(model, optimizer, x, y)) for _ in range(5)]
    assert losses[-1] < losses[0]
    for path, v in tl.iter_variables(model, tl.Param):
        same = np.array_equal(np.asarray(v.value), frozen[path])
        assert same != isinstance(v, nn.LoRAParam), path
    # wrt=tl.Param still sees the adapters as Params.
    assert {p[-1] for p, _ in tl.iter_variables(model, tl.Param)} == {
        "kernel",
        "bias",
        "lora_a",
        "lora_b",
    }


def test_lora_errors():
    with pytest.raises(ValueError, match="lora_rank=0"):
        nn.LoRA(3, 0, 4, rngs=0)
    with pytest.raises(ValueError, match=r"model \(LoRA\): expected input of shape \(\.\.\., 3\)"):
        nn.LoRA(3, 2, 4, rngs=0)(jnp.ones((2, 5)))
    with pytest.raises(TypeError, match="base_module is a int"):
        nn.LoRA(3, 2, 4, base_module=3, rngs=0)(jnp.ones((2, 3)))
