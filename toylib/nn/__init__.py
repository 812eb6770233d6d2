"""toylib.nn: layers, activations and initialisers.

Layers are batched by leading dimensions: ``(*batch, features)``.
Activations and initialisers are ``jax.nn``'s, re-exported.
"""

from jax.nn import (
    celu,
    elu,
    gelu,
    glu,
    hard_tanh,
    initializers,
    leaky_relu,
    log_sigmoid,
    log_softmax,
    logsumexp,
    one_hot,
    relu,
    relu6,
    selu,
    sigmoid,
    silu,
    soft_sign,
    softmax,
    softplus,
    standardize,
    swish,
)
from jax.numpy import tanh

from toylib.nn.containers import MLP, Sequential, Stack
from toylib.nn.dropout import Dropout
from toylib.nn.linear import Linear
from toylib.nn.normalization import BatchNorm

__all__ = [
    "MLP",
    "BatchNorm",
    "Dropout",
    "Linear",
    "Sequential",
    "Stack",
    "celu",
    "elu",
    "gelu",
    "glu",
    "hard_tanh",
    "initializers",
    "leaky_relu",
    "log_sigmoid",
    "log_softmax",
    "logsumexp",
    "one_hot",
    "relu",
    "relu6",
    "selu",
    "sigmoid",
    "silu",
    "soft_sign",
    "softmax",
    "softplus",
    "standardize",
    "swish",
    "tanh",
]
