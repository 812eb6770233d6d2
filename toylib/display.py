"""Placeholder: being written (issue 5)."""

__all__ = ["display"]


def display(obj, path=None):  # noqa: D103
    raise NotImplementedError
