"""Shared fixtures: isolated workdirs, a prepared ENGB feature store, a real redis-server."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from friendrec.config import Settings, load_settings

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A real redis-server on a free loopback port, stopped (and its data gone) afterwards."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed: run `make setup` (apt redis-server)")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("redis-server did not start") from None
            time.sleep(0.05)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
