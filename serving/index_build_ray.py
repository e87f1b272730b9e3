"""The index build's batch inference on Ray: users embedded over partitions, one SavedModel and
one Feast store per worker, batches streamed back to the driver for a bulk insert.

A pool of Ray actors (one per CPU of the cluster, at most one per batch) each loads the exported
signature and opens the online store once, then embeds ``milvus.build_batch`` users per call
with ``embed_users``, the same function the local build runs. The driver keeps at most two
batches in flight per actor (bounded memory), inserts each finished batch into the new
collection, and nothing is promoted until its ``finish`` has counted every user
(serving/index_build.py). Plain actors rather than a Ray Data pipeline: on a small cluster an
actor pool that holds every CPU starves Ray Data's own upstream tasks (seen here on 2 cores).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

from friendrec.config import Settings
from friendrec.contract import Contract
from friendrec.engine import ray_session
from serving.index_build import EmbeddedBatch, LocalEmbedder, embed_users, version_dir

log = logging.getLogger(__name__)

IN_FLIGHT_PER_WORKER = 2


class EmbedWorker:
    """A Ray actor: the model and the store are loaded once, then reused for every batch."""

    def __init__(self, settings: Settings, model_version: int, spec: Any, contract: Contract):
        from friendrec.feast_store import open_store

        self.embedder = LocalEmbedder(version_dir(settings, model_version))
        self.store = open_store(settings)
        self.spec, self.contract = spec, contract

    def embed(self, user_ids: np.ndarray) -> EmbeddedBatch:
        return embed_users(self.store, user_ids, self.embedder, self.spec, self.contract)


def embed_batches_ray(
    settings: Settings, user_ids: np.ndarray, model_version: int, spec: Any, contract: Contract
) -> Iterator[EmbeddedBatch]:
    """Every user embedded on Ray, yielded in batches as they finish (any order)."""
    import ray

    size = settings.milvus.build_batch
    batches = [user_ids[lo : lo + size] for lo in range(0, len(user_ids), size)]
    with ray_session(settings):
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        workers_n = max(1, min(settings.engine.partitions or cpus, cpus, len(batches)))
        actor = ray.remote(num_cpus=1)(EmbedWorker)
        workers = [actor.remote(settings, model_version, spec, contract) for _ in range(workers_n)]
        log.info("index build on Ray: %d batches over %d workers", len(batches), workers_n)
        try:
            pending: dict[Any, int] = {}  # object ref -> worker
            queue = iter(batches)
            for w in range(workers_n):
                for _ in range(IN_FLIGHT_PER_WORKER):
                    nxt = next(queue, None)
                    if nxt is not None:
                        pending[workers[w].embed.remote(nxt)] = w
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                w = pending.pop(done[0])
                nxt = next(queue, None)
                if nxt is not None:
                    pending[workers[w].embed.remote(nxt)] = w
                yield ray.get(done[0])
        finally:
            for worker in workers:
                ray.kill(worker)
