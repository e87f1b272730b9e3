"""Opening the Feast feature store from the shared settings, and reading online features with the
defaults of the dataset's contract. Used by the feature jobs, the CLI, training, serving and
streaming alike.

Each prepared dataset gets its own Feast project (``friendrec_<slug>``): its own registry and
sqlite file, or its own key namespace in a shared Redis.
"""

from __future__ import annotations

import string
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from feast import FeatureStore, RepoConfig
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.type_map import feast_value_type_to_python_type

from friendrec.config import FEATURE_REPO_DIR, Settings
from friendrec.contract import JOIN_KEY, Contract
from friendrec.engine import resolve_engine
from friendrec.paths import DatasetPaths

TEMPLATE = FEATURE_REPO_DIR / "feature_store.yaml"
# friendrec's engines, named here so that opening a store does not import Ray.
RAY_ENGINE_TYPE = "friendrec.feast_ray.FriendrecRayComputeEngine"
LOCAL_ENGINE_TYPE = "friendrec.feast_write.FriendrecLocalComputeEngine"


def feast_project(settings: Settings, paths: DatasetPaths) -> str:
    return f"{settings.features.feast_project_prefix}_{paths.slug}"


def render_config(
    settings: Settings, paths: DatasetPaths, engine: str | None = None
) -> dict[str, Any]:
    """``feature_repo/feature_store.yaml`` filled in for one dataset, the chosen online store and
    the batch engine (``engine``, default ``engine.kind``): ``ray`` is Feast's Ray compute engine
    as friendrec runs it (``friendrec/feast_ray.py``), ``local`` Feast's local engine with
    friendrec's column-wise writer (``friendrec/feast_write.py``); with
    ``engine.materialize_fast_write`` off, ``local`` is Feast's default engine untouched."""
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
    fast = settings.engine.materialize_fast_write
    write = {"partition_rows": settings.engine.materialize_partition_rows}
    if resolve_engine(settings, engine) == "ray":
        batch: dict[str, Any] = {"type": RAY_ENGINE_TYPE, **write}
        if not fast:
            batch["fast_write"] = False
        if settings.engine.ray_address:
            batch["ray_address"] = settings.engine.ray_address
        if settings.engine.partitions:
            batch["partitions"] = settings.engine.partitions
        raw["batch_engine"] = batch
    elif fast:
        raw["batch_engine"] = {"type": LOCAL_ENGINE_TYPE, **write}
    return raw


def write_repo_dir(settings: Settings, paths: DatasetPaths) -> Path:
    """Write the rendered feature_store.yaml into the dataset's Feast dir (for `feast -c DIR`,
    `feast listen`) and return that dir."""
    paths.feast_dir.mkdir(parents=True, exist_ok=True)
    target = paths.feast_dir / "feature_store.yaml"
    target.write_text(yaml.safe_dump(render_config(settings, paths), sort_keys=False))
    return paths.feast_dir


def open_store(
    settings: Settings, dataset: str | None = None, *, engine: str | None = None
) -> FeatureStore:
    """The Feast store of a dataset (registry, online store and batch engine per the settings;
    ``engine`` overrides ``engine.kind``)."""
    paths = DatasetPaths.of(settings, dataset)
    paths.feast_dir.mkdir(parents=True, exist_ok=True)
    config = RepoConfig(repo_path=paths.feast_dir, **render_config(settings, paths, engine))
    return FeatureStore(config=config)


# The ValueProto kinds the contract's dtypes are stored as: read straight off the proto, the same
# values Feast's general converter returns, at a fraction of its cost per value.
_SCALAR_KINDS = frozenset({"int64_val", "float_val"})
_LIST_KINDS = frozenset({"int64_list_val", "float_list_val"})


def python_value(value: ValueProto) -> Any:
    """A stored value as Python (``None`` when unset), as ``feast_value_type_to_python_type``."""
    kind = value.WhichOneof("val")
    if kind in _SCALAR_KINDS:
        return getattr(value, kind)
    if kind in _LIST_KINDS:
        return list(getattr(value, kind).val)
    return None if kind is None else feast_value_type_to_python_type(value)


_VIEW_CACHE: weakref.WeakKeyDictionary[FeatureStore, dict[str, Any]] = weakref.WeakKeyDictionary()


def _views(store: FeatureStore, contract: Contract) -> dict[str, Any]:
    """The contract's feature views of ``store``, fetched from its registry once per store."""
    cached = _VIEW_CACHE.get(store)
    if cached is None:
        cached = {name: store.get_feature_view(name) for name in contract.views}
        _VIEW_CACHE[store] = cached
    return cached


def _group_refs(refs: Sequence[str], contract: Contract) -> dict[str, list[str]]:
    """``view:feature`` references -> {view: [feature, ...]}, rejecting what the contract lacks."""
    views = contract.views
    grouped: dict[str, list[str]] = {}
    for ref in refs:
        view, _, name = ref.partition(":")
        if view not in views or name not in {f.name for f in views[view]}:
            raise ValueError(
                f"unknown feature reference {ref!r}; the contract has {contract.feature_refs()}"
            )
        grouped.setdefault(view, []).append(name)
    return grouped


def online_features(
    store: FeatureStore,
    user_ids: Sequence[int],
    refs: Sequence[str] | None = None,
    *,
    contract: Contract,
) -> list[dict[str, Any]]:
    """Online features per user, in request order, with the contract defaults filled in.

    ``refs`` are ``view:feature`` references (default: every feature of ``contract``, the
    dataset's contract, loaded once per process by the caller).

    Users the online store has never seen are not an error: they come back with every feature at
    its contract default and ``known = False`` (a user is known when any view has a row for it).

    Reads go through the store's provider (``Provider.online_read``, the interface every Feast
    online store implements) rather than ``FeatureStore.get_online_features``: the same rows from
    the same online store, without the SDK's per-value response protos, which cost several times
    more CPU than the read itself and bounded the streaming chain. The contract's views never expire
    (``ttl=0``), so there is no max-age status to lose; a test compares both paths value by value.
    """
    grouped = _group_refs(list(refs) if refs else contract.feature_refs(), contract)
    unique = list(dict.fromkeys(int(u) for u in user_ids))
    keys = [
        EntityKeyProto(join_keys=[JOIN_KEY], entity_values=[ValueProto(int64_val=u)])
        for u in unique
    ]
    found: dict[int, dict[str, Any]] = {u: {} for u in unique}
    provider = store._get_provider()  # Feast has no public getter
    views = _views(store, contract)
    for view, names in grouped.items():
        if not keys:
            break
        # A copy: the Redis store appends its timestamp key to the list it is given.
        read = provider.online_read(
            config=store.config, table=views[view], entity_keys=keys, requested_features=list(names)
        )
        for user, (_, values) in zip(unique, read, strict=True):
            for name in names:
                if values and name in values:
                    found[user][name] = python_value(values[name])
    names = [n for view_names in grouped.values() for n in view_names]
    rows = []
    for user in (int(u) for u in user_ids):
        values = found[user]
        row: dict[str, Any] = {
            JOIN_KEY: user,
            "known": any(values.get(name) is not None for name in names),
        }
        for name in names:
            value = values.get(name)
            row[name] = contract.default_value(name) if value is None else value
        rows.append(row)
    return rows
