"""Streaming pieces that need no broker: message schemas, the friend-state store, retry
classification and the benchmark's bucket percentiles."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from contracts import tagged

from friendrec.errors import IndexUnavailableError
from friendrec.friend_sets import FriendState
from streaming.schemas import (
    FriendshipEvent,
    GraphRecompute,
    MessageError,
    ProfileUpdate,
    RefreshRequest,
    UserEmbedding,
    decode,
)
from streaming.worker import Record, Worker, is_transient

ALL = ("friendship.v1", "graph_recompute.v1", "profile.v1", "refresh.v1", "embedding.v1")


@pytest.mark.parametrize(
    "message",
    [
        FriendshipEvent(op="add", user_id=1, friend_id=2, event_ts=10),
        FriendshipEvent(op="remove", user_id=2, friend_id=1, event_ts=11),
        GraphRecompute(user_id=3, origin_ts=5),
        ProfileUpdate(user_id=4, profile={"views": 3.0}, sparse_ids=[1, 2], event_ts=7),
        ProfileUpdate(
            user_id=4,
            profile={"country": "FR", "tags": ["jazz", "new"], "plays": 12, "verified": True},
            event_ts=8,
        ),
        RefreshRequest(user_id=5, origin_ts=9),
        UserEmbedding(user_id=6, model_version=2, vector=[0.5, 0.5], origin_ts=1, computed_at=2),
    ],
)
def test_messages_round_trip_with_their_schema_version_and_user_key(message):
    raw = message.encode()
    assert b'"schema":"' in raw
    assert message.key == str(message.user_id).encode("ascii")
    assert decode(raw, ALL, message.key) == message


def test_a_friendship_is_mirrored_onto_the_other_endpoint():
    event = FriendshipEvent(op="add", user_id=1, friend_id=2, event_ts=10)
    assert event.mirrored() == FriendshipEvent(op="add", user_id=2, friend_id=1, event_ts=10)


@pytest.mark.parametrize(
    ("value", "key", "reason"),
    [
        (None, None, "empty message"),
        (b"\xff\xfe", None, "not JSON"),
        (b"[1, 2]", None, "not a JSON object"),
        (b'{"op": "add"}', None, "schema None is not accepted"),
        (b'{"schema": "friendship.v2"}', None, "schema 'friendship.v2' is not accepted"),
        (b'{"schema": "refresh.v1", "user_id": 1, "origin_ts": 1}', None, "is not accepted"),
        (
            b'{"schema":"friendship.v1","op":"poke","user_id":1,"friend_id":2,"event_ts":1}',
            None,
            "invalid friendship.v1: op:",
        ),
        (
            b'{"schema":"friendship.v1","op":"add","user_id":1,"friend_id":1,"event_ts":1}',
            None,
            "cannot befriend itself",
        ),
        (
            b'{"schema":"friendship.v1","op":"add","user_id":-1,"friend_id":1,"event_ts":1}',
            None,
            "user_id: Input should be greater than or equal to 0",
        ),
        (
            b'{"schema":"friendship.v1","op":"add","user_id":1,"friend_id":2,"event_ts":1,"x":1}',
            None,
            "x: Extra inputs are not permitted",
        ),
        (
            b'{"schema":"profile.v1","user_id":1,"profile":[1],"event_ts":1}',
            None,
            "invalid profile.v1: profile:",
        ),
        (
            b'{"schema":"friendship.v1","op":"add","user_id":1,"friend_id":2,"event_ts":1}',
            b"2",
            "key b'2' is not the message's user_id 1",
        ),
    ],
)
def test_bad_messages_are_rejected_with_a_precise_reason(value, key, reason):
    with pytest.raises(MessageError) as info:
        decode(value, ("friendship.v1", "profile.v1"), key)
    assert reason in str(info.value)


@pytest.fixture(params=["sqlite", "redis"])
def state_factory(request, tmp_path: Path):
    """A factory of handles on ONE friend-set store (each call: another member's handle)."""
    if request.param == "sqlite":
        yield lambda: FriendState(tmp_path / "state.db")
        return
    from friendrec.friend_sets_redis import RedisFriendState, connect
    from friendrec.local_services import redis_server

    with redis_server() as address:
        yield lambda: RedisFriendState(connect(address), "test:state:engb")


def test_friend_state_application_is_idempotent(state_factory):
    state = state_factory()
    state.seed(np.array([1, 1]), np.array([2, 3]), "test", if_empty=True)
    assert state.seeded and state.count() == 4
    # A second member starting on the same store does not seed it again.
    assert state_factory().seed(np.array([7]), np.array([8]), "x", if_empty=True) == 0
    batch = [("add", 1, 4), ("add", 1, 2), ("remove", 1, 3), ("remove", 1, 9)]
    state.apply(batch)
    once = state.friends([1, 2, 3, 4])
    state.apply(batch)  # redelivered after a crash
    assert state.friends([1, 2, 3, 4]) == once == {1: [2, 4], 2: [1], 3: [1], 4: []}
    assert state.degrees([4, 1, 2, 9]) == {4: 0, 1: 2, 2: 1, 9: 0}  # the blend's friend counts
    state.close()
    reopened = state_factory()  # durable, shared by processes
    assert reopened.friends([1]) == {1: [2, 4]} and reopened.count() == 4
    assert reopened.seed(np.array([5]), np.array([6]), "reseed") == 2  # explicit re-seed
    assert reopened.friends([1, 5]) == {1: [], 5: [6]}
    reopened.close()


def test_seeding_in_small_batches_stores_every_friendship(state_factory, monkeypatch):
    """Seeds go in bounded batches (the whole graph at once held ~14 GB at 5M users): with
    batches of 3 rows / 2 users the store holds exactly the graph's friend sets."""
    from friendrec import friend_sets, friend_sets_redis

    monkeypatch.setattr(friend_sets, "SEED_CHUNK", 3)
    monkeypatch.setattr(friend_sets_redis, "SEED_USERS_PER_ROUND_TRIP", 2)
    rng = np.random.default_rng(5)
    src, dst = rng.integers(0, 40, 60), rng.integers(40, 80, 60)  # duplicates included
    state = state_factory()
    assert state.seed(src, dst, "graph") == 120
    want: dict[int, set[int]] = {u: set() for u in range(80)}
    for a, b in zip(src.tolist(), dst.tolist(), strict=True):
        want[a].add(b)
        want[b].add(a)
    got = state.friends(list(range(80)))
    assert {u: set(f) for u, f in got.items()} == want
    assert state.count() == sum(len(f) for f in want.values())
    state.close()


def test_redis_connection_strings_are_feasts():
    from friendrec.friend_sets_redis import connect

    client = connect("redis.example:6380,password=s3cret,db=2")
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["password"], kwargs["db"]) == (
        "redis.example",
        6380,
        "s3cret",
        2,
    )


class _Rpc(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


def test_only_transient_errors_are_retried():
    assert is_transient(IndexUnavailableError("Milvus at x is unavailable"))
    assert is_transient(_Rpc(grpc.StatusCode.UNAVAILABLE))
    assert is_transient(sqlite3.OperationalError("database is locked"))
    assert is_transient(ConnectionError("refused"))
    assert not is_transient(_Rpc(grpc.StatusCode.INVALID_ARGUMENT))
    assert not is_transient(ValueError("bad"))
    assert not is_transient(KeyError("user"))


def test_bucket_percentiles_interpolate_within_a_bucket():
    from bench.streaming import bucket_percentile

    before = [(0.5, 10.0), (1.0, 10.0), (2.0, 10.0), (float("inf"), 10.0)]
    after = [(0.5, 60.0), (1.0, 110.0), (2.0, 110.0), (float("inf"), 110.0)]
    assert bucket_percentile(before, after, 0.5) == pytest.approx(0.5)
    assert bucket_percentile(before, after, 0.75) == pytest.approx(0.75)


def test_cpu_budget_scales_the_measured_cost_to_the_target_rate():
    from bench.streaming import cpu_budget

    budget = cpu_budget({"updater": 3.0, "broker": 1.0}, friendships=2000, rate=1000.0)
    assert budget["cpu_ms_per_friendship"] == {"updater": 1.5, "broker": 0.5}
    assert budget["cpu_ms_per_friendship_total"] == 2.0
    assert budget["cores_needed_at_target"] == 2.0


def test_refresher_inputs_equal_the_serving_feature_path(engb_store):
    """The refresher reads each row once; the tensors must be the serving path's, bit for bit."""
    from friendrec.feast_store import open_store
    from friendrec.paths import load_contract
    from streaming.feast_io import query_inputs
    from training.features import InputSpec, fetch_query_inputs

    store = open_store(engb_store)
    c = load_contract(engb_store)
    spec = InputSpec.from_settings(engb_store, vocab_size=0, fanout=5)
    # Users and some of their own friends in one batch, plus one the store does not know.
    users = [0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 10**12]
    friends = fetch_query_inputs(store, users[:4], spec, contract=c).friend_ids
    users = sorted({*users, *(int(f) for fs in friends for f in fs[:3])})
    want = fetch_query_inputs(store, users, spec, contract=c).inputs
    got = query_inputs(store, users, spec, c)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_the_state_follows_the_online_store(settings, redis_url):
    """sqlite beside a sqlite online store; Redis beside a Redis one (members on many hosts)."""
    from friendrec.data.canonical import prepare
    from friendrec.friend_sets import open_state
    from friendrec.friend_sets_redis import RedisFriendState

    settings = settings.model_copy(
        update={"data": settings.data.model_copy(update={"dataset": "synthetic:200"})}
    )
    meta = prepare(settings, "synthetic:200")
    local = open_state(settings)
    assert isinstance(local, FriendState) and local.count() == 2 * meta.split_counts["train"]
    local.close()
    features = settings.features.model_copy(
        update={"online_store": "redis", "redis_connection_string": redis_url}
    )
    shared = open_state(settings.model_copy(update={"features": features}))
    assert isinstance(shared, RedisFriendState)
    assert shared.count() == 2 * meta.split_counts["train"]
    shared.close()


def test_dead_letter_of_a_huge_message_is_truncated_with_size_and_hash():
    import base64
    import hashlib

    from streaming.redrive import _parse
    from streaming.schemas import DEAD_LETTER_MAX_VALUE, DeadLetter

    huge = b"y" * (2 * 1024 * 1024)
    fields = dict(worker="w", topic="t", partition=0, offset=7, reason="too big", at=1)
    letter = DeadLetter.of(huge, b"42", **fields)
    assert letter.truncated and letter.value_size == len(huge)
    assert letter.value_sha256 == hashlib.sha256(huge).hexdigest()
    assert base64.b64decode(letter.value_b64) == huge[:DEAD_LETTER_MAX_VALUE]
    assert len(letter.encode()) < 1024 * 1024  # fits kafka-python's default max_request_size
    small = DeadLetter.of(b"{}", None, **fields)
    assert not small.truncated and base64.b64decode(small.value_b64) == b"{}"
    # A truncated letter cannot be re-driven: it says where the original is instead.
    with pytest.raises(ValueError, match=r"truncated letter: .* is at t\[0\]@7"):
        _parse(letter.encode())
    assert _parse(small.encode())[2] == b"{}"


def _updater(settings):
    """A feature updater over the hand-made ``tagged`` contract (no store or state is touched)."""
    from streaming.feature_updater import FeatureUpdater

    return FeatureUpdater(settings, store=object(), state=object(), fanout=5, contract=tagged())


@pytest.mark.parametrize(
    ("profile", "reason"),
    [
        ({"favourite_colour": "red"}, "unknown feature(s) ['favourite_colour']"),
        ({"tags": "jazz"}, "tags: expected a list"),
        ({"plays": "many"}, "plays: expected a number"),
        ({"verified": "perhaps"}, "verified: expected a boolean"),
        ({"country": ["FR"]}, "country: expected one value, got a list"),
    ],
)
def test_profile_events_the_contract_refuses_are_named(settings, profile, reason):
    updater = _updater(settings)
    got = updater.invalid(ProfileUpdate(user_id=3, profile=profile, event_ts=1))
    assert got is not None and reason in got and "user 3" in got and tagged().schema_hash in got
    assert updater.invalid(FriendshipEvent(op="add", user_id=1, friend_id=2, event_ts=1)) is None


def test_profile_events_are_encoded_with_the_contract(settings):
    """Raw values -> stored scalars and sparse ids: a new tag goes to its feature's
    out-of-vocabulary id, the other feature's ids are kept, scalars left out keep their value."""
    c = tagged()
    country, tags = c.categoricals_by_name["country"], c.categoricals_by_name["tags"]
    updater = _updater(settings)
    row = {"plays": 7.0, "verified": 0.0, "sparse_ids": country.encode("FR") + tags.encode(["pop"])}
    event = ProfileUpdate(
        user_id=3, profile={"tags": ["jazz", "brand-new"], "verified": "yes"}, event_ts=1
    )
    assert updater.invalid(event) is None
    updater._apply_profile(row, event)
    assert row["plays"] == 7.0 and row["verified"] == 1.0
    assert row["sparse_ids"] == [*country.encode("FR"), *tags.encode(["jazz"]), tags.oov_id]
    # Explicit ids replace the current ones; a categorical given beside them replaces its own.
    both = ProfileUpdate(user_id=3, profile={"country": "DE"}, sparse_ids=[4], event_ts=2)
    updater._apply_profile(row, both)
    assert row["sparse_ids"] == [*country.encode("DE"), 4]


class _Partition:
    def __init__(self, topic: str) -> None:
        self.topic, self.partition = topic, 0


class _Polled:
    def __init__(self, offset: int, message) -> None:
        self.offset, self.key, self.value = offset, message.key, message.encode()


class _Producer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def send(self, topic, key=None, value=None):
        self.sent.append((topic, value))

    def flush(self) -> None:
        pass


class _Consumer:
    def commit(self) -> None:
        pass


def test_the_worker_dead_letters_refused_profile_events_and_applies_the_rest(settings):
    """A profile event the contract refuses goes to the dead-letter topic with the reason; the
    other events of its batch are processed."""
    import json

    from streaming.topics import Topics

    class Refusing:
        name = "feature-updater"

        def __init__(self) -> None:
            self.updater = _updater(settings)
            self.seen: list[int] = []

        def invalid(self, message):
            return self.updater.invalid(message)

        def topics(self):
            return (Topics.of(settings).profiles,)

        def process(self, records: list[Record], send) -> None:
            self.seen += [r.offset for r in records]

        def close(self) -> None:
            pass

    topics = Topics.of(settings)
    events = [
        ProfileUpdate(user_id=1, profile={"plays": 3}, event_ts=1),
        ProfileUpdate(user_id=2, profile={"favourite_colour": "red"}, event_ts=1),
        ProfileUpdate(user_id=3, profile={"tags": ["jazz"]}, event_ts=1),
    ]
    processor = Refusing()
    producer = _Producer()
    polled = {_Partition(topics.profiles): [_Polled(i, e) for i, e in enumerate(events)]}
    worker = Worker(settings, processor)
    worker._batch(_Consumer(), producer, polled)
    assert processor.seen == [0, 2]
    assert worker.stats.dead_letters == 1 and worker.stats.processed == 3
    [(topic, value)] = producer.sent
    letter = json.loads(value)
    assert topic == topics.dead_letters and letter["offset"] == 1
    assert "unknown feature(s) ['favourite_colour']" in letter["reason"]


def test_heartbeat_health_tells_ready_from_starting_and_stalled(settings, tmp_path):
    from streaming.worker import heartbeat_health

    beat = tmp_path / "w.heartbeat"
    s = settings.model_copy(
        update={
            "streaming": settings.streaming.model_copy(
                update={"heartbeat_file": beat, "heartbeat_stale_s": 30.0}
            )
        }
    )
    assert heartbeat_health(s).startswith("starting")
    fields = {"partitions": 2, "processed": 7, "dead_letters": 1}
    beat.write_text(json.dumps({"pid": 11, "time": time.time() - 1, **fields}))
    assert heartbeat_health(s, pid=11).startswith("ready: 2 partitions, 7 processed")
    assert heartbeat_health(s, pid=12).startswith("starting")  # an earlier process's file
    beat.write_text(json.dumps({"pid": 11, "time": time.time() - 31, **fields}))
    assert heartbeat_health(s, pid=11).startswith("stalled")
