"""toylib: a small neural-network library for JAX.

Modules are ordinary mutable Python objects and JAX pytrees; state lives in
typed Variables; ``split``/``merge``/``state``/``update``/``pop`` give a
functional view that keeps shared references. See DESIGN.md and README.md.
"""

from toylib import errors, metrics, nn
from toylib._core import filters
from toylib._core.calls import call_path, forward_hook
from toylib._core.filters import All, Any, Not, PathContains
from toylib._core.graph import (
    GraphDef,
    clone,
    iter_modules,
    iter_variables,
    merge,
    pop,
    split,
    state,
    update,
)
from toylib._core.module import Module
from toylib._core.rngs import Rngs, RngStream, split_rngs
from toylib._core.state import State
from toylib._core.variables import (
    BatchStat,
    Cache,
    Intermediate,
    Param,
    RngState,
    Variable,
)
from toylib.checkpoint import load, save
from toylib.display import display
from toylib.errors import RuntimeCheckError, branched_error_if, checkify, error_if
from toylib.optim import Optimizer, OptState
from toylib.summary import summary
from toylib.transforms import (
    Carry,
    StateAxes,
    cond,
    custom_vjp,
    eval_shape,
    fori_loop,
    grad,
    jit,
    jvp,
    remat,
    scan,
    switch,
    value_and_grad,
    vjp,
    vmap,
    while_loop,
)
from toylib.tree import combine, filter, is_array, partition, tree_at, tree_equal

__version__ = "0.1.0"

__all__ = [
    "call_path",
    "forward_hook",
    "split_rngs",
    "custom_vjp",
    "jvp",
    "vjp",
    "while_loop",
    "RuntimeCheckError",
    "branched_error_if",
    "checkify",
    "error_if",
    "errors",
    "combine",
    "filter",
    "is_array",
    "partition",
    "tree_at",
    "tree_equal",
    "All",
    "Any",
    "BatchStat",
    "Cache",
    "Carry",
    "GraphDef",
    "Intermediate",
    "Module",
    "Not",
    "OptState",
    "Optimizer",
    "Param",
    "PathContains",
    "RngState",
    "RngStream",
    "Rngs",
    "State",
    "StateAxes",
    "Variable",
    "clone",
    "cond",
    "display",
    "eval_shape",
    "filters",
    "fori_loop",
    "grad",
    "iter_modules",
    "iter_variables",
    "jit",
    "load",
    "merge",
    "metrics",
    "nn",
    "pop",
    "remat",
    "save",
    "scan",
    "split",
    "state",
    "summary",
    "switch",
    "update",
    "value_and_grad",
    "vmap",
]
