"""Comparisons of Feast online/offline values against the offline parquet sources."""

from __future__ import annotations

import contextlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from feature_repo.jobs.graph_features import latest_rows
from friendrec import contract
from friendrec.config import Settings
from friendrec.feast_store import online_features, open_store
from friendrec.paths import DatasetPaths, load_contract


def offline_latest(settings: Settings, dataset: str) -> dict[int, dict]:
    """Latest offline row per user over both sources, keyed by user id."""
    paths = DatasetPaths.of(settings, dataset)
    merged: dict[int, dict] = {}
    for source in (paths.profile_source, paths.graph_source):
        for row in latest_rows(pq.read_table(source)).to_pylist():
            row.pop(contract.EVENT_TIMESTAMP)
            merged.setdefault(row[contract.JOIN_KEY], {}).update(row)
    return merged


def assert_online_matches_offline(settings: Settings, dataset: str, users: list[int]) -> None:
    c = load_contract(settings, dataset)
    offline = offline_latest(settings, dataset)
    online = online_features(open_store(settings, dataset), users, contract=c)
    for row in online:
        assert row["known"], row
        expected = offline[row[contract.JOIN_KEY]]
        for feature in c.all_features:
            got, want = row[feature.name], expected[feature.name]
            if feature.dtype.startswith("float"):
                np.testing.assert_allclose(got, want, rtol=0, atol=0, err_msg=feature.name)
            else:
                assert got == want, (feature.name, got, want)


def sample_users(settings: Settings, dataset: str, k: int, seed: int = 0) -> list[int]:
    ids = pq.read_table(DatasetPaths.of(settings, dataset).profile_source).column("user_id")
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(pa.array(ids).to_numpy(), size=k, replace=False).tolist())


def assert_reads_match_the_sdk(store, users: list[int], c: contract.Contract) -> None:
    """``online_features`` (provider reads) equals ``FeatureStore.get_online_features`` value by
    value: every feature, a subset of references, duplicates and a user the store lacks."""
    asked = [*users, users[0], 10**12]
    for refs in (c.feature_refs(), c.feature_refs(contract.GRAPH_VIEW)[:2]):
        ours = online_features(store, asked, refs, contract=c)
        sdk = store.get_online_features(
            features=refs, entity_rows=[{contract.JOIN_KEY: u} for u in asked]
        ).to_dict()
        for i, row in enumerate(ours):
            assert row[contract.JOIN_KEY] == asked[i]
            for ref in refs:
                name = ref.split(":", 1)[1]
                want = sdk[name][i]
                want = c.default_value(name) if want is None else want
                assert row[name] == want, (asked[i], name, row[name], want)
        assert [r["known"] for r in ours[-2:]] == [True, False]


def sqlite_online_rows(settings: Settings, dataset: str) -> dict[str, list[tuple]]:
    """Every row of the dataset's sqlite online tables as stored (event_ts as its stored integer),
    sorted: for comparing what two materializations wrote, byte for byte."""
    import sqlite3

    path = DatasetPaths.of(settings, dataset).feast_online_sqlite
    with contextlib.closing(sqlite3.connect(path)) as conn:
        tables = [n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {
            name: sorted(
                conn.execute(
                    "SELECT entity_key, feature_name, value, value_text, vector_value, "
                    f'typeof(event_ts), CAST(event_ts AS INTEGER), created_ts FROM "{name}"'
                )
            )
            for name in tables
        }


def redis_online_hashes(redis_url: str) -> dict[bytes, dict[bytes, bytes]]:
    """Every hash in the Redis at ``host:port`` (Feast's keys, fields and values, timestamps
    included)."""
    import redis

    host, port = redis_url.split(":")
    client = redis.Redis(host=host, port=int(port))
    try:
        return {key: client.hgetall(key) for key in client.scan_iter(count=10_000)}
    finally:
        client.close()
