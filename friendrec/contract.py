"""The feature contract: the one place that names every user feature, its dtype and default.

Feast definitions (``feature_repo/``), the graph-feature job, the training input pipeline and the
serving path all import this module; nothing else spells a feature name. Bump ``CONTRACT_VERSION``
(and with it the feature service names) whenever a name, dtype or meaning changes.

Why these features: the user tower is a 2-layer GraphSAGE whose first operation on the sparse ids is
linear (an embedding bag). A mean over friends therefore commutes with it, so the job can
precompute each user's *friends' mean sparse bag* (``nbr_sparse_ids`` / ``nbr_sparse_weights``) and
mean transformed profile (``nbr_profile_mean``). Serving a 2-layer tower then needs two online
reads: the user (own features, aggregates, sampled ``friend_ids``), then those friends.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

CONTRACT_VERSION = 1

ENTITY_NAME = "user"
JOIN_KEY = "user_id"
EVENT_TIMESTAMP = "event_timestamp"
CREATED_TIMESTAMP = "created_ts"

PROFILE_VIEW = "user_profile"
GRAPH_VIEW = "user_graph"
PROFILE_PUSH_SOURCE = "user_profile_push"
GRAPH_PUSH_SOURCE = "user_graph_push"
TRAINING_SERVICE = f"friendrec_training_v{CONTRACT_VERSION}"
SERVING_SERVICE = f"friendrec_serving_v{CONTRACT_VERSION}"

DType = Literal["int64", "float32", "int64_list", "float32_list"]


@dataclass(frozen=True)
class Feature:
    """One named feature: storage dtype, value for users the store does not know, and why."""

    name: str
    dtype: DType
    default: Any
    description: str
    transform: Literal["identity", "log1p"] = "identity"


# Profile scalars: the union over the supported datasets, stored raw; a dataset that lacks one
# stores the default. ``transform`` is applied by ``transform_profile`` (training and serving).
PROFILE_SCALARS: tuple[Feature, ...] = (
    Feature("account_age_days", "float32", 0.0, "Days since the account was created.", "log1p"),
    Feature("views", "float32", 0.0, "Lifetime profile/stream views.", "log1p"),
    Feature("is_mature", "float32", 0.0, "1 if the account is flagged mature content."),
    Feature("is_partner", "float32", 0.0, "1 if the account is a platform partner."),
    Feature("is_ml_developer", "float32", 0.0, "1 if the developer works on machine learning."),
)
SPARSE_IDS = Feature(
    "sparse_ids", "int64_list", (), "Categorical feature ids (interests, location, ...), capped."
)
PROFILE_FEATURES: tuple[Feature, ...] = (*PROFILE_SCALARS, SPARSE_IDS)

DEGREE = Feature("degree", "int64", 0, "Number of friends in the training graph as of the row.")
FRIEND_IDS = Feature(
    "friend_ids", "int64_list", (), "Deterministic sample of friends, capped (features.friend_cap)."
)
NBR_SPARSE_IDS = Feature(
    "nbr_sparse_ids", "int64_list", (), "Ids of the friends' mean sparse bag, heaviest first."
)
NBR_SPARSE_WEIGHTS = Feature(
    "nbr_sparse_weights",
    "float32_list",
    (),
    "Weights of nbr_sparse_ids: the mean over friends of each friend's bag normalised to sum 1.",
)
NBR_PROFILE_MEAN = Feature(
    "nbr_profile_mean",
    "float32_list",
    (0.0,) * len(PROFILE_SCALARS),
    "Mean over friends of transform_profile(profile scalars); zeros without friends.",
)
GRAPH_FEATURES: tuple[Feature, ...] = (
    DEGREE,
    FRIEND_IDS,
    NBR_SPARSE_IDS,
    NBR_SPARSE_WEIGHTS,
    NBR_PROFILE_MEAN,
)

VIEWS: Mapping[str, tuple[Feature, ...]] = {
    PROFILE_VIEW: PROFILE_FEATURES,
    GRAPH_VIEW: GRAPH_FEATURES,
}
ALL_FEATURES: tuple[Feature, ...] = (*PROFILE_FEATURES, *GRAPH_FEATURES)
FEATURES_BY_NAME: Mapping[str, Feature] = {f.name: f for f in ALL_FEATURES}
PROFILE_SCALAR_NAMES: tuple[str, ...] = tuple(f.name for f in PROFILE_SCALARS)


def feature_refs(view: str | None = None) -> list[str]:
    """Feast feature references ``view:feature`` for one view or all of them."""
    views = [view] if view else list(VIEWS)
    return [f"{v}:{f.name}" for v in views for f in VIEWS[v]]


def check_profile_names(names: Iterable[str]) -> None:
    """Reject profile scalars the contract does not define (request features, profile events)."""
    unknown = sorted(set(names) - set(PROFILE_SCALAR_NAMES))
    if unknown:
        raise ValueError(
            f"unknown profile feature(s) {unknown}; the contract has {list(PROFILE_SCALAR_NAMES)}"
        )


def default_value(name: str) -> Any:
    """The value a feature takes for a user the store does not know (a fresh copy)."""
    value = FEATURES_BY_NAME[name].default
    return list(value) if isinstance(value, tuple) else value


def transform_profile(scalars: np.ndarray) -> np.ndarray:
    """Raw profile scalars [n, P] in contract order -> model-ready float32 [n, P].

    Shared by the graph-feature job (``nbr_profile_mean``), training and serving, so the three
    can never disagree on what a profile vector is.
    """
    x = np.asarray(scalars, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != len(PROFILE_SCALARS):
        raise ValueError(f"expected [n, {len(PROFILE_SCALARS)}] profile scalars, got {x.shape}")
    out = x.copy()
    for j, feature in enumerate(PROFILE_SCALARS):
        if feature.transform == "log1p":
            out[:, j] = np.log1p(np.maximum(out[:, j], 0.0))
    return out
