"""toylib.nn: layers, activations and initialisers.

Layers are batched by leading dimensions: ``(*batch, features)``.
Activations and initialisers are ``jax.nn``'s, re-exported (and documented
by JAX); the example calls each of them.

Example:
    >>> import jax.numpy as jnp
    >>> from toylib import nn
    >>> mlp = nn.MLP([3, 8, 2], activation=nn.gelu, rngs=0)
    >>> mlp(jnp.ones((5, 3))).shape
    (5, 2)
    >>> x = jnp.linspace(-2.0, 2.0, 4)
    >>> elementwise = [nn.celu, nn.elu, nn.gelu, nn.hard_tanh, nn.leaky_relu, nn.log_sigmoid,
    ...                nn.relu, nn.relu6, nn.selu, nn.sigmoid, nn.silu, nn.soft_sign,
    ...                nn.softplus, nn.swish, nn.tanh, nn.softmax, nn.log_softmax, nn.standardize]
    >>> all(f(x).shape == x.shape for f in elementwise)
    True
    >>> nn.glu(jnp.ones(4)).shape, nn.logsumexp(x).shape  # glu halves the last axis
    ((2,), ())
    >>> nn.one_hot(jnp.array([0, 2]), 3).tolist()
    [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    >>> nn.Linear(2, 3, kernel_init=nn.initializers.orthogonal(), rngs=0).kernel.shape
    (2, 3)
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

from toylib.nn.activations import PReLU
from toylib.nn.attention import (
    MultiHeadAttention,
    dot_product_attention,
    dot_product_attention_weights,
    make_attention_mask,
    make_causal_mask,
)
from toylib.nn.containers import MLP, Sequential, Stack
from toylib.nn.conv import Conv, ConvTranspose
from toylib.nn.decoding import init_cache, set_decode
from toylib.nn.dropout import Dropout
from toylib.nn.einsum import Einsum, LinearGeneral, MergeHeads, ProjectHeads
from toylib.nn.ema import EMA
from toylib.nn.linear import Embed, Identity, Linear
from toylib.nn.lora import LoRA, LoRALinear, LoRAParam
from toylib.nn.named import NamedLinear, NamedMultiHeadAttention
from toylib.nn.normalization import BatchNorm, GroupNorm, InstanceNorm, LayerNorm, RMSNorm
from toylib.nn.pooling import AvgPool, MaxPool, avg_pool, max_pool
from toylib.nn.recurrent import RNN, GRUCell, LSTMCell, SimpleCell
from toylib.nn.weight_norms import SpectralNorm, WeightNorm

__all__ = [
    "EMA",
    "SpectralNorm",
    "WeightNorm",
    "InstanceNorm",
    "PReLU",
    "SimpleCell",
    "Einsum",
    "LinearGeneral",
    "LoRA",
    "LoRALinear",
    "LoRAParam",
    "MergeHeads",
    "ProjectHeads",
    "MLP",
    "RNN",
    "AvgPool",
    "BatchNorm",
    "Conv",
    "ConvTranspose",
    "Dropout",
    "Embed",
    "GRUCell",
    "GroupNorm",
    "Identity",
    "LSTMCell",
    "LayerNorm",
    "Linear",
    "MaxPool",
    "MultiHeadAttention",
    "NamedLinear",
    "NamedMultiHeadAttention",
    "RMSNorm",
    "Sequential",
    "Stack",
    "avg_pool",
    "celu",
    "dot_product_attention",
    "dot_product_attention_weights",
    "elu",
    "gelu",
    "glu",
    "hard_tanh",
    "init_cache",
    "initializers",
    "leaky_relu",
    "log_sigmoid",
    "log_softmax",
    "logsumexp",
    "make_attention_mask",
    "make_causal_mask",
    "max_pool",
    "one_hot",
    "relu",
    "relu6",
    "selu",
    "set_decode",
    "sigmoid",
    "silu",
    "soft_sign",
    "softmax",
    "softplus",
    "standardize",
    "swish",
    "tanh",
]
