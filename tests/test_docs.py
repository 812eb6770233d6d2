"""The API reference: every public name has a running example and a place on a docs page.

Public names are those in ``toylib.__all__``, ``toylib.nn.__all__`` and the
``__all__`` of the submodules that ``toylib.__all__`` exports (``tl.errors``,
``tl.filters``, ``tl.metrics``). The examples in docstrings run as doctests
(``--doctest-modules``); these tests check that each name *has* one, and that
``docs/api/*.md`` renders it with a ``::: path`` directive (mkdocstrings)
whose path leads to the same object.

Three kinds of name cannot carry a docstring of their own:

* the functions ``toylib.nn`` re-exports from JAX: JAX documents them, so the
  ``toylib.nn`` docstring's example calls each one, and the nn page lists
  them with a link to JAX's reference;
* values such as ``tl.Carry`` and ``tl.errors.ON_ERROR_ENV``: their docstring
  is the string under the assignment (what griffe renders), which doctest
  does not collect, so the test runs its example itself;
* the lazy names (``tl.Optimizer``, ``tl.save``...): griffe reads
  ``toylib/__init__.py`` without running it and does not see them, so their
  directive names the module that defines them.
"""

from __future__ import annotations

import ast
import doctest
import functools
import importlib
import inspect
import io
import pathlib
import re
import types
from typing import Any

import jax.numpy as jnp
import pytest

import toylib as tl
from toylib import nn
from toylib.summary import Row, Summary

ROOT = pathlib.Path(__file__).resolve().parent.parent
API_PAGES = sorted((ROOT / "docs" / "api").glob("*.md"))
DIRECTIVE = re.compile(r"^::: ([\w.]+)\s*$", re.MULTILINE)


def _public_modules() -> dict[str, types.ModuleType]:
    modules = {"toylib": tl, "toylib.nn": nn}
    for name in tl.__all__:
        value = getattr(tl, name)
        if isinstance(value, types.ModuleType) and hasattr(value, "__all__"):
            modules.setdefault(f"toylib.{name}", value)
    return modules


MODULES = _public_modules()
PUBLIC = [(f"{m}.{n}", module, n) for m, module in MODULES.items() for n in module.__all__]
IDS = [qualified for qualified, _, _ in PUBLIC]


def _from_jax(value: Any) -> bool:
    if isinstance(value, types.ModuleType):
        return value.__name__.split(".")[0] == "jax"
    return (getattr(value, "__module__", None) or "").split(".")[0] == "jax"


def _has_own_docstring(value: Any) -> bool:
    """Modules, classes and functions carry their docstring; other values share their type's."""
    return isinstance(value, types.ModuleType | type) or inspect.isroutine(value)


def _example_lines(doc: str) -> str:
    return "\n".join(
        line.strip() for line in doc.splitlines() if line.strip().startswith((">>>", "..."))
    )


def _attribute_docstring(value: Any, name: str) -> tuple[str, str]:
    """The string under ``name = ...`` in the toylib module that defines ``value``."""
    for path in sorted((ROOT / "toylib").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node, after in zip(tree.body, tree.body[1:], strict=False):
            if isinstance(node, ast.Assign):
                targets = node.targets
            else:  # `Filter: TypeAlias = ...`
                targets = [node.target] if isinstance(node, ast.AnnAssign) else []
            if not any(isinstance(t, ast.Name) and t.id == name for t in targets):
                continue
            module_name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            if getattr(importlib.import_module(module_name), name, None) is not value:
                continue
            is_string = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
            assert is_string and isinstance(after.value.value, str), (
                f"{module_name}.{name} has no docstring: write one under the assignment"
            )
            return module_name, inspect.cleandoc(after.value.value)
    raise AssertionError(f"no module-level assignment of {name} found in toylib/")


def _run_examples(doc: str, name: str) -> None:
    test = doctest.DocTestParser().get_doctest(doc, {}, name, None, 0)
    report = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    result = runner.run(test, out=report.write)
    assert result.failed == 0, report.getvalue()


def _resolve(path: str) -> Any:
    """What a ``::: path`` directive shows: the longest importable module, then attributes."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attribute in parts[i:]:
            obj = getattr(obj, attribute)
        return obj
    raise AssertionError(f"{path}: no such module")


@functools.cache
def _directives() -> dict[str, str]:
    return {path: page.name for page in API_PAGES for path in DIRECTIVE.findall(page.read_text())}


@functools.cache
def _shown() -> dict[str, Any]:
    return {path: _resolve(path) for path in _directives()}


def test_public_names_are_many_and_include_the_submodules():
    assert {"toylib.errors", "toylib.filters", "toylib.metrics"} <= set(MODULES)
    assert len(PUBLIC) > 150
    assert "toylib.Optimizer" in IDS and "toylib.nn.relu" in IDS and "toylib.Carry" in IDS


@pytest.mark.parametrize(("qualified", "module", "name"), PUBLIC, ids=IDS)
def test_every_public_name_has_an_example(qualified, module, name):
    value = getattr(module, name)
    if _from_jax(value):
        examples = _example_lines(nn.__doc__)
        assert re.search(rf"\bnn\.{name}\b", examples), (
            f"{qualified} is JAX's: call it in the example of the toylib.nn docstring"
        )
    elif _has_own_docstring(value):
        doc = value.__doc__  # not inspect.getdoc: a class must not borrow its base's
        assert doc and doc.strip(), f"{qualified} has no docstring"
        assert ">>>" in doc, f"{qualified}'s docstring has no example (an Example: section)"
    else:
        where, doc = _attribute_docstring(value, name)
        assert ">>>" in doc, f"{where}.{name}'s docstring has no example"
        _run_examples(doc, f"{where}.{name}")


@pytest.mark.parametrize(("qualified", "module", "name"), PUBLIC, ids=IDS)
def test_every_public_name_is_on_an_api_page(qualified, module, name):
    value = getattr(module, name)
    if _from_jax(value):
        nn_page = (ROOT / "docs" / "api" / "nn.md").read_text()
        assert f"| `nn.{name}` |" in nn_page, f"{qualified}: add a row to the table in nn.md"
        return
    shown = [path for path, obj in _shown().items() if obj is value]
    assert shown, f"{qualified} is on no page of docs/api: add `::: {qualified}` to one"


def test_every_directive_shows_a_public_name_or_what_one_returns():
    public = {id(getattr(module, name)) for _, module, name in PUBLIC}
    returned = {id(Summary), id(Row)}  # what tl.summary returns
    stray = [
        f"{_directives()[p]}: {p}"
        for p, obj in _shown().items()
        if id(obj) not in public | returned
    ]
    assert not stray, f"directives for names that are not public: {stray}"


def test_lazy_names_are_shown_from_the_module_that_defines_them():
    # griffe reads toylib/__init__.py statically: `::: toylib.Optimizer` would not resolve.
    directives = _directives()
    for name, module in tl._LAZY.items():
        assert f"{module}.{name}" in directives, f"document tl.{name} as `::: {module}.{name}`"
        assert f"toylib.{name}" not in directives


def test_home_and_design_pages_code_runs():
    namespace: dict = {}
    for page in ("index.md", "design.md"):
        path = ROOT / "docs" / page
        blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
        assert blocks, page
        for block in blocks:
            exec(compile(block, str(path), "exec"), namespace)
    assert float(namespace["loss"]) > 0  # index.md's train step ran
    layer = namespace["Linear"](3, 2, rngs=tl.Rngs(0))  # design.md's Module
    assert layer(jnp.ones(3)).shape == (2,) and int(layer.count.value) == 1
