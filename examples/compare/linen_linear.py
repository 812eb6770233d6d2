"""Linear regression in Flax Linen.

A Linen module is a description, not a container: ``model.init`` returns the
parameters as a nested dict, ``model.apply(variables, x)`` runs the model on
them, and a ``TrainState`` carries parameters, optax state and step count
from one pure, jitted step to the next.

Run: ``python examples/compare/linen_linear.py`` (or ``make compare`` for all five).
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import problem
from flax import linen as nn
from flax.training import train_state

# --- model and training: begin ---


class LinearRegression(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(x)[..., 0]  # Dense: LeCun-normal kernel, zero bias


@jax.jit
def train_step(state, x, y):
    def loss_fn(params):
        return jnp.mean((state.apply_fn({"params": params}, x) - y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss


def train(x, y, epochs, learning_rate):
    model = LinearRegression()
    params = model.init(jax.random.key(problem.SEED), x)["params"]
    tx = optax.adam(learning_rate)
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    for _ in range(epochs):
        state, _ = train_step(state, x, y)
    return state


# --- model and training: end ---


def main(out_dir: pathlib.Path | str | None = None, verbose: bool = True) -> dict[str, Any]:
    """Train, report, render; return weights, test MSE, the HTML path and a one-step callable."""
    data = problem.make_data()
    state = train(data.x_train, data.y_train, problem.EPOCHS, problem.LEARNING_RATE)
    recovered = np.asarray(state.params["Dense_0"]["kernel"][:, 0])
    test_mse = problem.mse(state.apply_fn({"params": state.params}, data.x_test), data.y_test)
    html = problem.write_html(state.params, "linen", out_dir)
    if verbose:
        problem.report("linen", data, recovered, test_mse)

    # The state lives outside the model: the timed step threads it through a box.
    box = [state]

    def step() -> jax.Array:
        box[0], loss = train_step(box[0], data.x_train, data.y_train)
        return loss

    return {"recovered": recovered, "test_mse": test_mse, "html": html, "step": step}


if __name__ == "__main__":
    main()
