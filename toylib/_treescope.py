"""toylib's treescope handlers: how Modules, Variables and States are drawn.

``Module``, ``Variable`` and ``State`` implement treescope's
``__treescope_repr__`` protocol by calling into this module, which is
imported (and treescope with it) the first time one of them is drawn. So
``import toylib`` does not pay for treescope, and every treescope entry
point shows toylib's objects the same way: ``tl.display``,
``treescope.display``, ``treescope.render_to_text`` and the notebook
pretty-printer installed by ``treescope.basic_interactive_setup()``.
See ``toylib/display.py`` for what a drawing shows.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
import treescope
from treescope import (
    context,
    formatting_util,
    ndarray_adapters,
    rendering_parts,
    repr_lib,
    type_registries,
)

from toylib._core.containers import untracked
from toylib._core.module import Module
from toylib._core.state import State
from toylib._core.variables import Variable, describe_value
from toylib.display import ROOT, format_sizes, variable_sizes
from toylib.nx import NamedArray, nmap

__all__ = [
    "MODULE_MARK",
    "NamedArrayAdapter",
    "render_module",
    "render_named_array",
    "render_state",
    "render_variable",
]

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
    metadata = "".join(f" {k}={_metadata_text(v)}" for k, v in variable._metadata.items())
    return describe_value(variable._value) + metadata


def _metadata_text(value: Any) -> str:
    """A metadata value; a placement (a NamedSharding) as its spec and mesh shape."""
    if isinstance(value, jax.sharding.NamedSharding):
        axes = ", ".join(f"{name}={size}" for name, size in value.mesh.shape.items())
        return f"{value.spec} on mesh({axes})"
    return repr(value)


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


MODULE_MARK = "toylib.Module"


def render_module(node: Any, path: str | None, subtree_renderer: Any) -> Any:
    """A Module like a constructor call of its attributes; ``Module.__treescope_repr__``."""

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
        note = " ".join(filter(None, [_index(path), format_sizes(variable_sizes(node))]))
        return rendering_parts.build_foldable_tree_node_from_children(
            # The mark lets tl.display's layout unfold every Module (text and HTML).
            prefix=rendering_parts.with_layout_mark(
                rendering_parts.siblings(
                    rendering_parts.maybe_qualified_type_name(type(node)), "("
                ),
                MODULE_MARK,
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


_ELEMENT = re.compile(r"\[(\d+)\]$")


def _index(path: str | None) -> str | None:
    """``[2]`` for the element of a list or tuple at ``path`` (``.layers[2]``), else None.

    A list's elements are drawn one per line with nothing naming them: the
    index says which one is ``model.layers[2]`` without counting lines.
    """
    match = None if path is None else _ELEMENT.search(path)
    return None if match is None else f"[{match.group(1)}]"


def _comma(last: bool) -> Any:
    # Between attributes always a comma (a space after it when folded on one
    # line); after the last one only when unfolded.
    if last:
        return rendering_parts.fold_condition(expanded=rendering_parts.text(","))
    return rendering_parts.siblings(
        ",", rendering_parts.fold_condition(collapsed=rendering_parts.text(" "))
    )


def render_variable(node: Any, path: str | None, subtree_renderer: Any) -> Any:
    """A Variable as one line, ``Param float32[3, 2]``; ``Variable.__treescope_repr__``."""

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
        drawn = rendering_parts.build_custom_foldable_tree_node(
            label=label,
            contents=rendering_parts.fold_condition(
                expanded=rendering_parts.indented_children([value])
            ),
            path=path,
            expand_state=rendering_parts.ExpandState.COLLAPSED,
        )
        index = _index(path)
        if index is None:
            return drawn
        return rendering_parts.RenderableAndLineAnnotations(
            renderable=drawn.renderable,
            annotations=rendering_parts.comment_color(rendering_parts.text(f"  # {index}")),
        )

    return _once(node, path, draw)


def render_state(node: Any, path: str | None, subtree_renderer: Any) -> Any:
    """A State as ``State({...})`` of its entries; ``State.__treescope_repr__``."""
    return repr_lib.render_dictionary_wrapper(State, dict(node.items()), path, subtree_renderer)


# -- named arrays (tl.nx) ---------------------------------------------------------------


def render_named_array(node: Any, path: str | None, subtree_renderer: Any) -> Any:
    """A NamedArray as one line, ``NamedArray float32[3 | batch:4]``; unfold for the array.

    ``NamedArray.__treescope_repr__``. Its array view (treescope's arrayviz,
    with the named axes labelled by name) comes from ``NamedArrayAdapter``:
    ``treescope.render_array(x)`` and the array autovisualizer use it.
    """
    label = rendering_parts.siblings(
        rendering_parts.maybe_qualified_type_name(type(node)),
        " ",
        rendering_parts.abbreviation_color(rendering_parts.text(node.describe())),
    )
    array_path = None if path is None else f"{path}.array"
    array = rendering_parts.build_full_line_with_annotations(
        rendering_parts.siblings_with_annotations(
            "array=", subtree_renderer(node.array, path=array_path)
        )
    )
    return rendering_parts.build_custom_foldable_tree_node(
        label=label,
        contents=rendering_parts.fold_condition(
            expanded=rendering_parts.indented_children([array])
        ),
        path=path,
        expand_state=rendering_parts.ExpandState.COLLAPSED,
    )


class NamedArrayAdapter(ndarray_adapters.NDArrayAdapter[NamedArray]):
    """treescope's array view of a NamedArray: positional axes by index, named ones by name.

    The named axes are treescope's "named positionless" axes, the kind it
    draws for Penzai's NamedArray; everything else is delegated to the
    adapter of the array inside.
    """

    def _inner(self, node: NamedArray) -> ndarray_adapters.NDArrayAdapter[Any]:
        adapter = type_registries.lookup_ndarray_adapter(node.array)
        if adapter is None:
            raise TypeError(f"treescope cannot draw the {type(node.array).__name__} in {node!r}")
        return adapter

    def get_axis_info_for_array_data(self, array: NamedArray) -> tuple[Any, ...]:
        positional = [
            ndarray_adapters.PositionalAxisInfo(i, size)
            for i, size in enumerate(array.positional_shape)
        ]
        named = [
            ndarray_adapters.NamedPositionlessAxisInfo(name, size)
            for name, size in array.named_shape.items()
        ]
        return (*positional, *named)

    def get_array_data_with_truncation(
        self, array: NamedArray, mask: Any, edge_items_per_axis: tuple[int | None, ...]
    ) -> Any:
        if isinstance(mask, NamedArray):
            # Aligned by name, then laid out as `array` is: (*positional, *array.names).
            mask = nmap(lambda a, m: jax.numpy.broadcast_to(m, a.shape))(array, mask).array
        return self._inner(array).get_array_data_with_truncation(
            array.array, mask, edge_items_per_axis
        )

    def get_array_summary(self, array: NamedArray, fast: bool) -> Any:
        inner = self._inner(array).get_array_summary(array.array, fast)
        if isinstance(inner, str):
            inner = rendering_parts.text(inner)
        return rendering_parts.siblings(
            f"NamedArray {array.describe()} ", rendering_parts.comment_color(inner)
        )

    def get_numpy_dtype(self, array: NamedArray) -> Any:
        return self._inner(array).get_numpy_dtype(array.array)

    def get_sharding_info_for_array_data(self, array: NamedArray) -> Any:
        return self._inner(array).get_sharding_info_for_array_data(array.array)

    def should_autovisualize(self, array: NamedArray) -> bool:
        return self._inner(array).should_autovisualize(array.array)


type_registries.NDARRAY_ADAPTER_REGISTRY[NamedArray] = NamedArrayAdapter()

type_registries.IMMUTABLE_TYPES_REGISTRY[Module] = True
type_registries.IMMUTABLE_TYPES_REGISTRY[Variable] = True


def _fresh_record() -> Any:
    return _seen.set_scoped(_Seen())


# One record of drawn objects per rendering, whatever the root (a dict of two
# models sharing a layer too). A renderer set up without this builder (a
# user's own, or the one already running the drawing that loaded this module,
# when treescope is called directly before tl.display ever was) still works:
# the outermost toylib object then opens the record (see `_once`).
treescope.active_renderer.set_globally(
    treescope.active_renderer.get().extended_with(context_builders=[_fresh_record])
)
