"""LazyAdam: Adam's update for dense gradients, and for a sparse gradient Adam's update of the
rows it names only (their moments and weights), duplicates summed."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

import training  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from training.optimizer import LazyAdam


def _adam_rows(w, m, v, g, step, lr=0.01, b1=0.9, b2=0.999, eps=1e-7):
    """Adam (Kingma & Ba, as tf_keras computes it) on some rows, in numpy."""
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    alpha = lr * np.sqrt(1 - b2**step) / (1 - b1**step)
    return w - alpha * m / (np.sqrt(v) + eps), m, v


def test_dense_gradients_are_adams():
    rng = np.random.default_rng(0)
    init = rng.normal(size=(6, 3)).astype(np.float32)
    lazy, plain = tf.Variable(init), tf.Variable(init)
    opt_lazy, opt_plain = LazyAdam(0.01), tf.keras.optimizers.Adam(0.01)
    for _ in range(3):
        g = tf.constant(rng.normal(size=(6, 3)).astype(np.float32))
        opt_lazy.apply_gradients([(g, lazy)])
        opt_plain.apply_gradients([(g, plain)])
    np.testing.assert_array_equal(lazy.numpy(), plain.numpy())


def test_sparse_gradients_update_only_their_rows():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(8, 2)).astype(np.float64)
    var = tf.Variable(w.astype(np.float32))
    opt = LazyAdam(0.01)
    m, v = np.zeros_like(w), np.zeros_like(w)
    steps = [np.array([1, 3, 1]), np.array([3, 6])]  # row 1 twice in one batch: summed
    for step, idx in enumerate(steps, start=1):
        values = rng.normal(size=(len(idx), 2))
        opt.apply_gradients(
            [(tf.IndexedSlices(tf.constant(values, tf.float32), tf.constant(idx)), var)]
        )
        rows = np.unique(idx)
        g = np.zeros_like(w)
        np.add.at(g, idx, values)
        w[rows], m[rows], v[rows] = _adam_rows(w[rows], m[rows], v[rows], g[rows], step)
        np.testing.assert_allclose(var.numpy(), w, rtol=1e-5, atol=1e-6)
    # Row 1 skipped step 2: its weights and moments kept step 1's values (dense Adam would have
    # moved it with its decayed momentum); rows never seen never moved.
    untouched = [0, 2, 4, 5, 7]
    np.testing.assert_array_equal(var.numpy()[untouched], w[untouched].astype(np.float32))
    slot = opt._momentums[0].numpy()
    np.testing.assert_allclose(slot[1], m[1], rtol=1e-5)
    assert not slot[untouched].any()
