"""The Milvus sink: embeddings topic -> upsert into the live collection (idempotent by user_id).

Only the last embedding of each user in a batch is written (partition order = computation order).
An embedding of a model version that is not live is dropped and counted: after a promotion or a
rollback it belongs to another space (the index build of the new version already holds that
user). Freshness (originating event time -> upserted) is observed after the upsert succeeded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from friendrec.config import Settings
from friendrec.errors import IndexUnavailableError
from streaming import metrics
from streaming.milvus_conn import ReconnectingIndex
from streaming.schemas import UserEmbedding
from streaming.topics import Topics
from streaming.worker import Record

log = logging.getLogger(__name__)


class MilvusSink:
    """The ``milvus-sink`` processor (see module docstring)."""

    name = "milvus-sink"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics_ = Topics.of(settings)
        self.index = ReconnectingIndex(settings)
        self.freshness: list[float] = []  # seconds, for the benchmark (bounded below)
        self.upserted = 0
        self.dropped = 0
        self.flushes = 0
        self._unflushed = 0  # rows upserted since the last flush
        self._unflushed_since = 0.0  # monotonic time of the first of them

    def topics(self) -> tuple[str, ...]:
        return (self.topics_.embeddings,)

    def close(self) -> None:
        self.index.close()

    def process(self, records: Sequence[Record], send: Callable[[str, Any], None]) -> None:
        latest: dict[int, UserEmbedding] = {}
        for record in records:
            if isinstance(record.message, UserEmbedding):
                latest[record.message.user_id] = record.message
        if not latest:
            return
        live = self.index.call(lambda index: index.live())
        if live is None:
            raise IndexUnavailableError("no live collection behind the alias yet: unavailable")
        keep = [e for e in latest.values() if e.model_version == live.model_version]
        stale = len(latest) - len(keep)
        if stale:
            self.dropped += stale
            metrics.DROPPED.labels(self.name, "model_version_not_live").inc(stale)
            log.info("dropped %d embeddings of a model version that is not live", stale)
        if not keep:
            return
        ids = np.array([e.user_id for e in keep], dtype=np.int64)
        vectors = np.array([e.vector for e in keep], dtype=np.float32)
        self.index.call(
            lambda index: index.upsert(live.collection, ids, vectors, live.model_version)
        )
        self.upserted += len(keep)
        self._maybe_flush(live.collection, len(keep))
        now = time.time()
        for e in keep:
            seconds = max(now - e.origin_ts / 1000.0, 0.0)
            metrics.FRESHNESS.observe(seconds)
            self.freshness.append(seconds)
        del self.freshness[:-100_000]

    def _maybe_flush(self, collection: str, rows: int) -> None:
        """Seal the growing segment every ``sink_flush_rows`` rows or ``sink_flush_interval_s``
        seconds: Milvus searches unflushed rows by brute force, so a steady stream of upserts
        would otherwise slow every search until someone flushes by hand."""
        cfg = self.settings.streaming
        if self._unflushed == 0:
            self._unflushed_since = time.monotonic()
        self._unflushed += rows
        due = time.monotonic() - self._unflushed_since >= cfg.sink_flush_interval_s
        if self._unflushed < cfg.sink_flush_rows and not due:
            return
        self.index.call(lambda index: index.flush(collection))
        self.flushes += 1
        metrics.SINK_FLUSHES.inc()
        log.debug("flushed %s after %d rows", collection, self._unflushed)
        self._unflushed = 0
