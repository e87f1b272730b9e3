"""Feature-store benchmark: the graph-feature job, Feast materialization into sqlite and Redis,
and online read latency through the Feast SDK and the `feast listen` gRPC feature server.

Why it exists: the stack's throughput claims (../shared/docs/STACK.md: "Redis takes ~90k
writes/s", "materializing array features is slow") decide how big a graph one machine can serve,
so they are measured here on synthetic graphs of the sizes that matter, in one run, and the
slow part is profiled rather than guessed.

Everything runs in its own workdir (default ``<workdir>/bench``), on a private redis-server and a
private `feast listen`, both on free loopback ports and stopped at the end. Each materialization
variant gets its own Feast project (and, for sqlite, its own file) so that every run writes into an
empty online store: the numbers are first loads, not upserts over existing rows.
"""

from __future__ import annotations

import contextlib
import cProfile
import gc
import importlib.metadata
import json
import logging
import os
import platform
import pstats
import random
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from friendrec import contract
from friendrec.config import PROJECT_ROOT, Settings
from friendrec.local_services import free_port, redis_server, stop_process
from friendrec.paths import DatasetPaths

if TYPE_CHECKING:
    from feast import FeatureStore

log = logging.getLogger(__name__)

STACK_REDIS_WRITES_PER_S = 90_000  # ../shared/docs/STACK.md
LATENCY_ENTITY_COUNTS = (1, 11)  # one user; a user and 10 sampled friends (the serving read)
_SANITY_USERS = 64
_CEILING_SAMPLE = 2_000
_CEILING_BATCH = 10_000
_TOP_SELF_ROWS = 12
_STARTUP_TIMEOUT_S = 120.0

# cProfile's names of the C functions that do the store write and the value serialization.
_SQLITE_EXECUTE = "<method 'execute' of 'sqlite3.Connection' objects>"
_PROTO_SERIALIZE = "<method 'SerializeToString' of 'google._upb._message.Message' objects>"
_VERSIONED_PACKAGES = (
    "feast",
    "duckdb",
    "redis",
    "pyarrow",
    "numpy",
    "pandas",
    "scipy",
    "grpcio",
    "protobuf",
)

_WINDOW_START = datetime(1970, 1, 2, tzinfo=UTC)  # as the materialize job's full runs

StoreKind = Literal["sqlite", "redis"]


# --------------------------------------------------------------------------------------------
# Materialization variants: the stock configuration and Feast's own knobs that may speed it up.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One online-store configuration to materialize with (stock Feast settings only)."""

    key: str
    store: StoreKind
    batch_size: int | None = None  # materialization.online_write_batch_size (None: one batch)
    skip_dedup: bool = False  # redis online_store.skip_dedup: no read-before-write

    @property
    def label(self) -> str:
        parts = []
        if self.skip_dedup:
            parts.append("skip_dedup")
        if self.batch_size:
            parts.append(f"batch {self.batch_size:,}")
        return ", ".join(parts) or "default"

    def feast_settings(self) -> dict[str, Any]:
        """The feature_store.yaml keys this variant adds (recorded in the JSON)."""
        extra: dict[str, Any] = {}
        if self.batch_size:
            extra["materialization"] = {"online_write_batch_size": self.batch_size}
        if self.skip_dedup:
            extra["online_store"] = {"skip_dedup": True}
        return extra


VARIANTS: dict[str, Variant] = {
    v.key: v
    for v in (
        Variant("sqlite", "sqlite"),
        Variant("sqlite_batch10k", "sqlite", batch_size=10_000),
        Variant("redis", "redis"),
        Variant("redis_batch10k", "redis", batch_size=10_000),
        Variant("redis_skip_dedup", "redis", skip_dedup=True),
        Variant("redis_skip_dedup_batch10k", "redis", batch_size=10_000, skip_dedup=True),
    )
}
BASELINES = ("sqlite", "redis")
DEFAULT_TUNED = ("sqlite_batch10k", "redis_skip_dedup", "redis_skip_dedup_batch10k")


@dataclass
class BenchConfig:
    """What one `friendrec bench features` run measures."""

    sizes: list[int]
    workdir: Path
    output: Path
    tuned: list[str] = field(default_factory=lambda: list(DEFAULT_TUNED))
    repeats: list[int] = field(default_factory=lambda: [1])  # per size, or one for all
    requests: int = 500
    warmup: int = 50
    profile: bool = True
    seed: int = 42

    def __post_init__(self) -> None:
        self.sizes = sorted(set(self.sizes))
        unknown = [k for k in self.tuned if k not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
        if len(self.repeats) not in (1, len(self.sizes)) or min(self.repeats) < 1:
            raise ValueError("repeats: one count >= 1, or one per size")

    def repeats_for(self, size: int) -> int:
        """Materializations per variant at this size (their median is reported)."""
        if len(self.repeats) == 1:
            return self.repeats[0]
        return self.repeats[sorted(self.sizes).index(size)]

    @property
    def variants(self) -> list[Variant]:
        """The stock sqlite and redis variants first (the baselines of every ratio)."""
        return [VARIANTS[k] for k in (*BASELINES, *[k for k in self.tuned if k not in BASELINES])]


# --------------------------------------------------------------------------------------------
# Processes: a private redis-server and a private `feast listen`.
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def feast_listen(feast_dir: Path, log_file: Path) -> Iterator[str]:
    """`feast -c <feast_dir> listen` on a free loopback port, ready to serve: yields host:port."""
    import grpc

    binary = Path(sys.executable).with_name("feast")
    command = str(binary) if binary.exists() else shutil.which("feast")
    if command is None:
        raise RuntimeError("the feast CLI is not installed in this environment")
    address = f"127.0.0.1:{free_port()}"
    with open(log_file, "wb") as out:
        proc = subprocess.Popen(
            [command, "-c", str(feast_dir), "listen", "--address", address],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        with grpc.insecure_channel(address) as channel:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"feast listen exited ({proc.returncode}); see {log_file}")
                try:
                    grpc.channel_ready_future(channel).result(timeout=1.0)
                    break
                except grpc.FutureTimeoutError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"feast listen not ready; see {log_file}") from None
        log.info("feast listen on %s (pid %d)", address, proc.pid)
        yield address
    finally:
        stop_process(proc, "feast listen")


# --------------------------------------------------------------------------------------------
# Settings and stores per variant.
# --------------------------------------------------------------------------------------------


def variant_settings(settings: Settings, variant: Variant, redis_address: str | None) -> Settings:
    """Settings whose Feast project (and online store) belong to this variant alone."""
    features: dict[str, Any] = {"feast_project_prefix": f"bench_{variant.key}"}
    if variant.store == "redis":
        if redis_address is None:
            raise ValueError("a redis variant needs the bench redis-server")
        features.update(online_store="redis", redis_connection_string=redis_address)
    else:
        features["online_store"] = "sqlite"
    return settings.model_copy(update={"features": settings.features.model_copy(update=features)})


def sqlite_path(paths: DatasetPaths, variant: Variant) -> Path:
    """The stock variant uses the standard file (`write_repo_dir` points there), others their
    own (deleted after measuring)."""
    if variant.key == "sqlite":
        return paths.feast_online_sqlite
    return paths.feast_dir / f"online_{variant.key}.db"


def open_variant_store(settings: Settings, paths: DatasetPaths, variant: Variant) -> FeatureStore:
    """A FeatureStore rendered exactly like `friendrec.feast_store.open_store`, plus the variant's
    stock Feast settings (feature_store.yaml keys; Feast itself is unchanged)."""
    from feast import FeatureStore, RepoConfig

    from friendrec.feast_store import render_config

    raw = render_config(settings, paths)
    if variant.store == "sqlite":
        raw["online_store"]["path"] = str(sqlite_path(paths, variant))
    for key, value in variant.feast_settings().items():
        raw[key] = {**raw.get(key, {}), **value}
    paths.feast_dir.mkdir(parents=True, exist_ok=True)
    return FeatureStore(config=RepoConfig(repo_path=paths.feast_dir, **raw))


# --------------------------------------------------------------------------------------------
# Measurements.
# --------------------------------------------------------------------------------------------


@dataclass
class JobTiming:
    size: int
    users: int
    friendships: int
    prepare_s: float
    build_features_s: float

    @property
    def total_s(self) -> float:
        return self.prepare_s + self.build_features_s


@dataclass
class RunTiming:
    """One materialization of both views: wall and CPU seconds per view (this process's CPU,
    which load from other processes barely moves, unlike wall time) and redis-server's CPU."""

    wall_s: dict[str, float]
    cpu_s: dict[str, float]
    redis_server_cpu_s: float | None
    apply_s: float
    rss_start_mb: float  # what earlier steps left in the process (the allocator keeps some)
    peak_rss_mb: float
    load_avg_1m: float

    @property
    def total_wall_s(self) -> float:
        return sum(self.wall_s.values())

    @property
    def total_cpu_s(self) -> float:
        return sum(self.cpu_s.values())


@dataclass
class MaterializeResult:
    """One variant at one size over its repeats (medians). Total rows/s = users / (sum of both
    views' seconds): users that became fully servable per second."""

    size: int
    variant: str
    store: StoreKind
    label: str
    feast_settings: dict[str, Any]
    runs: list[RunTiming] = field(default_factory=list)

    def _median(self, value: Callable[[RunTiming], float]) -> float:
        return float(np.median([value(r) for r in self.runs]))

    def view_wall_s(self, view: str) -> float:
        return self._median(lambda r: r.wall_s[view])

    @property
    def wall_s(self) -> float:
        return self._median(lambda r: r.total_wall_s)

    @property
    def cpu_s(self) -> float:
        return self._median(lambda r: r.total_cpu_s)

    @property
    def users_per_s(self) -> float:
        return self.size / self.wall_s

    @property
    def users_per_cpu_s(self) -> float:
        return self.size / self.cpu_s

    def as_dict(self) -> dict[str, Any]:
        redis_cpu = [r.redis_server_cpu_s for r in self.runs if r.redis_server_cpu_s is not None]
        return {
            "size": self.size,
            "variant": self.variant,
            "store": self.store,
            "label": self.label,
            "feast_settings": self.feast_settings,
            "repeats": len(self.runs),
            "views": {
                view: {
                    "rows": self.size,
                    "seconds": round(self.view_wall_s(view), 3),
                    "rows_per_s": round(self.size / self.view_wall_s(view), 1),
                }
                for view in self.runs[0].wall_s
            },
            "total": {
                "rows": self.size,
                "seconds": round(self.wall_s, 3),
                "rows_per_s": round(self.users_per_s, 1),
                "cpu_s": round(self.cpu_s, 3),
                "rows_per_cpu_s": round(self.users_per_cpu_s, 1),
                "redis_server_cpu_s": round(float(np.median(redis_cpu)), 3) if redis_cpu else None,
            },
            "peak_rss_mb": round(max(r.peak_rss_mb for r in self.runs), 1),
            "rss_growth_mb": round(max(r.peak_rss_mb - r.rss_start_mb for r in self.runs), 1),
            "runs": [
                {
                    "wall_s": {k: round(v, 3) for k, v in r.wall_s.items()},
                    "cpu_s": {k: round(v, 3) for k, v in r.cpu_s.items()},
                    "redis_server_cpu_s": r.redis_server_cpu_s and round(r.redis_server_cpu_s, 3),
                    "apply_s": round(r.apply_s, 3),
                    "rss_start_mb": round(r.rss_start_mb, 1),
                    "peak_rss_mb": round(r.peak_rss_mb, 1),
                    "load_avg_1m": r.load_avg_1m,
                }
                for r in self.runs
            ],
        }


@dataclass
class LatencyStats:
    path: str
    store: StoreKind
    entities: int
    requests: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float

    @classmethod
    def of(cls, path: str, store: StoreKind, entities: int, ns: Sequence[int]) -> LatencyStats:
        ms = np.asarray(ns, dtype=np.float64) / 1e6
        return cls(
            path=path,
            store=store,
            entities=entities,
            requests=len(ms),
            p50_ms=float(np.percentile(ms, 50)),
            p99_ms=float(np.percentile(ms, 99)),
            mean_ms=float(ms.mean()),
            max_ms=float(ms.max()),
        )


class RssSampler:
    """Peak resident memory of this process while a block runs (polls /proc/self/statm), so
    that a variant's memory can be told apart from an earlier, bigger one in the same run."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self.interval_s = interval_s
        self.start_bytes = self.peak_bytes = 0
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="rss-sampler", daemon=True)

    def _rss(self) -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * self._page

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._rss())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self.start_bytes = self.peak_bytes = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._rss())

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20

    @property
    def start_mb(self) -> float:
        return self.start_bytes / 2**20


def _quiet_feast() -> None:
    """Feast logs every registry refresh at INFO and its dependencies warn about their own
    deprecations on every run; keep the benchmark output readable."""
    for name in ("feast", "ibis"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
    warnings.filterwarnings("ignore", message=r"fetch_arrow_table\(\) is deprecated")
    warnings.filterwarnings("ignore", message=r'Field name "vector_enabled"')


def run_graph_job(settings: Settings, paths: DatasetPaths) -> JobTiming:
    """Prepare (generate + write) the synthetic graph, then run the graph-feature job."""
    from feature_repo.jobs.graph_features import build_features
    from friendrec.data.canonical import prepare

    for stale in (paths.data_dir, paths.features_dir, paths.feast_dir):
        shutil.rmtree(stale, ignore_errors=True)  # a clean start: the job writes everyone
    log.info("preparing %s ...", paths.name)
    started = time.perf_counter()
    meta = prepare(settings, paths.name)
    prepared = time.perf_counter()
    log.info("building graph features for %s ...", paths.name)
    build_features(settings, paths.name)
    built = time.perf_counter()
    return JobTiming(
        size=meta.num_users,
        users=meta.num_users,
        friendships=meta.num_friendships,
        prepare_s=prepared - started,
        build_features_s=built - prepared,
    )


def _window_end(source: Path) -> datetime:
    """Newest event time in an offline source + 1 s: the full data-time window of the
    materialize job (`feature_repo/jobs/materialize.py`), so every row travels."""
    column = pq.read_table(source, columns=[contract.EVENT_TIMESTAMP])[contract.EVENT_TIMESTAMP]
    return pc.max(column).as_py().astimezone(UTC) + timedelta(seconds=1)


def _flush_redis(address: str) -> None:
    import redis

    host, port = address.split(",", 1)[0].rsplit(":", 1)
    redis.Redis(host=host, port=int(port)).flushall()


def _redis_client(address: str):
    import redis

    host, port = address.split(",", 1)[0].rsplit(":", 1)
    return redis.Redis(host=host, port=int(port))


def _check_online(
    store: Any, user_ids: np.ndarray, rng: np.random.Generator, features: contract.Contract
) -> None:
    """Fail loudly if sampled users did not land online (a fast wrong run is no result): the
    dataset's first profile feature and the degree must be there."""
    sample = rng.choice(user_ids, size=min(_SANITY_USERS, len(user_ids)), replace=False)
    names = {
        contract.PROFILE_VIEW: features.profile_features[0].name,
        contract.GRAPH_VIEW: contract.DEGREE.name,
    }
    response = store.get_online_features(
        features=[f"{view}:{name}" for view, name in names.items()],
        entity_rows=[{contract.JOIN_KEY: int(u)} for u in sample],
    ).to_dict()
    missing = sum(v is None for name in names.values() for v in response[name])
    if missing:
        raise RuntimeError(f"{missing} sampled feature values are missing after materialization")


def _redis_cpu_s(address: str | None) -> float | None:
    if address is None:
        return None
    info = _redis_client(address).info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def materialize_once(
    settings: Settings,
    paths: DatasetPaths,
    variant: Variant,
    redis_address: str | None,
    user_ids: np.ndarray,
    profiler: cProfile.Profile | None = None,
) -> RunTiming:
    """Apply the definitions into the variant's own, empty project, then materialize both views
    (the full data-time window of `feature_repo.jobs.materialize`), timing each view."""
    from feature_repo.definitions import build_definitions

    vsettings = variant_settings(settings, variant, redis_address)
    redis_address = redis_address if variant.store == "redis" else None
    if redis_address is not None:
        _flush_redis(redis_address)  # an empty store: every run is a first load
    else:
        sqlite_path(paths, variant).unlink(missing_ok=True)
    started = time.perf_counter()
    store = open_variant_store(vsettings, paths, variant)
    features = contract.load(paths.data_dir)
    store.apply(build_definitions(paths, features).objects())
    apply_s = time.perf_counter() - started
    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}
    sources = {contract.PROFILE_VIEW: paths.profile_source, contract.GRAPH_VIEW: paths.graph_source}
    gc.collect()  # garbage of the previous run must not be collected inside this one
    redis_cpu_before = _redis_cpu_s(redis_address)
    with RssSampler() as memory:
        for view, source in sources.items():
            end = _window_end(source)
            log.info("materializing %s into %s (%s) ...", view, variant.store, variant.label)
            started, cpu_started = time.perf_counter(), time.process_time()
            if profiler is not None:
                profiler.enable()
            try:
                # Feast reports progress with print(): keep stdout for the result tables.
                with contextlib.redirect_stdout(sys.stderr):
                    store.materialize(start_date=_WINDOW_START, end_date=end, feature_views=[view])
            finally:
                if profiler is not None:
                    profiler.disable()
            wall[view] = time.perf_counter() - started
            cpu[view] = time.process_time() - cpu_started
    redis_cpu_after = _redis_cpu_s(redis_address)
    _check_online(store, user_ids, np.random.default_rng(0), features)
    if redis_address is not None:
        keys = _redis_client(redis_address).dbsize()
        if keys != len(user_ids):
            raise RuntimeError(f"redis holds {keys} keys after materializing {len(user_ids)} users")
    run = RunTiming(
        wall_s=wall,
        cpu_s=cpu,
        redis_server_cpu_s=None
        if redis_cpu_before is None or redis_cpu_after is None
        else redis_cpu_after - redis_cpu_before,
        apply_s=apply_s,
        rss_start_mb=memory.start_mb,
        peak_rss_mb=memory.peak_mb,
        load_avg_1m=round(os.getloadavg()[0], 2),
    )
    log.info(
        "%s (%s): %.1f s wall, %.1f s CPU, %.0f users/s",
        variant.store,
        variant.label,
        run.total_wall_s,
        run.total_cpu_s,
        len(user_ids) / run.total_wall_s,
    )
    return run


# --- profiling -----------------------------------------------------------------------------


def _code_key(fn: Callable[..., Any]) -> tuple[str, int, str]:
    code = fn.__code__
    return (code.co_filename, code.co_firstlineno, code.co_name)


def _stage_functions(store: StoreKind) -> dict[str, list[tuple[str, int, str] | str]]:
    """Where materialization time can go, as pstats keys (code objects) or builtin names.
    Names with a dot are parts of the stage before the dot."""
    from feast import FeatureStore, type_map, utils
    from feast.infra.compute_engines.dag.plan import ExecutionPlan
    from feast.infra.compute_engines.local.nodes import LocalOutputNode
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.infra.online_stores import helpers
    from feast.infra.online_stores.redis import RedisOnlineStore
    from feast.infra.online_stores.sqlite import SqliteOnlineStore

    common: dict[str, list[tuple[str, int, str] | str]] = {
        "materialize": [_code_key(FeatureStore.materialize)],
        "dag": [_code_key(ExecutionPlan.execute)],
        "output_node": [_code_key(LocalOutputNode.execute)],
        "arrow_to_proto": [_code_key(utils._convert_arrow_to_proto)],
        "arrow_to_proto.list_features": [_code_key(type_map._convert_list_values_to_proto)],
        "arrow_to_proto.list_features.sanitize (ndarray->list, None scan)": [
            _code_key(type_map._sanitize_list_value)
        ],
        "arrow_to_proto.scalar_features": [_code_key(type_map._convert_scalar_values_to_proto)],
        "arrow_to_proto.entity_keys": [_code_key(utils._build_entity_keys)],
    }
    if store == "sqlite":
        return {
            **common,
            "online_write_batch": [_code_key(SqliteOnlineStore.online_write_batch)],
            "online_write_batch.sqlite execute (one upsert per user and feature)": [
                _SQLITE_EXECUTE
            ],
            "online_write_batch.entity key serialization": [_code_key(serialize_entity_key)],
            "online_write_batch.value SerializeToString": [_PROTO_SERIALIZE],
            "online_write_batch.extract_text_and_num": [_code_key(helpers.extract_text_and_num)],
        }
    from redis.client import Pipeline
    from redis.commands.core import HashCommands

    return {
        **common,
        "online_write_batch": [_code_key(RedisOnlineStore.online_write_batch)],
        "online_write_batch.redis-py pipeline execute (pack, send, replies)": [
            _code_key(Pipeline.execute)
        ],
        "online_write_batch.redis-py command building (hset, hmget)": [
            _code_key(HashCommands.hset),
            _code_key(HashCommands.hmget),
        ],
        "online_write_batch.entity key serialization": [_code_key(serialize_entity_key)],
        "online_write_batch.field name hashing (mmh3)": [_code_key(helpers._mmh3)],
        "online_write_batch.value SerializeToString": [_PROTO_SERIALIZE],
    }


def _cumulative(stats: dict[Any, Any], wanted: Sequence[tuple[str, int, str] | str]) -> float:
    total = 0.0
    for key, (_cc, _nc, _tt, ct, _callers) in stats.items():
        for want in wanted:
            if (isinstance(want, str) and key[0] == "~" and key[2] == want) or key == want:
                total += ct
    return total


def _short(key: tuple[str, int, str]) -> str:
    filename, line, name = key
    if filename == "~":
        return name
    marker = "site-packages/"
    short = filename.split(marker, 1)[1] if marker in filename else filename
    return f"{short}:{line}({name})"


def summarize_profile(profiler: cProfile.Profile, store: StoreKind, top: int = 20) -> dict:
    """Stage breakdown (seconds under the profiler and share of the profiled total) and the top
    cumulative functions. Shares matter more than seconds: cProfile inflates Python-heavy code."""
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    fns = _stage_functions(store)
    raw = {name: _cumulative(stats, keys) for name, keys in fns.items()}
    total = raw["materialize"]
    stages = {
        "registry and bookkeeping": total - raw["dag"],
        "offline read (duckdb) and DAG nodes": raw["dag"] - raw["output_node"],
        **{k: raw[k] for k in fns if k.startswith(("arrow_to_proto", "online_write_batch"))},
        "output node, rest": raw["output_node"] - raw["arrow_to_proto"] - raw["online_write_batch"],
    }
    entries = [(k, v) for k, v in stats.items() if "importlib" not in k[0] and k[2] != "<module>"]

    def top_by(column: int) -> list[dict[str, Any]]:
        ranked = sorted(entries, key=lambda kv: kv[1][column], reverse=True)[:top]
        return [
            {
                "function": _short(key),
                "calls": value[1],
                "tottime_s": round(value[2], 3),
                "cumtime_s": round(value[3], 3),
                "self_share": round(value[2] / total, 4) if total else 0.0,
            }
            for key, value in ranked
        ]

    return {
        "profiled_total_s": round(total, 3),
        "stages": {
            name: {"seconds": round(sec, 3), "share": round(sec / total, 4) if total else 0.0}
            for name, sec in stages.items()
        },
        "top_cumulative": top_by(3),
        "top_self": top_by(2),  # where the interpreter actually spends it
    }


def profile_materialization(
    settings: Settings,
    paths: DatasetPaths,
    variant: Variant,
    redis_address: str | None,
    user_ids: np.ndarray,
    out_dir: Path,
) -> dict[str, Any]:
    """cProfile one materialization (both views, its own project) and break it into stages."""
    profiler = cProfile.Profile()
    run = materialize_once(settings, paths, variant, redis_address, user_ids, profiler)
    out_dir.mkdir(parents=True, exist_ok=True)
    pstats_file = out_dir / f"profile_{variant.store}_{len(user_ids)}.pstats"
    profiler.dump_stats(pstats_file)
    summary = summarize_profile(profiler, variant.store)
    summary.update(
        store=variant.store,
        size=len(user_ids),
        wall_s_under_profiler=round(run.total_wall_s, 3),
        users_per_s_under_profiler=round(len(user_ids) / run.total_wall_s, 1),
        pstats_file=str(pstats_file),
    )
    return summary


# --- write ceilings: the same bytes written without Feast's per-row Python -----------------


def redis_ceiling(redis_address: str, users: int) -> dict[str, Any]:
    """HSET rate of the real Feast hashes (copied from the store) through one redis-py pipeline:
    what Redis and the client can take, to compare with Feast's materialization rate."""
    client = _redis_client(redis_address)
    keys = []
    for key in client.scan_iter(count=1000):
        keys.append(key)
        if len(keys) >= _CEILING_SAMPLE:
            break
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.hgetall(key)
    payloads: list[dict[bytes, bytes]] = pipe.execute()
    nbytes = sum(len(k) + len(v) for p in payloads for k, v in p.items()) / len(payloads)
    started = time.perf_counter()
    for lo in range(0, users, _CEILING_BATCH):
        with client.pipeline(transaction=False) as pipe:
            for i in range(lo, min(users, lo + _CEILING_BATCH)):
                pipe.hset(b"bench_ceiling:%d" % i, mapping=payloads[i % len(payloads)])
            pipe.execute()
    seconds = time.perf_counter() - started
    client.flushall()
    return {
        "users": users,
        "fields_per_hset": round(float(np.mean([len(p) for p in payloads])), 1),
        "bytes_per_user": round(nbytes, 1),
        "seconds": round(seconds, 3),
        "hset_per_s": round(users / seconds, 1),
        "users_per_s": round(users / seconds, 1),
        "note": "one HSET per user with both views' fields (Feast does one HSET per user per view)",
    }


def sqlite_ceiling(paths: DatasetPaths, variant: Variant, project: str) -> dict[str, Any]:
    """Re-insert the rows Feast wrote (same table, indexes and upsert) with one executemany: what
    sqlite itself takes, to compare with Feast's materialization rate."""
    source = sqlite3.connect(sqlite_path(paths, variant))
    target_file = paths.feast_dir / "ceiling.db"
    target_file.unlink(missing_ok=True)
    target = sqlite3.connect(target_file)
    try:
        views: dict[str, Any] = {}
        for view in (contract.PROFILE_VIEW, contract.GRAPH_VIEW):
            table = f"{project}_{view}"
            # The table and its explicit indexes, exactly as Feast created them.
            for (ddl,) in source.execute(
                "SELECT sql FROM sqlite_master WHERE tbl_name = ? AND sql IS NOT NULL "
                "ORDER BY type = 'index'",
                (table,),
            ).fetchall():
                target.execute(ddl)
            cols = [r[1] for r in source.execute(f'PRAGMA table_info("{table}")')]
            rows = source.execute(f'SELECT {", ".join(cols)} FROM "{table}"').fetchall()
            keep = [c for c in cols if c not in ("entity_key", "feature_name")]
            sql = (
                f'INSERT INTO "{table}" ({", ".join(cols)}) VALUES ({", ".join("?" * len(cols))}) '
                f"ON CONFLICT(entity_key, feature_name) DO UPDATE SET "
                + ", ".join(f"{c} = excluded.{c}" for c in keep)
            )
            started = time.perf_counter()
            with target:
                target.executemany(sql, rows)
            seconds = time.perf_counter() - started
            views[view] = {
                "sqlite_rows": len(rows),
                "seconds": round(seconds, 3),
                "sqlite_rows_per_s": round(len(rows) / seconds, 1),
            }
        users = source.execute(
            f'SELECT COUNT(DISTINCT entity_key) FROM "{project}_{contract.GRAPH_VIEW}"'
        ).fetchone()[0]
        seconds = sum(v["seconds"] for v in views.values())
        return {
            "views": views,
            "users": users,
            "seconds": round(seconds, 3),
            "users_per_s": round(users / seconds, 1),
            "note": "Feast's rows (one per user and feature) re-inserted with one executemany",
        }
    finally:
        source.close()
        target.close()
        target_file.unlink(missing_ok=True)


# --- online reads --------------------------------------------------------------------------


def entity_batches(paths: DatasetPaths, count: int, entities: int, seed: int) -> list[list[int]]:
    """Request entity lists: a random user, then up to ``entities - 1`` of its sampled friends
    (padded with random users), the shape of the serving path's second read."""
    table = pq.read_table(paths.graph_source, columns=[contract.JOIN_KEY, contract.FRIEND_IDS.name])
    user_ids = table.column(contract.JOIN_KEY).to_numpy()
    friends = table.column(contract.FRIEND_IDS.name)
    rng = random.Random(seed)
    batches = []
    for _ in range(count):
        row = rng.randrange(len(user_ids))
        ids = [int(user_ids[row])]
        if entities > 1:
            ids += [int(f) for f in (friends[row].as_py() or [])[: entities - 1]]
            while len(ids) < entities:
                ids.append(int(user_ids[rng.randrange(len(user_ids))]))
        batches.append(ids)
    return batches


def sdk_readers(store: Any, features: contract.Contract) -> dict[str, Callable[[list[int]], Any]]:
    """`store.get_online_features` with the serving refs (of the dataset's contract ``features``).
    Its response wraps the same proto the gRPC server sends; `.to_dict()` is what a Python caller
    then pays to use the values."""
    refs = features.feature_refs()

    def sdk(ids: list[int]) -> Any:
        return store.get_online_features(
            features=refs, entity_rows=[{contract.JOIN_KEY: u} for u in ids]
        )

    return {"sdk": sdk, "sdk+to_dict": lambda ids: sdk(ids).to_dict()}


def grpc_reader(
    channel: Any, probe: list[int], features: contract.Contract
) -> Callable[[list[int]], Any]:
    """GetOnlineFeatures on `feast listen` with the serving refs of the dataset's contract
    ``features`` (the request grpc_server.py expects: a FeatureList and the entity column as a
    RepeatedValue). ``probe``: known users whose values must come back PRESENT before any timing
    (a wrong project fails here)."""
    from feast.protos.feast.serving.GrpcServer_pb2_grpc import GrpcFeatureServerStub
    from feast.protos.feast.serving.ServingService_pb2 import (
        FeatureList,
        FieldStatus,
        GetOnlineFeaturesRequest,
    )
    from feast.protos.feast.types.Value_pb2 import RepeatedValue, Value

    stub = GrpcFeatureServerStub(channel)
    refs = FeatureList(val=features.feature_refs())

    def call(ids: list[int]) -> Any:
        entities = RepeatedValue(val=[Value(int64_val=u) for u in ids])
        request = GetOnlineFeaturesRequest(features=refs, entities={contract.JOIN_KEY: entities})
        return stub.GetOnlineFeatures(request, timeout=30)

    response = call(probe)
    names = list(response.metadata.feature_names.val)
    degree = response.results[names.index(contract.DEGREE.name)]
    if any(status != FieldStatus.PRESENT for status in degree.statuses):
        raise RuntimeError("feast listen returned missing values for known users")
    return call


Reader = tuple[str, StoreKind]  # (path, store)
ReadFn = Callable[[list[int]], Any]


def time_readers(
    groups: list[dict[Reader, ReadFn]],
    batches: dict[int, list[list[int]]],
    warmup: int,
    block: int = 25,
) -> dict[tuple[Reader, int], list[int]]:
    """Nanoseconds per request. Groups take turns in blocks of ``block`` requests; within a
    group the readers take turns per request, in a shuffled order. So a burst of load from other
    processes on this shared machine hits every reader alike.

    Why groups: Feast keeps one process-global feature-resolution cache and clears it whenever
    the registry it sees changes, so two FeatureStore objects used in turn (sqlite, Redis) rebuild
    it on every call (+1.5 ms), and an SDK read right after a gRPC call pays for the gRPC client's
    threads (+0.1 ms). Each block therefore starts with one untimed read per reader."""
    samples: dict[tuple[Reader, int], list[int]] = {
        (r, n): [] for group in groups for r in group for n in batches
    }
    rng = random.Random(0)
    for entities, entity_lists in batches.items():
        for group in groups:
            for ids in entity_lists[:warmup]:
                for read in group.values():
                    read(ids)
        timed = entity_lists[warmup:]
        with tqdm(total=len(timed), desc=f"reads x{entities}", unit="round") as bar:
            for lo in range(0, len(timed), block):
                for group in groups:
                    order = list(group.items())
                    for read in group.values():
                        read(entity_lists[0])  # untimed: re-warm after the switch
                    for ids in timed[lo : lo + block]:
                        rng.shuffle(order)
                        for reader, read in order:
                            started = time.perf_counter_ns()
                            read(ids)
                            samples[(reader, entities)].append(time.perf_counter_ns() - started)
                bar.update(len(timed[lo : lo + block]))
    return samples


def measure_latency(
    settings: Settings,
    paths: DatasetPaths,
    redis_address: str,
    redis_variant: Variant,
    config: BenchConfig,
    log_dir: Path,
) -> list[LatencyStats]:
    """SDK and gRPC read latency on sqlite (stock project) and Redis (last loaded project), with
    both `feast listen` servers up at once so that the stores are timed side by side."""
    import grpc

    from friendrec.feast_store import open_store, write_repo_dir

    batches = {
        n: entity_batches(paths, config.warmup + config.requests, n, config.seed + n)
        for n in LATENCY_ENTITY_COUNTS
    }
    kinds: tuple[tuple[StoreKind, Variant], ...] = (
        ("sqlite", VARIANTS["sqlite"]),
        ("redis", redis_variant),
    )
    groups: list[dict[Reader, ReadFn]] = []
    grpc_group: dict[Reader, ReadFn] = {}
    features = contract.load(paths.data_dir)
    with contextlib.ExitStack() as stack:
        for kind, variant in kinds:
            vsettings = variant_settings(settings, variant, redis_address)
            # Both stores share the dataset's Feast dir: `feast listen` reads feature_store.yaml
            # once at start-up, so the second write only affects the second server.
            feast_dir = write_repo_dir(vsettings, paths)
            address = stack.enter_context(
                feast_listen(feast_dir, log_dir / f"feast-listen-{kind}.log")
            )
            channel = stack.enter_context(grpc.insecure_channel(address))
            sdk = sdk_readers(open_store(vsettings, paths.name), features)
            groups.append({(path, kind): read for path, read in sdk.items()})
            grpc_group[("grpc", kind)] = grpc_reader(channel, batches[max(batches)][0], features)
        groups.append(grpc_group)
        log.info("timing Feast SDK and feast listen reads on sqlite and redis ...")
        samples = time_readers(groups, batches, config.warmup)
    return [
        LatencyStats.of(path, kind, n, samples[((path, kind), n)])
        for kind, _ in kinds
        for n in LATENCY_ENTITY_COUNTS
        for path in ("sdk", "sdk+to_dict", "grpc")
    ]


# --------------------------------------------------------------------------------------------
# Machine description and ratios.
# --------------------------------------------------------------------------------------------


def _redis_version() -> str | None:
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    for part in out.stdout.split():
        if part.startswith("v="):
            return part[2:]
    return out.stdout.strip() or None


def machine_info() -> dict[str, Any]:
    """Where the numbers come from: they mean little without the machine and versions."""
    cpu_model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_gb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        first = Path("/proc/meminfo").read_text().splitlines()[0]
        mem_gb = round(int(first.split()[1]) / 1024**2, 1)
    packages = {}
    for name in _VERSIONED_PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            packages[name] = importlib.metadata.version(name)
    return {
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gb": mem_gb,
        "python": platform.python_version(),
        "packages": packages,
        "redis_server": _redis_version(),
        "sqlite": sqlite3.sqlite_version,
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    if not a or not b:
        return None
    return round(a / b, 3)


def _speedup(a: MaterializeResult | None, b: MaterializeResult | None) -> dict[str, Any] | None:
    """a's rows/s over b's, by wall time and by this process's CPU time."""
    if a is None or b is None:
        return None
    return {
        "wall": _ratio(a.users_per_s, b.users_per_s),
        "cpu": _ratio(a.users_per_cpu_s, b.users_per_cpu_s),
    }


def compute_ratios(
    materialize: list[MaterializeResult],
    latency: list[LatencyStats],
    profiles: list[dict[str, Any]],
    ceilings: dict[str, Any],
) -> dict[str, Any]:
    """Ratios between numbers of the same run (the machine's load cancels out, mostly)."""
    by = {(r.size, r.variant): r for r in materialize}
    sizes = sorted({r.size for r in materialize})
    out: dict[str, Any] = {}
    for size in sizes:
        base_redis = by.get((size, "redis"))
        entry: dict[str, Any] = {
            "redis_vs_sqlite_default": _speedup(base_redis, by.get((size, "sqlite"))),
        }
        if base_redis is not None:
            hset_per_s = 2 * base_redis.users_per_s  # one HSET per user and view
            entry["redis_default_hset_per_s"] = round(hset_per_s, 1)
            entry["redis_default_hset_per_s_vs_stack_90k"] = _ratio(
                hset_per_s, STACK_REDIS_WRITES_PER_S
            )
        for r in materialize:
            if r.size == size and r.variant not in BASELINES:
                entry[f"{r.variant}_vs_{r.store}_default"] = _speedup(r, by.get((size, r.store)))
        best = {
            kind: max(
                (r for r in materialize if r.size == size and r.store == kind),
                key=lambda r: r.users_per_s,
                default=None,
            )
            for kind in ("sqlite", "redis")
        }
        entry["best_redis_vs_best_sqlite"] = _speedup(best["redis"], best["sqlite"])
        entry["best"] = {k: (v.variant if v else None) for k, v in best.items()}
        out[f"materialize_{size}"] = entry
    if len(sizes) > 1:
        out["materialize_scaling"] = {
            f"{variant}_{sizes[-1]}_vs_{sizes[0]}": _speedup(
                by[(sizes[-1], variant)], by[(sizes[0], variant)]
            )
            for variant in dict.fromkeys(r.variant for r in materialize)
            if (sizes[-1], variant) in by and (sizes[0], variant) in by
        }
    if ceilings:
        size = ceilings["size"]
        out["feast_vs_direct_write"] = {
            f"{kind}_feast_default_over_direct_{size}": _ratio(
                by[(size, kind)].users_per_s, ceilings[kind]["users_per_s"]
            )
            for kind in ("sqlite", "redis")
            if kind in ceilings and (size, kind) in by
        }
        out["profiler_overhead"] = {
            f"{p['store']}_unprofiled_over_profiled_speed": _ratio(
                by[(p["size"], p["store"])].users_per_s, p["users_per_s_under_profiler"]
            )
            for p in profiles
            if (p["size"], p["store"]) in by
        }
    lat = {(s.path, s.store, s.entities): s for s in latency}
    lat_ratios: dict[str, Any] = {}
    for entities in LATENCY_ENTITY_COUNTS:
        for path in ("sdk", "sdk+to_dict", "grpc"):
            a, b = lat.get((path, "redis", entities)), lat.get((path, "sqlite", entities))
            if a and b:
                lat_ratios[f"{path}_redis_vs_sqlite_p50_x{entities}"] = _ratio(a.p50_ms, b.p50_ms)
        for kind in ("sqlite", "redis"):
            a, b = lat.get(("grpc", kind, entities)), lat.get(("sdk", kind, entities))
            if a and b:
                lat_ratios[f"grpc_vs_sdk_p50_{kind}_x{entities}"] = _ratio(a.p50_ms, b.p50_ms)
    for path in ("sdk", "grpc"):
        for kind in ("sqlite", "redis"):
            a, b = lat.get((path, kind, 11)), lat.get((path, kind, 1))
            if a and b:
                lat_ratios[f"{path}_{kind}_x11_vs_x1_p50"] = _ratio(a.p50_ms, b.p50_ms)
    out["latency"] = lat_ratios
    return out


# --------------------------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------------------------


def _warm_imports() -> None:
    """Import what the first materialization would otherwise import inside its timing."""
    import ibis.backends.duckdb  # noqa: F401
    from feast.infra.compute_engines.local import compute  # noqa: F401
    from feast.infra.offline_stores import duckdb  # noqa: F401
    from feast.infra.online_stores import redis, sqlite  # noqa: F401


def _profile_and_ceilings(
    settings: Settings,
    paths: DatasetPaths,
    redis_address: str,
    user_ids: np.ndarray,
    out_dir: Path,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Profile one stock materialization per store, then time the same bytes written directly."""
    from friendrec.feast_store import feast_project

    profiles, ceilings = [], {"size": len(user_ids)}
    for kind in ("sqlite", "redis"):
        log.info("profiling one %s materialization of %d users ...", kind, len(user_ids))
        variant = Variant(f"profile_{kind}", kind)
        profiles.append(
            profile_materialization(settings, paths, variant, redis_address, user_ids, out_dir)
        )
        if kind == "sqlite":
            project = feast_project(variant_settings(settings, variant, None), paths)
            ceilings["sqlite"] = sqlite_ceiling(paths, variant, project)
            sqlite_path(paths, variant).unlink(missing_ok=True)
        else:
            ceilings["redis"] = redis_ceiling(redis_address, len(user_ids))
    return profiles, ceilings


def run(config: BenchConfig, base: Settings) -> dict[str, Any]:
    """Run every measurement, write JSON (and its markdown tables) to config.output, return it.

    Order per size: graph job, then (smallest size) the profiled runs and write ceilings, then
    every variant, then (largest size) read latency on the stock sqlite project and on the last
    loaded Redis project (Redis is flushed before each load, so only the last one is there).
    """
    _quiet_feast()
    variants = config.variants
    settings = base.model_copy(update={"workdir": config.workdir.resolve()})
    log_dir = config.workdir / "logs"
    machine = machine_info()
    jobs: list[JobTiming] = []
    mats: list[MaterializeResult] = []
    latency: list[LatencyStats] = []
    profiles: list[dict[str, Any]] = []
    ceilings: dict[str, Any] = {}
    latency_size, profile_size = max(config.sizes), min(config.sizes)
    with redis_server(log_dir) as redis_address:
        _warm_imports()
        for size in config.sizes:
            dataset = f"synthetic:{size}"
            dsettings = settings.model_copy(
                update={"data": settings.data.model_copy(update={"dataset": dataset})}
            )
            paths = DatasetPaths.of(dsettings, dataset)
            jobs.append(run_graph_job(dsettings, paths))
            user_ids = (
                pq.read_table(paths.graph_source, columns=[contract.JOIN_KEY])
                .column(contract.JOIN_KEY)
                .to_numpy()
            )
            if config.profile and size == profile_size:
                profiles, ceilings = _profile_and_ceilings(
                    dsettings, paths, redis_address, user_ids, config.output.parent
                )
            results = {
                v.key: MaterializeResult(size, v.key, v.store, v.label, v.feast_settings())
                for v in variants
            }
            repeats = config.repeats_for(size)
            for repeat in range(repeats):  # round-robin: a burst of load hits one run of each
                for variant in variants:
                    log.info("%s, repeat %d/%d", variant.key, repeat + 1, repeats)
                    results[variant.key].runs.append(
                        materialize_once(dsettings, paths, variant, redis_address, user_ids)
                    )
                    if sqlite_path(paths, variant) != paths.feast_online_sqlite:
                        sqlite_path(paths, variant).unlink(missing_ok=True)  # a small disk
            mats += results.values()
            if size == latency_size:
                last_redis = [v for v in variants if v.store == "redis"][-1]
                latency = measure_latency(
                    dsettings, paths, redis_address, last_redis, config, log_dir
                )
    machine["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    results = {
        "benchmark": "features",
        "machine": machine,
        "config": {
            "sizes": config.sizes,
            "variants": [v.key for v in variants],
            "repeats": {size: config.repeats_for(size) for size in config.sizes},
            "requests": config.requests,
            "warmup": config.warmup,
            "latency_size": latency_size,
            "profile_size": profile_size if config.profile else None,
            "workdir": str(config.workdir),
            "seed": settings.data.seed,
        },
        "graph_job": [
            {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(j).items()}
            | {"total_s": round(j.total_s, 3)}
            for j in jobs
        ],
        "materialize": [m.as_dict() for m in mats],
        "latency": [
            {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(s).items()}
            for s in latency
        ],
        "profile": profiles,
        "ceilings": ceilings,
        "ratios": compute_ratios(mats, latency, profiles, ceilings),
    }
    config.output.parent.mkdir(parents=True, exist_ok=True)
    config.output.write_text(json.dumps(results, indent=2))
    config.output.with_suffix(".md").write_text(to_markdown(results))
    log.info("wrote %s and %s", config.output, config.output.with_suffix(".md"))
    return results


# --------------------------------------------------------------------------------------------
# Presentation: the same tables as rich (terminal) and markdown (docs/benchmarks.md).
# --------------------------------------------------------------------------------------------

Table = tuple[str, list[str], list[list[str]]]


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _indent(stage: str) -> str:
    """`a.b.c` -> `    c` (a part of a part of a), for the profile tables."""
    depth = stage.count(".")
    return "\u00a0" * 4 * depth + ("↳ " if depth else "") + stage.rsplit(".", 1)[-1]


def tables(results: dict[str, Any]) -> list[Table]:
    """Title, header and string rows of every table of a result."""
    out: list[Table] = []
    out.append(
        (
            "Graph-feature job (synthetic, avg degree 20)",
            ["users", "friendships", "prepare s", "build_features s", "total s"],
            [
                [
                    f"{j['users']:,}",
                    f"{j['friendships']:,}",
                    _f(j["prepare_s"]),
                    _f(j["build_features_s"]),
                    _f(j["total_s"]),
                ]
                for j in results["graph_job"]
            ],
        )
    )
    rows = []
    for m in results["materialize"]:
        views, total = m["views"], m["total"]
        rows.append(
            [
                f"{m['size']:,}",
                m["store"],
                m["label"],
                str(m["repeats"]),
                _f(views[contract.PROFILE_VIEW]["seconds"]),
                _f(views[contract.PROFILE_VIEW]["rows_per_s"], 0),
                _f(views[contract.GRAPH_VIEW]["seconds"]),
                _f(views[contract.GRAPH_VIEW]["rows_per_s"], 0),
                _f(total["seconds"]),
                _f(total["rows_per_s"], 0),
                _f(total["cpu_s"]),
                _f(total["rows_per_cpu_s"], 0),
                _f(total["redis_server_cpu_s"], 2),
                _f(m["peak_rss_mb"], 0),
                _f(m["rss_growth_mb"], 0),
            ]
        )
    out.append(
        (
            "Materialization (rows = users; total = users / both views' seconds; medians of "
            "the runs; CPU = the materializing process)",
            [
                "users",
                "store",
                "settings",
                "runs",
                "profile s",
                "profile rows/s",
                "graph s",
                "graph rows/s",
                "total s",
                "total rows/s",
                "CPU s",
                "rows/CPU-s",
                "redis-server CPU s",
                "peak RSS MB",
                "RSS growth MB",
            ],
            rows,
        )
    )
    if results["latency"]:
        out.append(
            (
                f"Online read latency ({results['config']['latency_size']:,} users, "
                f"{results['config']['requests']} requests after "
                f"{results['config']['warmup']} warm-up)",
                ["path", "store", "entities", "p50 ms", "p99 ms", "mean ms", "max ms"],
                [
                    [
                        s["path"],
                        s["store"],
                        str(s["entities"]),
                        _f(s["p50_ms"], 2),
                        _f(s["p99_ms"], 2),
                        _f(s["mean_ms"], 2),
                        _f(s["max_ms"], 2),
                    ]
                    for s in results["latency"]
                ],
            )
        )
    for prof in results["profile"]:
        out.append(
            (
                f"Where a {prof['store']} materialization of {prof['size']:,} users goes "
                f"(cProfile, {prof['profiled_total_s']:.1f} s profiled)",
                ["stage", "seconds", "share"],
                [
                    [_indent(name), _f(v["seconds"], 2), f"{100 * v['share']:.0f}%"]
                    for name, v in prof["stages"].items()
                ],
            )
        )
    for prof in results["profile"]:
        out.append(
            (
                f"Top self time, {prof['store']} materialization of {prof['size']:,} users "
                "(cProfile tottime)",
                ["function", "calls", "self s", "share"],
                [
                    [
                        t["function"],
                        f"{t['calls']:,}",
                        _f(t["tottime_s"], 2),
                        f"{100 * t['self_share']:.0f}%",
                    ]
                    for t in prof["top_self"][:_TOP_SELF_ROWS]
                ],
            )
        )
    ratio_rows = []
    for group, values in results["ratios"].items():
        for name, value in values.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k}={v}" for k, v in value.items())
            ratio_rows.append([group, name, "-" if value is None else str(value)])
    out.append(("Ratios (same run)", ["group", "ratio", "value"], ratio_rows))
    return out


def print_tables(results: dict[str, Any]) -> None:
    """The final report on stdout (rich)."""
    from rich.console import Console
    from rich.table import Table as RichTable

    console = Console()
    if not console.is_terminal:
        console.width = 200  # piped to a file: do not wrap the tables at 80 columns
    for title, header, rows in tables(results):
        table = RichTable(title=title, title_justify="left")
        for i, name in enumerate(header):
            table.add_column(name, justify="left" if i < 3 and not name[0].isdigit() else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    m = results["machine"]
    console.print(
        f"[dim]{m['cpu_model']}, {m['cores']} cores, Python {m['python']}, "
        f"feast {m['packages'].get('feast')}, redis-server {m['redis_server']}, "
        f"load {m['load_avg_start']} -> {m.get('load_avg_end')}[/]"
    )


def to_markdown(results: dict[str, Any]) -> str:
    """The tables as GitHub markdown (pasted into docs/benchmarks.md)."""
    lines = []
    for title, header, rows in tables(results):
        lines += [f"**{title}**", "", "| " + " | ".join(header) + " |"]
        lines.append("|" + "|".join("---" for _ in header) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
    m = results["machine"]
    lines.append(
        f"Machine: {m['cpu_model']}, {m['cores']} cores, {m['memory_gb']} GB, Python "
        f"{m['python']}, feast {m['packages'].get('feast')}, redis-server {m['redis_server']}, "
        f"sqlite {m['sqlite']}; load average {m['load_avg_start']} at start, "
        f"{m.get('load_avg_end')} at end; {m['timestamp']}."
    )
    return "\n".join(lines) + "\n"


def default_output(quick: bool) -> Path:
    name = "features_quick.json" if quick else "features.json"
    return PROJECT_ROOT / "bench" / "results" / name
