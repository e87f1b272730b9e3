"""Friends-of-friends candidates (Adamic-Adar) and their blend with embedding retrieval.

Snap's production retrieval runs embedding retrieval beside friends-of-friends; so does the
retrieval service. The same functions score a user in the service (from the full friend sets it
reads to exclude friends) and in the offline evaluation (``training.evaluation.topk_fof`` is the
vectorised twin of ``adamic_adar``), so both return the same list: the same cap on the friends
expanded, the same tie order (a hash of the user id) and the same rounding of scores.

The blend scores each candidate of the two lists by a linear function of what the lists say of
it (``BLEND_FEATURES``: found by which source, its score and rank in each), with one weight vector
per degree bucket of the user: a user with no friends has no friends-of-friends, a
well-connected one has many good ones. The weights are fitted on validation edges
(``training.evaluation.fit_blend``, a listwise softmax over each user's candidates), so the blend
learns how far an Adamic-Adar score of 3 outweighs an embedding rank of 40 on this graph; a
reciprocal-rank fusion, which sees ranks only, cannot.
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
    values = np.fromiter(scores.values(), dtype=np.float64, count=len(scores))
    order, rounded = _best(ids, values, k, decimals, seed)
    return [(int(ids[i]), float(rounded[i])) for i in order]


def _best(
    ids: np.ndarray, values: np.ndarray, k: int, decimals: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the ``k`` best values (rounded to ``decimals``; ties in tie-key order of
    ``ids``), and the rounded values."""
    rounded = np.round(values, decimals)
    return np.lexsort((tie_keys(ids, seed), -rounded))[:k], rounded


# The blend's features of a (user, candidate) pair, all read from the two ranked lists the service
# has anyway: whether each source found the candidate, its score there and log of its rank there
# (a missing candidate: score 0, rank ``depth + 1``), and whether both found it.
BLEND_FEATURES: tuple[str, ...] = (
    "embedding",
    "embedding_score",
    "embedding_log_rank",
    "fof",
    "fof_log1p_score",
    "fof_log_rank",
    "both",
)


@dataclass(frozen=True)
class BlendWeights:
    """The blend's linear weights of ``BLEND_FEATURES`` per training-degree bucket."""

    coef: Mapping[str, Sequence[float]]

    def __post_init__(self) -> None:
        want = [label for label, _, _ in DEGREE_BUCKETS]
        if sorted(self.coef) != sorted(want):
            raise ValueError(f"blend weights need the buckets {want}, got {sorted(self.coef)}")
        for label, values in self.coef.items():
            if len(values) != len(BLEND_FEATURES) or not all(math.isfinite(v) for v in values):
                raise ValueError(
                    f"bucket {label!r} needs {len(BLEND_FEATURES)} finite weights "
                    f"({', '.join(BLEND_FEATURES)}), got {list(values)}"
                )

    def for_degree(self, degree: int) -> np.ndarray:
        return np.asarray(self.coef[degree_bucket(degree)], dtype=np.float64)


def blend_features(
    embedding: Sequence[tuple[int, float]],
    fof: Sequence[tuple[int, float]],
    depth: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The union of two ranked lists (embedding order, then the friends of friends it missed)
    and its ``BLEND_FEATURES`` matrix; ``depth``: how many candidates each source was asked for."""
    e_users = [int(u) for u, _ in embedding]
    seen = set(e_users)
    f_rank = {int(u): r for r, (u, _) in enumerate(fof, start=1)}
    f_score = {int(u): float(s) for u, s in fof}
    users = e_users + [u for u in f_rank if u not in seen]
    n_e, missing = len(e_users), math.log(depth + 1)
    in_e = np.arange(len(users)) < n_e
    rank_f = np.array([f_rank.get(u, 0) for u in users], dtype=np.float64)
    in_f = rank_f > 0
    x = np.empty((len(users), len(BLEND_FEATURES)), dtype=np.float64)
    x[:, 0] = in_e
    x[:, 1] = 0.0
    x[:n_e, 1] = [s for _, s in embedding]
    x[:, 2] = missing
    x[:n_e, 2] = np.log(np.arange(1, n_e + 1))
    x[:, 3] = in_f
    x[:, 4] = np.log1p([f_score.get(u, 0.0) for u in users])
    x[:, 5] = np.where(in_f, np.log(np.maximum(rank_f, 1)), missing)
    x[:, 6] = in_e & in_f
    return np.asarray(users, dtype=np.int64), x


def blend(
    embedding: Sequence[tuple[int, float]],
    fof: Sequence[tuple[int, float]],
    coef: np.ndarray,
    depth: int,
    k: int,
    seed: int = 0,
) -> list[tuple[int, float, str]]:
    """The two lists merged by a linear score of their ``blend_features`` (weights fitted on
    validation edges, ``training.evaluation.fit_blend``): (user, blend score, source), source
    ``embedding``, ``fof`` or ``both``; ties in the tie-key order."""
    users, x = blend_features(embedding, fof, depth)
    order, scores = _best(users, x @ coef, k, SCORE_DECIMALS, seed)
    names = np.where(x[:, 6] > 0, "both", np.where(x[:, 0] > 0, "embedding", "fof"))
    return [(int(users[i]), float(scores[i]), str(names[i])) for i in order]
