"""Per-step cost of a jitted train step: toylib vs raw jax.jit, Equinox and Flax NNX.

The model: an MLP of width 32 (relu between layers, none after the last),
batch 16, mean-squared-error loss, optax SGD; depth 4 and 64 layers. Every
library runs the same step on the same shapes:

* raw:        jax.jit over a hand-written list of {"w", "b"} dicts + optax state
* toylib:     tl.jit(step)(model, optimizer, x, y) with tl.value_and_grad and
              tl.Optimizer, state updated in place
* equinox:    eqx.filter_jit, returns the new model and optax state
* toylib + unrelated change: the same tl.jit step, with a structural change
              to *another* model between calls (an attribute assigned, a list
              appended to): tl.jit invalidates its cache per object, so this
              must cost what the plain step costs (ratio to "toylib tl.jit")
* nnx:        nnx.jit(step)(model, optimizer, x, y) with nnx.Optimizer
* nnx cached: nnx.cached_partial(step, model, optimizer)(x, y)

Rounds are interleaved (every library runs once per round, in the same
process) so machine noise hits all alike; the figure is the median over
rounds of the mean time per step, and the ratio is against raw in the same run.

Run: make bench   (installs equinox and flax into the venv)
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import toylib as tl
from toylib import nn

WIDTH, BATCH, LR = 32, 16, 1e-3


def make_raw(depth: int) -> Callable[[], None]:
    keys = jax.random.split(jax.random.key(0), depth)
    params = [
        {"w": jax.random.normal(k, (WIDTH, WIDTH)) / np.sqrt(WIDTH), "b": jnp.zeros(WIDTH)}
        for k in keys
    ]
    tx = optax.sgd(LR)
    state = {"params": params, "opt": tx.init(params)}

    def loss_fn(params, x, y):
        for i, p in enumerate(params):
            x = x @ p["w"] + p["b"]
            if i < len(params) - 1:
                x = jax.nn.relu(x)
        return jnp.mean((x - y) ** 2)

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def run(x, y):
        state["params"], state["opt"], loss = step(state["params"], state["opt"], x, y)
        return loss

    return run


def make_toylib(depth: int) -> Callable:
    model = nn.MLP([WIDTH] * (depth + 1), rngs=0)
    optimizer = tl.Optimizer(model, optax.sgd(LR))

    def loss_fn(model, x, y):
        return jnp.mean((model(x) - y) ** 2)

    @tl.jit
    def step(model, optimizer, x, y):
        loss, grads = tl.value_and_grad(loss_fn)(model, x, y)
        optimizer.update(model, grads)
        return loss

    return lambda x, y: step(model, optimizer, x, y)


def make_toylib_unrelated_change(depth: int) -> Callable:
    step = make_toylib(depth)
    other = nn.MLP([WIDTH, WIDTH], rngs=1)
    count = [0]

    def run(x, y):
        count[0] += 1
        other.note = count[0]  # a structural change to another model
        if count[0] % 100 == 0:
            other.layers.append(nn.Identity())
        return step(x, y)

    return run


def make_equinox(depth: int) -> Callable:
    import equinox as eqx

    class MLP(eqx.Module):
        layers: list

        def __init__(self, key):
            self.layers = [eqx.nn.Linear(WIDTH, WIDTH, key=k) for k in jax.random.split(key, depth)]

        def __call__(self, x):
            for i, layer in enumerate(self.layers):
                x = x @ layer.weight.T + layer.bias
                if i < len(self.layers) - 1:
                    x = jax.nn.relu(x)
            return x

    tx = optax.sgd(LR)
    model = MLP(jax.random.key(0))
    state = {"model": model, "opt": tx.init(eqx.filter(model, eqx.is_array))}

    @eqx.filter_jit
    def step(model, opt_state, x, y):
        loss, grads = eqx.filter_value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    def run(x, y):
        state["model"], state["opt"], loss = step(state["model"], state["opt"], x, y)
        return loss

    return run


def _nnx_model(depth: int):
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(WIDTH, WIDTH, rngs=rngs) for _ in range(depth)])

        def __call__(self, x):
            for i, layer in enumerate(self.layers):
                x = layer(x)
                if i < len(self.layers) - 1:
                    x = jax.nn.relu(x)
            return x

    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(LR), wrt=nnx.Param)

    def step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    return model, optimizer, step


def make_nnx(depth: int) -> Callable:
    from flax import nnx

    model, optimizer, step = _nnx_model(depth)
    jitted = nnx.jit(step)
    return lambda x, y: jitted(model, optimizer, x, y)


def make_nnx_cached(depth: int) -> Callable:
    from flax import nnx

    model, optimizer, step = _nnx_model(depth)
    return nnx.cached_partial(nnx.jit(step), model, optimizer)


LIBRARIES = {
    "raw jax.jit": make_raw,
    "toylib tl.jit": make_toylib,
    "toylib + unrelated change": make_toylib_unrelated_change,
    "equinox filter_jit": make_equinox,
    "nnx.jit": make_nnx,
    "nnx cached_partial": make_nnx_cached,
}


def measure(depths: list[int], rounds: int, steps: int, only: list[str] | None) -> None:
    x = jax.random.normal(jax.random.key(1), (BATCH, WIDTH))
    y = jax.random.normal(jax.random.key(2), (BATCH, WIDTH))
    print(
        f"jax {jax.__version__}, {platform.processor() or platform.machine()}, "
        f"{jax.devices()[0].platform}, {rounds} rounds x {steps} steps"
    )
    print(f"{'depth':>5}  {'library':<26} {'us/step':>9} {'vs raw':>7} {'vs toylib':>9}")
    for depth in depths:
        runners = {}
        for name, make in LIBRARIES.items():
            if only and not any(o in name for o in only):
                continue
            try:
                runners[name] = make(depth)
            except ImportError as error:
                print(f"{depth:>5}  {name:<26} skipped ({error.name} not installed)")
        for run in runners.values():  # compile and warm up
            for _ in range(3):
                jax.block_until_ready(run(x, y))
        times: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(rounds):
            for name, run in runners.items():
                start = time.perf_counter()
                for _ in range(steps):
                    loss = run(x, y)
                jax.block_until_ready(loss)
                times[name].append((time.perf_counter() - start) / steps * 1e6)
        raw = np.median(times["raw jax.jit"]) if "raw jax.jit" in times else float("nan")
        ours = np.median(times["toylib tl.jit"]) if "toylib tl.jit" in times else float("nan")
        for name, ts in times.items():
            median = float(np.median(ts))
            print(
                f"{depth:>5}  {name:<26} {median:>9.1f} {median / raw:>7.2f} {median / ours:>9.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 64])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--only", nargs="*", help="substrings of library names to run")
    args = parser.parse_args()
    measure(args.depths, args.rounds, args.steps, args.only)


if __name__ == "__main__":
    main()
