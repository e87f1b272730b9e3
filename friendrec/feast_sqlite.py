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

import itertools
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
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
# Bulk writes (the Ray engine's sqlite path, friendrec/feast_ray.py)

# The columns Feast's ``online_write_batch`` fills without vector or value_num columns; created_ts
# is always NULL for our views (no created timestamp column).
ROW_COLUMNS = ("entity_key", "feature_name", "value", "value_text", "event_ts")


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


def upsert_sql(config: RepoConfig, table: FeatureView) -> str:
    """Feast's upsert statement (``SqliteOnlineStore.online_write_batch``) for ``ROW_COLUMNS``."""
    name = _quote_id(
        _table_id(config.project, table, config.registry.enable_online_feature_view_versioning)
    )
    columns = [*ROW_COLUMNS, "created_ts"]
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns[2:])
    return (
        f"INSERT INTO {name} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
        f"ON CONFLICT(entity_key, feature_name) DO UPDATE SET {updates};"
    )


def upsert_rows(
    store: SqliteOnlineStore, config: RepoConfig, table: FeatureView, batches: Iterable[pa.Table]
) -> int:
    """Write rows already in Feast's layout (``ROW_COLUMNS``, values serialized, ``event_ts`` as
    Feast's adapter stores it) with Feast's statement, one ``executemany`` per batch and one
    transaction in all (as Feast's single-batch write). Returns the entities written.

    Feast's own write runs one ``execute`` per entity and feature, serializing as it goes: about
    half of a materialization (docs/benchmarks.md). Here the values arrive serialized (by Ray
    tasks, in parallel) and sqlite gets them in one call per batch.
    """
    if not bulk_writable(config):
        raise ValueError("upsert_rows does not fill vector or value_num columns")
    conn = store._get_conn(config)
    sql = upsert_sql(config, table)
    features = len(table.features)
    rows = 0
    with conn:
        for batch in batches:
            columns = [batch.column(c).to_pylist() for c in ROW_COLUMNS]
            conn.executemany(sql, zip(*columns, itertools.repeat(None)))
            rows += batch.num_rows
    return rows // max(1, features)
