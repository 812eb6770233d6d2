"""Checkpoint throughput: tl.save / tl.load vs plain orbax and numpy, on a ~200 MB model.

The model: an MLP of width 4096 with 3 layers (50.3 M float32 parameters,
201 MB). Every variant stores the same arrays and reads them back onto the
device, blocking until done:

* toylib:        tl.save(path, model) and tl.load(path, like) (like: a live
                 model of the same configuration); the save writes a CRC-32 of
                 every file, the load checks it (verify=True, the default)
* toylib no-verify: tl.load(path, like, verify=False)
* orbax:         ocp.StandardCheckpointer().save / .restore of the same
                 arrays as a dict (orbax's defaults: OCDBT, zstd compression;
                 async writes waited for), restored into the arrays' shardings
* orbax as toylib: orbax's PyTreeCheckpointHandler with the storage options
                 tl.save uses (no OCDBT, no compression): the ratio to it is
                 what toylib's own work (digests, lock, checks) costs
* numpy:         numpy.save of each array into a directory, numpy.load and
                 jax.device_put back
* toylib bytes:  tl.save_bytes / tl.load_bytes, in memory (no file)

Rounds are interleaved so machine noise hits all alike; figures are the
median over rounds of MB/s (1 MB = 10**6 bytes), and the ratio is against
orbax in the same run. Files go to a temporary directory on the local disk
(reads come from the page cache for every variant alike).

Run: .venv/bin/python benchmarks/checkpoint.py [--rounds 5] [--width 4096]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable

import jax
import numpy as np

import toylib as tl
from toylib import nn


def block(tree: object) -> None:
    jax.block_until_ready(jax.tree.leaves(tl.state(tree)) if isinstance(tree, tl.Module) else tree)


def variants(root: str, model: nn.MLP, like: nn.MLP) -> dict[str, tuple[Callable, Callable]]:
    import orbax.checkpoint as ocp

    arrays = {"/".join(map(str, p)): v.value for p, v in tl.state(model).flat().items()}
    orbax_path = os.path.join(root, "orbax")
    numpy_dir = os.path.join(root, "numpy")
    blob: list[bytes] = []
    checkpointer = ocp.StandardCheckpointer()
    abstract = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding) for k, v in arrays.items()
    }

    def orbax_save() -> None:
        checkpointer.save(orbax_path, arrays, force=True)
        checkpointer.wait_until_finished()

    def orbax_load() -> None:
        block(checkpointer.restore(orbax_path, abstract))

    plain = ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_compression=False)
    plain_path = os.path.join(root, "orbax-plain")
    with_sharding = {k: ocp.ArrayRestoreArgs(sharding=v.sharding) for k, v in abstract.items()}

    def plain_save() -> None:
        with ocp.Checkpointer(plain) as c:
            c.save(plain_path, args=ocp.args.PyTreeSave(arrays), force=True)

    def plain_load() -> None:
        with ocp.Checkpointer(plain) as c:
            restore = ocp.args.PyTreeRestore(item=abstract, restore_args=with_sharding)
            block(c.restore(plain_path, args=restore))

    def numpy_save() -> None:
        shutil.rmtree(numpy_dir, ignore_errors=True)
        os.makedirs(numpy_dir)
        for i, x in enumerate(arrays.values()):
            np.save(os.path.join(numpy_dir, f"{i}.npy"), np.asarray(x))

    def numpy_load() -> None:
        block(
            [
                jax.device_put(np.load(os.path.join(numpy_dir, f"{i}.npy")))
                for i in range(len(arrays))
            ]
        )

    def bytes_save() -> None:
        blob[:] = [tl.save_bytes(model)]

    toylib_path = os.path.join(root, "toylib")
    return {
        "toylib tl.save / tl.load": (
            lambda: tl.save(toylib_path, model),
            lambda: block(tl.load(toylib_path, like)),
        ),
        "toylib, load verify=False": (
            lambda: tl.save(toylib_path, model),
            lambda: block(tl.load(toylib_path, like, verify=False)),
        ),
        "orbax StandardCheckpointer": (orbax_save, orbax_load),
        "orbax as toylib (no OCDBT, no compression)": (plain_save, plain_load),
        "numpy.save / numpy.load": (numpy_save, numpy_load),
        "toylib save_bytes (memory)": (bytes_save, lambda: block(tl.load_bytes(blob[0], like))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--width", type=int, default=4096)
    args = parser.parse_args()
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's info chatter

    model = nn.MLP([args.width] * 4, rngs=0)
    like = nn.MLP([args.width] * 4, rngs=1)
    block(model)
    size = sum(x.nbytes for x in jax.tree.leaves(tl.state(model)))
    print(f"model: {size / 1e6:.0f} MB in {len(jax.tree.leaves(tl.state(model)))} arrays")
    root = tempfile.mkdtemp(prefix="toylib-bench-")
    try:
        runs = variants(root, model, like)
        speeds: dict[str, dict[str, list[float]]] = {n: {"save": [], "load": []} for n in runs}
        for save, load in runs.values():  # warm-up: imports, first compiles
            save()
            load()
        for _ in range(args.rounds):
            for name, (save, load) in runs.items():
                for kind, fn in (("save", save), ("load", load)):
                    start = time.perf_counter()
                    fn()
                    speeds[name][kind].append(size / 1e6 / (time.perf_counter() - start))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    base = {k: float(np.median(speeds["orbax StandardCheckpointer"][k])) for k in ("save", "load")}
    same = "orbax as toylib (no OCDBT, no compression)"
    like_base = {k: float(np.median(speeds[same][k])) for k in ("save", "load")}
    machine = platform.processor() or platform.machine()
    print(f"{machine}, {os.cpu_count()} cores, jax {jax.__version__}")
    print(f"median over {args.rounds} interleaved rounds; ratios to orbax in the same run")
    print("(vs orbax: its defaults; vs same: orbax with tl.save's storage options)\n")
    print("| variant | save MB/s | vs orbax | vs same | load MB/s | vs orbax | vs same |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, kinds in speeds.items():
        row = [name]
        for kind in ("save", "load"):
            speed = float(np.median(kinds[kind]))
            row += [f"{speed:.0f}", f"{speed / base[kind]:.2f}", f"{speed / like_base[kind]:.2f}"]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
