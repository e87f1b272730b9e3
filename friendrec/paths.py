"""Where every artifact lives under FRIENDREC_WORKDIR, per dataset (one place, no string paths
scattered through the components)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from friendrec.config import Settings

if TYPE_CHECKING:
    from friendrec.contract import Contract


def dataset_slug(name: str) -> str:
    """`twitch/ENGB` -> `twitch_engb`, `synthetic:1000` -> `synthetic_1000` (file/Feast safe)."""
    return re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")


@dataclass(frozen=True)
class DatasetPaths:
    """The artifact layout of one prepared dataset."""

    name: str
    slug: str
    workdir: Path

    @classmethod
    def of(cls, settings: Settings, name: str | None = None) -> DatasetPaths:
        name = name or settings.data.dataset
        return cls(name=name, slug=dataset_slug(name), workdir=settings.workdir)

    # data prepare
    @property
    def data_dir(self) -> Path:
        return self.workdir / "data" / self.slug

    @property
    def users(self) -> Path:
        return self.data_dir / "users.parquet"

    @property
    def friendships(self) -> Path:
        return self.data_dir / "friendships.parquet"

    @property
    def meta(self) -> Path:
        return self.data_dir / "meta.json"

    @property
    def contract(self) -> Path:
        return self.data_dir / "contract.json"

    @property
    def id_map(self) -> Path:
        """String ids only: user_id (dense int64) -> external_id."""
        return self.data_dir / "id_map.parquet"

    @property
    def report(self) -> Path:
        return self.data_dir / "report.json"

    # features build (the Feast offline store's sources)
    @property
    def features_dir(self) -> Path:
        return self.workdir / "features" / self.slug

    @property
    def profile_source(self) -> Path:
        return self.features_dir / "user_profile.parquet"

    @property
    def graph_source(self) -> Path:
        return self.features_dir / "user_graph.parquet"

    # Feast registry and the embedded online store
    @property
    def feast_dir(self) -> Path:
        return self.workdir / "feast" / self.slug

    @property
    def feast_registry(self) -> Path:
        return self.feast_dir / "registry.db"

    @property
    def feast_online_sqlite(self) -> Path:
        return self.feast_dir / "online.db"


def load_contract(settings: Settings, dataset: str | None = None) -> Contract:
    """The feature contract of a prepared dataset (default: the active one), from its
    ``contract.json``; NotPreparedError when the dataset is not prepared. Load it once per job or
    process and pass it on."""
    from friendrec import contract

    return contract.load(DatasetPaths.of(settings, dataset).data_dir)
