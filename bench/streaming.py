"""`friendrec bench streaming`: friendship events through the whole streaming chain.

In its own workdir: the dataset's features built and materialized (sqlite; re-materialized on
every run so earlier runs' events are gone), a model exported (trained briefly if none), a
milvus-lite server, `friendrec tfserving`, a Tansu broker and ONE process per worker
(`friendrec stream feature-updater | embedding-refresher | milvus-sink`), as deployed. Then:

1. throughput: N synthetic friendships produced as fast as possible; the time until every effect
   is in Milvus (each group has committed everything upstream produced: commits follow writes)
   gives the sustained friendships/s end to end, and each worker's CPU seconds show which stage
   limits it; the same friendships are then removed (timed too), back to the base graph;
2. freshness at fixed rates (500 friendships/s, then 100, 50, 25): the sink's freshness
   histogram (event time -> embedding upserted into the live collection) read from its /metrics
   before and after each run, p50/p99 interpolated within its buckets; each run's friendships
   are removed again afterwards, so every run starts from the same graph (random friendships
   would otherwise make it denser, and each event costlier, run after run);
3. search latency under the stream: a probe thread searches the live collection (top 50, 20
   searches/s) before the throughput phase, during it, and after it has drained, so the sink's
   flush policy (``streaming.sink_flush_rows`` / ``sink_flush_interval_s``: unflushed upserts are
   searched by brute force) shows as search p50/p99 in each phase.

One friendship event is two Kafka messages (one keyed by each endpoint).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kafka import KafkaAdminClient, TopicPartition
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from friendrec.config import Settings
from friendrec.local_services import (
    FriendrecProcess,
    MilvusLiteProcess,
    TansuProcess,
    TFServingProcess,
    free_port,
)
from friendrec.paths import DatasetPaths

log = logging.getLogger(__name__)
WORKERS = ("feature-updater", "embedding-refresher", "milvus-sink")
TARGETS = {"friendships_per_s": 1000.0, "freshness_p99_s": 2.0}
AFTER_STREAM_S = 15.0  # the search probe's "after the stream" window


@dataclass(frozen=True)
class StreamingBenchConfig:
    dataset: str = "twitch/ENGB"
    events: int = 10_000  # friendships in the throughput phase
    # friendships/s of the freshness runs: the target rate, and one the chain sustains here
    rates: tuple[float, ...] = (500.0, 100.0, 50.0, 25.0)
    duration_s: float = 20.0  # of each freshness run
    partitions: int = 4
    train_steps: int = 200
    dependents: bool = True  # streaming.refresh_dependents (exact 2-layer refreshes)
    members: int = 1  # processes per worker (consumer-group members)


def bench_settings(settings: Settings, cfg: StreamingBenchConfig) -> Settings:
    slug = DatasetPaths.of(settings, cfg.dataset).slug
    return settings.model_copy(
        update={
            "workdir": settings.workdir / "bench" / "streaming" / slug,
            "data": settings.data.model_copy(update={"dataset": cfg.dataset}),
            "serving": settings.serving.model_copy(
                update={"model_base_path": None, "metrics_port": 0}
            ),
            "tfserving": settings.tfserving.model_copy(
                update={"port": free_port(), "poll_seconds": 1.0}
            ),
            "streaming": settings.streaming.model_copy(
                update={"partitions": cfg.partitions, "refresh_dependents": cfg.dependents}
            ),
        }
    )


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class WorkerProcess:
    """One `friendrec stream <worker>` child with its own /metrics port."""

    def __init__(self, settings: Settings, worker: str, workdir: Path, member: int = 0) -> None:
        self.worker = worker
        self.name = worker if member == 0 else f"{worker}-{member}"
        self.metrics_port = free_port()
        streaming = settings.streaming.model_copy(
            update={"metrics_port": self.metrics_port, "metrics_host": "127.0.0.1"}
        )
        self.child = FriendrecProcess(
            settings.model_copy(update={"streaming": streaming}),
            ["stream", worker],
            workdir,
            name=self.name,
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.child.start()
        self.proc = self.child.proc

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        return proc_cpu_seconds(self.proc.pid)

    def metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        out: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out.setdefault(sample.name, []).append((sample.labels, sample.value))
        return out

    def stop(self) -> int | None:
        """SIGTERM (the worker finishes its batch, commits, exits 0); the exit code."""
        if self.proc is None:
            return None
        self.child.stop()
        return self.proc.returncode


def group_lag(settings: Settings) -> dict[str, int]:
    """Per worker: messages of its topics not yet committed by its group. Checked upstream
    first, so a zero everywhere means every effect is written (commits follow writes)."""
    from streaming.topics import Topics, end_offsets, reader

    topics = Topics.of(settings)
    subscribed = {
        "feature-updater": (topics.friendships, topics.profiles),
        "embedding-refresher": (topics.refresh,),
        "milvus-sink": (topics.embeddings,),
    }
    cfg = settings.streaming
    admin = KafkaAdminClient(bootstrap_servers=cfg.bootstrap_servers)
    kafka_reader = reader(settings, "friendrec-bench")
    try:
        lag: dict[str, int] = {}
        for worker in WORKERS:
            group = f"{cfg.group_prefix}.{worker}"
            parts = [
                TopicPartition(t, p) for t in subscribed[worker] for p in range(cfg.partitions)
            ]
            committed = admin.list_group_offsets({group: parts}).get(group, {})
            ends = end_offsets(kafka_reader, parts)
            lag[worker] = sum(
                max(ends[tp] - max(committed[tp].offset if tp in committed else 0, 0), 0)
                for tp in parts
            )
        return lag
    finally:
        kafka_reader.close()
        admin.close()


def wait_drained(settings: Settings, timeout: float) -> float:
    """Block until every group has committed everything; returns the time (perf_counter)."""
    deadline = time.monotonic() + timeout
    while True:
        lag = group_lag(settings)
        if not any(lag.values()):
            return time.perf_counter()
        if time.monotonic() > deadline:
            raise TimeoutError(f"the chain did not drain in {timeout:.0f}s: lag {lag}")
        time.sleep(0.1)


def freshness_buckets(sinks: list[WorkerProcess]) -> list[tuple[float, float]]:
    """The sinks' cumulative freshness buckets, summed over the members."""
    total: dict[float, float] = {}
    for sink in sinks:
        for labels, value in sink.metrics().get("friendrec_stream_freshness_seconds_bucket", []):
            le = float(labels["le"])
            total[le] = total.get(le, 0.0) + value
    return sorted(total.items())


def bucket_percentile(before, after, q: float) -> float:
    """The q-quantile of the observations between two cumulative bucket snapshots
    (linear within a bucket)."""
    counts = [(le, a - b) for (le, a), (_, b) in zip(after, before, strict=True)]
    total = counts[-1][1]
    if total <= 0:
        return float("nan")
    target = q * total
    prev_le, prev_count = 0.0, 0.0
    for le, count in counts:
        if count >= target:
            if le == float("inf"):
                return prev_le
            share = (target - prev_count) / max(count - prev_count, 1e-9)
            return prev_le + share * (le - prev_le)
        prev_le, prev_count = le, count
    return prev_le


def batch_seconds(proc: WorkerProcess) -> tuple[float, float]:
    metrics = proc.metrics()
    total = sum(v for _, v in metrics.get("friendrec_stream_batch_seconds_sum", []))
    count = sum(v for _, v in metrics.get("friendrec_stream_batch_seconds_count", []))
    return total, count


class SearchProbe:
    """Searches the live collection from a thread at a steady rate, labelling each latency
    with the phase the main thread names (``phase = ...``; None pauses the probe)."""

    def __init__(self, settings: Settings, rate: float = 20.0, k: int = 50) -> None:
        import numpy as np

        from serving.index import EmbeddingIndex

        self.index = EmbeddingIndex.connect(settings)
        live = self.index.live()
        assert live is not None
        users = self.index.get_vectors(live.collection, range(200))
        self.queries = np.stack(list(users.values()))
        self.k, self.period = k, 1.0 / rate
        self.phase: str | None = None
        self.samples: dict[str, list[float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="search-probe", daemon=True)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            phase = self.phase
            if phase is not None:
                start = time.perf_counter()
                self.index.search(self.index.alias, self.queries[i % len(self.queries)], self.k)
                self.samples.setdefault(phase, []).append((time.perf_counter() - start) * 1e3)
                i += 1
            time.sleep(self.period)

    def start(self) -> SearchProbe:
        self._thread.start()
        return self

    def stop(self) -> dict[str, dict[str, float]]:
        """Per phase: searches, p50 and p99 (ms)."""
        import numpy as np

        self._stop.set()
        self._thread.join()
        self.index.close()
        return {
            phase: {
                "searches": len(ms),
                "p50_ms": round(float(np.percentile(ms, 50)), 2),
                "p99_ms": round(float(np.percentile(ms, 99)), 2),
            }
            for phase, ms in self.samples.items()
        }


def cpu_budget(cpu_s: dict[str, float], friendships: int, rate: float) -> dict[str, Any]:
    """CPU milliseconds each process spent per friendship at full speed, and the cores the whole
    chain would need at ``rate`` friendships/s at that cost: what the throughput target asks of
    the machine, whatever the processes' scheduling."""
    per = {name: 1000.0 * seconds / friendships for name, seconds in cpu_s.items()}
    total = sum(per.values())
    return {
        "cpu_ms_per_friendship": {k: round(v, 2) for k, v in per.items()},
        "cpu_ms_per_friendship_total": round(total, 2),
        "cores_needed_at_target": round(total * rate / 1000.0, 2),
    }


def run(settings: Settings, cfg: StreamingBenchConfig, output: Path) -> dict[str, Any]:
    import training  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
    from bench.quality import ensure_features
    from bench.serving import ensure_model
    from feature_repo.jobs.materialize import materialize
    from friendrec.friend_sets import open_state, seed_state
    from serving.index_build import build_index
    from streaming.replay import replay, synthetic_pairs
    from streaming.topics import create_topics

    s = bench_settings(settings, cfg)
    work = s.workdir / "run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ensure_features(s, cfg.dataset)
    materialize(s, cfg.dataset)  # resets every online row: earlier runs' events are gone
    version = ensure_model(s, cfg.dataset, cfg.train_steps)
    milvus = MilvusLiteProcess(work / "milvus", log_dir=work)
    tansu = TansuProcess(log_dir=work)
    tfserving: TFServingProcess | None = None
    workers = [WorkerProcess(s, w, work, m) for w in WORKERS for m in range(cfg.members)]
    result: dict[str, Any] = {}
    try:
        milvus.start()
        tansu.start()
        s = s.model_copy(
            update={
                "milvus": s.milvus.model_copy(update={"uri": milvus.uri}),
                "streaming": s.streaming.model_copy(
                    update={"bootstrap_servers": tansu.bootstrap_servers}
                ),
            }
        )
        workers = [WorkerProcess(s, w, work, m) for w in WORKERS for m in range(cfg.members)]
        tfserving = TFServingProcess(s, s.tfserving.port, log_dir=work)
        tfserving.start()
        build_index(s, version, show_progress=False)
        state = open_state(s, seed_if_empty=False)
        seed_state(s, state)
        state.close()
        create_topics(s)
        for worker in workers:
            worker.start()
        if cfg.members > 1:  # let every group settle before measuring (a rebalance takes ~6 s)
            time.sleep(15)
        log.info("warm-up: 50 friendships through the chain (group joins, first batches)")
        replay(s, synthetic_pairs(s, 50, seed=0), show_progress=False)
        wait_drained(s, timeout=180)

        probe = SearchProbe(s).start()
        probe.phase = "before the stream"
        time.sleep(10)
        log.info("throughput: %d friendships at full speed", cfg.events)
        probe.phase = "during the stream"
        services = {"tfserving": tfserving.proc, "milvus-lite": milvus.proc, "tansu": tansu.proc}
        cpu0 = {w.name: w.cpu_seconds() for w in workers}
        svc0 = {k: proc_cpu_seconds(p.pid) for k, p in services.items() if p is not None}
        batch0 = {w.name: batch_seconds(w) for w in workers}
        started = time.perf_counter()
        pairs = synthetic_pairs(s, cfg.events, seed=1)
        produced = replay(s, pairs, show_progress=False)
        finished = wait_drained(s, timeout=max(600, cfg.events / 20))
        probe.phase = "after the stream"
        seconds = finished - started
        cpu = {w.name: w.cpu_seconds() - cpu0[w.name] for w in workers}
        for name, proc in services.items():
            if proc is not None and name in svc0:
                cpu[name] = proc_cpu_seconds(proc.pid) - svc0[name]
        batches = {}
        for w in workers:
            total, count = batch_seconds(w)
            batches[w.name] = {
                "batches": int(count - batch0[w.name][1]),
                "busy_s": round(total - batch0[w.name][0], 2),
            }
        time.sleep(AFTER_STREAM_S)  # past the sink's default flush interval (10 s)
        result["search_latency"] = {
            "sink_flush_rows": s.streaming.sink_flush_rows,
            "sink_flush_interval_s": s.streaming.sink_flush_interval_s,
            "phases": probe.stop(),
        }
        log.info("restoring the graph: the same friendships removed at full speed")
        removal_started = time.perf_counter()
        replay(s, pairs, op="remove", show_progress=False)
        removal_s = wait_drained(s, timeout=max(600, cfg.events / 20)) - removal_started
        result["throughput"] = {
            "friendships": cfg.events,
            "messages": 2 * cfg.events,
            "produce_s": round(produced.seconds, 2),
            "end_to_end_s": round(seconds, 2),
            "friendships_per_s": round(cfg.events / seconds, 1),
            "worker_cpu_s": {k: round(v, 1) for k, v in cpu.items()},
            "worker_cpu_share": {k: round(v / seconds, 2) for k, v in cpu.items()},
            "worker_batches": batches,
            "removals_per_s": round(cfg.events / removal_s, 1),
            **cpu_budget(cpu, cfg.events, TARGETS["friendships_per_s"]),
        }

        sinks = [w for w in workers if w.worker == "milvus-sink"]
        result["freshness"] = []
        for rate in cfg.rates:
            count = int(rate * cfg.duration_s)
            log.info("freshness: %d friendships at %.0f/s", count, rate)
            before = freshness_buckets(sinks)
            pairs = synthetic_pairs(s, count, seed=int(rate) + 2)
            paced = replay(s, pairs, rate=rate, show_progress=False)
            wait_drained(s, timeout=600)
            after = freshness_buckets(sinks)
            replay(s, pairs, op="remove", show_progress=False)  # back to the base graph
            wait_drained(s, timeout=600)
            result["freshness"].append(
                {
                    "rate_target": rate,
                    "rate_achieved": round(paced.rate, 1),
                    "friendships": count,
                    "embeddings_upserted": int(after[-1][1] - before[-1][1]),
                    "p50_s": round(bucket_percentile(before, after, 0.50), 3),
                    "p99_s": round(bucket_percentile(before, after, 0.99), 3),
                }
            )
    finally:
        codes = {w.name: w.stop() for w in workers}
        if tfserving is not None:
            tfserving.stop()
        tansu.stop()
        milvus.stop()
    result["worker_exit_codes"] = codes
    result.update(
        {
            "dataset": cfg.dataset,
            "model_version": version,
            "config": asdict(cfg),
            "targets": TARGETS,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    print_table(result)
    return result


def print_table(result: dict[str, Any]) -> None:
    t = result["throughput"]
    members = result["config"]["members"]
    per = "one process" if members == 1 else f"{members} processes"
    table = Table(title=f"streaming chain, {result['dataset']} ({per} per worker)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    table.add_row(
        "friendships/s end to end",
        f"{t['friendships_per_s']:.0f}",
        f">= {TARGETS['friendships_per_s']:.0f}",
    )
    table.add_row("  (Kafka messages/s)", f"{2 * t['friendships_per_s']:.0f}", "")
    table.add_row("removals/s end to end", f"{t['removals_per_s']:.0f}", "")
    per = t["cpu_ms_per_friendship"]
    for name, share in t["worker_cpu_share"].items():
        table.add_row(f"  {name} CPU: cores, ms/friendship", f"{share:.2f}, {per[name]:.2f}", "")
    cores = result["machine"]["cpus"]
    table.add_row(
        f"CPU needed at {TARGETS['friendships_per_s']:.0f}/s (cores)",
        f"{t['cores_needed_at_target']:.1f}",
        f"<= {cores} (this machine)",
    )
    search = result.get("search_latency")
    if search:
        for phase, m in search["phases"].items():
            table.add_row(f"live-collection search p50 / p99, {phase}",
                          f"{m['p50_ms']:.1f} / {m['p99_ms']:.1f} ms", "")  # fmt: skip
    for f in result["freshness"]:
        at = f"@ {f['rate_achieved']:.0f}/s"
        table.add_row(f"freshness p50 {at}", f"{f['p50_s']:.3f} s", "")
        table.add_row(
            f"freshness p99 {at}", f"{f['p99_s']:.3f} s", f"<= {TARGETS['freshness_p99_s']:.0f} s"
        )
    Console().print(table)
