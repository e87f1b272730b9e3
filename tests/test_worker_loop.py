"""The worker loop against a real Tansu broker: its batch linger (events that trickle in are
gathered into one batch when the worker lingers, processed as they come when it does not) and the
end offsets its lag (and the streaming benchmark's drain check) are computed from."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import RebalanceInProgressError

from friendrec.config import Settings, load_settings
from friendrec.local_services import TansuProcess
from streaming.schemas import FriendshipEvent
from streaming.topics import Topics, create_topics, end_offsets
from streaming.worker import Record, Worker

pytestmark = pytest.mark.integration
WORKER = "feature-updater"  # a name the settings know; the processor below is ours


class Recording:
    """A processor that only remembers its batches (the worker loop is what is under test)."""

    name = WORKER

    def __init__(self, settings: Settings) -> None:
        self.topic = Topics.of(settings).friendships
        self.batches: list[list[int]] = []

    def topics(self) -> tuple[str, ...]:
        return (self.topic,)

    def process(self, records: Sequence[Record], send: Callable[[str, Any], None]) -> None:
        self.batches.append([r.message.friend_id for r in records])

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TansuProcess]:
    with TansuProcess(log_dir=tmp_path_factory.mktemp("tansu")) as tansu:
        yield tansu


def _batches(broker: TansuProcess, tmp_path: Path, linger_ms: int, prefix: str) -> list[list[int]]:
    """Ten events 40 ms apart through a worker lingering ``linger_ms``; its batches."""
    settings = load_settings(
        workdir=tmp_path,
        streaming={
            "bootstrap_servers": broker.bootstrap_servers,
            "topic_prefix": prefix,
            "group_prefix": prefix,
            "partitions": 1,
            "batch_linger_ms": {WORKER: linger_ms},
        },
    )
    create_topics(settings)
    processor = Recording(settings)
    worker = Worker(settings, processor)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        assert worker.ready.wait(30), "the worker got no partition"
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers)
        for i in range(10):
            event = FriendshipEvent(
                op="add", user_id=100, friend_id=i, event_ts=int(time.time() * 1e3)
            )
            producer.send(processor.topic, key=event.key, value=event.encode())
            producer.flush()
            time.sleep(0.04)
        producer.close()
        deadline = time.monotonic() + 30
        while sum(map(len, processor.batches)) < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        worker.stop()
        thread.join(30)
    assert [f for batch in processor.batches for f in batch] == list(range(10))  # order kept
    return processor.batches


def test_a_lingering_worker_gathers_trickling_events_into_one_batch(broker, tmp_path):
    assert len(_batches(broker, tmp_path / "a", linger_ms=3000, prefix="linger")) == 1


def test_without_linger_events_are_processed_as_they_come(broker, tmp_path):
    assert len(_batches(broker, tmp_path / "b", linger_ms=0, prefix="eager")) >= 3


def test_end_offsets_are_the_true_high_watermark(broker):
    """Tansu's ListOffsets answers 1 + the first offset of the last batch; ours must not."""
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
    admin.create_topics([NewTopic("ends", num_partitions=2, replication_factor=1)])
    admin.close()
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, linger_ms=50)
    for batch in (100, 7):  # two record batches on partition 0; partition 1 stays empty
        for i in range(batch):
            producer.send("ends", value=b"%d" % i, partition=0)
        producer.flush()
    producer.close()
    reader = KafkaConsumer(bootstrap_servers=broker.bootstrap_servers, enable_auto_commit=False)
    try:
        p0, p1 = TopicPartition("ends", 0), TopicPartition("ends", 1)
        assert end_offsets(reader, [p0, p1]) == {p0: 107, p1: 0}
    finally:
        reader.close()


def test_a_failed_commit_neither_stops_the_worker_nor_loses_events(broker, tmp_path, monkeypatch):
    """A commit refused mid-rebalance (injected once) is logged; later commits cover the batch."""
    commits = []
    real_commit = KafkaConsumer.commit

    def commit_refused_once(self, *args, **kwargs):
        commits.append(len(commits))
        if len(commits) == 1:
            raise RebalanceInProgressError("injected: the group is rebalancing")
        return real_commit(self, *args, **kwargs)

    monkeypatch.setattr(KafkaConsumer, "commit", commit_refused_once)
    # All ten events are processed in order: the worker outlived the refused commit.
    assert len(_batches(broker, tmp_path / "c", linger_ms=0, prefix="refused")) >= 2
    assert len(commits) >= 2
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
    try:
        group = f"refused.{WORKER}"
        committed = admin.list_group_offsets({group: None})[group]
    finally:
        admin.close()
    assert {tp.partition: meta.offset for tp, meta in committed.items()} == {0: 10}
