"""Friends-of-friends candidates (Adamic-Adar) and their blend with embedding retrieval.

Snap's production retrieval runs embedding retrieval beside friends-of-friends; so does the
retrieval service. The same functions score a user in the service (from the full friend sets it
reads to exclude friends) and in the offline evaluation (``training.evaluation.topk_fof`` is the
vectorised twin of ``adamic_adar``), so both return the same list: the same cap on the friends
expanded, the same tie order (a hash of the user id) and the same rounding of scores.

The blend scores each candidate of the two lists with a small perceptron (``BlendRanker``) over
what the lists say of it (``BLEND_FEATURES``: found by which source, its score and rank in each),
the model's inner product with it, its degree and the user's. The ranker is fitted on validation
edges (``training.evaluation.fit_blend``, a listwise softmax over each user's candidates), so it
learns how far an Adamic-Adar score of 3 outweighs an embedding rank of 40 on this graph, and
that a user with one friend befriends popular users where one with fifty does not; a
reciprocal-rank fusion, which sees ranks only, cannot, and a linear score of the same features
cannot say the second (docs/quality.md, session 22).

The inner product of a friend of friends the embedding list missed takes one Milvus ``get`` of
its stored vector, which slows the search it runs beside. A ranker fitted with
``reads_vectors=False`` reads none: it is given the embedding list's last score instead, which
that candidate's inner product cannot exceed (the search returned every user scoring more).
What that costs in recall and saves in latency: docs/quality.md and docs/serving.md (session 23).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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


# The blend's features of a (user, candidate) pair. From the two ranked lists: whether each source
# found the candidate, its score there and log of its rank there (a missing candidate: score 0,
# rank ``depth + 1``), and whether both found it. Then the model's inner product with the
# candidate (also for friends of friends the embedding list missed: their stored vectors), the
# candidate's degree and the user's: a user with few friends befriends popular users, one with
# many does not, which a score that treats every user alike cannot say.
BLEND_FEATURES: tuple[str, ...] = (
    "embedding",
    "embedding_score",
    "embedding_log_rank",
    "fof",
    "fof_log1p_score",
    "fof_log_rank",
    "both",
    "inner_product",
    "log1p_degree",
    "user_log1p_degree",
)


@dataclass(frozen=True)
class BlendRanker:
    """The blend's scorer: a small multi-layer perceptron over ``BLEND_FEATURES`` (standardised,
    ReLU between layers, one output), fitted on validation edges by
    ``training.blend_ranker.fit_ranker``. No hidden layer is a linear score."""

    mean: np.ndarray
    scale: np.ndarray
    layers: tuple[tuple[np.ndarray, np.ndarray], ...]
    # Fitted on the missed friends of friends' true inner products (their vectors read), or on
    # the bound ``blend_features`` puts in their place (no read).
    reads_vectors: bool = True

    def __post_init__(self) -> None:
        width = len(BLEND_FEATURES)
        if self.mean.shape != (width,) or self.scale.shape != (width,):
            raise ValueError(f"blend ranker: mean and scale need {width} values ({BLEND_FEATURES})")
        if not self.layers:
            raise ValueError("blend ranker: at least one layer")
        for i, (weight, bias) in enumerate(self.layers):
            out = 1 if i == len(self.layers) - 1 else weight.shape[-1]
            if weight.shape != (width, out) or bias.shape != (out,):
                raise ValueError(
                    f"blend ranker: layer {i} must map {width} inputs to {out} (a [{width}, {out}] "
                    f"weight and {out} biases), got {list(weight.shape)} and {list(bias.shape)}"
                )
            width = out
        arrays = [self.mean, self.scale, *(a for layer in self.layers for a in layer)]
        if not all(np.isfinite(a).all() for a in arrays) or (self.scale <= 0).any():
            raise ValueError("blend ranker: every weight must be finite and every scale > 0")

    def score(self, x: np.ndarray) -> np.ndarray:
        h = (np.asarray(x, dtype=np.float64) - self.mean) / self.scale
        for weight, bias in self.layers[:-1]:
            h = np.maximum(h @ weight + bias, 0.0)
        weight, bias = self.layers[-1]
        return (h @ weight + bias)[:, 0]

    def as_dict(self) -> dict[str, Any]:
        """Plain lists, for a settings file (``serving.blend_ranker``)."""
        return {
            "features": list(BLEND_FEATURES),
            "reads_vectors": self.reads_vectors,
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "layers": [{"weight": w.tolist(), "bias": b.tolist()} for w, b in self.layers],
        }

    @classmethod
    def from_dict(cls, value: Mapping[str, Any]) -> BlendRanker:
        """A ranker from ``as_dict``'s form, or a precise error (a ranker fitted on other
        features must be fitted again, not silently misread)."""
        features = list(value.get("features", ()))
        if features != list(BLEND_FEATURES):
            raise ValueError(
                f"blend ranker fitted on features {features}, this version has "
                f"{list(BLEND_FEATURES)}: rerun `friendrec tune` (or drop serving.blend_ranker "
                "for the default)"
            )
        try:
            layers = tuple(
                (np.asarray(layer["weight"], np.float64), np.asarray(layer["bias"], np.float64))
                for layer in value["layers"]
            )
            mean = np.asarray(value["mean"], np.float64)
            scale = np.asarray(value["scale"], np.float64)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"blend ranker: needs mean, scale and layers of weight and bias ({exc})"
            ) from None
        reads_vectors = value.get("reads_vectors", True)  # files from before the choice read them
        if not isinstance(reads_vectors, bool):
            raise ValueError(
                f"blend ranker: reads_vectors must be a boolean, got {reads_vectors!r}"
            )
        return cls(mean, scale, layers, reads_vectors)


def blend_candidates(
    embedding: Sequence[tuple[int, float]], fof: Sequence[tuple[int, float]]
) -> list[int]:
    """The friends of friends the embedding list missed: the candidates whose inner product
    and vector the blend must read besides the search's."""
    seen = {int(u) for u, _ in embedding}
    return [int(u) for u, _ in fof if int(u) not in seen]


def blend_features(
    embedding: Sequence[tuple[int, float]],
    fof: Sequence[tuple[int, float]],
    depth: int,
    inner_products: Mapping[int, float] | None,
    degrees: Mapping[int, int],
    user_degree: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The union of two ranked lists (embedding order, then the friends of friends it missed)
    and its ``BLEND_FEATURES`` matrix; ``depth``: how many candidates each source was asked for;
    ``inner_products``: the model's score of each of ``blend_candidates`` (a candidate without a
    stored vector: 0), or None for none read: each gets the embedding list's last score, the
    most it can be; ``degrees``: each candidate's friend count (missing: 0)."""
    e_users = [int(u) for u, _ in embedding]
    f_rank = {int(u): r for r, (u, _) in enumerate(fof, start=1)}
    f_score = {int(u): float(s) for u, s in fof}
    others = blend_candidates(embedding, fof)
    users = e_users + others
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
    x[:, 7] = x[:, 1]
    if inner_products is None:
        x[n_e:, 7] = x[n_e - 1, 1] if n_e else 0.0
    else:
        x[n_e:, 7] = [inner_products.get(u, 0.0) for u in others]
    x[:, 8] = np.log1p([degrees.get(u, 0) for u in users])
    x[:, 9] = math.log1p(user_degree)
    return np.asarray(users, dtype=np.int64), x


def blend(
    embedding: Sequence[tuple[int, float]],
    fof: Sequence[tuple[int, float]],
    ranker: BlendRanker,
    depth: int,
    k: int,
    inner_products: Mapping[int, float] | None,
    degrees: Mapping[int, int],
    user_degree: int,
    seed: int = 0,
) -> list[tuple[int, float, str]]:
    """The two lists merged by the ranker's score of their ``blend_features`` (fitted on
    validation edges): (user, blend score, source), source ``embedding``, ``fof`` or ``both``;
    ties in the tie-key order. ``inner_products`` is not used by a ranker that reads no vectors."""
    products = inner_products if ranker.reads_vectors else None
    users, x = blend_features(embedding, fof, depth, products, degrees, user_degree)
    if not len(users):
        return []
    order, scores = _best(users, ranker.score(x), k, SCORE_DECIMALS, seed)
    names = np.where(x[:, 6] > 0, "both", np.where(x[:, 0] > 0, "embedding", "fof"))
    return [(int(users[i]), float(scores[i]), str(names[i])) for i in order]
