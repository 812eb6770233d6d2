"""How much a toylib Module costs raw JAX to flatten, versus a list of dicts.

Every raw ``jax.jit``/``jax.grad``/optax call flattens its pytree arguments,
so this cost is paid per call when Modules are passed to raw JAX. Also times
the graph view (``tl.split``/``tl.merge``) on the same model.

Run: ``.venv/bin/python benchmarks/pytree.py``. Prints median microseconds
over interleaved rounds and the ratio to the list-of-dicts baseline.
"""

from __future__ import annotations

import statistics
import time

import jax

import toylib as tl
from toylib import nn


def mean_us(fn, number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number * 1e6


def cases(depth: int) -> dict:
    """Pairs of (list-of-dicts baseline, toylib) callables for one MLP depth."""
    model = nn.MLP([32] * (depth + 1), rngs=0)
    dicts = [{"b": layer.bias.value, "w": layer.kernel.value} for layer in model.layers]
    leaves_m, tree_m = jax.tree.flatten(model)
    leaves_d, tree_d = jax.tree.flatten(dicts)
    graphdef, state = tl.split(model)
    return {
        "flatten": (lambda: jax.tree.flatten(dicts), lambda: jax.tree.flatten(model)),
        "unflatten": (
            lambda: jax.tree.unflatten(tree_d, leaves_d),
            lambda: jax.tree.unflatten(tree_m, leaves_m),
        ),
        "tl.split": (lambda: jax.tree.flatten(dicts), lambda: tl.split(model)),
        "tl.merge": (
            lambda: jax.tree.unflatten(tree_d, leaves_d),
            lambda: tl.merge(graphdef, state),
        ),
    }


def main(depths=(4, 64), rounds: int = 15, number: int = 50) -> None:
    print(f"{'depth':>5} {'operation':<10} {'dicts us':>9} {'toylib us':>10} {'ratio':>6}")
    for depth in depths:
        for name, (baseline, toylib) in cases(depth).items():
            base, ours = [], []
            for _ in range(rounds):  # interleaved, so machine noise hits both
                base.append(mean_us(baseline, number))
                ours.append(mean_us(toylib, number))
            b, o = statistics.median(base), statistics.median(ours)
            print(f"{depth:>5} {name:<10} {b:>9.1f} {o:>10.1f} {o / b:>6.1f}")


if __name__ == "__main__":
    main()
