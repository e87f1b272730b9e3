"""The graph-feature job: training graph as of a timestamp -> per-user graph features.

Vectorised end to end (numpy + scipy.sparse, no per-user Python): the friends' mean sparse bag is
one sparse product ``A @ X`` per block of users, top-k'd per row. Output rows carry
``event_timestamp = as_of`` and are appended to the Feast offline source as a *delta*: only users
whose features changed since their latest stored row get a new row (the first snapshot writes
everyone), so point-in-time joins stay exact and incremental materialization moves only changes.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp
from tqdm.auto import tqdm

from friendrec.config import Settings
from friendrec.contract import (
    DEGREE,
    EVENT_TIMESTAMP,
    FRIEND_IDS,
    JOIN_KEY,
    NBR_SPARSE_IDS,
    NBR_SPARSE_WEIGHTS,
    SPARSE_IDS,
    Contract,
)
from friendrec.data.canonical import (
    TIMESTAMP_TYPE,
    PreparedDataset,
    load_prepared,
    write_atomic,
)
from friendrec.data.graph import Adjacency, list_array_to_csr, sparse_list_array
from friendrec.engine import resolve_engine
from friendrec.logs import progress_disabled
from friendrec.paths import DatasetPaths
from friendrec.sampling import edge_priority, splitmix64

log = logging.getLogger(__name__)

_BLOCK_NNZ = 40_000_000  # bound on A@X products held at once (~0.5 GB)


@dataclass
class GraphFeatures:
    """Per-user graph features as columnar arrays (lists in CSR form), rows aligned with users."""

    user_ids: np.ndarray
    degree: np.ndarray  # int64 [n]
    friend_offsets: np.ndarray
    friend_values: np.ndarray  # user ids
    nbr_offsets: np.ndarray
    nbr_ids: np.ndarray
    nbr_weights: np.ndarray  # float32
    nbr_profile_mean: np.ndarray  # float32 [n, P]: P = the contract's profile scalars
    contract: Contract  # the dataset's: the column names

    def to_table(self, as_of: int, rows: np.ndarray | None = None) -> pa.Table:
        """Arrow table of the given rows (all by default) with event_timestamp = as_of."""
        sel = np.arange(len(self.user_ids)) if rows is None else rows
        f_off, f_val = _take_csr(self.friend_offsets, self.friend_values, sel)
        n_off, n_ids = _take_csr(self.nbr_offsets, self.nbr_ids, sel)
        _, n_w = _take_csr(self.nbr_offsets, self.nbr_weights, sel)
        p = self.nbr_profile_mean[sel]
        width = p.shape[1]
        return pa.table(
            {
                JOIN_KEY: pa.array(self.user_ids[sel], type=pa.int64()),
                DEGREE.name: pa.array(self.degree[sel], type=pa.int64()),
                FRIEND_IDS.name: sparse_list_array(f_off, f_val),
                NBR_SPARSE_IDS.name: sparse_list_array(n_off, n_ids),
                NBR_SPARSE_WEIGHTS.name: pa.ListArray.from_arrays(
                    pa.array(n_off.astype(np.int64)), pa.array(n_w, type=pa.float32())
                ).cast(pa.list_(pa.float32())),
                self.contract.nbr_profile_mean.name: pa.ListArray.from_arrays(
                    pa.array(np.arange(len(sel) + 1, dtype=np.int64) * width),
                    pa.array(p.reshape(-1), type=pa.float32()),
                ).cast(pa.list_(pa.float32())),
                EVENT_TIMESTAMP: pa.array(
                    np.full(len(sel), as_of * 1_000_000, dtype=np.int64)
                ).cast(TIMESTAMP_TYPE),
            }
        )

    def fingerprints(self) -> np.ndarray:
        """A 64-bit hash per user of every feature value (to detect changed rows)."""
        return _fingerprints(
            self.degree,
            [
                (self.friend_offsets, self.friend_values.astype(np.uint64)),
                (self.nbr_offsets, self.nbr_ids.astype(np.uint64)),
                (self.nbr_offsets, self.nbr_weights.astype(np.float32).view(np.uint32)),
            ],
            self.nbr_profile_mean,
        )


def _gather_csr(
    starts: np.ndarray, lengths: np.ndarray, values: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A new CSR whose row i is values[starts[i] : starts[i] + lengths[i]] (vectorised)."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    shift = np.repeat(starts - offsets[:-1], lengths)
    return offsets, values[shift + np.arange(offsets[-1])]


def _take_csr(
    offsets: np.ndarray, values: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    if len(rows) == len(offsets) - 1 and np.array_equal(rows, np.arange(len(rows))):
        return offsets, values
    return _gather_csr(offsets[:-1][rows], np.diff(offsets)[rows], values)


def _fingerprints(
    degree: np.ndarray, lists: list[tuple[np.ndarray, np.ndarray]], dense: np.ndarray
) -> np.ndarray:
    with np.errstate(over="ignore"):
        h = splitmix64(degree.astype(np.uint64))
        for k, (offsets, values) in enumerate(lists):
            lengths = np.diff(offsets)
            position = np.arange(len(values), dtype=np.int64) - np.repeat(offsets[:-1], lengths)
            mixed = splitmix64(
                values.astype(np.uint64) ^ (position.astype(np.uint64) << np.uint64(40))
            )
            sums = _segment_sum(offsets, mixed)
            h = splitmix64(h ^ sums ^ np.uint64(k + 1) ^ lengths.astype(np.uint64))
        bits = np.ascontiguousarray(dense, dtype=np.float32).view(np.uint32).astype(np.uint64)
        for j in range(bits.shape[1]):
            h = splitmix64(h ^ (bits[:, j] << np.uint64(j % 32)))
    return h


def _segment_sum(offsets: np.ndarray, values: np.ndarray) -> np.ndarray:
    """sum(values[offsets[i]:offsets[i+1]]) per row with uint64 wrap-around, vectorised."""
    csum = np.zeros(len(values) + 1, dtype=np.uint64)
    np.cumsum(values, dtype=np.uint64, out=csum[1:])
    return csum[offsets[1:]] - csum[offsets[:-1]]


@dataclass(frozen=True)
class GraphJobInputs:
    """What every user partition reads besides its own friend lists: the per-user profile side
    (transformed profile, capped and normalised sparse bags; O(users)) and the job's settings.
    On Ray it is put in the object store once and read zero-copy by every task."""

    user_ids: np.ndarray
    profile_t: np.ndarray  # float32 [n, P]
    bags: sp.csr_matrix  # float32 [n, vocab]: each user's sparse bag, rows summing to 1
    seed: int
    friend_cap: int
    nbr_sparse_cap: int

    @classmethod
    def of(cls, data: PreparedDataset, settings: Settings) -> GraphJobInputs:
        cfg = settings.features
        sp_offsets, sp_values = cap_sparse(data.sparse_offsets, data.sparse_values, cfg.sparse_cap)
        x_len = np.diff(sp_offsets)
        bags = sp.csr_matrix(
            (
                np.repeat(1.0 / np.maximum(x_len, 1), x_len).astype(np.float32),
                sp_values,
                sp_offsets,
            ),
            shape=(len(data.user_ids), data.meta.vocab_size),
        )
        return cls(
            user_ids=data.user_ids,
            profile_t=np.asarray(data.contract.transform_profile(data.profile), np.float32),
            bags=bags,
            seed=settings.data.seed,
            friend_cap=cfg.friend_cap,
            nbr_sparse_cap=cfg.nbr_sparse_cap,
        )


@dataclass
class PartitionFeatures:
    """Graph features of a contiguous range of users (lists as per-row counts + values)."""

    degree: np.ndarray
    friend_counts: np.ndarray
    friend_values: np.ndarray
    nbr_profile_mean: np.ndarray
    nbr_counts: np.ndarray
    nbr_ids: np.ndarray
    nbr_weights: np.ndarray


def partition_features(
    indptr: np.ndarray,
    indices: np.ndarray,
    first_row: int,
    inputs: GraphJobInputs,
    show_progress: bool = False,
) -> PartitionFeatures:
    """The job's kernel: features of users ``first_row .. first_row + len(indptr) - 2`` from
    their friend lists (a CSR slice: ``indptr`` starts at 0, ``indices`` are row numbers into
    ``inputs``). Every value depends only on the user's own friends and their profile side, so
    any split of the users gives the same rows; both engines run exactly this."""
    rows_n = len(indptr) - 1
    degree = np.diff(indptr)
    rows = np.repeat(np.arange(rows_n), degree)

    # Deterministic capped friend sample: smallest hash priority first (friendrec.sampling).
    owner_ids = inputs.user_ids[first_row + rows]
    friend_user_ids = inputs.user_ids[indices]
    priority = edge_priority(inputs.seed, owner_ids, friend_user_ids)
    order = np.lexsort((priority, rows))
    rank = np.arange(len(order)) - np.repeat(indptr[:-1], degree)
    friend_values = friend_user_ids[order[rank < inputs.friend_cap]]

    # Mean transformed profile of friends.
    n = len(inputs.user_ids)
    a = sp.csr_matrix((np.ones(len(indices), dtype=np.float32), indices, indptr), shape=(rows_n, n))
    inv_degree = np.where(degree > 0, 1.0 / np.maximum(degree, 1), 0.0).astype(np.float32)
    nbr_profile_mean = (a @ inputs.profile_t) * inv_degree[:, None]

    # Friends' mean sparse bag, top nbr_sparse_cap ids per user, computed in blocks of users.
    # Each friend contributes its own sparse bag normalised to sum 1 (the tower's mean bag), so
    # the weights are exactly the mean of the friends' bags.
    x_len = np.diff(inputs.bags.indptr)
    work = np.bincount(rows, weights=x_len[indices], minlength=rows_n)  # products per user
    bounds = _blocks(work, _BLOCK_NNZ)
    nbr_ids_parts, nbr_w_parts = [], []
    nbr_counts = np.zeros(rows_n, dtype=np.int64)
    for lo, hi in tqdm(
        list(itertools.pairwise(bounds)),
        desc="friends' sparse bags",
        unit="block",
        disable=progress_disabled(show_progress),
    ):
        bag = (a[lo:hi] @ inputs.bags).tocsr()
        bag.sum_duplicates()
        block_rows = np.repeat(np.arange(hi - lo), np.diff(bag.indptr))
        # Heaviest first, ties by smaller id: deterministic.
        order = np.lexsort((bag.indices, -bag.data, block_rows))
        row_rank = np.arange(len(order)) - np.repeat(bag.indptr[:-1], np.diff(bag.indptr))
        top = order[row_rank < inputs.nbr_sparse_cap]
        nbr_ids_parts.append(bag.indices[top].astype(np.int64))
        nbr_w_parts.append((bag.data[top] * inv_degree[lo:hi][block_rows[top]]).astype(np.float32))
        nbr_counts[lo:hi] = np.minimum(np.diff(bag.indptr), inputs.nbr_sparse_cap)
    return PartitionFeatures(
        degree=degree.astype(np.int64),
        friend_counts=np.minimum(degree, inputs.friend_cap).astype(np.int64),
        friend_values=friend_values.astype(np.int64),
        nbr_profile_mean=np.asarray(nbr_profile_mean, dtype=np.float32),
        nbr_counts=nbr_counts,
        nbr_ids=np.concatenate(nbr_ids_parts) if nbr_ids_parts else np.zeros(0, np.int64),
        nbr_weights=np.concatenate(nbr_w_parts) if nbr_w_parts else np.zeros(0, np.float32),
    )


def _offsets(counts: np.ndarray) -> np.ndarray:
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets


def assemble(parts: list[PartitionFeatures], user_ids: np.ndarray, contract: Contract):
    """Concatenate the partitions of consecutive user ranges into one ``GraphFeatures``."""
    width = len(contract.profile_scalars)

    def cat(name: str, dtype: type) -> np.ndarray:
        arrays = [getattr(p, name) for p in parts]
        return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)

    means = [p.nbr_profile_mean for p in parts]
    return GraphFeatures(
        user_ids=user_ids,
        degree=cat("degree", np.int64),
        friend_offsets=_offsets(cat("friend_counts", np.int64)),
        friend_values=cat("friend_values", np.int64),
        nbr_offsets=_offsets(cat("nbr_counts", np.int64)),
        nbr_ids=cat("nbr_ids", np.int64),
        nbr_weights=cat("nbr_weights", np.float32),
        nbr_profile_mean=np.concatenate(means) if means else np.zeros((0, width), np.float32),
        contract=contract,
    )


def training_adjacency(data: PreparedDataset, as_of: int) -> Adjacency:
    """Both directions of the *training* friendships created at or before ``as_of``.

    Held-out (val/test) friendships are never read here: that is the leakage guarantee.
    """
    src, dst = data.edges("train", as_of=as_of)
    return Adjacency.from_edges(len(data.user_ids), data.index_of(src), data.index_of(dst))


def compute_graph_features(
    data: PreparedDataset, as_of: int, settings: Settings, show_progress: bool = True
) -> GraphFeatures:
    """Graph features of every user from the training friendships as of ``as_of``, in this
    process (the ``local`` engine: one partition)."""
    adj = training_adjacency(data, as_of)
    inputs = GraphJobInputs.of(data, settings)
    part = partition_features(adj.indptr, adj.indices, 0, inputs, show_progress)
    return assemble([part], data.user_ids, data.contract)


def _blocks(work: np.ndarray, budget: float) -> list[int]:
    """Split rows 0..n into contiguous blocks whose summed work stays near the budget."""
    n = len(work)
    if n == 0:
        return [0, 0]
    cumulative = np.cumsum(work)
    cuts = np.searchsorted(cumulative, np.arange(budget, cumulative[-1], budget))
    return sorted({0, *[int(c) + 1 for c in cuts if 0 < c + 1 < n], n})


def features_from_table(table: pa.Table, contract: Contract) -> GraphFeatures:
    """Read back graph-feature rows of the dataset's ``contract`` (the inverse of
    ``GraphFeatures.to_table``)."""
    f_off, f_val = list_array_to_csr(table.column(FRIEND_IDS.name))
    n_off, n_ids = list_array_to_csr(table.column(NBR_SPARSE_IDS.name))
    weights = table.column(NBR_SPARSE_WEIGHTS.name).combine_chunks()
    means = table.column(contract.nbr_profile_mean.name).combine_chunks()
    return GraphFeatures(
        user_ids=table.column(JOIN_KEY).to_numpy(),
        degree=table.column(DEGREE.name).to_numpy(),
        friend_offsets=f_off,
        friend_values=f_val,
        nbr_offsets=n_off,
        nbr_ids=n_ids,
        nbr_weights=weights.flatten().to_numpy(zero_copy_only=False).astype(np.float32),
        nbr_profile_mean=means.flatten()
        .to_numpy(zero_copy_only=False)
        .astype(np.float32)
        .reshape(len(table), len(contract.profile_scalars)),
        contract=contract,
    )


def latest_rows(table: pa.Table, before: int | None = None) -> pa.Table:
    """The latest row per user (optionally with event time strictly before ``before``)."""
    ts = table.column(EVENT_TIMESTAMP).cast(pa.int64()).to_numpy() // 1_000_000
    ids = table.column(JOIN_KEY).to_numpy()
    idx = np.arange(len(ts)) if before is None else np.flatnonzero(ts < before)
    order = idx[np.lexsort((ts[idx], ids[idx]))]
    last = np.ones(len(order), dtype=bool)
    last[:-1] = ids[order][1:] != ids[order][:-1]
    return table.take(pa.array(order[last]))


def cap_sparse(offsets: np.ndarray, values: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the first ``cap`` sparse ids of every user (CSR in, CSR out)."""
    return _gather_csr(offsets[:-1], np.minimum(np.diff(offsets), cap), values)


def profile_table(data: PreparedDataset, settings: Settings) -> pa.Table:
    """The profile source: users with sparse ids capped at ``features.sparse_cap``."""
    offsets, values = cap_sparse(
        data.sparse_offsets, data.sparse_values, settings.features.sparse_cap
    )
    columns: dict[str, pa.Array] = {JOIN_KEY: pa.array(data.user_ids, type=pa.int64())}
    for j, feature in enumerate(data.contract.profile_scalars):
        columns[feature.name] = pa.array(data.profile[:, j], type=pa.float32())
    columns[SPARSE_IDS.name] = sparse_list_array(offsets, values)
    columns[EVENT_TIMESTAMP] = pa.array(
        np.full(len(data.user_ids), data.meta.profile_ts * 1_000_000, dtype=np.int64)
    ).cast(TIMESTAMP_TYPE)
    return pa.table(columns)


@dataclass
class BuildReport:
    dataset: str
    as_of: int
    users: int
    rows_written: int
    rows_total: int

    def as_dict(self) -> dict[str, object]:
        return {
            "dataset": self.dataset,
            "as_of": datetime.fromtimestamp(self.as_of, UTC).isoformat(),
            "users": self.users,
            "graph_rows_written": self.rows_written,
            "graph_rows_total": self.rows_total,
        }


def build_features(
    settings: Settings,
    dataset: str | None = None,
    as_of: int | None = None,
    show_progress: bool = True,
    engine: str | None = None,
) -> BuildReport:
    """Write the profile source and append a graph-feature snapshot (delta) as of ``as_of``.

    Re-running with the same ``as_of`` replaces that snapshot with identical rows (idempotent).
    Snapshots must be built in time order: one older than the newest stored snapshot is refused,
    because incremental materialization only looks forward.
    """
    paths = DatasetPaths.of(settings, dataset)
    on_ray = resolve_engine(settings, engine) == "ray"
    data = load_prepared(paths, friendships=not on_ray)  # Ray tasks read them in partitions
    as_of = data.meta.train_cutoff_ts if as_of is None else int(as_of)
    write_atomic(profile_table(data, settings), paths.profile_source)
    if on_ray:
        from feature_repo.jobs.graph_features_ray import compute_graph_features_ray

        features = compute_graph_features_ray(
            data, paths.friendships, as_of, settings, show_progress
        )
    else:
        features = compute_graph_features(data, as_of, settings, show_progress)

    existing = pq.read_table(paths.graph_source) if paths.graph_source.exists() else None
    if existing is not None:
        ts = existing.column(EVENT_TIMESTAMP).cast(pa.int64()).to_numpy() // 1_000_000
        if ts.size and ts.max() > as_of:
            raise ValueError(
                f"a newer snapshot ({datetime.fromtimestamp(int(ts.max()), UTC).isoformat()}) "
                f"already exists in {paths.graph_source}; snapshots are append-only in time order"
            )
        existing = existing.filter(
            pc.less(
                existing.column(EVENT_TIMESTAMP),
                pa.scalar(as_of * 1_000_000, TIMESTAMP_TYPE),
            )
        )
    if existing is None or existing.num_rows == 0:
        changed = np.arange(len(data.user_ids))
    else:
        previous = features_from_table(latest_rows(existing), data.contract)  # sorted by id
        prev_fp = previous.fingerprints()
        pos = np.minimum(np.searchsorted(previous.user_ids, data.user_ids), len(prev_fp) - 1)
        known = previous.user_ids[pos] == data.user_ids
        changed = np.flatnonzero(~known | (prev_fp[pos] != features.fingerprints()))
    delta = features.to_table(as_of, changed)
    combined = delta if existing is None else pa.concat_tables([existing, delta])
    write_atomic(combined, paths.graph_source)
    report = BuildReport(paths.name, as_of, len(data.user_ids), delta.num_rows, combined.num_rows)
    log.info("graph features: %s", report.as_dict())
    return report
