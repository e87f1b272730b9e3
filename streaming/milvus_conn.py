"""A Milvus connection that is re-established after an outage.

pymilvus does not reconnect a client whose server went away and came back; a worker that retries
with the same client would fail forever. So the client is dropped on ``IndexUnavailableError``
and made again on the next use (the worker's retry).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TypeVar

from friendrec.config import Settings
from friendrec.errors import FriendrecError, IndexUnavailableError
from serving.index import EmbeddingIndex

T = TypeVar("T")


class ReconnectingIndex:
    """Calls ``fn(index)`` on a lazily connected ``EmbeddingIndex``; an outage drops it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._index: EmbeddingIndex | None = None

    def call(self, fn: Callable[[EmbeddingIndex], T]) -> T:
        if self._index is None:
            self._index = EmbeddingIndex.connect(
                self.settings, timeout=self.settings.serving.milvus_timeout_s * 5
            )
        try:
            return fn(self._index)
        except IndexUnavailableError:
            self.close()
            raise

    def close(self) -> None:
        if self._index is not None:
            with contextlib.suppress(FriendrecError, OSError):
                self._index.close()
            self._index = None
