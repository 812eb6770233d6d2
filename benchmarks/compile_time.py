"""Trace + compile time of a grad step as blocks are added: nn.Stack vs a Python loop.

The model: ``n`` residual blocks (width 64) applied to a batch of 8, with
``nn.Stack`` (blocks built with vmap, applied with one scan) and, as the
baseline, the same blocks in a Python list applied in a loop (an unrolled
program that grows with ``n``). The step is ``tl.jit`` of ``tl.grad`` of a
mean-squared loss. The time is the first call (trace, lower, compile, run)
minus a warm call; median over rounds, each round a fresh model and a fresh
``tl.jit``, so no cache is reused.

Run: .venv/bin/python benchmarks/compile_time.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp

import toylib as tl
from toylib import nn

WIDTH, BATCH = 64, 8


class Block(tl.Module):
    """A pre-norm residual block: x + mlp(norm(x))."""

    def __init__(self, rngs: tl.Rngs) -> None:
        self.norm = nn.LayerNorm(WIDTH)
        self.up = nn.Linear(WIDTH, 4 * WIDTH, rngs=rngs)
        self.down = nn.Linear(4 * WIDTH, WIDTH, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.down(jax.nn.gelu(self.up(self.norm(x))))


class Looped(tl.Module):
    def __init__(self, n: int, rngs: tl.Rngs) -> None:
        self.blocks = [Block(rngs) for _ in range(n)]

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        return x


def loss(model: tl.Module, x: jax.Array) -> jax.Array:
    return jnp.mean(model(x) ** 2)


def first_call_seconds(make_model, x: jax.Array) -> float:
    model = make_model()
    step = tl.jit(lambda m, x: tl.grad(loss)(m, x))  # a fresh function: nothing cached
    start = time.perf_counter()
    jax.block_until_ready(step(model, x))
    first = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(step(model, x))
    return first - (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 16, 64])
    args = parser.parse_args()
    x = jax.random.normal(jax.random.key(0), (BATCH, WIDTH))
    print(
        f"{platform.processor() or platform.machine()}, jax {jax.__version__}, "
        f"{jax.devices()[0].platform}; median of {args.rounds} rounds"
    )
    print(f"{'blocks':>6} | {'Stack s':>8} | {'loop s':>8} | {'Stack vs first':>14}")
    stack_times = {}
    for n in args.sizes:
        stack, loop = [], []
        for _ in range(args.rounds):
            stack.append(first_call_seconds(lambda n=n: nn.Stack(Block, n, rngs=0), x))
            loop.append(first_call_seconds(lambda n=n: Looped(n, tl.Rngs(0)), x))
        stack_times[n] = statistics.median(stack)
        ratio = stack_times[n] / stack_times[args.sizes[0]]
        print(f"{n:>6} | {stack_times[n]:>8.3f} | {statistics.median(loop):>8.3f} | {ratio:>14.2f}")
    first, last = args.sizes[0], args.sizes[-1]
    print(
        f"Stack: {last} blocks take {stack_times[last] / stack_times[first]:.2f}x "
        f"the compile time of {first} (target <= 1.6x)"
    )


if __name__ == "__main__":
    main()
