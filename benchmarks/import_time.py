"""Import time: what ``import toylib`` adds to ``import jax``, vs Equinox and Flax NNX.

Every measurement runs in a fresh Python subprocess (nothing cached in
``sys.modules``): the subprocess imports jax, then times the import of the
library alone with ``time.perf_counter``, so the figure is what the library
adds on top of jax. ``import jax`` itself is timed the same way from an
empty interpreter. Rounds are interleaved (every target once per round) and
the figure is the median over rounds; the ratio is the median over rounds
of the ratio to Equinox in the same round.

Run: python benchmarks/import_time.py [--rounds 21] [--only toylib equinox]
(from the repository root: the subprocesses import the toylib found there)
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys

import numpy as np

PROBE = """\
import time
{before}
start = time.perf_counter()
import {target}
elapsed = time.perf_counter() - start
import sys
print(elapsed, int(any(m in sys.modules for m in ("rich", "treescope", "orbax"))))
"""

# (label, modules imported before the clock starts, module timed)
TARGETS = [
    ("jax (from nothing)", "", "jax"),
    ("toylib (over jax)", "import jax, jax.numpy", "toylib"),
    ("equinox (over jax)", "import jax, jax.numpy", "equinox"),
    ("flax.nnx (over jax)", "import jax, jax.numpy", "flax.nnx"),
    ("rich.console (over jax)", "import jax, jax.numpy", "rich.console"),
    ("treescope (over jax)", "import jax, jax.numpy", "treescope"),
    ("optax (over jax)", "import jax, jax.numpy", "optax"),
]


def probe(before: str, target: str) -> tuple[float, bool]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(before=before, target=target)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return float(out[0]), out[1] == "1"


def measure(rounds: int, only: list[str] | None) -> None:
    available = []
    for label, before, target in TARGETS:
        if only and not any(o in label for o in only):
            continue
        try:
            probe(before, target)
        except subprocess.CalledProcessError:
            print(f"{label} skipped (not installed)")
            continue
        available.append((label, before, target))
    times: dict[str, list[float]] = {label: [] for label, _, _ in available}
    heavy: dict[str, bool] = {}
    for _ in range(rounds):
        for label, before, target in available:
            seconds, loaded = probe(before, target)
            times[label].append(seconds)
            heavy[label] = loaded
    print(
        f"python {platform.python_version()}, {platform.processor() or platform.machine()}, "
        f"median of {rounds} fresh processes each"
    )
    base = np.array(times.get("equinox (over jax)", []))
    print(f"{'import':<26} {'seconds':>8} {'vs equinox':>10}  loads rich/treescope/orbax")
    for label, ts in times.items():
        median = float(np.median(ts))
        # Median of per-round ratios: a load change between rounds cancels out.
        ratio = f"{float(np.median(np.array(ts) / base)):>10.2f}" if base.size else f"{'':>10}"
        print(f"{label:<26} {median:>8.3f} {ratio}  {'yes' if heavy[label] else 'no'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--only", nargs="*", help="substrings of the labels to run")
    args = parser.parse_args()
    measure(args.rounds, args.only)


if __name__ == "__main__":
    main()
