"""Behaviour of the layer zoo beyond flax parity: errors, dtypes, filters, transforms, EMA."""

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import optax
import pytest
from conftest import np_init, rand

import toylib as tl
from toylib import nn

BF16 = jnp.bfloat16


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


def test_lora_errors(monkeypatch):
    # Bad input on purpose: toylib's own message, not the runtime type checker's.
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)
    with pytest.raises(ValueError, match="lora_rank=0"):
        nn.LoRA(3, 0, 4, rngs=0)
    with pytest.raises(ValueError, match=r"model \(LoRA\): expected input of shape \(\.\.\., 3\)"):
        nn.LoRA(3, 2, 4, rngs=0)(jnp.ones((2, 5)))
    with pytest.raises(TypeError, match="base_module is a int"):
        nn.LoRA(3, 2, 4, base_module=3, rngs=0)(jnp.ones((2, 3)))


# -- PReLU, SimpleCell ----------------------------------------------------------------------------


def test_prelu_learns_its_slope():
    act = nn.PReLU(0.5)
    x = jnp.array([-2.0, -1.0, 3.0])
    grads = tl.grad(lambda m: m(x).sum())(act)
    assert float(grads.negative_slope.value) == -3.0  # d/ds of s * (-2 - 1)
    assert act(jnp.array([-2, 4])).dtype == jnp.float32  # ints become float
    assert act.eval()(x).tolist() == [-1.0, -0.5, 3.0]


def test_simple_cell_equation_carry_dtype_and_errors(monkeypatch):
    # Bad input on purpose: toylib's own message, not the runtime type checker's.
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)
    cell = nn.SimpleCell(3, 2, residual=True, bias_init=np_init(2), rngs=0)
    h, x = rand(0, 4, 2), rand(1, 4, 3)
    k, u, b = (np.asarray(v.value) for v in (cell.kernel, cell.recurrent_kernel, cell.bias))
    new_h, y = cell(h, x)
    np.testing.assert_allclose(np.asarray(y), np.tanh(x @ k + b + h @ u + h), rtol=1e-5, atol=1e-6)
    assert new_h is not None and cell.initialize_carry((5, 3)).shape == (5, 2)
    h16, _ = cell(jnp.zeros((4, 2), BF16), x)
    assert h16.dtype == BF16
    with pytest.raises(ValueError, match=r"model \(SimpleCell\): expected a carry of shape"):
        cell(jnp.zeros((4, 3)), x)
    with pytest.raises(TypeError, match="a SimpleCell's carry is one array"):
        cell((h, h), x)


# -- norms ----------------------------------------------------------------------------------------


def test_instance_norm_normalises_each_example_and_channel():
    x = rand(0, 3, 4, 5, 2) * 5 + 7
    y = np.asarray(nn.InstanceNorm(2)(x))
    np.testing.assert_allclose(y.mean((1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(y.var((1, 2)), 1, atol=1e-3)
    # It is GroupNorm with one channel per group.
    np.testing.assert_allclose(y, np.asarray(nn.GroupNorm(2, num_groups=2)(x)), atol=1e-5)


def test_instance_norm_num_spatial_under_vmap():
    norm = nn.InstanceNorm(3, num_spatial=2, use_scale=False, use_bias=False)
    x = rand(0, 2, 4, 5, 3)
    whole = nn.InstanceNorm(3)(x)
    np.testing.assert_allclose(np.asarray(norm(x)), np.asarray(whole), atol=1e-5)
    per_example = tl.vmap(lambda m, xi: m(xi), in_axes=(None, 0))(norm, x)
    np.testing.assert_allclose(np.asarray(per_example), np.asarray(whole), atol=1e-5)
    two_batch_axes = norm(x.reshape(1, 2, 4, 5, 3))
    np.testing.assert_allclose(np.asarray(two_batch_axes[0]), np.asarray(whole), atol=1e-5)


def test_instance_norm_errors():
    with pytest.raises(ValueError, match="needs\nat least 2 axes"):
        nn.InstanceNorm(3)(jnp.ones(3))
    with pytest.raises(ValueError, match=r"feature_axes=\(0,\) includes axis 0"):
        nn.InstanceNorm(2, feature_axes=0)(jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="the channels must be the last axis"):
        nn.InstanceNorm(2, feature_axes=1, num_spatial=1)
    with pytest.raises(ValueError, match=r"model \(InstanceNorm\): expected input of shape"):
        nn.InstanceNorm(3, num_spatial=1)(jnp.ones((2, 4)))


def test_fast_variance_trades_accuracy_far_from_zero():
    # A spread of 1 around 1e4: E[x^2] - E[x]^2 cancels in float32, two passes do not.
    x = rand(0, 4, 64) + 1e4
    want = (x - x.mean(-1, keepdims=True)) / x.std(-1, keepdims=True)
    exact = np.asarray(nn.LayerNorm(64, use_fast_variance=False)(x))
    fast = np.asarray(nn.LayerNorm(64, use_fast_variance=True)(x))
    assert np.abs(exact - want).max() < 1e-2
    assert np.abs(fast - want).max() > 10 * np.abs(exact - want).max()


def test_batchnorm_custom_initialisers():
    bn = nn.BatchNorm(3, scale_init=jax.nn.initializers.normal(), bias_init=np_init(1), rngs=0)
    assert not np.allclose(np.asarray(bn.scale.value), 1.0)
    np.testing.assert_array_equal(np.asarray(bn.bias.value), rand(1, 3))


# -- masked convolutions --------------------------------------------------------------------------


def test_conv_mask_is_not_trained_and_zeroes_taps():
    mask = jnp.ones((3, 2, 4)).at[2:].set(0)  # causal: output t sees inputs up to t
    conv = nn.Conv(2, 4, 3, mask=mask, padding=((2, 0),), kernel_init=np_init(0), rngs=0)
    assert [p for p, _ in tl.iter_variables(conv, tl.Param)] == [("kernel",), ("bias",)]
    x = rand(0, 1, 6, 2)
    y = conv(x)
    # Changing the future does not change the past.
    x_future = x.copy()
    x_future[0, 5] += 9.0
    np.testing.assert_allclose(np.asarray(conv(x_future))[0, :5], np.asarray(y)[0, :5], atol=1e-6)
    grads = tl.grad(lambda m: m(x).sum())(conv)
    np.testing.assert_array_equal(np.asarray(grads.kernel.value)[2:], 0.0)


def test_conv_mask_shape_error():
    with pytest.raises(ValueError, match=r"needs the kernel's shape\n\(3, 3, 2, 4\)"):
        nn.Conv(4, 4, (3, 3), feature_group_count=2, mask=jnp.ones((3, 3, 4, 4)), rngs=0)
    with pytest.raises(ValueError, match=r"ConvTranspose\(\.\.\., mask=\.\.\.\)"):
        nn.ConvTranspose(2, 4, 3, mask=jnp.ones((3, 4, 2)), rngs=0)


@pytest.mark.parametrize("make", [nn.LSTMCell, nn.GRUCell, nn.SimpleCell])
def test_cell_precision_reaches_the_matmuls(make):
    cell = make(2, 3, precision="highest", rngs=0)
    x = jnp.ones((1, 2))
    carry = cell.initialize_carry(x.shape)
    assert str(jax.make_jaxpr(lambda c, x: cell(c, x))(carry, x)).count("HIGHEST") >= 2


def test_conv_precision_reaches_the_convolution():
    for layer in (
        nn.Conv(2, 3, 3, precision="highest", rngs=0),
        nn.ConvTranspose(2, 3, 3, precision="highest", rngs=0),
    ):
        assert "HIGHEST" in str(jax.make_jaxpr(layer)(jnp.ones((1, 5, 2))))


# -- WeightNorm, SpectralNorm ---------------------------------------------------------------------


def test_weight_norm_keeps_the_raw_weight_and_differentiates_through_it():
    layer = nn.Linear(4, 3, kernel_init=np_init(0), rngs=0)
    wn = nn.WeightNorm(layer, scale_init=np_init(1))
    raw = np.asarray(layer.kernel.value)
    x = rand(2, 5, 4)

    def manual(kernel, scale, bias):
        w = kernel / jnp.sqrt(jnp.sum(kernel**2, axis=0, keepdims=True) + 1e-12) * scale
        return (x @ w + bias).sum()

    for _ in range(2):  # the same on every call: nothing is written back
        np.testing.assert_allclose(
            float(wn(x).sum()), float(manual(raw, wn.scales["kernel"].value, 0.0)), rtol=1e-5
        )
    np.testing.assert_array_equal(np.asarray(layer.kernel.value), raw)
    grads = tl.jit(tl.grad(lambda m: m(x).sum()))(wn)
    want_k, want_s = jax.grad(manual, argnums=(0, 1))(
        jnp.asarray(raw), wn.scales["kernel"].value, 0.0
    )
    np.testing.assert_allclose(np.asarray(grads.layer.kernel.value), want_k, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grads.scales["kernel"].value), want_s, rtol=1e-4)


def test_weight_norm_restores_the_layer_when_it_raises():
    layer = nn.Linear(4, 3, rngs=0)
    wn = nn.WeightNorm(layer)
    raw = layer.kernel.value
    with pytest.raises(ValueError, match=r"expected input of shape \(\.\.\., 4\)"):
        wn(jnp.ones((2, 5)))
    assert layer.kernel.value is raw


def test_spectral_norm_train_eval_and_jit():
    layer = nn.Linear(6, 4, kernel_init=np_init(0), rngs=0)
    sn = nn.SpectralNorm(layer, rngs=1)
    x = rand(1, 3, 6)
    true_sigma = float(np.linalg.norm(np.asarray(layer.kernel.value), 2))
    step = tl.jit(lambda m, x: m(x))
    for _ in range(30):  # one power step per call: the estimate sharpens over calls
        step(sn, x)
    assert abs(float(sn.sigma["kernel"].value) - true_sigma) < 1e-3 * true_sigma
    y = np.asarray(sn(x))
    w = np.asarray(layer.kernel.value) / true_sigma
    np.testing.assert_allclose(y, x @ w + np.asarray(layer.bias.value), rtol=1e-3, atol=1e-4)
    u = np.asarray(sn.u["kernel"].value)
    sn.eval()
    step(sn, x)
    np.testing.assert_array_equal(np.asarray(sn.u["kernel"].value), u)  # nothing stored
    sn.train()
    sn.layer.kernel.value = sn.layer.kernel.value * 3.0  # the raw weight is the parameter
    step(sn, x)
    assert not np.array_equal(np.asarray(sn.sigma["kernel"].value), true_sigma)
    grads = tl.grad(lambda m: m(x).sum())(sn)
    assert sorted(p for p, _ in grads.flat().items()) == [("layer", "bias"), ("layer", "kernel")]


def test_spectral_norm_flattens_kernels_and_checkpoints(tmp_path):
    init = {"kernel_init": np_init(0), "rngs": 0}
    model = nn.Sequential(nn.Conv(2, 3, (3, 3), **init), nn.relu, nn.Conv(3, 1, (1, 1), **init))
    sn = nn.SpectralNorm(model, rngs=2)
    assert sorted(sn.u) == ["layers.0.kernel", "layers.2.kernel"]
    assert sn.u["layers.0.kernel"].shape == (1, 3)
    sn(rand(0, 1, 5, 5, 2))
    tl.save(tmp_path / "sn", sn)
    like = nn.SpectralNorm(
        nn.Sequential(nn.Conv(2, 3, (3, 3), **init), nn.relu, nn.Conv(3, 1, (1, 1), **init)),
        rngs=7,
    )
    loaded = tl.load(tmp_path / "sn", like)
    for key in sn.u:
        np.testing.assert_array_equal(np.asarray(loaded.u[key].value), np.asarray(sn.u[key].value))
    with pytest.raises(ValueError, match=r"layer.layers\[0\].kernel has shape \(3, 3, 2, 3\)"):
        nn.SpectralNorm(model, error_on_non_matrix=True, rngs=0)


# -- EMA ------------------------------------------------------------------------------------------


def test_ema_inside_a_jitted_train_step_matches_numpy():
    model = nn.Sequential(nn.Linear(3, 4, rngs=0), nn.BatchNorm(4), nn.Linear(4, 1, rngs=1))
    optimizer = tl.Optimizer(model, optax.sgd(0.1))
    ema = nn.EMA(model, decay=0.9)
    x, y = rand(0, 8, 3), rand(1, 8, 1)
    want = {p: np.asarray(v.value) for p, v in tl.iter_variables(model, tl.Param)}

    @tl.jit
    def step(model, optimizer, ema, x, y):
        grads = tl.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        ema.update(model)

    for _ in range(4):
        step(model, optimizer, ema, x, y)
        for p, v in tl.iter_variables(model, tl.Param):
            want[p] = 0.9 * want[p] + 0.1 * np.asarray(v.value)
    assert int(ema.count.value) == 4
    for p, v in tl.iter_variables(ema.model, tl.Param):
        np.testing.assert_allclose(np.asarray(v.value), want[p], rtol=1e-5, atol=1e-6)
    # Running statistics are copied, not averaged.
    np.testing.assert_array_equal(
        np.asarray(ema.model.layers[1].mean.value), np.asarray(model.layers[1].mean.value)
    )
    assert ema.model(x).shape == (8, 1)  # the averaged model is a model


def test_ema_warmup_and_errors():
    model = nn.Linear(2, 1, rngs=0)
    ema = nn.EMA(model, decay=0.99, warmup=True)
    assert float(ema.current_decay()) == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    model.bias.value = jnp.ones(1)
    ema.update(model)
    np.testing.assert_allclose(np.asarray(ema.model.bias.value), [0.9])
    assert float(ema.current_decay()) == pytest.approx(2 / 11)
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\]"):
        nn.EMA(model, decay=1.5)
    before = [np.asarray(ema.model.kernel.value), int(ema.count.value)]
    with pytest.raises(ValueError, match=r"model.kernel is \(3, 1\), was \(2, 1\)"):
        ema.update(nn.Linear(3, 1, rngs=0))
    with pytest.raises(ValueError, match=r"missing model.bias"):
        ema.update(nn.Linear(2, 1, use_bias=False, rngs=0))
    np.testing.assert_array_equal(np.asarray(ema.model.kernel.value), before[0])  # unchanged
    assert int(ema.count.value) == before[1]


# -- grouped-query attention ----------------------------------------------------------------------


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 2), (4, 1), (6, 3)])
def test_grouped_query_kv_cache_decoding_equals_the_causal_pass(heads, kv_heads):
    attn = nn.MultiHeadAttention(
        heads, 12, num_kv_heads=kv_heads, kernel_init=np_init(0), bias_init=np_init(1), rngs=0
    )
    x = rand(2, 2, 7, 12)
    full = np.asarray(attn(x, mask=nn.make_causal_mask(jnp.ones((2, 7)))))
    attn.init_cache((2, 7, 12))
    assert attn.cached_key.shape == (2, 7, kv_heads, 12 // heads)  # heads / kv_heads smaller
    step = tl.jit(lambda attn, tokens: attn(tokens, decode=True))  # decode= per call
    prefill = step(attn, x[:, :3])  # a 3-token prefill, then one token at a time
    outs = [prefill] + [step(attn, x[:, t : t + 1]) for t in range(3, 7)]
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)
    assert int(attn.cache_index.value) == 7 and attn.decode is False


def test_grouped_query_errors_keep_rngs_and_out_init():
    with pytest.raises(ValueError, match=r"num_kv_heads must divide num_heads(?s:.*)1, 2, 3, 6"):
        nn.MultiHeadAttention(6, 12, num_kv_heads=4, rngs=0)
    with pytest.raises(ValueError, match="must\ndivide 6"):
        nn.dot_product_attention(jnp.ones((3, 6, 2)), jnp.ones((3, 4, 2)), jnp.ones((3, 4, 2)))
    attn = nn.MultiHeadAttention(2, 4, dropout_rate=0.5, keep_rngs=False, rngs=0)
    assert attn.rngs is None
    with pytest.raises(ValueError, match="keep_rngs=False"):
        attn(jnp.ones((3, 4)))
    assert attn(jnp.ones((3, 4)), rngs=tl.Rngs(1)).shape == (3, 4)
    zeros = nn.MultiHeadAttention(2, 4, out_kernel_init=jax.nn.initializers.zeros, rngs=0)
    assert not np.any(np.asarray(zeros.out.kernel.value))
    assert np.any(np.asarray(zeros.query.kernel.value))


def test_linear_and_attention_precision_reach_the_contractions():
    for layer, x in [
        (nn.Linear(3, 4, precision="highest", rngs=0), jnp.ones((2, 3))),
        (nn.LoRALinear(3, 4, lora_rank=2, precision="highest", rngs=0), jnp.ones((2, 3))),
        (nn.MultiHeadAttention(2, 4, precision="highest", rngs=0), jnp.ones((3, 4))),
    ]:
        text = str(jax.make_jaxpr(layer)(x))
        # Every contraction at the precision asked for.
        assert text.count("dot_general") == text.count("precision=(Precision.HIGHEST") > 0, text
    embed = nn.Embed(5, 3, precision="highest", rngs=0)
    assert "HIGHEST" in str(jax.make_jaxpr(embed.attend)(jnp.ones((2, 3))))
