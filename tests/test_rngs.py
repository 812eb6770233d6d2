"""Tests for tl.Rngs and tl.RngStream (toylib/_core/rngs.py)."""

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

import toylib as tl
from toylib import nn


def data(key):
    """The raw uint32 data of a typed key (or a batch of keys), as numpy."""
    return np.asarray(jax.random.key_data(key))


def same_key(a, b):
    return np.array_equal(data(a), data(b))


# -- named streams and the default fallback ------------------------------------------


def test_named_streams_draw_from_their_own_seed():
    rngs = tl.Rngs(params=0, dropout=1)
    assert set(rngs.streams()) == {"params", "dropout"}
    assert isinstance(rngs.params, tl.RngStream)
    assert rngs.params.tag == "params" and rngs.dropout.tag == "dropout"
    p, d = rngs.params(), rngs.dropout()
    assert p.shape == () and jax.dtypes.issubdtype(p.dtype, jax.dtypes.prng_key)
    assert not same_key(p, d)
    # Each stream is seeded by its own seed: same as a stream built alone.
    assert same_key(p, tl.Rngs(params=0).params())
    assert same_key(d, tl.Rngs(dropout=1).dropout())
    assert same_key(d, tl.Rngs(1).dropout())
    # Drawing from one stream leaves the other's counter alone.
    rngs.params()
    assert int(rngs.params.count.value) == 2
    assert int(rngs.dropout.count.value) == 1


def test_positional_seed_is_the_default_stream():
    rngs = tl.Rngs(0, dropout=1)
    assert set(rngs.streams()) == {"default", "dropout"}
    k = rngs()
    assert int(rngs.default.count.value) == 1
    assert same_key(k, tl.Rngs(0).default())
    assert same_key(rngs["dropout"](), tl.Rngs(dropout=1).dropout())


def test_missing_stream_falls_back_to_default():
    rngs = tl.Rngs(0, dropout=1)
    assert rngs.params is rngs.default
    assert rngs["params"] is rngs.default
    assert rngs.dropout is not rngs.default
    ref = tl.Rngs(0)
    a, b = rngs.params(), rngs.params()
    assert same_key(a, ref()) and same_key(b, ref())
    assert int(rngs.default.count.value) == 2
    assert int(rngs.dropout.count.value) == 0


def test_unknown_stream_without_default_is_a_clear_error():
    rngs = tl.Rngs(params=0)
    with pytest.raises(AttributeError) as info:
        rngs.dropout()
    message = str(info.value)
    assert "'dropout'" in message
    assert "default" in message
    assert "Fix" in message
    assert "tl.Rngs(dropout=" in message
    assert not hasattr(rngs, "dropout")
    with pytest.raises(AttributeError, match="dropout"):
        rngs["dropout"]


def test_calling_rngs_without_default_is_a_clear_error():
    rngs = tl.Rngs(params=0)
    with pytest.raises(AttributeError, match="default"):
        rngs()


# -- counters and reproducibility --------------------------------------------------------


def test_successive_draws_differ_and_counter_advances():
    rngs = tl.Rngs(0)
    assert isinstance(rngs.default.count, tl.RngState)
    assert isinstance(rngs.default.key, tl.RngState)
    assert int(rngs.default.count.value) == 0
    keys = [rngs() for _ in range(5)]
    assert int(rngs.default.count.value) == 5
    raw = {tuple(data(k).tolist()) for k in keys}
    assert len(raw) == 5
    # The base key itself is not changed by drawing, only the counter.
    assert same_key(rngs.default.key.value, jax.random.key(0))
    # Random numbers drawn with the keys differ too.
    draws = [float(jax.random.uniform(k)) for k in keys]
    assert len(set(draws)) == 5


def test_same_seed_gives_same_sequence():
    a, b = tl.Rngs(7, dropout=3), tl.Rngs(7, dropout=3)
    for _ in range(4):
        assert same_key(a.params(), b.params())
        assert same_key(a.dropout(), b.dropout())
    c = tl.Rngs(8)
    assert not same_key(tl.Rngs(7)(), c())


def test_rng_stream_directly():
    stream = tl.RngStream(jax.random.key(3), tag="noise")
    assert stream.tag == "noise"
    first, second = stream(), stream()
    assert not same_key(first, second)
    assert int(stream.count.value) == 2
    again = tl.RngStream(jax.random.key(3), tag="noise")
    assert same_key(first, again())


# -- split and fork ------------------------------------------------------------------------


def test_split_gives_streams_with_n_keys():
    rngs = tl.Rngs(0, dropout=1)
    split = rngs.split(4)
    assert isinstance(split, tl.Rngs)
    assert set(split.streams()) == {"default", "dropout"}
    for stream in split.streams().values():
        assert stream.key.value.shape == (4,)
        assert stream.count.value.shape == (4,)
        assert jax.dtypes.issubdtype(stream.key.value.dtype, jax.dtypes.prng_key)
        assert len({tuple(row) for row in data(stream.key.value).tolist()}) == 4
    # Splitting draws one key from each parent stream.
    assert int(rngs.default.count.value) == 1
    assert int(rngs.dropout.count.value) == 1


def test_drawing_from_split_stream_gives_n_different_keys():
    split = tl.Rngs(0).split(4)
    keys = split.params()  # falls back to default
    assert keys.shape == (4,)
    rows = {tuple(row) for row in data(keys).tolist()}
    assert len(rows) == 4
    assert np.all(np.asarray(split.default.count.value) == 1)
    again = split()
    assert again.shape == (4,)
    assert not np.any(np.all(data(again) == data(keys), axis=-1))
    # vmapped use: one different random number per key.
    values = jax.vmap(jax.random.uniform)(split())
    assert values.shape == (4,) and len(set(np.asarray(values).tolist())) == 4


def test_split_is_reproducible():
    a = tl.Rngs(5).split(4)
    b = tl.Rngs(5).split(4)
    assert np.array_equal(data(a.default.key.value), data(b.default.key.value))
    assert np.array_equal(data(a()), data(b()))


def test_split_of_split_stream_is_an_error():
    split = tl.Rngs(0).split(4)
    with pytest.raises(ValueError, match="already holds keys of shape"):
        split.split(4)
    # The failed call drew no key: nothing was lost.
    assert np.asarray(split.default.count.value).tolist() == [0, 0, 0, 0]


def test_fork_is_independent_from_parent():
    parent = tl.Rngs(0, dropout=1)
    child = parent.fork()
    assert isinstance(child, tl.Rngs)
    assert set(child.streams()) == {"default", "dropout"}
    assert child.default is not parent.default
    assert child.default.key is not parent.default.key
    count_after_fork = int(parent.default.count.value)
    child_keys = [child() for _ in range(4)]
    # Drawing from the child does not touch the parent's counter.
    assert int(parent.default.count.value) == count_after_fork
    assert int(child.default.count.value) == 4
    parent_keys = [parent() for _ in range(4)]
    child_rows = {tuple(data(k).tolist()) for k in child_keys}
    parent_rows = {tuple(data(k).tolist()) for k in parent_keys}
    assert len(child_rows) == 4 and len(parent_rows) == 4
    assert not child_rows & parent_rows
    # Two forks in a row are independent of each other too.
    assert not same_key(parent.fork()(), parent.fork()())


def test_fork_is_reproducible():
    a, b = tl.Rngs(3).fork(), tl.Rngs(3).fork()
    assert same_key(a(), b())


# -- seeds ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seed",
    [
        0,
        np.int64(0),
        jnp.array(0),
        jax.random.key(0),
        jax.random.PRNGKey(0),
        np.asarray(jax.random.PRNGKey(0)),
    ],
    ids=["int", "np.int64", "jnp-scalar", "typed-key", "raw-uint32-key", "numpy-uint32-key"],
)
def test_seed_kinds_are_equivalent(seed):
    rngs = tl.Rngs(seed)
    assert jax.dtypes.issubdtype(rngs.default.key.value.dtype, jax.dtypes.prng_key)
    assert same_key(rngs.default.key.value, jax.random.key(0))
    assert same_key(rngs(), tl.Rngs(0)())
    named = tl.Rngs(params=seed)
    assert same_key(named.params(), tl.Rngs(0)())


@pytest.mark.parametrize("seed", ["zero", 0.5, True, [0, 1], jnp.zeros(3)])
def test_bad_seed_is_a_type_error_naming_the_fix(seed):
    with pytest.raises(TypeError) as info:
        tl.Rngs(seed)
    message = str(info.value)
    assert "Fix" in message
    assert "jax.random.key(0)" in message
    with pytest.raises(TypeError, match="Fix"):
        tl.Rngs(params=seed)


def test_bad_seed_in_layer_constructor_names_the_layer(monkeypatch):
    # Bad input on purpose: toylib's own message, not the runtime type checker's.
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)
    with pytest.raises(TypeError) as info:
        nn.Linear(2, 3, rngs="zero")
    message = str(info.value)
    assert "Linear" in message
    assert "Fix" in message


@pytest.mark.parametrize("name", ["split", "fork", "streams"])
def test_stream_name_clashing_with_a_method_is_rejected(name):
    with pytest.raises(ValueError, match=name):
        tl.Rngs(**{name: 0})


# -- layers take rngs= in several forms ---------------------------------------------------------


def test_linear_accepts_rngs_int_or_key_with_same_weights():
    layers = [
        nn.Linear(3, 4, rngs=tl.Rngs(0)),
        nn.Linear(3, 4, rngs=tl.Rngs(params=0)),
        nn.Linear(3, 4, rngs=0),
        nn.Linear(3, 4, rngs=jax.random.key(0)),
        nn.Linear(3, 4, rngs=jax.random.PRNGKey(0)),
    ]
    ref = np.asarray(layers[0].kernel.value)
    assert ref.shape == (3, 4) and np.all(np.isfinite(ref)) and np.any(ref != 0)
    for layer in layers[1:]:
        np.testing.assert_array_equal(np.asarray(layer.kernel.value), ref)
        np.testing.assert_array_equal(np.asarray(layer.bias.value), np.zeros(4))
    other = nn.Linear(3, 4, rngs=1)
    assert not np.array_equal(np.asarray(other.kernel.value), ref)


def test_linear_draws_from_params_stream_and_advances_it():
    rngs = tl.Rngs(params=0, dropout=1)
    a = nn.Linear(3, 4, rngs=rngs)
    assert int(rngs.params.count.value) > 0
    assert int(rngs.dropout.count.value) == 0
    b = nn.Linear(3, 4, rngs=rngs)
    # The shared Rngs moved on: the second layer gets different weights.
    assert not np.array_equal(np.asarray(a.kernel.value), np.asarray(b.kernel.value))


def test_rng_state_found_by_state_filter():
    rngs = tl.Rngs(0, dropout=1)
    rngs.dropout()
    state = tl.state(rngs, tl.RngState)
    flat = state.flat()
    assert set(flat) == {
        ("default", "key"),
        ("default", "count"),
        ("dropout", "key"),
        ("dropout", "count"),
    }
    assert all(isinstance(v, tl.RngState) for v in flat.values())
    assert int(flat[("dropout", "count")].value) == 1
    assert int(flat[("default", "count")].value) == 0
    assert len(tl.state(rngs, tl.Param).flat()) == 0


def test_rng_state_of_a_layer_holding_a_stream():
    model = nn.Dropout(0.5, rngs=tl.Rngs(0, dropout=1))
    flat = tl.state(model, tl.RngState).flat()
    assert set(flat) == {("rngs", "key"), ("rngs", "count")}
    assert same_key(flat[("rngs", "key")].value, jax.random.key(1))


# -- split_rngs, draws, per-stream split ------------------------------------------------

_RNG_AXES = (tl.StateAxes({tl.RngState: 0, ...: None}), 0)


class _Noisy(tl.Module):
    def __init__(self):
        self.linear = nn.Linear(4, 4, rngs=0)
        self.drop = nn.Dropout(0.5, rngs=tl.Rngs(params=0, dropout=1))

    def __call__(self, x):
        return self.drop(self.linear(x))


def _masks(y):
    return {tuple(bool(v) for v in row) for row in (jnp.asarray(y) != 0).tolist()}


def test_split_rngs_gives_per_example_dropout_masks_under_vmap():
    model = _Noisy()
    x = jnp.ones((6, 4))
    same = tl.vmap(lambda m, x: m(x), in_axes=(None, 0))(model, x)
    assert len(_masks(same)) == 1  # without splitting: one mask for every example
    step = tl.jit(lambda m, x: tl.vmap(lambda m, x: m(x), in_axes=_RNG_AXES)(m, x))
    with tl.split_rngs(model, 6):
        assert model.drop.rngs.key.shape == (6,)
        first = step(model, x)
    assert len(_masks(first)) > 1
    assert model.drop.rngs.key.shape == () and model.drop.rngs.count.shape == ()
    with tl.split_rngs(model, 6):
        second = step(model, x)
    assert _masks(second) != _masks(first)  # the stream advanced: new keys next time


def test_split_rngs_as_decorators_and_for_scan():
    model = _Noisy()

    @tl.split_rngs(n=3)
    def run(m, x):
        return tl.vmap(lambda m, x: m(x), in_axes=_RNG_AXES)(m, x)

    assert len(_masks(run(model, jnp.ones((3, 4))))) > 1
    assert model.drop.rngs.key.shape == ()

    @tl.split_rngs(model, 4, only="dropout")
    def scanned(m, xs):
        body = tl.scan(lambda m, x: m(x), in_axes=_RNG_AXES, out_axes=0)
        return body(m, xs)

    ys = scanned(model, jnp.ones((4, 4)))
    assert len(_masks(ys)) > 1


def test_split_rngs_bad_input():
    model = _Noisy()
    with tl.split_rngs(model, 4):
        with pytest.raises(ValueError, match=r"size 4: `args\[0\].drop.rngs.key`") as info:
            tl.vmap(lambda m, x: m(x), in_axes=_RNG_AXES)(model, jnp.ones((3, 4)))
        assert "tl.split_rngs(model, n=batch_size)" in str(info.value)
        with pytest.raises(ValueError, match="already holds keys"):
            tl.split_rngs(model, 4).__enter__()
    with pytest.raises(ValueError, match="no Rngs stream"):
        tl.split_rngs(nn.Linear(2, 2, rngs=0), 2).__enter__()
    with pytest.raises(ValueError, match="positive int"):
        tl.split_rngs(model, 0)
    with pytest.raises(TypeError, match="needs n"):
        tl.split_rngs(model)


def test_rngs_draws_and_per_stream_split():
    rngs = tl.Rngs(0, dropout=1)
    a, b = rngs.normal((2, 3)), rngs.normal((2, 3))
    assert a.shape == (2, 3) and not bool((a == b).all())
    u = rngs.dropout.uniform((100,), minval=2.0, maxval=3.0)
    assert float(u.min()) >= 2.0 and float(u.max()) < 3.0
    assert int(rngs.dropout.count.value) == 1 and int(rngs.default.count.value) == 2
    assert rngs.uniform((2,)).dtype == jnp.float32
    split = rngs.split({"dropout": 5})
    assert split.dropout.key.shape == (5,) and split.default.key.shape == ()
    with pytest.raises(ValueError, match="no stream 'nope'"):
        rngs.split({"nope": 2})
