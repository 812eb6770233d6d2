"""Linear regression in Equinox.

An Equinox module is an immutable dataclass and a pytree: the model *is*
its parameters. It is written for one example and batched with
``jax.vmap``; ``eqx.filter_value_and_grad`` differentiates its arrays and
leaves everything else alone; each step returns a new model and optax state.

Run: ``python examples/compare/equinox_linear.py`` (or ``make compare`` for all five).
"""

from __future__ import annotations

import pathlib
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import problem

# --- model and training: begin ---


class LinearRegression(eqx.Module):
    linear: eqx.nn.Linear

    def __init__(self, din, *, key):
        linear = eqx.nn.Linear(din, "scalar", key=key)
        # eqx.nn.Linear draws uniform weights; swap in the LeCun-normal kernel
        # and zero bias the other libraries start from. Its weight is (out, in).
        lecun = jax.nn.initializers.lecun_normal(in_axis=-1, out_axis=-2)
        weight, bias = lecun(key, (1, din)), jnp.zeros(1)
        self.linear = eqx.tree_at(lambda lin: (lin.weight, lin.bias), linear, (weight, bias))

    def __call__(self, x):  # one example: (din,) -> ()
        return self.linear(x)


@eqx.filter_jit
def train_step(model, opt_state, tx, x, y):
    def loss_fn(model):
        return jnp.mean((jax.vmap(model)(x) - y) ** 2)

    loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
    updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), opt_state, loss


def train(x, y, epochs, learning_rate):
    model = LinearRegression(x.shape[-1], key=jax.random.key(problem.SEED))
    tx = optax.adam(learning_rate)
    opt_state = tx.init(eqx.filter(model, eqx.is_array))
    for _ in range(epochs):
        model, opt_state, _ = train_step(model, opt_state, tx, x, y)
    return model, opt_state, tx


# --- model and training: end ---


def main(out_dir: pathlib.Path | str | None = None, verbose: bool = True) -> dict[str, Any]:
    """Train, report, render; return weights, test MSE, the HTML path and a one-step callable."""
    data = problem.make_data()
    model, opt_state, tx = train(data.x_train, data.y_train, problem.EPOCHS, problem.LEARNING_RATE)
    recovered = np.asarray(model.linear.weight[0])
    test_mse = problem.mse(jax.vmap(model)(data.x_test), data.y_test)
    html = problem.write_html(model, "equinox", out_dir)
    if verbose:
        problem.report("equinox", data, recovered, test_mse)

    # Each step returns a new model: the timed step threads it through a box.
    box = [model, opt_state]

    def step() -> jax.Array:
        box[0], box[1], loss = train_step(box[0], box[1], tx, data.x_train, data.y_train)
        return loss

    return {"recovered": recovered, "test_mse": test_mse, "html": html, "step": step}


if __name__ == "__main__":
    main()
