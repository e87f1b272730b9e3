"""Tower inputs: a columnar table of every user's features and the padded tensors the tower eats.

The same ``FeatureTable`` is filled from the Feast *offline* store for training (a point-in-time
join at the training cutoff) and from the Feast *online* store at serving time, and
``node_inputs`` turns either into the tower's raw inputs. So training and serving cannot drift: the
only transformation code is the model's own (``training/tower.py``) and the contract's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from friendrec.config import FeatureSettings, Settings
from friendrec.contract import (
    DEGREE,
    EVENT_TIMESTAMP,
    FRIEND_IDS,
    JOIN_KEY,
    NBR_SPARSE_IDS,
    NBR_SPARSE_WEIGHTS,
    SPARSE_IDS,
    Contract,
)
from friendrec.data.canonical import PreparedDataset
from friendrec.friend_aggregates import RequestFeatures, friend_aggregates

PAD_ID = -1  # padding of id lists; weight 0
OFFLINE_CHUNK_USERS = 500_000  # users per offline retrieval of the training table
# Vocabulary ids (``sparse_ids``, ``nbr_ids``) are indices into a vocabulary of at most millions
# of values: the training table keeps them as int32 (half the bytes of its two widest columns at
# 5M users, docs/scaling.md); ``node_features`` hands the tower int64, as the signature declares.
VOCAB_ID_DTYPE = np.int32


@dataclass(frozen=True)
class InputSpec:
    """Fixed tensor shapes of the tower's raw inputs (the serving signature uses them too)."""

    sparse_len: int  # = features.sparse_cap
    nbr_len: int  # = features.nbr_sparse_cap
    friend_len: int  # = features.friend_cap
    fanout: int  # sampled friends per user in the second layer
    vocab_size: int

    @classmethod
    def from_settings(cls, settings: Settings, vocab_size: int, fanout: int) -> InputSpec:
        return cls(
            sparse_len=settings.features.sparse_cap,
            nbr_len=settings.features.nbr_sparse_cap,
            friend_len=settings.features.friend_cap,
            fanout=fanout,
            vocab_size=vocab_size,
        )

    @classmethod
    def from_signature(cls, shapes: Mapping[str, Sequence[int]]) -> InputSpec:
        """The input shapes of an exported serving signature (e.g. from TF Serving's
        GetModelMetadata) -> the spec a client needs to build requests. ``vocab_size`` is 0:
        only the tower itself needs it, and the out-of-vocabulary mapping lives in the model."""
        try:
            return cls(
                sparse_len=int(shapes["self_sparse_ids"][1]),
                nbr_len=int(shapes["self_nbr_ids"][1]),
                friend_len=int(shapes["self_friend_ids"][1]),
                fanout=int(shapes["friend_mask"][1]),
                vocab_size=0,
            )
        except (KeyError, IndexError) as exc:
            raise ValueError(f"not a friendrec user-tower signature: missing {exc}") from exc


def _pad(lists: Sequence[Sequence[Any]], width: int, fill: float, dtype: Any) -> np.ndarray:
    out = np.full((len(lists), width), fill, dtype=dtype)
    for i, values in enumerate(lists):
        if values is None:
            continue
        n = min(len(values), width)
        if n:
            out[i, :n] = np.asarray(values[:n], dtype=dtype)
    return out


def _pad_list_column(
    column: Any, width: int, fill: float, dtype: Any, default: Sequence[Any]
) -> np.ndarray:
    """``_pad`` of an Arrow list column, by array operations: the first ``width`` values of each
    row, ``fill`` after them; a missing row takes ``default``."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count:
        column = pc.fill_null(column, pa.scalar(list(default), column.type))
    n = len(column)
    out = np.full((n, width), fill, dtype=dtype)
    offsets = column.offsets.to_numpy().astype(np.int64)
    values = column.flatten().to_numpy(zero_copy_only=False)
    take = np.minimum(np.diff(offsets), width)
    if not take.sum():
        return out
    rows = np.repeat(np.arange(n), take)
    within = np.arange(int(take.sum())) - np.repeat(np.cumsum(take) - take, take)
    out[rows, within] = values[np.repeat(offsets[:-1] - offsets[0], take) + within]
    return out


def _scalar_column(column: Any, default: Any, dtype: Any) -> np.ndarray:
    """An Arrow scalar column as numpy; missing values and NaNs take ``default`` (as
    ``from_rows`` does for the ``None`` a pandas NaN becomes)."""
    values = column.to_numpy(zero_copy_only=False).astype(np.float64)
    values[np.isnan(values)] = default
    return values.astype(dtype)


@dataclass
class FeatureTable:
    """Every feature of a set of users as padded numpy arrays, rows aligned with ``user_ids``."""

    user_ids: np.ndarray  # int64 [n]
    profile: np.ndarray  # float32 [n, P] raw scalars
    sparse_ids: np.ndarray  # int64 or VOCAB_ID_DTYPE [n, sparse_len], PAD_ID padded
    nbr_ids: np.ndarray  # int64 or VOCAB_ID_DTYPE [n, nbr_len]
    nbr_weights: np.ndarray  # float32 [n, nbr_len]
    nbr_profile: np.ndarray  # float32 [n, P]
    degree: np.ndarray  # int64 [n]
    friend_matrix: np.ndarray  # int64 [n, friend_len]: sampled friends' user ids, PAD_ID padded

    @classmethod
    def from_rows(
        cls, rows: Sequence[Mapping[str, Any]], spec: InputSpec, contract: Contract
    ) -> FeatureTable:
        """From dict rows as Feast returns them (online, or a historical DataFrame's records),
        named and defaulted by the dataset's ``contract``."""

        def column(name: str) -> list[Any]:
            return [contract.default_value(name) if r.get(name) is None else r[name] for r in rows]

        width = len(contract.profile_scalars)
        profile = np.array(
            [column(n) for n in contract.profile_scalar_names], dtype=np.float32
        ).T.reshape(len(rows), width)
        return cls(
            user_ids=np.array([int(r[JOIN_KEY]) for r in rows], dtype=np.int64),
            profile=profile,
            sparse_ids=_pad(column(SPARSE_IDS.name), spec.sparse_len, PAD_ID, np.int64),
            nbr_ids=_pad(column(NBR_SPARSE_IDS.name), spec.nbr_len, PAD_ID, np.int64),
            nbr_weights=_pad(column(NBR_SPARSE_WEIGHTS.name), spec.nbr_len, 0.0, np.float32),
            nbr_profile=_pad(column(contract.nbr_profile_mean.name), width, 0.0, np.float32),
            degree=np.array(column(DEGREE.name), dtype=np.int64),
            friend_matrix=_pad(column(FRIEND_IDS.name), spec.friend_len, PAD_ID, np.int64),
        )

    @classmethod
    def from_offline_store(
        cls,
        store: Any,
        data: PreparedDataset,
        spec: InputSpec,
        as_of: int | None = None,
        chunk_users: int = OFFLINE_CHUNK_USERS,
    ) -> FeatureTable:
        """Point-in-time join of every user at ``as_of`` (default: the training cutoff), through
        the training feature service of the dataset's contract, ``chunk_users`` users per
        retrieval: Feast's duckdb join of all 5M users of a synthetic graph at once was killed
        at 19.5 GB on the 24 GB machine (docs/scaling.md); chunks bound it."""
        when = datetime.fromtimestamp((as_of or data.meta.train_cutoff_ts) + 1, UTC)
        service = store.get_feature_service(data.contract.training_service)
        n = len(data.user_ids)
        out: FeatureTable | None = None
        for lo in range(0, n, chunk_users):
            ids = data.user_ids[lo : lo + chunk_users]
            entity_df = pd.DataFrame({JOIN_KEY: ids, EVENT_TIMESTAMP: pd.Series([when] * len(ids))})
            table = store.get_historical_features(entity_df=entity_df, features=service).to_arrow()
            table = table.sort_by(JOIN_KEY)
            if not np.array_equal(table.column(JOIN_KEY).to_numpy(), ids):
                raise RuntimeError("the offline store did not return exactly one row per user")
            part = cls.from_arrow(table, spec, data.contract)
            del table
            # Arrow keeps freed buffers for reuse (friendrec.data.canonical.load_prepared).
            pa.default_memory_pool().release_unused()
            # Filled in place: concatenating the chunks would hold the table twice at its peak.
            if out is None:
                out = cls(**{f.name: _empty_like(getattr(part, f.name), n) for f in fields(cls)})
            for f in fields(cls):
                getattr(out, f.name)[lo : lo + len(part)] = getattr(part, f.name)
        if out is None:
            raise ValueError(f"{data.meta.name} has no users")
        return out

    @classmethod
    def from_arrow(cls, table: Any, spec: InputSpec, contract: Contract) -> FeatureTable:
        """``from_rows`` of an Arrow table's records, column by column: at 1M users the records
        path held ~8 GB of Python objects and most of training's start-up (docs/scaling.md)."""
        c = contract
        names = c.profile_scalar_names
        width = len(names)
        profile = np.stack(
            [_scalar_column(table.column(n), c.default_value(n), np.float32) for n in names],
            axis=1,
        ).reshape(table.num_rows, width)

        def padded(name: str, length: int, fill: float, dtype: Any) -> np.ndarray:
            return _pad_list_column(table.column(name), length, fill, dtype, c.default_value(name))

        degree = table.column(DEGREE.name)
        return cls(
            user_ids=table.column(JOIN_KEY).to_numpy().astype(np.int64),
            profile=profile,
            sparse_ids=padded(SPARSE_IDS.name, spec.sparse_len, PAD_ID, VOCAB_ID_DTYPE),
            nbr_ids=padded(NBR_SPARSE_IDS.name, spec.nbr_len, PAD_ID, VOCAB_ID_DTYPE),
            nbr_weights=padded(NBR_SPARSE_WEIGHTS.name, spec.nbr_len, 0.0, np.float32),
            nbr_profile=padded(c.nbr_profile_mean.name, width, 0.0, np.float32),
            degree=_scalar_column(degree, c.default_value(DEGREE.name), np.int64),
            friend_matrix=padded(FRIEND_IDS.name, spec.friend_len, PAD_ID, np.int64),
        )

    def __len__(self) -> int:
        return len(self.user_ids)

    @cached_property
    def friend_rows(self) -> np.ndarray:
        """``friend_matrix`` as row indices (-1: padding or a friend without a row), computed
        once: batch assembly looks friends up for every sampled user (int32 below 2**31 rows)."""
        return self.rows_of(self.friend_matrix).astype(row_dtype(len(self)))

    def rows_of(self, user_ids: np.ndarray) -> np.ndarray:
        """User ids -> row indices; -1 for users not in the table."""
        pos = np.searchsorted(self.user_ids, user_ids)
        pos = np.minimum(pos, len(self.user_ids) - 1)
        return np.where(self.user_ids[pos] == user_ids, pos, -1)


def row_dtype(n: int) -> type[np.signedinteger]:
    """The narrowest index dtype for ``n`` rows (-1 included): arrays of row indices over a
    graph of millions of users are its largest in-memory arrays after the feature table."""
    return np.int32 if n < np.iinfo(np.int32).max else np.int64


def _empty_like(part: np.ndarray, n: int) -> np.ndarray:
    return np.empty((n, *part.shape[1:]), dtype=part.dtype)


NODE_KEYS = (
    "user_id",
    "profile",
    "sparse_ids",
    "nbr_ids",
    "nbr_weights",
    "nbr_profile",
    "degree",
    "friend_ids",
)


def node_features(table: FeatureTable, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Per-node raw inputs for row indices of any shape; row -1 = an absent node (zeros/pads)."""
    rows = np.asarray(rows)
    safe = np.maximum(rows, 0)
    absent = rows < 0
    out = {
        "user_id": table.user_ids[safe],
        "profile": table.profile[safe],
        "sparse_ids": table.sparse_ids[safe].astype(np.int64, copy=False),
        "nbr_ids": table.nbr_ids[safe].astype(np.int64, copy=False),
        "nbr_weights": table.nbr_weights[safe],
        "nbr_profile": table.nbr_profile[safe],
        "degree": table.degree[safe],
        "friend_ids": table.friend_matrix[safe],
    }
    if absent.any():
        out["user_id"][absent] = PAD_ID
        out["friend_ids"][absent] = PAD_ID
        out["profile"][absent] = 0.0
        out["sparse_ids"][absent] = PAD_ID
        out["nbr_ids"][absent] = PAD_ID
        out["nbr_weights"][absent] = 0.0
        out["nbr_profile"][absent] = 0.0
        out["degree"][absent] = 0
    return out


def sample_neighbours(
    table: FeatureTable,
    rows: np.ndarray,
    fanout: int,
    rng: np.random.Generator | None,
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """Second-layer neighbour rows [len(rows), fanout] (-1 = none) from each user's friend sample.

    ``exclude[i]`` (a user id) is removed from row i's candidates: the leakage guard that keeps a
    training positive out of its anchor's neighbourhood. With ``rng`` None the first ``fanout``
    sampled friends are taken (deterministic: serving, evaluation, export).

    Vectorised over the batch except for one ``rng.choice`` per user with more than ``fanout``
    candidates, made in row order on the same candidate count as a per-row loop would: the random
    stream (and so every training batch of a seed) is unchanged by the vectorisation.
    """
    rows = np.asarray(rows)
    out = np.full((len(rows), fanout), -1, dtype=np.int64)
    if not len(rows):
        return out
    safe = np.maximum(rows, 0)
    friends = table.friend_matrix[safe]
    keep = (friends != PAD_ID) & (rows >= 0)[:, None]
    if exclude is not None:
        keep &= friends != np.asarray(exclude)[:, None]
    # Each row's candidates moved to the front, in their stored order.
    order = np.argsort(~keep, axis=1, kind="stable")
    candidates = np.take_along_axis(table.friend_rows[safe], order, axis=1)
    counts = keep.sum(axis=1)
    width = min(fanout, candidates.shape[1])
    first = candidates[:, :width]
    out[:, :width] = np.where(np.arange(width) < counts[:, None], first, -1)
    if rng is not None:
        for i in np.flatnonzero(counts > fanout):
            out[i] = candidates[i, rng.choice(counts[i], fanout, replace=False)]
    return out


def friend_states_of(
    states: np.ndarray, neighbour_rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Layer-by-layer inference's second-layer inputs: the layer-1 ``states`` of each user's
    neighbour rows [batch, fanout, hidden] and which of them count (row -1: absent, masked)."""
    return states[np.maximum(neighbour_rows, 0)], (neighbour_rows >= 0).astype(np.float32)


def tower_inputs(
    table: FeatureTable,
    rows: np.ndarray,
    neighbour_rows: np.ndarray,
    friend_table: FeatureTable | None = None,
) -> dict[str, np.ndarray]:
    """The named raw inputs of the tower for a batch: the user (``self_*``) and its neighbours
    (``friend_*`` with a fanout axis after the batch axis, rows of ``friend_table``, by default
    the same table). This is the serving signature's input set."""
    own = node_features(table, rows)
    friends = node_features(friend_table or table, neighbour_rows)
    inputs = {f"self_{k}": v for k, v in own.items()}
    inputs.update({f"friend_{k}": v for k, v in friends.items()})
    inputs["friend_mask"] = (neighbour_rows >= 0).astype(np.float32)
    return inputs


@dataclass
class QueryInputs:
    """What the serving feature path produced for a batch of query users."""

    inputs: dict[str, np.ndarray]  # the tower's raw inputs (serving signature)
    known: np.ndarray  # bool [n]: Feast had a row for the user
    used_request_features: np.ndarray  # bool [n]: built from the caller's RequestFeatures
    friend_ids: list[np.ndarray]  # per user: the friends the features know (to exclude)


def fetch_query_inputs(
    store: Any,
    user_ids: Sequence[int],
    spec: InputSpec,
    request_features: Mapping[int, RequestFeatures] | None = None,
    features: FeatureSettings | None = None,
    seed: int = 0,
    *,
    contract: Contract,
) -> QueryInputs:
    """The serving feature path: two online reads (the users, then their first ``fanout``
    sampled friends) -> the tower's raw inputs.

    Unknown users get the contract defaults (no friends, empty ids): the cold-start path, unless
    the caller supplied ``request_features`` for them; then their graph features are computed from
    the named friends' online rows exactly as the batch job would (``friend_aggregates``), which
    needs the feature caps (``features``) and the sampling ``seed`` the store was built with.
    ``contract`` is the dataset's (names, defaults, the profile transform).
    """
    from friendrec.feast_store import online_features

    request_features = request_features or {}
    users = online_features(store, list(user_ids), contract=contract)
    requested = [not row["known"] and row[JOIN_KEY] in request_features for row in users]
    if any(requested) and features is None:
        raise ValueError("request features need the feature settings (caps) to aggregate friends")
    friend_lists: list[list[int]] = []
    wanted: set[int] = set()
    for row, use_request in zip(users, requested, strict=True):
        if use_request:
            friends = [int(f) for f in request_features[row[JOIN_KEY]].friend_ids]
            wanted.update(friends)  # every friend: the aggregates are over all of them
        else:
            friends = [int(f) for f in row[FRIEND_IDS.name]]
            wanted.update(friends[: spec.fanout])
        friend_lists.append(friends)
    friends = online_features(store, sorted(wanted), contract=contract) if wanted else []
    known_rows = {row[JOIN_KEY]: row for row in friends if row["known"]}
    for i, use_request in enumerate(requested):
        if use_request:
            uid = users[i][JOIN_KEY]
            request = request_features[uid]
            aggregates = friend_aggregates(
                uid, friend_lists[i], known_rows, features, seed, contract=contract
            )
            users[i] = {
                **request.profile_row(uid, spec.sparse_len, contract),
                **aggregates,
                "known": False,
            }
            friend_lists[i] = users[i][FRIEND_IDS.name]
    table = FeatureTable.from_rows(users, spec, contract)
    friend_table = FeatureTable.from_rows(friends, spec, contract) if friends else None
    neighbour_rows = np.full((len(users), spec.fanout), -1, dtype=np.int64)
    for i, row in enumerate(users):
        # A friend the store does not know is absent, exactly as in the training table.
        present = [f for f in row[FRIEND_IDS.name][: spec.fanout] if f in known_rows]
        if present and friend_table is not None:
            neighbour_rows[i, : len(present)] = friend_table.rows_of(np.array(present))
    inputs = tower_inputs(table, np.arange(len(users)), neighbour_rows, friend_table)
    return QueryInputs(
        inputs=inputs,
        known=np.array([row["known"] for row in users], dtype=bool),
        used_request_features=np.array(requested, dtype=bool),
        friend_ids=[np.asarray(f, dtype=np.int64) for f in friend_lists],
    )


def fetch_online_inputs(
    store: Any, user_ids: Sequence[int], spec: InputSpec, contract: Contract
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``fetch_query_inputs`` without request features: (tower inputs, known-to-Feast flags)."""
    query = fetch_query_inputs(store, user_ids, spec, contract=contract)
    return query.inputs, query.known


# ---------------------------------------------------------------------------------------------
# A whole population's serving inputs (the index build)


@dataclass
class OnlineTable:
    """Every listed user's online row as one table, with what ``fetch_query_inputs`` also needs
    for its neighbour rule: which users the store knows, and each one's first stored friends."""

    table: FeatureTable  # rows aligned with the user ids as given
    known: np.ndarray  # bool [n]: the store has a value for the user
    # int64 [n, max(friend_len, fanout)]: the first stored friends, PAD_ID padded (the table's
    # ``friend_matrix`` is a view of its first ``friend_len`` columns)
    friend_ids: np.ndarray


def default_table(user_ids: np.ndarray, spec: InputSpec, contract: Contract) -> OnlineTable:
    """Every user at the contract defaults (as ``from_rows`` builds a user the store lacks), in
    writable arrays for ``read_online_table`` to fill."""
    n = len(user_ids)

    def filled(name: str, width: int, fill: float, dtype: Any) -> np.ndarray:
        row = _pad([contract.default_value(name)], width, fill, dtype)
        return np.repeat(row, n, axis=0)

    scalars = [contract.default_value(name) for name in contract.profile_scalar_names]
    friend_width = max(spec.friend_len, spec.fanout)
    friends = filled(FRIEND_IDS.name, friend_width, PAD_ID, np.int64)
    table = FeatureTable(
        user_ids=np.asarray(user_ids, dtype=np.int64),
        profile=np.repeat(np.array([scalars], dtype=np.float32).reshape(1, -1), n, axis=0),
        sparse_ids=filled(SPARSE_IDS.name, spec.sparse_len, PAD_ID, np.int64),
        nbr_ids=filled(NBR_SPARSE_IDS.name, spec.nbr_len, PAD_ID, np.int64),
        nbr_weights=filled(NBR_SPARSE_WEIGHTS.name, spec.nbr_len, 0.0, np.float32),
        nbr_profile=filled(
            contract.nbr_profile_mean.name, len(contract.profile_scalars), 0.0, np.float32
        ),
        degree=np.full(n, contract.default_value(DEGREE.name), dtype=np.int64),
        friend_matrix=friends[:, : spec.friend_len],
    )
    return OnlineTable(table, np.zeros(n, dtype=bool), friends)


def read_online_table(
    store: Any,
    user_ids: np.ndarray,
    spec: InputSpec,
    contract: Contract,
    chunk: int | None = None,
    direct: bool | None = None,
) -> OnlineTable:
    """Every user's online row, read once and decoded by column (``friendrec.feast_read``): the
    table ``FeatureTable.from_rows`` would build from ``online_features`` for the same users, at
    a small fraction of the cost. ``chunk``: users per read; ``direct``: see
    ``read_online_columns``."""
    from friendrec.feast_read import CHUNK_USERS, read_online_columns

    out = default_table(user_ids, spec, contract)
    t = out.table
    targets: dict[str, tuple[np.ndarray, Any]] = {
        name: (t.profile[:, j], 0.0) for j, name in enumerate(contract.profile_scalar_names)
    }
    targets.update(
        {
            SPARSE_IDS.name: (t.sparse_ids, PAD_ID),
            NBR_SPARSE_IDS.name: (t.nbr_ids, PAD_ID),
            NBR_SPARSE_WEIGHTS.name: (t.nbr_weights, 0.0),
            contract.nbr_profile_mean.name: (t.nbr_profile, 0.0),
            DEGREE.name: (t.degree, 0),
            FRIEND_IDS.name: (out.friend_ids, PAD_ID),
        }
    )
    out.known[:] = read_online_columns(
        store, t.user_ids, targets, contract, chunk=chunk or CHUNK_USERS, direct=direct
    )
    return out


def known_friend_rows(
    user_ids: np.ndarray, known: np.ndarray, friend_ids: np.ndarray
) -> np.ndarray:
    """Rows (in the sorted ``user_ids``) of each user's listed friends that the store knows, kept
    in their stored order and moved to the front, -1 after: exactly ``fetch_query_inputs``'s
    neighbour rows (a friend the store does not know is absent, not a gap)."""
    friend_ids = np.asarray(friend_ids)
    if not len(user_ids):
        return np.full(friend_ids.shape, -1, dtype=np.int64)
    pos = np.minimum(np.searchsorted(user_ids, friend_ids), len(user_ids) - 1)
    found = (user_ids[pos] == friend_ids) & (friend_ids != PAD_ID)
    found[found] = known[pos[found]]
    order = np.argsort(~found, axis=1, kind="stable")
    return np.take_along_axis(np.where(found, pos, -1), order, axis=1)
