"""`friendrec stream replay`: friendship events onto the friendship topic, optionally paced.

The events are the dataset's held-out friendships (validation then test split, in creation order:
the friendships the batch features never saw, arriving as they would in production), or
synthetic ones between random users. One friendship event is produced as two messages, one keyed
by each endpoint (see ``streaming.schemas``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from friendrec.config import Settings
from friendrec.paths import DatasetPaths
from streaming.schemas import FriendshipEvent
from streaming.topics import Topics, create_topics, producer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplayReport:
    friendships: int
    messages: int
    seconds: float
    first_ts_ms: int
    last_ts_ms: int

    @property
    def rate(self) -> float:
        return self.friendships / self.seconds if self.seconds > 0 else 0.0


def held_out_pairs(settings: Settings) -> np.ndarray:
    """[n, 2] user ids of the validation and test friendships, oldest first."""
    from friendrec.data.canonical import SPLITS, load_prepared

    data = load_prepared(DatasetPaths.of(settings))
    mask = data.split != SPLITS.index("train")
    order = np.argsort(data.created_ts[mask], kind="stable")
    return np.stack([data.src[mask][order], data.dst[mask][order]], axis=1)


def synthetic_pairs(settings: Settings, count: int, seed: int = 0) -> np.ndarray:
    """[count, 2] random new friendships: distinct users, not friends in the training graph, no
    pair twice (so removing them again restores the training graph exactly)."""
    from friendrec.data.canonical import load_prepared

    data = load_prepared(DatasetPaths.of(settings))
    users = data.user_ids
    src, dst = data.edges("train")
    taken = set(zip(np.minimum(src, dst).tolist(), np.maximum(src, dst).tolist(), strict=True))
    rng = np.random.default_rng(seed)
    out: list[tuple[int, int]] = []
    while len(out) < count:
        for u, v in rng.choice(users, size=(2 * (count - len(out)) + 16, 2)).tolist():
            edge = (min(u, v), max(u, v))
            if u != v and edge not in taken:
                taken.add(edge)
                out.append((u, v))
                if len(out) == count:
                    break
    return np.array(out, dtype=np.int64).reshape(-1, 2)


def replay(
    settings: Settings,
    pairs: np.ndarray,
    rate: float | None = None,
    op: str = "add",
    show_progress: bool = True,
) -> ReplayReport:
    """Produce each pair as a friendship event (stamped with the send time), at most ``rate``
    friendships per second (None: as fast as the producer goes)."""
    create_topics(settings)
    topic = Topics.of(settings).friendships
    kafka = producer(settings, client_id="friendrec-replay")
    started = time.perf_counter()
    first = last = 0
    try:
        for i, (u, v) in enumerate(
            tqdm(pairs.tolist(), desc="replay", unit="friendship", disable=not show_progress)
        ):
            if rate:
                wait = started + i / rate - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
            now = int(time.time() * 1000)
            first = first or now
            last = now
            event = FriendshipEvent(op=op, user_id=int(u), friend_id=int(v), event_ts=now)
            for message in (event, event.mirrored()):
                kafka.send(topic, key=message.key, value=message.encode())
        kafka.flush()
    finally:
        kafka.close()
    seconds = time.perf_counter() - started
    report = ReplayReport(len(pairs), 2 * len(pairs), seconds, first, last)
    log.info("replayed %d friendships in %.1fs (%.0f/s)", len(pairs), seconds, report.rate)
    return report
