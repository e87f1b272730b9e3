"""The embedding refresher: refresh requests -> embeddings from TF Serving -> embeddings topic.

A batch's users are deduplicated (the oldest originating event time is kept, for freshness), their
tower inputs are read from the Feast online store exactly as serving reads them
(``streaming.feast_io.query_inputs``: the serving path, each row read once), and TF Serving
computes the embeddings pinned to the model version that is live in Milvus at that moment: an
embedding of any other version would live in another space.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from friendrec.config import Settings
from friendrec.contract import Contract
from friendrec.errors import IncompatibleModelError, IndexUnavailableError
from friendrec.feast_store import open_store
from friendrec.paths import load_contract
from serving.tfserving.client import TFServingClient
from streaming.feast_io import query_inputs
from streaming.milvus_conn import ReconnectingIndex
from streaming.schemas import RefreshRequest, UserEmbedding
from streaming.topics import Topics
from streaming.worker import Record

log = logging.getLogger(__name__)

LIVE_CACHE_S = 1.0
CHUNK = 256  # users per Predict


class EmbeddingRefresher:
    """The ``embedding-refresher`` processor (see module docstring)."""

    name = "embedding-refresher"

    def __init__(
        self, settings: Settings, store: Any | None = None, contract: Contract | None = None
    ) -> None:
        """``contract``: the active dataset's (default: loaded from its prepared data)."""
        self.settings = settings
        self.topics_ = Topics.of(settings)
        self.contract = contract if contract is not None else load_contract(settings)
        self.store = store if store is not None else open_store(settings)
        self.index = ReconnectingIndex(settings)
        self.client = TFServingClient(
            settings.tfserving.address,
            settings.serving.model_name,
            timeout_s=max(settings.serving.tfserving_timeout_s, 5.0),
        )
        self._live: tuple[float, int] | None = None

    def topics(self) -> tuple[str, ...]:
        return (self.topics_.refresh,)

    def close(self) -> None:
        self.client.close()
        self.index.close()

    def live_version(self) -> int:
        """The live model version (cached for a second: the alias rarely moves)."""
        now = time.monotonic()
        if self._live is None or now - self._live[0] > LIVE_CACHE_S:
            live = self.index.call(lambda index: index.live())
            if live is None:
                raise IndexUnavailableError("no live collection behind the alias yet: unavailable")
            self._live = (now, live.model_version)
        return self._live[1]

    def process(self, records: Sequence[Record], send: Callable[[str, Any], None]) -> None:
        origin: dict[int, int] = {}
        for record in records:
            m = record.message
            if isinstance(m, RefreshRequest):
                origin[m.user_id] = min(m.origin_ts, origin.get(m.user_id, m.origin_ts))
        if not origin:
            return
        version = self.live_version()
        spec = self.client.input_spec(version)
        users = sorted(origin)
        inputs = query_inputs(self.store, users, spec, self.contract)
        for lo in range(0, len(users), CHUNK):
            chunk = {k: v[lo : lo + CHUNK] for k, v in inputs.items()}
            vectors, served = self.client.predict(chunk, version)
            if served != version:
                raise IncompatibleModelError(f"TF Serving answered with v{served}, not v{version}")
            computed = int(time.time() * 1000)
            for i, user in enumerate(users[lo : lo + CHUNK]):
                send(
                    self.topics_.embeddings,
                    UserEmbedding(
                        user_id=user,
                        model_version=version,
                        vector=vectors[i].tolist(),
                        origin_ts=origin[user],
                        computed_at=computed,
                    ),
                )
