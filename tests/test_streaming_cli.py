"""`friendrec stream ...` commands in subprocesses, as an operator runs them, against a real
Tansu broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from kafka import KafkaConsumer, TopicPartition

from friendrec.local_services import TansuProcess
from streaming.schemas import FriendshipEvent, decode

pytestmark = pytest.mark.integration

PARTITIONS = 3


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "friendrec", *args],
        env={**os.environ, "COLUMNS": "200", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_create_topics_init_state_and_replay(tmp_path):
    with TansuProcess(log_dir=tmp_path) as broker:
        env = {
            "FRIENDREC_WORKDIR": str(tmp_path / "work"),
            "FRIENDREC_DATA__DATASET": "synthetic:300",
            "FRIENDREC_STREAMING__BOOTSTRAP_SERVERS": broker.bootstrap_servers,
            "FRIENDREC_STREAMING__PARTITIONS": str(PARTITIONS),
        }
        meta = json.loads(run_cli("data", "prepare", "--dataset", "synthetic:300", env=env).stdout)
        created = json.loads(run_cli("stream", "create-topics", env=env).stdout)["created"]
        assert "friendrec.friendships" in created and "friendrec.dead-letters" in created
        assert json.loads(run_cli("stream", "create-topics", env=env).stdout)["created"] == []
        state = json.loads(run_cli("stream", "init-state", env=env).stdout)
        assert state["directed_friendships"] == 2 * meta["split_counts"]["train"]
        report = json.loads(
            run_cli("stream", "replay", "--synthetic", "25", "--rate", "500", env=env).stdout
        )
        assert report["friendships"] == 25 and report["messages"] == 50

        consumer = KafkaConsumer(
            bootstrap_servers=broker.bootstrap_servers, enable_auto_commit=False
        )
        try:
            partitions = [TopicPartition("friendrec.friendships", p) for p in range(PARTITIONS)]
            consumer.assign(partitions)
            consumer.seek_to_beginning(*partitions)
            events: list[tuple[int, FriendshipEvent]] = []
            for _ in range(50):
                for tp, messages in consumer.poll(timeout_ms=200).items():
                    for m in messages:
                        event = decode(m.value, ("friendship.v1",), m.key)  # key = user_id
                        events.append((tp.partition, event))
                if len(events) == 50:
                    break
        finally:
            consumer.close()
    assert len(events) == 50
    # Each friendship arrives once per endpoint, and each user's events stay in one partition.
    pairs = {(e.user_id, e.friend_id) for _, e in events}
    assert all((v, u) in pairs for u, v in pairs)
    owner: dict[int, int] = {}
    for partition, event in events:
        assert owner.setdefault(event.user_id, partition) == partition
