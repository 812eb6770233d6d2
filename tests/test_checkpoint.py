"""Tests for tl.save / tl.load (toylib/checkpoint.py)."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from conftest import Tied, assert_unchanged, run_in_threads, snapshot

import toylib as tl
from toylib import checkpoint, nn

X = jnp.asarray(np.random.default_rng(0).normal(size=(16, 3)), jnp.float32)
Y = jnp.sin(X[:, :1]) * 2


class Net(tl.Module):
    """Linear-Dropout-Linear: its dropout stream is state a resumed run needs."""

    def __init__(self, *, rngs: tl.Rngs, features: int = 8) -> None:
        self.l1 = nn.Linear(3, features, rngs=rngs)
        self.drop = nn.Dropout(0.3, rngs=rngs)
        self.l2 = nn.Linear(features, 1, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(jax.nn.relu(self.l1(x))))


# One optax transformation for all optimizers: it is a static attribute of
# tl.Optimizer, so sharing it lets train_step compile once for every test.
TX = optax.adam(1e-2)


def make(seed: int, features: int = 8) -> tuple[Net, tl.Optimizer]:
    model = Net(rngs=tl.Rngs(params=seed, dropout=seed + 100), features=features)
    return model, tl.Optimizer(model, TX)


@tl.jit
def train_step(model, optimizer, x, y):
    loss, grads = tl.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss


def raw(x):
    """An array's contents, typed PRNG keys as their key data."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(x))
    return np.asarray(x)


def assert_same_state(a, b):
    flat_a, flat_b = tl.state(a).flat(), tl.state(b).flat()
    assert list(flat_a) == list(flat_b)
    for path, va in flat_a.items():
        vb = flat_b[path]
        assert type(va) is type(vb), path
        assert va.value.dtype == vb.value.dtype, path
        np.testing.assert_array_equal(raw(va.value), raw(vb.value), err_msg=str(path))


# -- the test: resuming from a checkpoint is exact -------------------------------


@pytest.mark.parametrize("like_kind", ["live", "abstract"])
def test_resumed_training_is_identical_to_uninterrupted_training(tmp_path, like_kind):
    n = 3
    straight = make(0)
    for _ in range(2 * n):
        train_step(*straight, X, Y)

    first = make(0)
    for _ in range(n):
        train_step(*first, X, Y)
    tl.save(tmp_path / "ckpt", first)

    if like_kind == "live":
        like = make(7)  # another seed: other weights and another dropout stream
    else:
        like = tl.eval_shape(lambda: make(7))
        assert isinstance(like[0].l1.kernel.value, jax.ShapeDtypeStruct)
    resumed = tl.load(tmp_path / "ckpt", like)
    assert isinstance(resumed, tuple) and isinstance(resumed[1], tl.Optimizer)
    assert int(resumed[1].step.value) == n
    for _ in range(n):
        train_step(*resumed, X, Y)

    assert_same_state(resumed, straight)  # params, adam moments, step, dropout stream
    np.testing.assert_array_equal(resumed[0](X), straight[0](X))


def test_load_returns_new_objects_and_leaves_like_unchanged(tmp_path):
    saved, like = make(0)[0], make(1)[0]
    before = {p: raw(v.value) for p, v in tl.state(like).flat().items()}
    tl.save(tmp_path / "c", saved)
    loaded = tl.load(tmp_path / "c", like)
    assert loaded is not like and loaded.l1.kernel is not like.l1.kernel
    for path, variable in tl.state(like).flat().items():
        np.testing.assert_array_equal(raw(variable.value), before[path])
    assert_same_state(loaded, saved)
    assert loaded.drop.rate == like.drop.rate  # static attributes come from `like`


# -- what can be saved -----------------------------------------------------------------


class _BareArray(tl.Module):
    def __init__(self):
        self.w = tl.Param(jnp.ones(3))
        self.table = jnp.arange(4.0)  # a bare array attribute, not a Variable


def test_abstract_like_with_a_bare_array_attribute_loads(tmp_path):
    tl.save(tmp_path / "ckpt", _BareArray())
    abstract = tl.eval_shape(_BareArray)
    assert isinstance(abstract.table, jax.ShapeDtypeStruct)
    loaded = tl.load(tmp_path / "ckpt", abstract)
    np.testing.assert_array_equal(loaded.table, np.arange(4.0))
    np.testing.assert_array_equal(loaded.w.value, np.ones(3))


def test_state_round_trip_gives_a_state_of_the_same_variable_types(tmp_path):
    model = nn.Sequential(nn.Linear(2, 3, rngs=0), nn.BatchNorm(3))
    model(jnp.ones((4, 2)))  # moves the batch statistics away from their init
    tl.save(tmp_path / "c", tl.state(model))
    loaded = tl.load(
        tmp_path / "c", tl.state(nn.Sequential(nn.Linear(2, 3, rngs=5), nn.BatchNorm(3)))
    )
    assert isinstance(loaded, tl.State) and type(loaded.layers[1].mean) is tl.BatchStat
    graphdef, _ = tl.split(model)
    assert_same_state(tl.merge(graphdef, loaded), model)


def test_variable_array_and_containers_round_trip_with_metadata_and_static_values(tmp_path):
    obj = {
        "w": tl.Param(jnp.arange(6.0).reshape(2, 3), sharding=("embed", "mlp")),
        "bare": jnp.array([1, 2, 3], jnp.int8),
        "host": np.array([0.5, 1.5]),
        "counts": [tl.Variable(jnp.array(3)), tl.Variable(2.5)],
        "name": "run-1",
        "empty": tl.Variable(jnp.zeros((0, 4), jnp.bfloat16)),  # orbax cannot store it itself
    }
    tl.save(tmp_path / "c", obj)
    like = {
        "w": tl.Param(jnp.zeros((2, 3)), sharding=("embed", "mlp")),
        "bare": jnp.zeros(3, jnp.int8),
        "host": np.zeros(2),
        "counts": [tl.Variable(jnp.array(0)), tl.Variable(0.0)],
        "name": "from-like",
        "empty": tl.Variable(jnp.zeros((0, 4), jnp.bfloat16)),
    }
    loaded = tl.load(tmp_path / "c", like)
    assert type(loaded["w"]) is tl.Param and loaded["w"].sharding == ("embed", "mlp")
    np.testing.assert_array_equal(loaded["w"].value, obj["w"].value)
    assert loaded["bare"].dtype == jnp.int8 and loaded["bare"].tolist() == [1, 2, 3]
    assert isinstance(loaded["host"], np.ndarray) and loaded["host"].tolist() == [0.5, 1.5]
    assert int(loaded["counts"][0].value) == 3
    assert loaded["counts"][1].value == 2.5 and type(loaded["counts"][1].value) is float
    assert loaded["name"] == "from-like"  # a Python value outside a Variable is structure
    assert loaded["empty"].value.shape == (0, 4) and loaded["empty"].value.dtype == jnp.bfloat16
    tl.save(tmp_path / "e", {"only": jnp.zeros(0)})  # nothing for orbax to write at all
    assert tl.load(tmp_path / "e", {"only": jnp.ones(0)})["only"].shape == (0,)

    tl.save(tmp_path / "v", tl.RngState(jax.random.key(3)))
    key = tl.load(tmp_path / "v", tl.RngState(jax.random.key(0))).value
    assert raw(key).tolist() == raw(jax.random.key(3)).tolist()


def test_rng_keys_keep_their_implementation(tmp_path):
    rngs = tl.Rngs(jax.random.key(1, impl="rbg"))
    rngs()
    tl.save(tmp_path / "c", rngs)
    loaded = tl.load(tmp_path / "c", tl.Rngs(jax.random.key(9, impl="rbg")))
    assert jax.random.key_impl(loaded.default.key.value) == jax.random.key_impl(
        rngs.default.key.value
    )
    np.testing.assert_array_equal(raw(loaded()), raw(rngs()))  # the same next draw
    with pytest.raises(ValueError, match=r"(?s)dtypes.*`model.default.key`: key<fry> in `like`"):
        tl.load(tmp_path / "c", tl.Rngs(0))


def test_a_tied_weight_is_stored_once_and_stays_one_object(tmp_path):
    model = Tied(rngs=tl.Rngs(0))
    tl.save(tmp_path / "c", model)
    leaves = json.loads((tmp_path / "c" / "toylib.json").read_text())["leaves"]
    assert "model.embed.embedding" in leaves and "model.head.kernel" not in leaves

    loaded = tl.load(tmp_path / "c", Tied(rngs=tl.Rngs(1)))
    assert loaded.head.kernel is loaded.embed.embedding
    np.testing.assert_array_equal(loaded.head.kernel.value, model.embed.embedding.value)

    # Sharing across the objects of a container survives too.
    tl.save(tmp_path / "p", (model, model.embed))
    like = Tied(rngs=tl.Rngs(3))
    whole, part = tl.load(tmp_path / "p", (like, like.embed))
    assert part is whole.embed


# -- errors ------------------------------------------------------------------------------


def test_structure_mismatch_names_missing_and_extra_paths(tmp_path):
    tl.save(tmp_path / "c", nn.MLP([2, 4, 1], rngs=0))
    with pytest.raises(
        ValueError, match=r"(?s)in `like`, not in the checkpoint: `model.layers\[2\]"
    ):
        tl.load(tmp_path / "c", nn.MLP([2, 4, 4, 1], rngs=0))
    with pytest.raises(
        ValueError, match=r"not in `like`: `model.layers\[0\].bias`, `model.layers\[1\].bias`"
    ):
        tl.load(tmp_path / "c", nn.MLP([2, 4, 1], use_bias=False, rngs=0))
    untied = Tied(rngs=tl.Rngs(0))
    tl.save(tmp_path / "t", Tied(rngs=tl.Rngs(0)))
    untied.head.kernel = tl.Param(jnp.zeros((4, 5)))
    with pytest.raises(ValueError, match=r"not in the checkpoint: `model.head.kernel`"):
        tl.load(tmp_path / "t", untied)


def test_shape_mismatch_names_the_path_and_both_shapes(tmp_path):
    tl.save(tmp_path / "c", make(0)[0])
    with pytest.raises(
        ValueError, match=r"(?s)shapes.*`model.l1.kernel`: \(3, 5\) in `like`, \(3, 8\) saved"
    ):
        tl.load(tmp_path / "c", make(0, features=5)[0])


def test_dtype_mismatch_names_the_path_and_is_not_cast(tmp_path):
    tl.save(tmp_path / "c", nn.Linear(2, 3, rngs=0))
    like = nn.Linear(2, 3, param_dtype=jnp.bfloat16, rngs=0)
    with pytest.raises(ValueError, match=r"`model.kernel`: bfloat16 in `like`, float32 saved"):
        tl.load(tmp_path / "c", like)
    assert like.kernel.value.dtype == jnp.bfloat16  # the failed load changed nothing


def test_a_path_without_a_checkpoint_says_why(tmp_path, monkeypatch):
    # Bad input on purpose: toylib's own message, not the runtime type checker's.
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)
    like = nn.Linear(2, 3, rngs=0)
    with pytest.raises(
        FileNotFoundError, match=r"no checkpoint at .*missing: the path does not exist"
    ):
        tl.load(tmp_path / "missing", like)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="it is a file"):
        tl.load(tmp_path / "file", like)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="the directory holds no checkpoint"):
        tl.load(tmp_path / "empty", like)
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as orbax_checkpointer:
        orbax_checkpointer.save(
            tmp_path / "foreign", args=ocp.args.StandardSave({"a": jnp.ones(2)})
        )
    with pytest.raises(FileNotFoundError, match="an orbax checkpoint that tl.save did not write"):
        tl.load(tmp_path / "foreign", like)
    with pytest.raises(TypeError, match="`path` must be a str or os.PathLike.*got a Linear"):
        tl.load(like, tmp_path)


def test_save_refuses_what_it_cannot_store_and_never_deletes_other_files(tmp_path):
    abstract = tl.eval_shape(lambda: nn.Linear(2, 3, rngs=0))
    with pytest.raises(TypeError, match=r"`model.kernel` holds a ShapeDtypeStruct"):
        tl.save(tmp_path / "a", abstract)
    with pytest.raises(TypeError, match=r"`model.x` holds a str"):
        tl.save(tmp_path / "b", {"x": tl.Variable("text")})
    with pytest.raises(ValueError, match="holds no arrays"):
        tl.save(tmp_path / "c", nn.Identity())
    with pytest.raises(
        ValueError, match=r"`model.a.b` and `model\['a.b'\]` would be stored under the same name"
    ):
        tl.save(tmp_path / "d", {"a.b": jnp.ones(1), "a": {"b": jnp.ones(1)}})

    @tl.jit
    def inside(model):
        tl.save(tmp_path / "e", model)

    with pytest.raises(TypeError, match="holds a tracer"):
        inside(nn.Linear(2, 3, rngs=0))

    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="exists and is not a checkpoint"):
        tl.save(data, nn.Linear(2, 3, rngs=0))
    assert (data / "notes.txt").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["data"]  # nothing written by the refused saves


# -- atomic writes -------------------------------------------------------------------------


def fail_after_writing(monkeypatch):
    """Make orbax's handler write the arrays, then fail before the checkpoint is finalised."""
    real_save = ocp.PyTreeCheckpointHandler.save

    def save_then_fail(self, directory, *args, **kwargs):
        real_save(self, directory, *args, **kwargs)
        assert any(directory.iterdir())  # data is on disk, half a checkpoint
        raise OSError("disk full")

    monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "save", save_then_fail)


def test_an_interrupted_first_save_leaves_no_checkpoint(tmp_path, monkeypatch):
    fail_after_writing(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        tl.save(tmp_path / "c", nn.Linear(2, 3, rngs=0))
    assert os.listdir(tmp_path) == []  # no checkpoint and no temporary directory left
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        tl.load(tmp_path / "c", nn.Linear(2, 3, rngs=0))


@pytest.mark.parametrize("failure", ["while writing", "while swapping"])
def test_an_interrupted_save_over_a_checkpoint_keeps_the_old_one(tmp_path, monkeypatch, failure):
    old, new = nn.Linear(2, 3, rngs=0), nn.Linear(2, 3, rngs=1)
    tl.save(tmp_path / "c", old)
    if failure == "while writing":
        fail_after_writing(monkeypatch)
    else:

        def fail(a, b):
            raise OSError("power cut")

        monkeypatch.setattr(checkpoint.moves, "exchange", fail)
    with pytest.raises(OSError, match="disk full|power cut"):
        tl.save(tmp_path / "c", new)
    assert os.listdir(tmp_path) == ["c"]
    assert_same_state(tl.load(tmp_path / "c", new), old)

    monkeypatch.undo()
    tl.save(tmp_path / "c", new)  # saving over it works, and replaces it
    assert_same_state(tl.load(tmp_path / "c", old), new)
    assert os.listdir(tmp_path) == ["c"]


def test_save_over_a_checkpoint_without_atomic_swap_recovers_after_a_crash(tmp_path, monkeypatch):
    first, second, third = (nn.Linear(2, 3, rngs=i) for i in range(3))
    monkeypatch.setattr(checkpoint.moves, "exchange", lambda a, b: False)  # e.g. no renameat2
    tl.save(tmp_path / "c", first)
    tl.save(tmp_path / "c", second)
    assert_same_state(tl.load(tmp_path / "c", first), second)
    assert os.listdir(tmp_path) == ["c"]

    # A crash between the two renames: the old checkpoint is parked, `c` is gone.
    os.rename(tmp_path / "c", tmp_path / "c.toylib-old")
    with pytest.raises(
        FileNotFoundError, match=r"previous checkpoint is complete at .*c.toylib-old"
    ):
        tl.load(tmp_path / "c", first)
    real_replace = os.replace
    moves = []

    def crash_moving_the_new_one_in(a, b):
        moves.append((os.path.basename(a), os.path.basename(b)))
        if moves[-1][0].startswith("c.toylib-tmp.") and moves[-1][1] == "c":  # `c` was parked
            raise OSError("crash")
        real_replace(a, b)

    monkeypatch.setattr(os, "replace", crash_moving_the_new_one_in)
    with pytest.raises(OSError, match="crash"):
        tl.save(tmp_path / "c", third)
    monkeypatch.setattr(os, "replace", real_replace)
    # The parked checkpoint was put back first, then parked again and restored.
    assert moves[:2] == [("c.toylib-old", "c"), ("c", "c.toylib-old")]
    assert sorted(os.listdir(tmp_path)) == ["c"]
    assert_same_state(tl.load(tmp_path / "c", first), second)  # put back, nothing lost
    tl.save(tmp_path / "c", third)
    assert_same_state(tl.load(tmp_path / "c", first), third)


def test_leftovers_of_a_killed_save_are_removed_quietly(tmp_path, caplog, capfd):
    stale = tmp_path / "c.toylib-tmp.orbax-checkpoint-tmp"
    stale.mkdir()
    (stale / "junk").write_text("half")
    model = nn.Linear(2, 3, rngs=0)
    with caplog.at_level(logging.INFO):
        tl.save(tmp_path / "c", model)
        tl.save(tmp_path / "c", model)
        tl.load(tmp_path / "c", model)
        with pytest.raises(FileNotFoundError):
            tl.load(tmp_path / "nothing", model)
    assert os.listdir(tmp_path) == ["c"]
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert capfd.readouterr().err == ""


# -- shardings -----------------------------------------------------------------------------

SHARDED = """
import jax, jax.numpy as jnp, numpy as np, toylib as tl
from jax.sharding import NamedSharding, PartitionSpec as P
from toylib import nn
mesh = jax.make_mesh((4,), ("x",))
model = nn.Linear(4, 8, rngs=0)
tl.save(PATH, model)
put = lambda x, spec: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))
abstract = tl.eval_shape(lambda: nn.Linear(4, 8, rngs=1))
abstract.kernel.value = put(abstract.kernel.value, P(None, "x"))
abstract.bias.value = put(abstract.bias.value, P("x"))
loaded = tl.load(PATH, abstract)
assert loaded.kernel.value.sharding == NamedSharding(mesh, P(None, "x"))
assert len(loaded.kernel.value.addressable_shards) == 4
assert loaded.kernel.value.addressable_shards[0].data.shape == (4, 2)
assert loaded.bias.value.sharding == NamedSharding(mesh, P("x"))
np.testing.assert_array_equal(loaded.kernel.value, model.kernel.value)
live = jax.device_put(jnp.zeros((4, 8)), NamedSharding(mesh, P("x")))
like = nn.Linear(4, 8, rngs=2)
like.kernel.value = live
assert tl.load(PATH, like).kernel.value.sharding == live.sharding
print("ok")
"""


def test_load_restores_directly_into_like_shardings(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    env["JAX_PLATFORMS"] = "cpu"
    script = textwrap.dedent(SHARDED).replace("PATH", repr(str(tmp_path / "c")))
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"


# -- concurrent saves ------------------------------------------------------------------------

WRITER = """
import os, sys, time
import jax, jax.numpy as jnp, numpy as np, toylib as tl
from toylib import nn
path, sync, me, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

def meet(name, parties=2, timeout=60):
    open(os.path.join(sync, f"{name}.{me}"), "w").close()
    end = time.monotonic() + timeout
    while sum(f.startswith(name + ".") for f in os.listdir(sync)) < parties:
        assert time.monotonic() < end, f"barrier {name} timed out"
        time.sleep(0.001)

def filled(value):
    model = nn.MLP([64, 256, 256, 4], rngs=0)  # ~80k parameters: saves overlap in time
    return jax.tree.map(lambda x: jnp.full_like(x, value), model)

for r in range(rounds):
    meet(f"start{r}")
    tl.save(path, filled(100 * r + me))
    print(f"saved {r}", flush=True)
    meet(f"saved{r}")
    if me == 0:  # both saves reported success: the checkpoint is one of them, whole
        loaded = tl.load(path, filled(-1))
        values = {float(v.value.ravel()[0]) for v in tl.state(loaded).flat().values()}
        uniform = all(bool((v.value == v.value.ravel()[0]).all())
                      for v in tl.state(loaded).flat().values())
        assert uniform and len(values) == 1 and values <= {100.0 * r, 100.0 * r + 1}, values
        print(f"checked {r} {values.pop()}", flush=True)
    meet(f"checked{r}")
"""


def test_two_processes_saving_to_one_path_leave_one_whole_checkpoint(tmp_path):
    rounds = 10
    sync = tmp_path / "sync"
    sync.mkdir()
    target = tmp_path / "ckpt" / "c"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(target), str(sync), str(me), str(rounds)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for me in (0, 1)
    ]
    try:
        outputs = [w.communicate(timeout=300) for w in writers]
    finally:
        for w in writers:
            w.kill()  # a no-op for a finished process; ends a hung one
    for w, (out, err) in zip(writers, outputs, strict=True):
        assert w.returncode == 0, err[-3000:]
        assert [line for line in out.splitlines() if line.startswith("saved")] == [
            f"saved {r}" for r in range(rounds)
        ]
    checked = [line for line in outputs[0][0].splitlines() if line.startswith("checked")]
    assert len(checked) == rounds
    assert os.listdir(target.parent) == ["c"]  # no staging directory left behind


def test_threads_saving_to_one_path_leave_one_whole_checkpoint(tmp_path):
    models = [nn.Linear(8, 8, rngs=i) for i in range(4)]
    for _ in range(3):
        results = run_in_threads(*[lambda m=m: tl.save(tmp_path / "c", m) for m in models])
        assert results == [None] * 4
        loaded = tl.load(tmp_path / "c", nn.Linear(8, 8, rngs=9))
        kernel = np.asarray(loaded.kernel.value)
        owner = [i for i, m in enumerate(models) if (np.asarray(m.kernel.value) == kernel).all()]
        assert len(owner) == 1
        np.testing.assert_array_equal(loaded.bias.value, models[owner[0]].bias.value)
        assert os.listdir(tmp_path) == ["c"]


def test_a_live_saves_staging_directory_is_left_alone_and_a_dead_ones_removed(tmp_path):
    model = nn.Linear(2, 3, rngs=0)
    host = checkpoint.moves.socket.gethostname()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    ).stdout.strip()
    live = tmp_path / f"c.toylib-tmp.{host}.{os.getpid()}.0123abcd"  # as another thread's
    gone = tmp_path / f"c.toylib-tmp.{host}.{dead}.0123abcd.orbax-checkpoint-tmp"
    for d in (live, gone):
        d.mkdir()
    tl.save(tmp_path / "c", model)
    assert sorted(os.listdir(tmp_path)) == sorted(["c", live.name])


# -- integrity ---------------------------------------------------------------------------------


def _array_file(checkpoint_dir, name):
    """The data file orbax wrote for the array stored as ``name`` (its only chunk here)."""
    (data,) = [f for f in (checkpoint_dir / name).iterdir() if not f.name.startswith(".")]
    return data


def test_flipped_bytes_in_an_array_file_are_detected_and_name_the_array(tmp_path):
    model, like = make(0)[0], make(1)[0]
    tl.save(tmp_path / "c", model)
    data = _array_file(tmp_path / "c", "l1.kernel")
    raw_bytes = bytearray(data.read_bytes())
    raw_bytes[-16:] = bytes(b ^ 0xFF for b in raw_bytes[-16:])
    data.write_bytes(bytes(raw_bytes))
    before = snapshot(like)
    with pytest.raises(OSError) as caught:
        tl.load(tmp_path / "c", like)
    message = str(caught.value)
    assert f"the checkpoint at {tmp_path / 'c'} is damaged" in message
    assert str(data) in message and "`model.l1.kernel`" in message
    assert "does not match the CRC-32C digest" in message
    assert_unchanged(like, before)
    # verify=False skips the digest: whatever the reader makes of the bytes, it
    # either loads or fails with toylib's error, never with tensorstore's alone.
    try:
        tl.load(tmp_path / "c", like, verify=False)
    except OSError as error:
        assert "`model.l1.kernel`" in str(error) or "could not read" in str(error)


@pytest.mark.parametrize("victim", ["array", "metadata", "manifest", "missing"])
def test_truncated_or_missing_files_raise_toylibs_error(tmp_path, victim):
    model, like = make(0)[0], make(1)[0]
    tl.save(tmp_path / "c", model)
    ckpt = tmp_path / "c"
    file = {
        "array": _array_file(ckpt, "l2.bias"),
        "metadata": ckpt / "_METADATA",
        "manifest": ckpt / "toylib.json",
        "missing": ckpt / "l1.bias" / ".zarray",
    }[victim]
    if victim == "missing":
        file.unlink()
    else:
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    before = snapshot(like)
    for verify in (True, False):  # the size check needs no digest
        with pytest.raises(OSError, match="is damaged") as caught:
            tl.load(ckpt, like, verify=verify)
        message = str(caught.value)
        assert str(ckpt) in message and str(file) in message
        holds = {
            "array": "`model.l2.bias`",
            "metadata": "the checkpoint's metadata",
            "manifest": "the list of arrays and digests",
            "missing": "`model.l1.bias`",
        }[victim]
        assert f"which holds {holds}" in message
        assert "is missing" if victim == "missing" else "bytes" in message or "read" in message
    assert_unchanged(like, before)
    tl.save(ckpt, model)  # a damaged checkpoint can be saved over
    assert_same_state(tl.load(ckpt, like), model)


def test_a_checkpoint_of_an_earlier_toylib_says_how_to_recover_it(tmp_path):
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as orbax_checkpointer:
        orbax_checkpointer.save(
            tmp_path / "v1",
            args=ocp.args.StandardSave({"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}),
            custom_metadata={"toylib": {"format": 1, "leaves": {}}},
        )
    with pytest.raises(FileNotFoundError, match=r"toylib 0.1 \(format 1.*restore its arrays"):
        tl.load(tmp_path / "v1", nn.Linear(2, 3, rngs=0))
    tl.save(tmp_path / "v1", nn.Linear(2, 3, rngs=0))  # and it may be saved over


def _read_only(directory, on):
    """Make ``directory`` read-only (root ignores permissions: it gets the immutable flag)."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i" if on else "-i", str(directory)], check=True)
    else:
        os.chmod(directory, 0o555 if on else 0o755)


def test_a_save_into_a_read_only_directory_says_so_and_keeps_the_old_checkpoint(tmp_path):
    old, new = nn.Linear(2, 3, rngs=0), nn.Linear(2, 3, rngs=1)
    tl.save(tmp_path / "c", old)
    _read_only(tmp_path, True)
    try:
        with pytest.raises(PermissionError) as caught:
            tl.save(tmp_path / "c", new)
        with pytest.raises(PermissionError, match="cannot write the checkpoint"):
            tl.save(tmp_path / "sub" / "c", new)  # its parent cannot be made either
        loaded = tl.load(tmp_path / "c", new)  # loading needs no write access
    finally:
        _read_only(tmp_path, False)
    assert f"cannot write the checkpoint {tmp_path / 'c'}" in str(caught.value)
    assert "not permitted" in str(caught.value) or "denied" in str(caught.value)
    assert os.listdir(tmp_path) == ["c"]
    assert_same_state(loaded, old)


# -- placement ---------------------------------------------------------------------------------


def test_loaded_arrays_are_committed_exactly_when_likes_are(tmp_path):
    model = nn.Linear(2, 3, rngs=0)
    tl.save(tmp_path / "c", (model, tl.Rngs(1)))
    fresh = tl.load(tmp_path / "c", (nn.Linear(2, 3, rngs=1), tl.Rngs(2)))
    abstract = tl.load(tmp_path / "c", tl.eval_shape(lambda: (nn.Linear(2, 3, rngs=1), tl.Rngs(2))))
    for loaded in (fresh, abstract):
        arrays = jax.tree.leaves(tl.state(loaded))
        assert arrays and not any(a.committed for a in arrays)
    device = jax.devices()[0]
    committed = nn.Linear(2, 3, rngs=1)
    committed.kernel.value = jax.device_put(committed.kernel.value, device)
    loaded = tl.load(tmp_path / "c", (committed, tl.Rngs(2)))[0]
    assert loaded.kernel.value.committed and not loaded.bias.value.committed
    assert loaded.kernel.value.sharding == committed.kernel.value.sharding


@tl.jit
def metered_step(model, optimizer, metric, x, y):
    loss, grads = tl.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    metric.update(values=loss)
    return loss


def test_a_step_compiled_for_fresh_objects_does_not_compile_again_after_a_load(tmp_path, caplog):
    model, optimizer = make(0)
    metered_step(model, optimizer, tl.metrics.Average(), X, Y)  # compiled for fresh objects
    tl.save(tmp_path / "c", (model, optimizer))
    restored = tl.load(tmp_path / "c", make(5))
    abstract = tl.load(tmp_path / "c", tl.eval_shape(lambda: make(5)))
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        for _ in range(2):  # restored and fresh objects, alternating
            for objects in (restored, abstract, (model, optimizer)):
                metered_step(*objects, tl.metrics.Average(), X, Y)
    assert [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()] == []
    assert int(restored[1].step.value) == 3 == int(optimizer.step.value)  # the steps ran


class Renamed(tl.Module):
    """Net with `l1` renamed to `first`: the checkpoint's paths no longer exist."""

    def __init__(self, *, rngs: tl.Rngs) -> None:
        self.first = nn.Linear(3, 8, rngs=rngs)
        self.drop = nn.Dropout(0.3, rngs=rngs)
        self.l2 = nn.Linear(8, 1, rngs=rngs)


def test_a_renamed_attribute_or_another_model_names_both_sides_and_changes_nothing(tmp_path):
    saved = make(0)[0]
    tl.save(tmp_path / "c", saved)
    for like in (Renamed(rngs=tl.Rngs(1)), nn.Linear(3, 8, rngs=0)):
        before = snapshot(like)
        with pytest.raises(ValueError, match="does not have the structure of `like`") as caught:
            tl.load(tmp_path / "c", like)
        lines = str(caught.value).splitlines()
        extra = next(line for line in lines if "in the checkpoint, not in `like`" in line)
        assert "`model.l1.kernel`" in extra
        if isinstance(like, Renamed):
            assert "in `like`, not in the checkpoint: `model.first.kernel`" in lines[1]
        assert_unchanged(like, before)
    assert_same_state(tl.load(tmp_path / "c", make(3)[0]), saved)  # the checkpoint is intact
