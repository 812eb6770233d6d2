"""Tests for nn.Embed (lookup and the tied output projection ``attend``) and nn.Identity."""

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest
from conftest import rand
from flax import nnx

import toylib as tl
from toylib import nn

V, F = 11, 5  # vocabulary and feature sizes (odd)
IDS = [(), (4,), (2, 3)]  # id shapes: none, one, two batch axes
BF16 = jnp.bfloat16


def ids_of(seed, shape):
    return np.random.default_rng(seed).integers(0, V, size=shape).astype(np.int32)


def close(got, want, tol=1e-5):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol)


# -- Embed: lookup ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", IDS, ids=["none", "one", "two"])
def test_embed_lookup_any_id_shape(shape):
    embed = nn.Embed(V, F, rngs=0)
    assert isinstance(embed.embedding, tl.Param)
    assert embed.embedding.value.shape == (V, F)
    table = np.asarray(embed.embedding.value)
    ids = ids_of(1, shape)
    y = embed(ids)
    assert y.shape == (*shape, F) and y.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y), table[ids])


def test_embed_matches_nnx_lookup_and_attend():
    embed = nn.Embed(V, F, rngs=0)
    ref = nnx.Embed(V, F, rngs=nnx.Rngs(1))
    ref.embedding[...] = embed.embedding.value
    ids = ids_of(1, (2, 3))
    np.testing.assert_array_equal(np.asarray(embed(ids)), np.asarray(ref(ids)))
    q = rand(2, 2, 3, F)
    close(embed.attend(q), np.asarray(ref.attend(q), np.float64))


def test_embed_ids_of_other_int_dtypes_and_python_lists_refused(monkeypatch):
    # Bad input on purpose: toylib's own message, not the runtime type checker's.
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)
    embed = nn.Embed(V, F, rngs=0)
    table = np.asarray(embed.embedding.value)
    with pytest.raises(TypeError, match=r"(?s)Python list.*embed\(jnp\.asarray\(ids\)\)"):
        embed([1, 2, 10])
    np.testing.assert_array_equal(np.asarray(embed(jnp.asarray([1, 2, 10]))), table[[1, 2, 10]])
    np.testing.assert_array_equal(np.asarray(embed(np.uint8(7))), table[7])
    np.testing.assert_array_equal(np.asarray(embed(jnp.array([3], jnp.int16))), table[[3]])


def test_embed_out_of_range_ids_follow_jnp_take():
    # Negative ids count from the end; ids past either end give NaN rows
    # (no error is possible under jit), as in Flax.
    embed = nn.Embed(V, F, rngs=0)
    table = np.asarray(embed.embedding.value)
    y = np.asarray(embed(np.array([-1, V, 0], np.int32)))
    np.testing.assert_array_equal(y[0], table[V - 1])
    assert np.isnan(y[1]).all()
    np.testing.assert_array_equal(y[2], table[0])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bool_], ids=["float", "bool"])
def test_embed_rejects_non_integer_ids(dtype, monkeypatch):
    # Bad input on purpose: toylib's own message, not the runtime type checker's.
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)
    embed = nn.Embed(V, F, rngs=0)
    with pytest.raises(TypeError) as info:
        embed(jnp.zeros((2, 3), dtype))
    message = str(info.value)
    assert "integer ids" in message and "(2, 3)" in message
    assert jnp.dtype(dtype).name in message and "astype(jnp.int32)" in message
    assert "Embed" in message
    with pytest.raises(TypeError, match="integer ids"):
        embed(1.0)


# -- Embed: initialisation and dtypes ---------------------------------------------------------


def test_embed_default_init_is_flax_variance_scaling():
    embed = nn.Embed(1000, 16, rngs=0)
    table = np.asarray(embed.embedding.value)
    # Normal with variance 1 / features: std 0.25, and unbounded tails
    # (a uniform init of the same variance stops at 0.25 * sqrt(3)).
    assert abs(table.std() - 0.25) < 0.01 and abs(table.mean()) < 0.01
    assert np.abs(table).max() > 0.25 * 3
    # The same seed gives the same table; another seed another.
    np.testing.assert_array_equal(np.asarray(nn.Embed(1000, 16, rngs=0).embedding.value), table)
    other = nn.Embed(1000, 16, rngs=tl.Rngs(params=1)).embedding.value
    assert not np.allclose(np.asarray(other), table)
    # And equals Flax's default initialiser given the same key.
    key = tl.Rngs(0).params()
    close(
        table,
        np.asarray(
            nnx.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)(key, (1000, 16))
        ),
    )


def test_embed_custom_init_and_param_dtype():
    embed = nn.Embed(V, F, embedding_init=jax.nn.initializers.ones, param_dtype=BF16, rngs=0)
    assert embed.embedding.value.dtype == BF16
    np.testing.assert_array_equal(np.asarray(embed.embedding.value, np.float32), np.ones((V, F)))
    y = embed(ids_of(1, (4,)))
    assert y.dtype == BF16  # a lookup keeps the table's dtype
    # attend promotes with a float32 query.
    assert embed.attend(jnp.ones((4, F))).dtype == jnp.float32


def test_embed_bf16_compute_keeps_float32_params():
    embed = nn.Embed(V, F, dtype=BF16, rngs=0)
    table = np.asarray(embed.embedding.value)
    ids = ids_of(1, (2, 3))
    y = embed(ids)
    assert y.dtype == BF16 and embed.embedding.value.dtype == jnp.float32
    close(y, table[ids], tol=1e-2)
    q = rand(2, 4, F)
    logits = embed.attend(q)
    assert logits.dtype == BF16
    close(logits, q @ table.T, tol=5e-2)


# -- Embed: attend ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", IDS, ids=["none", "one", "two"])
def test_attend_is_query_times_table_transposed(shape):
    embed = nn.Embed(V, F, rngs=0)
    table = np.asarray(embed.embedding.value)
    q = rand(3, *shape, F)
    logits = embed.attend(q)
    assert logits.shape == (*shape, V)
    close(logits, q.astype(np.float64) @ table.T.astype(np.float64))
    # Tied: the logit of id i for the query table[i] is |table[i]|^2.
    own = embed.attend(embed(np.arange(V)))
    close(np.diag(np.asarray(own)), (table.astype(np.float64) ** 2).sum(-1))


def test_attend_wrong_feature_size_is_a_clear_error():
    embed = nn.Embed(V, F, rngs=0)
    with pytest.raises(ValueError) as info:
        embed.attend(jnp.ones((2, F + 1)))
    message = str(info.value)
    assert f"(..., {F})" in message and f"(2, {F + 1})" in message
    assert f"features={F + 1}" in message and "Embed" in message


class TiedLM(tl.Module):
    """Embed, a hidden Linear, and the tied output projection."""

    def __init__(self, rngs):
        self.embed = nn.Embed(V, F, rngs=rngs)
        self.hidden = nn.Linear(F, F, rngs=rngs)

    def __call__(self, ids):
        return self.embed.attend(jnp.tanh(self.hidden(self.embed(ids))))


def test_tied_embedding_jit_and_grad_match_raw_jax():
    model = TiedLM(tl.Rngs(0))
    ids = ids_of(1, (2, 3))
    target = rand(2, 2, 3, V)

    def loss(m):
        return jnp.sum(m(ids) * target)

    def raw_loss(table, kernel, bias):
        h = jnp.tanh(jnp.take(table, ids, axis=0) @ kernel + bias)
        return jnp.sum((h @ table.T) * target)

    arrays = (model.embed.embedding.value, model.hidden.kernel.value, model.hidden.bias.value)
    want_loss, want = jax.jit(jax.value_and_grad(raw_loss, argnums=(0, 1, 2)))(*arrays)
    value, grads = tl.jit(tl.value_and_grad(loss))(model)
    close(value, float(want_loss), tol=1e-4)
    # One gradient for the tied table: the lookup's and the projection's summed.
    close(grads.embed.embedding.value, np.asarray(want[0]), tol=1e-4)
    close(grads.hidden.kernel.value, np.asarray(want[1]), tol=1e-4)
    plain = jax.jit(jax.grad(loss))(model)
    close(plain.embed.embedding.value, np.asarray(want[0]), tol=1e-4)


def test_embed_path_in_error(monkeypatch):
    # Bad input on purpose: toylib's own message, not the runtime type checker's.
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)
    model = TiedLM(tl.Rngs(0))
    with pytest.raises(TypeError, match=r"model\.embed \(Embed\)"):
        model(jnp.zeros(3))


# -- Identity ---------------------------------------------------------------------------------


def test_identity_returns_its_input_and_ignores_extra_arguments():
    layer = nn.Identity()
    x = jnp.arange(3.0)
    assert layer(x) is x
    assert layer(x, 1, mask=None, deterministic=True) is x
    tree = {"a": x, "b": [1, 2]}
    assert layer(tree) is tree
    # The constructor ignores arguments too, so it can replace any layer class.
    for make in (nn.LayerNorm, nn.Identity):
        norm = make(3, rngs=0)
        assert norm(x).shape == (3,)
    assert set(tl.state(nn.Identity(3, rngs=0)).flat()) == set()


def test_identity_in_containers_jit_and_grad():
    linear = nn.Linear(3, 4, rngs=0)
    model = nn.Sequential(nn.Identity(), linear, nn.Identity())
    x = rand(0, 2, 3)
    want = x @ np.asarray(linear.kernel.value)
    close(model(x), want, tol=1e-5)
    close(tl.jit(lambda m, x: m(x))(model, x), want, tol=1e-5)
    # Sequential passes extra call arguments to its first layer: ignored.
    close(model(x, deterministic=True), want, tol=1e-5)
    grad = jax.grad(lambda x: jnp.sum(nn.Identity()(x) ** 2))(jnp.asarray(x))
    close(grad, 2 * x)
