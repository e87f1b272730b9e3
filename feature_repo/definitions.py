"""Feast definitions: the user entity, profile and graph feature views, their push sources and the
feature services (named after the schema hash). Every name and dtype comes from the dataset's
contract (``friendrec.contract.Contract``, ``<data_dir>/contract.json``).

``build_definitions`` makes the objects for one prepared dataset (its offline parquet sources and
its contract); ``friendrec features apply`` registers them. The module-level objects below let the
plain ``feast`` CLI work too (``feast -c <workdir>/feast/<dataset> ...`` after ``friendrec features
apply``); they exist only once the default dataset is prepared (its contract.json written), so that
importing this module never fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Array, FeastType, Float32, Int64

from friendrec.config import get_settings
from friendrec.contract import (
    CONTRACT_VERSION,
    ENTITY_NAME,
    EVENT_TIMESTAMP,
    GRAPH_PUSH_SOURCE,
    GRAPH_VIEW,
    JOIN_KEY,
    PROFILE_PUSH_SOURCE,
    PROFILE_VIEW,
    Contract,
    Feature,
    load,
)
from friendrec.paths import DatasetPaths

FEAST_TYPES: dict[str, FeastType] = {
    "int64": Int64,
    "float32": Float32,
    "int64_list": Array(Int64),
    "float32_list": Array(Float32),
}


def feast_schema(features: tuple[Feature, ...]) -> list[Field]:
    return [
        Field(name=f.name, dtype=FEAST_TYPES[f.dtype], description=f.description) for f in features
    ]


@dataclass(frozen=True)
class FeastDefinitions:
    entity: Entity
    profile_view: FeatureView
    graph_view: FeatureView
    profile_push: PushSource
    graph_push: PushSource
    training_service: FeatureService
    serving_service: FeatureService

    def objects(self) -> list[object]:
        return [
            self.entity,
            self.profile_push,
            self.graph_push,
            self.profile_view,
            self.graph_view,
            self.training_service,
            self.serving_service,
        ]


def build_definitions(paths: DatasetPaths, contract: Contract) -> FeastDefinitions:
    """Feast objects of the dataset's ``contract`` whose offline sources are its feature parquet
    files."""
    user = Entity(
        name=ENTITY_NAME,
        join_keys=[JOIN_KEY],
        value_type=ValueType.INT64,
        description="A user of the social graph.",
    )

    def view(name: str, push_name: str, path: str, features: tuple[Feature, ...]):
        batch = FileSource(
            name=f"{name}_batch",
            path=path,  # absolute: duckdb resolves relative paths against the cwd
            timestamp_field=EVENT_TIMESTAMP,
        )
        push = PushSource(name=push_name, batch_source=batch)
        fv = FeatureView(
            name=name,
            entities=[user],
            # ttl=0: a user's latest row never expires (profiles and graph state persist).
            ttl=timedelta(0),
            schema=feast_schema(features),
            source=push,
            online=True,
            tags={
                "contract_version": str(CONTRACT_VERSION),
                "schema_hash": contract.schema_hash,
            },
        )
        return fv, push

    profile_view, profile_push = view(
        PROFILE_VIEW,
        PROFILE_PUSH_SOURCE,
        str(paths.profile_source),
        contract.profile_features,
    )
    graph_view, graph_push = view(
        GRAPH_VIEW,
        GRAPH_PUSH_SOURCE,
        str(paths.graph_source),
        contract.graph_features,
    )
    training = FeatureService(
        name=contract.training_service,
        features=[profile_view, graph_view],
        description="Point-in-time training set for the SSMTL user tower.",
    )
    serving = FeatureService(
        name=contract.serving_service,
        features=[profile_view, graph_view],
        description="Online inputs of the user tower: the user, then its sampled friends.",
    )
    return FeastDefinitions(
        user, profile_view, graph_view, profile_push, graph_push, training, serving
    )


def _default_definitions() -> FeastDefinitions | None:
    """The default dataset's definitions, or None while it is not prepared."""
    paths = DatasetPaths.of(get_settings())
    if not paths.contract.is_file():
        return None
    return build_definitions(paths, load(paths.data_dir))


# Module-level objects for the `feast` CLI (it collects Feast objects from module globals).
_defaults = _default_definitions()
if _defaults is not None:
    user = _defaults.entity
    user_profile = _defaults.profile_view
    user_graph = _defaults.graph_view
    user_profile_push = _defaults.profile_push
    user_graph_push = _defaults.graph_push
    training_service = _defaults.training_service
    serving_service = _defaults.serving_service
