"""Feast's online bytes from Arrow columns, and the in-process engine that writes them: the
``batch_engine`` of a store opened for ``engine = local`` (``friendrec/feast_store.py``: ``type:
friendrec.feast_write.FriendrecLocalComputeEngine``).

Why not Feast's stock local engine: it reads a view's window, turns *every* value into a Python
``ValueProto`` (``_convert_arrow_to_proto``) and hands the whole list to ``online_write_batch``.
At 1M synthetic users that held 11 GB and wrote 5.1k users/s into sqlite (docs/scaling.md), so
5M users did not fit this 23 GB machine at all. Here a view's window is read once (Feast's own
``pull_latest_from_table_or_query``: the rows the stock engine writes), ordered by stored entity
key, and written in partitions of at most ``partition_rows`` users: each partition is encoded by
column (sqlite: straight to Feast's wire bytes, ``serialized_values``, one row per user) and
handed to the writer before the next is built, so memory is the window plus one partition. Into
sqlite the partitions are gathered in a scratch file and upserted at once, in one transaction
(``feast_sqlite.upsert_rows``). The Ray engine (``friendrec/feast_ray.py``) runs the same
encoding in parallel tasks.

``FeatureStore.materialize`` drives the engine as any Feast engine: Feast resolves the views,
records each view's materialization interval in the registry (what ``--incremental`` continues
from) and reports errors. The bytes are Feast's: ``tests/test_materialize_engine.py`` compares
them with the stock engine's, row by row (sqlite) and hash by hash (Redis). Views or stores this
path does not cover (a field mapping, a transformation, sqlite's vector or value_num columns), or
``fast_write: false``, go through the stock engine.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from feast.infra.common.materialization_job import MaterializationJobStatus, MaterializationTask
from feast.infra.compute_engines.base import ComputeEngine
from feast.infra.compute_engines.local.compute import (
    LocalComputeEngine,
    LocalComputeEngineConfig,
)
from feast.infra.compute_engines.local.job import LocalMaterializationJob
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.sqlite import SqliteOnlineStore
from feast.infra.registry.base_registry import BaseRegistry
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import FloatList, Int64List
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.type_map import python_values_to_proto_values
from feast.utils import _get_column_names, to_naive_utc
from feast.value_type import ValueType

from friendrec import feast_sqlite

log = logging.getLogger(__name__)

LOCAL_TYPE = "friendrec.feast_write.FriendrecLocalComputeEngine"
PARTITION_ROWS = 100_000
"""Users per partition by default: ~1.5M sqlite rows (15 features), a few hundred MB encoded."""

# ---------------------------------------------------------------------------------------------
# Arrow columns -> Feast values


# Value types converted here; any other type, or a column with nulls or NaNs (which Feast turns
# into empty values), goes through Feast's ``python_values_to_proto_values``.
_FAST_TYPES = frozenset(
    {ValueType.INT64, ValueType.FLOAT, ValueType.INT64_LIST, ValueType.FLOAT_LIST}
)


_LIST_TYPES = frozenset({ValueType.INT64_LIST, ValueType.FLOAT_LIST})


def _has_missing(column: pa.Array) -> bool:
    if column.null_count:
        return True
    if pa.types.is_floating(column.type):
        return bool(pc.any(pc.is_nan(column)).as_py())
    return False


def _lists(column: pa.ListArray) -> list[list[Any]] | None:
    """A list column as Python lists (one flatten, then slices), None if any list or element is
    missing."""
    flat = column.flatten()
    if column.null_count or _has_missing(flat):
        return None
    values = flat.to_pylist()
    offsets = (column.offsets.to_numpy() - column.offsets[0].as_py()).tolist()
    return [values[lo:hi] for lo, hi in itertools.pairwise(offsets)]


def proto_values(column: pa.Array | pa.ChunkedArray, value_type: ValueType) -> list[ValueProto]:
    """One column as Feast's values: what ``python_values_to_proto_values`` returns for it.

    Feast converts each value through numpy and pandas (``isna`` per scalar, a numpy array and a
    ``None`` scan per list): ~40 % of a materialization (docs/benchmarks.md). Here a column goes
    to Python values in one Arrow call and each becomes its message directly, 2-3x faster
    (measured on 200k synthetic users); the messages are the same.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if value_type in _FAST_TYPES:
        if value_type == ValueType.INT64 and not _has_missing(column):
            return [ValueProto(int64_val=v) for v in column.to_pylist()]
        if value_type == ValueType.FLOAT and not _has_missing(column):
            return [ValueProto(float_val=v) for v in column.to_pylist()]
        lists = _lists(column) if pa.types.is_list(column.type) else None
        if lists is not None and value_type == ValueType.INT64_LIST:
            return [ValueProto(int64_list_val=Int64List(val=v)) for v in lists]
        if lists is not None and value_type == ValueType.FLOAT_LIST:
            return [ValueProto(float_list_val=FloatList(val=v)) for v in lists]
    return python_values_to_proto_values(column.to_numpy(zero_copy_only=False), value_type)


# Serialized values straight from Arrow buffers (sqlite path). Building one ValueProto per value
# in Python still cost 8-9 CPU-s per view of 200k users (cProfile), as much as sqlite's own write:
# with the writer on one core and two cores in all, the conversion has to be nearly free for the
# Ray path to reach 3x. The encoding is protobuf's wire format for Feast's Value messages;
# ``test_serialized_values_are_feasts`` checks it against ``SerializeToString`` per type.
_WIRE_TAGS = {
    ValueType.INT64: b"\x20",  # Value.int64_val = 4, varint
    ValueType.FLOAT: b"\x35",  # Value.float_val = 6, fixed32
    ValueType.INT64_LIST: b"\x72",  # Value.int64_list_val = 14, message
    ValueType.FLOAT_LIST: b"\x82\x01",  # Value.float_list_val = 16, message
}
_PACKED_TAG = 0x0A  # Int64List.val / FloatList.val = 1, packed


def _varints(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Protobuf varints of uint64 ``values``: (bytes per value, the bytes back to back)."""
    values = values.astype(np.uint64, copy=False)
    lengths = np.ones(len(values), np.int64)
    for k in range(1, 10):
        lengths += values >= np.uint64(1 << (7 * k))
    starts = np.cumsum(lengths) - lengths
    out = np.empty(int(lengths.sum()), np.uint8)
    for k in range(10):
        more = lengths > k
        if not more.any():
            break
        group = (values[more] >> np.uint64(7 * k)) & np.uint64(0x7F)
        out[starts[more] + k] = group.astype(np.uint8) | np.where(lengths[more] > k + 1, 0x80, 0)
    return lengths, out


def _constant(piece: bytes, n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full(n, len(piece), np.int64), np.tile(np.frombuffer(piece, np.uint8), n)


def _join_rows(pieces: list[tuple[np.ndarray, np.ndarray]], n: int) -> pa.Array:
    """Row i = piece 1's bytes of row i + piece 2's ...; each piece is (bytes per row, its bytes
    back to back in row order)."""
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(sum(lengths for lengths, _ in pieces), out=offsets[1:])
    out = np.empty(int(offsets[-1]), np.uint8)
    at = offsets[:-1].copy()
    for lengths, data in pieces:
        if data.size:
            rows = np.repeat(np.arange(n), lengths)
            within = np.arange(data.size) - (np.cumsum(lengths) - lengths)[rows]
            out[at[rows] + within] = data
        at += lengths
    buffers = [None, pa.py_buffer(offsets), pa.py_buffer(out)]
    return pa.Array.from_buffers(pa.large_binary(), n, buffers)


def serialized_values(column: pa.Array | pa.ChunkedArray, value_type: ValueType) -> pa.Array:
    """``[v.SerializeToString() for v in proto_values(column, value_type)]`` as a binary array,
    encoded by column (see ``_WIRE_TAGS``) where the type allows."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    n = len(column)
    tag = _WIRE_TAGS.get(value_type)
    if tag is None or _has_missing(column):
        return _from_protos(column, value_type)
    if value_type == ValueType.INT64:
        ints = column.to_numpy().astype(np.int64).view(np.uint64)
        return _join_rows([_constant(tag, n), _varints(ints)], n)
    if value_type == ValueType.FLOAT:
        floats = column.to_numpy().astype("<f4").view(np.uint8)
        return _join_rows([_constant(tag, n), (np.full(n, 4, np.int64), floats)], n)
    if not pa.types.is_list(column.type) or _has_missing(column.flatten()):
        return _from_protos(column, value_type)
    flat = column.flatten().to_numpy()
    offsets = column.offsets.to_numpy()
    counts = np.diff(offsets)
    if value_type == ValueType.INT64_LIST:
        sizes, payload = _varints(flat.astype(np.int64).view(np.uint64))
        sums = np.concatenate([[0], np.cumsum(sizes)])
        payload_len = sums[offsets[1:] - offsets[0]] - sums[offsets[:-1] - offsets[0]]
    else:
        payload = flat.astype("<f4").view(np.uint8)
        payload_len = 4 * counts
    filled = counts > 0
    header_lengths = np.zeros(n, np.int64)
    header_sizes, header = _varints(payload_len[filled])
    header_lengths[filled] = header_sizes
    inner_len = np.where(filled, 1 + header_lengths + payload_len, 0)
    packed_tag = (filled.astype(np.int64), np.full(int(filled.sum()), _PACKED_TAG, np.uint8))
    pieces = [_constant(tag, n), _varints(inner_len), packed_tag, (header_lengths, header)]
    return _join_rows([*pieces, (payload_len, payload)], n)


def _from_protos(column: pa.Array, value_type: ValueType) -> pa.Array:
    protos = proto_values(column, value_type)
    return pa.array([p.SerializeToString() for p in protos], pa.large_binary())


def value_texts(column: pa.Array | pa.ChunkedArray, value_type: ValueType) -> list[str | None]:
    """The ``value_text`` Feast's sqlite store keeps beside each value: ``str`` of a number,
    nothing for a list (``extract_text_and_num``)."""
    if value_type in (ValueType.INT64, ValueType.FLOAT) and not _has_missing(
        column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    ):
        return [str(v) for v in column.to_pylist()]
    return feast_sqlite.value_texts(proto_values(column, value_type))


def entity_key_bytes(table: pa.Table, join_keys: dict[str, ValueType], version: int) -> list[bytes]:
    """Each row's entity key as ``serialize_entity_key`` writes it.

    A single INT64 key (ours) is Feast's fixed prefix plus the 8-byte little-endian id: built in
    one numpy pass instead of ~5 us per key in Python, and checked against Feast's function on
    the first row. Other keys go through Feast's function row by row.
    """
    if len(join_keys) == 1 and next(iter(join_keys.values())) == ValueType.INT64:
        name = next(iter(join_keys))
        ids = table.column(name).to_numpy().astype("<i8")
        prefix = _entity_key(name, 0, version)[:-8]
        width = len(prefix) + 8
        raw = np.empty((len(ids), width), dtype=np.uint8)
        raw[:, : len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
        raw[:, len(prefix) :] = ids.view(np.uint8).reshape(-1, 8)
        buf = raw.tobytes()
        keys = [buf[i : i + width] for i in range(0, len(buf), width)]
        if keys and keys[0] != _entity_key(name, int(ids[0]), version):
            raise RuntimeError("Feast's entity key layout changed: update entity_key_bytes")
        return keys
    protos = entity_key_protos(table, join_keys)
    return [serialize_entity_key(k, entity_key_serialization_version=version) for k in protos]


def _entity_key(name: str, value: int, version: int) -> bytes:
    key = EntityKeyProto(join_keys=[name], entity_values=[ValueProto(int64_val=value)])
    return serialize_entity_key(key, entity_key_serialization_version=version)


def entity_key_protos(table: pa.Table, join_keys: dict[str, ValueType]) -> list[EntityKeyProto]:
    names = list(join_keys)
    columns = [proto_values(table.column(n), vt) for n, vt in join_keys.items()]
    return [
        EntityKeyProto(join_keys=names, entity_values=list(vs)) for vs in zip(*columns, strict=True)
    ]


def event_datetimes(column: pa.Array) -> tuple[list[datetime], pa.Array]:
    """The distinct event times as Python datetimes (what Feast hands its stores), and each row's
    index into them: snapshots share a few timestamps, so each is converted once."""
    distinct = pc.unique(column)
    return distinct.to_pylist(), pc.index_in(column, value_set=distinct)


@dataclass(frozen=True)
class ViewSpec:
    """What a task needs of a view (the FeatureView itself is shipped only to store writers)."""

    name: str
    features: tuple[tuple[str, ValueType], ...]
    join_keys: dict[str, ValueType]
    timestamp_field: str
    key_version: int


def _feature_rows(part: pa.Table, spec: ViewSpec) -> list[tuple[Any, ...]]:
    """A partition as ``online_write_batch``'s input: (entity key, {feature: value}, ts, None)."""
    keys = entity_key_protos(part, spec.join_keys)
    columns = {n: proto_values(part.column(n), vt) for n, vt in spec.features}
    stamps, index = event_datetimes(part.column(spec.timestamp_field))
    names = list(columns)
    return [
        (key, dict(zip(names, values, strict=True)), stamps[i], None)
        for key, i, *values in zip(keys, index.to_pylist(), *columns.values(), strict=True)
    ]


def sqlite_rows(part: pa.Table, spec: ViewSpec) -> pa.Table:
    """A partition as ``feast_sqlite.upsert_rows`` takes it: one row per entity, its stored key
    and ``event_ts``, then per feature (the view's order) the serialized value and Feast's
    ``value_text`` (``feast_sqlite.wide_columns``); sqlite unpivots it into Feast's rows."""
    keys = entity_key_bytes(part, spec.join_keys, spec.key_version)
    stamps, index = event_datetimes(part.column(spec.timestamp_field))
    # Feast's sqlite adapter stores int(naive_utc.timestamp()) (feast.infra.online_stores.sqlite).
    epochs = pa.array([int(to_naive_utc(s).timestamp()) for s in stamps], pa.int64())
    columns: list[pa.Array] = [pa.array(keys, pa.binary()), pc.take(epochs, index)]
    for name, value_type in spec.features:
        columns.append(serialized_values(part.column(name), value_type))
        texts = (
            [None] * part.num_rows  # Feast stores no text for lists
            if value_type in _LIST_TYPES
            else value_texts(part.column(name), value_type)
        )
        columns.append(pa.array(texts, pa.string()))
    names = feast_sqlite.wide_columns([name for name, _ in spec.features])
    return pa.table(dict(zip(names, columns, strict=True)))


def _key_order(table: pa.Table, join_keys: dict[str, ValueType]) -> pa.Table:
    """Rows in the byte order of their stored entity keys (a single INT64 key: its little-endian
    bytes), so that sqlite's indexes are appended to instead of updated at random pages: 2-3x
    faster inserts measured for 1M rows."""
    if len(join_keys) != 1 or next(iter(join_keys.values())) != ValueType.INT64:
        return table
    ids = table.column(next(iter(join_keys))).to_numpy().astype("<i8")
    return table.take(pa.array(np.argsort(ids.view(">u8"), kind="stable")))


def _slices(table: pa.Table, parts: int) -> Iterator[pa.Table]:
    """``parts`` consecutive pieces of ``table``, each a compact copy: an Arrow slice pickles with
    its parent's whole buffers (pyarrow 26), so every slice shipped to a Ray task would carry the
    whole window (measured: a 1,000-row slice of 1M rows pickles to the full 36 MB)."""
    step = max(1, -(-table.num_rows // parts))
    for lo in range(0, table.num_rows, step):
        yield table.take(pa.array(np.arange(lo, min(lo + step, table.num_rows))))


def partition_count(rows: int, at_least: int, partition_rows: int) -> int:
    """Partitions for ``rows`` users: ``at_least`` (parallelism) and no more than
    ``partition_rows`` users in any one (memory)."""
    return max(1, at_least, -(-rows // max(1, partition_rows)))


def unsupported(engine: ComputeEngine, task: MaterializationTask, fast_write: bool) -> str | None:
    """Why a view must go through the stock engine, or None when this module's path covers it."""
    view = task.feature_view
    if not fast_write:
        return "fast_write is off"
    if type(view).__name__ != "FeatureView" or not getattr(view, "online", False):
        return f"a {type(view).__name__}"
    if getattr(view.batch_source, "field_mapping", None):
        return "a field mapping"
    if isinstance(engine.online_store, SqliteOnlineStore) and not feast_sqlite.bulk_writable(
        engine.repo_config
    ):
        return "sqlite with vector or value_num columns"
    return None


def pull_window(
    engine: ComputeEngine, registry: BaseRegistry, task: MaterializationTask
) -> tuple[pa.Table, ViewSpec]:
    """The window's latest row per entity, through Feast's own offline store (the rows the stock
    engines write), in the byte order of the stored entity keys, and what the writers need of
    the view."""
    view = task.feature_view
    entities = [registry.get_entity(name, task.project) for name in view.entities]
    join_key_columns, feature_columns, ts_field, created_field = _get_column_names(view, entities)
    table = engine.offline_store.pull_latest_from_table_or_query(
        config=engine.repo_config,
        data_source=view.batch_source,
        join_key_columns=join_key_columns,
        feature_name_columns=feature_columns,
        timestamp_field=ts_field,
        created_timestamp_column=created_field,
        start_date=task.start_time,
        end_date=task.end_time,
    ).to_arrow()
    spec = ViewSpec(
        name=view.name,
        features=tuple((f.name, f.dtype.to_value_type()) for f in view.features),
        join_keys={e.name: e.dtype.to_value_type() for e in view.entity_columns},
        timestamp_field=ts_field,
        key_version=engine.repo_config.entity_key_serialization_version,
    )
    return _key_order(table.combine_chunks(), spec.join_keys), spec


def log_written(view: str, written: int, started: float, pulled: float, parts: int) -> None:
    """One line per view: rows, wall time, the offline read's share, partitions."""
    log.info(
        "%s: %d rows online in %.1f s (offline read %.1f s, %d partitions)",
        view,
        written,
        time.perf_counter() - started,
        pulled - started,
        parts,
    )


def materialize_job(
    engine: Any, registry: BaseRegistry, task: MaterializationTask, job_type: type
) -> Any:
    """``engine.materialize_view`` as the engine's Feast job: a failure is returned in the job,
    which ``FeatureStore.materialize`` re-raises."""
    job_id = f"{task.feature_view.name}-{task.start_time}-{task.end_time}"
    try:
        engine.materialize_view(registry, task)
    except Exception as exc:
        log.error("materialization failed for %s: %s", task.feature_view.name, exc)
        return job_type(job_id, MaterializationJobStatus.ERROR, error=exc)
    return job_type(job_id, MaterializationJobStatus.SUCCEEDED)


# ---------------------------------------------------------------------------------------------
# The in-process engine


class FriendrecLocalComputeEngineConfig(LocalComputeEngineConfig):
    """Feast's local engine settings plus this engine's two."""

    type: Literal["friendrec.feast_write.FriendrecLocalComputeEngine"] = LOCAL_TYPE  # type: ignore[assignment]
    fast_write: bool = True
    """False: the stock local engine for every view (kept for comparison and as a way out)."""
    partition_rows: int = PARTITION_ROWS
    """Users encoded and written at a time: bounds memory to the window plus one partition."""


class FriendrecLocalComputeEngine(LocalComputeEngine):
    """Feast's ``LocalComputeEngine`` whose materialization is the one in the module docstring."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.config = self.repo_config.batch_engine

    def _materialize_one(
        self, registry: BaseRegistry, task: MaterializationTask, **kwargs: Any
    ) -> LocalMaterializationJob:
        reason = unsupported(self, task, self.config.fast_write)
        if reason:
            log.info("%s: the stock local engine (%s)", task.feature_view.name, reason)
            return super()._materialize_one(registry, task, **kwargs)
        return materialize_job(self, registry, task, LocalMaterializationJob)

    def materialize_view(self, registry: BaseRegistry, task: MaterializationTask) -> int:
        """Move one view's window online, a partition at a time; returns the rows written."""
        started = time.perf_counter()
        table, spec = pull_window(self, registry, task)
        if table.num_rows == 0:
            return 0
        pulled = time.perf_counter()
        parts = partition_count(table.num_rows, 1, self.config.partition_rows)
        view = task.feature_view
        if isinstance(self.online_store, SqliteOnlineStore):
            batches = (sqlite_rows(p, spec) for p in _slices(table, parts))
            written = feast_sqlite.upsert_rows(self.online_store, self.repo_config, view, batches)
        else:
            written = 0
            for part in _slices(table, parts):
                rows = _feature_rows(part, spec)
                self.online_store.online_write_batch(self.repo_config, view, rows, progress=None)
                written += len(rows)
        log_written(view.name, written, started, pulled, parts)
        return written
