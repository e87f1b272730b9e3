"""Shared fixtures: isolated workdirs, a prepared ENGB feature store, a real redis-server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from friendrec.config import Settings, load_settings
from friendrec.local_services import redis_server

REPO_ROOT = Path(__file__).resolve().parent.parent


def make_settings(workdir: Path, **overrides) -> Settings:
    return load_settings(workdir=workdir, **overrides)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Default settings with a private workdir."""
    return make_settings(tmp_path / "work")


@pytest.fixture(scope="session")
def engb_store(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """twitch/ENGB prepared, graph features built, applied and materialized into sqlite.

    Read-only for tests: anything that mutates builds its own workdir.
    """
    from feature_repo.jobs.graph_features import build_features
    from feature_repo.jobs.materialize import apply, materialize
    from friendrec.data.canonical import prepare

    settings = make_settings(tmp_path_factory.mktemp("engb"))
    prepare(settings, "twitch/ENGB")
    build_features(settings, "twitch/ENGB", show_progress=False)
    apply(settings, "twitch/ENGB")
    materialize(settings, "twitch/ENGB")
    return settings


@pytest.fixture(scope="session")
def exported_models(engb_store: Settings, tmp_path_factory: pytest.TempPathFactory):
    """Two versions of a tiny ENGB user tower in a private model base path (TF Serving layout),
    with the training code's embedding of every user per version. Read-only for tests."""
    from tiny_models import export_untrained_versions

    return export_untrained_versions(engb_store, tmp_path_factory.mktemp("serving_models"))


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A real redis-server on a free loopback port, stopped (and its data gone) afterwards."""
    with redis_server() as address:
        yield address


@pytest.fixture(scope="session")
def ray_engine() -> Iterator[None]:
    """One local Ray (2 CPUs, a small object store) shared by every engine test of the session:
    ``friendrec.engine.ray_session`` joins it instead of starting its own."""
    import ray

    ray.init(
        num_cpus=2,
        object_store_memory=512 * 1024 * 1024,
        include_dashboard=False,
        log_to_driver=False,
    )
    try:
        yield
    finally:
        ray.shutdown()
