"""Feast online reads for the workers: chunked, and each row read once per batch.

Feast's SDK costs a fraction of a millisecond per row and grows worse per row on large requests
(measured: ~3.5k rows/s at 4,000 entities vs ~6-10k at 100-1,000 on this machine), and that
is what bounds the chain's throughput, so the refresher reads each user's row once even when it
is both a user to embed and a sampled friend of another one in the same batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from friendrec.contract import FRIEND_IDS, JOIN_KEY, Contract
from friendrec.feast_store import online_features
from training.features import FeatureTable, InputSpec, tower_inputs

READ_CHUNK = 256


def read_online(
    store: Any, users: Sequence[int], refs: list[str] | None = None, *, contract: Contract
) -> list[dict[str, Any]]:
    """``online_features`` in chunks of ``READ_CHUNK`` users (request order kept)."""
    rows: list[dict[str, Any]] = []
    for lo in range(0, len(users), READ_CHUNK):
        chunk = list(users[lo : lo + READ_CHUNK])
        rows.extend(online_features(store, chunk, refs, contract=contract))
    return rows


def query_inputs(
    store: Any, users: Sequence[int], spec: InputSpec, contract: Contract
) -> dict[str, np.ndarray]:
    """The tower inputs of ``users`` exactly as ``training.features.fetch_query_inputs`` builds
    them for users without request features (the serving path), with every row read once: the
    users, then those of their first ``fanout`` sampled friends not among them. A test compares
    the embeddings with the model run on ``fetch_online_inputs``."""
    rows = read_online(store, users, contract=contract)
    by_id = {r[JOIN_KEY]: r for r in rows}
    name = FRIEND_IDS.name
    wanted = sorted({int(f) for r in rows for f in r[name][: spec.fanout]})
    missing = [f for f in wanted if f not in by_id]
    extra = {r[JOIN_KEY]: r for r in read_online(store, missing, contract=contract)}
    friends = [by_id[f] if f in by_id else extra[f] for f in wanted]
    known = {r[JOIN_KEY] for r in friends if r["known"]}
    table = FeatureTable.from_rows(rows, spec, contract)
    friend_table = FeatureTable.from_rows(friends, spec, contract) if friends else None
    neighbour_rows = np.full((len(rows), spec.fanout), -1, dtype=np.int64)
    for i, row in enumerate(rows):
        # A friend the store does not know is absent, exactly as in the training table.
        present = [f for f in row[name][: spec.fanout] if f in known]
        if present and friend_table is not None:
            neighbour_rows[i, : len(present)] = friend_table.rows_of(np.array(present))
    return tower_inputs(table, np.arange(len(rows)), neighbour_rows, friend_table)
