"""The ``user_graph`` features of one user computed from its friends' profile features.

The batch graph-feature job (``feature_repo/jobs/graph_features.py``) computes them for every user
at once with sparse matrices; this is the same definition for a single user whose friends are
known by id only at request (or event) time: the retrieval service uses it for users Feast does not
know yet, from the friends the caller names. Keep the two in step: a test compares them on ENGB.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from friendrec.config import FeatureSettings
from friendrec.contract import (
    DEGREE,
    FRIEND_IDS,
    JOIN_KEY,
    NBR_SPARSE_IDS,
    NBR_SPARSE_WEIGHTS,
    SPARSE_IDS,
    Contract,
)
from friendrec.sampling import sample_friends


@dataclass(frozen=True)
class RequestFeatures:
    """Profile features (raw scalars, contract names) and friends of a user, supplied by a caller.

    Names are checked against the dataset's contract by ``check`` (the serving path calls it).
    """

    profile: Mapping[str, float] = field(default_factory=dict)
    sparse_ids: Sequence[int] = ()
    friend_ids: Sequence[int] = ()

    def __post_init__(self) -> None:
        if any(int(i) < 0 for i in self.sparse_ids):
            raise ValueError("sparse_ids must be >= 0")

    def check(self, contract: Contract) -> RequestFeatures:
        """Reject profile scalars ``contract`` does not define (ValueError); returns self."""
        contract.check_profile_names(self.profile)
        return self

    def profile_row(self, user_id: int, sparse_cap: int, contract: Contract) -> dict[str, Any]:
        """The user's ``user_profile`` row (contract defaults for what the caller left out)."""
        row: dict[str, Any] = {JOIN_KEY: int(user_id)}
        for name in contract.profile_scalar_names:
            row[name] = float(self.profile.get(name, contract.default_value(name)))
        row[SPARSE_IDS.name] = [int(i) for i in self.sparse_ids][:sparse_cap]
        return row


def friend_aggregates(
    user_id: int,
    friend_ids: Sequence[int],
    friend_rows: Mapping[int, Mapping[str, Any]],
    features: FeatureSettings,
    seed: int,
    *,
    contract: Contract,
) -> dict[str, Any]:
    """``user_graph`` features (contract names) of ``user_id`` with friends ``friend_ids``.

    ``friend_rows`` maps a friend id to its profile features (raw scalars and ``sparse_ids``, as
    Feast returns them); friends without a row count towards the degree and the sample but add
    nothing to the aggregates, as they would have no profile in the batch job either.
    """
    friends = np.unique(np.asarray(list(friend_ids), dtype=np.int64))
    friends = friends[friends != user_id]
    sample = sample_friends(seed, user_id, friends, features.friend_cap)
    degree = len(friends)
    present = [friend_rows[int(f)] for f in friends if int(f) in friend_rows]
    names = contract.profile_scalar_names
    if present and degree:
        scalars = np.array([[row[n] for n in names] for row in present], dtype=np.float32)
        # The batch job divides the sum over present friends by the full degree.
        profile_mean = contract.transform_profile(scalars).sum(axis=0) / np.float32(degree)
    else:
        profile_mean = np.zeros(len(names), dtype=np.float32)
    bags = [list(row[SPARSE_IDS.name] or ())[: features.sparse_cap] for row in present]
    bags = [ids for ids in bags if ids]
    lengths = np.array([len(ids) for ids in bags], dtype=np.int64)
    ids = np.fromiter((int(i) for b in bags for i in b), dtype=np.int64, count=int(lengths.sum()))
    # Each friend's bag normalised to sum 1, summed in float32 in friend order (np.add.at is
    # sequential and unbuffered), as a per-id Python loop would: ties must break the same way.
    weights = np.repeat(np.float32(1.0) / lengths.astype(np.float32), lengths)
    bag_ids, slot = np.unique(ids, return_inverse=True)
    bag = np.zeros(len(bag_ids), dtype=np.float32)
    np.add.at(bag, slot, weights)
    # Heaviest first, ties by the smaller id (as the batch job orders them).
    top = np.lexsort((bag_ids, -bag))[: features.nbr_sparse_cap]
    inv_degree = np.float32(1.0 / degree) if degree else np.float32(0.0)
    return {
        DEGREE.name: degree,
        FRIEND_IDS.name: [int(f) for f in sample],
        NBR_SPARSE_IDS.name: bag_ids[top].tolist(),
        NBR_SPARSE_WEIGHTS.name: (bag[top] * inv_degree).astype(np.float32).tolist(),
        contract.nbr_profile_mean.name: [float(x) for x in profile_mean],
    }
