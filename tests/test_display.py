"""Tests for tl.display and the treescope handlers for Modules, Variables and States."""

import dataclasses
import importlib
import re
import subprocess
import sys
import types

import jax.numpy as jnp
import treescope

import toylib as tl
from toylib import nn

display_impl = sys.modules["toylib.display"]
handlers = importlib.import_module("toylib._treescope")


def shown(capsys, obj):
    assert tl.display(obj) is None
    return capsys.readouterr().out


def test_terminal_text_shows_structure_not_values(capsys):
    mlp = nn.MLP([3, 4, 2], rngs=0)
    text = shown(capsys, mlp)
    lines = text.splitlines()
    assert lines[0] == "MLP(  # Param: 26 (104 B)"
    assert "  layers=[" in lines
    assert "    Linear(  # [0] Param: 16 (64 B)" in lines
    assert "      kernel=Param float32[3, 4]," in lines
    assert "      bias=Param float32[4]," in lines
    assert "  activation=jax.nn.relu," in lines
    assert lines[-1] == ")"
    # No array values: the first kernel entry printed any way appears nowhere.
    value = float(mlp.layers[0].kernel.value[0, 0])
    assert f"{value:.3f}"[:-1] not in text


class Raw(tl.Module):
    def __init__(self):
        self.table = jnp.arange(12.0).reshape(3, 4) + 0.5  # a bare array attribute
        self.layer = nn.Linear(2, 2, rngs=0)


def test_bare_arrays_in_text_are_summaries(capsys):
    text = shown(capsys, Raw())
    assert "  table=<jax.Array float32(3, 4) " in text
    assert "4.5" not in text and "[[" not in text  # treescope's summary, not the values


def test_counters_and_metadata_and_abstract_values(capsys):
    counter = tl.Variable(jnp.array(3))
    assert shown(capsys, counter).strip() == "Variable int32[] = 3"
    w = tl.Param(jnp.ones((3, 2)), sharding=("embed", "mlp"))
    assert shown(capsys, w).strip() == "Param float32[3, 2] sharding=('embed', 'mlp')"
    abstract = tl.eval_shape(lambda: nn.Linear(1024, 512, rngs=0))
    assert "kernel=Param float32[1024, 512]," in shown(capsys, abstract)


class Tied(tl.Module):
    def __init__(self):
        self.encoder = nn.Embed(10, 4, rngs=0)
        self.decoder = self.encoder  # the same Module twice
        self.bias = tl.Param(jnp.zeros(4))
        self.weights = {"embedding": self.encoder.embedding, "bias": self.bias}


def test_shared_references_drawn_once_and_marked(capsys):
    text = shown(capsys, Tied())
    assert text.count("Embed(") == 2
    assert "  encoder=Embed(  # Param: 40 (160 B)" in text
    assert "decoder=Embed(...),  # shared with model.encoder" in text
    assert "shared with model.encoder.embedding" in text
    assert "shared with model.bias" in text
    assert text.splitlines()[0] == "Tied(  # Param: 44 (176 B)"  # the tied table counted once
    assert "Repeated python obj" not in text


def test_sharing_across_the_root_and_when_folded():
    p = tl.Param(jnp.ones(2))
    text = treescope.render_to_text({"a": p, "b": p})
    assert "'b': Param float32[2],  # shared with model['a']" in text
    # A parent folded onto one line keeps the mark inline (line comments are dropped there).
    with treescope.using_expansion_strategy(max_height=1, target_width=200):
        folded = treescope.render_to_text([p, p])
    assert folded == "[Param float32[2], Param float32[2] <shared with model[0]>]"


class Loop(tl.Module):
    def __init__(self):
        self.layer = nn.Linear(2, 2, rngs=0)
        self.children = [self]  # a reference cycle


def test_cycles_terminate(capsys):
    text = shown(capsys, Loop())
    assert "cyclic reference to Loop" in text
    assert text.count("Linear(") == 1


def test_treescope_entry_points_use_the_handlers():
    model = Tied()
    text = treescope.render_to_text(model)
    assert "Param float32[10, 4]" in text and "shared with model.encoder" in text
    assert "PyTree children" not in text and "object at 0x" not in text
    # A renderer of the user's own, without toylib's context builder: the
    # outermost Module keeps the record, sharing is still marked.
    renderer = treescope.active_renderer.get()
    bare = dataclasses.replace(
        renderer,
        context_builders=[b for b in renderer.context_builders if b is not handlers._fresh_record],
    )
    with treescope.active_renderer.set_scoped(bare):
        assert "shared with model.encoder" in treescope.render_to_text(model)


def test_state_rendering(capsys):
    state = tl.state(nn.Linear(2, 3, rngs=0))
    assert shown(capsys, state).strip() == (
        "State({'kernel': Param float32[2, 3], 'bias': Param float32[3]})"
    )


def test_traced_values_render(capsys):
    seen = []

    @tl.jit
    def f(layer):
        seen.append(treescope.render_to_text(layer))
        return layer(jnp.ones(2))

    f(nn.Linear(2, 3, rngs=0))
    assert "kernel=Param float32[2,3] (traced)" in seen[0]


def test_html_file(tmp_path):
    target = tmp_path / "model.html"
    model = nn.Sequential(nn.Linear(2, 3, rngs=0), nn.Dropout(0.1, rngs=1))
    assert tl.display(model, path=str(target)) == target
    page = target.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<title>toylib: Sequential</title>" in page
    assert "treescope-container" in page  # treescope's interactive view
    for word in ("Sequential", "Linear", "Dropout", "Param", "RngState", "float32[2, 3]"):
        assert word in page


def test_notebook_uses_treescope_display(monkeypatch, capsys):
    shell = types.SimpleNamespace(kernel=object())  # what an IPython kernel's shell has
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell))
    calls = []
    monkeypatch.setattr(treescope, "display", lambda obj, **kw: calls.append((obj, kw)))
    model = nn.Linear(2, 2, rngs=0)
    assert tl.display(model) is None
    assert calls == [(model, {"ignore_exceptions": True})]
    assert capsys.readouterr().out == ""
    # A terminal IPython shell has no kernel: text.
    monkeypatch.setitem(
        sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: types.SimpleNamespace())
    )
    assert tl.display(model) is None
    assert calls == [(model, {"ignore_exceptions": True})]
    assert capsys.readouterr().out.startswith("Linear(")


def test_variable_sizes_count_each_variable_once():
    model = Tied()
    sizes = display_impl.variable_sizes(model)
    assert sizes == {tl.Param: (44, 44 * 4)}
    bn = nn.BatchNorm(3, rngs=0)
    assert display_impl.variable_sizes(bn) == {tl.BatchStat: (6, 24), tl.Param: (6, 24)}
    stream = tl.Rngs(0).default
    assert display_impl.variable_sizes(stream) == {tl.RngState: (2, 8 + 4)}
    assert display_impl.format_bytes(1500) == "1.5 KB"
    assert display_impl.format_bytes(12) == "12 B"
    assert display_impl.format_bytes(3_200_000) == "3.2 MB"


def test_list_elements_show_their_index(capsys):
    class Bank(tl.Module):
        def __init__(self):
            self.layers = [nn.Linear(2, 2, rngs=i) for i in range(3)]
            # Too long for one line, so one Variable per line.
            self.scales = tuple(tl.Param(jnp.ones((i, 100, 100))) for i in range(1, 7))

    lines = shown(capsys, Bank()).splitlines()
    assert "  scales=(" in lines
    for i in range(3):
        assert f"    Linear(  # [{i}] Param: 6 (24 B)" in lines
    assert "    Param float32[2, 100, 100],  # [1]" in lines


# The checkbox that folds a node, then the node's type name: checked is unfolded.
TOGGLE = re.compile(
    r'<input type="checkbox" class="foldable_node_toggle"( checked)?></input>'
    r'<span class="colored_line topline hch_space_left"><span class="when_roundtrip">'
    r'<span class="qualname_prefix">[\w.]+</span></span>(\w+)\('
)


def test_html_unfolds_modules_as_deep_as_the_text_view(tmp_path):
    def block(rngs):
        return nn.Sequential(nn.LayerNorm(8, rngs=rngs), nn.MLP([8, 32, 8], rngs=rngs))

    # Built under tl.jit: one compile, not one per eager initialiser op.
    model = tl.jit(lambda: nn.Sequential(nn.Linear(4, 8, rngs=0), nn.Stack(block, 2, rngs=1)))()
    names = ["Sequential", "Linear", "Stack", "Sequential", "LayerNorm", "MLP", "Linear", "Linear"]
    # treescope's own layout folds the nested block onto one line...
    default = treescope.render_to_html(model, compressed=False)
    found = [(m.group(2), bool(m.group(1))) for m in TOGGLE.finditer(default)]
    assert [name for name, _ in found] == names and not all(open_ for _, open_ in found)
    # ...tl.display's page unfolds every Module, as the text view does.
    page = tl.display(model, path=tmp_path / "model.html").read_text(encoding="utf-8")
    assert [(m.group(2), bool(m.group(1))) for m in TOGGLE.finditer(page)] == [
        (name, True) for name in names
    ]
    assert "  # [1] Param" in page


LAZY_CHECK = """
import sys
import toylib as tl
from toylib import nn
heavy = ("rich", "treescope", "orbax", "optax", "jax.extend")  # jax.extend loads Pallas
heavy = [m for m in heavy if m in sys.modules]
assert not heavy, f"import toylib imported {heavy}"

class Tied(tl.Module):
    def __init__(self):
        self.encoder = nn.Embed(10, 4, rngs=0)
        self.decoder = self.encoder

import treescope  # the user's own treescope call: toylib's handlers load on first use
text = treescope.render_to_text({"a": Tied(), "b": 1})
assert "Embed(" in text and "shared with model['a'].encoder" in text, text
assert "PyTree children" not in text, text
print("ok")
"""


def test_import_toylib_does_not_import_rich_treescope_orbax_optax():
    out = subprocess.run(
        [sys.executable, "-c", LAZY_CHECK], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
