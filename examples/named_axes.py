"""Named axes (``tl.nx``): a linear model and the GPT's attention, axes by name.

1. The seed's ``named_dot``: ``x @ w`` written with named axes (wrap, tag,
   ``nmap(jnp.dot)``, back to positional), trained by gradient descent on the
   linear-regression problem of ``examples/linear_regression.py`` (n = 120,
   d = 10, seed 31); it recovers the true weights.
2. The GPT of ``examples/gpt.py`` run with every block's attention replaced
   by ``nn.NamedMultiHeadAttention`` holding the same weights: the logits
   are the positional model's.

Run: ``python examples/named_axes.py``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import toylib as tl
from toylib import nn

HERE = pathlib.Path(__file__).resolve().parent


def load_example(name: str) -> Any:
    """Another example script as a module (registered first: gpt.py's dataclass needs it)."""
    spec = importlib.util.spec_from_file_location(f"examples_{name}", HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# -- 1. named_dot on linear regression ---------------------------------------------------


def named_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` for ``x`` of shape (batch, features) and ``w`` of shape (features,)."""
    x_named = tl.nx.wrap(x).tag("batch", "features")
    w_named = tl.nx.wrap(w).tag("features")
    # jnp.dot sees one example's features at a time; nmap maps it over "batch".
    y = tl.nx.nmap(jnp.dot)(x_named.untag("features"), w_named.untag("features"))
    return y.untag("batch").unwrap()  # back to a positional (batch,) array


def loss_fn(params: dict, xs: jax.Array, ys: jax.Array) -> jax.Array:
    preds = named_dot(xs, params["w"]) + params["b"]
    return jnp.mean((ys - preds) ** 2)


@jax.jit
def train_step(params: dict, xs: jax.Array, ys: jax.Array, lr: float = 0.05) -> tuple:
    loss, grads = jax.value_and_grad(loss_fn)(params, xs, ys)
    return jax.tree.map(lambda p, g: p - lr * g, params, grads), loss


def regression(epochs: int = 300, verbose: bool = True) -> dict[str, Any]:
    xs_train, ys_train, xs_test, ys_test, weights_true = load_example(
        "linear_regression"
    ).make_data()
    params = {"w": jnp.zeros(xs_train.shape[1]), "b": jnp.zeros(())}
    xs, ys = jnp.asarray(xs_train, jnp.float32), jnp.asarray(ys_train, jnp.float32)
    for epoch in range(epochs):
        params, loss = train_step(params, xs, ys)
        if verbose and epoch % 100 == 0:
            print(f"epoch {epoch:4d}  train MSE {float(loss):8.4f}")
    recovered = np.asarray(params["w"])
    test_mse = float(loss_fn(params, jnp.asarray(xs_test), jnp.asarray(ys_test)))
    if verbose:
        print(f"max |true - recovered| = {np.abs(weights_true - recovered).max():.3f}")
        print(f"test MSE: {test_mse:.4f}")
    return {"true": weights_true, "recovered": recovered, "test_mse": test_mse}


# -- 2. the GPT's attention on named axes -------------------------------------------------


def named_logits(model: Any, tokens: jax.Array) -> jax.Array:
    """``model(tokens)``, each block's attention run by ``nn.NamedMultiHeadAttention``.

    The rest of each block (LayerNorms, MLP) is the positional code of
    ``examples/gpt.py``'s ``Block``; the attention takes a NamedArray with
    axes ``batch``, ``seq``, ``features``.
    """
    positions = jnp.arange(tokens.shape[-1])
    x = model.drop(model.tokens(tokens) + model.positions(positions))
    for i in range(len(model.blocks)):
        # One block of the nn.Stack: every stacked Variable sliced at i.
        block = jax.tree.map(lambda a, i=i: a[i], model.blocks.blocks)
        attn = nn.NamedMultiHeadAttention.from_positional(block.attn)
        h = tl.nx.wrap(block.ln1(x)).tag("batch", "seq", "features")
        x = x + block.drop(attn(h).unwrap("batch", "seq", "features"))
        x = x + block.drop(block.down(nn.gelu(block.up(block.ln2(x)))))
    return model.tokens.attend(model.ln(x))


def gpt_parity(verbose: bool = True) -> dict[str, Any]:
    gpt = load_example("gpt")
    config = dataclasses.replace(gpt.PRESETS["tiny"], d_model=32, n_heads=4, ctx=16)
    model = gpt.make_model(config).eval()
    tokens = jax.random.randint(jax.random.key(0), (2, config.ctx), 0, gpt.VOCAB)
    positional = model(tokens)
    named = named_logits(model, tokens)
    diff = float(jnp.max(jnp.abs(positional - named)))
    if verbose:
        print(f"GPT logits {tuple(positional.shape)}: max |positional - named| = {diff:.2e}")
    return {"positional": positional, "named": named, "max_diff": diff}


def main(epochs: int = 300, verbose: bool = True) -> dict[str, Any]:
    return {"regression": regression(epochs, verbose), "gpt": gpt_parity(verbose)}


if __name__ == "__main__":
    main()
