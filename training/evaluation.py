"""Offline evaluation protocol (docs/PAPER.md, "How to evaluate offline"), fully vectorised.

Every user with a held-out friendship in the chosen split is a query. A method scores all users,
the query itself and its *training* friends are dropped (they are known, recommending them is
useless and counting them would inflate recall), and the top K remain. Metrics are per query user,
so the same users can be compared across methods with a paired bootstrap.

Top-k arrays are int64 ``[q, k]`` of dense user indices, best first; ``-1`` marks an empty slot
(a method with fewer than k candidates) and never counts as a hit.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from friendrec.data.canonical import SPLITS, PreparedDataset
from friendrec.data.graph import Adjacency
from friendrec.fof import (
    BLEND_FEATURES,
    DEGREE_BUCKETS,
    SCORE_DECIMALS,
    BlendRanker,
    blend,
    blend_candidates,
    blend_features,
    tie_keys,
)
from training.blend_ranker import fit_ranker, source_order

log = logging.getLogger(__name__)

COLD_START_MAX_DEGREE = 2  # the paper's cold-start slice: training degree <= 2
SLICES = ("all", "cold_start")
NO_RECOMMENDATION = -1
_DENSE_BUDGET = 1 << 25  # elements of one [batch, users] score block (128 MB of float32)
# Past this many users, embedding top-k keeps a running top k over blocks of candidates
# (``blocked_topk``) instead of partitioning whole rows of scores.
BLOCKED_TOPK_USERS = 1 << 18
_BOOT_CHUNK_ELEMENTS = 1 << 22  # bootstrap index matrix chunk: ~32 MB of int64


@dataclass(frozen=True)
class EvalSet:
    """Queries, their held-out friends and what must be excluded, for one split."""

    split: str
    num_users: int
    queries: np.ndarray  # int64 [q] dense user indices, ascending
    heldout: sp.csr_array  # [q, n] binary, row i = held-out friends of queries[i]
    train: sp.csr_array  # [n, n] binary symmetric training adjacency (the exclusions)
    train_degree: np.ndarray  # int64 [n]
    cold_start: np.ndarray  # bool [q]: training degree <= COLD_START_MAX_DEGREE
    # True: ``train`` holds the queries' friendships only (enough to exclude each query's
    # friends, not for friends-of-friends); ``train_degree`` is still the whole graph's.
    queries_only: bool = False

    @classmethod
    def from_prepared(
        cls,
        data: PreparedDataset,
        split: str,
        max_queries: int | None = None,
        seed: int = 0,
    ) -> EvalSet:
        """Queries and targets of a held-out split ("val" or "test") of a prepared dataset.

        With ``max_queries``: ``from_prepared(data, split).sample(max_queries, seed)``, built from
        the sampled queries' friendships only (``queries_only``), for early stopping on a big
        graph: the whole training adjacency of 5M users, and its construction, held gigabytes
        in every training process (docs/scaling.md).
        """
        if split not in SPLITS[1:]:
            raise ValueError(f"split must be one of {SPLITS[1:]}, got {split!r}")
        n = len(data.user_ids)
        train_src, train_dst = (data.index_of(ids) for ids in data.edges("train"))
        held_src, held_dst = (data.index_of(ids) for ids in data.edges(split))
        if max_queries is not None:
            # Prepared friendships are unique pairs without self loops (``RawGraph``): no
            # held-out pair is a training one, so the queries are the users with a held-out one.
            held = np.bincount(held_src, minlength=n) + np.bincount(held_dst, minlength=n)
            queries = np.flatnonzero(held)
            if len(queries) > max_queries:
                chosen = np.zeros(n, dtype=bool)
                chosen[queries[_sample_positions(len(queries), max_queries, seed)]] = True
                t = chosen[train_src] | chosen[train_dst]
                h = chosen[held_src] | chosen[held_dst]
                part = cls.from_edges(
                    n, train_src[t], train_dst[t], held_src[h], held_dst[h], split, log_it=False
                )
                keep = np.flatnonzero(chosen[part.queries])
                degree = np.bincount(train_src, minlength=n) + np.bincount(train_dst, minlength=n)
                sampled = replace(
                    part,
                    queries=part.queries[keep],
                    heldout=sp.csr_array(part.heldout[keep]),
                    train_degree=degree.astype(np.int64),
                    cold_start=degree[part.queries[keep]] <= COLD_START_MAX_DEGREE,
                    queries_only=True,
                )
                sampled.log()
                return sampled
        return cls.from_edges(n, train_src, train_dst, held_src, held_dst, split=split)

    def sample(self, max_queries: int | None, seed: int = 0) -> EvalSet:
        """At most ``max_queries`` query users, a seeded uniform sample (all of them when
        None or fewer): early stopping on a million-user graph needs a recall estimate, not
        every validation user scored against every user."""
        if max_queries is None or self.num_queries <= max_queries:
            return self
        keep = _sample_positions(self.num_queries, max_queries, seed)
        return replace(
            self,
            queries=self.queries[keep],
            heldout=sp.csr_array(self.heldout[keep]),
            cold_start=self.cold_start[keep],
        )

    @classmethod
    def from_edges(
        cls,
        num_users: int,
        train_src: np.ndarray,
        train_dst: np.ndarray,
        held_src: np.ndarray,
        held_dst: np.ndarray,
        split: str = "test",
        log_it: bool = True,
    ) -> EvalSet:
        """Build from undirected edges over dense indices (tests use hand-made graphs)."""
        adjacency = Adjacency.from_edges(num_users, train_src, train_dst)
        train = sp.csr_array(
            (
                np.ones(len(adjacency.indices), dtype=np.float32),
                adjacency.indices,
                adjacency.indptr,
            ),
            shape=(num_users, num_users),
        )
        train.sum_duplicates()
        train.data[:] = 1.0
        degree = np.diff(train.indptr).astype(np.int64)

        rows = np.concatenate([held_src, held_dst]).astype(np.int64)
        cols = np.concatenate([held_dst, held_src]).astype(np.int64)
        keep = rows != cols
        held_full = sp.coo_array(
            (np.ones(int(keep.sum()), dtype=np.float32), (rows[keep], cols[keep])),
            shape=(num_users, num_users),
        ).tocsr()
        held_full.sum_duplicates()
        held_full.data[:] = 1.0
        # A held-out pair that is also a training friendship can never be recommended: drop it.
        overlap = held_full.multiply(train)
        if overlap.nnz:
            log.warning("%d held-out pairs are also training friendships; dropped", overlap.nnz)
            held_full = (held_full - overlap).tocsr()
            held_full.eliminate_zeros()
        queries = np.flatnonzero(np.diff(held_full.indptr)).astype(np.int64)
        heldout = sp.csr_array(held_full[queries])
        heldout.sort_indices()
        evalset = cls(
            split=split,
            num_users=int(num_users),
            queries=queries,
            heldout=heldout,
            train=train,
            train_degree=degree,
            cold_start=degree[queries] <= COLD_START_MAX_DEGREE,
        )
        if log_it:
            evalset.log()
        return evalset

    def log(self) -> None:
        log.info(
            "eval set %s: %d users, %d queries (%d cold-start), %d held-out (user, friend) pairs%s",
            self.split,
            self.num_users,
            self.num_queries,
            int(self.cold_start.sum()),
            self.heldout.nnz,
            " (a sample, with its queries' friendships only)" if self.queries_only else "",
        )

    @property
    def num_queries(self) -> int:
        return int(self.queries.shape[0])

    @property
    def heldout_count(self) -> np.ndarray:
        """Held-out friends per query (>= 1 by construction): the recall denominator."""
        return np.diff(self.heldout.indptr).astype(np.int64)

    def slice_masks(self) -> dict[str, np.ndarray]:
        """Boolean masks over queries for every reported slice."""
        return {"all": np.ones(self.num_queries, dtype=bool), "cold_start": self.cold_start}


def _sample_positions(total: int, size: int, seed: int) -> np.ndarray:
    """``size`` of ``range(total)``, sorted: the seeded draw of ``EvalSet.sample``."""
    rng = np.random.default_rng([seed, size])
    return np.sort(rng.choice(total, size=size, replace=False))


# --------------------------------------------------------------------------- retrieval


def _exclusion_coords(evalset: EvalSet, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """(row within batch, user) pairs that must never be recommended: self and training friends."""
    rows_q = evalset.queries[lo:hi]
    block = evalset.train[rows_q]
    counts = np.diff(block.indptr)
    friend_rows = np.repeat(np.arange(hi - lo), counts)
    batch_rows = np.concatenate([np.arange(hi - lo), friend_rows])
    users = np.concatenate([rows_q, block.indices.astype(np.int64)])
    return batch_rows, users


def _dense_topk(
    evalset: EvalSet,
    k: int,
    batch: int,
    scores_for: Callable[[np.ndarray], np.ndarray],
    tie_seed: int | None = None,
    tie_order: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact masked top-k over all users from dense per-batch scores (higher is better).

    A score of -inf means "not a candidate". Ties go to the lower user index, or, with tie_seed,
    follow a seeded random order of users: heuristics with many exact ties (Adamic-Adar) must not
    be rewarded or punished for how the dataset happened to number its users. ``tie_order``: that
    order given (a permutation of users, e.g. by ``friendrec.fof.tie_keys``).
    Returns (users [q, k] padded with -1, their float32 scores padded with -inf).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n, q = evalset.num_users, evalset.num_queries
    # Bound the dense [batch, n] work arrays (scores, masks, partition indices) on big graphs:
    # at a million users 1024 queries would need ~20 GB. Rows are independent, so the result
    # does not depend on the batch.
    batch = max(1, min(batch, _DENSE_BUDGET // max(n, 1)))
    top = np.full((q, k), NO_RECOMMENDATION, dtype=np.int64)
    top_score = np.full((q, k), -np.inf, dtype=np.float32)
    kk = min(k, n)
    perm = tie_order
    if perm is None and tie_seed is not None:
        perm = np.random.default_rng(tie_seed).permutation(n)
    for lo in range(0, q, batch):
        hi = min(lo + batch, q)
        # Negate so that argpartition's ascending order puts the best first; +inf = excluded.
        cost = np.negative(scores_for(evalset.queries[lo:hi]).astype(np.float32, copy=False))
        cost[_exclusion_coords(evalset, lo, hi)] = np.inf
        if perm is not None:
            cost = cost[:, perm]  # column j is now user perm[j]
        if kk < n:
            part = np.argpartition(cost, kk - 1, axis=1)[:, :kk]
            if perm is not None:  # argpartition cuts a tie at random: keep its first in order
                kth = np.take_along_axis(cost, part, axis=1).max(axis=1)
                tied = (np.count_nonzero(cost <= kth[:, None], axis=1) > kk) & np.isfinite(kth)
                for r in np.flatnonzero(tied):
                    idx = np.flatnonzero(cost[r] <= kth[r])  # ascending = the tie order
                    part[r] = idx[np.lexsort((idx, cost[r, idx]))][:kk]
        else:
            part = np.broadcast_to(np.arange(n), (hi - lo, n))
        part_cost = np.take_along_axis(cost, part, axis=1)
        order = np.lexsort((part, part_cost), axis=1)
        best = np.take_along_axis(part, order, axis=1)
        best_cost = np.take_along_axis(part_cost, order, axis=1)
        if perm is not None:
            best = perm[best]
        empty = np.isinf(best_cost) & (best_cost > 0)
        top[lo:hi, :kk] = np.where(empty, NO_RECOMMENDATION, best)
        top_score[lo:hi, :kk] = np.where(empty, -np.inf, -best_cost)
    return top, top_score


def topk_from_embeddings(
    emb: np.ndarray,
    evalset: EvalSet,
    k: int = 100,
    batch: int = 1024,
    queries: np.ndarray | None = None,
) -> np.ndarray:
    """Exact inner-product top-k over all users (brute force: the reference for any ANN index).
    ``emb``: the index vectors; ``queries``: the users' query vectors (default: the same)."""
    return embedding_topk(emb, evalset, k, batch, queries)[0]


def embedding_topk(
    emb: np.ndarray,
    evalset: EvalSet,
    k: int = 100,
    batch: int = 1024,
    queries: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``topk_from_embeddings`` with its inner products (float32; -inf at empty slots): the
    scores the index search returns with the same list, which the blend reads."""
    if emb.ndim != 2 or emb.shape[0] != evalset.num_users:
        raise ValueError(f"embeddings must be [{evalset.num_users}, d], got {emb.shape}")
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    queries = emb if queries is None else np.ascontiguousarray(queries, dtype=np.float32)
    if queries.shape != emb.shape:
        raise ValueError(f"query vectors must be {emb.shape}, got {queries.shape}")
    if not (np.isfinite(emb).all() and np.isfinite(queries).all()):
        raise ValueError("embeddings contain NaN or inf")
    start = time.perf_counter()
    if evalset.num_users > BLOCKED_TOPK_USERS:
        out, scores = blocked_topk(evalset, k, queries[evalset.queries], emb)
    else:
        out, scores = _dense_topk(evalset, k, batch, lambda rows: queries[rows] @ emb.T)
    log.info(
        "embedding top-%d for %d queries in %.2fs",
        k,
        evalset.num_queries,
        time.perf_counter() - start,
    )
    return out, scores


def blocked_topk(
    evalset: EvalSet,
    k: int,
    queries: np.ndarray,
    emb: np.ndarray,
    query_batch: int = 256,
    block: int = 1 << 17,
    first_user: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """``_dense_topk`` of inner products, for graphs of millions of users: candidates scored in
    blocks of ``block`` users against a batch of queries, each query keeping a running top k.
    A candidate counts only if it beats its query's k-th best so far, so after the first block
    almost nothing reaches a sort: the dense path partitioned every [6 queries, 5M users] row
    (171 s for 2,000 queries at 5M users, docs/scaling.md). The same lists (the exact top k;
    ties at the k-th score are cut arbitrarily by both).

    ``queries``: the query vectors of ``evalset.queries`` [q, d]; ``emb``: the index vectors of
    the users ``first_user ..`` (all of them by default; a worker of a data-parallel group
    passes its range, and ``merge_topk`` joins the groups' lists)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    q = evalset.num_queries
    if len(queries) != q:
        raise ValueError(f"query vectors must be [{q}, d] (one per query), got {queries.shape}")
    top = np.full((q, k), NO_RECOMMENDATION, dtype=np.int64)
    top_score = np.full((q, k), -np.inf, dtype=np.float32)
    for lo in range(0, q, query_batch):
        hi = min(lo + query_batch, q)
        m = hi - lo
        vectors = queries[lo:hi]
        excluded_rows, excluded_users = _exclusion_coords(evalset, lo, hi)
        order = np.argsort(excluded_users, kind="stable")
        excluded_rows, excluded_users = excluded_rows[order], excluded_users[order]
        # The running best: users [m, k] (-1 empty) and their scores (-inf empty).
        best = np.full((m, k), NO_RECOMMENDATION, dtype=np.int64)
        best_score = np.full((m, k), -np.inf, dtype=np.float32)
        for c0 in range(first_user, first_user + len(emb), block):
            c1 = min(c0 + block, first_user + len(emb))
            scores = vectors @ emb[c0 - first_user : c1 - first_user].T
            a, b = np.searchsorted(excluded_users, [c0, c1])
            scores[excluded_rows[a:b], excluded_users[a:b] - c0] = -np.inf
            # Beat the k-th best so far (-inf while a row has fewer than k): one pass over the
            # block, then only the survivors are merged. While the bar is low (the first
            # block), each row's own top k of the block stands for it.
            passing = scores > best_score[:, -1:]
            if np.count_nonzero(passing) > 4 * m * k and c1 - c0 > k:
                part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
                r, j = np.nonzero(np.take_along_axis(passing, part, axis=1))
                c = part[r, j]
            else:
                r, c = np.nonzero(passing)
            if not len(r):
                continue
            users = np.concatenate([best.ravel(), c + c0])
            score = np.concatenate([best_score.ravel(), scores[r, c]])
            row = np.concatenate([np.repeat(np.arange(m), k), r])
            keep = users >= 0
            users, score, row = users[keep], score[keep], row[keep]
            pick = np.lexsort((users, -score, row))  # by row, best first, lower user on ties
            users, score, row = users[pick], score[pick], row[pick]
            starts = np.searchsorted(row, np.arange(m))
            rank = np.arange(len(row)) - starts[row]
            first = rank < k
            best.fill(NO_RECOMMENDATION)
            best_score.fill(-np.inf)
            best[row[first], rank[first]] = users[first]
            best_score[row[first], rank[first]] = score[first]
        top[lo:hi] = best
        top_score[lo:hi] = best_score
    return top, top_score


def merge_topk(users: Sequence[np.ndarray], scores: Sequence[np.ndarray], k: int) -> np.ndarray:
    """The top ``k`` of each row over several lists of the same queries (``blocked_topk`` over
    disjoint ranges of users): best score first, the lower user on ties, as one list over all
    of them would rank them. Empty slots (-1) are dropped, and pad the end."""
    users_all = np.concatenate(users, axis=1)
    scores_all = np.concatenate(scores, axis=1)
    empty = users_all < 0
    keys = np.where(empty, np.iinfo(np.int64).max, users_all)
    cost = np.where(empty, np.inf, -scores_all.astype(np.float64))
    order = np.lexsort((keys, cost), axis=1)[:, :k]
    return np.where(
        np.take_along_axis(empty, order, axis=1),
        NO_RECOMMENDATION,
        np.take_along_axis(users_all, order, axis=1),
    )


def topk_random(evalset: EvalSet, k: int = 100, seed: int = 0, batch: int = 1024) -> np.ndarray:
    """k users drawn uniformly without replacement from the allowed ones (the floor baseline)."""
    rng = np.random.default_rng(seed)
    top, _ = _dense_topk(
        evalset, k, batch, lambda rows: rng.random((len(rows), evalset.num_users), np.float32)
    )
    return top


def _adamic_adar_weighted(evalset: EvalSet, adjacency: sp.sparray | None = None) -> sp.csr_array:
    """A @ diag(1 / log deg): degree-1 neighbours get weight 0 (they only link a user to itself).
    ``adjacency``: the rows to weight (default: the training graph); degrees are always full."""
    if evalset.queries_only:
        raise ValueError(
            "friends-of-friends need the whole training graph: this eval set holds its queries' "
            "friendships only (EvalSet.from_prepared without max_queries)"
        )
    degree = evalset.train_degree
    weight = np.zeros(evalset.num_users, dtype=np.float64)
    multi = degree >= 2
    weight[multi] = 1.0 / np.log(degree[multi])
    rows = evalset.train if adjacency is None else adjacency
    weighted = sp.csr_array(sp.csr_array(rows).astype(np.float64) @ sp.diags_array(weight))
    weighted.eliminate_zeros()
    return weighted


def adamic_adar_topk_with_scores(
    evalset: EvalSet, k: int = 100, batch: int = 256, tie_seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Friends-of-friends top-k and their Adamic-Adar scores (-1 / -inf where a slot is empty).

    Per query batch: scores = (A D^-1)[batch] @ A, a sparse product densified to [batch, n] so that
    the masked argpartition of the embedding path applies; users sharing no neighbour score 0 and
    are not candidates. Exact ties are common (one shared neighbour of a given degree), so they
    are broken in a seeded random user order rather than by user id.
    """
    start = time.perf_counter()
    weighted = _adamic_adar_weighted(evalset)
    train = evalset.train.astype(np.float64)

    def scores_for(rows: np.ndarray) -> np.ndarray:
        dense = (weighted[rows] @ train).toarray()
        dense[dense <= 0] = -np.inf
        return dense

    top, score = _dense_topk(evalset, k, batch, scores_for, tie_seed=tie_seed)
    log.info(
        "Adamic-Adar top-%d for %d queries in %.2fs",
        k,
        evalset.num_queries,
        time.perf_counter() - start,
    )
    return top, score


def topk_adamic_adar(
    evalset: EvalSet, k: int = 100, batch: int = 256, tie_seed: int = 0
) -> np.ndarray:
    """Friends-of-friends ranked by Adamic-Adar on the training graph ("people you may know")."""
    return adamic_adar_topk_with_scores(evalset, k, batch, tie_seed)[0]


def topk_fof(
    evalset: EvalSet,
    user_ids: np.ndarray,
    k: int = 100,
    cap: int = 1000,
    seed: int = 0,
    batch: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """The service's friends-of-friends source, offline (``friendrec.fof.adamic_adar``'s twin):
    Adamic-Adar over at most ``cap`` expanded friends per user (``expanded_friends``' choice),
    scores rounded alike, ties in tie-key order of ``user_ids`` (dense index -> user id)."""
    keys = tie_keys(user_ids, seed)
    adjacency = evalset.train.astype(np.float64).tolil()
    for row in np.flatnonzero(evalset.train_degree > cap):  # few: cap the expanded friends
        cols = np.asarray(adjacency.rows[row], dtype=np.int64)
        keep = np.sort(cols[np.argsort(keys[cols], kind="stable")[:cap]])
        adjacency.rows[row], adjacency.data[row] = keep.tolist(), [1.0] * len(keep)
    capped = _adamic_adar_weighted(evalset, adjacency)  # full degrees, as the service
    train = evalset.train.astype(np.float64)

    def scores_for(rows: np.ndarray) -> np.ndarray:
        dense = np.round((capped[rows] @ train).toarray(), SCORE_DECIMALS)
        dense[dense <= 0] = -np.inf
        return dense

    return _dense_topk(evalset, k, batch, scores_for, tie_order=np.argsort(keys, kind="stable"))


def _ranked(users: np.ndarray, scores: np.ndarray, user_ids: np.ndarray) -> list[tuple[int, float]]:
    return [(int(user_ids[u]), float(s)) for u, s in zip(users, scores, strict=True) if u >= 0]


def blend_inputs(
    embedding: tuple[np.ndarray, np.ndarray],
    fof: tuple[np.ndarray, np.ndarray],
    user_ids: np.ndarray,
    row: int,
) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """Query ``row``'s two ranked lists as the service holds them: (user id, score) pairs."""
    return (
        _ranked(embedding[0][row], embedding[1][row], user_ids),
        _ranked(fof[0][row], fof[1][row], user_ids),
    )


@dataclass(frozen=True)
class BlendSource:
    """What the blend reads besides the two lists, offline: the index vectors and query vectors
    (the inner products of the friends of friends the embedding list missed, as the service
    computes them from their stored vectors) and the training degrees."""

    evalset: EvalSet
    user_ids: np.ndarray
    vectors: np.ndarray  # [n, d] what the index stores
    queries: np.ndarray  # [n, d] the users' query vectors

    @cached_property
    def _position(self) -> dict[int, int]:
        return {int(u): i for i, u in enumerate(self.user_ids.tolist())}

    def index_of(self, users: Sequence[int]) -> np.ndarray:
        """Dense indices of user ids."""
        return np.array([self._position[int(u)] for u in users], dtype=np.int64)

    def inputs(
        self, embedding: tuple[np.ndarray, np.ndarray], fof: tuple[np.ndarray, np.ndarray], row: int
    ) -> tuple[list, list, dict[int, float], dict[int, int], int]:
        """Query ``row``'s ``friendrec.fof.blend`` inputs after the two lists: inner products,
        candidate degrees and the user's degree."""
        emb, fo = blend_inputs(embedding, fof, self.user_ids, row)
        others = blend_candidates(emb, fo)
        user = int(self.evalset.queries[row])
        idx = self.index_of(others)
        products = self.vectors[idx] @ self.queries[user] if len(idx) else np.zeros(0, np.float32)
        candidates = self.index_of([u for u, _ in emb] + others)
        degrees = self.evalset.train_degree[candidates]
        return (
            emb,
            fo,
            {u: float(p) for u, p in zip(others, products, strict=True)},
            {int(self.user_ids[c]): int(d) for c, d in zip(candidates, degrees, strict=True)},
            int(self.evalset.train_degree[user]),
        )


def topk_blend(
    embedding: tuple[np.ndarray, np.ndarray],
    fof: tuple[np.ndarray, np.ndarray],
    source: BlendSource,
    ranker: BlendRanker,
    k: int = 100,
    seed: int = 0,
) -> np.ndarray:
    """The service's blend, offline: ``friendrec.fof.blend`` of each query's two lists
    (``embedding``: top-k users and their scores; ``fof``: ``topk_fof``'s), the depth the
    embedding list's."""
    evalset = source.evalset
    out = np.full((evalset.num_queries, k), NO_RECOMMENDATION, dtype=np.int64)
    depth = embedding[0].shape[1]
    for i in range(evalset.num_queries):
        emb, fo, products, degrees, degree = source.inputs(embedding, fof, i)
        merged = blend(emb, fo, ranker, depth, k, products, degrees, degree, seed)
        out[i, : len(merged)] = source.index_of([u for u, _, _ in merged])
    return out


def blend_groups(
    embedding: tuple[np.ndarray, np.ndarray],
    fof: tuple[np.ndarray, np.ndarray],
    source: BlendSource,
    reads_vectors: bool = True,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per query: its candidates' ``BLEND_FEATURES`` and which are held-out friends."""
    evalset, depth = source.evalset, embedding[0].shape[1]
    groups = []
    for i in range(evalset.num_queries):
        emb, fo, products, degrees, degree = source.inputs(embedding, fof, i)
        products = products if reads_vectors else None
        users, x = blend_features(emb, fo, depth, products, degrees, degree)
        held = evalset.heldout.indices[evalset.heldout.indptr[i] : evalset.heldout.indptr[i + 1]]
        groups.append((x, np.isin(source.index_of(users), held).astype(np.float64)))
    return groups


def _recall_at(groups: Sequence[tuple[np.ndarray, np.ndarray]], scores: Sequence[np.ndarray],
               held: np.ndarray, k: int = 50) -> np.ndarray:  # fmt: skip
    """Recall@k per query of candidates ordered by ``scores`` (ties: candidate order)."""
    out = np.zeros(len(groups))
    for i, ((_, y), s) in enumerate(zip(groups, scores, strict=True)):
        if len(y) and held[i]:
            out[i] = y[np.argsort(-s, kind="stable")[:k]].sum() / held[i]
    return out


def cross_fitted_recall(
    groups: Sequence[tuple[np.ndarray, np.ndarray]],
    held: np.ndarray,
    fit: Callable[[list[tuple[np.ndarray, np.ndarray]]], BlendRanker],
) -> np.ndarray:
    """Recall@50 per query of rankers judged out of sample: ``fit`` on the odd queries scores
    the even ones, and the other way round (``held``: each query's held-out friend count)."""
    half = np.arange(len(groups)) % 2
    crossed: list[np.ndarray] = [np.zeros(0)] * len(groups)
    for part in (0, 1):
        fitted = fit([g for g, h in zip(groups, half, strict=True) if h != part])
        for i in np.flatnonzero(half == part):
            crossed[i] = fitted.score(groups[i][0]) if len(groups[i][0]) else np.zeros(0)
    return _recall_at(groups, crossed, held)


def fit_blend(
    embedding: tuple[np.ndarray, np.ndarray],
    fof: tuple[np.ndarray, np.ndarray],
    source: BlendSource,
    seed: int = 0,
    reads_vectors: bool = True,
) -> tuple[BlendRanker, dict[str, Any]]:
    """The blend's ranker fitted on this (validation) eval set (``training.blend_ranker``);
    ``reads_vectors``: whether it reads the missed friends of friends' vectors for their inner
    products or is given a bound (``friendrec.fof.blend_features``).

    Its Recall@50 is first estimated out of sample (fitted on half of the users, scored on the
    other half, and back); where one source alone ranks these users better, the blend keeps that
    source's order (a small validation set can fit a ranker that loses to both lists). Reports
    what was chosen and the estimates."""
    evalset = source.evalset
    groups = blend_groups(embedding, fof, source, reads_vectors)
    held = np.diff(evalset.heldout.indptr)
    teaches = np.array([bool(y.any()) for _, y in groups])  # a held-out friend among them
    if not teaches.any():
        raise ValueError("no validation user has a held-out friend among the candidates")
    half = np.arange(len(groups)) % 2
    recall: dict[str, np.ndarray] = {}
    if all(teaches[half != part].any() for part in (0, 1)):
        recall["blend"] = cross_fitted_recall(
            groups, held, lambda fit_on: fit_ranker(fit_on, seed=seed, reads_vectors=reads_vectors)
        )
    else:  # too few users to fit on one half and judge on the other: keep a source's order
        log.warning("blend: too few validation users with a held-out friend to fit a ranker")
    for name in ("embedding", "fof"):
        order = source_order(name)
        scores = [order.score(x) if len(x) else np.zeros(0) for x, _ in groups]
        recall[name] = _recall_at(groups, scores, held)
    masks = degree_buckets(evalset)
    chosen = max(recall, key=lambda name: (recall[name].mean(), name == "blend"))
    if chosen == "blend":
        ranker = fit_ranker(groups, seed=seed, reads_vectors=reads_vectors)
    else:
        ranker = source_order(chosen)
    return ranker, {
        "features": list(BLEND_FEATURES),
        "reads_vectors": ranker.reads_vectors,
        "chosen": chosen,
        "recall@50": {name: float(r.mean()) for name, r in recall.items()},
        "by_bucket": {
            b: {name: float(r[m].mean()) if m.any() else 0.0 for name, r in recall.items()}
            for b, m in masks.items()
        },
    }


# --------------------------------------------------------------------------- metrics


def hit_matrix(topk: np.ndarray, evalset: EvalSet) -> np.ndarray:
    """bool [q, k]: is topk[i, j] a held-out friend of query i (empty slots never are)."""
    if topk.ndim != 2 or topk.shape[0] != evalset.num_queries:
        raise ValueError(f"top-k must be [{evalset.num_queries}, k], got {topk.shape}")
    n = evalset.num_users
    held = evalset.heldout
    held_keys = np.repeat(np.arange(evalset.num_queries, dtype=np.int64), np.diff(held.indptr))
    held_keys = held_keys * n + held.indices.astype(np.int64)  # ascending: rows, sorted indices
    valid = topk >= 0
    keys = np.arange(evalset.num_queries, dtype=np.int64)[:, None] * n + np.where(valid, topk, 0)
    if held_keys.size == 0:
        return np.zeros(topk.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(held_keys, keys), held_keys.size - 1)
    return valid & (held_keys[pos] == keys)


def union_recall(lists: Sequence[np.ndarray], evalset: EvalSet) -> np.ndarray:
    """Per query, the share of its held-out friends that any of the top-k ``lists`` holds: the
    most a merge of them can reach at any cut (the blend's ceiling)."""
    cat = np.concatenate(lists, axis=1)
    hits = hit_matrix(cat, evalset)
    # A user in several lists is one hit: keep its first appearance in the row.
    order = np.argsort(cat, axis=1, kind="stable")
    ranked = np.take_along_axis(cat, order, axis=1)
    repeat = np.zeros(cat.shape, dtype=bool)
    repeat[:, 1:] = ranked[:, 1:] == ranked[:, :-1]
    first = np.ones(cat.shape, dtype=bool)
    np.put_along_axis(first, order, ~repeat, axis=1)
    found = (hits & first).sum(axis=1)
    return found / np.maximum(np.diff(evalset.heldout.indptr), 1)


def per_user_metrics(
    topk: np.ndarray, evalset: EvalSet, ks: Sequence[int] = (10, 50, 100), ndcg_k: int = 50
) -> dict[str, np.ndarray]:
    """Per query user: recall@K, hitrate@K, ndcg@ndcg_k (binary relevance) and MRR."""
    width = topk.shape[1] if topk.ndim == 2 else 0
    if max([*ks, ndcg_k]) > width:
        raise ValueError(f"top-k has {width} columns; metrics need {max([*ks, ndcg_k])}")
    hits = hit_matrix(topk, evalset)
    count = evalset.heldout_count.astype(np.float64)
    cum = np.cumsum(hits, axis=1)
    metrics: dict[str, np.ndarray] = {}
    for k in ks:
        metrics[f"recall@{k}"] = cum[:, k - 1] / count
    for k in ks:
        metrics[f"hitrate@{k}"] = (cum[:, k - 1] > 0).astype(np.float64)
    discount = 1.0 / np.log2(np.arange(2, ndcg_k + 2, dtype=np.float64))
    dcg = hits[:, :ndcg_k] @ discount
    ideal = np.concatenate([[0.0], np.cumsum(discount)])[np.minimum(count, ndcg_k).astype(int)]
    metrics[f"ndcg@{ndcg_k}"] = dcg / ideal
    any_hit = cum[:, -1] > 0
    first = np.argmax(hits, axis=1)
    metrics["mrr"] = np.where(any_hit, 1.0 / (first + 1), 0.0)
    return metrics


def retrieved_popularity(topk: np.ndarray, evalset: EvalSet, k: int = 50) -> np.ndarray:
    """Per query: the mean log(1 + training degree) of its top-k candidates. A diagnostic, not a
    quality metric: it shows whether a retriever leans towards popular users or away from them.
    Empty slots are skipped; a query with none retrieved is NaN."""
    top = topk[:, :k]
    valid = top >= 0
    logs = np.log1p(evalset.train_degree[np.where(valid, top, 0)].astype(np.float64))
    count = valid.sum(axis=1)
    total = np.where(valid, logs, 0.0).sum(axis=1)
    return np.divide(total, count, out=np.full(len(top), np.nan), where=count > 0)


def heldout_popularity(evalset: EvalSet) -> np.ndarray:
    """Per query: the mean log(1 + training degree) of its held-out friends, what a retriever
    would have to match for ``retrieved_popularity`` to look like the truth."""
    logs = np.log1p(evalset.train_degree.astype(np.float64))
    return (evalset.heldout @ logs) / evalset.heldout_count


def recall_curve(
    topk: np.ndarray, evalset: EvalSet, max_k: int = 100
) -> dict[str, dict[int, float]]:
    """Mean recall@K for K = 1..max_k per slice (the Recall@K plot)."""
    max_k = min(max_k, topk.shape[1])
    hits = hit_matrix(topk, evalset)[:, :max_k]
    recall = np.cumsum(hits, axis=1) / evalset.heldout_count[:, None]
    curves: dict[str, dict[int, float]] = {}
    for name, mask in evalset.slice_masks().items():
        means = recall[mask].mean(axis=0) if mask.any() else np.full(max_k, np.nan)
        curves[name] = {k + 1: float(v) for k, v in enumerate(means)}
    return curves


def degree_bucket_masks(degree: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean masks over ``degree``'s entries, one per ``DEGREE_BUCKETS`` entry."""
    return {
        label: (degree >= lo) & (degree <= (hi if hi is not None else np.iinfo(np.int64).max))
        for label, lo, hi in DEGREE_BUCKETS
    }


def degree_buckets(evalset: EvalSet) -> dict[str, np.ndarray]:
    """Boolean masks over queries, one per ``DEGREE_BUCKETS`` entry (by training degree)."""
    return degree_bucket_masks(evalset.train_degree[evalset.queries])


def recall_by_degree(
    per_user: Mapping[str, np.ndarray], evalset: EvalSet, metric: str = "recall@50"
) -> dict[str, dict[str, float]]:
    """Mean ``metric`` and the user count per training-degree bucket (NaN where empty): where
    the cold-start story is told."""
    return {
        label: {
            "users": float(np.count_nonzero(mask)),
            metric: float(per_user[metric][mask].mean()) if mask.any() else math.nan,
        }
        for label, mask in degree_buckets(evalset).items()
    }


def summarise(
    per_user: Mapping[str, np.ndarray], mask: np.ndarray | None = None
) -> dict[str, float]:
    """Mean of every metric over the (masked) users, plus the user count; NaN if none."""
    out: dict[str, float] = {}
    for name, values in per_user.items():
        chosen = values if mask is None else values[mask]
        out[name] = float(chosen.mean()) if chosen.size else math.nan
    if mask is not None:
        out["users"] = float(np.count_nonzero(mask))
    else:
        out["users"] = float(len(next(iter(per_user.values())))) if per_user else 0.0
    return out


def summarise_slices(
    per_user: Mapping[str, np.ndarray], evalset: EvalSet
) -> dict[str, dict[str, float]]:
    """summarise() for every slice ("all", "cold_start") of an eval set."""
    return {name: summarise(per_user, mask) for name, mask in evalset.slice_masks().items()}


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """(mean(a - b), 2.5%, 97.5%) by resampling users: a and b are per-user metrics, same users."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"need two equal non-empty 1-d arrays, got {a.shape} and {b.shape}")
    diff = a - b
    n = diff.size
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOT_CHUNK_ELEMENTS // n)
    means = np.empty(n_boot, dtype=np.float64)
    for lo in range(0, n_boot, chunk):
        hi = min(lo + chunk, n_boot)
        means[lo:hi] = diff[rng.integers(0, n, size=(hi - lo, n))].mean(axis=1)
    lo_ci, hi_ci = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(lo_ci), float(hi_ci)


# --------------------------------------------------------------------------- report

_FAMILIES = {"recall": "Recall", "hitrate": "HitRate", "ndcg": "NDCG", "mrr": "MRR"}


def _metric_columns(results: Mapping[str, Mapping[str, Mapping[str, float]]]) -> list[str]:
    """Metric names present, ordered recall@K, hitrate@K, ndcg@K, mrr (K ascending)."""
    names = {m for slices in results.values() for row in slices.values() for m in row}
    names.discard("users")

    def key(name: str) -> tuple[int, int, str]:
        family, _, k = name.partition("@")
        order = list(_FAMILIES).index(family) if family in _FAMILIES else len(_FAMILIES)
        return order, int(k) if k.isdigit() else 0, name

    return sorted(names, key=key)


def _label(metric: str) -> str:
    family, sep, k = metric.partition("@")
    return f"{_FAMILIES.get(family, family)}{sep}{k}"


def _fmt(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.4f}"


def _curve_slices(curve: Mapping[Any, Any]) -> dict[str, dict[int, float]]:
    """Accept {slice: {K: recall}} or a bare {K: recall} (taken as the "all" slice)."""
    if curve and all(isinstance(v, Mapping) for v in curve.values()):
        return {str(s): {int(k): float(v) for k, v in c.items()} for s, c in curve.items()}
    return {"all": {int(k): float(v) for k, v in curve.items()}}


def _json_safe(value: Any) -> Any:
    """NaN -> null, numpy scalars -> Python, keys -> str: strict JSON."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _markdown(
    results: Mapping[str, Mapping[str, Mapping[str, float]]],
    comparisons: Sequence[Mapping[str, Any]],
    by_degree: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
) -> str:
    columns = _metric_columns(results)
    slices = [s for s in SLICES if any(s in r for r in results.values())]
    slices += sorted({s for r in results.values() for s in r} - set(slices))
    lines = ["# Offline evaluation", ""]
    for slice_name in slices:
        users = {r[slice_name].get("users") for r in results.values() if slice_name in r}
        users.discard(None)
        suffix = f" ({int(next(iter(users)))} users)" if len(users) == 1 else ""
        lines += [f"## Slice: {slice_name}{suffix}", ""]
        lines.append("| Method | " + " | ".join(_label(c) for c in columns) + " |")
        lines.append("|---|" + "---:|" * len(columns))
        for method, by_slice in results.items():
            row = by_slice.get(slice_name, {})
            lines.append(f"| {method} | " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
        lines.append("")
    if by_degree:
        buckets = [label for label, _, _ in DEGREE_BUCKETS]
        first = next(iter(by_degree.values()))
        metric = next(m for m in next(iter(first.values())) if m != "users")
        counts = " | ".join(f"{b} ({int(first[b]['users'])})" for b in buckets)
        lines += [f"## {_label(metric)} by training degree (users)", ""]
        lines.append(f"| Method | {counts} |")
        lines.append("|---|" + "---:|" * len(buckets))
        for method, row in by_degree.items():
            cells = " | ".join(_fmt(row[b].get(metric)) for b in buckets)
            lines.append(f"| {method} | {cells} |")
        lines.append("")
    if comparisons:
        lines += ["## Paired bootstrap (95% CI over users)", ""]
        lines.append("| A | B | Metric | Slice | A - B | 95% CI |")
        lines.append("|---|---|---|---|---:|---|")
        for c in comparisons:
            lines.append(
                f"| {c['a']} | {c['b']} | {_label(str(c['metric']))} | {c['slice']} | "
                f"{float(c['diff']):+.4f} | [{float(c['lo']):+.4f}, {float(c['hi']):+.4f}] |"
            )
        lines.append("")
    return "\n".join(lines)


def _plot(curves: Mapping[str, Mapping[Any, Any]], path: Path) -> None:
    """Recall@K per method, one subplot per slice; Agg canvas, no pyplot global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    per_method = {m: _curve_slices(c) for m, c in curves.items()}
    slices = [s for s in SLICES if any(s in c for c in per_method.values())] or list(SLICES)
    fig = Figure(figsize=(5.5 * len(slices), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(slices), squeeze=False)[0]
    for ax, slice_name in zip(axes, slices, strict=True):
        for method, by_slice in per_method.items():
            curve = by_slice.get(slice_name)
            if curve:
                ks = sorted(curve)
                ax.plot(ks, [curve[k] for k in ks], label=method)
        ax.set_title(f"Recall@K ({slice_name})")
        ax.set_xlabel("K")
        ax.set_ylabel("recall")
        ax.set_xlim(1, None)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)


def _plot_by_degree(by_degree: Mapping[str, Mapping[str, Mapping[str, float]]], path: Path) -> None:
    """Grouped bars: one group per training-degree bucket, one bar per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    buckets = [label for label, _, _ in DEGREE_BUCKETS]
    first = next(iter(by_degree.values()))
    metric = next(m for m in next(iter(first.values())) if m != "users")
    fig = Figure(figsize=(8, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / len(by_degree)
    for i, (method, row) in enumerate(by_degree.items()):
        values = [row[b][metric] for b in buckets]
        ax.bar(np.arange(len(buckets)) + i * width, values, width, label=method)
    ax.set_xticks(
        np.arange(len(buckets)) + 0.4 - width / 2,
        [f"{b}\n({int(first[b]['users'])} users)" for b in buckets],
    )
    ax.set_xlabel("training degree of the query user")
    ax.set_ylabel(_label(metric))
    ax.set_title(f"{_label(metric)} by training degree")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)


def write_report(
    results: Mapping[str, Mapping[str, Mapping[str, float]]],
    curves: Mapping[str, Mapping[Any, Any]],
    comparisons: Sequence[Mapping[str, Any]],
    out_dir: Path | str,
    by_degree: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
) -> dict[str, Path]:
    """Write metrics.json, metrics.md, recall_at_k.png (and recall_by_degree.png with
    ``by_degree``); return their paths by kind.

    results: method -> slice -> metric -> value; curves: method -> slice -> {K: recall}
    (recall_curve's output; a bare {K: recall} counts as the "all" slice); comparisons: dicts with
    a, b, metric, slice, diff, lo, hi; by_degree: method -> ``recall_by_degree``'s output.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "metrics.json",
        "markdown": out / "metrics.md",
        "plot": out / "recall_at_k.png",
    }
    payload = {
        "results": results,
        "curves": {m: _curve_slices(c) for m, c in curves.items()},
        "comparisons": list(comparisons),
        "by_degree": dict(by_degree or {}),
    }
    paths["json"].write_text(json.dumps(_json_safe(payload), indent=2, allow_nan=False) + "\n")
    paths["markdown"].write_text(_markdown(results, comparisons, by_degree))
    _plot(curves, paths["plot"])
    if by_degree:
        paths["by_degree_plot"] = out / "recall_by_degree.png"
        _plot_by_degree(by_degree, paths["by_degree_plot"])
    log.info("wrote evaluation report to %s", out)
    return paths
