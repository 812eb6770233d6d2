import importlib.util
import pathlib

import numpy as np

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_linear_regression_recovers_the_true_weights(capsys):
    result = load("linear_regression").main()
    assert np.abs(result["true"] - result["recovered"]).max() < 0.35
    assert result["test_mse"] < 2.0
    printed = capsys.readouterr().out
    assert "true  recovered" in printed and "test MSE" in printed


def test_polynomial_regression_loss_falls(capsys):
    result = load("polynomial_regression").main(epochs=1000, every=100)
    losses = result["losses"]
    assert losses[-1] < 0.02 < losses[0]
    assert result["final_loss"] < 0.02
    assert "loss" in capsys.readouterr().out


def test_named_axes_trains_named_dot_and_matches_the_gpt_logits(capsys):
    result = load("named_axes").main()
    regression = result["regression"]
    assert np.abs(regression["true"] - regression["recovered"]).max() < 0.35
    assert regression["test_mse"] < 2.0
    assert result["gpt"]["max_diff"] < 1e-5 and result["gpt"]["named"].shape == (2, 16, 256)
    assert "max |positional - named|" in capsys.readouterr().out
