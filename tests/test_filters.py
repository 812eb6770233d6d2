import jax.numpy as jnp
import pytest

import toylib as tl
from toylib import nn

to_predicate = tl.filters.to_predicate
P = tl.Param(jnp.ones(1))
B = tl.BatchStat(jnp.ones(1))
PATH = ("blocks", 2, "attn", "kernel")


@pytest.mark.parametrize(
    ("filter", "value", "expected"),
    [
        (tl.Param, P, True),
        (tl.Param, B, False),
        (tl.Variable, B, True),
        (..., B, True),
        (True, B, True),
        (None, P, False),
        (False, P, False),
        ((tl.Param, tl.BatchStat), B, True),
        ([tl.Cache], B, False),
        (tl.PathContains("attn"), P, True),
        (tl.PathContains(2), P, True),
        (tl.PathContains("mlp"), P, False),
        (tl.Any(tl.Cache, tl.PathContains("attn")), B, True),
        (tl.All(tl.Param, tl.PathContains("attn")), B, False),
        (tl.All(tl.Param, tl.PathContains("attn")), P, True),
        (tl.Not(tl.Param), B, True),
        (tl.Not(...), B, False),
        (lambda path, v: path[-1] == "kernel", B, True),
    ],
)
def test_filter_kinds(filter, value, expected):
    assert to_predicate(filter)(PATH, value) is expected


def test_filters_compare_by_value_and_hash():
    assert tl.Any(tl.Param, tl.PathContains("a")) == tl.Any(tl.Param, tl.PathContains("a"))
    assert hash(tl.Not(tl.Param)) == hash(tl.Not(tl.Param))
    assert tl.All(tl.Param) != tl.Any(tl.Param)
    assert repr(tl.Any(tl.Param, ...)) == "tl.Any(tl.Param, ...)"


def test_bad_filter_is_a_clear_error():
    with pytest.raises(TypeError, match="(?s)is not a filter.*tl.split"):
        to_predicate("params")


def test_filters_select_state_in_a_model():
    model = nn.Sequential(nn.Linear(2, 2, rngs=0), nn.BatchNorm(2), nn.Dropout(0.1, rngs=0))
    stats = tl.state(model, tl.BatchStat)
    assert sorted(p[-1] for p in stats.flat()) == ["mean", "var"]
    biases = tl.state(model, tl.All(tl.Param, tl.PathContains("bias")))
    assert sorted(biases.flat()) == [("layers", 0, "bias"), ("layers", 1, "bias")]
    not_params = tl.state(model, tl.Not(tl.Param))
    assert {type(v) for v in not_params.flat().values()} == {tl.BatchStat, tl.RngState}


def test_predicates_are_hashable_value_objects():
    assert to_predicate(tl.Param) == to_predicate(tl.Param)
    assert hash(to_predicate(tl.Param)) == hash(to_predicate(tl.Param))
    assert to_predicate(...) == to_predicate(True) and to_predicate(None) == to_predicate(False)
    assert to_predicate((tl.Param, tl.BatchStat)) == tl.Any(tl.Param, tl.BatchStat)
    assert len({to_predicate(tl.Param), to_predicate(tl.Param), to_predicate(tl.Cache)}) == 2


def test_one_repr_everywhere():
    assert repr(to_predicate(tl.Param)) == "tl.Param"
    assert repr(to_predicate(...)) == "..."
    assert repr(tl.Not(tl.PathContains("bias"))) == "tl.Not(tl.PathContains('bias'))"
    assert tl.filters.filter_repr(...) == "..."


@pytest.mark.parametrize("catch_all", [..., True])
def test_a_catch_all_before_other_filters_is_an_error(catch_all):
    model = nn.Sequential(nn.Linear(2, 2, rngs=0), nn.BatchNorm(2))
    with pytest.raises(
        ValueError,
        match=r"(?s)before tl\.BatchStat.*tl\.split\(model, tl\.BatchStat, (\.\.\.|True)\)",
    ):
        tl.split(model, catch_all, tl.BatchStat)
    with pytest.raises(ValueError, match="catch-all goes last"):
        tl.state(model).split(catch_all, tl.BatchStat)
    assert len(tl.split(model, tl.BatchStat, catch_all)) == 3  # last is fine
