"""Building the small GPT: eager vs compiled construction, toylib vs Flax NNX and Equinox.

Built eagerly, a model runs every initialiser as its own small XLA program,
and each new shape is compiled the first time it is seen: seconds on CPU for
a GPT, paid again in every new process. ``tl.jit`` of the constructor traces
the whole construction once and compiles it as one program (the values are
the same; the model comes back as ordinary Modules holding arrays).

Each measurement runs in a fresh Python process (so nothing is cached from an
earlier one), after the imports and JAX's backend are up; the model is built
twice in that process and each build waits for all its arrays. Rows:

* toylib eager (nn.Stack): ``TGPT(size, stack=True, rngs=...)``, as examples/gpt.py's GPT
* toylib eager (list): blocks in a Python list
* toylib compiled (nn.Stack): ``tl.jit(lambda: TGPT(...))()``; the second build reuses the program
* nnx eager: the same GPT in Flax NNX (blocks in ``nnx.List``)
* equinox eager: the same GPT in Equinox (blocks in a list)

The models are those of benchmarks/gpt.py ("small" by default: d=256, 6
layers, ctx 128). Figures are the median over ``--repeats`` fresh processes.

Run: python benchmarks/init.py [--size small] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROWS = {
    "toylib eager (nn.Stack)": "toylib-stack",
    "toylib eager (list)": "toylib-list",
    "toylib compiled (nn.Stack)": "toylib-compiled",
    "nnx eager": "nnx",
    "equinox eager": "equinox",
}


def _builder(kind: str, size: Any) -> Callable[[], Any]:
    import gpt as bench  # benchmarks/gpt.py, on the path in the child

    import toylib as tl

    if kind == "toylib-stack":
        return lambda: bench.TGPT(size, stack=True, rngs=tl.Rngs(0))
    if kind == "toylib-list":
        return lambda: bench.TGPT(size, stack=False, rngs=tl.Rngs(0))
    if kind == "toylib-compiled":
        build = tl.jit(lambda: bench.TGPT(size, stack=True, rngs=tl.Rngs(0)))
        return build
    if kind == "nnx":
        return lambda: bench.build_nnx(size)
    if kind == "equinox":
        return lambda: bench.build_equinox(size)
    raise ValueError(kind)


def child(kind: str, size_name: str) -> None:
    """Build the model twice in this (fresh) process and print the two times as JSON."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gpt as bench
    import jax

    jax.devices()  # the backend is up before the clock starts
    build = _builder(kind, bench.SIZES[size_name])
    times = []
    for _ in range(2):
        start = time.perf_counter()
        model = build()
        jax.block_until_ready(jax.tree.leaves(model))
        times.append(time.perf_counter() - start)
    print(json.dumps({"first": times[0], "second": times[1]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.size)
        return
    import jax

    print(f"{datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"{jax.devices()[0].platform}, jax {jax.__version__}, size {args.size}, "
          f"median of {args.repeats} fresh processes")  # fmt: skip
    root = Path(__file__).resolve().parent.parent  # toylib from this checkout
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    results: dict[str, dict[str, list[float]]] = {n: {"first": [], "second": []} for n in ROWS}
    for _ in range(args.repeats):  # rounds interleaved across the rows
        for name, kind in ROWS.items():
            out = subprocess.run(
                [sys.executable, __file__, "--child", kind, "--size", args.size],
                capture_output=True, text=True, check=True, env=env,
            ).stdout  # fmt: skip
            figures = json.loads(out.strip().splitlines()[-1])
            for key in ("first", "second"):
                results[name][key].append(figures[key])
    base = statistics.median(results["toylib eager (nn.Stack)"]["first"])
    print("\n| construction | first build s | second build s | first vs toylib eager |")
    print("|---|---:|---:|---:|")
    for name, r in results.items():
        first, second = statistics.median(r["first"]), statistics.median(r["second"])
        print(f"| {name} | {first:.2f} | {second:.3f} | {first / base:.2f} |")


if __name__ == "__main__":
    main()
