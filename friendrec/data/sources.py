"""Read one declared table (csv, parquet, jsonl, MUSAE json) into Arrow, remembering where each row
came from so that every error can name the file, the line (or row group) and the column.

Fast path first: Arrow parses the file; only when a value does not convert does a slow pass run to
find the first offending row, so a clean file costs little and a broken one still gets a precise
message.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from friendrec.contract import parse_bool
from friendrec.errors import DataValidationError
from friendrec.schema import Source, UsersSource

_INT_RE = r"^\s*-?\d+\s*$"


@dataclass
class SourceTable:
    """One file's rows (only the columns asked for) and a way back to each row's position."""

    path: Path
    format: str
    table: pa.Table
    row_group_starts: np.ndarray | None = None  # parquet: first row of each row group
    lines: np.ndarray | None = None  # jsonl: the line of each row
    keys: list[str] | None = None  # musae_json: the key of each row

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    def describe(self, row: int) -> str:
        """Where ``row`` is, as text (``file:line`` or ``file (row group g, row r)``)."""
        return str(self.error(row, "")).rstrip(": ")

    def error(self, row: int, reason: str, column: str | None = None) -> DataValidationError:
        """A DataValidationError that points at ``row`` (0-based) of this file."""
        if self.format == "csv":
            return DataValidationError(self.path, reason, row + 2, column)
        if self.format == "jsonl" and self.lines is not None:
            return DataValidationError(self.path, reason, int(self.lines[row]), column)
        if self.format == "parquet" and self.row_group_starts is not None:
            group = int(np.searchsorted(self.row_group_starts, row, side="right") - 1)
            where = f"row group {group}, row {row - int(self.row_group_starts[group])}"
            return DataValidationError(self.path, reason, None, column, where=where)
        if self.keys is not None:
            return DataValidationError(
                self.path, reason, None, column, where=f"key {self.keys[row]!r}"
            )
        return DataValidationError(self.path, reason, None, column, where=f"row {row}")


def expand_glob(pattern: Path) -> list[Path]:
    """A path or a glob -> the sorted files it names (a missing file raises)."""
    if is_glob(str(pattern)):
        files = sorted(Path(p) for p in glob.glob(str(pattern)) if Path(p).is_file())
        if not files:
            raise DataValidationError(pattern, "the glob matches no file")
        return files
    if not pattern.is_file():
        raise DataValidationError(pattern, "file not found")
    return [pattern]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_source(source: Source, path: Path, columns: list[str]) -> SourceTable:
    """Read ``columns`` of one file of ``source``; unknown columns name what the file has."""
    if source.format == "csv":
        return _read_csv(source, path, columns)
    if source.format == "parquet":
        return _read_parquet(path, columns)
    if source.format == "jsonl":
        return read_jsonl(path, columns)
    if source.format == "musae_json":
        assert isinstance(source, UsersSource)
        return _read_musae_json(path, source.id_column, source.value_column, columns)
    raise DataValidationError(path, f"unsupported format {source.format!r}")


def _missing(path: Path, columns: list[str], have: list[str], line: int | None = None) -> None:
    missing = [c for c in columns if c not in have]
    if missing:
        raise DataValidationError(
            path, f"unknown column(s) {missing}; the file has {have}", line, missing[0]
        )


def _read_csv(source: Source, path: Path, columns: list[str]) -> SourceTable:
    with path.open(newline="") as fh:
        header = next(csv.reader(fh, delimiter=source.csv_delimiter), None)
    if not header:
        raise DataValidationError(path, "empty file (no header line)", 1)
    header = [h.strip() for h in header]
    _missing(path, columns, header, 1)
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=header, skip_rows=1),
            parse_options=pacsv.ParseOptions(delimiter=source.csv_delimiter),
            convert_options=pacsv.ConvertOptions(
                include_columns=columns,
                column_types={c: pa.string() for c in columns},
                strings_can_be_null=True,
                quoted_strings_can_be_null=False,
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        _first_bad_csv_line(path, source.csv_delimiter, len(header))
        raise DataValidationError(path, f"could not parse: {exc}") from None
    return SourceTable(path, "csv", table)


def _first_bad_csv_line(path: Path, delimiter: str, ncols: int) -> None:
    with path.open(newline="") as fh:
        for lineno, row in enumerate(csv.reader(fh, delimiter=delimiter), start=1):
            if lineno > 1 and row and len(row) != ncols:
                raise DataValidationError(path, f"expected {ncols} fields, got {len(row)}", lineno)


def _read_parquet(path: Path, columns: list[str]) -> SourceTable:
    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataValidationError(path, f"not a readable parquet file: {exc}") from None
    _missing(path, columns, file.schema_arrow.names)
    table = file.read(columns=columns)
    sizes = [file.metadata.row_group(i).num_rows for i in range(file.num_row_groups)]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if sizes else None
    return SourceTable(path, "parquet", table, row_group_starts=starts)


def read_jsonl(path: Path, columns: list[str], optional: bool = False) -> SourceTable:
    """One pass over a JSON-lines file; with ``optional``, columns no line has are left out
    (instead of an error), except the first (the id)."""
    values: dict[str, list[Any]] = {c: [] for c in columns}
    lines: list[int] = []
    seen: set[str] = set()
    with path.open() as fh:
        for lineno, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataValidationError(path, f"invalid JSON: {exc.msg}", lineno) from None
            if not isinstance(record, dict):
                raise DataValidationError(path, "expected one JSON object per line", lineno)
            seen.update(record)
            for c in columns:
                values[c].append(record.get(c))
            lines.append(lineno)
    if optional:
        columns = [c for i, c in enumerate(columns) if i == 0 or c in seen]
    if lines:
        _missing(path, columns, sorted(seen))
    table = pa.table({c: _to_arrow(values[c]) for c in columns})
    return SourceTable(path, "jsonl", table, lines=np.asarray(lines, dtype=np.int64))


def _read_musae_json(
    path: Path, id_column: str, value_column: str, columns: list[str]
) -> SourceTable:
    try:
        with path.open() as fh:
            raw = json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataValidationError(path, f"invalid JSON: {exc.msg}", exc.lineno) from None
    if not isinstance(raw, dict):
        raise DataValidationError(path, 'expected a JSON object {"<user id>": [values, ...]}')
    _missing(path, columns, [id_column, value_column])
    keys = list(raw)
    for key in keys:
        if not isinstance(raw[key], list):
            raise DataValidationError(
                path, "expected a list of values", None, value_column, where=f"key {key!r}"
            )
    table = pa.table(
        {id_column: pa.array(keys, pa.string()), value_column: _to_arrow(list(raw.values()))}
    )
    return SourceTable(path, "musae_json", table.select(columns), keys=keys)


def _to_arrow(values: list[Any]) -> pa.Array:
    """Python values -> Arrow; mixed types (5 and "5") fall back to strings, parsed later."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([_stringify(v) for v in values])


def _stringify(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, list):
        return [_stringify(v) for v in value]
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# ---- column conversion: each raises at the first row that does not convert -------------------


def _first_failing(table: SourceTable, name: str, check: Callable[[Any], Any]) -> None:
    """Slow pass: run ``check`` (ValueError on a bad value) until it fails; raise there."""
    for i, value in enumerate(table.table.column(name).to_pylist()):
        if value is None:
            continue
        try:
            check(value)
        except (ValueError, TypeError) as exc:
            raise table.error(i, str(exc), column=name) from None


def _strip_empty(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Trimmed strings; empty cells become nulls (a missing value)."""
    trimmed = pc.utf8_trim_whitespace(column)
    return pc.if_else(pc.equal(trimmed, ""), pa.scalar(None, pa.string()), trimmed)


def numeric_column(table: SourceTable, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A numeric column -> (float64 values, missing mask). NaN is missing; inf is an error."""
    column = table.table.column(name)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        column = _strip_empty(column)
        try:
            column = pc.cast(column, pa.float64())
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            _first_failing(table, name, lambda v: _float(v.strip() or "0"))
            raise
    elif pa.types.is_boolean(column.type):
        raise table.error(0, "expected numbers, got booleans", name)
    elif not (
        pa.types.is_integer(column.type)
        or pa.types.is_floating(column.type)
        or pa.types.is_null(column.type)
    ):
        raise table.error(0, f"expected numbers, got {column.type}", name)
    values = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
    values = np.asarray(values, dtype=np.float64)
    missing = np.isnan(values)
    bad = np.flatnonzero(np.isinf(values))
    if bad.size:
        raise table.error(int(bad[0]), "expected a finite number, got infinity", name)
    return values, missing


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None


def boolean_column(table: SourceTable, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A boolean column (true/false, 1/0, yes/no) -> (float64 0/1, missing mask)."""
    column = table.table.column(name)
    if pa.types.is_boolean(column.type):
        missing = column.is_null().to_numpy(zero_copy_only=False)
        values = column.fill_null(False).cast(pa.float64()).to_numpy(zero_copy_only=False)
        return np.asarray(values, dtype=np.float64), np.asarray(missing, dtype=bool)
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
        values, missing = numeric_column(table, name)
        bad = np.flatnonzero(~missing & (values != 0) & (values != 1))
        if bad.size:
            raise table.error(int(bad[0]), f"expected a boolean, got {values[bad[0]]:g}", name)
        return values, missing
    if not pa.types.is_string(column.type):
        raise table.error(0, f"expected booleans, got {column.type}", name)
    text = pc.utf8_lower(_strip_empty(column))
    true = pc.is_in(text, pa.array(["true", "1", "yes", "t", "y"]))
    false = pc.is_in(text, pa.array(["false", "0", "no", "f", "n"]))
    missing = text.is_null().to_numpy(zero_copy_only=False)
    ok = pc.or_(true, false).to_numpy(zero_copy_only=False) | missing
    bad = np.flatnonzero(~ok)
    if bad.size:
        value = column[int(bad[0])].as_py()
        raise table.error(int(bad[0]), str(_bool_error(value, name)), name)
    values = true.fill_null(False).cast(pa.float64()).to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=np.float64), np.asarray(missing, dtype=bool)


def _bool_error(value: Any, name: str) -> str:
    try:
        parse_bool(value, name)
    except ValueError as exc:
        return str(exc)
    return f"{name}: unexpected value {value!r}"


def list_column(
    table: SourceTable, name: str, separator: str, multi: bool
) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """A categorical column -> (flat values, offsets int64 [n+1], missing mask [n]).

    A multi-valued CSV cell is split on ``separator``; a single-valued column becomes one value
    per row (none where missing).
    """
    column = table.table.column(name).combine_chunks()
    if multi and (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        if table.format != "csv":
            raise table.error(_first_valid(column), "expected a list of values, got a string", name)
        stripped = _strip_empty(pa.chunked_array([column])).combine_chunks()
        column = pc.split_pattern(stripped, separator)
    if multi:
        if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
            if pa.types.is_null(column.type):
                column = pa.array([None] * len(column), pa.list_(pa.string()))
            else:
                raise table.error(
                    _first_valid(column), f"expected a list of values, got {column.type}", name
                )
        missing = column.is_null().to_numpy(zero_copy_only=False)
        lengths = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False)
        flat = pc.list_flatten(column)
        if table.format == "csv":
            flat = pc.utf8_trim_whitespace(flat)
            keep = pc.not_equal(flat, "")
            # Empty pieces ("a||b", a trailing separator) are not values.
            owner = np.repeat(np.arange(len(column)), lengths)
            keep_np = keep.to_numpy(zero_copy_only=False)
            flat = flat.filter(keep)
            lengths = np.bincount(owner[keep_np], minlength=len(column))
    else:
        if pa.types.is_string(column.type):
            column = _strip_empty(pa.chunked_array([column])).combine_chunks()
        if pa.types.is_list(column.type):
            raise table.error(_first_valid(column), "expected one value, got a list", name)
        missing = column.is_null().to_numpy(zero_copy_only=False)
        lengths = (~missing).astype(np.int64)
        flat = column.filter(pc.invert(column.is_null()))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return flat, offsets, np.asarray(missing, dtype=bool)


def _first_valid(column: pa.Array) -> int:
    valid = np.flatnonzero(~np.asarray(column.is_null().to_numpy(zero_copy_only=False)))
    return int(valid[0]) if valid.size else 0


def typed_values(
    table: SourceTable, name: str, flat: pa.Array, offsets: np.ndarray, value_type: str
) -> pa.Array:
    """Flat categorical values -> string or int64; errors point at the owning row."""
    if value_type == "string":
        if pa.types.is_string(flat.type) or pa.types.is_large_string(flat.type):
            return flat.cast(pa.string())
        if pa.types.is_integer(flat.type):
            return flat.cast(pa.string())
        if pa.types.is_null(flat.type):
            return pa.array([], pa.string())
        bad = 0
    else:
        if pa.types.is_integer(flat.type):
            return flat.cast(pa.int64())
        if pa.types.is_null(flat.type):
            return pa.array([], pa.int64())
        if pa.types.is_floating(flat.type):
            values = flat.to_numpy(zero_copy_only=False)
            frac = np.flatnonzero(values != np.floor(values))
            if not frac.size:
                return pa.array(values.astype(np.int64))
            bad = int(frac[0])
        elif pa.types.is_string(flat.type):
            is_int = pc.match_substring_regex(flat, _INT_RE).to_numpy(zero_copy_only=False)
            wrong = np.flatnonzero(~is_int)
            if not wrong.size:
                return pc.cast(pc.utf8_trim_whitespace(flat), pa.int64())
            bad = int(wrong[0])
        else:
            bad = 0
    row = int(np.searchsorted(offsets, bad, side="right") - 1)
    value = flat[bad].as_py() if len(flat) else None
    raise table.error(row, f"expected {value_type} values, got {value!r}", name)


def id_column(table: SourceTable, name: str) -> pa.Array:
    """A user-id column as strings or int64 (as read); a missing id is an error."""
    column = table.table.column(name).combine_chunks()
    if pa.types.is_string(column.type):
        column = _strip_empty(pa.chunked_array([column])).combine_chunks()
    nulls = np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))
    if nulls.size:
        raise table.error(int(nulls[0]), "missing user id", name)
    if pa.types.is_floating(column.type):
        values = column.to_numpy(zero_copy_only=False)
        frac = np.flatnonzero(values != np.floor(values))
        if frac.size:
            raise table.error(
                int(frac[0]), f"user ids must be integers or strings, got {values[frac[0]]!r}", name
            )
        return pa.array(values.astype(np.int64))
    if not (pa.types.is_integer(column.type) or pa.types.is_string(column.type)):
        raise table.error(0, f"user ids must be integers or strings, got {column.type}", name)
    return column


def ids_are_integers(column: pa.Array) -> bool:
    if pa.types.is_integer(column.type):
        return True
    return bool(pc.all(pc.match_substring_regex(column, _INT_RE)).as_py() in (True, None))


def ids_as_int64(table: SourceTable, name: str, column: pa.Array) -> np.ndarray:
    """Integer ids (>= 0) as int64; a non-integer or negative id names its row."""
    if not pa.types.is_integer(column.type):
        is_int = pc.match_substring_regex(column, _INT_RE).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(~is_int)
        if bad.size:
            raise table.error(
                int(bad[0]),
                f"user id {column[int(bad[0])].as_py()!r} is not an integer "
                "(declare id_type: string to map string ids)",
                name,
            )
        column = pc.cast(pc.utf8_trim_whitespace(column), pa.int64())
    values = np.asarray(column.cast(pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)
    negative = np.flatnonzero(values < 0)
    if negative.size:
        raise table.error(int(negative[0]), f"negative user id {values[negative[0]]}", name)
    return values


def timestamp_column(table: SourceTable, name: str, unit: str) -> np.ndarray:
    """A timestamp column -> int64 unix seconds: timestamps, integers in ``unit``, ISO strings."""
    column = table.table.column(name).combine_chunks()
    if pa.types.is_string(column.type):
        column = _strip_empty(pa.chunked_array([column])).combine_chunks()
    nulls = np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))
    if nulls.size:
        raise table.error(int(nulls[0]), "missing timestamp", name)
    scale = {"s": 1, "ms": 1_000, "us": 1_000_000}[unit]
    if pa.types.is_timestamp(column.type):
        micros = column.cast(pa.timestamp("us", tz=column.type.tz)).cast(pa.int64())
        return np.asarray(micros.to_numpy(zero_copy_only=False), dtype=np.int64) // 1_000_000
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
        values = np.asarray(column.cast(pa.float64()).to_numpy(zero_copy_only=False))
        return np.floor(values / scale).astype(np.int64)
    if pa.types.is_string(column.type):
        if ids_are_integers(column):
            return np.asarray(pc.cast(column, pa.int64()).to_numpy(), dtype=np.int64) // scale
        try:
            parsed = pc.cast(column, pa.timestamp("s", tz="UTC"))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            parsed = None
        if parsed is not None:
            return np.asarray(
                parsed.cast(pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64
            )
        return _parse_iso_slow(table, name, column)
    raise table.error(0, f"expected timestamps, got {column.type}", name)


def _parse_iso_slow(table: SourceTable, name: str, column: pa.Array) -> np.ndarray:
    from datetime import UTC, datetime

    out = np.empty(len(column), dtype=np.int64)
    for i, text in enumerate(column.to_pylist()):
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise table.error(i, f"not an ISO 8601 time or a number: {text!r}", name) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        out[i] = int(moment.timestamp())
    return out


def is_glob(text: str) -> bool:
    return bool(re.search(r"[*?\[]", text))
