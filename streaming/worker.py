"""The loop every streaming worker runs: poll a batch, decode, process, flush, commit.

At-least-once: offsets are committed only after the batch's writes (Feast push, Milvus upsert,
produced messages flushed) succeeded, so a crash at any point replays the uncommitted batch, and
each processor is idempotent. Undecodable or invalid messages go to the dead-letter topic with the
reason and are then committed like the rest; transient errors (a store or model server down) are
retried with exponential backoff until they pass or the worker is asked to stop (then nothing of
the batch is committed). SIGTERM/SIGINT finish the current batch, commit, close and return.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from kafka import KafkaConsumer, KafkaProducer
from kafka.errors import KafkaError

from friendrec.config import Settings
from friendrec.errors import IndexUnavailableError
from streaming import metrics
from streaming.schemas import DEAD_LETTER_MAX_VALUE, DeadLetter, Message, MessageError, decode
from streaming.topics import (
    Topics,
    batch_limit,
    batch_linger_s,
    consumer,
    create_topics,
    producer,
)

log = logging.getLogger(__name__)

LAG_EVERY_S = 5.0


@dataclass(frozen=True)
class Record:
    """A decoded message and where it came from."""

    topic: str
    partition: int
    offset: int
    message: Message


class Processor(Protocol):
    """One worker's job over a batch of decoded messages (idempotent: it may see them again).

    A processor may also define ``invalid(message) -> str | None``: the reason it can never use a
    decoded message (e.g. a profile event the dataset's contract refuses), None when it can. Such
    a message goes to the dead-letter topic like an undecodable one; the rest of the batch is
    processed.
    """

    name: str

    def topics(self) -> tuple[str, ...]: ...

    def process(self, records: Sequence[Record], send: Callable[[str, Any], None]) -> None: ...

    def close(self) -> None: ...


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying: a dependency down or busy, not a bad message or a bug."""
    if isinstance(exc, IndexUnavailableError | KafkaError | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if hasattr(exc, "code") else None  # type: ignore[attr-defined]
        return code in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.ABORTED,
        )
    if isinstance(exc, sqlite3.OperationalError):
        return "locked" in str(exc) or "busy" in str(exc)
    from friendrec.errors import FriendrecError

    return isinstance(exc, FriendrecError) and "unavailable" in str(exc).lower()


@dataclass
class WorkerStats:
    """What a worker did (the benchmark and the tests read it)."""

    batches: int = 0
    processed: int = 0
    dead_letters: int = 0
    retries: int = 0
    assignment: set[tuple[str, int]] = field(default_factory=set)


class Worker:
    """Runs a ``Processor`` as a member of its consumer group until ``stop()`` (or a signal)."""

    def __init__(self, settings: Settings, processor: Processor) -> None:
        self.settings = settings
        self.processor = processor
        self.name = processor.name
        self.topics = Topics.of(settings)
        self.stats = WorkerStats()
        self._stop = threading.Event()
        self.ready = threading.Event()  # set once the group gave this member its partitions
        self._heartbeat_at = 0.0

    def stop(self) -> None:
        """Finish the current batch, commit and return from ``run``."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: self._on_signal(signum))

    def _on_signal(self, signum: int) -> None:
        log.info("%s: %s, finishing the batch", self.name, signal.Signals(signum).name)
        self.stop()

    def run(self) -> None:
        create_topics(self.settings)
        cfg = self.settings.streaming
        kafka_consumer = consumer(self.settings, self.name, self.processor.topics())
        kafka_producer = producer(self.settings, client_id=f"friendrec-{self.name}")
        log.info(
            "%s: consuming %s from %s", self.name, self.processor.topics(), cfg.bootstrap_servers
        )
        next_lag = time.monotonic() + LAG_EVERY_S
        limit = batch_limit(self.settings, self.name)
        linger = batch_linger_s(self.settings, self.name)
        try:
            while not self._stop.is_set():
                polled = kafka_consumer.poll(timeout_ms=cfg.poll_timeout_ms, max_records=limit)
                if polled and linger:
                    polled = self._fill(kafka_consumer, polled, limit, linger)
                self._track_assignment(kafka_consumer)
                if polled:
                    self._batch(kafka_consumer, kafka_producer, polled)
                self._heartbeat()
                if time.monotonic() >= next_lag:
                    self._report_lag(kafka_consumer)
                    next_lag = time.monotonic() + LAG_EVERY_S
        finally:
            kafka_producer.flush()
            kafka_producer.close()
            kafka_consumer.close()
            self.processor.close()
            log.info(
                "%s: stopped after %d messages in %d batches (%d dead letters)",
                self.name,
                self.stats.processed,
                self.stats.batches,
                self.stats.dead_letters,
            )

    def _heartbeat(self) -> None:
        """After a whole loop (poll and batch) with partitions: a crash in the first batch, or a
        worker stuck in one, never looks ready (at most one write a second)."""
        path = self.settings.streaming.heartbeat_file
        now = time.monotonic()
        if path is None or not self.ready.is_set() or now - self._heartbeat_at < 1.0:
            return
        self._heartbeat_at = now
        beat = {
            "pid": os.getpid(),
            "worker": self.name,
            "time": time.time(),
            "partitions": len(self.stats.assignment),
            "processed": self.stats.processed,
            "dead_letters": self.stats.dead_letters,
        }
        try:  # a heartbeat that cannot be written must not stop the processing (probes notice)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps(beat))
            tmp.replace(path)
        except OSError as exc:
            log.warning("%s: heartbeat %s not written: %s", self.name, path, exc)

    def _fill(self, kafka_consumer: KafkaConsumer, polled: dict, limit: int, linger: float) -> dict:
        """Keep polling for ``linger`` seconds after the first records, up to ``limit`` records:
        a batch processes each user once, however many of its events it holds."""
        deadline = time.monotonic() + linger
        count = sum(len(messages) for messages in polled.values())
        while count < limit and not self._stop.is_set():
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            for tp, messages in kafka_consumer.poll(left_ms, max_records=limit - count).items():
                polled.setdefault(tp, []).extend(messages)
                count += len(messages)
        return polled

    def _track_assignment(self, kafka_consumer: KafkaConsumer) -> None:
        assigned = {(tp.topic, tp.partition) for tp in kafka_consumer.assignment()}
        if assigned != self.stats.assignment:
            for topic, partition in self.stats.assignment - assigned:  # not ours to report
                with contextlib.suppress(KeyError):
                    metrics.LAG.remove(self.name, topic, str(partition))
            self.stats.assignment = assigned
            log.info("%s: assigned %s", self.name, sorted(assigned))
        if assigned:
            self.ready.set()

    def _batch(self, kafka_consumer: KafkaConsumer, kafka_producer: KafkaProducer, polled) -> None:
        started = time.perf_counter()
        records: list[Record] = []
        counts: dict[str, int] = {}
        invalid = getattr(self.processor, "invalid", None)
        for tp, messages in polled.items():
            allowed = self.topics.schemas(tp.topic)
            for m in messages:
                counts[tp.topic] = counts.get(tp.topic, 0) + 1
                try:
                    message = decode(m.value, allowed, m.key)
                    reason = invalid(message) if invalid is not None else None
                    if reason is not None:
                        raise MessageError(reason)
                    records.append(Record(tp.topic, tp.partition, m.offset, message))
                except MessageError as exc:
                    self._dead_letter(
                        kafka_producer, tp.topic, tp.partition, m.offset, m.key, m.value, str(exc)
                    )

        def send(topic: str, message: Any) -> None:
            kafka_producer.send(topic, key=message.key, value=message.encode())

        if records:
            self._process_with_retries(records, send, kafka_producer)
            if self._stop.is_set() and self._unfinished:
                return  # asked to stop during retries: commit nothing, the batch is replayed
        kafka_producer.flush()
        try:
            kafka_consumer.commit()
        except KafkaError as exc:
            # The batch's writes are done; only its offsets are not stored. In a rebalance
            # (CommitFailedError, RebalanceInProgressError) whoever owns the partitions next,
            # maybe this member again, replays it; otherwise the next commit covers it. Either
            # way nothing is lost and the worker keeps going.
            log.warning("%s: commit failed (%s); the batch will be redelivered", self.name, exc)
            return
        self.stats.batches += 1
        self.stats.processed += sum(counts.values())
        for topic, n in counts.items():
            metrics.EVENTS.labels(self.name, topic).inc(n)
        metrics.BATCH_SECONDS.labels(self.name).observe(time.perf_counter() - started)

    _unfinished = False

    def _process_with_retries(self, records, send, kafka_producer: KafkaProducer) -> None:
        cfg = self.settings.streaming
        delay = cfg.retry_backoff_s
        self._unfinished = True
        while True:
            try:
                self.processor.process(records, send)
                self._unfinished = False
                return
            except Exception as exc:
                if not is_transient(exc):
                    self._isolate(records, send, kafka_producer, exc)
                    self._unfinished = False
                    return
                self.stats.retries += 1
                metrics.RETRIES.labels(self.name).inc()
                log.warning("%s: transient error, retrying in %.1fs: %s", self.name, delay, exc)
                if self._stop.wait(delay):
                    return
                delay = min(delay * 2, cfg.retry_backoff_max_s)

    def _isolate(self, records, send, kafka_producer: KafkaProducer, exc: Exception) -> None:
        """A non-transient failure: process one record at a time; those that still fail go to
        the dead-letter topic (a poison message must not block its partition forever)."""
        log.error(
            "%s: batch failed (%r); retrying its %d records one by one",
            self.name,
            exc,
            len(records),
        )
        for record in records:
            try:
                self.processor.process([record], send)
            except Exception as one:
                if is_transient(one):
                    raise
                value = record.message.encode()
                self._dead_letter(
                    kafka_producer,
                    record.topic,
                    record.partition,
                    record.offset,
                    record.message.key,
                    value,
                    f"processing failed: {one!r}",
                )

    def _dead_letter(self, kafka_producer, topic, partition, offset, key, value, reason) -> None:
        letter = DeadLetter.of(
            value,
            key,
            worker=self.name,
            topic=topic,
            partition=partition,
            offset=offset,
            reason=reason,
            at=int(time.time() * 1000),
        )
        kafka_producer.send(
            self.topics.dead_letters,
            key=key[:DEAD_LETTER_MAX_VALUE] if key is not None else None,
            value=letter.encode(),
        )
        self.stats.dead_letters += 1
        metrics.DEAD_LETTERS.labels(self.name).inc()
        log.warning("%s: dead letter %s[%d]@%d: %s", self.name, topic, partition, offset, reason)

    def _report_lag(self, kafka_consumer: KafkaConsumer) -> None:
        assigned = list(kafka_consumer.assignment())
        if not assigned:
            return
        try:
            listed = kafka_consumer.end_offsets(assigned)
            for tp in assigned:
                # The last fetch's high watermark: Tansu's ListOffsets under-reports the end
                # (see ``topics.end_offsets``); before a first fetch, the listed end.
                end = kafka_consumer.highwater(tp)
                end = int(listed.get(tp, 0)) if end is None else max(end, int(listed.get(tp, 0)))
                lag = max(end - int(kafka_consumer.position(tp)), 0)
                metrics.LAG.labels(self.name, tp.topic, str(tp.partition)).set(lag)
        except KafkaError as exc:
            log.debug("%s: lag not available: %s", self.name, exc)


def heartbeat_health(settings: Settings, pid: int | None = None) -> str:
    """A worker's readiness from its heartbeat file: ``ready``, ``starting`` (no heartbeat from
    this process yet) or ``stalled`` (none for ``heartbeat_stale_s``), with the figures."""
    cfg = settings.streaming
    if cfg.heartbeat_file is None:
        return "unknown: no heartbeat_file configured"
    try:
        beat = json.loads(cfg.heartbeat_file.read_text())
    except (OSError, ValueError):
        return "starting: no heartbeat yet"
    if pid is not None and beat.get("pid") != pid:
        return "starting: no heartbeat from this process yet"
    age = time.time() - float(beat["time"])
    figures = (
        f"{beat['partitions']} partitions, {beat['processed']} processed, "
        f"{beat['dead_letters']} dead letters, heartbeat {age:.1f} s ago"
    )
    return f"{'stalled' if age > cfg.heartbeat_stale_s else 'ready'}: {figures}"


def serve_metrics(settings: Settings) -> None:
    """Expose /metrics on ``streaming.metrics_port`` when set (one port per process)."""
    port = settings.streaming.metrics_port
    if port:
        from prometheus_client import start_http_server

        host = settings.streaming.metrics_host
        start_http_server(port, addr=host)
        log.info("metrics on http://%s:%d/metrics", host, port)
