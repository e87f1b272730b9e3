"""Friends-of-friends candidates (Adamic-Adar) and their blend with embedding retrieval.

Snap's production retrieval runs embedding retrieval beside friends-of-friends; so does the
retrieval service. The same functions score a user in the service (from the full friend sets it
reads to exclude friends) and in the offline evaluation (``training.evaluation.topk_fof`` is the
vectorised twin of ``adamic_adar``), so both return the same list: the same cap on the friends
expanded, the same tie order (a hash of the user id) and the same rounding of scores.

The blend is a weighted reciprocal-rank fusion: a candidate scores
``w / (k0 + fof rank) + (1 - w) / (k0 + embedding rank)`` (ranks from 1; a list that misses it adds
nothing), where the friends-of-friends weight ``w`` depends on the user's degree bucket: a user with
no friends has no friends-of-friends, a well-connected one has many good ones. ``w`` per bucket and
``k0`` are chosen on validation edges (``bench quality`` reports the choice).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

SCORE_DECIMALS = 9  # scores are rounded so that summation order cannot reorder exact ties
_MASK64 = (1 << 64) - 1

# Training-degree buckets: (label, lowest, highest or None). The per-degree evaluation view and
# the blend's weights use the same ones.
DEGREE_BUCKETS: tuple[tuple[str, int, int | None], ...] = (
    ("0", 0, 0),
    ("1-2", 1, 2),
    ("3-5", 3, 5),
    ("6-20", 6, 20),
    (">20", 21, None),
)


def degree_bucket(degree: int) -> str:
    for label, lo, hi in DEGREE_BUCKETS:
        if degree >= lo and (hi is None or degree <= hi):
            return label
    raise ValueError(f"degree must be >= 0, got {degree}")


def tie_keys(user_ids: np.ndarray | Sequence[int], seed: int = 0) -> np.ndarray:
    """splitmix64 of (user id + seed): a fixed pseudo-random order of users for ties (a heuristic
    with many exact ties must not be rewarded or punished for how users were numbered)."""
    with np.errstate(over="ignore"):
        z = np.asarray(user_ids, dtype=np.int64).astype(np.uint64) + np.uint64(seed)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def expanded_friends(friends: Sequence[int], cap: int, seed: int = 0) -> list[int]:
    """The friends whose own friends are read: all, or the ``cap`` first in tie-key order."""
    if len(friends) <= cap:
        return list(friends)
    keys = tie_keys(np.asarray(friends, dtype=np.int64), seed)
    return [int(friends[i]) for i in np.argsort(keys, kind="stable")[:cap]]


def adamic_adar(
    friend_lists: Mapping[int, Sequence[int]],
    expanded: Sequence[int],
    exclude: set[int],
    k: int,
    seed: int = 0,
) -> list[tuple[int, float]]:
    """Top ``k`` friends of friends by Adamic-Adar: sum over the shared (expanded) friends w of
    1 / log(degree w), degree = w's full friend count (w with one friend adds nothing)."""
    scores: dict[int, float] = {}
    for w in expanded:
        their = friend_lists.get(int(w), ())
        if len(their) < 2:
            continue
        weight = 1.0 / math.log(len(their))
        for v in their:
            if v not in exclude:
                scores[v] = scores.get(v, 0.0) + weight
    return _top(scores, k, SCORE_DECIMALS, seed)


def _top(scores: dict[int, float], k: int, decimals: int, seed: int) -> list[tuple[int, float]]:
    """The ``k`` best (user, score), scores rounded to ``decimals``, ties in tie-key order."""
    if not scores:
        return []
    ids = np.fromiter(scores, dtype=np.int64, count=len(scores))
    values = np.round(np.fromiter(scores.values(), dtype=np.float64, count=len(scores)), decimals)
    order = np.lexsort((tie_keys(ids, seed), -values))[:k]
    return [(int(ids[i]), float(values[i])) for i in order]


@dataclass(frozen=True)
class BlendWeights:
    """The friends-of-friends weight per degree bucket and the rank offset ``k0``."""

    fof_weight: Mapping[str, float]
    k0: float = 10.0

    def weight(self, degree: int) -> float:
        return float(self.fof_weight[degree_bucket(degree)])


def blend(
    embedding: Sequence[tuple[int, float]],
    fof: Sequence[tuple[int, float]],
    fof_weight: float,
    k0: float,
    k: int,
    seed: int = 0,
) -> list[tuple[int, float, str]]:
    """Weighted reciprocal-rank fusion of two ranked lists: (user, blend score, source), source
    ``embedding``, ``fof`` or ``both``; ties in the tie-key order."""
    scores: dict[int, float] = {}
    source: dict[int, str] = {}
    for weight, ranked, name in (
        (1.0 - fof_weight, embedding, "embedding"),
        (fof_weight, fof, "fof"),
    ):
        if weight <= 0:
            continue
        for rank, (user, _) in enumerate(ranked, start=1):
            scores[user] = scores.get(user, 0.0) + weight / (k0 + rank)
            source[user] = "both" if user in source and source[user] != name else name
    return [(user, score, source[user]) for user, score in _top(scores, k, 12, seed)]
