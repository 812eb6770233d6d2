"""Tests for tl.save_bytes / tl.load_bytes (toylib/checkpoint/blob.py)."""

import json
import struct

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import optax
import pytest
from conftest import Tied, assert_unchanged, snapshot

import toylib as tl
from toylib import nn


class EveryLeaf(Tied):
    """Tied weights (a bfloat16 bias), both key kinds, a host array, an int, an empty array."""

    def __init__(self, *, rngs: tl.Rngs) -> None:
        super().__init__(rngs=rngs, param_dtype=jnp.bfloat16)
        self.rngs = tl.Rngs(jax.random.key(3, impl="rbg"), dropout=4)
        self.host = np.arange(3.0)
        self.count = tl.Variable(2)
        self.empty = tl.Variable(jnp.zeros((0, 4)))


def header(blob):
    (length,) = struct.unpack("<Q", blob[8:16])
    return json.loads(blob[16 : 16 + length])


def state_equal(a, b):
    flat_a, flat_b = tl.state(a).flat(), tl.state(b).flat()
    assert list(flat_a) == list(flat_b)
    for path, va in flat_a.items():
        vb = flat_b[path]
        assert type(va) is type(vb), path
        x, y = getattr(va, "value", va), getattr(vb, "value", vb)  # a Variable or a bare array
        assert type(x) is type(y), path
        if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert jax.random.key_impl(x) == jax.random.key_impl(y), path
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert np.asarray(x).dtype == np.asarray(y).dtype, path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def test_round_trip_keeps_sharing_dtypes_keys_and_kinds():
    model = EveryLeaf(rngs=tl.Rngs(0))
    model.rngs.dropout()  # counters move
    blob = tl.save_bytes(model)
    assert isinstance(blob, bytes) and blob[:8] == b"\x89TOYLIB\n"
    leaves = header(blob)["leaves"]
    assert "model.embed.embedding" in leaves and "model.head.kernel" not in leaves  # once
    assert leaves["model.rngs.default.key"]["key"] == "rbg"

    loaded = tl.load_bytes(blob, EveryLeaf(rngs=tl.Rngs(1)))
    assert loaded.head.kernel is loaded.embed.embedding
    assert loaded.head.bias.value.dtype == jnp.bfloat16
    assert isinstance(loaded.host, np.ndarray) and type(loaded.count.value) is int
    state_equal(loaded, model)
    draws = [jax.random.key_data(m.rngs.dropout()) for m in (loaded, model)]
    np.testing.assert_array_equal(*draws)  # the same next draw


def test_an_abstract_like_and_an_optimizer_load_and_training_resumes_exactly():
    x = jnp.linspace(-1, 1, 12).reshape(6, 2)
    y = x.sum(1, keepdims=True)
    tx = optax.adam(1e-2)

    @tl.jit
    def step(model, optimizer):
        loss, grads = tl.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    model = nn.Linear(2, 1, rngs=0)
    optimizer = tl.Optimizer(model, tx)
    step(model, optimizer)
    blob = tl.save_bytes((model, optimizer))
    abstract = tl.eval_shape(lambda: (lambda m: (m, tl.Optimizer(m, tx)))(nn.Linear(2, 1, rngs=0)))
    resumed = tl.load_bytes(blob, abstract)
    assert not any(a.committed for a in jax.tree.leaves(tl.state(resumed)))
    for _ in range(2):
        assert float(step(*resumed)) == float(step(model, optimizer))
    state_equal(resumed, (model, optimizer))


def test_a_committed_like_gets_committed_arrays():
    model = nn.Linear(2, 3, rngs=0)
    like = nn.Linear(2, 3, rngs=1)
    like.kernel.value = jax.device_put(like.kernel.value, jax.devices()[0])
    loaded = tl.load_bytes(tl.save_bytes(model), like)
    assert loaded.kernel.value.committed and not loaded.bias.value.committed


def test_damage_is_detected_and_names_the_array(monkeypatch):
    # Bad input on purpose: toylib's own message, not the runtime type checker's.
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)
    model, like = nn.Linear(3, 4, rngs=0), nn.Linear(3, 4, rngs=1)
    blob = tl.save_bytes(model)
    data = header(blob)["leaves"]["model.kernel"]["data"]
    (length,) = struct.unpack("<Q", blob[8:16])
    begin = 16 + length + data["offset"]
    flipped = bytearray(blob)
    flipped[begin + 5] ^= 0xFF
    before = snapshot(like)
    with pytest.raises(ValueError) as caught:
        tl.load_bytes(bytes(flipped), like)
    message = str(caught.value)
    assert "the blob given to tl.load_bytes is damaged" in message
    assert f"bytes {begin}-{begin + data['nbytes']}" in message and "`model.kernel`" in message
    assert "CRC-32" in message
    assert_unchanged(like, before)
    loaded = tl.load_bytes(bytes(flipped), like, verify=False)  # skipped: the wrong value shows
    assert not np.array_equal(loaded.kernel.value, model.kernel.value)

    for cut in (len(blob) - 1, 20, 10):  # inside the data, inside the header, before it
        with pytest.raises(ValueError, match="cut short|not a checkpoint"):
            tl.load_bytes(blob[:cut], like, verify=False)
    with pytest.raises(ValueError, match="does not start with toylib's magic bytes"):
        tl.load_bytes(b"PK\x03\x04" + blob, like)
    with pytest.raises(TypeError, match="got|not bytes"):
        tl.load_bytes("text", like)
    assert_unchanged(like, before)


def test_mismatches_are_tl_loads_errors():
    blob = tl.save_bytes(nn.MLP([2, 4, 1], rngs=0))
    with pytest.raises(ValueError, match=r"(?s)tl.load_bytes: the blob .*not in the checkpoint"):
        tl.load_bytes(blob, nn.MLP([2, 4, 4, 1], rngs=0))
    with pytest.raises(ValueError, match=r"shapes.*\n.*`model.layers\[0\].kernel`: \(2, 5\)"):
        tl.load_bytes(blob, nn.MLP([2, 5, 1], rngs=0))
    with pytest.raises(ValueError, match=r"`model.layers\[0\].kernel`: bfloat16 in `like`"):
        tl.load_bytes(blob, nn.MLP([2, 4, 1], param_dtype=jnp.bfloat16, rngs=0))
    with pytest.raises(TypeError, match="`model.x` holds a str"):
        tl.save_bytes({"x": tl.Variable("text")})
    with pytest.raises(ValueError, match="holds no arrays"):
        tl.save_bytes(nn.Identity())


def test_the_format_is_readable_without_toylib():
    model = nn.Linear(2, 3, rngs=0)
    blob = tl.save_bytes(model)
    (length,) = struct.unpack("<Q", blob[8:16])
    start = 16 + length
    assert start % 64 == 0
    meta = header(blob)
    assert meta["format"] == 1 and meta["digest"] == "crc32c"
    data = meta["leaves"]["model.kernel"]["data"]
    kernel = np.frombuffer(blob, data["dtype"], offset=start + data["offset"], count=6)
    np.testing.assert_array_equal(kernel.reshape(data["shape"]), model.kernel.value)
