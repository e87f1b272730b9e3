"""The feature updater's friend sets in Redis: one set per user, for members on several hosts.

Chosen when the online store is Redis (``features.online_store``, same connection string), so a
deployment whose feature updaters run on different machines shares one state, as they share the
online store. Same contract as the sqlite ``FriendState``: set semantics (replays are no-ops) and
one atomic MULTI/EXEC per batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence

import numpy as np
import redis

log = logging.getLogger(__name__)

SEED_LOCK_S = 600
SEED_USERS_PER_ROUND_TRIP = 10_000  # users per pipeline flush when seeding


def connect(connection_string: str) -> redis.Redis:
    """Feast's Redis connection string (``host:port[,password=...][,ssl=true][,db=N]``)."""
    first, *options = [part.strip() for part in connection_string.split(",") if part.strip()]
    host, _, port = first.rpartition(":")
    kwargs: dict[str, object] = {"host": host or "127.0.0.1", "port": int(port or 6379)}
    for option in options:
        key, _, value = option.partition("=")
        if key == "password":
            kwargs["password"] = value
        elif key == "ssl":
            kwargs["ssl"] = value.lower() == "true"
        elif key == "db":
            kwargs["db"] = int(value)
    return redis.Redis(**kwargs)  # type: ignore[arg-type]


class RedisFriendState:
    """Friend sets under ``<namespace>:friends:<user_id>`` (see module docstring)."""

    def __init__(self, client: redis.Redis, namespace: str) -> None:
        self.client = client
        self.namespace = namespace
        self.path = f"redis:{namespace}"  # for logs, like FriendState.path
        self._meta = f"{namespace}:seeded_from"
        self._lock = f"{namespace}:seeding"

    def _key(self, user: int) -> str:
        return f"{self.namespace}:friends:{int(user)}"

    @property
    def seeded(self) -> bool:
        return bool(self.client.exists(self._meta))

    def seed(self, src: np.ndarray, dst: np.ndarray, source: str, if_empty: bool = False) -> int:
        """Replace everything with the undirected edges (src, dst); returns directed rows.
        ``if_empty``: one member seeds a new store; the others wait for it to finish."""
        if if_empty:
            if self.seeded:
                return 0
            if not self.client.set(self._lock, source, nx=True, ex=SEED_LOCK_S):
                deadline = time.monotonic() + SEED_LOCK_S
                while not self.seeded and time.monotonic() < deadline:
                    time.sleep(0.2)
                return 0
        users = np.concatenate([src, dst]).astype(np.int64)
        friends = np.concatenate([dst, src]).astype(np.int64)
        order = np.argsort(users, kind="stable")
        users, friends = users[order], friends[order]
        bounds = np.flatnonzero(np.diff(users)) + 1
        pipe = self.client.pipeline(transaction=False)
        for key in self.client.scan_iter(f"{self.namespace}:friends:*", count=1000):
            pipe.delete(key)
        pipe.execute()
        starts = np.concatenate([[0], bounds])
        ends = np.concatenate([bounds, [len(users)]])
        for i, (lo, hi) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
            if hi > lo:
                pipe.sadd(self._key(users[lo]), *friends[lo:hi].tolist())
            if (i + 1) % SEED_USERS_PER_ROUND_TRIP == 0:  # a pipeline buffers every command
                pipe.execute()
        pipe.set(self._meta, source)
        pipe.delete(self._lock)
        pipe.execute()
        log.info(
            "friend state %s seeded from %s: %d directed friendships", self.path, source, len(users)
        )
        return len(users)

    def apply(self, changes: Iterable[tuple[str, int, int]]) -> None:
        """Apply (op, user_id, friend_id) in order, atomically (one MULTI/EXEC)."""
        pipe = self.client.pipeline(transaction=True)
        for op, user, friend in changes:
            if op == "add":
                pipe.sadd(self._key(user), int(friend))
            else:
                pipe.srem(self._key(user), int(friend))
        pipe.execute()

    def friends(self, users: Sequence[int]) -> dict[int, list[int]]:
        """Each user's full friend list (ascending)."""
        keys = [int(u) for u in users]
        pipe = self.client.pipeline(transaction=False)
        for user in keys:
            pipe.smembers(self._key(user))
        return {
            user: sorted(int(f) for f in members)
            for user, members in zip(keys, pipe.execute(), strict=True)
        }

    def degrees(self, users: Sequence[int]) -> dict[int, int]:
        """Each user's friend count (0 for a user without friends)."""
        keys = [int(u) for u in users]
        pipe = self.client.pipeline(transaction=False)
        for user in keys:
            pipe.scard(self._key(user))
        return {user: int(n) for user, n in zip(keys, pipe.execute(), strict=True)}

    def count(self) -> int:
        pipe = self.client.pipeline(transaction=False)
        for key in self.client.scan_iter(f"{self.namespace}:friends:*", count=1000):
            pipe.scard(key)
        return int(sum(pipe.execute()))

    def close(self) -> None:
        self.client.close()
