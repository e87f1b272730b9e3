"""The canonical dataset layout: users and friendships as parquet, plus meta.json.

Timestamps and split (docs/data.md). The MUSAE graphs carry no time, so each friendship gets one
from a seeded random permutation: edge of rank ``r`` (of ``E``) was created at
``timeline_start + floor(r * timeline_days * 86400 / E)`` seconds. The split follows time: the
oldest 85% are *train*, the next 5% *val*, the newest 10% *test*. Because the ranks are a uniformly
random permutation this is exactly a seeded random 85/5/10 split, and it is also a temporal one:
every feature computed "as of" the training cutoff provably excludes the held-out friendships,
which later arrive as streaming events. Profiles exist from ``timeline_start``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
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
from friendrec.data.graph import RawGraph, list_array_to_csr, sparse_list_array
from friendrec.errors import NotPreparedError, UnknownDatasetError
from friendrec.paths import DatasetPaths

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


@dataclass
class PreparedDataset:
    """A prepared dataset loaded back: arrays ready for vectorised jobs."""

    meta: DatasetMeta
    user_ids: np.ndarray  # int64 [n], sorted
    profile: np.ndarray  # float32 [n, P] raw scalars
    sparse_offsets: np.ndarray
    sparse_values: np.ndarray
    src: np.ndarray  # int64 [E] user ids
    dst: np.ndarray
    created_ts: np.ndarray  # int64 [E] unix seconds
    split: np.ndarray  # int8 [E]: index into SPLITS

    def index_of(self, ids: np.ndarray) -> np.ndarray:
        """User ids -> dense row indices (ids must be known)."""
        return np.searchsorted(self.user_ids, ids)

    def edges(self, split: str, as_of: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(src, dst) user ids of one split, optionally only those created at or before as_of."""
        mask = self.split == SPLITS.index(split)
        if as_of is not None:
            mask &= self.created_ts <= as_of
        return self.src[mask], self.dst[mask]


def available_twitch_languages(datasets_dir: Path) -> list[str]:
    base = datasets_dir / "twitch_social"
    return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []


def load_raw(settings: Settings, name: str) -> RawGraph:
    """Dataset name -> validated RawGraph. Names: twitch/<LANG>, github, synthetic:<N>."""
    from friendrec.data import musae

    datasets_dir = settings.datasets_dir
    if name.startswith("twitch/"):
        language = name.split("/", 1)[1].upper()
        languages = available_twitch_languages(datasets_dir)
        if language not in languages:
            raise UnknownDatasetError(
                f"unknown Twitch language {language!r}; available in {datasets_dir}: {languages}"
            )
        return musae.read_musae(musae.twitch_files(datasets_dir, language), f"twitch/{language}")
    if name == "github":
        return musae.read_musae(musae.github_files(datasets_dir), "github")
    if name.startswith("synthetic:"):
        from friendrec.data.synthetic import generate_synthetic

        size = name.split(":", 1)[1].replace("_", "")
        if not size.isdigit() or int(size) < 2:
            raise UnknownDatasetError(f"synthetic:<N> needs an integer N >= 2, got {name!r}")
        return generate_synthetic(int(size), seed=settings.data.seed)
    raise UnknownDatasetError(
        f"unknown dataset {name!r}: expected twitch/<LANG>, github or synthetic:<N>"
    )


def assign_time_and_split(num_edges: int, cfg: DataSettings) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic created_ts (unix s) and split code per edge (see module docstring)."""
    rng = np.random.default_rng(cfg.seed)
    rank = np.empty(num_edges, dtype=np.int64)
    rank[rng.permutation(num_edges)] = np.arange(num_edges, dtype=np.int64)
    span = cfg.timeline_days * 86_400
    created = cfg.timeline_start + (rank * span) // max(num_edges, 1)
    n_test = round(num_edges * cfg.test_fraction)
    n_val = round(num_edges * cfg.val_fraction)
    n_train = num_edges - n_val - n_test
    split = np.zeros(num_edges, dtype=np.int8)
    split[rank >= n_train] = 1
    split[rank >= n_train + n_val] = 2
    return created.astype(np.int64), split


def _split_hash(src: np.ndarray, dst: np.ndarray, split: np.ndarray) -> str:
    order = np.lexsort((dst, src))
    digest = hashlib.sha256()
    for array in (src[order], dst[order], split[order]):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _seconds_to_timestamps(seconds: np.ndarray) -> pa.Array:
    return pa.array(seconds.astype(np.int64) * 1_000_000, type=pa.int64()).cast(TIMESTAMP_TYPE)


def users_table(graph: RawGraph, profile_ts: int) -> pa.Table:
    columns: dict[str, Any] = {contract.JOIN_KEY: pa.array(graph.user_ids, type=pa.int64())}
    for j, feature in enumerate(contract.PROFILE_SCALARS):
        columns[feature.name] = pa.array(graph.profile[:, j], type=pa.float32())
    columns[contract.SPARSE_IDS.name] = sparse_list_array(graph.sparse_offsets, graph.sparse_values)
    columns[contract.EVENT_TIMESTAMP] = _seconds_to_timestamps(
        np.full(graph.num_users, profile_ts, dtype=np.int64)
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


def prepare(settings: Settings, name: str | None = None) -> DatasetMeta:
    """Read, validate, time and split a dataset, then write its canonical layout atomically.

    A failed run leaves any previous good layout of the dataset untouched.
    """
    paths = DatasetPaths.of(settings, name)
    graph = load_raw(settings, paths.name)
    cfg = settings.data
    created, split = assign_time_and_split(graph.num_friendships, cfg)
    friendships = pa.table(
        {
            "src": pa.array(graph.src, type=pa.int64()),
            "dst": pa.array(graph.dst, type=pa.int64()),
            contract.CREATED_TIMESTAMP: _seconds_to_timestamps(created),
            "split": pa.DictionaryArray.from_arrays(
                pa.array(split, type=pa.int8()), pa.array(SPLITS)
            ),
        }
    )
    counts = {s: int(np.count_nonzero(split == i)) for i, s in enumerate(SPLITS)}
    train_created = created[split == 0]
    meta = DatasetMeta(
        name=paths.name,
        slug=paths.slug,
        num_users=graph.num_users,
        num_friendships=graph.num_friendships,
        vocab_size=graph.vocab_size,
        seed=cfg.seed,
        timeline_start=cfg.timeline_start,
        timeline_days=cfg.timeline_days,
        split_counts=counts,
        split_sha256=_split_hash(graph.src, graph.dst, split),
        train_cutoff_ts=int(train_created.max()) if train_created.size else cfg.timeline_start,
        profile_ts=cfg.timeline_start,
        sources=graph.sources,
    )
    _invalidate_downstream(paths, meta)
    staging = Path(tempfile.mkdtemp(prefix=f".{paths.slug}.", dir=_ensure(paths.data_dir.parent)))
    try:
        write_atomic(users_table(graph, meta.profile_ts), staging / paths.users.name)
        write_atomic(friendships, staging / paths.friendships.name)
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
    if previous.split_sha256 != meta.split_sha256:
        log.warning("%s: the split changed; removing its features and Feast state", paths.name)
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


def load_prepared(paths: DatasetPaths) -> PreparedDataset:
    """Load a prepared dataset into numpy arrays (columnar, no per-row Python)."""
    meta = read_meta(paths)
    users = pq.read_table(paths.users)
    friendships = pq.read_table(paths.friendships)
    profile = np.column_stack(
        [users.column(n).to_numpy() for n in contract.PROFILE_SCALAR_NAMES]
    ).astype(np.float32)
    offsets, values = list_array_to_csr(users.column(contract.SPARSE_IDS.name))
    split_column = friendships.column("split").combine_chunks()
    split_codes = pc.index_in(split_column.cast(pa.string()), pa.array(SPLITS)).to_numpy()
    created = (
        friendships.column(contract.CREATED_TIMESTAMP).cast(pa.int64()).to_numpy() // 1_000_000
    )
    return PreparedDataset(
        meta=meta,
        user_ids=users.column(contract.JOIN_KEY).to_numpy(),
        profile=profile,
        sparse_offsets=offsets,
        sparse_values=values,
        src=friendships.column("src").to_numpy(),
        dst=friendships.column("dst").to_numpy(),
        created_ts=created.astype(np.int64),
        split=split_codes.astype(np.int8),
    )
