"""The retrieval service end to end over loopback gRPC: Feast (sqlite), our TF Serving server
(a subprocess) and milvus-lite (a server subprocess), against what the training code computes."""

from __future__ import annotations

import os
import signal
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
from friendrec.data.canonical import load_prepared
from friendrec.feast_store import online_features, open_store
from friendrec.fof import BLEND_FEATURES, BlendRanker, blend_features
from friendrec.friend_sets import open_state
from friendrec.local_services import MilvusLiteProcess, TFServingProcess, free_port
from friendrec.paths import DatasetPaths, load_contract
from serving.client import RecommenderClient, recommend_request
from serving.index_build import TFServingEmbedder, build_index
from serving.protos import recommender_pb2
from serving.service import SERVICE_NAME, RunningService, start_service
from serving.tfserving.client import TFServingClient
from training import evaluation as ev

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
    # The 1 s production deadlines are latency budgets; these tests check answers, and on a
    # loaded 2-core CI runner (client threads plus an index build in this process) a store read
    # can wait past 1 s for the GIL. The deadlines themselves:
    # test_a_slow_store_gives_deadline_exceeded_and_the_service_recovers.
    settings = _with(
        settings,
        "serving",
        metrics_port=free_port(),
        alias_refresh_s=0.2,
        feast_timeout_s=10.0,
        tfserving_timeout_s=10.0,
        milvus_timeout_s=10.0,
    )
    settings = _with(settings, "streaming", state_path=work / "friend_state.db")
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
    scores = emb @ stack.models.queries[version][stack.rows([user])[0]]
    order = np.argsort(-scores, kind="stable")
    ids = stack.models.user_ids[order]
    return [int(u) for u in ids if int(u) not in exclude][:k]


def _friends(stack: Stack, users) -> dict[int, set[int]]:
    """Every training friend (the graph the service's friend sets are seeded from)."""
    src, dst = load_prepared(DatasetPaths.of(stack.settings, "twitch/ENGB")).edges("train")
    return {int(u): {int(v) for v in np.concatenate([dst[src == u], src[dst == u]])} for u in users}


def _friend_sample(stack: Stack, users) -> dict[int, set[int]]:
    """The online store's capped friend sample."""
    store = open_store(stack.settings, "twitch/ENGB")
    c = load_contract(stack.settings, "twitch/ENGB")
    rows = online_features(store, list(users), contract=c)
    return {r["user_id"]: set(r["friend_ids"]) for r in rows}


def _assert_scores_are_version(stack: Stack, response) -> None:
    """Scores equal the training code's inner products of one version: query and index agree."""
    emb = stack.models.embeddings[response.model_version]
    query = stack.models.queries[response.model_version][stack.rows([response.user_id])[0]]
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
            response = client.recommend(recommend_request(user, 50, excludes, source="embedding"))
            assert response.model_version == 1 and response.known_user
            got = [c.user_id for c in response.candidates]
            banned = {user, *friends[user], *excludes}
            assert len(got) == 50 and not banned & set(got)
            exact = _exact_topk(stack, 1, user, banned, 50)
            recalls.append(len(set(got) & set(exact)) / 50)
            _assert_scores_are_version(stack, response)
    assert np.mean(recalls) >= 0.95, np.mean(recalls)


def test_every_friend_is_excluded_not_only_the_sample(stack: Stack):
    """Users with more friends than the online store's sample (friend_cap): none of their friends
    is recommended, on both search paths (over-fetch, and the Milvus filter above
    ``filter_search_above``), and a friendship the stream updater adds is excluded at once."""
    src, dst = load_prepared(DatasetPaths.of(stack.settings, "twitch/ENGB")).edges("train")
    degree = np.bincount(np.concatenate([src, dst]))
    order = np.argsort(-degree, kind="stable")
    cap = stack.settings.features.friend_cap
    big = int(order[0])  # ENGB's most connected user: searched with the filter
    mid = int(order[np.searchsorted(-degree[order], -4 * cap, side="right") - 1])  # over-fetch
    assert degree[big] > stack.settings.serving.filter_search_above >= degree[mid] > cap
    friends = _friends(stack, [big, mid])
    sample = _friend_sample(stack, [big, mid])
    with stack.client() as client:
        for user in (big, mid):
            k = 200
            # What excluding only the sample would have recommended: friends among them.
            assert set(_exact_topk(stack, 1, user, {user, *sample[user]}, k)) & friends[user]
            request = recommend_request(user, k, source="embedding")
            got = [c.user_id for c in client.recommend(request).candidates]
            assert len(got) == k and not set(got) & friends[user]
            exact = _exact_topk(stack, 1, user, {user, *friends[user]}, k)
            assert len(set(got) & set(exact)) / k >= 0.9
            for source in ("fof", "blend"):
                request = recommend_request(user, k, source=source)
                got = [c.user_id for c in client.recommend(request).candidates]
                assert got and not set(got) & friends[user]
        # The stream updater's change is read at serving time, no new index needed.
        top = client.recommend(recommend_request(mid, 5)).candidates[0].user_id
        state = open_state(stack.settings, seed_if_empty=False)
        try:
            state.apply([("add", mid, top), ("add", top, mid)])
            got = [c.user_id for c in client.recommend(recommend_request(mid, 5)).candidates]
            assert top not in got
        finally:
            state.apply([("remove", mid, top), ("remove", top, mid)])
            state.close()


@pytest.mark.parametrize("reads_vectors", [True, False], ids=["vector-reads", "no-reads"])
def test_fof_and_blend_are_served_as_evaluation_scores_them(stack: Stack, reads_vectors: bool):
    """The service's friends-of-friends and blend lists equal the offline evaluation's
    (``topk_fof``, ``topk_blend``) for sampled validation users: the same cap, ties, weights.
    Without vector reads, the same holds for the ranker fitted without them, and the service
    makes no Milvus get (the real index, its calls counted)."""
    settings = stack.settings
    if not reads_vectors:
        serving = settings.serving.without_vector_reads()
        settings = settings.model_copy(update={"serving": serving})
    data = load_prepared(DatasetPaths.of(settings, "twitch/ENGB"))
    evalset = ev.EvalSet.from_prepared(data, "val")
    serving = settings.serving
    depth = serving.blend_depth
    fof = ev.topk_fof(evalset, data.user_ids, k=depth, cap=serving.fof_max_friends)
    version = 1
    emb, queries = stack.models.embeddings[version], stack.models.queries[version]
    embedding = ev.embedding_topk(emb, evalset, k=depth, queries=queries)
    emb_top = embedding[0]
    ranker = BlendRanker.from_dict(serving.blend_ranker)
    assert ranker.reads_vectors == reads_vectors
    source = ev.BlendSource(evalset, data.user_ids, emb, queries)
    blend_top = ev.topk_blend(embedding, fof, source, ranker, k=50)
    service = stack.service
    if not reads_vectors:
        service = start_service(_with(settings, "serving", metrics_port=0), port=0)
    gets: list[int] = []
    index, get_vectors = service.recommender.index, service.recommender.index.get_vectors
    index.get_vectors = lambda collection, users, *a: (
        gets.append(len(users)) or get_vectors(collection, users, *a)
    )
    rng = np.random.default_rng(5)
    rows = rng.choice(evalset.num_queries, 60, replace=False)
    same_blend = 0
    try:
        with RecommenderClient(settings, f"127.0.0.1:{service.port}") as client:
            for row in rows:
                same_blend += _served_as_evaluated(
                    client, data, row, fof, embedding, emb_top, blend_top, source, ranker, depth
                )
    finally:
        del index.get_vectors
        if service is not stack.service:
            service.stop(grace=None)
    # HNSW's top 100 equals exact search's, all 100 in order, for about half of the users (the
    # blend of the others is compared nowhere: its input differs, not its merge).
    assert same_blend >= 20
    assert bool(gets) == reads_vectors, gets


def _served_as_evaluated(client, data, row, fof, embedding, emb_top, blend_top, source, ranker,
                         depth) -> bool:  # fmt: skip
    """One validation user's served lists against the offline ones; False where the ANN
    search's top ``depth`` differs from exact search (the blends' inputs then differ)."""
    user = int(data.user_ids[source.evalset.queries[row]])
    served_fof = client.recommend(recommend_request(user, 50, source="fof")).candidates
    want = [int(data.user_ids[u]) for u in fof[0][row, :50] if u >= 0]
    assert [c.user_id for c in served_fof] == want, user
    np.testing.assert_allclose([c.fof_score for c in served_fof], fof[1][row, : len(want)],
                               rtol=1e-6)  # fmt: skip
    assert all(c.source == recommender_pb2.FOF for c in served_fof)
    served = client.recommend(recommend_request(user, 50, source="blend")).candidates
    embedded = client.recommend(recommend_request(user, depth, source="embedding")).candidates
    exact = [int(data.user_ids[u]) for u in emb_top[row] if u >= 0]
    if [c.user_id for c in embedded] != exact:
        return False
    np.testing.assert_allclose(  # Milvus' inner products are numpy's, to float32 noise
        [c.embedding_score for c in embedded], embedding[1][row, : len(exact)], atol=1e-5
    )
    offline = [int(data.user_ids[u]) for u in blend_top[row] if u >= 0]
    _assert_same_up_to_float_noise(
        [c.user_id for c in served], offline, source.inputs(embedding, fof, row), ranker, depth
    )
    for c in served:  # each candidate names its source(s) and their own scores
        assert (c.source == recommender_pb2.BLEND) == (
            c.HasField("embedding_score") and c.HasField("fof_score")
        )
    return True


def _assert_same_up_to_float_noise(served, offline, inputs, ranker, depth):
    """The served blend is the offline one; a position may differ only between two candidates
    whose offline blend scores are within what the inner products' float32 noise (1e-5 each,
    the tolerance checked above) can move them apart, never by more."""
    if served == offline:
        return
    emb, fo, products, degrees, degree = inputs
    products = products if ranker.reads_vectors else None
    users, x = blend_features(emb, fo, depth, products, degrees, degree)
    scores = ranker.score(x)
    moved = np.zeros(len(users))  # how far 1e-5 on each inner product moves each score
    for name in ("embedding_score", "inner_product"):
        for sign in (-1.0, 1.0):
            shifted = x.copy()
            shifted[:, BLEND_FEATURES.index(name)] += sign * 1e-5
            moved = np.maximum(moved, np.abs(ranker.score(shifted) - scores))
    score = dict(zip(users.tolist(), scores, strict=True))
    noise = dict(zip(users.tolist(), 2 * moved, strict=True))  # both inner products, both ways
    assert len(served) == len(offline)
    for a, b in zip(served, offline, strict=True):
        assert a == b or abs(score[a] - score[b]) <= noise[a] + noise[b], (a, b, score[a], score[b])


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


def test_an_unknown_source_is_invalid_argument(stack: Stack):
    request = recommender_pb2.RecommendRequest(user_id=1, k=5, source=7)  # a newer client's
    with stack.client() as client, pytest.raises(grpc.RpcError) as err:
        client.recommend(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "source must be one of" in err.value.details()


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
                    request = recommend_request(users[i % len(users)], 20, source="embedding")
                    responses.append(client.recommend(request))
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


def test_a_slow_store_gives_deadline_exceeded_and_the_service_recovers(stack: Stack):
    """A TF Serving that holds the call (its process paused) costs one DEADLINE_EXCEEDED near
    the configured deadline, not a hung worker; once it answers again so does the service."""
    deadline_s = 0.5
    settings = _with(stack.settings, "serving", tfserving_timeout_s=deadline_s, metrics_port=0)
    service = start_service(settings, port=0, probe_seconds=0.2)
    users = [int(u) for u in stack.models.user_ids[20:23]]
    pid = stack.tfserving.proc.pid
    try:
        with RecommenderClient(settings, f"127.0.0.1:{service.port}", timeout_s=30) as client:
            client.recommend(recommend_request(users[0], 5))  # the input spec is now cached
            os.kill(pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as err:
                    client.recommend(recommend_request(users[1], 5))
                waited = time.monotonic() - started
            finally:
                os.kill(pid, signal.SIGCONT)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err.value.details()
            assert err.value.details() == "TF Serving did not answer in time"
            assert deadline_s <= waited < 10 * deadline_s + 5
            assert len(client.recommend(recommend_request(users[2], 5)).candidates) == 5
    finally:
        service.stop(grace=None)


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
