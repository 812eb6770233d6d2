"""Tests for the normalisation layers: LayerNorm, RMSNorm, GroupNorm, and BatchNorm parity.

Each layer is compared with a float64 numpy reference and with the matching
``flax.nnx`` layer given the same weights.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rand
from flax import nnx

import toylib as tl
from toylib import nn

# A few fixed shapes, shared by the tests: every new shape costs an XLA compile.
X = (2, 3, 5)  # LayerNorm / RMSNorm inputs: 5 features (odd), 3 on axis 1
IMG = (4, 3, 4, 6)  # GroupNorm inputs: batch 4, 3x4 image, 6 channels
SEQ = (4, 5, 6)  # GroupNorm inputs with one spatial axis
B = (8, 3)  # BatchNorm inputs: 3 features
BN_IMG = (2, 4, 5, 3)  # BatchNorm images
BF16 = jnp.bfloat16


# Layers are applied under jit: one compile per configuration costs less than
# eager mode's one compile per operation.
run = tl.jit(lambda layer, x: layer(x))
run_ref = nnx.jit(lambda layer, x: layer(x))


def close(got, want, tol=1e-5):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol)


def as_tuple(axes):
    return (axes,) if isinstance(axes, int) else tuple(axes)


def feature_shape(shape, feature_axes):
    axes = {a % len(shape) for a in as_tuple(feature_axes)}
    return tuple(n if i in axes else 1 for i, n in enumerate(shape))


def norm_numpy(x, reduce, feature_axes, scale=None, bias=None, eps=1e-6, centre=True):
    """LayerNorm (``centre=True``) or RMSNorm (False), in float64."""
    x = x.astype(np.float64)
    reduce = as_tuple(reduce)
    if centre:
        x = x - x.mean(reduce, keepdims=True)
    y = x / np.sqrt((x**2).mean(reduce, keepdims=True) + eps)
    shape = feature_shape(x.shape, feature_axes)
    if scale is not None:
        y = y * np.asarray(scale, np.float64).reshape(shape)
    if bias is not None:
        y = y + np.asarray(bias, np.float64).reshape(shape)
    return y


def group_norm_numpy(x, groups, spatial, scale=None, bias=None, eps=1e-6):
    """GroupNorm in float64: statistics over the ``spatial`` axes before the channels."""
    x = x.astype(np.float64)
    grouped = x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)
    reduce = (*range(x.ndim - 1 - spatial, x.ndim - 1), x.ndim)
    centred = grouped - grouped.mean(reduce, keepdims=True)
    y = (centred / np.sqrt((centred**2).mean(reduce, keepdims=True) + eps)).reshape(x.shape)
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return y


def randomize(layer, seed, ref=None):
    """Random scale/bias on a toylib layer (and the same on an nnx one); returns them."""
    values = {}
    for i, name in enumerate(("scale", "bias")):
        if getattr(layer, name, None) is not None:
            values[name] = rand(seed + i, layer.num_features)
            setattr(layer, name, values[name])
            if ref is not None:
                getattr(ref, name)[...] = jnp.asarray(values[name])
    return values.get("scale"), values.get("bias")


# (reduction_axes, feature_axes, num_features) on X = (2, 3, 5).
LAST = (-1, -1, 5)
REDUCE12 = ((1, 2), -1, 5)  # statistics over two axes, per-feature scale on the last
BOTH12 = ((1, 2), (1, 2), 15)  # two feature axes: 15 parameters, reshaped to (3, 5)
AXIS1 = (1, 1, 3)  # a middle axis
# (axes, use_scale, use_bias): each option with and without the others, not
# the full product (every configuration costs two compiles).
LN_CASES = [
    pytest.param(LAST, True, True, id="last-sb"),
    pytest.param(LAST, False, False, id="last-none"),
    pytest.param(REDUCE12, True, True, id="reduce12-sb"),
    pytest.param(BOTH12, False, True, id="both12-b"),
    pytest.param(AXIS1, True, False, id="axis1-s"),
]
RMS_CASES = [
    pytest.param(LAST, True, id="last-scale"),
    pytest.param(LAST, False, id="last-noscale"),
    pytest.param(BOTH12, True, id="both12-scale"),
    pytest.param(AXIS1, True, id="axis1-scale"),
]


# -- LayerNorm ---------------------------------------------------------------------------------


@pytest.mark.parametrize("axes, use_scale, use_bias", LN_CASES)
def test_layernorm_matches_numpy_and_nnx(axes, use_scale, use_bias):
    reduce, features, n = axes
    kwargs = dict(
        use_scale=use_scale, use_bias=use_bias, reduction_axes=reduce, feature_axes=features
    )
    layer = nn.LayerNorm(n, **kwargs)
    ref = nnx.LayerNorm(n, use_fast_variance=False, rngs=nnx.Rngs(0), **kwargs)
    scale, bias = randomize(layer, 1, ref)
    assert (layer.scale is None) != use_scale and (layer.bias is None) != use_bias
    x = rand(0, *X) * 2 + 1
    y = run(layer, x)
    assert y.shape == X and y.dtype == jnp.float32
    want = norm_numpy(x, reduce, features, scale, bias)
    close(y, want)
    close(y, np.asarray(run_ref(ref, x), np.float64))


@pytest.mark.parametrize("batch", [(), (3,), (2, 3)], ids=["none", "one", "two"])
def test_layernorm_any_leading_batch_dims(batch):
    layer = nn.LayerNorm(5)
    scale, bias = randomize(layer, 1)
    x = rand(0, 2, 3, 5)[(0,) * (2 - len(batch))]
    assert x.shape == (*batch, 5)
    close(run(layer, x), norm_numpy(x, -1, -1, scale, bias))


def test_layernorm_defaults_and_params():
    layer = nn.LayerNorm(5)
    assert layer.epsilon == 1e-6  # Flax's default, not PyTorch's 1e-5
    assert isinstance(layer.scale, tl.Param) and isinstance(layer.bias, tl.Param)
    np.testing.assert_array_equal(np.asarray(layer.scale.value), np.ones(5))
    np.testing.assert_array_equal(np.asarray(layer.bias.value), np.zeros(5))
    assert set(tl.state(layer, tl.Param).flat()) == {("scale",), ("bias",)}
    # epsilon is used: with a tiny spread a large epsilon shrinks the output.
    x = rand(0, *X) * 1e-2
    big = nn.LayerNorm(5, epsilon=1e-2)
    y = run(big, x)
    close(y, norm_numpy(x, -1, -1, eps=1e-2))
    assert np.abs(np.asarray(y)).max() < 0.5
    # Integer inputs without parameters still give floats.
    ints = np.arange(5)
    y = nn.LayerNorm(5, use_scale=False, use_bias=False)(ints)
    assert y.dtype == jnp.float32
    close(y, norm_numpy(ints, -1, -1))


def test_layernorm_custom_init_and_param_dtype():
    def init(key, shape, dtype):
        return jax.random.uniform(key, shape, dtype, 2.0, 3.0)

    layer = nn.LayerNorm(5, scale_init=init, bias_init=init, param_dtype=BF16, rngs=0)
    assert layer.scale.value.dtype == BF16 and layer.bias.value.dtype == BF16
    scale = np.asarray(layer.scale.value, np.float32)
    bias = np.asarray(layer.bias.value, np.float32)
    assert ((scale >= 2) & (scale <= 3)).all()
    assert not np.array_equal(scale, bias)  # two keys drawn from rngs.params
    # The same seed gives the same parameters.
    again = nn.LayerNorm(5, scale_init=init, bias_init=init, param_dtype=BF16, rngs=0)
    np.testing.assert_array_equal(np.asarray(again.scale.value, np.float32), scale)
    # bf16 params, float32 input: promoted to float32.
    x = rand(0, *X)
    y = run(layer, x)
    assert y.dtype == jnp.float32
    close(y, norm_numpy(x, -1, -1, scale, bias), tol=1e-4)


def test_layernorm_bf16_compute_keeps_float32_params():
    layer = nn.LayerNorm(5, dtype=BF16)
    ref = nnx.LayerNorm(5, dtype=BF16, use_fast_variance=False, rngs=nnx.Rngs(0))
    scale, bias = randomize(layer, 1, ref)
    x = rand(0, *X) * 3 + 2
    y = run(layer, x)
    assert y.dtype == BF16
    assert layer.scale.value.dtype == jnp.float32 and layer.bias.value.dtype == jnp.float32
    close(y, norm_numpy(x, -1, -1, scale, bias), tol=5e-2)
    close(y, np.asarray(run_ref(ref, x), np.float64), tol=2e-2)
    # bf16 input, default dtype: promoted with the float32 params.
    assert nn.LayerNorm(5)(jnp.asarray(x, BF16)).dtype == jnp.float32


# bf16 has a spacing of 8 around 1024: the mean 1028.8 of these rounds to
# 1032 in bf16, and the centred values go wrong.
NEAR_1024 = [[1024.0, 1032.0, 1032.0, 1032.0, 1024.0]] * 2
# float16 overflows above 65504: the squares of these are inf in float16.
OVER_F16 = [[300.0, 400.0, -500.0, 300.0, 200.0]] * 2
PLAIN = {"use_scale": False, "use_bias": False}


@pytest.mark.parametrize(
    "make, data, dtype, centre",
    [
        pytest.param(lambda: nn.LayerNorm(5, **PLAIN), NEAR_1024, BF16, True, id="layer-bf16"),
        pytest.param(lambda: nn.LayerNorm(5, **PLAIN), OVER_F16, jnp.float16, True, id="layer-f16"),
        pytest.param(
            lambda: nn.RMSNorm(5, use_scale=False), OVER_F16, jnp.float16, False, id="rms"
        ),
        pytest.param(
            lambda: nn.GroupNorm(5, num_groups=1, **PLAIN), NEAR_1024, BF16, True, id="group"
        ),
    ],
)
def test_half_precision_input_statistics_are_float32(make, data, dtype, centre):
    x = jnp.asarray(data, dtype)
    y = make()(x)
    assert y.dtype == dtype
    want = norm_numpy(np.asarray(x, np.float64), -1, -1, centre=centre)
    close(y, want, tol=2e-2)


def test_layernorm_is_accurate_far_from_zero():
    x = rand(7, *X) + 1000.0
    y = nn.LayerNorm(5)(x)
    np.testing.assert_allclose(np.asarray(y), norm_numpy(x, -1, -1), atol=2e-3)


def test_layernorm_grad_under_jit():
    layer = nn.LayerNorm(5)
    scale, bias = randomize(layer, 1)
    x, t = rand(0, *X), rand(3, *X)

    def loss(m, x):
        return jnp.sum(m(x) * t)

    grads, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(layer, x)
    normed = norm_numpy(x, -1, -1)
    close(grads.scale.value, (normed * t).sum((0, 1)), tol=1e-4)
    close(grads.bias.value, t.sum((0, 1)), tol=1e-4)
    # d/dx (through the mean and variance) against a central difference
    # along a random direction.
    d = rand(4, *X) * 1e-2
    x64 = x.astype(np.float64)

    def f64(x):
        return (norm_numpy(x, -1, -1, scale, bias) * t).sum()

    central = (f64(x64 + d) - f64(x64 - d)) / 2
    got = (np.asarray(gx, np.float64) * d).sum()
    np.testing.assert_allclose(got, central, rtol=1e-3, atol=1e-5)


def test_layernorm_wrong_feature_size_is_a_clear_error():
    layer = nn.LayerNorm(5)
    with pytest.raises(ValueError) as info:
        layer(jnp.ones((2, 4)))
    message = str(info.value)
    assert "(..., 5)" in message and "(2, 4)" in message  # expected and received
    assert "num_features=4" in message and "LayerNorm" in message
    # Several feature axes: the product is checked.
    both = nn.LayerNorm(15, reduction_axes=(1, 2), feature_axes=(1, 2))
    with pytest.raises(ValueError) as info:
        both(jnp.ones((2, 3, 4)))
    message = str(info.value)
    assert "(2, 3, 4)" in message and "num_features=15" in message and "num_features=12" in message
    # An axis the input does not have.
    with pytest.raises(ValueError, match=r"reduction_axes=\(1, 2\) is out of range.*\(5,\)"):
        nn.LayerNorm(5, reduction_axes=(1, 2))(jnp.ones(5))


def test_layernorm_path_in_error():
    model = nn.Sequential(nn.LayerNorm(5), nn.LayerNorm(4))
    with pytest.raises(ValueError, match=r"model\.layers\[1\] \(LayerNorm\)"):
        model(jnp.ones((2, 5)))


# -- RMSNorm -----------------------------------------------------------------------------------


@pytest.mark.parametrize("axes, use_scale", RMS_CASES)
def test_rmsnorm_matches_numpy_and_nnx(axes, use_scale):
    reduce, features, n = axes
    kwargs = dict(use_scale=use_scale, reduction_axes=reduce, feature_axes=features)
    layer = nn.RMSNorm(n, **kwargs)
    ref = nnx.RMSNorm(n, use_fast_variance=False, rngs=nnx.Rngs(0), **kwargs)
    scale, _ = randomize(layer, 1, ref)
    x = rand(0, *X) * 2 + 1
    y = run(layer, x)
    assert y.shape == X and y.dtype == jnp.float32
    want = norm_numpy(x, reduce, features, scale, centre=False)
    close(y, want)
    close(y, np.asarray(run_ref(ref, x), np.float64))
    # Not centred: differs from LayerNorm on these inputs (mean about 1).
    assert not np.allclose(want, norm_numpy(x, reduce, features, scale), atol=0.1)


def test_rmsnorm_params_bf16_and_batch_dims():
    layer = nn.RMSNorm(5)
    assert layer.epsilon == 1e-6
    assert set(tl.state(layer, tl.Param).flat()) == {("scale",)}
    assert not hasattr(layer, "bias")
    x = rand(0, *X)
    close(run(layer, x[0, 0]), norm_numpy(x[0, 0], -1, -1, centre=False))  # no batch dims
    low = nn.RMSNorm(5, dtype=BF16)
    ref = nnx.RMSNorm(5, dtype=BF16, rngs=nnx.Rngs(0))
    scale, _ = randomize(low, 1, ref)
    y = run(low, x)
    assert y.dtype == BF16 and low.scale.value.dtype == jnp.float32
    close(y, norm_numpy(x, -1, -1, scale, centre=False), tol=5e-2)
    close(y, np.asarray(run_ref(ref, x), np.float64), tol=2e-2)
    assert nn.RMSNorm(5, param_dtype=BF16).scale.value.dtype == BF16


def test_rmsnorm_custom_init_grad_and_shape_error():
    layer = nn.RMSNorm(5, scale_init=jax.nn.initializers.normal(1.0), rngs=1)
    scale = np.asarray(layer.scale.value)
    assert not np.allclose(scale, 1.0)
    x = rand(0, *X)
    close(run(layer, x), norm_numpy(x, -1, -1, scale, centre=False))
    grads = jax.jit(jax.grad(lambda m: m(x).sum()))(layer)
    close(grads.scale.value, norm_numpy(x, -1, -1, centre=False).sum((0, 1)), tol=1e-4)
    with pytest.raises(ValueError) as info:
        layer(jnp.ones((3, 6)))
    assert "(..., 5)" in str(info.value) and "(3, 6)" in str(info.value)


# -- GroupNorm ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "groups, use_scale, use_bias",
    [(1, False, False), (2, True, True), (3, True, False), (6, True, True)],
)
def test_groupnorm_matches_numpy_and_nnx(groups, use_scale, use_bias):
    kwargs = dict(num_groups=groups, use_scale=use_scale, use_bias=use_bias)
    layer = nn.GroupNorm(6, **kwargs)
    ref = nnx.GroupNorm(6, use_fast_variance=False, rngs=nnx.Rngs(0), **kwargs)
    scale, bias = randomize(layer, 1, ref)
    x = rand(0, *IMG) * 2 + 1
    y = run(layer, x)
    assert y.shape == IMG and y.dtype == jnp.float32
    want = group_norm_numpy(x, groups, 2, scale, bias)
    close(y, want)
    close(y, np.asarray(run_ref(ref, x), np.float64))


def test_groupnorm_one_spatial_axis_and_group_size():
    layer = nn.GroupNorm(6, num_groups=None, group_size=3)
    assert layer.num_groups == 2 and layer.group_size == 3
    ref = nnx.GroupNorm(6, num_groups=None, group_size=3, use_fast_variance=False, rngs=nnx.Rngs(0))
    scale, bias = randomize(layer, 1, ref)
    x = rand(0, *SEQ)
    want = group_norm_numpy(x, 2, 1, scale, bias)
    close(run(layer, x), want)
    close(run_ref(ref, x), want)
    # A consistent num_groups with group_size is accepted.
    assert nn.GroupNorm(6, num_groups=2, group_size=3).num_groups == 2
    assert nn.GroupNorm(64, group_size=2).num_groups == 32  # 32 groups of 2


def test_groupnorm_num_spatial_allows_any_batch_dims_and_vmap():
    layer = nn.GroupNorm(6, num_groups=3, num_spatial=2)
    scale, bias = randomize(layer, 1)
    x = rand(0, *IMG)
    want = group_norm_numpy(x, 3, 2, scale, bias)
    close(run(layer, x), want)  # one batch axis: as with the default
    close(run(layer, x[0]), want[0])  # no batch axis: one image
    several = x.reshape(2, 2, *IMG[1:])
    close(run(layer, several), want.reshape(several.shape))
    # Under vmap the layer sees one image at a time: same result.
    close(tl.vmap(lambda m, xi: m(xi), in_axes=(None, 0))(layer, x), want)
    # The default (first axis is the batch) would treat H as the batch there.
    default = nn.GroupNorm(6, num_groups=3)
    randomize(default, 1)
    assert not np.allclose(np.asarray(run(default, x[0])), want[0], atol=1e-2)


def test_groupnorm_num_spatial_zero_normalises_each_vector():
    layer = nn.GroupNorm(6, num_groups=2, num_spatial=0)
    x = rand(0, *SEQ)
    close(run(layer, x), group_norm_numpy(x, 2, 0))
    close(run(layer, x[0, 0]), group_norm_numpy(x[0, 0], 2, 0))  # (C,): no batch


def test_groupnorm_special_cases():
    x = rand(0, *IMG) * 3 - 1
    # One group: LayerNorm over every non-batch axis.
    one = nn.GroupNorm(6, num_groups=1)
    layer = nn.LayerNorm(6, reduction_axes=(1, 2, 3))
    close(run(one, x), np.asarray(run(layer, x), np.float64))
    # One channel per group: instance normalisation (per image and channel).
    inst = nn.GroupNorm(6, num_groups=6)
    x64 = x.astype(np.float64)
    mean, var = x64.mean((1, 2), keepdims=True), x64.var((1, 2), keepdims=True)
    close(run(inst, x), (x64 - mean) / np.sqrt(var + 1e-6))


def test_groupnorm_defaults_dtypes_init_grad():
    layer = nn.GroupNorm(64)
    assert layer.num_groups == 32 and layer.group_size == 2 and layer.epsilon == 1e-6
    assert set(tl.state(layer, tl.Param).flat()) == {("scale",), ("bias",)}
    low = nn.GroupNorm(6, num_groups=3, dtype=BF16)
    ref = nnx.GroupNorm(6, num_groups=3, dtype=BF16, rngs=nnx.Rngs(0))
    scale, bias = randomize(low, 1, ref)
    x = rand(0, *IMG)
    y = run(low, x)
    assert y.dtype == BF16 and low.scale.value.dtype == jnp.float32
    close(y, group_norm_numpy(x, 3, 2, scale, bias), tol=5e-2)
    close(y, np.asarray(run_ref(ref, x), np.float64), tol=2e-2)
    stored = nn.GroupNorm(6, num_groups=3, param_dtype=BF16)
    assert stored.scale.value.dtype == BF16 and stored.bias.value.dtype == BF16
    full = nn.GroupNorm(6, num_groups=3, scale_init=jax.nn.initializers.normal(1.0), rngs=0)
    scale = np.asarray(full.scale.value)
    assert not np.allclose(scale, 1.0)

    def loss(m):
        y = m(x)
        return (y * y).sum() / 2, y

    grads, y = jax.jit(jax.grad(loss, has_aux=True))(full)
    want = group_norm_numpy(x, 3, 2, scale)
    close(y, want)
    normed = group_norm_numpy(x, 3, 2)
    close(grads.scale.value, (want * normed).sum((0, 1, 2)), tol=1e-4)
    close(grads.bias.value, want.sum((0, 1, 2)), tol=1e-4)


def test_groupnorm_construction_errors():
    with pytest.raises(ValueError) as info:
        nn.GroupNorm(6)  # default 32 groups
    message = str(info.value)
    assert "num_groups=32" in message and "1, 2, 3, 6" in message
    with pytest.raises(ValueError, match="divisors of 6: 1, 2, 3, 6"):
        nn.GroupNorm(6, num_groups=4)
    with pytest.raises(ValueError, match="groups of 4"):
        nn.GroupNorm(6, num_groups=None, group_size=4)
    with pytest.raises(ValueError, match="num_groups=None, group_size=3"):
        nn.GroupNorm(6, num_groups=3, group_size=3)
    with pytest.raises(ValueError, match="both None"):
        nn.GroupNorm(6, num_groups=None)
    with pytest.raises(ValueError, match="num_spatial"):
        nn.GroupNorm(6, num_groups=3, num_spatial=-1)


def test_groupnorm_input_shape_errors():
    layer = nn.GroupNorm(6, num_groups=3)
    with pytest.raises(ValueError) as info:
        layer(jnp.ones((4, 3, 4, 5)))
    message = str(info.value)
    assert "(..., 6)" in message and "(4, 3, 4, 5)" in message and "num_features=5" in message
    with pytest.raises(ValueError, match=r"at least 2 axes.*\(6,\)(.|\n)*num_spatial=0"):
        layer(jnp.ones(6))
    spatial = nn.GroupNorm(6, num_groups=3, num_spatial=2)
    with pytest.raises(ValueError) as info:
        spatial(jnp.ones((4, 6)))
    assert "(*batch, s0, s1, 6)" in str(info.value) and "(4, 6)" in str(info.value)


# -- BatchNorm parity --------------------------------------------------------------------------


@pytest.mark.parametrize("shape, axis", [(B, -1), ((2, 3, 4, 5), 1)], ids=["vec", "axis1"])
def test_batchnorm_matches_nnx_train_then_eval(shape, axis):
    # Both use running = momentum * running + (1 - momentum) * batch.
    layer = nn.BatchNorm(3, axis=axis, momentum=0.8)
    ref = nnx.BatchNorm(3, axis=axis, momentum=0.8, use_fast_variance=False, rngs=nnx.Rngs(0))
    randomize(layer, 1, ref)
    for step in range(3):
        x = rand(step, *shape) * (step + 1) + step
        close(run(layer, x), np.asarray(run_ref(ref, x), np.float64), tol=1e-4)
        close(layer.mean.value, np.asarray(ref.mean[...], np.float64))
        close(layer.var.value, np.asarray(ref.var[...], np.float64))
    layer.eval()
    ref.eval()
    x = rand(9, *shape) * 2 - 1
    close(run(layer, x), np.asarray(run_ref(ref, x), np.float64))
    close(layer.mean.value, np.asarray(ref.mean[...], np.float64))  # unchanged by eval


def test_batchnorm_bf16_matches_nnx():
    layer = nn.BatchNorm(3, dtype=BF16, momentum=0.5)
    ref = nnx.BatchNorm(3, dtype=BF16, momentum=0.5, use_fast_variance=False, rngs=nnx.Rngs(0))
    randomize(layer, 1, ref)
    x = rand(0, *B) * 2 + 1
    y = run(layer, x)
    assert y.dtype == BF16 and layer.mean.value.dtype == jnp.float32
    close(y, np.asarray(run_ref(ref, x), np.float64), tol=5e-2)
    # Both take the statistics from the input rounded to bf16, in float32.
    close(layer.mean.value, np.asarray(ref.mean[...], np.float64), tol=1e-6)
    close(layer.mean.value, 0.5 * x.mean(0), tol=1e-2)


def test_batchnorm_axis_name_under_tl_vmap_equals_whole_batch():
    sharded = nn.BatchNorm(3, axis_name="batch", momentum=0.5)
    whole = nn.BatchNorm(3, momentum=0.5)
    randomize(sharded, 1)
    randomize(whole, 1)

    @tl.vmap(in_axes=(None, 0), axis_name="batch")
    def apply(bn, xi):
        return bn(xi)

    for step in range(2):
        x = rand(step, *BN_IMG) + step
        close(apply(sharded, x), np.asarray(run(whole, x), np.float64), tol=1e-4)
        close(sharded.mean.value, np.asarray(whole.mean.value, np.float64))
        close(sharded.var.value, np.asarray(whole.var.value, np.float64))
    # Under tl.jit too, then in evaluation mode (no collective needed).
    x = rand(5, *BN_IMG)
    close(tl.jit(apply)(sharded, x), np.asarray(run(whole, x), np.float64), tol=1e-4)
    close(sharded.var.value, np.asarray(whole.var.value, np.float64))
    sharded.eval()
    whole.eval()
    close(apply(sharded, x), np.asarray(run(whole, x), np.float64), tol=1e-4)
