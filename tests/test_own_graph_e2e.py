"""A team's own graph through every command, as a user would type them: check, prepare, features
build/apply/materialize/get, train a few steps, export, the local stack up, index build, recommend,
a profile event with a tag nobody had through the stream workers, then down.

The graph (tests/own_graph.py) has string ids, a string categorical, a list of string tags, a
numeric column with missing values, real ISO timestamps, a self loop, a repeated friendship and a
friend missing from the users table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from own_graph import write_own_graph

from friendrec import contract
from friendrec.config import load_settings
from friendrec.feast_store import online_features, open_store
from friendrec.local_services import free_port
from friendrec.paths import DatasetPaths

pytestmark = pytest.mark.integration


def _env(workdir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "FRIENDREC_WORKDIR": str(workdir),
        "FRIENDREC_DATA__DATASET": "own_graph",
        "FRIENDREC_TRAINING__EPOCHS": "1",
        "FRIENDREC_TRAINING__MAX_STEPS_PER_EPOCH": "4",
        "FRIENDREC_TRAINING__BATCH_SIZE": "32",
        "FRIENDREC_MILVUS__URI": f"http://127.0.0.1:{free_port()}",
        "FRIENDREC_TFSERVING__PORT": str(free_port()),
        "FRIENDREC_SERVING__PORT": str(free_port()),
        "FRIENDREC_SERVING__METRICS_PORT": str(free_port()),
        "FRIENDREC_STREAMING__BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
        "FRIENDREC_LOG_FORMAT": "json",
        "COLUMNS": "200",
    }


def _cli(env: dict[str, str], *args: str, timeout: float = 600) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "friendrec", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, (
        f"friendrec {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done.stdout


def test_own_graph_through_every_command(tmp_path: Path):
    schema = write_own_graph(tmp_path / "own")
    workdir = tmp_path / "work"
    env = _env(workdir)

    report = _cli(env, "data", "check", "--schema", str(schema))
    assert "users: 241 (string ids)" in report and not (workdir / "data").exists()
    meta = json.loads(_cli(env, "data", "prepare", "--schema", str(schema)))
    assert meta["name"] == "own_graph" and meta["id_type"] == "string"

    _cli(env, "features", "build")
    _cli(env, "features", "apply")
    _cli(env, "features", "materialize")
    rows = json.loads(_cli(env, "features", "get", "--user", "5"))
    row = rows[0] if isinstance(rows, list) else rows
    assert row["known"] is True and {"plays", "verified", "sparse_ids", "degree"} <= set(row)
    assert "views" not in row  # nothing of the MUSAE contract is left in a team's own schema

    _cli(env, "train", "--objective", "ssmtl")
    _cli(env, "export")
    try:
        _cli(env, "up")
        _cli(env, "index", "build", "--model-version", "1")
        answer = json.loads(_cli(env, "recommend", "--user", "5", "-k", "5", "--json"))
        assert len(answer["candidates"]) == 5 and int(answer["model_version"]) == 1
        # The same user by its own string id; candidates come back with theirs.
        mine = json.loads(
            _cli(env, "recommend", "--external-user", "user-0004", "-k", "5", "--json")
        )
        assert mine["external_id"] == "user-0004" and int(mine["user_id"]) == 5
        assert [c["user_id"] for c in mine["candidates"]] == [
            c["user_id"] for c in answer["candidates"]
        ]
        assert all(c["external_id"].startswith(("user-", "ghost")) for c in mine["candidates"])

        settings = load_settings(workdir=workdir, data={"dataset": "own_graph"})
        features = contract.load(DatasetPaths.of(settings).data_dir)
        tags = features.categoricals_by_name["tags"]
        _cli(
            env,
            "stream",
            "profile",
            "--user",
            "5",
            "--features",
            json.dumps({"tags": ["jazz", "a-tag-nobody-had"], "plays": 4242}),
        )
        store = open_store(settings)
        deadline = time.monotonic() + 90
        while True:
            row = online_features(store, [5], contract=features)[0]
            if row["plays"] == 4242.0:
                break
            assert time.monotonic() < deadline, f"profile event not applied: {row}"
            time.sleep(1)
        assert tags.oov_id in row["sparse_ids"]
        assert tags.encode(["jazz"])[0] in row["sparse_ids"]
        # A malformed profile (unknown feature) is refused before it is sent.
        bad = subprocess.run(
            [
                sys.executable,
                "-m",
                "friendrec",
                "stream",
                "profile",
                "--user",
                "5",
                "--features",
                '{"favourite_colour": "red"}',
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert bad.returncode != 0 and "unknown feature" in bad.stdout + bad.stderr
    finally:
        _cli(env, "down")
