"""Errors that carry enough context for a user to fix their input."""

from __future__ import annotations

from pathlib import Path


class FriendrecError(Exception):
    """Base class: the CLI prints these as one clear line instead of a stack trace."""


class DataValidationError(FriendrecError):
    """A raw dataset file is malformed; names the file and, where there is one, the line."""

    def __init__(self, path: Path | str, reason: str, line: int | None = None) -> None:
        self.path = Path(path)
        self.line = line
        self.reason = reason
        where = f"{self.path}:{line}" if line is not None else str(self.path)
        super().__init__(f"{where}: {reason}")


class UnknownDatasetError(FriendrecError):
    """The dataset name is not one of twitch/<LANG>, github, synthetic:<N>."""


class NotPreparedError(FriendrecError):
    """A job needs an artifact that an earlier command produces."""


class IncompatibleModelError(FriendrecError):
    """An exported model version does not fit the active dataset or the feature contract."""


class EmbeddingIndexError(FriendrecError):
    """The Milvus embedding index lacks a collection or alias, or refuses an operation."""


class IndexUnavailableError(FriendrecError):
    """Milvus cannot be reached (down, unreachable or too slow); the message names the URI."""
