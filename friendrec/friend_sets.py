"""Every user's FULL set of friends, kept by the feature updater and read by the retrieval service.

The online store holds only a capped friend sample, but degree and the friends' aggregates need
the whole set, and the service must exclude every existing friend from recommendations, not only
the sample, so the updater keeps it here: a sqlite file (WAL, shared by the group members on
one machine), or Redis when the online store is Redis (``friendrec.friend_sets_redis``: members on
several machines), seeded from the prepared dataset's training friendships, exactly the graph
the batch feature job used. Adding an existing friend or removing a missing one is a no-op, so
replaying a batch after a crash (at-least-once delivery) leaves the same state.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from friendrec.config import Settings
from friendrec.paths import DatasetPaths

log = logging.getLogger(__name__)

SEED_CHUNK = 500_000  # directed friendships per insert batch when seeding

_SCHEMA = """
CREATE TABLE IF NOT EXISTS friends (
    user_id INTEGER NOT NULL,
    friend_id INTEGER NOT NULL,
    PRIMARY KEY (user_id, friend_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class FriendSets(Protocol):
    """What the feature updater needs of a friend-set store (sqlite or Redis)."""

    @property
    def seeded(self) -> bool: ...

    def seed(
        self, src: np.ndarray, dst: np.ndarray, source: str, if_empty: bool = False
    ) -> int: ...

    def apply(self, changes: Iterable[tuple[str, int, int]]) -> None: ...

    def friends(self, users: Sequence[int]) -> dict[int, list[int]]: ...

    def degrees(self, users: Sequence[int]) -> dict[int, int]: ...

    def count(self) -> int: ...

    def close(self) -> None: ...


def state_path(settings: Settings) -> Path:
    paths = DatasetPaths.of(settings)
    return settings.streaming.state_path or settings.workdir / "streaming" / paths.slug / "state.db"


class FriendState:
    """Friend sets in sqlite. One instance per thread or process (a lock guards the connection)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    @property
    def seeded(self) -> bool:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'seeded_from'").fetchone()
        return row is not None

    def seed(self, src: np.ndarray, dst: np.ndarray, source: str, if_empty: bool = False) -> int:
        """Replace everything with the undirected edges (src, dst); returns directed rows.

        ``if_empty``: only when never seeded, decided inside the write transaction, so members
        starting together on a new store seed it once and never wipe each other's events."""
        users = np.concatenate([src, dst]).astype(np.int64)
        friends = np.concatenate([dst, src]).astype(np.int64)
        order = np.lexsort((friends, users))  # key order: sequential B-tree inserts
        users, friends = users[order], friends[order]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if if_empty and self.seeded:
                    self._db.execute("ROLLBACK")
                    return 0
                self._db.execute("DELETE FROM friends")
                # In chunks: the whole graph as Python tuples was ~14 GB at 5M users (50M
                # friendships), which killed the service that seeded it (docs/scaling.md).
                for lo in range(0, len(users), SEED_CHUNK):
                    rows = zip(
                        users[lo : lo + SEED_CHUNK].tolist(),
                        friends[lo : lo + SEED_CHUNK].tolist(),
                        strict=True,
                    )
                    self._db.executemany("INSERT OR IGNORE INTO friends VALUES (?, ?)", rows)
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('seeded_from', ?)", (source,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        log.info(
            "friend state %s seeded from %s: %d directed friendships", self.path, source, len(users)
        )
        return len(users)

    def apply(self, changes: Iterable[tuple[str, int, int]]) -> None:
        """Apply (op, user_id, friend_id) in order, atomically (one transaction)."""
        with self._lock, self._db:
            for op, user, friend in changes:
                if op == "add":
                    self._db.execute("INSERT OR IGNORE INTO friends VALUES (?, ?)", (user, friend))
                else:
                    self._db.execute(
                        "DELETE FROM friends WHERE user_id = ? AND friend_id = ?", (user, friend)
                    )

    def _per_user(self, select: str, users: list[int]) -> list[tuple[int, int]]:
        """Rows of ``select`` (a query whose ``{marks}`` is the users' IN list), 500 users at
        a time (sqlite's bound-parameter limit)."""
        rows: list[tuple[int, int]] = []
        with self._lock:
            for lo in range(0, len(users), 500):
                chunk = users[lo : lo + 500]
                marks = ",".join("?" * len(chunk))
                rows += self._db.execute(select.format(marks=marks), chunk).fetchall()
        return rows

    def friends(self, users: Sequence[int]) -> dict[int, list[int]]:
        """Each user's full friend list (ascending)."""
        out: dict[int, list[int]] = {int(u): [] for u in users}
        select = (
            "SELECT user_id, friend_id FROM friends WHERE user_id IN ({marks}) "
            "ORDER BY user_id, friend_id"
        )
        for user, friend in self._per_user(select, list(out)):
            out[int(user)].append(int(friend))
        return out

    def degrees(self, users: Sequence[int]) -> dict[int, int]:
        """Each user's friend count (0 for a user without friends)."""
        out: dict[int, int] = dict.fromkeys((int(u) for u in users), 0)
        select = "SELECT user_id, count(*) FROM friends WHERE user_id IN ({marks}) GROUP BY user_id"
        out.update((int(user), int(n)) for user, n in self._per_user(select, list(out)))
        return out

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM friends").fetchone()[0])

    def close(self) -> None:
        self._db.close()


def open_state(settings: Settings, seed_if_empty: bool = True) -> FriendSets:
    """The dataset's friend state (sqlite, or Redis beside a Redis online store), seeded from
    its training friendships when new."""
    state: FriendSets
    if settings.features.online_store == "redis":
        from friendrec.friend_sets_redis import RedisFriendState, connect

        namespace = f"{settings.streaming.topic_prefix}:state:{DatasetPaths.of(settings).slug}"
        client = connect(settings.features.redis_connection_string)
        state = RedisFriendState(client, namespace)
    else:
        state = FriendState(state_path(settings))
    if seed_if_empty and not state.seeded:
        seed_state(settings, state, if_empty=True)
    return state


def seed_state(settings: Settings, state: FriendSets, if_empty: bool = False) -> int:
    """(Re)seed from the prepared dataset's training friendships (the batch job's graph)."""
    from friendrec.data.canonical import edge_mask, read_friendships, read_meta

    paths = DatasetPaths.of(settings)
    meta = read_meta(paths)  # the friendships alone: the users' features are not needed here
    src, dst, created, split = read_friendships(paths.friendships)
    train = edge_mask(split, created, "train")
    source = f"{meta.name} train split {meta.split_sha256[:12]}"
    return state.seed(src[train], dst[train], source, if_empty=if_empty)
