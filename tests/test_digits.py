import importlib
import json
import pathlib
import re

import jax
import numpy as np
import pytest

import toylib as tl

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def examples(monkeypatch):
    # digits_mlp.py imports digits.py as its neighbour, as it does when run as a script.
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return importlib.import_module("digits"), importlib.import_module("digits_mlp")


def params(model):
    return {p: np.asarray(v.value) for p, v in tl.iter_variables(model, tl.Param)}


def assert_outputs_written(result, model_name):
    paths = result["paths"]
    assert paths["loss"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths["loss"].stat().st_size > 10_000  # two panels of curves, not an empty canvas
    page = paths["model"].read_text()
    assert page.startswith("<!DOCTYPE html>") and model_name in page
    history = json.loads(paths["history"].read_text())
    assert history["epochs"] == result["epochs"] and history["steps"] == result["steps"]
    # The checkpoint holds the trained model and optimizer.
    like = (result["model"], result["optimizer"])
    model, optimizer = tl.load(paths["checkpoint"], like)
    for path, value in params(model).items():
        np.testing.assert_array_equal(value, params(result["model"])[path])
    assert int(optimizer.step.value) == result["steps"]


def test_digits_trains_writes_the_outputs_and_resumes(examples, tmp_path, capsys):
    digits, _ = examples
    out = str(tmp_path / "run")
    first = digits.main(["--epochs", "4", "--out", out])
    printed = capsys.readouterr().out
    assert re.search(r"^test accuracy: 0\.\d{4}$", printed, re.MULTILINE)
    assert f"test accuracy: {first['test_accuracy']:.4f}" in printed
    assert printed.count("test loss") == 4  # one line per epoch, also outside a terminal
    assert first["test_accuracy"] > 0.9
    steps_per_epoch = len(digits.load_data().x_train) // digits.BATCH_SIZE
    assert first["epochs"] == 4 and first["steps"] == 4 * steps_per_epoch
    assert first["history"]["epoch"] == [1, 2, 3, 4]
    assert first["history"]["train_loss"][-1] < first["history"]["train_loss"][0]
    assert_outputs_written(first, "CNN")
    before = params(first["model"])

    second = digits.main(["--epochs", "2", "--out", out, "--resume"])
    assert second["epochs"] == 6 and second["steps"] == 6 * steps_per_epoch
    assert int(second["optimizer"].step.value) == second["steps"]
    assert second["history"]["epoch"] == [1, 2, 3, 4, 5, 6]
    # The history carries on from the first run's.
    for key in ("train_loss", "test_accuracy"):
        assert second["history"][key][:4] == first["history"][key]
    after = params(second["model"])
    assert all(not np.array_equal(before[p], after[p]) for p in before)
    assert second["test_accuracy"] > 0.9
    assert second["test_accuracy"] >= first["test_accuracy"] - 0.03
    assert_outputs_written(second, "CNN")


def test_a_resumed_run_matches_one_that_never_stopped(examples, tmp_path, capsys):
    digits, _ = examples
    whole = digits.main(["--epochs", "3", "--out", str(tmp_path / "whole"), "--seed", "1"])
    parts = str(tmp_path / "parts")
    digits.main(["--epochs", "2", "--out", parts, "--seed", "1"])
    resumed = digits.main(["--epochs", "1", "--out", parts, "--seed", "1", "--resume"])
    # Same data order, shifts and learning rate, and the BatchNorm statistics
    # and Adam moments came back from the checkpoint.
    assert resumed["steps"] == whole["steps"]
    for key in ("train_loss", "test_loss", "test_accuracy"):
        np.testing.assert_allclose(resumed["history"][key], whole["history"][key], rtol=1e-4)
    state = lambda m: jax.tree.leaves(tl.state(m))  # noqa: E731
    for a, b in zip(state(resumed["model"]), state(whole["model"]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_resume_without_a_checkpoint_says_how_to_make_one(examples, tmp_path):
    digits, _ = examples
    with pytest.raises(FileNotFoundError, match=r"--resume needs an earlier run's checkpoint"):
        digits.main(["--epochs", "1", "--out", str(tmp_path), "--resume"])
    assert not (tmp_path / "checkpoint").exists()


def test_resume_refuses_a_history_from_another_run(examples, tmp_path, capsys):
    digits, _ = examples
    digits.main(["--epochs", "1", "--out", str(tmp_path)])
    history_file = tmp_path / "history.json"
    history = json.loads(history_file.read_text())
    history["steps"] += 1
    history_file.write_text(json.dumps(history))
    with pytest.raises(ValueError, match=r"are not from the same run"):
        digits.main(["--epochs", "1", "--out", str(tmp_path), "--resume"])


def test_bad_epochs_is_a_command_line_error(examples, capsys):
    digits, _ = examples
    with pytest.raises(SystemExit):
        digits.main(["--epochs", "0"])
    assert "--epochs must be at least 1" in capsys.readouterr().err


def test_digits_mlp_trains_and_resumes(examples, tmp_path, capsys):
    _, digits_mlp = examples
    out = str(tmp_path)
    first = digits_mlp.main(["--epochs", "3", "--out", out])
    assert first["test_accuracy"] > 0.9
    assert isinstance(first["model"], digits_mlp.DigitsMLP)
    assert_outputs_written(first, "DigitsMLP")
    before = params(first["model"])
    dropout_draws = int(first["model"].dropout.rngs.count.value)
    assert dropout_draws > 0

    second = digits_mlp.main(["--epochs", "1", "--out", out, "--resume"])
    assert second["epochs"] == 4 and second["steps"] == first["steps"] * 4 // 3
    assert all(not np.array_equal(before[p], v) for p, v in params(second["model"]).items())
    # The dropout stream continues from the checkpoint rather than restarting.
    assert int(second["model"].dropout.rngs.count.value) > dropout_draws
    assert second["test_accuracy"] > 0.9
    assert "test accuracy: " in capsys.readouterr().out


def test_shift_moves_each_image_by_at_most_max_shift(examples):
    digits, _ = examples
    images = np.zeros((200, 8, 8, 1), np.float32)
    images[:, 4, 3, 0] = 1.0  # one lit pixel
    shifted = digits.shift(images, np.random.default_rng(0), max_shift=1)
    assert shifted.shape == images.shape and shifted.dtype == images.dtype
    rows, cols = np.nonzero(shifted[..., 0].reshape(200, -1) == 1.0)
    assert np.array_equal(rows, np.arange(200))  # each image still has its one pixel
    dy, dx = cols // 8 - 4, cols % 8 - 3
    assert set(dy) == {-1, 0, 1} and set(dx) == {-1, 0, 1}
    assert digits.shift(images, np.random.default_rng(0), max_shift=0) is images
