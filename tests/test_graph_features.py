"""The graph-feature job: hand-computed values, leakage, delta snapshots."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
from musae_files import prepare_all_train

from feature_repo.jobs.graph_features import (
    build_features,
    compute_graph_features,
    features_from_table,
    latest_rows,
)
from friendrec.data.canonical import load_prepared, prepare
from friendrec.paths import DatasetPaths
from friendrec.sampling import sample_friends

TINY_EDGES = [(0, 1), (0, 2), (1, 2), (2, 3)]
TINY_FEATURES = {0: [1, 2], 1: [2, 3], 2: [1], 3: [4], 4: [5]}


@pytest.fixture
def tiny(tmp_path):
    return prepare_all_train(tmp_path, TINY_EDGES, TINY_FEATURES, num_users=5)


def _rows(features):
    table = features.to_table(0).to_pylist()
    return {row["user_id"]: row for row in table}


def test_hand_computed_small_graph(tiny):
    settings, data = tiny
    rows = _rows(compute_graph_features(data, 2**40, settings, show_progress=False))
    assert {u: r["degree"] for u, r in rows.items()} == {0: 2, 1: 2, 2: 3, 3: 1, 4: 0}
    assert {u: sorted(r["friend_ids"]) for u, r in rows.items()} == {
        0: [1, 2],
        1: [0, 2],
        2: [0, 1, 3],
        3: [2],
        4: [],
    }
    # User 2's friends carry bags 0:[1,2] 1:[2,3] 3:[4], each normalised to sum 1:
    # id1 1/2, id2 1/2 + 1/2, id3 1/2, id4 1, all over 3 friends; heaviest first, ties by id.
    assert rows[2]["nbr_sparse_ids"] == [2, 4, 1, 3]
    np.testing.assert_allclose(rows[2]["nbr_sparse_weights"], [1 / 3, 1 / 3, 1 / 6, 1 / 6])
    # User 0's friends: 1:[2,3] and 2:[1] -> id1 1, id2 1/2, id3 1/2, over 2 friends.
    assert rows[0]["nbr_sparse_ids"] == [1, 2, 3]
    np.testing.assert_allclose(rows[0]["nbr_sparse_weights"], [0.5, 0.25, 0.25])
    for row in rows.values():  # the mean of normalised bags sums to 1 (0 without friends)
        assert sum(row["nbr_sparse_weights"]) == pytest.approx(1.0 if row["degree"] else 0.0)
    assert rows[4]["nbr_sparse_ids"] == [] and rows[4]["nbr_sparse_weights"] == []

    # Profiles written by musae_files: days = 100 (u + 1), views = 10 u, mature = u odd, never a
    # partner: the Twitch contract's four scalars, the first two log1p'd.
    assert data.contract.profile_scalar_names == (
        "account_age_days",
        "views",
        "is_mature",
        "is_partner",
    )

    def profile(u):
        return [np.log1p(100 * (u + 1)), np.log1p(10 * u), float(u % 2), 0.0]

    np.testing.assert_allclose(rows[3]["nbr_profile_mean"], profile(2), rtol=1e-6)
    expected_0 = (np.array(profile(1)) + np.array(profile(2))) / 2
    np.testing.assert_allclose(rows[0]["nbr_profile_mean"], expected_0, rtol=1e-6)
    assert rows[4]["nbr_profile_mean"] == [0.0] * len(data.contract.profile_scalars)


def test_friend_cap_uses_the_shared_deterministic_sample(tiny):
    settings, data = tiny
    capped = settings.model_copy(
        update={"features": settings.features.model_copy(update={"friend_cap": 2})}
    )
    rows = _rows(compute_graph_features(data, 2**40, capped, show_progress=False))
    expected = sample_friends(settings.data.seed, 2, np.array([0, 1, 3]), 2).tolist()
    assert rows[2]["friend_ids"] == expected
    assert rows[2]["degree"] == 3  # the degree counts every friend, not the sample


def test_no_held_out_friendship_reaches_any_feature(settings):
    prepare(settings, "twitch/ENGB")
    data = load_prepared(DatasetPaths.of(settings, "twitch/ENGB"))
    late = 2**40  # even "as of" the far future only training edges count
    features = compute_graph_features(data, late, settings, show_progress=False)
    # 1. The same features from a copy of the data whose held-out edges are deleted.
    train = data.split == 0
    train_only = replace(
        data,
        src=data.src[train],
        dst=data.dst[train],
        created_ts=data.created_ts[train],
        split=data.split[train],
    )
    reference = compute_graph_features(train_only, late, settings, show_progress=False)
    np.testing.assert_array_equal(features.fingerprints(), reference.fingerprints())
    # 2. Directly: no held-out pair appears in either friend list; degrees count train only.
    rows = _rows(features)
    held = np.flatnonzero(~train)
    assert held.size == 5298
    for i in held:
        u, v = int(data.src[i]), int(data.dst[i])
        assert v not in rows[u]["friend_ids"] and u not in rows[v]["friend_ids"]
    degree = np.bincount(
        np.concatenate([data.src[train], data.dst[train]]), minlength=len(data.user_ids)
    )
    np.testing.assert_array_equal(features.degree, degree)


def test_snapshots_are_deltas_idempotent_and_time_ordered(settings):
    meta = prepare(settings, "twitch/PTBR")
    paths = DatasetPaths.of(settings, "twitch/PTBR")
    data = load_prepared(paths)
    t1 = meta.timeline_start + 200 * 86_400
    t2 = meta.train_cutoff_ts
    first = build_features(settings, "twitch/PTBR", as_of=t1, show_progress=False)
    assert first.rows_written == meta.num_users
    second = build_features(settings, "twitch/PTBR", as_of=t2, show_progress=False)
    # A user's graph features change exactly when one of its own friendships is new.
    new = (data.split == 0) & (data.created_ts > t1) & (data.created_ts <= t2)
    touched = np.unique(np.concatenate([data.src[new], data.dst[new]]))
    assert second.rows_written == touched.size > 0
    table = pq.read_table(paths.graph_source)
    assert table.num_rows == meta.num_users + touched.size
    # The latest row of every user equals a fresh full computation as of t2.
    latest = features_from_table(latest_rows(table), data.contract)
    fresh = compute_graph_features(data, t2, settings, show_progress=False)
    np.testing.assert_array_equal(latest.fingerprints(), fresh.fingerprints())
    # Re-running the same snapshot rewrites the same rows.
    build_features(settings, "twitch/PTBR", as_of=t2, show_progress=False)
    assert pq.read_table(paths.graph_source).equals(table)
    with pytest.raises(ValueError, match="append-only in time order"):
        build_features(settings, "twitch/PTBR", as_of=t1, show_progress=False)
