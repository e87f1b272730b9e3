"""The canonical dataset layout: users and friendships as parquet, the feature contract, the id
mapping (string ids), the ingestion report and meta.json.

Timestamps and split (docs/data.md). When the schema names a friendship timestamp column, those
times are used: the oldest 85% of friendships are *train*, the next 5% *val*, the newest 10% *test*
(ties broken by a seeded permutation). Without one (the MUSAE graphs), each friendship gets a time
from a seeded random permutation: edge of rank ``r`` (of ``E``) was created at
``timeline_start + floor(r * timeline_days * 86400 / E)`` seconds, which makes the same temporal
split a seeded random 85/5/10 split. Either way every feature computed "as of" the training cutoff
provably excludes the held-out friendships, which later arrive as streaming events. Profiles exist
from the first friendship's time (the timeline start).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel

from friendrec import contract
from friendrec.config import DataSettings, Settings
from friendrec.contract import Contract
from friendrec.data.graph import list_array_to_csr, sparse_list_array
from friendrec.data.ingest import Ingested, IngestReport, ingest
from friendrec.errors import NotPreparedError
from friendrec.paths import DatasetPaths
from friendrec.schema import ResolvedSchema, resolve

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
TIMESTAMP_TYPE = pa.timestamp("us", tz="UTC")  # duckdb crashes on nanosecond timestamps


class DatasetMeta(BaseModel):
    """What `data prepare` produced; read by every later job (and stamped into model cards)."""

    name: str
    slug: str
    num_users: int
    num_friendships: int
    vocab_size: int
    seed: int
    timeline_start: int
    timeline_days: int
    split_counts: dict[str, int]
    split_sha256: str
    train_cutoff_ts: int  # unix seconds of the newest training friendship
    profile_ts: int
    sources: dict[str, str]
    contract_version: int = contract.CONTRACT_VERSION
    schema_hash: str = ""
    schema_file: str = ""
    id_type: str = "integer"
    timestamps: str = "synthetic"  # "synthetic" or "column:<name>"


@dataclass
class PreparedDataset:
    """A prepared dataset loaded back: arrays ready for vectorised jobs."""

    meta: DatasetMeta
    contract: Contract
    user_ids: np.ndarray  # int64 [n], sorted
    profile: np.ndarray  # float32 [n, P] raw scalars
    sparse_offsets: np.ndarray
    sparse_values: np.ndarray
    src: np.ndarray  # int64 [E] user ids
    dst: np.ndarray
    created_ts: np.ndarray  # int64 [E] unix seconds
    split: np.ndarray  # int8 [E]: index into SPLITS
    # False: loaded without its friendships (``load_prepared(friendships=False)``), for a job
    # that reads them itself, in partitions (the Ray graph job).
    has_friendships: bool = True

    def index_of(self, ids: np.ndarray) -> np.ndarray:
        """User ids -> dense row indices (ids must be known)."""
        return np.searchsorted(self.user_ids, ids)

    def edges(self, split: str, as_of: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(src, dst) user ids of one split, optionally only those created at or before as_of."""
        if not self.has_friendships:
            raise RuntimeError(f"{self.meta.name} was loaded without its friendships")
        mask = edge_mask(self.split, self.created_ts, split, as_of)
        return self.src[mask], self.dst[mask]


def edge_mask(
    split_codes: np.ndarray, created: np.ndarray, split: str, as_of: int | None = None
) -> np.ndarray:
    """Which friendships (``read_friendships``' split codes and created seconds) belong to
    ``split``, optionally only those created at or before ``as_of``."""
    mask = split_codes == SPLITS.index(split)
    if as_of is not None:
        mask &= created <= as_of
    return mask


def assign_time_and_split(
    num_edges: int, cfg: DataSettings, created: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """created_ts (unix s) and split code per edge (see the module docstring).

    With ``created`` (real times) the rank is the time order, ties broken by the seeded
    permutation; without, the seeded permutation alone gives both rank and time.
    """
    rng = np.random.default_rng(cfg.seed)
    rank = np.empty(num_edges, dtype=np.int64)
    rank[rng.permutation(num_edges)] = np.arange(num_edges, dtype=np.int64)
    if created is None:
        span = cfg.timeline_days * 86_400
        created = cfg.timeline_start + (rank * span) // max(num_edges, 1)
    else:
        order = np.lexsort((rank, created))
        rank[order] = np.arange(num_edges, dtype=np.int64)
    n_test = round(num_edges * cfg.test_fraction)
    n_val = round(num_edges * cfg.val_fraction)
    n_train = num_edges - n_val - n_test
    split = np.zeros(num_edges, dtype=np.int8)
    split[rank >= n_train] = 1
    split[rank >= n_train + n_val] = 2
    return np.asarray(created, dtype=np.int64), split


def _split_hash(src: np.ndarray, dst: np.ndarray, split: np.ndarray) -> str:
    # Sorted by (src, dst): one int64 key (pairs are unique) sorts faster than a lexsort.
    order = np.argsort(src * (int(dst.max(initial=0)) + 1) + dst, kind="stable")
    digest = hashlib.sha256()
    for array in (src[order], dst[order], split[order]):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _seconds_to_timestamps(seconds: np.ndarray) -> pa.Array:
    return pa.array(seconds.astype(np.int64) * 1_000_000, type=pa.int64()).cast(TIMESTAMP_TYPE)


def users_table(data: Ingested, profile_ts: int) -> pa.Table:
    """The prepared users: id, raw profile scalars (contract names), sparse ids, a timestamp."""
    columns: dict[str, Any] = {contract.JOIN_KEY: pa.array(data.user_ids, type=pa.int64())}
    for j, feature in enumerate(data.contract.profile_scalars):
        columns[feature.name] = pa.array(data.profile[:, j], type=pa.float32())
    columns[contract.SPARSE_IDS.name] = sparse_list_array(data.sparse_offsets, data.sparse_values)
    columns[contract.EVENT_TIMESTAMP] = _seconds_to_timestamps(
        np.full(data.num_users, profile_ts, dtype=np.int64)
    )
    return pa.table(columns)


def write_atomic(table: pa.Table, path: Path) -> None:
    """Write parquet to a temp file beside the target, then rename: no half-written files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def resolve_dataset(
    settings: Settings, name: str | None = None, schema_path: Path | None = None
) -> ResolvedSchema:
    """The schema a command works on: ``--schema`` (or ``data.schema_file``) else the shipped
    schema of ``--dataset`` (or ``data.dataset``)."""
    schema_path = schema_path or settings.data.schema_file
    if schema_path is not None:
        return resolve(name, Path(schema_path))
    return resolve(name or settings.data.dataset)


def files_present(settings: Settings, name: str | None = None) -> bool:
    """Whether a dataset's declared files are on this machine (generated ones always are)."""
    import glob

    resolved = resolve_dataset(settings, name)
    if resolved.schema_.synthetic is not None:
        return True
    schema = resolved.schema_
    for pattern in [schema.friendships.path, *(u.path for u in schema.users)]:
        path = resolved.expand(pattern, settings.datasets_dir, settings.workdir)
        if not glob.glob(str(path)):
            return False
    return True


def check(
    settings: Settings, name: str | None = None, schema_path: Path | None = None
) -> IngestReport:
    """Validate and encode a dataset without writing anything: the report `data check` prints."""
    data = ingest(resolve_dataset(settings, name, schema_path), settings)
    return data.report


def prepare(
    settings: Settings, name: str | None = None, schema_path: Path | None = None
) -> DatasetMeta:
    """Read, validate, encode, time and split a dataset, then write its canonical layout.

    The layout is written to a staging folder and swapped in by rename: a failed run leaves any
    previous good layout of the dataset untouched.
    """
    resolved = resolve_dataset(settings, name, schema_path)
    paths = DatasetPaths.of(settings, resolved.dataset)
    data = ingest(resolved, settings)
    cfg = settings.data
    created, split = assign_time_and_split(data.num_friendships, cfg, data.created_ts)
    friendships = pa.table(
        {
            "src": pa.array(data.src, type=pa.int64()),
            "dst": pa.array(data.dst, type=pa.int64()),
            contract.CREATED_TIMESTAMP: _seconds_to_timestamps(created),
            "split": pa.DictionaryArray.from_arrays(
                pa.array(split, type=pa.int8()), pa.array(SPLITS)
            ),
        }
    )
    counts = {s: int(np.count_nonzero(split == i)) for i, s in enumerate(SPLITS)}
    train_created = created[split == 0]
    if data.created_ts is None:
        start, days = cfg.timeline_start, cfg.timeline_days
    else:
        start = int(created.min()) if created.size else cfg.timeline_start
        days = max(1, -(-(int(created.max(initial=start)) - start) // 86_400))
    meta = DatasetMeta(
        name=paths.name,
        slug=paths.slug,
        num_users=data.num_users,
        num_friendships=data.num_friendships,
        vocab_size=data.contract.vocab_size,
        seed=cfg.seed,
        timeline_start=start,
        timeline_days=days,
        split_counts=counts,
        split_sha256=_split_hash(data.src, data.dst, split),
        train_cutoff_ts=int(train_created.max()) if train_created.size else start,
        profile_ts=start,
        sources=data.sources,
        schema_hash=data.contract.schema_hash,
        schema_file=str(resolved.file),
        id_type=data.report.id_type,
        timestamps="synthetic" if data.created_ts is None else "column",
    )
    _invalidate_downstream(paths, meta)
    staging = Path(tempfile.mkdtemp(prefix=f".{paths.slug}.", dir=_ensure(paths.data_dir.parent)))
    try:
        write_atomic(users_table(data, meta.profile_ts), staging / paths.users.name)
        write_atomic(friendships, staging / paths.friendships.name)
        if data.external_ids is not None:
            id_map = pa.table(
                {
                    contract.JOIN_KEY: pa.array(data.user_ids, pa.int64()),
                    "external_id": data.external_ids,
                }
            )
            write_atomic(id_map, staging / paths.id_map.name)
        data.contract.save(staging)
        (staging / paths.report.name).write_text(data.report.model_dump_json(indent=2))
        (staging / paths.meta.name).write_text(meta.model_dump_json(indent=2))
        backup = paths.data_dir.with_name(f".{paths.slug}.old")
        if paths.data_dir.exists():
            shutil.rmtree(backup, ignore_errors=True)
            paths.data_dir.rename(backup)
        staging.rename(paths.data_dir)
        shutil.rmtree(backup, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for line in data.report.lines():
        log.info("%s", line)
    log.info(
        "prepared %s: %d users, %d friendships (%s), cutoff %s",
        meta.name,
        meta.num_users,
        meta.num_friendships,
        counts,
        datetime.fromtimestamp(meta.train_cutoff_ts, UTC).isoformat(),
    )
    return meta


def _invalidate_downstream(paths: DatasetPaths, meta: DatasetMeta) -> None:
    """A different split makes stored features and Feast state wrong: remove them."""
    if not paths.meta.is_file():
        return
    previous = DatasetMeta.model_validate(json.loads(paths.meta.read_text()))
    if previous.split_sha256 != meta.split_sha256 or previous.schema_hash != meta.schema_hash:
        log.warning(
            "%s: the split or the schema changed; removing its features and Feast state",
            paths.name,
        )
        shutil.rmtree(paths.features_dir, ignore_errors=True)
        shutil.rmtree(paths.feast_dir, ignore_errors=True)


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def read_meta(paths: DatasetPaths) -> DatasetMeta:
    if not paths.meta.is_file():
        raise NotPreparedError(
            f"dataset {paths.name!r} is not prepared in {paths.data_dir}; "
            f"run `friendrec data prepare --dataset {paths.name}` first"
        )
    return DatasetMeta.model_validate(json.loads(paths.meta.read_text()))


def load_prepared(paths: DatasetPaths, friendships: bool = True) -> PreparedDataset:
    """Load a prepared dataset into numpy arrays (columnar, no per-row Python); without its
    ``friendships`` (O(edges)) for a job that reads them in partitions (``read_friendships``)."""
    prepared = _read_prepared(paths, friendships)
    # Arrow's allocator keeps the decoding buffers it freed for reuse: at 1M users 0.7 GB, more
    # than the arrays themselves, held for the whole training run (docs/scaling.md).
    pa.default_memory_pool().release_unused()
    return prepared


def _read_prepared(paths: DatasetPaths, with_friendships: bool) -> PreparedDataset:
    meta = read_meta(paths)
    features = contract.load(paths.data_dir)
    users = pq.read_table(paths.users)
    profile = np.zeros((users.num_rows, len(features.profile_scalars)), dtype=np.float32)
    for j, name in enumerate(features.profile_scalar_names):
        profile[:, j] = users.column(name).to_numpy()
    offsets, values = list_array_to_csr(users.column(contract.SPARSE_IDS.name))
    if with_friendships:
        src, dst, created, split_codes = read_friendships(paths.friendships)
    else:
        src = dst = created = np.zeros(0, dtype=np.int64)
        split_codes = np.zeros(0, dtype=np.int8)
    return PreparedDataset(
        meta=meta,
        contract=features,
        user_ids=users.column(contract.JOIN_KEY).to_numpy(),
        profile=profile,
        sparse_offsets=offsets,
        sparse_values=values,
        src=src,
        dst=dst,
        created_ts=created,
        split=split_codes,
        has_friendships=with_friendships,
    )


def read_friendships(
    path: Path, row_groups: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(src, dst, created unix seconds, split code) of a prepared friendships file, or of some of
    its row groups (a partitioned reader's share)."""
    columns = ["src", "dst", "split", contract.CREATED_TIMESTAMP]
    if row_groups is None:
        table = pq.read_table(path, columns=columns)
    else:
        table = pq.ParquetFile(path).read_row_groups(list(row_groups), columns=columns)
    split_column = table.column("split").combine_chunks()
    split_codes = pc.index_in(split_column.cast(pa.string()), pa.array(SPLITS)).to_numpy()
    created = table.column(contract.CREATED_TIMESTAMP).cast(pa.int64()).to_numpy() // 1_000_000
    return (
        table.column("src").to_numpy(),
        table.column("dst").to_numpy(),
        created.astype(np.int64),
        split_codes.astype(np.int8),
    )


@dataclass
class IdMap:
    """A string-id dataset's mapping between its external ids and the dense ids friendrec uses
    (``id_map.parquet``); empty for integer-id datasets, whose ids are their own."""

    user_ids: np.ndarray  # int64, sorted (dense ids)
    external: list[str]

    @classmethod
    def load(cls, paths: DatasetPaths) -> IdMap | None:
        if not paths.id_map.is_file():
            return None
        table = pq.read_table(paths.id_map)
        return cls(
            table.column(contract.JOIN_KEY).to_numpy(), table.column("external_id").to_pylist()
        )

    def dense(self, external_id: str) -> int:
        """External id -> dense id; NotPreparedError names an unknown one."""
        # Dense ids were given in sorted order of the external ids: a binary search finds one.
        pos = bisect.bisect_left(self.external, external_id)
        if pos == len(self.external) or self.external[pos] != external_id:
            raise NotPreparedError(f"external user id {external_id!r} is not in the id map")
        return int(self.user_ids[pos])

    def external_of(self, user_id: int) -> str | None:
        pos = int(np.searchsorted(self.user_ids, user_id))
        if pos < len(self.user_ids) and self.user_ids[pos] == user_id:
            return self.external[pos]
        return None
