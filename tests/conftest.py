"""Helpers shared by the tests."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from toylib._core import graph
from toylib._core.variables import unwrap


def snapshot(obj: Any) -> list[tuple[Any, Any, Any]]:
    """``(path, leaf object, value object)`` for every leaf of ``obj`` (graph view).

    Compared by identity with ``assert_unchanged``: a failed call that wrote
    anything (a new value, a new Variable, a removed attribute) shows up,
    without reading a value back from the device.
    """
    _, leaves = graph.flatten(obj)
    return [(path, leaf, unwrap(leaf)) for path, leaf in leaves]


def assert_unchanged(obj: Any, before: list[tuple[Any, Any, Any]]) -> None:
    after = snapshot(obj)
    assert [p for p, _, _ in after] == [p for p, _, _ in before], "the structure changed"
    for (path, leaf, value), (_, old_leaf, old_value) in zip(after, before, strict=True):
        assert leaf is old_leaf, f"{path}: the Variable was replaced"
        assert value is old_value, f"{path}: the value was written"


def run_in_threads(*fns: Callable[[], Any], timeout: float = 120) -> list[Any]:
    """Run each function in its own thread, started together; their results (or errors)."""
    barrier = threading.Barrier(len(fns))
    results: list[Any] = [None] * len(fns)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fns[i]()
        except BaseException as error:  # reported to the caller, not lost in the thread
            results[i] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a thread did not finish"
    return results
