"""The index build's batch inference on Ray: the online rows read once, in parallel, shared
through the object store; users embedded over partitions by workers that each load the SavedModel
once; batches streamed back to the driver for a bulk insert.

A pool of plain Ray actors (one per CPU of the cluster, at most one per batch) each loads the
exported signature and opens the online store once, then:
1. Reads: one call per range of entity keys (``READ_USERS`` users; on sqlite one indexed key
   range) decodes those users' online rows (``training.features.read_online_table``) and returns
   one object per array. The driver copies them into whole-population arrays one array at a
   time, dropping the pieces as it goes, computes the neighbour rows (they need every user) and
   puts each array into the object store once: the store holds about one table at a time.
2. Embeds: each actor maps the arrays zero-copy and embeds ``milvus.build_batch`` rows per call
   (the same functions the local build runs). Layer by layer where the version has the
   signatures: the actors first compute every user's layer-1 state by batches, the driver puts
   the whole state array into the object store once, and each actor maps it for the readout.
   The driver keeps at most two batches in flight per actor (bounded memory), inserts each
   finished batch into the new collection, and nothing is promoted until its ``finish`` has
   counted every user (serving/index_build.py).

The actors read too (rather than separate tasks) so that no second set of worker processes
starts and competes with them for CPUs and memory. Plain actors rather than a Ray Data pipeline:
on a small cluster an actor pool that holds every CPU starves Ray Data's own upstream tasks (seen
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
from serving.index_build import EmbeddedBatch, LocalEmbedder, Population, version_dir

log = logging.getLogger(__name__)

IN_FLIGHT_PER_WORKER = 2
READ_USERS = 50_000
"""Users per read call: at 250k users, 5 calls over 2 workers; each returns ~75 MB of arrays."""

# The FeatureTable arrays a read returns besides ``user_ids`` (the driver has them) and
# ``friend_matrix`` (a view of the stored friends, returned once as ``friend_ids``).
TABLE_ARRAYS = ("profile", "sparse_ids", "nbr_ids", "nbr_weights", "nbr_profile", "degree")
READ_RETURNS = 3 + len(TABLE_ARRAYS)  # seconds, known, friend_ids, *TABLE_ARRAYS


class EmbedWorker:
    """A Ray actor: the model and the store are loaded once; it reads key ranges of users, then
    maps the whole population's arrays and embeds batches of rows."""

    def __init__(
        self, settings: Settings, model_version: int, spec: Any, contract: Contract
    ) -> None:
        from friendrec.feast_store import open_store

        self.store = open_store(settings)
        self.spec, self.contract = spec, contract
        self.embedder = LocalEmbedder(version_dir(settings, model_version))
        self.population: Population | None = None
        self.states: np.ndarray | None = None  # every user's layer-1 state, once attached

    def read(self, user_ids: np.ndarray) -> tuple[Any, ...]:
        """(its seconds, known, friend_ids, *TABLE_ARRAYS) of ``user_ids``, rows in their order;
        one object each, so that the driver can free them array by array."""
        from training.features import read_online_table

        t0 = time.perf_counter()
        part = read_online_table(self.store, user_ids, self.spec, self.contract)
        arrays = (getattr(part.table, a) for a in TABLE_ARRAYS)
        return (time.perf_counter() - t0, part.known, part.friend_ids, *arrays)

    def attach(self, shared: dict[str, Any]) -> None:
        """Map the population's arrays (object refs from ``gather_population``)."""
        import ray

        from training.features import FeatureTable

        arrays = dict(zip(shared, ray.get(list(shared.values())), strict=True))
        known, neighbours = arrays.pop("known"), arrays.pop("neighbours")
        self.population = Population(FeatureTable(**arrays), known, neighbours)

    def layerwise(self) -> bool:
        return self.embedder.layerwise

    def node_states(self, lo: int, hi: int) -> tuple[int, np.ndarray, float, float]:
        """(lo, the layer-1 states of rows ``lo:hi``, features seconds, embed seconds)."""
        assert self.population is not None, "attach() first"
        return (lo, *self.population.node_states(lo, hi, self.embedder))

    def attach_states(self, states: np.ndarray) -> None:
        """Every user's layer-1 state (mapped zero-copy from the object store)."""
        self.states = states

    def embed(self, lo: int, hi: int) -> EmbeddedBatch:
        """Rows ``lo:hi`` embedded: from the attached states where there are, else per user."""
        assert self.population is not None, "attach() first"
        if self.states is not None:
            return self.population.readout(lo, hi, self.states, self.embedder)
        return self.population.embed(lo, hi, self.embedder)


def gather_population(
    workers: list[Any], user_ids: np.ndarray, spec: Any
) -> tuple[dict[str, Any], float]:
    """Every user's online row read by the workers in parallel, one key range per call; returns
    an object ref per array of a ``Population`` (``user_ids``, ``known``, ``neighbours`` and the
    table's arrays) and the reads' seconds summed over the workers."""
    import ray

    from friendrec.feast_read import key_order
    from training.features import known_friend_rows

    order = key_order(user_ids)
    pieces = [order[lo : lo + READ_USERS] for lo in range(0, len(user_ids), READ_USERS)]
    parts = [
        list(workers[i % len(workers)].read.options(num_returns=READ_RETURNS).remote(user_ids[p]))
        for i, p in enumerate(pieces)
    ]

    def gather(i: int) -> np.ndarray:
        """Array ``i`` of every read, in user-id order; the pieces are released as copied."""
        out: np.ndarray | None = None
        for piece, refs in zip(pieces, parts, strict=True):
            value = ray.get(refs[i])
            if out is None:
                out = np.empty((len(user_ids), *value.shape[1:]), dtype=value.dtype)
            out[piece] = value
            refs[i] = None
            del value
        assert out is not None
        return out

    seconds = float(sum(ray.get([refs[0] for refs in parts])))
    known = gather(1)
    friends = gather(2)
    shared = {
        "user_ids": ray.put(np.asarray(user_ids, dtype=np.int64)),
        "known": ray.put(known),
        "neighbours": ray.put(known_friend_rows(user_ids, known, friends[:, : spec.fanout])),
        "friend_matrix": ray.put(np.ascontiguousarray(friends[:, : spec.friend_len])),
    }
    del friends
    for i, name in enumerate(TABLE_ARRAYS, start=3):
        shared[name] = ray.put(gather(i))
    return shared, seconds


def embed_batches_ray(
    settings: Settings, user_ids: np.ndarray, model_version: int, spec: Any, contract: Contract
) -> Iterator[EmbeddedBatch]:
    """Every user (sorted, unique) embedded on Ray, yielded in batches as they finish (any order).
    The reads' seconds (summed over workers) count in the first batch's ``features_s``."""
    import ray

    size = settings.milvus.build_batch
    batches = [(lo, min(lo + size, len(user_ids))) for lo in range(0, len(user_ids), size)]
    with ray_session(settings):
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        workers_n = max(1, min(settings.engine.partitions or cpus, cpus, len(batches)))
        actor = ray.remote(num_cpus=1)(EmbedWorker)
        workers = [actor.remote(settings, model_version, spec, contract) for _ in range(workers_n)]
        log.info("index build on Ray: %d batches over %d workers", len(batches), workers_n)
        try:
            t0 = time.perf_counter()
            shared, read_s = gather_population(workers, user_ids, spec)
            ray.get([worker.attach.remote(shared) for worker in workers])
            log.info(
                "read the online rows of %d users on Ray in %.1fs (model loads included)",
                len(user_ids),
                time.perf_counter() - t0,
            )
            first_embed_s = 0.0  # the layer-1 pass's, counted in the first batch's embed_s
            if ray.get(workers[0].layerwise.remote()):
                t0 = time.perf_counter()
                states = np.empty((0, 0), np.float32)
                for lo, part, features_s, embed_s in _map_batches(workers, "node_states", batches):
                    if not states.size:
                        states = np.empty((len(user_ids), part.shape[1]), np.float32)
                    states[lo : lo + len(part)] = part
                    read_s += features_s
                    first_embed_s += embed_s
                states_ref = ray.put(states)
                del states
                ray.get([worker.attach_states.remote(states_ref) for worker in workers])
                log.info("layer-1 states on Ray in %.1fs", time.perf_counter() - t0)
            for embedded in _map_batches(workers, "embed", batches):
                embedded.features_s += read_s
                embedded.embed_s += first_embed_s
                read_s = first_embed_s = 0.0
                yield embedded
        finally:
            for worker in workers:
                ray.kill(worker)


def _map_batches(workers: list[Any], method: str, batches: list[tuple[int, int]]) -> Iterator[Any]:
    """``worker.<method>(lo, hi)`` for every batch over the workers, at most
    ``IN_FLIGHT_PER_WORKER`` calls each at a time (bounded memory); results as they finish."""
    import ray

    pending: dict[Any, int] = {}  # object ref -> worker
    queue = iter(batches)

    def submit(w: int) -> None:
        nxt = next(queue, None)
        if nxt is not None:
            pending[getattr(workers[w], method).remote(*nxt)] = w

    for w in range(len(workers)):
        for _ in range(IN_FLIGHT_PER_WORKER):
            submit(w)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        submit(pending.pop(done[0]))
        yield ray.get(done[0])
