"""The feature updater: friendship and profile events -> Feast online features -> refresh requests.

Profile events carry raw values of the dataset's declared features; the dataset's contract checks
and encodes them (numbers and booleans -> profile scalars, categorical values -> their sparse ids, a
value outside a vocabulary -> its feature's out-of-vocabulary id). An event the contract refuses
(an unknown feature, a value of the wrong type) goes to the dead-letter topic with the reason
(``invalid``), and the rest of its batch is applied.

Per batch: profile updates are merged into the users' online profile rows and pushed; friendship
events are applied to the full friend sets (``friendrec.friend_sets``); every user an event touched
gets its ``user_graph`` row recomputed from its full friend set with ``friend_aggregates`` (the
batch job's definition) over one online read of all needed friends' profiles, and pushed. Then a
``RefreshRequest`` goes out for every user whose tower inputs changed: each changed user, and every
friend w whose first ``fanout`` sampled friends include a changed user (w's second GraphSAGE layer
reads that user's features).

A profile change also changes the aggregates of the user's friends; those rows belong to other
users' partitions, so the updater sends them a ``GraphRecompute`` (keyed by the friend) instead of
writing them itself: every user's graph row is written only by the member owning its partition.

Rows are pushed with the processing time as event timestamp (not the event's own time): the row is
the state as of now, and Redis's online store ignores writes that are not newer than the stored
row. Everything is recomputed from state on every delivery, so a replayed batch is harmless.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import pandas as pd
from feast.data_source import PushMode

from friendrec.config import Settings
from friendrec.contract import (
    EVENT_TIMESTAMP,
    FRIEND_IDS,
    GRAPH_PUSH_SOURCE,
    GRAPH_VIEW,
    JOIN_KEY,
    PROFILE_PUSH_SOURCE,
    PROFILE_VIEW,
    SPARSE_IDS,
    Contract,
)
from friendrec.feast_store import open_store
from friendrec.friend_aggregates import friend_aggregates
from friendrec.friend_sets import FriendSets, open_state
from friendrec.paths import load_contract
from streaming.feast_io import read_online
from streaming.schemas import (
    FriendshipEvent,
    GraphRecompute,
    Message,
    ProfileUpdate,
    RefreshRequest,
)
from streaming.topics import Topics
from streaming.worker import Record

log = logging.getLogger(__name__)

FANOUT_REFRESH_S = 30.0
FRIEND_IDS_REF = f"{GRAPH_VIEW}:{FRIEND_IDS.name}"


def live_fanout(settings: Settings) -> int:
    """The second-layer fan-out of the live model (its serving signature), else the setting."""
    from serving.index import EmbeddingIndex
    from serving.tfserving.client import TFServingClient

    try:
        with EmbeddingIndex.connect(settings, timeout=5.0) as index:
            live = index.live()
        if live is not None:
            with TFServingClient(
                settings.tfserving.address, settings.serving.model_name, timeout_s=5.0
            ) as client:
                return client.input_spec(live.model_version).fanout
    except Exception as exc:  # a worker must start even when serving is not up yet
        log.warning("live model fan-out unknown (%s); using training.fanout", exc)
    return settings.training.fanout


def _min_ts(into: dict[int, int], user: int, ts: int) -> None:
    into[user] = min(ts, into.get(user, ts))


class FeatureUpdater:
    """The ``feature-updater`` processor (see module docstring)."""

    name = "feature-updater"

    def __init__(
        self,
        settings: Settings,
        store: Any | None = None,
        state: FriendSets | None = None,
        fanout: int | None = None,
        contract: Contract | None = None,
    ) -> None:
        """``contract``: the active dataset's (default: loaded from its prepared data)."""
        self.settings = settings
        self.contract = contract if contract is not None else load_contract(settings)
        self.profile_refs = self.contract.feature_refs(PROFILE_VIEW)
        self.friend_refs = [*self.profile_refs, FRIEND_IDS_REF]
        self.topics_ = Topics.of(settings)
        self.store = store if store is not None else open_store(settings)
        self.state = state if state is not None else open_state(settings)
        self._fixed_fanout = fanout
        self._fanout = fanout if fanout is not None else live_fanout(settings)
        self._fanout_at = time.monotonic()

    @property
    def fanout(self) -> int:
        """The live model's fan-out, looked up again every ``FANOUT_REFRESH_S`` (a promotion may
        bring a model with another fan-out)."""
        if self._fixed_fanout is None and time.monotonic() - self._fanout_at > FANOUT_REFRESH_S:
            self._fanout = live_fanout(self.settings)
            self._fanout_at = time.monotonic()
        return self._fanout

    def topics(self) -> tuple[str, ...]:
        return (self.topics_.friendships, self.topics_.profiles)

    def invalid(self, message: Message) -> str | None:
        """Why a profile event cannot be applied (the contract refuses its values), else None:
        the worker dead-letters it with this reason."""
        if not isinstance(message, ProfileUpdate):
            return None
        try:
            self.contract.encode_profile(message.profile)
        except ValueError as exc:
            return (
                f"profile.v1 of user {message.user_id} does not fit the contract of "
                f"{self.contract.dataset!r} (schema {self.contract.schema_hash}): {exc}"
            )
        return None

    def close(self) -> None:
        self.state.close()

    def process(self, records: Sequence[Record], send: Callable[[str, Any], None]) -> None:
        changes: list[tuple[str, int, int]] = []
        graph_users: dict[int, int] = {}  # user -> oldest originating event time (ms)
        profiles: list[ProfileUpdate] = []
        for record in records:
            m = record.message
            if isinstance(m, FriendshipEvent):
                changes.append((m.op, m.user_id, m.friend_id))
                _min_ts(graph_users, m.user_id, m.event_ts)
            elif isinstance(m, GraphRecompute):
                _min_ts(graph_users, m.user_id, m.origin_ts)
            elif isinstance(m, ProfileUpdate):
                profiles.append(m)
        now = pd.Timestamp(datetime.now(UTC))
        changed: dict[int, int] = {}
        if profiles:
            changed.update(self._push_profiles(profiles, now, send))
        if changes:
            self.state.apply(changes)
        friend_rows: dict[int, dict[str, Any]] = {}
        if graph_users:
            friend_rows = self._push_graph_rows(graph_users, now)
            for user, ts in graph_users.items():
                _min_ts(changed, user, ts)
        if changed:
            for user, ts in self._refresh_targets(changed, friend_rows).items():
                send(self.topics_.refresh, RefreshRequest(user_id=user, origin_ts=ts))

    def _push_profiles(
        self, updates: list[ProfileUpdate], now: pd.Timestamp, send: Callable[[str, Any], None]
    ) -> dict[int, int]:
        users = sorted({u.user_id for u in updates})
        rows = read_online(self.store, users, self.profile_refs, contract=self.contract)
        current = {r[JOIN_KEY]: r for r in rows}
        origin: dict[int, int] = {}
        for update in updates:  # in partition order: later updates win
            self._apply_profile(current[update.user_id], update)
            _min_ts(origin, update.user_id, update.event_ts)
        cap = self.settings.features.sparse_cap
        names = self.contract.profile_scalar_names
        sparse = [[int(i) for i in current[u][SPARSE_IDS.name][:cap]] for u in users]
        frame = pd.DataFrame(
            {
                JOIN_KEY: users,
                **{n: [float(current[u][n]) for u in users] for n in names},
                SPARSE_IDS.name: sparse,
                EVENT_TIMESTAMP: [now] * len(users),
            }
        )
        self.store.push(PROFILE_PUSH_SOURCE, frame, to=PushMode.ONLINE)
        for user, friends in self.state.friends(users).items():
            for friend in friends:
                send(
                    self.topics_.friendships,
                    GraphRecompute(user_id=friend, origin_ts=origin[user]),
                )
        return origin

    def _apply_profile(self, row: dict[str, Any], update: ProfileUpdate) -> None:
        """Merge one event into a user's online profile row: explicit ``sparse_ids`` first, then
        the declared features encoded by the contract (a categorical one replaces its own ids)."""
        if update.sparse_ids is not None:
            row[SPARSE_IDS.name] = list(update.sparse_ids)
        scalars, sparse_ids = self.contract.encode_profile(update.profile, row[SPARSE_IDS.name])
        row.update(scalars)
        if sparse_ids is not None:
            row[SPARSE_IDS.name] = sparse_ids

    def _push_graph_rows(
        self, users: dict[int, int], now: pd.Timestamp
    ) -> dict[int, dict[str, Any]]:
        """Recompute and push the users' graph rows; returns the friends' online rows (profile
        and sampled friends), which ``_refresh_targets`` reuses: those rows are not written in
        this batch (a friend that is itself recomputed is a changed user, not a candidate)."""
        friend_sets = self.state.friends(sorted(users))
        needed = sorted({f for friends in friend_sets.values() for f in friends})
        rows = read_online(self.store, needed, self.friend_refs, contract=self.contract)
        # A friend with a graph row but no profile row reads the profile defaults (zeros, no
        # ids), which add exactly nothing to the aggregates: the same as leaving it out.
        known = {r[JOIN_KEY]: r for r in rows if r["known"]}
        cfg, seed = self.settings.features, self.settings.data.seed
        graph = [
            {
                JOIN_KEY: u,
                **friend_aggregates(u, friends, known, cfg, seed, contract=self.contract),
            }
            for u, friends in friend_sets.items()
        ]
        frame = pd.DataFrame(graph)
        frame[EVENT_TIMESTAMP] = now
        self.store.push(GRAPH_PUSH_SOURCE, frame, to=PushMode.ONLINE)
        return {r[JOIN_KEY]: r for r in rows}

    def _refresh_targets(
        self, changed: dict[int, int], rows: dict[int, dict[str, Any]]
    ) -> dict[int, int]:
        """Changed users, plus each friend whose first ``fanout`` sampled friends include one
        (``rows``: online rows already read in this batch)."""
        targets = dict(changed)
        if not self.settings.streaming.refresh_dependents:
            return targets
        friend_sets = self.state.friends(sorted(changed))
        candidates = sorted({f for fs in friend_sets.values() for f in fs} - set(changed))
        if not candidates:
            return targets
        missing = [c for c in candidates if c not in rows]
        read = read_online(self.store, missing, [FRIEND_IDS_REF], contract=self.contract)
        fresh = {r[JOIN_KEY]: r for r in read}
        for user in candidates:
            row = rows[user] if user in rows else fresh[user]
            sampled = row[FRIEND_IDS.name][: self.fanout]
            for friend in sampled:
                if friend in changed:
                    _min_ts(targets, row[JOIN_KEY], changed[friend])
        return targets
