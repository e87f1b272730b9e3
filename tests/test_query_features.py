"""The serving feature path for users Feast does not know: request features and friend
aggregates computed exactly as the batch graph-feature job computes them."""

from __future__ import annotations

import numpy as np
import pytest
from contracts import tagged, twitch_like

from friendrec.config import load_settings
from friendrec.data.canonical import load_prepared
from friendrec.feast_store import online_features, open_store
from friendrec.friend_aggregates import RequestFeatures, friend_aggregates
from friendrec.paths import DatasetPaths, load_contract
from friendrec.sampling import sample_friends
from training.features import InputSpec, fetch_query_inputs

SPEC_FANOUT = 5


def _train_friends(settings) -> dict[int, np.ndarray]:
    data = load_prepared(DatasetPaths.of(settings, "twitch/ENGB"))
    src, dst = data.edges("train")
    both_src, both_dst = np.concatenate([src, dst]), np.concatenate([dst, src])
    order = np.argsort(both_src, kind="stable")
    users, starts = np.unique(both_src[order], return_index=True)
    groups = np.split(both_dst[order], starts[1:])
    return dict(zip(users.tolist(), groups, strict=True))


def test_friend_aggregates_equal_the_batch_job(engb_store):
    store = open_store(engb_store, "twitch/ENGB")
    friends_of = _train_friends(engb_store)
    by_degree = sorted(friends_of, key=lambda u: len(friends_of[u]))
    users = [
        *by_degree[:5],
        *by_degree[len(by_degree) // 2 : len(by_degree) // 2 + 5],
        *by_degree[-3:],
    ]
    c = load_contract(engb_store, "twitch/ENGB")
    stored = {row["user_id"]: row for row in online_features(store, users, contract=c)}
    for user in users:
        friends = friends_of[user]
        read = online_features(store, friends.tolist(), contract=c)
        rows = {r["user_id"]: r for r in read if r["known"]}
        got = friend_aggregates(
            user, friends, rows, engb_store.features, engb_store.data.seed, contract=c
        )
        want = stored[user]
        assert got["degree"] == want["degree"] == len(friends)
        assert got["friend_ids"] == list(want["friend_ids"])
        assert got["nbr_sparse_ids"] == list(want["nbr_sparse_ids"]), user
        np.testing.assert_allclose(got["nbr_sparse_weights"], want["nbr_sparse_weights"], rtol=1e-5)
        np.testing.assert_allclose(got["nbr_profile_mean"], want["nbr_profile_mean"], atol=1e-5)


@pytest.mark.parametrize("make", [twitch_like, tagged])
def test_friend_aggregates_on_a_hand_made_neighbourhood(make):
    """Bags normalised per friend, summed, ties broken by the smaller id, a duplicate id counted
    twice, a friend without a row counted in the degree only; the profile mean is the contract's
    transform of the friends' scalars, summed and divided by the full degree."""
    c = make()
    features = load_settings().features.model_copy(update={"nbr_sparse_cap": 3})
    profiles = {f: [float(f + j) for j in range(len(c.profile_scalars))] for f in range(1, 5)}
    rows = {
        f: {**dict(zip(c.profile_scalar_names, profiles[f], strict=True)), "sparse_ids": ids}
        for f, ids in {1: [7, 2], 2: [2, 7], 3: [9, 9, 4, 4], 4: []}.items()
    }
    got = friend_aggregates(0, [1, 2, 3, 4, 5], rows, features, seed=0, contract=c)
    # 2 and 7: 0.5 + 0.5; 4 and 9: 0.25 + 0.25; degree 5
    assert got["degree"] == 5
    assert got["nbr_sparse_ids"] == [2, 7, 4]
    assert got["nbr_sparse_weights"] == np.float32([0.2, 0.2, 0.1]).tolist()
    want = c.transform_profile([profiles[f] for f in range(1, 5)]).sum(axis=0) / np.float32(5)
    assert got["nbr_profile_mean"] == want.tolist()
    assert len(got["nbr_profile_mean"]) == len(c.profile_scalars)
    lonely = friend_aggregates(0, [], {}, features, seed=0, contract=c)
    assert lonely["degree"] == 0 and lonely["nbr_sparse_ids"] == lonely["friend_ids"] == []
    assert lonely["nbr_profile_mean"] == [0.0] * len(c.profile_scalars)


def test_request_features_reproduce_a_known_users_inputs(engb_store):
    """An unknown id sent with a known user's profile and friends gets that user's features."""
    store = open_store(engb_store, "twitch/ENGB")
    spec = InputSpec.from_settings(engb_store, vocab_size=0, fanout=SPEC_FANOUT)
    friends_of = _train_friends(engb_store)
    user = max(friends_of, key=lambda u: len(friends_of[u]) if len(friends_of[u]) < 40 else 0)
    c = load_contract(engb_store, "twitch/ENGB")
    (row,) = online_features(store, [user], contract=c)
    request = RequestFeatures(
        profile={n: row[n] for n in c.profile_scalar_names},
        sparse_ids=row["sparse_ids"],
        friend_ids=friends_of[user].tolist(),
    )
    new_id = 10**12
    query = fetch_query_inputs(
        store,
        [user, new_id, new_id + 1],
        spec,
        {new_id: request, user: RequestFeatures()},  # ignored for the known user
        engb_store.features,
        engb_store.data.seed,
        contract=c,
    )
    assert query.known.tolist() == [True, False, False]
    assert query.used_request_features.tolist() == [False, True, False]
    # Everything but the friend sample equals the known user's inputs (the sample is hashed
    # with the user's own id, so a new id gets its own sample of the same friends).
    for name in ("profile", "sparse_ids", "nbr_ids", "nbr_weights", "nbr_profile", "degree"):
        value = query.inputs[f"self_{name}"]
        np.testing.assert_allclose(value[1], value[0], rtol=1e-5, atol=1e-6, err_msg=name)
    sample = sample_friends(engb_store.data.seed, new_id, friends_of[user], spec.friend_len)
    assert query.friend_ids[1].tolist() == sample.tolist()
    assert query.inputs["self_friend_ids"][1].tolist() == sample.tolist()
    assert query.inputs["friend_user_id"][1].tolist() == sample[:SPEC_FANOUT].tolist()
    assert query.inputs["self_degree"][2] == 0 and query.inputs["friend_mask"][2].sum() == 0


def test_request_features_are_validated():
    c = twitch_like()
    with pytest.raises(ValueError, match="unknown profile feature"):
        RequestFeatures(profile={"followers": 3.0}).check(c)
    with pytest.raises(ValueError, match="unknown profile feature"):
        RequestFeatures(profile={"views": 3.0}).check(tagged())  # another schema's name
    assert RequestFeatures(profile={"views": 3.0}).check(c).profile == {"views": 3.0}
    with pytest.raises(ValueError, match="sparse_ids"):
        RequestFeatures(sparse_ids=[-4])
