"""The retrieval path behind ``FriendRecommender``: Feast online features -> TF Serving Predict
(pinned to the live index's model version) -> Milvus search -> top k without excluded users.

Excluded are the user, the request's ``exclude_user_ids`` and every existing friend: the full
friend set the stream updater keeps (``friendrec.friend_sets``), read beside the features, not only
the online store's capped friend sample. A query with few exclusions fetches k + excluded hits and
drops them; one with many (a user with thousands of friends) is searched with a Milvus filter.

Features are read and checked with the active dataset's contract (loaded once per process); a live
model version trained on another schema (its collection's schema hash differs) is refused with
FAILED_PRECONDITION naming both hashes.

Independent of gRPC's server side so that the servicer, the benchmark and tests share it; every
failure leaves as a ``ServiceError`` that carries the status code a client should see.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import grpc
import numpy as np

from friendrec.config import Settings
from friendrec.contract import Contract
from friendrec.fof import (
    BlendRanker,
    adamic_adar,
    blend,
    blend_candidates,
    expanded_friends,
)
from friendrec.friend_aggregates import RequestFeatures
from friendrec.friend_sets import FriendSets
from friendrec.paths import load_contract
from serving.batching import RequestCoalescer
from serving.index import ID_FIELD, EmbeddingIndex, IndexUnavailableError, LiveIndex
from serving.metrics import ServingMetrics
from serving.tfserving.client import QUERY_OUTPUT, TFServingClient
from training.features import InputSpec, QueryInputs, fetch_query_inputs

log = logging.getLogger(__name__)
T = TypeVar("T")

MILVUS_MAX_TOPK = 16_384  # Milvus rejects larger limits
Source = Literal["embedding", "fof", "blend"]
SOURCES: tuple[str, ...] = ("embedding", "fof", "blend")
MAX_REQUEST_FRIENDS = 5_000  # friends named in request features (each is an online read)


@dataclass(frozen=True)
class BlendReads:
    """The blend's reads in flight: which queries blend, their friends-of-friends candidates,
    and those candidates' stored vectors (None: the ranker reads none) and friend counts."""

    rows: list[int]
    users: frozenset[int]
    vectors: Future[dict[int, np.ndarray]] | None
    degrees: Future[dict[int, int]]


class ServiceError(Exception):
    """A failed request: the gRPC status code and a message safe to show the client."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Query:
    """One validated request."""

    user_id: int
    k: int
    exclude: frozenset[int] = frozenset()
    request_features: RequestFeatures | None = None
    source: Source = "blend"


@dataclass(frozen=True)
class Candidate:
    """One recommended user: the requested source's score, which source found it (``blend``:
    both did) and each source's own score where it found it."""

    user_id: int
    score: float
    source: str
    embedding_score: float | None = None
    fof_score: float | None = None


@dataclass
class Recommendation:
    user_id: int
    candidates: list[Candidate]
    model_version: int
    known_user: bool
    used_request_features: bool


@dataclass
class Answer:
    """Recommendations in query order, all from one model version, and where time went."""

    recommendations: list[Recommendation]
    model_version: int
    timings: dict[str, float] = field(default_factory=dict)


def validate(
    settings: Settings,
    user_id: int,
    k: int,
    exclude: Sequence[int],
    request_features: RequestFeatures | Callable[[], RequestFeatures] | None,
    where: str = "",
    *,
    contract: Contract,
    source: str | None = None,
) -> Query:
    """Request fields -> a Query, or INVALID_ARGUMENT naming the field and the limit (request
    features' profile names are checked against the dataset's ``contract``)."""
    cfg = settings.serving
    if user_id < 0:
        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"{where}user_id must be >= 0")
    if not 1 <= k <= cfg.max_k:
        raise ServiceError(
            grpc.StatusCode.INVALID_ARGUMENT, f"{where}k must be in [1, {cfg.max_k}], got {k}"
        )
    if len(exclude) > cfg.max_excludes:
        raise ServiceError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{where}at most {cfg.max_excludes} exclude_user_ids, got {len(exclude)}",
        )
    features = None
    if request_features is not None:
        try:
            features = request_features() if callable(request_features) else request_features
            features.check(contract)
        except ValueError as exc:
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT, f"{where}request_features: {exc}"
            ) from None
        if len(features.friend_ids) > MAX_REQUEST_FRIENDS:
            raise ServiceError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{where}request_features: at most {MAX_REQUEST_FRIENDS} friend_ids",
            )
    source = source or cfg.default_source
    if source not in SOURCES:
        raise ServiceError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{where}source must be one of {SOURCES}, got {source}",
        )
    excluded = frozenset(int(u) for u in exclude)
    return Query(int(user_id), int(k), excluded, features, source)  # type: ignore[arg-type]


def _feast_unavailable(exc: BaseException) -> bool:
    import redis

    return isinstance(exc, redis.exceptions.ConnectionError | sqlite3.OperationalError | OSError)


class Recommender:
    """Thread-safe: one instance serves every request of a process."""

    def __init__(
        self,
        settings: Settings,
        store: Any,
        tfserving: TFServingClient,
        index: EmbeddingIndex,
        metrics: ServingMetrics | None = None,
        contract: Contract | None = None,
        friend_sets: FriendSets | None = None,
    ) -> None:
        """``contract``: the active dataset's (default: loaded from its prepared data).
        ``friend_sets``: the full friend sets; None excludes only the online store's sample
        (``serving.exclude_all_friends`` off)."""
        self.settings = settings
        self.contract = contract if contract is not None else load_contract(settings)
        self.store = store
        self.friend_sets = friend_sets
        self.blend_ranker = BlendRanker.from_dict(settings.serving.blend_ranker)
        self.tfserving = tfserving
        self.index = index
        self.metrics = metrics or ServingMetrics()
        self._feast_pool = ThreadPoolExecutor(settings.serving.workers, "feast-read")
        self._live: LiveIndex | None = None
        self._live_until = 0.0
        self._live_lock = threading.Lock()
        self._specs: dict[int, InputSpec] = {}
        self._coalescer: RequestCoalescer[Query, tuple[Recommendation, dict[str, float]]] = (
            RequestCoalescer(
                self._answer_each,
                max_batch=settings.serving.coalesce_max_batch,
                max_in_flight=settings.serving.batches_in_flight,
            )
        )

    def close(self) -> None:
        self._feast_pool.shutdown(wait=False, cancel_futures=True)
        if self.friend_sets is not None:
            self.friend_sets.close()

    # -- stages ----------------------------------------------------------------------------------
    def live(self) -> LiveIndex:
        """The live alias's collection and model version (cached ``alias_refresh_s``), refused
        (FAILED_PRECONDITION) when its model was trained on another schema than the dataset's."""
        live = self._live_index()
        if live.schema_hash != self.contract.schema_hash:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the live model version {live.model_version} was trained on schema "
                f"{live.schema_hash or None!r}, but dataset {self.contract.dataset!r} has schema "
                f"{self.contract.schema_hash!r}: re-train, export and `friendrec index build` "
                "on this schema",
            )
        return live

    def _live_index(self) -> LiveIndex:
        now = time.monotonic()
        with self._live_lock:
            if self._live is not None and now < self._live_until:
                return self._live
        try:
            live = self.index.live()
        except IndexUnavailableError as exc:
            raise self._milvus_unavailable(exc) from None
        if live is None:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"no live index: alias {self.settings.milvus.alias!r} does not exist in the "
                f"Milvus at {self.settings.milvus.uri} (run `friendrec index build "
                "--model-version N` with the same settings: while `friendrec up` runs it "
                "writes there by itself, or pass `--config <workdir>/stack/settings.yaml`)",
            )
        with self._live_lock:
            self._live, self._live_until = live, now + self.settings.serving.alias_refresh_s
        return live

    def input_spec(self, version: int, timeout: float) -> InputSpec:
        spec = self._specs.get(version)
        if spec is None:
            spec = self._call_tfserving(
                lambda: self.tfserving.input_spec(version, timeout), version
            )
            self._specs[version] = spec
        return spec

    def _call_tfserving(self, call: Callable[[], T], version: int) -> T:
        try:
            return call()
        except grpc.RpcError as exc:
            self.metrics.dependency_errors.labels("tfserving").inc()
            code = exc.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise ServiceError(code, "TF Serving did not answer in time") from None
            if code == grpc.StatusCode.NOT_FOUND:
                raise ServiceError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"TF Serving does not serve model version {version} (yet)",
                ) from None
            if code == grpc.StatusCode.UNAVAILABLE:
                raise ServiceError(code, "TF Serving unavailable") from None
            log.error("TF Serving failed: %s %s", code, exc.details())
            raise ServiceError(grpc.StatusCode.INTERNAL, "TF Serving call failed") from None

    def _read_features(
        self, queries: Sequence[Query], spec: InputSpec, timeout: float
    ) -> QueryInputs:
        requested = {q.user_id: q.request_features for q in queries if q.request_features}
        future = self._feast_pool.submit(
            fetch_query_inputs,
            self.store,
            [q.user_id for q in queries],
            spec,
            requested,
            self.settings.features,
            self.settings.data.seed,
            contract=self.contract,
        )
        return self._store_result(future, timeout, "feast", "feature store")

    def _store_result(self, future: Future[T], timeout: float, label: str, what: str) -> T:
        """A store read's result: DEADLINE_EXCEEDED past ``timeout``, UNAVAILABLE when the store
        (sqlite or Redis) cannot be reached; counted per dependency ``label``."""
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            future.cancel()
            self.metrics.dependency_errors.labels(label).inc()
            raise ServiceError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"{what} did not answer in time"
            ) from None
        except Exception as exc:
            self.metrics.dependency_errors.labels(label).inc()
            if _feast_unavailable(exc):
                message = f"{what} unavailable: {exc}"
                raise ServiceError(grpc.StatusCode.UNAVAILABLE, message) from None
            raise

    def _read_friends(self, queries: Sequence[Query]) -> Future[dict[int, list[int]]] | None:
        """Start reading the queries' full friend sets (beside the feature read)."""
        if self.friend_sets is None:
            return None
        return self._feast_pool.submit(self.friend_sets.friends, [q.user_id for q in queries])

    def _friends_result(
        self, future: Future[dict[int, list[int]]] | None, timeout: float
    ) -> dict[int, list[int]]:
        if future is None:
            return {}
        return self._store_result(future, timeout, "friend_sets", "friend sets")

    def _search(
        self,
        live: LiveIndex,
        vectors: np.ndarray,
        excluded: Sequence[set[int]],
        timeout: float,
        wanted: Sequence[int],
    ) -> list[list[tuple[int, float]]]:
        """Top ``wanted[i]`` hits per query, excluded users removed: one search for the queries
        with few exclusions (wanted + excluded hits fetched), one filtered search per query with
        many. Queries wanting 0 are not searched."""
        cfg = self.settings
        many = [
            len(ex) > cfg.serving.filter_search_above or n + len(ex) > MILVUS_MAX_TOPK
            for n, ex in zip(wanted, excluded, strict=True)
        ]
        hits: list[list[tuple[int, float]]] = [[] for _ in wanted]
        few = [i for i, m in enumerate(many) if not m and wanted[i]]
        if few:
            limit = max(wanted[i] + len(excluded[i]) for i in few)
            found = self.index.search(
                live.collection,
                vectors[few],
                limit=limit,
                ef=max(cfg.milvus.search_ef, limit),
                timeout=timeout,
            )
            for i, row in zip(few, found, strict=True):
                hits[i] = row
        for i in (i for i, m in enumerate(many) if m and wanted[i]):
            ids = ",".join(str(u) for u in sorted(excluded[i]))
            hits[i] = self.index.search(
                live.collection,
                vectors[i : i + 1],
                limit=wanted[i],
                ef=max(cfg.milvus.search_ef, wanted[i]),
                timeout=timeout,
                filter=f"{ID_FIELD} not in [{ids}]",
            )[0]
        return [
            [(u, s) for u, s in row if u not in ex][:n]
            for n, row, ex in zip(wanted, hits, excluded, strict=True)
        ]

    def _friends_of_friends(
        self,
        queries: Sequence[Query],
        friends_of: Sequence[list[int]],
        excluded: Sequence[set[int]],
        timeout: float,
    ) -> list[list[tuple[int, float]]]:
        """Adamic-Adar candidates per query wanting them (``friendrec.fof``), from one read of
        the expanded friends' full friend lists."""
        cfg = self.settings.serving
        wants = [q.source != "embedding" for q in queries]
        if not any(wants):
            return [[] for _ in queries]
        if self.friend_sets is None:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "friends-of-friends needs the full friend sets (serving.exclude_all_friends)",
            )
        expanded = [
            expanded_friends(f, cfg.fof_max_friends) if want else []
            for f, want in zip(friends_of, wants, strict=True)
        ]
        needed = sorted({w for ws in expanded for w in ws})
        future = self._feast_pool.submit(self.friend_sets.friends, needed) if needed else None
        lists = self._friends_result(future, timeout)
        return [
            adamic_adar(lists, ws, ex, self._depth(q)) if want else []
            for q, ws, ex, want in zip(queries, expanded, excluded, wants, strict=True)
        ]

    def _depth(self, query: Query) -> int:
        """Candidates needed from each source: k, or the blend's depth (at least k)."""
        return (
            max(query.k, self.settings.serving.blend_depth) if query.source == "blend" else query.k
        )

    def _milvus_unavailable(self, exc: IndexUnavailableError) -> ServiceError:
        self.metrics.dependency_errors.labels("milvus").inc()
        with self._live_lock:
            self._live = None  # re-resolve the alias once Milvus is back
        return ServiceError(grpc.StatusCode.UNAVAILABLE, f"Milvus unavailable: {exc}")

    def _start_blend_reads(
        self, live: LiveIndex, queries: Sequence[Query], fof: Sequence[list[tuple[int, float]]],
        timeout: float,
    ) -> BlendReads | None:  # fmt: skip
        """The blend's reads of its friends-of-friends candidates, started before the search so
        that they overlap it: their stored vectors (one Milvus get: the inner product with the
        ones the search misses; not for a ranker that reads none) and their friend counts (one
        friend-set read)."""
        rows = [i for i, q in enumerate(queries) if q.source == "blend"]
        if not rows or self.friend_sets is None:
            return None
        users = sorted({u for i in rows for u, _ in fof[i]})
        vectors = None
        if self.blend_ranker.reads_vectors:
            get = self.index.get_vectors
            vectors = self._feast_pool.submit(get, live.collection, users, timeout)
        degrees = self._feast_pool.submit(self.friend_sets.degrees, users)
        return BlendReads(rows, frozenset(users), vectors, degrees)

    def _blend_inputs(
        self,
        reads: BlendReads | None,
        vectors: np.ndarray,
        hits: Sequence[list[tuple[int, float]]],
        fof: Sequence[list[tuple[int, float]]],
        timeout: float,
    ) -> tuple[list[dict[int, float]], dict[int, int]]:
        """What the blend reads besides its two lists: the model's inner product with each
        friend of friends the search missed, and every candidate's friend count (those of the
        embedding's candidates read now, the others' already on their way)."""
        products: list[dict[int, float]] = [{} for _ in hits]
        if reads is None or self.friend_sets is None:
            return products, {}
        more = sorted({u for i in reads.rows for u, _ in hits[i]} - reads.users)
        more_read = self._feast_pool.submit(self.friend_sets.degrees, more) if more else None
        try:
            stored = {} if reads.vectors is None else reads.vectors.result(timeout)
        except IndexUnavailableError as exc:
            raise self._milvus_unavailable(exc) from None
        except FutureTimeout:
            self.metrics.dependency_errors.labels("milvus").inc()
            raise ServiceError(
                grpc.StatusCode.DEADLINE_EXCEEDED, "Milvus did not return the candidates' vectors"
            ) from None
        for i in reads.rows:
            others = [u for u in blend_candidates(hits[i], fof[i]) if u in stored]
            if others:
                dots = np.stack([stored[u] for u in others]) @ vectors[i]
                products[i] = {u: float(p) for u, p in zip(others, dots, strict=True)}
        degrees = self._store_result(reads.degrees, timeout, "friend_sets", "friend counts")
        if more_read is not None:
            degrees |= self._store_result(more_read, timeout, "friend_sets", "friend counts")
        return products, degrees

    def _rank(
        self,
        query: Query,
        hits: list[tuple[int, float]],
        fof: list[tuple[int, float]],
        degree: int,
        products: dict[int, float],
        degrees: dict[int, int],
    ) -> list[Candidate]:
        if query.source == "embedding":
            return [Candidate(u, s, "embedding", embedding_score=s) for u, s in hits[: query.k]]
        if query.source == "fof":
            return [Candidate(u, s, "fof", fof_score=s) for u, s in fof[: query.k]]
        emb_score, fof_score = dict(hits), dict(fof)
        depth = self._depth(query)
        merged = blend(hits, fof, self.blend_ranker, depth, query.k, products, degrees, degree)
        return [
            Candidate(
                u,
                score,
                "blend" if source == "both" else source,
                embedding_score=emb_score.get(u),
                fof_score=fof_score.get(u),
            )
            for u, score, source in merged
        ]

    # -- the path --------------------------------------------------------------------------------
    def recommend_one(
        self, query: Query, deadline: float | None = None
    ) -> tuple[Recommendation, dict[str, float]]:
        """One request, answered together with whatever other requests are waiting (see
        ``serving/batching.py``); returns its recommendation and its batch's stage timings."""
        return self._coalescer.submit(query, deadline)

    def _answer_each(
        self, queries: Sequence[Query], deadline: float | None
    ) -> list[tuple[Recommendation, dict[str, float]]]:
        answer = self.recommend(queries, deadline)
        return [(rec, answer.timings) for rec in answer.recommendations]

    def recommend(self, queries: Sequence[Query], deadline: float | None = None) -> Answer:
        """Answer a batch of queries with one feature read, one Predict and one search."""
        cfg = self.settings.serving
        timings: dict[str, float] = {}

        def budget(stage_timeout: float) -> float:
            if deadline is None:
                return stage_timeout
            left = deadline - time.monotonic()
            if left <= 0:
                raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
            return min(stage_timeout, left)

        with self.metrics.stage("alias", timings):  # the live version and its input shapes
            live = self.live()
            version = live.model_version
            spec = self.input_spec(version, budget(cfg.tfserving_timeout_s))
        friends_read = self._read_friends(queries)
        with self.metrics.stage("feast", timings):
            query_inputs = self._read_features(queries, spec, budget(cfg.feast_timeout_s))
        with self.metrics.stage("friends", timings):
            all_friends = self._friends_result(friends_read, budget(cfg.feast_timeout_s))
        vectors, served = np.zeros((len(queries), 0), np.float32), version
        if any(q.source != "fof" for q in queries):  # friends-of-friends alone needs no vector
            with self.metrics.stage("tfserving", timings):
                timeout = budget(cfg.tfserving_timeout_s)
                vectors, served = self._call_tfserving(
                    lambda: self.tfserving.predict(
                        query_inputs.inputs, version, timeout, output=QUERY_OUTPUT
                    ),
                    version,
                )
        if served != version:  # TF Serving must honour the pinned version: never mix
            raise ServiceError(
                grpc.StatusCode.INTERNAL,
                f"TF Serving answered with version {served}, not {version}",
            )
        # Full friend sets where the stream updater keeps them, and the features' friends.
        friends_of = [
            sorted({*all_friends.get(q.user_id, ()), *sample.tolist()} - {q.user_id, -1})
            for q, sample in zip(queries, query_inputs.friend_ids, strict=True)
        ]
        excluded = [
            {q.user_id, *q.exclude, *friends}
            for q, friends in zip(queries, friends_of, strict=True)
        ]
        with self.metrics.stage("fof", timings):
            fof = self._friends_of_friends(
                queries, friends_of, excluded, budget(cfg.feast_timeout_s)
            )
        blend_reads = self._start_blend_reads(live, queries, fof, budget(cfg.milvus_timeout_s))
        with self.metrics.stage("milvus", timings):
            wanted = [0 if q.source == "fof" else self._depth(q) for q in queries]
            try:
                hits = self._search(live, vectors, excluded, budget(cfg.milvus_timeout_s), wanted)
            except IndexUnavailableError as exc:
                raise self._milvus_unavailable(exc) from None
        with self.metrics.stage("blend_inputs", timings):
            products, degrees = self._blend_inputs(
                blend_reads, vectors, hits, fof, budget(cfg.milvus_timeout_s)
            )
        with self.metrics.stage("rank", timings):
            recommendations = []
            for i, query in enumerate(queries):
                recommendations.append(
                    Recommendation(
                        user_id=query.user_id,
                        candidates=self._rank(
                            query, hits[i], fof[i], len(friends_of[i]), products[i], degrees
                        ),
                        model_version=version,
                        known_user=bool(query_inputs.known[i]),
                        used_request_features=bool(query_inputs.used_request_features[i]),
                    )
                )
                source = (
                    "feast"
                    if query_inputs.known[i]
                    else "request"
                    if query_inputs.used_request_features[i]
                    else "defaults"
                )
                self.metrics.queries.labels(source).inc()
        self.metrics.model_version.set(version)
        return Answer(recommendations, version, timings)
