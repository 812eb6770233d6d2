"""Tests for max_pool / avg_pool and the MaxPool / AvgPool modules."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rand
from flax.linen import pooling as flax_pooling

import toylib as tl
from toylib import nn

TOL = {"rtol": 1e-5, "atol": 1e-6}
C = 3  # channels
# A few fixed spatial shapes, shared by the tests: every new shape costs an XLA compile.
SPATIAL = {1: (7,), 2: (5, 6), 3: (3, 4, 5)}
BATCHES = [(), (2,), (2, 3)]


def np_pool(x, window, strides, padding, kind, count_include_pad=True):
    """Direct pooling of ``(batch, *spatial, channels)`` by looping over window offsets."""
    n = len(window)
    sizes = x.shape[1:-1]
    if padding == "VALID":
        pads = [(0, 0)] * n
    elif padding == "SAME":  # out = ceil(size / stride); the odd pad element goes last
        pads = []
        for size, w, s in zip(sizes, window, strides, strict=True):
            total = max((-(-size // s) - 1) * s + w - size, 0)
            pads.append((total // 2, total - total // 2))
    else:
        pads = padding
    fill = -np.inf if kind == "max" else 0.0
    xp = np.pad(x.astype(np.float64), [(0, 0), *pads, (0, 0)], constant_values=fill)
    real = np.pad(np.ones(sizes), pads)  # 1 where a real element is, 0 on padding
    outs = [(p - w) // s + 1 for p, w, s in zip(xp.shape[1:-1], window, strides, strict=True)]
    y = np.full((x.shape[0], *outs, x.shape[-1]), fill)
    count = np.zeros(outs)
    for offset in itertools.product(*[range(w) for w in window]):
        where = tuple(
            slice(o, o + (m - 1) * s + 1, s) for o, m, s in zip(offset, outs, strides, strict=True)
        )
        patch = xp[(slice(None), *where)]
        y = np.maximum(y, patch) if kind == "max" else y + patch
        count += real[where]
    if kind == "max":
        return y
    return y / (np.prod(window) if count_include_pad else count[..., None])


def test_numpy_reference_by_hand():
    x = np.arange(6.0).reshape(1, 6, 1)
    assert np_pool(x, (2,), (2,), "VALID", "max")[0, :, 0].tolist() == [1.0, 3.0, 5.0]
    assert np_pool(x, (3,), (2,), "SAME", "avg")[0, :, 0].tolist() == [1.0, 3.0, 3.0]
    avg = np_pool(x, (3,), (2,), "SAME", "avg", count_include_pad=False)
    assert avg[0, :, 0].tolist() == [1.0, 3.0, 4.5]


# (window_shape, strides, padding)
CASES = {
    "1d-default-strides": (3, None, "VALID"),
    "1d-stride1-same": (2, 1, "SAME"),
    "1d-int-padding": ((3,), 2, 1),
    "2d-default-strides": ((2, 2), None, "VALID"),
    "2d-odd-window-same": ((3, 3), 2, "SAME"),
    "2d-mixed-strides-same": ((2, 3), (2, 1), "SAME"),
    "2d-pairs": ((3, 2), 1, [(1, 0), (1, 1)]),
    "2d-mixed-int-and-pair": ((2, 2), (1, 2), [1, (0, 1)]),
    "3d-same": ((2, 3, 2), (1, 2, 2), "SAME"),
    "3d-valid": ((2, 2, 3), 1, "VALID"),
}


def per_axis(v, n):
    return (v,) * n if isinstance(v, int) else tuple(v)


def resolve(window, strides, padding):
    """window, strides and padding as the numpy reference (and flax) want them."""
    window = per_axis(window, 1) if isinstance(window, int) else tuple(window)
    n = len(window)
    strides = window if strides is None else per_axis(strides, n)
    if isinstance(padding, int):
        padding = [(padding, padding)] * n
    elif not isinstance(padding, str):
        padding = [p if isinstance(p, tuple) else (p, p) for p in padding]
    return window, strides, padding


# Each parity case runs jitted: one compile per case instead of one per eager op.


@pytest.mark.parametrize("case", list(CASES))
def test_max_pool_matches_numpy_and_flax(case):
    window_shape, strides, padding = CASES[case]
    window, steps, pads = resolve(window_shape, strides, padding)
    x = rand(0, 2, *SPATIAL[len(window)], C)
    y = np.asarray(jax.jit(lambda x: nn.max_pool(x, window_shape, strides, padding))(x))
    want = np_pool(x, window, steps, pads, "max")
    assert y.shape == want.shape
    np.testing.assert_allclose(y, want, **TOL)
    flax_y = jax.jit(lambda x: flax_pooling.max_pool(x, window, steps, pads))(x)
    np.testing.assert_allclose(y, np.asarray(flax_y), **TOL)
    module = nn.MaxPool(window_shape, strides, padding=padding)
    np.testing.assert_allclose(np.asarray(tl.jit(lambda m, x: m(x))(module, x)), want, **TOL)


# count_include_pad only matters where there is padding.
AVG_CASES = [(case, True) for case in CASES] + [
    (case, False) for case, (_, _, padding) in CASES.items() if padding != "VALID"
]


@pytest.mark.parametrize(
    ("case", "count_include_pad"),
    AVG_CASES,
    ids=[f"{case}-{'include' if pad else 'exclude'}-pad" for case, pad in AVG_CASES],
)
def test_avg_pool_matches_numpy_and_flax(case, count_include_pad):
    window_shape, strides, padding = CASES[case]
    window, steps, pads = resolve(window_shape, strides, padding)
    x = rand(1, 2, *SPATIAL[len(window)], C)
    module = nn.AvgPool(window_shape, strides, padding=padding, count_include_pad=count_include_pad)
    y = np.asarray(tl.jit(lambda m, x: m(x))(module, x))
    want = np_pool(x, window, steps, pads, "avg", count_include_pad)
    assert y.shape == want.shape
    np.testing.assert_allclose(y, want, **TOL)
    flax_y = jax.jit(
        lambda x: flax_pooling.avg_pool(x, window, steps, pads, count_include_pad=count_include_pad)
    )(x)
    np.testing.assert_allclose(y, np.asarray(flax_y), **TOL)


def test_padding_changes_the_border_average():
    x = jnp.ones((4, 4, 1))
    with_pad = nn.avg_pool(x, (3, 3), 1, "SAME")[..., 0]
    without = nn.avg_pool(x, (3, 3), 1, "SAME", count_include_pad=False)[..., 0]
    assert float(with_pad[0, 0]) == pytest.approx(4 / 9)  # corner: 4 real of 9
    assert float(with_pad[0, 1]) == pytest.approx(6 / 9)  # edge: 6 real of 9
    assert float(with_pad[1, 1]) == 1.0
    np.testing.assert_array_equal(np.asarray(without), np.ones((4, 4)))


def test_window_of_padding_only():
    x = jnp.ones((2, 1))
    pads = [(2, 1)]  # the first window (size 2) sees padding only
    assert nn.avg_pool(x, 2, 1, pads)[:, 0].tolist() == [0.0, 0.5, 1.0, 0.5]
    assert nn.avg_pool(x, 2, 1, pads, count_include_pad=False)[:, 0].tolist() == [0, 1, 1, 1]
    assert nn.max_pool(x, 2, 1, pads)[:, 0].tolist() == [-np.inf, 1.0, 1.0, 1.0]


def test_max_pool_padding_never_wins():
    x = -1.0 - jnp.abs(jnp.asarray(rand(2, *SPATIAL[2], C)))  # all values below -1
    y = nn.max_pool(x, (3, 3), 1, "SAME")
    assert y.shape == x.shape
    assert float(y.max()) < -1.0  # zero padding would have given 0 at the border
    ints = jnp.asarray(np.arange(-30, 0).reshape(5, 6, 1), jnp.int32)
    y = nn.max_pool(ints, (2, 2), 1, "SAME")
    assert y.dtype == jnp.int32
    want = np_pool(np.asarray(ints, np.float64)[None], (2, 2), (1, 1), "SAME", "max")[0]
    np.testing.assert_array_equal(np.asarray(y), want.astype(np.int32))


def test_default_strides_are_the_window():
    x = jnp.asarray(rand(3, *SPATIAL[2], C))
    assert nn.max_pool(x, (2, 2)).shape == (2, 3, C)
    assert nn.avg_pool(x, (2, 3)).shape == (2, 2, C)
    assert nn.MaxPool((2, 2))(x).shape == (2, 3, C)
    assert nn.AvgPool((2, 2), padding="SAME")(x).shape == (3, 3, C)
    # Flax's default is stride 1: pass strides=1 for it.
    np.testing.assert_allclose(
        np.asarray(nn.max_pool(x, (2, 2), strides=1)),
        np.asarray(flax_pooling.max_pool(x, (2, 2))),
        **TOL,
    )
    module = nn.MaxPool(2)
    assert module.window_shape == (2,)
    assert module.strides == (2,)
    assert nn.MaxPool((2, 2), 1).strides == (1, 1)


def test_by_hand():
    x = jnp.arange(16.0).reshape(4, 4, 1)
    assert nn.max_pool(x, (2, 2))[..., 0].tolist() == [[5.0, 7.0], [13.0, 15.0]]
    assert nn.avg_pool(x, (2, 2))[..., 0].tolist() == [[2.5, 4.5], [10.5, 12.5]]
    assert nn.max_pool(x, (1, 4))[..., 0].tolist() == [[3.0], [7.0], [11.0], [15.0]]


@pytest.mark.parametrize("batch", BATCHES, ids=["none", "one", "two"])
def test_leading_batch_dims(batch):
    x = rand(4, *batch, *SPATIAL[2], C)
    flat = x.reshape(-1, *SPATIAL[2], C)
    y = nn.max_pool(x, (3, 2), (2, 2), "SAME")
    want = np_pool(flat, (3, 2), (2, 2), "SAME", "max")
    assert y.shape == (*batch, *want.shape[1:])
    np.testing.assert_allclose(np.asarray(y), want.reshape(y.shape), **TOL)
    y = nn.AvgPool((3, 2), (2, 2), padding=[(1, 1), (0, 1)], count_include_pad=False)(x)
    want = np_pool(flat, (3, 2), (2, 2), [(1, 1), (0, 1)], "avg", count_include_pad=False)
    np.testing.assert_allclose(np.asarray(y), want.reshape(y.shape), **TOL)


def test_dtypes_are_kept():
    x = jnp.asarray(rand(5, *SPATIAL[2], C), jnp.bfloat16)
    assert nn.max_pool(x, (2, 2)).dtype == jnp.bfloat16
    y = nn.avg_pool(x, (2, 2), 1, "SAME", count_include_pad=False)
    assert y.dtype == jnp.bfloat16
    want = np_pool(np.asarray(x, np.float32)[None], (2, 2), (1, 1), "SAME", "avg", False)[0]
    np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=2e-2, atol=2e-2)


def test_gradients_under_jit():
    x = jnp.asarray([[1.0, 5.0, 2.0, 0.0, 3.0, -1.0]]).reshape(6, 1)

    def loss(x):
        return nn.max_pool(x, 2).sum() + nn.avg_pool(x, 3, 1, "SAME").sum()

    g = np.asarray(jax.jit(jax.grad(loss))(x))[:, 0]
    # max: the winners 5.0, 2.0, 3.0 get 1; avg: each element sits in 3 windows,
    # except at the ends (2 windows), each contributing 1/3.
    avg = np.array([2, 3, 3, 3, 3, 2]) / 3
    np.testing.assert_allclose(g, np.array([0, 1, 1, 0, 1, 0]) + avg, **TOL)
    # Not counting padding: the end windows hold 2 elements (1/2 each), the others 3.
    grads = jax.jit(jax.grad(lambda x: nn.avg_pool(x, 3, 1, "SAME", False).sum()))(x)
    np.testing.assert_allclose(np.asarray(grads)[:, 0], [5 / 6, 7 / 6, 1, 1, 7 / 6, 5 / 6], **TOL)


def test_modules_have_no_params_and_work_in_a_jitted_model():
    pool = nn.MaxPool((2, 2))
    assert tl.state(pool).flat() == {}
    model = nn.Sequential(
        nn.Conv(C, 4, (3, 3), kernel_init=jax.nn.initializers.ones, rngs=0),
        jax.nn.relu,
        nn.MaxPool((2, 2), padding="SAME"),
        nn.AvgPool((3, 3), strides=1, padding="SAME", count_include_pad=False),
    )
    x = jnp.asarray(rand(6, 2, *SPATIAL[2], C))
    y = tl.jit(lambda m, x: m(x))(model, x)
    assert y.shape == (2, 3, 3, 4)
    np.testing.assert_allclose(np.asarray(y), np.asarray(model(x)), **TOL)
    want = np_pool(
        np_pool(np.asarray(jax.nn.relu(model[0](x))), (2, 2), (2, 2), "SAME", "max"),
        (3, 3),
        (1, 1),
        "SAME",
        "avg",
        count_include_pad=False,
    )
    np.testing.assert_allclose(np.asarray(y), want, **TOL)


def test_clear_errors():
    pool = nn.MaxPool((2, 2))
    with pytest.raises(ValueError) as info:
        pool(jnp.ones((4, 4)))
    message = str(info.value)
    assert "MaxPool" in message
    assert "(*batch, s0, s1, channels)" in message  # expected
    assert "(4, 4)" in message  # received
    assert "x[..., None]" in message  # the fix
    with pytest.raises(ValueError, match=r"avg_pool\(\.\.\.\): window_shape=\(3,\)"):
        nn.avg_pool(jnp.ones(4), 3)
    with pytest.raises(ValueError, match=r"window_shape=\(2, 0\)"):
        nn.AvgPool((2, 0))
    with pytest.raises(ValueError, match=r"(?s)strides=\(1, 1, 1\).*window_shape=\(2, 2\) has 2"):
        nn.max_pool(jnp.ones((4, 4, 1)), (2, 2), (1, 1, 1))
    with pytest.raises(ValueError, match=r"padding='FULL'"):
        nn.MaxPool((2, 2), padding="FULL")
    with pytest.raises(ValueError, match=r"padding='CIRCULAR'"):
        nn.avg_pool(jnp.ones((4, 4, 1)), (2, 2), padding="CIRCULAR")
