"""The Milvus embedding index: one collection per model version behind one live alias.

Embeddings of different model versions live in different spaces, so each version gets its own
collection (``<alias>_v<version>``: ``user_id`` INT64 primary key without auto id, ``embedding``
FLOAT_VECTOR, ``model_version``, ``updated_at`` unix ms), indexed with HNSW (or FLAT) on inner
product. The vectors are stored as the model computed them (its index vectors: unit embeddings, plus
the popularity term when the model has one; ``training/tower.py``). Readers search the alias
``settings.milvus.alias`` (or the collection it resolves to, pinned for a request); ``promote``
moves it atomically to a complete, loaded collection, so a reader sees one version or the other,
never a mix.

Collection properties (strings) make the index self-describing: ``friendrec.model_version``,
``.dataset``, ``.schema_hash`` (of the feature contract the model was trained on: serving refuses
a live version of another schema), ``.dim``, ``.index_type``, ``.state`` (``building`` until
``finish`` verified every row, then ``ready``), ``.rows``, ``.created_at``, ``.built_at`` and the
promotion history (``.promotion_seq``, ``.promoted_at``, ``.rolled_back_at``).

**Rollback target** ("the previous version"): the most recently *promoted* ready collection other
than the live one, skipping collections that were rolled back *from*. Promotion order, not version
order, because after "v1 live, v2 built, rollback to v1, v3 built" the version to return to from
v3 is v1 (it was live before v3), not the bad v2. A rollback re-promotes its target, so repeated
rollbacks walk back through the promotion history; a rebuilt version starts with a clean history.

**Prune policy**: keep ``keep_versions`` ready collections — always the live one and the rollback
target, then the most recently promoted others (never-promoted and rolled-back-from ones last) —
and drop the rest. Collections still ``building`` (a killed build) are only dropped on request,
since a build may be running; rebuilding that version drops them too. Nothing that any alias points
at is ever dropped (milvus-lite would silently drop the alias with it).

milvus-lite forgets which collections were loaded when it restarts (in file mode: in every new
process), so ``search``/``get_vectors`` load a released collection once and retry, and services
call ``load_live`` at start-up; a real Milvus keeps its load state.

Every call carries a timeout, and a Milvus that is down, unreachable or too slow raises
``IndexUnavailableError`` naming the URI; anything else Milvus refuses raises
``EmbeddingIndexError``. pymilvus's own traceback logging of failed RPCs is turned down: the
caller gets one clear exception instead.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from pymilvus import DataType, MilvusClient, MilvusException

from friendrec.config import Settings
from friendrec.errors import EmbeddingIndexError, IndexUnavailableError

__all__ = [
    "EmbeddingIndex",
    "EmbeddingIndexError",
    "IndexUnavailableError",
    "LiveIndex",
    "VersionInfo",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

# pymilvus logs every failed RPC (and every failed reconnect) with a full traceback before raising;
# we translate the exception into one clear project error, so those logs are noise.
logging.getLogger("pymilvus.decorators").setLevel(logging.CRITICAL)
logging.getLogger("pymilvus.client.connection_manager").setLevel(logging.CRITICAL)

ID_FIELD = "user_id"
VECTOR_FIELD = "embedding"
VERSION_FIELD = "model_version"
UPDATED_FIELD = "updated_at"
METRIC = "IP"
# Deadline of loading a collection at start-up (``load_live``): 5M users' vectors and HNSW graph
# do not load within a service's search deadline of a second (docs/scaling.md).
LOAD_TIMEOUT_S = 600.0

BUILDING = "building"
READY = "ready"

_P = "friendrec."
P_VERSION = _P + "model_version"
P_DATASET = _P + "dataset"
P_SCHEMA_HASH = _P + "schema_hash"
P_DIM = _P + "dim"
P_INDEX_TYPE = _P + "index_type"
P_STATE = _P + "state"
P_ROWS = _P + "rows"
P_CREATED_AT = _P + "created_at"
P_BUILT_AT = _P + "built_at"
P_PROMOTION_SEQ = _P + "promotion_seq"
P_PROMOTED_AT = _P + "promoted_at"
P_ROLLED_BACK_AT = _P + "rolled_back_at"

CONNECT_FAILED = 2  # pymilvus Status.CONNECT_FAILED: the channel could not be (re)established
COLLECTION_NOT_LOADED = 101  # Milvus and milvus-lite: "call load() before search"
_TRANSPORT_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}
GET_BATCH = 1000  # ids per get: well under Milvus's query result limit (16384)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _is_unavailable(exc: BaseException) -> bool:
    """Transport-level failures (as opposed to Milvus refusing a request)."""
    if isinstance(exc, grpc.RpcError | grpc.FutureTimeoutError):
        return True
    if isinstance(exc, MilvusException):
        code = exc.code
        if isinstance(code, grpc.StatusCode):
            return code in _TRANSPORT_CODES
        return code == CONNECT_FAILED or "server unavailable" in str(exc.message)
    return False


def _is_not_loaded(exc: BaseException) -> bool:
    return isinstance(exc, MilvusException) and (
        exc.code == COLLECTION_NOT_LOADED or "not loaded" in str(exc.message).lower()
    )


@dataclass(frozen=True)
class LiveIndex:
    """What the live alias points at: the collection and the model version whose space it is."""

    alias: str
    collection: str
    model_version: int
    dataset: str
    dim: int
    schema_hash: str = ""  # "" for a collection built before schemas existed


@dataclass(frozen=True)
class VersionInfo:
    """One version's collection, for `friendrec index list` and the rollback/prune policy."""

    version: int
    collection: str
    dataset: str
    dim: int
    index_type: str
    state: str
    rows: int | None
    created_at: str
    built_at: str
    promotion_seq: int
    promoted_at: str
    rolled_back_at: str
    loaded: bool
    live: bool = False
    rollback_target: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _CollectionMeta:
    """The immutable part of a collection's properties (cached per collection name)."""

    version: int
    dataset: str
    dim: int
    index_type: str
    schema_hash: str = ""


class EmbeddingIndex:
    """A thin wrapper over ``MilvusClient`` for the versioned collections, the alias, search and
    upsert. Not thread-safe for admin operations; ``search``/``live`` may be shared by threads."""

    def __init__(self, client: MilvusClient, settings: Settings, uri: str, timeout: float) -> None:
        self.client = client
        self.settings = settings
        self.cfg = settings.milvus
        self.uri = uri
        self.timeout = timeout
        self.alias = self.cfg.alias
        self._name_re = re.compile(rf"^{re.escape(self.alias)}_v(\d+)$")
        self._meta: dict[str, _CollectionMeta] = {}

    @classmethod
    def connect(cls, settings: Settings, timeout: float = 30.0) -> EmbeddingIndex:
        """Connect to ``settings.milvus_uri`` (a milvus-lite ``.db`` path or a server URI). Every
        later call uses ``timeout`` seconds unless it takes its own."""
        uri = settings.milvus_uri
        if uri.endswith(".db"):  # milvus-lite file mode: the path is its data directory
            Path(uri).expanduser().parent.mkdir(parents=True, exist_ok=True)
        token = settings.milvus.token.get_secret_value() if settings.milvus.token else ""
        try:
            # dedicated: our own channel, so closing this index never closes another's.
            client = MilvusClient(uri=uri, token=token, timeout=timeout, dedicated=True)
        except Exception as exc:
            if _is_unavailable(exc):
                raise IndexUnavailableError(
                    f"Milvus at {uri} is unavailable: {_message(exc)}"
                ) from exc
            hint = (
                " (a milvus-lite file can be open in one process only; run `milvus-lite server` "
                "for several)"
                if uri.endswith(".db")
                else ""
            )
            raise EmbeddingIndexError(
                f"cannot open Milvus at {uri}: {_message(exc)}{hint}"
            ) from exc
        log.debug("connected to Milvus at %s", uri)
        return cls(client, settings, uri, timeout)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> EmbeddingIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------------------------
    def _rpc(self, what: str, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """One Milvus call with a deadline; its failures become project errors."""
        kwargs.setdefault("timeout", self.timeout)
        try:
            return call(*args, **kwargs)
        except (MilvusException, grpc.RpcError, grpc.FutureTimeoutError) as exc:
            if _is_unavailable(exc):
                raise IndexUnavailableError(
                    f"Milvus at {self.uri} is unavailable ({what}): {_message(exc)}"
                ) from exc
            raise EmbeddingIndexError(
                f"Milvus at {self.uri} refused {what}: {_message(exc)}"
            ) from exc

    def collection_name(self, version: int) -> str:
        return f"{self.alias}_v{int(version)}"

    def version_of(self, collection: str) -> int | None:
        """The model version in a collection name of this alias, None for foreign names."""
        match = self._name_re.match(collection)
        return int(match.group(1)) if match else None

    def exists(self, collection: str) -> bool:
        return bool(self._rpc("has_collection", self.client.has_collection, collection))

    def _properties(self, collection: str) -> dict[str, str]:
        if not self.exists(collection):
            raise EmbeddingIndexError(f"collection {collection!r} does not exist in {self.uri}")
        desc = self._rpc("describe_collection", self.client.describe_collection, collection)
        return {str(k): str(v) for k, v in (desc.get("properties") or {}).items()}

    def _collection_meta(self, collection: str) -> _CollectionMeta:
        meta = self._meta.get(collection)
        if meta is None:
            props = self._properties(collection)
            if P_VERSION not in props or P_DIM not in props:
                raise EmbeddingIndexError(
                    f"collection {collection!r} in {self.uri} was not built by friendrec "
                    f"(no {P_VERSION} property)"
                )
            meta = _CollectionMeta(
                version=int(props[P_VERSION]),
                dataset=props.get(P_DATASET, ""),
                dim=int(props[P_DIM]),
                index_type=props.get(P_INDEX_TYPE, self.cfg.index_type),
                schema_hash=props.get(P_SCHEMA_HASH, ""),
            )
            self._meta[collection] = meta
        return meta

    def resolve(self, name: str) -> str:
        """A collection name, or an alias resolved to its collection."""
        aliases = self._rpc("list_aliases", self.client.list_aliases).get("aliases", [])
        if name in aliases:
            return str(
                self._rpc("describe_alias", self.client.describe_alias, name)["collection_name"]
            )
        return name

    def is_loaded(self, collection: str) -> bool:
        state = self._rpc("get_load_state", self.client.get_load_state, collection)["state"]
        return getattr(state, "name", str(state)) == "Loaded"

    # -- building a version ------------------------------------------------------------------
    def create_version(self, version: int, dim: int, dataset: str, schema_hash: str = "") -> str:
        """An empty collection for one model version (state ``building``); fails if it exists.
        ``schema_hash``: the model card's (the contract the model was trained on)."""
        name = self.collection_name(version)
        if self.exists(name):
            raise EmbeddingIndexError(f"collection {name!r} already exists in {self.uri}")
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(ID_FIELD, DataType.INT64, is_primary=True, auto_id=False)
        schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=int(dim))
        schema.add_field(VERSION_FIELD, DataType.INT64)
        schema.add_field(UPDATED_FIELD, DataType.INT64)
        index_params = self.client.prepare_index_params()
        if self.cfg.index_type == "HNSW":
            params = {"M": self.cfg.hnsw_m, "efConstruction": self.cfg.hnsw_ef_construction}
        else:
            params = {}
        index_params.add_index(
            VECTOR_FIELD, index_type=self.cfg.index_type, metric_type=METRIC, params=params
        )
        properties = {
            P_VERSION: str(int(version)),
            P_DATASET: dataset,
            P_SCHEMA_HASH: schema_hash,
            P_DIM: str(int(dim)),
            P_INDEX_TYPE: self.cfg.index_type,
            P_STATE: BUILDING,
            P_CREATED_AT: _now_iso(),
            P_BUILT_AT: "",
            P_ROWS: "",
            P_PROMOTION_SEQ: "0",
            P_PROMOTED_AT: "",
            P_ROLLED_BACK_AT: "",
        }
        self._rpc(
            "create_collection",
            self.client.create_collection,
            name,
            schema=schema,
            properties=properties,
            description=(
                f"friendrec user embeddings of model version {version} ({dataset}, dim {dim}, "
                f"{self.cfg.index_type}/{METRIC})"
            ),
        )
        # sync=False: pymilvus would poll with AllocTimestamp, which milvus-lite lacks; finish()
        # waits for the index through describe_index instead.
        try:
            self._rpc("create_index", self.client.create_index, name, index_params, sync=False)
        except BaseException:
            with contextlib.suppress(EmbeddingIndexError, IndexUnavailableError):
                self._rpc("drop_collection", self.client.drop_collection, name)
            raise
        self._meta.pop(name, None)
        log.info("created %s (dim %d, %s)", name, dim, self.cfg.index_type)
        return name

    def _rows(
        self,
        collection: str,
        user_ids: Sequence[int] | np.ndarray,
        vectors: np.ndarray,
        model_version: int,
    ) -> list[dict[str, Any]]:
        meta = self._collection_meta(collection)
        if int(model_version) != meta.version:
            raise EmbeddingIndexError(
                f"embeddings of model version {model_version} cannot go into {collection!r} "
                f"(model version {meta.version}): different versions are different spaces"
            )
        vectors = np.asarray(vectors, dtype=np.float32)
        ids = np.asarray(user_ids, dtype=np.int64)
        if vectors.ndim != 2 or vectors.shape != (len(ids), meta.dim):
            raise EmbeddingIndexError(
                f"{collection!r} needs a [{len(ids)}, {meta.dim}] matrix, got {vectors.shape}"
            )
        if not np.isfinite(vectors).all():
            raise EmbeddingIndexError(f"non-finite embedding values for {collection!r}")
        now_ms = int(time.time() * 1000)
        return [
            {
                ID_FIELD: int(uid),
                VECTOR_FIELD: vectors[i],
                VERSION_FIELD: int(model_version),
                UPDATED_FIELD: now_ms,
            }
            for i, uid in enumerate(ids.tolist())
        ]

    def insert(
        self,
        collection: str,
        user_ids: Sequence[int] | np.ndarray,
        vectors: np.ndarray,
        model_version: int,
    ) -> int:
        """Add rows (the model's index vectors, as computed)."""
        rows = self._rows(collection, user_ids, vectors, model_version)
        if rows:
            self._rpc("insert", self.client.insert, collection, rows)
        return len(rows)

    def upsert(
        self,
        collection: str,
        user_ids: Sequence[int] | np.ndarray,
        vectors: np.ndarray,
        model_version: int,
    ) -> int:
        """Insert or replace rows (streaming refreshes of the live collection). ``collection``
        may be the alias; the version must match the collection's."""
        collection = self.resolve(collection)
        rows = self._rows(collection, user_ids, vectors, model_version)
        if rows:
            self._rpc("upsert", self.client.upsert, collection, rows)
        return len(rows)

    def flush(self, collection: str) -> None:
        """Seal the collection's growing segments (``collection`` may be the alias) so that
        searches use the index instead of scanning unflushed rows."""
        self._rpc("flush", self.client.flush, self.resolve(collection))

    def count(self, collection: str) -> int:
        """Rows by primary key (a re-inserted user counts once)."""
        result = self._rpc(
            "count",
            self.client.query,
            collection,
            filter="",
            output_fields=["count(*)"],
            consistency_level="Strong",
        )
        return int(result[0]["count(*)"])

    def load(self, collection: str, timeout: float | None = None) -> None:
        """Load a collection into memory and wait until it is searchable (within ``timeout``,
        default the index's: a service's search deadline is far too short for millions of
        vectors, see ``LOAD_TIMEOUT_S``)."""
        self._rpc(
            "load_collection",
            self.client.load_collection,
            collection,
            timeout=timeout or self.timeout,
        )

    def finish(self, collection: str, rows: int) -> None:
        """Seal a build: flush, wait for the index, load, check that exactly ``rows`` users are
        present, then mark it ``ready`` (only ready collections can be promoted)."""
        self._rpc("flush", self.client.flush, collection)
        self._wait_indexed(collection)
        self.load(collection)
        stored = self.count(collection)
        if stored != rows:
            raise EmbeddingIndexError(
                f"{collection!r} holds {stored} users after the build, expected {rows}"
            )
        self._set_properties(
            collection, {P_STATE: READY, P_ROWS: str(rows), P_BUILT_AT: _now_iso()}
        )
        log.info("%s is complete: %d users, loaded", collection, rows)

    def _wait_indexed(self, collection: str) -> None:
        """Milvus builds segment indexes asynchronously; wait (within the timeout) so that a
        promoted collection is searched through its index, not brute force."""
        deadline = time.monotonic() + self.timeout
        while True:
            info = self._rpc("describe_index", self.client.describe_index, collection, VECTOR_FIELD)
            if int(info.get("pending_index_rows", 0) or 0) == 0 and int(
                info.get("indexed_rows", 0) or 0
            ) >= int(info.get("total_rows", 0) or 0):
                return
            if time.monotonic() > deadline:
                log.warning("%s: index still building after %.0fs", collection, self.timeout)
                return
            time.sleep(0.2)

    def _set_properties(self, collection: str, properties: dict[str, str]) -> None:
        self._rpc(
            "alter_collection_properties",
            self.client.alter_collection_properties,
            collection,
            properties=properties,
        )

    # -- the alias ---------------------------------------------------------------------------
    def live(self) -> LiveIndex | None:
        """The alias's collection and model version; None before the first promotion."""
        aliases = self._rpc("list_aliases", self.client.list_aliases).get("aliases", [])
        if self.alias not in aliases:
            return None
        collection = str(
            self._rpc("describe_alias", self.client.describe_alias, self.alias)["collection_name"]
        )
        meta = self._collection_meta(collection)
        return LiveIndex(
            self.alias, collection, meta.version, meta.dataset, meta.dim, meta.schema_hash
        )

    def load_live(self, timeout: float | None = LOAD_TIMEOUT_S) -> LiveIndex | None:
        """Load the live collection if it was released (milvus-lite forgets load state when it
        restarts, i.e. in file mode in every new process): services call this at start-up so
        their first search does not pay for the load within its deadline."""
        live = self.live()
        if live is not None and not self.is_loaded(live.collection):
            log.info("loading the live collection %s", live.collection)
            started = time.monotonic()
            self.load(live.collection, timeout)
            log.info("loaded %s in %.1fs", live.collection, time.monotonic() - started)
        return live

    def promote(self, version: int) -> LiveIndex:
        """Move the alias to ``version``'s collection in one step (alter_alias, or create_alias
        the first time). Only a ready (complete) and loaded collection may take traffic."""
        name = self.collection_name(version)
        props = self._properties(name)
        if props.get(P_STATE) != READY:
            raise EmbeddingIndexError(
                f"{name!r} is not complete (state {props.get(P_STATE)!r}); rebuild it with "
                f"`friendrec index build --model-version {version}`"
            )
        if not self.is_loaded(name):
            raise EmbeddingIndexError(f"{name!r} is not loaded; load it before promoting it")
        current = self.live()
        if current is not None and current.collection == name:
            return current
        seq = 1 + max((info.promotion_seq for info in self._scan()), default=0)
        # History first: if the alias move then fails, this collection was never live, and a
        # failed build drops it anyway.
        self._set_properties(
            name,
            {P_PROMOTION_SEQ: str(seq), P_PROMOTED_AT: _now_iso(), P_ROLLED_BACK_AT: ""},
        )
        if current is None:
            self._rpc("create_alias", self.client.create_alias, name, self.alias)
        else:
            self._rpc("alter_alias", self.client.alter_alias, name, self.alias)
        log.info(
            "alias %s -> %s (was %s)", self.alias, name, current.collection if current else None
        )
        live = self.live()
        assert live is not None
        return live

    def rollback_target(self) -> VersionInfo | None:
        """The collection a rollback would make live (see the module docstring)."""
        return next((info for info in self._scan() if info.rollback_target), None)

    def rollback(self) -> LiveIndex:
        """Move the alias back to the rollback target (loading it first if it was released)."""
        current = self.live()
        if current is None:
            raise EmbeddingIndexError(f"alias {self.alias!r} does not exist: nothing to roll back")
        target = self.rollback_target()
        if target is None:
            raise EmbeddingIndexError(
                f"no previous complete collection to roll back to from {current.collection!r}"
            )
        if not self.is_loaded(target.collection):
            self.load(target.collection)
        live = self.promote(target.version)
        # Marked after the move, so the mark means it happened; a rollback never returns here.
        self._set_properties(current.collection, {P_ROLLED_BACK_AT: _now_iso()})
        return live

    # -- versions and pruning ----------------------------------------------------------------
    def _scan(self) -> list[VersionInfo]:
        """Every collection of this alias, by version, flagged live / rollback target."""
        names = self._rpc("list_collections", self.client.list_collections)
        aliases = self._rpc("list_aliases", self.client.list_aliases).get("aliases", [])
        live = (
            str(
                self._rpc("describe_alias", self.client.describe_alias, self.alias)[
                    "collection_name"
                ]
            )
            if self.alias in aliases
            else None
        )
        infos = []
        for name in names:
            version = self.version_of(name)
            if version is None:
                continue
            props = self._properties(name)
            infos.append(
                VersionInfo(
                    version=version,
                    collection=name,
                    dataset=props.get(P_DATASET, ""),
                    dim=int(props.get(P_DIM, 0) or 0),
                    index_type=props.get(P_INDEX_TYPE, ""),
                    state=props.get(P_STATE, "unknown"),
                    rows=int(props[P_ROWS]) if props.get(P_ROWS) else None,
                    created_at=props.get(P_CREATED_AT, ""),
                    built_at=props.get(P_BUILT_AT, ""),
                    promotion_seq=int(props.get(P_PROMOTION_SEQ, 0) or 0),
                    promoted_at=props.get(P_PROMOTED_AT, ""),
                    rolled_back_at=props.get(P_ROLLED_BACK_AT, ""),
                    loaded=self.is_loaded(name),
                    live=name == live,
                )
            )
        candidates = [
            i
            for i in infos
            if not i.live and i.state == READY and i.promotion_seq > 0 and not i.rolled_back_at
        ]
        target = max(candidates, key=lambda i: i.promotion_seq, default=None)
        infos = [
            VersionInfo(**{**asdict(i), "rollback_target": True}) if i is target else i
            for i in infos
        ]
        return sorted(infos, key=lambda i: i.version)

    def versions(self) -> list[VersionInfo]:
        """Every version's collection (oldest version first), for `friendrec index list`."""
        return self._scan()

    def drop(self, collection: str) -> None:
        """Drop a collection no alias points at (Milvus refuses, milvus-lite would not)."""
        aliases = self._rpc(
            "list_aliases", self.client.list_aliases, collection_name=collection
        ).get("aliases", [])
        if aliases:
            raise EmbeddingIndexError(
                f"refusing to drop {collection!r}: aliases {sorted(aliases)} point at it"
            )
        self._rpc("drop_collection", self.client.drop_collection, collection)
        self._meta.pop(collection, None)
        log.info("dropped %s", collection)

    def prune(self, include_incomplete: bool = False) -> list[str]:
        """Drop collections beyond ``keep_versions`` (see the module docstring); never the live
        one or the rollback target. Returns the dropped names."""
        infos = self._scan()
        ready = [i for i in infos if i.state == READY]
        kept = [i for i in ready if i.live or i.rollback_target]
        others = sorted(
            (i for i in ready if not (i.live or i.rollback_target)),
            key=lambda i: (not i.rolled_back_at, i.promotion_seq, i.version),
            reverse=True,
        )
        room = max(0, self.cfg.keep_versions - len(kept))
        doomed = others[room:]
        if include_incomplete:
            doomed += [i for i in infos if i.state != READY and not i.live]
        dropped = []
        for info in doomed:
            self.drop(info.collection)
            dropped.append(info.collection)
        return dropped

    # -- reading -----------------------------------------------------------------------------
    def _with_load_retry(self, collection: str, what: str, call: Callable[[], T]) -> T:
        """milvus-lite forgets which collections were loaded when it restarts (Milvus does not):
        a 'not loaded' answer loads the collection once and retries."""
        try:
            return call()
        except EmbeddingIndexError as exc:
            if not _is_not_loaded(exc.__cause__ or exc):
                raise
            log.warning("%s: %s was released; loading it again", what, collection)
            self.load(collection)
            return call()

    def search(
        self,
        collection: str,
        vectors: np.ndarray,
        limit: int,
        ef: int | None = None,
        timeout: float | None = None,
        filter: str = "",
    ) -> list[list[tuple[int, float]]]:
        """Top ``limit`` (user_id, inner product) per query row, best first. ``collection`` may
        be the alias. HNSW searches with ef = max(ef or search_ef, limit)."""
        queries = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if len(queries) == 0:
            return []
        index_type = (
            self._collection_meta(collection).index_type
            if self.version_of(collection) is not None
            else self.cfg.index_type
        )
        params: dict[str, Any] = {}
        if index_type == "HNSW":
            params["ef"] = max(int(ef or self.cfg.search_ef), int(limit))
        search_params = {"metric_type": METRIC, "params": params}

        def call() -> Any:
            return self._rpc(
                "search",
                self.client.search,
                collection,
                data=list(queries),
                limit=int(limit),
                anns_field=VECTOR_FIELD,
                output_fields=[ID_FIELD],
                search_params=search_params,
                filter=filter,
                timeout=self.timeout if timeout is None else timeout,
            )

        result = self._with_load_retry(collection, "search", call)
        return [[(int(hit[ID_FIELD]), float(hit["distance"])) for hit in hits] for hits in result]

    def get_vectors(
        self,
        collection: str,
        user_ids: Sequence[int] | np.ndarray,
        timeout: float | None = None,
    ) -> dict[int, np.ndarray]:
        """Stored vectors by user id; absent users are missing from the result."""
        ids = [int(u) for u in np.asarray(user_ids, dtype=np.int64).tolist()]
        out: dict[int, np.ndarray] = {}
        for start in range(0, len(ids), GET_BATCH):
            chunk = ids[start : start + GET_BATCH]

            def call(chunk: list[int] = chunk) -> Any:
                return self._rpc(
                    "get",
                    self.client.get,
                    collection,
                    ids=chunk,
                    output_fields=[ID_FIELD, VECTOR_FIELD],
                    timeout=self.timeout if timeout is None else timeout,
                )

            for row in self._with_load_retry(collection, "get", call):
                out[int(row[ID_FIELD])] = np.asarray(row[VECTOR_FIELD], dtype=np.float32)
        return out

    def updated_at(self, collection: str, user_ids: Sequence[int] | np.ndarray) -> dict[int, int]:
        """When each user's vector was last written (unix ms): how far a refresh has come."""
        ids = [int(u) for u in np.asarray(user_ids, dtype=np.int64).tolist()]

        def call() -> Any:
            return self._rpc(
                "get", self.client.get, collection, ids=ids, output_fields=[ID_FIELD, UPDATED_FIELD]
            )

        rows = self._with_load_retry(collection, "get", call) if ids else []
        return {int(row[ID_FIELD]): int(row[UPDATED_FIELD]) for row in rows}


def _message(exc: BaseException) -> str:
    if isinstance(exc, MilvusException):
        return str(exc.message)
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "details"):
        return f"{exc.code()}: {exc.details()}"
    return str(exc) or type(exc).__name__
