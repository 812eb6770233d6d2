"""GPT: a GPT-2-style byte-level language model, trained on Python's own standard library.

The model is a decoder-only transformer written as a user of toylib would:
token and position ``nn.Embed``, pre-LayerNorm blocks (causal
``nn.MultiHeadAttention`` and a GELU MLP, both with dropout) held in one
``nn.Stack`` (built with vmap, applied with scan), a final LayerNorm and the
output projection tied to the token embedding (``Embed.attend``).

Data: the bytes of the standard library's ``.py`` files, found from the
running interpreter (no download), concatenated in sorted order; the last
10% of the bytes are the validation split. Each step reads ``batch`` random
windows of ``ctx + 1`` bytes (a numpy RNG seeded by the run's seed and the
step number, so a resumed run sees the data an uninterrupted one would).

Training: AdamW (weight decay on the kernels and embeddings only) with a
linear warmup and a cosine decay over ``--steps`` steps, gradients clipped
to a global norm of 1, one ``tl.jit`` step (``tl.value_and_grad`` and
``tl.Optimizer``, updated in place). The model is built by one compiled
program (``tl.jit`` of the constructor) instead of one small eager compile per
initialiser. A rich progress bar shows the loss; every ``--log-every`` steps a
``step N loss X`` line is printed, and at the end ``val loss: X``.

Generation: a copy of the trained model gets KV caches (``nn.init_cache``)
and is switched to decoding (``nn.set_decode``); one ``tl.jit`` call runs the
prompt through in one go (prefill) and then samples token by token inside one
``tl.fori_loop``, with temperature and top-k. It prints ``sample: ...``.

Files under ``--out`` (default ``out/gpt``): ``loss.png`` (train and
validation loss), ``checkpoint/`` (model and optimizer, ``tl.save``) and
``history.json``. ``--resume`` continues a run from its checkpoint up to
``--steps`` in total: the same schedule, data and dropout keys, so it ends
where an uninterrupted run would.

Scale: ``--mesh DxM`` trains data x model parallel on a ``("data", "model")``
mesh of D*M devices. Every weight carries logical axis names (``embed``,
``mlp``, ``heads``, ``kv``, ``vocab``; ``nn.Stack`` adds ``layers``) and
``RULES`` maps them to the mesh: the model is built directly sharded
(``tl.sharding.init``), each batch is split over "data"
(``tl.sharding.batch``), and the loss curve is the one-device curve to float
tolerance. On a CPU the example asks XLA for D*M fake devices.

Run: ``python examples/gpt.py --preset tiny --steps 200`` (well under a
minute on 2 CPU cores) or ``--preset small``; add ``--mesh 2x4`` to shard.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, ArrayLike, Float, Int, UInt8
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import toylib as tl
from toylib import nn

VOCAB = 256  # bytes
VAL_FRACTION = 0.1
PROMPT = "def main():\n"

NO_CHECKPOINT = """\
gpt: --resume needs an earlier run's checkpoint, but {missing} does not exist.
Fix: train once without --resume to create it, or point --out at that run's folder:

    python examples/gpt.py --preset {preset} --steps 100 --out {out}
    python examples/gpt.py --preset {preset} --steps 200 --out {out} --resume
"""

NOTHING_TO_RESUME = """\
gpt: the checkpoint in {out} has done {done} steps already, and --steps {steps} asks for
{steps} in total, so there is nothing left to train.
Fix: ask for more steps in total, e.g. --steps {more}.
"""


@dataclasses.dataclass(frozen=True)
class Config:
    """The model's sizes and the training run's settings (frozen: hashable, so static)."""

    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    ctx: int = 64
    dropout: float = 0.0
    batch: int = 16
    steps: int = 200
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.1
    clip: float = 1.0
    max_bytes: int = 2_000_000  # of the standard library read (enough for these sizes)
    seed: int = 0


PRESETS = {
    "tiny": Config(),
    "small": Config(
        d_model=256, n_layers=6, n_heads=8, ctx=128, dropout=0.1, batch=32, steps=2000,
        lr=1e-3, warmup=100, max_bytes=20_000_000,
    ),
}  # fmt: skip


# -- data -----------------------------------------------------------------------------------


def stdlib_files() -> list[Path]:
    """The standard library's ``.py`` files, from the running interpreter, in sorted order."""
    root = Path(os.__file__).resolve().parent
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)


def load_text(max_bytes: int) -> tuple[UInt8[np.ndarray, " n"], UInt8[np.ndarray, " m"]]:
    """The first ``max_bytes`` bytes of the standard library's sources, split train/val.

    Arguments:
        max_bytes: how many bytes to read at most.

    Returns:
        ``(train, val)`` uint8 arrays; ``val`` is the last 10%.
    """
    chunks, total = [], 0
    for path in stdlib_files():
        data = path.read_bytes()
        chunks.append(data[: max_bytes - total])
        total += len(chunks[-1])
        if total >= max_bytes:
            break
    text = np.frombuffer(b"".join(chunks), np.uint8)
    split = int(len(text) * (1 - VAL_FRACTION))
    return text[:split], text[split:]


def get_batch(
    data: UInt8[np.ndarray, " n"], batch: int, ctx: int, rng: np.random.Generator
) -> tuple[Int[np.ndarray, "b t"], Int[np.ndarray, "b t"]]:
    """``batch`` random windows: inputs ``data[i:i+ctx]`` and targets shifted by one."""
    starts = rng.integers(0, len(data) - ctx - 1, size=batch)
    windows = data[starts[:, None] + np.arange(ctx + 1)].astype(np.int32)
    return windows[:, :-1], windows[:, 1:]


# -- the model ------------------------------------------------------------------------------


# Logical axis names -> mesh axes for data x model parallelism on a
# ("data", "model") mesh (Megatron's layout): the batch is split over "data";
# MLP hidden units, attention heads and the vocabulary over "model"; the
# residual stream and the stacked layers are replicated. Every weight below
# says what its dimensions are; on one device the names do nothing.
RULES = {
    "batch": "data",
    "vocab": "model",
    "embed": None,
    "mlp": "model",
    "heads": "model",
    "kv": None,
    "layers": None,
}
EMBED = ("embed",)


def layer_norm(d: int) -> nn.LayerNorm:
    return nn.LayerNorm(d, epsilon=1e-5, scale_sharding=EMBED, bias_sharding=EMBED)


class Block(tl.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, config: Config, *, rngs: tl.Rngs) -> None:
        d = config.d_model
        self.ln1 = layer_norm(d)
        self.attn = nn.MultiHeadAttention(
            config.n_heads,
            d,
            causal=True,
            dropout_rate=config.dropout,
            kernel_sharding=("embed", "heads", "kv"),
            bias_sharding=("heads", "kv"),
            out_kernel_sharding=("heads", "kv", "embed"),
            out_bias_sharding=EMBED,
            rngs=rngs,
        )
        self.ln2 = layer_norm(d)
        self.up = nn.Linear(
            d, 4 * d, kernel_sharding=("embed", "mlp"), bias_sharding=("mlp",), rngs=rngs
        )
        self.down = nn.Linear(
            4 * d, d, kernel_sharding=("mlp", "embed"), bias_sharding=EMBED, rngs=rngs
        )
        self.drop = nn.Dropout(config.dropout, rngs=rngs)

    def __call__(self, x: Float[Array, "b t d"]) -> Float[Array, "b t d"]:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.down(nn.gelu(self.up(self.ln2(x)))))


class GPT(tl.Module):
    """A decoder-only transformer over bytes, output tied to the token embedding.

    Example:
        >>> model = GPT(Config(d_model=16, n_layers=2, n_heads=2, ctx=8), rngs=tl.Rngs(0))
        >>> model(jnp.zeros((3, 8), jnp.int32)).shape
        (3, 8, 256)
    """

    def __init__(self, config: Config, *, rngs: tl.Rngs) -> None:
        init = nn.initializers.normal(0.02)  # GPT-2's
        d = config.d_model
        self.tokens = nn.Embed(
            VOCAB, d, embedding_init=init, embedding_sharding=("vocab", "embed"), rngs=rngs
        )
        self.positions = nn.Embed(
            config.ctx, d, embedding_init=init, embedding_sharding=(None, "embed"), rngs=rngs
        )
        self.drop = nn.Dropout(config.dropout, rngs=rngs)
        # nn.Stack puts "layers" in front of every stacked weight's names.
        self.blocks = nn.Stack(lambda r: Block(config, rngs=r), config.n_layers, rngs=rngs)
        self.ln = layer_norm(d)

    def __call__(
        self, tokens: Int[Array, "b t"], start: Int[Array, ""] | int = 0
    ) -> Float[Array, "b t 256"]:
        """Logits for the next byte at each position; ``start`` is the first token's position."""
        positions = start + jnp.arange(tokens.shape[-1])
        x = self.drop(self.tokens(tokens) + self.positions(positions))
        return self.tokens.attend(self.ln(self.blocks(x)))


def make_model(config: Config, mesh: jax.sharding.Mesh | None = None) -> GPT:
    """Build the GPT in one compiled program, sharded over ``mesh`` when given.

    Built eagerly, every initialiser (normal, LeCun normal, zeros, ones, the
    vmapped ones of ``nn.Stack``) runs as its own small XLA compile the first
    time; under ``tl.jit`` the whole construction is traced once and compiled
    as one program. With a mesh, ``tl.sharding.init`` does the same with
    each weight's ``out_shardings`` from its names and ``RULES``: every
    device computes only its own shards. The values are the same either way.
    """
    if mesh is not None:
        return tl.sharding.init(lambda: _new(config), mesh, RULES)
    return _build(config)


def _new(config: Config) -> GPT:
    return GPT(config, rngs=tl.Rngs(params=config.seed, dropout=config.seed + 1))


# One tl.jit for every call: the config (frozen, hashable) is static, so a
# second model of the same config reuses the compiled constructor.
_build = tl.jit(_new)


def parse_mesh(text: str) -> tuple[int, int]:
    """``"2x4"`` -> ``(2, 4)``: data-parallel x model-parallel devices."""
    try:
        data, model = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--mesh {text!r}: give data x model devices, e.g. --mesh 2x4"
        ) from None
    if data < 1 or model < 1:
        raise argparse.ArgumentTypeError(f"--mesh {text!r}: both sizes must be at least 1")
    return data, model


def make_mesh(shape: tuple[int, int]) -> jax.sharding.Mesh:
    """A ("data", "model") mesh of ``shape``, with a clear error when devices are missing."""
    need, have = shape[0] * shape[1], len(jax.devices())
    if have < need:
        raise ValueError(
            f"gpt: --mesh {shape[0]}x{shape[1]} needs {need} devices, but JAX sees {have}.\n"
            f"Fix: on a CPU, ask XLA for fake devices before JAX starts:\n\n"
            f"    XLA_FLAGS=--xla_force_host_platform_device_count={need} "
            "python examples/gpt.py ..."
        )
    return tl.sharding.make_mesh(shape, ("data", "model"), devices=jax.devices()[:need])


def to_devices(
    mesh: jax.sharding.Mesh | None, *arrays: np.ndarray
) -> tuple[np.ndarray | jax.Array, ...]:
    """The batch's arrays split over the mesh's "data" axis (unchanged without a mesh)."""
    if mesh is None:
        return arrays
    return tuple(tl.sharding.batch(a, ("batch", None), mesh=mesh, rules=RULES) for a in arrays)


def _decay_mask(params: Any) -> Any:
    # Weight decay on matrices (kernels, embeddings), not on biases or norms.
    def decayed(path: Any, _: Any) -> bool:
        names = {getattr(key, "key", getattr(key, "name", None)) for key in path}
        return bool(names & {"kernel", "embedding"})

    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(model: GPT, config: Config) -> tl.Optimizer:
    """AdamW with linear warmup, cosine decay to 10% over ``config.steps``, clipping at 1."""
    return tl.Optimizer(model, make_tx(config))


@functools.cache
def make_tx(config: Config) -> optax.GradientTransformation:
    """The optax transformation, one per config.

    Cached because the transformation is a static part of the optimizer (its
    functions key ``tl.jit``'s cache): a new one per run (a resumed run, a
    test) would compile the train step again.
    """
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, config.lr, config.warmup, max(config.steps, config.warmup + 1), config.lr * 0.1
    )
    return optax.chain(
        optax.clip_by_global_norm(config.clip),
        optax.adamw(schedule, b2=0.95, weight_decay=config.weight_decay, mask=_decay_mask),
    )


def loss_fn(model: GPT, x: Int[Array, "b t"], y: Int[Array, "b t"]) -> Float[Array, ""]:
    """Mean next-byte cross-entropy (nats)."""
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@tl.jit
def train_step(model: GPT, optimizer: tl.Optimizer, x: Array, y: Array) -> Float[Array, ""]:
    """One step in place: loss, gradients, the optimizer update."""
    loss, grads = tl.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return loss


eval_loss = tl.jit(loss_fn)


def evaluate(
    model: GPT,
    data: np.ndarray,
    config: Config,
    batches: int = 8,
    mesh: jax.sharding.Mesh | None = None,
) -> float:
    """Mean loss over ``batches`` fixed windows of ``data``, in evaluation mode (no dropout)."""
    model = tl.clone(model).eval()
    rng = np.random.default_rng([config.seed, 2**31])  # not a training step
    losses = [
        eval_loss(model, *to_devices(mesh, *get_batch(data, config.batch, config.ctx, rng)))
        for _ in range(batches)
    ]
    return float(np.mean([float(v) for v in losses]))


def train(
    model: GPT,
    optimizer: tl.Optimizer,
    train_data: np.ndarray,
    config: Config,
    *,
    until: int | None = None,
    log_every: int = 50,
    console: Console | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> list[float]:
    """Train in place from the optimizer's step count up to ``until`` (default ``config.steps``).

    Returns:
        The loss of every step run (floats, read once at the end, and at each
        log line, so the device is not waited for on every step).
    """
    first, last = int(optimizer.step.value), config.steps if until is None else until
    console = console or Console()
    model.train()
    losses = []
    columns = [TextColumn("[bold]gpt"), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn()]
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("train", total=last - first, loss=float("nan"))
        for step in range(first, last):
            rng = np.random.default_rng([config.seed, step])
            batch = to_devices(mesh, *get_batch(train_data, config.batch, config.ctx, rng))
            losses.append(train_step(model, optimizer, *batch))
            progress.advance(task)
            if (step + 1) % log_every == 0 or step + 1 == last:
                loss = float(losses[-1])
                progress.update(task, loss=loss)
                progress.console.print(f"step {step + 1} loss {loss:.4f}")
    return [float(v) for v in losses]


# -- generation -----------------------------------------------------------------------------


def sample_token(
    logits: Float[Array, "b vocab"], key: jax.Array, temperature: float, top_k: int | None
) -> Int[Array, " b"]:
    """Draw one token per row: greedy at temperature 0, else softmax(logits / T) over the top k."""
    if temperature == 0:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits).astype(jnp.int32)


@tl.jit
def _decode(
    model: GPT,
    prompt: Int[Array, "b p"],
    key: jax.Array,
    new_tokens: int,
    temperature: float,
    top_k: int | None,
) -> Int[Array, "b n"]:
    # Python ints and floats are static for tl.jit: one program per setting.
    batch, length = prompt.shape
    keys = jax.random.split(key, new_tokens)
    logits = model(prompt)  # prefill: the whole prompt in one call
    token = sample_token(logits[:, -1], keys[0], temperature, top_k)
    out = jnp.zeros((batch, new_tokens), jnp.int32).at[:, 0].set(token)

    def step(i: Array, carry: tuple) -> tuple:
        model, out, token = carry
        logits = model(token[:, None], start=length + i - 1)
        token = sample_token(logits[:, -1], keys[i], temperature, top_k)
        return model, out.at[:, i].set(token), token

    _, out, _ = tl.fori_loop(1, new_tokens, step, (model, out, token))
    return out


def generate(
    model: GPT,
    prompt: Int[ArrayLike, "b p"],
    new_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int | None = 40,
    seed: int = 0,
) -> Int[np.ndarray, "b n"]:
    """Continue ``prompt`` by ``new_tokens`` tokens, sampled with the KV cache in one compiled call.

    The model is not changed: a copy gets the caches and is switched to
    decoding. ``prompt`` length + ``new_tokens`` must fit the position table
    (``ctx``).

    Arguments:
        model: a trained GPT.
        prompt: ``(batch, p)`` int tokens.
        new_tokens: how many to generate (at least 1).
        temperature: softmax temperature; 0 is greedy.
        top_k: sample among the k most likely tokens only (None: all).
        seed: the sampling key; the same seed gives the same tokens.

    Returns:
        ``(batch, new_tokens)`` int32 numpy array.
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    batch, length = prompt.shape
    ctx = model.positions.num_embeddings
    if new_tokens < 1 or length + new_tokens > ctx:
        raise ValueError(
            f"gpt.generate: a {length}-token prompt and {new_tokens} new tokens must fit the "
            f"context of {ctx} positions (and new_tokens >= 1)."
        )
    decoder = nn.set_decode(nn.init_cache(tl.clone(model).eval(), batch, length + new_tokens))
    return np.asarray(
        _decode(decoder, prompt, jax.random.key(seed), new_tokens, temperature, top_k)
    )


def encode(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), np.uint8).astype(np.int32)


def decode_bytes(tokens: Sequence[int]) -> str:
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


# -- files ----------------------------------------------------------------------------------


def plot_losses(history: dict, path: Path, title: str) -> None:
    """Train loss per step and validation loss per evaluation into ``path`` (a PNG)."""
    from matplotlib.figure import Figure  # Agg canvas, no pyplot global state

    figure = Figure(figsize=(6, 3.6), layout="constrained")
    axes = figure.subplots()
    axes.plot(np.arange(1, len(history["train"]) + 1), history["train"], lw=0.8, label="train")
    if history["val"]:
        steps, values = zip(*history["val"], strict=True)
        axes.plot(steps, values, marker="o", label="val")
    axes.axhline(np.log(VOCAB), color="grey", ls=":", label="uniform ln 256")
    axes.set(xlabel="step", ylabel="cross-entropy (nats/byte)", title=title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=100)


def _restore(out: Path, model: GPT, optimizer: tl.Optimizer, preset: str) -> tuple:
    checkpoint, history_file = out / "checkpoint", out / "history.json"
    for missing in (checkpoint, history_file):
        if not missing.exists():
            raise FileNotFoundError(NO_CHECKPOINT.format(missing=missing, preset=preset, out=out))
    model, optimizer = tl.load(checkpoint, (model, optimizer))
    return model, optimizer, json.loads(history_file.read_text())


def run(
    config: Config,
    *,
    out: str | os.PathLike = "out/gpt",
    resume: bool = False,
    stop_at: int | None = None,
    preset: str = "tiny",
    log_every: int = 50,
    sample_tokens: int = 48,
    console: Console | None = None,
    mesh: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Train (or resume) ``config``, evaluate, save, plot and sample; print as the CLI does.

    ``stop_at`` ends training after that step of the ``config.steps``-step
    schedule (an interrupted run, to be resumed later). ``mesh=(D, M)``
    trains data x model parallel on D*M devices (``RULES``).

    Returns:
        ``{"model", "optimizer", "history", "val_loss", "sample", "seconds"}``.
    """
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_data, val_data = load_text(config.max_bytes)
    devices = None if mesh is None else make_mesh(mesh)
    if devices is not None:
        print(f"mesh: {dict(devices.shape)} ({devices.size} devices)")
    model = make_model(config, devices)
    optimizer = make_optimizer(model, config)
    history: dict[str, list] = {"train": [], "val": []}
    if resume:
        model, optimizer, history = _restore(out, model, optimizer, preset)
        done = int(optimizer.step.value)
        if done >= config.steps:
            raise ValueError(
                NOTHING_TO_RESUME.format(out=out, done=done, steps=config.steps, more=2 * done)
            )
    history["train"] += train(model, optimizer, train_data, config, until=stop_at,
                              log_every=log_every, console=console, mesh=devices)  # fmt: skip
    val_loss = evaluate(model, val_data, config, mesh=devices)
    history["val"].append([int(optimizer.step.value), val_loss])
    print(f"val loss: {val_loss:.4f}")
    tl.save(out / "checkpoint", (model, optimizer))
    (out / "history.json").write_text(json.dumps(history))
    plot_losses(history, out / "loss.png", f"gpt {preset}: {config.n_layers} layers")
    prompt = encode(PROMPT)[None]
    new = min(sample_tokens, config.ctx - prompt.shape[1])
    tokens = generate(model, prompt, new, seed=config.seed)
    sample = PROMPT + decode_bytes(tokens[0])
    print(f"sample: {sample!r}")
    return {
        "model": model,
        "optimizer": optimizer,
        "history": history,
        "val_loss": val_loss,
        "sample": sample,
        "seconds": time.perf_counter() - start,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The command line: ``--preset``, ``--steps``, ``--out``, ``--resume``, ``--seed``, ``--mesh``.

    ``--mesh DxM`` on a CPU asks XLA for D*M fake devices (they prove the
    sharded program right, not fast).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--steps", type=int, help="total optimizer steps (the schedule length)")
    parser.add_argument("--out", default="out/gpt")
    parser.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    parser.add_argument("--stop-at", type=int, help="stop after this step (resume later)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument(
        "--mesh", type=parse_mesh, help="data x model parallel devices, e.g. 2x4 (RULES)"
    )
    args = parser.parse_args(argv)
    if args.mesh is not None:
        _fake_cpu_devices(args.mesh[0] * args.mesh[1])
    config = PRESETS[args.preset]
    changes = {"steps": args.steps, "seed": args.seed}
    config = dataclasses.replace(config, **{k: v for k, v in changes.items() if v is not None})
    return run(config, out=args.out, resume=args.resume, stop_at=args.stop_at,
               preset=args.preset, log_every=args.log_every, mesh=args.mesh)  # fmt: skip


def _fake_cpu_devices(n: int) -> None:
    # XLA reads the flag when JAX starts its backend (the first array made),
    # so it is set here, before anything runs; it only adds host (CPU)
    # devices, so on a GPU machine the GPUs are used as they are.
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


if __name__ == "__main__":
    main(sys.argv[1:])
