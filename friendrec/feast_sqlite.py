"""Feast's sqlite online store with a faster ``online_read``. This is the embedded default
(``feature_repo/feature_store.yaml``: ``type: friendrec.feast_sqlite.FriendrecSqliteOnlineStore``).

The stock read spends its time in Python per stored value: the sqlite3 timestamp converter Feast
registers turns every row's ``event_ts`` into a ``datetime``, the rows are sorted and grouped
although they are only looked up by key, and every feature of the view is read whatever was
requested. That bounded the streaming refresher, which reads the users it refreshes and their
sampled friends (streaming/README.md).

This read gets the same rows from the same table that Feast writes (writes, materialization,
``update`` and ``teardown`` are all inherited unchanged). It differs in four ways:
- only the requested features leave sqlite;
- the timestamp is read as the stored epoch integer and converted once per entity;
- keys are chunked under sqlite's host-parameter limit;
- rows go straight into a dict.

Each entity's timestamp is the newest of its rows, converted as UTC. The stock store reads the
epoch as local time and then labels it UTC, so the two agree when the process runs in UTC. The
stock read stays in use for the store's vector, text-search and versioned-table modes;
``tests/test_feast.py`` compares the two reads row by row.
"""

from __future__ import annotations

import sqlite3
import tempfile
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import pyarrow as pa
from feast.feature_view import FeatureView
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.helpers import extract_text_and_num
from feast.infra.online_stores.sqlite import (
    SqliteOnlineStore,
    SqliteOnlineStoreConfig,
    _quote_id,
    _table_id,
)
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.repo_config import RepoConfig

TYPE = "friendrec.feast_sqlite.FriendrecSqliteOnlineStore"
# sqlite's default SQLITE_MAX_VARIABLE_NUMBER was 999 before 3.32; keys + feature names stay under.
MAX_KEYS = 900

Read = list[tuple[datetime | None, dict[str, ValueProto] | None]]


class FriendrecSqliteOnlineStoreConfig(SqliteOnlineStoreConfig):
    """Feast's sqlite settings (``path`` etc.), selected by ``type`` = this module's store."""

    type: Literal["friendrec.feast_sqlite.FriendrecSqliteOnlineStore"] = TYPE  # type: ignore[assignment]


class FriendrecSqliteOnlineStore(SqliteOnlineStore):
    """``SqliteOnlineStore`` with the read described in the module docstring."""

    def online_read(
        self,
        config: RepoConfig,
        table: FeatureView,
        entity_keys: list[EntityKeyProto],
        requested_features: list[str] | None = None,
    ) -> Read:
        store = config.online_store
        versioned = config.registry.enable_online_feature_view_versioning
        if getattr(store, "vector_enabled", False) or store.text_search_enabled or versioned:
            return super().online_read(config, table, entity_keys, requested_features)
        conn = self._get_conn(config)
        name = _quote_id(_table_id(config.project, table, versioned))
        version = config.entity_key_serialization_version
        keys = [
            serialize_entity_key(k, entity_key_serialization_version=version) for k in entity_keys
        ]
        names = list(dict.fromkeys(requested_features or ()))
        only = f" AND feature_name IN ({','.join('?' * len(names))})" if names else ""
        values: dict[bytes, dict[str, ValueProto]] = {}
        stamps: dict[bytes, int] = {}
        unique = list(dict.fromkeys(keys))
        for lo in range(0, len(unique), MAX_KEYS):
            chunk = unique[lo : lo + MAX_KEYS]
            # CAST: an expression has no declared type, so the timestamp converter is not run.
            rows = conn.execute(
                f"SELECT entity_key, feature_name, value, CAST(event_ts AS INTEGER) FROM {name} "
                f"WHERE entity_key IN ({','.join('?' * len(chunk))}){only}",
                [*chunk, *names],
            )
            for key, feature, blob, ts in rows:
                values.setdefault(key, {})[feature] = ValueProto.FromString(blob)
                stamps[key] = max(ts, stamps.get(key, ts))
        result: Read = []
        for key in keys:
            if key in values:
                result.append((datetime.fromtimestamp(stamps[key], tz=UTC), values[key]))
            else:
                result.append((None, None))
        return result


# ---------------------------------------------------------------------------------------------
# Bulk writes (friendrec's engines' sqlite path: friendrec/feast_write.py, friendrec/feast_ray.py)

# The columns Feast's ``online_write_batch`` fills without vector or value_num columns; created_ts
# is always NULL for our views (no created timestamp column).
ROW_COLUMNS = ("entity_key", "feature_name", "value", "value_text", "event_ts")
STAGE_TABLE = "rows"
FEATURE_TABLE = "features"
_STAGE_ALIAS = "friendrec_stage"


def wide_columns(features: Sequence[str]) -> list[str]:
    """The columns of a partition ``upsert_rows`` takes: one row per entity (its stored key and
    ``event_ts``), then per feature its serialized value and Feast's ``value_text``: one row
    bound from Python per entity instead of one per (entity, feature), sqlite unpivots."""
    return ["entity_key", "event_ts", *(f"{c}:{n}" for n in features for c in ("value", "text"))]


def _stage_schema(features: int) -> str:
    values = ", ".join(f"v{j}, t{j}" for j in range(features))
    return f"CREATE TABLE {STAGE_TABLE} (entity_key, event_ts, {values})"


def bulk_writable(config: RepoConfig) -> bool:
    """Whether ``upsert_rows`` writes what Feast would: not with the store's vector or
    OpenAI-compatible (value_num) columns, which it does not fill."""
    store = config.online_store
    return not (
        getattr(store, "vector_enabled", False)
        or getattr(store, "enable_openai_compatible_store", False)
    )


def value_texts(values: Sequence[ValueProto]) -> list[str | None]:
    """The ``value_text`` column Feast stores next to each value."""
    return [extract_text_and_num(v, False)[0] for v in values]


def upsert_sql(config: RepoConfig, table: FeatureView, stage: str) -> str:
    """Feast's upsert statement (``SqliteOnlineStore.online_write_batch``, the same conflict
    target and updates) over every entity of ``stage``'s wide table (an attached scratch
    database), unpivoted into one row per feature in key and feature order (``CROSS JOIN``
    keeps the entities the outer loop), ``created_ts`` NULL."""
    name = _quote_id(
        _table_id(config.project, table, config.registry.enable_online_feature_view_versioning)
    )
    columns = [*ROW_COLUMNS, "created_ts"]
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns[2:])
    value, text = (
        "CASE f.j " + " ".join(f"WHEN {j} THEN w.{c}{j}" for j in range(len(table.features)))
        for c in ("v", "t")
    )
    return (  # WHERE true: an upsert's SELECT needs a WHERE (sqlite's parser)
        f"INSERT INTO {name} ({', '.join(columns)}) "
        f"SELECT w.entity_key, f.name, {value} END, {text} END, w.event_ts, NULL "
        f"FROM {stage}.{STAGE_TABLE} AS w CROSS JOIN {stage}.{FEATURE_TABLE} AS f WHERE true "
        f"ON CONFLICT(entity_key, feature_name) DO UPDATE SET {updates};"
    )


def _insert_rows(conn: sqlite3.Connection, batch: pa.Table) -> None:
    columns = [column.to_pylist() for column in batch.columns]
    with conn:
        conn.executemany(
            f"INSERT INTO {STAGE_TABLE} VALUES ({', '.join('?' * len(columns))})",
            zip(*columns, strict=True),
        )


def _scratch(path: Path, features: int) -> sqlite3.Connection:
    """A new sqlite file holding the stage table: scratch data, so no journal and no fsync."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode = OFF")
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute(_stage_schema(features))
    return conn


def _features_of(batch: pa.Table) -> int:
    return (batch.num_columns - 2) // 2


def partition_file(batch: pa.Table) -> bytes:
    """A partition (``wide_columns``) as the bytes of a sqlite file: what a Ray task returns, so
    that binding the values runs in the tasks, in parallel, and the single sqlite writer only
    copies rows from file to file."""
    with tempfile.TemporaryDirectory(prefix="friendrec-part-") as scratch:
        path = Path(scratch) / "part.db"
        conn = _scratch(path, _features_of(batch))
        try:
            _insert_rows(conn, batch)
        finally:
            conn.close()
        return path.read_bytes()


class _Stage:
    """Entities gathered in a scratch sqlite file next to the online store, before one upsert."""

    def __init__(self, directory: Path, features: Sequence[str]) -> None:
        self.directory = directory
        self.path = directory / "stage.db"
        self.features = list(features)
        self.conn = _scratch(self.path, len(self.features))
        with self.conn:
            self.conn.execute(f"CREATE TABLE {FEATURE_TABLE} (j INTEGER, name TEXT)")
            self.conn.executemany(
                f"INSERT INTO {FEATURE_TABLE} VALUES (?, ?)", enumerate(self.features)
            )
        self.parts = 0

    def add(self, batch: pa.Table | bytes) -> None:
        if isinstance(batch, pa.Table):
            if batch.column_names != wide_columns(self.features):
                raise ValueError(
                    f"partition columns {batch.column_names[:4]}... are not "
                    f"wide_columns({self.features})"
                )
            _insert_rows(self.conn, batch)
            return
        part = self.directory / f"part{self.parts}.db"
        self.parts += 1
        part.write_bytes(batch)
        self.conn.execute("ATTACH DATABASE ? AS part", (str(part),))
        try:
            with self.conn:
                self.conn.execute(f"INSERT INTO {STAGE_TABLE} SELECT * FROM part.{STAGE_TABLE}")
        finally:
            self.conn.execute("DETACH DATABASE part")
            part.unlink()


def upsert_rows(
    store: SqliteOnlineStore,
    config: RepoConfig,
    table: FeatureView,
    batches: Iterable[pa.Table | bytes],
) -> int:
    """Write a view's entities, already encoded (``wide_columns``: values serialized,
    ``event_ts`` as Feast's adapter stores it), with Feast's own upsert statement. Returns the
    entities written.

    ``batches``: Arrow tables, or sqlite files made by ``partition_file`` (Ray tasks). They are
    gathered in a scratch file beside the online store (a plain table: no key, no index, no
    journal), then moved into the view's table by one ``INSERT ... SELECT`` in one transaction:
    sqlite unpivots and copies the rows itself instead of binding Feast's rows from Python
    (docs/scaling.md: 3.9x Feast's stock engine at 1M users), and a failure anywhere before the
    commit leaves the online store as it was. The scratch files are removed either way.
    """
    if not bulk_writable(config):
        raise ValueError("upsert_rows does not fill vector or value_num columns")
    conn = store._get_conn(config)
    db_path = Path(store._get_db_path(config))
    scratch_root = db_path.parent if db_path.parent.is_dir() else None
    with tempfile.TemporaryDirectory(prefix=".friendrec-stage-", dir=scratch_root) as scratch:
        stage = _Stage(Path(scratch), [f.name for f in table.features])
        try:
            for batch in batches:
                stage.add(batch)
            (entities,) = stage.conn.execute(f"SELECT count(*) FROM {STAGE_TABLE}").fetchone()
        finally:
            stage.conn.close()
        conn.execute(f"ATTACH DATABASE ? AS {_STAGE_ALIAS}", (str(stage.path),))
        try:
            with conn:
                conn.execute(upsert_sql(config, table, _STAGE_ALIAS))
        finally:
            conn.execute(f"DETACH DATABASE {_STAGE_ALIAS}")
    return int(entities)
