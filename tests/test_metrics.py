"""tl.metrics: Average, Accuracy, Welford, MultiMetric against numpy, in and out of tl.jit."""

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

import toylib as tl
from toylib import nn
from toylib.metrics import Accuracy, Average, MetricState, MultiMetric, Welford

SIZES = (5, 3, 8, 1)  # uneven batches: the mean must weight them by size


def batches(seed, sizes=SIZES, shape=()):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(n, *shape)).astype(np.float32) for n in sizes]


def class_batches(seed, sizes=SIZES, classes=4):
    rng = np.random.default_rng(seed)
    return [
        (
            rng.normal(size=(n, classes)).astype(np.float32),
            rng.integers(0, classes, size=n).astype(np.int32),
        )
        for n in sizes
    ]


def numpy_accuracy(pairs):
    correct = np.concatenate([np.argmax(lg, -1) == lb for lg, lb in pairs])
    return correct.mean()


# -- Average -----------------------------------------------------------------------


def test_average_weights_batches_by_size_eagerly():
    data = batches(0)
    avg = Average()
    for x in data:
        avg.update(values=jnp.asarray(x))
    expected = np.concatenate(data).mean()
    np.testing.assert_allclose(avg.compute(), expected, atol=1e-6)
    assert int(avg.count.value) == sum(SIZES)
    # Not the mean of the batch means, which would ignore the sizes.
    assert abs(np.mean([x.mean() for x in data]) - expected) > 1e-3


def test_average_scalars_count_once_and_arrays_by_size():
    avg = Average("loss")
    avg.update(loss=2.0)
    avg.update(loss=jnp.array(4.0))
    avg.update(loss=np.array([[1.0, 1.0], [1.0, 1.0]]))
    assert int(avg.count.value) == 6
    np.testing.assert_allclose(avg.compute(), (2 + 4 + 4) / 6)
    avg.update(loss=jnp.array([1, 2, 3]))  # integer values are averaged as floats
    np.testing.assert_allclose(avg.compute(), (10 + 6) / 9, rtol=1e-6)
    assert avg.total.value.dtype == jnp.float32 and avg.count.value.dtype == jnp.int32


def test_empty_metrics_compute_nan():
    assert np.isnan(Average().compute())
    assert np.isnan(Accuracy().compute())
    assert all(np.isnan(v) for v in Welford().compute())
    avg = Average()
    avg.update(values=jnp.ones(3))
    avg.reset()
    assert np.isnan(avg.compute()) and int(avg.count.value) == 0


def test_average_inside_jit_and_fast_path_keeps_accumulating():
    data = batches(1, sizes=(4, 4, 4, 4, 4))  # one shape: every call after the first is fast

    @tl.jit
    def step(metric, x):
        metric.update(values=x)
        return metric.compute()

    avg = Average()
    for i, x in enumerate(data):
        running = step(avg, jnp.asarray(x))
        assert int(avg.count.value) == 4 * (i + 1)
        np.testing.assert_allclose(running, np.concatenate(data[: i + 1]).mean(), atol=1e-6)
        if i >= 1:
            assert step._fast is not None  # the repeat took tl.jit's fast path
    np.testing.assert_allclose(avg.compute(), np.concatenate(data).mean(), atol=1e-6)


def test_average_inside_jit_with_new_batch_sizes():
    data = batches(2)
    step = tl.jit(lambda m, x: m.update(values=x))
    avg = Average()
    for x in data:
        step(avg, jnp.asarray(x))
    np.testing.assert_allclose(avg.compute(), np.concatenate(data).mean(), atol=1e-6)
    assert int(avg.count.value) == sum(SIZES)


def test_update_inside_tl_scan_over_batches():
    data = np.arange(12, dtype=np.float32).reshape(3, 4)

    def body(metric, x):
        metric.update(values=x)
        return metric, None

    avg = Average()
    tl.scan(body)(avg, jnp.asarray(data))
    assert int(avg.count.value) == 12
    np.testing.assert_allclose(avg.compute(), data.mean())


def test_reset_inside_jit():
    avg = Average()
    update = tl.jit(lambda m, x: m.update(values=x))
    reset = tl.jit(lambda m: m.reset())
    for _ in range(2):  # the second round goes through both fast paths
        update(avg, jnp.ones(3))
        update(avg, jnp.ones(3))
        assert int(avg.count.value) == 6
        reset(avg)
        assert int(avg.count.value) == 0 and float(avg.total.value) == 0.0


def test_average_mask_drops_elements():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    avg = Average()
    avg.update(values=x, mask=np.array([True, False, True]))  # broadcasts over rows
    avg.update(values=jnp.array([10.0, 20.0]), mask=jnp.array([0, 1]))  # integer mask
    expected = (x[:, [0, 2]].sum() + 20.0) / 5
    np.testing.assert_allclose(avg.compute(), expected, rtol=1e-6)
    assert int(avg.count.value) == 5


# -- Accuracy ----------------------------------------------------------------------


def test_accuracy_multiclass_matches_numpy_in_and_out_of_jit():
    pairs = class_batches(3)
    eager, jitted = Accuracy(), Accuracy()
    step = tl.jit(lambda m, lg, lb: m.update(logits=lg, labels=lb))
    for lg, lb in pairs:
        eager.update(logits=lg, labels=lb)
        step(jitted, jnp.asarray(lg), jnp.asarray(lb))
    expected = numpy_accuracy(pairs)
    np.testing.assert_allclose(eager.compute(), expected, rtol=1e-6)
    np.testing.assert_allclose(jitted.compute(), expected, rtol=1e-6)
    assert int(eager.count.value) == sum(SIZES)


def test_accuracy_with_several_batch_axes():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
    labels = rng.integers(0, 5, size=(2, 3))
    acc = Accuracy()
    acc.update(logits=logits, labels=labels)
    np.testing.assert_allclose(acc.compute(), (logits.argmax(-1) == labels).mean(), rtol=1e-6)
    assert int(acc.count.value) == 6


def test_accuracy_threshold_for_binary_scores():
    rng = np.random.default_rng(5)
    scores = [rng.uniform(size=n).astype(np.float32) for n in SIZES]
    labels = [rng.integers(0, 2, size=n) for n in SIZES]
    acc = Accuracy(threshold=0.5)
    step = tl.jit(lambda m, s, y: m.update(logits=s, labels=y))
    for s, y in zip(scores, labels, strict=True):
        step(acc, jnp.asarray(s), jnp.asarray(y))
    expected = np.concatenate([(s >= 0.5) == (y == 1) for s, y in zip(scores, labels, strict=True)])
    np.testing.assert_allclose(acc.compute(), expected.mean(), rtol=1e-6)
    logit_acc = Accuracy(threshold=0)  # an int threshold is a number too
    logit_acc.update(logits=jnp.array([-1.0, 2.0, 0.0]), labels=jnp.array([False, True, False]))
    np.testing.assert_allclose(logit_acc.compute(), 2 / 3, rtol=1e-6)


def test_accuracy_mask_skips_padding():
    logits = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    labels = jnp.array([0, 0, 1, 1])
    acc = Accuracy()
    acc.update(logits=logits, labels=labels, mask=jnp.arange(4) < 2)  # last two are padding
    assert int(acc.count.value) == 2
    np.testing.assert_allclose(acc.compute(), 0.5)


# -- Welford -----------------------------------------------------------------------


def test_welford_matches_numpy_in_and_out_of_jit():
    data = batches(6)
    data = [x * 3.0 + 100.0 for x in data]  # a large mean: naive sums of squares lose digits
    eager, jitted = Welford(), Welford()
    step = tl.jit(lambda m, x: m.update(values=x))
    for x in data:
        eager.update(values=x)
        step(jitted, jnp.asarray(x))
    every = np.concatenate(data).astype(np.float64)
    for stats in (eager.compute(), jitted.compute()):
        np.testing.assert_allclose(stats.mean, every.mean(), rtol=1e-6)
        np.testing.assert_allclose(stats.std, every.std(), rtol=1e-4)
        np.testing.assert_allclose(stats.sem, every.std(ddof=1) / np.sqrt(every.size), rtol=1e-4)


def test_welford_mask_and_empty_batches():
    w = Welford()
    w.update(values=jnp.ones(3), mask=jnp.zeros(3, bool))  # nothing counted
    assert int(w.count.value) == 0 and np.isnan(w.compute().mean)
    w.update(values=jnp.array([1.0, 5.0, 3.0]), mask=jnp.array([True, False, True]))
    w.update(values=7.0)
    stats = w.compute()
    np.testing.assert_allclose(stats.mean, np.mean([1.0, 3.0, 7.0]), rtol=1e-6)
    np.testing.assert_allclose(stats.std, np.std([1.0, 3.0, 7.0]), rtol=1e-5)
    w.reset()
    assert int(w.count.value) == 0 and float(w.m2.value) == 0.0


# -- MultiMetric -------------------------------------------------------------------


def test_multimetric_routes_keywords_inside_jit():
    pairs = class_batches(7)
    losses = batches(8)
    metrics = MultiMetric(
        loss=Average(), accuracy=Accuracy(), grad_norm=Average("norm"), loss_stats=Welford()
    )

    @tl.jit
    def step(metrics, logits, labels, loss, norm):
        metrics.update(logits=logits, labels=labels, values=loss, norm=norm)
        return metrics.compute()

    for i, ((lg, lb), loss) in enumerate(zip(pairs, losses, strict=True)):
        out = step(metrics, jnp.asarray(lg), jnp.asarray(lb), jnp.asarray(loss), jnp.array(i))
    assert sorted(out) == ["accuracy", "grad_norm", "loss", "loss_stats"]  # jax sorts dict keys
    assert list(metrics.compute()) == ["loss", "accuracy", "grad_norm", "loss_stats"]
    np.testing.assert_allclose(out["loss"], np.concatenate(losses).mean(), atol=1e-6)
    np.testing.assert_allclose(out["accuracy"], numpy_accuracy(pairs), rtol=1e-6)
    np.testing.assert_allclose(out["grad_norm"], np.mean(range(len(SIZES))), rtol=1e-6)
    np.testing.assert_allclose(out["loss_stats"].std, np.concatenate(losses).std(), rtol=1e-4)
    assert metrics.accuracy.count.value == sum(SIZES) and metrics.grad_norm.count.value == 4
    metrics.reset()
    assert all(np.isnan(v) for v in jax.tree.leaves(metrics.compute()))


def test_metrics_next_to_a_model_in_a_train_step_fast_path():
    model = nn.Linear(3, 2, rngs=0)
    metrics = MultiMetric(loss=Average(), accuracy=Accuracy())
    rng = np.random.default_rng(9)
    xs = [rng.normal(size=(6, 3)).astype(np.float32) for _ in range(4)]
    ys = [rng.integers(0, 2, size=6) for _ in range(4)]

    @tl.jit
    def eval_step(model, metrics, x, y):
        logits = model(x)
        loss = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], -1)[:, 0]
        metrics.update(values=loss, logits=logits, labels=y)

    for x, y in zip(xs, ys, strict=True):
        eval_step(model, metrics, jnp.asarray(x), jnp.asarray(y))
    logits = [np.asarray(model(jnp.asarray(x))) for x in xs]
    np.testing.assert_allclose(
        metrics.accuracy.compute(), numpy_accuracy(list(zip(logits, ys, strict=True))), rtol=1e-6
    )
    assert int(metrics.loss.count.value) == 24 and eval_step._fast is not None


def test_multimetric_failure_changes_nothing():
    metrics = MultiMetric(loss=Average(), accuracy=Accuracy())
    metrics.update(values=jnp.ones(2), logits=jnp.ones((2, 3)), labels=jnp.zeros(2, int))
    before = {p: v.value for p, v in tl.iter_variables(metrics)}
    # `loss` accepts the batch, then `accuracy` rejects float labels.
    with pytest.raises(TypeError, match=r"MultiMetric\.accuracy: Accuracy\.update: labels"):
        metrics.update(values=jnp.ones(4), logits=jnp.ones((2, 3)), labels=jnp.zeros(2))
    after = {p: v.value for p, v in tl.iter_variables(metrics)}
    assert all(after[p] is before[p] for p in before)


def test_multimetric_names_missing_argument():
    metrics = MultiMetric(loss=Average("loss"))
    with pytest.raises(TypeError, match=r"MultiMetric\.loss: .*`loss=\.\.\.`, got `values`"):
        metrics.update(values=1.0)


def test_multimetric_construction_errors(monkeypatch):
    # Bad input on purpose: toylib's own message, not the runtime type checker's.
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)
    with pytest.raises(TypeError, match=r"MultiMetric\(loss=\.\.\.\): expected a tl\.metrics"):
        MultiMetric(loss=lambda x: x)
    for name in ("update", "names", "train"):
        with pytest.raises(ValueError, match=f"`{name}` is the name of a MultiMetric"):
            MultiMetric(**{name: Average()})


# -- bad input ---------------------------------------------------------------------


def test_average_missing_argument_says_which_name():
    avg = Average()
    with pytest.raises(TypeError, match=r"keyword argument `values=\.\.\.`, got `loss`"):
        avg.update(loss=jnp.ones(2))
    assert int(avg.count.value) == 0


def test_accuracy_shape_errors_suggest_the_fix():
    acc = Accuracy()
    with pytest.raises(ValueError, match=r"(?s)\(2, 3\) and labels \(3,\).*same batch axes"):
        acc.update(logits=jnp.ones((2, 3)), labels=jnp.zeros(3, int))
    with pytest.raises(ValueError, match=r"Accuracy\(threshold=0\.5\)"):
        acc.update(logits=jnp.ones(4), labels=jnp.zeros(4, int))
    binary = Accuracy(threshold=0.5)
    with pytest.raises(ValueError, match=r"logits\[\.\.\., 0\]"):
        binary.update(logits=jnp.ones((4, 1)), labels=jnp.zeros(4, int))
    with pytest.raises(ValueError, match=r"build `Accuracy\(\)` without a threshold"):
        binary.update(logits=jnp.ones((4, 3)), labels=jnp.zeros(4, int))
    with pytest.raises(ValueError, match=r"one score per label"):
        binary.update(logits=jnp.ones(4), labels=jnp.zeros(3, int))
    assert int(acc.count.value) == 0 and int(binary.count.value) == 0


def test_accuracy_float_labels_error():
    acc = Accuracy()
    with pytest.raises(TypeError, match=r"(?s)integer class indices.*got float32.*astype"):
        acc.update(logits=jnp.ones((4, 3)), labels=jnp.zeros(4))
    with pytest.raises(TypeError, match=r"(?s)one-hot.*labels\.argmax\(-1\)"):
        acc.update(logits=jnp.ones((4, 3)), labels=jax.nn.one_hot(jnp.zeros(4, int), 3))


def test_errors_are_raised_while_tracing_too():
    step = tl.jit(lambda m, lg, lb: m.update(logits=lg, labels=lb))
    acc = Accuracy()
    with pytest.raises(ValueError, match="one label per row"):
        step(acc, jnp.ones((2, 3)), jnp.zeros(3, int))
    assert int(acc.count.value) == 0


def test_bad_mask_and_threshold(monkeypatch):
    # Bad input on purpose: toylib's own message, not the runtime type checker's.
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)
    wrong_shape = r"(?s)mask \(shape \(3,\), float32\).*values \(shape \(2,\)"
    with pytest.raises(ValueError, match=wrong_shape):
        Average().update(values=jnp.ones(2), mask=jnp.ones(3))
    with pytest.raises(ValueError, match=r"must be boolean or integer"):
        Average().update(values=jnp.ones(2), mask=jnp.ones(2))  # float: looks like weights
    with pytest.raises(ValueError, match=r"broadcast to the labels"):
        Accuracy().update(logits=jnp.ones((2, 3)), labels=jnp.zeros(2, int), mask=jnp.ones(5, bool))
    with pytest.raises(TypeError, match=r"threshold must be a real number, got a str"):
        Accuracy(threshold="0.5")
    with pytest.raises(TypeError, match=r"got a bool"):
        Accuracy(threshold=True)


# -- metric state is Variables -----------------------------------------------------


def test_metric_state_through_split_merge_state_update():
    metrics = MultiMetric(loss=Average(), accuracy=Accuracy())
    metrics.update(values=jnp.array([1.0, 3.0]), logits=jnp.eye(2), labels=jnp.array([0, 0]))
    state = tl.state(metrics, MetricState)
    assert set(state.flat()) == {
        ("loss", "total"),
        ("loss", "count"),
        ("accuracy", "total"),
        ("accuracy", "count"),
    }
    assert all(isinstance(v, MetricState) for v in state.flat().values())

    graphdef, everything = tl.split(metrics, MetricState)  # every Variable is a MetricState
    copy = tl.merge(graphdef, everything)
    assert type(copy) is MultiMetric and copy.names == ("loss", "accuracy")
    assert {k: float(v) for k, v in copy.compute().items()} == {"loss": 2.0, "accuracy": 0.5}
    copy.update(values=jnp.array([5.0]), logits=jnp.eye(2)[:1], labels=jnp.array([0]))
    assert float(metrics.loss.compute()) == 2.0  # the original is untouched

    tl.update(metrics, tl.state(copy))
    assert float(metrics.loss.compute()) == 3.0 and int(metrics.accuracy.count.value) == 3


def test_a_metric_as_a_pytree_in_raw_jax():
    avg = Average()
    avg.update(values=jnp.array([2.0, 4.0]))
    leaves = jax.tree.leaves(avg)
    assert len(leaves) == 2  # total and count; argname is static
    doubled = jax.tree.map(lambda x: x * 2, avg)
    assert float(doubled.compute()) == 3.0 and int(doubled.count.value) == 4
