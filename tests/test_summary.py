"""Tests for tl.summary: rows per Module call, sizes per Variable type, FLOPs, no side effects."""

import io

import jax
import jax.numpy as jnp
import jaxtyping
import pytest
from conftest import DropBlock, np_init
from rich.console import Console

import toylib as tl
from toylib import nn

F32 = 4  # bytes per float32


def quiet():
    return Console(quiet=True)


def linear_flops(m, k, n):
    """XLA's count for ``x @ w + b`` with x (m, k): a multiply and an add per
    product term of the dot, then one add per output element for the bias."""
    return 2 * m * k * n + m * n


def test_mlp_rows_sizes_shapes_and_flops():
    mlp = nn.MLP([3, 16, 2], rngs=0)
    s = tl.summary(mlp, jnp.ones((5, 3)), console=quiet())
    assert [r.path for r in s.rows] == ["model", "model.layers[0]", "model.layers[1]"]
    assert [r.type for r in s.rows] == [nn.MLP, nn.Linear, nn.Linear]
    assert [r.outputs.shape for r in s.rows] == [(5, 2), (5, 16), (5, 2)]
    assert s.rows[1].inputs[0][0].shape == (5, 3)
    first, second = 3 * 16 + 16, 16 * 2 + 2
    assert s.rows[1].sizes == {tl.Param: (first, first * F32)}
    assert s.rows[2].sizes == {tl.Param: (second, second * F32)}
    assert s.rows[0].sizes == {tl.Param: (first + second, (first + second) * F32)}
    assert s.total.sizes == s.rows[0].sizes
    assert s.rows[1].flops == linear_flops(5, 3, 16)
    assert s.rows[2].flops == linear_flops(5, 16, 2)
    relu = 5 * 16  # one max per element
    assert s.total.flops == s.rows[0].flops == s.rows[1].flops + relu + s.rows[2].flops


def test_sequential_of_linears_functions_are_not_rows():
    model = nn.Sequential(nn.Linear(4, 8, rngs=0), jax.nn.relu, nn.Linear(8, 3, rngs=1))
    s = tl.summary(model, jnp.ones((2, 4)), compute_flops=False, console=quiet())
    assert [(r.path, r.type.__name__) for r in s.rows] == [
        ("model", "Sequential"),
        ("model.layers[0]", "Linear"),
        ("model.layers[2]", "Linear"),
    ]
    assert s.total.sizes[tl.Param] == (4 * 8 + 8 + 8 * 3 + 3, (4 * 8 + 8 + 8 * 3 + 3) * F32)
    assert all(r.flops is None for r in s.rows) and s.total.flops is None


def test_small_cnn():
    n, h, w, c, out = 2, 8, 8, 3, 4
    model = nn.Sequential(  # numpy initialisers: no jax.random compile per kernel shape
        nn.Conv(c, out, (3, 3), padding="VALID", kernel_init=np_init(0), rngs=0),
        nn.MaxPool((2, 2)),
        lambda x: x.reshape(x.shape[0], -1),
        nn.Linear(3 * 3 * out, 10, kernel_init=np_init(1), rngs=1),
    )
    s = tl.summary(model, jax.ShapeDtypeStruct((n, h, w, c), jnp.float32), console=quiet())
    conv, pool, dense = s.rows[1:]
    assert [r.path for r in s.rows[1:]] == ["model.layers[0]", "model.layers[1]", "model.layers[3]"]
    assert conv.outputs.shape == (n, 6, 6, out)
    assert pool.outputs.shape == (n, 3, 3, out)
    assert dense.outputs.shape == (n, 10)
    conv_params = 3 * 3 * c * out + out
    dense_params = 3 * 3 * out * 10 + 10
    assert conv.sizes == {tl.Param: (conv_params, conv_params * F32)}
    assert pool.sizes == {}
    assert dense.sizes == {tl.Param: (dense_params, dense_params * F32)}
    assert s.total.sizes == {
        tl.Param: (conv_params + dense_params, (conv_params + dense_params) * 4)
    }
    # VALID 3x3 conv: each output element is a 27-term dot product, plus its bias.
    conv_outputs = n * 6 * 6 * out
    assert conv.flops == 2 * conv_outputs * 3 * 3 * c + conv_outputs
    # A 2x2 max: three comparisons per output element.
    assert pool.flops == n * 3 * 3 * out * 3
    assert dense.flops == linear_flops(n, 3 * 3 * out, 10)
    assert s.total.flops == conv.flops + pool.flops + dense.flops


def test_state_is_unchanged_and_columns_per_variable_type():
    block = DropBlock(4, rngs=tl.Rngs(0))
    block.train()
    before = {p: (v, v.value) for p, v in tl.iter_variables(block)}
    draws = int(block.dropout.rngs.count.value)  # keys drawn so far (the init shares the stream)
    structure = tl.split(block)[0]
    out = io.StringIO()
    s = tl.summary(
        block,
        jnp.ones((3, 4)),
        scale=2.0,
        compute_flops=False,
        console=Console(file=out, width=200),
    )
    # The same Variables holding the same (immutable) arrays: nothing was written.
    after = {p: (v, v.value) for p, v in tl.iter_variables(block)}
    assert after.keys() == before.keys()
    assert all(after[p][0] is v and after[p][1] is value for p, (v, value) in before.items())
    assert int(block.dropout.rngs.count.value) == draws  # the Dropout drew no key
    assert tl.split(block)[0] == structure
    assert [r.path for r in s.rows] == ["model", "model.linear", "model.bn", "model.dropout"]
    assert s.rows[0].inputs[1] == {"scale": 2.0}
    bn = s.rows[2]
    assert bn.sizes == {tl.BatchStat: (8, 8 * F32), tl.Param: (8, 8 * F32)}
    assert s.rows[3].sizes == {tl.RngState: (2, 4 + 8)}  # a uint32 count, a threefry key
    text = out.getvalue()
    header = next(line for line in text.splitlines() if "path" in line)
    assert [w for w in header.replace("┃", " ").split()] == [
        "path",
        "type",
        "output",
        "Param",
        "BatchStat",
        "RngState",
    ]
    assert "Total" in text and "model.bn" in text and "BatchNorm" in text
    assert "28 (112 B)" in text  # the block's Params: the Linear's 20, the BatchNorm's 8
    assert s.total.sizes[tl.Param] == (4 * 4 + 4 + 8, (4 * 4 + 4 + 8) * F32)


def test_interception_is_undone_even_on_error():
    mlp = nn.MLP([3, 4, 2], rngs=0)
    linear_call, mlp_call = vars(nn.Linear)["__call__"], vars(nn.MLP)["__call__"]
    with pytest.raises(ValueError, match=r"model.layers\[0\] \(Linear\): expected input"):
        tl.summary(mlp, jnp.ones((1, 5)), console=quiet())
    assert vars(nn.Linear)["__call__"] is linear_call
    assert vars(nn.MLP)["__call__"] is mlp_call
    tl.summary(mlp, jnp.ones((1, 3)), compute_flops=False, console=quiet())
    assert vars(nn.Linear)["__call__"] is linear_call
    assert mlp(jnp.ones((1, 3))).shape == (1, 2)


class Tied(tl.Module):
    def __init__(self):
        self.embed = nn.Embed(10, 4, rngs=0)
        self.shared = nn.Linear(4, 4, rngs=1)

    def __call__(self, ids):
        x = self.shared(self.shared(self.embed(ids)))
        return self.embed.attend(x)


def test_shared_module_two_rows_counted_once_in_total(monkeypatch):
    compiled = []
    jit = jax.jit
    monkeypatch.setattr(jax, "jit", lambda f, **kw: compiled.append(f) or jit(f, **kw))
    s = tl.summary(Tied(), jnp.zeros((2, 3), jnp.int32), console=quiet())
    assert [r.path for r in s.rows] == ["model", "model.embed", "model.shared", "model.shared"]
    assert s.rows[0].outputs.shape == (2, 3, 10)
    assert s.total.sizes[tl.Param][0] == 10 * 4 + 4 * 4 + 4
    # The second call of the same layer on the same shapes is not compiled again.
    assert s.rows[2].flops == s.rows[3].flops == linear_flops(2 * 3, 4, 4)
    assert len(compiled) == 3


class Sub(nn.Linear):
    """A subclass calling super().__call__: one call, one row."""

    def __call__(self, x):
        return super().__call__(x) * 2


def test_super_call_is_one_row_and_rng_streams_are_not_rows():
    model = nn.Sequential(Sub(2, 2, rngs=0), nn.Dropout(0.5, rngs=1))
    s = tl.summary(model, jnp.ones((1, 2)), compute_flops=False, console=quiet())
    assert [(r.path, r.type) for r in s.rows] == [
        ("model", nn.Sequential),
        ("model.layers[0]", Sub),
        ("model.layers[1]", nn.Dropout),
    ]


def test_stack_rows_show_one_block_total_counts_all():
    stack = nn.Stack(lambda rngs: nn.Linear(4, 4, rngs=rngs), 3, rngs=0)
    s = tl.summary(stack, jnp.ones((2, 4)), compute_flops=False, console=quiet())
    assert [r.path for r in s.rows] == ["model", "model.blocks[*]"]
    assert s.rows[1].sizes[tl.Param][0] == 20
    assert s.total.sizes[tl.Param][0] == 3 * 20


def test_bad_model_is_a_clear_error(monkeypatch):
    # Bad input on purpose: toylib's own message, not the runtime type checker's.
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)
    with pytest.raises(TypeError, match="expected a Module with a __call__ method"):
        tl.summary(lambda x: x, jnp.ones(2), console=quiet())
    with pytest.raises(TypeError, match="a Module without __call__"):
        tl.summary(tl.Module(), console=quiet())


def test_repr_and_rich():
    s = tl.summary(nn.Linear(2, 3, rngs=0), jnp.ones(2), console=quiet())
    assert repr(s) == f"Summary(1 row; Param 9, {linear_flops(1, 2, 3)} FLOPs)"
    assert s.__rich__() is s.table


class SyncedNorm(tl.Module):
    """BatchNorm averaging over a named vmap axis: not compilable outside the vmap."""

    def __init__(self):
        self.bn = nn.BatchNorm(4, axis_name="batch", rngs=0)

    def __call__(self, x):
        return tl.vmap(lambda bn, x: bn(x), in_axes=(None, 0), axis_name="batch")(self.bn, x)


def test_flops_not_available_for_a_call_needing_an_outer_axis():
    out = io.StringIO()
    s = tl.summary(SyncedNorm(), jnp.ones((3, 4)), console=Console(file=out, width=200))
    assert [r.type for r in s.rows] == [SyncedNorm, nn.BatchNorm]
    assert s.rows[1].outputs.shape == (4,)  # what the BatchNorm sees: one example
    assert s.rows[1].flops is None
    assert s.rows[0].flops > 0 and s.total.flops == s.rows[0].flops
    assert "n/a" in out.getvalue() and "named axis bound outside it" in out.getvalue()


def test_the_cell_scanned_by_an_rnn_is_named_by_its_path():
    class Tagger(tl.Module):
        def __init__(self):
            self.rnn = nn.RNN(nn.LSTMCell(3, 4, rngs=0))

        def __call__(self, x):
            return self.rnn(x)

    rows = tl.summary(Tagger(), jnp.ones((2, 5, 3)), console=quiet()).rows
    assert [(r.path, r.type) for r in rows][1:] == [
        ("model.rnn", nn.RNN),
        ("model.rnn.cell", nn.LSTMCell),
    ]


def test_the_call_recorder_is_removed_even_on_error():
    from toylib._core import calls

    with pytest.raises(ValueError, match="expected input"):
        tl.summary(nn.Linear(3, 2, rngs=0), jnp.ones((1, 5)), console=quiet())
    assert calls._interceptors.get() == ()


def test_summary_records_only_its_own_threads_calls():
    from conftest import run_in_threads

    def summarise():
        mlp = nn.MLP([3, 16, 2], rngs=0)
        return [r.path for r in tl.summary(mlp, jnp.ones((5, 3)), console=quiet()).rows]

    def busy():
        other = nn.Sequential(*[nn.Linear(3, 3, rngs=i) for i in range(5)])
        for _ in range(40):
            other(jnp.ones(3))
        return "done"

    rows = ["model", "model.layers[0]", "model.layers[1]"]
    assert run_in_threads(summarise, busy, summarise) == [rows, "done", rows]


def test_stack_flops_count_every_block():
    stack = nn.Stack(lambda rngs: nn.Linear(4, 4, rngs=rngs), 3, rngs=0)
    s = tl.summary(stack, jnp.ones((2, 4)), console=quiet())
    block = linear_flops(2, 4, 4)
    assert s.rows[1].flops == block  # the row inside the scan: one block
    # All three blocks, plus XLA's count of the loop counter (an add and a compare).
    assert 3 * block <= s.rows[0].flops <= 3 * block + 2
    assert s.total.flops == s.rows[0].flops
    # The same blocks in a Python loop (no scan) count the same.
    looped = nn.Sequential(*[nn.Linear(4, 4, rngs=i) for i in range(3)])
    assert tl.summary(looped, jnp.ones((2, 4)), console=quiet()).total.flops == 3 * block


@pytest.mark.parametrize("unroll", [1, 2, 3, 7, True])
def test_rnn_flops_count_every_step_whatever_the_unroll(unroll):
    x = jnp.ones((2, 7, 3))
    s = tl.summary(nn.RNN(nn.LSTMCell(3, 4, rngs=0), unroll=unroll), x, console=quiet())
    step = s.rows[1].flops  # the cell: one time step
    assert step > 0
    # Seven steps; XLA simplifies a little across unrolled copies (the first
    # step's zero carry), so an unrolled count is within a percent or two.
    assert s.total.flops == pytest.approx(7 * step, rel=0.02)
    if unroll is not True and unroll == 1:  # one loop body: exactly 7 steps and the loop counter
        assert 7 * step <= s.total.flops <= 7 * step + 2
    assert s.table.caption is None


def test_a_while_loop_counts_one_iteration_and_says_so():
    class Repeat(tl.Module):
        def __init__(self):
            self.layer = nn.Linear(4, 4, rngs=0)

        def __call__(self, x, n):
            return tl.fori_loop(0, n, lambda i, c: (c[0], c[0].layer(c[1])), (self, x))[1]

    out = io.StringIO()
    console = Console(file=out, width=200)
    s = tl.summary(Repeat(), jnp.ones((2, 4)), jnp.array(5), console=console)
    assert s.rows[1].flops == linear_flops(2, 4, 4)
    assert "count one iteration" in s.table.caption and "one iteration" in out.getvalue()


def test_not_a_terminal_prints_the_full_width(capsys):
    def block(rngs):
        return nn.Sequential(
            nn.Sequential(nn.Linear(64, 64, rngs=rngs), nn.LayerNorm(64, rngs=rngs))
        )

    tl.summary(nn.Stack(block, 2, rngs=0), jnp.ones((8, 128, 64)), compute_flops=False)
    text = capsys.readouterr().out  # captured: not a terminal
    assert max(len(line) for line in text.splitlines()) > 80
    # Nothing folded: every path and shape on one line of its own row.
    lines = text.splitlines()
    assert any(
        "model.blocks[*].layers[0].layers[1]" in line and "LayerNorm" in line for line in lines
    )
    assert any("float32[8, 128, 64]" in line for line in lines)
