"""Deterministic, stateless friend sampling shared by the batch feature job and the streaming
feature updater.

Each friendship (u, v) gets a pseudo-random priority from a hash of (seed, u, v); a user's sampled
friends are the ``cap`` friends with the smallest priority. The sample of u depends only on u's
friend set, never on processing order, so a batch rebuild and an incremental update after a new
friendship agree exactly.
"""

from __future__ import annotations

import numpy as np

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser, vectorised over uint64 (wrapping arithmetic)."""
    z = np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def edge_priority(seed: int, user_ids: np.ndarray, friend_ids: np.ndarray) -> np.ndarray:
    """Priority of ``friend_ids[i]`` in the friend sample of ``user_ids[i]`` (uint64)."""
    with np.errstate(over="ignore"):
        u = splitmix64(np.asarray(user_ids, dtype=np.int64).astype(np.uint64) ^ np.uint64(seed))
        return splitmix64(u ^ np.asarray(friend_ids, dtype=np.int64).astype(np.uint64))


def sample_friends(seed: int, user_id: int, friends: np.ndarray, cap: int) -> np.ndarray:
    """The deterministic sample for one user: ``cap`` friends by ascending priority."""
    friends = np.asarray(friends, dtype=np.int64)
    priority = edge_priority(seed, np.full(friends.shape, user_id, dtype=np.int64), friends)
    return friends[np.argsort(priority, kind="stable")[:cap]]
