"""The streaming chain against real services: a Tansu broker (Kafka protocol), a private ENGB
Feast store (sqlite), our TF Serving server (a subprocess), a milvus-lite server (a subprocess)
and the three workers (threads here; a subprocess where it must be killed)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client import REGISTRY
from tiny_models import ExportedModels, export_untrained_versions

from friendrec import contract
from friendrec.config import Settings, load_settings
from friendrec.feast_store import online_features, open_store
from friendrec.friend_sets import open_state
from friendrec.local_services import MilvusLiteProcess, TansuProcess, TFServingProcess, free_port
from friendrec.paths import load_contract
from serving.index import EmbeddingIndex
from serving.index_build import LocalEmbedder, build_index, version_dir
from streaming.feature_updater import FeatureUpdater
from streaming.milvus_sink import MilvusSink
from streaming.refresher import EmbeddingRefresher
from streaming.replay import held_out_pairs, replay
from streaming.schemas import DeadLetter, FriendshipEvent, ProfileUpdate, UserEmbedding
from streaming.topics import Topics
from streaming.worker import Worker

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parent.parent
DATASET = "twitch/ENGB"


def _with(settings: Settings, section: str, **updates) -> Settings:
    return settings.model_copy(
        update={section: getattr(settings, section).model_copy(update=updates)}
    )


@dataclass
class Running:
    worker: Worker
    thread: threading.Thread

    def stop(self) -> None:
        self.worker.stop()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), f"{self.worker.name} did not stop"


def start_worker(worker: Worker, wait: bool = True) -> Running:
    thread = threading.Thread(target=worker.run, name=worker.name, daemon=True)
    thread.start()
    if wait:
        assert worker.ready.wait(30), f"{worker.name} got no partitions"
    return Running(worker, thread)


@dataclass
class Stack:
    settings: Settings
    models: ExportedModels
    milvus: MilvusLiteProcess
    tfserving: TFServingProcess
    tansu: TansuProcess
    workers: dict[str, Running] = field(default_factory=dict)
    used: set[int] = field(default_factory=set)  # users touched by earlier tests
    streamed: list[tuple[int, int]] = field(default_factory=list)  # friendships added so far
    profiles: dict[int, dict[str, float]] = field(default_factory=dict)  # profile changes so far

    def store(self):
        return open_store(self.settings)

    @property
    def contract(self) -> contract.Contract:
        return load_contract(self.settings)

    def online(self, users: list[int], refs: list[str] | None = None) -> list[dict]:
        return online_features(self.store(), users, refs, contract=self.contract)

    def index(self) -> EmbeddingIndex:
        return EmbeddingIndex.connect(self.settings)

    def fresh_pairs(self, n: int, skip: int = 0) -> np.ndarray:
        """Held-out friendships between users no earlier test touched."""
        out = []
        for u, v in held_out_pairs(self.settings)[skip:].tolist():
            if u not in self.used and v not in self.used:
                out.append((u, v))
                self.used.update((u, v))
            if len(out) == n:
                break
        return np.array(out, dtype=np.int64)

    def add(self, pairs: np.ndarray) -> None:
        """Stream friendships (and remember them for the from-scratch recomputation)."""
        self.streamed.extend(map(tuple, pairs.tolist()))
        replay(self.settings, pairs, show_progress=False)

    def all_streamed(self) -> np.ndarray:
        return np.array(self.streamed, dtype=np.int64).reshape(-1, 2)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A private ENGB store (the streaming tests write to it) and every service of the chain."""
    from feature_repo.jobs.graph_features import build_features
    from feature_repo.jobs.materialize import apply, materialize
    from friendrec.data.canonical import prepare

    work = tmp_path_factory.mktemp("streaming")
    settings = load_settings(workdir=work / "work")
    prepare(settings, DATASET)
    build_features(settings, DATASET, show_progress=False)
    apply(settings, DATASET)
    materialize(settings, DATASET)
    models = export_untrained_versions(settings, work / "models", seeds=(1,))
    settings = models.settings
    milvus = MilvusLiteProcess(work / "milvus", free_port(), log_dir=work)
    tansu = TansuProcess(log_dir=work)
    tfserving = None
    stack = None
    try:
        milvus.start()
        tansu.start()
        settings = _with(settings, "milvus", uri=milvus.uri)
        settings = _with(settings, "tfserving", port=free_port(), poll_seconds=0.2)
        settings = _with(settings, "serving", metrics_port=0, alias_refresh_s=0.2)
        settings = _with(
            settings,
            "streaming",
            bootstrap_servers=tansu.bootstrap_servers,
            max_records=200,
            sink_flush_rows=4,  # small, so that the tests' few refreshes exercise the flushes
        )
        tfserving = TFServingProcess(settings, settings.tfserving.port, log_dir=work)
        tfserving.start()
        build_index(settings, model_version=1, show_progress=False)
        stack = Stack(settings, models, milvus, tfserving, tansu)
        for processor in (FeatureUpdater(settings), EmbeddingRefresher(settings)):
            stack.workers[processor.name] = start_worker(Worker(settings, processor))
        sink = MilvusSink(settings)
        stack.workers[sink.name] = start_worker(Worker(settings, sink))
        yield stack
    finally:
        if stack is not None:
            for running in stack.workers.values():
                running.stop()
        if tfserving is not None:
            tfserving.stop()
        tansu.stop()
        milvus.stop()


def wait_for(what: str, check: Callable[[], bool], timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def batch_graph_rows(
    settings: Settings, extra: np.ndarray, profiles: dict[int, dict[str, float]] | None = None
) -> dict[int, dict]:
    """Graph features recomputed FROM SCRATCH by the batch job over the training graph plus the
    ``extra`` friendships (and with ``profiles`` changed): what the online store must hold after
    streaming them."""
    from feature_repo.jobs.graph_features import compute_graph_features
    from friendrec.data.canonical import SPLITS, load_prepared
    from friendrec.paths import DatasetPaths

    data = load_prepared(DatasetPaths.of(settings))
    if profiles:
        profile = data.profile.copy()
        for user, values in profiles.items():
            row = data.index_of(np.array([user]))[0]
            for name, value in values.items():
                profile[row, data.contract.profile_scalar_names.index(name)] = value
        data = replace(data, profile=profile)
    cutoff = data.meta.train_cutoff_ts
    src = np.concatenate([data.src, extra[:, 0]])
    dst = np.concatenate([data.dst, extra[:, 1]])
    created = np.concatenate([data.created_ts, np.full(len(extra), cutoff)])
    split = np.concatenate([data.split, np.full(len(extra), SPLITS.index("train"), np.int8)])
    data = replace(data, src=src, dst=dst, created_ts=created, split=split)
    g = compute_graph_features(data, cutoff, settings, show_progress=False)
    table = g.to_table(cutoff).to_pylist()
    return {row[contract.JOIN_KEY]: row for row in table}


def assert_online_equals_batch(stack: Stack, users: list[int], expected: dict[int, dict]) -> None:
    rows = stack.online(users, stack.contract.feature_refs(contract.GRAPH_VIEW))
    for row in rows:
        want = expected[row[contract.JOIN_KEY]]
        for name in (contract.DEGREE.name, contract.FRIEND_IDS.name, contract.NBR_SPARSE_IDS.name):
            assert list(np.atleast_1d(row[name])) == list(np.atleast_1d(want[name])), (
                row[contract.JOIN_KEY],
                name,
            )
        for name in (contract.NBR_SPARSE_WEIGHTS.name, stack.contract.nbr_profile_mean.name):
            np.testing.assert_allclose(row[name], want[name], atol=1e-6)


def model_embeddings(stack: Stack, users: list[int]) -> np.ndarray:
    """What the exported model computes, in-process, on the users' current online features."""
    from serving.index_build import input_spec, read_model_card
    from training.features import fetch_online_inputs

    spec = input_spec(read_model_card(stack.settings, 1, DATASET, stack.contract))
    inputs, _ = fetch_online_inputs(stack.store(), users, spec, stack.contract)
    return LocalEmbedder(version_dir(stack.settings, 1))(inputs)


def milvus_matches_model(stack: Stack, users: list[int]) -> bool:
    with stack.index() as index:
        stored = index.get_vectors(index.alias, users)
    want = model_embeddings(stack, users)
    return all(
        u in stored and np.abs(stored[u] - want[i]).max() <= 1e-5 for i, u in enumerate(users)
    )


def degrees(stack: Stack, users: list[int]) -> dict[int, int]:
    refs = [f"{contract.GRAPH_VIEW}:{contract.DEGREE.name}"]
    return {r["user_id"]: r["degree"] for r in stack.online(users, refs)}


def dependents(stack: Stack, changed: set[int], fanout: int) -> list[int]:
    """Users whose first ``fanout`` sampled friends include a changed user."""
    state = open_state(stack.settings)
    try:
        candidates = sorted({f for fs in state.friends(sorted(changed)).values() for f in fs})
    finally:
        state.close()
    refs = [f"{contract.GRAPH_VIEW}:{contract.FRIEND_IDS.name}"]
    return [
        r["user_id"]
        for r in stack.online(candidates, refs)
        if set(r["friend_ids"][:fanout]) & changed
    ]


def test_new_friendship_refreshes_embedding_to_what_the_model_computes(stack: Stack):
    from serving.client import RecommenderClient, recommend_request
    from serving.service import start_service

    ((u, v),) = stack.fresh_pairs(1).tolist()
    before = degrees(stack, [u, v])
    with stack.index() as index:
        old = index.get_vectors(index.alias, [u])[u]
    stack.add(np.array([[u, v]]))

    wait_for(
        "the online degrees", lambda: degrees(stack, [u, v]) == {u: before[u] + 1, v: before[v] + 1}
    )
    # The online rows equal the batch job's rows recomputed from scratch with the new edge.
    expected = batch_graph_rows(stack.settings, stack.all_streamed(), stack.profiles)
    affected = {u, v}
    fanout = stack.models.settings.training.fanout
    neighbours = [int(f) for f in expected[u][contract.FRIEND_IDS.name][:fanout]]
    assert_online_equals_batch(stack, sorted(affected | set(neighbours)), expected)
    # Milvus holds exactly what the exported model computes on those features, for the two
    # endpoints and for every user whose second layer reads one of them.
    users = sorted(affected | set(dependents(stack, affected, fanout)))
    wait_for("fresh embeddings in Milvus", lambda: milvus_matches_model(stack, users))
    with stack.index() as index:
        new = index.get_vectors(index.alias, [u])[u]
        top = index.search(index.alias, new, 1, filter=f"user_id in [{u}]")[0][0]
    assert np.abs(new - old).max() > 1e-4  # it really changed
    assert top[0] == u and top[1] == pytest.approx(float(new @ new), abs=1e-4)  # searchable
    # Freshness (event time -> upserted) and events were measured on the way.
    assert REGISTRY.get_sample_value("friendrec_stream_freshness_seconds_count") >= 2
    events = {"worker": "feature-updater", "topic": Topics.of(stack.settings).friendships}
    assert REGISTRY.get_sample_value("friendrec_stream_events_total", events) >= 2

    # Recommend reflects it: v is now a friend (excluded), and the scores are inner products of
    # u's refreshed query vector (its index vector with 1 for the popularity term) with the
    # stored ones.
    service = start_service(stack.settings, port=0, probe_seconds=0.2)
    try:
        with RecommenderClient(stack.settings, f"127.0.0.1:{service.port}") as client:
            response = client.recommend(recommend_request(u, 20, source="embedding"))
    finally:
        service.stop(grace=None)
    ids = [c.user_id for c in response.candidates]
    assert v not in ids and len(ids) == 20
    with stack.index() as index:
        stored = index.get_vectors(index.alias, ids)
    query = np.concatenate([new[:-1], [1.0]]).astype(np.float32)
    want = np.array([stored[i] @ query for i in ids])
    np.testing.assert_allclose([c.score for c in response.candidates], want, atol=1e-4)
    # The sink sealed what it upserted (sink_flush_rows=4 here): searches never scan a growing
    # segment for long.
    assert stack.workers["milvus-sink"].worker.processor.flushes >= 1


def read_dead_letters(stack: Stack, count: int, timeout: float = 30.0) -> list[DeadLetter]:
    topic = Topics.of(stack.settings).dead_letters
    consumer = KafkaConsumer(
        bootstrap_servers=stack.settings.streaming.bootstrap_servers, enable_auto_commit=False
    )
    try:
        partitions = [
            TopicPartition(topic, p) for p in range(stack.settings.streaming.dlq_partitions)
        ]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        letters: list[DeadLetter] = []
        deadline = time.monotonic() + timeout
        while len(letters) < count and time.monotonic() < deadline:
            for messages in consumer.poll(timeout_ms=200).values():
                letters.extend(DeadLetter.model_validate_json(m.value) for m in messages)
        return letters
    finally:
        consumer.close()


def test_poison_messages_go_to_the_dead_letter_topic_and_the_rest_is_processed(stack: Stack):
    ((a, b),) = stack.fresh_pairs(1).tolist()
    before = degrees(stack, [a, b])
    topic, profiles = Topics.of(stack.settings).friendships, Topics.of(stack.settings).profiles
    good = FriendshipEvent(op="add", user_id=a, friend_id=b, event_ts=int(time.time() * 1000))
    poison = [
        (str(a).encode(), b"\x00not json"),
        (str(a).encode(), b'{"schema": "friendship.v9", "user_id": 1}'),
        (
            str(a).encode(),
            b'{"schema":"friendship.v1","op":"add","user_id":%d,"friend_id":%d,"event_ts":1}'
            % (a, a),
        ),
        (b"12345", good.encode()),  # key is not the user
        # ~2 MB: its dead letter must not exceed the producer's 1 MiB request size (it used to,
        # and the worker died on this offset at every restart).
        (str(a).encode(), b'{"schema":"friendship.v1","pad":"' + b"x" * 2_000_000 + b'"}'),
    ]
    producer = KafkaProducer(
        bootstrap_servers=stack.settings.streaming.bootstrap_servers, max_request_size=4 << 20
    )
    try:
        for key, value in poison[:2]:
            producer.send(topic, key=key, value=value)
        producer.send(topic, key=good.key, value=good.encode())
        for key, value in poison[2:]:
            producer.send(topic, key=key, value=value)
        mirrored = good.mirrored()
        producer.send(topic, key=mirrored.key, value=mirrored.encode())
        # A profile event the dataset's contract refuses (decodes fine: the schema is generic).
        unknown = ProfileUpdate(user_id=a, profile={"favourite_colour": "red"}, event_ts=1)
        producer.send(profiles, key=unknown.key, value=unknown.encode())
        producer.flush()
    finally:
        producer.close()
    stack.streamed.append((a, b))

    everything = read_dead_letters(stack, 6)
    (refused,) = [letter for letter in everything if letter.topic == profiles]
    assert "unknown feature(s) ['favourite_colour']" in refused.reason
    assert stack.contract.schema_hash in refused.reason
    letters = [letter for letter in everything if letter.topic != profiles]
    reasons = sorted(letter.reason for letter in letters)
    assert len(letters) == 5, reasons
    (big,) = [letter for letter in letters if letter.truncated]
    assert big.value_size == len(poison[-1][1])
    assert big.value_sha256 == hashlib.sha256(poison[-1][1]).hexdigest()
    assert stack.workers["feature-updater"].thread.is_alive()
    assert any(r.startswith("not JSON") for r in reasons)
    assert any("schema 'friendship.v9' is not accepted" in r for r in reasons)
    assert any("cannot befriend itself" in r for r in reasons)
    assert any("is not the message's user_id" in r for r in reasons)
    assert all(letter.topic == topic and letter.worker == "feature-updater" for letter in letters)
    wait_for(
        "the good event", lambda: degrees(stack, [a, b]) == {a: before[a] + 1, b: before[b] + 1}
    )
    wait_for("its embeddings", lambda: milvus_matches_model(stack, [a, b]))


def test_two_members_of_one_group_share_the_partitions(stack: Stack):
    first = stack.workers["embedding-refresher"].worker
    second = start_worker(Worker(stack.settings, EmbeddingRefresher(stack.settings)), wait=False)
    try:
        partitions = stack.settings.streaming.partitions

        def shared() -> bool:
            a, b = first.stats.assignment, second.worker.stats.assignment
            return bool(a) and bool(b) and not (a & b) and len(a | b) == partitions

        wait_for("a rebalance over two members", shared, timeout=60)
        ((u, v),) = stack.fresh_pairs(1).tolist()
        stack.add(np.array([[u, v]]))
        wait_for("embeddings via the two-member group", lambda: milvus_matches_model(stack, [u, v]))
        # Each member reports the lag of the partitions it owns (every few seconds).
        topic = Topics.of(stack.settings).friendships

        def lag_reported() -> bool:
            labels = [
                {"worker": "feature-updater", "topic": topic, "partition": str(p)}
                for p in range(partitions)
            ]
            values = [REGISTRY.get_sample_value("friendrec_stream_consumer_lag", x) for x in labels]
            return all(v is not None and v >= 0 for v in values)

        wait_for("the consumer-lag gauges", lag_reported, timeout=15)
    finally:
        second.stop()


def remove_and_update_profile(
    stack: Stack, pair: tuple[int, int], user: int, profile: dict[str, float]
) -> None:
    """Stream the removal of ``pair`` (both directions) and a profile update of ``user``; wait
    until the online store shows both."""
    u, v = pair
    before = degrees(stack, [u, v])
    now = int(time.time() * 1000)
    topics = Topics.of(stack.settings)
    removal = FriendshipEvent(op="remove", user_id=u, friend_id=v, event_ts=now)
    update = ProfileUpdate(user_id=user, profile=profile, event_ts=now)
    producer = KafkaProducer(bootstrap_servers=stack.settings.streaming.bootstrap_servers)
    try:
        for message in (removal, removal.mirrored()):
            producer.send(topics.friendships, key=message.key, value=message.encode())
        producer.send(topics.profiles, key=update.key, value=update.encode())
        producer.flush()
    finally:
        producer.close()
    stack.streamed.remove((u, v))
    stack.profiles[user] = dict(profile)

    def profile_applied() -> bool:
        refs = stack.contract.feature_refs(contract.PROFILE_VIEW)
        row = stack.online([user], refs)[0]
        return all(row[name] == value for name, value in profile.items())

    wait_for("the removal", lambda: degrees(stack, [u, v]) == {u: before[u] - 1, v: before[v] - 1})
    wait_for("the profile update", profile_applied)


def test_removals_and_profile_updates_reach_features_and_embeddings(stack: Stack):
    (u, v), (p, _) = stack.fresh_pairs(2).tolist()
    initial = degrees(stack, [u, v])
    stack.add(np.array([[u, v]]))
    # Both sides: the mirror is keyed by v, another partition, possibly a later batch.
    wait_for("the add", lambda: degrees(stack, [u, v]) == {w: initial[w] + 1 for w in (u, v)})
    remove_and_update_profile(stack, (u, v), p, {"views": 12345.0, "is_partner": 1.0})
    expected = batch_graph_rows(stack.settings, stack.all_streamed(), stack.profiles)
    state = open_state(stack.settings)
    try:
        friends_of_p = state.friends([p])[p]
    finally:
        state.close()
    users = sorted({u, v, p, *friends_of_p})
    # p's friends' aggregates include p's new profile (recomputed in their own partitions).
    wait_for("the friends' rows", lambda: _rows_match(stack, users, expected))
    fanout = stack.models.settings.training.fanout
    users = sorted(set(users) | set(dependents(stack, {u, v, p, *friends_of_p}, fanout)))
    wait_for("their embeddings", lambda: milvus_matches_model(stack, users))


def test_embeddings_of_a_version_that_is_not_live_are_dropped(stack: Stack):
    sink = stack.workers["milvus-sink"].worker
    processor = sink.processor
    user = int(stack.models.user_ids[7])
    with stack.index() as index:
        old = index.get_vectors(index.alias, [user])[user]
    stale = UserEmbedding(
        user_id=user, model_version=99, vector=[1.0] * len(old), origin_ts=1, computed_at=1
    )
    producer = KafkaProducer(bootstrap_servers=stack.settings.streaming.bootstrap_servers)
    try:
        producer.send(Topics.of(stack.settings).embeddings, key=stale.key, value=stale.encode())
        producer.flush()
    finally:
        producer.close()
    dropped = processor.dropped
    labels = {"worker": "milvus-sink", "reason": "model_version_not_live"}
    counted = REGISTRY.get_sample_value("friendrec_stream_dropped_total", labels) or 0.0
    wait_for("the drop", lambda: processor.dropped > dropped)
    assert REGISTRY.get_sample_value("friendrec_stream_dropped_total", labels) == counted + 1
    with stack.index() as index:
        np.testing.assert_array_equal(index.get_vectors(index.alias, [user])[user], old)


def test_milvus_down_is_retried_and_nothing_is_lost(stack: Stack):
    ((u, v),) = stack.fresh_pairs(1).tolist()
    # Both the refresher (which version is live?) and the sink (upsert) need Milvus.
    workers = [stack.workers[n].worker for n in ("embedding-refresher", "milvus-sink")]

    def retries() -> int:
        return sum(w.stats.retries for w in workers)

    before = retries()
    stack.milvus.stop()
    try:
        stack.add(np.array([[u, v]]))
        wait_for("a retry", lambda: retries() > before)
        time.sleep(1.0)  # a few more retries against the dead server
    finally:
        stack.milvus.start()  # same port, same data
    wait_for("the embeddings after Milvus came back", lambda: milvus_matches_model(stack, [u, v]))


def _config_file(settings: Settings, path: Path, **streaming) -> Path:
    cfg = settings.model_dump(mode="json", exclude_none=True)
    cfg["streaming"].update(streaming)
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_sigkill_mid_batch_then_restart_loses_nothing(stack: Stack, tmp_path: Path):
    stack.workers.pop("feature-updater").stop()  # the subprocess takes over its partitions
    config = _config_file(stack.settings, tmp_path / "config.yaml", max_records=20)
    env = {**os.environ, "FRIENDREC_CONFIG": str(config), "COLUMNS": "200"}
    command = [sys.executable, "-m", "friendrec", "stream", "feature-updater"]
    log_path = tmp_path / "updater.log"

    def start() -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as out:
            return subprocess.Popen(
                command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT
            )

    pairs = stack.fresh_pairs(150)
    state = open_state(stack.settings)
    base = state.count()
    proc = start()
    try:
        stack.add(pairs)
        wait_for("the first batches", lambda: state.count() >= base + 40, timeout=60)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        applied = state.count() - base
        assert applied < 2 * len(pairs), "killed too late: everything was already applied"
        proc = start()
        wait_for("every friendship", lambda: state.count() == base + 2 * len(pairs), timeout=90)
        users = sorted(set(pairs.ravel().tolist()))
        expected = batch_graph_rows(stack.settings, stack.all_streamed(), stack.profiles)
        wait_for(
            "every online row",
            lambda: _rows_match(stack, users, expected),
            timeout=60,
        )
        wait_for("every embedding", lambda: milvus_matches_model(stack, users), timeout=60)
        proc.send_signal(signal.SIGTERM)  # graceful: finishes its batch, commits, exits 0
        assert proc.wait(timeout=30) == 0, log_path.read_text()[-3000:]
    finally:
        state.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _rows_match(stack: Stack, users: list[int], expected: dict[int, dict]) -> bool:
    try:
        assert_online_equals_batch(stack, users, expected)
        return True
    except AssertionError:
        return False
