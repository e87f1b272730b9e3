"""`friendrec bench prepare`: the cost of bringing your own graph, per stage of `data prepare`.

A synthetic graph of N users (about 20 friendships each) is written as a team would hand it over:
parquet users with string ids, five scalars, a string categorical (``country``) and a list of
string tags (``interests``), and parquet friendships with string endpoints. Then `friendrec data
prepare --schema` reads it in a fresh process, whose wall time and peak resident memory (its own
``wait4`` rusage) are what the table reports, with the cost per million users.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from friendrec.config import Settings
from friendrec.data.synthetic import write_synthetic_tables

log = logging.getLogger(__name__)


def schema_for(folder: Path) -> dict:
    """The schema of the tables ``write_synthetic_tables(string_ids=True)`` writes."""
    return {
        "name": "bench_prepare",
        "friendships": {
            "path": str(folder / "friendships.parquet"),
            "format": "parquet",
            "src_column": "src",
            "dst_column": "dst",
        },
        "users": [
            {"path": str(folder / "users.parquet"), "format": "parquet", "id_column": "user_id"}
        ],
        "id_type": "string",
        "features": [
            {"name": "account_age_days", "kind": "numeric", "transform": "log1p"},
            {"name": "views", "kind": "numeric", "transform": "standardise", "clip": [0, 1e7]},
            {"name": "is_mature", "kind": "boolean"},
            {"name": "is_partner", "kind": "boolean"},
            {"name": "country", "kind": "categorical", "max_vocab": 1000},
            {"name": "interests", "kind": "multi_categorical", "max_vocab": 2000, "max_values": 32},
        ],
    }


def _run_prepare(schema: Path, workdir: Path) -> dict[str, float]:
    """`data prepare` in its own process: wall seconds and peak RSS (MiB) of that process."""
    env = {**os.environ, "FRIENDREC_WORKDIR": str(workdir), "FRIENDREC_LOG_FORMAT": "json"}
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "friendrec", "data", "prepare", "--schema", str(schema)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"data prepare failed: {stderr[-2000:]}")
    return {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024}


def run(settings: Settings, sizes: list[int], output: Path) -> dict:
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory(
            prefix="friendrec-bench-prepare-",
            dir=settings.workdir if settings.workdir.is_dir() else None,
        ) as tmp:
            folder = Path(tmp)
            started = time.perf_counter()
            graph = write_synthetic_tables(n, settings.data.seed, folder / "raw", string_ids=True)
            generate_s = time.perf_counter() - started
            schema = folder / "schema.yaml"
            schema.write_text(yaml.safe_dump(schema_for(folder / "raw"), sort_keys=False))
            measured = _run_prepare(schema, folder / "work")
            input_mib = sum(p.stat().st_size for p in (folder / "raw").iterdir()) / 2**20
            row = {
                "users": n,
                "friendships": int(graph.num_friendships),
                "input_parquet_mib": round(input_mib, 1),
                "generate_s": round(generate_s, 2),
                "prepare_s": round(measured["seconds"], 2),
                "prepare_peak_rss_mib": round(measured["peak_rss_mib"], 1),
                "prepare_s_per_million_users": round(measured["seconds"] / (n / 1e6), 2),
            }
            log.info("prepare %s users: %s", f"{n:,}", row)
            rows.append(row)
    result = {
        "benchmark": "prepare",
        "command": "friendrec bench prepare --users " + ",".join(str(n) for n in sizes),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "rows": rows,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    table = Table(title="data prepare of your own graph (parquet, string ids, country, tags)")
    for key in rows[0] if rows else []:
        table.add_column(key, justify="right")
    for row in rows:
        table.add_row(*(f"{v:,}" if isinstance(v, int) else str(v) for v in row.values()))
    Console(width=160).print(table)
    return result
