"""Bulk, columnar reads of the online store: every user's row read once, decoded a column at a
time into numpy arrays. The index build's feature read (``training.features.read_online_table``).

Why: the serving read (``feast_store.online_features``) is built for a batch of query users: one
``online_read`` per view, each stored value parsed into a ``ValueProto`` and then a Python object.
Embedding a whole population through it read every user about 11 times (once itself, ~10 times
as someone's sampled friend), and the per-value decoding took 391 s of a 450 s build at 250k
users. Here each user's row is read once and each feature column is decoded by numpy.

Where the bytes come from:
- Feast's sqlite store (ours, or the stock one without its vector, text-search or versioned
  modes): the view's table is read directly, one range of serialized entity keys per chunk. These
  are the rows ``FriendrecSqliteOnlineStore.online_read`` returns, minus its ``ValueProto`` parse.
- Any other online store (Redis): ``Provider.online_read`` in chunks, its protos re-serialized.

Decoding: the canonical wire layouts of the contract's dtypes (one ``int64_val`` or ``float_val``,
or one packed ``int64_list_val`` or ``float_list_val``: what Feast and ``feast_write`` write) are
parsed with numpy; a blob in any other layout, or whose kind does not match its column's dtype,
goes through ``ValueProto`` and ``feast_store.python_value``, the serving read's own decoding.
Either way the value written is the one ``FeatureTable.from_rows`` would build from the serving
read (tests/test_index.py compares the two on protobuf's own encodings and on a real store).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from itertools import repeat
from typing import Any

import numpy as np
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto

from friendrec.contract import JOIN_KEY, Contract
from friendrec.feast_store import python_value

log = logging.getLogger(__name__)

CHUNK_USERS = 20_000
"""Users per read: ~250k stored values (a few tens of MB of Python bytes) decoded at a time."""

# Wire tags (field number << 3 | wire type) of the ``Value`` kinds decoded by numpy.
_INT64_VAL = 0x20  # int64_val = 4, varint
_FLOAT_VAL = 0x35  # float_val = 6, fixed32
_INT64_LIST = 0x72  # int64_list_val = 14, length-delimited
_FLOAT_LIST = (0x82, 0x01)  # float_list_val = 16, length-delimited (a two-byte tag)
_PACKED = 0x0A  # Int64List.val / FloatList.val = 1, packed
_SLACK = 16  # zero bytes after the buffer: gathers past a blob's end stay in bounds

Targets = Mapping[str, tuple[np.ndarray, Any]]
"""Feature name -> (its column: [n] scalars or [n, width] padded lists, already holding the
contract defaults; the padding value written past a stored list's end)."""


# ---------------------------------------------------------------------------------------------
# Decoding


def _varints_at(
    buf: np.ndarray, pos: np.ndarray, end: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One varint at each ``pos`` (none may run past ``end``): (uint64 values, the position after
    each, whether it was well formed)."""
    value = np.zeros(len(pos), np.uint64)
    done = np.zeros(len(pos), bool)
    ok = np.ones(len(pos), bool)
    at = pos.copy()
    for k in range(10):
        active = ~done
        if not active.any():
            break
        ok &= ~active | (at < end)
        byte = buf[np.minimum(at, len(buf) - 1)]
        if k == 9:  # the tenth byte holds bit 63 only
            ok &= ~active | (byte <= 1)
        part = (byte & 0x7F).astype(np.uint64) << np.uint64(7 * k)
        value |= np.where(active, part, np.uint64(0))
        done |= active & (byte < 0x80)
        at += active
    return value, at, ok & done


def _packed_header(
    buf: np.ndarray, pos: np.ndarray, end: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A list kind's message after its tag, ``len [0x0A len payload]``, filling the blob exactly:
    (payload start, payload length, well formed). An empty list has no inner field."""
    outer, at, ok = _varints_at(buf, pos, end)
    outer = outer.astype(np.int64)
    empty = ok & (outer == 0) & (at == end)
    ok &= empty | ((at + outer == end) & (buf[np.minimum(at, len(buf) - 1)] == _PACKED))
    inner, start, inner_ok = _varints_at(buf, at + 1, end)
    inner = inner.astype(np.int64)
    ok &= empty | (inner_ok & (start + inner == end))
    return np.where(empty, end, start), np.where(empty, 0, inner), ok


def _ragged_positions(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + n) for s, n in zip(starts, lengths)])``."""
    total = int(lengths.sum())
    offsets = np.cumsum(lengths) - lengths
    return np.repeat(starts - offsets, lengths) + np.arange(total)


def _packed_int64s(
    buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Packed varints in ``buf[starts[i] : starts[i] + lengths[i]]`` for each i: (every int64
    back to back, count per payload, payload well formed)."""
    ok = np.ones(len(starts), bool)
    data = buf[_ragged_positions(starts, lengths)]
    last = data[np.cumsum(lengths)[lengths > 0] - 1] if len(data) else data
    ok[lengths > 0] &= last < 0x80  # no varint runs into the next payload
    ends = data < 0x80
    counts = np.zeros(len(starts), np.int64)
    if not len(data):
        return np.zeros(0, np.int64), counts, ok
    cum = np.cumsum(ends)
    filled = lengths > 0
    stops = np.cumsum(lengths)
    counts[filled] = cum[stops[filled] - 1] - np.concatenate([[0], cum])[(stops - lengths)[filled]]
    first = np.flatnonzero(np.concatenate([[True], ends[:-1]]))  # where each varint begins
    element = cum - ends  # the varint each byte belongs to
    k = np.arange(len(data)) - first[element]
    bad = (k > 9) | ((k == 9) & (data > 1))
    if bad.any():
        payload = np.repeat(np.arange(len(starts)), lengths)
        ok[payload[bad]] = False
    parts = (data & 0x7F).astype(np.uint64) << (np.minimum(k, 9) * 7).astype(np.uint64)
    values = np.bitwise_or.reduceat(parts, first).view(np.int64)
    return values, counts, ok


def _scatter_lists(
    out: np.ndarray,
    rows: np.ndarray,
    values: np.ndarray,
    counts: np.ndarray,
    fill: Any,
) -> None:
    """Row ``rows[i]`` of the padded ``out`` <- the i-th list (``counts[i]`` of ``values``),
    truncated to the width and padded with ``fill``: ``_pad`` of training.features, by column."""
    out[rows] = fill
    kept = np.minimum(counts, out.shape[1])
    source = _ragged_positions(np.cumsum(counts) - counts, kept)
    column = np.arange(int(kept.sum())) - np.repeat(np.cumsum(kept) - kept, kept)
    out[np.repeat(rows, kept), column] = values[source]


def _assign(out: np.ndarray, row: int, value: Any, fill: Any) -> None:
    """One Python value into its row, as ``FeatureTable.from_rows`` builds it."""
    if out.ndim == 1:
        out[row] = np.asarray(value, dtype=out.dtype)
        return
    out[row] = fill
    n = min(len(value), out.shape[1])
    if n:
        out[row, :n] = np.asarray(value[:n], dtype=out.dtype)


def decode_into(out: np.ndarray, rows: np.ndarray, blobs: Sequence[bytes], fill: Any) -> np.ndarray:
    """Serialized ``ValueProto`` ``blobs[i]`` -> ``out[rows[i]]`` (a scalar column [n], or padded
    lists [n, width] with ``fill`` past each list's end), converted to ``out.dtype`` as
    ``FeatureTable.from_rows`` converts the serving read's values.

    Returns which blobs held a value: an unset one (``python_value`` None) leaves its row alone,
    at the default the caller put there. See the module docstring for what numpy parses."""
    n = len(blobs)
    present = np.zeros(n, bool)
    if n == 0:
        return present
    rows = np.asarray(rows, dtype=np.int64)
    lengths = np.fromiter(map(len, blobs), np.int64, n)
    buf = np.frombuffer(b"".join(blobs) + bytes(_SLACK), np.uint8)
    ends = np.cumsum(lengths)
    starts = ends - lengths
    tag = buf[starts]
    handled = lengths == 0  # an unset Value serializes to nothing
    integer = out.dtype == np.int64
    single = out.dtype == np.float32
    if out.ndim == 1 and integer:
        sel = np.flatnonzero((tag == _INT64_VAL) & (lengths > 1))
        values, after, ok = _varints_at(buf, starts[sel] + 1, ends[sel])
        sel, values = sel[ok & (after == ends[sel])], values[ok & (after == ends[sel])]
        out[rows[sel]] = values.view(np.int64)
        handled[sel] = present[sel] = True
    elif out.ndim == 1 and single:
        sel = np.flatnonzero((tag == _FLOAT_VAL) & (lengths == 5))
        raw = buf[starts[sel, None] + 1 + np.arange(4)]
        out[rows[sel]] = raw.copy().view("<f4")[:, 0]
        handled[sel] = present[sel] = True
    elif out.ndim == 2 and (integer or single):
        if integer:
            sel = np.flatnonzero((tag == _INT64_LIST) & (lengths > 1))
            head = 1
        else:
            second = buf[np.minimum(starts + 1, len(buf) - 1)]
            sel = np.flatnonzero((tag == _FLOAT_LIST[0]) & (second == _FLOAT_LIST[1]))
            sel = sel[lengths[sel] > 2]
            head = 2
        start, size, ok = _packed_header(buf, starts[sel] + head, ends[sel])
        if single:
            ok &= size % 4 == 0
        sel, start, size = sel[ok], start[ok], size[ok]
        if integer:
            values, counts, ok = _packed_int64s(buf, start, size)
            if not ok.all():  # drop the malformed payloads and parse the rest again
                sel, start, size = sel[ok], start[ok], size[ok]
                values, counts, _ = _packed_int64s(buf, start, size)
        else:
            values = buf[_ragged_positions(start, size)].copy().view("<f4")
            counts = size // 4
        _scatter_lists(out, rows[sel], values, counts, fill)
        handled[sel] = present[sel] = True
    for i in np.flatnonzero(~handled):  # any other layout: the serving read's own decoding
        value = python_value(ValueProto.FromString(blobs[i]))
        if value is not None:
            _assign(out, int(rows[i]), value, fill)
            present[i] = True
    return present


# ---------------------------------------------------------------------------------------------
# Reading


def key_prefix(version: int) -> bytes:
    """The bytes before the id in a serialized ``user_id`` entity key (Feast's layout for a single
    INT64 key: a fixed prefix, then the id as 8 little-endian bytes), checked against Feast."""
    from feast.infra.key_encoding_utils import serialize_entity_key

    def key(user: int) -> bytes:
        proto = EntityKeyProto(join_keys=[JOIN_KEY], entity_values=[ValueProto(int64_val=user)])
        return serialize_entity_key(proto, entity_key_serialization_version=version)

    prefix = key(0)[:-8]
    for user in (1, 2**40 + 7, -3):
        if key(user) != prefix + int(user).to_bytes(8, "little", signed=True):
            raise RuntimeError("Feast's entity key layout changed: update friendrec.feast_read")
    return prefix


def entity_keys(user_ids: np.ndarray, version: int) -> list[bytes]:
    """Each user's serialized entity key, as Feast's ``serialize_entity_key`` writes it."""
    prefix = np.frombuffer(key_prefix(version), np.uint8)
    raw = np.empty((len(user_ids), len(prefix) + 8), np.uint8)
    raw[:, : len(prefix)] = prefix
    raw[:, len(prefix) :] = np.asarray(user_ids, "<i8").view(np.uint8).reshape(-1, 8)
    width = raw.shape[1]
    buf = raw.tobytes()
    return [buf[i : i + width] for i in range(0, len(buf), width)]


def key_order(user_ids: np.ndarray) -> np.ndarray:
    """The permutation that sorts users by serialized entity key (sqlite's BLOB order: the
    little-endian id bytes compared first to last), so a chunk of users is one key range."""
    return np.argsort(np.asarray(user_ids, "<i8").view(">u8"), kind="stable")


def _sqlite_table(store: Any, view: Any) -> tuple[Any, str] | None:
    """(connection, table name) of a view in a Feast sqlite store this module can read directly;
    None for any other store or mode (then ``Provider.online_read`` is used)."""
    from feast.infra.online_stores.sqlite import SqliteOnlineStore, _table_id

    online = store._get_provider().online_store
    config = store.config
    if not isinstance(online, SqliteOnlineStore):
        return None
    if getattr(config.online_store, "vector_enabled", False):
        return None
    if getattr(config.online_store, "text_search_enabled", False):
        return None
    if config.registry.enable_online_feature_view_versioning:
        return None
    return online._get_conn(config), _table_id(config.project, view, False)


Column = tuple[str, Sequence[bytes], Sequence[bytes]]
"""One feature of a chunk: (name, entity keys, serialized values), in any order."""


def _sqlite_columns(
    conn: Any, table: str | None, keys: list[bytes], names: Sequence[str]
) -> Iterator[Column]:
    """A key range's stored values (``keys`` sorted as sqlite sorts BLOBs) in one indexed query,
    split by feature with numpy: no Python statement runs per row. Keys in the range but not in
    ``keys`` may come too (the caller drops them)."""
    from feast.infra.online_stores.sqlite import _quote_id

    if table is None or not keys:
        return
    rows = conn.execute(
        f"SELECT entity_key, feature_name, value FROM {_quote_id(table)} "
        f"WHERE entity_key BETWEEN ? AND ? AND feature_name IN ({','.join('?' * len(names))})",
        [keys[0], keys[-1], *names],
    ).fetchall()
    if not rows:
        return
    found, features, values = zip(*rows, strict=True)
    del rows
    code = {name: i for i, name in enumerate(names)}
    codes = np.fromiter(map(code.__getitem__, features), np.int64, len(features))
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(names) + 1))
    found_all, values_all = np.empty(len(found), object), np.empty(len(found), object)
    found_all[:], values_all[:] = found, values
    for i, name in enumerate(names):
        pick = order[bounds[i] : bounds[i + 1]]
        if len(pick):
            yield name, found_all[pick].tolist(), values_all[pick].tolist()


def _provider_columns(
    store: Any, view: Any, keys: list[bytes], user_ids: np.ndarray, names: Sequence[str]
) -> Iterator[Column]:
    """The same values through ``Provider.online_read`` (any online store), re-serialized."""
    protos = [
        EntityKeyProto(join_keys=[JOIN_KEY], entity_values=[ValueProto(int64_val=int(u))])
        for u in user_ids
    ]
    read = store._get_provider().online_read(
        config=store.config, table=view, entity_keys=protos, requested_features=list(names)
    )
    for name in names:
        found = [(k, v[name]) for k, (_, v) in zip(keys, read, strict=True) if v and name in v]
        if found:
            yield name, [k for k, _ in found], [v.SerializeToString() for _, v in found]


def read_online_columns(
    store: Any,
    user_ids: np.ndarray,
    targets: Targets,
    contract: Contract,
    chunk: int = CHUNK_USERS,
    direct: bool | None = None,
) -> np.ndarray:
    """Every online value of ``user_ids`` (row i = ``user_ids[i]``) decoded into ``targets``;
    returns which users the store knows (any feature set: ``online_features``'s ``known``).

    Users are read in chunks of ``chunk``, consecutive in entity-key order, so that on sqlite each
    chunk is one key range of the table's primary key. ``direct`` forces (True) or avoids (False)
    the direct sqlite read; None picks it where the store allows."""
    user_ids = np.asarray(user_ids, dtype=np.int64)
    known = np.zeros(len(user_ids), bool)
    version = store.config.entity_key_serialization_version
    order = key_order(user_ids)
    sources: dict[str, tuple[Any, list[str], tuple[Any, str | None] | None]] = {}
    for view_name, features in contract.views.items():
        names = [f.name for f in features if f.name in targets]
        if not names:
            continue
        view = store.get_feature_view(view_name)
        sqlite = _sqlite_table(store, view) if direct is not False else None
        if direct and sqlite is None:
            raise ValueError("this online store cannot be read directly (not Feast sqlite)")
        if sqlite is not None:
            conn, table = sqlite
            exists = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (table,)
            ).fetchone()
            sqlite = (conn, table if exists else None)
        sources[view_name] = (view, names, sqlite)
    for lo in range(0, len(user_ids), chunk):
        rows = order[lo : lo + chunk]
        keys = entity_keys(user_ids[rows], version)
        row_of = dict(zip(keys, rows.tolist(), strict=True))
        for view, names, sqlite in sources.values():
            if sqlite is not None:
                columns = _sqlite_columns(*sqlite, keys, names)
            else:
                columns = _provider_columns(store, view, keys, user_ids[rows], names)
            for name, found, values in columns:
                index = np.fromiter(map(row_of.get, found, repeat(-1)), np.int64, len(found))
                if (index < 0).any():  # keys in the range that are not ours
                    kept = np.flatnonzero(index >= 0)
                    index, values = index[kept], [values[i] for i in kept]
                out, fill = targets[name]
                known[index[decode_into(out, index, values, fill)]] = True
    return known
