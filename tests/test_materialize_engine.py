"""Materialization by friendrec's writers, in process (friendrec/feast_write.py) and on Ray
(friendrec/feast_ray.py): the online rows Feast's stock local engine writes, byte for byte, into
sqlite and a real Redis; incremental windows continue across engines.

twitch/ENGB (7k users) with two graph snapshots: a full window holds two graph rows per user, so
the engine must write each user's newest.
"""

from __future__ import annotations

import shutil

import pyarrow as pa
import pytest
from feast.type_map import python_values_to_proto_values
from feast.value_type import ValueType
from feast_checks import (
    assert_online_matches_offline,
    assert_reads_match_the_sdk,
    redis_online_hashes,
    sample_users,
    sqlite_online_rows,
)

from feature_repo.jobs.graph_features import build_features
from feature_repo.jobs.materialize import apply, materialize
from friendrec import contract, feast_ray, feast_sqlite, feast_write
from friendrec.config import load_settings
from friendrec.data.canonical import prepare
from friendrec.feast_store import (
    LOCAL_ENGINE_TYPE,
    RAY_ENGINE_TYPE,
    open_store,
    render_config,
)
from friendrec.paths import DatasetPaths, load_contract

pytestmark = pytest.mark.integration

DATASET = "twitch/ENGB"


@pytest.fixture
def engb_t1(tmp_path):
    """ENGB prepared, graph features as of t1 (mid-timeline); returns (settings, t2)."""
    settings = load_settings(workdir=tmp_path / "work")
    meta = prepare(settings, DATASET)
    build_features(settings, DATASET, as_of=meta.timeline_start + 200 * 86_400, show_progress=False)
    return settings, meta.train_cutoff_ts


def _reset_online(settings) -> None:
    """A new registry and online store (the offline sources stay)."""
    shutil.rmtree(DatasetPaths.of(settings, DATASET).feast_dir)
    apply(settings, DATASET)


def _stock(settings):
    """The same settings with Feast's stock engines (the reference bytes)."""
    engine = settings.engine.model_copy(update={"materialize_fast_write": False})
    return settings.model_copy(update={"engine": engine})


def _small_partitions(settings, rows: int = 1_000):
    """Several partitions per view even on ENGB's 7k users."""
    engine = settings.engine.model_copy(update={"materialize_partition_rows": rows})
    return settings.model_copy(update={"engine": engine})


def test_friendrec_writers_are_the_batch_engines_unless_turned_off(settings):
    paths = DatasetPaths.of(settings, DATASET)
    write = {"partition_rows": settings.engine.materialize_partition_rows}
    assert render_config(settings, paths)["batch_engine"] == {"type": LOCAL_ENGINE_TYPE, **write}
    assert render_config(settings, paths, "ray")["batch_engine"] == {
        "type": RAY_ENGINE_TYPE,
        **write,
    }
    assert "batch_engine" not in render_config(_stock(settings), paths)
    assert render_config(_stock(settings), paths, "ray")["batch_engine"]["fast_write"] is False
    assert feast_ray.TYPE == RAY_ENGINE_TYPE and feast_write.LOCAL_TYPE == LOCAL_ENGINE_TYPE
    assert feast_write.partition_count(7126, 1, 1000) == 8
    assert feast_write.partition_count(7126, 8, 100_000) == 8
    assert feast_write.partition_count(10, 1, 100_000) == 1


def test_partitions_pickle_only_their_own_rows():
    table = pa.table({"a": pa.array(range(100_000), pa.int64())})
    parts = list(feast_write._slices(table, 4))
    assert [p.num_rows for p in parts] == [25_000] * 4
    assert pa.concat_tables(parts).equals(table)
    import pickle

    assert len(pickle.dumps(parts[0], protocol=5)) < len(pickle.dumps(table, protocol=5)) / 3


def test_friendrec_writers_write_the_stock_sqlite_rows(engb_t1, ray_engine):
    settings, t2 = engb_t1
    build_features(settings, DATASET, as_of=t2, show_progress=False)  # a second snapshot
    apply(settings, DATASET)
    stock = materialize(_stock(settings), DATASET, engine="local")
    expected = sqlite_online_rows(settings, DATASET)
    assert all(len(rows) == 7126 * 5 for rows in expected.values())
    for engine in ("local", "ray"):
        _reset_online(settings)
        report = materialize(_small_partitions(settings), DATASET, engine=engine)
        assert report.engine == engine and report.views == stock.views
        assert report.rows == stock.rows == {v: 7126 for v in stock.views}
        assert report.users_per_s and report.users_per_s > 0
        got = sqlite_online_rows(settings, DATASET)
        assert got.keys() == expected.keys()
        for table, rows in expected.items():
            assert got[table] == rows, (engine, table)
    users = sample_users(settings, DATASET, 60)
    assert_online_matches_offline(settings, DATASET, users)
    assert_reads_match_the_sdk(
        open_store(settings, DATASET), users, load_contract(settings, DATASET)
    )
    # A full re-run over the rows now online writes the same bytes again.
    materialize(settings, DATASET, engine="ray")
    assert sqlite_online_rows(settings, DATASET) == expected


def test_ray_incremental_moves_only_new_rows(engb_t1, ray_engine, monkeypatch):
    settings, t2 = engb_t1
    written: dict[str, int] = {}
    original = feast_sqlite.upsert_rows

    def counting(store, config, table, batches):
        rows = original(store, config, table, batches)
        written[table.name] = written.get(table.name, 0) + rows
        return rows

    monkeypatch.setattr(feast_sqlite, "upsert_rows", counting)
    apply(settings, DATASET)
    first = materialize(settings, DATASET, incremental=True, engine="ray")
    assert written == {contract.PROFILE_VIEW: 7126, contract.GRAPH_VIEW: 7126} == first.rows
    probe = sample_users(settings, DATASET, 30)
    assert_online_matches_offline(settings, DATASET, probe)

    second_build = build_features(settings, DATASET, as_of=t2, show_progress=False)
    written.clear()
    second = materialize(settings, DATASET, incremental=True, engine="ray")
    assert written == {contract.GRAPH_VIEW: second_build.rows_written} == second.rows
    assert second.views[contract.PROFILE_VIEW] is None
    # The registry recorded the window: it starts where the first run ended.
    assert second.views[contract.GRAPH_VIEW][0] == first.views[contract.GRAPH_VIEW][1]
    end = open_store(settings, DATASET).get_feature_view(contract.GRAPH_VIEW).most_recent_end_time
    assert end.isoformat().startswith(second.views[contract.GRAPH_VIEW][1][:19])
    assert_online_matches_offline(settings, DATASET, probe)

    written.clear()
    third = materialize(settings, DATASET, incremental=True, engine="local")  # engines interleave
    assert written == {} and set(third.views.values()) == {None}


def test_friendrec_writers_write_the_stock_redis_hashes(engb_t1, ray_engine, redis_url):
    import redis

    base, t2 = engb_t1
    settings = load_settings(
        workdir=base.workdir,
        features={"online_store": "redis", "redis_connection_string": redis_url},
    )
    build_features(settings, DATASET, as_of=t2, show_progress=False)
    apply(settings, DATASET)
    materialize(_stock(settings), DATASET, engine="local")
    expected = redis_online_hashes(redis_url)
    assert len(expected) == 7126
    host, port = redis_url.split(":")
    for engine in ("local", "ray"):
        _reset_online(settings)
        redis.Redis(host=host, port=int(port)).flushall()
        materialize(_small_partitions(settings), DATASET, engine=engine)
        assert redis_online_hashes(redis_url) == expected, engine
    assert_online_matches_offline(settings, DATASET, sample_users(settings, DATASET, 40))


@pytest.mark.parametrize(
    ("array", "value_type"),
    [
        (pa.array([0, -1, 2**62, -(2**63), 7], pa.int64()), ValueType.INT64),
        (pa.array([0.0, -0.0, 0.1, 3.0, 1e-30, float("inf")], pa.float32()), ValueType.FLOAT),
        (pa.array([[], [1, -5], [2**40], []], pa.list_(pa.int64())), ValueType.INT64_LIST),
        (pa.array([[0.5, -2.25], [], [1e-7]], pa.list_(pa.float32())), ValueType.FLOAT_LIST),
        # Lengths over 127 bytes: two-byte length varints.
        (
            pa.array([list(range(-5, 300)), [2**62] * 20], pa.list_(pa.int64())),
            ValueType.INT64_LIST,
        ),
        (pa.array([[0.25] * 40, [1.5]], pa.list_(pa.float32())), ValueType.FLOAT_LIST),
        # Missing values: Feast's own conversion (empty values), not the column path.
        (pa.array([1, None, 3], pa.int64()), ValueType.INT64),
        (pa.array([float("nan"), 1.0], pa.float32()), ValueType.FLOAT),
        (pa.array([[1], None, [2]], pa.list_(pa.int64())), ValueType.INT64_LIST),
        (pa.array([[1], [2, None]], pa.list_(pa.int64())), ValueType.INT64_LIST),
    ],
)
def test_serialized_values_are_feasts(array, value_type):
    chunked = pa.chunked_array([array.slice(0, 1), array.slice(1)])
    try:
        want = python_values_to_proto_values(array.to_numpy(zero_copy_only=False), value_type)
    except TypeError as exc:  # Feast refuses a null inside a list: so do we
        with pytest.raises(type(exc)):
            feast_write.proto_values(chunked, value_type)
        return
    ours = feast_write.proto_values(chunked, value_type)
    wire = [v.SerializeToString() for v in want]
    assert [v.SerializeToString() for v in ours] == wire
    assert feast_write.serialized_values(chunked, value_type).to_pylist() == wire
    assert feast_write.value_texts(chunked, value_type) == feast_sqlite.value_texts(want)


def test_entity_keys_are_feasts():
    table = pa.table({contract.JOIN_KEY: pa.array([0, 1, -7, 2**63 - 1, 123456789], pa.int64())})
    keys = {contract.JOIN_KEY: ValueType.INT64}
    fast = feast_write.entity_key_bytes(table, keys, 3)
    assert fast == [
        feast_write._entity_key(contract.JOIN_KEY, int(u), 3)
        for u in table[contract.JOIN_KEY].to_pylist()
    ]
    ordered = feast_write._key_order(table, keys)  # the order the sqlite writer gets
    ordered_keys = feast_write.entity_key_bytes(ordered, keys, 3)
    assert ordered_keys == sorted(fast)


def test_sqlite_bulk_upsert_is_one_transaction_and_leaves_no_scratch_files(engb_t1):
    """``feast_sqlite.upsert_rows`` gathers Arrow batches and tasks' partition files in a
    scratch file, then upserts them at once: a failure while gathering changes nothing online
    and removes the scratch files; a whole run updates the rows it carries (Feast's upsert)."""
    settings, _ = engb_t1
    apply(settings, DATASET)
    materialize(settings, DATASET, engine="local")
    before = sqlite_online_rows(settings, DATASET)
    fs = open_store(settings, DATASET)
    store, config = fs._get_provider().online_store, fs.config
    view = fs.get_feature_view(contract.GRAPH_VIEW)
    (name,) = [t for t in before if t.endswith(contract.GRAPH_VIEW)]
    features = [f.name for f in view.features]
    stored = {(r[0], r[1]): r for r in before[name]}
    keys = sorted({r[0] for r in before[name]})[:30]  # 30 users, every feature changed
    columns = {
        "entity_key": pa.array(keys, pa.binary()),
        "event_ts": pa.array([stored[(k, features[0])][6] + 1 for k in keys], pa.int64()),
    }
    for f in features:
        columns[f"value:{f}"] = pa.array([b"new" + stored[(k, f)][2] for k in keys], pa.binary())
        columns[f"text:{f}"] = pa.array([stored[(k, f)][3] for k in keys], pa.string())
    batch = pa.table(columns)
    assert batch.column_names == feast_sqlite.wide_columns(features)
    halves = batch.slice(0, 15), batch.slice(15)
    feast_dir = DatasetPaths.of(settings, DATASET).feast_dir

    def failing():
        yield feast_sqlite.partition_file(halves[0])
        yield halves[1]
        raise RuntimeError("a task failed")

    with pytest.raises(RuntimeError, match="a task failed"):
        feast_sqlite.upsert_rows(store, config, view, failing())
    assert sqlite_online_rows(settings, DATASET) == before
    assert not list(feast_dir.glob(".friendrec-stage-*"))

    written = feast_sqlite.upsert_rows(
        store, config, view, [feast_sqlite.partition_file(halves[0]), halves[1]]
    )
    assert written == 30
    after = sqlite_online_rows(settings, DATASET)
    assert len(after[name]) == len(before[name])  # updated in place, nothing added
    for row in after[name]:
        old = stored[(row[0], row[1])]
        if row[0] in keys:  # Feast's upsert: the new value and time, the same text and type
            assert row[2] == b"new" + old[2] and row[6] == old[6] + 1, row[1]
            assert row[3] == old[3] and row[5] == old[5]
        else:
            assert row == old
    assert not list(feast_dir.glob(".friendrec-stage-*"))
    with pytest.raises(ValueError, match="wide_columns"):  # another view's layout
        feast_sqlite.upsert_rows(store, config, view, [batch.drop_columns(["text:degree"])])
