"""One typed configuration for every friendrec component.

Precedence (highest first): explicit overrides > environment (``FRIENDREC_*``, nested with
``__``, e.g. ``FRIENDREC_FEATURES__FRIEND_CAP=16``) > a YAML file (``FRIENDREC_CONFIG`` or
``friendrec --config``) > the defaults below. Every part of the stack (data jobs, Feast, training,
serving, streaming) reads the same object, so an address or a path is spelled once.
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
FEATURE_REPO_DIR = PROJECT_ROOT / "feature_repo"

# 2024-01-01T00:00:00Z: the start of the synthetic timeline given to friendships (docs/data.md).
DEFAULT_TIMELINE_START = 1_704_067_200
# The blend's rankers (friendrec.fof.BlendRanker) fitted on twitch/ENGB validation edges (the
# single-task model, seed 0; `friendrec tune` writes a graph's own): one that reads the missed
# friends of friends' vectors, one that does not (serving.blend_reads_vectors).
DEFAULT_BLEND_RANKER = Path(__file__).with_name("blend_ranker_default.json")
DEFAULT_BLEND_RANKER_NO_READS = Path(__file__).with_name("blend_ranker_default_no_reads.json")


class DataSettings(BaseModel):
    """Which graph is active and how its friendships are timed and split."""

    dataset: str = Field(
        "twitch/ENGB",
        description="Active dataset: a shipped schema's short name (twitch/<LANG>, github, "
        "synthetic:<N>) or the name of a dataset prepared from a schema file.",
    )
    schema_file: Path | None = Field(
        None, description="A data schema YAML (your own users and friendships); see docs/data.md."
    )
    seed: int = Field(42, description="Seed for timestamps, the split and the synthetic generator.")
    timeline_start: int = Field(
        DEFAULT_TIMELINE_START,
        description="Unix seconds of the first friendship (graphs without a timestamp column).",
    )
    timeline_days: int = Field(
        365,
        gt=0,
        description="Friendships are spread evenly over this many days (no timestamp column).",
    )
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.10, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _fractions_leave_training_edges(self) -> DataSettings:
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must be < 1")
        return self


class FeatureSettings(BaseModel):
    """Graph-feature job and Feast stores."""

    friend_cap: int = Field(32, gt=0, description="Max sampled friend ids stored per user.")
    sparse_cap: int = Field(64, gt=0, description="Max sparse feature ids kept per user.")
    nbr_sparse_cap: int = Field(
        64, gt=0, description="Max ids kept in the friends' mean sparse-feature bag."
    )
    online_store: Literal["sqlite", "redis"] = "sqlite"
    redis_connection_string: str = Field(
        "127.0.0.1:6379", description="Feast redis connection string (host:port[,opts])."
    )
    feast_project_prefix: str = "friendrec"

    @field_validator("feast_project_prefix")
    @classmethod
    def _alnum(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", value):
            raise ValueError("feast_project_prefix must be alphanumeric/underscore")
        return value


class TrainingSettings(BaseModel):
    """The SSMTL tower, its losses and the training loop (see training/ and PAPER.md)."""

    objective: Literal["baseline", "ssmtl", "cca", "mae"] = "ssmtl"
    embedding_dim: int = Field(64, gt=0)
    sparse_dim: int = Field(32, gt=0, description="Width of the sparse-id embedding bag.")
    id_dim: int = Field(
        32, ge=0, description="Learned user-id vector width (0: features and graph only)."
    )
    id_dropout: float = Field(
        0.5, ge=0, lt=1, description="Training-time drop rate of whole user-id vectors."
    )
    hidden_dim: int = Field(128, gt=0)
    fanout: int = Field(10, gt=0, description="Sampled friends in the second GraphSAGE layer.")
    batch_size: int = Field(256, ge=8)
    learning_rate: float = Field(2e-3, gt=0)
    epochs: int = Field(10, gt=0)
    max_steps_per_epoch: int | None = Field(None, description="Cap steps (quick runs, tests).")
    patience: int = Field(2, ge=1, description="Epochs without val Recall@50 gain before stop.")
    seed: int = 0
    temperature: float = Field(0.05, gt=0)
    log_q: bool = True
    log_q_strength: float = Field(
        1.0,
        ge=0,
        le=1,
        description="How much of the in-batch sampling bias log-Q removes: logits minus "
        "strength x log(candidate frequency); 1: all of it, 0: none (as log_q off).",
    )
    uniform_negatives: int = Field(
        0,
        ge=0,
        description="Mixed negatives: users drawn uniformly per batch, candidates for every "
        "query beside the in-batch ones (log-Q corrected for the mixture); 0: in-batch only.",
    )
    aux_users: Literal["pairs", "uniform"] = Field(
        "pairs",
        description="Whom CCA-SSG and masked reconstruction train on: 'pairs', the first "
        "anchors of the batch's friendships (drawn by degree, so low-degree users are rare); "
        "'uniform', a batch of users drawn uniformly, mostly low-degree ones (docs/quality.md).",
    )
    popularity_bias: bool = Field(
        True,
        description="Score candidates by cosine + w * log(1 + degree), w learned: the index "
        "stores one more dimension (training/tower.py; docs/quality.md for why).",
    )
    cca_weight: float | None = Field(None, ge=0, description="None: the objective's default.")
    cca_lambda: float = Field(5e-3, ge=0)
    cca_fraction: float = Field(0.5, gt=0, le=1)
    cca_projector_dim: int = Field(
        0, ge=0, description="> 0: CCA-SSG on an MLP projection of the embedding (this width)."
    )
    cca_id_drop: float | None = Field(
        0.0,
        ge=0,
        lt=1,
        description="Drop rate of the user-id vector in each CCA-SSG view (None: id_dropout, "
        "drawn per view: the views then disagree on it, which hurt; docs/quality.md).",
    )
    feature_drop: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Share of a user's own sparse ids masked in each CCA-SSG view (the paper: "
        "0.2). Masked, the invariance term teaches the tower to stop reading the features, and "
        "users with few friends lose (docs/quality.md).",
    )
    neighbour_drop: float = Field(
        0.2, ge=0, lt=1, description="Share of friends dropped in each CCA-SSG view."
    )
    view_noise: float = Field(
        0.0,
        ge=0,
        le=2,
        description="Perturb rather than remove: sigma of a mean-1 log-normal factor that "
        "scales, in each CCA-SSG view, every sparse id's weight, friend's weight and dimension "
        "of the user-id vector (0: none; docs/quality.md).",
    )
    cca_target: Literal["views", "clean"] = Field(
        "views",
        description="What CCA-SSG pulls an augmented view towards: 'views', a second augmented "
        "view (the paper; both sides learn, and the term is met by ignoring what the views "
        "remove); 'clean', the user's unaugmented embedding held fixed (stop-gradient), so the "
        "term teaches the tower to recover from part of a user's inputs what it computes from "
        "all of them (ahead of 'views' on validation on five of six Twitch graphs; `tune` "
        "tries it; docs/quality.md).",
    )
    mae_weight: float | None = Field(None, ge=0, description="None: the objective's default.")
    mae_fraction: float = Field(0.5, gt=0, le=1)
    mae_gamma: float = Field(2.0, ge=1)
    workers: int = Field(
        1,
        ge=1,
        description="Data-parallel worker processes (MultiWorkerMirroredStrategy on loopback): "
        "global batch = workers x batch_size, in-batch negatives from it (docs/model.md).",
    )
    max_restarts: int = Field(
        3, ge=0, description="Relaunches of a worker group after a worker dies (workers > 1)."
    )
    val_max_users: int | None = Field(
        None,
        gt=0,
        description="Early stopping scores at most this many validation users (a seeded "
        "sample; None: all). For graphs far past a million users.",
    )


class ServingSettings(BaseModel):
    """Exported models (the TF Serving model base path) and the gRPC retrieval service."""

    model_base_path: Path | None = Field(
        None, description="TF Serving model base path; default <workdir>/serving_models."
    )
    model_name: str = Field("user_tower", pattern=r"^[A-Za-z0-9_\-]+$")
    host: str = Field("127.0.0.1", description="Retrieval service bind/connect host.")
    port: int = Field(50051, ge=0, lt=65536, description="Retrieval service gRPC port.")
    workers: int = Field(16, gt=0, description="gRPC handler threads of the retrieval service.")
    max_k: int = Field(1000, gt=0, description="Largest k a request may ask for.")
    max_excludes: int = Field(10_000, ge=0, description="Most exclude_user_ids per request.")
    max_batch: int = Field(256, gt=0, description="Most requests in one RecommendBatch.")
    coalesce_max_batch: int = Field(
        32, gt=0, description="Concurrent Recommend calls answered as one batch (1: never)."
    )
    batches_in_flight: int = Field(
        2, gt=0, description="Batches running at once; later requests queue and coalesce."
    )
    feast_timeout_s: float = Field(1.0, gt=0, description="Deadline of the Feast online reads.")
    tfserving_timeout_s: float = Field(1.0, gt=0, description="Deadline of TF Serving Predict.")
    milvus_timeout_s: float = Field(1.0, gt=0, description="Deadline of the Milvus search.")
    alias_refresh_s: float = Field(
        1.0, ge=0, description="How long the live alias -> collection/version lookup is cached."
    )
    metrics_port: int = Field(
        9464, ge=0, lt=65536, description="Prometheus /metrics HTTP port (0: disabled)."
    )
    default_source: Literal["embedding", "fof", "blend"] = Field(
        "blend", description="Candidate source of a request that names none."
    )
    fof_max_friends: int = Field(
        256,
        gt=0,
        description="Friends-of-friends: at most this many of a user's friends have their friend "
        "lists read (a fixed pseudo-random choice; evaluation uses the same).",
    )
    blend_depth: int = Field(
        100, gt=0, description="Candidates taken from each source before blending (>= k used)."
    )
    blend_reads_vectors: bool = Field(
        True,
        description="Whether the blend reads the stored vectors of the friends of friends the "
        "search missed (one Milvus get beside the search) for their inner products. False: a "
        "ranker fitted on a bound of them instead (the default's twin; `friendrec tune` fits a "
        "graph's own); its cost in recall and saving in latency: docs/quality.md, docs/serving.md.",
    )
    blend_ranker: dict[str, Any] = Field(
        default_factory=lambda: json.loads(DEFAULT_BLEND_RANKER.read_text()),
        description="The blend's ranker over its features (friendrec/fof.py, BlendRanker: a "
        "small perceptron, as `features`, `reads_vectors`, `mean`, `scale` and `layers`); the "
        "default was fitted on twitch/ENGB validation edges, `friendrec tune` fits a graph's own.",
    )
    exclude_all_friends: bool = Field(
        True,
        description="Exclude every existing friend (the stream updater's full friend sets, "
        "sqlite or Redis like the online store), not only the online store's friend sample.",
    )
    filter_search_above: int = Field(
        512,
        ge=0,
        description="A query excluding more users than this is searched with a Milvus filter "
        "(`user_id not in [...]`) instead of fetching k + excluded hits and dropping them.",
    )
    tls_cert_file: Path | None = Field(None, description="PEM certificate: serve over TLS.")
    tls_key_file: Path | None = Field(None, description="PEM private key for tls_cert_file.")
    tls_ca_file: Path | None = Field(
        None, description="Client side: CA bundle to verify the service (TLS when set)."
    )
    auth_token: SecretStr | None = Field(
        None, description="Bearer token required in the 'authorization' metadata (None: off)."
    )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @model_validator(mode="before")
    @classmethod
    def _replaced_blend_settings(cls, data: Any) -> Any:
        """Settings files from before the fitted blend name its old knobs: say what replaced
        them rather than only that they are unknown."""
        replaced = {"blend_fof_weight", "blend_k0", "blend_weights"}
        old = sorted(replaced & set(data)) if isinstance(data, dict) else []
        if old:
            raise ValueError(
                f"serving.{' and '.join(old)} no longer exist: the blend is a fitted ranker now, "
                "serving.blend_ranker (rerun `friendrec tune` to write a graph's own, or remove "
                "them for the default)"
            )
        return data

    @field_validator("blend_ranker")
    @classmethod
    def _blend_ranker(cls, value: dict[str, Any]) -> dict[str, Any]:
        from friendrec.fof import BlendRanker

        return BlendRanker.from_dict(value).as_dict()  # the shapes, or a precise error

    def without_vector_reads(self) -> ServingSettings:
        """These settings with ``blend_reads_vectors`` false and the default ranker fitted
        without the reads (what ``bench serving`` and the tests set beside the default)."""
        data = self.model_dump(exclude={"blend_ranker"})
        return type(self).model_validate({**data, "blend_reads_vectors": False})

    @model_validator(mode="after")
    def _ranker_reads(self) -> ServingSettings:
        """Without vector reads, the default is the ranker fitted without them, and a ranker
        fitted on the true inner products is refused rather than fed the bound."""
        if self.blend_reads_vectors:
            return self
        if "blend_ranker" not in self.model_fields_set:
            self.blend_ranker = json.loads(DEFAULT_BLEND_RANKER_NO_READS.read_text())
        elif self.blend_ranker.get("reads_vectors", True):
            raise ValueError(
                "serving.blend_ranker was fitted on the vectors' inner products, but "
                "serving.blend_reads_vectors is false: rerun `friendrec tune` with it false (or "
                "drop serving.blend_ranker for the default without reads)"
            )
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> ServingSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        return self


class TFServingSettings(BaseModel):
    """The TF Serving endpoint (the official server in production, `friendrec tfserving` here)
    and the version policy our server applies to the model base path."""

    host: str = "127.0.0.1"
    port: int = Field(8500, ge=0, lt=65536, description="gRPC port (TF Serving's default).")
    version_policy: Literal["latest", "all", "specific"] = Field(
        "latest", description="Which versions under the model base path are served."
    )
    num_versions: int = Field(
        2, gt=0, description="latest: how many newest versions stay loaded (rollback needs 2)."
    )
    versions: list[int] = Field(
        default_factory=list, description="specific: the versions to serve."
    )
    poll_seconds: float = Field(
        2.0, gt=0, description="Model base path poll interval (file_system_poll_wait_seconds)."
    )
    workers: int = Field(8, gt=0, description="gRPC handler threads.")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @model_validator(mode="after")
    def _specific_needs_versions(self) -> TFServingSettings:
        if self.version_policy == "specific" and not self.versions:
            raise ValueError("version_policy 'specific' needs versions")
        return self


class MilvusSettings(BaseModel):
    """The embedding index: one collection per model version behind a live alias."""

    uri: str | None = Field(
        None,
        description="milvus-lite file (path ending .db), or a server URI such as "
        "http://127.0.0.1:19530; default <workdir>/milvus/friendrec.db.",
    )
    token: SecretStr | None = Field(None, description="Milvus auth token (user:password).")
    alias: str = Field(
        "user_embeddings", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="The live alias."
    )
    index_type: Literal["HNSW", "FLAT"] = "HNSW"
    hnsw_m: int = Field(16, gt=1, description="HNSW graph degree M.")
    hnsw_ef_construction: int = Field(200, gt=0)
    search_ef: int = Field(128, gt=0, description="HNSW ef at query time (>= the fetched k).")
    keep_versions: int = Field(
        3, ge=2, description="Collections kept: the live one, the rollback one, and older ones."
    )
    build_batch: int = Field(1024, gt=0, description="Users embedded and inserted per batch.")


class StreamingSettings(BaseModel):
    """Kafka topics, consumer groups and the streaming workers (streaming/, issue #5)."""

    bootstrap_servers: str = Field(
        "127.0.0.1:9092", description="Kafka bootstrap servers (host:port[,host:port])."
    )
    topic_prefix: str = Field("friendrec", pattern=r"^[A-Za-z0-9._\-]+$")
    group_prefix: str = Field("friendrec", pattern=r"^[A-Za-z0-9._\-]+$")
    partitions: int = Field(4, gt=0, description="Partitions of the keyed topics.")
    dlq_partitions: int = Field(1, gt=0, description="Partitions of the dead-letter topic.")
    replication_factor: int = Field(1, gt=0)
    max_records: int = Field(500, gt=0, description="Most records one worker batch takes.")
    worker_max_records: dict[str, int] = Field(
        default_factory=lambda: {"embedding-refresher": 4000, "milvus-sink": 4000},
        description="Per-worker batch caps overriding max_records: a big refresher batch "
        "embeds a user once for all the events that touched it.",
    )
    batch_linger_ms: dict[str, int] = Field(
        default_factory=lambda: {
            "feature-updater": 50,
            "embedding-refresher": 200,
            "milvus-sink": 100,
        },
        description="Per worker: how long it keeps polling after the first records to fill its "
        "batch (absent or 0: what one poll returned). Fewer, bigger batches read, embed and "
        "upsert each user once for all its events, for that much latency.",
    )
    refresh_dependents: bool = Field(
        True,
        description="Also refresh the users whose sampled friends changed (exact 2-layer "
        "embeddings; several times more refreshes per event).",
    )
    poll_timeout_ms: int = Field(100, gt=0, description="How long a poll waits for records.")
    fetch_max_wait_ms: int = Field(
        20, ge=0, description="How long the broker may hold a fetch for more data (latency)."
    )
    session_timeout_ms: int = Field(6000, gt=0)
    max_poll_interval_ms: int = Field(
        10000, gt=0, description="A member that does not poll for this long leaves its group."
    )
    retry_backoff_s: float = Field(0.2, gt=0, description="First retry delay (then doubled).")
    retry_backoff_max_s: float = Field(5.0, gt=0)
    state_path: Path | None = Field(
        None,
        description="Feature updater's friend-set store (sqlite); "
        "default <workdir>/streaming/<dataset>/state.db.",
    )
    metrics_port: int = Field(0, ge=0, lt=65536, description="Worker /metrics port (0: off).")
    metrics_host: str = Field(
        "127.0.0.1",
        description="Worker /metrics bind address: loopback by default; production configs "
        "(infra/config/production.yaml, the k8s configmap) bind 0.0.0.0 for Prometheus.",
    )
    heartbeat_file: Path | None = Field(
        None,
        description="A worker rewrites this JSON file after every poll loop once it holds "
        "partitions: readiness and liveness for a supervisor (`friendrec up`/`status`, an exec "
        "probe). None: off.",
    )
    heartbeat_stale_s: float = Field(
        60.0, gt=0, description="A heartbeat older than this reports the worker as stalled."
    )
    sink_flush_rows: int = Field(
        1000,
        gt=0,
        description="The Milvus sink flushes the live collection after this many upserted rows: "
        "unflushed (growing) rows are searched by brute force, which slows every search.",
    )
    sink_flush_interval_s: float = Field(
        10.0,
        gt=0,
        description="... or this long after the first row not yet flushed, whichever comes first.",
    )


class EngineSettings(BaseModel):
    """Where the batch jobs run: in this process (``local``) or on a Ray cluster (``ray``).

    The local path stays the default for one machine; ``ray`` runs the graph-feature job, the
    materialization and the index build as Ray tasks (docs/scaling.md says why Ray).
    """

    kind: Literal["local", "ray"] = Field(
        "local", description="Default engine of the batch jobs (a command's --engine wins)."
    )
    ray_address: str | None = Field(
        None,
        description="A running Ray cluster (e.g. ray://head:10001 or head:6379); None: the "
        "command starts a local Ray for its own run and stops it after.",
    )
    num_cpus: int | None = Field(
        None, gt=0, description="CPUs of a local Ray the command starts (None: all)."
    )
    object_store_mb: int = Field(
        2048, gt=0, description="Object-store memory of a local Ray the command starts (MiB)."
    )
    partitions: int | None = Field(
        None,
        gt=0,
        description="User-id partitions of a job (None: 2 per CPU of the cluster).",
    )
    materialize_fast_write: bool = Field(
        True,
        description="Materialize with friendrec's column-wise writer (Feast's bytes, bounded "
        "memory; friendrec/feast_write.py) on either engine; False: Feast's stock engines.",
    )
    materialize_partition_rows: int = Field(
        100_000,
        gt=0,
        description="Users encoded and written at a time by the materialization (memory bound).",
    )


class Settings(BaseSettings):
    """The root configuration object (see module docstring for precedence)."""

    model_config = SettingsConfigDict(
        env_prefix="FRIENDREC_",
        env_nested_delimiter="__",
        env_parse_none_str="null",  # FRIENDREC_TRAINING__CCA_ID_DROP=null -> None
        extra="forbid",
        validate_default=True,
    )

    workdir: Path = Field(
        PROJECT_ROOT / ".friendrec", description="All artifacts: parquet, stores, models."
    )
    datasets_dir: Path = Field(
        PROJECT_ROOT.parent / "shared" / "datasets", description="Raw MUSAE datasets (read only)."
    )
    log_level: str = "INFO"
    log_format: Literal["rich", "json"] = Field(
        "rich", description="rich: for people at a terminal; json: one object per line (services)."
    )
    data: DataSettings = DataSettings()
    features: FeatureSettings = FeatureSettings()
    training: TrainingSettings = TrainingSettings()
    serving: ServingSettings = ServingSettings()
    tfserving: TFServingSettings = TFServingSettings()
    milvus: MilvusSettings = MilvusSettings()
    streaming: StreamingSettings = StreamingSettings()
    engine: EngineSettings = EngineSettings()

    @property
    def model_base_path(self) -> Path:
        return self.serving.model_base_path or self.workdir / "serving_models"

    @property
    def milvus_uri(self) -> str:
        return self.milvus.uri or str(self.workdir / "milvus" / "friendrec.db")

    @field_validator("workdir", "datasets_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # duckdb resolves relative parquet paths against the cwd: store absolute paths only.
        return value.expanduser().resolve()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("FRIENDREC_CONFIG")
        if config_file:
            path = Path(config_file)
            if not path.is_file():
                raise FileNotFoundError(f"FRIENDREC_CONFIG={config_file}: no such file")
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (environment and config file are read once)."""
    return Settings()


def load_settings(**overrides: Any) -> Settings:
    """Fresh settings with explicit overrides on top (used by tests and the CLI)."""
    get_settings.cache_clear()
    return Settings(**overrides)
