"""Reading a few rows of a large variable, under a distribution strategy too.

``tf.gather(v, rows)`` reads only the rows of a plain resource variable (``sparse_read``). A
``tf.distribute`` variable (``MirroredVariable``: every variable created in the scope of
``MultiWorkerMirroredStrategy``) inherits ``tf.Variable.sparse_read``, which raises, so
``tf.gather`` and ``tf.nn.embedding_lookup`` fall back to a dense read of the whole table and a
gather from it. Once a sparse update has touched the variable (``LazyAdam``), TensorFlow keeps it
in copy-on-read mode and each dense read copies it: at 1M users that is 128 MB per lookup of the
user-id table and per moment, which made a data-parallel training step 4x a single process's
(docs/scaling.md, "Data-parallel training: a copy of the id table per lookup").
"""

from __future__ import annotations

import tensorflow as tf


def gather_variable_rows(variable: tf.Variable, rows: tf.Tensor) -> tf.Tensor:
    """``variable[rows]`` that reads only those rows: on a distributed variable, from this
    replica's own copy (one per worker process in friendrec's groups), whose gradient the
    strategy aggregates as the distributed variable's."""
    local = tf.distribute.get_strategy().experimental_local_results(variable)
    return tf.gather(local[0] if len(local) == 1 else variable, rows)
