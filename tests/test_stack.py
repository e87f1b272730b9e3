"""`friendrec up / down`: the local stack's processes start, answer, and stop without a trace."""

from __future__ import annotations

import os

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
        assert set(state) == {"milvus", "tfserving", "broker", "service"}
        assert stack.up(["milvus"]) == state  # idempotent: nothing started twice
        build_index(stack.settings, 2, show_progress=False)
        with RecommenderClient(stack.settings, timeout_s=10) as client:
            response = client.recommend(recommend_request(int(exported_models.user_ids[3]), 5))
        assert response.model_version == 2 and len(response.candidates) == 5
        assert all(row["running"] for row in stack.status())
        assert os.path.getsize(state["tfserving"]["log"]) > 0  # every process logs to a file
        assert os.path.getsize(state["service"]["log"]) > 0
    finally:
        stopped = stack.down()
    assert set(stopped) == {"milvus", "tfserving", "broker", "service"}
    assert not any(_alive(entry["pid"]) for entry in state.values())
    assert stack.status() == [] and not stack.paths.state.exists()
