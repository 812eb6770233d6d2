"""A griffe extension for the docs build: read toylib's ``Example:`` sections.

toylib's docstrings are Google style with the section heading ``Example:``
(singular, as Napoleon accepts). Griffe's Google parser knows only
``Examples:`` and would render the singular one as an admonition of plain
text, so the ``>>>`` lines would lose their code formatting. This extension
renames the heading before griffe parses the docstring; the source is left
as it is.
"""

import re
from typing import Any

import griffe

_EXAMPLE_HEADING = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rewrite ``Example:`` to ``Examples:`` in every docstring griffe loads."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE_HEADING.sub(r"\1Examples:", obj.docstring.value)
