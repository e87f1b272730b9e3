"""Generic ingestion: a declared schema's tables -> validated users, features and friendships, the
fitted feature contract and a report of everything that was defaulted, dropped or mapped.

Nothing here knows a dataset: the MUSAE graphs, the synthetic generator and a team's own tables all
come through the same steps.

1. ids: integers are used as they are; strings (``id_type: string``, or ``auto`` with any
   non-integer id) are mapped to dense ids ``0..n-1`` in sorted order, and the mapping is kept.
2. users: the first users source defines the users; later sources add columns to them (a user
   they lack gets defaults, an id they have that the first lacks is an error). Endpoints missing
   from the users follow ``unknown_users`` (error, or added with default features).
3. features: each declared column is converted by kind, missing values take the declared default
   (counted per feature), vocabularies and standardisation statistics are fitted on the users.
4. friendships: self loops and duplicates are counted and dropped (a duplicate keeps its earliest
   time, else its first line); endpoints are stored canonically (src < dst).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel

from friendrec.config import Settings
from friendrec.contract import Categorical, Contract, Feature, vocab_digest
from friendrec.data import sources as src_io
from friendrec.data.sources import SourceTable
from friendrec.errors import DatasetMissingError, DataValidationError
from friendrec.schema import (
    BooleanFeature,
    CategoricalFeature,
    NumericFeature,
    ResolvedSchema,
)

log = logging.getLogger(__name__)


class IngestReport(BaseModel):
    """What ingestion found and did; printed by `data check`, stored by `data prepare`."""

    dataset: str
    schema_file: str
    schema_hash: str
    id_type: str
    users: int = 0
    user_rows: dict[str, int] = {}
    duplicate_user_rows: int = 0
    users_added_from_friendships: int = 0
    friendship_rows: int = 0
    friendships: int = 0
    self_loops_dropped: int = 0
    duplicates_dropped: int = 0
    timestamps: str = "synthetic timeline (seeded)"
    defaults_filled: dict[str, int] = {}
    out_of_vocabulary: dict[str, int] = {}
    vocabulary_sizes: dict[str, int] = {}
    values_capped: dict[str, int] = {}

    def lines(self) -> list[str]:
        """A human-readable report, one fact a line."""
        out = [
            f"dataset {self.dataset} (schema {self.schema_file}, hash {self.schema_hash})",
            f"users: {self.users:,} ({self.id_type} ids)",
        ]
        out += [f"  {path}: {rows:,} rows" for path, rows in self.user_rows.items()]
        if self.duplicate_user_rows:
            out.append(
                f"  repeated user rows resolved by on_duplicate: {self.duplicate_user_rows:,}"
            )
        if self.users_added_from_friendships:
            out.append(
                f"  users only in the friendships, added with defaults: "
                f"{self.users_added_from_friendships:,}"
            )
        out.append(
            f"friendships: {self.friendships:,} kept of {self.friendship_rows:,} rows "
            f"({self.self_loops_dropped:,} self loops and {self.duplicates_dropped:,} duplicates "
            "dropped)"
        )
        out.append(f"timestamps: {self.timestamps}")
        for name, count in self.defaults_filled.items():
            out.append(f"feature {name}: {count:,} users took the default")
        for name, size in self.vocabulary_sizes.items():
            oov = self.out_of_vocabulary.get(name, 0)
            out.append(f"feature {name}: vocabulary of {size:,} ids, {oov:,} values out of it")
        for name, count in self.values_capped.items():
            out.append(f"feature {name}: {count:,} users' lists capped at max_values")
        return out


@dataclass
class Ingested:
    """A validated graph with encoded features, before the split."""

    user_ids: np.ndarray  # int64 [n], sorted, unique
    profile: np.ndarray  # float32 [n, P] raw scalars in contract order
    sparse_offsets: np.ndarray  # int64 [n + 1]
    sparse_values: np.ndarray  # int64 [nnz]
    src: np.ndarray  # int64 [E], src < dst, pairs unique
    dst: np.ndarray
    created_ts: np.ndarray | None  # int64 [E] unix seconds, when the schema has a time column
    contract: Contract
    report: IngestReport
    external_ids: pa.Array | None = None  # string ids: external_ids[i] is user i
    sources: dict[str, str] = field(default_factory=dict)  # file -> sha256

    @property
    def num_users(self) -> int:
        return int(self.user_ids.shape[0])

    @property
    def num_friendships(self) -> int:
        return int(self.src.shape[0])


@contextmanager
def generated_tables(resolved: ResolvedSchema, settings: Settings) -> Iterator[Path | None]:
    """For a synthetic schema: generate its tables into a temporary folder (``{generated}``)."""
    synthetic = resolved.schema_.synthetic
    if synthetic is None:
        yield None
        return
    from friendrec.data.synthetic import write_synthetic_tables

    n = int(synthetic.users.format(variant=resolved.variant or ""))
    with tempfile.TemporaryDirectory(prefix="friendrec-synthetic-") as tmp:
        write_synthetic_tables(n, settings.data.seed, Path(tmp))
        yield Path(tmp)


def ingest(resolved: ResolvedSchema, settings: Settings) -> Ingested:
    """Read, validate and encode everything a schema declares (see the module docstring)."""
    with generated_tables(resolved, settings) as generated:
        return _ingest(resolved, settings, generated)


def _paths(resolved: ResolvedSchema, settings: Settings, generated: Path | None, pattern: str):
    path = resolved.expand(pattern, settings.datasets_dir, settings.workdir, generated)
    try:
        return src_io.expand_glob(path)
    except DataValidationError:
        if "{datasets_dir}" in pattern and not Path(settings.datasets_dir).is_dir():
            schema = resolved.schema_
            fetch = f"`friendrec data fetch {schema.fetch}`, or " if schema.fetch else ""
            raise DatasetMissingError(
                f"dataset {resolved.dataset!r} needs {schema.datasets_hint or path} under the "
                f"datasets folder {settings.datasets_dir}, which does not exist. Get them with "
                f"{fetch}point FRIENDREC_DATASETS_DIR at a copy; `friendrec demo` runs on the "
                "synthetic graph without them"
            ) from None
        raise


def _ingest(resolved: ResolvedSchema, settings: Settings, generated: Path | None) -> Ingested:
    schema = resolved.schema_
    report = IngestReport(
        dataset=resolved.dataset,
        schema_file=str(resolved.file),
        schema_hash=schema.schema_hash(),
        id_type=schema.id_type,
    )
    hashes: dict[str, str] = {}

    user_tables: list[list[SourceTable]] = []
    # Which users source holds each declared column (-1: not found yet; the first source wins).
    owner: dict[str, int] = dict.fromkeys((f.source_column for f in schema.features), -1)
    for k, source in enumerate(schema.users):
        files = _paths(resolved, settings, generated, source.path)
        tables = []
        for path in files:
            hashes[str(path)] = src_io.sha256_file(path)
            tables.append(_read_users_file(source, path, owner, k))
        user_tables.append(tables)
    unowned = [c for c, k in owner.items() if k < 0]
    if unowned:
        have = sorted({c for ts in user_tables for t in ts for c in t.table.column_names})
        raise DataValidationError(
            resolved.file,
            f"feature column(s) {unowned} are in none of the users sources (they have {have})",
            column=unowned[0],
        )

    fr = schema.friendships
    edge_tables = []
    for path in _paths(resolved, settings, generated, fr.path):
        hashes[str(path)] = src_io.sha256_file(path)
        cols = [
            fr.src_column,
            fr.dst_column,
            *([fr.timestamp_column] if fr.timestamp_column else []),
        ]
        edge_tables.append(src_io.read_source(fr, path, list(dict.fromkeys(cols))))

    # 1. ids
    raw_user_ids = [
        [src_io.id_column(t, schema.users[k].id_column) for t in ts]
        for k, ts in enumerate(user_tables)
    ]
    raw_edges = [
        (src_io.id_column(t, fr.src_column), src_io.id_column(t, fr.dst_column))
        for t in edge_tables
    ]
    all_ids = [a for ids in raw_user_ids for a in ids] + [a for pair in raw_edges for a in pair]
    if schema.id_type == "auto":
        id_type = "integer" if all(src_io.ids_are_integers(a) for a in all_ids) else "string"
    else:
        id_type = schema.id_type
    report.id_type = id_type
    mapper = _IdMapper(id_type, raw_user_ids, raw_edges, user_tables, edge_tables, schema)

    # 2. users of the first source, deduplicated
    users_per_source = []
    for k, tables in enumerate(user_tables):
        ids, keep = _dedupe_users(
            tables, mapper.user_ids(k), schema.users[k].on_duplicate, schema.users[k].id_column
        )
        report.user_rows.update({_shown(t.path, generated): t.num_rows for t in tables})
        report.duplicate_user_rows += int(sum(t.num_rows for t in tables) - len(ids))
        users_per_source.append((ids, keep))
    base_ids = users_per_source[0][0]
    edges_src, edges_dst = mapper.edge_ids()
    endpoint_ids = (
        np.unique(np.concatenate([*edges_src, *edges_dst])) if edges_src else np.empty(0, np.int64)
    )
    unknown = np.setdiff1d(endpoint_ids, base_ids, assume_unique=True)
    if unknown.size and schema.unknown_users == "error":
        _raise_unknown_endpoint(unknown, edges_src, edges_dst, edge_tables, fr, mapper)
    user_ids = np.union1d(base_ids, unknown) if unknown.size else np.sort(base_ids)
    report.users_added_from_friendships = int(unknown.size)
    report.users = int(user_ids.size)
    for k in range(1, len(users_per_source)):
        ids = users_per_source[k][0]
        stray = np.setdiff1d(ids, user_ids)
        if stray.size:
            row, t = mapper.locate_user(k, stray[0])
            raise t.error(
                row,
                f"user {mapper.external(stray[0])!r} is not in the first users source "
                f"({schema.users[0].path})",
                schema.users[k].id_column,
            )

    # 3. features
    scalars: list[Feature] = []
    scalar_values: list[np.ndarray] = []
    categoricals: list[Categorical] = []
    cat_ids: list[tuple[np.ndarray, np.ndarray]] = []
    offset = 0
    for feature in schema.features:
        k = owner[feature.source_column]
        ids, keep = users_per_source[k]
        rows = np.searchsorted(user_ids, ids)  # this source's users -> global rows
        if isinstance(feature, NumericFeature | BooleanFeature):
            values, missing = _scalar(feature, user_tables[k], keep)
            full = np.full(user_ids.size, float(feature.default), dtype=np.float64)
            full[rows] = np.where(missing, float(feature.default), values)
            n_default = int(missing.sum()) + int(user_ids.size - rows.size)
            if n_default:
                report.defaults_filled[feature.name] = n_default
            spec = _scalar_spec(feature, full)
            scalars.append(spec)
            scalar_values.append(full.astype(np.float32))
        else:
            cat, offsets, values = _categorical(
                feature,
                user_tables[k],
                schema.users[k].list_separator,
                keep,
                rows,
                user_ids,
                offset,
                report,
                mapper,
            )
            categoricals.append(cat)
            cat_ids.append((offsets, values))
            offset += cat.size

    profile = (
        np.column_stack(scalar_values).astype(np.float32)
        if scalar_values
        else np.zeros((user_ids.size, 0), dtype=np.float32)
    )
    sparse_offsets, sparse_values = _concat_csr(cat_ids, user_ids.size)
    contract = Contract(
        dataset=resolved.dataset,
        schema_hash=schema.schema_hash(),
        profile_scalars=tuple(scalars),
        categoricals=tuple(categoricals),
        vocab_sha256=vocab_digest(categoricals),
        extra={"schema_file": str(resolved.file)},
    )

    # 4. friendships
    times = (
        [src_io.timestamp_column(t, fr.timestamp_column, fr.timestamp_unit) for t in edge_tables]
        if fr.timestamp_column
        else None
    )
    src, dst, created = _clean_edges(edges_src, edges_dst, times, report)
    if fr.timestamp_column:
        report.timestamps = f"column {fr.timestamp_column!r} ({fr.timestamp_unit} or ISO 8601)"
    return Ingested(
        user_ids=user_ids,
        profile=profile,
        sparse_offsets=sparse_offsets,
        sparse_values=sparse_values,
        src=src,
        dst=dst,
        created_ts=created,
        contract=contract,
        report=report,
        external_ids=mapper.external_array(user_ids) if id_type == "string" else None,
        sources={Path(p).name: h for p, h in hashes.items()},
    )


def _shown(path: Path, generated: Path | None) -> str:
    """A path for the report (generated tables are temporary: shown as ``{generated}/...``)."""
    text = str(path)
    return text.replace(str(generated), "{generated}") if generated else text


def _read_users_file(source, path: Path, owner: dict[str, int], k: int) -> SourceTable:
    """Read the id column and every declared column this file has (first source wins)."""
    if source.format == "csv":
        import csv

        with path.open(newline="") as fh:
            header = [h.strip() for h in next(csv.reader(fh, delimiter=source.csv_delimiter), [])]
    elif source.format == "parquet":
        import pyarrow.parquet as pq

        try:
            header = pq.ParquetFile(path).schema_arrow.names
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataValidationError(path, f"not a readable parquet file: {exc}") from None
    elif source.format == "musae_json":
        header = [source.id_column, source.value_column]
    else:
        header = None  # jsonl: columns are per line; take every declared one still unowned
    wanted = [source.id_column]
    for col, holder in owner.items():
        if (
            (holder < 0 or holder == k)
            and (header is None or col in header)
            and col != source.id_column
        ):
            wanted.append(col)
    if header is None:  # jsonl: one pass keeps the declared columns some line has
        table = src_io.read_jsonl(path, wanted, optional=True)
        wanted = table.table.column_names
    else:
        table = src_io.read_source(source, path, wanted)
    for col in wanted[1:]:
        if owner.get(col, -1) < 0:
            owner[col] = k
    return table


class _IdMapper:
    """Raw ids (int or string) of every table -> int64 user ids, and back for messages."""

    def __init__(self, id_type, raw_user_ids, raw_edges, user_tables, edge_tables, schema) -> None:
        self.id_type = id_type
        self.schema = schema
        self._user_tables = user_tables
        if id_type == "integer":
            self._users = [
                [
                    src_io.ids_as_int64(t, schema.users[k].id_column, a)
                    for t, a in zip(user_tables[k], ids, strict=True)
                ]
                for k, ids in enumerate(raw_user_ids)
            ]
            self._edges = [
                (
                    src_io.ids_as_int64(t, schema.friendships.src_column, a),
                    src_io.ids_as_int64(t, schema.friendships.dst_column, b),
                )
                for t, (a, b) in zip(edge_tables, raw_edges, strict=True)
            ]
            self.vocabulary = None
            return
        as_str = [[a.cast(pa.string()) for a in ids] for ids in raw_user_ids]
        edges_str = [(a.cast(pa.string()), b.cast(pa.string())) for a, b in raw_edges]
        pieces = [a for ids in as_str for a in ids] + [x for pair in edges_str for x in pair]
        vocabulary = pc.unique(pa.chunked_array(pieces, pa.string()).combine_chunks())
        self.vocabulary = vocabulary.take(pc.sort_indices(vocabulary))

        def index(a: pa.Array) -> np.ndarray:
            return np.asarray(
                pc.index_in(a, self.vocabulary).to_numpy(zero_copy_only=False), dtype=np.int64
            )

        self._users = [[index(a) for a in ids] for ids in as_str]
        self._edges = [(index(a), index(b)) for a, b in edges_str]

    def user_ids(self, k: int) -> list[np.ndarray]:
        return self._users[k]

    def edge_ids(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        return [a for a, _ in self._edges], [b for _, b in self._edges]

    def external(self, user_id: int) -> Any:
        return int(user_id) if self.vocabulary is None else self.vocabulary[int(user_id)].as_py()

    def external_array(self, user_ids: np.ndarray) -> pa.Array:
        assert self.vocabulary is not None
        return self.vocabulary.take(pa.array(user_ids))

    def locate_user(self, k: int, user_id: int) -> tuple[int, SourceTable]:
        for t, ids in zip(self._tables_of(k), self._users[k], strict=True):
            hits = np.flatnonzero(ids == user_id)
            if hits.size:
                return int(hits[0]), t
        raise AssertionError("user not found in its own source")

    def _tables_of(self, k: int) -> list[SourceTable]:
        return self._user_tables[k]


def _dedupe_users(
    tables: list[SourceTable], ids_per_file: list[np.ndarray], policy: str, id_col: str
) -> tuple[np.ndarray, tuple[list[SourceTable], np.ndarray, np.ndarray]]:
    """-> (unique ids sorted, (tables, file index per kept row, row index per kept row))."""
    ids = np.concatenate(ids_per_file) if ids_per_file else np.empty(0, np.int64)
    file_of = (
        np.concatenate([np.full(len(a), i) for i, a in enumerate(ids_per_file)])
        if ids_per_file
        else np.empty(0, np.int64)
    )
    row_of = (
        np.concatenate([np.arange(len(a)) for a in ids_per_file])
        if ids_per_file
        else np.empty(0, np.int64)
    )
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    first = np.ones(len(ids), dtype=bool)
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    if not first.all() and policy == "error":
        dup = int(np.flatnonzero(~first)[0])
        pos, earlier = order[dup], order[dup - 1]
        t = tables[file_of[pos]]
        earlier_where = tables[file_of[earlier]].describe(int(row_of[earlier]))
        raise t.error(
            int(row_of[pos]),
            f"duplicate user id (first at {earlier_where}); "
            "set on_duplicate: keep_first or keep_last",
            id_col,
        )
    if policy == "keep_last":
        last = np.ones(len(ids), dtype=bool)
        last[:-1] = sorted_ids[1:] != sorted_ids[:-1]
        chosen = order[last]
    else:
        chosen = order[first]
    return ids[chosen], (tables, file_of[chosen], row_of[chosen])


def _scalar(feature, tables: list[SourceTable], keep) -> tuple[np.ndarray, np.ndarray]:
    """Values of a numeric/boolean feature for a source's kept users (in their sorted order)."""
    _, file_of, row_of = keep
    values = np.zeros(len(row_of), dtype=np.float64)
    missing = np.zeros(len(row_of), dtype=bool)
    for i, t in enumerate(tables):
        sel = np.flatnonzero(file_of == i)
        if not sel.size:
            continue
        if isinstance(feature, BooleanFeature):
            v, m = src_io.boolean_column(t, feature.source_column)
        else:
            v, m = src_io.numeric_column(t, feature.source_column)
        values[sel] = v[row_of[sel]]
        missing[sel] = m[row_of[sel]]
    return values, missing


def _scalar_spec(feature, values: np.ndarray) -> Feature:
    if isinstance(feature, BooleanFeature):
        return Feature(
            feature.name,
            "float32",
            float(feature.default),
            feature.description or feature.name,
            kind="boolean",
            column=feature.source_column,
        )
    lo, hi = feature.clip
    mean, std = 0.0, 1.0
    if feature.transform == "standardise":
        clipped = np.clip(values, -np.inf if lo is None else lo, np.inf if hi is None else hi)
        mean = float(clipped.mean()) if clipped.size else 0.0
        std = float(clipped.std()) if clipped.size else 1.0
        std = std if std > 1e-12 else 1.0
    return Feature(
        feature.name,
        "float32",
        float(feature.default),
        feature.description or feature.name,
        transform=feature.transform,
        clip_min=lo,
        clip_max=hi,
        mean=mean,
        std=std,
        kind="numeric",
        column=feature.source_column,
    )


def _categorical(
    feature: CategoricalFeature,
    tables: list[SourceTable],
    separator: str,
    keep,
    rows: np.ndarray,
    user_ids: np.ndarray,
    offset: int,
    report: IngestReport,
    mapper: _IdMapper,
) -> tuple[Categorical, np.ndarray, np.ndarray]:
    """Encode one categorical feature for every user -> (spec, CSR offsets [n+1], ids)."""
    multi = feature.kind == "multi_categorical"
    n_users = user_ids.size
    _, file_of, row_of = keep
    # Per user (global row): a list of raw values, from the file that holds it.
    flats: list[pa.Array] = []
    owners: list[np.ndarray] = []
    defaulted = np.ones(n_users, dtype=bool)
    for i, t in enumerate(tables):
        sel = np.flatnonzero(file_of == i)
        if not sel.size:
            continue
        flat, offsets, missing = src_io.list_column(t, feature.source_column, separator, multi)
        flat = src_io.typed_values(t, feature.source_column, flat, offsets, feature.dtype)
        take_rows = row_of[sel]
        starts, ends = offsets[take_rows], offsets[take_rows + 1]
        counts = ends - starts
        idx = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts) + np.arange(
            counts.sum()
        )
        flats.append(flat.take(pa.array(idx, pa.int64())))
        owners.append(np.repeat(rows[sel], counts))
        defaulted[rows[sel]] = missing[take_rows]
    value_type = pa.string() if feature.dtype == "string" else pa.int64()
    default = feature.default
    default_values = (
        (default if isinstance(default, list) else [default]) if default is not None else []
    )
    n_defaulted = int(defaulted.sum())
    if n_defaulted:
        report.defaults_filled[feature.name] = n_defaulted
    if default_values:
        d_rows = np.flatnonzero(defaulted)
        typed = [_coerce_default(feature, v) for v in default_values]
        flats.append(pa.array(typed * len(d_rows), value_type))
        owners.append(np.repeat(d_rows, len(typed)))
    flat = (
        pa.chunked_array(flats, value_type).combine_chunks() if flats else pa.array([], value_type)
    )
    owner = np.concatenate(owners) if owners else np.empty(0, np.int64)
    # Stable order: by user, then as read.
    order = np.argsort(owner, kind="stable")
    owner = owner[order]
    flat = flat.take(pa.array(order, pa.int64()))

    if feature.num_buckets is not None:
        values = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.int64)
        bad = np.flatnonzero((values < 0) | (values >= feature.num_buckets))
        if bad.size:
            user = mapper.external(user_ids[owner[bad[0]]])
            raise DataValidationError(
                tables[0].path,
                f"user {user!r}: value {values[bad[0]]} is outside [0, {feature.num_buckets}) "
                "(num_buckets)",
                column=feature.source_column,
            )
        ids = values + offset
        vocabulary = None
        size = feature.num_buckets
    else:
        # Count each value once per user, then keep the most frequent.
        first_of_pair = _first_per_user(owner, flat)
        counts = pc.value_counts(flat.take(pa.array(first_of_pair, pa.int64())))
        vals = counts.field("values")
        freq = np.asarray(counts.field("counts").to_numpy(), dtype=np.int64)
        keep_mask = freq >= feature.min_count
        vals, freq = vals.filter(pa.array(keep_mask)), freq[keep_mask]
        # Most frequent first, ties by value: deterministic across runs and machines.
        order_v = pc.sort_indices(
            pa.table({"f": pa.array(-freq), "v": vals}),
            sort_keys=[("f", "ascending"), ("v", "ascending")],
        )
        vals = vals.take(order_v)
        if feature.max_vocab is not None:
            vals = vals.slice(0, feature.max_vocab)
        vocabulary = tuple(vals.to_pylist())
        size = len(vocabulary) + 1
        pos = pc.index_in(flat, vals)
        oov = int(pos.null_count)
        if oov:
            report.out_of_vocabulary[feature.name] = oov
        ids = (
            np.asarray(
                pos.fill_null(len(vocabulary)).to_numpy(zero_copy_only=False), dtype=np.int64
            )
            + offset
        )
        report.vocabulary_sizes[feature.name] = size
    # Deduplicate within a user (first seen) and cap.
    first = _first_occurrence(owner, ids)
    owner, ids = owner[first], ids[first]
    if feature.max_values is not None and owner.size:
        starts = np.searchsorted(owner, owner, side="left")
        position = np.arange(owner.size) - starts
        capped = position < feature.max_values
        n_capped = int(np.unique(owner[~capped]).size)
        if n_capped:
            report.values_capped[feature.name] = n_capped
        owner, ids = owner[capped], ids[capped]
    offsets = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(owner, minlength=n_users), out=offsets[1:])
    spec = Categorical(
        name=feature.name,
        kind=feature.kind,
        value_type=feature.dtype,
        offset=offset,
        size=size,
        vocabulary=vocabulary,
        max_values=feature.max_values,
        default=default,
        column=feature.source_column,
    )
    return spec, offsets, ids


def _coerce_default(feature: CategoricalFeature, value: Any) -> Any:
    if feature.dtype == "integer":
        return int(value)
    return str(value)


def _first_per_user(owner: np.ndarray, flat: pa.Array) -> np.ndarray:
    """Indices of the first occurrence of each (user, value) pair."""
    codes = (
        np.asarray(
            pc.dictionary_encode(flat).indices.to_numpy(zero_copy_only=False), dtype=np.int64
        )
        if len(flat)
        else np.empty(0, np.int64)
    )
    first = _first_occurrence(owner, codes)
    return np.flatnonzero(first)


def _first_occurrence(owner: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Boolean mask: True at the first occurrence of each (owner, value) pair, order kept."""
    if owner.size == 0:
        return np.zeros(0, dtype=bool)
    # One int64 key per pair: a single (stable) sort instead of a three-key lexsort.
    key = owner.astype(np.int64) * (int(values.max()) + 1) + values
    _, first = np.unique(key, return_index=True)
    mask = np.zeros(owner.size, dtype=bool)
    mask[first] = True
    return mask


def _concat_csr(
    parts: list[tuple[np.ndarray, np.ndarray]], n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature CSR lists -> one list per user: feature 1's ids, then feature 2's, ..."""
    if not parts:
        return np.zeros(n + 1, dtype=np.int64), np.empty(0, dtype=np.int64)
    if len(parts) == 1:
        return parts[0]
    lengths = sum(np.diff(o) for o, _ in parts)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    owners = np.concatenate([np.repeat(np.arange(n), np.diff(o)) for o, _ in parts])
    feature = np.concatenate([np.full(len(v), j) for j, (_, v) in enumerate(parts)])
    values = np.concatenate([v for _, v in parts])
    order = np.lexsort((feature, owners))  # stable within (user, feature)
    return offsets, values[order]


def _raise_unknown_endpoint(unknown, edges_src, edges_dst, edge_tables, fr, mapper) -> None:
    first = unknown[0]
    for t, a, b in zip(edge_tables, edges_src, edges_dst, strict=True):
        for col, ids in ((fr.src_column, a), (fr.dst_column, b)):
            hits = np.flatnonzero(ids == first)
            if hits.size:
                raise t.error(
                    int(hits[0]),
                    f"user {mapper.external(first)!r} is not in the users table "
                    f"({unknown.size:,} such ids; set unknown_users: default to add them with "
                    "default features)",
                    col,
                )


def _clean_edges(
    edges_src: list[np.ndarray],
    edges_dst: list[np.ndarray],
    times: list[np.ndarray] | None,
    report: IngestReport,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    a = np.concatenate(edges_src) if edges_src else np.empty(0, np.int64)
    b = np.concatenate(edges_dst) if edges_dst else np.empty(0, np.int64)
    t = np.concatenate(times) if times else None
    report.friendship_rows = int(a.size)
    loops = a == b
    report.self_loops_dropped = int(loops.sum())
    keep = np.flatnonzero(~loops)
    src, dst = np.minimum(a[keep], b[keep]), np.maximum(a[keep], b[keep])
    created = t[keep] if t is not None else None
    # A repeated pair keeps its earliest time, else its first line; kept edges stay in file order.
    key = src * (int(dst.max(initial=0)) + 1) + dst
    if created is None:
        _, kept = np.unique(key, return_index=True)
    else:
        order = np.lexsort((np.arange(src.size), created, key))
        first = np.ones(src.size, dtype=bool)
        first[1:] = key[order][1:] != key[order][:-1]
        kept = order[first]
    kept = np.sort(kept)
    report.duplicates_dropped = int(src.size - kept.size)
    report.friendships = int(kept.size)
    return src[kept], dst[kept], (created[kept] if created is not None else None)
