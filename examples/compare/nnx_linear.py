"""Linear regression in Flax NNX.

An NNX module is a mutable Python object that owns its parameters
(``nnx.Param`` Variables). ``nnx.Optimizer`` keeps the optax state next to
them, and a step under ``nnx.jit`` updates model and optimizer in place, so
nothing is returned but the loss.

Run: ``python examples/compare/nnx_linear.py`` (or ``make compare`` for all five).
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import problem
from flax import nnx

# --- model and training: begin ---


class LinearRegression(nnx.Module):
    def __init__(self, din, *, rngs):
        self.linear = nnx.Linear(din, 1, rngs=rngs)  # LeCun-normal kernel, zero bias

    def __call__(self, x):
        return self.linear(x)[..., 0]


@nnx.jit
def train_step(model, optimizer, x, y):
    def loss_fn(model):
        return jnp.mean((model(x) - y) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)  # in place
    return loss


def train(x, y, epochs, learning_rate):
    model = LinearRegression(x.shape[-1], rngs=nnx.Rngs(problem.SEED))
    optimizer = nnx.Optimizer(model, optax.adam(learning_rate), wrt=nnx.Param)
    for _ in range(epochs):
        train_step(model, optimizer, x, y)
    return model, optimizer


# --- model and training: end ---


def main(out_dir: pathlib.Path | str | None = None, verbose: bool = True) -> dict[str, Any]:
    """Train, report, render; return weights, test MSE, the HTML path and a one-step callable."""
    data = problem.make_data()
    model, optimizer = train(data.x_train, data.y_train, problem.EPOCHS, problem.LEARNING_RATE)
    recovered = np.asarray(model.linear.kernel[...][:, 0])
    test_mse = problem.mse(model(data.x_test), data.y_test)
    html = problem.write_html(model, "nnx", out_dir)
    if verbose:
        problem.report("nnx", data, recovered, test_mse)

    def step() -> jax.Array:
        return train_step(model, optimizer, data.x_train, data.y_train)

    return {"recovered": recovered, "test_mse": test_mse, "html": html, "step": step}


if __name__ == "__main__":
    main()
