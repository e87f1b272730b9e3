"""One typed configuration for every friendrec component.

Precedence (highest first): explicit overrides > environment (``FRIENDREC_*``, nested with
``__``, e.g. ``FRIENDREC_FEATURES__FRIEND_CAP=16``) > a YAML file (``FRIENDREC_CONFIG`` or
``friendrec --config``) > the defaults below. Every part of the stack (data jobs, Feast, training,
serving, streaming) reads the same object, so an address or a path is spelled once.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator
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


class DataSettings(BaseModel):
    """Which graph is active and how its friendships are timed and split."""

    dataset: str = Field(
        "twitch/ENGB", description="Active dataset: twitch/<LANG>, github or synthetic:<N>."
    )
    seed: int = Field(42, description="Seed for timestamps, the split and the synthetic generator.")
    timeline_start: int = Field(
        DEFAULT_TIMELINE_START, description="Unix seconds of the first friendship."
    )
    timeline_days: int = Field(
        365, gt=0, description="Friendships are spread evenly over this many days."
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
    cca_weight: float | None = Field(None, ge=0, description="None: the objective's default.")
    cca_lambda: float = Field(5e-3, ge=0)
    cca_fraction: float = Field(0.5, gt=0, le=1)
    feature_drop: float = Field(0.2, ge=0, lt=1)
    neighbour_drop: float = Field(0.2, ge=0, lt=1)
    mae_weight: float | None = Field(None, ge=0, description="None: the objective's default.")
    mae_fraction: float = Field(0.5, gt=0, le=1)
    mae_gamma: float = Field(2.0, ge=1)


class ServingSettings(BaseModel):
    """Where exported models live (the TF Serving model base path) and under which name."""

    model_base_path: Path | None = Field(
        None, description="TF Serving model base path; default <workdir>/serving_models."
    )
    model_name: str = Field("user_tower", pattern=r"^[A-Za-z0-9_\-]+$")


class Settings(BaseSettings):
    """The root configuration object (see module docstring for precedence)."""

    model_config = SettingsConfigDict(
        env_prefix="FRIENDREC_",
        env_nested_delimiter="__",
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
    data: DataSettings = DataSettings()
    features: FeatureSettings = FeatureSettings()
    training: TrainingSettings = TrainingSettings()
    serving: ServingSettings = ServingSettings()

    @property
    def model_base_path(self) -> Path:
        return self.serving.model_base_path or self.workdir / "serving_models"

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
