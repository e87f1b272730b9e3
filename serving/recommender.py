"""The retrieval path behind ``FriendRecommender``: Feast online features -> TF Serving Predict
(pinned to the live index's model version) -> Milvus search -> top k without excluded users.

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
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from friendrec.config import Settings
from friendrec.contract import Contract
from friendrec.friend_aggregates import RequestFeatures
from friendrec.paths import load_contract
from serving.batching import RequestCoalescer
from serving.index import EmbeddingIndex, IndexUnavailableError, LiveIndex
from serving.metrics import ServingMetrics
from serving.tfserving.client import TFServingClient
from training.features import InputSpec, QueryInputs, fetch_query_inputs

log = logging.getLogger(__name__)
T = TypeVar("T")

MILVUS_MAX_TOPK = 16_384  # Milvus rejects larger limits
MAX_REQUEST_FRIENDS = 5_000  # friends named in request features (each is an online read)


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


@dataclass
class Recommendation:
    user_id: int
    candidates: list[tuple[int, float]]
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
    return Query(int(user_id), int(k), frozenset(int(u) for u in exclude), features)


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
    ) -> None:
        """``contract``: the active dataset's (default: loaded from its prepared data)."""
        self.settings = settings
        self.contract = contract if contract is not None else load_contract(settings)
        self.store = store
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
            self.metrics.dependency_errors.labels("milvus").inc()
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"Milvus unavailable: {exc}") from None
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
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            future.cancel()
            self.metrics.dependency_errors.labels("feast").inc()
            raise ServiceError(
                grpc.StatusCode.DEADLINE_EXCEEDED, "feature store did not answer in time"
            ) from None
        except Exception as exc:
            self.metrics.dependency_errors.labels("feast").inc()
            if _feast_unavailable(exc):
                raise ServiceError(
                    grpc.StatusCode.UNAVAILABLE, f"feature store unavailable: {exc}"
                ) from None
            raise

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
        with self.metrics.stage("feast", timings):
            query_inputs = self._read_features(queries, spec, budget(cfg.feast_timeout_s))
        with self.metrics.stage("tfserving", timings):
            timeout = budget(cfg.tfserving_timeout_s)
            vectors, served = self._call_tfserving(
                lambda: self.tfserving.predict(query_inputs.inputs, version, timeout), version
            )
        if served != version:  # TF Serving must honour the pinned version: never mix
            raise ServiceError(
                grpc.StatusCode.INTERNAL,
                f"TF Serving answered with version {served}, not {version}",
            )
        excluded = [
            q.exclude | {q.user_id} | set(friends.tolist())
            for q, friends in zip(queries, query_inputs.friend_ids, strict=True)
        ]
        limit = min(
            MILVUS_MAX_TOPK, max(q.k + len(ex) for q, ex in zip(queries, excluded, strict=True))
        )
        with self.metrics.stage("milvus", timings):
            try:
                hits = self.index.search(
                    live.collection,
                    vectors,
                    limit=limit,
                    ef=max(self.settings.milvus.search_ef, limit),
                    timeout=budget(cfg.milvus_timeout_s),
                )
            except IndexUnavailableError as exc:
                self.metrics.dependency_errors.labels("milvus").inc()
                with self._live_lock:
                    self._live = None  # re-resolve the alias once Milvus is back
                raise ServiceError(
                    grpc.StatusCode.UNAVAILABLE, f"Milvus unavailable: {exc}"
                ) from None
        with self.metrics.stage("rank", timings):
            recommendations = []
            for i, query in enumerate(queries):
                candidates = [(u, s) for u, s in hits[i] if u not in excluded[i]][: query.k]
                recommendations.append(
                    Recommendation(
                        user_id=query.user_id,
                        candidates=candidates,
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
