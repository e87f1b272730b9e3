"""Opening the Feast feature store from the shared settings, and reading online features with the
contract's defaults. Used by the feature jobs, the CLI, training, serving and streaming alike.

Each prepared dataset gets its own Feast project (``friendrec_<slug>``): its own registry and
sqlite file, or its own key namespace in a shared Redis.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from feast import FeatureStore, RepoConfig

from friendrec import contract
from friendrec.config import FEATURE_REPO_DIR, Settings
from friendrec.paths import DatasetPaths

TEMPLATE = FEATURE_REPO_DIR / "feature_store.yaml"


def feast_project(settings: Settings, paths: DatasetPaths) -> str:
    return f"{settings.features.feast_project_prefix}_{paths.slug}"


def render_config(settings: Settings, paths: DatasetPaths) -> dict[str, Any]:
    """``feature_repo/feature_store.yaml`` filled in for one dataset and the chosen online store."""
    text = string.Template(TEMPLATE.read_text()).substitute(
        project=feast_project(settings, paths),
        registry=str(paths.feast_registry),
        online_path=str(paths.feast_online_sqlite),
    )
    raw = yaml.safe_load(text)
    if settings.features.online_store == "redis":
        raw["online_store"] = {
            "type": "redis",
            "connection_string": settings.features.redis_connection_string,
        }
    return raw


def write_repo_dir(settings: Settings, paths: DatasetPaths) -> Path:
    """Write the rendered feature_store.yaml into the dataset's Feast dir (for `feast -c DIR`,
    `feast listen`) and return that dir."""
    paths.feast_dir.mkdir(parents=True, exist_ok=True)
    target = paths.feast_dir / "feature_store.yaml"
    target.write_text(yaml.safe_dump(render_config(settings, paths), sort_keys=False))
    return paths.feast_dir


def open_store(settings: Settings, dataset: str | None = None) -> FeatureStore:
    """The Feast store of a dataset (registry and online store per the settings)."""
    paths = DatasetPaths.of(settings, dataset)
    paths.feast_dir.mkdir(parents=True, exist_ok=True)
    config = RepoConfig(repo_path=paths.feast_dir, **render_config(settings, paths))
    return FeatureStore(config=config)


def online_features(
    store: FeatureStore,
    user_ids: Sequence[int],
    features: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Online features per user, in request order, with the contract defaults filled in.

    Users the online store has never seen are not an error: they come back with every feature at
    its contract default and ``known = False`` (a user is known when any view has a row for it).
    """
    refs = list(features) if features else contract.feature_refs()
    response = store.get_online_features(
        features=refs, entity_rows=[{contract.JOIN_KEY: int(u)} for u in user_ids]
    ).to_dict()
    names = [r.split(":", 1)[1] for r in refs]
    rows = []
    for i, user in enumerate(user_ids):
        values = {name: response[name][i] for name in names}
        row: dict[str, Any] = {
            contract.JOIN_KEY: int(user),
            "known": any(v is not None for v in values.values()),
        }
        for name, value in values.items():
            row[name] = contract.default_value(name) if value is None else value
        rows.append(row)
    return rows
