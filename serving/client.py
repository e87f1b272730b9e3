"""A thin client of ``FriendRecommender`` (the CLI's `friendrec recommend`, benchmarks, tests):
address, TLS and bearer token come from the shared settings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from friendrec.config import Settings
from serving.auth import bearer_metadata
from serving.protos import recommender_pb2 as pb
from serving.protos import recommender_pb2_grpc as pb_grpc


def open_channel(settings: Settings, address: str | None = None) -> grpc.Channel:
    """A channel to the retrieval service: TLS when a CA file is configured."""
    cfg = settings.serving
    target = address or cfg.address
    if cfg.tls_ca_file is not None:
        credentials = grpc.ssl_channel_credentials(root_certificates=cfg.tls_ca_file.read_bytes())
        return grpc.secure_channel(target, credentials)
    return grpc.insecure_channel(target)


def recommend_request(
    user_id: int,
    k: int,
    exclude: Sequence[int] = (),
    profile: Mapping[str, float] | None = None,
    sparse_ids: Sequence[int] | None = None,
    friend_ids: Sequence[int] | None = None,
    source: str = "blend",
) -> pb.RecommendRequest:
    """A request; request features are attached when any of them is given. ``source``:
    ``embedding``, ``fof`` or ``blend``."""
    request = pb.RecommendRequest(
        user_id=user_id,
        k=k,
        exclude_user_ids=list(exclude),
        source=pb.Source.Value(source.upper()),
    )
    if profile is not None or sparse_ids is not None or friend_ids is not None:
        request.request_features.CopyFrom(
            pb.UserFeatures(
                profile=dict(profile or {}),
                sparse_ids=list(sparse_ids or ()),
                friend_ids=list(friend_ids or ()),
            )
        )
    return request


class RecommenderClient:
    def __init__(
        self, settings: Settings, address: str | None = None, timeout_s: float = 5.0
    ) -> None:
        self.channel = open_channel(settings, address)
        self.stub = pb_grpc.FriendRecommenderStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        token = settings.serving.auth_token
        self.metadata = bearer_metadata(token.get_secret_value() if token else None)
        self.timeout_s = timeout_s

    def recommend(self, request: pb.RecommendRequest) -> pb.RecommendResponse:
        return self.stub.Recommend(request, timeout=self.timeout_s, metadata=self.metadata)

    def recommend_batch(self, requests: Sequence[pb.RecommendRequest]) -> pb.RecommendBatchResponse:
        return self.stub.RecommendBatch(
            pb.RecommendBatchRequest(requests=list(requests)),
            timeout=self.timeout_s,
            metadata=self.metadata,
        )

    def health(self, service: str = "") -> str:
        response = self.health_stub.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=self.timeout_s
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RecommenderClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
