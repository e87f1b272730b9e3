"""``friendrec serve``: the ``FriendRecommender`` gRPC service with health checking, reflection,
optional TLS and bearer-token authentication, Prometheus metrics and one JSON access-log line per
request.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from friendrec.config import Settings
from friendrec.friend_aggregates import RequestFeatures
from friendrec.friend_sets import FriendSets
from serving.auth import BearerTokenInterceptor
from serving.metrics import ServingMetrics
from serving.protos import recommender_pb2 as pb
from serving.protos import recommender_pb2_grpc as pb_grpc
from serving.recommender import Answer, Candidate, Query, Recommender, ServiceError, validate

log = logging.getLogger(__name__)
access_log = logging.getLogger("friendrec.serving.access")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FriendRecommender"].full_name
HEALTH_PROBE_SECONDS = 2.0


def _request_features(request: pb.RecommendRequest) -> Callable[[], RequestFeatures] | None:
    if not request.HasField("request_features"):
        return None
    given = request.request_features
    return lambda: RequestFeatures(
        profile=dict(given.profile),
        sparse_ids=list(given.sparse_ids),
        friend_ids=list(given.friend_ids),
    )


def _source(request: pb.RecommendRequest) -> str | None:
    """The requested source's name (None: the server's default); an unknown enum value (a newer
    client) is passed on, and refused by name in ``validate``."""
    if request.source == pb.SOURCE_UNSPECIFIED:
        return None
    if request.source in pb.Source.values():
        return pb.Source.Name(request.source).lower()
    return str(request.source)


def _candidate(c: Candidate) -> pb.Candidate:
    return pb.Candidate(
        user_id=c.user_id,
        score=c.score,
        source=pb.Source.Value(c.source.upper()),
        embedding_score=c.embedding_score,
        fof_score=c.fof_score,
    )


def _response(answer: Answer, i: int) -> pb.RecommendResponse:
    rec = answer.recommendations[i]
    return pb.RecommendResponse(
        user_id=rec.user_id,
        candidates=[_candidate(c) for c in rec.candidates],
        model_version=rec.model_version,
        known_user=rec.known_user,
        used_request_features=rec.used_request_features,
    )


class FriendRecommenderServicer(pb_grpc.FriendRecommenderServicer):
    """gRPC adapter over ``Recommender``: status codes, deadlines, metrics, access logs."""

    def __init__(self, recommender: Recommender) -> None:
        self.recommender = recommender
        self.settings = recommender.settings
        self.metrics = recommender.metrics

    def Recommend(self, request: pb.RecommendRequest, context: grpc.ServicerContext):
        def run() -> tuple[pb.RecommendResponse, dict[str, Any]]:
            query = validate(
                self.settings,
                request.user_id,
                request.k,
                request.exclude_user_ids,
                _request_features(request),
                contract=self.recommender.contract,
                source=_source(request),
            )
            rec, timings = self.recommender.recommend_one(query, _deadline(context))
            answer = Answer([rec], rec.model_version, timings)
            fields = {"user_id": query.user_id, "k": query.k, "known": rec.known_user}
            return _response(answer, 0), {**fields, **_answer_fields(answer)}

        return self._handle("Recommend", context, run)

    def RecommendBatch(self, request: pb.RecommendBatchRequest, context: grpc.ServicerContext):
        def run() -> tuple[pb.RecommendBatchResponse, dict[str, Any]]:
            n = len(request.requests)
            if not 1 <= n <= self.settings.serving.max_batch:
                raise ServiceError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"a batch needs 1 to {self.settings.serving.max_batch} requests, got {n}",
                )
            queries: list[Query] = [
                validate(
                    self.settings,
                    r.user_id,
                    r.k,
                    r.exclude_user_ids,
                    _request_features(r),
                    where=f"requests[{i}]: ",
                    contract=self.recommender.contract,
                    source=_source(r),
                )
                for i, r in enumerate(request.requests)
            ]
            answer = self.recommender.recommend(queries, _deadline(context))
            response = pb.RecommendBatchResponse(
                responses=[_response(answer, i) for i in range(n)],
                model_version=answer.model_version,
            )
            return response, {"batch": n, **_answer_fields(answer)}

        return self._handle("RecommendBatch", context, run)

    def _handle(
        self, method: str, context: grpc.ServicerContext, run: Callable[[], tuple[Any, dict]]
    ):
        start = time.perf_counter()
        metadata = dict(context.invocation_metadata() or ())
        request_id = str(metadata.get("x-request-id") or uuid.uuid4().hex[:16])
        code, message, fields = grpc.StatusCode.OK, "", {}
        try:
            response, fields = run()
            return response
        except ServiceError as exc:
            code, message = exc.code, exc.message
        except Exception:
            log.exception("request %s failed", request_id)
            code, message = grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})"
        finally:
            elapsed = time.perf_counter() - start
            # Like HTTP's Server-Timing: clients (and the benchmark) see where the time went.
            stages = fields.get("stage_ms", {})
            timing = ",".join(
                f"{k};dur={v}" for k, v in {**stages, "total": round(elapsed * 1e3, 3)}.items()
            )
            context.set_trailing_metadata((("x-request-id", request_id), ("server-timing", timing)))
            self.metrics.requests.labels(method, code.name).inc()
            self.metrics.latency.labels(method).observe(elapsed)
            access_log.info(
                "%s %s %.2f ms",
                method,
                code.name,
                elapsed * 1e3,
                extra={
                    "fields": {
                        "request_id": request_id,
                        "method": method,
                        "code": code.name,
                        "ms": round(elapsed * 1e3, 3),
                        **({"error": message} if message else {}),
                        **fields,
                    }
                },
            )
        context.abort(code, message)


def _deadline(context: grpc.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _answer_fields(answer: Answer) -> dict[str, Any]:
    return {
        "model_version": answer.model_version,
        "stage_ms": {k: round(v * 1e3, 3) for k, v in answer.timings.items()},
    }


@dataclass
class RunningService:
    """A started service; ``stop()`` shuts down gRPC, the health probe and /metrics."""

    server: grpc.Server
    port: int
    recommender: Recommender
    health: health.HealthServicer
    metrics_port: int | None
    _stop_probe: threading.Event
    _metrics_server: Any = None
    _owns_recommender: bool = True

    def stop(self, grace: float | None = 2.0) -> None:
        self._stop_probe.set()
        self.server.stop(grace).wait()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        if self._owns_recommender:
            self.recommender.close()

    def wait(self) -> None:
        self.server.wait_for_termination()


def _probe_health(service: RunningService, every: float) -> None:
    """Readiness: SERVING only while the live index exists and TF Serving has its version."""
    recommender = service.recommender
    while not service._stop_probe.wait(every):
        status = health_pb2.HealthCheckResponse.NOT_SERVING
        try:
            live = recommender.live()
            if recommender.tfserving.model_status().get(live.model_version) == "AVAILABLE":
                status = health_pb2.HealthCheckResponse.SERVING
        except (ServiceError, grpc.RpcError) as exc:
            log.debug("health probe: %s", exc)
        except Exception:
            log.exception("health probe failed")
        for name in ("", SERVICE_NAME):
            service.health.set(name, status)


def start_service(
    settings: Settings,
    recommender: Recommender | None = None,
    port: int | None = None,
    probe_seconds: float = HEALTH_PROBE_SECONDS,
) -> RunningService:
    """Build the dependencies from the settings (unless given), bind and start serving."""
    cfg = settings.serving
    owns_recommender = recommender is None
    recommender = recommender or build_recommender(settings)
    interceptors = []
    if cfg.auth_token is not None:
        interceptors.append(BearerTokenInterceptor(cfg.auth_token.get_secret_value()))
    server = grpc.server(
        futures.ThreadPoolExecutor(cfg.workers, "friendrec-rpc"), interceptors=interceptors
    )
    pb_grpc.add_FriendRecommenderServicer_to_server(FriendRecommenderServicer(recommender), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{cfg.host}:{cfg.port if port is None else port}"
    if cfg.tls_cert_file is not None and cfg.tls_key_file is not None:
        credentials = grpc.ssl_server_credentials(
            [(cfg.tls_key_file.read_bytes(), cfg.tls_cert_file.read_bytes())]
        )
        bound = server.add_secure_port(address, credentials)
    else:
        bound = server.add_insecure_port(address)
    if not bound:
        raise RuntimeError(f"could not bind {address}")
    server.start()
    metrics_server = None
    if cfg.metrics_port:
        metrics_server, _ = recommender.metrics.serve_http(cfg.metrics_port, cfg.host)
    service = RunningService(
        server,
        bound,
        recommender,
        health_servicer,
        cfg.metrics_port or None,
        threading.Event(),
        metrics_server,
        _owns_recommender=owns_recommender,
    )
    # First verdict now (not after one probe period), then keep probing.
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    threading.Thread(
        target=_probe_health, args=(service, probe_seconds), name="health-probe", daemon=True
    ).start()
    log.info(
        "FriendRecommender on %s:%d (tls=%s, auth=%s, metrics=%s)",
        cfg.host,
        bound,
        cfg.tls_cert_file is not None,
        cfg.auth_token is not None,
        cfg.metrics_port or "off",
    )
    return service


def build_recommender(settings: Settings) -> Recommender:
    """The production wiring: Feast from the settings, TF Serving at tfserving.address, Milvus,
    and the stream updater's full friend sets (seeded from the training graph when new)."""
    from friendrec.feast_store import open_store
    from serving.index import EmbeddingIndex, IndexUnavailableError
    from serving.tfserving.client import TFServingClient

    index = EmbeddingIndex.connect(settings, timeout=settings.serving.milvus_timeout_s)
    # milvus-lite forgets loaded collections on restart: load now, not in the first request.
    try:
        index.load_live()
    except IndexUnavailableError as exc:  # start anyway: NOT_SERVING until Milvus is back
        log.warning("could not load the live collection: %s", exc)
    return Recommender(
        settings,
        open_store(settings),
        TFServingClient(
            settings.tfserving.address,
            settings.serving.model_name,
            timeout_s=settings.serving.tfserving_timeout_s,
        ),
        index,
        ServingMetrics(),
        friend_sets=_friend_sets(settings) if settings.serving.exclude_all_friends else None,
    )


def _friend_sets(settings: Settings) -> FriendSets:
    """The stream updater's friend sets, seeded from the training graph when new and the prepared
    data is here (a service on its own host may lack it: the updater seeds them then)."""
    from friendrec.errors import NotPreparedError
    from friendrec.friend_sets import open_state

    try:
        return open_state(settings)
    except (NotPreparedError, FileNotFoundError) as exc:
        log.warning("friend sets not seeded (%s): the stream updater seeds them; until then "
                    "only the online store's friend samples are excluded", exc)  # fmt: skip
        return open_state(settings, seed_if_empty=False)
