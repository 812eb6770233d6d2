"""tl.nx: NamedArray, tag/untag/unwrap, nmap, named arithmetic and reductions, the errors,
and NamedArrays held by Variables through toylib's transforms, checkpoints and display."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import treescope

import toylib as tl
from toylib import nn, nx


def named(shape, *names, start=0.0):
    size = int(np.prod(shape))
    return nx.wrap(jnp.arange(start, start + size, dtype=jnp.float32).reshape(shape), *names)


# -- the array and its axes ------------------------------------------------------------


def test_wrap_tag_untag_unwrap_round_trip():
    a = jnp.arange(24.0).reshape(2, 3, 4)
    x = nx.wrap(a)
    assert x.positional_shape == (2, 3, 4) and x.named_shape == {}
    x = x.tag("batch", "seq", "features")
    assert x.positional_shape == () and x.named_shape == {"batch": 2, "seq": 3, "features": 4}
    assert x.dtype == jnp.float32
    # untag puts the axes in the order asked for.
    np.testing.assert_array_equal(x.unwrap("features", "batch", "seq"), a.transpose(2, 0, 1))
    np.testing.assert_array_equal(x.untag("batch", "seq", "features").unwrap(), a)
    partly = x.untag("seq")
    assert partly.positional_shape == (3,) and partly.named_shape == {"batch": 2, "features": 4}
    assert nx.wrap(a, "a", "b", "c").named_shape == {"a": 2, "b": 3, "c": 4}


def test_tag_after_untag_keeps_the_values_and_the_order_of_names():
    x = named((2, 3), "a", "b")
    y = x.untag("a").tag("c")  # a renamed c
    assert list(y.named_shape) == ["b", "c"]
    np.testing.assert_array_equal(y.unwrap("c", "b"), x.unwrap("a", "b"))


def test_a_variable_is_unwrapped_and_a_named_array_is_kept():
    x = named((2,), "a")
    assert nx.wrap(tl.Param(x)) is x
    assert nx.wrap(tl.Param(jnp.ones(3))).positional_shape == (3,)
    assert nx.is_named(x) and not nx.is_named(x.array)


def test_repr_shows_positional_then_named_axes():
    x = named((2, 3, 4), "a", "b", "c").untag("a")
    assert repr(x) == "NamedArray(float32[2 | b:3, c:4])"
    assert repr(nx.wrap(jnp.ones((2, 3)))) == "NamedArray(float32[2, 3])"
    assert repr(jax.tree.map(lambda _: None, x)) == "NamedArray(None)"


def test_a_named_array_is_immutable():
    with pytest.raises(AttributeError, match="immutable"):
        named((2,), "a").names = ("b",)  # type: ignore[misc]


# -- errors ----------------------------------------------------------------------------


def test_a_name_given_twice_is_an_error():
    with pytest.raises(ValueError, match="'a' is used twice in tag\\('a', 'a'\\): given twice"):
        nx.wrap(jnp.ones((2, 2))).tag("a", "a")
    with pytest.raises(ValueError, match="'a' is used twice in untag"):
        named((2, 2), "a", "b").untag("a", "a")
    with pytest.raises(ValueError, match="used twice"):
        nx.NamedArray(jnp.ones((2, 2)), ("a", "a"))


def test_tagging_a_name_the_array_already_has_is_an_error():
    x = named((2, 3), "a", "b").untag("b")
    with pytest.raises(ValueError, match="already has a named axis 'a'"):
        x.tag("a")


def test_tag_needs_one_name_per_positional_axis():
    with pytest.raises(ValueError, match=r"gives 1 name\(s\), but the array has 2 positional"):
        nx.wrap(jnp.ones((2, 3))).tag("a")


def test_names_are_strings():
    # (Under the test suite's runtime type checker the annotation catches it first.)
    with pytest.raises(TypeError, match="str"):
        nx.wrap(jnp.ones(2)).tag(0)  # type: ignore[arg-type]


def test_untagging_a_name_that_is_not_there_is_an_error():
    x = named((2, 3), "batch", "features")
    with pytest.raises(ValueError, match="no named axis 'heads'; its named axes are"):
        x.untag("heads")
    with pytest.raises(ValueError, match="no named axis 'heads'"):
        x.unwrap("heads", "batch", "features")


def test_untag_with_positional_axes_left_is_an_error():
    x = named((2, 3), "a", "b").untag("a")
    with pytest.raises(ValueError, match=r"still has positional axes \(positional shape \(2,\)\)"):
        x.untag("b")


def test_unwrap_with_named_axes_left_is_an_error():
    with pytest.raises(ValueError, match="unwrap\\(\\) on an array with named axes"):
        named((2, 3), "a", "b").unwrap()
    with pytest.raises(ValueError, match="x.unwrap\\('b'\\)"):
        named((2, 3), "a", "b").unwrap("a")


def test_one_name_with_two_sizes_is_an_error_naming_both_arguments():
    x, y = named((2,), "batch"), named((3,), "batch")
    with pytest.raises(ValueError, match=r"'batch' has size 2 in args\[0\] but 3 in args\[1\]"):
        nx.nmap(jnp.add)(x, y)
    with pytest.raises(ValueError, match=r"size 2 in args\[0\] but 3 in kwargs\['b'\]"):
        nx.nmap(lambda a, b: a + b)(x, b=y)
    with pytest.raises(ValueError, match=r"in args\[0\]\[1\]"):
        nx.nmap(lambda pair: pair[0] + pair[1])((x, y))
    with pytest.raises(ValueError, match="has size 2"):
        x + y


def test_vmapping_over_a_named_axis_is_caught_when_the_array_is_used():
    x = named((2, 3), "a", "b")  # no positional axis: axis 0 is named
    with pytest.raises(ValueError, match="fewer axes than names"):
        jax.vmap(lambda v: v.named_shape)(x)


# -- nmap ------------------------------------------------------------------------------


def test_nmap_maps_every_named_axis_and_broadcasts_missing_ones():
    x = named((2, 3, 4), "batch", "seq", "features")
    w = named((4, 5), "features", "out", start=1.0)
    y = nx.nmap(jnp.dot)(x.untag("features"), w.untag("features"))
    assert y.named_shape == {"batch": 2, "seq": 3, "out": 5}
    expected = jnp.einsum(
        "bsf,fo->bso", x.unwrap("batch", "seq", "features"), w.unwrap("features", "out")
    )
    np.testing.assert_allclose(y.unwrap("batch", "seq", "out"), expected, rtol=1e-6)


def test_nmap_aligns_axes_by_name_not_by_storage_order():
    a = named((2, 3), "i", "j")
    b = nx.wrap(a.unwrap("j", "i"), "j", "i")  # the same values, stored the other way
    np.testing.assert_array_equal((a - b).unwrap("i", "j"), np.zeros((2, 3)))


def test_nmap_passes_other_arguments_and_returns_pytrees():
    x = named((2, 3), "batch", "features").untag("features")
    out = nx.nmap(lambda v, scale, *, shift: {"y": v * scale + shift, "n": v.shape[0]})(
        x, 2.0, shift=jnp.ones(3)
    )
    assert out["y"].named_shape == {"batch": 2} and out["y"].positional_shape == (3,)
    np.testing.assert_array_equal(out["y"].untag().array, x.array * 2.0 + 1.0)
    assert out["n"].named_shape == {"batch": 2}  # every array output gets the names


def test_nmap_without_named_axes_calls_fn_once():
    y = nx.nmap(jnp.sum)(nx.wrap(jnp.ones((2, 3))))
    assert isinstance(y, nx.NamedArray) and y.positional_shape == () and float(y.unwrap()) == 6.0


def test_nmap_reads_variables_holding_named_arrays():
    w = tl.Param(named((3,), "features"))
    x = named((2, 3), "batch", "features")
    y = nx.nmap(jnp.multiply)(x, w)
    np.testing.assert_array_equal(y.unwrap("batch", "features"), x.array * w.value.array)
    np.testing.assert_array_equal(
        (w * x).unwrap("batch", "features"), y.unwrap("batch", "features")
    )


def test_arithmetic_comparisons_and_indexing_act_on_positional_axes():
    x = named((2, 3), "a", "b")
    v = x.array
    assert (x * 2 + 1).named_shape == {"a": 2, "b": 3}
    for got, want in [
        (x + 1, v + 1),
        (1 - x, 1 - v),
        (x * x, v * v),
        (x / 2, v / 2),
        (2**x, 2**v),
        (x // 2, v // 2),
        (x % 2, v % 2),
        (-x, -v),
        (abs(-x), v),
        (x < 2, v < 2),
        (x >= 2, v >= 2),
    ]:
        np.testing.assert_array_equal(got.unwrap("a", "b"), want)
    rows = x.untag("b")  # positional (3,), named a
    np.testing.assert_array_equal(rows[1].unwrap("a"), v[:, 1])
    np.testing.assert_array_equal((rows @ jnp.ones(3)).unwrap("a"), v.sum(1))


def test_reductions_remove_named_axes():
    x = named((2, 3, 4), "a", "b", "c")
    v = x.array
    np.testing.assert_array_equal(nx.sum(x, "a").unwrap("b", "c"), v.sum(0))
    np.testing.assert_array_equal(nx.mean(x, "c", "a").unwrap("b"), v.mean((0, 2)))
    np.testing.assert_array_equal(nx.max(x, "b").unwrap("a", "c"), v.max(1))
    np.testing.assert_array_equal(nx.min(x, "a", "b", "c").unwrap(), v.min())
    # Positional axes stay.
    assert nx.sum(x.untag("a"), "b").positional_shape == (2,)
    with pytest.raises(ValueError, match=r"tl.nx.sum\(x, 'd'\): the array has no named axis 'd'"):
        nx.sum(x, "d")
    with pytest.raises(ValueError, match="used twice"):
        nx.mean(x, "a", "a")


# -- a pytree for jax ------------------------------------------------------------------


def test_a_named_array_is_one_leaf_with_static_names():
    x = named((2, 3), "a", "b")
    leaves, treedef = jax.tree.flatten(x)
    assert len(leaves) == 1 and leaves[0] is x.array
    assert jax.tree.unflatten(treedef, leaves).names == ("a", "b")
    assert jax.tree.structure(x) != jax.tree.structure(named((2, 3), "b", "a"))
    assert jax.tree_util.keystr(jax.tree_util.tree_flatten_with_path(x)[0][0][0]) == ".array"


def test_jax_transforms_keep_names():
    x = named((2, 3), "a", "b")
    assert jax.jit(lambda v: v * 2)(x).named_shape == {"a": 2, "b": 3}
    grad = jax.grad(lambda v: nx.sum(v * v, "a", "b").unwrap())(x)
    assert isinstance(grad, nx.NamedArray)
    np.testing.assert_array_equal(grad.unwrap("a", "b"), 2 * x.array)
    # vmap over a positional axis is fine: the names are the last axes.
    stacked = nx.NamedArray(jnp.ones((5, 2, 3)), ("a", "b"))
    out = jax.vmap(lambda v: nx.sum(v, "a"))(stacked)
    assert out.positional_shape == (5,) and out.named_shape == {"b": 3}


# -- Variables holding NamedArrays -----------------------------------------------------


class Scaled(tl.Module):
    def __init__(self):
        self.w = tl.Param(named((3,), "features", start=1.0))
        self.seen = tl.Variable(nx.wrap(jnp.zeros(3), "features"))

    def __call__(self, x):
        self.seen.value = self.seen.value + nx.sum(x, "batch")
        return nx.sum(x * self.w, "features")


def batch():
    return named((2, 3), "batch", "features")


def test_split_merge_keep_named_values():
    model = Scaled()
    graphdef, params, rest = tl.split(model, tl.Param, ...)
    assert params["w"].value.named_shape == {"features": 3}
    again = tl.merge(graphdef, params, rest)
    assert again.w.value.names == ("features",)
    np.testing.assert_array_equal(again.w.value.array, model.w.value.array)


def test_jit_carries_an_update_of_a_named_variable_out():
    model = Scaled()
    y = tl.jit(lambda m, x: m(x))(model, batch())
    assert y.named_shape == {"batch": 2}
    assert model.seen.value.names == ("features",)
    np.testing.assert_array_equal(model.seen.value.unwrap("features"), [3.0, 5.0, 7.0])


def loss(model, x):
    return nx.sum(model(x), "batch").unwrap()


def test_tl_grad_of_a_named_array_argument_is_named():
    x = batch()
    g = tl.grad(lambda v: nx.sum(v * v, "batch", "features").unwrap())(x)
    assert isinstance(g, nx.NamedArray) and g.names == ("batch", "features")
    np.testing.assert_array_equal(g.array, 2 * x.array)


def test_grad_of_named_params_through_split_and_an_optimizer_step():
    import optax

    model = Scaled()
    graphdef, params, rest = tl.split(model, tl.Param, ...)
    grads = jax.grad(lambda p: loss(tl.merge(graphdef, p, rest), batch()))(params)
    direct = tl.grad(lambda m: loss(m, batch()))(model)  # the same, straight from the Module
    np.testing.assert_array_equal(direct["w"].value.array, grads["w"].value.array)
    g = grads["w"].value
    assert isinstance(g, nx.NamedArray) and g.names == ("features",)
    np.testing.assert_array_equal(g.unwrap("features"), batch().array.sum(0))
    optimizer = tl.Optimizer(model, optax.sgd(0.5))
    optimizer.update(model, grads)
    assert model.w.value.names == ("features",)
    expected = np.array([1.0, 2.0, 3.0]) - 0.5 * np.asarray(batch().array.sum(0))
    np.testing.assert_allclose(model.w.value.array, expected)


def test_vmap_construction_stacks_on_a_positional_axis():
    stack = tl.vmap(lambda _: Scaled())(jnp.arange(4))
    assert stack.w.value.positional_shape == (4,) and stack.w.value.named_shape == {"features": 3}
    # Mapping over the stacked axis gives each example one unstacked model.
    out = tl.vmap(lambda m, x: m(x), in_axes=(0, None))(stack, batch())
    assert out.positional_shape == (4,) and out.named_shape == {"batch": 2}
    assert stack.seen.value.positional_shape == (4,)


def test_save_and_load_keep_named_values(tmp_path):
    model = Scaled()
    model.w.value = model.w.value * 10
    tl.save(tmp_path / "ckpt", model)
    loaded = tl.load(tmp_path / "ckpt", Scaled())
    assert loaded.w.value.names == ("features",)
    np.testing.assert_array_equal(loaded.w.value.array, model.w.value.array)
    blob = tl.load_bytes(tl.save_bytes(model), Scaled())
    np.testing.assert_array_equal(blob.w.value.array, model.w.value.array)


def test_display_shows_axis_names():
    from toylib.display import variable_sizes

    model = Scaled()
    text = treescope.render_to_text(model)
    assert "w=Param NamedArray(float32[features:3])" in text
    assert {t.__name__: n for t, n in variable_sizes(model).items()} == {
        "Param": (3, 12),
        "Variable": (3, 12),
    }
    assert treescope.render_to_text(named((2, 3), "a", "b").untag("a")) == (
        "NamedArray float32[2 | b:3]"
    )


def test_treescope_array_view_labels_named_axes():
    x = named((2, 3), "batch", "features")
    page = treescope.render_to_html(treescope.render_array(x), compressed=False)
    assert "batch" in page and "features" in page
    with treescope.active_autovisualizer.set_scoped(treescope.ArrayAutovisualizer()):
        page = treescope.render_to_html({"x": x}, compressed=False)
    assert "batch" in page and "features" in page
    plain = treescope.render_to_html(treescope.render_array(x.array), compressed=False)
    assert "batch" not in plain


def test_a_named_array_held_directly_by_a_module_is_refused():
    class Bad(tl.Module):
        def __init__(self):
            self.w = named((2,), "a")

    with pytest.raises(TypeError, match="tl.Param"):
        Bad()


def test_named_layers_are_in_nn():
    assert nn.NamedLinear.__module__ == "toylib.nn.named"


def test_update_writes_named_values_in_place():
    model = Scaled()
    state = tl.state(model)
    state["w"].value = state["w"].value * 0
    tl.update(model, state)
    assert model.w.value.names == ("features",)
    np.testing.assert_array_equal(model.w.value.array, np.zeros(3))


def test_the_guide_page_code_runs():
    import pathlib
    import re

    page = pathlib.Path(__file__).resolve().parent.parent / "docs" / "named_axes.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    assert len(blocks) >= 5
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(page), "exec"), namespace)
