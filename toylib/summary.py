"""Placeholder: being written (issue 5)."""

__all__ = ["summary"]


def summary(model, *inputs):  # noqa: D103
    raise NotImplementedError
