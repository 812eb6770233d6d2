"""Paths: where a value sits in a model.

A path is a tuple of attribute names, list indices and dict keys, from the
root to the value: ``("blocks", 2, "attn", "kernel")``, shown to users as
``model.blocks[2].attn.kernel``. This file is the one home of the small
helpers every part uses with paths: rendering them, ordering keys, nesting a
``{path: value}`` mapping and listing paths in an error message.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = [
    "Path",
    "first_few",
    "format_path",
    "get_nested",
    "list_paths",
    "nest",
    "sorted_keys",
]

Path = tuple[Any, ...]


def format_path(path: Path, root: str = "model") -> str:
    """Render a path tuple as ``model.layers[0].kernel``.

    Example:
        >>> format_path(("layers", 0, "kernel"))
        'model.layers[0].kernel'
    """
    out = root
    for key in path:
        if isinstance(key, str) and key.isidentifier():
            out += "." + key
        else:
            out += f"[{key!r}]"
    return out


def _order(key: Any) -> tuple:
    # Integers (list indices) numerically, everything else by its text.
    if isinstance(key, int) and not isinstance(key, bool):
        return (0, key, "")
    return (1, 0, str(key))


def sorted_keys(keys: Iterable[Any]) -> list[Any]:
    """The one order of mapping keys in toylib's pytrees (tracked dicts and States).

    Sorted, as jax orders a dict's children; keys that do not compare with
    each other (ints beside strings) go integers first, then by their text.

    Example:
        >>> sorted_keys(["b", "a"]), sorted_keys([1, "a", 0])
        (['a', 'b'], [0, 1, 'a'])
    """
    keys = list(keys)
    try:
        return sorted(keys)
    except TypeError:
        return sorted(keys, key=_order)


def nest(
    pairs: Iterable[tuple[Path, Any]] | Mapping[Path, Any], new: Callable[[], Any] = dict
) -> Any:
    """``[(path, value)]`` (or a ``{path: value}`` dict) as nested mappings made by ``new``.

    Example:
        >>> nest({("a", "b"): 1, ("a", "c"): 2, ("d",): 3})
        {'a': {'b': 1, 'c': 2}, 'd': 3}
    """
    root = new()
    for path, value in pairs.items() if isinstance(pairs, Mapping) else pairs:
        node = root
        for key in path[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = new()
            node = child
        node[path[-1]] = value
    return root


def get_nested(nested: Any, path: Path) -> Any:
    """The value at ``path`` in nested mappings (the inverse of ``nest``)."""
    for key in path:
        nested = nested[key]
    return nested


def first_few(texts: Iterable[str], limit: int = 5, lines: bool = False) -> str:
    """``a, b and 3 more`` (or one line each, ``lines=True``): an error message's list.

    Example:
        >>> first_few(["a", "b", "c"], limit=2)
        'a, b and 1 more'
    """
    texts = list(texts)
    extra = len(texts) - limit
    if lines:
        return "\n".join([*texts[:limit], *([f"  and {extra} more"] if extra > 0 else [])])
    return ", ".join(texts[:limit]) + (f" and {extra} more" if extra > 0 else "")


def list_paths(paths: Iterable[Path], limit: int = 5, root: str = "model") -> str:
    """``model.a, model.b and 3 more``: the first ``limit`` paths of an error message.

    Example:
        >>> list_paths([("a",), ("b",), ("c",)], limit=2)
        'model.a, model.b and 1 more'
    """
    return first_few((format_path(p, root) for p in paths), limit)
