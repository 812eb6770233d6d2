"""Transforms inside transforms: what an inner transform may write back.

An inner transform handed a Module that the outer function closed over
(rather than received as an argument) would write the outer trace's tracers
into the live Module. Every transform refuses, names the Variable, and
leaves the Module as it was.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import toylib as tl


class Count(tl.Module):
    def __init__(self) -> None:
        self.n = tl.Variable(jnp.zeros(()))

    def __call__(self, x):
        self.n.value = self.n.value + 1
        return x * 2.0


def _custom(model, x):
    @tl.custom_vjp
    def f(m, x):
        return m(x)

    f.defvjp(lambda m, x: (m(x), None), lambda res, g: (None, 2.0 * g))
    return f(model, x)


# Each inner call gets the Module as an argument: correct on its own.
INNER = {
    "jit": lambda m, x: tl.jit(lambda m, x: m(x))(m, x),
    "grad": lambda m, x: tl.grad(lambda m, x: m(x).sum(), argnums=1)(m, x),
    "vmap": lambda m, x: tl.vmap(lambda m, x: m(x), in_axes=(None, 0))(m, x[None]).sum(0),
    "cond": lambda m, x: tl.cond(True, lambda m, x: m(x), lambda m, x: m(x), m, x),
    "fori_loop": lambda m, x: tl.fori_loop(0, 2, lambda i, c: (c[0], c[0](c[1])), (m, x))[1],
    "remat": lambda m, x: tl.remat(lambda m, x: m(x))(m, x),
    "while_loop": lambda m, x: tl.while_loop(
        lambda c: c[2] < 2, lambda c: (c[0], c[0](c[1]), c[2] + 1), (m, x, 0)
    )[1],
    "scan": lambda m, x: tl.scan(lambda c, y: (c, c[0](c[1]) + y))((m, x), jnp.zeros((2, 3)))[1][
        -1
    ],
    "custom_vjp": _custom,
    "jvp": lambda m, x: tl.jvp(lambda m, x: m(x), (m, x), (None, jnp.ones_like(x)))[0],
    "vjp": lambda m, x: tl.vjp(lambda m, x: m(x), m, x)[0],
}

OUTER = {
    "jit": lambda f: tl.jit(f),
    "grad": lambda f: tl.grad(lambda x: f(x).sum()),
    "vmap": lambda f: lambda x: tl.vmap(f)(x[None]),
}


@pytest.mark.parametrize("outer", sorted(OUTER))
@pytest.mark.parametrize("inner", sorted(INNER))
def test_inner_transform_refuses_a_closed_over_module(inner, outer):
    model = Count()
    call = INNER[inner]
    # The inner call on its own updates the Module.
    call(model, jnp.ones(3))
    assert float(model.n.value) >= 1.0
    before = model.n.value
    wrapped = OUTER[outer](lambda x: call(model, x))
    for _ in range(2):  # and again: no cached program skips the check
        with pytest.raises(RuntimeError, match=r"(?s)created outside tl\..*as an argument"):
            wrapped(jnp.ones(3))
    assert model.n.value is before  # nothing written, no tracer left behind
    assert not isinstance(model.n.value, jax.core.Tracer)


@pytest.mark.parametrize("inner", sorted(INNER))
def test_inner_transform_on_an_argument_of_the_outer_one_writes_back(inner):
    model = Count()
    call = INNER[inner]
    call(model, jnp.ones(3))
    once = float(model.n.value)
    step = tl.jit(lambda m, x: call(m, x))
    step(model, jnp.ones(3))
    assert float(model.n.value) == 2 * once
    step(model, jnp.ones(3))  # the second call (tl.jit's fast path) writes back too
    assert float(model.n.value) == 3 * once
    assert not isinstance(model.n.value, jax.core.Tracer)


def test_threads_one_refused_one_writing_back():
    from conftest import run_in_threads

    def refused():
        model = Count()
        for _ in range(5):
            with pytest.raises(RuntimeError, match="as an argument"):
                tl.grad(lambda x: INNER["vmap"](model, x).sum())(jnp.ones(3))
        return float(model.n.value)

    def writes():
        model = Count()
        step = tl.jit(lambda m, x: INNER["vmap"](m, x))
        for _ in range(5):
            step(model, jnp.ones(3))
        return float(model.n.value)

    assert run_in_threads(refused, writes) == [0.0, 5.0]
