import copy
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import toylib as tl


def test_arithmetic_forwards_to_value():
    v = tl.Variable(jnp.array([1.0, 2.0, 3.0]))
    a = np.array([1.0, 2.0, 3.0])
    for got, want in [
        (v + 1, a + 1),
        (1 + v, 1 + a),
        (v - 1, a - 1),
        (10 - v, 10 - a),
        (v * 2, a * 2),
        (2 * v, 2 * a),
        (v / 2, a / 2),
        (6 / v, 6 / a),
        (v // 2, a // 2),
        (v % 2, a % 2),
        (v**2, a**2),
        (2**v, 2**a),
        (-v, -a),
        (abs(-v), a),
        (v + v, a + a),
    ]:
        np.testing.assert_allclose(got, want)
    assert float(v @ v) == pytest.approx(14.0)
    assert float(jnp.ones(3) @ v) == pytest.approx(6.0)


def test_comparisons_are_elementwise():
    v = tl.Variable(jnp.array([1.0, 2.0, 3.0]))
    assert (v > 1.5).tolist() == [False, True, True]
    assert (v <= 2).tolist() == [True, True, False]
    assert (v == 2).tolist() == [False, True, False]
    assert (v != 2).tolist() == [True, False, True]
    # Hashing stays by identity, so Variables can key dicts and sets.
    w = tl.Variable(jnp.array([1.0, 2.0, 3.0]))
    assert len({v, w}) == 2


def test_jnp_functions_accept_variables():
    v = tl.Param(jnp.array([0.0, 1.0]))
    np.testing.assert_allclose(jnp.sin(v), np.sin([0.0, 1.0]), rtol=1e-6)
    assert float(jnp.sum(v)) == 1.0
    assert float(jnp.dot(v, v)) == 1.0
    np.testing.assert_allclose(jax.nn.relu(v - 0.5), [0.0, 0.5])
    np.testing.assert_allclose(np.asarray(v), [0.0, 1.0])
    np.testing.assert_allclose(jnp.asarray(v), [0.0, 1.0])


def test_value_attributes_are_forwarded():
    v = tl.Param(jnp.ones((2, 3)))
    assert v.shape == (2, 3)
    assert v.dtype == jnp.float32
    assert v.T.shape == (3, 2)
    assert float(v.sum()) == 6.0
    assert len(v) == 2


def test_indexing_reads_and_writes():
    v = tl.Variable(jnp.arange(4.0))
    assert v[...] is v.value
    assert float(v[2]) == 2.0
    v[1] = 10.0
    assert v.value.tolist() == [0.0, 10.0, 2.0, 3.0]
    v[...] = jnp.zeros(2)
    assert v.value.tolist() == [0.0, 0.0]
    n = tl.Variable(np.arange(3.0))
    n[0] = 5.0
    assert n.value.tolist() == [5.0, 1.0, 2.0]


def test_inplace_operators_keep_identity():
    v = tl.Variable(jnp.array(1))
    same = v
    v += 2
    assert v is same
    assert int(v.value) == 3
    v *= 4
    assert int(same.value) == 12


def test_scalar_conversions():
    v = tl.Variable(jnp.array(3))
    assert int(v) == 3
    assert float(v) == 3.0
    assert bool(v)
    assert [10, 20, 30, 40][v] == 40  # __index__


def test_metadata_is_kept_and_readable():
    w = tl.Param(jnp.ones((2, 3)), sharding=("embed", "mlp"))
    assert w.sharding == ("embed", "mlp")
    assert w.metadata == {"sharding": ("embed", "mlp")}
    mapped = jax.tree.map(lambda x: x * 2, w)
    assert type(mapped) is tl.Param
    assert mapped.sharding == ("embed", "mlp")
    assert mapped.value.tolist() == [[2.0] * 3] * 2


def test_unhashable_metadata_is_a_clear_error():
    with pytest.raises(TypeError, match="(?s)sharding=.*hashable.*tuple"):
        tl.Param(jnp.ones(2), sharding=["embed"])


def test_unknown_attribute_assignment_is_an_error():
    v = tl.Param(jnp.ones(2))
    with pytest.raises(AttributeError, match="v.value = "):
        v.something = 3


def test_variable_is_a_pytree_node():
    v = tl.BatchStat(jnp.ones(3), tag="a")
    leaves, treedef = jax.tree.flatten(v)
    assert len(leaves) == 1 and leaves[0] is v.value
    rebuilt = jax.tree.unflatten(treedef, [jnp.zeros(3)])
    assert type(rebuilt) is tl.BatchStat and rebuilt.tag == "a"
    path = jax.tree_util.keystr(jax.tree_util.tree_flatten_with_path(v)[0][0][0])
    assert path == ".value"
    doubled = jax.jit(lambda var: var * 2)(v)
    np.testing.assert_allclose(doubled, 2 * np.ones(3))


def test_user_subclass_is_registered_and_filterable():
    class Counter(tl.Variable):
        __slots__ = ()

    c = Counter(jnp.array(0))
    mapped = jax.tree.map(lambda x: x + 1, c)
    assert type(mapped) is Counter and int(mapped.value) == 1
    assert issubclass(tl.Param, tl.Variable)
    assert not isinstance(c, tl.Param)


def test_replace_and_copy():
    w = tl.Param(jnp.zeros(2), tag="t")
    r = w.replace(jnp.ones(2))
    assert type(r) is tl.Param and r.tag == "t" and r.value.tolist() == [1.0, 1.0]
    assert w.value.tolist() == [0.0, 0.0]
    c = w.copy()
    assert c is not w and c.value is w.value
    assert w.replace(None).value is None


def test_copy_and_pickle_roundtrip():
    w = tl.Param(np.arange(3.0), tag="t")
    for clone in (copy.deepcopy(w), pickle.loads(pickle.dumps(w))):
        assert type(clone) is tl.Param and clone.tag == "t"
        assert clone.value.tolist() == [0.0, 1.0, 2.0]


def test_repr_shows_type_shape_and_metadata():
    assert repr(tl.Param(jnp.ones((2, 3)), sharding=("a", "b"))) == (
        "Param(float32[2, 3], sharding=('a', 'b'))"
    )
    assert repr(tl.Variable(jnp.array(5))) == "Variable(int32[] = 5)"
    assert repr(tl.Cache(None)) == "Cache(None)"


def test_assigning_a_variable_to_itself_unwraps():
    a = tl.Variable(jnp.ones(2))
    b = tl.Variable(a)  # a Variable given as a value is unwrapped
    assert b.value is a.value


def test_a_list_becomes_an_array():
    p = tl.Param([1.0, 2.0])
    assert isinstance(p.value, jax.Array) and p.value.dtype == jnp.float32
    assert p.value.tolist() == [1.0, 2.0]


def test_metadata_write_is_seen_by_watchers():
    from toylib._core import watchers

    v = tl.Param(jnp.ones(2), scale=1.0)
    token = watchers.Token()
    watchers.watch(v, token)
    v.value = jnp.zeros(2)  # a value: not structure
    assert token.valid
    v.scale = 2.0
    assert not token.valid


def test_numpy_array_on_the_left_of_a_variable_gives_a_jax_array():
    p = tl.Param(jnp.ones((3, 2)))
    x = np.ones((4, 3), np.float32)
    for result in (x @ p, np.ones((3, 2)) + p, np.float32(2) * p, np.ones(2) - p[0]):
        assert isinstance(result, jax.Array)
    # Traced: numpy defers to the Variable instead of converting the tracer.
    out = tl.jit(lambda p: x @ p)(p)
    assert out.shape == (4, 2)
    assert np.allclose(np.asarray(out), 3.0)
