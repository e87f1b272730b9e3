"""Feast round trips on real stores: sqlite (embedded) and a real redis-server."""

from __future__ import annotations

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
from friendrec import contract
from friendrec.config import load_settings
from friendrec.data.canonical import load_prepared, prepare
from friendrec.feast_sqlite import MAX_KEYS, FriendrecSqliteOnlineStore
from friendrec.feast_store import online_features, open_store, python_value, render_config
from friendrec.paths import DatasetPaths

pytestmark = pytest.mark.integration


def test_online_equals_offline_for_sampled_users_sqlite(engb_store):
    users = sample_users(engb_store, "twitch/ENGB", 60)
    assert_online_matches_offline(engb_store, "twitch/ENGB", users)
    assert_reads_match_the_sdk(open_store(engb_store, "twitch/ENGB"), users)


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
    for view, features in contract.VIEWS.items():
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
    with pytest.raises(ValueError, match="unknown feature reference 'user_graph:nope'"):
        online_features(open_store(engb_store, "twitch/ENGB"), [5], ["user_graph:nope"])


def test_unknown_users_get_contract_defaults(engb_store):
    rows = online_features(open_store(engb_store, "twitch/ENGB"), [5, 10**12, -3])
    assert [r["known"] for r in rows] == [True, False, False]
    for row in rows[1:]:
        for feature in contract.ALL_FEATURES:
            assert row[feature.name] == contract.default_value(feature.name)
    assert rows[0]["degree"] > 0 and rows[0]["sparse_ids"]


def test_feature_services_and_schema_follow_the_contract(engb_store):
    store = open_store(engb_store, "twitch/ENGB")
    for service_name in (contract.TRAINING_SERVICE, contract.SERVING_SERVICE):
        service = store.get_feature_service(service_name)
        refs = sorted(
            f"{p.name}:{f.name}" for p in service.feature_view_projections for f in p.features
        )
        assert refs == sorted(contract.feature_refs())
    for view, features in contract.VIEWS.items():
        schema = {f.name: f.dtype for f in store.get_feature_view(view).features}
        assert schema == {f.name: FEAST_TYPES[f.dtype] for f in features}
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
    service = store.get_feature_service(contract.TRAINING_SERVICE)
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


def test_incremental_materialization_moves_only_new_rows(ptbr_two_snapshots, monkeypatch):
    settings, meta, _, t2 = ptbr_two_snapshots
    written: dict[str, int] = {}
    original = SqliteOnlineStore.online_write_batch

    def counting(self, config, table, data, progress):
        written[table.name] = written.get(table.name, 0) + len(data)
        return original(self, config, table, data, progress)

    monkeypatch.setattr(SqliteOnlineStore, "online_write_batch", counting)
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
    before = online_features(open_store(settings, "twitch/PTBR"), users)
    materialize(settings, "twitch/PTBR")
    apply(settings, "twitch/PTBR")  # re-applying the same definitions changes nothing either
    assert online_features(open_store(settings, "twitch/PTBR"), users) == before
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
    assert_online_matches_offline(settings, "twitch/PTBR", users)
    assert_reads_match_the_sdk(open_store(settings, "twitch/PTBR"), users)
    rows = online_features(open_store(settings, "twitch/PTBR"), [10**12])
    assert rows[0]["known"] is False and rows[0]["friend_ids"] == []
    # The same values as the sqlite store would serve for the same user.
    sqlite_settings = load_settings(workdir=settings.workdir)
    apply(sqlite_settings, "twitch/PTBR")
    materialize(sqlite_settings, "twitch/PTBR")
    assert online_features(open_store(settings, "twitch/PTBR"), users) == online_features(
        open_store(sqlite_settings, "twitch/PTBR"), users
    )


def test_definitions_point_at_absolute_sources(engb_store):
    defs = build_definitions(DatasetPaths.of(engb_store, "twitch/ENGB"))
    for view in (defs.profile_view, defs.graph_view):
        path = view.batch_source.path
        assert path.startswith("/") and path.endswith(".parquet")
    assert defs.profile_view.ttl == timedelta(0)
