"""The retrieval service end to end over loopback gRPC: Feast (sqlite), our TF Serving server
(a subprocess) and milvus-lite (a server subprocess), against what the training code computes."""

from __future__ import annotations

import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pydantic import SecretStr
from tiny_models import ExportedModels

from friendrec.config import Settings
from friendrec.feast_store import online_features, open_store
from friendrec.local_services import MilvusLiteProcess, TFServingProcess, free_port
from friendrec.paths import load_contract
from serving.client import RecommenderClient, recommend_request
from serving.index_build import TFServingEmbedder, build_index
from serving.service import SERVICE_NAME, RunningService, start_service
from serving.tfserving.client import TFServingClient

pytestmark = pytest.mark.integration


@dataclass
class Stack:
    settings: Settings
    models: ExportedModels
    tfserving: TFServingProcess
    milvus: MilvusLiteProcess
    service: RunningService

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.service.port}"

    def client(self, **kw) -> RecommenderClient:
        return RecommenderClient(self.settings, self.address, **kw)

    def rows(self, users) -> np.ndarray:
        return np.searchsorted(self.models.user_ids, np.asarray(users))


def _with(settings: Settings, section: str, **updates) -> Settings:
    return settings.model_copy(
        update={section: getattr(settings, section).model_copy(update=updates)}
    )


@pytest.fixture(scope="module")
def stack(exported_models: ExportedModels, tmp_path_factory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("serving_stack")
    milvus = MilvusLiteProcess(work / "milvus", free_port())
    milvus.start()
    settings = _with(exported_models.settings, "milvus", uri=milvus.uri)
    settings = _with(settings, "tfserving", port=free_port(), poll_seconds=0.2)
    settings = _with(settings, "serving", metrics_port=free_port(), alias_refresh_s=0.2)
    tfserving = TFServingProcess(settings, settings.tfserving.port)
    tfserving.start()
    service = None
    try:
        build_index(settings, model_version=1, show_progress=False)
        service = start_service(settings, port=0, probe_seconds=0.2)
        yield Stack(settings, exported_models, tfserving, milvus, service)
    finally:
        if service is not None:
            service.stop(grace=None)
        tfserving.stop()
        milvus.stop()


def _exact_topk(stack: Stack, version: int, user: int, exclude: set[int], k: int) -> list[int]:
    emb = stack.models.embeddings[version]
    scores = emb @ emb[stack.rows([user])[0]]
    order = np.argsort(-scores, kind="stable")
    ids = stack.models.user_ids[order]
    return [int(u) for u in ids if int(u) not in exclude][:k]


def _friends(stack: Stack, users) -> dict[int, set[int]]:
    store = open_store(stack.settings, "twitch/ENGB")
    c = load_contract(stack.settings, "twitch/ENGB")
    rows = online_features(store, list(users), contract=c)
    return {r["user_id"]: set(r["friend_ids"]) for r in rows}


def _assert_scores_are_version(stack: Stack, response) -> None:
    """Scores equal the training code's inner products of one version: query and index agree."""
    emb = stack.models.embeddings[response.model_version]
    query = emb[stack.rows([response.user_id])[0]]
    ids = [c.user_id for c in response.candidates]
    want = emb[stack.rows(ids)] @ query
    got = np.array([c.score for c in response.candidates])
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_results_match_exact_search_and_the_training_embedding(stack: Stack):
    rng = np.random.default_rng(0)
    users = rng.choice(stack.models.user_ids, 60, replace=False).tolist()
    friends = _friends(stack, users)
    recalls = []
    with stack.client() as client:
        for i, user in enumerate(users):
            excludes = [int(u) for u in rng.choice(stack.models.user_ids, 5)] if i % 2 else []
            response = client.recommend(recommend_request(user, 50, excludes))
            assert response.model_version == 1 and response.known_user
            got = [c.user_id for c in response.candidates]
            banned = {user, *friends[user], *excludes}
            assert len(got) == 50 and not banned & set(got)
            exact = _exact_topk(stack, 1, user, banned, 50)
            recalls.append(len(set(got) & set(exact)) / 50)
            _assert_scores_are_version(stack, response)
    assert np.mean(recalls) >= 0.95, np.mean(recalls)


def test_batch_answers_like_single_requests(stack: Stack):
    users = stack.models.user_ids[[3, 30, 300]].tolist()
    with stack.client() as client:
        batch = client.recommend_batch([recommend_request(u, 10) for u in users])
        singles = [client.recommend(recommend_request(u, 10)) for u in users]
    assert [r.user_id for r in batch.responses] == users and batch.model_version == 1
    for got, want in zip(batch.responses, singles, strict=True):
        assert [c.user_id for c in got.candidates] == [c.user_id for c in want.candidates]


def test_unknown_users_are_served_and_flagged(stack: Stack):
    with stack.client() as client:
        cold = client.recommend(recommend_request(10**12, 10))
        assert not cold.known_user and not cold.used_request_features
        assert len(cold.candidates) == 10
        friend = int(stack.models.user_ids[42])
        warm = client.recommend(
            recommend_request(10**12 + 1, 10, profile={"views": 100.0}, friend_ids=[friend])
        )
    assert not warm.known_user and warm.used_request_features
    assert friend not in {c.user_id for c in warm.candidates}
    assert [c.user_id for c in warm.candidates] != [c.user_id for c in cold.candidates]


@pytest.mark.parametrize(
    ("request_args", "message"),
    [
        ({"user_id": 1, "k": 0}, "k must be in"),
        ({"user_id": 1, "k": 1001}, "k must be in"),
        ({"user_id": -1, "k": 5}, "user_id"),
        ({"user_id": 1, "k": 5, "exclude": list(range(10_001))}, "exclude_user_ids"),
        ({"user_id": 1, "k": 5, "profile": {"followers": 1.0}}, "unknown profile feature"),
    ],
)
def test_bad_arguments_are_invalid_argument(stack: Stack, request_args, message):
    with stack.client() as client, pytest.raises(grpc.RpcError) as err:
        client.recommend(recommend_request(**request_args))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()


class _OtherSchemaIndex:
    """A live index whose model was trained on another schema (nothing else is reached)."""

    def live(self):
        from serving.index import LiveIndex

        return LiveIndex("user_embeddings", "user_embeddings_v7", 7, "twitch/ENGB", 16, "0ther0")

    def load_live(self):
        return self.live()


def test_a_live_model_of_another_schema_is_failed_precondition(exported_models: ExportedModels):
    """The service refuses a live version whose schema hash is not the dataset contract's, and
    says which two hashes differ."""
    from serving.recommender import Recommender

    settings = _with(exported_models.settings, "serving", metrics_port=0)
    c = load_contract(settings, "twitch/ENGB")
    recommender = Recommender(settings, None, None, _OtherSchemaIndex())  # type: ignore[arg-type]
    assert recommender.contract == c  # the active dataset's, loaded once
    service = start_service(settings, recommender=recommender, port=0, probe_seconds=60)
    try:
        address = f"127.0.0.1:{service.port}"
        with RecommenderClient(settings, address) as client, pytest.raises(grpc.RpcError) as err:
            client.recommend(recommend_request(1, 5))
    finally:
        service.stop(grace=None)
        recommender.close()
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "'0ther0'" in err.value.details() and c.schema_hash in err.value.details()


def test_empty_and_oversized_batches_are_rejected(stack: Stack):
    with stack.client() as client:
        for n in (0, stack.settings.serving.max_batch + 1):
            with pytest.raises(grpc.RpcError) as err:
                client.recommend_batch([recommend_request(1, 5)] * n)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_health_reflection_and_metrics(stack: Stack):
    with stack.client() as client:
        deadline = time.monotonic() + 10
        while client.health(SERVICE_NAME) != "SERVING" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.health(SERVICE_NAME) == "SERVING"
        client.recommend(recommend_request(int(stack.models.user_ids[0]), 5))
        stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
        answer = next(
            stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
        )
        assert SERVICE_NAME in {s.name for s in answer.list_services_response.service}
    url = f"http://127.0.0.1:{stack.settings.serving.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    for stage in ("feast", "tfserving", "milvus"):
        assert f'friendrec_stage_seconds_count{{stage="{stage}"}}' in text
    assert 'friendrec_requests_total{code="OK",method="Recommend"}' in text
    assert "friendrec_served_model_version" in text


def test_alias_move_under_traffic_drops_nothing_and_never_mixes(stack: Stack):
    users = stack.models.user_ids[:200].tolist()
    responses, errors, stop = [], [], threading.Event()

    def traffic() -> None:
        with stack.client() as client:
            i = 0
            while not stop.is_set():
                try:
                    responses.append(client.recommend(recommend_request(users[i % len(users)], 20)))
                except grpc.RpcError as exc:
                    errors.append(exc)
                i += 1

    threads = [threading.Thread(target=traffic) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        # Version 2's vectors come through TF Serving, as the streaming refresher gets them.
        with TFServingClient(stack.tfserving.address, "user_tower", timeout_s=30) as tfs:
            build_index(stack.settings, 2, TFServingEmbedder(tfs, 2), show_progress=False)
        time.sleep(1.0)  # past the alias cache: traffic now reaches version 2
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    versions = [r.model_version for r in responses]
    assert set(versions) == {1, 2} and versions[-1] == 2
    for response in responses[:: max(1, len(responses) // 200)]:
        _assert_scores_are_version(stack, response)


def test_a_stopped_dependency_gives_unavailable_and_the_service_recovers(stack: Stack):
    user = recommend_request(int(stack.models.user_ids[7]), 5)
    with stack.client() as client:
        client.recommend(user)
        for process in (stack.tfserving, stack.milvus):
            process.stop()
            try:
                with pytest.raises(grpc.RpcError) as err:
                    client.recommend(user)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
                assert "Traceback" not in err.value.details()
            finally:
                process.start()
            deadline = time.monotonic() + 30
            while True:
                try:
                    client.recommend(user)
                    break
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return key, cert


def test_tls_and_bearer_token(stack: Stack, tmp_path: Path):
    key, cert = _self_signed(tmp_path)
    secured = _with(
        stack.settings,
        "serving",
        tls_cert_file=cert,
        tls_key_file=key,
        tls_ca_file=cert,
        auth_token=SecretStr("s3cret"),
        metrics_port=0,
    )
    service = start_service(secured, recommender=stack.service.recommender, port=0)
    address = f"localhost:{service.port}"
    user = recommend_request(int(stack.models.user_ids[9]), 5)
    try:
        with RecommenderClient(secured, address) as client:
            assert len(client.recommend(user).candidates) == 5
            assert client.health() in ("SERVING", "NOT_SERVING")  # open without a token
        no_token = _with(secured, "serving", auth_token=None)
        with RecommenderClient(no_token, address) as client, pytest.raises(grpc.RpcError) as err:
            client.recommend(user)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        wrong = _with(secured, "serving", auth_token=SecretStr("guess"))
        with RecommenderClient(wrong, address) as client, pytest.raises(grpc.RpcError) as err:
            client.recommend(user)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        plaintext = _with(no_token, "serving", tls_ca_file=None)
        with (
            RecommenderClient(plaintext, address, timeout_s=2) as client,
            pytest.raises(grpc.RpcError) as err,
        ):
            client.recommend(user)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        service.stop(grace=None)


def test_cli_recommend_takes_the_address_from_the_settings(stack: Stack):
    import json
    import os
    import sys

    user = int(stack.models.user_ids[11])
    env = {
        **os.environ,
        "FRIENDREC_SERVING__HOST": "127.0.0.1",
        "FRIENDREC_SERVING__PORT": str(stack.service.port),
    }
    command = [sys.executable, "-m", "friendrec", "recommend", "--user", str(user), "-k", "7"]
    done = subprocess.run([*command, "--json"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert int(answer["user_id"]) == user and len(answer["candidates"]) == 7
    bad = subprocess.run([*command[:-1], "0"], env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "INVALID_ARGUMENT" in bad.stderr
