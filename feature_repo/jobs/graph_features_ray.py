"""The graph-feature job on Ray: the same kernel as the local job, one Ray task per user range.

The driver builds the training graph's CSR (16 bytes per directed friendship) and puts the
per-user profile side (``GraphJobInputs``) in the object store once; each task gets its users'
friend lists and computes their rows with ``partition_features``, the very function the local
job runs over all users. Users are split into contiguous ranges of about equal work (friend
lists plus sparse-bag products), so one heavy user cannot hold up a partition much longer than
the others. The delta against the stored snapshot and the parquet write stay on the driver:
they are vectorised and take seconds at a million users (docs/scaling.md).
"""

from __future__ import annotations

import itertools
import logging
import time

import numpy as np
from tqdm.auto import tqdm

from feature_repo.jobs.graph_features import (
    GraphFeatures,
    GraphJobInputs,
    PartitionFeatures,
    _blocks,
    assemble,
    partition_features,
    training_adjacency,
)
from friendrec.config import Settings
from friendrec.data.canonical import PreparedDataset
from friendrec.engine import ray_partitions, ray_session
from friendrec.logs import progress_disabled

log = logging.getLogger(__name__)


def user_ranges(indptr: np.ndarray, indices: np.ndarray, bag_lengths: np.ndarray, parts: int):
    """Contiguous row ranges of about equal work: each friendship costs its row 1 plus the
    friend's sparse-bag length (the products of the bag step)."""
    rows_n = len(indptr) - 1
    rows = np.repeat(np.arange(rows_n), np.diff(indptr))
    work = np.bincount(rows, weights=1.0 + bag_lengths[indices], minlength=rows_n) + 1.0
    budget = max(float(work.sum()) / max(parts, 1), 1.0)
    return list(itertools.pairwise(_blocks(work, budget)))


def compute_graph_features_ray(
    data: PreparedDataset, as_of: int, settings: Settings, show_progress: bool = True
) -> GraphFeatures:
    """Graph features of every user, computed by Ray tasks over user ranges (equal to the local
    job's: the same kernel on the same rows)."""
    import ray

    with ray_session(settings):
        started = time.perf_counter()
        adj = training_adjacency(data, as_of)
        inputs = GraphJobInputs.of(data, settings)
        inputs_ref = ray.put(inputs)
        ranges = user_ranges(
            adj.indptr, adj.indices, np.diff(inputs.bags.indptr), ray_partitions(settings)
        )
        task = ray.remote(_partition_task)
        pending = {
            task.remote(
                adj.indptr[lo : hi + 1] - adj.indptr[lo],
                adj.indices[adj.indptr[lo] : adj.indptr[hi]],
                lo,
                inputs_ref,
            ): i
            for i, (lo, hi) in enumerate(ranges)
        }
        log.info(
            "graph features on Ray: %d users in %d partitions (driver %.1fs)",
            len(data.user_ids),
            len(ranges),
            time.perf_counter() - started,
        )
        parts: list[PartitionFeatures | None] = [None] * len(ranges)
        with tqdm(
            total=len(data.user_ids),
            desc="graph features (ray)",
            unit="user",
            disable=progress_disabled(show_progress),
        ) as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                i = pending.pop(done[0])
                parts[i] = ray.get(done[0])
                lo, hi = ranges[i]
                bar.update(hi - lo)
        del inputs_ref
    return assemble([p for p in parts if p is not None], data.user_ids, data.contract)


def _partition_task(
    indptr: np.ndarray, indices: np.ndarray, first_row: int, inputs: GraphJobInputs
) -> PartitionFeatures:
    return partition_features(indptr, indices, first_row, inputs)
