"""The feature updater: friendship and profile events -> Feast online features -> refresh requests.

Per batch: profile updates are merged into the users' online profile rows and pushed; friendship
events are applied to the full friend sets (``streaming.state``); every user an event touched gets
its ``user_graph`` row recomputed from its full friend set with ``friend_aggregates`` (the batch
job's definition) over one online read of all needed friends' profiles, and pushed. Then a
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

from friendrec import contract
from friendrec.config import Settings
from friendrec.feast_store import open_store
from friendrec.friend_aggregates import friend_aggregates
from streaming.feast_io import read_online
from streaming.schemas import (
    FriendshipEvent,
    GraphRecompute,
    ProfileUpdate,
    RefreshRequest,
)
from streaming.state import FriendSets, open_state
from streaming.topics import Topics
from streaming.worker import Record

log = logging.getLogger(__name__)

PROFILE_REFS = contract.feature_refs(contract.PROFILE_VIEW)
FANOUT_REFRESH_S = 30.0
FRIEND_REFS = [*PROFILE_REFS, f"{contract.GRAPH_VIEW}:{contract.FRIEND_IDS.name}"]


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
    ) -> None:
        self.settings = settings
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
        current = {r[contract.JOIN_KEY]: r for r in read_online(self.store, users, PROFILE_REFS)}
        origin: dict[int, int] = {}
        for update in updates:  # in partition order: later updates win
            row = current[update.user_id]
            row.update(update.profile)
            if update.sparse_ids is not None:
                row[contract.SPARSE_IDS.name] = update.sparse_ids[
                    : self.settings.features.sparse_cap
                ]
            _min_ts(origin, update.user_id, update.event_ts)
        frame = pd.DataFrame(
            {
                contract.JOIN_KEY: users,
                **{n: [float(current[u][n]) for u in users] for n in contract.PROFILE_SCALAR_NAMES},
                contract.SPARSE_IDS.name: [
                    [int(i) for i in current[u][contract.SPARSE_IDS.name]] for u in users
                ],
                contract.EVENT_TIMESTAMP: [now] * len(users),
            }
        )
        self.store.push(contract.PROFILE_PUSH_SOURCE, frame, to=PushMode.ONLINE)
        for user, friends in self.state.friends(users).items():
            for friend in friends:
                send(
                    self.topics_.friendships,
                    GraphRecompute(user_id=friend, origin_ts=origin[user]),
                )
        return origin

    def _push_graph_rows(
        self, users: dict[int, int], now: pd.Timestamp
    ) -> dict[int, dict[str, Any]]:
        """Recompute and push the users' graph rows; returns the friends' online rows (profile
        and sampled friends), which ``_refresh_targets`` reuses: those rows are not written in
        this batch (a friend that is itself recomputed is a changed user, not a candidate)."""
        friend_sets = self.state.friends(sorted(users))
        needed = sorted({f for friends in friend_sets.values() for f in friends})
        rows = read_online(self.store, needed, FRIEND_REFS)
        # A friend with a graph row but no profile row reads the profile defaults (zeros, no
        # ids), which add exactly nothing to the aggregates: the same as leaving it out.
        known = {r[contract.JOIN_KEY]: r for r in rows if r["known"]}
        cfg, seed = self.settings.features, self.settings.data.seed
        graph = [
            {contract.JOIN_KEY: u, **friend_aggregates(u, friends, known, cfg, seed)}
            for u, friends in friend_sets.items()
        ]
        frame = pd.DataFrame(graph)
        frame[contract.EVENT_TIMESTAMP] = now
        self.store.push(contract.GRAPH_PUSH_SOURCE, frame, to=PushMode.ONLINE)
        return {r[contract.JOIN_KEY]: r for r in rows}

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
        refs = [f"{contract.GRAPH_VIEW}:{contract.FRIEND_IDS.name}"]
        fresh = {r[contract.JOIN_KEY]: r for r in read_online(self.store, missing, refs)}
        for user in candidates:
            row = rows[user] if user in rows else fresh[user]
            sampled = row[contract.FRIEND_IDS.name][: self.fanout]
            for friend in sampled:
                if friend in changed:
                    _min_ts(targets, row[contract.JOIN_KEY], changed[friend])
        return targets
