"""toylib: a small neural-network library for JAX.

Modules are ordinary mutable Python objects and JAX pytrees; state lives in
typed Variables; ``split``/``merge``/``state``/``update``/``pop`` give a
functional view that keeps shared references. See DESIGN.md and README.md.
"""

from toylib import nn
from toylib._core import filters
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
from toylib._core.rngs import Rngs, RngStream
from toylib._core.state import State
from toylib._core.variables import (
    BatchStat,
    Cache,
    Intermediate,
    Param,
    RngState,
    Variable,
)

__version__ = "0.1.0"

__all__ = [
    "All",
    "Any",
    "BatchStat",
    "Cache",
    "GraphDef",
    "Intermediate",
    "Module",
    "Not",
    "Param",
    "PathContains",
    "RngState",
    "RngStream",
    "Rngs",
    "State",
    "Variable",
    "clone",
    "filters",
    "iter_modules",
    "iter_variables",
    "merge",
    "nn",
    "pop",
    "split",
    "state",
    "update",
]
