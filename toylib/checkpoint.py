"""Placeholder: being written (issue 5)."""

__all__ = ["load", "save"]


def save(path, obj):  # noqa: D103
    raise NotImplementedError


def load(path, like):  # noqa: D103
    raise NotImplementedError
