"""The declared data schema: one YAML file that describes a deployment's users and friendships.

A team points friendrec at its own tables by writing one of these (``--schema PATH``); the MUSAE
graphs and the synthetic generator are shipped as schema files too (``feature_repo/schemas/``), so
no dataset name is special-cased in code. ``friendrec.contract.Contract`` turns a schema plus the
vocabularies and statistics fitted at prepare time into the feature contract the rest imports.

Paths in a schema may use ``{datasets_dir}`` (the settings' datasets folder), ``{workdir}``,
``{generated}`` (where the synthetic generator wrote its tables) and ``{variant}`` (the part after
``/`` or ``:`` in a short name: ``twitch/ENGB`` -> ``ENGB``); a relative path is relative to the
schema file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from friendrec.errors import SchemaError, UnknownDatasetError

SHIPPED_SCHEMAS_DIR = Path(__file__).resolve().parent.parent / "feature_repo" / "schemas"

Format = Literal["csv", "parquet", "jsonl", "musae_json"]
# Names the contract itself uses for graph features and Feast plumbing: a user feature may not take
# one (they would collide in the Feast views).
RESERVED_NAMES = frozenset(
    {
        "user_id",
        "event_timestamp",
        "created_ts",
        "sparse_ids",
        "degree",
        "friend_ids",
        "nbr_sparse_ids",
        "nbr_sparse_weights",
        "nbr_profile_mean",
        "known",
    }
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Source(_Strict):
    """A table on disk: one file or a glob of files, all of one format."""

    path: str = Field(description="File path or glob; {datasets_dir}, {workdir}, {variant} expand.")
    format: Format
    csv_delimiter: str = Field(",", min_length=1, max_length=1)
    list_separator: str = Field(
        "|", min_length=1, description="Separates the values of a list column in a CSV cell."
    )


class FriendshipsSource(Source):
    src_column: str
    dst_column: str
    timestamp_column: str | None = Field(
        None, description="When set, the split and feature windows follow these times."
    )
    timestamp_unit: Literal["s", "ms", "us"] = Field(
        "s", description="Unit of an integer timestamp column (strings are parsed as ISO 8601)."
    )


class UsersSource(Source):
    id_column: str = Field(
        description="The user id column (for musae_json: the name its keys get)."
    )
    value_column: str = Field(
        "features", description="musae_json only: the name the per-user lists get."
    )
    on_duplicate: Literal["error", "keep_first", "keep_last"] = Field(
        "error", description="A user id repeated within this source."
    )


class _FeatureBase(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    column: str | None = Field(None, description="Source column (default: the feature's name).")
    description: str = ""

    @property
    def source_column(self) -> str:
        return self.column or self.name


class NumericFeature(_FeatureBase):
    kind: Literal["numeric"]
    transform: Literal["identity", "log1p", "standardise"] = "identity"
    clip: tuple[float | None, float | None] = (None, None)
    default: float = 0.0


class BooleanFeature(_FeatureBase):
    kind: Literal["boolean"]
    default: bool = False


class CategoricalFeature(_FeatureBase):
    """One value per user (``categorical``) or a list (``multi_categorical``).

    Encoded as ids in one shared sparse-id space: either a vocabulary built from the users at
    prepare time (most frequent first, ``max_vocab`` / ``min_count`` caps, one out-of-vocabulary
    bucket), or, with ``num_buckets``, integer values used as ids directly (they must lie in
    ``[0, num_buckets)``; later out-of-range values go to the model's shared unknown-id row).
    """

    kind: Literal["categorical", "multi_categorical"]
    dtype: Literal["string", "integer"] = "string"
    max_vocab: int | None = Field(None, gt=0)
    min_count: int = Field(1, ge=1)
    num_buckets: int | None = Field(None, gt=0)
    max_values: int | None = Field(None, gt=0, description="multi_categorical: values kept.")
    default: Any = None

    @model_validator(mode="after")
    def _consistent(self) -> CategoricalFeature:
        if self.num_buckets is not None and self.dtype != "integer":
            raise ValueError(f"{self.name}: num_buckets needs dtype integer")
        if self.num_buckets is not None and (self.max_vocab or self.min_count > 1):
            raise ValueError(f"{self.name}: num_buckets excludes max_vocab and min_count")
        if self.kind == "categorical" and self.max_values is not None:
            raise ValueError(f"{self.name}: max_values is for multi_categorical features")
        multi_default = self.default not in (None, [])
        if (
            self.kind == "multi_categorical"
            and multi_default
            and not isinstance(self.default, list)
        ):
            raise ValueError(f"{self.name}: a multi_categorical default is a list")
        return self


UserFeature = Annotated[
    NumericFeature | BooleanFeature | CategoricalFeature, Field(discriminator="kind")
]


class SyntheticSource(_Strict):
    """The seeded synthetic generator (``friendrec.data.synthetic``) as a data source: it writes
    its users and friendships as parquet, then they are read like any other source."""

    users: str = Field(description="{variant} is the user count of synthetic:<N>.")
    seed_from_settings: bool = True


class DataSchema(_Strict):
    """A deployment's data: where the tables are and what each user feature is."""

    name: str = Field(description="Dataset name: artifacts live under its slug.")
    description: str = ""
    variants: list[str] | None = Field(
        None, description="Allowed {variant} values (None: any); e.g. the Twitch languages."
    )
    synthetic: SyntheticSource | None = None
    friendships: FriendshipsSource
    users: list[UsersSource] = Field(min_length=1)
    id_type: Literal["auto", "integer", "string"] = Field(
        "auto", description="integer: ids are used as-is; string: mapped to dense ids."
    )
    unknown_users: Literal["error", "default"] = Field(
        "error",
        description="A friendship endpoint missing from the users tables: refuse, or add the "
        "user with default features (counted in the report).",
    )
    features: list[UserFeature] = Field(min_length=1)
    datasets_hint: str = Field(
        "", description="Shown when the files are missing: where to get them."
    )
    fetch: str | None = Field(None, description="`friendrec data fetch` name for these files.")

    @model_validator(mode="after")
    def _unique(self) -> DataSchema:
        names = [f.name for f in self.features]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate feature name(s) {dup}")
        reserved = sorted(set(names) & RESERVED_NAMES)
        if reserved:
            raise ValueError(f"feature name(s) {reserved} are reserved by the contract")
        if not any(f.kind in ("numeric", "boolean") for f in self.features) and not any(
            f.kind in ("categorical", "multi_categorical") for f in self.features
        ):
            raise ValueError("declare at least one feature")
        return self

    def feature_spec(self) -> list[dict[str, Any]]:
        """What the model depends on (names, kinds, transforms, caps, defaults), not where files
        are: the input of ``schema_hash``."""
        return [f.model_dump(exclude={"description", "column"}) for f in self.features]

    def schema_hash(self) -> str:
        """12 hex digits over the declared features: moving files keeps it, changing a feature
        changes it (and with it the Feast feature service names)."""
        text = json.dumps(self.feature_spec(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]


class ResolvedSchema(BaseModel):
    """A schema with its file, variant and expanded paths: what `data prepare` reads."""

    model_config = ConfigDict(frozen=True)

    schema_: DataSchema = Field(alias="schema")
    file: Path
    variant: str | None
    dataset: str  # the name artifacts are stored under (short name, or the schema's name)

    def expand(
        self, path: str, datasets_dir: Path, workdir: Path, generated: Path | None = None
    ) -> Path:
        text = path.format(
            datasets_dir=datasets_dir,
            workdir=workdir,
            variant=self.variant or "",
            generated=generated or "{generated}",
        )
        resolved = Path(text)
        return resolved if resolved.is_absolute() else (self.file.parent / resolved)


def load_schema_file(path: Path) -> DataSchema:
    """Parse and validate a schema YAML; errors name the file and the offending field."""
    if not path.is_file():
        raise SchemaError(f"{path}: schema file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise SchemaError(f"{where}: invalid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SchemaError(f"{path}: expected a mapping at the top level")
    try:
        return DataSchema.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(schema)'}: {e['msg']}" for e in exc.errors()
        )
        raise SchemaError(f"{path}: {problems}") from None


def shipped_schemas() -> dict[str, Path]:
    """Short names of the schema files shipped with friendrec (file stem -> path)."""
    return {p.stem: p for p in sorted(SHIPPED_SCHEMAS_DIR.glob("*.yaml"))}


def resolve(dataset: str | None = None, schema_path: Path | None = None) -> ResolvedSchema:
    """``--dataset NAME[/VARIANT|:VARIANT]`` (a shipped schema) or ``--schema PATH`` -> a schema.

    ``twitch/ENGB`` is ``feature_repo/schemas/twitch.yaml`` with variant ``ENGB``;
    ``synthetic:1000`` is ``synthetic.yaml`` with variant ``1000``.
    """
    if schema_path is not None:
        schema = load_schema_file(Path(schema_path))
        name = dataset or schema.name
        return ResolvedSchema(
            schema=schema, file=Path(schema_path).resolve(), variant=None, dataset=name
        )
    if not dataset:
        raise UnknownDatasetError("name a dataset (--dataset) or a schema file (--schema)")
    stem, sep, variant = dataset.partition("/") if "/" in dataset else dataset.partition(":")
    shipped = shipped_schemas()
    if stem not in shipped:
        raise UnknownDatasetError(
            f"unknown dataset {dataset!r}: shipped schemas are {sorted(shipped)} "
            f"(NAME, NAME/VARIANT or NAME:VARIANT); pass --schema PATH for your own data"
        )
    schema = load_schema_file(shipped[stem])
    variant_value = variant if sep else None
    if schema.variants is not None:
        if variant_value is None:
            raise UnknownDatasetError(f"{stem} needs a variant: {stem}/<one of {schema.variants}>")
        upper = {v.upper(): v for v in schema.variants}
        if variant_value.upper() not in upper:
            raise UnknownDatasetError(
                f"unknown {stem} variant {variant_value!r}; the schema lists {schema.variants}"
            )
        variant_value = upper[variant_value.upper()]
        dataset = f"{stem}{sep}{variant_value}"
    elif schema.synthetic is not None:
        if variant_value is None or not variant_value.replace("_", "").isdigit():
            raise UnknownDatasetError(f"{stem}:<N> needs an integer N >= 2, got {dataset!r}")
        variant_value = variant_value.replace("_", "")
        if int(variant_value) < 2:
            raise UnknownDatasetError(f"{stem}:<N> needs an integer N >= 2, got {dataset!r}")
    elif variant_value is not None:
        raise UnknownDatasetError(f"{stem} takes no variant, got {dataset!r}")
    return ResolvedSchema(schema=schema, file=shipped[stem], variant=variant_value, dataset=dataset)
