"""Digits with an MLP: ``examples/digits.py``'s data, training loop and outputs, another model.

The 8x8 images are flattened to 64 inputs of a three-layer perceptron with
dropout; everything else (the split, the jitted steps, the progress bar, the
outputs and ``--resume``) is ``digits.py``'s ``main``. The training images are
not shifted: a dense layer has no notion of neighbouring pixels, and a
one-pixel shift of an 8x8 digit costs it about three points of test accuracy
(0.95 instead of 0.978). Outputs go to
``out/mlp/`` by default, so the CNN's checkpoint in ``out/`` is left alone.

Run: ``python examples/digits_mlp.py [--epochs N] [--out DIR] [--resume] [--seed S]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from digits import CLASSES
from digits import main as train_main
from jaxtyping import Array, Float

import toylib as tl
from toylib import nn


class DigitsMLP(tl.Module):
    """Flatten the image, then 64 -> 256 -> 128 -> 10 with ReLU and dropout.

    Arguments:
        rngs: the ``tl.Rngs``: its ``params`` stream initialises
            the weights, the ``dropout`` stream (or ``default``) draws the masks.

    Example:
        >>> import jax.numpy as jnp
        >>> model = DigitsMLP(rngs=tl.Rngs(0))
        >>> model(jnp.zeros((5, 8, 8, 1))).shape
        (5, 10)
    """

    def __init__(self, *, rngs: tl.Rngs) -> None:
        self.layers = [
            nn.Linear(64, 256, rngs=rngs),
            nn.Linear(256, 128, rngs=rngs),
            nn.Linear(128, CLASSES, rngs=rngs),
        ]
        self.dropout = nn.Dropout(0.2, rngs=rngs)

    def __call__(self, images: Float[Array, "*batch 8 8 1"]) -> Float[Array, "*batch 10"]:
        x = images.reshape(*images.shape[:-3], -1)
        *hidden, last = self.layers
        for layer in hidden:
            x = self.dropout(nn.relu(layer(x)))
        return last(x)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train the MLP; the command line and the result are those of ``digits.main``."""
    return train_main(argv, make_model=DigitsMLP, max_shift=0, name="digits_mlp", out="out/mlp")


if __name__ == "__main__":
    main()
