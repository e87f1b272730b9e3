"""The feature contract: the one place that turns a declared schema into feature names, dtypes,
defaults, encodings and transforms.

A ``Contract`` is built once, at ``data prepare``, from the dataset's schema (``friendrec.schema``)
plus what prepare fits on the users table (categorical vocabularies, standardisation statistics);
it is stored beside the prepared data (``contract.json``) and loaded by every later job: the Feast
definitions, the graph-feature job, the training inputs and the SavedModel signature, the serving
path, the stream workers' profile events and the model card. Nothing else spells a feature name.

What the declared features become:

* numeric and boolean features -> the ``profile`` scalars (float32, stored raw with their defaults
  filled in; ``transform_profile`` clips and transforms them the same way for training, serving and
  the friends' aggregates);
* categorical and multi-valued categorical features -> ids in one shared sparse-id space
  (``sparse_ids``, int64 list): each feature owns the id range ``[offset, offset + size)``, the last
  id of a built vocabulary being its out-of-vocabulary bucket. One id space keeps the tower's
  first operation a single linear embedding bag, which is what lets the graph job precompute the
  friends' mean bag (``nbr_sparse_ids`` / ``nbr_sparse_weights``).

Why the graph features look as they do: the user tower is a 2-layer GraphSAGE whose first operation
is linear, so a mean over friends commutes with it; serving a 2-layer tower then needs two online
reads: the user (own features, aggregates, sampled ``friend_ids``), then those friends.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np

from friendrec.errors import ContractMismatchError, NotPreparedError

# Version of the contract's *structure* (views, graph features, encoding scheme); the declared
# features are versioned by the schema hash.
CONTRACT_VERSION = 2

ENTITY_NAME = "user"
JOIN_KEY = "user_id"
EVENT_TIMESTAMP = "event_timestamp"
CREATED_TIMESTAMP = "created_ts"

PROFILE_VIEW = "user_profile"
GRAPH_VIEW = "user_graph"
PROFILE_PUSH_SOURCE = "user_profile_push"
GRAPH_PUSH_SOURCE = "user_graph_push"

CONTRACT_FILE = "contract.json"

DType = Literal["int64", "float32", "int64_list", "float32_list"]
Transform = Literal["identity", "log1p", "standardise"]


@dataclass(frozen=True)
class Feature:
    """One named stored feature: storage dtype, value for users the store does not know, and why.

    Profile scalars also carry their model transform: clip to ``[clip_min, clip_max]``, then
    ``log1p`` (of the non-negative part) or ``standardise`` with the prepare-time ``mean`` and
    ``std``.
    """

    name: str
    dtype: DType
    default: Any
    description: str
    transform: Transform = "identity"
    clip_min: float | None = None
    clip_max: float | None = None
    mean: float = 0.0
    std: float = 1.0
    kind: str = ""  # the schema kind (numeric, boolean) for profile scalars
    column: str = ""  # the source column it was read from


@dataclass(frozen=True)
class Categorical:
    """A categorical feature's slice of the shared sparse-id space.

    ``vocabulary`` None means identity ids (``num_buckets`` integers used as they are); otherwise
    value ``vocabulary[i]`` has id ``offset + i`` and every other value ``oov_id``.
    """

    name: str
    kind: Literal["categorical", "multi_categorical"]
    value_type: Literal["string", "integer"]
    offset: int
    size: int  # ids owned, the OOV bucket included when there is a vocabulary
    vocabulary: tuple[Any, ...] | None
    max_values: int | None
    default: Any
    column: str = ""

    @property
    def oov_id(self) -> int | None:
        return None if self.vocabulary is None else self.offset + self.size - 1

    @cached_property
    def _index(self) -> dict[Any, int]:
        return {v: self.offset + i for i, v in enumerate(self.vocabulary or ())}

    def owns(self, sparse_id: int) -> bool:
        return self.offset <= sparse_id < self.offset + self.size

    def coerce(self, value: Any) -> Any:
        """One raw value -> the vocabulary's key type; ValueError names the problem."""
        if isinstance(value, bool):
            raise ValueError(f"{self.name}: expected a {self.value_type}, got a boolean")
        if self.value_type == "integer":
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, int | np.integer):
                return int(value)
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                return int(value)
            raise ValueError(f"{self.name}: expected an integer, got {value!r}")
        if isinstance(value, str):
            return value
        if isinstance(value, int | np.integer):
            return str(value)
        raise ValueError(f"{self.name}: expected a string, got {value!r}")

    def encode(self, value: Any) -> list[int]:
        """A raw value (one for categorical, a list for multi_categorical; None = the default)
        -> its sparse ids: deduplicated in first-seen order, capped at ``max_values``."""
        if value is None:
            value = self.default
        if value is None:
            return []
        if self.kind == "multi_categorical":
            if isinstance(value, str | bytes) or not isinstance(value, Iterable):
                raise ValueError(f"{self.name}: expected a list, got {value!r}")
            values = list(value)
        else:
            if isinstance(value, list | tuple):
                raise ValueError(f"{self.name}: expected one value, got a list")
            values = [value]
        ids: list[int] = []
        for raw in values:
            key = self.coerce(raw)
            if self.vocabulary is None:
                # Identity ids: out of range is the model's shared unknown-id row (any id it
                # does not know); encoded as -1 here so that it never aliases another feature.
                sid = self.offset + key if 0 <= key < self.size else -1
            else:
                sid = self._index.get(key, self.oov_id)
            if sid >= 0 and sid not in ids:
                ids.append(int(sid))
        return ids[: self.max_values] if self.max_values else ids


@dataclass(frozen=True)
class Contract:
    """The feature contract of one prepared dataset (see the module docstring)."""

    dataset: str
    schema_hash: str
    profile_scalars: tuple[Feature, ...]
    categoricals: tuple[Categorical, ...] = ()
    vocab_sha256: str = ""
    version: int = CONTRACT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    # ---- derived names -------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return max((c.offset + c.size for c in self.categoricals), default=0)

    @property
    def training_service(self) -> str:
        return f"friendrec_training_{self.schema_hash}"

    @property
    def serving_service(self) -> str:
        return f"friendrec_serving_{self.schema_hash}"

    @property
    def profile_scalar_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.profile_scalars)

    @property
    def sparse_ids(self) -> Feature:
        return SPARSE_IDS

    @property
    def profile_features(self) -> tuple[Feature, ...]:
        return (*self.profile_scalars, SPARSE_IDS)

    @property
    def nbr_profile_mean(self) -> Feature:
        return Feature(
            "nbr_profile_mean",
            "float32_list",
            (0.0,) * len(self.profile_scalars),
            "Mean over friends of transform_profile(profile scalars); zeros without friends.",
        )

    @property
    def graph_features(self) -> tuple[Feature, ...]:
        return (DEGREE, FRIEND_IDS, NBR_SPARSE_IDS, NBR_SPARSE_WEIGHTS, self.nbr_profile_mean)

    @property
    def views(self) -> dict[str, tuple[Feature, ...]]:
        return {PROFILE_VIEW: self.profile_features, GRAPH_VIEW: self.graph_features}

    @property
    def all_features(self) -> tuple[Feature, ...]:
        return (*self.profile_features, *self.graph_features)

    @cached_property
    def features_by_name(self) -> dict[str, Feature]:
        return {f.name: f for f in self.all_features}

    @cached_property
    def categoricals_by_name(self) -> dict[str, Categorical]:
        return {c.name: c for c in self.categoricals}

    @property
    def declared_names(self) -> tuple[str, ...]:
        """Every user feature the schema declares (what a profile event may set)."""
        return (*self.profile_scalar_names, *(c.name for c in self.categoricals))

    def feature_refs(self, view: str | None = None) -> list[str]:
        """Feast feature references ``view:feature`` for one view or all of them."""
        views = [view] if view else list(self.views)
        return [f"{v}:{f.name}" for v in views for f in self.views[v]]

    def default_value(self, name: str) -> Any:
        """The value a feature takes for a user the store does not know (a fresh copy)."""
        value = self.features_by_name[name].default
        return list(value) if isinstance(value, tuple) else value

    def check_profile_names(self, names: Iterable[str]) -> None:
        """Reject profile scalars the contract does not define (request features)."""
        unknown = sorted(set(names) - set(self.profile_scalar_names))
        if unknown:
            raise ValueError(
                f"unknown profile feature(s) {unknown}; the contract has "
                f"{list(self.profile_scalar_names)}"
            )

    # ---- transforms and encodings ---------------------------------------------------------
    def transform_arrays(self) -> dict[str, np.ndarray]:
        """Per-column transform parameters (float32 [P] each): what the tower bakes into the
        SavedModel so that TensorFlow applies exactly ``transform_profile``."""
        p = self.profile_scalars
        return {
            "clip_min": np.array(
                [-np.inf if f.clip_min is None else f.clip_min for f in p], dtype=np.float32
            ),
            "clip_max": np.array(
                [np.inf if f.clip_max is None else f.clip_max for f in p], dtype=np.float32
            ),
            "log1p": np.array([f.transform == "log1p" for f in p], dtype=bool),
            "standardise": np.array([f.transform == "standardise" for f in p], dtype=bool),
            "mean": np.array([f.mean for f in p], dtype=np.float32),
            "std": np.array([f.std for f in p], dtype=np.float32),
        }

    def transform_profile(self, scalars: np.ndarray) -> np.ndarray:
        """Raw profile scalars [n, P] in contract order -> model-ready float32 [n, P].

        Shared by the graph-feature job (``nbr_profile_mean``), training and serving, so the three
        can never disagree on what a profile vector is.
        """
        x = np.asarray(scalars, dtype=np.float32)
        width = len(self.profile_scalars)
        if x.ndim != 2 or x.shape[1] != width:
            raise ValueError(f"expected [n, {width}] profile scalars, got {x.shape}")
        t = self.transform_arrays()
        out = np.minimum(np.maximum(x, t["clip_min"]), t["clip_max"])
        out = np.where(t["log1p"], np.log1p(np.maximum(out, np.float32(0.0))), out)
        out = np.where(t["standardise"], (out - t["mean"]) / t["std"], out)
        return out.astype(np.float32)

    def scalar_value(self, name: str, value: Any) -> float:
        """A raw numeric/boolean value -> its stored float; ValueError names the problem."""
        feature = self.features_by_name[name]
        if value is None:
            return float(feature.default)
        if feature.kind == "boolean":
            return parse_bool(value, name)
        if isinstance(value, bool):
            raise ValueError(f"{name}: expected a number, got a boolean")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}: expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"{name}: expected a finite number, got {value!r}")
        return number

    def encode_profile(
        self, values: Mapping[str, Any], current_sparse_ids: Sequence[int] = ()
    ) -> tuple[dict[str, float], list[int] | None]:
        """Raw declared features of one user (any subset) -> (stored scalars that changed, the
        new ``sparse_ids`` or None when no categorical feature changed).

        A categorical feature given here replaces that feature's ids in ``current_sparse_ids``;
        the others' ids are kept. Unknown names and values of the wrong type raise ValueError.
        """
        unknown = sorted(set(values) - set(self.declared_names))
        if unknown:
            raise ValueError(
                f"unknown feature(s) {unknown}; the schema declares {list(self.declared_names)}"
            )
        scalars = {
            n: self.scalar_value(n, v) for n, v in values.items() if n in self.features_by_name
        }
        changed = [c for c in self.categoricals if c.name in values]
        if not changed:
            return scalars, None
        per_feature = self.split_sparse_ids(current_sparse_ids)
        for c in changed:
            per_feature[c.name] = c.encode(values[c.name])
        return scalars, [i for c in self.categoricals for i in per_feature[c.name]]

    def split_sparse_ids(self, sparse_ids: Sequence[int]) -> dict[str, list[int]]:
        """A user's ``sparse_ids`` -> the ids of each categorical feature (by id range)."""
        out: dict[str, list[int]] = {c.name: [] for c in self.categoricals}
        for sid in sparse_ids:
            for c in self.categoricals:
                if c.owns(int(sid)):
                    out[c.name].append(int(sid))
                    break
        return out

    # ---- identity -------------------------------------------------------------------------
    def check_compatible(self, schema_hash: str | None, what: str) -> None:
        """Refuse a model (or features) of another schema: ContractMismatchError."""
        if schema_hash != self.schema_hash:
            raise ContractMismatchError(
                f"{what} was built for schema {schema_hash!r}, but the dataset {self.dataset!r} "
                f"has schema {self.schema_hash!r}; re-train and export on this schema"
            )

    def to_json(self) -> str:
        data = asdict(self)
        for c in data["categoricals"]:
            if c["vocabulary"] is not None:
                c["vocabulary"] = list(c["vocabulary"])
        return json.dumps(data, indent=1, default=_json_default)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Contract:
        def _feature(d: Mapping[str, Any]) -> Feature:
            d = dict(d)
            if isinstance(d.get("default"), list):
                d["default"] = tuple(d["default"])
            return Feature(**d)

        def _categorical(d: Mapping[str, Any]) -> Categorical:
            d = dict(d)
            if d.get("vocabulary") is not None:
                d["vocabulary"] = tuple(d["vocabulary"])
            return Categorical(**d)

        return cls(
            dataset=data["dataset"],
            schema_hash=data["schema_hash"],
            profile_scalars=tuple(_feature(f) for f in data["profile_scalars"]),
            categoricals=tuple(_categorical(c) for c in data.get("categoricals", ())),
            vocab_sha256=data.get("vocab_sha256", ""),
            version=data.get("version", CONTRACT_VERSION),
            extra=dict(data.get("extra", {})),
        )

    def save(self, directory: Path) -> Path:
        path = directory / CONTRACT_FILE
        path.write_text(self.to_json())
        return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    raise TypeError(f"not JSON serialisable: {value!r}")


def vocab_digest(categoricals: Sequence[Categorical]) -> str:
    """sha256 over every vocabulary (identity features by their bucket count)."""
    digest = hashlib.sha256()
    for c in categoricals:
        payload = {
            "name": c.name,
            "offset": c.offset,
            "size": c.size,
            "vocabulary": list(c.vocabulary) if c.vocabulary is not None else None,
        }
        digest.update(json.dumps(payload, sort_keys=True, default=_json_default).encode())
    return digest.hexdigest()


_TRUE = {"true", "1", "yes", "t", "y"}
_FALSE = {"false", "0", "no", "f", "n", ""}


def parse_bool(value: Any, name: str = "value") -> float:
    """True/False, 1/0, yes/no (any case) -> 1.0 / 0.0; anything else raises ValueError."""
    if isinstance(value, bool | np.bool_):
        return float(bool(value))
    if isinstance(value, int | np.integer) and int(value) in (0, 1):
        return float(value)
    if isinstance(value, float) and value in (0.0, 1.0):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return 1.0
        if text in _FALSE and text:
            return 0.0
    raise ValueError(f"{name}: expected a boolean (true/false, 1/0), got {value!r}")


def load(data_dir: Path) -> Contract:
    """The contract stored beside a prepared dataset (``data_dir/contract.json``)."""
    path = Path(data_dir) / CONTRACT_FILE
    if not path.is_file():
        raise NotPreparedError(
            f"no feature contract in {data_dir}; run `friendrec data prepare` for this dataset "
            "(a layout prepared before schemas existed must be prepared again)"
        )
    return Contract.from_dict(json.loads(path.read_text()))


# ---- the fixed part: graph features every contract shares ---------------------------------
SPARSE_IDS = Feature(
    "sparse_ids",
    "int64_list",
    (),
    "Ids of the user's categorical features in the shared sparse-id space (capped).",
)
DEGREE = Feature("degree", "int64", 0, "Number of friends in the training graph as of the row.")
FRIEND_IDS = Feature(
    "friend_ids", "int64_list", (), "Deterministic sample of friends, capped (features.friend_cap)."
)
NBR_SPARSE_IDS = Feature(
    "nbr_sparse_ids", "int64_list", (), "Ids of the friends' mean sparse bag, heaviest first."
)
NBR_SPARSE_WEIGHTS = Feature(
    "nbr_sparse_weights",
    "float32_list",
    (),
    "Weights of nbr_sparse_ids: the mean over friends of each friend's bag normalised to sum 1.",
)
