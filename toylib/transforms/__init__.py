"""toylib's transforms: jax transforms that take Modules and carry state changes out."""

from toylib.transforms.autodiff import grad, value_and_grad
from toylib.transforms.batching import Carry, StateAxes, scan, vmap
from toylib.transforms.control import cond, eval_shape, fori_loop, remat, switch, while_loop
from toylib.transforms.custom import custom_vjp, jvp, vjp
from toylib.transforms.jit import jit

__all__ = [
    "custom_vjp",
    "jvp",
    "vjp",
    "while_loop",
    "Carry",
    "StateAxes",
    "cond",
    "eval_shape",
    "fori_loop",
    "grad",
    "jit",
    "remat",
    "scan",
    "switch",
    "value_and_grad",
    "vmap",
]
