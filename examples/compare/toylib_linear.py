"""Linear regression in toylib.

A toylib module is an ordinary mutable Python object that owns its
parameters (``tl.Param`` Variables) and is also a pytree. ``tl.Optimizer``
keeps the optax state in Variables of its own, and a step under ``tl.jit``
updates model and optimizer in place, so nothing is returned but the loss.

Run: ``python examples/compare/toylib_linear.py`` (or ``make compare`` for all five).
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import problem

import toylib as tl
from toylib import nn

# --- model and training: begin ---


class LinearRegression(tl.Module):
    def __init__(self, din, *, rngs):
        self.linear = nn.Linear(din, 1, rngs=rngs)  # LeCun-normal kernel, zero bias

    def __call__(self, x):
        return self.linear(x)[..., 0]


@tl.jit
def train_step(model, optimizer, x, y):
    def loss_fn(model):
        return jnp.mean((model(x) - y) ** 2)

    loss, grads = tl.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)  # in place
    return loss


def train(x, y, epochs, learning_rate):
    model = LinearRegression(x.shape[-1], rngs=tl.Rngs(problem.SEED))
    optimizer = tl.Optimizer(model, optax.adam(learning_rate))
    for _ in range(epochs):
        train_step(model, optimizer, x, y)
    return model, optimizer


# --- model and training: end ---


def main(out_dir: pathlib.Path | str | None = None, verbose: bool = True) -> dict[str, Any]:
    """Train, report, render; return weights, test MSE, the HTML path and a one-step callable."""
    data = problem.make_data()
    model, optimizer = train(data.x_train, data.y_train, problem.EPOCHS, problem.LEARNING_RATE)
    recovered = np.asarray(model.linear.kernel.value[:, 0])
    test_mse = problem.mse(model(data.x_test), data.y_test)
    html = tl.display(model, path=problem.html_path("toylib", out_dir))
    if verbose:
        problem.report("toylib", data, recovered, test_mse)

    def step() -> jax.Array:
        return train_step(model, optimizer, data.x_train, data.y_train)

    return {"recovered": recovered, "test_mse": test_mse, "html": html, "step": step}


if __name__ == "__main__":
    main()
