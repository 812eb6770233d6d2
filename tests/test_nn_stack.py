"""nn.Stack: n blocks built with vmap, applied with scan; equal to a Python loop."""

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import optax
import pytest

import toylib as tl
from toylib import nn

N, D = 5, 6


class Block(tl.Module):
    """Residual block with a Dropout stream and BatchNorm state: every kind of state."""

    def __init__(self, rngs):
        self.lin = nn.Linear(D, D, rngs=rngs)
        self.drop = nn.Dropout(0.3, rngs=rngs)
        self.bn = nn.BatchNorm(D)

    def __call__(self, x, shift=0.0, *, scale=1.0):
        return x + scale * jnp.tanh(self.bn(self.drop(self.lin(x)))) + shift


def block_i(blocks, i):
    """Block i as its own Module: every stacked Variable sliced at i."""
    return jax.tree.map(lambda a: a[i], blocks)


def loop(stack, x, *args, **kwargs):
    blocks = [block_i(stack.blocks, i) for i in range(stack.n)]
    for block in blocks:
        x = block(x, *args, **kwargs)
    return x, blocks


def make(seed=0):
    return nn.Stack(Block, N, rngs=tl.Rngs(seed, dropout=seed + 1))


def x_data(seed=0):
    return jax.random.normal(jax.random.key(seed), (4, D))


def test_blocks_are_stacked_and_distinct():
    stack = make()
    assert len(stack) == N
    assert stack.blocks.lin.kernel.value.shape == (N, D, D)
    assert stack.blocks.bn.mean.value.shape == (N, D)
    kernels = np.asarray(stack.blocks.lin.kernel.value)
    assert all(not np.allclose(kernels[0], kernels[i]) for i in range(1, N))
    keys = jax.random.key_data(stack.blocks.drop.rngs.key.value)
    assert len({tuple(np.asarray(k).ravel()) for k in keys}) == N  # one stream per block
    # Same seed, same blocks.
    np.testing.assert_array_equal(kernels, np.asarray(make().blocks.lin.kernel.value))


def test_forward_equals_python_loop_in_eval_mode():
    stack = make().eval()
    x = x_data()
    want, _ = loop(stack, x)
    np.testing.assert_allclose(np.asarray(stack(x)), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_training_forward_and_state_updates_equal_python_loop():
    stack, reference = make(), make()
    x = x_data()
    want, blocks = loop(reference, x, 0.5, scale=2.0)
    got = stack(x, 0.5, scale=2.0)
    # Same dropout keys per block, same BatchNorm statistics written back per block.
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    for i, block in enumerate(blocks):
        np.testing.assert_allclose(
            np.asarray(stack.blocks.bn.mean.value[i]), np.asarray(block.bn.mean.value), atol=1e-6
        )
        assert int(stack.blocks.drop.rngs.count.value[i]) == int(block.drop.rngs.count.value) == 1


def test_gradients_equal_python_loop():
    stack = make().eval()
    x = x_data()

    def loss_stack(s):
        return jnp.sum(s(x) ** 2)

    def loss_loop(blocks):
        y = x
        for block in blocks:
            y = block(y)
        return jnp.sum(y**2)

    grads = tl.grad(loss_stack)(stack)
    blocks = [block_i(stack.blocks, i) for i in range(N)]
    loop_grads = tl.grad(loss_loop)(blocks)
    for i in range(N):
        np.testing.assert_allclose(
            np.asarray(grads.blocks.lin.kernel.value[i]),
            np.asarray(loop_grads[i].lin.kernel.value),
            rtol=1e-5,
            atol=1e-6,
        )


def test_stack_under_jit_writes_state_back():
    class Model(tl.Module):
        def __init__(self):
            self.stack = make()
            self.head = nn.Linear(D, 1, rngs=3)

        def __call__(self, x):
            return self.head(self.stack(x))

    model = Model()
    step = tl.jit(lambda m, x: m(x))
    x = x_data()
    y1, y2 = step(model, x), step(model, x)
    assert not np.allclose(np.asarray(y1), np.asarray(y2))  # dropout keys advanced
    np.testing.assert_array_equal(np.asarray(model.stack.blocks.drop.rngs.count.value), [2] * N)
    assert not np.allclose(np.asarray(model.stack.blocks.bn.mean.value), 0.0)
    model.eval()
    assert model.stack.blocks.drop.deterministic and model.stack.blocks.bn.use_running_average
    np.testing.assert_array_equal(np.asarray(step(model, x)), np.asarray(step(model, x)))


def test_stack_trains_with_optimizer():
    stack = nn.Stack(lambda rngs: nn.Linear(D, D, rngs=rngs), 3, rngs=0)
    optimizer = tl.Optimizer(stack, optax.adam(1e-2))
    x = x_data()
    target = jnp.flip(x, axis=-1)

    @tl.jit
    def step(stack, optimizer, x):
        loss, grads = tl.value_and_grad(lambda s: jnp.mean((s(x) - target) ** 2))(stack)
        optimizer.update(stack, grads)
        return loss

    losses = [float(step(stack, optimizer, x)) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]
    assert stack.blocks.kernel.value.shape == (3, D, D)


def test_broadcast_module_argument_and_per_block_vmap():
    class Scaled(tl.Module):
        def __init__(self, rngs):
            self.lin = nn.Linear(D, D, rngs=rngs)

        def __call__(self, x, counter):
            counter.calls.value += 1  # a Module argument shared by every block
            return self.lin(x)

    class Counter(tl.Module):
        def __init__(self):
            self.calls = tl.Variable(jnp.array(0))

    stack = nn.Stack(Scaled, 4, rngs=0)
    counter = Counter()
    stack(x_data(), counter)
    assert int(counter.calls.value) == 4

    # A per-block operation (like allocating a KV cache) is a vmap over the blocks.
    def add_cache(block):
        block.cache = tl.Cache(jnp.zeros((2,)))

    tl.vmap(add_cache)(stack.blocks)
    assert stack.blocks.cache.value.shape == (4, 2)


def test_shape_error_names_block_path():
    class Model(tl.Module):
        def __init__(self):
            self.stack = make()

        def __call__(self, x):
            return self.stack(x)

    with pytest.raises(ValueError, match=r"^model\.stack\.blocks\[\*\]\.lin \(Linear\).*\(4, 7\)"):
        Model()(jnp.ones((4, 7)))


@pytest.mark.parametrize("n", [0, -1, 2.0])
def test_bad_block_count(n, monkeypatch):
    # Bad input on purpose: toylib's own message, not the runtime type checker's.
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)
    with pytest.raises(ValueError, match="positive int"):
        nn.Stack(Block, n, rngs=0)


@pytest.mark.parametrize("unroll", [2, True])
def test_unroll_gives_the_same_forward_and_gradients(unroll):
    stack = make().eval()
    unrolled = make().eval()
    unrolled.unroll = unroll
    x = x_data()

    def loss(stack):
        return jnp.sum(stack(x) ** 2)

    grad = tl.jit(tl.value_and_grad(loss))
    (want, want_grads), (got, got_grads) = grad(stack), grad(unrolled)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert nn.Stack(Block, N, rngs=0, unroll=3).unroll == 3


@pytest.mark.parametrize("unroll", [0, -1, 1.5, False, "all"])
def test_bad_unroll(unroll, monkeypatch):
    # Bad input on purpose: toylib's own message, not the runtime type checker's.
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)
    with pytest.raises(ValueError, match="unroll"):
        nn.Stack(Block, N, rngs=0, unroll=unroll)
