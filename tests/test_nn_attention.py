"""Tests for attention: masks, dot_product_attention, MultiHeadAttention and its KV cache."""

import itertools

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest
from conftest import rand
from flax import nnx

import toylib as tl
from toylib import nn

# A few fixed sizes, shared by the tests: every new shape costs an XLA compile
# (about a second for an attention layer on a small CPU), so most forward
# passes go through the two compiled calls below, which cache per structure
# and shape across tests; a few tests stay eager on purpose.
F = 6  # input features
L = 5  # query (and self-attention) length
LK = 7  # key/value length in cross-attention
TOL = dict(rtol=1e-5, atol=1e-5)

run = tl.jit(lambda m, *args, **kwargs: m(*args, **kwargs))
run_nnx = nnx.jit(lambda m, *args, **kwargs: m(*args, **kwargs))


def numpy_init(seed=0):
    """Kernels from numpy, scaled like LeCun normal.

    Drawing them with jax.random eagerly would compile a few ops for every
    new kernel shape; the default initialiser is tested once, compiled.
    """
    seeds = itertools.count(10 * seed)

    def kernel_init(key, shape, dtype):
        return jnp.asarray(rand(next(seeds), *shape) / np.sqrt(shape[0]), dtype)

    return kernel_init


def make(num_heads=2, in_features=F, seed=0, **kwargs):
    """A layer with random (nonzero) biases, so that their wiring is tested too."""
    kwargs.setdefault("kernel_init", numpy_init(seed))
    kwargs.setdefault("rngs", seed)
    attn = nn.MultiHeadAttention(num_heads, in_features, **kwargs)
    for i, name in enumerate(("query", "key", "value", "out")):
        layer = getattr(attn, name)
        if layer.bias is not None:
            layer.bias = jnp.asarray(rand(100 + i, *layer.bias.value.shape))
    return attn


def to_nnx(attn):
    """flax.nnx.MultiHeadAttention holding a copy of ``attn``'s weights."""
    ref = nnx.MultiHeadAttention(
        attn.num_heads,
        attn.in_features,
        qkv_features=attn.qkv_features,
        out_features=attn.out_features,
        in_kv_features=attn.in_kv_features,
        use_bias=attn.query.bias is not None,
        normalize_qk=attn.query_ln is not None,
        decode=False,
        kernel_init=lambda key, shape, dtype: jnp.zeros(shape, dtype),  # overwritten below
        rngs=nnx.Rngs(1),
    )
    for name in ("query", "key", "value", "out"):
        mine, theirs = getattr(attn, name), getattr(ref, name)
        assert theirs.kernel[...].shape == mine.kernel.value.shape  # same layout: a plain copy
        theirs.kernel[...] = jnp.asarray(mine.kernel.value)
        if mine.bias is not None:
            theirs.bias[...] = jnp.asarray(mine.bias.value)
    if attn.query_ln is not None:
        ref.query_ln.scale[...] = jnp.asarray(attn.query_ln.scale.value)
        ref.key_ln.scale[...] = jnp.asarray(attn.key_ln.scale.value)
    return ref


def padding(seed, *shape):
    """A boolean (*batch, length) array of valid positions: a random prefix of each row."""
    lengths = np.random.default_rng(seed).integers(1, shape[-1] + 1, size=shape[:-1])
    return np.arange(shape[-1]) < np.asarray(lengths)[..., None]


def causal(*shape):
    """numpy twin of nn.make_causal_mask for tokens of shape (*batch, length)."""
    tril = np.tril(np.ones((shape[-1], shape[-1]), bool))
    return np.broadcast_to(tril, (*shape[:-1], 1, shape[-1], shape[-1]))


def pairs(q_valid, k_valid):
    """numpy twin of nn.make_attention_mask for boolean inputs."""
    return q_valid[..., None, :, None] & k_valid[..., None, None, :]


def close(a, b, **tol):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **(tol or TOL))


# -- masks ------------------------------------------------------------------------------------


def test_make_causal_mask_shape_dtype_and_values(monkeypatch):
    # Bad input on purpose: toylib's own message, not the runtime type checker's.
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)
    mask = nn.make_causal_mask(jnp.zeros((2, 3, 4), jnp.int32))
    assert mask.shape == (2, 3, 1, 4, 4)
    assert mask.dtype == jnp.bool_
    assert (np.asarray(mask) == np.tril(np.ones((4, 4), bool))).all()
    assert nn.make_causal_mask(np.zeros(4)).shape == (1, 4, 4)
    assert (np.asarray(nn.make_causal_mask(np.zeros((2, L)))) == causal(2, L)).all()
    with pytest.raises(ValueError, match="length"):
        nn.make_causal_mask(jnp.array(1.0))


def test_make_attention_mask_padding_and_pairwise_fn():
    q_valid = np.array([[True, True, False], [True, False, False]])
    k_valid = np.array([[True, False, True, True], [True, True, True, False]])
    mask = nn.make_attention_mask(q_valid, k_valid)
    assert mask.shape == (2, 1, 3, 4)
    assert mask.dtype == jnp.bool_
    assert (np.asarray(mask) == q_valid[:, None, :, None] & k_valid[:, None, None, :]).all()
    # Integer token ids: nonzero products keep the pair.
    tokens = np.array([[3, 5, 0]])
    ids = nn.make_attention_mask(tokens, tokens)
    assert (np.asarray(ids[0, 0]) == (tokens[0, :, None] * tokens[0, None, :] != 0)).all()
    # Another pairwise function: segment ids, attend within a segment only.
    seg = np.array([0, 0, 1, 1])
    same = nn.make_attention_mask(seg, seg, jnp.equal)
    assert same.shape == (1, 4, 4)
    assert (np.asarray(same[0]) == (seg[:, None] == seg[None, :])).all()


# -- dot_product_attention --------------------------------------------------------------------

attention = jax.jit(nn.dot_product_attention, static_argnames=("dropout_rate", "broadcast_dropout"))
attention_weights = jax.jit(nn.dot_product_attention_weights)


def numpy_attention(q, k, v, mask=None):
    """Softmax attention on (*batch, len, heads, dim) arrays, in float64."""
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    logits = np.einsum("...qhd,...khd->...hqk", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        logits = np.where(mask, logits, -1e30)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    return np.einsum("...hqk,...khd->...qhd", w, v), w


def test_dot_product_attention_matches_numpy():
    q, k, v = rand(0, 2, L, 3, 4), rand(1, 2, LK, 3, 4), rand(2, 2, LK, 3, 2)
    mask = pairs(padding(3, 2, L), padding(4, 2, LK)) | (np.arange(LK) == 0)  # no empty row
    want, want_w = numpy_attention(q, k, v, mask)
    close(attention(q, k, v, mask), want)
    weights = attention_weights(q, k, mask)
    assert weights.shape == (2, 3, L, LK)
    close(weights, want_w)
    assert not np.asarray(weights)[~np.broadcast_to(mask, weights.shape)].any()
    # A query whose keys are all masked attends uniformly (no NaN).
    mask[:, :, 0] = False
    weights = np.asarray(attention_weights(q, k, mask))
    assert np.isfinite(weights).all()
    close(weights[:, :, 0], np.full((2, 3, LK), 1 / LK))


def test_dot_product_attention_bad_mask_shape():
    q, k = rand(0, 2, L, 3, 4), rand(1, 2, LK, 3, 4)
    with pytest.raises(ValueError) as info:
        attention(q, k, k, np.ones((2, L, LK + 1), bool))
    message = str(info.value)
    assert f"(2, {L}, {LK + 1})" in message and f"(2, 3, {L}, {LK})" in message
    assert "make_attention_mask" in message


@pytest.mark.parametrize("broadcast", [True, False], ids=["broadcast", "full"])
def test_dot_product_attention_dropout(broadcast):
    q, k, v = rand(0, 2, L, 3, 4), rand(1, 2, LK, 3, 4), rand(2, 2, LK, 3, 4)
    key, rate = jax.random.key(7), 0.5
    shape = (1, 1, L, LK) if broadcast else (2, 3, L, LK)

    @jax.jit
    def dropped_and_mask(key):
        got = nn.dot_product_attention(
            q, k, v, dropout_rate=rate, dropout_rng=key, broadcast_dropout=broadcast
        )
        # jax.random.bernoulli's mask for this shape (drawn flat: the same
        # values, and a rank-4 draw compiles slowly on CPU).
        keep = jax.random.bernoulli(key, 1 - rate, (int(np.prod(shape)),)).reshape(shape)
        return got, keep, nn.dot_product_attention_weights(q, k)

    got, keep, weights = map(np.asarray, dropped_and_mask(key))
    assert 0 < keep.mean() < 1
    close(got, np.einsum("...hqk,...khd->...qhd", weights * keep / (1 - rate), v))
    if broadcast:
        with pytest.raises(ValueError, match="dropout_rng"):
            attention(q, k, v, dropout_rate=rate)
        assert not np.asarray(attention(q, k, v, dropout_rate=1.0)).any()


# -- MultiHeadAttention against flax.nnx and numpy --------------------------------------------


def test_self_attention_one_head_padding_mask_no_bias_matches_flax():
    attn = make(1, use_bias=False)
    assert attn.query.bias is None and attn.out.bias is None
    ref = to_nnx(attn)
    x = rand(1, 2, L, F)
    valid = padding(5, 2, L)
    mask = pairs(valid, valid)
    # k defaults to q and v to k: three spellings of self-attention in one program.
    calls = tl.jit(lambda m, x, mask: (m(x, mask=mask), m(x, x, mask=mask), m(x, x, x, mask=mask)))
    y, y2, y3 = calls(attn, x, mask)
    assert y.shape == (2, L, F)
    close(y, run_nnx(ref, jnp.asarray(x), mask=mask))
    close(y2, y)
    close(y3, y)


def test_self_attention_three_heads_two_batch_dims_matches_flax():
    # qkv_features != in_features != out_features; padding and causal masks combined.
    attn = make(3, qkv_features=9, out_features=4)
    assert attn.head_dim == 3
    ref = to_nnx(attn)
    x = rand(1, 2, 3, L, F)
    valid = padding(5, 2, 3, L)
    mask = pairs(valid, valid) & causal(2, 3, L)
    y = run(attn, x, mask=mask)
    assert y.shape == (2, 3, L, 4)
    close(y, run_nnx(ref, jnp.asarray(x), mask=mask))


def test_normalize_qk_matches_flax():
    attn = make(3, qkv_features=9, normalize_qk=True)
    assert attn.query_ln.scale.value.shape == (3,) and attn.query_ln.bias is None
    attn.query_ln.scale = jnp.asarray(rand(7, 3)) + 1.0
    attn.key_ln.scale = jnp.asarray(rand(8, 3)) + 1.0
    ref = to_nnx(attn)
    x = rand(1, 2, L, F)
    mask = causal(2, L)
    y = run(attn, x, mask=mask)
    close(y, run_nnx(ref, jnp.asarray(x), mask=mask))
    # The norms change the result: without them it is another function.
    attn.query_ln = attn.key_ln = None
    assert not np.allclose(np.asarray(run(attn, x, mask=mask)), np.asarray(y), atol=1e-3)


def test_cross_attention_no_batch_matches_flax_and_numpy():
    # Keys/values longer than the queries, from a memory of another width.
    attn = make(3, qkv_features=9, out_features=4, in_kv_features=3)
    assert attn.key.kernel.value.shape == (3, 3, 3)
    assert attn.query.kernel.value.shape == (F, 3, 3)
    ref = to_nnx(attn)
    q, k, v = rand(1, L, F), rand(2, LK, 3), rand(3, LK, 3)
    mask = pairs(padding(4, L), padding(5, LK)) | (np.arange(LK) == 0)  # no empty row
    calls = tl.jit(lambda m, q, k, v, mask: (m(q, k, v, mask=mask), m(q, k, mask=mask)))
    y, y_kk = calls(attn, q, k, v, mask)
    assert y.shape == (L, 4)
    close(y, run_nnx(ref, *map(jnp.asarray, (q, k, v)), mask=mask))

    # The same from numpy, weight by weight.
    def project(layer, x):
        y = np.einsum("...f,fhd->...hd", x, np.asarray(layer.kernel.value))
        return y + np.asarray(layer.bias.value)

    heads, _ = numpy_attention(
        project(attn.query, q), project(attn.key, k), project(attn.value, v), mask
    )
    out = np.einsum("...hd,hdo->...o", heads, np.asarray(attn.out.kernel.value))
    close(y, out + np.asarray(attn.out.bias.value))
    # Only k given: it is the values too.
    heads, _ = numpy_attention(
        project(attn.query, q), project(attn.key, k), project(attn.value, k), mask
    )
    out = np.einsum("...hd,hdo->...o", heads, np.asarray(attn.out.kernel.value))
    close(y_kk, out + np.asarray(attn.out.bias.value))


def test_parameter_layout_and_default_init():
    # Built inside jax.jit: one compiled program instead of eager random ops.
    attn = jax.jit(
        lambda: nn.MultiHeadAttention(4, 256, qkv_features=64, out_features=32, rngs=0)
    )()
    assert isinstance(attn, nn.MultiHeadAttention) and attn.head_dim == 16
    shapes = {path: v.value.shape for path, v in tl.state(attn, tl.Param).flat().items()}
    assert shapes == {
        ("query", "kernel"): (256, 4, 16),
        ("query", "bias"): (4, 16),
        ("key", "kernel"): (256, 4, 16),
        ("key", "bias"): (4, 16),
        ("value", "kernel"): (256, 4, 16),
        ("value", "bias"): (4, 16),
        ("out", "kernel"): (4, 16, 32),
        ("out", "bias"): (32,),
    }
    # No dropout, no cache yet: the state is the Params only.
    assert set(tl.state(attn).flat()) == set(shapes)
    # LeCun normal on the equivalent dense shape: std 1/sqrt(fan_in) with
    # fan_in = in_features (256) for query/key/value, qkv_features (64) for out.
    for name in ("query", "key", "value"):
        std = np.asarray(getattr(attn, name).kernel.value).std()
        assert abs(std * 16 - 1) < 0.05, (name, std)
    assert abs(np.asarray(attn.out.kernel.value).std() * 8 - 1) < 0.1
    assert not np.asarray(attn.query.bias.value).any()  # zero biases by default
    # Independent draws per projection.
    assert not np.allclose(np.asarray(attn.query.kernel.value), np.asarray(attn.key.kernel.value))


def test_custom_initialisers_and_param_dtype():
    calls = []

    def kernel_init(key, shape, dtype):
        calls.append((shape, dtype))
        return jnp.full(shape, 0.5, dtype)

    attn = nn.MultiHeadAttention(
        3,
        F,
        qkv_features=9,
        out_features=4,
        kernel_init=kernel_init,
        bias_init=jax.nn.initializers.ones,
        param_dtype=jnp.bfloat16,
        rngs=0,
    )
    # Initialisers see the equivalent dense shapes, so fan-in based ones (the
    # default LeCun normal) scale by in_features, and by qkv_features for `out`.
    assert calls == [((F, 9), jnp.bfloat16)] * 3 + [((9, 4), jnp.bfloat16)]
    for name in ("query", "key", "value", "out"):
        layer = getattr(attn, name)
        assert layer.kernel.value.dtype == jnp.bfloat16
        assert (np.asarray(layer.kernel.value, np.float32) == 0.5).all()
        assert (np.asarray(layer.bias.value, np.float32) == 1).all()
    # Default dtype promotes: a float32 input computes in float32.
    out = jax.eval_shape(lambda m, x: m(x), attn, jnp.ones((2, L, F)))
    assert out.shape == (2, L, 4) and out.dtype == jnp.float32


def test_bfloat16_compute_with_float32_params():
    attn = make(2, dtype=jnp.bfloat16)
    x = rand(1, 2, L, F)
    mask = causal(2, L)
    y = run(attn, x, mask=mask)
    assert y.dtype == jnp.bfloat16
    assert all(v.value.dtype == jnp.float32 for v in tl.state(attn, tl.Param).flat().values())
    want = run(make(2), x, mask=mask)  # the same weights, float32 compute
    assert want.dtype == jnp.float32
    close(y, want, rtol=5e-2, atol=5e-2)
    # The decode cache defaults to the compute dtype.
    attn.init_cache((2, L, F))
    attn.decode = True
    assert attn.cached_key.value.dtype == jnp.bfloat16
    assert jax.eval_shape(lambda m, x: m(x), attn, x[:, :1]).dtype == jnp.bfloat16


def test_grad_matches_flax():
    attn = make(3, qkv_features=9, out_features=4)
    ref = to_nnx(attn)
    x = rand(1, 2, L, F)
    mask = causal(2, L)

    def loss(m):
        return jnp.sum(m(x, mask=mask) ** 2)

    # tl.grad and raw jax.grad, in one compiled program.
    grads, raw = tl.jit(lambda m: (tl.grad(loss)(m), jax.grad(loss)(m)))(attn)
    want = nnx.jit(nnx.grad(loss))(ref)
    for name in ("query", "key", "value", "out"):
        for param in ("kernel", "bias"):
            expected = getattr(getattr(want, name), param)[...]
            close(grads[name][param].value, expected, rtol=1e-4, atol=1e-5)
            close(getattr(getattr(raw, name), param).value, expected, rtol=1e-4, atol=1e-5)


# -- errors -----------------------------------------------------------------------------------


class Block(tl.Module):
    def __init__(self):
        self.attn = nn.MultiHeadAttention(2, F, kernel_init=numpy_init(), rngs=0)

    def __call__(self, x, memory=None):
        return self.attn(x, memory)


def test_wrong_in_features_names_path_and_shapes(monkeypatch):
    # Bad input on purpose: toylib's own message, not the runtime type checker's.
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)
    block = Block()
    with pytest.raises(ValueError) as info:
        block(jnp.ones((2, L, F + 1)))
    message = str(info.value)
    assert "model.attn (MultiHeadAttention)" in message
    assert f"(..., {F})" in message and f"(2, {L}, {F + 1})" in message
    assert f"in_features={F + 1}" in message
    # A wrong memory (key/value) width names the same layer and its shape.
    with pytest.raises(ValueError) as info:
        block(jnp.ones((2, L, F)), jnp.ones((2, LK, 4)))
    assert "model.attn (MultiHeadAttention)" in str(info.value)
    assert f"(2, {LK}, 4)" in str(info.value) and "in_kv_features=4" in str(info.value)
    # No length axis.
    with pytest.raises(ValueError, match="length axis"):
        block(jnp.ones(F))


def test_constructor_and_call_errors(monkeypatch):
    # Bad input on purpose: toylib's own message, not the runtime type checker's.
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)
    with pytest.raises(ValueError) as info:
        nn.MultiHeadAttention(4, F, rngs=0)
    assert "divisible" in str(info.value) and "qkv_features=" in str(info.value)
    with pytest.raises(ValueError, match="dropout_rate"):
        nn.MultiHeadAttention(2, F, dropout_rate=1.5, rngs=0)
    attn = make(2)
    x = jnp.ones((L, F))
    with pytest.raises(ValueError, match="`v` but no `k`"):
        attn(x, v=x)
    with pytest.raises(ValueError, match="same length"):
        attn(x, x, jnp.ones((LK, F)))


# -- dropout ----------------------------------------------------------------------------------


# The three modes in one compiled program: the layer's own flag, then forced
# deterministic, then forced training.
modes = tl.jit(lambda m, x: (m(x), m(x, deterministic=True), m(x, deterministic=False)))


def dropout_layer(rngs=None, **kwargs):
    rngs = tl.Rngs(0, dropout=1) if rngs is None else rngs
    return make(2, dropout_rate=0.5, rngs=rngs, **kwargs)


def test_dropout_training_differs_and_advances_the_stream():
    rngs = tl.Rngs(0, dropout=1)
    attn = dropout_layer(rngs)
    assert attn.rngs is rngs.dropout  # keeps the stream, as nn.Dropout does
    assert int(rngs.dropout.count.value) == 0
    x = rand(1, 2, L, F)
    a, clean, b = map(np.asarray, modes(attn, x))
    assert int(rngs.dropout.count.value) == 2  # one key per training call
    assert not np.allclose(a, b)
    assert not np.allclose(a, clean)
    close(clean, run_nnx(to_nnx(attn), jnp.asarray(x)))  # no dropout: flax's answer
    # The counter lives outside the compiled program: new masks on every call.
    c, clean2, _ = map(np.asarray, modes(attn, x))
    assert int(rngs.dropout.count.value) == 4
    assert not np.allclose(a, c)
    np.testing.assert_array_equal(clean2, clean)
    # Same seeds, same sequence.
    again = dropout_layer()
    again_a, _, again_b = modes(again, x)
    close(again_a, a)
    close(again_b, b)


def test_dropout_deterministic_flag_eval_and_train():
    x = rand(1, 2, L, F)
    attn = dropout_layer(deterministic=True)
    a, clean, b = map(np.asarray, modes(attn, x))
    np.testing.assert_array_equal(a, clean)  # built deterministic
    assert not np.allclose(b, clean)
    assert int(attn.rngs.count.value) == 1  # only the forced training call drew a key
    model = nn.Sequential(attn)
    model.train()  # reaches the nested layer
    assert attn.deterministic is False
    a, clean_train, _ = map(np.asarray, modes(attn, x))
    assert not np.allclose(a, clean)
    np.testing.assert_array_equal(clean_train, clean)
    model.eval()
    assert attn.deterministic is True
    a, _, _ = map(np.asarray, modes(attn, x))
    np.testing.assert_array_equal(a, clean)


def test_dropout_rngs_override_and_missing_stream():
    attn = dropout_layer()
    x = rand(1, 2, L, F)
    override = tl.Rngs(dropout=5)
    y = np.asarray(run(attn, x, rngs=override))
    assert int(override.dropout.count.value) == 1
    assert int(attn.rngs.count.value) == 0  # own stream untouched
    close(run(attn, x, rngs=tl.Rngs(dropout=5)), y)
    assert not np.allclose(np.asarray(run(attn, x, rngs=tl.Rngs(dropout=6))), y)
    # Built without dropout (no stream kept), then given some: a clear error.
    plain = make(2)
    assert plain.rngs is None
    plain.dropout_rate = 0.5
    with pytest.raises(ValueError) as info:
        run(plain, x)
    assert "Fix" in str(info.value) and "rngs" in str(info.value)


# -- decoding with a KV cache -----------------------------------------------------------------


def full_causal(attn, x):
    assert not attn.decode
    return run(attn, x, mask=causal(*x.shape[:-1]))


def decode_in_chunks(attn, x, sizes, step=None):
    step = step or (lambda m, x: m(x))
    outs, start = [], 0
    for size in sizes:
        outs.append(step(attn, x[..., start : start + size, :]))
        start += size
    assert start == x.shape[-2]
    return jnp.concatenate(outs, axis=-2)


def test_token_by_token_decoding_equals_causal_forward():
    max_len = 8  # longer than the sequence: unwritten positions must stay hidden
    attn = make(2)
    x = rand(1, 2, L, F)
    want = full_causal(attn, x)
    close(want, run_nnx(to_nnx(attn), jnp.asarray(x), mask=causal(2, L)))
    attn.init_cache((2, max_len, F))
    assert isinstance(attn.cached_key, tl.Cache) and isinstance(attn.cache_index, tl.Cache)
    assert attn.cached_key.value.shape == (2, max_len, 2, 3)
    attn.decode = True
    close(decode_in_chunks(attn, x, [1] * L), want)  # eager
    assert int(attn.cache_index.value) == L
    # The cache holds the projected keys of the sequence, zeros after it.
    close(
        attn.cached_key.value[:, :L],
        jnp.einsum("blf,fhd->blhd", x, attn.key.kernel.value) + attn.key.bias.value,
    )
    assert not np.asarray(attn.cached_key.value[:, L:]).any()


def test_jitted_decode_loop_updates_the_cache_in_place():
    attn = make(2)
    x, y = rand(1, 2, L, F), rand(2, 2, L, F)
    want_x, want_y = full_causal(attn, x), full_causal(attn, y)
    attn.init_cache((2, L, F))
    attn.decode = True
    key_cache = attn.cached_key

    @tl.jit
    def step(model, token):
        return model(token)

    close(decode_in_chunks(attn, x, [1] * L, step), want_x)
    assert attn.cached_key is key_cache  # the same Variable, updated in place
    assert int(attn.cache_index.value) == L
    # A new sequence: init_cache resets, and the compiled step is reused.
    attn.init_cache((2, L, F))
    assert int(attn.cache_index.value) == 0
    close(decode_in_chunks(attn, y, [1] * L, step), want_y)
    assert int(attn.cache_index.value) == L


@pytest.mark.parametrize("sizes", [(2, 3), (3, 2)])
def test_chunked_decoding_equals_causal_forward(sizes):
    attn = make(2)
    x = rand(1, 2, L, F)
    want = full_causal(attn, x)
    attn.init_cache((2, 8, F))
    attn.decode = True
    close(decode_in_chunks(attn, x, sizes, run), want)
    assert int(attn.cache_index.value) == L


def test_decoding_with_two_batch_dims():
    attn = make(2)
    x = rand(1, 2, 3, L, F)
    want = full_causal(attn, x)
    attn.init_cache((2, 3, L, F))
    attn.decode = True
    close(decode_in_chunks(attn, x, [1] * L, run), want)


def test_decoding_with_a_padding_mask():
    # A user mask over the cache positions (here: hidden keys) combines with causality.
    # (Key 0 stays visible: a query with no visible key attends uniformly over
    # whatever the mask spans, which differs between the two passes by design.)
    attn = make(2)
    x = rand(1, 2, L, F)
    valid = np.ones((2, L), bool)
    valid[0, 1] = valid[1, 3] = False
    pad = pairs(np.ones((2, L), bool), valid)
    want = run(attn, x, mask=pad & causal(2, L))
    attn.init_cache((2, L, F))
    attn.decode = True
    outs = [run(attn, x[:, t : t + 1], mask=pad[:, :, t : t + 1]) for t in range(L)]
    close(jnp.concatenate(outs, axis=1), want)


def test_decode_errors():
    attn = make(2, decode=True)
    x = jnp.ones((2, 1, F))
    with pytest.raises(ValueError) as info:
        attn(x)
    assert "init_cache" in str(info.value) and "Fix" in str(info.value)
    with pytest.raises(ValueError, match="init_cache"):
        attn.init_cache((2, L))  # no features axis
    attn.init_cache((2, 3, F))
    with pytest.raises(ValueError) as info:
        attn(jnp.ones((3, 1, F)))  # another batch size
    assert "(2,)" in str(info.value) and f"(3, 1, {F})" in str(info.value)
    with pytest.raises(ValueError, match="3 new tokens"):
        attn(jnp.ones((2, 4, F)))  # more new tokens than the cache holds
    with pytest.raises(ValueError, match="query's length"):
        attn(x, jnp.ones((2, 2, F)))
    assert int(attn.cache_index.value) == 0  # nothing written by the failed calls


def test_writing_past_the_cache_end_is_an_error_outside_jit():
    attn = make(2)
    x = rand(1, 2, L, F)
    attn.init_cache((2, L, F))
    attn.decode = True
    attn(x[:, :3])
    with pytest.raises(ValueError) as info:
        attn(x[:, 3:5].repeat(2, axis=1)[:, :3])  # 3 more tokens, 2 places left
    message = str(info.value)
    assert "KV cache is full" in message and "5 positions, 3 are written" in message
    assert "nn.init_cache(model, 2, max_length)" in message and "Fix" in message
    assert int(attn.cache_index.value) == 3  # the failed call wrote nothing
    attn(x[:, 3:5])  # exactly filling it is fine
    assert int(attn.cache_index.value) == L


def test_writing_past_the_cache_end_is_an_error_inside_jit_and_stack():
    attn = make(2)
    x = rand(1, 2, L, F)
    attn.init_cache((2, L, F))
    attn.decode = True
    step = tl.jit(lambda m, x: m(x))
    step(attn, x[:, :3])
    before = attn.cached_key.value
    with pytest.raises(tl.RuntimeCheckError, match="KV cache is full"):
        step(attn, x[:, :3])  # traced index: 3 written + 3 new > 5
    assert attn.cached_key.value is before  # on CPU the failed step wrote nothing back
    step(attn, x[:, 3:5])  # filling it exactly is fine
    assert int(attn.cache_index.value) == L
    # Eagerly inside an nn.Stack the blocks' indices are traced by the scan.
    stack = nn.Stack(lambda rngs: nn.MultiHeadAttention(2, F, rngs=rngs), 2, rngs=tl.Rngs(0))
    nn.init_cache(stack, 2, 4)
    nn.set_decode(stack, True)
    stack(x[:, :3])
    with pytest.raises(tl.RuntimeCheckError, match="KV cache is full"):
        stack(x[:, :2])


def test_causal_flag_equals_an_explicit_causal_mask():
    attn = make(2, causal=True)
    x = rand(1, 2, L, F)
    reference = make(2)
    want = run(reference, x, mask=causal(2, L))
    close(run(attn, x), want)
    # Combined with a user mask: both must keep a pair.
    valid = padding(3, 2, L)
    valid[:, 0] = True
    pad = pairs(np.ones((2, L), bool), valid)
    close(run(attn, x, mask=pad), run(reference, x, mask=pad & causal(2, L)))
    # Decoding the same layer needs no mask either: prefill 3 tokens, then one at a time.
    attn.init_cache((2, 8, F))
    attn.decode = True
    close(decode_in_chunks(attn, x, [3, 1, 1], run), want)


def test_init_cache_and_set_decode_reach_every_attention_layer_stack_included():
    class Block(tl.Module):
        def __init__(self, rngs):
            self.attn = nn.MultiHeadAttention(2, F, causal=True, rngs=rngs)

        def __call__(self, x):
            return x + self.attn(x)

    class Model(tl.Module):
        def __init__(self, rngs):
            self.blocks = nn.Stack(Block, 3, rngs=rngs)
            self.head = nn.MultiHeadAttention(2, F, causal=True, rngs=rngs)

        def __call__(self, x):
            return self.head(self.blocks(x))

    model = Model(tl.Rngs(0))
    x = rand(2, 2, L, F)
    want = run(model, x)
    assert nn.init_cache(model, 2, 8) is model
    assert model.blocks.blocks.attn.cached_key.value.shape == (3, 2, 8, 2, 3)  # one per block
    assert model.head.cached_key.value.shape == (2, 8, 2, 3)
    assert not model.head.decode
    assert nn.set_decode(model) is model
    assert model.head.decode and model.blocks.blocks.attn.decode
    close(decode_in_chunks(model, x, [2, 1, 2], run), want)
    np.testing.assert_array_equal(np.asarray(model.blocks.blocks.attn.cache_index), [L] * 3)
    assert int(model.head.cache_index.value) == L
    nn.set_decode(model, False)
    assert not model.head.decode and not model.blocks.blocks.attn.decode
    close(run(model, x), want)
    # Called again: fresh caches for a new sequence.
    nn.init_cache(model, 2, 8)
    assert int(model.head.cache_index.value) == 0
    with pytest.raises(ValueError, match="found no nn.MultiHeadAttention"):
        nn.init_cache(nn.Linear(2, 2, rngs=0), 1, 4)
    with pytest.raises(ValueError, match="no layer of this Linear has a `decode`"):
        nn.set_decode(nn.Linear(2, 2, rngs=0))
