"""Eager (un-jitted) transforms: toylib vs raw jax and Equinox on a small MLP.

The model: an MLP of 4 Linear layers of width 32 (relu between), batch 16,
mean-squared-error loss. Each row runs ONE transform call without jit, as
code does while it is being written or debugged (and as a training loop does
before it is wrapped in ``tl.jit``):

* grad:            tl.grad(loss)(model, x, y)            vs jax.grad / eqx.filter_grad
* value_and_grad:  tl.value_and_grad(loss)(model, x, y)  vs jax.value_and_grad / eqx's
* vmap:            tl.vmap(forward, in_axes=(None, 0))   vs jax.vmap / eqx.filter_vmap

Raw jax runs the same computation on a list of ``{"w", "b"}`` dicts. Rounds
are interleaved (every variant once per round, in the same process) so that
machine noise hits all alike; the figure is the median over rounds of the
mean time per call, and the ratio is the median over rounds of the ratio to
raw jax in the same round.

Run: python benchmarks/eager.py [--rounds 15 --calls 50]
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import toylib as tl
from toylib import nn

WIDTH, DEPTH, BATCH = 32, 4, 16


def raw_variants(x: jax.Array, y: jax.Array) -> dict[str, Callable[[], object]]:
    keys = jax.random.split(jax.random.key(0), DEPTH)
    params = [
        {"w": jax.random.normal(k, (WIDTH, WIDTH)) / np.sqrt(WIDTH), "b": jnp.zeros(WIDTH)}
        for k in keys
    ]

    def forward(params, x):
        for i, p in enumerate(params):
            x = x @ p["w"] + p["b"]
            if i < len(params) - 1:
                x = jax.nn.relu(x)
        return x

    def loss(params, x, y):
        return jnp.mean((forward(params, x) - y) ** 2)

    return {
        "grad": lambda: jax.grad(loss)(params, x, y),
        "value_and_grad": lambda: jax.value_and_grad(loss)(params, x, y),
        "vmap": lambda: jax.vmap(forward, in_axes=(None, 0))(params, x),
    }


def toylib_variants(x: jax.Array, y: jax.Array) -> dict[str, Callable[[], object]]:
    model = nn.MLP([WIDTH] * (DEPTH + 1), rngs=0)

    def loss(model, x, y):
        return jnp.mean((model(x) - y) ** 2)

    def forward(model, x):
        return model(x)

    return {
        "grad": lambda: tl.grad(loss)(model, x, y),
        "value_and_grad": lambda: tl.value_and_grad(loss)(model, x, y),
        "vmap": lambda: tl.vmap(forward, in_axes=(None, 0))(model, x),
    }


def equinox_variants(x: jax.Array, y: jax.Array) -> dict[str, Callable[[], object]]:
    import equinox as eqx

    class MLP(eqx.Module):
        layers: list

        def __init__(self, key):
            self.layers = [eqx.nn.Linear(WIDTH, WIDTH, key=k) for k in jax.random.split(key, DEPTH)]

        def __call__(self, x):
            for i, layer in enumerate(self.layers):
                x = x @ layer.weight.T + layer.bias
                if i < len(self.layers) - 1:
                    x = jax.nn.relu(x)
            return x

    model = MLP(jax.random.key(0))

    def loss(model, x, y):
        return jnp.mean((model(x) - y) ** 2)

    def forward(model, x):
        return model(x)

    return {
        "grad": lambda: eqx.filter_grad(loss)(model, x, y),
        "value_and_grad": lambda: eqx.filter_value_and_grad(loss)(model, x, y),
        "vmap": lambda: eqx.filter_vmap(forward, in_axes=(None, 0))(model, x),
    }


LIBRARIES = {"raw jax": raw_variants, "toylib": toylib_variants, "equinox": equinox_variants}


def measure(rounds: int, calls: int) -> None:
    x = jax.random.normal(jax.random.key(1), (BATCH, WIDTH))
    y = jax.random.normal(jax.random.key(2), (BATCH, WIDTH))
    runners: dict[tuple[str, str], Callable[[], object]] = {}
    for library, make in LIBRARIES.items():
        try:
            variants = make(x, y)
        except ImportError as error:
            print(f"{library} skipped ({error.name} not installed)")
            continue
        for transform, run in variants.items():
            runners[transform, library] = run
    for run in runners.values():  # warm up: every primitive compiled once
        for _ in range(3):
            jax.block_until_ready(run())
    times: dict[tuple[str, str], list[float]] = {key: [] for key in runners}
    for _ in range(rounds):
        for key, run in runners.items():
            start = time.perf_counter()
            for _ in range(calls):
                out = run()
            jax.block_until_ready(out)
            times[key].append((time.perf_counter() - start) / calls * 1e6)
    print(
        f"jax {jax.__version__}, {platform.processor() or platform.machine()}, "
        f"{jax.devices()[0].platform}, {rounds} rounds x {calls} calls, "
        f"MLP {DEPTH}x{WIDTH}, batch {BATCH}"
    )
    print(f"{'transform':<16} {'library':<9} {'us/call':>9} {'vs raw':>7}")
    for transform in ("grad", "value_and_grad", "vmap"):
        raw = np.array(times[transform, "raw jax"])
        for library in LIBRARIES:
            if (transform, library) not in times:
                continue
            ts = np.array(times[transform, library])
            # The ratio is the median of per-round ratios: within a round the
            # variants run back to back, so a load change between rounds
            # (other work on the machine) cancels out.
            ratio = float(np.median(ts / raw))
            print(f"{transform:<16} {library:<9} {float(np.median(ts)):>9.1f} {ratio:>7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    measure(args.rounds, args.calls)


if __name__ == "__main__":
    main()
