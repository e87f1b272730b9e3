"""The README's main command, end to end on a real (tiny) run: every stage, then no process left."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _our_processes(workdir: Path) -> list[str]:
    """Command lines of live processes that belong to this demo's workdir."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if str(workdir) in cmdline or str(workdir).encode() in environ:
            found.append(cmdline)
    return found


def test_demo_runs_the_whole_story_and_stops_everything(tmp_path: Path):
    """On a machine without ../shared (a fresh clone alone): the synthetic graph, said so."""
    workdir = tmp_path / "work"
    env = {
        **os.environ,
        "FRIENDREC_WORKDIR": str(workdir),
        "FRIENDREC_DATASETS_DIR": str(tmp_path / "no-datasets-here"),
        "FRIENDREC_TRAINING__MAX_STEPS_PER_EPOCH": "20",  # brief: the story, not the quality
        "COLUMNS": "200",
    }
    done = subprocess.run(
        [sys.executable, "-m", "friendrec", "demo", "--replay", "300"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "the demo runs on the synthetic graph synthetic:5000" in " ".join(done.stdout.split())
    for stage in (
        "materialize into the online store",
        "evaluate on the test friendships",
        "export SSMTL for TF Serving",
        "index model v1 into Milvus",
        "replay 300 held-out friendships",
        "embeddings are refreshed in Milvus",
        "recommendations after the refresh",
        "stop every process",
    ):
        assert stage in done.stdout, stage
    assert not _our_processes(workdir)
    assert not (workdir / "demo" / "stack" / "stack.json").exists()
