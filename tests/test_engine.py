"""``friendrec.engine.ray_session``'s start-up policy (pure unit tests: Ray's entry points are
replaced; the engine tests of the graph job, materialization and index build run a real Ray)."""

from __future__ import annotations

import pytest
import ray

from friendrec import engine
from friendrec.config import Settings


class FlakyInit:
    """``ray.init`` that fails ``failures`` times, then starts."""

    def __init__(self, failures: int) -> None:
        self.failures, self.calls, self.shutdowns = failures, 0, 0

    def init(self, **kwargs: object) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise TimeoutError("Timed out waiting for file gcs_server_port")

    def shutdown(self) -> None:
        self.shutdowns += 1


@pytest.fixture
def flaky(monkeypatch):
    def install(failures: int) -> FlakyInit:
        fake = FlakyInit(failures)
        monkeypatch.setattr(ray, "is_initialized", lambda: False)
        monkeypatch.setattr(ray, "init", fake.init)
        monkeypatch.setattr(ray, "shutdown", fake.shutdown)
        monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
        return fake

    return install


def test_a_local_start_that_times_out_is_retried(flaky, tmp_path):
    fake = flaky(engine.LOCAL_START_ATTEMPTS - 1)
    with engine.ray_session(Settings(workdir=tmp_path)):
        assert fake.calls == engine.LOCAL_START_ATTEMPTS
    # each failed start cleaned up, and the session stopped the Ray it started
    assert fake.shutdowns == engine.LOCAL_START_ATTEMPTS


def test_a_local_start_gives_up_with_a_precise_error(flaky, tmp_path):
    fake = flaky(engine.LOCAL_START_ATTEMPTS)
    with (
        pytest.raises(engine.EngineError, match=r"a local Ray \(3 attempts\): Timed out"),
        engine.ray_session(Settings(workdir=tmp_path)),
    ):
        pass
    assert fake.calls == engine.LOCAL_START_ATTEMPTS


def test_a_configured_cluster_is_not_retried(flaky, tmp_path):
    fake = flaky(1)
    settings = Settings(workdir=tmp_path, engine={"ray_address": "ray://10.0.0.1:10001"})
    with (
        pytest.raises(engine.EngineError, match=r"ray://10\.0\.0\.1:10001: Timed out"),
        engine.ray_session(settings),
    ):
        pass
    assert fake.calls == 1
