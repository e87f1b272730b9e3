"""Feature materialization jobs: register the definitions, then move offline rows online.

Windows are in *data time*: the end of a run is the newest ``event_timestamp`` in the offline
sources (+1 s), not the wall clock. The graph snapshots are stamped with the time they describe
(2024 on the default timeline), so a wall-clock window would skip a snapshot appended after an
earlier run. A full run re-materializes ``[epoch, end)`` (idempotent: the same latest row per user
is written again); ``--incremental`` continues from the end recorded in the registry, so only rows
appended since then travel.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
from colorama import AnsiToWin32
from feast import FeatureStore, FeatureView

from feature_repo.definitions import build_definitions
from friendrec import contract
from friendrec.config import Settings
from friendrec.errors import ContractMismatchError, NotPreparedError
from friendrec.feast_store import open_store, write_repo_dir
from friendrec.paths import DatasetPaths

log = logging.getLogger(__name__)

EPOCH = datetime(1970, 1, 2, tzinfo=UTC)


def apply(settings: Settings, dataset: str | None = None) -> FeatureStore:
    """Register entity, views, push sources and services for a dataset (idempotent)."""
    paths = DatasetPaths.of(settings, dataset)
    for source in (paths.profile_source, paths.graph_source):
        if not source.exists():
            raise NotPreparedError(
                f"{source} is missing; run `friendrec features build --dataset {paths.name}`"
            )
    write_repo_dir(settings, paths)
    store = open_store(settings, paths.name)
    store.apply(build_definitions(paths, contract.load(paths.data_dir)).objects())
    log.info("applied Feast definitions for %s (project %s)", paths.name, store.project)
    return store


def check_registered_schema(views: Iterable[FeatureView], schema_hash: str) -> None:
    """Refuse views registered for another schema (ContractMismatchError): the dataset was
    prepared again with a changed schema, and its features need building and applying again."""
    for view in views:
        registered = view.tags.get("schema_hash")
        if registered is not None and registered != schema_hash:
            raise ContractMismatchError(
                f"the registered view {view.name!r} has schema {registered!r}, the prepared "
                f"dataset has schema {schema_hash!r}; run `friendrec features build` and "
                "`friendrec features apply` again"
            )


def data_end(source: Path) -> datetime:
    """Newest event timestamp in an offline source, plus one second (an exclusive bound)."""
    column = pq.read_table(source, columns=[contract.EVENT_TIMESTAMP])[contract.EVENT_TIMESTAMP]
    newest = pc.max(column).as_py()
    if newest is None:
        return EPOCH
    return newest.astimezone(UTC) + timedelta(seconds=1)


@dataclass
class MaterializeReport:
    dataset: str
    mode: str
    views: dict[str, tuple[str, str] | None]  # view -> (start, end) or None when up to date
    online_store: str

    def as_dict(self) -> dict[str, object]:
        return {
            "dataset": self.dataset,
            "mode": self.mode,
            "online_store": self.online_store,
            "windows": {v: (list(w) if w else "up to date") for v, w in self.views.items()},
        }


def materialize(
    settings: Settings, dataset: str | None = None, incremental: bool = False
) -> MaterializeReport:
    """Materialize both views into the online store; see the module docstring for windows."""
    paths = DatasetPaths.of(settings, dataset)
    store = open_store(settings, paths.name)
    try:
        views = {v.name: v for v in store.list_feature_views()}
    except Exception as exc:  # a missing registry surfaces as various Feast errors
        raise NotPreparedError(f"no Feast registry for {paths.name}: {exc}") from exc
    missing = {contract.PROFILE_VIEW, contract.GRAPH_VIEW} - set(views)
    if missing:
        raise NotPreparedError(
            f"views {sorted(missing)} are not registered; run `friendrec features apply`"
        )
    check_registered_schema(views.values(), contract.load(paths.data_dir).schema_hash)
    sources = {contract.PROFILE_VIEW: paths.profile_source, contract.GRAPH_VIEW: paths.graph_source}
    windows: dict[str, tuple[str, str] | None] = {}
    for name, view in views.items():
        end = data_end(sources[name])
        start = EPOCH
        if incremental and view.most_recent_end_time is not None:
            start = view.most_recent_end_time.astimezone(UTC)
        if start >= end:
            windows[name] = None
            continue
        # Feast reports progress with print(): keep stdout for our JSON result, and its colour
        # codes for a terminal (a log file gets plain text).
        progress = AnsiToWin32(sys.stderr, strip=not sys.stderr.isatty()).stream
        with contextlib.redirect_stdout(progress):  # type: ignore[type-var]
            store.materialize(start_date=start, end_date=end, feature_views=[name])
        windows[name] = (start.isoformat(), end.isoformat())
    report = MaterializeReport(
        paths.name,
        "incremental" if incremental else "full",
        windows,
        settings.features.online_store,
    )
    log.info("materialized: %s", report.as_dict())
    return report
