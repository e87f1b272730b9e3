"""`friendrec stream redrive`: put dead letters back on their original topics once their cause
is fixed.

Design: no consumer group, no stored progress. Every run assigns all partitions of the
dead-letter topic and reads it from the beginning up to where it stood when the run started;
each letter that passes the filters (``reason`` substring, exact original ``source_topic``,
``since``: dead-lettered at or after, in ms) is re-produced with its ORIGINAL key and bytes to
its ORIGINAL topic. Nothing is committed, so a letter a filter leaves alone is never lost: an
operator can redrive ``--reason X`` now and ``--reason Y`` later, or redrive everything again.
(A group offset cannot express "these were redriven, those were skipped" when filters differ
between runs.) The cost is that a rerun re-produces the letters it already redrove; the
dead-letter topic is small (and bounded by its retention), and ``--since`` narrows a rerun.

Where the topic "stood at the start": its true end offsets taken at the start
(``topics.end_offsets``: the high watermark of a fetch, since Tansu's ListOffsets falls short).
Reading stops there, so a run never chases the dead letters its own re-produced messages cause
while the cause is not fixed: it always terminates. (Tansu's offsets_for_times is wrong too,
hence ``since`` filters on the letter's ``at`` instead of seeking.)

What re-producing does to state: refresh requests and graph recomputes make the workers
recompute from current state, so redriving them (even twice) is harmless. Friendship and profile
events and embeddings are applied in arrival order, so a redriven one lands NOW, after any newer
one of the same user that did get through (a redriven ``add`` after a processed ``remove``
re-adds the friendship; a redriven profile update or vector overwrites newer values): filter with
``--source-topic`` and ``--reason`` to redrive only what should be re-applied.

A record of the dead-letter topic that is not a valid ``dead_letter.v1`` is counted as
undecodable and logged with its partition and offset; it never stops the run.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError
from pydantic import ValidationError

from friendrec.config import Settings
from friendrec.errors import FriendrecError
from streaming.schemas import DeadLetter
from streaming.topics import Topics, end_offsets, producer, reader

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
IDLE_POLL_MS = 500  # an empty poll this long, with every partition at its end: done
STALL_TIMEOUT_S = 60.0  # no record for this long while a partition is below its end: error


class RedriveError(FriendrecError):
    """The broker cannot be reached, or re-producing failed; the CLI prints it as one line."""


@dataclass(frozen=True)
class RedriveFilter:
    """Which dead letters to redrive (all of them when every field is None)."""

    reason: str | None = None  # substring of the reason, case-sensitive
    source_topic: str | None = None  # the original topic, exactly
    since_ms: int | None = None  # dead-lettered at or after (the letter's ``at``)

    def matches(self, letter: DeadLetter) -> bool:
        return (
            (self.reason is None or self.reason in letter.reason)
            and (self.source_topic is None or letter.topic == self.source_topic)
            and (self.since_ms is None or letter.at >= self.since_ms)
        )


@dataclass
class RedriveReport:
    """What a run read and did; ``selected`` counts (original topic, reason) pairs re-produced
    (or, in a dry run, that would be)."""

    dry_run: bool
    scanned: int = 0
    undecodable: int = 0
    matched: int = 0
    unknown_topic: int = 0
    selected: Counter[tuple[str, str]] = field(default_factory=Counter)
    limit_reached: bool = False

    def per_topic(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for (topic, _), n in self.selected.items():
            out[topic] += n
        return dict(sorted(out.items()))

    def as_dict(self) -> dict[str, object]:
        reasons: dict[str, dict[str, int]] = {}
        for (topic, reason), n in sorted(self.selected.items()):
            reasons.setdefault(topic, {})[reason] = n
        return {
            "dry_run": self.dry_run,
            "scanned": self.scanned,
            "matched": self.matched,
            "would_reproduce" if self.dry_run else "reproduced": self.per_topic(),
            "reasons": reasons,
            "undecodable": self.undecodable,
            "unknown_topic": self.unknown_topic,
            "limit_reached": self.limit_reached,
        }


def _parse(value: bytes | None) -> tuple[DeadLetter, bytes | None, bytes]:
    """The letter and its original key and value; ValueError when it is not a valid one."""
    if value is None:
        raise ValueError("empty record (tombstone)")
    try:
        letter = DeadLetter.model_validate_json(value)
    except ValidationError as exc:
        raise ValueError(f"not a dead_letter.v1: {exc.errors()[0]['msg']}") from None
    try:
        key = base64.b64decode(letter.key_b64, validate=True) if letter.key_b64 else None
        original = base64.b64decode(letter.value_b64, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"bad base64: {exc}") from None
    if letter.truncated:
        raise ValueError(
            f"truncated letter: the original ({letter.value_size} bytes, sha256 "
            f"{letter.value_sha256}) is at {letter.topic}[{letter.partition}]@{letter.offset}"
        )
    return letter, key, original


def _records_until_now(
    consumer: KafkaConsumer, tps: list[TopicPartition]
) -> Iterator[tuple[TopicPartition, ConsumerRecord]]:
    """The records of ``tps`` from the beginning to their end offsets taken now. Ends when every
    partition got there."""
    ends = end_offsets(consumer, tps)
    consumer.seek_to_beginning(*tps)
    log.info(
        "reading %s (end offsets at the start: %s)",
        tps[0].topic,
        {tp.partition: ends[tp] for tp in tps},
    )
    active = set(tps)
    last_progress = time.monotonic()
    while active:
        polled = consumer.poll(timeout_ms=IDLE_POLL_MS)
        if not polled:  # nothing more for now: partitions at their end offsets are done
            active -= {tp for tp in active if consumer.position(tp) >= ends[tp]}
            if active and time.monotonic() - last_progress > STALL_TIMEOUT_S:
                behind = {tp.partition: (consumer.position(tp), ends[tp]) for tp in active}
                raise RedriveError(
                    f"{tps[0].topic}: no records for {STALL_TIMEOUT_S:.0f}s, partitions "
                    f"(position, end) {behind}"
                )
            continue
        last_progress = time.monotonic()
        for tp, records in polled.items():
            for m in records:
                if tp not in active:
                    break
                if m.offset >= ends[tp]:
                    active.discard(tp)  # produced after the start: a later run's business
                    consumer.pause(tp)
                    break
                yield tp, m


def _unreachable(settings: Settings, exc: KafkaError) -> RedriveError:
    return RedriveError(
        f"cannot reach the Kafka broker at {settings.streaming.bootstrap_servers}: {exc}"
    )


def redrive(
    settings: Settings,
    filters: RedriveFilter = RedriveFilter(),
    limit: int | None = None,
    dry_run: bool = False,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
) -> RedriveReport:
    """Re-produce the dead letters that pass ``filters`` (at most ``limit``) to their original
    topics; see the module docstring for what is read and why nothing is committed."""
    cfg = settings.streaming
    topics = Topics.of(settings)
    known = set(topics.keyed())
    report = RedriveReport(dry_run=dry_run)
    timeout_ms = int(connect_timeout_s * 1000)
    try:
        consumer = reader(settings, "friendrec-redrive", bootstrap_timeout_ms=timeout_ms)
    except KafkaError as exc:
        raise _unreachable(settings, exc) from None
    kafka_producer = None
    try:
        partitions = consumer.partitions_for_topic(topics.dead_letters)
        if not partitions:
            log.warning("no dead-letter topic %s: nothing to redrive", topics.dead_letters)
            return report
        if not dry_run:
            try:
                kafka_producer = producer(
                    settings, client_id="friendrec-redrive", bootstrap_timeout_ms=timeout_ms
                )
            except KafkaError as exc:
                raise _unreachable(settings, exc) from None
        tps = [TopicPartition(topics.dead_letters, p) for p in sorted(partitions)]
        futures = []
        for tp, m in _records_until_now(consumer, tps):
            report.scanned += 1
            try:
                letter, key, value = _parse(m.value)
            except ValueError as exc:
                report.undecodable += 1
                log.warning(
                    "undecodable record %s[%d]@%d: %s", tp.topic, tp.partition, m.offset, exc
                )
                continue
            if not filters.matches(letter):
                continue
            report.matched += 1
            if letter.topic not in known:  # never into the dead letters or a stranger
                report.unknown_topic += 1
                log.warning(
                    "dead letter %s[%d]@%d names topic %r, not one of %s: left alone",
                    tp.topic,
                    tp.partition,
                    m.offset,
                    letter.topic,
                    sorted(known),
                )
                continue
            if kafka_producer is not None:
                futures.append(kafka_producer.send(letter.topic, key=key, value=value))
            report.selected[(letter.topic, letter.reason)] += 1
            if limit is not None and sum(report.selected.values()) >= limit:
                report.limit_reached = True
                break
        if kafka_producer is not None:
            kafka_producer.flush()
            failed = [f.exception for f in futures if f.failed()]
            if failed:
                raise RedriveError(
                    f"{len(failed)} of {len(futures)} re-produced messages failed "
                    f"(first: {failed[0]!r}); rerun to redrive them"
                )
    except KafkaError as exc:
        raise RedriveError(f"redrive from {cfg.bootstrap_servers} failed: {exc!r}") from None
    finally:
        if kafka_producer is not None:
            kafka_producer.close()
        consumer.close()
    log.info(
        "%s %d of %d dead letters (%d undecodable)",
        "would redrive" if dry_run else "redrove",
        sum(report.selected.values()),
        report.scanned,
        report.undecodable,
    )
    return report
