"""examples/gpt.py on small configs: training, KV-cache decoding, sampling, resume."""

import dataclasses
import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import toylib as tl
from toylib import nn


def _load_example():
    # Registered in sys.modules before it runs: its dataclass looks its module up there.
    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "gpt.py"
    spec = importlib.util.spec_from_file_location("examples_gpt", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gpt = _load_example()

# The tiny preset (d=64, ctx 64) with one block instead of two, dropout (so resuming
# must restore the dropout keys) and a short, fast schedule. One block halves the
# train step's compile (XLA:CPU compiles the scanned block and its gradient), which
# is most of this file's time; the tests that need several blocks (one KV cache per
# block of the Stack) use DECODE, which is never trained.
TEST = dataclasses.replace(
    gpt.PRESETS["tiny"],
    n_layers=1,
    dropout=0.1,
    batch=8,
    steps=8,
    warmup=2,
    lr=1e-2,
    max_bytes=200_000,
)
# Two blocks, small: cached decoding through every layer of an nn.Stack.
DECODE = dataclasses.replace(gpt.PRESETS["tiny"], d_model=32, n_heads=2, ctx=16)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """An uninterrupted run of TEST, through the same function the command line calls."""
    return gpt.run(TEST, out=tmp_path_factory.mktemp("whole"), log_every=4, sample_tokens=4)


def params(model):
    return {p: np.asarray(v.value) for p, v in tl.iter_variables(model, tl.Param)}


def test_stdlib_text_is_found_and_split():
    files = gpt.stdlib_files()
    assert any(p.name == "os.py" for p in files)
    train, val = gpt.load_text(50_000)
    assert train.dtype == np.uint8 and len(train) + len(val) == 50_000
    assert len(val) == 5_000
    x, y = gpt.get_batch(train, 4, 8, np.random.default_rng(0))
    assert x.shape == y.shape == (4, 8)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one


def test_tiny_model_trains_and_the_loss_drops(whole):
    losses = whole["history"]["train"]
    assert len(losses) == 8 and int(whole["optimizer"].step.value) == 8
    assert losses[0] > 5.0  # about ln 256 = 5.55 at initialisation
    assert np.mean(losses[-2:]) < losses[0] - 1.5
    assert whole["val_loss"] < losses[0] - 1.5
    assert whole["sample"].startswith(gpt.PROMPT) and len(whole["sample"]) > len(gpt.PROMPT)


def test_compiled_construction_equals_eager():
    compiled = gpt.make_model(DECODE)
    seed = DECODE.seed
    eager = gpt.GPT(DECODE, rngs=tl.Rngs(params=seed, dropout=seed + 1))
    want, got = params(eager), params(compiled)
    assert want.keys() == got.keys()
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-6, atol=1e-7)
    assert compiled.blocks.blocks.up.kernel.value.shape == (2, 32, 128)
    assert compiled.tokens.embedding is not compiled.positions.embedding


def test_cached_decoding_equals_the_full_causal_forward_pass():
    model = gpt.make_model(DECODE).eval()
    ctx = DECODE.ctx
    tokens = jax.random.randint(jax.random.key(0), (2, ctx), 0, 256)
    want = tl.jit(lambda model, tokens: model(tokens))(model, tokens)
    decoder = nn.set_decode(nn.init_cache(tl.clone(model), 2, ctx))
    # One cache per block of the Stack: (blocks, batch, positions, heads, head_dim).
    assert decoder.blocks.blocks.attn.cached_key.value.shape == (2, 2, ctx, 2, 16)

    @tl.jit
    def step(decoder, token, position):
        return decoder(token, start=position)

    prefill = step(decoder, tokens[:, :5], jnp.asarray(0))  # several tokens: causal inside
    rest = [step(decoder, tokens[:, t : t + 1], jnp.asarray(t)) for t in range(5, ctx)]
    got = jnp.concatenate([prefill, *rest], axis=1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-4)
    np.testing.assert_array_equal(np.asarray(decoder.blocks.blocks.attn.cache_index), [ctx, ctx])
    assert not model.blocks.blocks.attn.decode  # the clone was switched, not the model


def test_greedy_generation_equals_recomputing_the_prefix(whole):
    model = tl.clone(whole["model"]).eval()  # trained: no near-ties between the top two bytes
    prompt = jax.random.randint(jax.random.key(1), (2, 4), 0, 256)
    got = gpt.generate(model, prompt, 12, temperature=0.0)
    # No cache: the whole prefix again for every token. Causal, so the padding
    # after position t does not change the logits at t (one shape, one compile).
    forward = tl.jit(lambda model, tokens: model(tokens))
    sequence = np.zeros((2, 16), np.int32)
    sequence[:, :4] = prompt
    for t in range(4, 16):
        sequence[:, t] = np.argmax(forward(model, jnp.asarray(sequence))[:, t - 1], -1)
    np.testing.assert_array_equal(got, sequence[:, 4:16])


def test_seeded_sampling_is_deterministic():
    model = gpt.make_model(TEST)
    prompt = gpt.encode(gpt.PROMPT)[None]
    # An untrained model: its next-byte distribution is near uniform, so the seed shows.
    # The settings run() samples with (4 tokens, temperature 0.8, top-k 40): the
    # decoding program compiled for the `whole` run is reused.
    first = gpt.generate(model, prompt, 4, seed=3)
    again = gpt.generate(model, prompt, 4, seed=3)
    other = gpt.generate(model, prompt, 4, seed=4)
    np.testing.assert_array_equal(first, again)
    assert first.shape == (1, 4) and first.dtype == np.int32
    assert (first != other).any()


def test_sample_token_top_k_only_draws_the_k_most_likely():
    logits = jnp.log(jnp.array([[0.1, 0.4, 0.2, 0.3]]))
    keys = jax.random.split(jax.random.key(0), 200)
    # Compiled: eager vmap would compile each primitive on its own.
    draws = jax.jit(jax.vmap(lambda k: gpt.sample_token(logits, k, 1.0, 2)))(keys)
    assert set(np.asarray(draws).ravel().tolist()) == {1, 3}


def test_generate_rejects_a_prompt_that_does_not_fit():
    model = gpt.make_model(TEST)
    with pytest.raises(ValueError, match="must fit the context of 64 positions"):
        gpt.generate(model, np.zeros((1, 60), np.int32), 5)


def test_resume_equals_an_uninterrupted_run(whole, tmp_path, capsys):
    options = dict(log_every=4, sample_tokens=4)
    gpt.run(TEST, out=tmp_path, stop_at=3, **options)  # interrupted after step 3
    resumed = gpt.run(TEST, out=tmp_path, resume=True, **options)
    want, got = params(whole["model"]), params(resumed["model"])
    for path in want:  # same schedule, batches and dropout keys: the same run
        np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-6)
    assert len(resumed["history"]["train"]) == 8
    np.testing.assert_allclose(resumed["history"]["train"], whole["history"]["train"], rtol=1e-5)
    assert resumed["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-5)
    assert resumed["sample"] == whole["sample"]
    assert (tmp_path / "loss.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "val loss:" in printed and "sample: " in printed and "step 8 loss" in printed
    with pytest.raises(ValueError, match="nothing left to train"):
        gpt.run(TEST, out=tmp_path, resume=True, **options)
    with pytest.raises(FileNotFoundError, match="--resume needs an earlier run"):
        gpt.run(TEST, out=tmp_path / "nothing", resume=True, **options)


def test_data_x_model_parallel_equals_one_device_and_resumes_on_one(whole, tmp_path):
    # --mesh 2x4 on the session's 8 fake CPU devices, interrupted after step 3,
    # then resumed on one device from its checkpoint: the same run as `whole`.
    options = dict(log_every=4, sample_tokens=4)
    sharded = gpt.run(TEST, out=tmp_path, stop_at=3, mesh=(2, 4), **options)
    np.testing.assert_allclose(
        sharded["history"]["train"], whole["history"]["train"][:3], rtol=1e-5
    )
    up = sharded["model"].blocks.blocks.up.kernel  # ("layers", "embed", "mlp")
    assert up.sharding == ("layers", "embed", "mlp")
    assert up.value.sharding.spec == P(None, None, "model")
    assert {s.data.shape for s in up.value.addressable_shards} == {(1, 64, 64)}
    mu = sharded["optimizer"].opt_state[1][0][1]["blocks"]["blocks"]["up"]["kernel"]
    assert mu.value.sharding.is_equivalent_to(up.value.sharding, 3)  # placed like its Param
    tokens = sharded["model"].tokens.embedding.value  # vocab over "model"
    assert tokens.sharding.spec == P("model", None)
    resumed = gpt.run(TEST, out=tmp_path, resume=True, **options)  # one device now
    assert len(resumed["model"].tokens.embedding.value.sharding.device_set) == 1
    np.testing.assert_allclose(resumed["history"]["train"], whole["history"]["train"], rtol=1e-5)
    want, got = params(whole["model"]), params(resumed["model"])
    for path in want:
        if path[-2:] == ("key", "bias"):
            # Its true gradient is zero (a bias on every key shifts each query's
            # scores by one constant, which softmax ignores), so Adam's steps
            # on it follow rounding noise, which differs with the sharding.
            continue
        np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-6, err_msg=str(path))


def test_mesh_argument_and_missing_devices():
    assert gpt.parse_mesh("2x4") == (2, 4)
    with pytest.raises(Exception, match="give data x model devices"):
        gpt.parse_mesh("8")
    with pytest.raises(ValueError, match="needs 16 devices, but JAX sees 8"):
        gpt.make_mesh((4, 4))
