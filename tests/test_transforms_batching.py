"""Tests for tl.vmap, tl.scan and the control-flow transforms (remat, cond, switch,
fori_loop, eval_shape): values match the jax equivalents and a Python loop, and state
changed inside comes back to the caller's live objects."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import Counter, DropBlock

import toylib as tl
from toylib import nn
from toylib._core import calls
from toylib._core.graph import flatten as graph_flatten
from toylib._core.variables import unwrap
from toylib.transforms import batching

N = 4  # batch / number of stacked layers
DIM = 3  # features


def rand(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


class Scaled(tl.Module):
    """A Param ``w`` (stacked under vmap) and a shared ``scale`` plus a call counter."""

    def __init__(self, w, scale):
        self.w = tl.Param(w)
        self.scale = tl.Variable(scale)
        self.calls = tl.Variable(jnp.array(0))

    def __call__(self, x):
        self.calls += 1
        return (x @ self.w) * self.scale


class ScanMLP(tl.Module):
    """``n_layers`` DropBlocks built with tl.vmap and applied with tl.scan."""

    def __init__(self, dim, n_layers, *, rngs):
        self.n_layers = n_layers
        self.blocks = tl.vmap(lambda r: DropBlock(dim, rngs=r))(rngs.split(n_layers))

    def __call__(self, x):
        def body(x, block):
            return block(x), None

        x, _ = tl.scan(body, in_axes=(tl.Carry, 0))(x, self.blocks)
        return x


def stacked_linears(seed=0):
    """N stacked Linear(DIM, DIM) layers, built with a vmapped constructor."""
    return tl.vmap(lambda r: nn.Linear(DIM, DIM, rngs=r))(tl.Rngs(seed).split(N))


def snapshot(*args):
    """The structure, every Module and Variable object and every leaf value of ``args``."""
    nodes = []
    graphdef, pairs = graph_flatten(args, nodes)
    return graphdef, nodes, [(path, leaf, np.array(unwrap(leaf))) for path, leaf in pairs]


def assert_unchanged(before, *args):
    """``args`` are as ``snapshot`` saw them: same objects, same structure, same values."""
    graphdef, nodes, leaves = before
    now_nodes = []
    now_graphdef, pairs = graph_flatten(args, now_nodes)
    assert now_graphdef == graphdef
    assert len(now_nodes) == len(nodes) and all(
        a is b for a, b in zip(now_nodes, nodes, strict=True)
    )
    assert len(pairs) == len(leaves)
    for (path, leaf), (path0, leaf0, value0) in zip(pairs, leaves, strict=True):
        assert path == path0 and leaf is leaf0
        np.testing.assert_array_equal(np.asarray(unwrap(leaf)), value0)


def error_text(kind, call):
    """The message of the ``kind`` error that ``call()`` raises."""
    with pytest.raises(kind) as info:
        call()
    return str(info.value)


def layer_slice(stacked, i):
    """Layer ``i`` of a stacked Module, as a separate Module (a copy)."""
    graphdef, state = tl.split(stacked)
    return tl.merge(graphdef, jax.tree.map(lambda a: a[i], state))


# -- vmap: axes ---------------------------------------------------------------------------------


def test_vmap_int_axes_equal_python_loop():
    a, b = rand(0, N, DIM), rand(1, N, DIM)
    out = tl.vmap(lambda x, y: jnp.sin(x) * y + x.sum())(a, b)
    a, b = np.asarray(a), np.asarray(b)
    expected = np.stack([np.sin(a[i]) * b[i] + a[i].sum() for i in range(N)])
    close(out, expected)


def test_vmap_in_axes_one_maps_over_second_axis():
    x = rand(0, DIM, N)
    out = tl.vmap(lambda v: v * jnp.arange(DIM), in_axes=1)(x)
    assert out.shape == (N, DIM)
    x = np.asarray(x)
    close(out, np.stack([x[:, i] * np.arange(DIM) for i in range(N)]))


def test_vmap_broadcast_module_and_batched_input_equal_loop():
    model = nn.Linear(DIM, DIM, rngs=0)
    xs = rand(1, N, DIM)
    out = tl.vmap(lambda m, x: jnp.tanh(m(x)), in_axes=(None, 0))(model, xs)
    assert out.shape == (N, DIM)
    k, b, xs = np.asarray(model.kernel.value), np.asarray(model.bias.value), np.asarray(xs)
    close(out, np.stack([np.tanh(xs[i] @ k + b) for i in range(N)]))


def test_vmap_per_argument_tuple_axes_mix_int_and_none():
    x, y, z = rand(0, N, DIM), rand(1, DIM), rand(2, DIM, N)
    out = tl.vmap(lambda a, b, c: a * b - c, in_axes=(0, None, 1))(x, y, z)
    x, y, z = np.asarray(x), np.asarray(y), np.asarray(z)
    close(out, np.stack([x[i] * y - z[:, i] for i in range(N)]))


def test_vmap_decorator_factory():
    model = nn.Linear(DIM, DIM, rngs=0)

    @tl.vmap(in_axes=(None, 0))
    def apply(m, x):
        return m(x).sum()

    xs = rand(1, N, DIM)
    out = apply(model, xs)
    assert out.shape == (N,)
    k, b, xs = np.asarray(model.kernel.value), np.asarray(model.bias.value), np.asarray(xs)
    close(out, np.stack([(xs[i] @ k + b).sum() for i in range(N)]))


def test_vmap_out_axes_single_and_per_output():
    x = rand(0, N, DIM)
    out = tl.vmap(lambda v: v * 2, out_axes=1)(x)
    x = np.asarray(x)
    assert out.shape == (DIM, N)
    close(out, (x * 2).T)
    a, b = tl.vmap(lambda v: (v + 1, v.sum()), out_axes=(1, 0))(x)
    assert a.shape == (DIM, N) and b.shape == (N,)
    close(a, (x + 1).T)
    close(b, x.sum(1))


def test_vmap_out_axes_none_for_unbatched_output():
    x = rand(0, N, DIM)
    mapped, const = tl.vmap(lambda v: (v * 2, jnp.ones(DIM)), out_axes=(0, None))(x)
    assert mapped.shape == (N, DIM)
    assert const.shape == (DIM,)
    close(const, np.ones(DIM))


def test_vmap_axis_size_without_mapped_inputs():
    x = rand(0, DIM)
    out = tl.vmap(lambda v: v + 1, in_axes=None, axis_size=N)(x)
    assert out.shape == (N, DIM)
    close(out, np.broadcast_to(np.asarray(x) + 1, (N, DIM)))
    out = tl.vmap(lambda: jnp.arange(DIM), axis_size=N)()
    assert out.shape == (N, DIM)
    np.testing.assert_array_equal(np.asarray(out), np.tile(np.arange(DIM), (N, 1)))


def test_vmap_state_axes_stacked_params_shared_state():
    ws = rand(0, N, DIM, DIM)
    model = Scaled(ws, jnp.array(3.0))
    xs = rand(1, N, DIM)
    axes = tl.StateAxes({tl.Param: 0, ...: None})
    out = tl.vmap(lambda m, x: m(x), in_axes=(axes, 0))(model, xs)
    assert out.shape == (N, DIM)
    ws, xs = np.asarray(ws), np.asarray(xs)
    close(out, np.stack([(xs[i] @ ws[i]) * 3.0 for i in range(N)]))
    # The broadcast counter is updated once (one call per example, in parallel),
    # and keeps its unbatched shape; the stacked Param keeps its stacked shape.
    assert model.calls.value.shape == ()
    assert int(model.calls.value) == 1
    assert model.w.value.shape == (N, DIM, DIM)
    assert model.scale.value.shape == ()


def test_vmap_state_axes_with_shared_input():
    """Stacked params over a broadcast input: an ensemble of N layers on one x."""
    layers = stacked_linears()
    x = rand(1, DIM)
    out = tl.vmap(lambda m, v: m(v), in_axes=(tl.StateAxes({tl.Param: 0, ...: None}), None))(
        layers, x
    )
    assert out.shape == (N, DIM)
    k, b = np.asarray(layers.kernel.value), np.asarray(layers.bias.value)
    close(out, np.stack([np.asarray(x) @ k[i] + b[i] for i in range(N)]))


def test_vmap_writes_back_batched_state_updates():
    counters = tl.vmap(lambda s: Counter(s))(jnp.arange(N))
    assert counters.count.value.shape == (N,)
    out = tl.vmap(lambda m, x: m(x))(counters, jnp.ones((N, DIM)))
    close(out, 2 * jnp.ones((N, DIM)))
    np.testing.assert_array_equal(np.asarray(counters.count.value), np.arange(N) + 1)


def test_vmap_new_intermediate_on_mapped_module_appears_stacked():
    layers = stacked_linears()

    def f(m, x):
        y = m(x)
        m.act = tl.Intermediate(y)
        return y

    xs = rand(1, N, DIM)
    out = tl.vmap(f)(layers, xs)
    assert isinstance(layers.act, tl.Intermediate)
    assert layers.act.value.shape == (N, DIM)
    close(layers.act.value, out)


# -- vmap: construction -------------------------------------------------------------------------


def test_vmapped_construction_stacks_linear():
    rngs = tl.Rngs(0)
    split = rngs.split(N)
    layers = tl.vmap(lambda r: nn.Linear(2, 3, rngs=r))(split)
    assert isinstance(layers, nn.Linear)
    assert layers.kernel.value.shape == (N, 2, 3)
    assert layers.bias.value.shape == (N, 3)
    kernels = np.asarray(layers.kernel.value)
    for i in range(N):
        for j in range(i + 1, N):
            assert not np.allclose(kernels[i], kernels[j])
    # The split streams drew two keys each (kernel and bias): their counters advanced.
    np.testing.assert_array_equal(np.asarray(split.default.count.value), [2] * N)
    assert int(rngs.default.count.value) == 1  # split drew one key from the parent


def test_vmapped_construction_is_deterministic_and_matches_per_key_build():
    a, b = stacked_linears(seed=0), stacked_linears(seed=0)
    close(a.kernel.value, b.kernel.value, tol=0)
    assert not np.allclose(
        np.asarray(a.kernel.value), np.asarray(stacked_linears(seed=1).kernel.value)
    )
    # Layer i equals a Linear built from the i-th split key.
    keys = tl.Rngs(0).split(N).default.key.value
    build = jax.jit(lambda key: nn.Linear(DIM, DIM, rngs=key).kernel.value)
    for i in range(N):
        close(a.kernel.value[i], build(keys[i]))


def test_vmapped_construction_of_block():
    split = tl.Rngs(0).split(N)
    blocks = tl.vmap(lambda r: DropBlock(DIM, rngs=r))(split)
    assert blocks.linear.kernel.value.shape == (N, DIM, DIM)
    assert blocks.bn.mean.value.shape == (N, DIM)
    assert blocks.bn.var.value.shape == (N, DIM)
    assert blocks.bn.scale.value.shape == (N, DIM)
    assert blocks.dropout.rngs.key.value.shape == (N,)
    kernels = np.asarray(blocks.linear.kernel.value)
    assert not np.allclose(kernels[0], kernels[1])
    np.testing.assert_array_equal(np.asarray(split.default.count.value), [2] * N)
    # Dropout keeps a reference to the stream it was built with: the caller's stream.
    assert blocks.dropout.rngs is split.default
    np.testing.assert_array_equal(np.asarray(blocks.dropout.rngs.count.value), [2] * N)


# -- vmap: BatchNorm over the vmapped axis -----------------------------------------------------


def test_batchnorm_axis_name_under_vmap_equals_whole_batch():
    x = rand(0, N, DIM) * 2 + 1
    bn = nn.BatchNorm(DIM, axis_name="batch")
    ref = nn.BatchNorm(DIM)
    out = tl.vmap(lambda m, v: m(v), in_axes=(None, 0), axis_name="batch")(bn, x)
    expected = ref(x)
    close(out, expected, tol=1e-4)
    # Running statistics were updated on the live (broadcast) module, unbatched.
    assert bn.mean.value.shape == (DIM,)
    assert bn.var.value.shape == (DIM,)
    close(bn.mean.value, ref.mean.value)
    close(bn.var.value, ref.var.value)
    assert not np.allclose(np.asarray(bn.mean.value), 0.0)


def test_batchnorm_axis_name_under_vmap_decorator_and_jit():
    x = rand(1, N, DIM)
    bn = nn.BatchNorm(DIM, axis_name="i")
    ref = nn.BatchNorm(DIM)

    @tl.jit
    def step(m, v):
        return tl.vmap(lambda mm, vv: mm(vv), in_axes=(None, 0), axis_name="i")(m, v)

    close(step(bn, x), ref(x), tol=1e-4)
    close(bn.mean.value, ref.mean.value)
    close(step(bn, x), ref(x), tol=1e-4)
    close(bn.var.value, ref.var.value)


# -- scan -------------------------------------------------------------------------------------


def test_scan_array_carry_equals_lax_scan():
    def body(c, x):
        return c * 0.9 + x, jnp.sin(c) * x

    c0, xs = rand(0, DIM), rand(1, N, DIM)
    carry, ys = tl.scan(body)(c0, xs)
    carry_ref, ys_ref = jax.lax.scan(body, c0, xs)
    assert ys.shape == (N, DIM)
    close(carry, carry_ref)
    close(ys, ys_ref)


def test_scan_reverse_equals_lax_scan():
    def body(c, x):
        return c * 0.5 + x, c

    c0, xs = rand(0, DIM), rand(1, N, DIM)
    carry, ys = tl.scan(body, reverse=True)(c0, xs)
    carry_ref, ys_ref = jax.lax.scan(body, c0, xs, reverse=True)
    close(carry, carry_ref)
    close(ys, ys_ref)
    forward, _ = tl.scan(body)(c0, xs)
    assert not np.allclose(np.asarray(forward), np.asarray(carry))


def test_scan_length_without_xs():
    def body(c):
        return c + 1.0, c * 2

    carry, ys = tl.scan(body, in_axes=(tl.Carry,), length=N)(jnp.zeros(()))
    carry_ref, ys_ref = jax.lax.scan(lambda c, _: body(c), jnp.zeros(()), None, length=N)
    assert float(carry) == N
    assert ys.shape == (N,)
    close(carry, carry_ref)
    close(ys, ys_ref)


def test_scan_out_axes_carry_only():
    xs = rand(1, N, DIM)
    carry = tl.scan(lambda c, x: c + x, out_axes=tl.Carry)(jnp.zeros(DIM), xs)
    close(carry, np.asarray(xs).sum(0))


def test_scan_out_axes_ys_only():
    xs = rand(1, N, DIM)
    ys = tl.scan(lambda x: jnp.cumsum(x), in_axes=(0,), out_axes=0)(xs)
    close(ys, np.cumsum(np.asarray(xs), axis=1))


def test_scan_out_axes_ys_only_with_broadcast_module():
    counter = Counter()
    xs = rand(1, N, DIM)
    ys = tl.scan(lambda m, x: m(x), in_axes=(None, 0), out_axes=0)(counter, xs)
    close(ys, np.asarray(xs) * 2)
    # A Module with axis None is the same every step; its updated state is carried.
    assert int(counter.count.value) == N


def test_scan_decorator_factory():
    @tl.scan(in_axes=(tl.Carry, 0), out_axes=(tl.Carry, 0))
    def cumulative(c, x):
        c = c + x
        return c, c

    total, partial = cumulative(jnp.zeros(()), jnp.arange(5.0))
    assert float(total) == 10.0
    close(partial, np.cumsum(np.arange(5.0)))


def test_scan_module_as_carry():
    counter = Counter()

    def body(m, x):
        return m, m(x)

    xs = rand(1, N, DIM)
    final, ys = tl.scan(body)(counter, xs)
    assert final is counter
    assert int(counter.count.value) == N
    close(ys, np.asarray(xs) * 2)


def test_scan_module_carry_with_length():
    counter = Counter(start=10)

    def body(m):
        m.count += 1
        return m, m.count.value

    final, ys = tl.scan(body, in_axes=(tl.Carry,), length=7)(counter)
    assert final is counter
    assert int(counter.count.value) == 17
    np.testing.assert_array_equal(np.asarray(ys), np.arange(11, 18))


def test_scan_module_and_array_in_tuple_carry():
    model = nn.Linear(DIM, DIM, rngs=0)
    counter = Counter()

    def body(carry, x):
        m, c, h = carry
        h = jnp.tanh(m(h) + c(x))
        return (m, c, h), h

    xs = rand(1, N, DIM)
    (m_out, c_out, h), ys = tl.scan(body)((model, counter, jnp.zeros(DIM)), xs)
    assert m_out is model and c_out is counter
    assert int(counter.count.value) == N
    k, b = np.asarray(model.kernel.value), np.asarray(model.bias.value)
    h_ref = np.zeros(DIM, np.float32)
    for t in range(N):
        h_ref = np.tanh(h_ref @ k + b + np.asarray(xs[t]) * 2)
        close(ys[t], h_ref)
    close(h, h_ref)


def test_scan_over_stacked_layers_equals_python_loop():
    layers = stacked_linears()

    def body(x, layer):
        y = layer(x)
        return jnp.tanh(y), y.sum()

    x0 = rand(1, N, DIM)
    y, sums = tl.scan(body)(x0, layers)
    assert sums.shape == (N,)
    assert layers.kernel.value.shape == (N, DIM, DIM)
    expected = x0
    for i in range(N):
        layer = layer_slice(layers, i)
        out = layer(expected)
        close(sums[i], out.sum(), tol=1e-4)
        expected = jnp.tanh(out)
    close(y, expected)


def test_scan_over_stacked_layers_with_broadcast_module():
    layers = stacked_linears()
    counter = Counter()

    def body(x, layer, c):
        return c(layer(x)), None

    x0 = rand(1, N, DIM)
    y, _ = tl.scan(body, in_axes=(tl.Carry, 0, None))(x0, layers, counter)
    expected = x0
    for i in range(N):
        expected = layer_slice(layers, i)(expected) * 2
    close(y, expected, tol=1e-4)
    assert int(counter.count.value) == N


def test_scan_reverse_over_stacked_modules_writes_state_in_place():
    norms = tl.vmap(lambda: nn.BatchNorm(DIM), axis_size=N)()
    assert norms.mean.value.shape == (N, DIM)
    x = jnp.arange(N * DIM, dtype=jnp.float32).reshape(N, DIM)

    def body(h, bn):
        bn(h)
        return h + 1.0, h.mean()

    _, ys = tl.scan(body, reverse=True)(x, norms)
    # The last block runs first, on x; block i sees x + (N - 1 - i).
    shift = np.arange(N - 1, -1, -1, dtype=np.float32)
    close(ys, np.asarray(x).mean() + shift)
    expected_mean = 0.01 * (np.asarray(x).mean(0)[None, :] + shift[:, None])
    close(norms.mean.value, expected_mean)


def test_scan_state_axes_for_module():
    """Params scanned over (stacked), a counter carried, through one StateAxes."""
    model = Scaled(rand(0, N, DIM, DIM), jnp.array(1.0))
    axes = tl.StateAxes({tl.Param: 0, ...: tl.Carry})

    def body(x, m):
        return jnp.tanh(m(x)), None

    x0 = rand(1, N, DIM)
    y, _ = tl.scan(body, in_axes=(tl.Carry, axes))(x0, model)
    w = np.asarray(model.w.value)
    expected = np.asarray(x0)
    for i in range(N):
        expected = np.tanh(expected @ w[i])
    close(y, expected)
    assert int(model.calls.value) == N
    assert model.w.value.shape == (N, DIM, DIM)


def test_scan_over_stacked_layers_in_grad():
    layers = stacked_linears()
    x = rand(1, N, DIM)

    def loss(layers, x):
        y, _ = tl.scan(lambda h, layer: (jnp.tanh(layer(h)), None))(x, layers)
        return (y**2).mean()

    @jax.jit
    def loop_loss(params, x):
        for i in range(N):
            x = jnp.tanh(x @ params["k"][i] + params["b"][i])
        return (x**2).mean()

    grads = tl.grad(loss)(layers, x)
    params = {"k": layers.kernel.value, "b": layers.bias.value}
    ref = jax.grad(loop_loss)(params, x)
    assert grads.kernel.value.shape == (N, DIM, DIM)
    close(grads.kernel.value, ref["k"])
    close(grads.bias.value, ref["b"])


# -- the tiny-NNX ScanMLP ----------------------------------------------------------------------


def test_scan_mlp_construction_shapes():
    rngs = tl.Rngs(0)
    model = ScanMLP(DIM, N, rngs=rngs)
    blocks = model.blocks
    assert blocks.linear.kernel.value.shape == (N, DIM, DIM)
    assert blocks.linear.bias.value.shape == (N, DIM)
    assert blocks.bn.mean.value.shape == (N, DIM)
    assert blocks.dropout.rngs.count.value.shape == (N,)
    kernels = np.asarray(blocks.linear.kernel.value)
    assert not np.allclose(kernels[0], kernels[1])
    assert int(rngs.default.count.value) == 1


def test_scan_mlp_call_updates_batch_stats_and_rng_counts():
    model = ScanMLP(DIM, N, rngs=tl.Rngs(0))
    counts0 = np.asarray(model.blocks.dropout.rngs.count.value)
    mean0 = np.asarray(model.blocks.bn.mean.value)
    x = rand(1, N, DIM)
    y = model(x)
    assert y.shape == (N, DIM)
    mean = np.asarray(model.blocks.bn.mean.value)
    var = np.asarray(model.blocks.bn.var.value)
    assert mean.shape == (N, DIM) and var.shape == (N, DIM)
    assert not np.allclose(mean, mean0)
    # Each block saw a different input, so each has its own statistics.
    for i in range(1, N):
        assert not np.allclose(mean[0], mean[i])
        assert not np.allclose(var[0], var[i])
    counts = np.asarray(model.blocks.dropout.rngs.count.value)
    assert counts.shape == (N,)
    np.testing.assert_array_equal(counts, counts0 + 1)
    # A second call draws new dropout masks.
    y2 = model(x)
    np.testing.assert_array_equal(np.asarray(model.blocks.dropout.rngs.count.value), counts0 + 2)
    assert not np.allclose(np.asarray(y), np.asarray(y2))


def test_scan_mlp_equals_python_loop_over_blocks():
    model = ScanMLP(DIM, N, rngs=tl.Rngs(0))
    model.eval()  # deterministic dropout and running statistics: a pure function
    x = rand(1, N, DIM)
    expected = x
    for i in range(N):
        block = layer_slice(model.blocks, i)
        assert block.linear.kernel.value.shape == (DIM, DIM)
        expected = block(expected)
    close(model(x), expected, tol=1e-4)


def test_scan_mlp_under_jit_matches_eager():
    eager = ScanMLP(DIM, N, rngs=tl.Rngs(0))
    jitted = tl.clone(eager)
    x = rand(1, N, DIM)
    step = tl.jit(lambda m, v: m(v))
    for _ in range(2):
        y_eager = eager(x)
        y_jit = step(jitted, x)
        close(y_jit, y_eager, tol=1e-4)
    close(jitted.blocks.bn.mean.value, eager.blocks.bn.mean.value)
    close(jitted.blocks.bn.var.value, eager.blocks.bn.var.value)
    np.testing.assert_array_equal(
        np.asarray(jitted.blocks.dropout.rngs.count.value),
        np.asarray(eager.blocks.dropout.rngs.count.value),
    )


def test_scan_mlp_value_and_grad():
    model = ScanMLP(DIM, N, rngs=tl.Rngs(0))
    counts0 = np.asarray(model.blocks.dropout.rngs.count.value)
    mean0 = np.asarray(model.blocks.bn.mean.value)
    x, target = rand(1, N, DIM), rand(2, N, DIM)

    def loss_fn(m, v, t):
        return ((m(v) - t) ** 2).mean()

    loss, grads = tl.value_and_grad(loss_fn)(model, x, target)
    assert loss.shape == ()
    assert np.isfinite(float(loss))
    assert grads.blocks.linear.kernel.value.shape == (N, DIM, DIM)
    assert grads.blocks.linear.bias.value.shape == (N, DIM)
    assert grads.blocks.bn.scale.value.shape == (N, DIM)
    assert isinstance(grads.blocks.linear.kernel, tl.Param)
    # Only Params are differentiated.
    assert all(isinstance(v, tl.Param) for v in grads.flat().values())
    assert np.abs(np.asarray(grads.blocks.linear.kernel.value)).sum() > 0
    # Non-differentiated state flowed and was written back.
    assert not np.allclose(np.asarray(model.blocks.bn.mean.value), mean0)
    np.testing.assert_array_equal(np.asarray(model.blocks.dropout.rngs.count.value), counts0 + 1)


def test_scan_mlp_jitted_train_step_reduces_loss():
    model = ScanMLP(DIM, N, rngs=tl.Rngs(0))
    model.blocks.dropout.rate = 0.0  # a deterministic loss, so it must go down
    x, target = rand(1, N, DIM), rand(2, N, DIM) * 0.1

    @tl.jit
    def train_step(m, v, t):
        loss, grads = tl.value_and_grad(lambda mm: ((mm(v) - t) ** 2).mean())(m)
        params = tl.state(m, tl.Param)
        tl.update(m, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads))
        return loss

    kernel0 = np.asarray(model.blocks.linear.kernel.value)
    losses = [float(train_step(model, x, target)) for _ in range(5)]
    assert not np.allclose(np.asarray(model.blocks.linear.kernel.value), kernel0)
    assert losses[-1] < losses[0]


# -- remat --------------------------------------------------------------------------------------


def _mlp_loss(m, x):
    return (jnp.sin(m(x)) ** 2).sum()


def test_remat_same_value_and_grads():
    model = nn.MLP([DIM, DIM, DIM], rngs=0)
    x = rand(1, N, DIM)
    loss_ref, grads_ref = tl.value_and_grad(_mlp_loss)(model, x)
    loss, grads = tl.value_and_grad(tl.remat(_mlp_loss))(model, x)
    close(loss, loss_ref)
    for path, g in grads_ref.flat().items():
        close(grads.flat()[path].value, g.value)


def test_remat_with_policy_same_grads():
    model = nn.MLP([DIM, DIM, DIM], rngs=0)
    x = rand(1, N, DIM)
    grads_ref = tl.grad(_mlp_loss)(model, x)
    remat = tl.remat(_mlp_loss, policy=jax.checkpoint_policies.nothing_saveable)
    grads = tl.grad(remat)(model, x)
    for path, g in grads_ref.flat().items():
        close(grads.flat()[path].value, g.value)


def test_remat_decorator_factory_with_policy():
    model = nn.Linear(DIM, DIM, rngs=0)

    @tl.remat(policy=jax.checkpoint_policies.dots_saveable)
    def f(m, x):
        return jnp.tanh(m(x)).sum()

    x = rand(1, N, DIM)
    close(f(model, x), jnp.tanh(model(x)).sum())
    grads = tl.grad(f)(model, x)
    close(grads.kernel.value, tl.grad(lambda m, v: jnp.tanh(m(v)).sum())(model, x).kernel.value)


def test_remat_writes_back_state():
    bn = nn.BatchNorm(DIM)
    counter = Counter()
    x = rand(1, N, DIM) + 2.0

    def f(m, c, v):
        return c(m(v))

    y = tl.remat(f)(bn, counter, x)
    ref = nn.BatchNorm(DIM)
    close(y, ref(x) * 2, tol=1e-4)
    close(bn.mean.value, ref.mean.value)
    assert int(counter.count.value) == 1


def test_remat_inside_grad_writes_back_state():
    model = nn.Sequential(nn.Linear(DIM, DIM, rngs=0), nn.BatchNorm(DIM))
    x = rand(1, N, DIM)
    ref = tl.clone(model)
    grads = tl.grad(tl.remat(_mlp_loss))(model, x)
    grads_ref = tl.grad(_mlp_loss)(ref, x)
    close(model[1].mean.value, ref[1].mean.value)
    assert not np.allclose(np.asarray(model[1].mean.value), 0.0)
    close(grads.layers[0].kernel.value, grads_ref.layers[0].kernel.value, tol=1e-4)


# -- cond / switch ------------------------------------------------------------------------------


def _inc(m, x):
    m.count += 1
    return x + 1.0


def _dec(m, x):
    m.count -= 1
    return x - 1.0


def test_cond_concrete_pred_writes_back_taken_branch():
    counter = Counter()
    x = jnp.zeros(DIM)
    y = tl.cond(True, _inc, _dec, counter, x)
    close(y, jnp.ones(DIM))
    assert int(counter.count.value) == 1
    y = tl.cond(False, _inc, _dec, counter, x)
    close(y, -jnp.ones(DIM))
    assert int(counter.count.value) == 0
    tl.cond(False, _inc, _dec, counter, x)
    assert int(counter.count.value) == -1


def test_cond_traced_pred_inside_jit():
    counter = Counter()

    @tl.jit
    def step(m, x, pred):
        return tl.cond(pred, _inc, _dec, m, x)

    x = jnp.zeros(DIM)
    close(step(counter, x, jnp.array(True)), jnp.ones(DIM))
    assert int(counter.count.value) == 1
    close(step(counter, x, jnp.array(True)), jnp.ones(DIM))
    assert int(counter.count.value) == 2
    close(step(counter, x, jnp.array(False)), -jnp.ones(DIM))
    assert int(counter.count.value) == 1


def test_cond_updates_params_and_dropout_rng():
    model = nn.Linear(DIM, DIM, rngs=0)
    drop = nn.Dropout(0.5, rngs=1)
    kernel0 = np.asarray(model.kernel.value)

    def train(m, d, x):
        m.kernel.value = m.kernel.value * 2
        return d(m(x))

    def skip(m, d, x):
        return m(x)

    tl.cond(jnp.array(True), train, skip, model, drop, jnp.ones(DIM))
    close(model.kernel.value, kernel0 * 2)
    assert int(drop.rngs.count.value) == 1
    tl.cond(jnp.array(False), train, skip, model, drop, jnp.ones(DIM))
    close(model.kernel.value, kernel0 * 2)
    assert int(drop.rngs.count.value) == 1


def test_cond_same_new_intermediate_in_both_branches_appears():
    counter = Counter()

    def a(m):
        m.seen = tl.Intermediate(jnp.array(1.0))
        return None

    def b(m):
        m.seen = tl.Intermediate(jnp.array(2.0))
        return None

    tl.cond(False, a, b, counter)
    assert isinstance(counter.seen, tl.Intermediate)
    assert float(counter.seen.value) == 2.0


def test_cond_different_structures_raise():
    counter = Counter()

    def adds(m, x):
        m.extra = tl.Intermediate(x)
        return x

    def plain(m, x):
        return x

    with pytest.raises(ValueError, match="structure"):
        tl.cond(True, adds, plain, counter, jnp.ones(DIM))
    with pytest.raises(ValueError, match="structure"):
        tl.jit(lambda m, x, p: tl.cond(p, plain, adds, m, x))(counter, jnp.ones(DIM), jnp.array(1))
    # The failed calls left the live module alone.
    assert not hasattr(counter, "extra")
    assert int(counter.count.value) == 0


def test_cond_different_output_kinds_raise():
    with pytest.raises(ValueError, match="structure"):
        tl.cond(True, lambda m: (m.count.value, m.count.value), lambda m: m.count.value, Counter())


def test_switch_concrete_and_traced_index():
    counter = Counter()

    def add(n):
        def branch(m, x):
            m.count += n
            return x * n

        return branch

    branches = [add(1), add(10), add(100)]
    x = jnp.ones(DIM)
    close(tl.switch(2, branches, counter, x), 100 * x)
    assert int(counter.count.value) == 100
    step = tl.jit(lambda m, v, i: tl.switch(i, branches, m, v))
    close(step(counter, x, jnp.array(1)), 10 * x)
    assert int(counter.count.value) == 110
    close(step(counter, x, jnp.array(0)), x)
    assert int(counter.count.value) == 111


def test_switch_different_structures_raise():
    counter = Counter()

    def plain(m):
        m.count += 1
        return m.count.value

    def adds(m):
        m.note = tl.Intermediate(jnp.zeros(()))
        return m.count.value

    with pytest.raises(ValueError, match="structure"):
        tl.switch(0, [plain, plain, adds], counter)
    assert not hasattr(counter, "note")


# -- fori_loop ----------------------------------------------------------------------------------


def test_fori_loop_counter_module():
    counter = Counter()

    def body(i, m):
        m.count += 1
        return m

    out = tl.fori_loop(0, 7, body, counter)
    assert out is counter
    assert int(counter.count.value) == 7


def test_fori_loop_uses_index_and_traced_bounds_in_jit():
    counter = Counter()

    def body(i, m):
        m.count += i
        return m

    tl.fori_loop(0, N, body, counter)
    assert int(counter.count.value) == 6  # 0 + 1 + 2 + 3

    @tl.jit
    def run(m, n):
        tl.fori_loop(0, n, body, m)
        return None

    run(counter, jnp.array(4))
    assert int(counter.count.value) == 12  # + 0 + 1 + 2 + 3


def test_fori_loop_updates_parameters_with_tuple_carry():
    model = nn.Linear(DIM, DIM, rngs=0)
    x, target = rand(1, N, DIM), rand(2, N, DIM)

    def loss_fn(m):
        return ((m(x) - target) ** 2).mean()

    def body(i, carry):
        m, losses = carry
        loss, grads = tl.value_and_grad(loss_fn)(m)
        tl.update(m, jax.tree.map(lambda p, g: p - 0.1 * g, tl.state(m, tl.Param), grads))
        return m, losses.at[i].set(loss)

    @jax.jit
    def reference(k, b):  # the same loop on plain arrays
        losses = []
        for _ in range(N):
            loss, (gk, gb) = jax.value_and_grad(
                lambda k, b: ((x @ k + b - target) ** 2).mean(), argnums=(0, 1)
            )(k, b)
            losses.append(loss)
            k, b = k - 0.1 * gk, b - 0.1 * gb
        return k, b, jnp.stack(losses)

    k_ref, b_ref, losses_ref = reference(model.kernel.value, model.bias.value)
    out_model, losses = tl.fori_loop(0, N, body, (model, jnp.zeros(N)))
    assert out_model is model
    assert losses[-1] < losses[0]
    close(losses, losses_ref, tol=1e-4)
    close(model.kernel.value, k_ref, tol=1e-4)
    close(model.bias.value, b_ref, tol=1e-4)


def test_fori_loop_different_structure_raises():
    counter = Counter()

    def adds(i, m):
        m.extra = tl.Intermediate(jnp.zeros(()))
        return m

    with pytest.raises(ValueError, match="structure"):
        tl.fori_loop(0, 3, adds, counter)

    def returns_tuple(i, m):
        return m, jnp.zeros(())

    with pytest.raises(ValueError, match="structure"):
        tl.fori_loop(0, 3, returns_tuple, counter)
    assert int(counter.count.value) == 0


# -- eval_shape ---------------------------------------------------------------------------------


def test_eval_shape_builds_abstract_model():
    abstract = tl.eval_shape(lambda: nn.MLP([4, 8, 2], rngs=0))
    assert isinstance(abstract, nn.MLP)
    shapes = [(4, 8), (8,), (8, 2), (2,)]
    values = [
        abstract.layers[0].kernel.value,
        abstract.layers[0].bias.value,
        abstract.layers[1].kernel.value,
        abstract.layers[1].bias.value,
    ]
    for value, shape in zip(values, shapes, strict=True):
        assert isinstance(value, jax.ShapeDtypeStruct)
        assert value.shape == shape
        assert value.dtype == jnp.float32
    variables = list(tl.iter_variables(abstract))
    assert len(variables) == 4
    assert all(isinstance(v.value, jax.ShapeDtypeStruct) for _, v in variables)
    assert all(isinstance(v, tl.Param) for _, v in variables)


def test_eval_shape_dtypes_and_rng_state():
    abstract = tl.eval_shape(lambda: nn.Linear(3, 2, param_dtype=jnp.bfloat16, rngs=0))
    assert abstract.kernel.value.dtype == jnp.bfloat16
    abstract = tl.eval_shape(lambda: DropBlock(DIM, rngs=tl.Rngs(0)))
    assert abstract.bn.mean.value.shape == (DIM,)
    assert isinstance(abstract.dropout.rngs.count.value, jax.ShapeDtypeStruct)
    assert abstract.dropout.rngs.count.value.dtype == jnp.uint32


def test_eval_shape_of_concrete_model_leaves_it_unchanged():
    bn = nn.BatchNorm(DIM)
    counter = Counter()
    x = rand(1, N, DIM) + 5.0

    def f(m, c, v):
        m.extra = tl.Intermediate(v)
        return c(m(v))

    out = tl.eval_shape(f, bn, counter, x)
    assert isinstance(out, jax.ShapeDtypeStruct)
    assert out.shape == (N, DIM) and out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(bn.mean.value), np.zeros(DIM))
    assert isinstance(bn.mean.value, jax.Array)
    assert int(counter.count.value) == 0
    assert not hasattr(bn, "extra")


def test_eval_shape_returning_the_model_gives_new_objects():
    model = nn.Linear(DIM, DIM, rngs=0)
    kernel = np.asarray(model.kernel.value)
    abstract = tl.eval_shape(lambda m: m, model)
    assert abstract is not model
    assert abstract.kernel is not model.kernel
    assert isinstance(abstract.kernel.value, jax.ShapeDtypeStruct)
    assert abstract.kernel.value.shape == (DIM, DIM)
    np.testing.assert_array_equal(np.asarray(model.kernel.value), kernel)


# -- errors -------------------------------------------------------------------------------------


def test_state_axes_without_matching_filter_names_path():
    bn = nn.BatchNorm(DIM)
    with pytest.raises(ValueError, match=r"mean.*matches none of the filters"):
        tl.vmap(lambda m, x: m(x), in_axes=(tl.StateAxes({tl.Param: 0}), 0))(bn, jnp.ones((N, DIM)))
    blocks = tl.vmap(lambda r: DropBlock(DIM, rngs=r))(tl.Rngs(0).split(N))
    with pytest.raises(ValueError, match=r"bn\.mean"):
        tl.scan(lambda x, b: (b(x), None), in_axes=(tl.Carry, tl.StateAxes({tl.Param: 0})))(
            jnp.ones(DIM), blocks
        )


def test_state_axes_repr_and_catch_all_fix():
    axes = tl.StateAxes({tl.Param: 0, ...: None})
    assert repr(axes) == "tl.StateAxes({tl.Param: 0, ...: None})"
    with pytest.raises(ValueError, match=r"\.\.\.: None"):
        tl.vmap(lambda m: m.mean.value, in_axes=(tl.StateAxes({tl.Param: 0}),))(nn.BatchNorm(DIM))


def test_vmap_in_axes_wrong_length_raises():
    with pytest.raises(ValueError, match="in_axes has 3 entries but the function got 2"):
        tl.vmap(lambda a, b: a + b, in_axes=(0, 0, None))(jnp.ones((N, DIM)), jnp.ones((N, DIM)))
    with pytest.raises(ValueError, match="in_axes has 1 entries"):
        tl.scan(lambda c, x: (c, x), in_axes=(tl.Carry,))(jnp.zeros(DIM), jnp.ones((N, DIM)))


def test_vmap_bad_out_axes_raises():
    with pytest.raises(TypeError, match="out_axes"):
        tl.vmap(lambda x: x, out_axes="0")(jnp.ones((N, DIM)))


def test_scan_body_adding_variable_raises():
    counter = Counter()

    def body(m, x):
        m.new = tl.Variable(x)
        return m, x

    with pytest.raises(ValueError, match="structure"):
        tl.scan(body)(counter, jnp.ones((N, DIM)))
    assert not hasattr(counter, "new")
    assert int(counter.count.value) == 0


def test_scan_body_adding_variable_to_scanned_module_raises():
    layers = stacked_linears()

    def body(x, layer):
        layer.act = tl.Intermediate(x)
        return layer(x), None

    with pytest.raises(ValueError, match="structure"):
        tl.scan(body)(jnp.ones(DIM), layers)
    assert not hasattr(layers, "act")


def test_scan_body_returning_new_carry_object_raises():
    def body(m, x):
        return Counter(), x

    with pytest.raises(ValueError, match="structure"):
        tl.scan(body)(Counter(), jnp.ones((N, DIM)))


def test_scan_body_bad_output_for_out_axes_raises():
    with pytest.raises(TypeError, match="pair"):
        tl.scan(lambda c, x: c + x)(jnp.zeros(DIM), jnp.ones((N, DIM)))


def test_scan_bad_axis_value_raises():
    c0, xs = jnp.zeros(DIM), jnp.ones((2, DIM))
    before = snapshot(c0, xs)
    message = error_text(
        ValueError, lambda: tl.scan(lambda c, x: (c, x), in_axes=(tl.Carry, "1"))(c0, xs)
    )
    assert "tl.scan(<lambda>): in_axes[1] is '1'" in message
    assert "expected an int, None, tl.Carry" in message and "Fix:" in message
    assert_unchanged(before, c0, xs)


# -- one object, one axis -----------------------------------------------------------------------


def test_vmap_same_module_under_two_axes_raises():
    model = nn.Linear(DIM, DIM, rngs=0)
    before = snapshot(model)
    message = error_text(
        ValueError, lambda: tl.vmap(lambda a, b: a(b.kernel.value), in_axes=(0, None))(model, model)
    )
    assert message.startswith("tl.vmap(<lambda>): `args[1]` is the same Linear object as `args[0]`")
    assert "Expected the same axis from both arguments" in message
    assert "got\n0 for `args[0]` and None for `args[1]` (at `args[1].kernel`)" in message
    assert "Fix:" in message and "tl.clone(model)" in message
    assert_unchanged(before, model)


def test_vmap_shared_submodule_under_two_axes_names_its_paths():
    shared = nn.Linear(DIM, DIM, rngs=0)
    a = nn.Sequential(shared, nn.Linear(DIM, DIM, rngs=1))
    b = nn.Sequential(nn.Linear(DIM, DIM, rngs=2), shared)
    xs = rand(3, N, DIM)
    before = snapshot(a, b, xs)
    message = error_text(
        ValueError, lambda: tl.vmap(lambda p, q, x: p(x) + q(x), in_axes=(None, 0, 0))(a, b, xs)
    )
    # The outermost shared object is named, at its path in each argument.
    assert "`args[1].layers[1]` is the same Linear object as `args[0].layers[0]`" in message
    assert "None for `args[0].layers[0]` and 0 for `args[1].layers[1]`" in message
    assert "(at `args[1].layers[1].kernel`)" in message
    assert_unchanged(before, a, b, xs)


def test_vmap_shared_variable_and_keyword_argument_under_two_axes_raise():
    w = tl.Param(rand(0, N, DIM))
    holder = Scaled(w.value, jnp.array(1.0))
    holder.w = w  # the same Param object: an attribute of holder and an argument
    before = snapshot(w, holder)
    message = error_text(
        ValueError, lambda: tl.vmap(lambda v, m: v.value * m.scale, in_axes=(0, None))(w, holder)
    )
    assert "`args[1].w` is the same Param object as `args[0]`" in message
    assert_unchanged(before, w, holder)
    # Keyword arguments are mapped over axis 0: `m` below is the first argument, broadcast.
    message = error_text(
        ValueError, lambda: tl.vmap(lambda m, other: m.w.value, in_axes=(None,))(holder, other=w)
    )
    assert "`other` is the same Param object as `args[0].w`" in message
    assert "None for `args[0].w` and 0 for `other`" in message
    assert_unchanged(before, w, holder)


def test_vmap_state_axes_giving_a_shared_module_another_axis_raises():
    bn = nn.BatchNorm(DIM)
    xs = rand(0, N, DIM)
    axes = tl.StateAxes({tl.Param: 0, ...: None})
    before = snapshot(bn, xs)
    message = error_text(
        ValueError, lambda: tl.vmap(lambda m, n, x: m(x), in_axes=(axes, 0, 0))(bn, bn, xs)
    )
    # Its Params get 0 from both; its BatchStats get None from the StateAxes.
    assert "`args[1]` is the same BatchNorm object as `args[0]`" in message
    assert "None for `args[0]` and 0 for `args[1]` (at `args[1].mean`)" in message
    assert_unchanged(before, bn, xs)


def test_vmap_same_object_under_the_same_axis_is_one_object():
    layers = stacked_linears()
    xs = rand(1, N, DIM)
    out = tl.vmap(lambda a, b, x: a(x) - b(x) + a.kernel.value.sum())(layers, layers, xs)
    close(out, tl.vmap(lambda a, x: a.kernel.value.sum() + 0 * x)(layers, xs))
    # A StateAxes giving every leaf the other argument's axis agrees with it.
    linear = nn.Linear(DIM, DIM, rngs=0)
    axes = tl.StateAxes({tl.Param: None, ...: 0})
    out = tl.vmap(lambda a, b, x: a(x) + b(x), in_axes=(None, axes, 0))(linear, linear, xs)
    close(out, 2 * linear(xs), tol=1e-5)


def test_vmap_plain_array_twice_under_two_axes_is_allowed():
    x = rand(0, N, N)
    out = tl.vmap(lambda a, b: a * 2 + b, in_axes=(0, 1))(x, x)
    close(out, jax.vmap(lambda a, b: a * 2 + b, in_axes=(0, 1))(x, x))


def test_scan_same_module_under_two_axes_raises():
    layers = stacked_linears()
    before = snapshot(layers)
    message = error_text(ValueError, lambda: tl.scan(lambda m, layer: (m, None))(layers, layers))
    assert message.startswith("tl.scan(<lambda>): `args[1]` is the same Linear object")
    assert "tl.Carry for `args[0]` and 0 for `args[1]`" in message
    assert_unchanged(before, layers)
    counter = Counter()
    xs = rand(1, N, DIM)
    before = snapshot(counter.count, counter, xs)
    message = error_text(
        ValueError,
        lambda: tl.scan(lambda v, m, x: m(x), in_axes=(0, None, 0), out_axes=0)(
            counter.count, counter, xs
        ),
    )
    assert "`args[1].count` is the same Variable object as `args[0]`" in message
    assert_unchanged(before, counter.count, counter, xs)


# -- scan: other axes -----------------------------------------------------------------------------


def test_scan_in_axes_and_out_axes_other_ints_equal_lax_scan():
    def body(c, x):
        return c * 0.9 + x, jnp.sin(c) * x

    c0, xs = rand(0, DIM), rand(1, N, DIM)
    carry_ref, ys_ref = jax.lax.scan(body, c0, xs)
    carry, ys = tl.scan(body, in_axes=(tl.Carry, 1), out_axes=(tl.Carry, 1))(c0, xs.T)
    assert ys.shape == (DIM, N)
    close(carry, carry_ref)
    close(ys, ys_ref.T)
    carry, ys = tl.scan(body, in_axes=(tl.Carry, -1), out_axes=(tl.Carry, -1))(c0, xs.T)
    close(carry, carry_ref)
    close(ys, ys_ref.T)
    ys = tl.scan(lambda x: jnp.cumsum(x), in_axes=1, out_axes=1)(xs.T)
    close(ys, np.cumsum(np.asarray(xs), axis=1).T)


def test_scan_over_module_state_stacked_along_axis_one():
    layers0 = stacked_linears()
    layers1 = tl.vmap(lambda r: nn.Linear(DIM, DIM, rngs=r), out_axes=1)(tl.Rngs(0).split(N))
    assert layers1.kernel.value.shape == (DIM, N, DIM)
    close(jnp.moveaxis(layers1.kernel.value, 1, 0), layers0.kernel.value, tol=0)

    def body(h, layer):
        return jnp.tanh(layer(h)), layer(h).sum()

    x = rand(1, 2, DIM)
    y0, sums0 = tl.scan(body)(x, layers0)
    y1, sums1 = tl.scan(body, in_axes=(tl.Carry, 1))(x, layers1)
    close(y1, y0)
    close(sums1, sums0)
    axes = tl.StateAxes({tl.Param: 1, ...: None})
    y2, _ = tl.scan(body, in_axes=(tl.Carry, axes))(x, layers1)
    close(y2, y0)


def test_scan_state_updated_along_axis_one_comes_back_along_it():
    norms0 = tl.vmap(lambda: nn.BatchNorm(DIM), axis_size=N)()
    norms1 = tl.vmap(lambda: nn.BatchNorm(DIM), axis_size=N, out_axes=1)()
    assert norms1.mean.value.shape == (DIM, N)

    def body(h, bn):
        return bn(h) + 1.0, None

    x = rand(1, 2, DIM) + 3.0
    for _ in range(2):
        tl.scan(body)(x, norms0)
        tl.scan(body, in_axes=(tl.Carry, 1))(x, norms1)
    assert norms1.mean.value.shape == (DIM, N)
    close(norms1.mean.value, np.asarray(norms0.mean.value).T)
    close(norms1.var.value, np.asarray(norms0.var.value).T)
    assert not np.allclose(np.asarray(norms0.mean.value), 0.0)


# -- scan: carry declarations -------------------------------------------------------------------


def _scan_call(**kwargs):
    """A scan over a Counter carry and xs, with the given axes: what the errors below call."""
    counter, xs = Counter(), rand(1, N, DIM)
    before = snapshot(counter, xs)
    body = lambda m, x: (m, m(x))  # noqa: E731
    return (lambda: tl.scan(body, **kwargs)(counter, xs)), before, (counter, xs)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (
            {"in_axes": (tl.Carry, 0), "out_axes": 0},
            [
                "in_axes=(tl.Carry, 0) carries an argument (tl.Carry) but out_axes=0",
                "would be lost",
                "Fix: `out_axes=(tl.Carry, 0)`",
            ],
        ),
        (
            {"in_axes": (None, 0), "out_axes": (tl.Carry, 0)},
            [
                "out_axes=(tl.Carry, 0) returns a carry (tl.Carry) but in_axes=(None, 0)",
                "no carry to start from",
                "Fix: mark the carried argument",
            ],
        ),
        (
            {"in_axes": (tl.Carry, tl.Carry)},
            [
                "in_axes marks 2 arguments tl.Carry (in_axes[0], in_axes[1])",
                "a scan has one carry",
                "(h, c), xs)",
            ],
        ),
        (
            {"in_axes": tl.Carry, "out_axes": tl.Carry},
            ["in_axes marks 2 arguments tl.Carry (args[0], args[1])"],
        ),
        (
            {"out_axes": (0, tl.Carry)},
            ["out_axes=(0, tl.Carry) is not one tl.scan knows", "only ever first", "Fix:"],
        ),
        (
            {"out_axes": (tl.Carry, 0, 0)},
            ["out_axes=(tl.Carry, 0, 0)", "the pair (tl.Carry, axis), not 3 entries", "Fix:"],
        ),
        (
            {"out_axes": (tl.Carry,)},
            ["out_axes=(tl.Carry,)", "not 1 entries"],
        ),
        (
            {"out_axes": (tl.Carry, None)},
            ["out_axes=(tl.Carry, None)", "cannot be broadcast (None)", "Fix:"],
        ),
        (
            {"in_axes": (None, 0), "out_axes": None},
            ["out_axes=None", "cannot be broadcast (None)"],
        ),
    ],
)
def test_scan_inconsistent_carry_declarations_raise(kwargs, expected):
    call, before, args = _scan_call(**kwargs)
    message = error_text(ValueError, call)
    assert message.startswith("tl.scan(<lambda>): ")
    for part in expected:
        assert part in message, (part, message)
    assert_unchanged(before, *args)


def test_scan_out_axes_int_without_carry_and_carry_only_still_work():
    counter = Counter()
    xs = rand(1, N, DIM)
    ys = tl.scan(lambda m, x: m(x), in_axes=(None, 0), out_axes=1)(counter, xs)
    close(ys, (np.asarray(xs) * 2).T)
    final = tl.scan(lambda m: m, in_axes=tl.Carry, out_axes=tl.Carry, length=3)(counter)
    assert final is counter
    assert int(counter.count.value) == N


# -- scan: carried Variables holding other leaves' values ---------------------------------------


class Memory(tl.Module):
    """Two carried Variables: ``last`` (the slice seen last) and ``other``."""

    def __init__(self):
        self.last = tl.Variable(jnp.zeros(DIM))
        self.other = tl.Variable(jnp.ones(DIM))


def test_scan_carried_variable_set_to_the_scanned_slice_three_times():
    def body(m, x):
        m.last.value = x  # the scanned slice itself
        m.other.value = m.other.value + x
        return m, x.sum()

    def reference(c, x):
        _, other = c
        return (x, other + x), x.sum()

    memory = Memory()
    carry = (memory.last.value, memory.other.value)
    last, other = memory.last, memory.other
    for k in range(3):
        xs = rand(k, N, DIM)
        final, ys = tl.scan(body)(memory, xs)
        carry, ys_ref = jax.lax.scan(reference, carry, xs)
        assert final is memory and memory.last is last and memory.other is other
        assert memory.last.value.shape == (DIM,)
        close(memory.last.value, carry[0], tol=0)
        close(memory.other.value, carry[1])
        close(ys, ys_ref)
        np.testing.assert_array_equal(np.asarray(xs), np.asarray(rand(k, N, DIM)))


def test_scan_carried_variables_swapped_three_times():
    def body(m, x):
        m.last.value, m.other.value = m.other.value, m.last.value + x
        return m, m.last.value.sum()

    def reference(c, x):
        last, other = c
        return (other, last + x), other.sum()

    memory = Memory()
    carry = (memory.last.value, memory.other.value)
    xs = rand(0, N, DIM)
    for _ in range(3):
        _, ys = tl.scan(body)(memory, xs)
        carry, ys_ref = jax.lax.scan(reference, carry, xs)
        close(memory.last.value, carry[0])
        close(memory.other.value, carry[1])
        close(ys, ys_ref)
    assert not np.allclose(np.asarray(memory.last.value), np.asarray(memory.other.value))


def test_scan_carried_variable_swapped_with_scanned_state_three_times():
    """The carry takes each layer's bias; each layer's bias becomes the carry it saw."""
    layers = stacked_linears()
    memory = Memory()

    def body(m, layer):
        m.last.value, layer.bias.value = layer.bias.value, m.last.value
        return m, None

    def reference(last, bias):
        return bias, last

    last, biases = memory.last.value, layers.bias.value
    for _ in range(3):
        tl.scan(body)(memory, layers)
        last, biases = jax.lax.scan(reference, last, biases)
        close(memory.last.value, last, tol=0)
        close(layers.bias.value, biases, tol=0)
        assert layers.bias.value.shape == (N, DIM)


def test_scan_swapping_carried_variable_objects_raises_and_changes_nothing():
    memory = Memory()
    xs = rand(0, N, DIM)
    before = snapshot(memory, xs)

    def body(m, x):
        m.last, m.other = m.other, m.last  # the objects, not their values: a new structure
        return m, None

    with pytest.raises(ValueError, match="structure of the arguments changed"):
        tl.scan(body)(memory, xs)
    assert_unchanged(before, memory, xs)


# -- vmap: Variables created inside, unmapped outputs -------------------------------------------


class Empty(tl.Module):
    """No state yet: a vmapped function fills it in."""


class Built(tl.Module):
    """Built inside a vmapped ``__init__``: a Linear (Params) and a BatchNorm (BatchStats)."""

    @tl.vmap(in_axes=(tl.StateAxes({tl.Param: 0, ...: None}), 0))
    def __init__(self, rngs):
        self.linear = nn.Linear(DIM, DIM, rngs=rngs)
        self.bn = nn.BatchNorm(DIM)


def test_vmapped_init_stacks_params_but_not_batch_stats():
    rngs = tl.Rngs(0).split(N)
    model = Built(rngs)
    assert model.linear.kernel.value.shape == (N, DIM, DIM)
    assert model.linear.bias.value.shape == (N, DIM)
    assert model.bn.scale.value.shape == (N, DIM)  # a Param, broadcast along axis 0
    assert model.bn.mean.value.shape == (DIM,)  # a BatchStat: `...: None`, not stacked
    assert model.bn.var.value.shape == (DIM,)
    kernels = np.asarray(model.linear.kernel.value)
    assert not np.allclose(kernels[0], kernels[1])
    np.testing.assert_array_equal(np.asarray(rngs.default.count.value), [2] * N)
    # An int (or None) axis gives everything created on the argument that axis.
    for axis, shape in [(0, (N, DIM)), (None, (DIM,))]:
        empty = Empty()
        tl.vmap(lambda m, r: setattr(m, "bn", nn.BatchNorm(DIM)), in_axes=(axis, 0))(empty, rngs)
        assert empty.bn.mean.value.shape == shape


def test_vmapped_method_creating_state_gives_each_type_its_state_axes_entry():
    layers = stacked_linears()
    xs = rand(1, N, DIM)

    def f(m, x):
        y = m(x)
        m.stat = tl.BatchStat(jnp.zeros(DIM))  # `...: None`: one, unstacked
        m.act = tl.Intermediate(y)
        m.extra = tl.Param(y * 2)  # tl.Param: 0, stacked
        return y

    axes = tl.StateAxes({tl.Param: 0, tl.Intermediate: 1, ...: None})
    out = tl.vmap(f, in_axes=(axes, 0))(layers, xs)
    assert isinstance(layers.stat, tl.BatchStat) and layers.stat.value.shape == (DIM,)
    assert layers.extra.value.shape == (N, DIM)
    close(layers.extra.value, 2 * out)
    assert layers.act.value.shape == (DIM, N)
    close(layers.act.value, np.asarray(out).T)


def test_vmap_state_axes_without_a_match_for_a_new_variable_raises():
    layers = stacked_linears()

    def f(m):
        m.stat = tl.BatchStat(jnp.zeros(DIM))
        return None

    with pytest.raises(ValueError, match=r"model\.stat` \(BatchStat\) matches none"):
        tl.vmap(f, in_axes=(tl.StateAxes({tl.Param: 0}),))(layers)
    assert not hasattr(layers, "stat")


def test_vmap_unmapped_input_returned_as_is_comes_back_broadcast():
    xs, y = rand(0, N, DIM), rand(1, DIM)
    model = nn.Linear(DIM, DIM, rngs=0)
    f = lambda x, v, m: (x, v, m.bias.value)  # noqa: E731
    got = tl.vmap(f, in_axes=(0, None, None))(xs, y, model)
    want = jax.vmap(lambda x, v, b: (x, v, b), in_axes=(0, None, None))(xs, y, model.bias.value)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape
        close(a, b, tol=0)
    assert got[1].shape == (N, DIM)
    moved = tl.vmap(lambda x, v: v, in_axes=(0, None), out_axes=1)(xs, y)
    assert moved.shape == (DIM, N)
    close(moved, np.broadcast_to(np.asarray(y)[:, None], (DIM, N)), tol=0)
    # Returning the unmapped Module itself returns the caller's object, unchanged.
    assert tl.vmap(lambda x, m: m, in_axes=(0, None))(xs, model) is model
    assert model.kernel.value.shape == (DIM, DIM)


def test_vmap_out_axes_tuple_for_another_output_raises():
    xs = rand(0, N, DIM)
    message = error_text(ValueError, lambda: tl.vmap(lambda x: x, out_axes=(0, 1))(xs))
    assert "tl.vmap(<lambda>): out_axes=(0, 1) has 2 entries" in message
    assert "it returned an array" in message and "Fix:" in message


def test_vmap_bad_in_axes_entries_raise():
    model = nn.Linear(DIM, DIM, rngs=0)
    before = snapshot(model)
    message = error_text(ValueError, lambda: tl.vmap(lambda m: m, in_axes=(tl.Carry,))(model))
    assert "tl.vmap(<lambda>): in_axes[0] is tl.Carry" in message
    assert "tl.Carry is tl.scan's" in message and "Fix: e.g. `in_axes=(0, None)`" in message
    axes = tl.StateAxes({tl.Param: tl.Carry, ...: None})
    message = error_text(ValueError, lambda: tl.vmap(lambda m: m, in_axes=axes)(model))
    assert "in_axes is tl.StateAxes({tl.Param: tl.Carry, ...: None})" in message
    assert_unchanged(before, model)


# -- StateAxes ----------------------------------------------------------------------------------


def test_state_axes_catch_all_before_other_entries_raises():
    message = error_text(ValueError, lambda: tl.StateAxes({...: None, tl.Param: 0}))
    assert message.startswith("tl.StateAxes: the filter ... (everything) comes before tl.Param")
    assert "could then\nnever match anything" in message
    assert "tl.StateAxes({tl.Param: 0, ...: None})" in message
    message = error_text(
        ValueError, lambda: tl.StateAxes({tl.Param: 0, True: None, tl.BatchStat: tl.Carry})
    )
    assert "the filter True (everything) comes before tl.BatchStat" in message
    assert "tl.StateAxes({tl.Param: 0, tl.BatchStat: tl.Carry, True: None})" in message


def test_state_axes_repr_uses_filter_repr():
    axes = tl.StateAxes({tl.Any(tl.Param, tl.BatchStat): 0, tl.PathContains("w"): 1, ...: tl.Carry})
    assert repr(axes) == (
        "tl.StateAxes({tl.Any(tl.Param, tl.BatchStat): 0, tl.PathContains('w'): 1, ...: tl.Carry})"
    )
    assert not hasattr(batching, "_name")  # filter_repr replaced batching's own helper


def test_state_axes_bad_axis_raises():
    message = error_text(ValueError, lambda: tl.StateAxes({tl.Param: "0"}))
    assert "the axis of tl.Param is '0'" in message and "Fix:" in message


# -- the transforms as objects ------------------------------------------------------------------


def test_vmap_and_scan_keep_the_function_identity():
    def step(c, x):
        """One step."""
        return c + x, c

    for transform, kind in [(tl.vmap, "tl.vmap"), (tl.scan, "tl.scan")]:
        wrapped = transform(step)
        decorated = transform(in_axes=(tl.Carry, 0) if kind == "tl.scan" else 0)(step)
        for w in (wrapped, decorated):
            assert isinstance(w, tl.transforms.lifting.Transform)
            assert w.kind == kind and w.label == f"{kind}(step)"
            assert w.__name__ == "step"
            assert w.__qualname__ == step.__qualname__
            assert w.__doc__ == "One step."
            assert w.__module__ == step.__module__
            assert w.__wrapped__ is step
            assert repr(w) == f"<{kind}(step)>"


def test_vmap_and_scan_run_the_function_under_their_label():
    seen = []

    def step(c, x):
        seen.append(calls.transform_name())
        return c + x, c

    tl.vmap(step)(jnp.ones(N), jnp.ones(N))
    tl.scan(step)(jnp.zeros(()), jnp.ones(N))
    assert seen == ["tl.vmap(step)", "tl.scan(step)"]


def test_vmap_decorates_methods():
    class Model(tl.Module):
        def __init__(self):
            self.w = tl.Param(jnp.arange(DIM, dtype=jnp.float32))

        @tl.vmap(in_axes=(None, 0))
        def apply(self, x):
            return self.w * x

    model = Model()
    xs = rand(0, N, DIM)
    close(model.apply(xs), np.asarray(xs) * np.arange(DIM))
    assert repr(Model.apply) == "<tl.vmap(apply)>"
    assert Model.apply.__qualname__.endswith("Model.apply")


def test_error_messages_name_the_transform_and_function():
    def add(a, b):
        return a + b

    message = error_text(
        ValueError, lambda: tl.vmap(add, in_axes=(0, 0, None))(jnp.ones(N), jnp.ones(N))
    )
    assert message.startswith("tl.vmap(add): in_axes has 3 entries")
    message = error_text(TypeError, lambda: tl.vmap(add, out_axes="0"))
    assert message.startswith("tl.vmap(add): out_axes entries must be ints or None")
    message = error_text(ValueError, lambda: tl.scan(add, out_axes=0))
    assert message.startswith("tl.scan(add): in_axes=(tl.Carry, 0) carries an argument")


class Offset(tl.Module):
    """A bare array attribute (no Variable): a leaf of the Module itself."""

    def __init__(self, offset):
        self.offset = offset

    def __call__(self, x):
        return x + self.offset


def test_vmap_shared_module_with_bare_array_under_two_axes_raises():
    shared = Offset(rand(0, N, DIM))
    pair = nn.Sequential(Offset(rand(2, N, DIM)), shared)
    xs = rand(1, N, DIM)
    before = snapshot(shared, pair, xs)
    message = error_text(
        ValueError, lambda: tl.vmap(lambda o, p, x: o(x), in_axes=(0, None, 0))(shared, pair, xs)
    )
    assert "`args[1].layers[1]` is the same Offset object as `args[0]`" in message
    assert "0 for `args[0]` and None for `args[1].layers[1]`" in message
    assert "(at `args[1].layers[1].offset`)" in message
    assert_unchanged(before, shared, pair, xs)
    # Under the same axis it is one object, mapped once.
    out = tl.vmap(lambda o, p, x: o(x) + p[1](x), in_axes=(0, 0, 0))(shared, pair, xs)
    close(out, 2 * (np.asarray(xs) + np.asarray(shared.offset)))


def test_unmapped_state_set_per_example_names_it_and_changes_nothing():
    norm = nn.BatchNorm(3)
    before = norm.mean.value
    f = tl.vmap(lambda m, x: m(x[None])[0], in_axes=(None, 0))
    with pytest.raises(ValueError, match=r"(?s)`args\[0\]\.mean` came out with one value per"):
        f(norm, jnp.arange(12.0).reshape(4, 3))
    assert norm.mean.value is before


def test_unmapped_module_gaining_a_per_example_variable_names_it():
    class Tag(tl.Module):
        def __call__(self, x):
            self.seen = tl.Variable(x)
            return x

    tag = Tag()
    with pytest.raises(ValueError, match=r"`args\[0\]\.seen` came out with one value per"):
        tl.vmap(lambda m, x: m(x), in_axes=(None, 0))(tag, jnp.ones((4, 3)))
    assert not hasattr(tag, "seen")
