"""What a tl.error_if check costs in a jitted train step (the happy path).

The same tl.jit step (an MLP of width 32, batch 16, SGD) with and without
``tl.error_if(loss, ~isfinite(loss), ...)``, and, for reference, with the
check written as an effect (``jax.debug.callback`` under ``lax.cond``), which
toylib avoids: any effect sends every call through jax's slow Python dispatch.
Rounds are interleaved, the order rotating each round; the figure is the
median over rounds of the mean time per step, the ratio against "plain".

Run: .venv/bin/python benchmarks/error_if.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import toylib as tl
from toylib import nn


def effect_check(loss: jax.Array) -> jax.Array:
    def report(bad: jax.Array) -> None:
        if bad:
            raise RuntimeError("loss is not finite")

    bad = ~jnp.isfinite(loss)
    jax.lax.cond(bad, lambda: jax.debug.callback(report, bad), lambda: None)
    return loss


CHECKS = {
    "plain": lambda loss: loss,
    "tl.error_if": lambda loss: tl.error_if(loss, ~jnp.isfinite(loss), "loss is not finite"),
    "effect (reference)": effect_check,
}


def make(check):
    model = nn.MLP([32, 32, 32, 1], rngs=0)
    opt = tl.Optimizer(model, optax.sgd(1e-3))

    @tl.jit
    def step(m, o, x, y):
        def loss_fn(m):
            return check(((m(x) - y) ** 2).mean())

        loss, grads = tl.value_and_grad(loss_fn)(m)
        o.update(m, grads)
        return loss

    return lambda x, y: step(model, opt, x, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    x, y = jnp.ones((16, 32)), jnp.zeros((16, 1))
    steps = {name: make(check) for name, check in CHECKS.items()}
    for f in steps.values():
        jax.block_until_ready(f(x, y))
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            for _ in range(args.steps):
                out = steps[name](x, y)
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - start) / args.steps * 1e6)
    base = statistics.median(times["plain"])
    print(f"jax {jax.__version__}, {args.rounds} rounds x {args.steps} steps")
    print(f"{'check':20s} {'us/step':>8s} {'vs plain':>9s}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:20s} {median:8.1f} {median / base:9.2f}")


if __name__ == "__main__":
    main()
