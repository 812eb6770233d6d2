"""Linear regression in Penzai (the v2 API, ``penzai.pz``).

A Penzai model is a tree of layer dataclasses composed with combinators
(``pz.nn.Sequential``) that act on named arrays: the input is tagged
``batch``/``features`` and the linear layer contracts ``features`` away, so
no layer needs to know which axis is which. Parameters are mutable
``pz.Parameter`` Variables; under ``pz.variable_jit`` a step unbinds them,
differentiates their frozen values and writes the new values back in place.

Run: ``python examples/compare/penzai_linear.py`` (or ``make compare`` for all five).
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import problem
from penzai import pz

# --- model and training: begin ---

# LeCun normal, as the other libraries start from (Penzai's default is Xavier uniform).
lecun_normal = functools.partial(
    pz.nn.variance_scaling_initializer, scale=1.0, mode="fan_in", distribution="truncated_normal"
)


def make_model(din, key):
    return pz.nn.Sequential(
        [
            pz.nn.Linear.from_config(
                name="linear",
                init_base_rng=key,
                input_axes={"features": din},
                output_axes={},  # one prediction per example: no output axis
                initializer=lecun_normal,
            ),
            pz.nn.AddBias.from_config(name="bias", init_base_rng=key, biased_axes={}),
        ]
    )


@functools.partial(pz.variable_jit, static_argnames="tx")
def train_step(model, opt_state, tx, x, y):
    unbound, params = pz.unbind_params(model)
    frozen = pz.freeze_variables(params)

    def loss_fn(frozen):
        predictions = pz.bind_variables(unbound, frozen)(x).unwrap("batch")
        return jnp.mean((predictions - y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(frozen)
    updates, opt_state.value = tx.update(grads, opt_state.value, frozen)
    for param, new in zip(params, optax.apply_updates(frozen, updates), strict=True):
        param.value = new.value  # in place: pz.variable_jit carries it out
    return loss


def train(x, y, epochs, learning_rate):
    model = make_model(x.shape[-1], jax.random.key(problem.SEED))
    tx = optax.adam(learning_rate)
    opt_state = pz.StateVariable(tx.init(pz.unbind_params(model, freeze=True)[1]))
    x = pz.nx.wrap(x).tag("batch", "features")
    for _ in range(epochs):
        train_step(model, opt_state, tx, x, y)
    return model, opt_state, tx


# --- model and training: end ---


def main(out_dir: pathlib.Path | str | None = None, verbose: bool = True) -> dict[str, Any]:
    """Train, report, render; return weights, test MSE, the HTML path and a one-step callable."""
    data = problem.make_data()
    model, opt_state, tx = train(data.x_train, data.y_train, problem.EPOCHS, problem.LEARNING_RATE)
    recovered = np.asarray(model.sublayers[0].weights.value.unwrap("features"))
    x_test = pz.nx.wrap(data.x_test).tag("batch", "features")
    test_mse = problem.mse(model(x_test).unwrap("batch"), data.y_test)
    html = problem.write_html(model, "penzai", out_dir)
    if verbose:
        problem.report("penzai", data, recovered, test_mse)

    x_train = pz.nx.wrap(data.x_train).tag("batch", "features")

    def step() -> jax.Array:
        return train_step(model, opt_state, tx, x_train, data.y_train)

    return {"recovered": recovered, "test_mse": test_mse, "html": html, "step": step}


if __name__ == "__main__":
    main()
