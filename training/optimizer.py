"""The optimizer: Adam whose sparse updates touch only the rows a batch looked up.

tf_keras' Adam applies a sparse gradient (the user-id table's ``IndexedSlices``) by decaying the
*whole* first and second moments and updating *every* row of the table each step: on a 5M-user
synthetic graph a step took 1.34 s against 0.31 s at 250k users, the dense pass over 5M x 32
weights and both moments being most of it (docs/scaling.md). ``LazyAdam`` is the usual remedy
for large embedding tables (TensorFlow Addons' ``LazyAdam``, whose package is no longer
maintained): a row's moments and weights change only when the row has a gradient. Dense
gradients (every table small enough for them, ``training.tower.DENSE_GRADIENT_MAX``: all seven
benchmark graphs' tables) take Adam's own path unchanged.
"""

from __future__ import annotations

import tensorflow as tf

from training.variable_rows import gather_variable_rows


class LazyAdam(tf.keras.optimizers.Adam):
    """Adam; a sparse gradient updates its rows' moments and weights only (duplicates summed)."""

    def update_step(self, gradient, variable):
        if not isinstance(gradient, tf.IndexedSlices) or self.amsgrad:
            return super().update_step(gradient, variable)
        indices, position = tf.unique(gradient.indices)
        values = tf.math.unsorted_segment_sum(gradient.values, position, tf.shape(indices)[0])
        dtype = variable.dtype
        lr = tf.cast(self.learning_rate, dtype)
        step = tf.cast(self.iterations + 1, dtype)
        beta_1 = tf.cast(self.beta_1, dtype)
        beta_2 = tf.cast(self.beta_2, dtype)
        alpha = lr * tf.sqrt(1 - tf.pow(beta_2, step)) / (1 - tf.pow(beta_1, step))
        epsilon = (
            self.epsilon * tf.sqrt(1 - tf.pow(beta_2, step))
            if self.adaptive_epsilon
            else self.epsilon
        )
        key = self._index_dict[self._var_key(variable)]
        m, v = self._momentums[key], self._velocities[key]
        m_rows = beta_1 * gather_variable_rows(m, indices) + (1 - beta_1) * values
        v_rows = beta_2 * gather_variable_rows(v, indices) + (1 - beta_2) * tf.square(values)
        m.scatter_update(tf.IndexedSlices(m_rows, indices))
        v.scatter_update(tf.IndexedSlices(v_rows, indices))
        variable.scatter_sub(
            tf.IndexedSlices(alpha * m_rows / (tf.sqrt(v_rows) + epsilon), indices)
        )


def make_optimizer(learning_rate: float) -> tf.keras.optimizers.Optimizer:
    """Training's optimizer (the training loop, ``bench quality`` and ``bench train-speed``)."""
    return LazyAdam(learning_rate)
