"""The `friendrec` CLI end to end in a subprocess, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def run_cli(*args: str, workdir, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "FRIENDREC_WORKDIR": str(workdir), "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "friendrec", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_prepare_build_apply_materialize_get(tmp_path):
    work = tmp_path / "work"
    meta = json.loads(run_cli("data", "prepare", "--dataset", "twitch/RU", workdir=work).stdout)
    assert meta["num_users"] == 4385 and meta["num_friendships"] == 37304
    build = json.loads(run_cli("features", "build", "-d", "twitch/RU", workdir=work).stdout)
    assert build["graph_rows_written"] == 4385
    assert (
        "applied Feast project friendrec_twitch_ru"
        in run_cli("features", "apply", "-d", "twitch/RU", workdir=work).stdout
    )
    first = json.loads(run_cli("features", "materialize", "-d", "twitch/RU", workdir=work).stdout)
    assert first["mode"] == "full"
    again = run_cli("features", "materialize", "--incremental", "-d", "twitch/RU", workdir=work)
    assert json.loads(again.stdout)["windows"] == {
        "user_profile": "up to date",
        "user_graph": "up to date",
    }
    rows = json.loads(
        run_cli(
            "features", "get", "-d", "twitch/RU", "-u", "3", "-u", "99999999", workdir=work
        ).stdout
    )
    assert [r["user_id"] for r in rows] == [3, 99999999]
    assert rows[0]["known"] and rows[0]["sparse_ids"]
    assert not rows[1]["known"] and rows[1]["friend_ids"] == []


def test_errors_are_one_clear_line_with_exit_code_2(tmp_path):
    bad = run_cli("data", "prepare", "--dataset", "reddit", workdir=tmp_path, check=False)
    assert bad.returncode == 2
    assert "unknown dataset 'reddit'" in bad.stderr and "Traceback" not in bad.stderr
    early = run_cli("features", "build", "-d", "twitch/TW", workdir=tmp_path, check=False)
    assert early.returncode == 2
    assert "friendrec data prepare --dataset twitch/TW" in early.stderr


def test_help_explains_every_command(tmp_path):
    out = run_cli("--help", workdir=tmp_path).stdout
    for command in ("data", "features", "bench", "demo", "config"):
        assert command in out
    assert "materialize" in run_cli("features", "--help", workdir=tmp_path).stdout
