"""Change notification: how a cache learns that an object it relies on changed.

``tl.jit``'s fast path reuses one flattening of its arguments instead of
walking the object graph on every call. To know when that flattening is
stale, it registers a token on every Module, Variable and tracked container
it flattened. A structural change to one of those objects (an attribute
assigned or deleted, a list or dict mutated, Variable metadata set) marks
the tokens registered on *that object* invalid, after the change is made.

So invalidation is per object: a change to another model touches no token
of this one, and objects nobody watches pay one slot read per change. The
objects hold weak references to the tokens, so a dead cache costs nothing
and keeps nothing alive.

Example:
    >>> import toylib as tl
    >>> from toylib._core import watchers
    >>> model = tl.nn.Linear(2, 2, rngs=0)
    >>> token = watchers.Token()
    >>> watchers.watch(model, token)
    >>> model.extra = 1                     # a structural change
    >>> token.valid
    False
"""

from __future__ import annotations

import weakref
from typing import Any, Protocol, runtime_checkable

__all__ = ["SLOT", "Token", "Watcher", "changed", "watch"]

SLOT = "_toylib_watchers"  # the slot every watchable object has


@runtime_checkable
class Watcher(Protocol):
    """What ``watch`` invalidates: a weak-referenceable object with a ``valid`` flag
    (a ``Token``, or ``tl.jit``'s recorded fast path)."""

    valid: bool


class Token:
    """Valid until an object it watches changes."""

    __slots__ = ("__weakref__", "valid")

    def __init__(self) -> None:
        self.valid = True


def watch(obj: Any, token: Watcher) -> None:
    """Invalidate ``token`` at the next structural change of ``obj``."""
    refs = getattr(obj, SLOT, None)
    if refs is None:
        object.__setattr__(obj, SLOT, [weakref.ref(token)])
        return
    if len(refs) >= 8:  # drop tokens that died or were invalidated elsewhere
        refs[:] = [r for r in refs if (t := r()) is not None and t.valid]
    refs.append(weakref.ref(token))


def changed(obj: Any) -> None:
    """Call after a structural change of ``obj``: invalidates the tokens watching it."""
    refs = getattr(obj, SLOT, None)
    if refs:
        object.__setattr__(obj, SLOT, None)
        for ref in refs:
            token = ref()
            if token is not None:
                token.valid = False
