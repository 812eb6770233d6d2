"""Parity with flax.nnx: the same weights copied over give the same outputs (float32, ~1e-5).

Each test builds a toylib layer with weights drawn by numpy (fixed values, no
XLA compile per shape), copies them into the ``flax.nnx`` layer of the same
name, and compares the outputs on odd sizes. The layouts are Flax's, so each
copy is a plain assignment.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import np_init, rand
from flax import nnx
from flax.nnx.nn import attention as nnx_attention

from toylib import nn

TOL = {"rtol": 1e-5, "atol": 1e-5}


# nnx layers get numpy initialisers too: jax.random compiles a kernel for every
# new shape (seconds each on a busy 2-core machine). The values are copied over
# from the toylib layer anyway.
NNX_INIT = {"kernel_init": np_init(0), "bias_init": np_init(1), "rngs": nnx.Rngs(0)}
NNX_LORA_INIT = {"a_initializer": np_init(2), "b_initializer": np_init(3)}


def copy_into(ref, ours, *names):
    """ref.<name>[...] = ours.<name> for each dotted name."""
    for name in names:
        *parents, leaf = name.split(".")
        src, dst = ours, ref
        for p in parents:
            src, dst = getattr(src, p), getattr(dst, p)
        getattr(dst, leaf)[...] = jnp.asarray(getattr(src, leaf).value)


def close(got, want, tol=TOL):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **tol)


# -- Einsum ---------------------------------------------------------------------------------------

EINSUMS = [
    ("nta,hab->nthb", (8, 2, 4), (8, 4), (3, 5, 2)),
    ("nta,hab->nthb", (3, 5, 7), None, (2, 1, 5)),
    ("...a,hab->...hb", (3, 5, 4), (3, 4), (2, 3, 5)),
    ("...a,hab->...hb", (3, 5, 4), (3, 4), (5,)),
    ("a...,ab->b...", (3, 7), (7,), (3, 2, 5)),
    ("ab...,bc->a...c", (3, 4), (4,), (2, 3, 7, 6)),
    ("btd,dhk->bhtk", (5, 3, 2), (3, 2), (2, 7, 5)),
    ("bd,dk->bk", (9, 1), (1,), (4, 9)),
]


@pytest.mark.parametrize(("equation", "kernel_shape", "bias_shape", "x_shape"), EINSUMS)
def test_einsum_matches_nnx(equation, kernel_shape, bias_shape, x_shape):
    ours = nn.Einsum(
        equation, kernel_shape, bias_shape, kernel_init=np_init(0), bias_init=np_init(1), rngs=0
    )
    ref = nnx.Einsum(equation, kernel_shape, bias_shape, **NNX_INIT)
    copy_into(ref, ours, "kernel", *(["bias"] if bias_shape else []))
    x = rand(2, *x_shape)
    close(ours(x), ref(x))


def test_einsum_equation_at_call_matches_nnx():
    ours = nn.Einsum(None, (4, 3), (3,), kernel_init=np_init(0), bias_init=np_init(1), rngs=0)
    ref = nnx.Einsum("ab,bc->ac", (4, 3), (3,), **NNX_INIT)
    copy_into(ref, ours, "kernel", "bias")
    x = rand(2, 5, 4)
    close(ours(x, "...b,bc->...c"), ref(x, "...b,bc->...c"))


# -- LinearGeneral and the head projections -----------------------------------------------------

GENERALS = [
    (3, 4, -1, None, (2, 3)),
    (5, 4, -1, None, (5,)),
    ((2, 3), (4, 5), (1, -1), None, (6, 2, 3)),
    ((2, 3), (4, 5), (-2, -1), None, (7, 2, 3)),
    (5, (2, 3), 0, None, (5, 7)),
    ((3, 5), 2, (0, 2), None, (3, 4, 5)),
    ((2, 3), 4, (-2, -1), {0: 6}, (6, 2, 3)),
    (3, (2, 2), -1, {0: 2, 1: 4}, (2, 4, 5, 3)),
]


@pytest.mark.parametrize(("in_features", "out_features", "axis", "batch_axis", "x_shape"), GENERALS)
@pytest.mark.parametrize("use_bias", [True, False])
def test_linear_general_matches_nnx(in_features, out_features, axis, batch_axis, x_shape, use_bias):
    kwargs = {"axis": axis, "use_bias": use_bias}
    ours = nn.LinearGeneral(
        in_features,
        out_features,
        batch_axis=batch_axis,
        kernel_init=np_init(0),
        bias_init=np_init(1),
        rngs=0,
        **kwargs,
    )
    ref = nnx.LinearGeneral(
        in_features, out_features, batch_axis=batch_axis or {}, **NNX_INIT, **kwargs
    )
    copy_into(ref, ours, "kernel", *(["bias"] if use_bias else []))
    x = rand(2, *x_shape)
    close(ours(x), ref(x))


def test_linear_general_draws_nnx_weights_for_the_same_key():
    # The initialisers see the dense shape, as in nnx: the same key, the same weights.
    init = jax.nn.initializers.normal()
    ours = nn.LinearGeneral((2, 3), (4, 5), axis=(-2, -1), bias_init=init, rngs=7)
    ref = nnx.LinearGeneral((2, 3), (4, 5), axis=(-2, -1), bias_init=init, rngs=nnx.Rngs(7))
    close(ours.kernel.value, ref.kernel[...], {"rtol": 0, "atol": 0})
    close(ours.bias.value, ref.bias[...], {"rtol": 0, "atol": 0})


@pytest.mark.parametrize(("heads", "head_dim"), [(1, 7), (3, 5)])
def test_project_and_merge_heads_match_nnx_linear_general(heads, head_dim):
    proj = nn.ProjectHeads(6, heads, head_dim, kernel_init=np_init(0), bias_init=np_init(1), rngs=0)
    merge = nn.MergeHeads(heads, head_dim, 4, kernel_init=np_init(2), bias_init=np_init(3), rngs=0)
    ref_proj = nnx.LinearGeneral(6, (heads, head_dim), **NNX_INIT)
    ref_merge = nnx.LinearGeneral((heads, head_dim), 4, axis=(-2, -1), **NNX_INIT)
    copy_into(ref_proj, proj, "kernel", "bias")
    copy_into(ref_merge, merge, "kernel", "bias")
    x = rand(4, 2, 5, 6)
    close(merge(proj(x)), ref_merge(ref_proj(x)))


# -- LoRA -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("din", "rank", "dout"), [(3, 1, 4), (7, 5, 2)])
@pytest.mark.parametrize("with_base", [False, True])
def test_lora_matches_nnx(din, rank, dout, with_base):
    base = nn.Linear(din, dout, kernel_init=np_init(5), bias_init=np_init(6), rngs=0)
    ours = nn.LoRA(
        din,
        rank,
        dout,
        base_module=base if with_base else None,
        a_initializer=np_init(0),
        b_initializer=np_init(1),
        rngs=0,
    )
    ref_base = nnx.Linear(din, dout, **NNX_INIT)
    copy_into(ref_base, base, "kernel", "bias")
    ref = nnx.LoRA(
        din,
        rank,
        dout,
        base_module=ref_base if with_base else None,
        rngs=nnx.Rngs(0),
        **NNX_LORA_INIT,
    )
    copy_into(ref, ours, "lora_a", "lora_b")
    x = rand(2, 3, din)
    close(ours(x), ref(x))


@pytest.mark.parametrize("use_bias", [True, False])
def test_lora_linear_matches_nnx(use_bias):
    ours = nn.LoRALinear(
        5,
        3,
        lora_rank=2,
        use_bias=use_bias,
        kernel_init=np_init(0),
        bias_init=np_init(1),
        a_initializer=np_init(2),
        b_initializer=np_init(3),
        rngs=0,
    )
    ref = nnx.LoRALinear(5, 3, lora_rank=2, use_bias=use_bias, **NNX_INIT, **NNX_LORA_INIT)
    names = ["kernel", "lora.lora_a", "lora.lora_b", *(["bias"] if use_bias else [])]
    copy_into(ref, ours, *names)
    x = rand(4, 6, 5)
    close(ours(x), ref(x))


# -- PReLU and SimpleCell -------------------------------------------------------------------------


@pytest.mark.parametrize("slope", [0.01, -0.3, 1.7])
def test_prelu_matches_nnx(slope):
    ours, ref = nn.PReLU(slope), nnx.PReLU(slope)
    x = rand(0, 3, 7)
    close(ours(x), ref(x))
    xb = jnp.asarray(x, jnp.bfloat16)  # both keep the input's dtype
    assert ours(xb).dtype == ref(xb).dtype == jnp.bfloat16


@pytest.mark.parametrize(("din", "hidden"), [(3, 5), (6, 1)])
@pytest.mark.parametrize("residual", [False, True])
def test_simple_cell_matches_nnx(din, hidden, residual):
    ours = nn.SimpleCell(
        din,
        hidden,
        residual=residual,
        kernel_init=np_init(0),
        recurrent_kernel_init=np_init(1),
        bias_init=np_init(2),
        rngs=0,
    )
    ref = nnx.SimpleCell(
        din, hidden, residual=residual, recurrent_kernel_init=np_init(1), **NNX_INIT
    )
    ref.dense_i.kernel[...] = ours.kernel.value
    ref.dense_i.bias[...] = ours.bias.value
    ref.dense_h.kernel[...] = ours.recurrent_kernel.value
    h, x = rand(3, 4, hidden), rand(4, 4, din)
    (h1, y1), (h2, y2) = ours(h, x), ref(h, x)
    close(h1, h2)
    close(y1, y2)
    xs = rand(5, 2, 6, din)  # a sequence through nn.RNN and nnx.RNN
    close(nn.RNN(ours)(xs), nnx.RNN(ref)(xs))


# -- normalisation --------------------------------------------------------------------------------

FAST = [False, True]


def random_norm_params(ours, ref, seed=0):
    for i, name in enumerate(("scale", "bias")):
        if getattr(ours, name, None) is not None:
            value = rand(seed + i, *getattr(ours, name).shape)
            getattr(ours, name).value = jnp.asarray(value)
            getattr(ref, name)[...] = jnp.asarray(value)


@pytest.mark.parametrize(
    ("shape", "feature_axes"),
    [((2, 5, 3), -1), ((3, 4, 5, 6), -1), ((2, 3, 5, 4), (1, -1)), ((2, 7, 3), 1)],
)
@pytest.mark.parametrize("use_fast_variance", FAST)
def test_instance_norm_matches_nnx(shape, feature_axes, use_fast_variance):
    axes = feature_axes if isinstance(feature_axes, tuple) else (feature_axes,)
    n = int(np.prod([shape[a] for a in axes]))
    kwargs = {"feature_axes": feature_axes, "use_fast_variance": use_fast_variance}
    ours = nn.InstanceNorm(n, **kwargs)
    ref = nnx.InstanceNorm(n, rngs=nnx.Rngs(0), **kwargs)
    random_norm_params(ours, ref)
    x = rand(9, *shape) * 3 + 1
    close(ours(x), ref(x))


@pytest.mark.parametrize(("use_scale", "use_bias"), [(False, True), (True, False)])
def test_instance_norm_without_scale_or_bias_matches_nnx(use_scale, use_bias):
    kwargs = {"use_scale": use_scale, "use_bias": use_bias}
    ours, ref = nn.InstanceNorm(4, **kwargs), nnx.InstanceNorm(4, rngs=nnx.Rngs(0), **kwargs)
    random_norm_params(ours, ref)
    x = rand(1, 3, 5, 4)
    close(ours(x), ref(x))


@pytest.mark.parametrize("use_fast_variance", FAST)
def test_layernorm_and_rmsnorm_fast_variance_match_nnx(use_fast_variance):
    x = rand(0, 3, 5, 7) * 2 + 0.5
    for make, ref_make in [(nn.LayerNorm, nnx.LayerNorm), (nn.RMSNorm, nnx.RMSNorm)]:
        ours = make(7, use_fast_variance=use_fast_variance)
        ref = ref_make(7, use_fast_variance=use_fast_variance, rngs=nnx.Rngs(0))
        random_norm_params(ours, ref)
        close(ours(x), ref(x))


@pytest.mark.parametrize(
    ("groups", "use_fast_variance"), [(1, True), (3, True), (6, True), (2, False)]
)
def test_groupnorm_fast_variance_matches_nnx(groups, use_fast_variance):
    ours = nn.GroupNorm(6, num_groups=groups, use_fast_variance=use_fast_variance)
    ref = nnx.GroupNorm(6, num_groups=groups, use_fast_variance=use_fast_variance, rngs=nnx.Rngs(0))
    random_norm_params(ours, ref)
    x = rand(0, 2, 3, 5, 6) - 1
    close(ours(x), ref(x))


@pytest.mark.parametrize("use_fast_variance", FAST)
def test_batchnorm_fast_variance_matches_nnx_train_then_eval(use_fast_variance):
    ours = nn.BatchNorm(5, momentum=0.7, use_fast_variance=use_fast_variance)
    ref = nnx.BatchNorm(5, momentum=0.7, use_fast_variance=use_fast_variance, rngs=nnx.Rngs(0))
    random_norm_params(ours, ref)
    for seed in range(2):
        x = rand(seed, 4, 3, 5) * 2 + 3
        close(ours(x), ref(x))
    close(ours.mean.value, ref.mean[...])
    close(ours.var.value, ref.var[...])
    ours.eval()
    ref.eval()
    x = rand(7, 2, 5)
    close(ours(x), ref(x))


# -- masked convolutions --------------------------------------------------------------------------


def conv_pair(make, ref_make, *args, mask=None, **kwargs):
    ours = make(*args, mask=mask, kernel_init=np_init(0), bias_init=np_init(1), rngs=0, **kwargs)
    ref = ref_make(*args, mask=mask, **NNX_INIT, **kwargs)
    copy_into(ref, ours, "kernel", "bias")
    return ours, ref


def random_mask(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).random(shape) > 0.4, jnp.float32)


@pytest.mark.parametrize(
    ("kernel_size", "groups", "spatial", "kwargs"),
    [
        ((3,), 1, (7,), {}),
        ((3, 3), 1, (5, 7), {"padding": "VALID"}),
        ((2, 3), 2, (5, 6), {"strides": 2}),
        ((3, 2), 4, (6, 5), {"kernel_dilation": 2, "padding": "CIRCULAR"}),
        ((3,), 2, (9,), {"input_dilation": 2, "padding": ((1, 2),)}),
    ],
)
def test_masked_conv_matches_nnx(kernel_size, groups, spatial, kwargs):
    cin, cout = 4, 8
    shape = (*kernel_size, cin // groups, cout)
    ours, ref = conv_pair(
        nn.Conv,
        nnx.Conv,
        cin,
        cout,
        kernel_size,
        mask=random_mask(3, shape),
        feature_group_count=groups,
        **kwargs,
    )
    x = rand(2, 2, *spatial, cin)
    close(ours(x), ref(x))


def test_causal_mask_conv_matches_nnx_docstring_example():
    # nnx.Conv's own example: a lower-triangular mask on a (3, 3, 4) kernel.
    mask = jnp.tril(jnp.ones((3, 3, 4)))
    ours, ref = conv_pair(nn.Conv, nnx.Conv, 3, 4, (3,), mask=mask, padding="VALID")
    x = rand(0, 2, 8, 3)
    close(ours(x), ref(x))


@pytest.mark.parametrize(
    ("kernel_size", "spatial", "kwargs"),
    [
        ((3,), (5,), {"strides": 2}),
        ((3, 2), (4, 5), {"padding": "VALID"}),
        ((2, 3), (3, 4), {"strides": (2, 1), "kernel_dilation": 2}),
    ],
)
def test_masked_conv_transpose_matches_nnx(kernel_size, spatial, kwargs):
    shape = (*kernel_size, 3, 5)
    ours, ref = conv_pair(
        nn.ConvTranspose, nnx.ConvTranspose, 3, 5, kernel_size, mask=random_mask(4, shape), **kwargs
    )
    x = rand(2, 2, *spatial, 3)
    close(ours(x), ref(x))


# -- WeightNorm, SpectralNorm ---------------------------------------------------------------------


def linear_pair(din, dout):
    ours = nn.Linear(din, dout, kernel_init=np_init(0), bias_init=np_init(1), rngs=0)
    ref = nnx.Linear(din, dout, **NNX_INIT)
    copy_into(ref, ours, "kernel", "bias")
    return ours, ref


def conv2d_pair(cin, cout):
    ours = nn.Conv(cin, cout, (3, 2), kernel_init=np_init(0), bias_init=np_init(1), rngs=0)
    ref = nnx.Conv(cin, cout, (3, 2), **NNX_INIT)
    copy_into(ref, ours, "kernel", "bias")
    return ours, ref


WRAPPED = [
    (lambda: linear_pair(5, 3), (4, 5)),
    (lambda: linear_pair(1, 7), (2, 1)),
    (lambda: conv2d_pair(3, 4), (2, 5, 4, 3)),
]


@pytest.mark.parametrize(("make", "x_shape"), WRAPPED)
@pytest.mark.parametrize("feature_axes", [-1, None, 0])
def test_weight_norm_matches_nnx(make, x_shape, feature_axes):
    layer, ref_layer = make()
    ours = nn.WeightNorm(layer, feature_axes=feature_axes)
    ref = nnx.WeightNorm(ref_layer, feature_axes=feature_axes, rngs=nnx.Rngs(0))
    scale = rand(3, *ours.scales["kernel"].shape)
    ours.scales["kernel"].value = jnp.asarray(scale)
    ref.scales[("kernel",)] = jnp.asarray(scale)
    x = rand(4, *x_shape)
    close(ours(x), ref(x))


def test_weight_norm_without_scale_matches_nnx():
    layer, ref_layer = linear_pair(4, 6)
    ours = nn.WeightNorm(layer, use_scale=False)
    ref = nnx.WeightNorm(ref_layer, use_scale=False, rngs=nnx.Rngs(0))
    x = rand(4, 3, 4)
    close(ours(x), ref(x))


@pytest.mark.parametrize(("make", "x_shape"), WRAPPED)
@pytest.mark.parametrize("n_steps", [1, 3])
def test_spectral_norm_matches_nnx(make, x_shape, n_steps):
    layer, ref_layer = make()
    ours = nn.SpectralNorm(layer, n_steps=n_steps, rngs=0)
    ref = nnx.SpectralNorm(ref_layer, n_steps=n_steps, rngs=nnx.Rngs(0))
    u = rand(5, *ours.u["kernel"].shape)
    ours.u["kernel"].value = jnp.asarray(u)
    ref.batch_stats[("kernel", "u")][...] = jnp.asarray(u)
    x = rand(4, *x_shape)
    # Evaluation mode first (nothing stored), then a training step; each is
    # the first call on Flax's side, which overwrites its layer's weights.
    close(ours(x, use_running_average=True), ref(x, update_stats=False))
    close(ours.u["kernel"].value, u)
    layer2, ref_layer2 = make()
    ours.layer, ref = layer2, nnx.SpectralNorm(ref_layer2, n_steps=n_steps, rngs=nnx.Rngs(0))
    ref.batch_stats[("kernel", "u")][...] = jnp.asarray(u)
    close(ours(x), ref(x, update_stats=True))
    close(ours.u["kernel"].value, ref.batch_stats[("kernel", "u")][...])
    close(ours.sigma["kernel"].value, ref.batch_stats[("kernel", "sigma")][...])


# -- grouped-query attention ----------------------------------------------------------------------

GQA = [(4, 4), (4, 2), (4, 1), (6, 3), (6, 2), (3, 1)]


def attention_pair(heads, kv_heads, features=12, **kwargs):
    init = {"kernel_init": np_init(0), "bias_init": np_init(1)}
    ours = nn.MultiHeadAttention(heads, features, num_kv_heads=kv_heads, rngs=0, **init, **kwargs)
    ref = nnx.MultiHeadAttention(
        heads, features, num_kv_heads=kv_heads, decode=False, rngs=nnx.Rngs(0), **init, **kwargs
    )
    for name in ("query", "key", "value", "out"):
        copy_into(ref, ours, f"{name}.kernel", f"{name}.bias")
    return ours, ref


@pytest.mark.parametrize(("heads", "kv_heads"), GQA)
def test_grouped_query_attention_matches_nnx(heads, kv_heads):
    ours, ref = attention_pair(heads, kv_heads)
    assert ours.key.kernel.shape == ref.key.kernel.shape == (12, kv_heads, 12 // heads)
    x = rand(3, 2, 5, 12)
    mask = nn.make_causal_mask(jnp.ones((2, 5)))
    close(ours(x, mask=mask), ref(x, mask=mask, deterministic=True))


@pytest.mark.parametrize(("heads", "kv_heads"), [(6, 2), (6, 1)])
def test_grouped_cross_attention_matches_nnx(heads, kv_heads):
    ours, ref = attention_pair(heads, kv_heads, in_kv_features=7, qkv_features=18, out_features=5)
    q, kv = rand(3, 2, 4, 12), rand(4, 2, 9, 7)
    mask = nn.make_attention_mask(jnp.ones((2, 4)), jnp.arange(9) < 6)
    close(ours(q, kv, mask=mask), ref(q, kv, mask=mask, deterministic=True))


def test_grouped_attention_functions_match_nnx():
    q, k, v = rand(0, 2, 5, 6, 4), rand(1, 2, 7, 2, 4), rand(2, 2, 7, 2, 4)
    mask = jnp.asarray(np.random.default_rng(3).random((2, 1, 5, 7)) > 0.3)
    close(
        nn.dot_product_attention_weights(q, k, mask),
        nnx_attention.dot_product_attention_weights(q, k, mask=mask),
    )
    close(nn.dot_product_attention(q, k, v, mask), nnx.dot_product_attention(q, k, v, mask=mask))


@pytest.mark.parametrize("normalize_qk", [False, True])
def test_attention_precision_and_qk_norm_match_nnx(normalize_qk):
    ours, ref = attention_pair(4, 2, precision="highest", normalize_qk=normalize_qk)
    x = rand(3, 2, 6, 12)
    close(ours(x), ref(x, deterministic=True))
