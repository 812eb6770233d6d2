"""nn.NamedLinear and nn.NamedMultiHeadAttention: parity with the positional layers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import toylib as tl
from toylib import nn, nx


def inputs(shape, *names, seed=0):
    return nx.wrap(jax.random.normal(jax.random.key(seed), shape), *names)


# -- NamedLinear -----------------------------------------------------------------------


def test_named_linear_has_linears_weights_for_the_same_seed_and_its_outputs():
    named = nn.NamedLinear(in_axes={"features": 8}, out_axes={"features": 16}, rngs=3)
    linear = nn.Linear(8, 16, rngs=3)
    assert named.kernel.value.named_shape == {"features_in": 8, "features_out": 16}
    np.testing.assert_array_equal(named.kernel.value.array, linear.kernel.value)
    x = inputs((4, 5, 8), "batch", "seq", "features")
    y = named(x)
    assert y.named_shape == {"batch": 4, "seq": 5, "features": 16}
    want = linear(x.unwrap("batch", "seq", "features"))
    np.testing.assert_allclose(y.unwrap("batch", "seq", "features"), want, atol=1e-5)


def test_named_linear_reads_its_axes_wherever_they_are_stored():
    layer = nn.NamedLinear({"features": 3}, {"hidden": 2}, rngs=0)
    x = inputs((4, 3), "batch", "features")
    swapped = nx.wrap(x.unwrap("features", "batch"), "features", "batch")
    np.testing.assert_allclose(
        layer(x).unwrap("batch", "hidden"), layer(swapped).unwrap("batch", "hidden"), atol=1e-6
    )


def test_named_linear_with_several_axes_matches_linear_general():
    general = nn.LinearGeneral((2, 3), (4, 5), axis=(-2, -1), rngs=1)
    named = nn.NamedLinear.from_positional(general, ["heads", "head_dim"], ["a", "b"])
    assert named.bias.value.named_shape == {"a": 4, "b": 5}
    x = inputs((6, 2, 3), "batch", "heads", "head_dim")
    y = named(x).unwrap("batch", "a", "b")
    np.testing.assert_allclose(y, general(x.unwrap("batch", "heads", "head_dim")), atol=1e-5)


def test_named_linear_without_out_axes_gives_one_number_per_example():
    layer = nn.NamedLinear({"features": 3}, {}, use_bias=False, rngs=0)
    assert layer.bias is None
    y = layer(inputs((5, 3), "batch", "features"))
    assert y.named_shape == {"batch": 5} and y.positional_shape == ()


def test_named_linear_parity_under_jit_and_grad():
    linear = nn.Linear(3, 2, rngs=0)
    named = nn.NamedLinear.from_positional(linear, ["features"], ["out"])
    x = inputs((4, 3), "batch", "features")
    y = tl.jit(lambda m, v: m(v))(named, x)
    np.testing.assert_allclose(
        y.unwrap("batch", "out"), linear(x.unwrap("batch", "features")), atol=1e-5
    )
    # The input's gradient, named like the input.
    g = tl.grad(lambda v: nx.sum(named(v), "batch", "out").unwrap())(x)
    want = jax.grad(lambda v: linear(v).sum())(x.unwrap("batch", "features"))
    np.testing.assert_allclose(g.unwrap("batch", "features"), want, atol=1e-5)


def test_named_linear_dtypes():
    layer = nn.NamedLinear({"f": 3}, {"g": 2}, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=0)
    assert layer.kernel.value.dtype == jnp.float32
    assert layer(inputs((2, 3), "b", "f")).dtype == jnp.bfloat16


def test_named_linear_errors():
    layer = nn.NamedLinear({"features": 3}, {"out": 2}, rngs=0)
    # The test suite's runtime type checker refuses a plain array first (the
    # annotation); without it, the layer's own check says how to name the axes.
    with pytest.raises(TypeError, match="NamedArray"):
        layer(jnp.ones((4, 3)))
    with pytest.raises(TypeError, match=r"tl.nx.wrap\(x\).tag\(\"batch\", 'features'\)"):
        layer._check_input(jnp.ones((4, 3)))
    with pytest.raises(ValueError, match=r"expected named axes \{'features': 3\}"):
        layer(inputs((4, 5), "batch", "features"))
    with pytest.raises(ValueError, match="expected named axes"):
        layer(inputs((4, 3), "batch", "feats"))
    with pytest.raises(ValueError, match=r"positional shape \(4,\)"):
        layer(inputs((4, 3), "batch", "features").untag("batch"))
    with pytest.raises(ValueError, match="'out' is used twice"):
        layer(inputs((4, 3, 2), "batch", "features", "out"))
    with pytest.raises(TypeError, match="string names and positive int sizes"):
        nn.NamedLinear({"features": 0}, {}, rngs=0)
    with pytest.raises(ValueError, match="must name 2 axes in all"):
        nn.NamedLinear.from_positional(nn.Linear(3, 2, rngs=0), ["a", "b"], ["c"])


def test_stacked_named_linears_scan():
    # nn.Stack vmaps the constructor: the stacked axis is positional, in front.
    stack = nn.Stack(lambda r: nn.NamedLinear({"f": 4}, {"f": 4}, rngs=r), 3, rngs=0)
    kernel = stack.blocks.kernel.value
    assert kernel.positional_shape == (3,) and kernel.named_shape == {"f_in": 4, "f_out": 4}
    x = inputs((2, 4), "batch", "f")
    y = x
    for i in range(3):
        w, b = kernel.array[i], stack.blocks.bias.value.array[i]
        y = nx.wrap(y.unwrap("batch", "f") @ w + b, "batch", "f")
    np.testing.assert_allclose(stack(x).unwrap("batch", "f"), y.unwrap("batch", "f"), atol=1e-5)


# -- NamedMultiHeadAttention -----------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_named_attention_matches_multi_head_attention(causal):
    attn = nn.MultiHeadAttention(4, 16, qkv_features=8, out_features=12, causal=causal, rngs=2)
    named = nn.NamedMultiHeadAttention.from_positional(attn)
    assert named.query.kernel.value.named_shape == {"features": 16, "heads": 4, "head_dim": 2}
    assert named.out.kernel.value.named_shape == {"heads": 4, "head_dim": 2, "features": 12}
    x = inputs((3, 7, 16), "batch", "seq", "features")
    y = named(x)
    assert y.named_shape == {"batch": 3, "seq": 7, "features": 12}
    want = attn(x.unwrap("batch", "seq", "features"))
    np.testing.assert_allclose(y.unwrap("batch", "seq", "features"), want, atol=1e-5)


def test_named_attention_takes_a_named_mask():
    attn = nn.MultiHeadAttention(2, 8, rngs=0)
    named = nn.NamedMultiHeadAttention.from_positional(attn)
    tokens = jnp.array([[1, 2, 0, 0], [3, 0, 0, 0]])
    mask = nn.make_attention_mask(tokens > 0, tokens > 0)  # (batch, 1, q, kv)
    x = inputs((2, 4, 8), "batch", "seq", "features")
    named_mask = nx.wrap(mask[:, 0], "batch", "seq", "kv_seq")  # no heads axis: broadcast
    y = named(x, mask=named_mask).unwrap("batch", "seq", "features")
    want = attn(x.unwrap("batch", "seq", "features"), mask=mask)
    np.testing.assert_allclose(y, want, atol=1e-5)
    with pytest.raises(TypeError, match="NamedArray"):
        named(x, mask=mask)


def test_named_attention_maps_over_extra_named_axes():
    named = nn.NamedMultiHeadAttention(2, 8, causal=True, rngs=0)
    x = inputs((2, 3, 5, 8), "sample", "batch", "seq", "features")
    y = named(x)
    assert y.named_shape == {"sample": 2, "batch": 3, "seq": 5, "features": 8}
    one = named(
        nx.wrap(x.unwrap("sample", "batch", "seq", "features")[1], "batch", "seq", "features")
    )
    np.testing.assert_allclose(
        y.unwrap("sample", "batch", "seq", "features")[1],
        one.unwrap("batch", "seq", "features"),
        atol=1e-6,
    )


def test_named_attention_parity_under_jit():
    attn = nn.MultiHeadAttention(2, 8, causal=True, rngs=1)
    named = nn.NamedMultiHeadAttention.from_positional(attn)
    x = inputs((2, 5, 8), "batch", "seq", "features")
    y = tl.jit(lambda m, v: m(v))(named, x)
    want = attn(x.unwrap("batch", "seq", "features"))
    np.testing.assert_allclose(y.unwrap("batch", "seq", "features"), want, atol=1e-5)


def test_named_attention_refuses_what_it_does_not_compute():
    with pytest.raises(ValueError, match="grouped heads is not supported"):
        nn.NamedMultiHeadAttention.from_positional(
            nn.MultiHeadAttention(4, 8, num_kv_heads=2, rngs=0)
        )
    with pytest.raises(ValueError, match="normalize_qk is not supported"):
        nn.NamedMultiHeadAttention.from_positional(
            nn.MultiHeadAttention(2, 8, normalize_qk=True, rngs=0)
        )
    with pytest.raises(ValueError, match="dropout is not supported"):
        nn.NamedMultiHeadAttention.from_positional(
            nn.MultiHeadAttention(2, 8, dropout_rate=0.1, rngs=0)
        )
    # In evaluation mode there is no dropout, so it converts.
    nn.NamedMultiHeadAttention.from_positional(
        nn.MultiHeadAttention(2, 8, dropout_rate=0.1, rngs=0).eval()
    )
    with pytest.raises(ValueError, match="divisible by num_heads=3"):
        nn.NamedMultiHeadAttention(3, 8, rngs=0)
