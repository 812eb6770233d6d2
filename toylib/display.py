"""tl.display: look at a model (Modules, Variables, States) with treescope.

Modules, Variables and States are drawn by toylib's treescope handlers
(``toylib/_treescope.py``) wherever treescope draws them: ``tl.display``,
``treescope.display``, ``treescope.render_to_text`` and the notebook
pretty-printer installed by ``treescope.basic_interactive_setup()``.
treescope itself is imported the first time something is drawn, not by
``import toylib``.

* A Module is shown like a constructor call of its attributes, data and
  static, with the size of its state by Variable type on the first line
  (``# Param: 16 (64 B)``); an element of a list or tuple also shows its
  index there (``# [2] Param: 16 (64 B)``).
* A Variable is one line, its type then its value's dtype and shape
  (``Param float32[3, 2]``); unfold it (HTML) to see the array itself,
  through treescope's array view, and its metadata.
* A Module or Variable reachable along several paths is drawn once, at the
  first path (depth first, attribute order: the order ``tl.split`` uses);
  later places show one line, ``Linear(...)  # shared with model.encoder``.
  A reference back to an enclosing object (a cycle) is treescope's
  ``<cyclic reference to ...>``; nothing recurses forever.
* ``tl.display`` lays the tree out the same way in text and in HTML: every
  Module unfolded, one attribute per line, everything else on one line when
  it fits the width (the terminal's; 120 characters for HTML).

Treescope's own "repeated python object" warning is turned off for these
types (``IMMUTABLE_TYPES_REGISTRY``, the registry treescope provides for
that): toylib marks sharing itself, with the path of the first place, and
sharing Modules is a feature of the graph view, not a mistake to flag. To
know the first place, each rendering keeps a record of what it drew: a
context builder added to treescope's default renderer opens it.
"""

from __future__ import annotations

import html
import importlib
import math
import os
import pathlib
import shutil
import sys
from typing import Any

import jax
import numpy as np

from toylib._core.graph import iter_variables
from toylib._core.variables import Variable

__all__ = ["display", "variable_sizes"]

ROOT = "model"  # how paths are written, as in toylib's error messages

PAGE = """\
<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<title>{title}</title>
</head>
<body>
{body}
</body>
</html>
"""


# -- sizes ---------------------------------------------------------------------------


def variable_sizes(node: Any) -> dict[type, tuple[int, int]]:
    """``{Variable type: (element count, bytes)}`` over the Variables reachable from ``node``.

    Each Variable is counted once however many paths reach it (a tied weight
    once). Only shapes and dtypes are read, so abstract values (from
    ``tl.eval_shape``) and tracers are counted like arrays. ``tl.summary``
    uses it too.

    Arguments:
        node: a Module, a Variable, or a list/tuple/dict of them.

    Returns:
        A dict with the types in the order they are first met.

    Example:
        >>> from toylib import nn
        >>> from toylib.display import variable_sizes
        >>> {t.__name__: n for t, n in variable_sizes(nn.Linear(3, 2, rngs=0)).items()}
        {'Param': (8, 32)}
    """
    sizes: dict[type, tuple[int, int]] = {}
    variables = [node] if isinstance(node, Variable) else (v for _, v in iter_variables(node))
    for variable in variables:
        count, nbytes = sizes.get(type(variable), (0, 0))
        more, more_bytes = value_size(variable._value)
        sizes[type(variable)] = (count + more, nbytes + more_bytes)
    return sizes


def value_size(value: Any) -> tuple[int, int]:
    """``(element count, bytes)`` of the arrays in ``value``, read from shapes and dtypes."""
    count = nbytes = 0
    for leaf in jax.tree.leaves(value):
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            leaf = np.asarray(leaf)  # a Python number held in a Variable
        size = math.prod(leaf.shape)
        count += size
        nbytes += size * leaf.dtype.itemsize
    return count, nbytes


def format_bytes(nbytes: float) -> str:
    """``48 B``, ``1.5 KB``, ``3.2 MB``: powers of 1000, as Flax and Keras print sizes."""
    if nbytes < 1000:
        return f"{nbytes:.0f} B"
    for unit in ("KB", "MB", "GB"):
        nbytes /= 1000
        if nbytes < 1000:
            return f"{nbytes:.1f} {unit}"
    return f"{nbytes / 1000:.1f} TB"


def format_sizes(sizes: dict[type, tuple[int, int]]) -> str:
    """``Param: 8 (32 B), BatchStat: 4 (16 B)``."""
    return ", ".join(
        f"{kind.__name__}: {count:,} ({format_bytes(nbytes)})"
        for kind, (count, nbytes) in sizes.items()
    )


# -- tl.display --------------------------------------------------------------------------


def _in_notebook() -> bool:
    """Whether an IPython *kernel* (Jupyter, Colab) runs this code, not a terminal shell."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def display(obj: Any, path: str | os.PathLike | None = None) -> pathlib.Path | None:
    """Show ``obj`` (a Module, Variable, State or any pytree) with treescope.

    In a notebook (an IPython kernel) it is treescope's interactive HTML
    view. ``path="model.html"`` writes a standalone HTML page instead and
    returns its path. Otherwise (a terminal, a script) it prints a text tree.
    Shared Modules and Variables are drawn once and marked at the later
    places with the path of the first one; cycles are shown, not followed.

    Arguments:
        obj: what to show.
        path: if given, the HTML file to write (parent folders must exist).

    Returns:
        The path written, as a ``pathlib.Path``, or None when shown.

    Example:
        >>> import toylib as tl
        >>> from toylib import nn
        >>> tl.display(nn.Linear(3, 2, use_bias=False, rngs=0))
        Linear(  # Param: 6 (24 B)
          kernel=Param float32[3, 2],
          bias=None,
          in_features=3,
          out_features=2,
          dtype=None,
          precision=None,
        )
    """
    treescope = _load_treescope()
    if path is not None:
        target = pathlib.Path(path)
        # Not compressed: the page then needs no browser decompression API and
        # its text can be searched (grep) without a browser.
        with treescope.active_expansion_strategy.set_scoped(_unfold_modules_html):
            body = treescope.render_to_html(obj, ignore_exceptions=True, compressed=False)
        title = html.escape(f"toylib: {type(obj).__name__}")
        target.write_text(PAGE.format(title=title, body=body), encoding="utf-8")
        return target
    if _in_notebook():
        with treescope.active_expansion_strategy.set_scoped(_unfold_modules_html):
            treescope.display(obj, ignore_exceptions=True)
        return None
    with treescope.active_expansion_strategy.set_scoped(_unfold_modules_text):
        print(treescope.render_to_text(obj, ignore_exceptions=True))
    return None


def _load_treescope() -> Any:
    """treescope, with toylib's handlers loaded before the first drawing starts.

    Loading them registers the renderer's per-drawing record, which then
    covers this drawing's root too (a dict of two models sharing a layer).
    """
    importlib.import_module("toylib._treescope")
    return importlib.import_module("treescope")


HTML_WIDTH = 120  # characters per line of the HTML view before a node is unfolded


def _unfold_modules_text(tree: Any) -> None:
    _unfold_modules(tree, shutil.get_terminal_size((100, 24)).columns)


def _unfold_modules_html(tree: Any) -> None:
    _unfold_modules(tree, HTML_WIDTH)


def _unfold_modules(tree: Any, width: int) -> None:
    """tl.display's layout: every Module unfolded, everything else on one line if it fits.

    Like PyTorch's ``print(model)``, one attribute per line for each Module,
    so the structure reads top to bottom. Variables stay one line each, and
    so do bare arrays (treescope's summary, ``<jax.Array float32(3, 4) ≈0.1
    ±1.0 ...>``, rather than their values), unless a line would be wider
    than ``width``. treescope's own default would fold a deep Module onto
    one line running off the page.
    """
    from treescope import layout_algorithms

    from toylib._treescope import MODULE_MARK

    layout_algorithms.expand_to_layout_marks(tree, [MODULE_MARK], collapse_weak_others=False)
    _prefer_folded(tree)
    layout_algorithms.expand_for_balanced_layout(tree, max_height=None, target_width=width)


def _prefer_folded(part: Any) -> None:
    from treescope import rendering_parts

    for foldable in part.foldables_in_this_part():
        if foldable.get_expand_state().is_weak():
            foldable.set_expand_state(rendering_parts.ExpandState.WEAKLY_COLLAPSED)
        _prefer_folded(foldable.as_expanded_part())
