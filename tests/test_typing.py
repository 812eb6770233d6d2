"""What a type checker (and so an editor) sees of toylib's public API.

A snippet is checked by the pinned pyright (the `test` extra) with this
checkout on its import path; `reveal_type` lines report the inferred types,
and one deliberate mistake must be an error.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

SNIPPET = """\
import jax
import jax.numpy as jnp
import toylib as tl
from toylib import nn

model = nn.Linear(2, 3, rngs=0)
graphdef, params = tl.split(model)
reveal_type(graphdef)  # graphdef
reveal_type(tl.merge(graphdef, params))  # merge
_, kept, rest = tl.split(model, tl.Param, ...)
reveal_type(rest)  # rest


def loss(m: nn.Linear, x: jax.Array) -> jax.Array:
    return m(x).sum()


step = tl.jit(loss)
reveal_type(step(model, jnp.ones(2)))  # jit
step(model, "not an array")  # mistake
reveal_type(tl.value_and_grad(loss)(model, jnp.ones(2)))  # value_and_grad
reveal_type(tl.vmap(loss, in_axes=(None, 0))(model, jnp.ones((4, 2))))  # vmap


@tl.jit(donate=0)
def count(m: nn.Linear, n: int) -> str:
    return "x" * n


reveal_type(count(model, 3))  # decorated
keep: tl.filters.Filter = (tl.Param, tl.PathContains("kernel"), ...)
"""


def test_editors_see_graphdef_types_filters_and_transform_signatures(tmp_path):
    # extraPaths: `import toylib` is this checkout, whatever the environment has.
    config = {"extraPaths": [str(ROOT)], "pythonVersion": "3.11"}
    (tmp_path / "pyrightconfig.json").write_text(json.dumps(config))
    (tmp_path / "snippet.py").write_text(SNIPPET)
    run = subprocess.run(
        [sys.executable, "-m", "pyright", "--outputjson", "--pythonpath", sys.executable],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = json.loads(run.stdout)
    lines = SNIPPET.splitlines()
    found: dict[str, list[tuple[str, str]]] = {}
    for d in report["generalDiagnostics"]:
        tag = lines[d["range"]["start"]["line"]].rsplit("# ", 1)[-1]
        found.setdefault(tag, []).append((d["severity"], d["message"]))

    def revealed(tag: str) -> str:
        [(severity, message)] = found.pop(tag)
        assert severity == "information", message
        return message.split('" is "', 1)[1].rstrip('"')

    assert revealed("graphdef") == "GraphDef[Linear]"
    assert revealed("merge") == "Linear"
    assert revealed("rest") == "State"
    assert revealed("jit") == "Array"
    assert revealed("value_and_grad") == "tuple[Array, Any]"
    assert revealed("vmap") == "Array"
    assert revealed("decorated") == "str"
    [(severity, message)] = found.pop("mistake")
    assert severity == "error" and "\"Literal['not an array']\"" in message, message
    assert found == {}, found  # nothing else: the snippet is otherwise well typed
