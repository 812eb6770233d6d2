"""Linear regression with a toylib Module and nothing but raw JAX.

The toylib notebook's problem: n = 120 examples in d = 10 dimensions,
``np.random.seed(31)``, true weights drawn with ``randint(0, 10)``, unit
Gaussian noise; the first 100 rows train, the last 20 test.

The model is an ``nn.Linear`` - an ordinary Python object that is also a
pytree - so plain ``jax.value_and_grad`` differentiates it and plain
``jax.tree_util.tree_map`` applies gradient descent to it.

Run: ``python examples/linear_regression.py`` (this is ``make demo``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from toylib import nn


def make_data(n: int = 120, d: int = 10) -> tuple[np.ndarray, ...]:
    np.random.seed(31)
    xs = np.random.normal(size=(n, d))
    weights_true = np.random.randint(0, 10, size=(d,))
    ys = np.dot(xs, weights_true) + np.random.normal(size=(n,))
    return xs[:100], ys[:100], xs[100:], ys[100:], weights_true


def loss_fn(model: nn.Linear, xs: jax.Array, ys: jax.Array) -> jax.Array:
    preds = jnp.squeeze(model(xs), -1)
    return jnp.mean((ys - preds) ** 2)


@jax.jit
def train_step(model: nn.Linear, xs: jax.Array, ys: jax.Array, lr: float = 0.05):
    loss, grads = jax.value_and_grad(loss_fn)(model, xs, ys)
    # The model and its gradients are pytrees of the same structure.
    model = jax.tree_util.tree_map(lambda p, g: p - lr * g, model, grads)
    return model, loss


def main(epochs: int = 300, verbose: bool = True) -> dict:
    xs_train, ys_train, xs_test, ys_test, weights_true = make_data()
    model = nn.Linear(xs_train.shape[1], 1, rngs=0)
    for epoch in range(epochs):
        model, loss = train_step(model, xs_train, ys_train)
        if verbose and epoch % 50 == 0:
            print(f"epoch {epoch:4d}  train MSE {float(loss):8.4f}")
    recovered = np.asarray(model.kernel.value[:, 0])
    test_mse = float(loss_fn(model, xs_test, ys_test))
    if verbose:
        print(f"{'true':>6} {'recovered':>10}")
        for t, r in zip(weights_true, recovered, strict=True):
            print(f"{t:6d} {r:10.3f}")
        print(f"max |true - recovered| = {np.abs(weights_true - recovered).max():.3f}")
        print(f"test MSE: {test_mse:.4f}")
    return {"true": weights_true, "recovered": recovered, "test_mse": test_mse}


if __name__ == "__main__":
    main()
