"""The index build's batch inference on Ray: the same partitions as the local layer-by-layer
build (``serving.index_build.Partition``), each read and embedded by the worker that owns it;
only the layer-1 states are shared.

A pool of plain Ray actors (one per CPU of the cluster, at most ``engine.partitions``) each loads
the exported signatures and opens the online store once. The users are cut into partitions
(``serving.index_build.partitions``: 50k users in entity-key order, on sqlite one key range
each), dealt round-robin to the actors. Then:

1. **Read and layer 1.** Each actor reads a partition's online rows, computes their layer-1
   states (a user's state is a function of its own row) and drops the rows; it keeps what the
   readout needs (ids, degrees, first friends) and returns the states and which users the store
   knows. The driver gathers both into whole-population arrays and puts each into the object
   store once: the all-gather a readout needs, since a user's friends live in any partition.
   At 5M users and a 128-wide state that is 2.6 GB.
2. **Readout.** Each actor maps both (zero-copy), links its partitions' neighbour rows and
   embeds them by ``milvus.build_batch`` rows; the driver keeps at most two calls in flight per
   actor (bounded memory), inserts each finished batch into the new collection, and nothing is
   promoted until ``finish`` has counted every user (serving/index_build.py).

Before, the driver gathered every partition's feature rows into whole-population arrays in the
object store: the rows were held twice beside the workers' (5.0 GB at 1M users against the
local build's 2.9 GB), which did not fit 5M users beside Milvus in this machine's 24 GB.

A version exported before the layer signatures (``node_states``/``readout``) is refused here: per
user it needs its friends' feature rows from every partition; build it with the local engine or
export it again. The actors read too (rather than separate tasks) so that no second set of
worker processes competes with them for CPUs and memory; plain actors rather than a Ray Data
pipeline, whose upstream tasks an actor pool holding every CPU starves on a small cluster (seen
here on 2 cores).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from friendrec.config import Settings
from friendrec.contract import Contract
from friendrec.engine import ray_session
from friendrec.errors import IncompatibleModelError
from serving.index_build import (
    EmbeddedBatch,
    LocalEmbedder,
    Partition,
    PopulationStates,
    partitions,
    version_dir,
)

log = logging.getLogger(__name__)

IN_FLIGHT_PER_WORKER = 2

Call = tuple[Any, ...]  # a method's arguments


class EmbedWorker:
    """A Ray actor: the model and the store are loaded once; it reads and embeds the
    partitions it is given."""

    def __init__(
        self, settings: Settings, model_version: int, spec: Any, contract: Contract
    ) -> None:
        from friendrec.feast_store import open_store

        self.store = open_store(settings)
        self.spec, self.contract = spec, contract
        self.batch = settings.milvus.build_batch
        self.embedder = LocalEmbedder(version_dir(settings, model_version))
        self.parts: dict[int, Partition] = {}
        self.states: np.ndarray | None = None  # every user's layer-1 state, once attached

    def layerwise(self) -> bool:
        return self.embedder.layerwise

    def read(
        self, part: int, rows: np.ndarray, population: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, float, float]:
        """Partition ``part`` (the users ``population[rows]``) read, its layer-1 states computed
        and its rows dropped: (known, states, features seconds, embed seconds)."""
        self.parts[part], states, features_s, embed_s = Partition.read(
            self.store, population, rows, self.spec, self.contract, self.embedder, self.batch
        )
        return self.parts[part].known, states, features_s, embed_s

    def attach(self, population: np.ndarray, known: np.ndarray, states: np.ndarray) -> None:
        """The whole population's ids, known flags and layer-1 states (mapped zero-copy from the
        object store): the partitions' neighbour rows are linked."""
        for part in self.parts.values():
            part.link(population, known)
        self.states = states

    def readout(self, part: int, lo: int, hi: int) -> EmbeddedBatch:
        """Rows ``lo:hi`` of partition ``part`` embedded from the attached states."""
        assert self.states is not None, "attach() first"
        return self.parts[part].readout(lo, hi, self.states, self.embedder)


def embed_batches_ray(
    settings: Settings, user_ids: np.ndarray, model_version: int, spec: Any, contract: Contract
) -> Iterator[EmbeddedBatch]:
    """Every user (sorted, unique) embedded on Ray, yielded in batches as they finish (any order).
    The reads' and the layer-1 pass's seconds (summed over workers) count in the first batch's."""
    import ray

    parts = partitions(user_ids)
    batch = settings.milvus.build_batch
    with ray_session(settings):
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        workers_n = max(1, min(settings.engine.partitions or cpus, cpus, len(parts)))
        actor = ray.remote(num_cpus=1)(EmbedWorker)
        workers = [actor.remote(settings, model_version, spec, contract) for _ in range(workers_n)]
        log.info("index build on Ray: %d partitions over %d workers", len(parts), workers_n)
        try:
            if not ray.get(workers[0].layerwise.remote()):
                raise IncompatibleModelError(
                    f"model version {model_version} has no layer-by-layer signatures "
                    "(node_states, readout; exports before 2026-12-06): the Ray build needs "
                    "them. Export it again (`friendrec export`) or build with --engine local"
                )
            t0 = time.perf_counter()
            population = ray.put(np.asarray(user_ids, dtype=np.int64))
            gathered = PopulationStates.empty(len(user_ids))
            reads = [(p, rows, population) for p, rows in enumerate(parts)]
            for (_, rows, _), result in _map_calls(workers, "read", _per_worker(workers_n, reads)):
                gathered.add(rows, *result)
            log.info(
                "read and layer 1 of %d users on Ray in %.1fs (model loads included)",
                len(user_ids),
                time.perf_counter() - t0,
            )
            shared = (population, ray.put(gathered.known), ray.put(gathered.states))
            gathered.release()
            ray.get([worker.attach.remote(*shared) for worker in workers])
            readouts = [
                (p, lo, min(lo + batch, len(rows)))
                for p, rows in enumerate(parts)
                for lo in range(0, len(rows), batch)
            ]
            for _, embedded in _map_calls(workers, "readout", _per_worker(workers_n, readouts)):
                yield gathered.charge(embedded)
        finally:
            for worker in workers:
                ray.kill(worker)


def _per_worker(workers_n: int, calls: list[Call]) -> list[list[Call]]:
    """Each call (its first argument a partition) queued for the worker that owns the partition
    (partitions are dealt round-robin)."""
    queues: list[list[Call]] = [[] for _ in range(workers_n)]
    for call in calls:
        queues[call[0] % workers_n].append(call)
    return queues


def _map_calls(
    workers: list[Any], method: str, queues: list[list[Call]]
) -> Iterator[tuple[Call, Any]]:
    """``workers[w].<method>(*call)`` for every call of each worker's queue, at most
    ``IN_FLIGHT_PER_WORKER`` at a time per worker (bounded memory); (call, result) as they
    finish."""
    import ray

    pending: dict[Any, tuple[int, Call]] = {}  # object ref -> (worker, call)
    queued = [iter(queue) for queue in queues]

    def submit(w: int) -> None:
        call = next(queued[w], None)
        if call is not None:
            pending[getattr(workers[w], method).remote(*call)] = (w, call)

    for w in range(len(workers)):
        for _ in range(IN_FLIGHT_PER_WORKER):
            submit(w)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        w, call = pending.pop(done[0])
        submit(w)
        yield call, ray.get(done[0])
