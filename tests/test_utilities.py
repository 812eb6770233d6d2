"""Module.sow with tl.pop, Variable accessors, tl.forward_hook."""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from conftest import run_in_threads

import toylib as tl
from toylib import nn

# -- sow -------------------------------------------------------------------------


class Block(tl.Module):
    def __init__(self):
        self.linear = nn.Linear(2, 2, rngs=0)

    def __call__(self, x):
        y = self.linear(x)
        self.sow(tl.Intermediate, "acts", y)
        return y


def test_sow_appends_and_pop_removes_eagerly_and_under_jit():
    block = Block()
    block(jnp.ones(2))
    block(jnp.zeros(2))
    assert type(block.acts) is tl.Intermediate and len(block.acts.value) == 2
    sown = tl.pop(block, tl.Intermediate)
    assert len(sown.acts.value) == 2 and not hasattr(block, "acts")
    step = tl.jit(lambda b, x: b(x).sum())
    step(block, jnp.ones(2))
    assert len(block.acts.value) == 1  # the new Variable came out of the trace
    step(block, jnp.ones(2))
    assert len(block.acts.value) == 2
    assert float(tl.pop(block, tl.Intermediate).acts.value[1].sum()) == float(
        block(jnp.ones(2)).sum()
    )


def test_sow_with_reduce_fn_and_a_clash():
    class Summing(tl.Module):
        def __call__(self, x):
            self.sow(tl.Intermediate, "total", x, reduce_fn=lambda a, b: a + b, init_fn=lambda: 0)
            return x

    m = Summing()
    m(jnp.ones(2))
    m(jnp.ones(2))
    assert m.total.value.tolist() == [2.0, 2.0]

    class Clash(tl.Module):
        def __init__(self):
            self.acts = tl.Param(jnp.ones(1))

        def __call__(self, x):
            self.sow(tl.Intermediate, "acts", x)
            return x

    with pytest.raises(TypeError, match=r"already holds a Param, not a Intermediate"):
        Clash()(jnp.ones(1))
    with pytest.raises(TypeError, match="needs init_fn"):
        tl.Module().sow(tl.Intermediate, "x", 1, reduce_fn=max)


def test_sow_under_vmap_and_not_under_scan():
    block = Block()
    axes = (tl.StateAxes({tl.Intermediate: 0, ...: None}), 0)
    tl.vmap(lambda b, x: b(x), in_axes=axes)(block, jnp.ones((3, 2)))
    assert block.acts.value[0].shape == (3, 2)  # stacked along the example axis
    tl.pop(block, tl.Intermediate)
    # A scan carries one structure from step to step: sowing a new attribute there is
    # refused with toylib's own message (collect values through the body's outputs).
    with pytest.raises(ValueError, match="structure of the arguments changed"):
        tl.scan(lambda b, x: b(x), in_axes=axes, out_axes=0)(block, jnp.ones((4, 2)))
    assert not hasattr(block, "acts")


# -- Variable accessors -----------------------------------------------------------


def test_variable_accessors():
    v = tl.Param(jnp.ones(2), tag="a")
    assert v.get_value() is v.value
    v.set_value(jnp.zeros(2))
    assert v.value.tolist() == [0.0, 0.0]
    assert v.get_metadata() == {"tag": "a"} and v.get_metadata("tag") == "a"
    assert v.get_metadata("missing", 3) == 3
    with pytest.raises(KeyError, match="set_metadata"):
        v.get_metadata("missing")
    v.set_metadata(sharding=("embed",))
    v.set_metadata("tag", "b")
    assert v.sharding == ("embed",) and v.tag == "b"
    with pytest.raises(TypeError, match="hashable"):
        v.set_metadata(tag=["a"])
    with pytest.raises(ValueError, match="Variable attribute"):
        v.set_metadata(value=1)
    assert v.tag == "b"  # a failed call changes nothing


def test_set_metadata_invalidates_the_jit_fast_path():
    model = nn.Linear(2, 2, rngs=0)
    traces = []

    @tl.jit
    def step(m, x):
        traces.append(m.kernel.get_metadata())
        return m(x)

    step(model, jnp.ones(2))
    step(model, jnp.ones(2))
    assert len(traces) == 1
    model.kernel.set_metadata(tag="new")
    step(model, jnp.ones(2))
    assert len(traces) == 2 and traces[-1] == {"tag": "new"}


def test_set_value_inside_a_transform_is_carried_out():
    count = tl.Variable(jnp.array(0))
    tl.jit(lambda c: c.set_value(c.get_value() + 1))(count)
    assert int(count.value) == 1


# -- forward hooks ---------------------------------------------------------------


def test_forward_hook_sees_every_call_once_and_can_replace_outputs():
    mlp = nn.MLP([2, 3, 1], rngs=0)
    seen = []

    def record(module, args, kwargs, out):
        seen.append(tl.call_path(module))

    with tl.forward_hook(record):
        mlp(jnp.ones((1, 2)))
    assert seen == ["model.layers[0]", "model.layers[1]", "model"]

    with tl.forward_hook(lambda m, a, k, out: out * 0, filter=lambda m: m is mlp):
        assert float(abs(mlp(jnp.ones((1, 2)))).sum()) == 0.0
    seen.clear()
    mlp(jnp.ones((1, 2)))
    assert seen == []


def test_forward_hooks_nest_and_super_calls_are_one_call():
    class Base(tl.Module):
        def __call__(self, x):
            return x + 1

    class Child(Base):
        def __call__(self, x):
            return super().__call__(x) * 2

    order = []
    with tl.forward_hook(lambda m, a, k, out: order.append("outer")):
        with tl.forward_hook(lambda m, a, k, out: order.append("inner")):
            assert float(Child()(jnp.array(1.0))) == 4.0
    assert order == ["outer", "inner"]  # in the order the blocks were entered


def test_forward_hook_inside_jit_sows_values_out():
    model = nn.MLP([2, 3, 1], rngs=0)

    def keep(module, args, kwargs, out):
        if isinstance(module, nn.Linear):
            module.sow(tl.Intermediate, "out", out)

    @tl.jit
    def run(m, x):
        with tl.forward_hook(keep):
            return m(x)

    run(model, jnp.ones((1, 2)))
    outs = tl.pop(model, tl.Intermediate)
    assert outs.layers[0].out.value[0].shape == (1, 3)


def test_forward_hook_is_per_thread():
    model = nn.Linear(2, 2, rngs=0)
    seen = []

    def hooked():
        with tl.forward_hook(lambda m, a, k, out: seen.append("hooked")):
            model(jnp.ones(2))
            return len(seen)

    def plain():
        for _ in range(20):
            model(jnp.ones(2))
        return "done"

    results = run_in_threads(hooked, plain)
    assert results == [1, "done"] and seen == ["hooked"]
