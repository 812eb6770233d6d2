"""toylib: a small neural-network library for JAX.

Modules are ordinary mutable Python objects and JAX pytrees; state lives in
typed Variables; ``split``/``merge``/``state``/``update``/``pop`` give a
functional view that keeps shared references. See docs/design.md and README.md.

``tl.Optimizer``/``tl.OptState`` (optax) and ``tl.save``/``tl.load`` (orbax)
are loaded on first use, and treescope and rich are imported by the calls
that draw with them (``tl.display``, ``tl.summary``), so ``import toylib``
imports none of the four (benchmarks/import_time.py times it).
"""

import importlib as _importlib
from typing import TYPE_CHECKING as _TYPE_CHECKING

from toylib import errors, metrics, nn, nx, sharding
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
from toylib.display import display
from toylib.errors import RuntimeCheckError, branched_error_if, checkify, error_if
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

__version__: str  # read on first use by __getattr__ (an annotation binds no name)

# Public names whose modules import a heavy dependency (optax: 0.1 s, orbax:
# more): `tl.Optimizer` imports toylib.optim the first time it is read.
_LAZY = {
    "Optimizer": "toylib.optim",
    "OptState": "toylib.optim",
    "load": "toylib.checkpoint",
    "load_bytes": "toylib.checkpoint",
    "save": "toylib.checkpoint",
    "save_bytes": "toylib.checkpoint",
}

if _TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from toylib.checkpoint import load, load_bytes, save, save_bytes
    from toylib.optim import Optimizer, OptState


def __getattr__(name: str) -> object:
    if name in _LAZY:
        value = getattr(_importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later reads are plain attribute reads
        return value
    if name == "__version__":
        # pyproject.toml is the one place the version is written; it is read
        # from the installed metadata on first use (the lookup scans sys.path,
        # ~10 ms), so `import toylib` does not pay for it.
        from importlib.metadata import version

        value = globals()[name] = version("toylib")
        return value
    raise AttributeError(f"module 'toylib' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | {"__version__"})


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
    "sharding",
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
    "load_bytes",
    "merge",
    "metrics",
    "nn",
    "nx",
    "pop",
    "remat",
    "save",
    "save_bytes",
    "scan",
    "split",
    "state",
    "summary",
    "switch",
    "update",
    "value_and_grad",
    "vmap",
]
