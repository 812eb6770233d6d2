"""Tests for the basic layers: Linear, MLP, Sequential, Dropout, BatchNorm."""

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest
from conftest import rand

import toylib as tl
from toylib import nn

# A few fixed shapes, shared by the tests: every new shape costs an XLA compile.
X = (5, 3)  # Linear / MLP / Sequential inputs: 3 features
BATCHES = [(), (5,), (2, 5)]
D = (100, 200)  # Dropout inputs
B = (8, 3)  # BatchNorm inputs: 3 features
IMG = (2, 4, 5, 3)  # BatchNorm images


def np_relu(x):
    return np.maximum(x, 0.0)


# -- Linear -----------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", BATCHES, ids=["none", "one", "two"])
def test_linear_shapes_with_leading_batch_dims(batch):
    layer = nn.Linear(3, 4, rngs=0)
    assert layer.kernel.value.shape == (3, 4)
    assert layer.bias.value.shape == (4,)
    y = layer(jnp.ones((*batch, 3)))
    assert y.shape == (*batch, 4)


@pytest.mark.parametrize("batch", BATCHES, ids=["none", "one", "two"])
def test_linear_numerics_match_numpy(batch):
    layer = nn.Linear(3, 4, rngs=0)
    layer.bias = rand(1, 4)  # sets the bias Param's value
    assert isinstance(layer.bias, tl.Param)
    x = rand(2, *batch, 3)
    kernel = np.asarray(layer.kernel.value)
    want = x @ kernel + rand(1, 4)
    np.testing.assert_allclose(np.asarray(layer(x)), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)


def test_linear_without_bias():
    layer = nn.Linear(3, 4, use_bias=False, rngs=0)
    assert layer.bias is None
    params = tl.state(layer, tl.Param).flat()
    assert set(params) == {("kernel",)}
    x = rand(0, *X)
    np.testing.assert_allclose(
        np.asarray(layer(x)), x @ np.asarray(layer.kernel.value), rtol=1e-5, atol=1e-6
    )
    assert layer(jnp.zeros(X)).tolist() == [[0.0] * 4] * X[0]


def test_linear_bf16_compute_keeps_float32_params():
    layer = nn.Linear(3, 4, dtype=jnp.bfloat16, rngs=0)
    layer.bias = rand(1, 4)
    assert layer.kernel.value.dtype == jnp.float32
    assert layer.bias.value.dtype == jnp.float32
    x = rand(2, *X)
    y = layer(x)
    assert y.dtype == jnp.bfloat16
    assert layer.kernel.value.dtype == jnp.float32  # unchanged by the call
    want = x @ np.asarray(layer.kernel.value) + rand(1, 4)
    np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=5e-2, atol=5e-2)
    # A float32 input is computed in bf16 too.
    assert layer(jnp.ones(X, jnp.float32)).dtype == jnp.bfloat16


def test_linear_param_dtype():
    layer = nn.Linear(3, 4, param_dtype=jnp.bfloat16, rngs=0)
    assert layer.kernel.value.dtype == jnp.bfloat16
    assert layer.bias.value.dtype == jnp.bfloat16
    # Default dtype promotes input and params: float32 input gives float32.
    assert layer(jnp.ones(X, jnp.float32)).dtype == jnp.float32


def test_linear_default_dtype_promotes():
    layer = nn.Linear(3, 4, rngs=0)
    assert layer(jnp.ones(X, jnp.bfloat16)).dtype == jnp.float32


def test_linear_wrong_feature_size_is_a_clear_error(monkeypatch):
    # Bad input on purpose: toylib's own message, not the runtime type checker's.
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)
    layer = nn.Linear(3, 4, rngs=0)
    with pytest.raises(ValueError) as info:
        layer(jnp.ones((2, 5)))
    message = str(info.value)
    assert "(..., 3)" in message  # expected
    assert "(2, 5)" in message  # received
    assert "in_features=5" in message  # the fix
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        layer(jnp.array(1.0))


# -- MLP -------------------------------------------------------------------------------------


def mlp_numpy(mlp, x, activation, final_activation=None):
    """Hand-written forward pass from the MLP's weights."""
    ws = [(np.asarray(lyr.kernel.value), np.asarray(lyr.bias.value)) for lyr in mlp.layers]
    h = x
    for w, b in ws[:-1]:
        h = activation(h @ w + b)
    w, b = ws[-1]
    h = h @ w + b
    return h if final_activation is None else final_activation(h)


def randomize_biases(mlp, seed):
    for i, layer in enumerate(mlp.layers):
        layer.bias = rand(seed + i, layer.out_features)


def test_mlp_layers_and_relu_placement():
    mlp = nn.MLP([3, 4, 4, 4], rngs=0)
    assert len(mlp.layers) == 3
    assert all(isinstance(lyr, nn.Linear) for lyr in mlp.layers)
    assert [(lyr.in_features, lyr.out_features) for lyr in mlp.layers] == [(3, 4), (4, 4), (4, 4)]
    randomize_biases(mlp, 10)
    x = rand(0, *X)
    y = np.asarray(mlp(x))
    want = mlp_numpy(mlp, x, np_relu)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    # No activation after the last layer: some outputs are negative.
    assert (y < 0).any()
    # The hidden activations matter: without them the result would differ.
    assert not np.allclose(y, mlp_numpy(mlp, x, lambda h: h), atol=1e-3)


@pytest.mark.parametrize("batch", BATCHES, ids=["none", "one", "two"])
def test_mlp_shapes_with_leading_batch_dims(batch):
    mlp = nn.MLP([3, 4, 4], rngs=0)
    assert mlp(jnp.ones((*batch, 3))).shape == (*batch, 4)


def test_mlp_custom_and_final_activation():
    mlp = nn.MLP([3, 4, 4, 4], activation=jnp.tanh, final_activation=jax.nn.sigmoid, rngs=1)
    randomize_biases(mlp, 20)
    x = rand(1, *X)

    def sigmoid(z):
        return 1 / (1 + np.exp(-z))

    want = mlp_numpy(mlp, x, np.tanh, sigmoid)
    np.testing.assert_allclose(np.asarray(mlp(x)), want, rtol=1e-5, atol=1e-5)


def test_mlp_single_layer_has_no_activation():
    mlp = nn.MLP([3, 4], rngs=0)
    assert len(mlp.layers) == 1
    mlp.layers[0].bias = np.array([-5.0, 5.0, -5.0, 5.0], np.float32)
    x = rand(2, *X)
    want = x @ np.asarray(mlp.layers[0].kernel.value) + np.array([-5.0, 5.0, -5.0, 5.0])
    np.testing.assert_allclose(np.asarray(mlp(x)), want, rtol=1e-5, atol=1e-5)


def test_mlp_layers_get_different_weights():
    mlp = nn.MLP([4, 4, 4, 4], rngs=0)
    kernels = [np.asarray(lyr.kernel.value) for lyr in mlp.layers]
    assert not np.array_equal(kernels[0], kernels[1])
    assert not np.array_equal(kernels[1], kernels[2])


def test_mlp_options_and_errors():
    mlp = nn.MLP([3, 4, 4], use_bias=False, dtype=jnp.bfloat16, rngs=0)
    assert all(lyr.bias is None for lyr in mlp.layers)
    assert all(lyr.kernel.value.dtype == jnp.float32 for lyr in mlp.layers)
    assert mlp(jnp.ones(X)).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="at least"):
        nn.MLP([3], rngs=0)
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        nn.MLP([3, 4, 4], rngs=0)(jnp.ones((2, 4)))


def test_grad_of_mlp_matches_hand_derivation():
    mlp = nn.MLP([3, 4, 4], rngs=0)
    b0 = np.array([0.3, -0.2, 0.1, -0.4], np.float32)
    b1 = np.array([0.05, -0.1, 0.2, 0.0], np.float32)
    mlp.layers[0].bias = b0
    mlp.layers[1].bias = b1
    x = rand(5, *X)
    t = rand(6, X[0], 4)

    def loss(model, x, t):
        return 0.5 * jnp.sum((model(x) - t) ** 2)

    grads = jax.jit(jax.grad(loss))(mlp, x, t)
    assert isinstance(grads, nn.MLP)
    assert len(grads.layers) == 2
    assert isinstance(grads.layers[0].kernel, tl.Param)
    assert grads.activation is jax.nn.relu

    w0 = np.asarray(mlp.layers[0].kernel.value, np.float64)
    w1 = np.asarray(mlp.layers[1].kernel.value, np.float64)
    z = x @ w0 + b0
    assert np.abs(z).min() > 1e-3  # away from the relu kink
    h = np.maximum(z, 0)
    y = h @ w1 + b1
    dy = y - t
    dw1 = h.T @ dy
    db1 = dy.sum(0)
    dz = (dy @ w1.T) * (z > 0)
    dw0 = x.T @ dz
    db0 = dz.sum(0)
    tol = {"rtol": 1e-4, "atol": 1e-4}
    np.testing.assert_allclose(np.asarray(grads.layers[0].kernel.value), dw0, **tol)
    np.testing.assert_allclose(np.asarray(grads.layers[0].bias.value), db0, **tol)
    np.testing.assert_allclose(np.asarray(grads.layers[1].kernel.value), dw1, **tol)
    np.testing.assert_allclose(np.asarray(grads.layers[1].bias.value), db1, **tol)

    # A finite-difference check on one kernel entry, computed in float64 numpy.
    def np_loss(w0_):
        out = np.maximum(x @ w0_ + b0, 0) @ w1 + b1
        return 0.5 * np.sum((out - t) ** 2)

    eps = 1e-5
    bump = np.zeros_like(w0)
    bump[1, 2] = eps
    fd = (np_loss(w0 + bump) - np_loss(w0 - bump)) / (2 * eps)
    assert float(grads.layers[0].kernel.value[1, 2]) == pytest.approx(fd, rel=1e-3, abs=1e-4)


# -- Sequential --------------------------------------------------------------------------------


def make_sequential():
    return nn.Sequential(nn.Linear(3, 4, rngs=0), jax.nn.relu, nn.Linear(4, 4, rngs=1))


def sequential_numpy(model, x):
    a, _, b = model.layers
    h = np_relu(x @ np.asarray(a.kernel.value) + np.asarray(a.bias.value))
    return h @ np.asarray(b.kernel.value) + np.asarray(b.bias.value)


@pytest.mark.parametrize("batch", BATCHES, ids=["none", "one", "two"])
def test_sequential_applies_layers_in_order(batch):
    model = make_sequential()
    model[0].bias = rand(3, 4)
    x = rand(0, *batch, 3)
    y = model(x)
    assert y.shape == (*batch, 4)
    np.testing.assert_allclose(np.asarray(y), sequential_numpy(model, x), rtol=1e-5, atol=1e-5)


def test_sequential_with_function_under_jit():
    model = make_sequential()
    model[0].bias = rand(3, 4)
    x = rand(0, *X)
    leaves = jax.tree.leaves(model)
    assert len(leaves) == 4  # two kernels, two biases; relu is static
    y = jax.jit(lambda m, x: m(x))(model, x)
    np.testing.assert_allclose(np.asarray(y), sequential_numpy(model, x), rtol=1e-5, atol=1e-5)


def test_sequential_with_function_under_grad():
    model = make_sequential()
    model[0].bias = rand(3, 4)
    x = rand(0, *X)

    def loss(m):
        return jnp.sum(m(x) ** 2)

    grads = jax.grad(loss)(model)
    assert isinstance(grads, nn.Sequential)
    assert grads[1] is jax.nn.relu
    assert grads[0].kernel.value.shape == (3, 4)

    # The same loss written on raw arrays, differentiated by jax directly.
    def raw_loss(k0, b0, k1, b1):
        return jnp.sum((jax.nn.relu(x @ k0 + b0) @ k1 + b1) ** 2)

    arrays = (model[0].kernel.value, model[0].bias.value, model[2].kernel.value)
    want = jax.jit(jax.grad(raw_loss, argnums=(0, 1, 2, 3)))(*arrays, model[2].bias.value)
    got = (grads[0].kernel.value, grads[0].bias.value, grads[2].kernel.value, grads[2].bias.value)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
    # Under jit as well.
    jitted = jax.jit(jax.grad(loss))(model)
    assert jitted[1] is jax.nn.relu
    np.testing.assert_allclose(
        np.asarray(jitted[0].kernel.value), np.asarray(want[0]), rtol=1e-5, atol=1e-5
    )


def test_sequential_indexing_len_iteration():
    model = make_sequential()
    assert len(model) == 3
    assert isinstance(model[0], nn.Linear)
    assert model[1] is jax.nn.relu
    assert model[-1] is model.layers[2]
    assert list(model) == list(model.layers)
    assert [type(layer) for layer in model] == [nn.Linear, type(jax.nn.relu), nn.Linear]


def test_sequential_assignment_replaces_a_layer():
    model = make_sequential()
    jitted = jax.jit(lambda m, x: m(x))
    x = rand(0, *X)
    before = np.asarray(jitted(model, x))
    other = nn.Linear(3, 4, rngs=42)
    model[0] = other
    assert model[0] is other
    assert model.layers[0] is other
    after = np.asarray(jitted(model, x))
    np.testing.assert_allclose(after, sequential_numpy(model, x), rtol=1e-5, atol=1e-5)
    assert not np.allclose(before, after)
    # Replacing a function by another function changes the static structure.
    model[1] = jnp.tanh
    h = np.tanh(x @ np.asarray(other.kernel.value) + np.asarray(other.bias.value))
    want = h @ np.asarray(model[2].kernel.value) + np.asarray(model[2].bias.value)
    np.testing.assert_allclose(np.asarray(jitted(model, x)), want, rtol=1e-5, atol=1e-5)


def test_sequential_of_functions_only_supports_assignment():
    model = nn.Sequential(jax.nn.relu, jnp.tanh)
    x = jnp.array([-1.0, 0.5])
    np.testing.assert_allclose(np.asarray(model(x)), np.tanh(np_relu(np.asarray(x))), rtol=1e-6)
    assert len(model) == 2 and model[0] is jax.nn.relu
    model[0] = nn.Linear(4, 4, rngs=0)
    assert isinstance(model[0], nn.Linear)
    assert model(jnp.ones((5, 4))).shape == (5, 4)


def test_sequential_extra_arguments_go_to_first_layer():
    model = nn.Sequential(nn.Dropout(0.5, rngs=0), nn.Linear(3, 4, rngs=0))
    x = rand(0, *X)
    want = x @ np.asarray(model[1].kernel.value)
    y = model(x, deterministic=True)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)


# -- Dropout ----------------------------------------------------------------------------------


def test_dropout_rate_zero_is_identity():
    x = rand(0, *D)
    y = nn.Dropout(0.0, rngs=0)(x)
    np.testing.assert_array_equal(np.asarray(y), x)
    # No random stream is needed when nothing is dropped.
    np.testing.assert_array_equal(np.asarray(nn.Dropout(0.0)(x)), x)


def test_dropout_rate_one_gives_zeros():
    x = rand(0, *D)
    y = nn.Dropout(1.0, rngs=0)(x)
    assert y.shape == x.shape
    assert not np.asarray(y).any()
    assert np.all(np.isfinite(np.asarray(y)))


def test_dropout_scales_kept_values():
    rate = 0.3
    x = rand(0, *D) + 5.0  # no zeros in the input
    y = np.asarray(nn.Dropout(rate, rngs=0)(x))
    kept = y != 0
    assert 0 < kept.sum() < x.size
    np.testing.assert_allclose(y[kept], x[kept] / (1 - rate), rtol=1e-6)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
def test_dropout_drops_about_rate_fraction(rate):
    y = np.asarray(nn.Dropout(rate, rngs=0)(jnp.ones(D)))
    values = np.unique(y)
    assert len(values) == 2 and values[0] == 0.0
    assert values[1] == pytest.approx(1 / (1 - rate))
    frac = float((y == 0).mean())
    assert abs(frac - rate) < 0.015  # about 4 standard deviations
    # The mean is preserved in expectation.
    assert abs(y.mean() - 1.0) < 0.06


def test_dropout_deterministic_and_eval_are_identity():
    x = rand(0, *D)
    np.testing.assert_array_equal(np.asarray(nn.Dropout(0.5, deterministic=True)(x)), x)
    layer = nn.Dropout(0.5, rngs=0)
    np.testing.assert_array_equal(np.asarray(layer(x, deterministic=True)), x)
    assert layer.eval() is layer
    assert layer.deterministic is True
    np.testing.assert_array_equal(np.asarray(layer(x)), x)
    layer.train()
    assert layer.deterministic is False
    assert (np.asarray(layer(x)) == 0).any()
    # A call may override the flag both ways.
    layer.eval()
    assert (np.asarray(layer(x, deterministic=False)) == 0).any()


def test_eval_and_train_reach_nested_dropout():
    model = nn.Sequential(nn.Linear(3, 4, rngs=0), nn.Dropout(0.5, rngs=1))
    x = rand(0, *X)
    clean = np.asarray(model[0](x))
    model.eval()
    assert model[1].deterministic is True
    np.testing.assert_allclose(np.asarray(model(x)), clean, rtol=1e-6)
    model.train()
    assert model[1].deterministic is False
    assert (np.asarray(model(x)) == 0).any()


def test_dropout_successive_calls_use_new_masks():
    rngs = tl.Rngs(0, dropout=1)
    layer = nn.Dropout(0.5, rngs=rngs)
    assert layer.rngs is rngs.dropout  # keeps a reference to the stream
    x = jnp.ones(D)
    masks = [np.asarray(layer(x)) == 0 for _ in range(3)]
    assert int(rngs.dropout.count.value) == 3
    assert int(rngs.default.count.value) == 0
    assert not np.array_equal(masks[0], masks[1])
    assert not np.array_equal(masks[1], masks[2])
    # Same seed, same sequence of masks.
    again = nn.Dropout(0.5, rngs=tl.Rngs(0, dropout=1))
    for mask in masks:
        np.testing.assert_array_equal(np.asarray(again(x)) == 0, mask)


def test_dropout_uses_default_stream_without_dropout_stream():
    rngs = tl.Rngs(0)
    layer = nn.Dropout(0.5, rngs=rngs)
    layer(jnp.ones(D))
    assert int(rngs.default.count.value) == 1


@pytest.mark.parametrize("dims", [(0,), (-2,)])
def test_dropout_broadcast_dims_share_mask(dims):
    x = rand(0, *D) + 5.0
    y = np.asarray(nn.Dropout(0.5, broadcast_dims=dims, rngs=0)(x))
    mask = y == 0
    assert mask.any() and not mask.all()
    assert np.all(mask == mask[:1, :])  # one mask row shared along axis 0
    assert not np.all(mask == mask[:, :1])  # but not along axis 1
    assert abs(mask[0].mean() - 0.5) < 0.15
    kept = ~mask
    np.testing.assert_allclose(y[kept], x[kept] * 2, rtol=1e-6)


def test_dropout_rngs_override_per_call():
    layer = nn.Dropout(0.5, rngs=tl.Rngs(dropout=0))
    x = jnp.ones(D)
    override = tl.Rngs(dropout=5)
    y = np.asarray(layer(x, rngs=override))
    assert int(override.dropout.count.value) == 1
    assert int(layer.rngs.count.value) == 0  # own stream untouched
    # The same override seed gives the same mask, another seed another mask.
    np.testing.assert_array_equal(np.asarray(layer(x, rngs=tl.Rngs(dropout=5))), y)
    assert not np.array_equal(np.asarray(layer(x, rngs=tl.Rngs(dropout=6))), y)
    # A key or a stream may be passed too.
    key = jax.random.key(9)
    a = np.asarray(layer(x, rngs=key))
    np.testing.assert_array_equal(np.asarray(layer(x, rngs=key)), a)
    stream = tl.RngStream(jax.random.key(9))
    layer(x, rngs=stream)
    assert int(stream.count.value) == 1
    assert int(layer.rngs.count.value) == 0


def test_dropout_without_rngs_in_training_is_a_clear_error():
    layer = nn.Dropout(0.5)
    x = jnp.ones(D)
    with pytest.raises(ValueError) as info:
        layer(x)
    message = str(info.value)
    assert "Fix" in message and "rngs" in message
    # It works once a key is given, or in evaluation mode.
    assert layer(x, rngs=tl.Rngs(0)).shape == D
    np.testing.assert_array_equal(np.asarray(layer.eval()(x)), np.ones(D))


def test_dropout_bad_rate():
    with pytest.raises(ValueError, match="rate"):
        nn.Dropout(1.5)
    with pytest.raises(ValueError, match="rate"):
        nn.Dropout(-0.1)


# -- BatchNorm ---------------------------------------------------------------------------------


def bn_numpy(x, axes, eps=1e-5, scale=1.0, bias=0.0):
    x = x.astype(np.float64)
    mean = x.mean(axes)
    var = x.var(axes)  # biased
    return (x - mean) / np.sqrt(var + eps) * scale + bias, mean, var


def test_batchnorm_train_uses_batch_statistics():
    x = rand(0, *B) * 3 + 2
    bn = nn.BatchNorm(3)
    y = np.asarray(bn(x))
    want, _, _ = bn_numpy(x, 0)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-5)


def test_batchnorm_scale_and_bias():
    x = rand(0, *B)
    bn = nn.BatchNorm(3)
    scale, bias = rand(1, 3), rand(2, 3)
    bn.scale = scale
    bn.bias = bias
    assert isinstance(bn.scale, tl.Param) and isinstance(bn.bias, tl.Param)
    want, _, _ = bn_numpy(x, 0, scale=scale, bias=bias)
    np.testing.assert_allclose(np.asarray(bn(x)), want, rtol=1e-4, atol=1e-4)
    plain = nn.BatchNorm(3, use_scale=False, use_bias=False)
    assert plain.scale is None and plain.bias is None
    assert set(tl.state(plain, tl.Param).flat()) == set()


def test_batchnorm_updates_running_stats_with_momentum():
    momentum = 0.9
    bn = nn.BatchNorm(3, momentum=momentum)
    assert isinstance(bn.mean, tl.BatchStat) and isinstance(bn.var, tl.BatchStat)
    np.testing.assert_array_equal(np.asarray(bn.mean.value), np.zeros(3))
    np.testing.assert_array_equal(np.asarray(bn.var.value), np.ones(3))
    running_mean, running_var = np.zeros(3), np.ones(3)
    for seed in range(3):
        x = rand(seed, *B) * (seed + 1) + seed
        bn(x)
        _, mean, var = bn_numpy(x, 0)
        running_mean = momentum * running_mean + (1 - momentum) * mean
        running_var = momentum * running_var + (1 - momentum) * var
        np.testing.assert_allclose(np.asarray(bn.mean.value), running_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(bn.var.value), running_var, rtol=1e-5, atol=1e-6)


def test_batchnorm_default_momentum():
    bn = nn.BatchNorm(3)
    x = rand(0, *B) + 1
    bn(x)
    _, mean, var = bn_numpy(x, 0)
    np.testing.assert_allclose(np.asarray(bn.mean.value), 0.01 * mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(bn.var.value), 0.99 + 0.01 * var, rtol=1e-5)


def test_batchnorm_eval_uses_running_stats_and_keeps_them():
    bn = nn.BatchNorm(3, momentum=0.5, epsilon=1e-3)
    for seed in range(2):
        bn(rand(seed, *B) * 2 + 1)
    mean, var = np.asarray(bn.mean.value), np.asarray(bn.var.value)
    assert bn.eval() is bn
    assert bn.use_running_average is True
    x = rand(9, *B) * 4 - 3
    y = np.asarray(bn(x))
    want = (x - mean) / np.sqrt(var + 1e-3)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(bn.mean.value), mean)
    np.testing.assert_array_equal(np.asarray(bn.var.value), var)
    # Back to training: batch statistics again, and the running stats move.
    bn.train()
    assert bn.use_running_average is False
    y = np.asarray(bn(x))
    np.testing.assert_allclose(y, bn_numpy(x, 0, eps=1e-3)[0], rtol=1e-4, atol=1e-4)
    assert not np.allclose(np.asarray(bn.mean.value), mean)


def test_batchnorm_use_running_average_flag_and_call_override():
    x = rand(0, *B) + 3
    bn = nn.BatchNorm(3, use_running_average=True)
    y = np.asarray(bn(x))
    np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-5), rtol=1e-5)  # mean 0, var 1
    np.testing.assert_array_equal(np.asarray(bn.mean.value), np.zeros(3))
    # Per call override to training mode.
    y = np.asarray(bn(x, use_running_average=False))
    np.testing.assert_allclose(y, bn_numpy(x, 0)[0], rtol=1e-4, atol=1e-4)
    assert not np.allclose(np.asarray(bn.mean.value), 0)
    # And the other way round.
    train = nn.BatchNorm(3)
    train(x, use_running_average=True)
    np.testing.assert_array_equal(np.asarray(train.mean.value), np.zeros(3))


def test_batchnorm_wrong_feature_count():
    bn = nn.BatchNorm(3)
    with pytest.raises(ValueError) as info:
        bn(jnp.ones((4, 5)))
    message = str(info.value)
    assert "3 features" in message and "(4, 5)" in message
    assert "num_features=5" in message
    with pytest.raises(ValueError):
        bn(jnp.array(1.0))


def test_batchnorm_on_images():
    x = rand(0, *IMG) * 2 + 1
    bn = nn.BatchNorm(3, momentum=0.0)
    y = np.asarray(bn(x))
    assert y.shape == x.shape
    want, mean, var = bn_numpy(x, (0, 1, 2))
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(bn.mean.value), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(bn.var.value), var, rtol=1e-4)


def test_batchnorm_axis_name_under_vmap():
    x = rand(0, *IMG) * 2 + 1
    bn = nn.BatchNorm(3, axis_name="b")
    # Passed in (not closed over): updating a closed-over Variable inside a
    # transform is an error (see test_transforms_errors.py).
    y = jax.vmap(lambda bn, xi: bn(xi), in_axes=(None, 0), axis_name="b")(bn, x)
    assert y.shape == x.shape
    ref = nn.BatchNorm(3)
    want = ref(x)  # statistics over the vmapped axis and the others
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(y), bn_numpy(x, (0, 1, 2))[0], rtol=1e-4, atol=1e-4)
    # Per-example statistics (what vmap without axis_name computes) differ.
    per_example = np.stack([bn_numpy(xi, (0, 1))[0] for xi in x])
    assert not np.allclose(per_example, np.asarray(y), atol=1e-3)


def test_batchnorm_is_accurate_far_from_zero():
    # A large common offset must not destroy the variance (no E[x^2] - E[x]^2 cancellation).
    x = rand(7, *B) + 1000.0
    bn = nn.BatchNorm(3)
    y = np.asarray(bn(x))
    x64 = x.astype(np.float64)
    want = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-5)
    np.testing.assert_allclose(y, want, atol=2e-3)
