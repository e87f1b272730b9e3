"""`friendrec stream redrive` against a real Tansu broker: dead letters go back to their original
topics with their original key and bytes, filters and limits select exactly, a dry run produces
nothing, undecodable records are counted, and the run ends at the topic's state at its start."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from friendrec.config import Settings, load_settings
from friendrec.local_services import TansuProcess, free_port
from streaming.redrive import RedriveFilter, _records_until_now, redrive
from streaming.schemas import DeadLetter, FriendshipEvent, ProfileUpdate
from streaming.topics import Topics, create_topics

pytestmark = pytest.mark.integration

FRIENDSHIPS = "friendrec.friendships"
PROFILES = "friendrec.profiles"
DEAD = "friendrec.dead-letters"
FAILED = "processing failed: IndexUnavailableError('milvus down')"
GOOD_EVENT = FriendshipEvent(op="add", user_id=2, friend_id=9, event_ts=5).encode()
GOOD_PROFILE = ProfileUpdate(user_id=3, event_ts=5).encode()


@dataclass(frozen=True)
class Original:
    topic: str
    key: bytes | None
    value: bytes
    reason: str
    at: int


# name -> the message a worker gave up on; the DLQ also gets two undecodable records.
LETTERS = {
    "bad-json": Original(
        FRIENDSHIPS, b"1", b"\x00not json \xff", "not JSON: Expecting value", 1000
    ),
    "event": Original(FRIENDSHIPS, b"2", GOOD_EVENT, FAILED, 2000),
    "profile": Original(PROFILES, b"3", GOOD_PROFILE, FAILED, 3000),
    "unkeyed": Original(PROFILES, None, b'{"schema":"profile.v9"}', "schema 'profile.v9'", 4000),
    "into-dlq": Original(DEAD, b"5", b"loop", FAILED, 5000),  # never re-produced
}
UNDECODABLE = [b"garbage \xff\x00", b'{"schema": "dead_letter.v1", "worker": "x"}']


def letter(o: Original, offset: int) -> bytes:
    return DeadLetter(
        worker="feature-updater",
        topic=o.topic,
        partition=0,
        offset=offset,
        key_b64=base64.b64encode(o.key).decode() if o.key is not None else None,
        value_b64=base64.b64encode(o.value).decode(),
        reason=o.reason,
        at=o.at,
    ).encode()


@dataclass
class Broker:
    tansu: TansuProcess
    settings: Settings
    tmp: Path


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A fresh broker whose two-partition dead-letter topic holds LETTERS and UNDECODABLE,
    each partition's records produced as ONE batch (Tansu's end offsets then fall short)."""
    with TansuProcess(log_dir=tmp_path) as tansu:
        settings = load_settings(workdir=tmp_path / "work")
        streaming = settings.streaming.model_copy(
            update={
                "bootstrap_servers": tansu.bootstrap_servers,
                "partitions": 2,
                "dlq_partitions": 2,
            }
        )
        settings = settings.model_copy(update={"streaming": streaming})
        create_topics(settings)
        assert Topics.of(settings).dead_letters == DEAD
        records = [letter(o, i) for i, o in enumerate(LETTERS.values())] + UNDECODABLE
        producer = KafkaProducer(bootstrap_servers=tansu.bootstrap_servers, linger_ms=100)
        try:
            for i, value in enumerate(records):
                producer.send(DEAD, key=b"k%d" % i, value=value, partition=i % 2)
            producer.flush()
        finally:
            producer.close()
        yield Broker(tansu, settings, tmp_path)


def read_topic(settings: Settings, topic: str, idle_s: float = 1.0) -> list[tuple]:
    """Every (key, value) of the topic, read until nothing arrived for ``idle_s``."""
    consumer = KafkaConsumer(
        bootstrap_servers=settings.streaming.bootstrap_servers, enable_auto_commit=False
    )
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        out: list[tuple] = []
        last = time.monotonic()
        while time.monotonic() - last < idle_s:
            for records in consumer.poll(timeout_ms=100).values():
                out.extend((m.key, m.value) for m in records)
                last = time.monotonic()
        return out
    finally:
        consumer.close()


def originals(*names: str) -> dict[str, list[tuple]]:
    """What the original topics must hold after redriving ``names``."""
    out: dict[str, list[tuple]] = {FRIENDSHIPS: [], PROFILES: []}
    for name in names:
        o = LETTERS[name]
        out[o.topic].append((o.key, o.value))
    return {topic: sorted(v, key=repr) for topic, v in out.items()}


def on_topics(settings: Settings) -> dict[str, list[tuple]]:
    return {t: sorted(read_topic(settings, t), key=repr) for t in (FRIENDSHIPS, PROFILES)}


def test_redrive_everything_reproduces_original_keys_and_bytes(broker: Broker):
    report = redrive(broker.settings)
    assert report.as_dict() == {
        "dry_run": False,
        "scanned": len(LETTERS) + len(UNDECODABLE),  # every record, also past Tansu's end
        "matched": len(LETTERS),
        "reproduced": {FRIENDSHIPS: 2, PROFILES: 2},
        "reasons": {
            FRIENDSHIPS: {"not JSON: Expecting value": 1, FAILED: 1},
            PROFILES: {FAILED: 1, "schema 'profile.v9'": 1},
        },
        "undecodable": len(UNDECODABLE),
        "unknown_topic": 1,
        "limit_reached": False,
    }
    assert on_topics(broker.settings) == originals("bad-json", "event", "profile", "unkeyed")
    # The letter naming the dead-letter topic was not re-produced into it.
    assert len(read_topic(broker.settings, DEAD)) == len(LETTERS) + len(UNDECODABLE)


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        (RedriveFilter(reason="processing failed"), ("event", "profile")),
        (RedriveFilter(source_topic=PROFILES), ("profile", "unkeyed")),
        (RedriveFilter(reason="processing failed", source_topic=PROFILES), ("profile",)),
        (RedriveFilter(since_ms=3000), ("profile", "unkeyed")),
        (RedriveFilter(reason="no such reason"), ()),
        (RedriveFilter(source_topic="friendrec.friendship"), ()),  # exact, not a prefix
    ],
)
def test_filters_select_exactly(broker: Broker, filters: RedriveFilter, expected: tuple):
    report = redrive(broker.settings, filters)
    assert report.scanned == len(LETTERS) + len(UNDECODABLE)
    assert report.undecodable == len(UNDECODABLE)
    assert sum(report.selected.values()) == len(expected)
    assert on_topics(broker.settings) == originals(*expected)


def test_filters_leave_the_rest_for_a_later_run(broker: Broker):
    first = redrive(broker.settings, RedriveFilter(source_topic=FRIENDSHIPS))
    second = redrive(broker.settings, RedriveFilter(source_topic=PROFILES))
    assert first.per_topic() == {FRIENDSHIPS: 2} and second.per_topic() == {PROFILES: 2}
    assert on_topics(broker.settings) == originals("bad-json", "event", "profile", "unkeyed")


def test_dry_run_counts_and_produces_nothing(broker: Broker):
    report = redrive(broker.settings, RedriveFilter(reason="processing failed"), dry_run=True)
    result = report.as_dict()
    assert result["would_reproduce"] == {FRIENDSHIPS: 1, PROFILES: 1} and "reproduced" not in result
    assert result["reasons"] == {FRIENDSHIPS: {FAILED: 1}, PROFILES: {FAILED: 1}}
    assert on_topics(broker.settings) == originals()


def test_limit_stops_after_n_reproduced(broker: Broker):
    report = redrive(broker.settings, limit=3)
    assert report.limit_reached and sum(report.selected.values()) == 3
    got = on_topics(broker.settings)
    assert sum(len(v) for v in got.values()) == 3
    every = originals("bad-json", "event", "profile", "unkeyed")
    assert all(kv in every[topic] for topic, kvs in got.items() for kv in kvs)


def test_reading_stops_at_the_topic_as_it_stood_at_the_start(broker: Broker):
    """Dead letters produced during the run (its own re-produced messages failing again) are
    left for a later run, so the run ends even while the cause is not fixed."""
    consumer = KafkaConsumer(
        bootstrap_servers=broker.tansu.bootstrap_servers, enable_auto_commit=False
    )
    try:
        tps = [TopicPartition(DEAD, p) for p in (0, 1)]
        records = _records_until_now(consumer, tps)
        seen = [next(records)[1].value]
        time.sleep(0.01)
        producer = KafkaProducer(bootstrap_servers=broker.tansu.bootstrap_servers)
        try:
            for p in (0, 1):
                producer.send(DEAD, value=b"new %d" % p, partition=p)
            producer.flush()
        finally:
            producer.close()
        seen.extend(m.value for _, m in records)
    finally:
        consumer.close()
    assert len(seen) == len(LETTERS) + len(UNDECODABLE)
    assert not any(v.startswith(b"new") for v in seen)


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "friendrec", *args],
        env={**os.environ, "COLUMNS": "200", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_redrive_and_unreachable_broker(broker: Broker):
    env = {
        "FRIENDREC_WORKDIR": str(broker.tmp / "work"),
        "FRIENDREC_STREAMING__BOOTSTRAP_SERVERS": broker.tansu.bootstrap_servers,
    }
    proc = run_cli("stream", "redrive", "--source-topic", FRIENDSHIPS, "--limit", "5", env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["reproduced"] == {FRIENDSHIPS: 2} and result["undecodable"] == 2
    assert on_topics(broker.settings) == originals("bad-json", "event")

    down = f"127.0.0.1:{free_port()}"
    env["FRIENDREC_STREAMING__BOOTSTRAP_SERVERS"] = down
    proc = run_cli("stream", "redrive", "--connect-timeout", "1", env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert f"cannot reach the Kafka broker at {down}" in proc.stderr
