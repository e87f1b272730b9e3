"""Feature materialization jobs: register the definitions, then move offline rows online.

Windows are in *data time*: the end of a run is the newest ``event_timestamp`` in the offline
sources (+1 s), not the wall clock. The graph snapshots are stamped with the time they describe
(2024 on the default timeline), so a wall-clock window would skip a snapshot appended after an
earlier run. A full run re-materializes ``[epoch, end)`` (idempotent: the same latest row per user
is written again); ``--incremental`` continues from the end recorded in the registry, so only rows
appended since then travel.

The engine (``--engine``, default ``engine.kind``) only changes who moves the rows: ``local`` is
Feast's in-process engine with friendrec's column-wise writer (``friendrec/feast_write.py``: one
partition of users encoded and written at a time); ``ray`` is Feast's Ray compute engine as
``friendrec/feast_ray.py`` runs it (the same encoding in parallel tasks, a bulk write into sqlite,
parallel writers into Redis). Both write Feast's bytes; ``engine.materialize_fast_write: false``
gives Feast's stock engines. Windows, registry intervals and the report are the same either way.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
from colorama import AnsiToWin32
from feast import FeatureStore, FeatureView

from feature_repo.definitions import build_definitions
from friendrec import contract
from friendrec.config import Settings
from friendrec.engine import ray_session, resolve_engine
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


def window_rows(source: Path, start: datetime, end: datetime) -> int:
    """Entities with a row in ``[start, end]`` (Feast's inclusive window): the rows a run writes
    online, one per entity and view."""
    ts = pc.field(contract.EVENT_TIMESTAMP)
    table = pq.read_table(source, columns=[contract.JOIN_KEY], filters=(ts >= start) & (ts <= end))
    return pc.count_distinct(table[contract.JOIN_KEY]).as_py()


@dataclass
class MaterializeReport:
    dataset: str
    mode: str
    views: dict[str, tuple[str, str] | None]  # view -> (start, end) or None when up to date
    online_store: str
    engine: str = "local"
    rows: dict[str, int] = field(default_factory=dict)  # view -> entities written online
    seconds: dict[str, float] = field(default_factory=dict)  # view -> wall time of its run

    @property
    def users_per_s(self) -> float | None:
        """Users moved per second of both views' runs (docs/benchmarks.md's "total rows/s")."""
        total = sum(self.seconds.values())
        users = max(self.rows.values(), default=0)
        return users / total if total > 0 and users else None

    def as_dict(self) -> dict[str, object]:
        per_s = self.users_per_s
        return {
            "dataset": self.dataset,
            "mode": self.mode,
            "engine": self.engine,
            "online_store": self.online_store,
            "windows": {v: (list(w) if w else "up to date") for v, w in self.views.items()},
            "rows": self.rows,
            "seconds": {v: round(s, 3) for v, s in self.seconds.items()},
            "users_per_s": None if per_s is None else round(per_s, 1),
        }


def materialize(
    settings: Settings,
    dataset: str | None = None,
    incremental: bool = False,
    engine: str | None = None,
) -> MaterializeReport:
    """Materialize both views into the online store; see the module docstring for windows.

    ``engine``: ``local`` or ``ray`` (None: ``engine.kind``). ``ray`` joins the configured
    cluster or starts a local Ray for the run (``friendrec.engine.ray_session``).
    """
    chosen = resolve_engine(settings, engine)
    session = ray_session(settings) if chosen == "ray" else contextlib.nullcontext()
    with session:
        return _materialize(settings, dataset, incremental, chosen)


def _materialize(
    settings: Settings, dataset: str | None, incremental: bool, engine: str
) -> MaterializeReport:
    paths = DatasetPaths.of(settings, dataset)
    store = open_store(settings, paths.name, engine=engine)
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
    rows: dict[str, int] = {}
    seconds: dict[str, float] = {}
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
        began = time.perf_counter()
        with contextlib.redirect_stdout(progress):  # type: ignore[type-var]
            store.materialize(start_date=start, end_date=end, feature_views=[name])
        seconds[name] = time.perf_counter() - began
        rows[name] = window_rows(sources[name], start, end)
        windows[name] = (start.isoformat(), end.isoformat())
    report = MaterializeReport(
        paths.name,
        "incremental" if incremental else "full",
        windows,
        settings.features.online_store,
        engine,
        rows,
        seconds,
    )
    log.info("materialized: %s", report.as_dict())
    return report
