"""What is running now, per thread: the Module calls, their labels, the transforms.

A layer that rejects its input names itself by its path from the outermost
Module being called (``model.blocks[2].attn``), which it cannot know on its
own: Modules hold no parent links. So every ``Module.__call__`` is wrapped
to record itself while it runs. The records are ``contextvars``: each
thread (and each asyncio task) has its own, so a model running in another
thread never shows up in this one's error messages or in its ``tl.summary``.
Only Python-level calls pay for this (eagerly, or once per trace); compiled
code never sees it.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

from toylib._core.paths import format_path
from toylib._core.skeleton import iter_graph

__all__ = [
    "call_path",
    "forward_hook",
    "intercept_calls",
    "labelled",
    "module_path",
    "running",
    "track_calls",
    "transform",
    "transform_name",
]

# The Modules whose __call__ is running, innermost first, as a linked list
# `(module, (outer, (...)))`: pushing is one tuple, whatever the depth.
_calls: ContextVar[tuple | None] = ContextVar("toylib_calls", default=None)
# `{id(module): label}` for Modules rebuilt inside a jax transform, which
# identity lookup cannot find (nn.Stack labels the block it scans `.blocks[*]`).
_labels: ContextVar[dict[int, str] | None] = ContextVar("toylib_labels", default=None)
# Wrappers that run every Module call while installed (tl.summary), innermost last.
_interceptors: ContextVar[tuple[Callable, ...]] = ContextVar("toylib_interceptors", default=())
# The toylib transforms whose traced function is running, innermost first.
_transforms: ContextVar[tuple | None] = ContextVar("toylib_transforms", default=None)


def track_calls(call: Callable) -> Callable:
    """Wrap a Module's ``__call__`` so that it records itself while it runs."""
    if getattr(call, "_tracks_calls", False):
        return call

    @functools.wraps(call)
    def tracked(self: Any, *args: Any, **kwargs: Any) -> Any:
        token = _calls.set((self, _calls.get()))
        try:
            interceptors = _interceptors.get()
            if interceptors:
                return interceptors[-1](call, self, args, kwargs)
            return call(self, *args, **kwargs)
        finally:
            _calls.reset(token)

    tracked._tracks_calls = True  # type: ignore[attr-defined]
    return tracked


def running() -> list[Any]:
    """The Modules whose ``__call__`` is running in this thread, outermost first."""
    out = []
    link = _calls.get()
    while link is not None:
        out.append(link[0])
        link = link[1]
    return out[::-1]


@contextlib.contextmanager
def scoped(var: ContextVar, value: Any) -> Iterator[None]:
    """Within the block, ``var`` is ``value``; the previous value comes back after."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def labelled(module: Any, label: str) -> contextlib.AbstractContextManager[None]:
    """Within the block, ``module_path`` shows ``module`` as ``label`` (e.g. ``.blocks[*]``)."""
    return scoped(_labels, {**(_labels.get() or {}), id(module): label})


def intercept_calls(wrapper: Callable) -> contextlib.AbstractContextManager[None]:
    """Within the block, every Module call runs as ``wrapper(call, module, args, kwargs)``.

    ``call(module, *args, **kwargs)`` is the Module's own ``__call__``; the
    wrapper returns the output. A ``super().__call__`` inside an overriding
    ``__call__`` reaches the wrapper again with the same module. Only calls
    made in this thread are intercepted.
    """
    return scoped(_interceptors, (*_interceptors.get(), wrapper))


def forward_hook(
    hook: Callable[[Any, tuple, dict, Any], Any], *, filter: Callable[[Any], bool] | None = None
) -> contextlib.AbstractContextManager[None]:
    """Within the block, ``hook(module, args, kwargs, output)`` runs after every Module call.

    PyTorch's ``register_forward_hook``, scoped to a block and to this thread
    (another thread's calls are not seen). The hook may return a new output,
    which replaces the call's output; ``None`` keeps it. A ``super().__call__``
    inside an overriding ``__call__`` is one call, seen once. Hooks nest and
    run in the order their blocks were entered (outermost first), each seeing
    the output the previous one returned. ``filter(module)`` restricts the hook
    to some Modules (e.g. ``lambda m: isinstance(m, nn.Linear)``).

    Hooks run where Python runs the Modules: eagerly on every call, and once
    per trace inside ``tl.jit`` (where ``output`` is a tracer). To keep values
    out of a compiled step, record them with ``module.sow(tl.Intermediate, ...)``
    from the hook, and ``tl.pop`` them afterwards. ``call_path(module)`` names
    the Module by its path from the outermost one called (``model.layers[0]``).

    Arguments:
        hook: ``(module, args, kwargs, output) -> new output or None``.
        filter: which Modules to hook (all by default).

    Returns:
        A context manager.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> from toylib import nn
        >>> mlp = nn.MLP([2, 3, 1], rngs=0)
        >>> seen = []
        >>> def record(module, args, kwargs, out):
        ...     seen.append((tl.call_path(module), out.shape))
        >>> with tl.forward_hook(record, filter=lambda m: isinstance(m, nn.Linear)):
        ...     _ = mlp(jnp.ones((4, 2)))
        >>> seen
        [('model.layers[0]', (4, 3)), ('model.layers[1]', (4, 1))]
    """

    def wrapper(call: Callable, module: Any, args: tuple, kwargs: dict) -> Any:
        link = _calls.get()
        outer = link[1] if link is not None else None
        if (outer is not None and outer[0] is module) or (
            filter is not None and not filter(module)
        ):
            return call(module, *args, **kwargs)  # a super().__call__, or not hooked
        out = _call_outer(wrapper, call, module, args, kwargs)
        new = hook(module, args, kwargs, out)
        return out if new is None else new

    return intercept_calls(wrapper)


def _call_outer(wrapper: Callable, call: Callable, module: Any, args: tuple, kwargs: dict) -> Any:
    """Run the call through the interceptors installed outside ``wrapper`` (or directly).

    The stack itself is left alone, so the Modules this call calls in turn
    see every interceptor again.
    """
    interceptors = _interceptors.get()
    position = interceptors.index(wrapper) if wrapper in interceptors else 0
    if position == 0:
        return call(module, *args, **kwargs)
    return interceptors[position - 1](call, module, args, kwargs)


def transform(name: str) -> contextlib.AbstractContextManager[None]:
    """Within the block, ``transform_name()`` is ``name`` (e.g. ``tl.jit(step)``)."""
    return scoped(_transforms, (name, _transforms.get()))


def transform_name() -> str | None:
    """The innermost toylib transform whose function is running here, if any."""
    link = _transforms.get()
    return None if link is None else link[0]


def module_path(module: Any) -> str:
    """Where ``module`` sits in the model being called: ``model.blocks[2].attn (Attention)``.

    The path runs from the outermost Module whose ``__call__`` is running.
    A step whose child cannot be found by identity (a copy rebuilt inside a
    jax transform, e.g. one block of ``nn.Stack``) is shown as ``<Type>``.
    Outside any call it is ``model (Type)``. Layers use it in error messages.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> from toylib import nn
        >>> mlp = nn.MLP([3, 4, 2], rngs=0)
        >>> mlp(jnp.ones((1, 5)))
        Traceback (most recent call last):
        ValueError: model.layers[0] (Linear): expected input of shape (..., 3), got (1, 5).
        ...
    """
    return f"{call_path(module)} ({type(module).__name__})"


def call_path(module: Any) -> str:
    """``module_path`` without the type: ``model.blocks[2].attn``.

    Example:
        >>> import jax.numpy as jnp, toylib as tl
        >>> from toylib import nn
        >>> model = nn.Sequential(nn.Linear(2, 2, rngs=0), nn.Linear(2, 1, rngs=1))
        >>> paths = []
        >>> def record(module, args, kwargs, out):
        ...     paths.append(tl.call_path(module))
        >>> with tl.forward_hook(record):
        ...     _ = model(jnp.ones(2))
        >>> paths
        ['model.layers[0]', 'model.layers[1]', 'model']
    """
    stack = running()
    chain = [m for i, m in enumerate(stack) if i == 0 or m is not stack[i - 1]]
    if not chain or chain[-1] is not module:
        chain.append(module)
    labels = _labels.get() or {}
    text = "model"
    for parent, child in itertools.pairwise(chain):
        text += _child_path(parent, child, labels)
    return text


def _child_path(parent: Any, child: Any, labels: dict[int, str]) -> str:
    for path, node in iter_graph(parent):
        if node is child:
            return format_path(path, root="")
    return labels.get(id(child), f".<{type(child).__name__}>")


def find_path(target: Any) -> str | None:
    """The path of ``target`` (a Variable) in the outermost running Module that holds it."""
    for module in running():
        for path, node in iter_graph(module):
            if node is target:
                return format_path(path)
    return None
