"""Digits: a small CNN on scikit-learn's 8x8 handwritten digits (``make demo``).

The 1797 images of ``sklearn.datasets.load_digits`` are split 80/20,
stratified by class with a fixed seed, scaled to [0, 1] and fed as
``(N, 8, 8, 1)`` channels-last arrays. Training runs one ``tl.jit`` step per
minibatch: the loss, its gradients (``tl.value_and_grad``), the optimiser
update (``tl.Optimizer``, AdamW with a learning rate decaying by epoch) and
the running metrics (``tl.metrics``), all updated in place inside the
compiled step. Each epoch reshuffles the training images and shifts each one
by up to a pixel (a numpy RNG seeded by the run's seed and the epoch, so a
resumed run sees the same data as one that never stopped).

A rich progress bar shows the running loss and accuracy; each epoch ends with
a line of train and test figures, and the run with ``test accuracy: 0.XXXX``.
It writes, under ``--out`` (default ``out/``):

* ``loss.png``: train and test loss and accuracy per epoch (matplotlib);
* ``model.html``: the trained model, drawn by treescope (``tl.display``);
* ``checkpoint/``: the model and the optimizer (``tl.save``), and
  ``history.json`` next to it: the epochs done and their figures.

``--resume`` loads the checkpoint and the history and trains ``--epochs``
more epochs, continuing the learning-rate schedule and the curves.

This file is also the shared training code: ``examples/digits_mlp.py``
imports ``main`` from it with an MLP in place of the CNN.

Run: ``python examples/digits.py [--epochs N] [--out DIR] [--resume] [--seed S]``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

import toylib as tl
from toylib import nn

EPOCHS = 20
BATCH_SIZE = 32
LEARNING_RATE = 3e-3
# The learning rate is multiplied by this every epoch. A schedule with no end
# (unlike a cosine over a fixed number of steps) lets --resume keep training
# at the rate an uninterrupted run would have had.
DECAY_PER_EPOCH = 0.9
WEIGHT_DECAY = 1e-4
MAX_SHIFT = 1  # pixels; the digits are centred, so a small shift is a plausible new sample
# Reading the metrics waits for the device: do it every few steps, not every step.
REFRESH_EVERY = 8
SPLIT_SEED = 0  # the train/test split is fixed, whatever --seed says
CLASSES = 10

HISTORY_KEYS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy")

NO_CHECKPOINT = """\
digits: --resume needs an earlier run's checkpoint, but {missing} does not exist.
Fix: train once without --resume to create it, or point --out at that run's folder:

    python examples/digits.py --out {out}
    python examples/digits.py --out {out} --resume --epochs 5
"""

HISTORY_MISMATCH = """\
digits: {history} says {steps} optimizer steps were done, but the checkpoint's
optimizer has done {checkpoint_steps}: they are not from the same run.
Fix: resume from a folder written by one run (keep checkpoint/ and history.json
together), or start afresh without --resume.
"""


class Data(NamedTuple):
    """The digits, split: images ``(N, 8, 8, 1)`` float32 in [0, 1], labels ``(N,)`` int32."""

    x_train: Float[np.ndarray, "n_train 8 8 1"]
    y_train: Int[np.ndarray, " n_train"]
    x_test: Float[np.ndarray, "n_test 8 8 1"]
    y_test: Int[np.ndarray, " n_test"]


def load_data(test_size: float = 0.2) -> Data:
    """Load scikit-learn's digits and split them, stratified, with a fixed seed.

    Arguments:
        test_size: the fraction held out for testing.

    Returns:
        ``Data(x_train, y_train, x_test, y_test)`` as numpy arrays.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]  # pixels are 0..16
    labels = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_size, stratify=labels, random_state=SPLIT_SEED
    )
    return Data(x_train, y_train, x_test, y_test)


def shift(
    images: Float[np.ndarray, "n h w c"], rng: np.random.Generator, max_shift: int = MAX_SHIFT
) -> Float[np.ndarray, "n h w c"]:
    """Move each image by its own random offset of up to ``max_shift`` pixels per axis.

    Arguments:
        images: ``(n, h, w, c)`` images on a zero background.
        rng: where the offsets come from.
        max_shift: the largest shift, in pixels (0: the images unchanged).

    Returns:
        The shifted images, zero-filled where they moved away from an edge.
    """
    if max_shift == 0:
        return images
    n, h, w, _ = images.shape
    k = max_shift
    padded = np.pad(images, ((0, 0), (k, k), (k, k), (0, 0)))
    offsets = rng.integers(0, 2 * k + 1, size=(n, 2))
    rows = offsets[:, 0, None] + np.arange(h)  # (n, h): the rows each image takes
    cols = offsets[:, 1, None] + np.arange(w)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


class CNN(tl.Module):
    """Two 3x3 convolutions (with BatchNorm), a 2x2 max pool and two Linear layers.

    Arguments:
        rngs: the ``tl.Rngs`` whose ``params`` stream draws the initial weights.

    Example:
        >>> model = CNN(rngs=tl.Rngs(0))
        >>> model(jnp.zeros((5, 8, 8, 1))).shape
        (5, 10)
    """

    def __init__(self, *, rngs: tl.Rngs) -> None:
        # No conv bias: BatchNorm's own bias follows and would cancel it. A
        # momentum of 0.9 (not 0.99) lets the running statistics keep up with
        # weights that change fast in a run of a few hundred steps.
        self.conv1 = nn.Conv(1, 16, (3, 3), use_bias=False, rngs=rngs)
        self.norm1 = nn.BatchNorm(16, momentum=0.9)
        self.conv2 = nn.Conv(16, 32, (3, 3), use_bias=False, rngs=rngs)
        self.norm2 = nn.BatchNorm(32, momentum=0.9)
        self.hidden = nn.Linear(4 * 4 * 32, 64, rngs=rngs)
        self.out = nn.Linear(64, CLASSES, rngs=rngs)

    def __call__(self, images: Float[Array, "*batch 8 8 1"]) -> Float[Array, "*batch 10"]:
        x = nn.relu(self.norm1(self.conv1(images)))
        x = nn.relu(self.norm2(self.conv2(x)))
        x = nn.max_pool(x, (2, 2))  # 8x8 -> 4x4
        x = x.reshape(*x.shape[:-3], -1)
        return self.out(nn.relu(self.hidden(x)))


def make_optimizer(model: tl.Module, steps_per_epoch: int) -> tl.Optimizer:
    """AdamW whose learning rate decays by ``DECAY_PER_EPOCH`` every epoch.

    Arguments:
        model: the model to train.
        steps_per_epoch: minibatches per epoch (the schedule counts steps).

    Returns:
        A ``tl.Optimizer`` over the model's Params.
    """
    return tl.Optimizer(model, _adamw(steps_per_epoch))


@functools.cache
def _adamw(steps_per_epoch: int) -> optax.GradientTransformation:
    # One transformation object per schedule: it is a static attribute of the
    # Optimizer, so a new one (even with equal settings) is a new program for
    # tl.jit(train_step); runs in one process (a resume) reuse the compiled step.
    schedule = optax.exponential_decay(LEARNING_RATE, steps_per_epoch, DECAY_PER_EPOCH)
    return optax.adamw(schedule, weight_decay=WEIGHT_DECAY)


def make_metrics() -> tl.metrics.MultiMetric:
    """The running mean loss and accuracy, updated inside the jitted steps."""
    return tl.metrics.MultiMetric(loss=tl.metrics.Average("loss"), accuracy=tl.metrics.Accuracy())


def _loss(model: tl.Module, x: Array, y: Array) -> tuple[Array, Array]:
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits


@tl.jit
def train_step(
    model: tl.Module, optimizer: tl.Optimizer, metrics: tl.metrics.MultiMetric, x: Array, y: Array
) -> None:
    """One minibatch: gradients, the optimiser update and the metrics, all in place."""
    (loss, logits), grads = tl.value_and_grad(_loss, has_aux=True)(model, x, y)
    optimizer.update(model, grads)
    metrics.update(loss=loss, logits=logits, labels=y)


@tl.jit
def eval_step(model: tl.Module, metrics: tl.metrics.MultiMetric, x: Array, y: Array) -> None:
    """Add a batch's loss and accuracy to ``metrics`` (the model is not changed)."""
    loss, logits = _loss(model, x, y)
    metrics.update(loss=loss, logits=logits, labels=y)


def _progress(console: Console) -> Progress:
    # In a terminal the bar redraws in place; elsewhere (CI logs, pytest) rich
    # prints only its final state, so the per-epoch lines carry the record.
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("acc {task.fields[accuracy]:.4f}"),
        TimeElapsedColumn(),
        console=console,
    )


def _read(metrics: tl.metrics.MultiMetric) -> dict[str, float]:
    return {name: float(value) for name, value in metrics.compute().items()}


def _restore(
    out: Path, model: tl.Module, optimizer: tl.Optimizer
) -> tuple[tl.Module, tl.Optimizer, dict]:
    checkpoint, history_file = out / "checkpoint", out / "history.json"
    for missing in (checkpoint, history_file):
        if not missing.exists():
            raise FileNotFoundError(NO_CHECKPOINT.format(missing=missing, out=out))
    model, optimizer = tl.load(checkpoint, (model, optimizer))
    history = json.loads(history_file.read_text())
    if history["steps"] != int(optimizer.step.value):
        raise ValueError(
            HISTORY_MISMATCH.format(
                history=history_file,
                steps=history["steps"],
                checkpoint_steps=int(optimizer.step.value),
            )
        )
    return model, optimizer, history


def _write_json(path: Path, data: dict) -> None:
    # Written aside and renamed, so a crash never leaves half a history.
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data))
    os.replace(partial, path)


def plot_history(history: dict, path: Path, title: str) -> None:
    """Draw the train and test loss and accuracy per epoch into ``path`` (a PNG).

    Arguments:
        history: ``{"epoch": [...], "train_loss": [...], ...}`` as ``train`` keeps it.
        path: the image file to write.
        title: the figure's title.
    """
    # The object-oriented API draws with the Agg canvas and touches no global
    # pyplot state, so no display is needed.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.6), layout="constrained")
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    epochs = history["epoch"]
    for split in ("train", "test"):
        loss_axes.plot(epochs, history[f"{split}_loss"], marker=".", label=split)
        accuracy_axes.plot(epochs, history[f"{split}_accuracy"], marker=".", label=split)
    loss_axes.set(xlabel="epoch", ylabel="cross-entropy", yscale="log", title="loss")
    accuracy_axes.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(title)
    figure.savefig(path, dpi=100)


def train(
    make_model: Callable[..., tl.Module],
    *,
    epochs: int = EPOCHS,
    out: str | os.PathLike = "out",
    resume: bool = False,
    seed: int = 0,
    max_shift: int = MAX_SHIFT,
    name: str = "digits",
    console: Console | None = None,
) -> dict[str, Any]:
    """Train ``make_model(rngs=...)`` on the digits and write the three outputs.

    Arguments:
        make_model: builds the model from ``rngs=tl.Rngs(seed)``; it maps
            ``(batch, 8, 8, 1)`` images to ``(batch, 10)`` logits.
        epochs: epochs to train (more epochs, with ``resume``).
        out: the folder for ``loss.png``, ``model.html``, ``checkpoint/`` and
            ``history.json`` (created if missing).
        resume: continue from the checkpoint and history in ``out``.
        seed: seeds the initial weights, the shuffling and the shifts.
        max_shift: how far (pixels) training images are shifted at random;
            0 for a model without translation invariance, like an MLP.
        name: the run's name, shown in the progress bar and the plot.
        console: where the progress goes (default: a rich Console on stdout).

    Returns:
        ``{"test_accuracy", "test_loss", "epochs" (done in all), "steps",
        "history", "model", "optimizer", "seconds", "paths"}``; ``paths``
        maps ``"loss"``, ``"model"``, ``"checkpoint"`` and ``"history"`` to
        the files written.
    """
    if epochs < 1:
        raise ValueError(f"digits.train(epochs={epochs}): train at least one epoch.")
    start = time.perf_counter()
    console = console or Console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_data()
    steps_per_epoch = len(data.x_train) // BATCH_SIZE  # the last partial batch is dropped
    model = make_model(rngs=tl.Rngs(seed))
    optimizer = make_optimizer(model, steps_per_epoch)
    history: dict[str, Any] = {"epochs": 0, "steps": 0, "epoch": []}
    history.update({key: [] for key in HISTORY_KEYS})
    if resume:
        model, optimizer, history = _restore(out, model, optimizer)
    metrics = make_metrics()
    first, last = history["epochs"] + 1, history["epochs"] + epochs
    x_test, y_test = jnp.asarray(data.x_test), jnp.asarray(data.y_test)

    with _progress(console) as progress:
        nothing_yet = {"loss": float("nan"), "accuracy": float("nan")}
        task = progress.add_task(name, total=epochs * steps_per_epoch, **nothing_yet)
        for epoch in range(first, last + 1):
            rng = np.random.default_rng([seed, epoch])
            order = rng.permutation(len(data.x_train))
            images, labels = shift(data.x_train[order], rng, max_shift), data.y_train[order]
            progress.update(task, description=f"{name} epoch {epoch}/{last}")
            model.train()
            metrics.reset()
            for step in range(steps_per_epoch):
                batch = slice(step * BATCH_SIZE, (step + 1) * BATCH_SIZE)
                train_step(model, optimizer, metrics, images[batch], labels[batch])
                if (step + 1) % REFRESH_EVERY == 0 or step + 1 == steps_per_epoch:
                    progress.update(task, **_read(metrics))
                progress.advance(task)
            train_figures = _read(metrics)
            model.eval()
            metrics.reset()
            eval_step(model, metrics, x_test, y_test)
            test_figures = _read(metrics)
            history["epoch"].append(epoch)
            for key, value in train_figures.items():
                history[f"train_{key}"].append(value)
            for key, value in test_figures.items():
                history[f"test_{key}"].append(value)
            progress.console.print(
                f"epoch {epoch:3d}  train loss {train_figures['loss']:.4f}"
                f" acc {train_figures['accuracy']:.4f}"
                f"  test loss {test_figures['loss']:.4f} acc {test_figures['accuracy']:.4f}"
            )
    history["epochs"] = last
    history["steps"] = int(optimizer.step.value)

    paths = {
        "loss": out / "loss.png",
        "model": out / "model.html",
        "checkpoint": out / "checkpoint",
        "history": out / "history.json",
    }
    # The checkpoint first, then the history that names its step count: a
    # crash in between is caught by --resume's consistency check.
    tl.save(paths["checkpoint"], (model, optimizer))
    _write_json(paths["history"], history)
    plot_history(history, paths["loss"], f"{name}: {type(model).__name__}")
    tl.display(model, path=paths["model"])
    test_accuracy = history["test_accuracy"][-1]
    print(f"test accuracy: {test_accuracy:.4f}")
    return {
        "test_accuracy": test_accuracy,
        "test_loss": history["test_loss"][-1],
        "epochs": history["epochs"],
        "steps": history["steps"],
        "history": history,
        "model": model,
        "optimizer": optimizer,
        "seconds": time.perf_counter() - start,
        "paths": paths,
    }


def parse_args(argv: Sequence[str] | None, description: str, out: str) -> argparse.Namespace:
    """The command line: ``--epochs``, ``--out``, ``--resume``, ``--seed``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="epochs to train (%(default)s)")
    parser.add_argument("--out", default=out, help="output folder (%(default)s)")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the checkpoint in --out"
    )
    parser.add_argument("--seed", type=int, default=0, help="weights and shuffling (%(default)s)")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    return args


def main(
    argv: Sequence[str] | None = None,
    *,
    make_model: Callable[..., tl.Module] = CNN,
    max_shift: int = MAX_SHIFT,
    name: str = "digits",
    out: str = "out",
) -> dict[str, Any]:
    """Parse the command line and train (see ``train`` for what comes back).

    Arguments:
        argv: the arguments (default ``sys.argv[1:]``).
        make_model: the model to train (``CNN`` here; ``digits_mlp.py`` passes its MLP).
        max_shift: the training images' random shift, in pixels.
        name: the run's name.
        out: the default ``--out``.
    """
    args = parse_args(argv, description=(__doc__ or "").splitlines()[0], out=out)
    return train(
        make_model,
        epochs=args.epochs,
        out=args.out,
        resume=args.resume,
        seed=args.seed,
        max_shift=max_shift,
        name=name,
    )


if __name__ == "__main__":
    main()
