"""Reading rows of a variable created under a distribution strategy: only those rows are read
(a ``ResourceGather`` of this replica's copy, no dense read of the table), the values and the
gradient are tf.gather's, and LazyAdam's sparse update under the strategy is the one without."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

import training  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from training.optimizer import LazyAdam
from training.variable_rows import gather_variable_rows

ROWS = np.array([5, 1, 5, 0], np.int64)


def _table() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)


def _op_types(fn, *args) -> set[str]:
    graph = tf.function(fn).get_concrete_function(*args).graph
    return {op.type for op in graph.get_operations()}


def test_a_distributed_variable_is_read_row_by_row_with_tf_gathers_values_and_gradient():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        mirrored = tf.Variable(_table())
    plain = tf.Variable(_table())
    rows = tf.constant(ROWS)

    def read(var: tf.Variable) -> tf.Tensor:
        return strategy.run(lambda: gather_variable_rows(var, rows))

    types = _op_types(read, mirrored)
    assert "ResourceGather" in types and "GatherV2" not in types, types

    def grad(var: tf.Variable, weights: tf.Tensor) -> tf.Tensor:
        def fn() -> tf.Tensor:
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(gather_variable_rows(var, rows) * weights)
            return tf.convert_to_tensor(tape.gradient(loss, var))

        return strategy.run(fn)

    weights = tf.constant(np.arange(12, dtype=np.float32).reshape(4, 3))
    np.testing.assert_array_equal(read(mirrored).numpy(), tf.gather(plain, rows).numpy())
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.gather(plain, rows) * weights)
    expected = tf.convert_to_tensor(tape.gradient(loss, plain)).numpy()
    np.testing.assert_array_equal(grad(mirrored, weights).numpy(), expected)
    assert expected[5].any() and not expected[2].any()  # rows 5 (twice), 1, 0 only


def test_lazy_adam_under_a_strategy_is_lazy_adam_without():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        mirrored = tf.Variable(_table())
        opt_mirrored = LazyAdam(0.01)
    plain, opt_plain = tf.Variable(_table()), LazyAdam(0.01)
    rng = np.random.default_rng(1)

    @tf.function
    def step(values: tf.Tensor) -> None:
        def fn() -> None:
            grad = tf.IndexedSlices(values, tf.constant(ROWS))
            opt_mirrored.apply_gradients([(grad, mirrored)])

        strategy.run(fn)

    for _ in range(3):
        values = tf.constant(rng.normal(size=(len(ROWS), 3)).astype(np.float32))
        step(values)
        opt_plain.apply_gradients([(tf.IndexedSlices(values, tf.constant(ROWS)), plain)])
    np.testing.assert_allclose(mirrored.numpy(), plain.numpy(), rtol=1e-6, atol=1e-7)
    assert not np.array_equal(plain.numpy()[ROWS], _table()[ROWS])
    np.testing.assert_array_equal(plain.numpy()[[2, 3, 4, 6, 7]], _table()[[2, 3, 4, 6, 7]])
