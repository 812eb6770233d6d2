"""Logical sharding names: layers' ``*_sharding=`` and the stacked axis (vmap, scan, Stack)."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import toylib as tl
from toylib import nn

# -- every layer: (make, {path: names}) -------------------------------------------------------
# `make(**names)` builds the layer with the *_sharding arguments given; the
# dict is what each Variable should then carry. Every Variable of the layer
# (but its random streams) is named, so a Variable a layer forgets shows up.

LINEAR = {"kernel_sharding": ("embed", "mlp"), "bias_sharding": ("mlp",)}


CELL = {
    "kernel_sharding": ("embed", "mlp"),
    "recurrent_kernel_sharding": (None, "mlp"),
    "bias_sharding": ("mlp",),
}
CELL_NAMES = {("kernel",): ("embed", "mlp"), ("recurrent_kernel",): (None, "mlp")} | {
    ("bias",): ("mlp",)
}


def _cases():
    return {
        "NamedLinear": (  # names for the stored array's axes (in axes, then out axes)
            lambda **k: nn.NamedLinear({"features": 3}, {"features": 4}, rngs=0, **k),
            LINEAR,
            {("kernel",): ("embed", "mlp"), ("bias",): ("mlp",)},
        ),
        "NamedMultiHeadAttention": (
            lambda **k: nn.NamedMultiHeadAttention(2, 4, rngs=0, **k),
            {
                "kernel_sharding": ("embed", "heads", "kv"),
                "bias_sharding": ("heads", "kv"),
                "out_kernel_sharding": ("heads", "kv", "embed"),
                "out_bias_sharding": ("embed",),
            },
            {(p, "kernel"): ("embed", "heads", "kv") for p in ("query", "key", "value")}
            | {(p, "bias"): ("heads", "kv") for p in ("query", "key", "value")}
            | {("out", "kernel"): ("heads", "kv", "embed"), ("out", "bias"): ("embed",)},
        ),
        "Linear": (
            lambda **k: nn.Linear(3, 4, rngs=0, **k),
            LINEAR,
            {("kernel",): ("embed", "mlp"), ("bias",): ("mlp",)},
        ),
        "Embed": (
            lambda **k: nn.Embed(10, 4, rngs=0, **k),
            {"embedding_sharding": ("vocab", "embed")},
            {("embedding",): ("vocab", "embed")},
        ),
        "Conv": (
            lambda **k: nn.Conv(2, 4, (3, 3), rngs=0, **k),
            {"kernel_sharding": (None, None, "in", "out"), "bias_sharding": ("out",)},
            {("kernel",): (None, None, "in", "out"), ("bias",): ("out",)},
        ),
        "ConvTranspose": (
            lambda **k: nn.ConvTranspose(2, 4, 3, rngs=0, **k),
            {"kernel_sharding": (None, "in", "out"), "bias_sharding": ("out",)},
            {("kernel",): (None, "in", "out"), ("bias",): ("out",)},
        ),
        "BatchNorm": (
            lambda **k: nn.BatchNorm(3, **k),
            {"scale_sharding": ("embed",), "bias_sharding": ("embed",)},
            {("mean",): ("embed",), ("var",): ("embed",), ("scale",): ("embed",)}
            | {("bias",): ("embed",)},
        ),
        "LayerNorm": (
            lambda **k: nn.LayerNorm(3, **k),
            {"scale_sharding": ("embed",), "bias_sharding": ("embed",)},
            {("scale",): ("embed",), ("bias",): ("embed",)},
        ),
        "RMSNorm": (
            lambda **k: nn.RMSNorm(3, **k),
            {"scale_sharding": ("embed",)},
            {("scale",): ("embed",)},
        ),
        "GroupNorm": (
            lambda **k: nn.GroupNorm(4, num_groups=2, **k),
            {"scale_sharding": ("ch",), "bias_sharding": ("ch",)},
            {("scale",): ("ch",), ("bias",): ("ch",)},
        ),
        "InstanceNorm": (
            lambda **k: nn.InstanceNorm(3, **k),
            {"scale_sharding": ("ch",), "bias_sharding": ("ch",)},
            {("scale",): ("ch",), ("bias",): ("ch",)},
        ),
        "MultiHeadAttention": (
            lambda **k: nn.MultiHeadAttention(
                4, 8, num_kv_heads=2, normalize_qk=True, dropout_rate=0.1, rngs=0, **k
            ),
            {
                "kernel_sharding": ("embed", "heads", "kv"),
                "bias_sharding": ("heads", "kv"),
                "kv_kernel_sharding": ("embed", None, "kv"),
                "kv_bias_sharding": (None, "kv"),
                "out_kernel_sharding": ("heads", "kv", "embed"),
                "out_bias_sharding": ("embed",),
                "qk_norm_sharding": ("kv",),
            },
            {
                ("query", "kernel"): ("embed", "heads", "kv"),
                ("query", "bias"): ("heads", "kv"),
                ("key", "kernel"): ("embed", None, "kv"),
                ("key", "bias"): (None, "kv"),
                ("value", "kernel"): ("embed", None, "kv"),
                ("value", "bias"): (None, "kv"),
                ("out", "kernel"): ("heads", "kv", "embed"),
                ("out", "bias"): ("embed",),
                ("query_ln", "scale"): ("kv",),
                ("key_ln", "scale"): ("kv",),
            },
        ),
        "LSTMCell": (lambda **k: nn.LSTMCell(3, 4, rngs=0, **k), CELL, CELL_NAMES),
        "GRUCell": (
            lambda **k: nn.GRUCell(3, 4, rngs=0, **k),
            CELL | {"recurrent_bias_sharding": ("mlp",)},
            CELL_NAMES | {("recurrent_bias",): ("mlp",)},
        ),
        "SimpleCell": (lambda **k: nn.SimpleCell(3, 4, rngs=0, **k), CELL, CELL_NAMES),
        "Einsum": (
            lambda **k: nn.Einsum("...d,dhk->...hk", (6, 2, 3), (2, 3), rngs=0, **k),
            {"kernel_sharding": ("embed", "heads", "kv"), "bias_sharding": ("heads", "kv")},
            {("kernel",): ("embed", "heads", "kv"), ("bias",): ("heads", "kv")},
        ),
        "LinearGeneral": (
            lambda **k: nn.LinearGeneral((2, 3), (4, 5), axis=(1, -1), rngs=0, **k),
            {"kernel_sharding": ("a", "b", "c", "d"), "bias_sharding": ("c", "d")},
            {("kernel",): ("a", "b", "c", "d"), ("bias",): ("c", "d")},
        ),
        "ProjectHeads": (
            lambda **k: nn.ProjectHeads(5, 2, 3, rngs=0, **k),
            {"kernel_sharding": ("embed", "heads", "kv"), "bias_sharding": ("heads", "kv")},
            {("kernel",): ("embed", "heads", "kv"), ("bias",): ("heads", "kv")},
        ),
        "MergeHeads": (
            lambda **k: nn.MergeHeads(2, 3, 5, rngs=0, **k),
            {"kernel_sharding": ("heads", "kv", "embed"), "bias_sharding": ("embed",)},
            {("kernel",): ("heads", "kv", "embed"), ("bias",): ("embed",)},
        ),
        "LoRA": (
            lambda **k: nn.LoRA(3, 2, 4, rngs=0, **k),
            {"lora_a_sharding": ("embed", None), "lora_b_sharding": (None, "mlp")},
            {("lora_a",): ("embed", None), ("lora_b",): (None, "mlp")},
        ),
        "LoRALinear": (
            lambda **k: nn.LoRALinear(3, 4, lora_rank=2, rngs=0, **k),
            LINEAR | {"lora_a_sharding": ("embed", None), "lora_b_sharding": (None, "mlp")},
            {("kernel",): ("embed", "mlp"), ("bias",): ("mlp",)}
            | {("lora", "lora_a"): ("embed", None), ("lora", "lora_b"): (None, "mlp")},
        ),
        "WeightNorm": (
            # The wrapped Linear is named too when the wrapper is (and not otherwise).
            lambda **k: nn.WeightNorm(nn.Linear(3, 4, rngs=0, **(LINEAR if k else {})), **k),
            {"scale_sharding": ("out",)},
            {("layer", "kernel"): ("embed", "mlp"), ("layer", "bias"): ("mlp",)}
            | {("scales", "kernel"): ("out",)},
        ),
        "SpectralNorm": (
            # No arguments of its own: u and sigma follow the wrapped kernel's names.
            lambda **k: nn.SpectralNorm(nn.Linear(3, 4, rngs=0, **k), rngs=1),
            LINEAR,
            {("layer", "kernel"): ("embed", "mlp"), ("layer", "bias"): ("mlp",)}
            | {("u", "kernel"): (None, "mlp"), ("sigma", "kernel"): ()},
        ),
        "MLP": (
            lambda **k: nn.MLP([3, 8, 2], rngs=0, **k),
            {"features_sharding": ("embed", "mlp", "out")},
            {
                ("layers", 0, "kernel"): ("embed", "mlp"),
                ("layers", 0, "bias"): ("mlp",),
                ("layers", 1, "kernel"): ("mlp", "out"),
                ("layers", 1, "bias"): ("out",),
            },
        ),
        "PReLU": (
            lambda **k: nn.PReLU(**k),
            {"negative_slope_sharding": ()},
            {("negative_slope",): ()},
        ),
    }


CASES = _cases()

# Layers with no Variables of their own to name: containers (their layers
# carry the names), parameter-free layers, and EMA (a copy of a model, which
# keeps that model's names: test_ema_keeps_the_names).
NO_WEIGHTS = {"Sequential", "Stack", "Dropout", "Identity", "MaxPool", "AvgPool", "RNN", "EMA"}


def names_of(model):
    """``{path: names}`` of every Variable with sharding names (random streams have none)."""
    return {
        path: v.sharding
        for path, v in tl.iter_variables(model)
        if v.get_metadata("sharding", None) is not None
    }


def test_every_layer_with_weights_is_covered():
    layers = {
        name
        for name in nn.__all__
        if inspect.isclass(getattr(nn, name)) and issubclass(getattr(nn, name), tl.Module)
    }
    assert layers == set(CASES) | NO_WEIGHTS


@pytest.mark.parametrize("name", sorted(CASES))
def test_names_land_on_the_right_variables(name):
    make, kwargs, expected = CASES[name]
    layer = make(**kwargs)
    assert names_of(layer) == expected
    for path, v in tl.iter_variables(layer):
        if path in expected:
            array = jax.tree.leaves(v.value)[0]  # a NamedArray's names are its array's
            assert len(v.sharding) == jnp.ndim(array), path  # one name per dimension
        else:
            assert isinstance(v, tl.RngState), path  # only the random streams are unnamed


@pytest.mark.parametrize("name", sorted(CASES))
def test_default_is_no_names_at_all(name):
    make, _, _ = CASES[name]
    layer = make()
    assert all("sharding" not in v.metadata for _, v in tl.iter_variables(layer))


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_list_is_a_tuple(name):
    make, kwargs, expected = CASES[name]
    layer = make(**{k: list(v) for k, v in kwargs.items()})
    assert names_of(layer) == expected


WRONG_LENGTH = [
    (name, argument) for name, (_, kwargs, _) in sorted(CASES.items()) for argument in kwargs
]


@pytest.mark.parametrize(("name", "argument"), WRONG_LENGTH)
def test_wrong_length_is_one_clear_error(name, argument):
    make, kwargs, _ = CASES[name]
    bad = (*kwargs[argument], "extra")
    with pytest.raises(ValueError) as info:
        make(**(kwargs | {argument: bad}))
    text = str(info.value)
    # The layer class (the one the user called), the argument and the names given.
    owner = "Linear" if name == "SpectralNorm" else name
    assert f"{owner}({argument}={bad!r})" in text
    assert "Fix:" in text


def test_wrong_length_message_names_shape_and_fix():
    with pytest.raises(ValueError) as info:
        nn.Linear(64, 256, kernel_sharding=("embed",), rngs=0)
    assert str(info.value) == (
        "Linear(kernel_sharding=('embed',)): `kernel` has shape (64, 256) (2 dimensions),\n"
        "so it takes 2 logical names, one per dimension; got 1.\n"
        "Fix: give one name (a str, or None) per dimension, e.g. "
        "`kernel_sharding=('embed', None)`.\n"
    )


def test_attention_names_its_own_argument():
    # A wrong count names MultiHeadAttention's argument, not the ProjectHeads it goes to.
    with pytest.raises(ValueError, match=r"MultiHeadAttention\(kv_kernel_sharding=") as info:
        nn.MultiHeadAttention(4, 8, kv_kernel_sharding=("embed", "kv"), rngs=0)
    assert "`key.kernel` has shape (8, 4, 2)" in str(info.value)


def test_kv_names_default_to_the_query_names():
    attn = nn.MultiHeadAttention(
        2, 8, kernel_sharding=("embed", "heads", "kv"), bias_sharding=("heads", "kv"), rngs=0
    )
    for proj in (attn.query, attn.key, attn.value):
        assert proj.kernel.sharding == ("embed", "heads", "kv")
        assert proj.bias.sharding == ("heads", "kv")
    assert "sharding" not in attn.out.kernel.metadata


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        ("embed", r"the str 'embed' \(a one-name tuple needs a comma: \('embed',\)\)"),
        (("embed", 3), r"Got\n3, a int"),
        ({"embed": 0}, "a dict"),
    ],
)
def test_bad_type_is_one_clear_error(names, expected, monkeypatch):
    # Bad input on purpose: toylib's own message, not the runtime type checker's.
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)
    with pytest.raises(TypeError, match=expected) as info:
        nn.Embed(10, 4, embedding_sharding=names, rngs=0)
    assert str(info.value).startswith(f"Embed(embedding_sharding={names!r}): expected a tuple")
    assert "Fix: e.g. `embedding_sharding=(" in str(info.value)


def test_mlp_names_sizes():
    with pytest.raises(ValueError, match=r"MLP\(features_sharding=\('embed', 'mlp'\)\)"):
        nn.MLP([3, 8, 2], features_sharding=("embed", "mlp"), rngs=0)
    mlp = nn.MLP([3, 8, 2], features_sharding=("embed", "mlp", None), use_bias=False, rngs=0)
    assert names_of(mlp) == {
        ("layers", 0, "kernel"): ("embed", "mlp"),
        ("layers", 1, "kernel"): ("mlp", None),
    }


def test_names_given_to_an_absent_variable_are_still_checked():
    assert nn.LayerNorm(3, use_bias=False, bias_sharding=("embed",)).bias is None
    with pytest.raises(ValueError, match=r"LayerNorm\(bias_sharding="):
        nn.LayerNorm(3, use_bias=False, bias_sharding=("embed", "mlp"))


def test_batchnorm_stats_follow_the_features_or_their_own():
    bn = nn.BatchNorm(3, bias_sharding=("embed",))
    assert (bn.mean.sharding, bn.var.sharding) == (("embed",), ("embed",))
    bn = nn.BatchNorm(3, scale_sharding=("embed",), stats_sharding=(None,))
    assert (bn.scale.sharding, bn.mean.sharding, bn.var.sharding) == (("embed",), (None,), (None,))
    assert isinstance(bn.mean, tl.BatchStat)
    with pytest.raises(ValueError, match=r"BatchNorm\(stats_sharding="):
        nn.BatchNorm(3, stats_sharding=())


def test_weight_norm_scale_follows_the_kernel():
    wn = nn.WeightNorm(nn.Conv(2, 4, 3, kernel_sharding=(None, "in", "out"), rngs=0))
    assert wn.scales["kernel"].sharding == ("out",)
    plain = nn.WeightNorm(nn.Linear(2, 3, rngs=0))
    assert "sharding" not in plain.scales["kernel"].metadata
    whole = nn.WeightNorm(nn.Linear(2, 3, kernel_sharding=("a", "b"), rngs=0), feature_axes=None)
    assert whole.scales["kernel"].sharding == ()


def test_ema_keeps_the_names():
    model = nn.Linear(3, 4, rngs=0, **LINEAR)
    ema = nn.EMA(model, decay=0.5)
    ema.update(model)
    assert names_of(ema.model) == names_of(model)


# -- the names survive the graph functions, transforms, checkpoints and display ---------------


def named_model():
    return nn.Sequential(
        nn.Linear(3, 4, rngs=0, **LINEAR),
        nn.BatchNorm(4, scale_sharding=("mlp",), bias_sharding=("mlp",)),
        nn.Linear(4, 2, kernel_sharding=("mlp", None), rngs=1),
    )


EXPECTED = {
    ("layers", 0, "kernel"): ("embed", "mlp"),
    ("layers", 0, "bias"): ("mlp",),
    ("layers", 1, "mean"): ("mlp",),
    ("layers", 1, "var"): ("mlp",),
    ("layers", 1, "scale"): ("mlp",),
    ("layers", 1, "bias"): ("mlp",),
    ("layers", 2, "kernel"): ("mlp", None),
}


def test_names_survive_split_merge_clone_and_tree_map():
    model = named_model()
    graphdef, params, rest = tl.split(model, tl.Param, ...)
    assert params["layers"][0]["kernel"].sharding == ("embed", "mlp")
    assert names_of(tl.merge(graphdef, params, rest)) == EXPECTED
    assert names_of(tl.clone(model)) == EXPECTED
    assert names_of(jax.tree.map(lambda x: x * 2, model)) == EXPECTED


def test_names_survive_a_jit_train_step():
    model = named_model()
    opt = tl.Optimizer(model, optax.adam(1e-2))

    @tl.jit
    def step(model, opt, x):
        grads = tl.grad(lambda m: (m(x) ** 2).mean())(model)
        opt.update(model, grads)

    before = np.asarray(model.layers[1].mean.value)
    for _ in range(2):
        step(model, opt, jnp.ones((5, 3)))
    assert not np.allclose(before, np.asarray(model.layers[1].mean.value))  # state was updated
    assert names_of(model) == EXPECTED
    grads = tl.grad(lambda m: m(jnp.ones((5, 3))).sum())(model)
    assert grads["layers"][0]["kernel"].sharding == ("embed", "mlp")  # gradients carry them too


def test_load_keeps_likes_metadata(tmp_path):
    model = named_model()
    tl.save(tmp_path / "named", model)
    loaded = tl.load(tmp_path / "named", named_model())
    assert names_of(loaded) == EXPECTED
    np.testing.assert_array_equal(loaded.layers[0].kernel.value, model.layers[0].kernel.value)
    # The names are the model's, not the checkpoint's: a like without names stays without.
    plain = tl.load(
        tmp_path / "named",
        nn.Sequential(nn.Linear(3, 4, rngs=5), nn.BatchNorm(4), nn.Linear(4, 2, rngs=6)),
    )
    assert names_of(plain) == {}
    np.testing.assert_array_equal(plain.layers[0].kernel.value, model.layers[0].kernel.value)


def test_display_shows_the_names(capsys):
    tl.display(nn.Linear(3, 4, rngs=0, **LINEAR))
    text = capsys.readouterr().out
    assert "Param float32[3, 4] sharding=('embed', 'mlp')" in text
    assert "Param float32[4] sharding=('mlp',)" in text
    import treescope

    rendered = treescope.render_to_text(
        nn.Embed(10, 4, embedding_sharding=("vocab", "embed"), rngs=0)
    )
    assert "sharding=('vocab', 'embed')" in rendered


# -- the stacked axis: nn.Stack, tl.vmap, tl.scan ---------------------------------------------


SEEN_BY_BLOCKS: list = []  # what each Block call saw (appended when traced)


class Block(tl.Module):
    """A Linear with names, a LayerNorm without, recording the names it sees when called."""

    def __init__(self, rngs):
        self.linear = nn.Linear(4, 4, rngs=rngs, **LINEAR)
        self.norm = nn.LayerNorm(4)

    def __call__(self, x):
        SEEN_BY_BLOCKS.append((self.linear.kernel.sharding, self.linear.kernel.shape))
        return jnp.tanh(self.norm(self.linear(x)))


@pytest.fixture(autouse=True)
def _clear_seen():
    SEEN_BY_BLOCKS.clear()


SEEN = [(("embed", "mlp"), (4, 4))]  # one slice, with the names it was built with


def stacked_names(stack):
    return names_of(stack.blocks)


def test_stack_prepends_layers_only_to_named_variables():
    stack = nn.Stack(Block, 3, rngs=0)
    assert stacked_names(stack) == {
        ("linear", "kernel"): ("layers", "embed", "mlp"),
        ("linear", "bias"): ("layers", "mlp"),
    }
    assert stack.blocks.linear.kernel.shape == (3, 4, 4)
    assert "sharding" not in stack.blocks.norm.scale.metadata


def test_stack_called_twice_under_jit_never_doubles_or_loses_names():
    stack = nn.Stack(Block, 3, rngs=0)
    before = stacked_names(stack)
    blocks_seen = []

    @tl.jit
    def forward(stack, x):
        y = stack(x)
        blocks_seen.append(stacked_names(stack))  # the stacked names, inside tl.jit
        return y

    x = jnp.ones((2, 4))
    y1, y2 = forward(stack, x), forward(stack, x)
    np.testing.assert_array_equal(y1, y2)
    assert stacked_names(stack) == before
    assert blocks_seen == [before]  # traced once: the names did not change the structure
    stack(x)  # and eagerly
    assert stacked_names(stack) == before
    # Inside the scan each block saw its own slice with its own names.
    assert SEEN_BY_BLOCKS == SEEN * 2


def test_stack_gradients_and_optimizer_keep_the_names():
    stack = nn.Stack(Block, 3, rngs=0)
    opt = tl.Optimizer(stack, optax.sgd(0.1))
    grads = tl.grad(lambda m, x: m(x).sum())(stack, jnp.ones((2, 4)))
    assert grads["blocks"]["linear"]["kernel"].sharding == ("layers", "embed", "mlp")
    opt.update(stack, grads)
    assert stacked_names(stack)[("linear", "kernel")] == ("layers", "embed", "mlp")


def test_custom_stacked_name():
    stack = nn.Stack(Block, 2, rngs=0, stacked_name="stage")
    assert stacked_names(stack)[("linear", "kernel")] == ("stage", "embed", "mlp")
    stack(jnp.ones((2, 4)))
    assert stacked_names(stack)[("linear", "kernel")] == ("stage", "embed", "mlp")
    assert SEEN_BY_BLOCKS == SEEN


def test_stacked_name_none_leaves_names_alone():
    stack = nn.Stack(Block, 2, rngs=0, stacked_name=None)
    assert stacked_names(stack)[("linear", "kernel")] == ("embed", "mlp")
    stack(jnp.ones((2, 4)))
    assert stacked_names(stack)[("linear", "kernel")] == ("embed", "mlp")
    made = tl.vmap(lambda r: nn.Linear(2, 3, rngs=r, **LINEAR), stacked_name=None)
    assert made(tl.Rngs(0).split(2)).kernel.sharding == ("embed", "mlp")


@pytest.mark.parametrize("bad", [3, ("layers",)])
def test_bad_stacked_name(bad, monkeypatch):
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)
    with pytest.raises(TypeError, match="stacked_name"):
        nn.Stack(Block, 2, rngs=0, stacked_name=bad)
    with pytest.raises(TypeError, match=r"tl.vmap\(<lambda>\): stacked_name"):
        tl.vmap(lambda r: r, stacked_name=bad)
    with pytest.raises(TypeError, match=r"tl.scan\(<lambda>\): stacked_name"):
        tl.scan(lambda c, x: (c, x), stacked_name=bad)


def test_vmap_construction_inserts_at_the_out_axis():
    make = tl.vmap(lambda r: nn.Linear(2, 3, rngs=r, **LINEAR), out_axes=1)
    layer = make(tl.Rngs(0).split(5))
    assert layer.kernel.shape == (2, 5, 3)
    assert layer.kernel.sharding == ("embed", "layers", "mlp")
    assert layer.bias.sharding == ("mlp", "layers")
    last = tl.vmap(lambda r: nn.Linear(2, 3, rngs=r, **LINEAR), out_axes=-1)(tl.Rngs(0).split(5))
    assert (last.kernel.shape, last.kernel.sharding) == ((2, 3, 5), ("embed", "mlp", "layers"))


def test_vmapped_init_with_state_axes_names_only_what_is_stacked():
    class Model(tl.Module):
        @tl.vmap(in_axes=(tl.StateAxes({tl.Param: 0, ...: None}), 0), stacked_name="ensemble")
        def __init__(self, rngs):
            self.linear = nn.Linear(2, 2, rngs=rngs, **LINEAR)
            self.norm = nn.BatchNorm(2, scale_sharding=("mlp",))

    model = Model(tl.Rngs(0).split(3))
    assert names_of(model) == {
        ("linear", "kernel"): ("ensemble", "embed", "mlp"),
        ("linear", "bias"): ("ensemble", "mlp"),
        ("norm", "scale"): ("ensemble", "mlp"),
        ("norm", "mean"): ("mlp",),  # a BatchStat, not stacked (axis None): no new name
        ("norm", "var"): ("mlp",),
    }
    assert model.norm.mean.shape == (2,)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_vmap_over_a_module_round_trip(axis):
    stacked = nn.Stack(Block, 3, rngs=0).blocks
    if axis != 0:  # the same names, with the stacked axis elsewhere
        kernel = stacked.linear.kernel
        moved = jnp.moveaxis(kernel.value, 0, axis)
        names = kernel.sharding[1:]
        where = axis % 3
        names = (*names[:where], "layers", *names[where:])
        stacked.linear.kernel = tl.Param(moved, sharding=names)  # the bias stays at axis 0
    before = names_of(stacked)
    inside = []

    def double(block):
        inside.append((block.linear.kernel.sharding, block.linear.bias.sharding))
        block.linear.kernel.value = block.linear.kernel.value * 2  # an update, written back

    old = np.asarray(stacked.linear.kernel.value)
    in_axes = tl.StateAxes({tl.PathContains("kernel"): axis, ...: 0})
    tl.vmap(double, in_axes=(in_axes,))(stacked)
    np.testing.assert_allclose(np.asarray(stacked.linear.kernel.value), 2 * old)
    assert inside == [(("embed", "mlp"), ("mlp",))]
    assert names_of(stacked) == before
    tl.vmap(double, in_axes=(in_axes,))(stacked)  # again: never doubled
    assert names_of(stacked) == before


def test_vmap_returning_the_module_and_new_cache_variables():
    stack = nn.Stack(
        lambda r: nn.MultiHeadAttention(
            2, 4, kernel_sharding=("embed", "heads", "kv"), causal=True, rngs=r
        ),
        2,
        rngs=0,
    )
    before = names_of(stack.blocks)
    nn.init_cache(stack, 1, 8)  # a vmap over the blocks that adds Cache Variables
    assert names_of(stack.blocks) == before
    assert stack.blocks.cached_key.shape == (2, 1, 8, 2, 2)
    assert "sharding" not in stack.blocks.cached_key.metadata  # made without names: none


def test_scan_round_trip():
    stacked = nn.Stack(Block, 3, rngs=0).blocks
    before = names_of(stacked)
    inside = []

    def body(x, block):
        inside.append(block.linear.kernel.sharding)
        block.linear.bias.value = block.linear.bias.value + 1.0  # written back stacked
        return block(x), None

    for _ in range(2):
        tl.scan(body)(jnp.ones((2, 4)), stacked)
        assert names_of(stacked) == before
    assert inside == [("embed", "mlp")] * 2
    np.testing.assert_allclose(np.asarray(stacked.linear.bias.value), 2.0)


def test_scan_a_module_built_in_the_body_gets_the_stacked_name():
    def body(x, key):
        layer = nn.Linear(2, 2, rngs=key, **LINEAR)
        return x, layer

    _, layers = tl.scan(body)(jnp.ones(2), jax.random.split(jax.random.key(0), 3))
    assert (layers.kernel.shape, layers.kernel.sharding) == ((3, 2, 2), ("layers", "embed", "mlp"))


def test_carried_and_broadcast_modules_keep_their_names():
    layer = nn.Linear(4, 4, rngs=0, **LINEAR)
    seen = []

    def body(carry, x):
        h, layer = carry
        seen.append(layer.kernel.sharding)  # carried: not sliced, its names stay whole
        return (layer(h) * x, layer), None

    tl.scan(body)((jnp.ones(4), layer), jnp.ones(3))
    broadcast = tl.vmap(lambda m, x: (seen.append(m.kernel.sharding), m(x))[1], in_axes=(None, 0))
    broadcast(layer, jnp.ones((3, 4)))
    assert seen == [("embed", "mlp")] * 2
    assert layer.kernel.sharding == ("embed", "mlp")


# -- placement (the NamedSharding tl.sharding.shard records) follows the same axis ------------


def placed(shape, names, spec):
    mesh = jax.make_mesh((2,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, spec)
    return tl.Param(jax.device_put(jnp.ones(shape), sharding), sharding=names, placement=sharding)


@pytest.mark.parametrize(
    ("spec", "inside_spec"),
    [
        (P(None, None, "model"), P(None, "model")),
        (P("model"), P()),  # the stacked axis itself is sharded
        (P(), P()),  # shorter than the array: spliced only where it has entries
    ],
)
def test_placement_is_cut_and_restored(spec, inside_spec):
    class Holder(tl.Module):
        def __init__(self):
            self.w = placed((2, 4, 6), ("layers", "embed", "mlp"), spec)

    holder = Holder()
    before = holder.w.metadata
    inside = []

    def look(m):
        inside.append((m.w.sharding, m.w.placement.spec))
        m.w.value = m.w.value + 1

    def step(carry, m):
        look(m)
        return carry, None

    tl.vmap(look)(holder)
    tl.scan(step)(jnp.zeros(()), holder)
    assert inside == [(("embed", "mlp"), inside_spec)] * 2
    assert holder.w.metadata == before
    assert holder.w.placement.spec == spec


def test_a_variable_mapped_on_its_own_along_another_axis():
    w = tl.Param(jnp.ones((3, 2, 5)), sharding=("embed", "layers", "mlp"))
    seen = []

    def double(v):
        seen.append(v.sharding)
        v.value = v.value * 2

    tl.vmap(double, in_axes=1)(w)
    step = tl.jit(lambda v: tl.vmap(double, in_axes=1)(v))
    step(w)
    step(w)

    def body(carry, v):
        double(v)
        return carry, None

    tl.scan(body, in_axes=(tl.Carry, 1))(jnp.zeros(()), w)
    assert seen == [("embed", "mlp")] * 3  # eager, traced once under tl.jit, the scan body
    assert w.sharding == ("embed", "layers", "mlp")
    np.testing.assert_allclose(np.asarray(w.value), 16.0)


def test_kv_cache_names_survive_decoding_in_a_stack():
    stack = nn.Stack(
        lambda r: nn.MultiHeadAttention(
            2, 8, kernel_sharding=("embed", "heads", "kv"), causal=True, rngs=r
        ),
        2,
        rngs=0,
    )
    names = ("batch", None, "heads", "kv")
    nn.set_decode(nn.init_cache(stack, 3, 6, sharding=names))
    expected = {
        ("cached_key",): ("layers", *names),
        ("cached_value",): ("layers", *names),
        ("cache_index",): ("layers",),
    }
    assert {p: n for p, n in names_of(stack.blocks).items() if p[0].startswith("cache")} == expected
    step = tl.jit(lambda model, token: model(token))
    for t in range(3):
        step(stack, jnp.ones((3, 1, 8)) * t)
    assert np.asarray(stack.blocks.cache_index.value).tolist() == [3, 3]
    assert {p: n for p, n in names_of(stack.blocks).items() if p[0].startswith("cache")} == expected
    with pytest.raises(ValueError, match=r"MultiHeadAttention.init_cache\(sharding=\('batch',\)\)"):
        nn.init_cache(stack, 3, 6, sharding=("batch",))
