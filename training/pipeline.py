"""The tf.data input pipeline over training friendships, both directions.

Each example is a friendship (q, c). Its two sides get their raw tower inputs from the
``FeatureTable`` (the Feast offline store as of the training cutoff) and their second-layer
neighbours from their sampled friends, *minus the other side* (the leakage guard: a positive is
never among its anchor's sampled neighbours). Held-out friendships never enter: the table holds
training-graph features only and the pairs are the training split.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import tensorflow as tf

from friendrec.data.canonical import PreparedDataset
from training.features import FeatureTable, sample_neighbours, tower_inputs


class PairSampler:
    """Shuffled batches of directed training friendships with their tower inputs."""

    def __init__(
        self, data: PreparedDataset, table: FeatureTable, fanout: int, batch_size: int, seed: int
    ) -> None:
        src, dst = data.edges("train")
        a, b = table.rows_of(src), table.rows_of(dst)
        if (a < 0).any() or (b < 0).any():
            raise ValueError("a training friendship references a user without features")
        self.q_rows = np.concatenate([a, b])
        self.c_rows = np.concatenate([b, a])
        self.table = table
        self.fanout = fanout
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        # How often each user is an in-batch candidate: proportional to its training degree.
        counts = np.bincount(self.c_rows, minlength=len(table)).astype(np.float64)
        self.sampling_prob = (counts / counts.sum()).astype(np.float32)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.q_rows) // self.batch_size

    def side(self, rows: np.ndarray, other_rows: np.ndarray) -> dict[str, np.ndarray]:
        neighbours = sample_neighbours(
            self.table, rows, self.fanout, self.rng, exclude=self.table.user_ids[other_rows]
        )
        return tower_inputs(self.table, rows, neighbours)

    def batch(self, q_rows: np.ndarray, c_rows: np.ndarray) -> dict[str, np.ndarray]:
        out = {f"q/{k}": v for k, v in self.side(q_rows, c_rows).items()}
        out.update({f"c/{k}": v for k, v in self.side(c_rows, q_rows).items()})
        out["c_id"] = c_rows.astype(np.int64)
        out["c_sampling_prob"] = self.sampling_prob[c_rows]
        return out

    def epoch(self) -> Iterator[dict[str, np.ndarray]]:
        order = self.rng.permutation(len(self.q_rows))
        for step in range(self.steps_per_epoch):
            idx = order[step * self.batch_size : (step + 1) * self.batch_size]
            yield self.batch(self.q_rows[idx], self.c_rows[idx])

    def dataset(self) -> tf.data.Dataset:
        """One epoch as a prefetching tf.data pipeline (numpy batch assembly in a generator)."""
        example = self.batch(self.q_rows[:2], self.c_rows[:2])
        signature = {
            k: tf.TensorSpec(shape=(None, *v.shape[1:]), dtype=tf.as_dtype(v.dtype))
            for k, v in example.items()
        }
        return tf.data.Dataset.from_generator(self.epoch, output_signature=signature).prefetch(2)


def embed_all(tower: tf.keras.Model, table: FeatureTable, fanout: int, batch: int = 2048):
    """Index vectors of every user in the table, in inference mode (deterministic neighbours: the
    first ``fanout`` of each user's stored friend sample, exactly as serving does); their query
    vectors are ``tower.query_form`` of these."""
    out = []
    for start in range(0, len(table), batch):
        rows = np.arange(start, min(start + batch, len(table)))
        neighbours = sample_neighbours(table, rows, fanout, rng=None)
        inputs = tower_inputs(table, rows, neighbours)
        out.append(tower(inputs, training=False).numpy())
    return np.concatenate(out) if out else np.zeros((0, tower.output_dim), np.float32)
