"""Tests for Conv and ConvTranspose: parity with numpy references and flax.nnx."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import np_init, rand
from flax import nnx

import toylib as tl
from toylib import nn

TOL = {"rtol": 1e-5, "atol": 1e-5}
CIN = 4  # input channels everywhere: divisible by the group counts used (2, 4)
# A few fixed spatial shapes, shared by the tests: every new shape costs an XLA compile.
SPATIAL = {1: (7,), 2: (5, 7), 3: (3, 4, 5)}
BATCHES = [(), (3,), (2, 3)]


def make_conv(*args, **kwargs):
    kwargs = {"kernel_init": np_init(0), "bias_init": np_init(7), "rngs": 0, **kwargs}
    return nn.Conv(*args, **kwargs)


def make_transpose(*args, **kwargs):
    kwargs = {"kernel_init": np_init(0), "bias_init": np_init(7), "rngs": 0, **kwargs}
    return nn.ConvTranspose(*args, **kwargs)


# -- numpy references -------------------------------------------------------------------------


def dilate(x, factors):
    """Insert ``f - 1`` zeros between elements along spatial axes 1..n of ``x``."""
    shape = [
        x.shape[0],
        *[(s - 1) * f + 1 for s, f in zip(x.shape[1:-1], factors, strict=True)],
        x.shape[-1],
    ]
    out = np.zeros(shape, x.dtype)
    out[(slice(None), *[slice(None, None, f) for f in factors])] = x
    return out


def np_conv(x, kernel, strides, padding, input_dilation, kernel_dilation, groups):
    """Direct n-d cross-correlation of ``(batch, *spatial, in)`` with ``(*k, in/g, out)``.

    One loop over kernel taps; each tap is a strided slice times a per-group matrix.
    """
    n = kernel.ndim - 2
    ks = kernel.shape[:n]
    kd = [(k - 1) * d + 1 for k, d in zip(ks, kernel_dilation, strict=True)]
    if padding == "CIRCULAR":  # wrap the undilated input, then no padding
        x = np.pad(x, [(0, 0), *[((k - 1) // 2, k // 2) for k in kd], (0, 0)], mode="wrap")
        padding = "VALID"
    x = dilate(x, input_dilation)
    sizes = x.shape[1:-1]
    if padding == "VALID":
        pads = [(0, 0)] * n
    elif padding == "SAME":  # out = ceil(size / stride); the odd pad element goes last
        pads = []
        for size, k, s in zip(sizes, kd, strides, strict=True):
            out = -(-size // s)
            total = max((out - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
    else:
        pads = padding
    x = np.pad(x, [(0, 0), *pads, (0, 0)])
    outs = [(size - k) // s + 1 for size, k, s in zip(x.shape[1:-1], kd, strides, strict=True)]
    cin, cout = kernel.shape[-2] * groups, kernel.shape[-1]
    y = np.zeros((x.shape[0], *outs, cout), np.float64)
    for tap in itertools.product(*[range(k) for k in ks]):
        window = tuple(
            slice(t * d, t * d + (o - 1) * s + 1, s)
            for t, d, o, s in zip(tap, kernel_dilation, outs, strides, strict=True)
        )
        patch = x[(slice(None), *window)].reshape(*x.shape[:1], *outs, groups, cin // groups)
        w = kernel[tap].reshape(cin // groups, groups, cout // groups)
        y += np.einsum("...gi,igo->...go", patch, w).reshape(y.shape)
    return y


def np_conv_transpose(x, kernel, strides, padding, kernel_dilation):
    """Scatter definition: ``x[i] @ kernel[t]`` lands on ``i * s + (k - 1 - t) * d`` (VALID),

    then each axis is cropped/extended to the requested padding: a lax-style
    ``(low, high)`` padding of the zero-interleaved input moves the start by
    ``k' - 1 - low``.
    """
    n = kernel.ndim - 2
    ks = kernel.shape[:n]
    kd = [(k - 1) * d + 1 for k, d in zip(ks, kernel_dilation, strict=True)]
    sizes = x.shape[1:-1]
    full_sizes = [(size - 1) * s + k for size, s, k in zip(sizes, strides, kd, strict=True)]
    full = np.zeros((x.shape[0], *full_sizes, kernel.shape[-1]), np.float64)
    for tap in itertools.product(*[range(k) for k in ks]):
        where = tuple(
            slice((k - 1 - t) * d, (k - 1 - t) * d + (size - 1) * s + 1, s)
            for t, k, d, size, s in zip(tap, ks, kernel_dilation, sizes, strides, strict=True)
        )
        full[(slice(None), *where)] += x @ kernel[tap]
    if padding == "VALID":  # every scattered tap kept
        pads = [(k - 1, s - 1 + max(k - s, 0)) for s, k in zip(strides, kd, strict=True)]
    elif padding == "SAME":  # output size * stride; lax centres the kernel like this
        lows = [
            k - 1 if s > k - 1 else -(-(k + s - 2) // 2) for s, k in zip(strides, kd, strict=True)
        ]
        pads = [(lo, k + s - 2 - lo) for lo, s, k in zip(lows, strides, kd, strict=True)]
    else:
        pads = padding
    margin = 16
    full = np.pad(full, [(0, 0), *[(margin, margin)] * n, (0, 0)])
    crop = tuple(
        slice(margin + k - 1 - lo, margin + k - 1 - lo + (size - 1) * s + lo + hi - k + 2)
        for size, s, k, (lo, hi) in zip(sizes, strides, kd, pads, strict=True)
    )
    return full[(slice(None), *crop)]


# Parity cases run jitted: one compile per case instead of one per eager op.
call = tl.jit(lambda layer, x: layer(x))


def per_axis(v, n):
    """An int or a sequence as ``n`` ints."""
    return (v,) * n if isinstance(v, int) else tuple(v)


def as_pairs(padding, n):
    """Any accepted padding as the references want it: a mode name or (low, high) pairs."""
    if isinstance(padding, str):
        return padding
    if isinstance(padding, int):
        return [(padding, padding)] * n
    return [p if isinstance(p, tuple) else (p, p) for p in padding]


def test_numpy_conv_reference_against_lax():
    """The reference itself agrees with lax.conv_general_dilated on a mixed case."""
    x, w = rand(0, 2, 5, 7, CIN), rand(1, 3, 2, CIN // 2, 6)
    want = jax.lax.conv_general_dilated(
        x,
        w,
        (2, 1),
        ((1, 2), (0, 1)),
        lhs_dilation=(1, 2),
        rhs_dilation=(2, 1),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=2,
    )
    got = np_conv(x, w, (2, 1), ((1, 2), (0, 1)), (1, 2), (2, 1), 2)
    np.testing.assert_allclose(got, np.asarray(want), **TOL)


# -- Conv -------------------------------------------------------------------------------------

# (kernel_size, strides, padding, input_dilation, kernel_dilation, groups, out, use_bias)
CONV_CASES = {
    "1d-same": (3, 1, "SAME", 1, 1, 1, 6, True),
    "1d-even-kernel-stride2-valid": ((4,), 2, "VALID", 1, 1, 1, 6, True),
    "1d-pairs-kdil2-nobias": (3, 1, [(2, 1)], 1, 2, 1, 6, False),
    "1d-stride3-same-idil2": (2, 3, "SAME", 2, 1, 1, 6, True),
    "1d-circular": (3, 1, "CIRCULAR", 1, 1, 1, 6, True),
    "2d-same": ((3, 3), 1, "SAME", 1, 1, 1, 6, True),
    "2d-valid-strides-groups2": ((3, 2), (2, 1), "VALID", 1, 1, 2, 6, True),
    "2d-same-stride2-kdil": ((3, 3), 2, "SAME", 1, (2, 1), 1, 6, False),
    "2d-int-padding": ((2, 3), 1, 1, 1, 1, 1, 6, True),
    "2d-pairs-idil": ((3, 3), 1, [(1, 0), (2, 2)], (2, 1), 1, 1, 6, True),
    "2d-mixed-int-and-pair": ((3, 3), (1, 2), [1, (0, 2)], 1, 1, 1, 6, True),
    "2d-depthwise": ((3, 3), 1, "SAME", 1, 1, CIN, 2 * CIN, True),
    "2d-circular-stride2-kdil": ((2, 3), 2, "CIRCULAR", 1, (1, 2), 1, 6, True),
    "3d-same-strides": ((2, 3, 2), (1, 2, 1), "SAME", 1, 1, 1, 6, True),
    "3d-valid-groups2-nobias": ((3, 3, 3), 1, "VALID", 1, 1, 2, 6, False),
    "3d-pairs-kdil": ((2, 2, 2), 1, [(1, 1), (0, 2), (1, 0)], 1, (1, 2, 2), 1, 6, True),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_matches_numpy_and_nnx(case):
    ks, strides, padding, idil, kdil, groups, out, use_bias = CONV_CASES[case]
    n = 1 if isinstance(ks, int) else len(ks)
    conv = make_conv(
        CIN,
        out,
        ks,
        strides,
        padding=padding,
        input_dilation=idil,
        kernel_dilation=kdil,
        feature_group_count=groups,
        use_bias=use_bias,
        bias_init=np_init(7),
        rngs=0,
    )
    kernel = np.asarray(conv.kernel.value)
    assert kernel.shape == (*per_axis(ks, n), CIN // groups, out)
    x = rand(1, 2, *SPATIAL[n], CIN)
    y = np.asarray(call(conv, x))
    pads = as_pairs(padding, n)
    want = np_conv(
        x, kernel, per_axis(strides, n), pads, per_axis(idil, n), per_axis(kdil, n), groups
    )
    if use_bias:
        want = want + rand(7, out)
    assert y.shape == want.shape
    np.testing.assert_allclose(y, want, **TOL)

    if isinstance(padding, str) and padding != "CIRCULAR" and idil != 1:
        return  # nnx.Conv passes the string to lax, which rejects it with input dilation
    ref = nnx.Conv(
        CIN,
        out,
        ks,
        strides,
        padding=padding,
        input_dilation=idil,
        kernel_dilation=kdil,
        feature_group_count=groups,
        use_bias=use_bias,
        kernel_init=np_init(99),
        bias_init=np_init(99),
        rngs=nnx.Rngs(0),
    )
    ref.kernel[...] = conv.kernel.value
    if use_bias:
        ref.bias[...] = conv.bias.value
    np.testing.assert_allclose(y, np.asarray(jax.jit(lambda x: ref(x))(x)), **TOL)


def test_conv_is_cross_correlation_by_hand():
    conv = make_conv(1, 1, 3, padding="VALID", use_bias=False, rngs=0)
    conv.kernel = jnp.array([1.0, 0.0, -1.0]).reshape(3, 1, 1)
    x = jnp.array([1.0, 2.0, 4.0, 8.0]).reshape(4, 1)
    # y[i] = x[i] * 1 + x[i + 1] * 0 + x[i + 2] * (-1): the kernel is not flipped.
    assert conv(x)[:, 0].tolist() == [-3.0, -6.0]
    conv.padding = "SAME"  # pads one zero on each side
    assert conv(x)[:, 0].tolist() == [-2.0, -3.0, -6.0, 4.0]


@pytest.mark.parametrize("batch", BATCHES, ids=["none", "one", "two"])
def test_conv_leading_batch_dims(batch):
    conv = make_conv(CIN, 6, (3, 3), 2, bias_init=np_init(3), rngs=0)
    x = rand(2, *batch, *SPATIAL[2], CIN)
    y = np.asarray(conv(x))
    assert y.shape == (*batch, 3, 4, 6)
    flat = x.reshape(-1, *SPATIAL[2], CIN)
    want = np_conv(flat, np.asarray(conv.kernel.value), (2, 2), "SAME", (1, 1), (1, 1), 1)
    want = (want + rand(3, 6)).reshape(y.shape)
    np.testing.assert_allclose(y, want, **TOL)


def test_default_init_is_lecun_normal_with_grouped_fan_in():
    # One kernel shape (3, 3, 16, 32) for all, as in the doctests: each new shape
    # compiles a threefry kernel, seconds each on a busy 2-core machine.
    grouped = nn.Conv(64, 32, (3, 3), feature_group_count=4, rngs=0)
    assert grouped.kernel.value.shape == (3, 3, 16, 32)
    assert grouped.bias.value.shape == (32,)
    assert not grouped.bias.value.any()  # zeros by default
    # LeCun normal: variance 1 / fan_in, fan_in = 3 * 3 * (64 // 4) (one group's inputs).
    assert abs(float(grouped.kernel.value.var()) * 3 * 3 * 16 - 1) < 0.1
    # Same seed, same weights (whatever the groups); another seed, other weights.
    same = nn.Conv(16, 32, (3, 3), rngs=tl.Rngs(0))
    np.testing.assert_array_equal(np.asarray(same.kernel.value), np.asarray(grouped.kernel))
    other = nn.Conv(16, 32, (3, 3), rngs=jax.random.key(1))
    assert not np.array_equal(np.asarray(other.kernel.value), np.asarray(same.kernel.value))
    up = nn.ConvTranspose(16, 32, (3, 3), rngs=2)
    assert up.kernel.value.shape == (3, 3, 16, 32)
    assert abs(float(up.kernel.value.var()) * 3 * 3 * 16 - 1) < 0.1
    assert not up.bias.value.any()


def test_conv_params_custom_init_and_no_bias():
    conv = make_conv(CIN, 8, (3, 2), feature_group_count=2)
    assert conv.kernel.value.shape == (3, 2, 2, 8)
    assert conv.bias.value.shape == (8,)
    np.testing.assert_array_equal(np.asarray(conv.kernel.value), rand(0, 3, 2, 2, 8))
    bare = make_conv(CIN, 8, (3, 2), use_bias=False)
    assert bare.bias is None
    assert set(tl.state(bare, tl.Param).flat()) == {("kernel",)}
    assert set(tl.state(conv, tl.Param).flat()) == {("kernel",), ("bias",)}
    custom = nn.Conv(
        CIN,
        3,
        2,
        kernel_init=jax.nn.initializers.ones,
        bias_init=jax.nn.initializers.constant(0.5),
        rngs=0,
    )
    assert custom.kernel.value.shape == (2, CIN, 3)
    np.testing.assert_array_equal(np.asarray(custom.kernel.value), np.ones((2, CIN, 3)))
    np.testing.assert_array_equal(np.asarray(custom.bias.value), np.full(3, 0.5))
    # All ones, no padding: every output is the window's sum plus 0.5.
    x = rand(3, 5, CIN)
    y = nn.Conv(
        CIN,
        3,
        2,
        padding="VALID",
        kernel_init=jax.nn.initializers.ones,
        bias_init=jax.nn.initializers.constant(0.5),
        rngs=0,
    )(x)
    want = (x[:-1].sum(-1) + x[1:].sum(-1))[:, None] + 0.5
    np.testing.assert_allclose(np.asarray(y), np.broadcast_to(want, (4, 3)), **TOL)


def test_conv_bf16_compute_keeps_float32_params():
    conv = make_conv(CIN, 6, (3, 3), dtype=jnp.bfloat16, bias_init=np_init(4), rngs=0)
    x = rand(5, 2, *SPATIAL[2], CIN)
    y = conv(x)
    assert y.dtype == jnp.bfloat16
    assert conv.kernel.value.dtype == jnp.float32
    assert conv.bias.value.dtype == jnp.float32
    want = np_conv(x, np.asarray(conv.kernel.value), (1, 1), "SAME", (1, 1), (1, 1), 1)
    want = want + rand(4, 6)
    np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=5e-2, atol=1e-1)
    # Default dtype promotes: a bf16 input with f32 params computes in f32.
    assert make_conv(CIN, 6, (3, 3), rngs=0)(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.float32


def test_conv_param_dtype():
    conv = make_conv(CIN, 6, (3, 3), param_dtype=jnp.bfloat16, rngs=0)
    assert conv.kernel.value.dtype == jnp.bfloat16
    assert conv.bias.value.dtype == jnp.bfloat16
    assert conv(jnp.ones((2, *SPATIAL[2], CIN))).dtype == jnp.float32


def test_conv_under_jit_and_grad():
    conv = make_conv(CIN, 6, (3, 3), 2, kernel_dilation=(1, 2), bias_init=np_init(2), rngs=0)
    x = rand(6, 2, *SPATIAL[2], CIN)
    t = rand(7, 2, 3, 4, 6)
    np.testing.assert_allclose(
        np.asarray(tl.jit(lambda m, x: m(x))(conv, x)), np.asarray(conv(x)), **TOL
    )

    def loss(model, x):
        return 0.5 * jnp.sum((model(x) - t) ** 2)

    grads = tl.jit(tl.grad(loss))(conv, x)

    # The same loss written with lax directly, differentiated by jax.grad.
    def lax_loss(kernel, bias):
        y = jax.lax.conv_general_dilated(
            x,
            kernel,
            (2, 2),
            "SAME",
            rhs_dilation=(1, 2),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return 0.5 * jnp.sum((y + bias - t) ** 2)

    gk, gb = jax.grad(lax_loss, argnums=(0, 1))(conv.kernel.value, conv.bias.value)
    np.testing.assert_allclose(np.asarray(grads.kernel.value), np.asarray(gk), **TOL)
    np.testing.assert_allclose(np.asarray(grads.bias.value), np.asarray(gb), **TOL)


def test_conv_wrong_feature_size_is_a_clear_error():
    conv = make_conv(CIN, 6, (3, 3), rngs=0)
    with pytest.raises(ValueError) as info:
        conv(jnp.ones((2, 5, 7, 3)))
    message = str(info.value)
    assert "(*batch, s0, s1, 4)" in message  # expected
    assert "(2, 5, 7, 3)" in message  # received
    assert "in_features=3" in message  # the fix
    # Too few axes for two spatial axes plus channels.
    with pytest.raises(ValueError, match=r"at least 3 axes"):
        conv(jnp.ones((7, CIN)))


def test_a_channels_first_input_gets_the_moveaxis_fix():
    conv = make_conv(CIN, 6, (3, 3), rngs=0)
    nchw = jnp.ones((2, CIN, 7, 5))
    with pytest.raises(
        ValueError, match=r"(?s)channels-last.*looks channels-first.*moveaxis\(x, 1, -1\)"
    ):
        conv(nchw)
    assert conv(jnp.moveaxis(nchw, 1, -1)).shape == (2, 7, 5, 6)  # the fix works


def test_conv_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match=r"(?s)feature_group_count=3.*divisible"):
        make_conv(CIN, 6, 3, feature_group_count=3, rngs=0)
    with pytest.raises(ValueError, match=r"Conv\(C, C \* m"):
        make_conv(CIN, 6, 3, feature_group_count=4, rngs=0)  # 6 % 4 != 0
    with pytest.raises(ValueError, match=r"(?s)strides=\(1, 2, 3\).*kernel_size=\(3, 3\) has 2"):
        make_conv(CIN, 6, (3, 3), (1, 2, 3), rngs=0)
    with pytest.raises(ValueError, match=r"kernel_dilation=0"):
        make_conv(CIN, 6, (3, 3), kernel_dilation=0, rngs=0)
    with pytest.raises(ValueError, match=r"(?s)padding='FULL'.*padding=\(\(1, 1\), \(1, 1\)\)"):
        make_conv(CIN, 6, (3, 3), padding="FULL", rngs=0)
    with pytest.raises(ValueError, match=r"padding=\[\(1, 1\)\] is not a padding for 2"):
        make_conv(CIN, 6, (3, 3), padding=[(1, 1)], rngs=0)
    with pytest.raises(ValueError, match=r"kernel_size=\(\)"):
        make_conv(CIN, 6, (), rngs=0)
    with pytest.raises(ValueError, match=r"kernel_size=\(3, -1\)"):
        make_conv(CIN, 6, (3, -1), rngs=0)
    with pytest.raises(ValueError, match=r'(?s)"CIRCULAR", input_dilation=2.*mode="wrap"'):
        make_conv(CIN, 6, (3, 3), padding="CIRCULAR", input_dilation=2)
    # Paddings are canonical (hashable, upper-case) static attributes.
    assert make_conv(CIN, 6, (3, 3), padding="valid", rngs=0).padding == "VALID"
    assert make_conv(CIN, 6, (3, 3), padding=[1, (0, 2)], rngs=0).padding == ((1, 1), (0, 2))


# -- ConvTranspose ----------------------------------------------------------------------------

# (kernel_size, strides, padding, kernel_dilation, use_bias)
TRANSPOSE_CASES = {
    "1d-same": (3, 1, "SAME", 1, True),
    "1d-same-stride2": (3, 2, "SAME", 1, True),
    "1d-valid-stride3-kernel2": (2, 3, "VALID", 1, True),
    "1d-valid-stride2-kdil2-nobias": (3, 2, "VALID", 2, False),
    "1d-pairs-stride2": (4, 2, [(2, 1)], 1, True),
    "2d-same-stride2": ((3, 3), 2, "SAME", 1, True),
    "2d-same-strides-kdil": ((3, 2), (2, 3), "SAME", (2, 1), True),
    "2d-valid-even-kernel": ((4, 4), 2, "VALID", 1, False),
    "2d-int-padding": ((3, 3), 2, 1, 1, True),
    "2d-pairs-kdil": ((3, 3), (1, 2), [(2, 0), (1, 3)], 2, True),
    "3d-same-stride2": ((2, 3, 2), 2, "SAME", 1, True),
    "3d-valid": ((3, 2, 2), (1, 2, 1), "VALID", 1, True),
}


@pytest.mark.parametrize("case", list(TRANSPOSE_CASES))
def test_conv_transpose_matches_numpy_and_nnx(case):
    ks, strides, padding, kdil, use_bias = TRANSPOSE_CASES[case]
    n = 1 if isinstance(ks, int) else len(ks)
    layer = make_transpose(
        CIN,
        5,
        ks,
        strides,
        padding=padding,
        kernel_dilation=kdil,
        use_bias=use_bias,
        bias_init=np_init(8),
        rngs=0,
    )
    kernel = np.asarray(layer.kernel.value)
    assert kernel.shape == (*per_axis(ks, n), CIN, 5)
    x = rand(1, 2, *SPATIAL[n], CIN)
    y = np.asarray(call(layer, x))
    pads = as_pairs(padding, n)
    want = np_conv_transpose(x, kernel, per_axis(strides, n), pads, per_axis(kdil, n))
    if use_bias:
        want = want + rand(8, 5)
    assert y.shape == want.shape
    np.testing.assert_allclose(y, want, **TOL)

    ref = nnx.ConvTranspose(
        CIN,
        5,
        ks,
        strides,
        padding=padding,
        kernel_dilation=kdil,
        use_bias=use_bias,
        kernel_init=np_init(99),
        bias_init=np_init(99),
        rngs=nnx.Rngs(0),
    )
    ref.kernel[...] = layer.kernel.value
    if use_bias:
        ref.bias[...] = layer.bias.value
    np.testing.assert_allclose(y, np.asarray(jax.jit(lambda x: ref(x))(x)), **TOL)


def test_conv_transpose_output_sizes():
    x = jnp.ones((7, CIN))
    for k, s, d in [(3, 2, 1), (2, 3, 1), (3, 2, 2)]:
        kd = (k - 1) * d + 1
        same = make_transpose(CIN, 2, k, s, kernel_dilation=d, rngs=0)
        valid = make_transpose(CIN, 2, k, s, padding="VALID", kernel_dilation=d, rngs=0)
        assert same(x).shape == (7 * s, 2)
        assert valid(x).shape == (7 * s + max(kd - s, 0), 2)
    # Undoing a Conv's size change: padding k' - 1 - p on both sides.
    conv = make_conv(CIN, CIN, 3, 2, padding=1, rngs=0)
    down = conv(jnp.ones((7, CIN)))
    assert down.shape == (4, CIN)
    up = make_transpose(CIN, CIN, 3, 2, padding=3 - 1 - 1, rngs=0)
    assert up(down).shape == (7, CIN)


def test_conv_transpose_by_hand():
    layer = make_transpose(1, 1, 2, 2, padding="VALID", use_bias=False, rngs=0)
    layer.kernel = jnp.array([1.0, 10.0]).reshape(2, 1, 1)
    x = jnp.array([1.0, 2.0, 3.0]).reshape(3, 1)
    # Each x[i] writes x[i] * kernel[::-1] at 2 * i (lax's un-flipped convention).
    assert layer(x)[:, 0].tolist() == [10.0, 1.0, 20.0, 2.0, 30.0, 3.0]


@pytest.mark.parametrize("padding", ["VALID", [(2, 0)]], ids=["valid", "pairs"])
def test_conv_transpose_of_flipped_kernel_is_the_conv_input_gradient(padding):
    conv = make_conv(CIN, 5, 3, 2, padding=padding, use_bias=False)
    x = rand(5, *SPATIAL[1], CIN)
    y, vjp = jax.vjp(conv, x)
    g = rand(6, *y.shape)
    (want,) = vjp(g)
    flipped = np.asarray(conv.kernel.value)[::-1].swapaxes(-1, -2)
    pads = padding if padding == "VALID" else [(3 - 1 - 2, 3 - 1 - 0)]
    up = make_transpose(5, CIN, 3, 2, padding=pads, use_bias=False)
    up.kernel = flipped
    np.testing.assert_allclose(np.asarray(up(g)), np.asarray(want), **TOL)


@pytest.mark.parametrize("batch", BATCHES, ids=["none", "one", "two"])
def test_conv_transpose_leading_batch_dims(batch):
    layer = make_transpose(CIN, 5, (3, 3), 2, bias_init=np_init(3), rngs=0)
    x = rand(2, *batch, *SPATIAL[2], CIN)
    y = np.asarray(layer(x))
    assert y.shape == (*batch, 10, 14, 5)
    flat = x.reshape(-1, *SPATIAL[2], CIN)
    want = np_conv_transpose(flat, np.asarray(layer.kernel.value), (2, 2), "SAME", (1, 1))
    np.testing.assert_allclose(y, (want + rand(3, 5)).reshape(y.shape), **TOL)


def test_conv_transpose_dtypes_init_and_errors():
    layer = make_transpose(CIN, 5, (3, 3), 2, dtype=jnp.bfloat16, rngs=0)
    x = rand(3, 2, *SPATIAL[2], CIN)
    y = layer(x)
    assert y.dtype == jnp.bfloat16
    assert layer.kernel.value.dtype == jnp.float32
    want = np_conv_transpose(x, np.asarray(layer.kernel.value), (2, 2), "SAME", (1, 1))
    want = want + rand(7, 5)
    np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=5e-2, atol=1e-1)
    stored = make_transpose(CIN, 5, 3, param_dtype=jnp.bfloat16, use_bias=False, rngs=0)
    assert stored.kernel.value.dtype == jnp.bfloat16
    assert stored.bias is None
    ones = make_transpose(CIN, 5, 3, kernel_init=jax.nn.initializers.ones, rngs=0)
    np.testing.assert_array_equal(np.asarray(ones.kernel.value), np.ones((3, CIN, 5)))
    with pytest.raises(ValueError) as info:
        layer(jnp.ones((5, 7, 3)))
    assert "(*batch, s0, s1, 4)" in str(info.value)
    assert "(5, 7, 3)" in str(info.value)
    with pytest.raises(
        ValueError,
        match=r"(?s)padding='CIRCULAR' is not a padding for 1 spatial axis.*'SAME', 'VALID', an",
    ):
        make_transpose(CIN, 5, 3, padding="CIRCULAR", rngs=0)
    with pytest.raises(ValueError, match=r"strides=\(2, 2\)"):
        make_transpose(CIN, 5, 3, (2, 2), rngs=0)


def test_conv_transpose_under_jit_and_grad():
    layer = make_transpose(CIN, 5, (3, 3), 2, bias_init=np_init(1), rngs=0)
    x = rand(4, 2, *SPATIAL[2], CIN)
    np.testing.assert_allclose(
        np.asarray(tl.jit(lambda m, x: m(x))(layer, x)), np.asarray(layer(x)), **TOL
    )

    def loss(model):
        return jnp.sum(model(x) ** 2)

    grads = tl.grad(loss)(layer)

    def lax_loss(kernel, bias):
        y = jax.lax.conv_transpose(
            x, kernel, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jnp.sum((y + bias) ** 2)

    gk, gb = jax.grad(lax_loss, argnums=(0, 1))(layer.kernel.value, layer.bias.value)
    np.testing.assert_allclose(np.asarray(grads.kernel.value), np.asarray(gk), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(grads.bias.value), np.asarray(gb), rtol=1e-4)
