"""`friendrec bench scale`: the batch pipeline on synthetic graphs of growing size, local engine
against the distributed one, stage by stage.

Why it exists: docs/scaling.md used to extrapolate from single stages measured at one size. Here
every stage runs as its own `friendrec` process (as an operator would run it), timed, with the
peak resident memory of its whole process tree (Ray's workers included), at two or more sizes,
so that the cost per million users and a linear model fitted to the measured sizes replace the
guesses. Both engines get their own workdir and the same prepared graph.

Stages: prepare (once per size), features build, features materialize (sqlite), train (one
epoch capped at ``--train-steps``; the distributed column runs ``--workers 2`` for half as many
steps of a twice larger global batch, the same examples), export, index build (into a
milvus-lite server, or with ``--milvus standalone`` a real Milvus server), then the retrieval
service's latency on the local engine's index.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from friendrec.config import Settings
from friendrec.local_services import (
    MilvusLiteProcess,
    MilvusStandaloneProcess,
    TFServingProcess,
    child_environment,
    free_port,
)
from friendrec.paths import DatasetPaths

log = logging.getLogger(__name__)

ENGINES = ("local", "ray")
# Feast's stock local engine (friendrec's writer off) materializing the same views into an empty
# sqlite file, local column only: the baseline of the materialization ratio, measured in the same
# run. Opt-in (not in "all"): it holds ~11 GB per million users.
FEAST_STOCK = "materialize_feast"
MATERIALIZE_STAGES = (FEAST_STOCK, "materialize")
# The batch stages, each its own timed process; then "serving": the service's latency over the
# index the build left (local column only).
BATCH_STAGES = (
    "prepare",
    "features_build",
    *MATERIALIZE_STAGES,
    "train",
    "export",
    "index_build",
)
STAGES = (*BATCH_STAGES, "serving")
DEFAULT_STAGES = tuple(s for s in STAGES if s != FEAST_STOCK)
# How long a `friendrec serve` may take to report SERVING, per million users: at 5M users
# milvus-lite loaded the collection and its HNSW graph in 295 s, and a new friend-set state is
# seeded with 85M directed friendships (~6 min) before the service answers.
SERVE_START_S_PER_MILLION = 300.0


@dataclass(frozen=True)
class ScaleBenchConfig:
    sizes: tuple[int, ...] = (1_000_000, 5_000_000)
    train_steps: int = 200
    train_workers: int = 2  # the distributed column's training processes
    requests: int = 300
    engines: tuple[str, ...] = ENGINES
    # Stages to run (prepare runs unless ``reuse``: the others need its graph); skipped stages and
    # those after them are absent from the report.
    stages: tuple[str, ...] = DEFAULT_STAGES
    # Keep each size's workdir from an earlier run and run only ``stages`` in it (no prepare):
    # a long size can be measured in pieces, e.g. the data stages first, training later.
    reuse: bool = False
    # The vector database of the index build and serving stages: "lite" (the embedded default's
    # milvus-lite server) or "standalone" (a real Milvus 2.3 server, the PyPI `milvus` package:
    # what a deployment past one machine's milvus-lite runs, at one node).
    milvus: str = "lite"


@dataclass
class StageResult:
    seconds: float
    peak_mb: float
    ok: bool
    log: str
    server_peak_mb: float | None = None  # the Milvus server's own process tree, apart

    def as_dict(self) -> dict[str, Any]:
        out = {
            "seconds": round(self.seconds, 2),
            "peak_mb": round(self.peak_mb, 1),
            "ok": self.ok,
            "log": self.log,
        }
        if self.server_peak_mb is not None:
            out["server_peak_mb"] = round(self.server_peak_mb, 1)
        return out


def _tree_pss(root: psutil.Process) -> float:
    try:
        return sum(_pss(p) for p in [root, *root.children(recursive=True)])
    except psutil.Error:
        return 0.0


def run_stage(
    settings: Settings,
    name: str,
    args: list[str],
    log_dir: Path,
    server: MilvusLiteProcess | None = None,
) -> StageResult:
    """``friendrec <args>`` in a child process: wall time and the peak memory of its process
    tree, as the sum of each process's PSS (shared pages, such as Ray's object store mapped by
    every worker, counted once in total), sampled every 0.5 s (short spikes can be missed).
    ``server``: a Milvus server the stage writes to, whose peak is reported apart."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    env = child_environment(settings, log_dir / f"{name}.settings.yaml")
    started = time.perf_counter()
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "friendrec", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
        peak = server_peak = 0.0
        root = psutil.Process(proc.pid)
        server_root = psutil.Process(server.proc.pid) if server and server.proc else None
        while proc.poll() is None:
            peak = max(peak, _tree_pss(root))
            if server_root is not None:
                server_peak = max(server_peak, _tree_pss(server_root))
            time.sleep(0.5)
    seconds = time.perf_counter() - started
    ok = proc.returncode == 0
    (log.info if ok else log.error)(
        "%s: %s in %.1fs, peak %.0f MB (%s)",
        name,
        "done" if ok else f"FAILED (exit {proc.returncode})",
        seconds,
        peak / 2**20,
        log_path,
    )
    server_mb = server_peak / 2**20 if server_root is not None else None
    return StageResult(seconds, peak / 2**20, ok, str(log_path), server_mb)


def _pss(process: psutil.Process) -> float:
    try:
        return float(process.memory_full_info().pss)
    except psutil.Error:
        return 0.0


def train_steps_per_worker(cfg: ScaleBenchConfig) -> int:
    """Steps of the distributed column: its global batch is ``train_workers`` times one
    process's, so this many steps train on the same examples as ``train_steps`` locally."""
    return max(1, cfg.train_steps // cfg.train_workers)


def engine_settings(settings: Settings, root: Path, size: int, engine: str) -> Settings:
    dataset = f"synthetic:{size}"
    training = settings.training.model_copy(
        update={"objective": "baseline", "val_max_users": 2_000}
    )
    return settings.model_copy(
        update={
            "workdir": root / str(size) / engine,
            "data": settings.data.model_copy(update={"dataset": dataset}),
            "engine": settings.engine.model_copy(update={"kind": engine}),
            "training": training,
            "serving": settings.serving.model_copy(
                update={"model_base_path": None, "port": free_port(), "metrics_port": 0}
            ),
            "tfserving": settings.tfserving.model_copy(update={"port": free_port()}),
        }
    )


def bench_engine(
    s: Settings, size: int, engine: str, cfg: ScaleBenchConfig, prepared: Path | None
) -> tuple[dict[str, StageResult], Path]:
    """Every stage for one engine; a failed stage stops the ones that depend on it."""
    dataset = s.data.dataset
    logs = s.workdir / "logs"
    results: dict[str, StageResult] = {}
    data_dir = DatasetPaths.of(s, dataset).data_dir
    if cfg.reuse:
        if not data_dir.exists():
            raise FileNotFoundError(f"--reuse: {data_dir} does not exist; run the earlier stages")
    elif prepared is None:
        shutil.rmtree(s.workdir, ignore_errors=True)
        results["prepare"] = run_stage(s, "prepare", ["data", "prepare", "-d", dataset], logs)
        if not results["prepare"].ok:
            return results, data_dir
    else:  # the same prepared graph for every engine
        shutil.rmtree(s.workdir, ignore_errors=True)
        shutil.copytree(prepared, data_dir)
    materialize = ["features", "materialize", "-d", dataset]
    steps: list[tuple[str, list[str]]] = [
        ("features_build", ["features", "build", "-d", dataset, "--engine", engine]),
        (FEAST_STOCK, [*materialize, "--engine", "local"]),
        ("materialize", [*materialize, "--engine", engine]),
        (
            "train",
            [
                "train",
                "-d",
                dataset,
                "-o",
                "baseline",
                "--epochs",
                "1",
                "--max-steps",
                str(cfg.train_steps if engine == "local" else train_steps_per_worker(cfg)),
                "--workers",
                "1" if engine == "local" else str(cfg.train_workers),
            ],
        ),
        ("export", ["export", "-d", dataset, "-o", "baseline", "--version", "1"]),
    ]
    for name, args in steps:
        if name == FEAST_STOCK and (engine != "local" or name not in cfg.stages):
            continue  # opt-in, local column only; the stages after it do not depend on it
        if name not in cfg.stages:
            if cfg.reuse:  # only the chosen stages
                continue
            return results, data_dir
        if name in MATERIALIZE_STAGES:  # a first load, as a fresh deployment's
            applied = fresh_online_store(s, name, logs)
            if not applied.ok:
                results["apply"] = applied
                return results, data_dir
        if name == "train":  # a fresh run: an earlier run's folder would be resumed, not trained
            shutil.rmtree(s.workdir / "models", ignore_errors=True)
        if name == "export":  # versions are immutable: an earlier run's version 1 goes first
            shutil.rmtree(s.model_base_path / s.serving.model_name / "1", ignore_errors=True)
        stage_settings = stock_materialize_settings(s) if name == FEAST_STOCK else s
        results[name] = run_stage(stage_settings, name, args, logs)
        if not results[name].ok and name != FEAST_STOCK:  # nothing depends on the baseline
            return results, data_dir
    build = "index_build" in cfg.stages
    serve = "serving" in cfg.stages and engine == "local"
    if not (build or (serve and cfg.reuse)):  # serving alone measures an earlier run's index
        return results, data_dir
    data = s.workdir / ("milvus_server" if cfg.milvus == "lite" else "milvus_standalone")
    if cfg.reuse and build:  # an earlier run's index holds version 1 live: build a fresh one
        shutil.rmtree(data, ignore_errors=True)
    server_type = MilvusLiteProcess if cfg.milvus == "lite" else MilvusStandaloneProcess
    server = server_type(data, free_port(), timeout=180.0)
    server.start()
    try:
        s_db = s.model_copy(update={"milvus": s.milvus.model_copy(update={"uri": server.uri})})
        if build:
            results["index_build"] = run_stage(
                s_db,
                "index_build",
                ["index", "build", "--model-version", "1", "--engine", engine],
                logs,
                server=server,
            )
        if serve and results.get("index_build", StageResult(0, 0, True, "")).ok:
            try:
                results["serving"] = measure_serving(s_db, size, cfg)  # type: ignore[assignment]
            except Exception as exc:  # the stages measured before it are still reported
                log.error("serving: %s", exc)
                results["serving"] = {"error": str(exc)}  # type: ignore[assignment]
            results["serving"]["milvus"] = cfg.milvus  # type: ignore[index]
    finally:
        server.stop()
    return results, data_dir


def stock_materialize_settings(s: Settings) -> Settings:
    """The same workdir and store with Feast's stock local engine (friendrec's writer off)."""
    engine = s.engine.model_copy(update={"materialize_fast_write": False})
    return s.model_copy(update={"engine": engine})


def fresh_online_store(s: Settings, stage: str, logs: Path) -> StageResult:
    """Removes the sqlite online store and applies the definitions again (Feast creates the
    tables), so that every materialization stage is timed as a first load, not as upserts over
    an earlier stage's rows. Not timed in the stage's figure."""
    DatasetPaths.of(s, s.data.dataset).feast_online_sqlite.unlink(missing_ok=True)
    return run_stage(s, f"apply_{stage}", ["features", "apply", "-d", s.data.dataset], logs)


def measure_serving(s: Settings, size: int, cfg: ScaleBenchConfig) -> dict[str, Any]:
    """End-to-end Recommend latency over the freshly built index (single requests)."""
    from bench.serving import ServingBenchConfig, measure_single, service_process

    users = np.random.default_rng(0).choice(size, size=min(size, 10_000), replace=False)
    tfserving = TFServingProcess(s, s.tfserving.port, log_dir=s.workdir)
    tfserving.start()
    service = service_process(s, timeout=60.0 + SERVE_START_S_PER_MILLION * size / 1e6)
    try:
        service.start()
        sb = ServingBenchConfig(requests=cfg.requests, warmup=30)
        return measure_single(s, users, sb, np.random.default_rng(1), source="embedding")
    finally:
        service.stop()
        tfserving.stop()


def fit_linear(sizes: list[int], seconds: list[float]) -> dict[str, float] | None:
    """Least-squares t = a + b * users over the measured sizes (a *model*, labelled so)."""
    if len(sizes) < 2:
        return None
    b, a = np.polyfit(np.asarray(sizes, float), np.asarray(seconds, float), 1)
    return {"fixed_s": float(a), "s_per_million": float(b * 1e6)}


def run(
    settings: Settings, cfg: ScaleBenchConfig, output: Path, previous: list[Path] = ()
) -> dict[str, Any]:
    """Runs every size; sizes measured by earlier runs (``previous`` reports) join the table
    and the fitted model, each keeping its own figures."""
    root = settings.workdir / "bench" / "scale"
    report: dict[str, Any] = {"config": cfg.__dict__, "sizes": {}}
    for path in previous:
        earlier = json.loads(path.read_text())
        for size, engines in earlier["sizes"].items():
            for engine, stages in engines.items():
                report["sizes"].setdefault(size, {}).setdefault(engine, {}).update(stages)
        report.setdefault("merged_from", []).append(str(path))
    for size in cfg.sizes:
        per_engine: dict[str, Any] = {}
        prepared: Path | None = None
        for engine in cfg.engines:
            s = engine_settings(settings, root, size, engine)
            log.info("scale %d users: %s engine", size, engine)
            stages, data_dir = bench_engine(s, size, engine, cfg, prepared)
            if prepared is None and stages.get("prepare") and stages["prepare"].ok:
                prepared = data_dir
            per_engine[engine] = {
                k: (v.as_dict() if isinstance(v, StageResult) else v) for k, v in stages.items()
            }
        for engine, stages in per_engine.items():  # a stage measured again replaces its figure
            report["sizes"].setdefault(str(size), {}).setdefault(engine, {}).update(stages)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2))  # partial results survive a long run
    report["models"] = fitted_models(report, cfg)
    report["materialize_rates"] = materialize_rates(report)
    output.write_text(json.dumps(report, indent=2))
    print_table(report)
    return report


def fitted_models(report: dict[str, Any], cfg: ScaleBenchConfig) -> dict[str, Any]:
    models: dict[str, Any] = {}
    for engine in cfg.engines:
        for stage in BATCH_STAGES:
            points = [
                (int(size), r[engine][stage]["seconds"])
                for size, r in report["sizes"].items()
                if engine in r and r[engine].get(stage, {}).get("ok")
            ]
            if stage == "prepare" and engine != cfg.engines[0]:
                continue
            model = fit_linear([p[0] for p in points], [p[1] for p in points])
            if model:
                models[f"{engine}/{stage}"] = model
    return models


def materialize_rates(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Users per second of every materialization stage (wall time of its process, start-up
    included), and each friendrec engine's ratio to Feast's stock engine measured in the same
    run, per size."""
    rates: dict[str, dict[str, float]] = {}
    for size, engines in report["sizes"].items():
        row: dict[str, float] = {}
        for engine, stages in engines.items():
            for stage in MATERIALIZE_STAGES:
                r = stages.get(stage)
                if r and r.get("ok") and r["seconds"] > 0:
                    key = "feast_stock" if stage == FEAST_STOCK else engine
                    row[key] = round(int(size) / r["seconds"], 1)
        if "feast_stock" in row:
            for engine in ENGINES:
                if engine in row:
                    row[f"{engine}_vs_feast_stock"] = round(row[engine] / row["feast_stock"], 2)
        if row:
            rates[size] = row
    return rates


def print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    for size, engines in report["sizes"].items():
        table = Table(title=f"bench scale: {int(size):,} users (seconds; peak MB)")
        table.add_column("stage")
        for engine in engines:
            table.add_column(engine, justify="right")
        table.add_column("ray / local", justify="right")
        table.add_column("local s per 1M users", justify="right")
        for stage in BATCH_STAGES:
            cells, secs = [], {}
            for engine, stages in engines.items():
                r = stages.get(stage)
                if r is None:
                    cells.append("-")
                    continue
                secs[engine] = r["seconds"]
                cells.append(f"{r['seconds']:.1f}; {r['peak_mb']:.0f}" if r["ok"] else "failed")
            ratio = (
                f"{secs['ray'] / secs['local']:.2f}x" if {"ray", "local"} <= secs.keys() else "-"
            )
            per_m = f"{secs['local'] * 1e6 / int(size):.1f}" if "local" in secs else "-"
            table.add_row(stage, *cells, ratio, per_m)
        serving = engines.get("local", {}).get("serving")
        if serving and "end_to_end" in serving:
            e2e = serving["end_to_end"]
            table.caption = (
                f"Recommend p50 {e2e['p50_ms']:.1f} ms, p99 {e2e['p99_ms']:.1f} ms "
                f"(milvus {serving.get('milvus', 'lite')})"
            )
        Console(stderr=True).print(table)
    for size, rates in materialize_rates(report).items():
        Console(stderr=True).print(
            f"materialize into sqlite, {int(size):,} users (users/s): "
            + ", ".join(f"{k} {v:,}" for k, v in rates.items())
        )
    if report.get("models"):
        Console(stderr=True).print(
            "model fitted to the measured sizes (t = fixed + per-million x users/1M):",
            json.dumps(report["models"], indent=1),
        )
