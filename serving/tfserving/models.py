"""The model side of our TF Serving-protocol server: the version policy, loading a SavedModel
version, replaying its warmup requests, and the manager that polls the model base path and swaps
versions in and out (what ``tensorflow_model_server``'s ServerCore does)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    predict_pb2,
    prediction_log_pb2,
)
from tensorflow_serving.config import model_server_config_pb2

from friendrec.config import Settings

log = logging.getLogger(__name__)

DEFAULT_SIGNATURE = "serving_default"
WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"
MAX_WARMUP_RECORDS = 1000  # TF Serving refuses more (saved_model_warmup_util)
SIGNATURE_DEF_FIELD = "signature_def"

State = get_model_status_pb2.ModelVersionStatus.State
# TensorFlow's error codes are gRPC's canonical codes.
GRPC_CODES = {code.value[0]: code for code in grpc.StatusCode}

VersionPolicy = Literal["latest", "all", "specific"]


class ServableError(Exception):
    """A request or load failure with the status code TF Serving answers with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _short(text: str, limit: int = 500) -> str:
    """One line of an error for a client or a status: no stack traces, bounded length."""
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _dtype_name(enum: int) -> str:
    try:
        return types_pb2.DataType.Name(enum)
    except ValueError:
        return f"DataType({enum})"


def _shape_str(shape: tf.TensorShape | Sequence[int]) -> str:
    dims = shape.as_list() if isinstance(shape, tf.TensorShape) else list(shape)
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


# ---------------------------------------------------------------------------------------------
# Model configuration: from the settings or from a ModelServerConfig file (models.config).


@dataclass(frozen=True)
class ModelConfig:
    """One served model: where its versions live and which of them to serve."""

    name: str
    base_path: Path  # the directory holding the integer version directories
    version_policy: VersionPolicy = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def wanted(self, available: Iterable[int]) -> set[int]:
        """The versions the policy serves out of those present (and loadable) on disk."""
        present = sorted(set(available))
        if self.version_policy == "all":
            return set(present)
        if self.version_policy == "specific":
            return set(present) & set(self.versions)
        return set(present[-self.num_versions :]) if present else set()

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelConfig:
        tfs = settings.tfserving
        return cls(
            name=settings.serving.model_name,
            base_path=settings.model_base_path / settings.serving.model_name,
            version_policy=tfs.version_policy,
            num_versions=tfs.num_versions,
            versions=tuple(tfs.versions),
        )


def read_model_config_file(path: Path, models_root: Path | None = None) -> list[ModelConfig]:
    """Models of a TF Serving ``--model_config_file`` (ModelServerConfig, text format).

    ``models_root`` not None: model ``X`` is served from ``models_root / X`` instead of the file's
    ``base_path`` (a container path such as /models/X that the docker run mounts from there).
    """
    config = model_server_config_pb2.ModelServerConfig()
    text_format.Parse(Path(path).read_text(), config)
    if config.WhichOneof("config") != "model_config_list":
        raise ValueError(f"{path}: only model_config_list is supported")
    models = []
    for model in config.model_config_list.config:
        if model.model_platform not in ("", "tensorflow"):
            raise ValueError(f"{path}: model {model.name}: platform {model.model_platform!r}")
        policy = model.model_version_policy
        choice = policy.WhichOneof("policy_choice") or "latest"
        base = models_root / model.name if models_root is not None else Path(model.base_path)
        if not model.name or (models_root is None and not model.base_path):
            raise ValueError(f"{path}: every model needs a name and a base_path")
        models.append(
            ModelConfig(
                name=model.name,
                base_path=base,
                version_policy=choice,  # type: ignore[arg-type]
                num_versions=max(1, policy.latest.num_versions),  # TF Serving: 0 means 1
                versions=tuple(int(v) for v in policy.specific.versions),
            )
        )
    if len({m.name for m in models}) != len(models):
        raise ValueError(f"{path}: model names must be unique")
    if not models:
        raise ValueError(f"{path}: no models configured")
    return models


# ---------------------------------------------------------------------------------------------
# One loaded version and the Predict semantics.


@dataclass(frozen=True)
class Signature:
    """A callable serving signature and the tensor specs requests are validated against."""

    name: str
    fn: Any  # the SavedModel's ConcreteFunction (keyword arguments by input name)
    inputs: dict[str, tf.TensorSpec]
    outputs: dict[str, tf.TensorSpec]


def _signature_defs(version_dir: Path) -> meta_graph_pb2.MetaGraphDef:
    """The "serve" MetaGraphDef of saved_model.pb(txt): its SignatureDefs are what TF Serving's
    GetModelMetadata returns, byte for byte."""
    saved = saved_model_pb2.SavedModel()
    pb = version_dir / "saved_model.pb"
    if pb.exists():
        saved.ParseFromString(pb.read_bytes())
    else:
        text_format.Parse((version_dir / "saved_model.pbtxt").read_text(), saved)
    for graph in saved.meta_graphs:
        if "serve" in graph.meta_info_def.tags:
            return graph
    if not saved.meta_graphs:
        raise ValueError("saved model has no MetaGraphDef")
    return saved.meta_graphs[0]


class ServedVersion:
    """One SavedModel version loaded with ``tf.saved_model.load``, ready to Predict."""

    def __init__(self, model_name: str, version: int, path: Path) -> None:
        self.model_name = model_name
        self.version = version
        self.path = path
        self._loaded = tf.saved_model.load(str(path))  # keeps variables alive
        self.signatures: dict[str, Signature] = {}
        for name, fn in self._loaded.signatures.items():
            _, kwargs = fn.structured_input_signature
            self.signatures[name] = Signature(
                name=name,
                fn=fn,
                inputs=dict(kwargs),
                outputs=dict(fn.structured_outputs),
            )
        graph = _signature_defs(path)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for key, signature_def in graph.signature_def.items():
            signature_map.signature_def[key].CopyFrom(signature_def)
        self.signature_def_map = signature_map

    def predict(self, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        """Run one PredictRequest (model name and version already resolved)."""
        signature_name = request.model_spec.signature_name or DEFAULT_SIGNATURE
        signature = self.signatures.get(signature_name)
        if signature is None:
            raise ServableError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f'Serving signature key "{signature_name}" not found.',
            )
        arrays = self._inputs(signature, request.inputs)
        outputs = self._outputs(signature, request.output_filter)
        try:
            result = signature.fn(**{k: tf.convert_to_tensor(v) for k, v in arrays.items()})
        except tf.errors.OpError as exc:
            code = GRPC_CODES.get(exc.error_code, grpc.StatusCode.INTERNAL)
            raise ServableError(code, _short(exc.message)) from exc
        response = predict_pb2.PredictResponse()
        response.model_spec.name = self.model_name
        response.model_spec.version.value = self.version
        response.model_spec.signature_name = signature_name
        for name in outputs:
            response.outputs[name].CopyFrom(tf.make_tensor_proto(result[name].numpy()))
        return response

    def _inputs(self, signature: Signature, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        sent, expected = set(inputs), set(signature.inputs)
        if sent != expected:
            extra = ",".join(sorted(sent - expected))
            missing = ",".join(sorted(expected - sent))
            raise ServableError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Request inputs do not match signature '{signature.name}' of "
                f"{self.model_name} version {self.version}. "
                f"Sent extra: {{{extra}}}. Missing but required: {{{missing}}}.",
            )
        arrays: dict[str, np.ndarray] = {}
        batch: dict[int, str] = {}
        for name, proto in inputs.items():
            spec = signature.inputs[name]
            want = spec.dtype.as_datatype_enum
            if proto.dtype != want:
                raise ServableError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"input '{name}': expects {_dtype_name(want)} but {_dtype_name(proto.dtype)} "
                    "was sent",
                )
            try:
                array = tf.make_ndarray(proto)
            except Exception as exc:
                raise ServableError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"input '{name}': malformed TensorProto: {_short(str(exc), 200)}",
                ) from exc
            if not spec.shape.is_compatible_with(array.shape):
                raise ServableError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"input '{name}': shape {_shape_str(array.shape)} is not compatible with "
                    f"the signature's {_shape_str(spec.shape)}",
                )
            if spec.shape.rank and spec.shape[0] is None:
                batch.setdefault(int(array.shape[0]), name)
            arrays[name] = array
        if len(batch) > 1:
            sizes = ", ".join(f"{n}: {size}" for size, n in sorted(batch.items()))
            raise ServableError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"inputs disagree on the batch size (first dimension): {sizes}",
            )
        return arrays

    @staticmethod
    def _outputs(signature: Signature, output_filter: Sequence[str]) -> list[str]:
        names = list(dict.fromkeys(output_filter)) or list(signature.outputs)
        for name in names:
            if name not in signature.outputs:
                raise ServableError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"output tensor alias not found in signature: {name}. Outputs expected to "
                    f"be in the set {{{','.join(sorted(signature.outputs))}}}.",
                )
        return names

    def warmup(self) -> int:
        """Replay ``assets.extra/tf_serving_warmup_requests`` (PredictionLog records) so the
        first real request finds traced functions and touched weights. Any failure fails the
        load, as in TF Serving."""
        path = self.path / WARMUP_FILE
        if not path.exists():
            return 0
        count = 0
        for record in tf.data.TFRecordDataset(str(path)):
            count += 1
            if count > MAX_WARMUP_RECORDS:
                raise ValueError(f"more than {MAX_WARMUP_RECORDS} warmup records in {path}")
            entry = prediction_log_pb2.PredictionLog.FromString(record.numpy())
            kind = entry.WhichOneof("log_type")
            if kind != "predict_log":
                raise ValueError(f"warmup record {count}: {kind} is not supported (predict only)")
            try:
                self.predict(entry.predict_log.request)
            except ServableError as exc:
                raise ServableError(exc.code, f"warmup record {count}: {exc.message}") from exc
        return count


# ---------------------------------------------------------------------------------------------
# The model manager: polling, loading, warmup, atomic swap, unloading.


@dataclass
class VersionStatus:
    state: int
    error_code: int = 0  # tensorflow.error.Code == gRPC status code value
    error_message: str = ""


@dataclass
class _Failure:
    fingerprint: tuple[int, ...]  # retried only when the version's files change


def _fingerprint(path: Path) -> tuple[int, ...]:
    stats = []
    for item in (path, path / "saved_model.pb", path / "variables"):
        try:
            stat = item.stat()
            stats += [stat.st_mtime_ns, stat.st_size]
        except OSError:
            stats += [0, 0]
    return tuple(stats)


class ModelManager:
    """The served versions of one model, kept in line with its directory by a poll thread.

    Requests read ``_served`` (a dict that is replaced, never mutated, under ``_lock``), so a load
    or an unload never blocks them; an in-flight request keeps its version alive until it ends.
    A version that fails to load is reported (END + error) and does not count for the policy,
    so a broken export never evicts a good version.
    """

    def __init__(
        self,
        config: ModelConfig,
        poll_seconds: float = 2.0,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.poll_seconds = poll_seconds
        self.on_change = on_change
        self._served: dict[int, ServedVersion] = {}
        self._status: dict[int, VersionStatus] = {}
        self._failed: dict[int, _Failure] = {}
        self._lock = threading.Lock()  # guards _served (replaced) and _status
        self._poll_lock = threading.Lock()  # one reconciliation at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned_missing = False
        self.initial_load_done = threading.Event()  # the first reconciliation has finished

    @property
    def name(self) -> str:
        return self.config.name

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"tfserving-poll-{self.name}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        with self._lock:
            versions = sorted(self._served)
            self._served = {}
            for version in versions:
                self._status[version] = VersionStatus(State.END)
        if versions:
            log.info("%s: unloaded versions %s (shutdown)", self.name, versions)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:
                log.exception("%s: polling %s failed", self.name, self.config.base_path)
            if not self.initial_load_done.is_set():
                self.initial_load_done.set()
                self._changed()
            self._stop.wait(self.poll_seconds)

    def scan(self) -> dict[int, Path] | None:
        """Integer version directories (None: the model directory is missing). Only all-digit
        names count, so the dot-prefixed staging directories of ``friendrec export`` never do."""
        root = self.config.base_path
        try:
            entries = list(root.iterdir())
        except OSError:
            return None
        return {
            int(path.name): path
            for path in entries
            if path.name.isascii() and path.name.isdigit() and path.is_dir()
        }

    def poll_once(self) -> None:
        """One reconciliation: load wanted versions (newest first), then unload the rest."""
        with self._poll_lock:
            on_disk = self.scan()
            if on_disk is None:
                if not self._warned_missing:
                    log.warning("%s: no model directory %s yet", self.name, self.config.base_path)
                    self._warned_missing = True
                return
            self._warned_missing = False
            for version in list(self._failed):
                path = on_disk.get(version)
                if path is None or _fingerprint(path) != self._failed[version].fingerprint:
                    del self._failed[version]  # gone or rewritten: forget (and retry) it
            for version in sorted(self._wanted(on_disk) - set(self._served), reverse=True):
                if self._stop.is_set():
                    return
                self._load(version, on_disk[version])
            unwanted = set(self._served) - self._wanted(on_disk)
            for version in sorted(unwanted):
                self._unload(version)

    def _wanted(self, on_disk: Mapping[int, Path]) -> set[int]:
        return self.config.wanted(v for v in on_disk if v not in self._failed)

    def _set_status(self, version: int, status: VersionStatus) -> None:
        with self._lock:
            self._status[version] = status

    def _load(self, version: int, path: Path) -> None:
        self._set_status(version, VersionStatus(State.LOADING))
        log.info("%s: loading version %d from %s", self.name, version, path)
        fingerprint = _fingerprint(path)
        started = time.perf_counter()
        try:
            served = ServedVersion(self.name, version, path)
            loaded_s = time.perf_counter() - started
            warm_started = time.perf_counter()
            count = served.warmup()
            log.info(
                "%s: version %d warmup replayed %d request(s) in %.0f ms",
                self.name,
                version,
                count,
                1000 * (time.perf_counter() - warm_started),
            )
        except Exception as exc:
            if isinstance(exc, ServableError):
                code, message = exc.code, exc.message
            elif isinstance(exc, tf.errors.OpError):
                code, message = GRPC_CODES.get(exc.error_code, grpc.StatusCode.UNKNOWN), exc.message
            else:
                code, message = grpc.StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}"
            self._failed[version] = _Failure(fingerprint)
            self._set_status(
                version, VersionStatus(State.END, code.value[0], _short(message, 1000))
            )
            log.error(
                "%s: version %d failed to load (%s); other versions are unaffected",
                self.name,
                version,
                _short(message),
                exc_info=True,
            )
            return
        with self._lock:
            self._served = {**self._served, version: served}
            self._status[version] = VersionStatus(State.AVAILABLE)
        log.info(
            "%s: version %d AVAILABLE (load %.2f s); serving versions %s",
            self.name,
            version,
            loaded_s,
            sorted(self._served),
        )
        self._changed()

    def _unload(self, version: int) -> None:
        with self._lock:
            self._status[version] = VersionStatus(State.UNLOADING)
            self._served = {v: s for v, s in self._served.items() if v != version}
            self._status[version] = VersionStatus(State.END)
        log.info("%s: unloaded version %d; serving versions %s", self.name, version, self.served)
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    @property
    def served(self) -> list[int]:
        return sorted(self._served)

    def get(self, version: int | None) -> ServedVersion:
        """The served version (None: the newest), or NOT_FOUND as TF Serving words it."""
        served = self._served  # one consistent snapshot
        if version is None:
            if served:
                return served[max(served)]
            raise ServableError(
                grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({self.name})"
            )
        if version in served:
            return served[version]
        raise ServableError(
            grpc.StatusCode.NOT_FOUND,
            f"Servable not found for request: Specific({self.name}, {version})",
        )

    def status(self) -> dict[int, VersionStatus]:
        with self._lock:
            return dict(self._status)
