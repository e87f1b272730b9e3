"""Versioned message schemas of the streaming topics (JSON, one object per message).

Every message carries a ``schema`` literal (``<kind>.v<N>``): a consumer knows exactly what it
reads, and a new version can be rolled out next to the old one. Messages are keyed by the user
whose state they change (``key = str(user_id)`` as ASCII), so Kafka keeps each user's events in
one partition, in order.

A friendship (u, v) is produced as TWO ``FriendshipEvent`` messages, one keyed by each endpoint
(``user_id=u, friend_id=v`` and ``user_id=v, friend_id=u``): each event changes only its own
``user_id``'s state, in the partition that owns that user, so no two partitions (or group members)
ever write the same user's friend set and no cross-partition coordination is needed.

``decode`` turns bytes into a model or raises ``MessageError`` whose text is the dead-letter
reason.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

UserId = Annotated[int, Field(ge=0)]
Millis = Annotated[int, Field(ge=0, description="Unix time in milliseconds.")]


class MessageError(ValueError):
    """An undecodable or invalid message; the text is the dead-letter reason."""


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def encode(self) -> bytes:
        """JSON with the version field spelled ``schema``."""
        return self.model_dump_json(by_alias=True).encode()

    @property
    def key(self) -> bytes:
        return str(self.user_id).encode("ascii")  # type: ignore[attr-defined]


class FriendshipEvent(_Message):
    """One endpoint's side of a friendship change (see module docstring)."""

    schema_: Literal["friendship.v1"] = Field("friendship.v1", alias="schema")
    op: Literal["add", "remove"]
    user_id: UserId
    friend_id: UserId
    event_ts: Millis

    @model_validator(mode="after")
    def _not_self(self) -> FriendshipEvent:
        if self.user_id == self.friend_id:
            raise ValueError("a user cannot befriend itself")
        return self

    def mirrored(self) -> FriendshipEvent:
        return self.model_copy(update={"user_id": self.friend_id, "friend_id": self.user_id})


class GraphRecompute(_Message):
    """Recompute one user's graph row (a friend's profile changed): produced by the feature
    updater onto the friendship topic, keyed by that user, so the row is written only by the
    partition that owns the user."""

    schema_: Literal["graph_recompute.v1"] = Field("graph_recompute.v1", alias="schema")
    user_id: UserId
    origin_ts: Millis


class ProfileUpdate(_Message):
    """New raw values of a user's declared features (schema names; numbers, booleans, strings, lists
    of strings or integers); omitted features keep their current online value. ``sparse_ids``
    (already encoded ids) replaces the current ids; a categorical feature in ``profile`` then
    replaces its own ids. Decoding is schema-agnostic: the feature updater checks and encodes the
    values with the dataset's contract, and dead-letters an event it refuses."""

    schema_: Literal["profile.v1"] = Field("profile.v1", alias="schema")
    user_id: UserId
    profile: dict[str, Any] = Field(default_factory=dict)
    sparse_ids: list[Annotated[int, Field(ge=0)]] | None = None
    event_ts: Millis


class RefreshRequest(_Message):
    """Recompute this user's embedding; ``origin_ts`` is the oldest event that caused it."""

    schema_: Literal["refresh.v1"] = Field("refresh.v1", alias="schema")
    user_id: UserId
    origin_ts: Millis


class UserEmbedding(_Message):
    """A fresh embedding of one user, computed by ``model_version``."""

    schema_: Literal["embedding.v1"] = Field("embedding.v1", alias="schema")
    user_id: UserId
    model_version: Annotated[int, Field(ge=0)]
    vector: list[float] = Field(min_length=1)
    origin_ts: Millis
    computed_at: Millis


DEAD_LETTER_MAX_VALUE = 256 * 1024  # bytes of the original kept in a letter (base64: 4/3 of it)


class DeadLetter(BaseModel):
    """A message a worker could not use, with where it came from and why (value base64)."""

    schema_: Literal["dead_letter.v1"] = Field("dead_letter.v1", alias="schema")
    worker: str
    topic: str
    partition: int
    offset: int
    key_b64: str | None
    value_b64: str
    reason: str
    at: Millis
    # The original's size and SHA-256; an original over DEAD_LETTER_MAX_VALUE is kept truncated
    # (a letter must fit the producer's request size, or the dead letter itself kills the worker).
    value_size: int | None = None
    value_sha256: str | None = None
    truncated: bool = False

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def encode(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()

    @classmethod
    def of(cls, value: bytes | None, key: bytes | None, **fields: Any) -> DeadLetter:
        """A letter for an original ``value``: kept whole up to DEAD_LETTER_MAX_VALUE bytes,
        else its head, always with its size and SHA-256 (so an operator can find the original
        at its topic, partition and offset, and tell whether a copy matches)."""
        value = value or b""
        kept = value[:DEAD_LETTER_MAX_VALUE]
        return cls(
            key_b64=base64.b64encode(key[:DEAD_LETTER_MAX_VALUE]).decode()
            if key is not None
            else None,
            value_b64=base64.b64encode(kept).decode(),
            value_size=len(value),
            value_sha256=hashlib.sha256(value).hexdigest(),
            truncated=len(kept) < len(value),
            **fields,
        )


Message = FriendshipEvent | GraphRecompute | ProfileUpdate | RefreshRequest | UserEmbedding
SCHEMAS: dict[str, type[_Message]] = {
    "friendship.v1": FriendshipEvent,
    "graph_recompute.v1": GraphRecompute,
    "profile.v1": ProfileUpdate,
    "refresh.v1": RefreshRequest,
    "embedding.v1": UserEmbedding,
}


def decode(value: bytes | None, allowed: tuple[str, ...], key: bytes | None = None) -> Message:
    """Bytes -> the message model named by its ``schema`` field, which must be one of
    ``allowed`` (the topic's schemas); the key, when given, must be the message's user id."""
    if value is None:
        raise MessageError("empty message (tombstone)")
    try:
        raw = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MessageError(f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise MessageError(f"not a JSON object but {type(raw).__name__}")
    name = raw.get("schema")
    if name not in allowed:
        raise MessageError(f"schema {name!r} is not accepted here (expected one of {allowed})")
    try:
        message = SCHEMAS[name].model_validate(raw)
    except ValidationError as exc:
        errors = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(message)'}: {e['msg']}" for e in exc.errors()
        )
        raise MessageError(f"invalid {name}: {errors}") from None
    if key is not None and key != message.key:
        raise MessageError(f"key {key!r} is not the message's user_id {message.user_id}")
    return message  # type: ignore[return-value]
