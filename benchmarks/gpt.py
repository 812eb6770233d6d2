"""The GPT train step four ways: raw JAX, toylib, Flax NNX and Equinox, same model, same numbers.

The model is examples/gpt.py's without dropout: token + position embedding,
``n_layers`` pre-LayerNorm blocks (causal multi-head attention, GELU MLP of
width 4d), a final LayerNorm and the output tied to the token embedding. One
set of initial weights (numpy, seeded) is copied into every variant, so all
of them compute the same loss (checked: the first losses must agree), and
every variant uses the same optax AdamW with gradient clipping.

Variants:

* raw unrolled: a dict pytree, pure functions, ``jax.jit``; a Python loop over blocks.
* raw scan: the same with the blocks' weights stacked and ``lax.scan``.
* toylib list: ``tl.jit`` + ``tl.value_and_grad`` + ``tl.Optimizer``, blocks in a list.
* toylib Stack: the same with ``nn.Stack`` (scan); ``unroll=n`` unrolls its loop.
* nnx.jit: ``nnx.jit`` + ``nnx.value_and_grad`` + ``nnx.Optimizer``, blocks in ``nnx.List``.
* nnx split+jax.jit: ``nnx.split`` once, ``jax.jit`` on the pure state, merge inside.
* equinox: ``eqx.filter_jit``, ``eqx.nn`` layers vmapped over batch and positions.

Measured, per variant: the median over interleaved rounds of ms/step and
tokens/s, the ratio to raw (unrolled for the unrolled variants, scan for the
scanned ones); the first call minus a step (trace + compile; median over
``--compile-rounds`` new step functions, interleaved); the compiled
step's peak memory (``memory_analysis``: arguments + outputs + temporaries -
aliased) and XLA's ``cost_analysis`` FLOPs and bytes accessed. Then
generation with toylib: tokens/s with the KV cache (prefill, then one
``tl.fori_loop``) vs recomputing the whole (padded) prefix for each token.

Run: python benchmarks/gpt.py [--sizes tiny small] [--rounds 7] [--steps 5] [--smoke]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import toylib as tl
from toylib import nn

VOCAB = 256
EPS = 1e-5


@dataclass(frozen=True)
class Size:
    name: str
    d: int
    layers: int
    heads: int
    ctx: int
    batch: int


SIZES = {
    "tiny": Size("tiny", d=128, layers=4, heads=4, ctx=64, batch=8),
    "small": Size("small", d=256, layers=6, heads=8, ctx=128, batch=8),
}


def make_tx() -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, b2=0.95))


# -- one set of weights ---------------------------------------------------------------------


def reference_params(size: Size, seed: int = 0) -> dict:
    """numpy weights in the raw layout; every variant copies these."""
    rng = np.random.default_rng(seed)
    d, h, n = size.d, size.heads, size.layers
    hd = d // h

    def normal(*shape, scale=0.02):
        return (rng.normal(size=shape) * scale).astype(np.float32)

    def block():
        return {
            "ln1_s": np.ones(d, np.float32), "ln1_b": np.zeros(d, np.float32),
            "wq": normal(d, h, hd), "bq": np.zeros((h, hd), np.float32),
            "wk": normal(d, h, hd), "bk": np.zeros((h, hd), np.float32),
            "wv": normal(d, h, hd), "bv": np.zeros((h, hd), np.float32),
            "wo": normal(h, hd, d), "bo": np.zeros(d, np.float32),
            "ln2_s": np.ones(d, np.float32), "ln2_b": np.zeros(d, np.float32),
            "w_up": normal(d, 4 * d), "b_up": np.zeros(4 * d, np.float32),
            "w_down": normal(4 * d, d), "b_down": np.zeros(d, np.float32),
        }  # fmt: skip

    return {
        "wte": normal(VOCAB, d),
        "wpe": normal(size.ctx, d),
        "blocks": [block() for _ in range(n)],
        "lnf_s": np.ones(d, np.float32),
        "lnf_b": np.zeros(d, np.float32),
    }


def stacked(blocks: list[dict]) -> dict:
    return {k: np.stack([b[k] for b in blocks]) for k in blocks[0]}


def batches(size: Size, count: int, seed: int = 1) -> list[tuple[jax.Array, jax.Array]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        tokens = rng.integers(0, VOCAB, size=(size.batch, size.ctx + 1)).astype(np.int32)
        out.append((jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:])))
    return out


def cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# -- raw JAX --------------------------------------------------------------------------------


def _ln(x, s, b):
    mean = x.mean(-1, keepdims=True)
    centred = x - mean
    return centred * jax.lax.rsqrt(jnp.square(centred).mean(-1, keepdims=True) + EPS) * s + b


def _raw_block(p, x, heads):
    t = x.shape[-2]
    h = _ln(x, p["ln1_s"], p["ln1_b"])
    q = jnp.einsum("btf,fhd->bthd", h, p["wq"]) + p["bq"]
    k = jnp.einsum("btf,fhd->bthd", h, p["wk"]) + p["bk"]
    v = jnp.einsum("btf,fhd->bthd", h, p["wv"]) + p["bv"]
    q = q / np.float32(np.sqrt(q.shape[-1]))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
    logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
    a = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v)
    x = x + jnp.einsum("bqhd,hdo->bqo", a, p["wo"]) + p["bo"]
    h = _ln(x, p["ln2_s"], p["ln2_b"])
    return x + jax.nn.gelu(h @ p["w_up"] + p["b_up"]) @ p["w_down"] + p["b_down"]


def _raw_logits(params, x, heads, scan):
    t = x.shape[-1]
    h = params["wte"][x] + params["wpe"][jnp.arange(t)]
    if scan:
        h, _ = jax.lax.scan(lambda h, p: (_raw_block(p, h, heads), None), h, params["blocks"])
    else:
        for p in params["blocks"]:
            h = _raw_block(p, h, heads)
    return _ln(h, params["lnf_s"], params["lnf_b"]) @ params["wte"].T


class Variant:
    """A train step and its state: ``run(x, y) -> loss``, ``lower(x, y)`` for XLA's analyses."""

    run: Callable[[jax.Array, jax.Array], jax.Array]
    lower: Callable[[jax.Array, jax.Array], Any]


def make_raw(size: Size, ref: dict, scan: bool) -> Variant:
    params = jax.tree.map(
        jnp.asarray, {**ref, "blocks": stacked(ref["blocks"]) if scan else ref["blocks"]}
    )
    tx = make_tx()
    state = {"params": params, "opt": tx.init(params)}

    def loss_fn(params, x, y):
        return cross_entropy(_raw_logits(params, x, size.heads, scan), y)

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def run(x, y):
        state["params"], state["opt"], loss = step(state["params"], state["opt"], x, y)
        return loss

    v = Variant()
    v.run, v.lower = run, lambda x, y: step.lower(state["params"], state["opt"], x, y)
    return v


# -- toylib ---------------------------------------------------------------------------------


class TBlock(tl.Module):
    def __init__(self, size: Size, *, rngs: tl.Rngs) -> None:
        d = size.d
        self.ln1 = nn.LayerNorm(d, epsilon=EPS)
        self.attn = nn.MultiHeadAttention(size.heads, d, causal=True, rngs=rngs)
        self.ln2 = nn.LayerNorm(d, epsilon=EPS)
        self.up = nn.Linear(d, 4 * d, rngs=rngs)
        self.down = nn.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.down(nn.gelu(self.up(self.ln2(x))))


class TGPT(tl.Module):
    def __init__(self, size: Size, *, stack: bool, unroll: int | bool = 1, rngs: tl.Rngs) -> None:
        init = nn.initializers.normal(0.02)
        self.tokens = nn.Embed(VOCAB, size.d, embedding_init=init, rngs=rngs)
        self.positions = nn.Embed(size.ctx, size.d, embedding_init=init, rngs=rngs)
        if stack:
            self.blocks = nn.Stack(lambda r: TBlock(size, rngs=r), size.layers, rngs=rngs,
                                   unroll=unroll)  # fmt: skip
        else:
            self.blocks = [TBlock(size, rngs=rngs) for _ in range(size.layers)]
        self.ln = nn.LayerNorm(size.d, epsilon=EPS)

    def __call__(self, tokens, start=0):
        x = self.tokens(tokens) + self.positions(start + jnp.arange(tokens.shape[-1]))
        if isinstance(self.blocks, nn.Stack):
            x = self.blocks(x)
        else:
            for block in self.blocks:
                x = block(x)
        return self.tokens.attend(self.ln(x))


def _load_toylib_block(block: Any, p: dict) -> None:
    block.ln1.scale.value, block.ln1.bias.value = p["ln1_s"], p["ln1_b"]
    for name in ("q", "k", "v"):
        proj = getattr(block.attn, {"q": "query", "k": "key", "v": "value"}[name])
        proj.kernel.value, proj.bias.value = p[f"w{name}"], p[f"b{name}"]
    block.attn.out.kernel.value, block.attn.out.bias.value = p["wo"], p["bo"]
    block.ln2.scale.value, block.ln2.bias.value = p["ln2_s"], p["ln2_b"]
    block.up.kernel.value, block.up.bias.value = p["w_up"], p["b_up"]
    block.down.kernel.value, block.down.bias.value = p["w_down"], p["b_down"]


def load_toylib(model: TGPT, ref: dict) -> TGPT:
    ref = jax.tree.map(jnp.asarray, ref)
    model.tokens.embedding.value, model.positions.embedding.value = ref["wte"], ref["wpe"]
    model.ln.scale.value, model.ln.bias.value = ref["lnf_s"], ref["lnf_b"]
    if isinstance(model.blocks, nn.Stack):
        _load_toylib_block(model.blocks.blocks, jax.tree.map(jnp.asarray, stacked(ref["blocks"])))
    else:
        for block, p in zip(model.blocks, ref["blocks"], strict=True):
            _load_toylib_block(block, p)
    return model


def build_toylib(size: Size, stack: bool, unroll: int | bool = 1) -> TGPT:
    return TGPT(size, stack=stack, unroll=unroll, rngs=tl.Rngs(0))


def make_toylib(size: Size, ref: dict, stack: bool, unroll: int | bool = 1) -> Variant:
    model = load_toylib(build_toylib(size, stack, unroll), ref)
    optimizer = tl.Optimizer(model, make_tx())

    def loss_fn(model, x, y):
        return cross_entropy(model(x), y)

    @tl.jit
    def step(model, optimizer, x, y):
        loss, grads = tl.value_and_grad(loss_fn)(model, x, y)
        optimizer.update(model, grads)
        return loss

    v = Variant()
    v.run = lambda x, y: step(model, optimizer, x, y)
    v.lower = lambda x, y: step.lower(model, optimizer, x, y)
    v.model = model
    return v


# -- Flax NNX -------------------------------------------------------------------------------


def build_nnx(size: Size) -> Any:
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            d = size.d
            self.ln1 = nnx.LayerNorm(d, epsilon=EPS, rngs=rngs)
            self.attn = nnx.MultiHeadAttention(size.heads, d, decode=False, rngs=rngs)
            self.ln2 = nnx.LayerNorm(d, epsilon=EPS, rngs=rngs)
            self.up = nnx.Linear(d, 4 * d, rngs=rngs)
            self.down = nnx.Linear(4 * d, d, rngs=rngs)

        def __call__(self, x, mask):
            x = x + self.attn(self.ln1(x), mask=mask, deterministic=True)
            return x + self.down(nnx.gelu(self.up(self.ln2(x))))

    class GPT(nnx.Module):
        def __init__(self, rngs):
            init = nnx.initializers.normal(0.02)
            self.tokens = nnx.Embed(VOCAB, size.d, embedding_init=init, rngs=rngs)
            self.positions = nnx.Embed(size.ctx, size.d, embedding_init=init, rngs=rngs)
            self.blocks = nnx.List([Block(rngs) for _ in range(size.layers)])
            self.ln = nnx.LayerNorm(size.d, epsilon=EPS, rngs=rngs)

        def __call__(self, tokens):
            t = tokens.shape[-1]
            x = self.tokens(tokens) + self.positions(jnp.arange(t))
            mask = nnx.make_causal_mask(tokens)
            for block in self.blocks:
                x = block(x, mask)
            return self.tokens.attend(self.ln(x))

    return GPT(nnx.Rngs(0))


def load_nnx(model: Any, ref: dict) -> Any:
    model.tokens.embedding[...] = ref["wte"]
    model.positions.embedding[...] = ref["wpe"]
    model.ln.scale[...], model.ln.bias[...] = ref["lnf_s"], ref["lnf_b"]
    for block, p in zip(model.blocks, ref["blocks"], strict=True):
        block.ln1.scale[...], block.ln1.bias[...] = p["ln1_s"], p["ln1_b"]
        for name, proj in (("q", "query"), ("k", "key"), ("v", "value")):
            getattr(block.attn, proj).kernel[...] = p[f"w{name}"]
            getattr(block.attn, proj).bias[...] = p[f"b{name}"]
        block.attn.out.kernel[...], block.attn.out.bias[...] = p["wo"], p["bo"]
        block.ln2.scale[...], block.ln2.bias[...] = p["ln2_s"], p["ln2_b"]
        block.up.kernel[...], block.up.bias[...] = p["w_up"], p["b_up"]
        block.down.kernel[...], block.down.bias[...] = p["w_down"], p["b_down"]
    return model


def _nnx_step():
    from flax import nnx

    def step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: cross_entropy(m(x), y))(model)
        optimizer.update(model, grads)
        return loss

    return step


def make_nnx(size: Size, ref: dict) -> Variant:
    from flax import nnx

    model = load_nnx(build_nnx(size), ref)
    optimizer = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)
    step = nnx.jit(_nnx_step())
    v = Variant()
    v.run = lambda x, y: step(model, optimizer, x, y)
    v.lower = lambda x, y: step.lower(model, optimizer, x, y)
    return v


def make_nnx_split(size: Size, ref: dict) -> Variant:
    from flax import nnx

    model = load_nnx(build_nnx(size), ref)
    optimizer = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    inner = _nnx_step()

    @jax.jit
    def step(state, x, y):
        model, optimizer = nnx.merge(graphdef, state)
        loss = inner(model, optimizer, x, y)
        return nnx.state((model, optimizer)), loss

    box = {"state": state}

    def run(x, y):
        box["state"], loss = step(box["state"], x, y)
        return loss

    v = Variant()
    v.run, v.lower = run, lambda x, y: step.lower(box["state"], x, y)
    return v


# -- Equinox --------------------------------------------------------------------------------


def build_equinox(size: Size, key: jax.Array | None = None) -> Any:
    import equinox as eqx

    d = size.d

    class Block(eqx.Module):
        ln1: eqx.nn.LayerNorm
        attn: eqx.nn.MultiheadAttention
        ln2: eqx.nn.LayerNorm
        up: eqx.nn.Linear
        down: eqx.nn.Linear

        def __init__(self, key):
            k1, k2, k3 = jax.random.split(key, 3)
            self.ln1 = eqx.nn.LayerNorm(d, eps=EPS)
            self.attn = eqx.nn.MultiheadAttention(
                size.heads, d, use_query_bias=True, use_key_bias=True, use_value_bias=True,
                use_output_bias=True, key=k1,
            )  # fmt: skip
            self.ln2 = eqx.nn.LayerNorm(d, eps=EPS)
            self.up = eqx.nn.Linear(d, 4 * d, key=k2)
            self.down = eqx.nn.Linear(4 * d, d, key=k3)

        def __call__(self, x, mask):  # x: (t, d), one sequence
            x = x + self.attn(jax.vmap(self.ln1)(x), jax.vmap(self.ln1)(x), jax.vmap(self.ln1)(x),
                              mask=mask)  # fmt: skip
            h = jax.vmap(self.ln2)(x)
            return x + jax.vmap(self.down)(jax.nn.gelu(jax.vmap(self.up)(h)))

    class GPT(eqx.Module):
        tokens: eqx.nn.Embedding
        positions: eqx.nn.Embedding
        blocks: list
        ln: eqx.nn.LayerNorm

        def __init__(self, key):
            keys = jax.random.split(key, size.layers + 2)
            self.tokens = eqx.nn.Embedding(VOCAB, d, key=keys[0])
            self.positions = eqx.nn.Embedding(size.ctx, d, key=keys[1])
            self.blocks = [Block(k) for k in keys[2:]]
            self.ln = eqx.nn.LayerNorm(d, eps=EPS)

        def __call__(self, tokens):  # one sequence (t,)
            t = tokens.shape[-1]
            x = self.tokens.weight[tokens] + self.positions.weight[jnp.arange(t)]
            mask = jnp.tril(jnp.ones((t, t), bool))
            for block in self.blocks:
                x = block(x, mask)
            return jax.vmap(self.ln)(x) @ self.tokens.weight.T

    return GPT(jax.random.key(0) if key is None else key)


def load_equinox(model: Any, ref: dict) -> Any:
    import equinox as eqx

    d = ref["wte"].shape[1]
    a = jnp.asarray

    def set_block(block, p):
        names = ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "up.weight", "up.bias",
                 "down.weight", "down.bias")  # fmt: skip
        values = (p["ln1_s"], p["ln1_b"], p["ln2_s"], p["ln2_b"], p["w_up"].T, p["b_up"],
                  p["w_down"].T, p["b_down"])  # fmt: skip
        for name, value in zip(names, values, strict=True):
            first, second = name.split(".")
            block = eqx.tree_at(lambda b, f=first, s=second: getattr(getattr(b, f), s), block,
                                a(value))  # fmt: skip
        for name, proj in (("q", "query_proj"), ("k", "key_proj"), ("v", "value_proj")):
            block = eqx.tree_at(lambda b, proj=proj: getattr(b.attn, proj).weight, block,
                                a(p[f"w{name}"].reshape(d, -1).T))  # fmt: skip
            block = eqx.tree_at(lambda b, proj=proj: getattr(b.attn, proj).bias, block,
                                a(p[f"b{name}"].reshape(-1)))  # fmt: skip
        block = eqx.tree_at(lambda b: b.attn.output_proj.weight, block,
                            a(p["wo"].reshape(-1, d).T))  # fmt: skip
        return eqx.tree_at(lambda b: b.attn.output_proj.bias, block, a(p["bo"]))

    model = eqx.tree_at(lambda m: m.tokens.weight, model, a(ref["wte"]))
    model = eqx.tree_at(lambda m: m.positions.weight, model, a(ref["wpe"]))
    model = eqx.tree_at(lambda m: m.ln.weight, model, a(ref["lnf_s"]))
    model = eqx.tree_at(lambda m: m.ln.bias, model, a(ref["lnf_b"]))
    blocks = [set_block(b, p) for b, p in zip(model.blocks, ref["blocks"], strict=True)]
    return eqx.tree_at(lambda m: m.blocks, model, blocks)


def make_equinox(size: Size, ref: dict) -> Variant:
    import equinox as eqx

    model = load_equinox(build_equinox(size), ref)
    tx = make_tx()
    state = {"model": model, "opt": tx.init(eqx.filter(model, eqx.is_array))}

    def loss_fn(model, x, y):
        return cross_entropy(jax.vmap(model)(x), y)

    @eqx.filter_jit
    def step(model, opt_state, x, y):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
        updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    def run(x, y):
        state["model"], state["opt"], loss = step(state["model"], state["opt"], x, y)
        return loss

    v = Variant()
    v.run, v.lower = run, lambda x, y: step.lower(state["model"], state["opt"], x, y)
    return v


# (name, baseline name, factory)
VARIANTS: list[tuple[str, str, Callable[[Size, dict], Variant]]] = [
    ("raw unrolled", "raw unrolled", lambda s, r: make_raw(s, r, scan=False)),
    ("raw scan", "raw scan", lambda s, r: make_raw(s, r, scan=True)),
    ("toylib list", "raw unrolled", lambda s, r: make_toylib(s, r, stack=False)),
    ("toylib Stack", "raw scan", lambda s, r: make_toylib(s, r, stack=True)),
    ("toylib Stack unroll=2", "raw scan", lambda s, r: make_toylib(s, r, stack=True, unroll=2)),
    ("toylib Stack unroll=n", "raw unrolled",
     lambda s, r: make_toylib(s, r, stack=True, unroll=True)),
    ("nnx.jit", "raw unrolled", make_nnx),
    ("nnx split+jax.jit", "raw unrolled", make_nnx_split),
    ("equinox filter_jit", "raw unrolled", make_equinox),
]  # fmt: skip


# -- measuring ------------------------------------------------------------------------------


def analyse(variant: Variant, x: jax.Array, y: jax.Array) -> dict[str, float]:
    compiled = variant.lower(x, y).compile()
    compiled = getattr(compiled, "compiled", compiled)  # Equinox wraps jax's Compiled
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = compiled.memory_analysis()
    peak = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - memory.alias_size_in_bytes
    )
    return {"flops": cost.get("flops", float("nan")),
            "bytes": cost.get("bytes accessed", float("nan")), "peak": peak}  # fmt: skip


def measure(
    size: Size, rounds: int, steps: int, only: list[str] | None, compile_rounds: int = 1
) -> dict[str, dict]:
    ref = reference_params(size)
    data = batches(size, steps)
    x0, y0 = data[0]
    results: dict[str, dict] = {}
    runners: dict[str, Variant] = {}
    first_losses = {}
    for name, baseline, factory in VARIANTS:
        if only and not any(o in name for o in only) and name != baseline:
            continue
        variant = factory(size, ref)
        start = time.perf_counter()
        first_losses[name] = float(variant.run(x0, y0))  # trace + compile + one step
        first = time.perf_counter() - start
        runners[name] = variant
        results[name] = {"baseline": baseline, "first": [first], "times": [],
                         **analyse(variant, x0, y0)}  # fmt: skip
    for _ in range(compile_rounds - 1):  # more first calls, interleaved: compile time is noisy
        for name, _, factory in VARIANTS:
            if name in runners:
                variant = factory(size, ref)  # a new step function: traced and compiled anew
                start = time.perf_counter()
                jax.block_until_ready(variant.run(x0, y0))
                results[name]["first"].append(time.perf_counter() - start)
    want = first_losses["raw unrolled"]
    for name, loss in first_losses.items():
        assert abs(loss - want) < 1e-3 * max(1.0, abs(want)), (name, loss, want)
    for _ in range(rounds):
        for name, variant in runners.items():
            start = time.perf_counter()
            for x, y in data:
                loss = variant.run(x, y)
            jax.block_until_ready(loss)
            results[name]["times"].append((time.perf_counter() - start) / len(data))
    for result in results.values():
        result["step"] = statistics.median(result["times"])
        result["compile"] = statistics.median(result["first"]) - result["step"]
    return results


def generation(size: Size, rounds: int, prompt_len: int = 16) -> tuple[float, float, int]:
    """toylib tokens/s: KV cache (prefill + fori_loop) vs recomputing the padded prefix."""
    model = load_toylib(build_toylib(size, stack=True), reference_params(size)).eval()
    new = size.ctx - prompt_len
    prompt = jnp.asarray(np.random.default_rng(2).integers(0, VOCAB, (1, prompt_len)), jnp.int32)

    @tl.jit
    def cached(model, prompt):
        logits = model(prompt)
        token = jnp.argmax(logits[:, -1], -1)
        out = jnp.zeros((1, new), jnp.int32).at[:, 0].set(token)

        def body(i, carry):
            model, out, token = carry
            token = jnp.argmax(model(token[:, None], start=prompt_len + i - 1)[:, -1], -1)
            return model, out.at[:, i].set(token), token

        return tl.fori_loop(1, new, body, (model, out, token))[1]

    @tl.jit
    def recompute(model, prompt):
        seq = jnp.zeros((1, size.ctx), jnp.int32).at[:, :prompt_len].set(prompt)

        def body(t, seq):
            logits = model(seq)  # the whole (padded, causal) prefix, every token
            token = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, t - 1, 1, False), -1)
            return jax.lax.dynamic_update_index_in_dim(seq, token, t, 1)

        return jax.lax.fori_loop(prompt_len, size.ctx, body, seq)[:, prompt_len:]

    decoder = nn.set_decode(nn.init_cache(tl.clone(model), 1, size.ctx))
    fresh = lambda: nn.init_cache(decoder, 1, size.ctx)  # noqa: E731 (a new sequence each time)
    a = cached(fresh(), prompt)
    b = recompute(model, prompt)
    assert (np.asarray(a) == np.asarray(b)).all(), "cached and recomputed generation differ"
    times: dict[str, list[float]] = {"cached": [], "recompute": []}
    for _ in range(rounds):
        decoder_now = fresh()
        start = time.perf_counter()
        jax.block_until_ready(cached(decoder_now, prompt))
        times["cached"].append(time.perf_counter() - start)
        start = time.perf_counter()
        jax.block_until_ready(recompute(model, prompt))
        times["recompute"].append(time.perf_counter() - start)
    return (new / statistics.median(times["cached"]), new / statistics.median(times["recompute"]),
            new)  # fmt: skip


def report(size: Size, results: dict[str, dict]) -> None:
    tokens = size.batch * size.ctx
    print(f"\n### {size.name}: d={size.d}, {size.layers} layers, {size.heads} heads, "
          f"ctx {size.ctx}, batch {size.batch}\n")  # fmt: skip
    print("| variant | ms/step | tokens/s | vs raw | baseline | compile s | vs raw "
          "| peak MB | GFLOP | MB accessed |")  # fmt: skip
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        base = results[r["baseline"]]
        print(
            f"| {name} | {1e3 * r['step']:.2f} | {tokens / r['step']:,.0f} | "
            f"{r['step'] / base['step']:.2f} | {r['baseline']} | {r['compile']:.2f} | "
            f"{r['compile'] / base['compile']:.2f} | {r['peak'] / 1e6:.1f} | "
            f"{r['flops'] / 1e9:.2f} | {r['bytes'] / 1e6:.1f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=sorted(SIZES))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--only", nargs="*", help="substrings of variant names (raw always runs)")
    parser.add_argument("--compile-rounds", type=int, default=2)
    parser.add_argument("--no-generation", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny only, 1 round of 1 step")
    args = parser.parse_args()
    if args.smoke:
        args.sizes, args.rounds, args.steps, args.compile_rounds = ["tiny"], 1, 1, 1
    device = jax.devices()[0]
    print(f"{datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"{device.platform} ({device.device_kind}), jax {jax.__version__}, "
          f"{args.rounds} rounds x {args.steps} steps")  # fmt: skip
    for name in args.sizes:
        size = SIZES[name]
        report(size, measure(size, args.rounds, args.steps, args.only, args.compile_rounds))
        if not args.no_generation:
            cached, recompute, new = generation(size, max(args.rounds // 2, 1))
            print(f"\ngeneration ({name}, toylib nn.Stack, batch 1, {new} new tokens): "
                  f"KV cache {cached:,.0f} tokens/s, recomputing the prefix {recompute:,.0f} "
                  f"tokens/s ({cached / recompute:.1f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
