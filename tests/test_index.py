"""The Milvus embedding index against real milvus-lite (file and server mode), no mocks: builds
through the Feast online store and the exported model, the alias, rollback, prune, failures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from friendrec.config import Settings
from friendrec.errors import ContractMismatchError, IncompatibleModelError
from friendrec.local_services import MilvusLiteProcess, MilvusStandaloneProcess
from friendrec.paths import load_contract
from serving import index_build
from serving.index import EmbeddingIndex, EmbeddingIndexError, IndexUnavailableError
from serving.index_build import (
    LocalEmbedder,
    Partition,
    Population,
    build_index,
    embed_users,
    partitions,
    version_dir,
)

pytestmark = pytest.mark.integration

ALIAS = "user_embeddings"


def with_milvus(settings: Settings, uri: str, **milvus) -> Settings:
    """The read-only session settings with a private Milvus (and optional milvus overrides)."""
    cfg = settings.milvus.model_copy(update={"uri": uri, **milvus})
    return settings.model_copy(update={"milvus": cfg})


def with_base_path(settings: Settings, base: Path) -> Settings:
    return settings.model_copy(
        update={"serving": settings.serving.model_copy(update={"model_base_path": base})}
    )


def private_base(exported, tmp_path: Path, versions: dict[int, int]) -> Path:
    """A private model base path: new version -> a copy of an exported version's directory."""
    name = exported.settings.serving.model_name
    base = tmp_path / "models"
    for new, old in versions.items():
        shutil.copytree(exported.base_path / name / str(old), base / name / str(new))
    return base


class ReferenceEmbedder:
    """What the training code computed for each user (looked up by ``self_user_id``): the build
    still reads Feast per batch, without paying for TensorFlow in policy tests."""

    def __init__(self, exported, version: int, fail_after: int | None = None) -> None:
        self.rows = dict(zip(exported.user_ids.tolist(), exported.embeddings[version], strict=True))
        self.fail_after = fail_after
        self.calls = 0

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("embedder died mid-build")
        return np.stack([self.rows[int(u)] for u in inputs["self_user_id"]])


def recall_at(index: EmbeddingIndex, matrix: np.ndarray, ids: np.ndarray, k: int, n: int) -> float:
    """Mean recall@k of the index vs exact top-k over the same matrix, for n random users."""
    rng = np.random.default_rng(0)
    queries = rng.choice(len(ids), size=n, replace=False)
    exact = np.argsort(-(matrix[queries] @ matrix.T), axis=1)[:, :k]
    hits = index.search(ALIAS, matrix[queries], limit=k)
    recalls = [
        len({int(u) for u, _ in hit} & set(ids[row].tolist())) / k
        for hit, row in zip(hits, exact, strict=True)
    ]
    return float(np.mean(recalls))


def small_version(index: EmbeddingIndex, version: int, rows: int = 50, promote: bool = True) -> str:
    """A tiny complete collection through the index API (for policy tests without a build)."""
    vectors = np.random.default_rng(version).normal(size=(rows, 16)).astype(np.float32)
    name = index.create_version(version, 16, "twitch/ENGB")
    index.insert(name, np.arange(rows), vectors, version)
    index.finish(name, rows)
    if promote:
        index.promote(version)
    return name


def test_build_v1_file_mode_matches_training_and_searches(exported_models, tmp_path) -> None:
    settings = with_milvus(exported_models.settings, str(tmp_path / "m.db"))
    ids, reference = exported_models.user_ids, exported_models.embeddings[1]
    report = build_index(settings, 1, show_progress=False)
    assert (report.users, report.unknown_users, report.dim) == (len(ids), 0, 17)  # 16 + 1
    assert report.collection == f"{ALIAS}_v1" and report.previous is None
    with EmbeddingIndex.connect(settings) as index:
        live = index.live()
        assert live is not None
        assert (live.collection, live.model_version, live.dataset) == (
            f"{ALIAS}_v1",
            1,
            "twitch/ENGB",
        )
        assert live.schema_hash == load_contract(settings, "twitch/ENGB").schema_hash
        assert index.count(live.collection) == len(ids)
        stored = index.get_vectors(live.collection, ids)
        assert len(stored) == len(ids)
        matrix = np.stack([stored[int(u)] for u in ids])
        assert np.abs(matrix - reference).max() <= 1e-5
        assert recall_at(index, reference, ids, k=50, n=200) >= 0.95
        query = exported_models.queries[1][:1]  # a search is made with the query vector
        (hit,) = index.search(ALIAS, query, limit=1)[0]
        best = int(np.argmax(reference @ query[0]))
        assert hit == (ids[best], pytest.approx(float(reference[best] @ query[0]), abs=1e-4))
        [info] = index.versions()
        assert info.live and info.state == "ready" and info.rows == len(ids)


def test_versions_alias_rollback_and_prune(exported_models, tmp_path) -> None:
    base = private_base(exported_models, tmp_path, {1: 1, 2: 2, 3: 1})
    settings = with_base_path(
        with_milvus(exported_models.settings, str(tmp_path / "m.db"), keep_versions=2), base
    )

    def build(version: int, embedded_as: int):
        embedder = ReferenceEmbedder(exported_models, embedded_as)
        return build_index(settings, version, embedder=embedder, show_progress=False)

    build(1, 1)
    second = build(2, 2)
    assert (second.previous, second.pruned) == (f"{ALIAS}_v1", [])
    with EmbeddingIndex.connect(settings) as index:
        assert index.live().model_version == 2
        assert [v.version for v in index.versions()] == [1, 2]
        assert index.rollback_target().version == 1
        stored = index.get_vectors(ALIAS, exported_models.user_ids[:3])
        assert np.allclose(
            stored[int(exported_models.user_ids[0])], exported_models.embeddings[2][0]
        )

        assert index.rollback().model_version == 1
        assert index.live().collection == f"{ALIAS}_v1"
        # v2 was rolled back from: a second rollback does not return to it.
        assert index.rollback_target() is None
        with pytest.raises(EmbeddingIndexError, match="no previous"):
            index.rollback()

    # After "rollback to v1, then build v3", the previous version is v1 (live before v3), not
    # the higher-numbered v2; with keep_versions=2 the bad v2 is the one pruned.
    third = build(3, 1)
    assert (third.previous, third.pruned) == (f"{ALIAS}_v1", [f"{ALIAS}_v2"])
    with EmbeddingIndex.connect(settings) as index:
        roles = {v.version: (v.live, v.rollback_target) for v in index.versions()}
        assert roles == {1: (False, True), 3: (True, False)}
        assert index.prune() == []  # never the live one or the rollback target
        assert index.rollback().model_version == 1

    # The live version cannot be rebuilt; a non-live one is dropped and rebuilt.
    with pytest.raises(EmbeddingIndexError, match="is live"):
        build(1, 1)
    rebuilt = build(3, 2)
    assert rebuilt.previous == f"{ALIAS}_v1"
    with EmbeddingIndex.connect(settings) as index:
        [info] = [v for v in index.versions() if v.version == 3]
        assert info.live and not info.rolled_back_at
        stored = index.get_vectors(ALIAS, exported_models.user_ids[:1])
        assert np.allclose(
            stored[int(exported_models.user_ids[0])], exported_models.embeddings[2][0]
        )


def test_prune_policy_keeps_live_rollback_and_newest(exported_models, tmp_path) -> None:
    settings = with_milvus(exported_models.settings, str(tmp_path / "m.db"), keep_versions=3)
    with EmbeddingIndex.connect(settings) as index:
        for version in (1, 2, 3, 4):
            small_version(index, version)
        building = index.create_version(5, 16, "twitch/ENGB")  # a killed build's leftover
        with pytest.raises(EmbeddingIndexError, match="not complete"):
            index.promote(5)
        with pytest.raises(EmbeddingIndexError, match="model version 4"):
            index.insert(building, [1], np.ones((1, 16), np.float32), 4)
        assert index.prune() == [f"{ALIAS}_v1"]
        assert index.prune(include_incomplete=True) == [building]
        kept = {v.version: (v.live, v.rollback_target) for v in index.versions()}
        assert kept == {2: (False, False), 3: (False, True), 4: (True, False)}
        # The upsert path of streaming refreshes: through the alias, stored as given.
        assert index.upsert(ALIAS, [7], np.full((1, 16), 3.0, np.float32), 4) == 1
        assert np.allclose(index.get_vectors(ALIAS, [7])[7], np.full(16, 3.0))
        with pytest.raises(EmbeddingIndexError, match="different spaces"):
            index.upsert(ALIAS, [7], np.ones((1, 16), np.float32), 3)
        with pytest.raises(EmbeddingIndexError, match=r"\[1, 16\]"):
            index.upsert(ALIAS, [7], np.ones((1, 8), np.float32), 4)
        with pytest.raises(EmbeddingIndexError, match=f"{ALIAS}_v9"):
            index.search(f"{ALIAS}_v9", np.ones((1, 16), np.float32), limit=5)
        with pytest.raises(EmbeddingIndexError, match="does not exist"):
            index.promote(9)


def test_failure_mid_build_leaves_no_partial_collection(exported_models, tmp_path) -> None:
    settings = with_milvus(exported_models.settings, str(tmp_path / "m.db"), build_batch=512)
    with EmbeddingIndex.connect(settings) as index:
        small_version(index, 1)
    embedder = ReferenceEmbedder(exported_models, 2, fail_after=1)
    with pytest.raises(RuntimeError, match="mid-build"):
        build_index(settings, 2, embedder=embedder, show_progress=False)
    assert embedder.calls == 2
    with EmbeddingIndex.connect(settings) as index:
        assert [v.collection for v in index.versions()] == [f"{ALIAS}_v1"]
        assert index.live().collection == f"{ALIAS}_v1"


def test_model_card_of_another_dataset_is_refused(exported_models, tmp_path) -> None:
    base = private_base(exported_models, tmp_path, {1: 1})
    card_path = base / exported_models.settings.serving.model_name / "1" / "model_card.json"
    card = json.loads(card_path.read_text())
    card_path.write_text(json.dumps({**card, "dataset": "twitch/DE"}))
    settings = with_base_path(with_milvus(exported_models.settings, str(tmp_path / "m.db")), base)
    with pytest.raises(IncompatibleModelError, match="twitch/DE"):
        build_index(settings, 1, show_progress=False)
    with pytest.raises(Exception, match="no exported model version 9"):
        build_index(settings, 9, show_progress=False)
    with EmbeddingIndex.connect(settings) as index:
        assert index.versions() == [] and index.live() is None


def test_model_card_of_another_schema_is_refused(exported_models, tmp_path) -> None:
    """A version trained on another schema (its card's schema hash differs from the dataset's
    contract) is refused by the build, and the CLI exits non-zero naming both hashes."""
    base = private_base(exported_models, tmp_path, {1: 1})
    card_path = base / exported_models.settings.serving.model_name / "1" / "model_card.json"
    card = json.loads(card_path.read_text())
    ours = load_contract(exported_models.settings, "twitch/ENGB").schema_hash
    assert card["schema_hash"] == ours and card["feature_service"].endswith(ours)
    assert card["vocab_sha256"] and "views" in card["declared_features"]
    card_path.write_text(json.dumps({**card, "schema_hash": "0ther0schema"}))
    settings = with_base_path(with_milvus(exported_models.settings, str(tmp_path / "m.db")), base)
    with pytest.raises(ContractMismatchError, match=f"'0ther0schema'.*'{ours}'"):
        build_index(settings, 1, show_progress=False)
    env = {
        **os.environ,
        "FRIENDREC_WORKDIR": str(settings.workdir),
        "FRIENDREC_MILVUS__URI": settings.milvus_uri,
        "FRIENDREC_SERVING__MODEL_BASE_PATH": str(base),
        "COLUMNS": "300",
    }
    done = subprocess.run(
        [sys.executable, "-m", "friendrec", "index", "build", "--model-version", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    error = [line for line in (done.stdout + done.stderr).splitlines() if "error:" in line]
    assert len(error) == 1 and "0ther0schema" in error[0] and ours in error[0], error
    with EmbeddingIndex.connect(settings) as index:
        assert index.versions() == [] and index.live() is None


def test_server_mode_build_search_and_dead_milvus(exported_models, tmp_path) -> None:
    ids, reference = exported_models.user_ids, exported_models.embeddings[1]
    server = MilvusLiteProcess(tmp_path / "milvus", log_dir=tmp_path / "logs")
    with server:
        settings = with_milvus(exported_models.settings, server.uri)
        report = build_index(settings, 1, show_progress=False)
        assert report.users == len(ids)
        index = EmbeddingIndex.connect(settings, timeout=3.0)
        try:
            assert index.live().model_version == 1
            assert recall_at(index, reference, ids, k=50, n=100) >= 0.95

            server.stop()
            for call in (index.live, lambda: index.search(ALIAS, reference[:2], limit=5)):
                started = time.perf_counter()
                with pytest.raises(IndexUnavailableError, match=server.uri):
                    call()
                assert time.perf_counter() - started < 5.0
            with pytest.raises(IndexUnavailableError, match=server.uri):
                EmbeddingIndex.connect(settings, timeout=2.0)

            server.start()  # same port, same data; milvus-lite comes back with nothing loaded
            assert index.load_live().collection == f"{ALIAS}_v1"
            assert index.is_loaded(f"{ALIAS}_v1")
            assert index.count(f"{ALIAS}_v1") == len(ids)
            assert recall_at(index, reference, ids, k=50, n=50) >= 0.95
        finally:
            index.close()


def test_a_real_milvus_server_builds_promotes_searches_and_rolls_back(exported_models, tmp_path):
    """The same index code against Milvus 2.3 standalone (PyPI `milvus`), not milvus-lite."""
    ids, reference = exported_models.user_ids, exported_models.embeddings
    server = MilvusStandaloneProcess(tmp_path / "milvus", log_dir=tmp_path / "logs", timeout=120)
    with server:
        settings = with_milvus(exported_models.settings, server.uri)
        build_index(settings, 1, show_progress=False)
        build_index(settings, 2, show_progress=False)
        with EmbeddingIndex.connect(settings, timeout=10.0) as index:
            assert index.live().model_version == 2
            assert recall_at(index, reference[2], ids, k=50, n=50) >= 0.95
            stored = index.get_vectors(f"{ALIAS}_v2", ids[:20])
            np.testing.assert_allclose(
                np.stack([stored[int(u)] for u in ids[:20]]), reference[2][:20], atol=1e-5
            )
            assert index.rollback().model_version == 1
            assert recall_at(index, reference[1], ids, k=50, n=50) >= 0.95


def test_cli_list_and_rollback(exported_models, tmp_path, monkeypatch) -> None:
    from friendrec.cli import app

    settings = with_milvus(exported_models.settings, str(tmp_path / "m.db"))
    with EmbeddingIndex.connect(settings) as index:
        small_version(index, 1)
        small_version(index, 2)
    for key, value in {
        "FRIENDREC_WORKDIR": str(settings.workdir),
        "FRIENDREC_MILVUS__URI": settings.milvus_uri,
        "FRIENDREC_SERVING__MODEL_BASE_PATH": str(exported_models.base_path),
    }.items():
        monkeypatch.setenv(key, value)
    runner = CliRunner()
    listed = runner.invoke(app, ["--log-level", "WARNING", "index", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    assert [(v["version"], v["live"]) for v in json.loads(listed.stdout)] == [(1, False), (2, True)]
    table = runner.invoke(app, ["--log-level", "WARNING", "index", "list"])
    assert table.exit_code == 0 and f"{ALIAS}_v2" in table.stdout
    back = runner.invoke(app, ["--log-level", "WARNING", "index", "rollback"])
    assert back.exit_code == 0, back.output
    assert json.loads(back.stdout)["collection"] == f"{ALIAS}_v1"
    again = runner.invoke(app, ["--log-level", "WARNING", "index", "rollback"])
    assert isinstance(again.exception, EmbeddingIndexError)


def test_ray_build_embeds_over_workers_like_training(
    exported_models, tmp_path, ray_engine, monkeypatch
):
    """The distributed build (one SavedModel per Ray worker, several partitions each) indexes
    what the training code computes; a version whose model cannot load, or that lacks the layer
    signatures, leaves no collection and the alias alone."""
    settings = with_milvus(exported_models.settings, str(tmp_path / "m.db"), build_batch=1000)
    settings = settings.model_copy(
        update={"engine": settings.engine.model_copy(update={"partitions": 4})}
    )
    ids, reference = exported_models.user_ids, exported_models.embeddings[1]
    monkeypatch.setattr(index_build, "PARTITION_USERS", 1500)  # several partitions per worker
    report = build_index(settings, 1, show_progress=False, engine="ray")
    assert (report.engine, report.users, report.unknown_users) == ("ray", len(ids), 0)
    assert report.timings["embed"] > 0 and report.timings["features"] > 0
    with EmbeddingIndex.connect(settings) as index:
        assert index.count(f"{ALIAS}_v1") == len(ids)
        stored = index.get_vectors(f"{ALIAS}_v1", ids)
        matrix = np.stack([stored[int(u)] for u in ids])
        assert np.abs(matrix - reference).max() <= 1e-5

    base = private_base(exported_models, tmp_path, {1: 1, 2: 2, 3: 2})
    name = exported_models.settings.serving.model_name
    (base / name / "2" / "saved_model.pb").write_bytes(b"x")
    broken = with_base_path(settings, base)
    with pytest.raises(Exception, match=r"(?i)saved.?model|pb|protobuf|parse|decode"):
        build_index(broken, 2, show_progress=False, engine="ray")
    # A version exported before the layer signatures: the partitioned build cannot embed it.
    resave_without_layer_signatures(base / name / "3")
    with pytest.raises(IncompatibleModelError, match=r"layer-by-layer signatures.*--engine local"):
        build_index(broken, 3, show_progress=False, engine="ray")
    with EmbeddingIndex.connect(settings) as index:
        live = index.live()
        assert live is not None and live.collection == f"{ALIAS}_v1"
        assert not index.exists(f"{ALIAS}_v2") and not index.exists(f"{ALIAS}_v3")


def resave_without_layer_signatures(version: Path) -> None:
    """The version's SavedModel saved again with ``serving_default`` only, as exports were before
    the layer-by-layer signatures (the model card stays)."""
    import tensorflow as tf

    from training.export import NODE_STATES, READOUT, SIGNATURE

    loaded = tf.saved_model.load(str(version))
    assert {NODE_STATES, READOUT} <= set(loaded.signatures)
    scratch = version.with_name(version.name + ".resaved")
    tf.saved_model.save(loaded, str(scratch), signatures={SIGNATURE: loaded.signatures[SIGNATURE]})
    for item in version.iterdir():  # the model card and any other file that is not the model's
        if not (scratch / item.name).exists():
            shutil.move(item, scratch / item.name)
    shutil.rmtree(version)
    scratch.rename(version)


# ---------------------------------------------------------------------------------------------
# The bulk read against the serving read


def test_column_decoding_matches_the_serving_decoding() -> None:
    """``decode_into`` (numpy over the wire bytes) writes exactly what ``python_value`` and
    ``FeatureTable.from_rows``'s padding make of the same bytes: protobuf's own encodings of
    edge values, other kinds, and layouts protobuf accepts but numpy does not parse."""
    from feast.protos.feast.types.Value_pb2 import DoubleList, FloatList, Int32List, Int64List
    from feast.protos.feast.types.Value_pb2 import Value as V

    from friendrec.feast_read import decode_into
    from friendrec.feast_store import python_value
    from training.features import _pad

    rng = np.random.default_rng(0)

    def ints(n: int) -> list[int]:
        return [int(x) for x in rng.choice([0, -1, 1, 127, 128, 2**62, -(2**63), 2**63 - 1], n)]

    def floats(n: int) -> list[float]:
        picks = [0.0, -0.0, 1.5, -2.25, float("inf"), 3.4e38, 1e-45, float("nan")]
        return [float(np.float32(x)) for x in rng.choice(picks, n)]

    def varint(x: int) -> bytes:
        x &= 2**64 - 1
        out = bytearray()
        while x > 0x7F:
            out.append(x & 0x7F | 0x80)
            x >>= 7
        return bytes([*out, x])

    unpacked = b"".join(b"\x08" + varint(v) for v in (5, -7, 300))
    columns = {  # (dtype, width, fill): blobs
        (np.int64, None, 0): [
            *(V(int64_val=v).SerializeToString() for v in ints(40)),
            V(int32_val=-9).SerializeToString(),
            V(int64_val=1).SerializeToString() + V(int64_val=2).SerializeToString(),
            b"\x20" + b"\xff" * 9 + b"\x7f",  # an over-long varint
        ],
        (np.float32, None, 0.0): [
            *(V(float_val=v).SerializeToString() for v in floats(40)),
            V(double_val=0.1).SerializeToString(),
            V(int64_val=3).SerializeToString(),
        ],
        (np.int64, 6, -1): [
            *(V(int64_list_val=Int64List(val=ints(n))).SerializeToString() for n in range(12)),
            b"\x72" + varint(len(unpacked)) + unpacked,  # unpacked repeated
            b"\x72\x02\x0a\x00",  # an empty packed field
            V(int32_list_val=Int32List(val=[1, -2])).SerializeToString(),
        ],
        (np.float32, 4, 0.0): [
            *(V(float_list_val=FloatList(val=floats(n))).SerializeToString() for n in range(9)),
            V(double_list_val=DoubleList(val=[0.1, 2.0])).SerializeToString(),
            V(int64_list_val=Int64List(val=[1, 2])).SerializeToString(),
        ],
    }
    for (dtype, width, fill), blobs in columns.items():
        blobs = [b"", *blobs]  # an unset value: the row keeps its default
        rows = rng.permutation(len(blobs) + 3)[: len(blobs)]
        shape = (len(blobs) + 3,) if width is None else (len(blobs) + 3, width)
        out = np.full(shape, 7, dtype=dtype)
        expected, present = out.copy(), []
        for row, blob in zip(rows, blobs, strict=True):
            value = python_value(V.FromString(blob))
            present.append(value is not None)
            if value is not None:
                single = np.array(value, dtype=dtype)
                expected[row] = single if width is None else _pad([value], width, fill, dtype)[0]
        assert decode_into(out, rows, blobs, fill).tolist() == present
        np.testing.assert_array_equal(out, expected)


def _value(dtype: str, value) -> Any:
    from feast.protos.feast.types.Value_pb2 import FloatList, Int64List
    from feast.protos.feast.types.Value_pb2 import Value as V

    return {
        "int64": lambda v: V(int64_val=int(v)),
        "float32": lambda v: V(float_val=float(v)),
        "int64_list": lambda v: V(int64_list_val=Int64List(val=[int(x) for x in v])),
        "float32_list": lambda v: V(float_list_val=FloatList(val=[float(x) for x in v])),
    }[dtype](value)


@pytest.fixture(scope="module")
def streamed_store(exported_models, tmp_path_factory):
    """A private copy of the ENGB store as the stream leaves it: user ``new`` created by the
    stream (online rows only, friends: an id the store never saw, ``a``, ``gone``, ``b``), user
    ``bare`` with a profile row only, ``a``'s friends rewritten to start with the unknown id and
    ``new``, and the prepared user ``gone`` without any online row."""
    from datetime import UTC, datetime

    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value as V

    from friendrec.contract import FRIEND_IDS, GRAPH_VIEW, PROFILE_VIEW
    from friendrec.feast_store import online_features, open_store
    from friendrec.paths import DatasetPaths

    source = exported_models.settings
    work = tmp_path_factory.mktemp("streamed") / "work"
    for part in ("data", "feast"):
        shutil.copytree(source.workdir / part, work / part)
    settings = source.model_copy(update={"workdir": work})
    contract = load_contract(settings, "twitch/ENGB")
    store = open_store(settings)
    ids = exported_models.user_ids
    a, b, gone = (int(u) for u in ids[:3])
    new, bare, unknown = int(ids.max()) + 1, int(ids.max()) + 2, int(ids.max()) + 100
    row_a = online_features(store, [a], contract=contract)[0]
    provider = store._get_provider()
    when = datetime.now(UTC)

    def write(view: str, user: int, row: dict) -> None:
        key = EntityKey(join_keys=["user_id"], entity_values=[V(int64_val=user)])
        values = {f.name: _value(f.dtype, row[f.name]) for f in contract.views[view]}
        table = store.get_feature_view(view)
        provider.online_write_batch(store.config, table, [(key, values, when, None)], None)

    write(PROFILE_VIEW, new, row_a)
    write(GRAPH_VIEW, new, {**row_a, FRIEND_IDS.name: [unknown, a, gone, b], "degree": 4})
    write(PROFILE_VIEW, bare, row_a)
    write(GRAPH_VIEW, a, {**row_a, FRIEND_IDS.name: [unknown, new, *row_a[FRIEND_IDS.name]]})
    conn = provider.online_store._get_conn(store.config)
    gone_key = serialize_entity_key(
        EntityKey(join_keys=["user_id"], entity_values=[V(int64_val=gone)]),
        entity_key_serialization_version=store.config.entity_key_serialization_version,
    )
    with conn:
        for view in (PROFILE_VIEW, GRAPH_VIEW):
            table = f"{store.config.project}_{view}"
            conn.execute(f'DELETE FROM "{table}" WHERE entity_key = ?', (gone_key,))
    assert DatasetPaths.of(settings).feast_online_sqlite.is_file()
    return settings, {"a": a, "gone": gone, "new": new, "bare": bare, "unknown": unknown}


def test_bulk_read_gives_the_serving_inputs_and_vectors(streamed_store, exported_models) -> None:
    """Every user's tower inputs from the bulk read (``Population``: one columnar read, batches
    by array indexing) equal the serving read's (``fetch_online_inputs`` per batch) array for
    array, stream-created users, a profile-only user, an unknown friend and a prepared user
    without rows included; so do the SavedModel's vectors. The provider read (any online store)
    and small chunks read the same table."""
    from friendrec import online_users
    from friendrec.feast_store import open_store
    from serving.index_build import input_spec, read_model_card
    from training.features import fetch_online_inputs, read_online_table, tower_inputs

    settings, who = streamed_store
    contract = load_contract(settings, "twitch/ENGB")
    store = open_store(settings)
    online = online_users.online_user_ids(store)
    ids = np.union1d(exported_models.user_ids, online)
    assert {who["new"], who["bare"], who["gone"]} <= set(ids.tolist())
    assert who["unknown"] not in set(ids.tolist())
    spec = input_spec(read_model_card(settings, 1, "twitch/ENGB", contract))

    population = Population.read(store, ids, spec, contract)
    row = {u: i for i, u in enumerate(ids.tolist())}
    assert (~population.known).sum() == 1 and not population.known[row[who["gone"]]]
    # The unknown id and ``gone`` are absent: ``a`` and ``b`` move to the front, in order.
    new_friends = population.table.user_ids[population.neighbours[row[who["new"]]]]
    assert new_friends[:2].tolist() == [who["a"], int(exported_models.user_ids[1])]
    assert (population.neighbours[row[who["new"]], 2:] == -1).all()
    assert population.neighbours[row[who["a"]], 0] == row[who["new"]]

    embedder = LocalEmbedder(version_dir(settings, 1))
    assert embedder.layerwise  # the export's node_states/readout signatures
    batch = 2048
    for lo in range(0, len(ids), batch):
        rows = np.arange(lo, min(lo + batch, len(ids)))
        served, known = fetch_online_inputs(store, ids[rows].tolist(), spec, contract)
        bulk = tower_inputs(population.table, rows, population.neighbours[rows])
        assert served.keys() == bulk.keys()
        for name in served:
            np.testing.assert_array_equal(bulk[name], served[name], err_msg=name)
        np.testing.assert_array_equal(population.known[rows], known)
        reference = embed_users(store, ids[rows], embedder, spec, contract)
        embedded = population.embed(int(rows[0]), int(rows[-1]) + 1, embedder)
        np.testing.assert_array_equal(embedded.user_ids, reference.user_ids)
        np.testing.assert_allclose(embedded.vectors, reference.vectors, rtol=0, atol=1e-6)
        assert embedded.unknown == reference.unknown

    # Layer by layer, partition by partition (out of id order): each user's vector from every
    # partition's states is the serving path's.
    states = np.full((len(ids), exported_models.settings.training.hidden_dim), np.nan, np.float32)
    known_all = np.zeros(len(ids), dtype=bool)
    parts = []
    for rows in partitions(ids, size=1500):
        part, part_states, _, _ = Partition.read(store, ids, rows, spec, contract, embedder, 700)
        np.testing.assert_array_equal(part.user_ids, ids[rows])
        states[rows], known_all[rows] = part_states, part.known
        parts.append(part)
    assert len(parts) > 2 and not np.isnan(states).any()
    np.testing.assert_array_equal(known_all, population.known)
    for part in parts:
        part.link(ids, known_all)
        layered = part.readout(0, len(part.rows), states, embedder)
        reference = embed_users(store, part.user_ids, embedder, spec, contract)
        np.testing.assert_allclose(layered.vectors, reference.vectors, rtol=0, atol=1e-5)
        assert layered.unknown == reference.unknown

    through_provider = read_online_table(store, ids, spec, contract, chunk=700, direct=False)
    np.testing.assert_array_equal(through_provider.known, population.known)
    for name, array in vars(population.table).items():
        if isinstance(array, np.ndarray):
            np.testing.assert_array_equal(getattr(through_provider.table, name), array, name)


@pytest.mark.parametrize("layerwise", [True, False], ids=["layer-by-layer", "per-user"])
def test_build_indexes_stream_created_users_as_served(
    streamed_store, tmp_path, monkeypatch, layerwise
) -> None:
    """The local build over the streamed store: every prepared and stream-created user indexed
    with the serving path's vector, the user without rows counted unknown; layer by layer, and
    per user as for a version exported without the layer signatures."""
    from friendrec.feast_store import open_store
    from serving.index_build import input_spec, read_model_card

    settings, who = streamed_store
    settings = with_milvus(settings, str(tmp_path / "m.db"))
    calls = {"readout": 0, "per_user": 0}
    readout, embed = Partition.readout, Population.embed

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(Partition, "readout", counted("readout", readout))
    monkeypatch.setattr(index_build, "PARTITION_USERS", 2500)  # several partitions
    monkeypatch.setattr(Population, "embed", counted("per_user", embed))
    if not layerwise:
        monkeypatch.setattr(LocalEmbedder, "layerwise", property(lambda self: False))
    report = build_index(settings, 1, show_progress=False)
    assert (calls["readout"] > 0, calls["per_user"] > 0) == (layerwise, not layerwise)
    contract = load_contract(settings, "twitch/ENGB")
    store = open_store(settings)
    spec = input_spec(read_model_card(settings, 1, "twitch/ENGB", contract))
    ids = np.array([who["new"], who["bare"], who["gone"], who["a"]])
    reference = embed_users(store, ids, LocalEmbedder(version_dir(settings, 1)), spec, contract)
    assert report.unknown_users == 1 and report.timings["features"] > 0
    with EmbeddingIndex.connect(settings) as index:
        assert index.count(report.collection) == report.users
        stored = index.get_vectors(report.collection, ids)
    matrix = np.stack([stored[int(u)] for u in ids])
    np.testing.assert_allclose(matrix, reference.vectors, rtol=0, atol=1e-5)
