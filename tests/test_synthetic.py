"""The synthetic generator: invariants, determinism, and the shape that makes it worth using.

Shape tests come with a control (the same generator with the property switched off) that fails
the same assertion, so each threshold is shown to discriminate rather than hold by construction.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from friendrec.data.graph import RawGraph
from friendrec.data.synthetic import SCALARS, _generate, generate_synthetic

N = 10_000


@pytest.fixture(scope="module")
def graph() -> RawGraph:
    return generate_synthetic(N, seed=7)


def _degrees(g: RawGraph) -> np.ndarray:
    return np.bincount(np.concatenate([g.src, g.dst]), minlength=g.num_users)


def _tail_stats(g: RawGraph) -> tuple[float, float]:
    """(max degree / median degree, share of edge endpoints held by the top 1% of users)."""
    deg = _degrees(g)
    top = np.sort(deg)[::-1][: max(1, g.num_users // 100)]
    return deg.max() / max(np.median(deg), 1.0), top.sum() / deg.sum()


def _mean_jaccard(g: RawGraph, a: np.ndarray, b: np.ndarray) -> float:
    """Mean Jaccard similarity of the sparse-id sets of users ``a[k]`` and ``b[k]`` (vectorised)."""
    off, val, v = g.sparse_offsets, g.sparse_values, g.vocab_size
    sizes = np.diff(off)
    owner = np.repeat(np.arange(g.num_users), sizes)
    member = np.sort(owner * v + val)  # (user, id) keys
    lens = sizes[a]
    pair = np.repeat(np.arange(a.size), lens)
    within = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
    probe = b[pair] * v + val[off[a][pair] + within]
    pos = np.minimum(np.searchsorted(member, probe), member.size - 1)
    inter = np.bincount(pair, weights=member[pos] == probe, minlength=a.size)
    union = sizes[a] + sizes[b] - inter
    return float(np.mean(inter / union))


def _homophily_ratio(g: RawGraph, seed: int = 0) -> float:
    """Mean sparse-id Jaccard over friend pairs divided by that over random pairs."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, g.num_users, 20_000)
    b = (a + rng.integers(1, g.num_users, a.size)) % g.num_users  # never a == b
    return _mean_jaccard(g, g.src, g.dst) / _mean_jaccard(g, a, b)


def test_invariants(graph: RawGraph) -> None:
    graph.check()
    n = graph.num_users
    assert graph.name == f"synthetic:{N}"
    assert graph.user_ids.dtype == np.int64
    np.testing.assert_array_equal(graph.user_ids, np.arange(N))
    assert graph.vocab_size == 4096
    assert "seed=7" in graph.sources["generator"]

    src, dst = graph.src, graph.dst
    assert src.dtype == np.int64 and dst.dtype == np.int64
    assert np.all(src < dst)  # canonical, hence no self loops
    assert src.min() >= 0 and dst.max() < n
    keys = src * n + dst
    assert np.unique(keys).size == keys.size

    off, val = graph.sparse_offsets, graph.sparse_values
    assert off.dtype == np.int64 and val.dtype == np.int64
    assert off.shape == (n + 1,) and off[0] == 0 and off[-1] == val.size
    sizes = np.diff(off)
    assert sizes.min() >= 1 and sizes.max() <= 30
    assert 15 <= sizes.mean() <= 25  # ~uniform 10..30 after de-duplication
    assert val.min() >= 0 and val.max() < graph.vocab_size
    owner = np.repeat(np.arange(n), sizes)
    assert np.unique(owner * graph.vocab_size + val).size == val.size  # no repeat within a user


def test_profile(graph: RawGraph) -> None:
    p = graph.profile
    assert p.dtype == np.float32 and p.shape == (N, len(SCALARS))
    assert np.isfinite(p).all()
    col = {name: p[:, j] for j, name in enumerate(SCALARS)}
    assert col["account_age_days"].min() >= 30 and col["account_age_days"].max() <= 4000
    views = col["views"]
    assert views.min() >= 0
    assert views.max() > 50 * np.median(views)  # heavy-tailed
    for flag in ("is_mature", "is_partner", "is_ml_developer"):
        assert set(np.unique(col[flag]).tolist()) == {0.0, 1.0}, flag
        assert 0.005 < col[flag].mean() < 0.3, flag
    partner = col["is_partner"]
    top = views >= np.quantile(views, 0.95)
    bottom = views <= np.median(views)
    assert partner[top].mean() > 5 * partner[bottom].mean()


def test_deterministic_per_seed() -> None:
    a = generate_synthetic(5_000, seed=3)
    b = generate_synthetic(5_000, seed=3)
    c = generate_synthetic(5_000, seed=4)
    for field in ("profile", "sparse_offsets", "sparse_values", "src", "dst"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.sources == b.sources
    assert not np.array_equal(a.src, c.src) or not np.array_equal(a.dst, c.dst)
    assert not np.array_equal(a.sparse_values, c.sparse_values)
    assert not np.array_equal(a.profile, c.profile)


@pytest.mark.parametrize(("n", "avg_degree"), [(5_000, 4.0), (N, 20.0), (20_000, 50.0)])
def test_edge_count_near_target(n: int, avg_degree: float) -> None:
    g = generate_synthetic(n, seed=1, avg_degree=avg_degree)
    target = n * avg_degree / 2
    assert abs(g.num_friendships - target) <= 0.1 * target
    assert abs(_degrees(g).mean() - avg_degree) <= 0.1 * avg_degree


def test_degree_distribution_heavy_tailed(graph: RawGraph) -> None:
    ratio, top_share = _tail_stats(graph)
    assert ratio > 10
    assert top_share > 0.05
    # Control: a near-Poisson degree law fails both thresholds.
    flat = generate_synthetic(N, seed=7, degree_exponent=12.0)
    flat_ratio, flat_share = _tail_stats(flat)
    assert flat_ratio < 10 and flat_share < 0.05


def test_friends_share_sparse_ids(graph: RawGraph) -> None:
    assert _homophily_ratio(graph) > 2.0
    # Control: with no community topics, friends are no more alike than strangers.
    plain = generate_synthetic(N, seed=7, topic_fraction=0.0)
    assert _homophily_ratio(plain) < 1.5


@pytest.mark.parametrize("intra_fraction", [0.8, 0.3])
def test_intra_community_share(intra_fraction: float) -> None:
    params = inspect.signature(generate_synthetic).parameters.values()
    kwargs = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}
    kwargs["intra_fraction"] = intra_fraction
    g, comm = _generate(N, 11, **kwargs)  # the private twin also returns the communities
    share = float(np.mean(comm[g.src] == comm[g.dst]))
    assert abs(share - intra_fraction) < 0.05


def test_community_sizes_heavy_tailed_but_capped() -> None:
    params = inspect.signature(generate_synthetic).parameters.values()
    kwargs = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY}
    kwargs["community_size"] = 50.0  # 200 communities: enough for a tail under the 5% cap
    _, comm = _generate(N, 11, **kwargs)
    sizes = np.bincount(comm)
    assert sizes.max() > 5 * np.median(sizes)
    assert sizes.max() <= 0.06 * N  # max_community_share=0.05, plus sampling noise


def test_dense_tiny_graph_is_complete() -> None:
    g = generate_synthetic(10, seed=0, avg_degree=50.0)
    g.check()
    assert g.num_friendships == 45  # clamped to n(n-1)/2, and sampling found every pair


def test_single_user() -> None:
    g = generate_synthetic(1, seed=0)
    g.check()
    assert g.num_friendships == 0 and g.sparse_offsets[-1] >= 10


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_users": 0},
        {"n_users": 10, "avg_degree": -1.0},
        {"n_users": 10, "degree_exponent": 2.0},
        {"n_users": 10, "intra_fraction": 1.5},
        {"n_users": 10, "ids_per_user": (0, 5)},
        {"n_users": 10, "vocab_size": 0},
        {"n_users": 10, "max_community_share": 0.0},
    ],
)
def test_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        generate_synthetic(**kwargs)
