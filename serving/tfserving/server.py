"""A TensorFlow Serving-protocol gRPC server over a TF Serving model base path.

The official ``tensorflow_model_server`` cannot be installed on these machines, so this server
speaks the same API (``tensorflow.serving.PredictionService`` and ``ModelService`` from
``tensorflow-serving-api``, plus gRPC health checking and reflection) over the same directory
layout ``<base>/<model_name>/<version>/``. Clients cannot tell the two apart, and production points
them at the official server (``infra/tfserving/``) without a change.

What it does like TF Serving: polls the model directory, applies a version policy (latest N, all,
specific), replays ``assets.extra/tf_serving_warmup_requests`` before a version takes traffic,
swaps versions in atomically, unloads versions the policy drops, answers with the same status
codes. What it leaves out: Classify/Regress/MultiInference, version labels, request batching.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2,
    prediction_service_pb2_grpc,
    status_pb2,
)

from friendrec.config import Settings
from serving.tfserving.client import MAX_MESSAGE_BYTES
from serving.tfserving.models import (
    SIGNATURE_DEF_FIELD,
    ModelConfig,
    ModelManager,
    ServableError,
    ServedVersion,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# gRPC services.


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    context.abort(code, message)
    raise AssertionError("unreachable")  # context.abort raises


class _Handlers:
    """Shared request plumbing: model lookup and error mapping (never a traceback out)."""

    def __init__(self, managers: Mapping[str, ModelManager]) -> None:
        self.managers = managers

    def resolve(self, model_spec: Any) -> ServedVersion:
        manager = self.managers.get(model_spec.name)
        choice = model_spec.WhichOneof("version_choice")
        if choice == "version_label":
            raise ServableError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Unrecognized servable version label: {model_spec.version_label} "
                "(this server defines no labels; ask for a version number)",
            )
        version = int(model_spec.version.value) if choice == "version" else None
        if manager is None:
            what = (
                f"Latest({model_spec.name})"
                if version is None
                else f"Specific({model_spec.name}, {version})"
            )
            raise ServableError(
                grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {what}"
            )
        return manager.get(version)

    def call(self, context: grpc.ServicerContext, method: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except ServableError as exc:
            code, message = exc.code, exc.message
        except Exception:
            log.exception("%s failed", method)
            code, message = grpc.StatusCode.INTERNAL, f"{method}: internal error (see server log)"
        _abort(context, code, message)


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Predict and GetModelMetadata; the other inference APIs are not served."""

    def __init__(self, handlers: _Handlers) -> None:
        self.handlers = handlers

    def Predict(self, request: predict_pb2.PredictRequest, context: grpc.ServicerContext) -> Any:
        return self.handlers.call(
            context, "Predict", lambda: self.handlers.resolve(request.model_spec).predict(request)
        )

    def GetModelMetadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest, context: Any
    ) -> Any:
        def run() -> get_model_metadata_pb2.GetModelMetadataResponse:
            fields = list(request.metadata_field)
            if not fields:
                raise ServableError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "GetModelMetadataRequest must specify at least one metadata_field",
                )
            for name in fields:
                if name != SIGNATURE_DEF_FIELD:
                    raise ServableError(
                        grpc.StatusCode.INVALID_ARGUMENT, f"Metadata field {name} is not supported"
                    )
            served = self.handlers.resolve(request.model_spec)
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = served.model_name
            response.model_spec.version.value = served.version
            response.metadata[SIGNATURE_DEF_FIELD].Pack(served.signature_def_map)
            return response

        return self.handlers.call(context, "GetModelMetadata", run)

    def _unimplemented(self, method: str, context: grpc.ServicerContext) -> NoReturn:
        _abort(
            context,
            grpc.StatusCode.UNIMPLEMENTED,
            f"{method} is not supported by friendrec tfserving (Predict only)",
        )

    def Classify(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._unimplemented("Classify", context)

    def Regress(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._unimplemented("Regress", context)

    def MultiInference(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._unimplemented("MultiInference", context)


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """GetModelStatus per version; config reloads are not supported (edit files + restart)."""

    def __init__(self, handlers: _Handlers) -> None:
        self.handlers = handlers

    def GetModelStatus(
        self, request: get_model_status_pb2.GetModelStatusRequest, context: Any
    ) -> Any:
        def run() -> get_model_status_pb2.GetModelStatusResponse:
            spec = request.model_spec
            manager = self.handlers.managers.get(spec.name)
            statuses = manager.status() if manager is not None else {}
            if not statuses:
                raise ServableError(
                    grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {spec.name}"
                )
            if spec.WhichOneof("version_choice") == "version_label":
                raise ServableError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Unrecognized servable version label: {spec.version_label}",
                )
            if spec.HasField("version"):
                version = int(spec.version.value)
                if version not in statuses:
                    raise ServableError(
                        grpc.StatusCode.NOT_FOUND,
                        f"Could not find version {version} of model {spec.name}",
                    )
                statuses = {version: statuses[version]}
            response = get_model_status_pb2.GetModelStatusResponse()
            for version, status in sorted(statuses.items()):
                response.model_version_status.add(
                    version=version,
                    state=status.state,
                    status=status_pb2.StatusProto(
                        error_code=status.error_code, error_message=status.error_message
                    ),
                )
            return response

        return self.handlers.call(context, "GetModelStatus", run)

    def HandleReloadConfigRequest(
        self, request: model_service_pb2.ReloadConfigRequest, context: grpc.ServicerContext
    ) -> Any:
        _abort(
            context,
            grpc.StatusCode.UNIMPLEMENTED,
            "HandleReloadConfigRequest is not supported by friendrec tfserving; "
            "change the settings or --model-config-file and restart",
        )


# ---------------------------------------------------------------------------------------------
# The server handle.

HEALTH_SERVICES = (
    "",
    prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"].full_name,
    model_service_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name,
)


class TFServingServer:
    """The gRPC server, its model managers and its health state; ``stop()`` ends all of it."""

    def __init__(
        self,
        models: Sequence[ModelConfig],
        host: str = "127.0.0.1",
        port: int = 8500,
        workers: int = 8,
        poll_seconds: float = 2.0,
    ) -> None:
        self.host = host
        self.requested_port = port
        self.port = port
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self.managers = {
            m.name: ModelManager(m, poll_seconds, on_change=self._update_health) for m in models
        }
        handlers = _Handlers(self.managers)
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tfserving"),
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                # Fail loudly if the port is taken instead of sharing it with another process.
                ("grpc.so_reuseport", 0),
            ],
        )
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            PredictionServicer(handlers), self._server
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(
            ModelServicer(handlers), self._server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (*HEALTH_SERVICES[1:], health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        self._stopped = threading.Event()

    def _target(self, port: int) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{port}"

    @property
    def address(self) -> str:
        """host:port actually bound (after ``start()``)."""
        return self._target(self.port)

    def start(self) -> TFServingServer:
        """Bind, start answering (health NOT_SERVING until the first poll has loaded a version),
        then poll."""
        self._update_health()
        target = self._target(self.requested_port)
        try:
            bound = self._server.add_insecure_port(target)
        except RuntimeError as exc:
            raise RuntimeError(f"cannot bind {target}: {exc}") from exc
        if not bound:
            raise RuntimeError(f"cannot bind {target}")
        self.port = bound
        self._server.start()
        log.info("TF Serving API on %s", self.address)
        for manager in self.managers.values():
            cfg = manager.config
            policy = {
                "latest": f"latest {cfg.num_versions}",
                "all": "all",
                "specific": f"specific {list(cfg.versions)}",
            }[cfg.version_policy]
            log.info("model %s: versions under %s, policy %s", cfg.name, cfg.base_path, policy)
        for manager in self.managers.values():
            manager.start()
        return self

    def poll_now(self) -> None:
        """One synchronous reconciliation of every model (tests, start-up scripts)."""
        for manager in self.managers.values():
            manager.poll_once()

    def _update_health(self) -> None:
        # Like TF Serving's start-up: ready once the versions found at start have been loaded
        # (or have failed), and only while at least one version is available.
        managers = self.managers.values()
        serving = all(m.initial_load_done.is_set() for m in managers) and any(
            m.served for m in managers
        )
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in HEALTH_SERVICES:
            self.health.set(service, status)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until ``stop()`` (True) or ``timeout`` (False)."""
        return self._stopped.wait(timeout)

    def stop(self, grace: float = 5.0) -> None:
        """Graceful: NOT_SERVING, finish in-flight RPCs (up to ``grace`` s), unload everything."""
        if self._stopped.is_set():
            return
        self.health.enter_graceful_shutdown()
        self._server.stop(grace).wait()
        for manager in self.managers.values():
            manager.stop()
        self._stopped.set()
        log.info("TF Serving API on %s stopped", self.address)

    def __enter__(self) -> TFServingServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(
    settings: Settings,
    port: int | None = None,
    host: str | None = None,
    block: bool = True,
    models: Sequence[ModelConfig] | None = None,
) -> TFServingServer:
    """Start the server from the settings (``models`` None: the settings' one model under the
    model base path). ``port`` 0 binds a free port (see ``.port``). ``block`` waits until
    ``stop()`` is called from another thread; otherwise returns the started handle."""
    tfs = settings.tfserving
    server = TFServingServer(
        models or [ModelConfig.from_settings(settings)],
        host=host or tfs.host,
        port=tfs.port if port is None else port,
        workers=tfs.workers,
        poll_seconds=tfs.poll_seconds,
    )
    server.start()
    if block:
        server.wait()
    return server
