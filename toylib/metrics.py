"""Placeholder: being written (issue 5)."""

__all__: list[str] = []
