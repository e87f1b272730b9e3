"""Feast round trips on real stores: sqlite (embedded) and a real redis-server."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from feast.infra.online_stores.sqlite import SqliteOnlineStore
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import FloatList, Int64List
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.type_map import feast_value_type_to_python_type
from feast_checks import assert_online_matches_offline, assert_reads_match_the_sdk, sample_users

from feature_repo.definitions import FEAST_TYPES, build_definitions
from feature_repo.jobs.graph_features import build_features, compute_graph_features
from feature_repo.jobs.materialize import apply, materialize
from friendrec import contract, feast_sqlite
from friendrec.config import load_settings
from friendrec.data.canonical import load_prepared, prepare
from friendrec.feast_sqlite import MAX_KEYS, FriendrecSqliteOnlineStore
from friendrec.feast_store import online_features, open_store, python_value, render_config
from friendrec.paths import DatasetPaths, load_contract

pytestmark = pytest.mark.integration


def test_online_equals_offline_for_sampled_users_sqlite(engb_store):
    users = sample_users(engb_store, "twitch/ENGB", 60)
    assert_online_matches_offline(engb_store, "twitch/ENGB", users)
    c = load_contract(engb_store, "twitch/ENGB")
    assert_reads_match_the_sdk(open_store(engb_store, "twitch/ENGB"), users, c)


def test_friendrec_sqlite_read_equals_feasts_own(engb_store):
    """The embedded store's faster ``online_read`` returns what Feast's sqlite store returns,
    over more keys than one SQL chunk, with duplicates, an unknown key and feature subsets."""
    store = open_store(engb_store, "twitch/ENGB")
    ours = store._get_provider().online_store
    assert isinstance(ours, FriendrecSqliteOnlineStore)
    users = [*range(MAX_KEYS + 100), 7, 10**12]
    keys = [
        EntityKeyProto(join_keys=[contract.JOIN_KEY], entity_values=[ValueProto(int64_val=u)])
        for u in users
    ]
    for view, features in load_contract(engb_store, "twitch/ENGB").views.items():
        table = store.get_feature_view(view)
        stock = SqliteOnlineStore().online_read(store.config, table, keys)
        for requested in (None, [features[-1].name, features[0].name]):
            read = ours.online_read(store.config, table, keys, requested)
            assert len(read) == len(stock)
            for (ts, values), (want_ts, want) in zip(read, stock, strict=True):
                assert ts == want_ts
                if want is None:
                    assert values is None
                    continue
                names = requested or list(want)
                assert values == {n: want[n] for n in names}
        assert stock[-1] == (None, None) and stock[0][1] is not None


def test_python_value_reads_values_as_feast_does():
    cases = [
        ValueProto(),
        ValueProto(int64_val=-3),
        ValueProto(float_val=0.25),
        ValueProto(double_val=1.5),
        ValueProto(int64_list_val=Int64List(val=[3, 1])),
        ValueProto(float_list_val=FloatList(val=[0.5])),
        ValueProto(int64_list_val=Int64List()),
    ]
    for value in cases:
        assert python_value(value) == feast_value_type_to_python_type(value), value


def test_unknown_feature_references_are_rejected(engb_store):
    c = load_contract(engb_store, "twitch/ENGB")
    with pytest.raises(ValueError, match="unknown feature reference 'user_graph:nope'"):
        online_features(open_store(engb_store, "twitch/ENGB"), [5], ["user_graph:nope"], contract=c)


def test_unknown_users_get_contract_defaults(engb_store):
    c = load_contract(engb_store, "twitch/ENGB")
    rows = online_features(open_store(engb_store, "twitch/ENGB"), [5, 10**12, -3], contract=c)
    assert [r["known"] for r in rows] == [True, False, False]
    for row in rows[1:]:
        for feature in c.all_features:
            assert row[feature.name] == c.default_value(feature.name)
    assert rows[0]["degree"] > 0 and rows[0]["sparse_ids"]
    assert len(rows[1]["nbr_profile_mean"]) == len(c.profile_scalars) == 4


def test_feature_services_and_schema_follow_the_contract(engb_store):
    store = open_store(engb_store, "twitch/ENGB")
    c = load_contract(engb_store, "twitch/ENGB")
    for service_name in (c.training_service, c.serving_service):
        assert service_name.endswith(c.schema_hash)
        service = store.get_feature_service(service_name)
        refs = sorted(
            f"{p.name}:{f.name}" for p in service.feature_view_projections for f in p.features
        )
        assert refs == sorted(c.feature_refs())
    for view, features in c.views.items():
        registered = store.get_feature_view(view)
        schema = {f.name: f.dtype for f in registered.features}
        assert schema == {f.name: FEAST_TYPES[f.dtype] for f in features}
        assert registered.tags["schema_hash"] == c.schema_hash
    push_sources = {p.name for p in store.list_data_sources() if type(p).__name__ == "PushSource"}
    assert push_sources == {contract.PROFILE_PUSH_SOURCE, contract.GRAPH_PUSH_SOURCE}


@pytest.fixture
def ptbr_two_snapshots(tmp_path):
    """twitch/PTBR with graph snapshots at t1 (mid-timeline) and t2 (training cutoff)."""
    settings = load_settings(workdir=tmp_path / "work")
    meta = prepare(settings, "twitch/PTBR")
    t1 = meta.timeline_start + 200 * 86_400
    t2 = meta.train_cutoff_ts
    build_features(settings, "twitch/PTBR", as_of=t1, show_progress=False)
    return settings, meta, t1, t2


def _ts(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def test_point_in_time_historical_retrieval(ptbr_two_snapshots):
    settings, _, t1, t2 = ptbr_two_snapshots
    build_features(settings, "twitch/PTBR", as_of=t2, show_progress=False)
    store = apply(settings, "twitch/PTBR")
    data = load_prepared(DatasetPaths.of(settings, "twitch/PTBR"))
    at_t1 = compute_graph_features(data, t1, settings, show_progress=False)
    at_t2 = compute_graph_features(data, t2, settings, show_progress=False)
    changed = np.flatnonzero(at_t1.degree != at_t2.degree)[:40]
    assert changed.size == 40
    users = data.user_ids[changed].tolist()
    entity_df = pd.DataFrame(
        {
            contract.JOIN_KEY: users * 3,
            contract.EVENT_TIMESTAMP: [_ts(t1 - 86_400)] * len(users)
            + [_ts(t1 + (t2 - t1) // 2)] * len(users)
            + [_ts(t2 + 86_400)] * len(users),
        }
    )
    service = store.get_feature_service(data.contract.training_service)
    result = store.get_historical_features(entity_df=entity_df, features=service).to_df()
    assert len(result) == 3 * len(users)  # no entity row dropped
    result = result.sort_values([contract.EVENT_TIMESTAMP, contract.JOIN_KEY])
    before, between, after = (result.iloc[i * len(users) : (i + 1) * len(users)] for i in range(3))
    assert before[contract.DEGREE.name].isna().all()  # no graph row existed yet
    by_user = {u: i for i, u in enumerate(data.user_ids.tolist())}
    assert between[contract.DEGREE.name].tolist() == [
        int(at_t1.degree[by_user[u]]) for u in between[contract.JOIN_KEY]
    ]
    assert after[contract.DEGREE.name].tolist() == [
        int(at_t2.degree[by_user[u]]) for u in after[contract.JOIN_KEY]
    ]
    # Profiles exist from the timeline start, so every row has them.
    assert not result["account_age_days"].isna().any()


@pytest.mark.parametrize("fast_write", [True, False], ids=["friendrec-writer", "feast-stock"])
def test_incremental_materialization_moves_only_new_rows(
    ptbr_two_snapshots, monkeypatch, fast_write
):
    settings, meta, _, t2 = ptbr_two_snapshots
    engine = settings.engine.model_copy(update={"materialize_fast_write": fast_write})
    settings = settings.model_copy(update={"engine": engine})
    written: dict[str, int] = {}
    stock_write = SqliteOnlineStore.online_write_batch
    bulk_write = feast_sqlite.upsert_rows

    def counting(self, config, table, data, progress):
        written[table.name] = written.get(table.name, 0) + len(data)
        return stock_write(self, config, table, data, progress)

    def counting_bulk(store, config, table, batches):
        rows = bulk_write(store, config, table, batches)
        written[table.name] = written.get(table.name, 0) + rows
        return rows

    monkeypatch.setattr(SqliteOnlineStore, "online_write_batch", counting)
    monkeypatch.setattr(feast_sqlite, "upsert_rows", counting_bulk)
    apply(settings, "twitch/PTBR")
    materialize(settings, "twitch/PTBR", incremental=True)  # first run: everything up to t1
    assert written == {contract.PROFILE_VIEW: meta.num_users, contract.GRAPH_VIEW: meta.num_users}
    probe = sample_users(settings, "twitch/PTBR", 30)
    assert_online_matches_offline(settings, "twitch/PTBR", probe)

    second = build_features(settings, "twitch/PTBR", as_of=t2, show_progress=False)
    written.clear()
    report = materialize(settings, "twitch/PTBR", incremental=True)
    assert written == {contract.GRAPH_VIEW: second.rows_written}
    assert report.views[contract.PROFILE_VIEW] is None  # nothing new: up to date
    assert_online_matches_offline(settings, "twitch/PTBR", probe)

    written.clear()
    materialize(settings, "twitch/PTBR", incremental=True)
    assert written == {}  # a re-run moves nothing


def test_full_materialization_is_idempotent(ptbr_two_snapshots):
    settings, *_ = ptbr_two_snapshots
    apply(settings, "twitch/PTBR")
    materialize(settings, "twitch/PTBR")
    users = sample_users(settings, "twitch/PTBR", 50)
    c = load_contract(settings, "twitch/PTBR")
    before = online_features(open_store(settings, "twitch/PTBR"), users, contract=c)
    materialize(settings, "twitch/PTBR")
    apply(settings, "twitch/PTBR")  # re-applying the same definitions changes nothing either
    assert online_features(open_store(settings, "twitch/PTBR"), users, contract=c) == before
    assert_online_matches_offline(settings, "twitch/PTBR", users)


def test_redis_online_round_trip(tmp_path, redis_url):
    settings = load_settings(
        workdir=tmp_path / "work",
        features={"online_store": "redis", "redis_connection_string": redis_url},
    )
    assert render_config(settings, DatasetPaths.of(settings, "twitch/PTBR"))["online_store"] == {
        "type": "redis",
        "connection_string": redis_url,
    }
    prepare(settings, "twitch/PTBR")
    build_features(settings, "twitch/PTBR", show_progress=False)
    apply(settings, "twitch/PTBR")
    materialize(settings, "twitch/PTBR")
    users = sample_users(settings, "twitch/PTBR", 60)
    c = load_contract(settings, "twitch/PTBR")
    assert_online_matches_offline(settings, "twitch/PTBR", users)
    assert_reads_match_the_sdk(open_store(settings, "twitch/PTBR"), users, c)
    rows = online_features(open_store(settings, "twitch/PTBR"), [10**12], contract=c)
    assert rows[0]["known"] is False and rows[0]["friend_ids"] == []
    # The same values as the sqlite store would serve for the same user.
    sqlite_settings = load_settings(workdir=settings.workdir)
    apply(sqlite_settings, "twitch/PTBR")
    materialize(sqlite_settings, "twitch/PTBR")
    assert online_features(
        open_store(settings, "twitch/PTBR"), users, contract=c
    ) == online_features(open_store(sqlite_settings, "twitch/PTBR"), users, contract=c)


def test_definitions_point_at_absolute_sources(engb_store):
    paths = DatasetPaths.of(engb_store, "twitch/ENGB")
    defs = build_definitions(paths, load_contract(engb_store, "twitch/ENGB"))
    for view in (defs.profile_view, defs.graph_view):
        path = view.batch_source.path
        assert path.startswith("/") and path.endswith(".parquet")
    assert defs.profile_view.ttl == timedelta(0)


def test_definitions_module_imports_without_a_prepared_dataset(tmp_path):
    """The module-level objects for the plain `feast` CLI exist only once the default dataset is
    prepared: importing the module in a fresh workdir must not fail."""
    import subprocess
    import sys

    code = "import feature_repo.definitions as d; print(hasattr(d, 'user_profile'))"
    env = {**os.environ, "FRIENDREC_WORKDIR": str(tmp_path / "fresh")}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_online_user_ids_lists_every_materialized_user(engb_store):
    """Index builds embed these besides the prepared users (users the stream created)."""
    import numpy as np

    from friendrec.data.canonical import load_prepared
    from friendrec.feast_store import open_store
    from friendrec.online_users import online_user_ids
    from friendrec.paths import DatasetPaths

    data = load_prepared(DatasetPaths.of(engb_store, "twitch/ENGB"))
    found = online_user_ids(open_store(engb_store, "twitch/ENGB"))
    assert np.array_equal(found, data.user_ids)


def test_user_ids_of_keys_parses_feasts_layout_and_skips_other_keys():
    """The numpy parse of serialized keys gives what Feast's own deserializer gives, for the
    single-INT64 layout and for any other key in a shared store (skipped unless a user's)."""
    import numpy as np
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    from friendrec.online_users import _user_id, user_ids_of_keys

    def key(join_key: str, value: Value) -> bytes:
        proto = EntityKey(join_keys=[join_key], entity_values=[value])
        return serialize_entity_key(proto, entity_key_serialization_version=3)

    users = [key("user_id", Value(int64_val=u)) for u in (7, -2, 2**40 + 1, 7)]
    foreign = [key("item_id", Value(int64_val=5)), key("user_id", Value(string_val="ab")), b"x"]
    keys = users + foreign
    got = user_ids_of_keys(keys, 3)
    one_by_one = {u for u in (_user_id(k, 3) for k in keys) if u is not None}
    np.testing.assert_array_equal(got, sorted(one_by_one))
    np.testing.assert_array_equal(got, [-2, 7, 2**40 + 1])
    assert got.dtype == np.int64 and len(user_ids_of_keys([], 3)) == 0


def test_training_table_from_arrow_equals_the_records_path(engb_store):
    """Training's columnar FeatureTable (``from_arrow``) is the one ``from_rows`` builds from the
    same historical rows as Python records, defaults for users the offline store lacks included."""
    from training.features import FeatureTable, InputSpec

    store = open_store(engb_store, "twitch/ENGB")
    data = load_prepared(DatasetPaths.of(engb_store, "twitch/ENGB"))
    c = data.contract
    spec = InputSpec.from_settings(engb_store, data.meta.vocab_size, engb_store.training.fanout)
    users = np.concatenate([data.user_ids[:500], [int(data.user_ids.max()) + 10_000]])
    when = datetime.fromtimestamp(data.meta.train_cutoff_ts + 1, UTC)
    entity_df = pd.DataFrame({contract.JOIN_KEY: users, "event_timestamp": [when] * len(users)})
    job = store.get_historical_features(
        entity_df=entity_df, features=store.get_feature_service(c.training_service)
    )
    table = job.to_arrow().sort_by(contract.JOIN_KEY)
    records = table.to_pandas().replace({np.nan: None}).to_dict("records")
    fast = FeatureTable.from_arrow(table, spec, c)
    slow = FeatureTable.from_rows(records, spec, c)
    assert fast.friend_matrix[-1].tolist() == [-1] * spec.friend_len  # the unknown user
    assert (fast.friend_matrix[:-1] >= 0).any() and fast.degree[:-1].max() > 0
    for name in ("user_ids", "profile", "sparse_ids", "nbr_ids", "nbr_weights", "nbr_profile"):
        np.testing.assert_array_equal(getattr(fast, name), getattr(slow, name), err_msg=name)
    np.testing.assert_array_equal(fast.degree, slow.degree)
    np.testing.assert_array_equal(fast.friend_matrix, slow.friend_matrix)
    assert all(getattr(fast, n).dtype == getattr(slow, n).dtype for n in ("degree", "profile"))


def test_training_table_in_chunks_equals_one_retrieval(engb_store):
    """The offline read in chunks of users (bounded memory) builds the same training table."""
    from training.features import FeatureTable, InputSpec

    store = open_store(engb_store, "twitch/ENGB")
    data = load_prepared(DatasetPaths.of(engb_store, "twitch/ENGB"))
    spec = InputSpec.from_settings(engb_store, data.meta.vocab_size, engb_store.training.fanout)
    whole = FeatureTable.from_offline_store(store, data, spec)
    chunked = FeatureTable.from_offline_store(store, data, spec, chunk_users=2_000)
    assert len(whole) == len(data.user_ids) > 3 * 2_000  # four chunks
    for name in ("user_ids", "profile", "sparse_ids", "nbr_ids", "nbr_weights", "nbr_profile"):
        np.testing.assert_array_equal(getattr(chunked, name), getattr(whole, name), err_msg=name)
    np.testing.assert_array_equal(chunked.friend_matrix, whole.friend_matrix)
    np.testing.assert_array_equal(chunked.degree, whole.degree)
