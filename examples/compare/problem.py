"""The problem every script in examples/compare solves, and what they share around it.

The toylib notebook's linear regression: n = 120 examples in d = 10
dimensions, ``np.random.seed(31)``, true weights drawn with
``randint(0, 10)``, unit Gaussian noise; the first 100 rows train, the last
20 test (the same draw as ``examples/linear_regression.py``). Every library
trains full-batch with ``optax.adam(LEARNING_RATE)`` for ``EPOCHS`` steps,
starting from a LeCun-normal kernel and a zero bias (Flax's defaults).

Nothing here is counted as "model + training code": it is the harness.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import treescope

# Adam at 0.1 reaches the least-squares fit in about 200 full-batch steps;
# 300 leaves a margin, so every library ends at the same weights.
EPOCHS = 300
LEARNING_RATE = 0.1
SEED = 0  # the initialisation seed (the data has its own, 31)

REPO = pathlib.Path(__file__).resolve().parents[2]
OUT_DIR = REPO / "out" / "compare"


@dataclasses.dataclass(frozen=True)
class Data:
    """The train/test split as float32 device arrays, and the true weights."""

    x_train: jax.Array  # (100, 10)
    y_train: jax.Array  # (100,)
    x_test: jax.Array  # (20, 10)
    y_test: jax.Array  # (20,)
    weights_true: np.ndarray  # (10,) integers


def make_data(n: int = 120, d: int = 10) -> Data:
    """The notebook's data: 100 train and ``n - 100`` test rows in ``d`` dimensions."""
    np.random.seed(31)
    xs = np.random.normal(size=(n, d))
    weights_true = np.random.randint(0, 10, size=(d,))
    ys = np.dot(xs, weights_true) + np.random.normal(size=(n,))
    # On the device once, so a timed step moves no data from the host.
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return Data(f32(xs[:100]), f32(ys[:100]), f32(xs[100:]), f32(ys[100:]), weights_true)


def mse(predictions: jax.Array, targets: jax.Array) -> float:
    """Mean squared error as a Python float (for reporting, after training)."""
    return float(jnp.mean((jnp.asarray(predictions) - targets) ** 2))


def html_path(library: str, out_dir: pathlib.Path | str | None = None) -> pathlib.Path:
    """``<out_dir>/<library>.html`` (default ``out/compare/`` in the repository), folders made."""
    out = pathlib.Path(OUT_DIR if out_dir is None else out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out / f"{library}.html"


PAGE = """<!DOCTYPE html>
<html>
<head><meta charset="utf-8"><title>{title}</title></head>
<body>
{body}
</body>
</html>
"""


def write_html(
    obj: object, library: str, out_dir: pathlib.Path | str | None = None
) -> pathlib.Path:
    """Write treescope's rendering of ``obj`` as a standalone page; return its path."""
    path = html_path(library, out_dir)
    body = treescope.render_to_html(obj)
    path.write_text(PAGE.format(title=f"{library}: trained model", body=body), encoding="utf-8")
    return path


def report(library: str, data: Data, recovered: np.ndarray, test_mse: float) -> None:
    """Print the true and recovered weights side by side, then the test MSE."""
    print(f"== {library}")
    print(f"{'true':>6} {'recovered':>10}")
    for t, r in zip(data.weights_true, recovered, strict=True):
        print(f"{t:6d} {r:10.3f}")
    print(f"test MSE: {test_mse:.4f}")
