"""`friendrec bench serving`: the retrieval service end to end on this machine.

Per dataset (100k synthetic users and the GitHub graph by default), in its own workdir: features
built and materialized (sqlite), a briefly trained SSMTL tower exported, a milvus-lite *server*
and `friendrec tfserving` started as processes, the index built, then `friendrec serve` started as
a process and measured from this process over loopback gRPC:

- single requests one at a time: p50/p99 end to end (client side) and per stage (the service's
  ``server-timing`` trailer: alias, feast, friends, fof, tfserving, milvus, rank), for the default
  source (the blend); then, interleaved request by request for the same users, the blend, the
  blend without the Milvus read of the friends of friends' vectors (``serving.blend_reads_vectors``
  false, a second service) and each source alone (embedding; friends of friends);
- throughput at concurrency 8 (threads, each with a blocking stub);
- ANN recall@50 of the Milvus index against exact inner-product search over the same vectors;
- the floors: one Milvus search alone, and exact numpy top-50 over the same matrix;
- a user with thousands of friends (``heavy_friends`` added to the friend sets, as the stream
  updater would): latency with every friend excluded, by the Milvus filter (the default above
  ``serving.filter_search_above``) and by fetching k + friends hits, and how many friends each
  recommended (must be 0).

Everything shares the machine's cores (client, service, TF Serving, Milvus), as a small
single-node deployment would; latencies are what a client on the same host sees.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

import training  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from bench.quality import ensure_features
from feature_repo.jobs.materialize import materialize
from friendrec.config import Settings
from friendrec.data.canonical import load_prepared
from friendrec.local_services import (
    FriendrecProcess,
    MilvusLiteProcess,
    MilvusStandaloneProcess,
    TFServingProcess,
    free_port,
)
from friendrec.paths import DatasetPaths
from serving.client import RecommenderClient, recommend_request
from serving.index import EmbeddingIndex, LiveIndex
from serving.index_build import build_index

log = logging.getLogger(__name__)
DATASETS = ("synthetic:100000", "github")
STAGES = (
    "alias",
    "feast",
    "friends",
    "fof",
    "tfserving",
    "milvus",
    "blend_inputs",
    "rank",
    "total",
)
TARGETS = {"p99_ms": 25.0, "ann_recall@50": 0.95}


@dataclass(frozen=True)
class ServingBenchConfig:
    datasets: tuple[str, ...] = DATASETS
    requests: int = 1000
    warmup: int = 100
    concurrency: int = 8
    duration_s: float = 15.0
    recall_queries: int = 500
    k: int = 50
    train_steps: int = 200
    standalone: bool = True  # also measure a real Milvus standalone on the same vectors
    heavy_friends: int = 5000  # friends given to one user for the exclusion measurement
    heavy_requests: int = 200


def _percentiles(ms: list[float] | np.ndarray) -> dict[str, float]:
    values = np.asarray(ms, dtype=np.float64)
    return {
        "p50_ms": float(np.percentile(values, 50)),
        "p99_ms": float(np.percentile(values, 99)),
        "mean_ms": float(values.mean()),
    }


def dataset_settings(settings: Settings, dataset: str) -> Settings:
    """A private workdir per dataset, fresh loopback ports, /metrics off."""
    slug = DatasetPaths.of(settings, dataset).slug
    return settings.model_copy(
        update={
            "workdir": settings.workdir / "bench" / "serving" / slug,
            "data": settings.data.model_copy(update={"dataset": dataset}),
            "serving": settings.serving.model_copy(
                update={"model_base_path": None, "port": free_port(), "metrics_port": 0}
            ),
            "tfserving": settings.tfserving.model_copy(update={"port": free_port()}),
        }
    )


def ensure_model(settings: Settings, dataset: str, train_steps: int) -> int:
    """The newest exported version for this dataset, training and exporting one if none."""
    root = settings.model_base_path / settings.serving.model_name
    versions = sorted((int(p.name) for p in root.glob("*") if p.name.isdigit()), reverse=True)
    for version in versions:
        card = json.loads((root / str(version) / "model_card.json").read_text())
        if card.get("dataset") == DatasetPaths.of(settings, dataset).name:
            return version
    from training.publish import export_run
    from training.train import TrainingContext, train

    cfg = settings.training.model_copy(
        update={"epochs": 1, "max_steps_per_epoch": train_steps, "objective": "ssmtl"}
    )
    ctx = TrainingContext.load(settings.model_copy(update={"training": cfg}), dataset)
    result, _ = train(ctx)
    return int(export_run(ctx, result.model_dir, "ssmtl").name)


def service_process(settings: Settings, timeout: float = 60.0) -> FriendrecProcess:
    """`friendrec serve` as a child process, ready once its health check says SERVING (within
    ``timeout`` seconds)."""

    def serving() -> bool:
        with RecommenderClient(settings, timeout_s=1.0) as client:
            return client.health() == "SERVING"

    return FriendrecProcess(settings, ["serve"], settings.workdir, ready=serving, timeout=timeout)


def _server_timing(call: Any) -> dict[str, float]:
    for key, value in call.trailing_metadata() or ():
        if key == "server-timing":
            return {
                part.split(";dur=")[0]: float(part.split(";dur=")[1]) for part in value.split(",")
            }
    return {}


def measure_single(
    settings: Settings,
    users: np.ndarray,
    cfg: ServingBenchConfig,
    rng: np.random.Generator,
    source: str = "blend",
) -> dict[str, Any]:
    """Single requests one at a time: end to end, and per stage of the service's timings."""
    return measure_interleaved({source: (settings, source)}, users, cfg, rng)[source]


def measure_interleaved(
    targets: dict[str, tuple[Settings, str]],
    users: np.ndarray,
    cfg: ServingBenchConfig,
    rng: np.random.Generator,
) -> dict[str, dict[str, Any]]:
    """Single requests for the same users to each target (a service's settings and the source
    asked of it), in turn: each user asked of every target before the next user, so that a
    busy spell of the shared machine falls on all of them alike."""
    client_ms: dict[str, list[float]] = {name: [] for name in targets}
    stages: dict[str, dict[str, list[float]]] = {name: {} for name in targets}
    clients = {name: RecommenderClient(settings) for name, (settings, _) in targets.items()}
    try:
        for i in range(cfg.warmup + cfg.requests):
            user = int(rng.choice(users))
            for name, (_, source) in targets.items():
                client = clients[name]
                request = recommend_request(user, cfg.k, source=source)
                start = time.perf_counter()
                _, call = client.stub.Recommend.with_call(
                    request, timeout=10.0, metadata=client.metadata
                )
                elapsed = (time.perf_counter() - start) * 1e3
                if i < cfg.warmup:
                    continue
                client_ms[name].append(elapsed)
                for stage, ms in _server_timing(call).items():
                    stages[name].setdefault(stage, []).append(ms)
    finally:
        for client in clients.values():
            client.close()
    return {
        name: {
            "end_to_end": _percentiles(client_ms[name]),
            "stages": {s: _percentiles(v) for s, v in stages[name].items()},
        }
        for name in targets
    }


def measure_concurrent(
    settings: Settings, users: np.ndarray, cfg: ServingBenchConfig
) -> dict[str, Any]:
    latencies: list[list[float]] = [[] for _ in range(cfg.concurrency)]
    errors = [0] * cfg.concurrency
    stop = threading.Event()

    def worker(i: int) -> None:
        rng = np.random.default_rng(100 + i)
        with RecommenderClient(settings, timeout_s=10.0) as client:
            while not stop.is_set():
                start = time.perf_counter()
                try:
                    client.recommend(recommend_request(int(rng.choice(users)), cfg.k))
                except Exception:
                    errors[i] += 1
                    continue
                latencies[i].append((time.perf_counter() - start) * 1e3)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(cfg.concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(cfg.duration_s)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    flat = [ms for per in latencies for ms in per]
    return {
        "concurrency": cfg.concurrency,
        "qps": len(flat) / elapsed,
        "errors": sum(errors),
        **_percentiles(flat),
    }


def live_vectors(settings: Settings, users: np.ndarray) -> tuple[LiveIndex, np.ndarray, np.ndarray]:
    """The live collection, its user ids (sorted) and their stored vectors, row-aligned."""
    with EmbeddingIndex.connect(settings) as index:
        live = index.live()
        assert live is not None
        stored = index.get_vectors(live.collection, users)
    ids = np.array(sorted(stored), dtype=np.int64)
    return live, ids, np.stack([stored[int(u)] for u in ids])


def measure_index(
    settings: Settings, users: np.ndarray, cfg: ServingBenchConfig, rng: np.random.Generator
) -> dict[str, Any]:
    """ANN recall@k vs exact search over the same stored vectors, and both single-query costs."""
    live, ids, matrix = live_vectors(settings, users)
    with EmbeddingIndex.connect(settings) as index:
        queries = rng.choice(len(ids), min(cfg.recall_queries, len(ids)), replace=False)
        recalls, milvus_ms, numpy_ms = [], [], []
        for row in queries:
            q = matrix[row]
            start = time.perf_counter()
            (hits,) = index.search(live.collection, q[None, :], limit=cfg.k + 1)
            milvus_ms.append((time.perf_counter() - start) * 1e3)
            start = time.perf_counter()
            scores = matrix @ q
            top = np.argpartition(-scores, cfg.k + 1)[: cfg.k + 1]
            exact = ids[top[np.argsort(-scores[top])]]
            numpy_ms.append((time.perf_counter() - start) * 1e3)
            approx = [u for u, _ in hits if u != ids[row]][: cfg.k]
            truth = [int(u) for u in exact if u != ids[row]][: cfg.k]
            recalls.append(len(set(approx) & set(truth)) / cfg.k)
    return {
        f"ann_recall@{cfg.k}": float(np.mean(recalls)),
        "milvus_search": _percentiles(milvus_ms),
        "numpy_exact_topk": _percentiles(numpy_ms),
        "vectors": len(ids),
        "dim": int(matrix.shape[1]),
    }


def _requests_for(
    settings: Settings, user: int, cfg: ServingBenchConfig, banned: set[int]
) -> dict[str, Any]:
    """Latency of ``heavy_requests`` Recommend calls for one user, and banned users returned."""
    ms: list[float] = []
    leaked = 0
    with RecommenderClient(settings, timeout_s=10.0) as client:
        for i in range(cfg.heavy_requests + 10):
            start = time.perf_counter()
            response = client.recommend(recommend_request(user, cfg.k))
            if i >= 10:  # warm-up
                ms.append((time.perf_counter() - start) * 1e3)
            leaked += len({c.user_id for c in response.candidates} & banned)
    return {**_percentiles(ms), "friends_recommended": leaked}


def measure_heavy_user(s: Settings, users: np.ndarray, cfg: ServingBenchConfig) -> dict[str, Any]:
    """One user given ``heavy_friends`` friends in the friend sets (both directions, as the stream
    updater writes them): Recommend latency with every friend excluded, through a service that
    filters in Milvus (the default) and one that fetches k + friends hits; a user with a handful
    of friends beside it. The added friendships are removed afterwards."""
    from friendrec.friend_sets import open_state

    rng = np.random.default_rng(1)
    heavy, light = (int(u) for u in rng.choice(users, 2, replace=False))
    over_fetch = s.model_copy(
        update={"serving": s.serving.model_copy(update={"filter_search_above": 1_000_000})}
    )
    state = open_state(s)
    had = set(state.friends([heavy])[heavy])
    added = [int(u) for u in rng.choice(users, cfg.heavy_friends, replace=False)]
    added = [u for u in added if u != heavy and u not in had]
    friends = had | set(added)
    light_friends = set(state.friends([light])[light])
    out: dict[str, Any] = {"friends": len(friends), "k": cfg.k}
    state.apply([c for u in added for c in (("add", heavy, u), ("add", u, heavy))])
    try:
        for mode, settings in (("filter", s), ("over_fetch", over_fetch)):
            log.info("user %d with %d friends: %s", heavy, len(friends), mode)
            service = service_process(settings)
            try:
                service.start()
                out[mode] = _requests_for(settings, heavy, cfg, friends)
                if mode == "filter":
                    few = _requests_for(settings, light, cfg, light_friends)
                    out["few_friends"] = {**few, "friends": len(light_friends)}
            finally:
                service.stop()
    finally:
        state.apply([c for u in added for c in (("remove", heavy, u), ("remove", u, heavy))])
        state.close()
    return out


def measure_service(
    s: Settings, users: np.ndarray, cfg: ServingBenchConfig, label: str
) -> dict[str, Any]:
    """Start `friendrec serve` over the settings' Milvus and measure it (then stop it)."""
    rng = np.random.default_rng(0)
    # Beside it, the blend without the Milvus get (serving.blend_reads_vectors false).
    no_reads = s.model_copy(
        update={
            "serving": s.serving.without_vector_reads().model_copy(
                update={"port": free_port(), "metrics_port": 0}
            )
        }
    )
    services = [service_process(s), service_process(no_reads)]
    try:
        for service in services:
            service.start()
        log.info("%s: single requests", label)
        single = measure_single(s, users, cfg, rng)  # the default source: blend
        log.info("%s: each source and the blend without vector reads, interleaved", label)
        targets = {
            "blend": (s, "blend"),
            "blend_without_reads": (no_reads, "blend"),
            "embedding": (s, "embedding"),
            "fof": (s, "fof"),
        }
        interleaved = measure_interleaved(targets, users, cfg, np.random.default_rng(0))
        log.info("%s: concurrency %d for %.0f s", label, cfg.concurrency, cfg.duration_s)
        concurrent = measure_concurrent(s, users, cfg)
        log.info("%s: ANN recall and search floors", label)
        index_stats = measure_index(s, users, cfg, rng)
    finally:
        for service in services:
            service.stop()
    heavy = measure_heavy_user(s, users, cfg)
    return {
        "single": single,
        "by_source": {name: m["end_to_end"] for name, m in interleaved.items()},
        "by_source_stages": {name: m["stages"] for name, m in interleaved.items()},
        "concurrent": concurrent,
        "index": index_stats,
        "heavy_user": heavy,
    }


def copy_live_index(source: Settings, target: Settings, users: np.ndarray) -> dict[str, Any]:
    """The live collection's vectors, copied into another Milvus: the same data, another engine."""
    start = time.perf_counter()
    live, ids, vectors = live_vectors(source, users)
    with EmbeddingIndex.connect(target) as dst:
        collection = dst.create_version(
            live.model_version, vectors.shape[1], live.dataset, schema_hash=live.schema_hash
        )
        for lo in range(0, len(ids), 10_000):
            dst.insert(
                collection, ids[lo : lo + 10_000], vectors[lo : lo + 10_000], live.model_version
            )
        dst.finish(collection, len(ids))
        dst.promote(live.model_version)
    return {"collection": collection, "vectors": len(ids), "seconds": time.perf_counter() - start}


def bench_dataset(
    settings: Settings, dataset: str, cfg: ServingBenchConfig
) -> list[dict[str, Any]]:
    """One result per Milvus engine: the milvus-lite server, then (optionally) Milvus standalone."""
    s = dataset_settings(settings, dataset)
    s.workdir.mkdir(parents=True, exist_ok=True)
    log.info("%s: features", dataset)
    ensure_features(s, dataset)
    materialize(s, dataset)
    version = ensure_model(s, dataset, cfg.train_steps)
    users = load_prepared(DatasetPaths.of(s, dataset)).user_ids
    results = []
    lite = MilvusLiteProcess(s.workdir / "milvus_server", free_port())
    lite.start()
    s = s.model_copy(update={"milvus": s.milvus.model_copy(update={"uri": lite.uri})})
    tfserving = TFServingProcess(s, s.tfserving.port, log_dir=s.workdir)
    try:
        tfserving.start()
        log.info("%s: index build (model v%d)", dataset, version)
        with EmbeddingIndex.connect(s) as index:
            live = index.live()
        if live is None or live.model_version != version:
            build = build_index(s, version, show_progress=True).as_dict()
        else:
            build = {"reused": live.collection}
        base = {"dataset": dataset, "users": len(users), "model_version": version}
        measured = measure_service(s, users, cfg, f"{dataset} / milvus-lite")
        results.append({**base, "milvus": "milvus-lite server", "index_build": build, **measured})
        if cfg.standalone:
            data_dir = s.workdir / "milvus_standalone"
            shutil.rmtree(data_dir, ignore_errors=True)  # a fresh copy of the live vectors
            standalone = MilvusStandaloneProcess(data_dir, free_port(), timeout=120.0)
            standalone.start()
            try:
                t = s.model_copy(
                    update={"milvus": s.milvus.model_copy(update={"uri": standalone.uri})}
                )
                copied = copy_live_index(s, t, users)
                measured = measure_service(t, users, cfg, f"{dataset} / milvus standalone")
            finally:
                standalone.stop()
            results.append(
                {**base, "milvus": "Milvus 2.3.5 standalone", "index_build": copied, **measured}
            )
    finally:
        tfserving.stop()
        lite.stop()
    return results


def run(settings: Settings, cfg: ServingBenchConfig, output: Path) -> dict[str, Any]:
    results = [r for d in cfg.datasets for r in bench_dataset(settings, d, cfg)]
    report = {
        "created_at": datetime.now(UTC).isoformat(),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "config": cfg.__dict__,
        "targets": TARGETS,
        "results": results,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2, default=str))
    print_table(report)
    return report


def table_rows(report: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(metric, one cell per dataset): the table printed and written beside the JSON."""
    k = report["config"]["k"]
    results = report["results"]

    def pair(d: dict[str, float]) -> str:
        return f"{d['p50_ms']:.2f} / {d['p99_ms']:.2f}"

    rows = [
        ("users", [f"{r['users']:,}" for r in results]),
        ("index build, users/s", [_build_rate(r["index_build"]) for r in results]),
        ("end to end p50 / p99 (ms), blend", [pair(r["single"]["end_to_end"]) for r in results]),
    ]
    for source, label in (  # interleaved request by request, the same users
        ("blend", "  interleaved: blend p50 / p99 (ms)"),
        ("blend_without_reads", "  interleaved: blend without vector reads"),
        ("embedding", "  interleaved: source embedding alone"),
        ("fof", "  interleaved: source fof alone"),
    ):
        rows.append(
            (label, [pair(r["by_source"][source]) if source in r.get("by_source", {}) else "-"
                     for r in results])
        )  # fmt: skip
    for stage in STAGES:
        rows.append(
            (
                f"  stage {stage} p50 / p99 (ms)",
                [pair(r["single"]["stages"][stage]) if stage in r["single"]["stages"] else "-"
                 for r in results],
            )
        )  # fmt: skip
    rows += [
        (
            f"QPS at concurrency {report['config']['concurrency']}",
            [f"{r['concurrent']['qps']:.0f}" for r in results],
        ),
        ("  its p50 / p99 (ms)", [pair(r["concurrent"]) for r in results]),
        ("  errors", [str(r["concurrent"]["errors"]) for r in results]),
        (f"ANN recall@{k} vs exact", [f"{r['index'][f'ann_recall@{k}']:.4f}" for r in results]),
        (
            "Milvus search alone p50 / p99 (ms)",
            [pair(r["index"]["milvus_search"]) for r in results],
        ),
        (
            "numpy exact top-k p50 / p99 (ms)",
            [pair(r["index"]["numpy_exact_topk"]) for r in results],
        ),
    ]
    if all("heavy_user" in r for r in results):
        heavy = [r["heavy_user"] for r in results]
        rows += [
            ("user with N friends: N", [f"{h['friends']:,}" for h in heavy]),
            ("  Milvus filter p50 / p99 (ms)", [pair(h["filter"]) for h in heavy]),
            ("  k + N hits fetched p50 / p99 (ms)", [pair(h["over_fetch"]) for h in heavy]),
            ("  friends recommended (filter / fetch)", [
                f"{h['filter']['friends_recommended']} / {h['over_fetch']['friends_recommended']}"
                for h in heavy
            ]),
            ("  a user with few friends p50 / p99 (ms)", [pair(h["few_friends"]) for h in heavy]),
        ]  # fmt: skip
    return rows


def _build_rate(build: dict[str, Any]) -> str:
    if "users_per_s" in build:
        return f"{build['users_per_s']:,.0f}"
    if "vectors" in build:
        return f"copied {build['vectors'] / build['seconds']:,.0f}/s"
    return "reused"


def print_table(report: dict[str, Any]) -> None:
    table = Table(title=f"friendrec bench serving (Recommend, k={report['config']['k']})")
    table.add_column("metric")
    for r in report["results"]:
        table.add_column(f"{r['dataset']}\n{r.get('milvus', '')}", justify="right")
    for name, cells in table_rows(report):
        table.add_row(name, *cells)
    Console(width=160).print(table)
