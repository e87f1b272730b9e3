"""The streaming chain with Redis as the Feast online store, and so as the friend-set store too
(``friendrec.friend_sets.open_state`` follows it): the same real services and workers as
``test_streaming`` (whose ``stack`` fixture is reused as is), pointed at a real redis-server
through the environment (``FRIENDREC_FEATURES__*``), which every ``load_settings`` reads."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import redis
from test_streaming import (
    Stack,
    _rows_match,
    assert_online_equals_batch,
    batch_graph_rows,
    degrees,
    dependents,
    milvus_matches_model,
    remove_and_update_profile,
    wait_for,
)
from test_streaming import stack as streaming_stack  # noqa: F401  (the fixture, for redis_stack)

from friendrec import contract
from friendrec.friend_sets import open_state, state_path
from friendrec.friend_sets_redis import RedisFriendState
from friendrec.local_services import redis_server
from friendrec.paths import DatasetPaths

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def redis_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server for the module (``conftest.redis_url`` is per test), made the online
    store of every settings loaded meanwhile. Set up before ``streaming_stack`` (which loads its
    settings from the environment) and torn down after it (its workers talk to Redis)."""
    with (
        redis_server(log_dir=tmp_path_factory.mktemp("redis")) as address,
        pytest.MonkeyPatch.context() as patch,
    ):
        patch.setenv("FRIENDREC_FEATURES__ONLINE_STORE", "redis")
        patch.setenv("FRIENDREC_FEATURES__REDIS_CONNECTION_STRING", address)
        yield address


@pytest.fixture(scope="module")
def redis_stack(redis_address: str, streaming_stack: Stack) -> Stack:  # noqa: F811
    features = streaming_stack.settings.features
    assert (features.online_store, features.redis_connection_string) == ("redis", redis_address)
    return streaming_stack


def friend_sets(stack: Stack, users: list[int]) -> dict[int, list[int]]:
    state = open_state(stack.settings, seed_if_empty=False)
    try:
        assert isinstance(state, RedisFriendState)
        return state.friends(users)
    finally:
        state.close()


def raw_friend_set(address: str, user: int) -> set[int]:
    """``user``'s friends as stored in the redis-server itself (whatever the key's namespace)."""
    host, _, port = address.rpartition(":")
    client = redis.Redis(host=host, port=int(port))
    try:
        (key,) = client.scan_iter(f"*:friends:{user}", count=10_000)
        return {int(f) for f in client.smembers(key)}
    finally:
        client.close()


def test_new_friendship_reaches_redis_features_state_and_milvus(
    redis_stack: Stack, redis_address: str
):
    stack = redis_stack
    ((u, v),) = stack.fresh_pairs(1).tolist()
    before = degrees(stack, [u, v])
    friends_before = friend_sets(stack, [u, v])
    assert v not in friends_before[u] and u not in friends_before[v]
    # The state was seeded from the training graph: the materialized degrees count it.
    assert before == {u: len(friends_before[u]), v: len(friends_before[v])}
    with stack.index() as index:
        old = index.get_vectors(index.alias, [u])[u]
    stack.add(np.array([[u, v]]))

    wait_for(
        "the online degrees", lambda: degrees(stack, [u, v]) == {u: before[u] + 1, v: before[v] + 1}
    )
    # (b) The Redis friend state holds the new friendship both ways, and nothing else changed.
    assert friend_sets(stack, [u, v]) == {
        u: sorted([*friends_before[u], v]),
        v: sorted([*friends_before[v], u]),
    }
    assert raw_friend_set(redis_address, u) == {*friends_before[u], v}
    # Nothing fell back to sqlite: neither the online store nor the friend state.
    assert stack.store().config.online_store.type == "redis"
    assert not DatasetPaths.of(stack.settings).feast_online_sqlite.exists()
    assert not state_path(stack.settings).exists()
    # (a) The Redis online rows equal the batch job's rows recomputed from scratch with the edge.
    expected = batch_graph_rows(stack.settings, stack.all_streamed(), stack.profiles)
    fanout = stack.models.settings.training.fanout
    neighbours = [int(f) for f in expected[u][contract.FRIEND_IDS.name][:fanout]]
    assert_online_equals_batch(stack, sorted({u, v, *neighbours}), expected)
    # (c) Milvus holds what the model computes on those features, for the endpoints and every
    # user whose second layer reads one of them.
    users = sorted({u, v, *dependents(stack, {u, v}, fanout)})
    wait_for("fresh embeddings in Milvus", lambda: milvus_matches_model(stack, users))
    with stack.index() as index:
        new = index.get_vectors(index.alias, [u])[u]
    assert np.abs(new - old).max() > 1e-4  # it really changed


def test_removal_and_profile_update_reach_redis_features_state_and_milvus(redis_stack: Stack):
    stack = redis_stack
    (u, v), (p, _) = stack.fresh_pairs(2).tolist()
    initial = degrees(stack, [u, v])
    stack.add(np.array([[u, v]]))
    # Both sides: the mirror is keyed by v, another partition, possibly a later batch.
    wait_for("the add", lambda: degrees(stack, [u, v]) == {w: initial[w] + 1 for w in (u, v)})
    assert v in friend_sets(stack, [u])[u]
    remove_and_update_profile(stack, (u, v), p, {"views": 54321.0, "is_partner": 1.0})
    state = friend_sets(stack, [u, v, p])
    assert v not in state[u] and u not in state[v]
    assert degrees(stack, [u, v, p]) == {w: len(state[w]) for w in (u, v, p)}
    # The rows of u, v, p and p's friends (whose aggregates read p's new profile) equal the
    # batch job's; then Milvus holds what the model computes on them.
    expected = batch_graph_rows(stack.settings, stack.all_streamed(), stack.profiles)
    users = sorted({u, v, p, *state[p]})
    wait_for("the friends' rows", lambda: _rows_match(stack, users, expected))
    assert_online_equals_batch(stack, users, expected)
    fanout = stack.models.settings.training.fanout
    users = sorted(set(users) | set(dependents(stack, set(users), fanout)))
    wait_for("their embeddings", lambda: milvus_matches_model(stack, users))
