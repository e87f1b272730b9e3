"""Readers for the MUSAE files (Twitch, GitHub) with validation that names file and line.

Fast path: pyarrow parses the CSVs; only when it fails does a line-by-line pass run to find the
first bad line, so a clean 300k-edge file costs milliseconds and a broken one still gets a precise
message.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from friendrec import contract
from friendrec.data.graph import RawGraph
from friendrec.errors import DataValidationError

log = logging.getLogger(__name__)

TWITCH_VOCAB = 3170  # one vocabulary shared by all Twitch graphs (datasets/README.md)
GITHUB_VOCAB = 4005


@dataclass(frozen=True)
class MusaeFiles:
    edges: Path
    features: Path
    target: Path
    vocab_size: int
    kind: str  # "twitch" | "github"


def twitch_files(datasets_dir: Path, language: str) -> MusaeFiles:
    base = datasets_dir / "twitch_social" / language
    return MusaeFiles(
        base / f"{language}_edges.csv",
        base / f"{language}_features.json",
        base / f"{language}_target.csv",
        TWITCH_VOCAB,
        "twitch",
    )


def github_files(datasets_dir: Path) -> MusaeFiles:
    base = datasets_dir / "github_social"
    return MusaeFiles(
        base / "musae_git_edges.csv",
        base / "musae_git_features.json",
        base / "musae_git_target.csv",
        GITHUB_VOCAB,
        "github",
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _require(path: Path) -> None:
    if not path.is_file():
        raise DataValidationError(path, "file not found")


def _first_bad_line(path: Path, ncols: int, check: Callable[[list[str]], str | None]) -> None:
    """Slow pass after the fast parser failed: raise for the first offending line."""
    with path.open(newline="") as fh:
        for lineno, row in enumerate(csv.reader(fh), start=1):
            if lineno == 1:
                continue
            if len(row) != ncols:
                raise DataValidationError(path, f"expected {ncols} fields, got {len(row)}", lineno)
            problem = check(row)
            if problem:
                raise DataValidationError(path, problem, lineno)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def read_edges(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Edge list -> (a, b) int64 arrays in file order; header `from,to` or `id_1,id_2`."""
    _require(path)
    with path.open() as fh:
        header = fh.readline().strip().split(",")
    if len(header) != 2 or header[0].isdigit():
        raise DataValidationError(path, f"expected a 2-column header, got {header!r}", 1)
    try:
        table = pacsv.read_csv(
            path,
            convert_options=pacsv.ConvertOptions(
                column_types={header[0]: pa.int64(), header[1]: pa.int64()}
            ),
        )
        if table.num_columns != 2:
            raise pa.ArrowInvalid("column count")
        a = table.column(0).to_numpy()
        b = table.column(1).to_numpy()
        if table.column(0).null_count or table.column(1).null_count:
            raise pa.ArrowInvalid("nulls")
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        _first_bad_line(
            path,
            2,
            lambda row: (
                None if all(_is_int(x) for x in row) else f"user ids must be integers, got {row!r}"
            ),
        )
        raise DataValidationError(path, "could not parse the edge list") from None
    for name, column in (("first", a), ("second", b)):
        negative = np.flatnonzero(column < 0)
        if negative.size:
            raise DataValidationError(
                path, f"negative user id in the {name} column", int(negative[0]) + 2
            )
    return a.astype(np.int64), b.astype(np.int64)


def validate_edges(
    path: Path, a: np.ndarray, b: np.ndarray, user_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Reject self loops, out-of-range ids and duplicates; return canonical (src < dst) edges."""
    loops = np.flatnonzero(a == b)
    if loops.size:
        i = int(loops[0])
        raise DataValidationError(path, f"self loop on user {a[i]}", i + 2)
    for column in (a, b):
        pos = np.searchsorted(user_ids, column)
        pos = np.minimum(pos, len(user_ids) - 1)
        unknown = np.flatnonzero(user_ids[pos] != column)
        if unknown.size:
            i = int(unknown[0])
            raise DataValidationError(
                path,
                f"user id {column[i]} is out of range (not in the target file)",
                i + 2,
            )
    src, dst = np.minimum(a, b), np.maximum(a, b)
    key = src * (int(user_ids.max()) + 1) + dst
    _, first, counts = np.unique(key, return_index=True, return_counts=True)
    if np.any(counts > 1):
        dup_keys = np.flatnonzero(counts > 1)
        # The first line that repeats an earlier friendship.
        is_dup = np.ones(key.shape[0], dtype=bool)
        is_dup[first] = False
        i = int(np.flatnonzero(is_dup)[0])
        raise DataValidationError(
            path,
            f"duplicate friendship {src[i]}-{dst[i]} ({dup_keys.size} duplicated pairs in file)",
            i + 2,
        )
    return src, dst


def read_features(
    path: Path, user_ids: np.ndarray, vocab_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """`{"<id>": [feature ids]}` -> CSR (offsets, values) aligned with ``user_ids``.

    Users without an entry get no ids; ids are deduplicated keeping first-seen order.
    """
    _require(path)
    try:
        with path.open() as fh:
            raw = json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataValidationError(path, f"invalid JSON: {exc.msg}", exc.lineno) from None
    if not isinstance(raw, dict):
        raise DataValidationError(path, "expected a JSON object of user id -> feature id list")
    index = {int(u): i for i, u in enumerate(user_ids)}
    lists: list[list[int]] = [[] for _ in range(len(user_ids))]
    for key, ids in raw.items():
        if not _is_int(key):
            raise DataValidationError(path, f"user key {key!r} is not an integer")
        row = index.get(int(key))
        if row is None:
            raise DataValidationError(path, f"user {key} is out of range (not in the target file)")
        if not isinstance(ids, list) or not all(
            isinstance(x, int) and not isinstance(x, bool) for x in ids
        ):
            raise DataValidationError(path, f"user {key}: feature ids must be a list of integers")
        bad = [x for x in ids if x < 0 or x >= vocab_size]
        if bad:
            raise DataValidationError(
                path, f"user {key}: feature id {bad[0]} outside the vocabulary [0, {vocab_size})"
            )
        lists[row] = list(dict.fromkeys(ids))
    lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.fromiter((x for row in lists for x in row), dtype=np.int64, count=int(offsets[-1]))
    return offsets, values


_BOOL = {"true": 1.0, "false": 0.0, "1": 1.0, "0": 0.0}


def _parse_bool(text: str) -> float:
    value = _BOOL.get(text.strip().lower())
    if value is None:
        raise ValueError(f"expected True/False, got {text!r}")
    return value


def _parse_nonneg(text: str) -> float:
    value = float(text)
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"expected a non-negative number, got {text!r}")
    return value


# Target columns -> (contract profile scalar, parser). The id column is named separately.
_TWITCH_COLUMNS = {
    "days": ("account_age_days", _parse_nonneg),
    "views": ("views", _parse_nonneg),
    "mature": ("is_mature", _parse_bool),
    "partner": ("is_partner", _parse_bool),
}
_GITHUB_COLUMNS = {"ml_target": ("is_ml_developer", _parse_bool)}


def read_target(path: Path, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Target CSV -> (sorted user ids int64, raw profile float32 [n, P] in contract order)."""
    _require(path)
    id_column, columns = (
        ("new_id", _TWITCH_COLUMNS) if kind == "twitch" else ("id", _GITHUB_COLUMNS)
    )
    slots = {name: j for j, name in enumerate(contract.PROFILE_SCALAR_NAMES)}
    defaults = np.array([f.default for f in contract.PROFILE_SCALARS], dtype=np.float32)
    ids: list[int] = []
    rows: list[np.ndarray] = []
    seen: dict[int, tuple[int, str | None, int]] = {}
    # A repeated node id is only tolerated when it is the same platform account (Twitch `id`).
    account_column = "id" if kind == "twitch" else None
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise DataValidationError(path, "empty file")
        required = [id_column, *columns, *([account_column] if account_column else [])]
        missing = [c for c in required if c not in header]
        if missing:
            raise DataValidationError(path, f"missing column(s) {missing} in header {header}", 1)
        pos = {c: header.index(c) for c in required}
        for lineno, row in enumerate(reader, start=2):
            if len(row) != len(header):
                raise DataValidationError(
                    path, f"expected {len(header)} fields, got {len(row)}", lineno
                )
            try:
                user = int(row[pos[id_column]])
            except ValueError:
                raise DataValidationError(
                    path, f"{id_column} must be an integer, got {row[pos[id_column]]!r}", lineno
                ) from None
            if user < 0:
                raise DataValidationError(path, f"negative user id {user}", lineno)
            values = defaults.copy()
            for column, (feature, parse) in columns.items():
                try:
                    values[slots[feature]] = parse(row[pos[column]])
                except ValueError as exc:
                    raise DataValidationError(path, f"column {column}: {exc}", lineno) from None
            account = row[pos[account_column]] if account_column else None
            if user in seen:
                first_line, first_account, slot = seen[user]
                if account is None or account != first_account:
                    raise DataValidationError(
                        path, f"duplicate user id {user} (first on line {first_line})", lineno
                    )
                # Twitch FR repeats two accounts with re-scraped counters: the later row wins.
                log.warning(
                    "%s:%d: user %d repeats account %s from line %d; keeping the later row",
                    path,
                    lineno,
                    user,
                    account,
                    first_line,
                )
                rows[slot] = values
                continue
            seen[user] = (lineno, account, len(ids))
            ids.append(user)
            rows.append(values)
    if not ids:
        raise DataValidationError(path, "no users")
    user_ids = np.asarray(ids, dtype=np.int64)
    order = np.argsort(user_ids, kind="stable")
    return user_ids[order], np.vstack(rows)[order].astype(np.float32)


def read_musae(files: MusaeFiles, name: str) -> RawGraph:
    """Read and validate one MUSAE dataset in place (nothing is copied)."""
    user_ids, profile = read_target(files.target, files.kind)
    a, b = read_edges(files.edges)
    src, dst = validate_edges(files.edges, a, b, user_ids)
    offsets, values = read_features(files.features, user_ids, files.vocab_size)
    graph = RawGraph(
        name=name,
        user_ids=user_ids,
        profile=profile,
        sparse_offsets=offsets,
        sparse_values=values,
        src=src,
        dst=dst,
        vocab_size=files.vocab_size,
        sources={str(p.name): _sha256(p) for p in (files.edges, files.features, files.target)},
    )
    graph.check()
    return graph
