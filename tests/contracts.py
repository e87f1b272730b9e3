"""Hand-made feature contracts for unit tests that need no prepared dataset."""

from __future__ import annotations

from friendrec.contract import Categorical, Contract, Feature


def twitch_like(schema_hash: str = "test0twitch0") -> Contract:
    """The shape of a prepared Twitch graph's contract: four raw scalars (two log1p), one
    multi-valued categorical with identity ids."""
    scalars = (
        Feature("account_age_days", "float32", 0.0, "days", "log1p", kind="numeric"),
        Feature("views", "float32", 0.0, "views", "log1p", kind="numeric"),
        Feature("is_mature", "float32", 0.0, "mature", kind="boolean"),
        Feature("is_partner", "float32", 0.0, "partner", kind="boolean"),
    )
    interests = Categorical("interests", "multi_categorical", "integer", 0, 3170, None, None, None)
    return Contract("twitch/TEST", schema_hash, scalars, (interests,))


def tagged(schema_hash: str = "test0tagged0") -> Contract:
    """A team's own kind of contract: a clipped, standardised number, a flag, a string
    categorical and string tags (each vocabulary with its out-of-vocabulary id last)."""
    scalars = (
        Feature("plays", "float32", 0.0, "plays", "standardise", 0.0, 100.0, 20.0, 10.0, "numeric"),
        Feature("verified", "float32", 0.0, "verified", kind="boolean"),
    )
    country = Categorical("country", "categorical", "string", 0, 3, ("DE", "FR"), None, "DE")
    tags = Categorical(
        "tags", "multi_categorical", "string", 3, 4, ("jazz", "rock", "pop"), 8, None
    )
    return Contract("own/TEST", schema_hash, scalars, (country, tags))
