"""tl.summary: a table of the Modules a call runs through, with sizes and FLOPs.

``tl.summary(model, x)`` calls ``model(x)`` *abstractly*, under
``tl.eval_shape``: nothing is computed or allocated and the model's state
(BatchNorm statistics, Dropout key counters, caches) is not changed. For the
duration of that call every Module call goes through a recorder
(``toylib._core.module.intercept_calls``; removed afterwards, also when the
call raises), which records, for every call:

* ``path``: where the Module sits, ``model.layers[0]`` (``model`` is the
  model itself; a block scanned by ``nn.Stack`` is ``model.blocks[*]``),
* ``type`` and the abstract ``inputs`` / ``outputs`` (``jax.ShapeDtypeStruct``),
* ``sizes``: element count and bytes of its Variables by type (``Param``,
  ``BatchStat``...), everything reachable from the Module, each once,
* ``flops``: XLA's count for that Module's call on those inputs, from
  ``jax.jit(call).lower(...).compile().cost_analysis()``, with loops
  counted in full (below).

The rows are in call order (a parent before its children). A Module called
twice has two rows. Random streams (``Rngs``, ``RngStream``) are not rows.
Inside ``tl.vmap``/``tl.scan`` a row is what the Module sees: one example,
one step (per-example shapes and FLOPs; ``nn.Stack`` shows one block).
The total row counts every Variable of the model once (a tied weight once,
the stacked blocks of ``nn.Stack`` in full); its FLOPs are the whole call's.

FLOPs are XLA's static estimate, which counts the body of a loop once.
toylib adds the other iterations of every ``scan`` (whose length is
static): a Module whose call runs one (``nn.Stack``: all ``n`` blocks;
``nn.RNN``: every time step; ``tl.scan``, ``tl.fori_loop`` with static
bounds) shows the FLOPs of the whole loop, and so does the total, while the
rows inside it show one step. A ``while_loop`` (``fori_loop`` with traced
bounds) has no static trip count: it counts one iteration, and the table's
caption says so.

Printed to something that is not a terminal (a pipe, a log file), the table
is as wide as it needs to be rather than rich's 80 columns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from toylib._core.calls import call_path, intercept_calls
from toylib._core.graph import merge, split
from toylib._core.module import Module
from toylib._core.rngs import Rngs, RngStream
from toylib._core.variables import Param, Variable, describe_value
from toylib.display import format_bytes, variable_sizes
from toylib.transforms import eval_shape

if TYPE_CHECKING:  # rich is imported when a table is built, not by `import toylib`
    from rich.console import Console
    from rich.table import Table

__all__ = ["Row", "Summary", "summary"]

NOT_A_MODEL = """\
tl.summary: expected a Module with a __call__ method as the first argument, got {what}.
Fix: pass the model, then the inputs it is called with:

    tl.summary(model, x)                        # or jax.ShapeDtypeStruct((8, 784), jnp.float32)
"""


OUTER_AXIS = (
    "FLOPs n/a: the call uses a named axis bound outside it (e.g. BatchNorm's "
    "axis_name under tl.vmap), so it is counted only in the rows that contain it."
)
WHILE_COUNTED_ONCE = (
    "FLOPs of a while_loop (a fori_loop with traced bounds) count one iteration: "
    "its trip count is not known before it runs."
)


@dataclasses.dataclass(frozen=True)
class Row:
    """One Module call, or the total.

    Attributes:
        path: ``model.layers[0]``; ``"Total"`` for the total row.
        type: the Module's class (None for the total row).
        inputs: ``(args, kwargs)`` with ``jax.ShapeDtypeStruct`` for arrays.
        outputs: the output, with ``jax.ShapeDtypeStruct`` for arrays.
        sizes: ``{Variable type: (element count, bytes)}``.
        flops: XLA's FLOP count of the call; None when not computed
            (``compute_flops=False``) or when the call cannot be compiled on
            its own (it uses a named axis bound outside it, see ``_flops``).
    """

    path: str
    type: type | None
    inputs: Any
    outputs: Any
    sizes: dict[type, tuple[int, int]]
    flops: float | None


@dataclasses.dataclass(frozen=True)
class Summary:
    """What ``tl.summary`` returns: the rows, the total and the rich Table.

    Printing it (``rich.print(s)``, a notebook cell) shows the table.
    """

    rows: list[Row]
    total: Row
    table: Table

    def __rich__(self) -> Table:
        return self.table

    def __repr__(self) -> str:
        sizes = ", ".join(f"{t.__name__} {n:,}" for t, (n, _) in self.total.sizes.items())
        flops = "" if self.total.flops is None else f", {self.total.flops:,.0f} FLOPs"
        rows = f"{len(self.rows)} row{'' if len(self.rows) == 1 else 's'}"
        return f"Summary({rows}; {sizes or 'no state'}{flops})"


# -- recording Module calls ---------------------------------------------------------


@dataclasses.dataclass
class _Call:
    """A Module call seen while the model runs abstractly (filled in as it returns)."""

    path: str
    type: type
    sizes: dict[type, tuple[int, int]]
    graphdef: Any  # the Module's structure and abstract state at the call, to lower it
    state: Any
    inputs: Any
    outputs: Any = None


def _abstract(x: Any) -> Any:
    """An array, tracer or ShapeDtypeStruct as a ShapeDtypeStruct; anything else as is."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array | np.ndarray):
        aval = jax.typeof(x)
        return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type)
    return x


def _abstract_tree(tree: Any) -> Any:
    return jax.tree.map(_abstract, tree)


def _recorder(calls: list[_Call]) -> Callable:
    """An ``intercept_calls`` wrapper appending every Module call to ``calls``."""
    running: list[Any] = []  # the Modules whose recorded call is in progress

    def record(original: Callable, self: Any, args: tuple, kwargs: dict) -> Any:
        # `super().__call__(...)` from an overriding __call__ is the same call.
        if (running and running[-1] is self) or isinstance(self, Rngs | RngStream):
            return original(self, *args, **kwargs)
        graphdef, state = split(self)
        call = _Call(
            path=call_path(self),
            type=type(self),
            sizes=variable_sizes(self),
            graphdef=graphdef,
            state=_abstract_tree(state),
            inputs=_abstract_tree((args, kwargs)),
        )
        calls.append(call)
        running.append(self)
        try:
            out = original(self, *args, **kwargs)
        finally:
            running.pop()
        call.outputs = _abstract_tree(out)
        return out

    return record


def _concrete_inputs(tree: Any) -> Any:
    """ShapeDtypeStruct inputs as arrays: zeros made inside the abstract trace are
    staged out, never allocated. Modules and Variables among the inputs are kept
    as they are (mapping over them would rebuild them, losing shared references)."""

    def make(x: Any) -> Any:
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.numpy.zeros(x.shape, x.dtype)
        return x

    return jax.tree.map(make, tree, is_leaf=lambda x: isinstance(x, Module | Variable))


# -- FLOPs ------------------------------------------------------------------------------


def _flops(call: _Call, cache: dict, notes: set[str]) -> float | None:
    """XLA's FLOP count for this Module call on its abstract state and inputs.

    None for a call that cannot be compiled on its own because it uses a
    named axis bound outside it (BatchNorm's ``axis_name`` under ``tl.vmap``);
    the rows around it include its FLOPs. Calls of the same structure on the
    same shapes (a layer called twice, identical blocks in a Python loop)
    are compiled once: ``cache`` maps them to their count.
    """
    leaves, treedef = jax.tree.flatten(call.inputs)
    state_leaves, state_def = jax.tree.flatten(call.state)
    key = (call.graphdef, state_def, tuple(state_leaves), treedef, tuple(leaves))
    try:
        if key in cache:
            return cache[key]
    except TypeError:  # an unhashable static input: compile without caching
        key = None
    dynamic = [i for i, leaf in enumerate(leaves) if isinstance(leaf, jax.ShapeDtypeStruct)]

    def run(state: Any, values: list) -> Any:
        full = list(leaves)
        for i, value in zip(dynamic, values, strict=True):
            full[i] = value
        args, kwargs = jax.tree.unflatten(treedef, full)
        return merge(call.graphdef, state)(*args, **kwargs)

    try:
        traced = jax.jit(run).trace(call.state, [leaves[i] for i in dynamic])
    except NameError as error:  # jax's error for an unbound axis name
        if "axis name" not in str(error):
            raise
        flops = None
    else:
        flops = _xla_flops(traced.lower()) + _loop_flops(traced.jaxpr, {}, notes)
    if key is not None:
        cache[key] = flops
    return flops


def _xla_flops(lowered: Any) -> float:
    cost = lowered.compile().cost_analysis()
    if isinstance(cost, list | tuple):  # older jax: one dict per computation
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def _scan_copies_counted(length: int, unroll: int) -> int:
    """How many copies of a scan's body XLA's count includes.

    jax lowers ``scan(length, unroll=u)`` to a loop whose body holds ``u``
    copies, run ``length // u`` times, plus ``length % u`` copies after it
    (fully unrolled, no loop, when ``u >= length``); XLA counts a loop's body
    once. tests/test_summary.py checks this against unrolled scans.
    """
    if unroll >= length:
        return length
    return unroll + length % unroll


def _loop_flops(jaxpr: Any, memo: dict, notes: set[str]) -> float:
    """The FLOPs XLA's count leaves out: the other iterations of every ``scan``.

    XLA's static estimate counts the body of a loop once, so ``nn.Stack``'s
    ``n`` blocks or ``nn.RNN``'s time steps would count as one. A scan's
    length is static: its body's FLOPs (compiled on their own, with the
    scans nested in it counted in full) are added for the iterations not
    counted. A ``while_loop`` (``fori_loop`` with traced bounds) has no
    static trip count and stays counted once, as do scans inside it or
    inside a ``cond`` branch, whose count XLA decides.
    """
    from jax.extend.core import jaxpr_as_fun, jaxprs_in_params

    extra = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "scan":
            body = eqn.params["jaxpr"]
            if id(body) not in memo:
                invars = body.jaxpr.invars
                avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in invars]
                lowered = jax.jit(jaxpr_as_fun(body)).lower(*avals)
                nested = _loop_flops(body.jaxpr, memo, notes)
                memo[id(body)] = (_xla_flops(lowered), nested, body)
            counted, nested, _ = memo[id(body)]
            length, unroll = eqn.params["length"], int(eqn.params["unroll"])
            copies = _scan_copies_counted(length, unroll)
            extra += length * (counted + nested) - copies * counted
        elif name == "while":
            notes.add(WHILE_COUNTED_ONCE)
        elif name != "cond":
            for sub in jaxprs_in_params(eqn.params):
                extra += _loop_flops(sub, memo, notes)
    return extra


# -- the table --------------------------------------------------------------------------


def _shapes(tree: Any) -> str:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return "" if tree is None else repr(tree)
    return "\n".join(describe_value(leaf) for leaf in leaves)


def _size_cell(sizes: dict[type, tuple[int, int]], kind: type) -> str:
    if kind not in sizes:
        return ""
    count, nbytes = sizes[kind]
    return f"{count:,} ({format_bytes(nbytes)})"


def _table(title: str, rows: list[Row], total: Row, with_flops: bool, notes: set[str]) -> Table:
    from rich.table import Table

    kinds: dict[type, None] = {}  # ordered set: Param first, then as they appear
    for row in [total, *rows]:
        kinds.update(dict.fromkeys(sorted(row.sizes, key=lambda t: t is not Param)))
    table = Table(title=title)
    if with_flops and any(row.flops is None for row in rows):
        notes = notes | {OUTER_AXIS}
    if with_flops and notes:
        table.caption = "\n".join(sorted(notes))
    # Folded, not cut with an ellipsis, when the console is narrow: a path
    # or a number is no use half shown.
    table.add_column("path", overflow="fold")
    table.add_column("type", overflow="fold")
    table.add_column("output", overflow="fold")
    for kind in kinds:
        table.add_column(kind.__name__, justify="right", overflow="fold")
    if with_flops:
        table.add_column("FLOPs", justify="right", overflow="fold")

    def cells(row: Row) -> list[str]:
        line = [_size_cell(row.sizes, kind) for kind in kinds]
        if with_flops:
            line.append("n/a" if row.flops is None else f"{row.flops:,.0f}")
        return line

    for row in rows:
        name = "" if row.type is None else row.type.__name__  # (None: the total row only)
        table.add_row(row.path, name, _shapes(row.outputs), *cells(row))
    table.add_section()
    table.add_row(total.path, "", "", *cells(total), style="bold")
    return table


# -- tl.summary ----------------------------------------------------------------------------


def summary(
    model: Module,
    *inputs: Any,
    compute_flops: bool = True,
    console: Console | None = None,
    **kwargs: Any,
) -> Summary:
    """Print a table of the Modules ``model(*inputs, **kwargs)`` calls; return its rows.

    Columns: path, type, output shape(s), element count and bytes per
    Variable type (one column per type present), and FLOPs as XLA counts
    them. The model runs abstractly and is left unchanged; see the module
    docstring for what each row means.

    Arguments:
        model: the Module to call.
        *inputs: its positional inputs: arrays or ``jax.ShapeDtypeStruct``
            (nothing is computed either way), or any static value.
        compute_flops: lower and compile each call to count its FLOPs
            (default True; compiling takes time on big models).
        console: the ``rich.console.Console`` to print to (default: a new
            one for the terminal or notebook; when stdout is not a terminal,
            one as wide as the table, so a log file gets it unfolded; pass
            ``Console(quiet=True)`` to print nothing).
        **kwargs: keyword inputs of the model.

    Returns:
        A ``Summary``: ``.rows`` (a ``Row`` per call), ``.total`` and ``.table``.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> from rich.console import Console
        >>> from toylib import nn
        >>> s = tl.summary(nn.MLP([3, 4, 2], rngs=0), jnp.ones((5, 3)), console=Console(quiet=True))
        >>> [(row.path, row.outputs.shape, row.sizes[tl.Param][0]) for row in s.rows]
        [('model', (5, 2), 26), ('model.layers[0]', (5, 4), 16), ('model.layers[1]', (5, 2), 10)]
        >>> s.rows[1].flops   # 2*5*3*4 for the product, 5*4 for the bias
        140.0
    """
    if not isinstance(model, Module) or not callable(model):
        what = f"a {type(model).__name__}"
        if isinstance(model, Module):
            what += " without __call__"
        raise TypeError(NOT_A_MODEL.format(what=what))
    calls: list[_Call] = []
    cache: dict = {}
    notes: set[str] = set()  # captions about the FLOPs, collected while counting

    def run(model: Module, inputs: tuple, kwargs: dict) -> Any:
        inputs, kwargs = _concrete_inputs((inputs, kwargs))
        return model(*inputs, **kwargs)

    with intercept_calls(_recorder(calls)):
        eval_shape(run, model, inputs, kwargs)

    rows = [
        Row(
            path=call.path,
            type=call.type,
            inputs=call.inputs,
            outputs=call.outputs,
            sizes=call.sizes,
            flops=_flops(call, cache, notes) if compute_flops else None,
        )
        for call in calls
    ]
    total = Row(
        path="Total",
        type=None,
        inputs=rows[0].inputs if rows else None,
        outputs=rows[0].outputs if rows else None,
        sizes=variable_sizes(model),
        flops=rows[0].flops if rows else None,
    )
    table = _table(f"{type(model).__name__} summary", rows, total, compute_flops, notes)
    (console if console is not None else _default_console(table)).print(table)
    return Summary(rows=rows, total=total, table=table)


def _default_console(table: Table) -> Console:
    """A console for the terminal or notebook; elsewhere (a pipe, a log file) as wide as the table.

    rich folds its output to 80 columns when stdout is not a terminal, so a
    summary redirected to a file would wrap every path and shape; there is
    no screen edge to fit there, so the table gets its natural width.
    """
    from rich.console import Console

    console = Console()
    if console.is_terminal or console.is_jupyter:
        return console
    natural = Console(width=1_000_000).measure(table).maximum
    return Console(width=max(natural, console.width))
