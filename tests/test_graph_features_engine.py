"""The graph-feature job on Ray gives the local job's rows: exactly for ids, degrees and lists,
within 1e-6 for the aggregates, on real and synthetic graphs and on any partitioning."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import make_settings
from musae_files import prepare_all_train

from feature_repo.jobs.graph_features import GraphFeatures, build_features, compute_graph_features
from feature_repo.jobs.graph_features_ray import compute_graph_features_ray, ranges_of_work
from friendrec.data.canonical import load_prepared, prepare
from friendrec.paths import DatasetPaths

pytestmark = pytest.mark.usefixtures("ray_engine")

EXACT = ("user_ids", "degree", "friend_offsets", "friend_values", "nbr_offsets", "nbr_ids")


def assert_same_features(local: GraphFeatures, ray: GraphFeatures) -> None:
    for name in EXACT:
        np.testing.assert_array_equal(getattr(local, name), getattr(ray, name), err_msg=name)
    np.testing.assert_allclose(ray.nbr_weights, local.nbr_weights, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ray.nbr_profile_mean, local.nbr_profile_mean, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("dataset", "partitions"), [("twitch/ENGB", 7), ("synthetic:4000", 3)])
def test_ray_job_equals_local_job(tmp_path, dataset, partitions):
    """The Ray job reads the friendships file itself, in row-group slices (here small row groups,
    so that every slice routes edges to several user ranges), from a driver that loaded the users
    only, and gives the local job's rows."""
    settings = make_settings(tmp_path / "work", engine={"partitions": partitions})
    prepare(settings, dataset)
    paths = DatasetPaths.of(settings, dataset)
    data = load_prepared(paths)
    as_of = data.meta.train_cutoff_ts - 30 * 86_400  # the cutoff filter is the tasks' too
    local = compute_graph_features(data, as_of, settings, show_progress=False)
    sliced = tmp_path / "friendships.parquet"
    pq.write_table(pq.read_table(paths.friendships), sliced, row_group_size=5_000)
    assert pq.ParquetFile(sliced).metadata.num_row_groups >= 7
    users_only = load_prepared(paths, friendships=False)
    with pytest.raises(RuntimeError, match="without its friendships"):
        users_only.edges("train")
    ray = compute_graph_features_ray(users_only, sliced, as_of, settings, show_progress=False)
    assert 0 < local.degree.sum() < 2 * len(data.edges("train")[0])
    assert_same_features(local, ray)


def test_more_partitions_than_users(tmp_path):
    settings, data = prepare_all_train(
        tmp_path, [(0, 1), (0, 2), (1, 2), (2, 3)], {0: [1, 2], 1: [2], 2: [1], 3: [4], 4: [5]}, 5
    )
    settings = settings.model_copy(
        update={"engine": settings.engine.model_copy(update={"partitions": 16})}
    )
    local = compute_graph_features(data, 2**40, settings, show_progress=False)
    friendships = DatasetPaths.of(settings, data.meta.name).friendships
    ray = compute_graph_features_ray(data, friendships, 2**40, settings, False)
    assert_same_features(local, ray)


def test_ranges_cover_every_user_once_with_balanced_work():
    rng = np.random.default_rng(0)
    degree = rng.zipf(2.0, size=5000).clip(max=400)
    indptr = np.concatenate([[0], np.cumsum(degree)])
    indices = rng.integers(0, 5000, size=indptr[-1])
    bags = rng.integers(1, 30, size=5000)
    rows = np.repeat(np.arange(5000), degree)
    ranges = ranges_of_work(np.bincount(rows, weights=1.0 + bags[indices], minlength=5000), 8)
    assert ranges[0][0] == 0 and ranges[-1][1] == 5000
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    work = np.bincount(rows, weights=1.0 + bags[indices], minlength=5000) + 1.0
    share = np.array([work[lo:hi].sum() for lo, hi in ranges]) / work.sum()
    assert 6 <= len(ranges) <= 9
    assert share.max() < 2.5 / len(ranges)


def test_build_with_ray_writes_the_local_snapshots(tmp_path):
    """Delta snapshots through either engine give byte-identical offline sources."""
    tables = {}
    for engine in ("local", "ray"):
        settings = make_settings(tmp_path / engine, engine={"partitions": 4})
        meta = prepare(settings, "twitch/PTBR")
        first = meta.timeline_start + 200 * 86_400
        for as_of in (first, meta.train_cutoff_ts):
            build_features(settings, "twitch/PTBR", as_of=as_of, show_progress=False, engine=engine)
        tables[engine] = pq.read_table(DatasetPaths.of(settings, "twitch/PTBR").graph_source)
    assert tables["local"].num_rows > meta.num_users  # a second, delta snapshot was appended
    assert tables["ray"].equals(tables["local"])
