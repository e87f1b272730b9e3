"""The committed gRPC stubs are exactly what grpc_tools generates from the committed .proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO = "serving/protos/recommender.proto"


def test_generated_stubs_match_the_proto(tmp_path: Path):
    # A child process: grpc_tools' protoc crashes inside a process that has loaded TensorFlow.
    rc = subprocess.call(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{REPO_ROOT}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            str(REPO_ROOT / PROTO),
        ]
    )
    assert rc == 0
    generated = sorted((tmp_path / "serving" / "protos").glob("recommender_pb2*"))
    assert [p.name for p in generated] == [
        "recommender_pb2.py",
        "recommender_pb2.pyi",
        "recommender_pb2_grpc.py",
    ]
    for fresh in generated:
        committed = REPO_ROOT / "serving" / "protos" / fresh.name
        assert committed.read_text() == fresh.read_text(), f"{committed} is stale: run `make proto`"
