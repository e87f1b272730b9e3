"""Topic names, topic creation and Kafka client construction from the shared settings.

Every client reads ``settings.streaming.bootstrap_servers``: the local Tansu broker and a real
Kafka cluster are used the same way.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from friendrec.config import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Topics:
    """The streaming topics (``<prefix>.<name>``) and the schemas each one accepts."""

    friendships: str
    profiles: str
    refresh: str
    embeddings: str
    dead_letters: str

    @classmethod
    def of(cls, settings: Settings) -> Topics:
        p = settings.streaming.topic_prefix
        return cls(
            friendships=f"{p}.friendships",
            profiles=f"{p}.profiles",
            refresh=f"{p}.refresh",
            embeddings=f"{p}.embeddings",
            dead_letters=f"{p}.dead-letters",
        )

    def keyed(self) -> tuple[str, ...]:
        return (self.friendships, self.profiles, self.refresh, self.embeddings)

    def schemas(self, topic: str) -> tuple[str, ...]:
        return {
            self.friendships: ("friendship.v1", "graph_recompute.v1"),
            self.profiles: ("profile.v1",),
            self.refresh: ("refresh.v1",),
            self.embeddings: ("embedding.v1",),
        }[topic]


def create_topics(settings: Settings) -> list[str]:
    """Create the missing topics with the configured partition counts; returns those created."""
    cfg = settings.streaming
    topics = Topics.of(settings)
    wanted = {t: cfg.partitions for t in topics.keyed()}
    wanted[topics.dead_letters] = cfg.dlq_partitions
    admin = KafkaAdminClient(bootstrap_servers=cfg.bootstrap_servers, client_id="friendrec-admin")
    try:
        existing = set(admin.list_topics())
        missing = [
            NewTopic(name, n, cfg.replication_factor)
            for name, n in wanted.items()
            if name not in existing
        ]
        created = []
        for topic in missing:  # one by one: a concurrent creator must not fail the others
            try:
                admin.create_topics([topic])
                created.append(topic.name)
            except TopicAlreadyExistsError:
                pass
        if created:
            log.info("created topics %s", created)
        return created
    finally:
        admin.close()


def producer(settings: Settings, **overrides: object) -> KafkaProducer:
    """An acks=all producer (the idempotent producer keeps retried sends in order, once each)."""
    options: dict[str, object] = {
        "bootstrap_servers": settings.streaming.bootstrap_servers,
        "acks": "all",
        "linger_ms": 5,
        "retries": 10,
        "client_id": "friendrec-producer",
    }
    options.update(overrides)
    return KafkaProducer(**options)


def consumer(settings: Settings, group: str, topics: tuple[str, ...]) -> KafkaConsumer:
    """A group member with manual commits (offsets move only after the batch's writes)."""
    cfg = settings.streaming
    return KafkaConsumer(
        *topics,
        bootstrap_servers=cfg.bootstrap_servers,
        group_id=f"{cfg.group_prefix}.{group}",
        client_id=f"friendrec-{group}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=cfg.session_timeout_ms,
        heartbeat_interval_ms=max(cfg.session_timeout_ms // 6, 100),
        max_poll_interval_ms=cfg.max_poll_interval_ms,
        max_poll_records=batch_limit(settings, group),
        fetch_max_wait_ms=cfg.fetch_max_wait_ms,
    )


def reader(settings: Settings, client_id: str, **overrides: object) -> KafkaConsumer:
    """A consumer outside any group (tools that read topics without committing anything)."""
    cfg = settings.streaming
    options: dict[str, object] = {
        "bootstrap_servers": cfg.bootstrap_servers,
        "group_id": None,
        "client_id": client_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "fetch_max_wait_ms": cfg.fetch_max_wait_ms,
        "max_poll_records": cfg.max_records,
    }
    options.update(overrides)
    return KafkaConsumer(**options)


def batch_limit(settings: Settings, worker: str) -> int:
    """The most records one batch of ``worker`` takes."""
    cfg = settings.streaming
    return cfg.worker_max_records.get(worker, cfg.max_records)


def batch_linger_s(settings: Settings, worker: str) -> float:
    """How long ``worker`` keeps polling to fill a batch once records arrived."""
    return settings.streaming.batch_linger_ms.get(worker, 0) / 1000


def end_offsets(
    kafka_reader: KafkaConsumer, parts: list[TopicPartition], timeout_s: float = 5.0
) -> dict[TopicPartition, int]:
    """The partitions' end offsets, read from a fetch's high watermark by a fresh group-less
    ``kafka_reader`` (see ``reader``; it is re-assigned to ``parts``).

    ListOffsets alone is not enough: Tansu answers it with the first offset of the partition's
    last record batch + 1 (measured: 101 after 107 records produced in two batches), which would
    under-count lag; every fetch response carries the true high watermark.
    """
    listed = kafka_reader.end_offsets(parts)
    kafka_reader.assign(parts)
    for tp in parts:
        kafka_reader.seek(tp, max(int(listed[tp]) - 1, 0))
    deadline = time.monotonic() + timeout_s
    while any(kafka_reader.highwater(tp) is None for tp in parts) and time.monotonic() < deadline:
        kafka_reader.poll(timeout_ms=50)
    return {tp: max(int(listed[tp]), kafka_reader.highwater(tp) or 0) for tp in parts}
