"""tl.is_array, tl.filter, tl.partition, tl.combine, tl.tree_at, tl.tree_equal."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_unchanged, snapshot

import toylib as tl
from toylib import nn


def _model():
    return nn.Sequential(nn.Linear(2, 3, rngs=0), nn.BatchNorm(3), nn.Linear(3, 1, rngs=1))


def test_is_array():
    assert tl.is_array(jnp.ones(2)) and tl.is_array(np.ones(2))
    assert tl.is_array(jax.ShapeDtypeStruct((2,), jnp.float32))
    assert not tl.is_array(1.0) and not tl.is_array(np.array([object()]))
    assert not tl.is_array(tl.Param(jnp.ones(2)))  # a Variable is a node, its value the leaf


def test_partition_combine_round_trip_on_a_module():
    model = _model()
    params, rest = tl.partition(model, tl.Param)
    assert params.layers[0].kernel.shape == (2, 3)
    assert params.layers[1].mean.value is None
    assert rest.layers[0].kernel.value is None and rest.layers[1].mean.shape == (3,)
    assert type(params.layers[1].mean) is tl.BatchStat  # the Variable stays, holding None
    again = tl.combine(params, rest)
    assert tl.tree_equal(again, model)
    assert again(jnp.ones((4, 2))).shape == (4, 1)


def test_filter_with_predicates_paths_and_inverse():
    model = _model()
    arrays = tl.filter(model, tl.is_array)
    assert jax.tree.structure(arrays) == jax.tree.structure(model)
    kernels = tl.filter(model, tl.PathContains("kernel"))
    assert kernels.layers[0].bias.value is None and kernels.layers[2].kernel.shape == (3, 1)
    not_kernels = tl.filter(model, tl.PathContains("kernel"), inverse=True)
    assert not_kernels.layers[0].kernel.value is None
    zeros = tl.filter(model, tl.BatchStat, replace=0)
    assert zeros.layers[0].kernel.value == 0
    # A pytree prefix of bools, as in Equinox.
    only_first = tl.filter({"a": jnp.ones(1), "b": jnp.ones(2)}, {"a": True, "b": False})
    assert only_first["b"] is None and only_first["a"].shape == (1,)


def test_filter_bad_spec_says_what_is_allowed():
    with pytest.raises(TypeError, match="bool or a function"):
        tl.filter({"a": jnp.ones(1)}, {"a": "yes"})


def test_interoperates_with_equinox():
    model = _model()
    ours = tl.partition(model, tl.is_array)
    theirs = eqx.partition(model, eqx.is_array)
    assert tl.tree_equal(ours, theirs) and eqx.tree_equal(ours, theirs)
    assert tl.tree_equal(eqx.combine(*ours), model)
    assert tl.tree_equal(tl.combine(*theirs), model)
    params, rest = tl.partition(model, tl.Param)
    assert tl.tree_equal(eqx.combine(params, rest), model)
    # Equinox's tree_at and ours agree on a tree without shared references.
    new = jnp.zeros((2, 3))
    assert tl.tree_equal(
        tl.tree_at(lambda m: m.layers[0].kernel.value, model, new),
        eqx.tree_at(lambda m: m.layers[0].kernel.value, model, new),
    )


def test_tree_at_is_functional():
    model = _model()
    before = snapshot(model)
    new = tl.tree_at(lambda m: m.layers[0].kernel, model, jnp.zeros((2, 3)))
    assert_unchanged(model, before)
    assert float(abs(new.layers[0].kernel.value).sum()) == 0.0
    assert (
        type(new.layers[0].kernel) is tl.Param
        and new.layers[0].kernel is not model.layers[0].kernel
    )
    assert new.layers[2].kernel.value is model.layers[2].kernel.value  # arrays are shared


def test_tree_at_several_parts_replace_fn_and_whole_modules():
    model = _model()
    new = tl.tree_at(
        lambda m: (m.layers[0].bias, m.layers[2].bias), model, replace_fn=lambda b: b + 1
    )
    assert new.layers[0].bias.value.tolist() == [1.0, 1.0, 1.0]
    assert new.layers[2].bias.value.tolist() == [1.0]
    swapped = tl.tree_at(
        lambda m: m.layers[1], model, nn.Identity() if hasattr(nn, "Identity") else jax.nn.relu
    )
    assert not isinstance(swapped.layers[1], nn.BatchNorm)
    assert isinstance(model.layers[1], nn.BatchNorm)
    replaced = tl.tree_at(lambda m: m.layers[0].kernel, model, tl.BatchStat(jnp.ones((2, 3))))
    assert type(replaced.layers[0].kernel) is tl.BatchStat


def test_tree_at_keeps_shared_references():
    class Tied(tl.Module):
        def __init__(self):
            self.w = tl.Param(jnp.ones(2))
            self.encoder = {"w": self.w}

    tied = Tied()
    new = tl.tree_at(lambda m: m.encoder["w"], tied, jnp.zeros(2))
    assert new.w is new.encoder["w"] and new.w.value.tolist() == [0.0, 0.0]
    swapped = tl.tree_at(lambda m: m.w, tied, tl.Param(jnp.full(2, 5.0)))
    assert swapped.w is swapped.encoder["w"]
    assert tied.w.value.tolist() == [1.0, 1.0]


def test_tree_at_on_variables_and_plain_pytrees():
    v = tl.Param(jnp.ones(2), tag="x")
    new = tl.tree_at(lambda v: v.value, v, jnp.zeros(2))
    assert new.tag == "x" and new.value.tolist() == [0.0, 0.0] and v.value.tolist() == [1.0, 1.0]
    tree = {"a": jnp.ones(2), "b": (1, "s")}
    assert tl.tree_at(lambda t: t["b"][0], tree, 5)["b"] == (5, "s")


def test_tree_at_bad_where():
    model = _model()
    with pytest.raises(ValueError, match="not a part of the tree"):
        tl.tree_at(lambda m: m.layers[0].kernel + 1, model, jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="static value"):
        tl.tree_at(lambda m: m.layers[0].in_features, model, 4)
    with pytest.raises(ValueError, match="twice"):
        tl.tree_at(lambda m: (m.layers[0].kernel, m.layers[0].kernel), model, (1, 2))
    with pytest.raises(TypeError, match="exactly one"):
        tl.tree_at(lambda m: m.layers[0].kernel, model)
    with pytest.raises(ValueError, match="structure of"):
        tl.tree_at(lambda m: (m.layers[0].kernel, m.layers[0].bias), model, jnp.ones(1))


def test_tree_equal():
    a = _model()
    assert tl.tree_equal(a, tl.clone(a))
    assert not tl.tree_equal(a, nn.Linear(2, 3, rngs=5))
    other = tl.clone(a)
    other.layers[0].kernel.value = other.layers[0].kernel.value + 1
    assert not tl.tree_equal(a, other)
    assert not tl.tree_equal(jnp.ones(2), jnp.ones(3))
    assert not tl.tree_equal(jnp.ones(2), jnp.ones(2, jnp.int32))
    assert tl.tree_equal(jnp.ones(2), jnp.ones(2) + 1e-7, rtol=1e-5)
    assert not tl.tree_equal(1, 1.0, typematch=True)
    traced = jax.jit(lambda x, y: tl.tree_equal(x, y))(jnp.ones(2), jnp.ones(2))
    assert bool(traced)
