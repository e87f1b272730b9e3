"""`bench views`' probes: the measures behave as their definitions say, on a tiny ENGB tower."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_models import SMALL

from bench.views import (
    _pooled,
    aux_anchor_shares,
    effective_dimension,
    model_probes,
    overlap_at_k,
    probe_views,
    view_rank,
)
from friendrec.config import Settings
from training import evaluation as ev
from training.features import sample_neighbours
from training.model import LossConfig
from training.pipeline import embed_all
from training.train import TrainingContext, make_sampler


def test_view_rank_counts_other_users_closer_than_the_own_view() -> None:
    a = np.eye(3, dtype=np.float32)
    assert view_rank(a, a).tolist() == [0.0, 0.0, 0.0]
    # Users 0 and 1: each one's first view is closer to the other's second than to its own.
    b = np.array([[0.6, 0.8, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    assert view_rank(a, b).tolist() == [0.5, 0.5, 0.0]


def test_overlap_and_effective_dimension() -> None:
    a = np.array([[1, 2, 3, 4], [5, 6, -1, -1]])
    b = np.array([[4, 3, 9, 8], [6, 7, 8, 9]])
    assert overlap_at_k(a, b).tolist() == [0.5, 0.5]
    rng = np.random.default_rng(0)
    line = rng.normal(size=(500, 1)) * np.ones((1, 8))
    assert effective_dimension(line) == pytest.approx(1.0, abs=1e-6)
    spread = rng.normal(size=(20000, 8))
    assert 7.5 < effective_dimension(spread) <= 8.0


def test_pooled_buckets_weigh_by_their_users() -> None:
    buckets = {
        "0": {"users": 1.0, "recall@50": 0.0},
        "1-2": {"users": 3.0, "recall@50": 1.0},
        "3-5": {"users": 0.0, "recall@50": float("nan")},
    }
    assert _pooled(buckets, ("0", "1-2"), "recall@50") == pytest.approx(0.75)
    assert _pooled(buckets, ("0", "3-5"), "recall@50") == pytest.approx(0.0)


@pytest.fixture(scope="module")
def tiny(engb_store: Settings) -> tuple[TrainingContext, object]:
    ctx = TrainingContext.load(engb_store.model_copy(update={"training": SMALL}), "twitch/ENGB")
    tower = ctx.build_tower(SMALL)
    tower.popularity_weight.assign(0.05)
    return ctx, tower


def test_views_without_augmentation_are_the_served_embedding(tiny) -> None:
    ctx, tower = tiny
    rows = np.arange(0, len(ctx.table), 97)
    served = embed_all(tower, ctx.table, SMALL.fanout)[rows, : tower.embedding_dim]
    none = probe_views(tower, ctx, SMALL.fanout, rows, LossConfig(feature_drop=0.0,
                       neighbour_drop=0.0), seed=1, batch=40)  # fmt: skip
    np.testing.assert_allclose(none["clean"], served, atol=1e-5)
    np.testing.assert_allclose(none["view"], served, atol=1e-5)
    np.testing.assert_allclose(none["agreement"], 1.0, atol=1e-5)
    np.testing.assert_allclose(none["stability"], 1.0, atol=1e-5)
    assert (none["view_rank"] == 0).all()
    assert (none["id_reliance"] > 1e-4).any(), "an untrained id vector moves the embedding"
    # Untrained, the sparse features weigh little, but masking them all moves the embedding.
    assert none["feature_reliance"].max() > 5e-6
    friendless = (sample_neighbours(ctx.table, rows, SMALL.fanout, None) < 0).all(axis=1)
    assert friendless.any() and not friendless.all()
    np.testing.assert_allclose(none["friend_reliance"][friendless], 0.0, atol=1e-6)
    assert (none["friend_reliance"][~friendless] > 1e-4).any()

    heavy = probe_views(tower, ctx, SMALL.fanout, rows, LossConfig(feature_drop=0.9,
                        neighbour_drop=0.9), seed=1, batch=40)  # fmt: skip
    np.testing.assert_allclose(heavy["clean"], none["clean"], atol=1e-6)
    assert heavy["agreement"].mean() < 0.999 and heavy["stability"].mean() < 0.999
    np.testing.assert_allclose(heavy["id_reliance"], none["id_reliance"], atol=1e-6)


def test_model_probes_score_the_views_queries_against_the_served_index(tiny) -> None:
    ctx, tower = tiny
    valset = ev.EvalSet.from_prepared(ctx.data, "val")
    exact = LossConfig(feature_drop=0.0, neighbour_drop=0.0)
    probes, dim = model_probes(ctx, tower, SMALL.fanout, valset, exact, seed=0)
    assert set(probes) >= {"recall@50", "view_recall@50", "overlap@50", "agreement"}
    assert all(len(v) == valset.num_queries for v in probes.values())
    # Unaugmented views are the served queries: the same lists, the same recall.
    np.testing.assert_allclose(probes["overlap@50"], 1.0)
    np.testing.assert_allclose(probes["view_recall@50"], probes["recall@50"])
    # Of the unit embeddings alone: the popularity column is not a direction of the index.
    unit = embed_all(tower, ctx.table, SMALL.fanout)[:, : tower.embedding_dim]
    assert dim == pytest.approx(effective_dimension(unit), rel=1e-6)
    augmented, _ = model_probes(ctx, tower, SMALL.fanout, valset, LossConfig(), seed=0)
    assert augmented["overlap@50"].mean() < 1.0
    np.testing.assert_allclose(augmented["recall@50"], probes["recall@50"])
    # Without the user-id vector the query moves: a tower without one has nothing to drop.
    assert (probes["id_reliance"] > 1e-4).any()
    no_ids = SMALL.model_copy(update={"id_dim": 0})
    plain = ctx.build_tower(no_ids)
    plain_probes, _ = model_probes(ctx, plain, SMALL.fanout, valset, exact, seed=0)
    np.testing.assert_allclose(plain_probes["no_id_recall@50"], plain_probes["recall@50"])
    np.testing.assert_allclose(plain_probes["id_reliance"], 0.0, atol=1e-6)


def test_aux_anchor_shares_are_whom_the_training_batches_draw(tiny) -> None:
    """``pairs``: an epoch's anchors (every directed training friendship once) fall in each
    degree bucket as the probe says; ``uniform``: each user once."""
    shares = aux_anchor_shares(np.array([0, 1, 2, 3, 10]))
    assert shares["0"] == {"pairs": 0.0, "uniform": pytest.approx(0.2)}
    assert shares["1-2"] == {"pairs": pytest.approx(3 / 16), "uniform": pytest.approx(0.4)}
    assert shares["6-20"] == {"pairs": pytest.approx(10 / 16), "uniform": pytest.approx(0.2)}
    assert shares[">20"] == {"pairs": 0.0, "uniform": 0.0}
    ctx, _ = tiny
    sampler = make_sampler(ctx, SMALL)
    anchors, _ = sampler.pairs(np.arange(sampler.num_pairs))
    valset = ev.EvalSet.from_prepared(ctx.data, "val")
    degree = valset.train_degree[anchors]
    got = aux_anchor_shares(valset.train_degree)
    for label, lo, hi in ev.DEGREE_BUCKETS:
        drawn = (degree >= lo) & (degree <= (hi if hi is not None else degree.max()))
        assert got[label]["pairs"] == pytest.approx(drawn.mean(), abs=1e-9), label
    assert got["0"]["uniform"] > 0 and got["0"]["pairs"] == 0.0
