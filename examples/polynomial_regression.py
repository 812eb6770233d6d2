"""Polynomial regression: a Linear-tanh-Linear toylib model trained with optax.

The "Equinox and friends" problem: y = x^3 - 2x^2 + x - 2 (coefficients
``[1, -2, 1, -2]``, highest power first) at 1000 points evenly spaced on
[-10, 10], plus unit Gaussian noise; inputs and targets are standardised.

The model is an ``nn.Sequential``; ``jax.nn.tanh`` sits in its list as a
static attribute, so optax's ``init``/``update``/``apply_updates`` and
``jax.grad`` take the whole model as they would a dict of arrays.

Run: ``python examples/polynomial_regression.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from toylib import nn

COEFFICIENTS = [1.0, -2.0, 1.0, -2.0]


def make_data(n: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.linspace(-10.0, 10.0, n)
    y = np.polyval(COEFFICIENTS, x) + rng.normal(size=n)
    standardise = lambda a: (a - a.mean()) / a.std()  # noqa: E731
    return standardise(x)[:, None].astype(np.float32), standardise(y)[:, None].astype(np.float32)


def make_model(hidden: int = 32, seed: int = 0) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(1, hidden, rngs=seed), jnp.tanh, nn.Linear(hidden, 1, rngs=seed + 1)
    )


def main(epochs: int = 2000, every: int = 200, lr: float = 0.1, verbose: bool = True) -> dict:
    x, y = make_data()
    model = make_model()
    optimizer = optax.sgd(lr, momentum=0.9)
    opt_state = optimizer.init(model)

    def loss_fn(model: nn.Sequential) -> jax.Array:
        return jnp.mean((model(x) - y) ** 2)

    @jax.jit
    def step(model, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(model)
        updates, opt_state = optimizer.update(grads, opt_state, model)
        return optax.apply_updates(model, updates), opt_state, loss

    losses = []
    for epoch in range(epochs):
        model, opt_state, loss = step(model, opt_state)
        if epoch % every == 0 or epoch == epochs - 1:
            losses.append(float(loss))
            if verbose:
                print(f"epoch {epoch:5d}  loss {float(loss):.5f}")
    return {"losses": losses, "final_loss": float(loss_fn(model))}


if __name__ == "__main__":
    main()
