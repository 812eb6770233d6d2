"""Train the linear model in all five libraries and compare them (``make compare``).

For each of Flax Linen, Flax NNX, Equinox, Penzai and toylib this runs
``examples/compare/<library>_linear.py``'s ``main()`` (recovered weights,
test MSE, a treescope page in ``out/compare/<library>.html``), then prints a
table: library, lines of model + training code, test MSE and the median
microseconds per jitted train step, all measured in this process.

* Lines: the non-blank, non-comment lines between the ``# --- model and
  training: begin ---`` and ``end`` markers of each script (the model, its
  initialisation, the optimiser, the loss, the train step and the loop; not
  the data, the reporting or the rendering).
* Time: each library's step is the one its script trains with, on the real
  trained state. After warm-up (compiled already, then a few more steps),
  rounds are interleaved - every library runs one batch of steps per round,
  in a rotating order - so machine noise hits all alike. Each batch ends
  with ``jax.block_until_ready`` on its last loss; the figure is the median
  over rounds of the batch time divided by its steps.

The table, the versions it was measured with and the five marked regions
are written into ``docs/comparison.md`` between its generated-section
markers (``--no-doc`` leaves the doc alone).

Run: ``make compare``, or ``python examples/compare/run_all.py [--rounds N --steps N]``.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.metadata
import os
import pathlib
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import jax

HERE = pathlib.Path(__file__).resolve().parent
DOC = HERE.parents[1] / "docs" / "comparison.md"
LIBRARIES = ("linen", "nnx", "equinox", "penzai", "toylib")
TITLES = {
    "linen": "Flax Linen",
    "nnx": "Flax NNX",
    "equinox": "Equinox",
    "penzai": "Penzai",
    "toylib": "toylib",
}
PACKAGES = ("jax", "optax", "flax", "equinox", "penzai", "treescope", "toylib")
BEGIN = "# --- model and training: begin ---"
END = "# --- model and training: end ---"
MSE_LIMIT = 2.0

MARKERS_MISSING = """\
{where}: expected exactly one line {begin!r} followed by one line {end!r};
found {n_begin} begin and {n_end} end markers.
Fix: put the model and training code of the script between the two markers:

    {begin}
    class Model: ...
    def train_step(...): ...
    {end}
"""

DOC_MARKERS_MISSING = """\
{path}: no generated section {name!r}: expected the lines
<!-- begin generated: {name} --> and <!-- end generated: {name} --> (in that order).
Fix: restore the two marker lines, or run with --no-doc to leave the doc alone.
"""


def marked_region(source: str, where: str = "<source>") -> list[str]:
    """The lines strictly between the begin and end markers of ``source``.

    Arguments:
        source: a script's text.
        where: a name for the source, used in the error message.

    Returns:
        The lines of the marked region, as they are.

    Example:
        >>> marked_region(f"a\\n{BEGIN}\\nb\\n{END}\\nc")
        ['b']
    """
    lines = source.splitlines()
    stripped = [line.strip() for line in lines]
    n_begin, n_end = stripped.count(BEGIN), stripped.count(END)
    if n_begin != 1 or n_end != 1 or stripped.index(BEGIN) > stripped.index(END):
        raise ValueError(
            MARKERS_MISSING.format(where=where, begin=BEGIN, end=END, n_begin=n_begin, n_end=n_end)
        )
    return lines[stripped.index(BEGIN) + 1 : stripped.index(END)]


def count_lines(source: str, where: str = "<source>") -> int:
    """Count the model + training lines of a script: non-blank, non-comment, between the markers.

    Arguments:
        source: a script's text.
        where: a name for the source, used in the error message.

    Returns:
        The number of lines in the marked region that hold code.

    Example:
        >>> count_lines('''
        ... # --- model and training: begin ---
        ... # a comment
        ... def f(x):
        ...
        ...     return x  # trailing comments do not matter
        ... # --- model and training: end ---
        ... ''')
        2
    """
    code = (line.strip() for line in marked_region(source, where))
    return sum(1 for line in code if line and not line.startswith("#"))


def script(library: str) -> pathlib.Path:
    """The path of one library's script."""
    return HERE / f"{library}_linear.py"


def run_library(library: str, out_dir: pathlib.Path | None, verbose: bool) -> dict:
    """Import ``<library>_linear`` from this folder and run its ``main()``."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))  # the scripts import their sibling `problem`
    module = importlib.import_module(f"{library}_linear")
    return module.main(out_dir=out_dir, verbose=verbose)


def time_steps(
    steps: dict[str, Callable[[], jax.Array]], rounds: int, per_batch: int, warmup: int = 5
) -> dict[str, float]:
    """Median microseconds per call of each zero-argument step, in interleaved rounds.

    Arguments:
        steps: library name to a callable doing one train step, returning the loss.
        rounds: how many batches to time per library.
        per_batch: steps per timed batch; the batch blocks on its last result.
        warmup: untimed steps per library first (compilation, caches).

    Returns:
        Library name to the median over rounds of (batch time / ``per_batch``), in µs.

    Example:
        >>> import jax.numpy as jnp
        >>> times = time_steps({"add": lambda: jnp.ones(3) + 1}, rounds=3, per_batch=2)
        >>> list(times), times["add"] > 0
        (['add'], True)
    """
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            jax.block_until_ready(steps[name]())
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        # Rotate the order so no library always runs first (or right after another).
        for name in names[r % len(names) :] + names[: r % len(names)]:
            step = steps[name]
            start = time.perf_counter()
            for _ in range(per_batch):
                result = step()
            jax.block_until_ready(result)
            samples[name].append((time.perf_counter() - start) / per_batch * 1e6)
    return {name: statistics.median(samples[name]) for name in names}


def format_table(rows: Sequence[dict], baseline: str = "Flax Linen") -> str:
    """A Markdown table of the rows (library, lines, test_mse, us), times also relative.

    Arguments:
        rows: one dict per library with keys ``library``, ``lines``, ``test_mse``, ``us``.
        baseline: the library the last column divides by (Linen's step is a plain ``jax.jit``).

    Returns:
        The table as Markdown text.

    Example:
        >>> rows = [{"library": "a", "lines": 20, "test_mse": 1.0, "us": 9.87},
        ...         {"library": "b", "lines": 9, "test_mse": 1.5, "us": 19.74}]
        >>> print(format_table(rows, baseline="a"))
        | library | lines of model + training | test MSE | µs / train step (median) | vs a |
        |---|--:|--:|--:|--:|
        | a | 20 | 1.0000 | 9.9 | 1.00x |
        | b | 9 | 1.5000 | 19.7 | 2.00x |
    """
    base = next(row["us"] for row in rows if row["library"] == baseline)
    out = [
        "| library | lines of model + training | test MSE | µs / train step (median) "
        f"| vs {baseline} |",
        "|---|--:|--:|--:|--:|",
    ]
    for row in rows:
        cells = (
            row["library"],
            str(row["lines"]),
            f"{row['test_mse']:.4f}",
            f"{row['us']:.1f}",
            f"{row['us'] / base:.2f}x",
        )
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def environment() -> str:
    """One line naming the machine, the backend and the package versions."""
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in PACKAGES)
    device = jax.devices()[0]
    return (
        f"{platform.system()} {platform.machine()} with {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}, "
        f"JAX backend {device.platform} ({device.device_kind}); {versions}"
    )


def replace_section(text: str, name: str, body: str, path: pathlib.Path = DOC) -> str:
    """Replace what lies between ``<!-- begin generated: name -->`` and its end marker.

    Example:
        >>> doc = "a\\n<!-- begin generated: t -->\\nold\\n<!-- end generated: t -->\\nb"
        >>> print(replace_section(doc, "t", "new"))
        a
        <!-- begin generated: t -->
        new
        <!-- end generated: t -->
        b
    """
    begin, end = f"<!-- begin generated: {name} -->", f"<!-- end generated: {name} -->"
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise ValueError(DOC_MARKERS_MISSING.format(path=path, name=name))
    return text[: start + len(begin)] + "\n" + body + "\n" + text[stop:]


def imports(source: str, region: Sequence[str]) -> list[str]:
    """The top-level import statements of ``source`` that bind a name the region uses.

    Example:
        >>> imports("import numpy as np\\nimport jax\\nfrom a import b, c as d", ["jax.jit(d)"])
        ['import jax', 'from a import b, c as d']
    """
    used = set(re.findall(r"[A-Za-z_]\w*", "\n".join(region)))
    kept = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            # `import a.b` binds a; `... as c` binds c.
            bound = {alias.asname or alias.name.split(".")[0] for alias in node.names}
            if bound & used:
                kept.append(ast.get_source_segment(source, node))
    return kept


def code_section() -> str:
    """The five marked regions, after their imports, as Markdown code blocks."""
    parts = []
    for library in LIBRARIES:
        path = script(library)
        source = path.read_text()
        region = marked_region(source, str(path))
        code = "\n".join(imports(source, region)) + "\n\n\n" + "\n".join(region).strip("\n")
        title = f"### {TITLES[library]} (`examples/compare/{path.name}`)"
        parts.append(f"{title}\n\n```python\n{code}\n```")
    return "\n\n".join(parts)


def update_doc(table: str, env: str, path: pathlib.Path = DOC) -> None:
    """Write the table, the environment line and the code regions into the doc."""
    text = path.read_text(encoding="utf-8")
    text = replace_section(text, "table", f"{table}\n\nMeasured with: {env}.", path)
    text = replace_section(text, "code", code_section(), path)
    path.write_text(text, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=30, help="timed batches per library")
    parser.add_argument("--steps", type=int, default=50, help="train steps per timed batch")
    parser.add_argument("--out-dir", type=pathlib.Path, default=None, help="for the HTML pages")
    parser.add_argument("--no-doc", action="store_true", help="do not update docs/comparison.md")
    parser.add_argument("--quiet", action="store_true", help="do not print each library's weights")
    args = parser.parse_args(argv)

    results = {lib: run_library(lib, args.out_dir, not args.quiet) for lib in LIBRARIES}
    times = time_steps({lib: r["step"] for lib, r in results.items()}, args.rounds, args.steps)
    rows = [
        {
            "library": TITLES[lib],
            "lines": count_lines(script(lib).read_text(), str(script(lib))),
            "test_mse": results[lib]["test_mse"],
            "us": times[lib],
        }
        for lib in LIBRARIES
    ]
    table, env = format_table(rows), environment()
    print()
    print(table)
    print(f"\n{env}")
    for lib, result in results.items():
        print(f"{TITLES[lib]:>10}: {result['html']}")

    failed = []
    for lib, result in results.items():
        if not result["test_mse"] < MSE_LIMIT:
            failed.append(f"{lib}: test MSE {result['test_mse']:.4f} is not below {MSE_LIMIT}")
        if not pathlib.Path(result["html"]).is_file():
            failed.append(f"{lib}: no treescope page at {result['html']}")
    if failed:
        print("FAILED:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    if not args.no_doc:
        update_doc(table, env)
        print(f"updated {DOC.relative_to(HERE.parents[1])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
