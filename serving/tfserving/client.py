"""The one TF Serving client every friendrec component uses.

Thin and explicit (like pymilvus): the stock ``tensorflow-serving-api`` stubs and nothing else, so
it talks to the official ``tensorflow_model_server`` and to ``friendrec tfserving`` alike. gRPC
errors propagate as ``grpc.RpcError``; callers map status codes to their own behaviour.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from types import TracebackType

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from training.features import InputSpec

log = logging.getLogger(__name__)

SIGNATURE = "serving_default"
OUTPUT = "embedding"  # the index vector
QUERY_OUTPUT = "query_embedding"  # the query vector (training/export.py)
# A batch of 1024 users with fanout 10 is ~16 MB of int64 ids; gRPC's default cap is 4 MB.
# The official server accepts up to INT32_MAX, so the client is the side that must be generous.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # A restarted server is picked up within ~2 s instead of gRPC's default backoff (up to 120 s).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    # Keep idle connections alive through load balancers/NATs without tripping the server's
    # default keepalive enforcement (no pings without calls in flight).
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
)
STATE_NAMES = {v: k for k, v in get_model_status_pb2.ModelVersionStatus.State.items()}
AVAILABLE = "AVAILABLE"


def signature_shapes(signature_def: meta_graph_pb2.SignatureDef) -> dict[str, list[int]]:
    """``SignatureDef.inputs`` -> {input name: dims} (-1 for an unknown dimension)."""
    return {
        name: [int(d.size) for d in info.tensor_shape.dim]
        for name, info in signature_def.inputs.items()
    }


class TFServingClient:
    """Predict, model metadata and model status of one model on a TF Serving endpoint.

    ``timeout_s`` is the default deadline of every call. Thread-safe: one instance (one channel)
    is meant to be shared by all threads of a process.
    """

    def __init__(
        self,
        address: str,
        model_name: str,
        timeout_s: float = 1.0,
        channel_credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.address = address
        self.model_name = model_name
        self.timeout_s = timeout_s
        if channel_credentials is None:
            self._channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.secure_channel(address, channel_credentials, CHANNEL_OPTIONS)
        self._predict = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)
        self._specs: dict[int, InputSpec] = {}
        self._lock = threading.Lock()

    def _model_spec(self, version: int | None, signature: str | None = None) -> model_pb2.ModelSpec:
        spec = model_pb2.ModelSpec(name=self.model_name)
        if signature is not None:
            spec.signature_name = signature
        if version is not None:
            spec.version.value = int(version)
        return spec

    def predict(
        self,
        inputs: Mapping[str, np.ndarray],
        version: int | None = None,
        timeout: float | None = None,
        output: str = OUTPUT,
    ) -> tuple[np.ndarray, int]:
        """One output (``embedding``: index vectors; ``query_embedding``: query vectors) for a
        batch of tower inputs, and the version that computed it (``version`` None: whatever the
        server serves as latest)."""
        request = predict_pb2.PredictRequest(model_spec=self._model_spec(version, SIGNATURE))
        request.output_filter.append(output)
        for name, value in inputs.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(np.asarray(value)))
        response = self._predict.Predict(request, timeout=timeout or self.timeout_s)
        if output not in response.outputs:
            raise KeyError(f"the response of {self.model_name} has no '{output}' output")
        embedding = tf.make_ndarray(response.outputs[output]).astype(np.float32, copy=False)
        return embedding, int(response.model_spec.version.value)

    def signature(
        self, version: int | None = None, timeout: float | None = None
    ) -> tuple[int, meta_graph_pb2.SignatureDef]:
        """The ``serving_default`` SignatureDef of a version (None: latest) via GetModelMetadata,
        and the version that answered."""
        request = get_model_metadata_pb2.GetModelMetadataRequest(
            model_spec=self._model_spec(version), metadata_field=["signature_def"]
        )
        response = self._predict.GetModelMetadata(request, timeout=timeout or self.timeout_s)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        if not response.metadata["signature_def"].Unpack(signatures):
            raise ValueError("GetModelMetadata: signature_def is not a SignatureDefMap")
        if SIGNATURE not in signatures.signature_def:
            raise ValueError(f"{self.model_name} has no '{SIGNATURE}' signature")
        return int(response.model_spec.version.value), signatures.signature_def[SIGNATURE]

    def input_spec(self, version: int | None = None, timeout: float | None = None) -> InputSpec:
        """The tensor shapes requests must have. Cached per version (versions are immutable);
        ``version`` None asks the server which version is latest (one cheap RPC) each time."""
        if version is not None and version in self._specs:
            return self._specs[version]
        served, signature = self.signature(version, timeout)
        with self._lock:
            if served not in self._specs:
                self._specs[served] = InputSpec.from_signature(signature_shapes(signature))
            return self._specs[served]

    def model_status(self, timeout: float | None = None) -> dict[int, str]:
        """{version: state name} (START, LOADING, AVAILABLE, UNLOADING, END) of every version
        the server knows of."""
        request = get_model_status_pb2.GetModelStatusRequest(model_spec=self._model_spec(None))
        response = self._models.GetModelStatus(request, timeout=timeout or self.timeout_s)
        return {
            int(s.version): STATE_NAMES.get(s.state, str(s.state))
            for s in response.model_version_status
        }

    def wait_until_available(
        self, version: int | None = None, timeout: float = 30.0, poll_s: float = 0.1
    ) -> int:
        """Block until ``version`` (None: any version) is AVAILABLE; returns that version (the
        newest available one for None). Connection errors and NOT_FOUND count as not yet."""
        deadline = time.monotonic() + timeout
        last: object = "no answer"
        while True:
            try:
                status = self.model_status(timeout=min(self.timeout_s, 1.0))
                available = sorted(v for v, s in status.items() if s == AVAILABLE)
                if version is None and available:
                    return available[-1]
                if version is not None and version in available:
                    return version
                last = status
            except grpc.RpcError as exc:
                if exc.code() not in (  # type: ignore[attr-defined]
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.NOT_FOUND,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    raise
                last = exc.code()  # type: ignore[attr-defined]
            if time.monotonic() > deadline:
                which = "any version" if version is None else f"version {version}"
                raise TimeoutError(
                    f"{self.model_name} at {self.address}: {which} not available after "
                    f"{timeout:.0f} s (last: {last})"
                )
            time.sleep(poll_s)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> TFServingClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
