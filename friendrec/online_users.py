"""Every user the Feast online store holds a row for, read from the store itself.

Why: the stream workers create users the prepared dataset never had (a friendship naming an
unknown user gets Feast rows and a vector in the live collection). Index builds embed the union of
the prepared users and these, so the next model version does not drop them (docs/serving.md,
"users created by the stream"). Feast has no API that lists entity keys, so this reads the two
online stores friendrec supports directly: sqlite (one table per view, one row per key and
feature) and Redis (one hash per key, named serialized key + project).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from feast.infra.key_encoding_utils import deserialize_entity_key

from friendrec import contract


def _user_id(serialized: bytes, version: int) -> int | None:
    try:
        key = deserialize_entity_key(serialized, entity_key_serialization_version=version)
    except Exception:  # another writer's key in a shared store: not ours
        return None
    if list(key.join_keys) != [contract.JOIN_KEY] or not key.entity_values:
        return None
    value = key.entity_values[0]
    return int(value.int64_val) if value.WhichOneof("val") == "int64_val" else None


def online_user_ids(store: Any) -> np.ndarray:
    """Sorted int64 ids of every user with a row in any friendrec view of ``store``."""
    config = store.config
    version = config.entity_key_serialization_version
    kind = getattr(config.online_store, "type", "sqlite")
    keys = _redis_keys(store) if "redis" in str(kind) else _sqlite_keys(store)
    return user_ids_of_keys(keys, version)


def user_ids_of_keys(keys: list[bytes], version: int) -> np.ndarray:
    """Sorted unique user ids in serialized entity keys. Keys in Feast's single-INT64
    ``user_id`` layout are parsed by numpy (per-key ``deserialize_entity_key`` took ~5 s of a
    250k-user index build); any other key is deserialized, and skipped when not a user's."""
    from friendrec.feast_read import key_prefix

    prefix = np.frombuffer(key_prefix(version), np.uint8)
    width = len(prefix) + 8
    sizes = np.fromiter(map(len, keys), np.int64, len(keys))
    fits = np.flatnonzero(sizes == width)
    raw = np.frombuffer(b"".join(keys[i] for i in fits), np.uint8).reshape(-1, width)
    ours = (raw[:, : len(prefix)] == prefix).all(axis=1)
    parsed = raw[ours, len(prefix) :].copy().view("<i8").ravel().astype(np.int64)
    odd = [keys[i] for i in np.flatnonzero(sizes != width)] + [keys[i] for i in fits[~ours]]
    others = [u for u in (_user_id(key, version) for key in odd) if u is not None]
    return np.unique(np.concatenate([parsed, np.array(others, dtype=np.int64)]))


def _sqlite_keys(store: Any) -> list[bytes]:
    from feast.infra.online_stores.sqlite import _quote_id, _table_id

    online = store._get_provider().online_store
    conn = online._get_conn(store.config)
    versioned = store.config.registry.enable_online_feature_view_versioning
    keys: list[bytes] = []
    for view in (contract.PROFILE_VIEW, contract.GRAPH_VIEW):
        table = _table_id(store.config.project, store.get_feature_view(view), versioned)
        exists = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (table,)
        ).fetchone()
        if exists:
            query = f"SELECT DISTINCT entity_key FROM {_quote_id(table)}"
            keys.extend(bytes(key) for (key,) in conn.execute(query))
    return keys


def _redis_keys(store: Any) -> list[bytes]:
    online = store._get_provider().online_store
    client = online._get_client(store.config.online_store)
    suffix = store.config.project.encode()
    return [
        bytes(key)[: -len(suffix)] for key in client.scan_iter(match=b"*" + suffix, count=10_000)
    ]
