"""A seeded synthetic social graph, shaped like the real ones, for tests and benchmarks.

Why not a uniform random graph: the pipeline's costs and the model's signal both depend on shape.
Hubs (a heavy-tailed degree distribution) dominate neighbour fan-out, feature-job skew and
negative sampling; communities with homophilous features are what a GraphSAGE tower learns from.
So the generator plants both, and a test or benchmark on it exercises the same paths as MUSAE data.

Model, all vectorised numpy:

* Communities: ``n_users / community_size`` of them, sizes heavy-tailed (Pareto weights, the
  largest capped at ``max_community_share`` of the users).
* Degrees: Chung-Lu. Each user gets an expected degree from a power law with exponent
  ``degree_exponent`` (capped at ``max_degree``); an edge joins two users with probability
  proportional to the product of their weights. A share ``intra_fraction`` of each user's expected
  degree is spent inside its community (capped at half the community, since one cannot have more
  friends there than there are members), the rest across the whole graph.
* Sparse ids: each community has a topic (``topic_size`` ids, Zipf-weighted); a user draws
  ``ids_per_user`` ids, a share ``topic_fraction`` from its topic, the rest from a global Zipf.
* Profile scalars (``SCALARS`` order): views follow degree (popular users are watched), partners
  are mostly high-view users, mature / ML-developer flags vary by community.

``write_synthetic_tables`` writes a graph as a team would hand it over (parquet users with a string
``country`` per community and string ``interests`` tags, parquet friendships); the shipped schema
``feature_repo/schemas/synthetic.yaml`` reads them back through the generic ingestion.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from friendrec.data.graph import RawGraph, sparse_list_array

# The generator's profile columns, in the order of ``RawGraph.profile``.
SCALARS = ("account_age_days", "views", "is_mature", "is_partner", "is_ml_developer")

_CHUNK = 1 << 22  # endpoint samples per chunk: bounds the temporaries at ~100 MB
_MAX_ROUNDS = 30  # top-up rounds; only near-complete tiny graphs need more than two or three


def generate_synthetic(
    n_users: int,
    seed: int = 42,
    *,
    avg_degree: float = 20.0,
    vocab_size: int = 4096,
    community_size: float = 200.0,
    community_alpha: float = 1.5,
    max_community_share: float = 0.05,
    degree_exponent: float = 2.5,
    max_degree: int | None = None,
    intra_fraction: float = 0.8,
    ids_per_user: tuple[int, int] = (10, 30),
    topic_size: int = 32,
    topic_fraction: float = 0.7,
    zipf_exponent: float = 1.1,
) -> RawGraph:
    """A synthetic ``RawGraph`` with ``n_users`` users and ~``n_users * avg_degree / 2`` edges.

    Deterministic for a given ``seed`` and parameters. ``community_size`` is the mean community
    size (``community_alpha`` the Pareto tail of the sizes, smaller is heavier; no community
    holds more than ``max_community_share`` of the users unless there are too few); the degree
    distribution follows a power law with exponent ``degree_exponent`` (> 2, so the mean exists),
    capped at ``max_degree`` (default ``max(10 * avg_degree, sqrt(n_users * avg_degree))``).
    Each user owns a uniform count in ``ids_per_user`` (inclusive) of distinct sparse ids in
    ``[0, vocab_size)``, fewer only when its draws keep repeating. The edge count equals the
    target unless the graph is so dense that sampling cannot find enough distinct pairs.
    """
    graph, _ = _generate(
        n_users,
        seed,
        avg_degree=avg_degree,
        vocab_size=vocab_size,
        community_size=community_size,
        community_alpha=community_alpha,
        max_community_share=max_community_share,
        degree_exponent=degree_exponent,
        max_degree=max_degree,
        intra_fraction=intra_fraction,
        ids_per_user=ids_per_user,
        topic_size=topic_size,
        topic_fraction=topic_fraction,
        zipf_exponent=zipf_exponent,
    )
    return graph


def _generate(
    n_users: int,
    seed: int,
    *,
    avg_degree: float,
    vocab_size: int,
    community_size: float,
    community_alpha: float,
    max_community_share: float,
    degree_exponent: float,
    max_degree: int | None,
    intra_fraction: float,
    ids_per_user: tuple[int, int],
    topic_size: int,
    topic_fraction: float,
    zipf_exponent: float,
) -> tuple[RawGraph, np.ndarray]:
    """``generate_synthetic`` plus each user's community (int64 [n]), which tests check."""
    lo_ids, hi_ids = ids_per_user
    if n_users < 1:
        raise ValueError(f"n_users must be >= 1, got {n_users}")
    if avg_degree < 0:
        raise ValueError(f"avg_degree must be >= 0, got {avg_degree}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if degree_exponent <= 2:
        raise ValueError(f"degree_exponent must be > 2 (finite mean), got {degree_exponent}")
    if not (0.0 <= intra_fraction <= 1.0 and 0.0 <= topic_fraction <= 1.0):
        raise ValueError("intra_fraction and topic_fraction must lie in [0, 1]")
    if not 1 <= lo_ids <= hi_ids:
        raise ValueError(f"ids_per_user must satisfy 1 <= lo <= hi, got {ids_per_user}")
    if community_size < 1 or community_alpha <= 0 or topic_size < 1:
        raise ValueError("community_size and topic_size must be >= 1, community_alpha > 0")
    if not 0.0 < max_community_share <= 1.0:
        raise ValueError(f"max_community_share must lie in (0, 1], got {max_community_share}")

    rng = np.random.default_rng(seed)
    n = int(n_users)

    # Communities: Pareto weights give a heavy-tailed size distribution.
    k = max(1, round(n / community_size))
    comm_w = rng.pareto(community_alpha, k) + 1.0
    # Cap the tail: one community holding most users is a population, not a community, and it
    # would make random pairs look like friends.
    share_cap = max(max_community_share, 2.0 / k)
    for _ in range(10):
        np.minimum(comm_w, share_cap * comm_w.sum(), out=comm_w)
    comm = rng.choice(k, size=n, p=comm_w / comm_w.sum()).astype(np.int64)
    comm_count = np.bincount(comm, minlength=k)

    # Expected degrees: power law, capped, rescaled towards the target mean.
    default_cap = max(10 * avg_degree, np.sqrt(n * avg_degree))
    cap = float(max_degree) if max_degree is not None else default_cap
    cap = min(cap, n - 1.0)
    theta = rng.pareto(degree_exponent - 1.0, n) + 1.0
    deg = theta * (avg_degree / theta.mean())
    for _ in range(3):
        np.minimum(deg, cap, out=deg)
        total = deg.sum()
        if total > 0:
            deg *= avg_degree * n / total
    np.minimum(deg, cap, out=deg)
    intra_w = _intra_weights(deg, 0.5 * (comm_count[comm] - 1.0), intra_fraction)
    inter_w = deg - intra_w

    target = min(round(n * avg_degree / 2), n * (n - 1) // 2)
    keys = _sample_edges(rng, n, comm, intra_w, inter_w, target)
    src = keys // n
    dst = keys % n

    offsets, values = _sparse_ids(
        rng, comm, k, vocab_size, ids_per_user, topic_size, topic_fraction, zipf_exponent
    )
    profile = _profile(rng, comm, k, deg, avg_degree)

    params = (
        f"n_users={n}, seed={seed}, avg_degree={avg_degree}, vocab_size={vocab_size}, "
        f"community_size={community_size}, community_alpha={community_alpha}, "
        f"max_community_share={max_community_share}, "
        f"degree_exponent={degree_exponent}, max_degree={max_degree}, "
        f"intra_fraction={intra_fraction}, ids_per_user={tuple(ids_per_user)}, "
        f"topic_size={topic_size}, topic_fraction={topic_fraction}, zipf_exponent={zipf_exponent}"
    )
    graph = RawGraph(
        name=f"synthetic:{n_users}",
        user_ids=np.arange(n, dtype=np.int64),
        profile=profile,
        sparse_offsets=offsets,
        sparse_values=values,
        src=src,
        dst=dst,
        vocab_size=int(vocab_size),
        sources={"generator": f"friendrec.data.synthetic.generate_synthetic({params})"},
    )
    graph.check()
    return graph, comm


def _intra_weights(deg: np.ndarray, room: np.ndarray, intra_fraction: float) -> np.ndarray:
    """Each user's expected intra-community degree: ``min(f * deg, room)``, overall share kept.

    ``room`` (half the community) caps hubs in small communities, whose excess goes across
    communities; bisection on ``f`` in ``[intra_fraction, 1]`` lets the other users make up for
    it, so the graph-wide intra share stays ``intra_fraction`` whenever the rooms allow it.
    """
    want = intra_fraction * deg.sum()
    lo, hi = intra_fraction, 1.0
    if np.minimum(hi * deg, room).sum() <= want:
        lo = hi
    for _ in range(40):
        if hi - lo < 1e-9:
            break
        mid = 0.5 * (lo + hi)
        if np.minimum(mid * deg, room).sum() < want:
            lo = mid
        else:
            hi = mid
    return np.minimum(lo * deg, room)


def _sample_edges(
    rng: np.random.Generator,
    n: int,
    comm: np.ndarray,
    intra_w: np.ndarray,
    inter_w: np.ndarray,
    target: int,
) -> np.ndarray:
    """Exactly ``target`` distinct canonical pair keys ``src * n + dst`` (fewer only if too dense).

    Samples Chung-Lu edges in rounds, de-duplicates with ``np.unique`` and tops up the deficit;
    the last round overshoots, and a uniform random surplus is dropped so the count is exact.
    """
    if target <= 0:
        return np.zeros(0, dtype=np.int64)
    # Users sorted by community: each community's weight is one contiguous slice of a cumsum,
    # so "a member of c, proportional to weight" is one searchsorted into that slice.
    order = np.argsort(comm, kind="stable")
    comm_sorted = comm[order]
    intra_cum = np.cumsum(intra_w[order])
    bounds = np.searchsorted(comm_sorted, np.arange(comm.max() + 2))  # community c: [b[c], b[c+1])
    comm_lo_cum = np.concatenate([[0.0], intra_cum])[bounds[:-1]]
    comm_hi_cum = np.concatenate([[0.0], intra_cum])[bounds[1:]]
    inter_cum = np.cumsum(inter_w)
    intra_total = float(intra_cum[-1])
    inter_total = float(inter_cum[-1])
    intra_share = intra_total / (intra_total + inter_total) if intra_total + inter_total else 0.0

    def draw(count: int) -> np.ndarray:
        # Searching sorted uniforms is ~8x faster than random ones (the cumsum stays in cache);
        # sorting is free next to it. Inter pairs stay independent via a random permutation of
        # one side; intra destinations are searched unsorted, paired with their source's slice.
        out = []
        n_intra = int(rng.binomial(count, intra_share))
        for start in range(0, n_intra, _CHUNK):
            m = min(_CHUNK, n_intra - start)
            p1 = _search(intra_cum, np.sort(rng.random(m)) * intra_total, n)
            c = comm_sorted[p1]
            u = comm_lo_cum[c] + rng.random(m) * (comm_hi_cum[c] - comm_lo_cum[c])
            p2 = np.clip(np.searchsorted(intra_cum, u, "right"), bounds[c], bounds[c + 1] - 1)
            out.append(_pair_keys(order[p1], order[p2], n))
        n_inter = count - n_intra
        for start in range(0, n_inter, _CHUNK):
            m = min(_CHUNK, n_inter - start)
            a = _search(inter_cum, np.sort(rng.random(m)) * inter_total, n)
            b = _search(inter_cum, np.sort(rng.random(m)) * inter_total, n)
            out.append(_pair_keys(a, rng.permutation(b), n))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    keys = _unique(draw(int(target * 1.05) + 16))
    for _ in range(_MAX_ROUNDS):
        if keys.size >= target:
            break
        deficit = target - keys.size
        keys = _unique(np.concatenate([keys, draw(int(deficit * 1.3) + 64)]))
    if keys.size > target:
        drop = rng.choice(keys.size, keys.size - target, replace=False)
        keep = np.ones(keys.size, dtype=bool)
        keep[drop] = False
        keys = keys[keep]
    return keys


def _search(cum: np.ndarray, u: np.ndarray, n: int) -> np.ndarray:
    """Inverse-CDF lookup: the index whose cumulative-weight slot holds each ``u``."""
    return np.minimum(np.searchsorted(cum, u, "right"), n - 1)


def _unique(a: np.ndarray) -> np.ndarray:
    """Sorted distinct values. ``np.unique`` on numpy 2.4 hashes first, ~50x slower at 10M+."""
    a = np.sort(a)
    if a.size == 0:
        return a
    first = np.empty(a.size, dtype=bool)
    first[0] = True
    np.not_equal(a[1:], a[:-1], out=first[1:])
    return a[first]


def _pair_keys(a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """Canonical int64 keys ``min * n + max`` with self loops removed."""
    a = a.astype(np.int64, copy=False)
    b = b.astype(np.int64, copy=False)
    lo = np.minimum(a, b)
    hi = np.maximum(a, b)
    ok = lo != hi
    return lo[ok] * n + hi[ok]


def _zipf_sampler(size: int, exponent: float) -> np.ndarray:
    """CDF of a Zipf law over ranks ``0..size-1``, for inverse-CDF sampling with searchsorted."""
    p = 1.0 / np.arange(1, size + 1, dtype=np.float64) ** exponent
    cdf = np.cumsum(p)
    return cdf / cdf[-1]


def _sparse_ids(
    rng: np.random.Generator,
    comm: np.ndarray,
    k: int,
    vocab_size: int,
    ids_per_user: tuple[int, int],
    topic_size: int,
    topic_fraction: float,
    zipf_exponent: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Homophilous sparse ids as CSR (offsets int64 [n+1], values int64, unique per user).

    Friends mostly share a community, hence a topic, hence ids: the signal the model should find.
    """
    n = comm.shape[0]
    topics = rng.integers(0, vocab_size, size=(k, topic_size), dtype=np.int64)
    topic_cdf = _zipf_sampler(topic_size, 1.0)
    popular = rng.permutation(vocab_size).astype(np.int64)  # global popularity ranking
    global_cdf = _zipf_sampler(vocab_size, zipf_exponent)

    counts = rng.integers(ids_per_user[0], ids_per_user[1] + 1, size=n)
    # Zipf draws repeat ids, so draw ~1.6x the slots, de-duplicate, then keep a random
    # ``count`` of each user's distinct ids. Bit-packed int64 keys keep both steps plain sorts.
    drawn = counts + (counts * 3 + 4) // 5
    owner = np.repeat(np.arange(n, dtype=np.int64), drawn)
    total = owner.shape[0]
    from_topic = rng.random(total) < topic_fraction
    ranks = np.searchsorted(topic_cdf, rng.random(total), "right")
    np.minimum(ranks, topic_size - 1, out=ranks)
    ids = topics[comm[owner], ranks]
    n_global = int(total - from_topic.sum())
    g_ranks = np.minimum(np.searchsorted(global_cdf, rng.random(n_global), "right"), vocab_size - 1)
    ids[~from_topic] = popular[g_ranks]
    del ranks, from_topic, g_ranks

    vbits = max(1, (vocab_size - 1).bit_length())
    ubits = max(1, (n - 1).bit_length())
    pbits = min(24, 63 - ubits - vbits)  # random priority bits; ties (if few) fall back to id
    if pbits < 0:
        raise ValueError(f"n_users * vocab_size too large to pack: {n} * {vocab_size}")
    owner <<= vbits
    owner |= ids
    del ids
    distinct = _unique(owner)  # (user << vbits) | id, sorted
    del owner
    users = distinct >> vbits
    prio = rng.integers(0, 1 << pbits, size=distinct.shape[0], dtype=np.int64)
    packed = (users << (pbits + vbits)) | (prio << vbits) | (distinct & ((1 << vbits) - 1))
    del prio, distinct
    packed.sort()  # within a user: random priority order
    per_user = np.bincount(users, minlength=n)
    starts = np.zeros(n, dtype=np.int64)
    np.cumsum(per_user[:-1], out=starts[1:])
    keep = (np.arange(packed.shape[0], dtype=np.int64) - starts[users]) < counts[users]
    values = packed[keep] & ((1 << vbits) - 1)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.minimum(per_user, counts), out=offsets[1:])
    return offsets, values


def _profile(
    rng: np.random.Generator,
    comm: np.ndarray,
    k: int,
    deg: np.ndarray,
    avg_degree: float,
) -> np.ndarray:
    """Raw profile scalars float32 [n, 5] in ``SCALARS`` order.

    Correlations a model can use: views rise with (expected) degree, partners are mostly
    high-view users, and the mature / ML-developer rates differ by community.
    """
    n = comm.shape[0]
    rel = np.log(np.maximum(deg, 1e-3) / max(avg_degree, 1e-3))
    age = np.exp(np.log(700.0) + 0.2 * rel + 0.9 * rng.standard_normal(n))
    age = np.clip(np.rint(age), 30.0, 4000.0)
    log_views = 6.0 + 1.0 * rel + 1.6 * rng.standard_normal(n)
    views = np.floor(np.exp(log_views))
    views[rng.random(n) < 0.03] = 0.0  # never-viewed accounts
    # Partner: logistic in log views around the ~97th percentile.
    pivot = np.quantile(log_views, 0.97)
    partner = rng.random(n) < 1.0 / (1.0 + np.exp(-2.0 * (log_views - pivot)))
    mature = rng.random(n) < rng.beta(1.0, 9.0, k)[comm]
    ml_dev = rng.random(n) < rng.beta(0.5, 8.0, k)[comm]
    columns = {
        "account_age_days": age,
        "views": views,
        "is_mature": mature,
        "is_partner": partner,
        "is_ml_developer": ml_dev,
    }
    profile = np.empty((n, len(SCALARS)), dtype=np.float32)
    for j, name in enumerate(SCALARS):
        profile[:, j] = columns[name]
    return profile


def write_synthetic_tables(
    n_users: int, seed: int, directory: Path, *, string_ids: bool = False
) -> RawGraph:
    """Generate a graph and write it as ``users.parquet`` and ``friendships.parquet``.

    Users carry the five scalars, ``country`` (a string per community, ``C00042``) and
    ``interests`` (the sparse ids as string tags, ``i0042``): what a team's own table looks like.
    ``string_ids`` writes ids as strings (``u42``), which ingestion maps to dense ids.
    """
    defaults = {
        k: p.default
        for k, p in inspect.signature(generate_synthetic).parameters.items()
        if p.kind is p.KEYWORD_ONLY
    }
    graph, comm = _generate(n_users, seed, **defaults)
    directory.mkdir(parents=True, exist_ok=True)
    tag_names = pa.array([f"i{i:04d}" for i in range(graph.vocab_size)])
    tags = tag_names.take(pa.array(graph.sparse_values, pa.int64()))

    def ids(values: np.ndarray) -> pa.Array:
        array = pa.array(values, pa.int64())
        if not string_ids:
            return array
        return pc.binary_join_element_wise("u", pc.cast(array, pa.string()), "")

    columns: dict[str, pa.Array] = {"user_id": ids(graph.user_ids)}
    for j, name in enumerate(SCALARS):
        values = graph.profile[:, j]
        columns[name] = pa.array(values.astype(bool) if name.startswith("is_") else values)
    names = pa.array([f"C{c:05d}" for c in range(int(comm.max(initial=0)) + 1)])
    columns["country"] = names.take(pa.array(comm, pa.int64()))
    offsets = sparse_list_array(graph.sparse_offsets, graph.sparse_values).offsets
    columns["interests"] = pa.ListArray.from_arrays(offsets, tags)
    pq.write_table(pa.table(columns), directory / "users.parquet")
    pq.write_table(
        pa.table({"src": ids(graph.src), "dst": ids(graph.dst)}),
        directory / "friendships.parquet",
    )
    return graph
