"""examples/compare: one linear model in several libraries (Equinox, Penzai not imported)."""

import doctest
import importlib
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

COMPARE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "compare"
DOC = COMPARE.parents[1] / "docs" / "comparison.md"


@pytest.fixture
def compare(monkeypatch):
    """Import a script of examples/compare by name (they import their sibling `problem`)."""
    monkeypatch.syspath_prepend(str(COMPARE))
    return importlib.import_module


@pytest.mark.parametrize("library", ["toylib", "nnx", "linen"])
def test_script_trains_and_writes_its_page(compare, library, tmp_path, capsys):
    result = compare(f"{library}_linear").main(out_dir=tmp_path / "pages", verbose=True)
    weights_true = compare("problem").make_data().weights_true

    assert result["test_mse"] < 2.0
    assert np.abs(result["recovered"] - weights_true).max() < 0.35
    html = pathlib.Path(result["html"])
    assert html == tmp_path / "pages" / f"{library}.html"
    page = html.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "treescope" in page
    printed = capsys.readouterr().out
    assert "recovered" in printed and f"test MSE: {result['test_mse']:.4f}" in printed

    # The timing callable runs one more step on the trained state: the loss
    # stays at the least-squares optimum (about 0.68 on the training rows).
    loss = result["step"]()
    assert loss.shape == () and 0.5 < float(loss) < 1.0


def test_importing_a_script_does_no_work(compare, capsys):
    # Import-time work would print (main() reports) or train before anyone asked.
    for library in ["toylib", "nnx", "linen"]:
        importlib.reload(compare(f"{library}_linear"))
    assert capsys.readouterr().out == ""


def test_count_lines_counts_code_between_the_markers(compare):
    run_all = compare("run_all")
    source = "\n".join(
        [
            "import jax  # outside: not counted",
            run_all.BEGIN,
            "# a comment line",
            "",
            "@jax.jit",
            "def step(x):  # a trailing comment still counts as code",
            "    # indented comment",
            "    return x + 1",
            "   ",
            run_all.END,
            "step(1)",
        ]
    )
    assert run_all.count_lines(source) == 3
    assert run_all.marked_region(source)[0] == "# a comment line"


def test_count_lines_without_markers_says_how_to_fix(compare):
    run_all = compare("run_all")
    with pytest.raises(ValueError, match=r"(?s)script\.py: expected exactly one line .*Fix: put"):
        run_all.count_lines("x = 1\n", where="script.py")
    backwards = f"{run_all.END}\nx = 1\n{run_all.BEGIN}\n"
    with pytest.raises(ValueError, match="found 1 begin and 1 end"):
        run_all.count_lines(backwards)


def test_the_scripts_count_their_regions(compare):
    run_all = compare("run_all")
    for library in run_all.LIBRARIES:
        path = run_all.script(library)
        assert 10 < run_all.count_lines(path.read_text(), str(path)) < 60


def test_run_all_docstring_examples(compare):
    run_all = compare("run_all")
    failures, tried = doctest.testmod(run_all, optionflags=doctest.ELLIPSIS)
    assert tried >= 5 and failures == 0


def test_time_steps_interleaves_and_reports_each_library(compare):
    run_all = compare("run_all")
    calls = []

    def make(name):
        def step():
            calls.append(name)
            return jnp.zeros(())

        return step

    times = run_all.time_steps({"a": make("a"), "b": make("b")}, rounds=2, per_batch=3, warmup=1)
    assert set(times) == {"a", "b"} and all(t > 0 for t in times.values())
    # One warm-up each, then round 0 runs a before b and round 1 b before a.
    assert calls == ["a", "b"] + ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3


def test_doc_shows_the_current_code_and_a_table(compare):
    run_all = compare("run_all")
    doc = DOC.read_text(encoding="utf-8")
    begin, end = "<!-- begin generated: code -->\n", "\n<!-- end generated: code -->"
    assert doc[doc.index(begin) + len(begin) : doc.index(end)] == run_all.code_section(), (
        "docs/comparison.md is out of date: run `make compare`"
    )
    start = doc.index("<!-- begin generated: table -->")
    table = doc[start : doc.index("<!-- end generated: table")]
    for title in run_all.TITLES.values():
        assert f"| {title} | " in table


def test_replace_section_refuses_a_doc_without_markers(compare, tmp_path):
    run_all = compare("run_all")
    with pytest.raises(ValueError, match=r"(?s)no generated section 'table'.*--no-doc"):
        run_all.replace_section("no markers here", "table", "x", tmp_path / "doc.md")
