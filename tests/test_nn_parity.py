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
from flax import nnx

from toylib import nn

TOL = {"rtol": 1e-5, "atol": 1e-5}


def rand(seed, *shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def np_init(seed):
    """An initialiser from numpy: fixed values, no jax.random compile per shape."""
    return lambda key, shape, dtype=jnp.float32: jnp.asarray(rand(seed, *shape), dtype)


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
    ref = nnx.Einsum(equation, kernel_shape, bias_shape, rngs=nnx.Rngs(0))
    copy_into(ref, ours, "kernel", *(["bias"] if bias_shape else []))
    x = rand(2, *x_shape)
    close(ours(x), ref(x))


def test_einsum_equation_at_call_matches_nnx():
    ours = nn.Einsum(None, (4, 3), (3,), kernel_init=np_init(0), bias_init=np_init(1), rngs=0)
    ref = nnx.Einsum("ab,bc->ac", (4, 3), (3,), rngs=nnx.Rngs(0))
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
        in_features, out_features, batch_axis=batch_axis or {}, rngs=nnx.Rngs(0), **kwargs
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
    ref_proj = nnx.LinearGeneral(6, (heads, head_dim), rngs=nnx.Rngs(0))
    ref_merge = nnx.LinearGeneral((heads, head_dim), 4, axis=(-2, -1), rngs=nnx.Rngs(0))
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
    ref_base = nnx.Linear(din, dout, rngs=nnx.Rngs(0))
    copy_into(ref_base, base, "kernel", "bias")
    ref = nnx.LoRA(din, rank, dout, base_module=ref_base if with_base else None, rngs=nnx.Rngs(0))
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
    ref = nnx.LoRALinear(5, 3, lora_rank=2, use_bias=use_bias, rngs=nnx.Rngs(0))
    names = ["kernel", "lora.lora_a", "lora.lora_b", *(["bias"] if use_bias else [])]
    copy_into(ref, ours, *names)
    x = rand(4, 6, 5)
    close(ours(x), ref(x))
