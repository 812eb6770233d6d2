"""tl.display: look at a model (Modules, Variables, States) with treescope.

Importing toylib registers treescope handlers for ``Module``, ``Variable``
and ``State``, so every treescope entry point shows them the same way:
``tl.display``, ``treescope.display``, ``treescope.render_to_text`` and the
notebook pretty-printer installed by ``treescope.basic_interactive_setup()``.

* A Module is shown like a constructor call of its attributes, data and
  static, with the size of its state by Variable type on the first line
  (``# Param: 16 (64 B)``).
* A Variable is one line, its type then its value's dtype and shape
  (``Param float32[3, 2]``); unfold it (HTML) to see the array itself,
  through treescope's array view, and its metadata.
* A Module or Variable reachable along several paths is drawn once, at the
  first path (depth first, attribute order: the order ``tl.split`` uses);
  later places show one line, ``Linear(...)  # shared with model.encoder``.
  A reference back to an enclosing object (a cycle) is treescope's
  ``<cyclic reference to ...>``; nothing recurses forever.

Treescope's own "repeated python object" warning is turned off for these
types (``IMMUTABLE_TYPES_REGISTRY``, the registry treescope provides for
that): toylib marks sharing itself, with the path of the first place, and
sharing Modules is a feature of the graph view, not a mistake to flag. To
know the first place, each rendering keeps a record of what it drew: a
context builder added to treescope's default renderer opens it.
"""

from __future__ import annotations

import dataclasses
import html
import math
import os
import pathlib
import shutil
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import treescope
from treescope import (
    context,
    formatting_util,
    layout_algorithms,
    rendering_parts,
    repr_lib,
    type_registries,
)

from toylib._core.containers import untracked
from toylib._core.graph import iter_variables
from toylib._core.module import Module
from toylib._core.state import State
from toylib._core.variables import Variable, describe_value

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


# -- shared references -----------------------------------------------------------------


@dataclasses.dataclass
class _Seen:
    """Objects drawn so far in one rendering: ``id -> (path text, object)``.

    The objects are kept so that an id cannot be reused by a temporary
    object while the rendering runs.
    """

    first: dict[int, tuple[str | None, Any]] = dataclasses.field(default_factory=dict)


_seen: context.ContextualValue[_Seen | None] = context.ContextualValue(
    module=__name__, qualname="_seen", initial_value=None
)


def _where(path: str | None) -> str | None:
    return None if path is None else ROOT + path


def _once(node: Any, path: str | None, draw: Callable[[], Any]) -> Any:
    """Draw ``node`` the first time it is met in this rendering, a reference afterwards.

    Cycles never get here: treescope stops at an object that contains itself
    (``<cyclic reference to ...>``) before calling any handler.
    """
    seen = _seen.get()
    if seen is None:
        # A renderer without `_fresh_record` (a user's own): the outermost
        # toylib object opens the record for everything inside it.
        with _seen.set_scoped(_Seen()):
            return _once(node, path, draw)
    first = seen.first.get(id(node))
    if first is not None:
        return _reference(node, first[0])
    seen.first[id(node)] = (_where(path), node)
    return draw()


def _variable_text(variable: Variable) -> str:
    """``float32[3, 2]`` then the metadata: ``float32[3, 2] sharding=('embed', 'mlp')``."""
    metadata = "".join(f" {k}={v!r}" for k, v in variable._metadata.items())
    return describe_value(variable._value) + metadata


def _reference(node: Any, where: str | None) -> Any:
    name = type(node).__name__
    if isinstance(node, Variable):
        short = f"{name} {_variable_text(node)}"
    else:
        short = f"{name}(...)"
    note = f"shared with {where or 'an earlier ' + name}"
    # A comment at the end of the line when the parent is unfolded; inline
    # when the parent is folded onto one line, where line comments are dropped.
    return rendering_parts.RenderableAndLineAnnotations(
        renderable=rendering_parts.siblings(
            short,
            rendering_parts.fold_condition(
                collapsed=rendering_parts.comment_color(rendering_parts.text(f" <{note}>"))
            ),
        ),
        annotations=rendering_parts.comment_color(rendering_parts.text(f"  # {note}")),
    )


# -- treescope handlers ----------------------------------------------------------------


_MODULE_MARK = "toylib.Module"


def _render_module(node: Any, path: str | None, subtree_renderer: Any) -> Any:
    if not isinstance(node, Module):
        return NotImplemented

    def draw() -> Any:
        children = []
        attributes = list(vars(node).items())
        for i, (name, value) in enumerate(attributes):
            child_path = None if path is None else f"{path}.{name}"
            children.append(
                rendering_parts.build_full_line_with_annotations(
                    rendering_parts.siblings_with_annotations(
                        f"{name}=", subtree_renderer(untracked(value), path=child_path)
                    ),
                    _comma(last=i == len(attributes) - 1),
                )
            )
        sizes = variable_sizes(node)
        note = format_sizes(sizes)
        return rendering_parts.build_foldable_tree_node_from_children(
            # The mark lets tl.display's text view unfold every Module.
            prefix=rendering_parts.with_layout_mark(
                rendering_parts.siblings(
                    rendering_parts.maybe_qualified_type_name(type(node)), "("
                ),
                _MODULE_MARK,
            ),
            children=children,
            suffix=")",
            path=path,
            background_color=formatting_util.color_from_string(type(node).__qualname__),
            first_line_annotation=(
                rendering_parts.comment_color(rendering_parts.text(f"  # {note}")) if note else None
            ),
        )

    return _once(node, path, draw)


def _comma(last: bool) -> Any:
    # Between attributes always a comma (a space after it when folded on one
    # line); after the last one only when unfolded.
    if last:
        return rendering_parts.fold_condition(expanded=rendering_parts.text(","))
    return rendering_parts.siblings(
        ",", rendering_parts.fold_condition(collapsed=rendering_parts.text(" "))
    )


def _render_variable(node: Any, path: str | None, subtree_renderer: Any) -> Any:
    if not isinstance(node, Variable):
        return NotImplemented

    def draw() -> Any:
        label = rendering_parts.siblings(
            rendering_parts.maybe_qualified_type_name(type(node)),
            " ",
            rendering_parts.abbreviation_color(rendering_parts.text(_variable_text(node))),
        )
        value_path = None if path is None else f"{path}.value"
        value = rendering_parts.build_full_line_with_annotations(
            rendering_parts.siblings_with_annotations(
                "value=", subtree_renderer(node._value, path=value_path)
            )
        )
        # Folded by default, so the text view is one line per Variable;
        # unfold it in the HTML view to see the array.
        return rendering_parts.build_custom_foldable_tree_node(
            label=label,
            contents=rendering_parts.fold_condition(
                expanded=rendering_parts.indented_children([value])
            ),
            path=path,
            expand_state=rendering_parts.ExpandState.COLLAPSED,
        )

    return _once(node, path, draw)


def _render_state(node: Any, path: str | None, subtree_renderer: Any) -> Any:
    if not isinstance(node, State):
        return NotImplemented
    return repr_lib.render_dictionary_wrapper(State, dict(node.items()), path, subtree_renderer)


type_registries.TREESCOPE_HANDLER_REGISTRY[Module] = _render_module
type_registries.TREESCOPE_HANDLER_REGISTRY[Variable] = _render_variable
type_registries.TREESCOPE_HANDLER_REGISTRY[State] = _render_state
type_registries.IMMUTABLE_TYPES_REGISTRY[Module] = True
type_registries.IMMUTABLE_TYPES_REGISTRY[Variable] = True


def _fresh_record() -> Any:
    return _seen.set_scoped(_Seen())


# One record of drawn objects per rendering, whatever the root (a dict of two
# models sharing a layer too). A renderer set up without this builder still
# works: the outermost toylib object then opens the record (see `_once`).
treescope.active_renderer.set_globally(
    treescope.active_renderer.get().extended_with(context_builders=[_fresh_record])
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
        )
    """
    if path is not None:
        target = pathlib.Path(path)
        # Not compressed: the page then needs no browser decompression API and
        # its text can be searched (grep) without a browser.
        body = treescope.render_to_html(obj, ignore_exceptions=True, compressed=False)
        title = html.escape(f"toylib: {type(obj).__name__}")
        target.write_text(PAGE.format(title=title, body=body), encoding="utf-8")
        return target
    if _in_notebook():
        treescope.display(obj, ignore_exceptions=True)
        return None
    with treescope.active_expansion_strategy.set_scoped(_unfold_modules):
        print(treescope.render_to_text(obj, ignore_exceptions=True))
    return None


def _unfold_modules(tree: Any) -> None:
    """The text view's layout: every Module unfolded, everything else on one line if it fits.

    Like PyTorch's ``print(model)``, one attribute per line for each Module,
    so the structure reads top to bottom. Variables stay one line each, and
    so do bare arrays (treescope's summary, ``<jax.Array float32(3, 4) ≈0.1
    ±1.0 ...>``, rather than their values), unless a line would be wider
    than the terminal.
    """
    layout_algorithms.expand_to_layout_marks(tree, [_MODULE_MARK], collapse_weak_others=False)
    _prefer_folded(tree)
    width = shutil.get_terminal_size((100, 24)).columns
    layout_algorithms.expand_for_balanced_layout(tree, max_height=None, target_width=width)


def _prefer_folded(part: Any) -> None:
    for foldable in part.foldables_in_this_part():
        if foldable.get_expand_state().is_weak():
            foldable.set_expand_state(rendering_parts.ExpandState.WEAKLY_COLLAPSED)
        _prefer_folded(foldable.as_expanded_part())
