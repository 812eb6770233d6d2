"""Tests for the recurrent layers: LSTMCell, GRUCell and RNN."""

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest
from conftest import assert_trees_close, rand
from flax import nnx

import toylib as tl
from toylib import nn

# A few fixed shapes, shared by the tests: every new shape costs an XLA compile.
F, H, T = 3, 5, 4  # odd sizes: in_features, hidden_features, time steps
BATCHES = [(), (2,), (2, 3)]
BATCH_IDS = ["none", "one", "two"]
TOL = {"rtol": 1e-5, "atol": 1e-5}

# An eager RNN call traces and compiles its scan anew each time (~0.3 s), so
# most tests run it through one jitted function, whose cache is shared by all
# RNNs of the same configuration and input shape.
apply = tl.jit(lambda rnn, x, **kwargs: rnn(x, **kwargs))
step = tl.jit(lambda cell, carry, x: cell(carry, x))  # one cell step, jitted likewise
flax_step = jax.jit(lambda cell, carry, x: cell(carry, x))  # nnx Modules are pytrees


def make_cell(kind, seed=0, **kwargs):
    """A cell with random (nonzero) biases, so that bias handling is exercised."""
    if kind == "lstm":
        cell = nn.LSTMCell(F, H, rngs=seed, **kwargs)
        cell.bias = rand(seed + 100, 4 * H)
    else:
        cell = nn.GRUCell(F, H, rngs=seed, **kwargs)
        cell.bias = rand(seed + 100, 3 * H)
    return cell


def random_carry(kind, seed, batch):
    if kind == "lstm":
        return (rand(seed, *batch, H), rand(seed + 1, *batch, H))
    return rand(seed, *batch, H)


# -- copies into flax.nnx ---------------------------------------------------------------------

# The references' own initial weights are overwritten: zeros skip the
# orthogonal initialiser's QR, which costs a compile per shape.
ZERO_INIT = {"kernel_init": nnx.initializers.zeros, "recurrent_kernel_init": nnx.initializers.zeros}


def to_nnx_lstm(cell, **kwargs):
    ref = nnx.LSTMCell(F, H, rngs=nnx.Rngs(1), **ZERO_INIT, **kwargs)
    k, u, b = (np.asarray(p.value) for p in (cell.kernel, cell.recurrent_kernel, cell.bias))
    for g, (i_layer, h_layer) in enumerate(
        [(ref.ii, ref.hi), (ref.if_, ref.hf), (ref.ig, ref.hg), (ref.io, ref.ho)]
    ):
        cols = slice(g * H, (g + 1) * H)
        i_layer.kernel[...] = jnp.asarray(k[:, cols])
        h_layer.kernel[...] = jnp.asarray(u[:, cols])
        h_layer.bias[...] = jnp.asarray(b[cols])
    return ref


def to_nnx_optimized_lstm(cell):
    ref = nnx.OptimizedLSTMCell(F, H, rngs=nnx.Rngs(1), **ZERO_INIT)
    ref.dense_i.kernel[...] = cell.kernel.value
    ref.dense_h.kernel[...] = cell.recurrent_kernel.value
    ref.dense_h.bias[...] = cell.bias.value
    return ref


def to_nnx_gru(cell, **kwargs):
    ref = nnx.GRUCell(F, H, rngs=nnx.Rngs(1), **ZERO_INIT, **kwargs)
    ref.dense_i.kernel[...] = cell.kernel.value
    ref.dense_i.bias[...] = cell.bias.value
    ref.dense_h.kernel[...] = cell.recurrent_kernel.value
    return ref


def to_nnx(cell):
    return to_nnx_lstm(cell) if isinstance(cell, nn.LSTMCell) else to_nnx_gru(cell)


# -- plain references ---------------------------------------------------------------------------


def np_sigmoid(z):
    return 1 / (1 + np.exp(-z))


def np_gru_step(cell, h, x):
    """PyTorch's GRU equations, written out per gate from the fused weights."""
    k, u = np.asarray(cell.kernel.value), np.asarray(cell.recurrent_kernel.value)
    b, bhn = np.asarray(cell.bias.value), np.asarray(cell.recurrent_bias.value)
    W = [k[:, g * H : (g + 1) * H] for g in range(3)]
    U = [u[:, g * H : (g + 1) * H] for g in range(3)]
    B = [b[g * H : (g + 1) * H] for g in range(3)]
    r = np_sigmoid(x @ W[0] + B[0] + h @ U[0])
    z = np_sigmoid(x @ W[1] + B[1] + h @ U[1])
    n = np.tanh(x @ W[2] + B[2] + r * (h @ U[2] + bhn))
    return (1 - z) * n + z * h


def np_lstm_step(cell, carry, x):
    c, h = carry
    k, u = np.asarray(cell.kernel.value), np.asarray(cell.recurrent_kernel.value)
    z = x @ k + h @ u + np.asarray(cell.bias.value)
    i, f, g, o = (z[..., j * H : (j + 1) * H] for j in range(4))
    c = np_sigmoid(f) * c + np_sigmoid(i) * np.tanh(g)
    return (c, np_sigmoid(o) * np.tanh(c))


def loop(cell, x, carry=None, reverse=False):
    """A plain Python loop of the cell over axis -2, outputs in processing order."""
    if carry is None:
        carry = cell.initialize_carry(x.shape[:-2] + x.shape[-1:])
    steps = range(x.shape[-2])
    ys = []
    for t in reversed(steps) if reverse else steps:
        carry, y = cell(carry, x[..., t, :])
        ys.append(y)
    return carry, jnp.stack(ys, axis=-2)


# -- cells against flax.nnx -------------------------------------------------------------------


@pytest.mark.parametrize("batch", BATCHES, ids=BATCH_IDS)
def test_lstm_cell_matches_flax(batch):
    cell = make_cell("lstm")
    carry, x = random_carry("lstm", 1, batch), rand(3, *batch, F)
    (c, h), y = step(cell, carry, x)
    assert c.shape == h.shape == y.shape == (*batch, H)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(h))
    refs = [to_nnx_lstm(cell)] + ([to_nnx_optimized_lstm(cell)] if batch == (2,) else [])
    for ref in refs:
        want_carry, want_y = flax_step(ref, tuple(map(jnp.asarray, carry)), jnp.asarray(x))
        assert_trees_close((c, h), want_carry)
        assert_trees_close(y, want_y)
    # And the hand-written equations (PyTorch's, i f g o order).
    assert_trees_close((c, h), np_lstm_step(cell, carry, x))


@pytest.mark.parametrize("batch", BATCHES, ids=BATCH_IDS)
def test_gru_cell_matches_flax(batch):
    cell = make_cell("gru")
    carry, x = random_carry("gru", 1, batch), rand(3, *batch, F)
    h, y = step(cell, carry, x)
    assert h.shape == y.shape == (*batch, H)
    want_h, want_y = flax_step(to_nnx_gru(cell), jnp.asarray(carry), jnp.asarray(x))
    assert_trees_close(h, want_h)
    assert_trees_close(y, want_y)


def test_gru_cell_recurrent_bias_is_inside_the_reset_gate():
    cell = make_cell("gru")
    cell.recurrent_bias = rand(7, H)
    carry, x = random_carry("gru", 1, (2,)), rand(3, 2, F)
    h, _ = cell(carry, x)
    assert_trees_close(h, np_gru_step(cell, carry, x))
    # Flax's cell has no b_hn: with it nonzero the outputs differ, so the
    # recurrent bias really enters (and only through r * (h U_n + b_hn)).
    flax_h, _ = to_nnx_gru(cell)(jnp.asarray(carry), jnp.asarray(x))
    assert not np.allclose(np.asarray(h), np.asarray(flax_h), atol=1e-3)


def test_custom_gate_and_activation_functions_match_flax():
    kwargs = {"gate_fn": jax.nn.hard_sigmoid, "activation_fn": jax.nn.soft_sign}
    carry, x = random_carry("lstm", 1, (2,)), rand(3, 2, F)
    cell = make_cell("lstm", **kwargs)
    got = cell(carry, x)
    want = to_nnx_lstm(cell, **kwargs)(tuple(map(jnp.asarray, carry)), jnp.asarray(x))
    assert_trees_close(got, want)
    assert not np.allclose(np.asarray(got[1]), np.asarray(make_cell("lstm")(carry, x)[1]))
    gru = make_cell("gru", **kwargs)
    got = gru(carry[0], x)
    want = to_nnx_gru(gru, **kwargs)(jnp.asarray(carry[0]), jnp.asarray(x))
    assert_trees_close(got, want)


def test_parameter_layout_and_initialisers():
    lstm = nn.LSTMCell(F, H, rngs=0)
    assert lstm.kernel.value.shape == (F, 4 * H)
    assert lstm.recurrent_kernel.value.shape == (H, 4 * H)
    assert lstm.bias.value.shape == (4 * H,)
    assert not lstm.bias.value.any()  # zeros by default
    gru = nn.GRUCell(F, H, rngs=0)
    assert gru.kernel.value.shape == (F, 3 * H)
    assert gru.recurrent_kernel.value.shape == (H, 3 * H)
    assert gru.bias.value.shape == (3 * H,)
    assert gru.recurrent_bias.value.shape == (H,)
    # Each gate's recurrent block is orthogonal on its own (drawn per gate).
    for cell, gates in ((lstm, 4), (gru, 3)):
        u = np.asarray(cell.recurrent_kernel.value)
        for g in range(gates):
            block = u[:, g * H : (g + 1) * H]
            np.testing.assert_allclose(block @ block.T, np.eye(H), atol=1e-5)
    assert set(tl.state(gru, tl.Param).flat()) == {
        ("kernel",),
        ("recurrent_kernel",),
        ("bias",),
        ("recurrent_bias",),
    }
    # Custom initialisers are called once per gate, with the gate's shape.
    shapes = []

    def ones(key, shape, dtype):
        shapes.append(shape)
        return jnp.ones(shape, dtype)

    custom = nn.LSTMCell(
        F,
        H,
        kernel_init=ones,
        recurrent_kernel_init=jax.nn.initializers.zeros,
        bias_init=jax.nn.initializers.constant(0.5),
        rngs=0,
    )
    assert shapes == [(F, H)] * 4
    assert (custom.kernel.value == 1).all()
    assert (custom.recurrent_kernel.value == 0).all()
    assert (custom.bias.value == 0.5).all()
    # The default kernel is LeCun normal, drawn per gate from the params stream.
    rngs = tl.Rngs(0)
    lecun = jax.nn.initializers.lecun_normal()
    want = np.concatenate([lecun(rngs.params(), (F, H)) for _ in range(4)], axis=-1)
    np.testing.assert_array_equal(np.asarray(lstm.kernel.value), want)


@pytest.mark.parametrize("batch", BATCHES, ids=BATCH_IDS)
def test_initialize_carry_takes_the_input_shape(batch):
    lstm, gru = nn.LSTMCell(F, H, rngs=0), nn.GRUCell(F, H, rngs=0)
    c, h = lstm.initialize_carry((*batch, F))
    assert c.shape == h.shape == (*batch, H)
    assert c.dtype == jnp.float32
    assert not c.any() and not h.any()
    assert gru.initialize_carry((*batch, F)).shape == (*batch, H)
    # Same as Flax's (which also takes the input shape).
    ref = to_nnx_gru(gru).initialize_carry((*batch, F), rngs=nnx.Rngs(0))
    assert ref.shape == (*batch, H)


def test_initialize_carry_rejects_a_batch_shape():
    gru = nn.GRUCell(F, H, rngs=0)
    with pytest.raises(ValueError, match=r"input, \(\*batch, in_features=3\)") as info:
        gru.initialize_carry((2,))
    assert "got (2,)" in str(info.value)
    with pytest.raises(ValueError, match="in_features=3"):
        nn.LSTMCell(F, H, rngs=0).initialize_carry(())


def test_cells_under_jit_and_grad():
    lstm, gru = make_cell("lstm"), make_cell("gru")
    carry, x = random_carry("lstm", 1, (2,)), rand(3, 2, F)
    assert_trees_close(step(lstm, carry, x), lstm(carry, x))
    grads = jax.jit(jax.grad(lambda m: jnp.sum(m(carry[0], x)[1] ** 2)))(gru)
    assert isinstance(grads, nn.GRUCell)
    assert grads.recurrent_kernel.value.shape == gru.recurrent_kernel.value.shape
    assert np.isfinite(np.asarray(grads.kernel.value)).all()
    assert np.abs(np.asarray(grads.recurrent_kernel.value)).sum() > 0


# -- RNN -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [(), (2, 3)], ids=["none", "two"])
def test_rnn_matches_python_loop(batch):
    cell = make_cell("lstm")
    x = rand(4, *batch, T, F)
    rnn = nn.RNN(cell, return_carry=True)
    # Eager once (no batch), jitted otherwise.
    carry, ys = rnn(x) if batch == () else apply(rnn, x)
    assert ys.shape == (*batch, T, H)
    want_carry, want_ys = loop(cell, x)
    assert_trees_close(ys, want_ys)
    assert_trees_close(carry, want_carry)


@pytest.mark.parametrize(
    "kind, reverse, keep_order",
    [("lstm", False, False), ("lstm", True, False), ("lstm", True, True), ("gru", True, True)],
    ids=["lstm-fw", "lstm-bw", "lstm-bw-kept", "gru-bw-kept"],
)
def test_rnn_matches_nnx_rnn_and_loop(kind, reverse, keep_order):
    cell = make_cell(kind)
    x = rand(4, 2, T, F)
    rnn = nn.RNN(cell, reverse=reverse, keep_order=keep_order, return_carry=True)
    carry, ys = apply(rnn, x)
    ref = nnx.RNN(to_nnx(cell), reverse=reverse, keep_order=keep_order, return_carry=True)
    want_carry, want_ys = ref(jnp.asarray(x))
    assert_trees_close(ys, want_ys)
    assert_trees_close(carry, want_carry)
    # The same from a Python loop, backwards when reversed, outputs in
    # processing order unless keep_order puts them back in input order.
    loop_carry, loop_ys = loop(cell, x, reverse=reverse)
    assert_trees_close(carry, loop_carry)
    assert_trees_close(ys, loop_ys[..., ::-1, :] if keep_order else loop_ys)
    if reverse:  # the first input is read last: not what a forward pass gives
        forward = loop(cell, x)[1]
        assert not np.allclose(np.asarray(ys), np.asarray(forward), atol=1e-3)
        assert not np.allclose(np.asarray(ys), np.asarray(forward[..., ::-1, :]), atol=1e-3)


def test_rnn_initial_carry_and_return_carry():
    for kind in ("lstm", "gru"):
        cell = make_cell(kind)
        x = rand(4, 2, T, F)
        start = random_carry(kind, 9, (2,))
        rnn = nn.RNN(cell, return_carry=True)
        carry, ys = apply(rnn, x, initial_carry=start)
        want_carry, want_ys = loop(cell, x, carry=start)
        assert_trees_close(carry, want_carry)
        assert_trees_close(ys, want_ys)
        assert not np.allclose(np.asarray(ys), np.asarray(loop(cell, x)[1]), atol=1e-3)
    # return_carry=False at call time gives the outputs only.
    only_ys = apply(rnn, x, initial_carry=start, return_carry=False)
    assert isinstance(only_ys, jax.Array)
    assert_trees_close(only_ys, ys)
    # A final carry fed back continues the sequence: two halves = the whole.
    zeros = cell.initialize_carry((2, F))
    first = apply(rnn, x[..., :2, :], initial_carry=zeros)
    second = apply(rnn, x[..., 2:, :], initial_carry=first[0])
    whole_carry, whole_ys = loop(cell, x)
    assert_trees_close(second[0], whole_carry)
    assert_trees_close(jnp.concatenate([first[1], second[1]], axis=-2), whole_ys)


@pytest.mark.parametrize("reverse, keep_order", [(False, False), (True, True)])
def test_rnn_seq_lengths_match_unpadded_sequences(reverse, keep_order):
    cell = make_cell("gru")
    x = rand(4, 3, T, F)
    lengths = np.array([T, 1, 3])
    rnn = nn.RNN(cell, reverse=reverse, keep_order=keep_order, return_carry=True)
    carry, ys = apply(rnn, x, seq_lengths=jnp.asarray(lengths))
    assert ys.shape == (3, T, H)
    for b, n in enumerate(lengths):
        want_carry, want_ys = loop(cell, x[b, :n], reverse=reverse)
        if reverse and keep_order:
            want_ys = want_ys[::-1]
        assert_trees_close(carry[b], want_carry)
        assert_trees_close(ys[b, :n], want_ys)
        assert not ys[b, n:].any()  # padding outputs are zero


def test_rnn_under_jit_sees_weight_changes():
    rnn = nn.RNN(make_cell("lstm"), return_carry=True)
    x = rand(4, 2, T, F)
    assert_trees_close(apply(rnn, x), loop(rnn.cell, x))
    # The jitted function reads the new weights (they are not baked in).
    rnn.cell.bias = rand(11, 4 * H)
    assert_trees_close(apply(rnn, x), loop(rnn.cell, x))


def test_rnn_gradient_equals_python_loop_gradient():
    # One cell suffices: the scan is the same for any cell, and jax
    # differentiates the cells themselves (see test_cells_under_jit_and_grad).
    cell = make_cell("lstm")
    x = jnp.asarray(rand(4, 2, T, F))
    target = jnp.asarray(rand(5, 2, T, H))

    def loss(model, x):
        return jnp.mean((model(x) - target) ** 2)

    def loop_loss(cell, x):
        return jnp.mean((loop(cell, x)[1] - target) ** 2)

    @jax.jit  # both gradients in one program: one compile
    def both(rnn, cell, x):
        return (jax.grad(loss, (0, 1))(rnn, x), jax.grad(loop_loss, (0, 1))(cell, x))

    (grads, dx), (want, want_dx) = both(nn.RNN(cell), cell, x)
    assert isinstance(grads, nn.RNN)
    for name in ("kernel", "recurrent_kernel", "bias"):
        g = np.asarray(getattr(grads.cell, name).value)
        assert np.isfinite(g).all() and np.abs(g).sum() > 0
        np.testing.assert_allclose(g, np.asarray(getattr(want, name).value), **TOL)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(want_dx), **TOL)


def test_bf16_compute_keeps_float32_params():
    x = rand(4, 2, T, F)
    fast = make_cell("lstm", dtype=jnp.bfloat16)
    carry, ys = apply(nn.RNN(fast, return_carry=True), x)
    assert ys.dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(carry))
    assert fast.kernel.value.dtype == fast.recurrent_kernel.value.dtype == jnp.float32
    assert fast.bias.value.dtype == jnp.float32
    want_carry, want_ys = apply(nn.RNN(make_cell("lstm"), return_carry=True), x)
    assert_trees_close(ys, want_ys, rtol=5e-2, atol=5e-2)
    assert_trees_close(carry, want_carry, rtol=5e-2, atol=5e-2)
    # One GRU step with a float32 carry: the carry stays float32, the output is bf16.
    gru = make_cell("gru", dtype=jnp.bfloat16)
    h, y = step(gru, random_carry("gru", 1, (2,)), x[:, 0])
    assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32
    assert gru.recurrent_bias.value.dtype == jnp.float32
    want_h, _ = make_cell("gru")(random_carry("gru", 1, (2,)), x[:, 0])
    assert_trees_close(h, want_h, rtol=5e-2, atol=5e-2)


def test_param_dtype_bf16():
    bf16 = jnp.dtype(jnp.bfloat16)
    lstm = nn.LSTMCell(F, H, param_dtype=jnp.bfloat16, rngs=0)  # orthogonal init in bf16 works
    gru = nn.GRUCell(F, H, param_dtype=jnp.bfloat16, rngs=0)
    for cell in (lstm, gru):
        assert {p.dtype for p in jax.tree.leaves(tl.state(cell, tl.Param))} == {bf16}
    ys = apply(nn.RNN(lstm), jnp.ones((2, T, F), jnp.bfloat16))
    assert ys.dtype == jnp.bfloat16 and np.isfinite(np.asarray(ys, np.float32)).all()
    # A float32 input promotes the computation; the bf16 carry keeps its dtype.
    h, y = step(gru, gru.initialize_carry((2, F)), jnp.ones((2, F)))
    assert h.dtype == jnp.bfloat16 and y.dtype == jnp.float32


# -- errors ----------------------------------------------------------------------------------


class Encoder(tl.Module):
    def __init__(self):
        self.rnn = nn.RNN(nn.LSTMCell(F, H, rngs=0))
        self.cell = nn.GRUCell(F, H, rngs=1)

    def __call__(self, x):
        return self.rnn(x)


def test_wrong_in_features_names_path_and_shapes():
    model = Encoder()
    with pytest.raises(ValueError) as info:
        model(jnp.ones((2, T, 4)))
    message = str(info.value)
    assert "model.rnn (RNN)" in message
    assert "(..., 3)" in message  # expected
    assert "(2, 4, 4)" in message  # received
    assert "cell.in_features=4" in message  # the fix
    with pytest.raises(
        ValueError, match=r"model \(GRUCell\): expected input of shape \(\.\.\., 3\)"
    ):
        model.cell(jnp.zeros((2, H)), jnp.ones((2, 7)))
    with pytest.raises(ValueError, match=r"got \(2, 7\)"):
        nn.LSTMCell(F, H, rngs=0)((jnp.zeros((2, H)),) * 2, jnp.ones((2, 7)))


def test_missing_time_axis_and_bad_seq_lengths(monkeypatch):
    # Bad input on purpose: toylib's own message, not the runtime type checker's.
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)
    rnn = nn.RNN(nn.GRUCell(F, H, rngs=0))
    with pytest.raises(ValueError, match=r"\(\*batch, time, 3\), got \(3,\): no time axis"):
        rnn(jnp.ones(F))
    with pytest.raises(ValueError, match=r"batch shape of the input, \(2,\); got \(3,\)"):
        rnn(jnp.ones((2, T, F)), seq_lengths=jnp.array([1, 2, 3]))


def test_bad_carry_is_a_clear_error(monkeypatch):
    # Bad input on purpose: toylib's own message, not the runtime type checker's.
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)
    lstm, gru = nn.LSTMCell(F, H, rngs=0), nn.GRUCell(F, H, rngs=0)
    x = jnp.ones((2, F))
    with pytest.raises(TypeError, match=r"pair \(c, h\).*got a .*Array.* of shape \(2, 5\)"):
        lstm(jnp.zeros((2, H)), x)
    with pytest.raises(TypeError, match="one array, h"):
        gru(lstm.initialize_carry(x.shape), x)
    with pytest.raises(ValueError, match=r"carry of shape \(\.\.\., 5\).*got \(2, 4\)"):
        gru(jnp.zeros((2, 4)), x)
