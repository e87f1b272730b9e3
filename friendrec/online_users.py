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
    found = _redis_ids(store, version) if "redis" in str(kind) else _sqlite_ids(store, version)
    return np.array(sorted(found), dtype=np.int64)


def _sqlite_ids(store: Any, version: int) -> set[int]:
    from feast.infra.online_stores.sqlite import _table_id

    online = store._get_provider().online_store
    conn = online._get_conn(store.config)
    versioned = store.config.registry.enable_online_feature_view_versioning
    found: set[int] = set()
    for view in (contract.PROFILE_VIEW, contract.GRAPH_VIEW):
        table = _table_id(store.config.project, store.get_feature_view(view), versioned)
        exists = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (table,)
        ).fetchone()
        if not exists:
            continue
        for (key,) in conn.execute(f'SELECT DISTINCT entity_key FROM "{table}"'):
            user = _user_id(bytes(key), version)
            if user is not None:
                found.add(user)
    return found


def _redis_ids(store: Any, version: int) -> set[int]:
    online = store._get_provider().online_store
    client = online._get_client(store.config.online_store)
    suffix = store.config.project.encode()
    found: set[int] = set()
    for key in client.scan_iter(match=b"*" + suffix, count=10_000):
        user = _user_id(bytes(key)[: -len(suffix)], version)
        if user is not None:
            found.add(user)
    return found
