"""Our TF Serving-protocol server over loopback, talked to exactly as the official TF Serving is:
the stock tensorflow-serving-api stubs and TFServingClient, against `friendrec tfserving` child
processes over exported model versions, compared with what the training code computes."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.config import model_server_config_pb2
from tiny_models import ExportedModels

from friendrec.config import ServingSettings, Settings, TFServingSettings
from friendrec.feast_store import open_store
from friendrec.local_services import TFServingProcess, tfserving_server
from friendrec.paths import load_contract
from serving.tfserving.client import TFServingClient, signature_shapes
from serving.tfserving.models import ModelConfig, read_model_config_file
from serving.tfserving.server import serve
from training.features import InputSpec, fetch_online_inputs

pytestmark = pytest.mark.integration

INFRA = Path(__file__).resolve().parent.parent / "infra" / "tfserving"
MODEL = "user_tower"
TOLERANCE = 1e-5


def _with_tfserving(settings: Settings, **updates) -> Settings:
    return settings.model_copy(update={"tfserving": settings.tfserving.model_copy(update=updates)})


@dataclass
class Online:
    """Tower inputs for some users read from the Feast online store, as the serving path does."""

    user_ids: np.ndarray
    rows: np.ndarray  # rows of exported_models.embeddings[v]
    inputs: dict[str, np.ndarray]


@dataclass
class Stubs:
    address: str
    channel: grpc.Channel
    predict: prediction_service_pb2_grpc.PredictionServiceStub
    models: model_service_pb2_grpc.ModelServiceStub


def _stubs(address: str) -> Stubs:
    channel = grpc.insecure_channel(address)
    return Stubs(
        address,
        channel,
        prediction_service_pb2_grpc.PredictionServiceStub(channel),
        model_service_pb2_grpc.ModelServiceStub(channel),
    )


def _request(
    inputs: dict[str, np.ndarray],
    version: int | None = None,
    name: str = MODEL,
    signature: str = "serving_default",
) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest(
        model_spec=model_pb2.ModelSpec(name=name, signature_name=signature)
    )
    if version is not None:
        request.model_spec.version.value = version
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    return request


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _publish(source: Path, model_root: Path, version: int, pause: Callable[[], None]) -> Path:
    """Copy a version in the way `friendrec export` writes one: staged under a dot-prefixed
    name (``pause`` runs while it sits there), then renamed into place."""
    staging = model_root / f".{version}.staging"
    shutil.copytree(source, staging)
    pause()
    target = model_root / str(version)
    staging.rename(target)
    return target


@pytest.fixture(scope="module")
def server(exported_models: ExportedModels, tmp_path_factory) -> Iterator[Stubs]:
    """One `friendrec tfserving` child over the shared (read-only) model base path."""
    settings = _with_tfserving(exported_models.settings, poll_seconds=0.5)
    with tfserving_server(settings, log_dir=tmp_path_factory.mktemp("tfs_log")) as address:
        stubs = _stubs(address)
        yield stubs
        stubs.channel.close()


@pytest.fixture(scope="module")
def client(server: Stubs) -> Iterator[TFServingClient]:
    with TFServingClient(server.address, MODEL, timeout_s=10.0) as tfs:
        tfs.wait_until_available(2)
        yield tfs


@pytest.fixture(scope="module")
def online(exported_models: ExportedModels, client: TFServingClient) -> Online:
    ids = exported_models.user_ids
    users = ids[[0, 1, 17, 250, 1000, len(ids) // 2, len(ids) - 1]]
    spec = client.input_spec()
    store = open_store(exported_models.settings, "twitch/ENGB")
    c = load_contract(exported_models.settings, "twitch/ENGB")
    inputs, known = fetch_online_inputs(store, users, spec, c)
    assert known.all()
    return Online(users, np.searchsorted(ids, users), inputs)


# -- Predict, metadata, status through the raw stubs and the client --------------------------


@pytest.mark.parametrize("version", [1, 2, None])
def test_predict_matches_the_training_embeddings(
    server: Stubs, online: Online, exported_models: ExportedModels, version: int | None
):
    response = server.predict.Predict(_request(online.inputs, version), timeout=10)
    served = response.model_spec.version.value
    assert served == (version or 2)  # latest = the newest served version
    assert response.model_spec.name == MODEL
    assert response.model_spec.signature_name == "serving_default"
    embedding = tf.make_ndarray(response.outputs["embedding"])
    expected = exported_models.embeddings[served][online.rows]
    assert embedding.dtype == np.float32 and embedding.shape == expected.shape
    assert np.abs(embedding - expected).max() <= TOLERANCE


def test_client_predict_input_spec_and_status(
    client: TFServingClient, online: Online, exported_models: ExportedModels
):
    for version in (1, 2):
        embedding, served = client.predict(online.inputs, version=version)
        assert served == version
        expected = exported_models.embeddings[version][online.rows]
        assert np.abs(embedding - expected).max() <= TOLERANCE
        # The query vectors: the same embedding, 1 where the index vector has its popularity term.
        query, _ = client.predict(online.inputs, version=version, output="query_embedding")
        want = exported_models.queries[version][online.rows]
        assert np.abs(query - want).max() <= TOLERANCE
        assert np.abs(query[:, -1] - embedding[:, -1]).min() > 0.01  # the forms do differ
    _, latest = client.predict(online.inputs)
    assert latest == 2
    features = exported_models.settings.features
    assert client.input_spec(1) == InputSpec(
        sparse_len=features.sparse_cap,
        nbr_len=features.nbr_sparse_cap,
        friend_len=features.friend_cap,
        fanout=5,
        vocab_size=0,
    )
    assert client.model_status() == {1: "AVAILABLE", 2: "AVAILABLE"}
    assert client.wait_until_available() == 2


def test_metadata_is_a_signature_def_map_like_tf_serving(server: Stubs):
    request = get_model_metadata_pb2.GetModelMetadataRequest(
        model_spec=model_pb2.ModelSpec(name=MODEL), metadata_field=["signature_def"]
    )
    response = server.predict.GetModelMetadata(request, timeout=10)
    assert response.model_spec.name == MODEL and response.model_spec.version.value == 2
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    signature = signatures.signature_def["serving_default"]
    assert signature.method_name == "tensorflow/serving/predict"
    for output in ("embedding", "query_embedding"):  # 16 + the popularity term
        assert [d.size for d in signature.outputs[output].tensor_shape.dim] == [-1, 17]
    shapes = signature_shapes(signature)
    assert shapes["friend_mask"] == [-1, 5]
    assert InputSpec.from_signature(shapes).fanout == 5


def test_model_status_lists_both_versions_available(server: Stubs):
    request = get_model_status_pb2.GetModelStatusRequest(model_spec=model_pb2.ModelSpec(name=MODEL))
    response = server.models.GetModelStatus(request, timeout=10)
    states = {s.version: s.state for s in response.model_version_status}
    available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert states == {1: available, 2: available}
    assert all(s.status.error_code == 0 for s in response.model_version_status)


def test_output_filter(server: Stubs, online: Online):
    request = _request(online.inputs, 1)
    request.output_filter.append("embedding")
    assert list(server.predict.Predict(request, timeout=10).outputs) == ["embedding"]
    request.output_filter.append("logits")
    with pytest.raises(grpc.RpcError) as err:
        server.predict.Predict(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "logits" in err.value.details()


def test_health_and_reflection(server: Stubs):
    health = health_pb2_grpc.HealthStub(server.channel)
    for service in ("", "tensorflow.serving.PredictionService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    answers = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    names = {s.name for a in answers for s in a.list_services_response.service}
    assert {
        "tensorflow.serving.PredictionService",
        "tensorflow.serving.ModelService",
        "grpc.health.v1.Health",
    } <= names


# -- Errors: the status codes and messages TF Serving gives ------------------------------------


def _error(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    details = err.value.details()
    assert "Traceback" not in details and len(details) < 1000
    return err.value.code(), details


def test_request_errors(server: Stubs, online: Online):
    predict = server.predict.Predict
    code, details = _error(lambda: predict(_request(online.inputs, name="item_tower"), timeout=5))
    assert code == grpc.StatusCode.NOT_FOUND
    assert details == "Servable not found for request: Latest(item_tower)"
    code, details = _error(lambda: predict(_request(online.inputs, version=7), timeout=5))
    assert code == grpc.StatusCode.NOT_FOUND
    assert details == "Servable not found for request: Specific(user_tower, 7)"

    missing = {k: v for k, v in online.inputs.items() if k != "self_degree"}
    code, details = _error(lambda: predict(_request(missing), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "Missing but required: {self_degree}" in details

    extra = {**online.inputs, "bogus": np.zeros(len(online.user_ids), np.float32)}
    code, details = _error(lambda: predict(_request(extra), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "Sent extra: {bogus}" in details

    wrong_dtype = {**online.inputs, "self_user_id": online.inputs["self_user_id"].astype(np.int32)}
    code, details = _error(lambda: predict(_request(wrong_dtype), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "self_user_id" in details and "DT_INT64" in details and "DT_INT32" in details

    wrong_shape = {**online.inputs, "friend_mask": online.inputs["friend_mask"][:, :4]}
    code, details = _error(lambda: predict(_request(wrong_shape), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "friend_mask" in details and "[?, 5]" in details

    short_batch = {**online.inputs, "self_degree": online.inputs["self_degree"][:2]}
    code, details = _error(lambda: predict(_request(short_batch), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "batch size" in details

    code, details = _error(lambda: predict(_request(online.inputs, signature="train"), timeout=5))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and '"train"' in details

    labelled = _request(online.inputs)
    labelled.model_spec.version_label = "stable"
    code, _ = _error(lambda: predict(labelled, timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT

    classify = classification_pb2.ClassificationRequest(model_spec=model_pb2.ModelSpec(name=MODEL))
    code, _ = _error(lambda: server.predict.Classify(classify, timeout=5))
    assert code == grpc.StatusCode.UNIMPLEMENTED

    status = get_model_status_pb2.GetModelStatusRequest(
        model_spec=model_pb2.ModelSpec(name="item_tower")
    )
    code, _ = _error(lambda: server.models.GetModelStatus(status, timeout=5))
    assert code == grpc.StatusCode.NOT_FOUND


# -- Version life cycle: hot load, unload, a corrupt version, a restart on the same port -------


@pytest.fixture(scope="module")
def hot(exported_models: ExportedModels, tmp_path_factory) -> Iterator[TFServingProcess]:
    """A `friendrec tfserving` child over a private copy of versions 1 and 2 (tests add and
    break versions there), polling every 0.2 s with the latest-2 policy."""
    base = tmp_path_factory.mktemp("hot_models")
    for version in exported_models.versions:
        shutil.copytree(
            exported_models.base_path / MODEL / str(version), base / MODEL / str(version)
        )
    serving = exported_models.settings.serving.model_copy(update={"model_base_path": base})
    settings = _with_tfserving(
        exported_models.settings.model_copy(update={"serving": serving}),
        poll_seconds=0.2,
        version_policy="latest",
        num_versions=2,
    )
    process = TFServingProcess(settings, log_dir=tmp_path_factory.mktemp("hot_log"))
    process.start()
    yield process
    process.close()


def test_new_version_hot_loads_after_warmup_and_the_oldest_unloads(
    hot: TFServingProcess, online: Online, exported_models: ExportedModels
):
    root = hot.settings.model_base_path / MODEL
    with TFServingClient(hot.address, MODEL, timeout_s=10.0) as tfs:
        assert tfs.model_status() == {1: "AVAILABLE", 2: "AVAILABLE"}

        def staged_is_ignored() -> None:
            time.sleep(0.6)  # three polls see the staging directory
            assert 3 not in tfs.model_status()

        # Version 3 = version 2's files: its embeddings are version 2's.
        _publish(root / "2", root, 3, staged_is_ignored)
        assert tfs.wait_until_available(3, timeout=30) == 3
        embedding, served = tfs.predict(online.inputs)
        assert served == 3
        assert np.abs(embedding - exported_models.embeddings[2][online.rows]).max() <= TOLERANCE
        _wait_for(lambda: tfs.model_status().get(1) == "END", "version 1 to unload")
        assert tfs.model_status() == {1: "END", 2: "AVAILABLE", 3: "AVAILABLE"}
        with pytest.raises(grpc.RpcError) as err:
            tfs.predict(online.inputs, version=1)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

    log = hot.log_path.read_text()
    warmed = log.index("version 3 warmup replayed 1 request(s)")
    available = log.index("version 3 AVAILABLE")
    assert warmed < available  # the warmup ran before the version took traffic
    assert "unloaded version 1" in log


def test_a_corrupt_version_is_reported_and_the_others_keep_serving(
    hot: TFServingProcess, online: Online
):
    root = hot.settings.model_base_path / MODEL

    def corrupt(path: Path) -> Callable[[], None]:
        def write() -> None:
            (path / "saved_model.pb").write_bytes(b"this is not a SavedModel")

        return write

    staging = root / ".9.staging"
    _publish(root / "2", root, 9, corrupt(staging))
    (root / "10").mkdir()  # an empty version directory: no SavedModel at all
    with TFServingClient(hot.address, MODEL, timeout_s=10.0) as tfs:
        _wait_for(
            lambda: {tfs.model_status().get(v) for v in (9, 10)} == {"END"}, "9 and 10 to fail"
        )
        status = tfs.model_status()
        # Broken versions do not count for "latest 2": the two good ones stay served.
        assert len([v for v, s in status.items() if s == "AVAILABLE" and v < 9]) == 2
        request = get_model_status_pb2.GetModelStatusRequest(
            model_spec=model_pb2.ModelSpec(name=MODEL)
        )
        stubs = _stubs(hot.address)
        reply = stubs.models.GetModelStatus(request, timeout=10)
        stubs.channel.close()
        for version in (9, 10):
            broken = next(s for s in reply.model_version_status if s.version == version)
            assert broken.status.error_code != 0 and broken.status.error_message
        _, served = tfs.predict(online.inputs)
        assert served < 9


def test_restart_on_the_same_port(hot: TFServingProcess, online: Online):
    with TFServingClient(hot.address, MODEL, timeout_s=5.0) as tfs:
        _, before = tfs.predict(online.inputs)
        port = hot.port
        hot.stop()
        assert hot.returncode == 0  # SIGTERM: graceful stop, exit 0
        with pytest.raises(grpc.RpcError) as err:
            tfs.predict(online.inputs)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        hot.start()
        assert hot.port == port
        # The same client (same channel) reconnects on its own.
        assert tfs.wait_until_available(before, timeout=30) == before
        _, after = tfs.predict(online.inputs)
        assert after == before


# -- In process, and the production configuration files ---------------------------------------


def test_in_process_server_from_the_infra_models_config(
    exported_models: ExportedModels, online: Online
):
    models = read_model_config_file(INFRA / "models.config", models_root=exported_models.base_path)
    assert models == [
        ModelConfig(MODEL, exported_models.base_path / MODEL, "latest", 2, ()),
    ]
    handle = serve(exported_models.settings, port=0, host="127.0.0.1", block=False, models=models)
    try:
        assert handle.port > 0
        with TFServingClient(handle.address, MODEL, timeout_s=10.0) as tfs:
            assert tfs.wait_until_available(1, timeout=30) == 1
            embedding, served = tfs.predict(online.inputs, version=1)
            assert served == 1
            expected = exported_models.embeddings[1][online.rows]
            assert np.abs(embedding - expected).max() <= TOLERANCE
    finally:
        handle.stop()


def test_version_policies():
    latest2 = ModelConfig(MODEL, Path("/m"), "latest", 2)
    assert latest2.wanted([3, 1, 2]) == {2, 3}
    assert latest2.wanted([]) == set()
    assert ModelConfig(MODEL, Path("/m"), "all").wanted([1, 2, 5]) == {1, 2, 5}
    specific = ModelConfig(MODEL, Path("/m"), "specific", versions=(1, 4))
    assert specific.wanted([1, 2, 3]) == {1}


def _upstream_config_protos() -> tuple[type, type]:
    """BatchingParameters and MonitoringConfig as TF Serving defines them
    (tensorflow_serving/servables/tensorflow/session_bundle_config.proto and
    tensorflow_serving/config/monitoring_config.proto: same names, numbers and types).
    tensorflow-serving-api does not ship these two, so they are declared here."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

    field = descriptor_pb2.FieldDescriptorProto
    pool = descriptor_pool.DescriptorPool()
    wrappers = descriptor_pb2.FileDescriptorProto()
    wrappers_pb2.DESCRIPTOR.CopyToProto(wrappers)
    pool.Add(wrappers)
    proto = descriptor_pb2.FileDescriptorProto(
        name="friendrec_test/tf_serving_configs.proto",
        package="tensorflow.serving",
        syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"],
    )
    batching = proto.message_type.add(name="BatchingParameters")
    for name, number, wrapper in (
        ("max_batch_size", 1, "Int64Value"),
        ("batch_timeout_micros", 2, "Int64Value"),
        ("max_enqueued_batches", 3, "Int64Value"),
        ("num_batch_threads", 4, "Int64Value"),
        ("thread_pool_name", 5, "StringValue"),
    ):
        batching.field.add(
            name=name,
            number=number,
            label=field.LABEL_OPTIONAL,
            type=field.TYPE_MESSAGE,
            type_name=f".google.protobuf.{wrapper}",
        )
    batching.field.add(
        name="allowed_batch_sizes", number=6, label=field.LABEL_REPEATED, type=field.TYPE_INT64
    )
    batching.field.add(
        name="pad_variable_length_inputs",
        number=7,
        label=field.LABEL_OPTIONAL,
        type=field.TYPE_BOOL,
    )
    prometheus = proto.message_type.add(name="PrometheusConfig")
    prometheus.field.add(name="enable", number=1, label=field.LABEL_OPTIONAL, type=field.TYPE_BOOL)
    prometheus.field.add(name="path", number=2, label=field.LABEL_OPTIONAL, type=field.TYPE_STRING)
    monitoring = proto.message_type.add(name="MonitoringConfig")
    monitoring.field.add(
        name="prometheus_config",
        number=1,
        label=field.LABEL_OPTIONAL,
        type=field.TYPE_MESSAGE,
        type_name=".tensorflow.serving.PrometheusConfig",
    )
    pool.Add(proto)
    return (
        message_factory.GetMessageClass(
            pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters")
        ),
        message_factory.GetMessageClass(
            pool.FindMessageTypeByName("tensorflow.serving.MonitoringConfig")
        ),
    )


def test_infra_config_files_parse_with_the_tf_serving_protos():
    config = text_format.Parse(
        (INFRA / "models.config").read_text(), model_server_config_pb2.ModelServerConfig()
    )
    (model,) = config.model_config_list.config
    assert model.name == ServingSettings.model_fields["model_name"].default == MODEL
    assert model.base_path == f"/models/{MODEL}" and model.model_platform == "tensorflow"
    assert model.model_version_policy.WhichOneof("policy_choice") == "latest"
    default_versions = TFServingSettings.model_fields["num_versions"].default
    assert model.model_version_policy.latest.num_versions == default_versions
    assert read_model_config_file(INFRA / "models.config")[0].base_path == Path(
        "/models/user_tower"
    )

    batching_cls, monitoring_cls = _upstream_config_protos()
    batching = text_format.Parse((INFRA / "batching_parameters.txt").read_text(), batching_cls())
    # The refresher and the index build send 1024 users per request: it must fit in one batch.
    assert batching.max_batch_size.value >= 1024
    assert batching.num_batch_threads.value >= 1 and batching.batch_timeout_micros.value >= 0
    monitoring = text_format.Parse((INFRA / "monitoring.config").read_text(), monitoring_cls())
    assert monitoring.prometheus_config.enable
    assert monitoring.prometheus_config.path == "/monitoring/prometheus/metrics"


def test_a_batch_of_1024_users_fits_in_one_request(
    client: TFServingClient, exported_models: ExportedModels
):
    users = exported_models.user_ids[:1024]
    store = open_store(exported_models.settings, "twitch/ENGB")
    c = load_contract(exported_models.settings, "twitch/ENGB")
    inputs, _ = fetch_online_inputs(store, users, client.input_spec(2), c)
    assert sum(v.nbytes for v in inputs.values()) > 4 * 1024 * 1024  # gRPC's default cap
    embedding, served = client.predict(inputs, version=2)
    assert served == 2 and embedding.shape == (1024, 17)  # 16 + the popularity term
    assert np.abs(embedding - exported_models.embeddings[2][:1024]).max() <= TOLERANCE
