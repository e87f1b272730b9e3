"""The batch jobs' engine: this process (``local``) or Ray.

One entry point, ``ray_session``, connects every job to the same cluster: the one at
``engine.ray_address`` when set, else a local Ray started for the command and stopped after it.
A process that already joined a cluster (a test session's shared local Ray, a job submitted to a
cluster) keeps it: nested sessions neither start a second one nor stop the first.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Literal

from friendrec.config import Settings
from friendrec.errors import FriendrecError

log = logging.getLogger(__name__)

Engine = Literal["local", "ray"]


# Starting a local Ray waits a fixed time for its GCS to come up; on a machine busy with other
# jobs that start timed out once in a measured run (bench scale, 2 loaded cores). A joined
# cluster is not retried: an address that does not answer is a configuration error.
LOCAL_START_ATTEMPTS = 3


class EngineError(FriendrecError):
    """The engine could not be reached or started."""


def resolve_engine(settings: Settings, engine: str | None) -> Engine:
    """The command's ``--engine`` if given, else ``engine.kind`` from the settings."""
    chosen = engine or settings.engine.kind
    if chosen not in ("local", "ray"):
        raise ValueError(f"unknown engine {chosen!r}: use 'local' or 'ray'")
    return chosen  # type: ignore[return-value]


@contextlib.contextmanager
def ray_session(settings: Settings) -> Iterator[None]:
    """Joins the configured Ray cluster, or starts a local one for the duration (see module)."""
    import ray

    if ray.is_initialized():
        yield
        return
    cfg = settings.engine
    # Workers import friendrec, training and feature_repo from the project root (an editable
    # install puts it on sys.path in this venv; a cluster's image installs the package).
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    kwargs: dict[str, object] = {
        "include_dashboard": False,
        "log_to_driver": settings.log_level.upper() == "DEBUG",
        "logging_level": logging.WARNING,
    }
    if cfg.ray_address:
        kwargs["address"] = cfg.ray_address
        where = cfg.ray_address
    else:
        kwargs["num_cpus"] = cfg.num_cpus
        kwargs["object_store_memory"] = cfg.object_store_mb * 1024 * 1024
        where = "a local Ray"
    attempts = 1 if cfg.ray_address else LOCAL_START_ATTEMPTS
    for attempt in range(1, attempts + 1):
        try:
            ray.init(**kwargs)
            break
        except Exception as exc:  # ConnectionError, RuntimeError, TimeoutError, ...
            with contextlib.suppress(Exception):  # what a failed start left behind
                ray.shutdown()
            if attempt == attempts:
                tries = f" ({attempts} attempts)" if attempts > 1 else ""
                raise EngineError(f"could not start or reach {where}{tries}: {exc}") from exc
            log.warning(
                "could not start a local Ray (attempt %d of %d): %s", attempt, attempts, exc
            )
    log.info("ray: joined %s (%s CPUs)", where, int(ray.cluster_resources().get("CPU", 0)))
    try:
        yield
    finally:
        ray.shutdown()


def ray_partitions(settings: Settings) -> int:
    """How many pieces a job splits its users into (``engine.partitions``, else 2 per CPU)."""
    import ray

    if settings.engine.partitions:
        return settings.engine.partitions
    return max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
