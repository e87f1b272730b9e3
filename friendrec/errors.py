"""Errors that carry enough context for a user to fix their input."""

from __future__ import annotations

from pathlib import Path


class FriendrecError(Exception):
    """Base class: the CLI prints these as one clear line instead of a stack trace."""


class DataValidationError(FriendrecError):
    """A raw dataset file is malformed; names the file and, where there is one, the line."""

    def __init__(
        self,
        path: Path | str,
        reason: str,
        line: int | None = None,
        column: str | None = None,
        *,
        where: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.line = line
        self.column = column
        self.reason = reason
        location = f"{self.path}:{line}" if line is not None else str(self.path)
        if where:  # e.g. "row group 3, row 17" for parquet
            location = f"{location} ({where})"
        if column:
            location = f"{location}: column {column!r}"
        super().__init__(f"{location}: {reason}")


class UnknownDatasetError(FriendrecError):
    """The dataset name is not a shipped schema (NAME[/VARIANT]) and no schema file was given."""


class DatasetMissingError(FriendrecError):
    """A schema's files are not on this machine; the message says where and how to get them."""


class SchemaError(FriendrecError):
    """A schema YAML is malformed or inconsistent; names the file and the field."""


class ContractMismatchError(FriendrecError):
    """A model or feature set was built for another schema (its hash differs)."""


class NotPreparedError(FriendrecError):
    """A job needs an artifact that an earlier command produces."""


class IncompatibleModelError(FriendrecError):
    """An exported model version does not fit the active dataset or the feature contract."""


class EmbeddingIndexError(FriendrecError):
    """The Milvus embedding index lacks a collection or alias, or refuses an operation."""


class IndexUnavailableError(FriendrecError):
    """Milvus cannot be reached (down, unreachable or too slow); the message names the URI."""
