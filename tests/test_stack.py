"""`friendrec up / down`: the local stack's processes start, answer, and stop without a trace."""

from __future__ import annotations

import os
import signal
import time

import pytest
from tiny_models import ExportedModels

from friendrec.local_services import free_port
from friendrec.stack import LocalStack, _alive
from serving.client import RecommenderClient, recommend_request
from serving.index_build import build_index

pytestmark = pytest.mark.integration


def test_up_serves_recommendations_and_down_leaves_nothing(exported_models: ExportedModels):
    base = exported_models.settings
    settings = base.model_copy(
        update={
            "milvus": base.milvus.model_copy(update={"uri": f"http://127.0.0.1:{free_port()}"}),
            "tfserving": base.tfserving.model_copy(update={"port": free_port()}),
            "serving": base.serving.model_copy(
                update={"port": free_port(), "metrics_port": free_port()}
            ),
            "streaming": base.streaming.model_copy(
                update={"bootstrap_servers": f"127.0.0.1:{free_port()}"}
            ),
        }
    )
    stack = LocalStack(settings)
    try:
        state = stack.up(["milvus", "tfserving", "broker", "service"])
        # No index yet: the service runs but cannot serve, and status says so.
        (service,) = [row for row in stack.status() if row["component"] == "service"]
        assert service["running"] and service["health"] == "NOT_SERVING"
        assert set(state) == {"milvus", "tfserving", "broker", "service"}
        assert stack.up(["milvus"]) == state  # idempotent: nothing started twice
        build_index(stack.settings, 2, show_progress=False)
        with RecommenderClient(stack.settings, timeout_s=10) as client:
            response = client.recommend(recommend_request(int(exported_models.user_ids[3]), 5))
        assert response.model_version == 2 and len(response.candidates) == 5
        assert all(row["running"] for row in stack.status())
        deadline = time.monotonic() + 20  # the service's health probe runs every 2 s
        while stack.service_health() != "SERVING":
            assert time.monotonic() < deadline, stack.status()
            time.sleep(0.5)
        assert os.path.getsize(state["tfserving"]["log"]) > 0  # every process logs to a file
        assert os.path.getsize(state["service"]["log"]) > 0
        # A worker is up once it holds partitions and finished a poll loop (its heartbeat);
        # one that dies is reported down, not running.
        state = stack.up(["feature-updater"])
        (worker,) = [row for row in stack.status() if row["component"] == "feature-updater"]
        assert worker["running"] and worker["health"].startswith("ready: "), worker
        os.kill(state["feature-updater"]["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(state["feature-updater"]["pid"]):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        (worker,) = [row for row in stack.status() if row["component"] == "feature-updater"]
        assert not worker["running"] and worker["health"].startswith("down"), worker
    finally:
        stopped = stack.down()
    assert set(stopped) == {"milvus", "tfserving", "broker", "service"}
    assert not any(_alive(entry["pid"]) for entry in state.values())
    assert stack.status() == [] and not stack.paths.state.exists()


def test_index_commands_use_the_running_stacks_milvus(tmp_path, monkeypatch):
    """`friendrec index build` with default settings (a milvus-lite file) writes where the stack's
    service reads while `friendrec up` runs Milvus, and the file otherwise."""
    import json
    from pathlib import Path

    from friendrec.cli.index import index_settings
    from friendrec.stack import StackPaths

    monkeypatch.setenv("FRIENDREC_WORKDIR", str(tmp_path))
    monkeypatch.delenv("FRIENDREC_MILVUS__URI", raising=False)
    alone = index_settings()
    assert not (alone.milvus.uri or "").startswith("http")  # the milvus-lite file by default
    paths = StackPaths(tmp_path / "stack")
    paths.root.mkdir(parents=True)
    # This very process stands in for the stack's Milvus (its command line holds the marker).
    marker = Path("/proc/self/cmdline").read_bytes().split(b"\0")[0].decode()
    paths.state.write_text(json.dumps({"milvus": {"pid": os.getpid(), "marker": marker}}))
    assert index_settings().milvus.uri == LocalStack(alone).settings.milvus.uri
    assert index_settings().milvus.uri.startswith("http://127.0.0.1:")
