"""The graph-feature job on Ray: the same kernel as the local job, one Ray task per user range.

The friendships are read where they are, in partitions: no process holds the whole graph. Reader
tasks each read a slice of the prepared friendships file's row groups once (the training split as
of the cutoff, both directions) and route every directed friendship to the bucket of its owner
(contiguous buckets of equal user counts, several per partition: a shuffle through the object
store), counting each bucket's work on the way (friend lists plus sparse-bag products). The
driver then groups consecutive buckets into user ranges of about equal work, so one heavy user
cannot hold up a partition much longer than the others, and one task per range assembles its
users' friend lists into exactly the CSR rows the local job builds and runs
``partition_features``, the very function the local job runs over all users. The driver holds
O(users) only: the profile side (``GraphJobInputs``, put in the object store once) and the
result; the delta against the stored snapshot and the parquet write stay on it (vectorised,
seconds at a million users; docs/scaling.md).
"""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from feature_repo.jobs.graph_features import (
    GraphFeatures,
    GraphJobInputs,
    PartitionFeatures,
    _blocks,
    assemble,
    partition_features,
)
from friendrec.config import Settings
from friendrec.data.canonical import PreparedDataset, edge_mask, read_friendships
from friendrec.engine import ray_partitions, ray_session
from friendrec.logs import progress_disabled

log = logging.getLogger(__name__)

# Owner buckets per partition: the granularity at which ranges are balanced by work.
BUCKETS_PER_PARTITION = 8


def ranges_of_work(work: np.ndarray, parts: int) -> list[tuple[int, int]]:
    """Contiguous row ranges of about equal work: each friendship costs its row 1 plus the
    friend's sparse-bag length (the products of the bag step), each user 1 more."""
    work = work + 1.0
    budget = max(float(work.sum()) / max(parts, 1), 1.0)
    return list(itertools.pairwise(_blocks(work, budget)))


def compute_graph_features_ray(
    data: PreparedDataset,
    friendships: Path,
    as_of: int,
    settings: Settings,
    show_progress: bool = True,
) -> GraphFeatures:
    """Graph features of every user, computed by Ray tasks over user ranges from the
    ``friendships`` file read in row-group partitions (equal to the local job's: the same kernel
    on the same rows). ``data`` may be loaded without its friendships."""
    import ray

    with ray_session(settings):
        started = time.perf_counter()
        inputs = GraphJobInputs.of(data, settings)
        inputs_ref = ray.put(inputs)
        ids_ref = ray.put(data.user_ids)
        bags_ref = ray.put(np.diff(inputs.bags.indptr))
        partitions = ray_partitions(settings)
        slices = row_group_slices(friendships, partitions)
        n = len(data.user_ids)
        buckets = min(max(n, 1), BUCKETS_PER_PARTITION * partitions)
        bounds = np.linspace(0, n, buckets + 1).round().astype(np.int64)
        route = ray.remote(_route_task).options(num_returns=buckets + 1)
        routed = [route.remote(friendships, g, as_of, ids_ref, bags_ref, bounds) for g in slices]
        # Each slice's last return is its work per bucket: small, fetched first.
        work = np.zeros(buckets)
        for refs in routed:
            work += ray.get(refs[-1])
        groups = ranges_of_work(work + np.diff(bounds), partitions)  # consecutive buckets
        ranges = [(int(bounds[lo]), int(bounds[hi])) for lo, hi in groups]
        task = ray.remote(_range_task)
        pending = {
            task.remote(
                ranges[i][0],
                ranges[i][1],
                inputs_ref,
                *[pieces[b] for pieces in routed for b in range(lo, hi)],
            ): i
            for i, (lo, hi) in enumerate(groups)
        }
        del routed
        log.info(
            "graph features on Ray: %d users in %d partitions from %d friendship slices "
            "(driver %.1fs)",
            len(data.user_ids),
            len(ranges),
            len(slices),
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
        del inputs_ref, ids_ref, bags_ref
    return assemble([p for p in parts if p is not None], data.user_ids, data.contract)


def row_group_slices(path: Path, parts: int) -> list[list[int]]:
    """The file's row groups in about ``parts`` contiguous slices of about equal rows."""
    meta = pq.ParquetFile(path).metadata
    rows = np.array([meta.row_group(i).num_rows for i in range(meta.num_row_groups)], float)
    if not len(rows):
        return []
    cuts = _blocks(rows, max(float(rows.sum()) / max(parts, 1), 1.0))
    return [list(range(a, b)) for a, b in itertools.pairwise(cuts) if b > a]


def training_edges_of(
    path: Path, row_groups: list[int], as_of: int, user_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(owner row, friend row) of both directions of the training friendships created at or
    before ``as_of`` in some row groups: ``training_adjacency``'s edges, read in a slice."""
    src, dst, created, split = read_friendships(path, row_groups)
    keep = edge_mask(split, created, "train", as_of)
    a, b = np.searchsorted(user_ids, src[keep]), np.searchsorted(user_ids, dst[keep])
    return np.concatenate([a, b]), np.concatenate([b, a])


def _route_task(
    path: Path,
    row_groups: list[int],
    as_of: int,
    user_ids: np.ndarray,
    bag_lengths: np.ndarray,
    bounds: np.ndarray,
) -> tuple[np.ndarray, ...]:
    """This slice's directed friendships, one [2, k] array (owner, friend) per bucket of owners
    (``bounds``), then the buckets' work (``ranges_of_work``'s measure)."""
    owner, friend = training_edges_of(path, row_groups, as_of, user_ids)
    bucket = np.searchsorted(bounds, owner, side="right") - 1
    order = np.argsort(bucket, kind="stable")
    cuts = np.searchsorted(bucket[order], np.arange(len(bounds)))
    pieces = tuple(
        np.stack([owner[order[a:b]], friend[order[a:b]]]) for a, b in itertools.pairwise(cuts)
    )
    work = np.bincount(bucket, weights=1.0 + bag_lengths[friend], minlength=len(bounds) - 1)
    return (*pieces, work)


def _range_task(lo: int, hi: int, inputs: GraphJobInputs, *pieces: np.ndarray) -> PartitionFeatures:
    """Users ``lo..hi``: their friend lists as the local job's CSR rows (neighbours sorted
    within a row, as ``Adjacency.from_edges`` orders them), then the kernel."""
    edges = np.concatenate(pieces, axis=1) if pieces else np.zeros((2, 0), np.int64)
    rows, friends = edges[0] - lo, edges[1]
    order = np.lexsort((friends, rows))
    indptr = np.zeros(hi - lo + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=hi - lo), out=indptr[1:])
    return partition_features(indptr, friends[order], lo, inputs)
