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
from training.features import (
    FeatureTable,
    friend_states_of,
    node_features,
    row_dtype,
    sample_neighbours,
    tower_inputs,
)


class PairSampler:
    """Shuffled batches of directed training friendships with their tower inputs.

    ``shard`` / ``num_shards`` (data-parallel training): every shard draws the same seeded
    permutation of the pairs and takes its own ``batch_size`` slice of each global batch of
    ``num_shards * batch_size`` pairs, so together the shards see exactly the pairs of one
    global batch. The permutation then needs a stream of its own, shared by all shards
    (``order_rng``), apart from each shard's neighbour sampling (``rng``). With one shard both
    are the same generator: the random stream of single-process training is unchanged.
    """

    def __init__(
        self,
        data: PreparedDataset,
        table: FeatureTable,
        fanout: int,
        batch_size: int,
        seed: int,
        shard: int = 0,
        num_shards: int = 1,
        uniform_negatives: int = 0,
        aux_users: int = 0,
    ) -> None:
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard {shard} is not in [0, {num_shards})")
        src, dst = data.edges("train")
        a, b = table.rows_of(src), table.rows_of(dst)
        del src, dst
        if (a < 0).any() or (b < 0).any():
            raise ValueError("a training friendship references a user without features")
        # Each friendship once, as row indices in the narrowest dtype: pair i < E is (a_i, b_i),
        # pair E + i is (b_i, a_i). At 5M users the two directions as int64 arrays and their
        # int64 permutation held 2 GB of every worker (docs/scaling.md).
        dtype = row_dtype(len(table))
        self.a, self.b = a.astype(dtype), b.astype(dtype)
        self.table = table
        self.fanout = fanout
        self.batch_size = batch_size
        self.seed = seed
        self.shard, self.num_shards = shard, num_shards
        self.uniform_negatives = int(uniform_negatives)
        self.aux_users = int(aux_users)
        self.restart(None)
        # How often each user is an in-batch candidate: proportional to its training degree.
        counts = np.bincount(a, minlength=len(table)) + np.bincount(b, minlength=len(table))
        self.sampling_prob = (counts / counts.sum()).astype(np.float32)
        if self.uniform_negatives:
            # Mixed negatives: a user is a candidate column as an in-batch positive (expected
            # global batch x p times) or as a uniform draw (uniform_negatives / users times);
            # every column of the user gets that sum as its sampling weight, the mixture's
            # log-Q correction (Yang et al. 2020). Softmax does not see the common scale.
            in_batch = batch_size * num_shards * counts / counts.sum()
            self.sampling_prob = (in_batch + self.uniform_negatives / len(table)).astype(np.float32)

    @property
    def num_pairs(self) -> int:
        """Directed training friendships: both directions of each."""
        return 2 * len(self.a)

    def pairs(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(query rows, candidate rows) of directed pairs ``idx`` (in [0, num_pairs)), int64."""
        idx = np.asarray(idx, dtype=np.int64)
        half = len(self.a)
        flip = idx >= half
        i = idx - half * flip
        a, b = self.a[i].astype(np.int64), self.b[i].astype(np.int64)
        return np.where(flip, b, a), np.where(flip, a, b)

    def restart(self, epoch: int | None) -> None:
        """(Re)seed the streams: ``None`` at the start of a run, else for resuming after
        ``epoch`` finished epochs (a resumed run cannot replay the stream it was cut off in)."""
        key = self.seed if epoch is None else [self.seed, epoch]
        self.rng = np.random.default_rng(key)
        self.order_rng: np.random.Generator | None = None  # None: ``rng``
        if self.num_shards > 1:
            self.order_rng = self.rng
            self.rng = np.random.default_rng([*np.atleast_1d(key), self.num_shards, self.shard])

    @property
    def steps_per_epoch(self) -> int:
        return self.num_pairs // (self.batch_size * self.num_shards)

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
        if self.uniform_negatives:  # users drawn uniformly, candidates for every query
            rows = self.uniform_users(self.uniform_negatives, "n/", out)
            out["n_id"] = rows.astype(np.int64)
            out["n_sampling_prob"] = self.sampling_prob[rows]
        if self.aux_users:  # users drawn uniformly, for the auxiliary losses only
            self.uniform_users(self.aux_users, "u/", out)
        return out

    def uniform_users(self, count: int, prefix: str, out: dict[str, np.ndarray]) -> np.ndarray:
        """``count`` users drawn uniformly (with their own sampled friends, no pair to guard),
        their tower inputs added to ``out`` under ``prefix``; returns their rows."""
        rows = self.rng.integers(0, len(self.table), count)
        neighbours = sample_neighbours(self.table, rows, self.fanout, self.rng)
        inputs = tower_inputs(self.table, rows, neighbours)
        out.update({f"{prefix}{k}": v for k, v in inputs.items()})
        return rows

    def epoch(self) -> Iterator[dict[str, np.ndarray]]:
        # ``permutation(n)`` shuffles an int64 ``arange(n)``; shuffling a narrower one draws the
        # same swaps, so the order (and every batch of a seed) is unchanged.
        order = np.arange(self.num_pairs, dtype=row_dtype(self.num_pairs))
        (self.order_rng or self.rng).shuffle(order)
        for step in range(self.steps_per_epoch):
            start = (step * self.num_shards + self.shard) * self.batch_size
            yield self.batch(*self.pairs(order[start : start + self.batch_size]))

    def dataset(self) -> tf.data.Dataset:
        """One epoch as a prefetching tf.data pipeline (numpy batch assembly in a generator)."""
        example = self.batch(*self.pairs(np.arange(2)))
        signature = {
            k: tf.TensorSpec(shape=(None, *v.shape[1:]), dtype=tf.as_dtype(v.dtype))
            for k, v in example.items()
        }
        return tf.data.Dataset.from_generator(self.epoch, output_signature=signature).prefetch(2)


def embed_all(
    tower: tf.keras.Model, table: FeatureTable, fanout: int, batch: int = 8192
) -> np.ndarray:
    """Index vectors of every user in the table, in inference mode (deterministic neighbours: the
    first ``fanout`` of each user's stored friend sample, exactly as serving does); their query
    vectors are ``tower.query_form`` of these.

    Layer by layer, as GraphSAGE infers over a whole graph: every user's layer-1 state once, then
    each user's layer 2 over its friends' states. The tower on each user's inputs recomputes each
    friend's state for every user that samples it, (1 + fanout) times the work: validating one
    epoch of a 5M-user graph took ~27 min of its 2 cores that way (docs/scaling.md). The same
    vectors to float rounding (tested against the tower and the SavedModel, 1e-5)."""
    n = len(table)
    if not n:
        return np.zeros((0, tower.output_dim), np.float32)
    states = layer1_states(tower, table, 0, n, batch)
    return readout_rows(tower, table, states, np.arange(n), fanout, batch)


def layer1_states(
    tower: tf.keras.Model, table: FeatureTable, start: int, stop: int, batch: int = 8192
) -> np.ndarray:
    """The layer-1 states of users ``start..stop-1`` (``embed_all``'s first pass; a worker of a
    data-parallel group computes its range and the group all-gathers them)."""
    node_states = tf.function(tower.node_states, reduce_retracing=True)
    states: np.ndarray | None = None  # filled in place: a list of chunks held it twice
    for lo in range(start, stop, batch):
        rows = np.arange(lo, min(lo + batch, stop))
        part = node_states(node_features(table, rows)).numpy()
        if states is None:
            states = np.empty((stop - start, part.shape[1]), dtype=part.dtype)
        states[rows - start] = part
    assert states is not None, "an empty range of users"
    return states


def readout_rows(
    tower: tf.keras.Model,
    table: FeatureTable,
    states: np.ndarray,
    rows: np.ndarray,
    fanout: int,
    batch: int = 8192,
) -> np.ndarray:
    """Index vectors of the users ``rows`` from every user's layer-1 ``states`` [n, h]
    (``embed_all``'s second pass)."""

    @tf.function(reduce_retracing=True)
    def vectors(h_self, friend_states, mask, degree):
        unit = tower.readout(h_self, friend_states, mask)
        return tower.candidate_vectors(unit, {"self_degree": degree})

    out = np.empty((len(rows), tower.output_dim), dtype=np.float32)
    for lo in range(0, len(rows), batch):
        part = rows[lo : lo + batch]
        friends, mask = friend_states_of(states, sample_neighbours(table, part, fanout, rng=None))
        out[lo : lo + len(part)] = vectors(states[part], friends, mask, table.degree[part]).numpy()
    return out
