"""`friendrec index build`: every user's embedding of one exported model version into a fresh
Milvus collection, then the live alias moves to it.

The embeddings are computed from the inputs serving computes for a query: the Feast *online*
store, then the exported signature (in-process with ``LocalEmbedder``, or TF Serving). Serving
reads a batch's users and then their friends (``training.features.fetch_online_inputs``); over a
whole population that read every user ~11 times, decoding each value in Python (391 of 450 s at
250k users). The build reads each user's online row once instead, in bulk and by column
(``training.features.read_online_table``), and assembles every batch's inputs by array indexing
with serving's own rules (``Population``): the same inputs, tested against the serving path.
Stream-created users (online rows only) are read like any other. ``embed_users`` is that serving
path per batch, kept as the reference.

A batch of users through ``serving_default`` recomputes each sampled friend's layer-1 state for
every user that samples it: (1 + fanout) times the work of a whole population. Versions exported
since 2026-12-06 carry the same function in two signatures (``training.export``), and the build
runs them layer by layer: every user's layer-1 state once, then each user's vector from its
friends' states (``Partition``; the same vectors, tested against the serving path user by user).
Older versions are embedded per batch as before.

Layer by layer, a user's state is a function of its own row alone, so the build reads the
population partition by partition (50k users, one key range of the online store each) and drops
each partition's feature rows once its states are computed: it holds every user's state and a
few numbers per user, not the whole population's rows (12.2 GB at 5M users before; the Ray build
runs the same ``Partition`` per worker, serving/index_build_ray.py).

No partial state: the collection is created on the first embedded batch, and if anything fails
before the alias has moved, it is dropped and the alias stays where it was. A version whose
collection is live is refused (build a new version, or roll back first); a non-live leftover of
the same version is dropped and rebuilt.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from friendrec.config import Settings
from friendrec.contract import Contract
from friendrec.errors import (
    EmbeddingIndexError,
    FriendrecError,
    IncompatibleModelError,
    NotPreparedError,
)
from friendrec.logs import progress_disabled
from friendrec.paths import DatasetPaths
from serving.index import EmbeddingIndex
from serving.tfserving.client import TFServingClient

if TYPE_CHECKING:
    from training.features import FeatureTable, InputSpec

log = logging.getLogger(__name__)

MODEL_CARD = "model_card.json"  # = training.export.MODEL_CARD (not imported: it loads TensorFlow)

BUILD_RPC_TIMEOUT_S = 300.0
"""Per-call Milvus deadline of a build once connected (connecting keeps the default). Since the
bulk read, batches arrive as fast as they embed, and milvus-lite stalls inserts while it seals
and indexes segments: up to 49 s measured at ~850k rows on 2 busy cores, past the default 30 s
at which the 1M build failed. A batch job can wait; ``finish`` waits as long for the index."""

Embedder = Callable[[dict[str, np.ndarray]], np.ndarray]
"""Named tower inputs of a batch -> its embeddings [batch, dim]."""


class TFServingEmbedder:
    """Asks TF Serving (Predict pinned to the version) exactly as the retrieval service does."""

    def __init__(self, client: TFServingClient, version: int) -> None:
        self.client, self.version = client, version

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        vectors, served = self.client.predict(inputs, self.version)
        if served != self.version:
            raise IncompatibleModelError(f"TF Serving answered with v{served}, not v{self.version}")
        return vectors


class LocalEmbedder:
    """Runs the exported signatures in-process (what TF Serving would run): ``serving_default``
    per batch of users, and where the version has them (exports since 2026-12-06) the
    layer-by-layer pair ``node_states`` / ``readout`` for a whole population."""

    def __init__(self, version_dir: Path) -> None:
        import tensorflow as tf

        from training.export import NODE_STATES, OUTPUT, READOUT, SIGNATURE, STATE

        self._tf = tf
        signatures = tf.saved_model.load(str(version_dir)).signatures
        self._fn = signatures[SIGNATURE]
        self._output, self._state = OUTPUT, STATE
        self._names = set(self._fn.structured_input_signature[1])
        self._node_states = signatures.get(NODE_STATES)
        self._readout = signatures.get(READOUT)
        self._node_names = (
            set(self._node_states.structured_input_signature[1]) if self._node_states else set()
        )

    @property
    def layerwise(self) -> bool:
        return self._node_states is not None and self._readout is not None

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        feed = {k: self._tf.constant(v) for k, v in inputs.items() if k in self._names}
        return self._fn(**feed)[self._output].numpy()

    def node_states(self, node: dict[str, np.ndarray]) -> np.ndarray:
        """Layer-1 states of nodes from their own rows (``training.features.node_features``)."""
        feed = {k: self._tf.constant(v) for k, v in node.items() if k in self._node_names}
        return self._node_states(**feed)[self._state].numpy()

    def readout(
        self, h_self: np.ndarray, friend_states: np.ndarray, mask: np.ndarray, degree: np.ndarray
    ) -> np.ndarray:
        """Index vectors from each user's state and its friends' states [batch, fanout, hidden]."""
        tf = self._tf
        return self._readout(
            h_self=tf.constant(h_self),
            friend_states=tf.constant(friend_states),
            friend_mask=tf.constant(mask),
            self_degree=tf.constant(degree.astype(np.int64, copy=False)),
        )[self._output].numpy()


@dataclass
class BuildReport:
    """What one build did (printed as JSON by the CLI)."""

    dataset: str
    model_version: int
    collection: str
    users: int
    unknown_users: int  # users the online store did not know: embedded from contract defaults
    dim: int
    index_type: str
    seconds: float
    previous: str | None  # the live collection before this build
    pruned: list[str]
    # features (the bulk read + batch assembly; on Ray summed over the workers, as embed is) /
    # embed / insert / finish
    timings: dict[str, float] = field(default_factory=dict)
    engine: str = "local"

    @property
    def users_per_s(self) -> float:
        return self.users / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "model_version": self.model_version,
            "collection": self.collection,
            "users": self.users,
            "unknown_users": self.unknown_users,
            "dim": self.dim,
            "index_type": self.index_type,
            "seconds": round(self.seconds, 3),
            "users_per_s": round(self.users_per_s, 1),
            "previous": self.previous,
            "pruned": self.pruned,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            "engine": self.engine,
        }


@dataclass
class EmbeddedBatch:
    """One batch of users with their index vectors, as a producer (local or Ray) hands it over.

    ``features_s`` and ``embed_s`` are the producer's own seconds (summed over workers on Ray)."""

    user_ids: np.ndarray
    vectors: np.ndarray
    unknown: int  # users the online store did not know (embedded from contract defaults)
    features_s: float = 0.0
    embed_s: float = 0.0


def embed_users(
    store: Any, ids: np.ndarray, embedder: Embedder, spec: Any, contract: Contract
) -> EmbeddedBatch:
    """Read one batch's online features the way serving does (``fetch_online_inputs``: the users,
    then their friends) and embed it. The reference the bulk build (``Population``) is tested
    against; the build itself no longer reads this way."""
    from training.features import fetch_online_inputs

    t0 = time.perf_counter()
    inputs, known = fetch_online_inputs(store, ids.tolist(), spec, contract)
    t1 = time.perf_counter()
    vectors = np.asarray(embedder(inputs), dtype=np.float32)
    return EmbeddedBatch(
        user_ids=ids,
        vectors=vectors,
        unknown=int((~np.asarray(known, dtype=bool)).sum()),
        features_s=t1 - t0,
        embed_s=time.perf_counter() - t1,
    )


@dataclass
class Population:
    """Every user's serving inputs as arrays: one online row per user (``table``, sorted by user
    id), which users the store knows, and each user's neighbour rows, the rows of its first
    ``fanout`` stored friends that the store knows (``fetch_query_inputs``'s rule). A batch is
    then ``tower_inputs`` over a row range: no read, no Python per user."""

    table: FeatureTable
    known: np.ndarray  # bool [n]
    neighbours: np.ndarray  # int64 [n, fanout], -1 padded

    @classmethod
    def read(
        cls, store: Any, user_ids: np.ndarray, spec: InputSpec, contract: Contract
    ) -> Population:
        """Every user of the sorted, unique ``user_ids`` from ``store`` in one bulk read."""
        from training.features import known_friend_rows, read_online_table

        if np.any(np.diff(user_ids) <= 0):
            raise ValueError("the population's user ids must be sorted and unique")
        online = read_online_table(store, user_ids, spec, contract)
        friends = online.friend_ids[:, : spec.fanout]
        return cls(online.table, online.known, known_friend_rows(user_ids, online.known, friends))

    def __len__(self) -> int:
        return len(self.table)

    def embed(self, lo: int, hi: int, embedder: Embedder) -> EmbeddedBatch:
        """Rows ``lo:hi`` embedded: what ``embed_users`` computes for those users."""
        from training.features import tower_inputs

        t0 = time.perf_counter()
        rows = np.arange(lo, hi)
        inputs = tower_inputs(self.table, rows, self.neighbours[lo:hi])
        t1 = time.perf_counter()
        vectors = np.asarray(embedder(inputs), dtype=np.float32)
        return EmbeddedBatch(
            user_ids=self.table.user_ids[lo:hi],
            vectors=vectors,
            unknown=int((~self.known[lo:hi]).sum()),
            features_s=t1 - t0,
            embed_s=time.perf_counter() - t1,
        )


PARTITION_USERS = 50_000
"""Users per partition of a layer-by-layer build: one read each (~75 MB of feature rows, held
only while its layer-1 states are computed)."""


def partitions(user_ids: np.ndarray, size: int | None = None) -> list[np.ndarray]:
    """Positions of the sorted ``user_ids`` cut into partitions of ``size`` (default
    ``PARTITION_USERS``) in entity-key order: on sqlite each partition's read is one key range
    of the online store."""
    from friendrec.feast_read import key_order

    size = size or PARTITION_USERS
    order = key_order(user_ids)
    return [order[lo : lo + size] for lo in range(0, len(user_ids), size)]


def layer1_states(
    table: FeatureTable, embedder: LocalEmbedder, batch: int
) -> tuple[np.ndarray, float, float]:
    """Every row's layer-1 state (the ``node_states`` signature over its own row), batch by
    batch, with the seconds spent assembling the rows and running the signature."""
    from training.features import node_features

    states: np.ndarray | None = None
    features_s = embed_s = 0.0
    for lo in range(0, len(table), batch):
        hi = min(lo + batch, len(table))
        t0 = time.perf_counter()
        node = node_features(table, np.arange(lo, hi))
        t1 = time.perf_counter()
        part = embedder.node_states(node)
        if states is None:
            states = np.empty((len(table), part.shape[1]), dtype=np.float32)
        states[lo:hi] = part
        features_s, embed_s = features_s + t1 - t0, embed_s + time.perf_counter() - t1
    assert states is not None, "an empty partition"
    return states, features_s, embed_s


@dataclass
class Partition:
    """One partition of a population in a layer-by-layer build, after its layer-1 pass: what its
    readout still needs. A user's layer-1 state is a function of its own row alone, so the
    partition's feature rows are dropped as soon as its states are computed: a build holds one
    partition's rows at a time, every user's state, and a few numbers per user.

    The readout of a user takes its friends' states from every partition, and its neighbour rows
    (``fetch_query_inputs``' rule: the first stored friends that the store knows) need to know
    which users every partition's read found: ``link`` once all are read."""

    rows: np.ndarray  # positions in the whole (sorted) population
    user_ids: np.ndarray  # int64 [m]
    known: np.ndarray  # bool [m]
    degree: np.ndarray  # int64 [m]
    first_friends: np.ndarray  # int64 [m, fanout]: the first stored friends, PAD_ID padded
    neighbours: np.ndarray | None = None  # rows of the whole population, -1 padded

    @classmethod
    def read(
        cls,
        store: Any,
        population: np.ndarray,
        rows: np.ndarray,
        spec: InputSpec,
        contract: Contract,
        embedder: LocalEmbedder,
        batch: int,
    ) -> tuple[Partition, np.ndarray, float, float]:
        """The users ``population[rows]`` read (one bulk read) and their layer-1 states
        computed: (the partition, its states, features seconds (the read included), embed
        seconds)."""
        from training.features import read_online_table

        t0 = time.perf_counter()
        online = read_online_table(store, population[rows], spec, contract)
        read_s = time.perf_counter() - t0
        states, features_s, embed_s = layer1_states(online.table, embedder, batch)
        part = cls(
            rows=rows,
            user_ids=online.table.user_ids,
            known=online.known,
            degree=online.table.degree,
            first_friends=np.ascontiguousarray(online.friend_ids[:, : spec.fanout]),
        )
        return part, states, read_s + features_s, embed_s

    def link(self, population: np.ndarray, known: np.ndarray) -> None:
        """Neighbour rows from the whole population's sorted ids and which of them the store
        knows."""
        from training.features import known_friend_rows

        self.neighbours = known_friend_rows(population, known, self.first_friends)

    def readout(
        self, lo: int, hi: int, states: np.ndarray, embedder: LocalEmbedder
    ) -> EmbeddedBatch:
        """Rows ``lo:hi`` embedded from the whole population's layer-1 ``states``: the vectors
        ``Population.embed`` computes per user, without recomputing a friend's layer 1 for every
        user that samples it."""
        from training.features import friend_states_of

        assert self.neighbours is not None, "link() first"
        t0 = time.perf_counter()
        friends, mask = friend_states_of(states, self.neighbours[lo:hi])
        own = states[self.rows[lo:hi]]
        t1 = time.perf_counter()
        vectors = embedder.readout(own, friends, mask, self.degree[lo:hi])
        return EmbeddedBatch(
            user_ids=self.user_ids[lo:hi],
            vectors=np.asarray(vectors, dtype=np.float32),
            unknown=int((~self.known[lo:hi]).sum()),
            features_s=t1 - t0,
            embed_s=time.perf_counter() - t1,
        )


def read_population(
    settings: Settings, user_ids: np.ndarray, spec: InputSpec, contract: Contract
) -> tuple[Population, float]:
    """The local engine's bulk read: (the population, its seconds)."""
    from friendrec.feast_store import open_store

    t0 = time.perf_counter()
    population = Population.read(open_store(settings), user_ids, spec, contract)
    seconds = time.perf_counter() - t0
    log.info(
        "read the online rows of %d users in %.1fs (%d unknown to the store)",
        len(population),
        seconds,
        int((~population.known).sum()),
    )
    return population, seconds


@dataclass
class PopulationStates:
    """The whole population's layer-1 states and known flags, gathered partition by partition
    (``Partition.read``'s results, locally or from Ray workers), with the seconds that went
    into them: charged to the first embedded batch, as the build's report expects."""

    known: np.ndarray  # bool [n]
    states: np.ndarray | None = None  # float32 [n, hidden], allocated by the first partition
    features_s: float = 0.0
    embed_s: float = 0.0

    @classmethod
    def empty(cls, n: int) -> PopulationStates:
        return cls(np.zeros(n, dtype=bool))

    def add(
        self,
        rows: np.ndarray,
        known: np.ndarray,
        states: np.ndarray,
        features_s: float,
        embed_s: float,
    ) -> None:
        if self.states is None:
            self.states = np.empty((len(self.known), states.shape[1]), dtype=np.float32)
        self.states[rows], self.known[rows] = states, known
        self.features_s, self.embed_s = self.features_s + features_s, self.embed_s + embed_s

    def release(self) -> None:
        """Drop the arrays once they are shared elsewhere (Ray's object store); the seconds
        stay to be charged."""
        self.known, self.states = np.empty(0, dtype=bool), None

    def charge(self, embedded: EmbeddedBatch) -> EmbeddedBatch:
        """``embedded`` with the gathered seconds added (once: the first batch takes them)."""
        embedded.features_s += self.features_s
        embedded.embed_s += self.embed_s
        self.features_s = self.embed_s = 0.0
        return embedded


def embed_batches_local(
    settings: Settings, user_ids: np.ndarray, embedder: Embedder, spec: Any, contract: Contract
) -> Iterator[EmbeddedBatch]:
    """The users (sorted, unique) embedded in ``milvus.build_batch`` batches in this process:
    layer by layer where the embedder can (``LocalEmbedder.layerwise``; ``Partition``), else
    per user from one bulk read (``Population``). The reads' (and the first pass's) seconds count
    in the first batch's."""
    batch = settings.milvus.build_batch
    if isinstance(embedder, LocalEmbedder) and embedder.layerwise:
        yield from embed_layerwise_local(settings, user_ids, embedder, spec, contract)
        return
    population, read_s = read_population(settings, user_ids, spec, contract)
    for lo in range(0, len(population), batch):
        embedded = population.embed(lo, min(lo + batch, len(population)), embedder)
        embedded.features_s += read_s
        read_s = 0.0
        yield embedded


def embed_layerwise_local(
    settings: Settings,
    user_ids: np.ndarray,
    embedder: LocalEmbedder,
    spec: Any,
    contract: Contract,
) -> Iterator[EmbeddedBatch]:
    """Partition by partition: read and layer 1 (the feature rows dropped after each), then every
    partition's readout over the whole population's states."""
    from friendrec.feast_store import open_store

    store = open_store(settings)
    batch = settings.milvus.build_batch
    t0 = time.perf_counter()
    gathered = PopulationStates.empty(len(user_ids))
    parts: list[Partition] = []
    for rows in partitions(user_ids):
        part, states, features_s, embed_s = Partition.read(
            store, user_ids, rows, spec, contract, embedder, batch
        )
        gathered.add(rows, part.known, states, features_s, embed_s)
        parts.append(part)
    assert gathered.states is not None, "an empty population"
    log.info(
        "read and layer 1 of %d users in %.1fs (%d unknown to the store)",
        len(user_ids),
        time.perf_counter() - t0,
        int((~gathered.known).sum()),
    )
    for part in parts:
        part.link(user_ids, gathered.known)
        for lo in range(0, len(part.rows), batch):
            hi = min(lo + batch, len(part.rows))
            yield gathered.charge(part.readout(lo, hi, gathered.states, embedder))


def version_dir(settings: Settings, model_version: int) -> Path:
    return settings.model_base_path / settings.serving.model_name / str(int(model_version))


def read_model_card(
    settings: Settings, model_version: int, dataset: str, contract: Contract
) -> dict[str, Any]:
    """The version's model card, checked against the active dataset and its ``contract``: a
    version trained on another schema is refused (ContractMismatchError, naming both hashes)."""
    directory = version_dir(settings, model_version)
    path = directory / MODEL_CARD
    if not path.is_file():
        raise NotPreparedError(
            f"no exported model version {model_version} in {directory.parent} "
            f"({MODEL_CARD} missing); run `friendrec export` first"
        )
    card = json.loads(path.read_text())
    if card.get("dataset") != dataset:
        raise IncompatibleModelError(
            f"model version {model_version} was trained on {card.get('dataset')!r}, but the "
            f"active dataset is {dataset!r} (data.dataset); its embeddings would index the "
            "wrong users"
        )
    contract.check_compatible(card.get("schema_hash"), f"model version {model_version}")
    if card.get("feature_service") != contract.serving_service:
        raise IncompatibleModelError(
            f"model version {model_version} expects feature service "
            f"{card.get('feature_service')!r}, this dataset serves {contract.serving_service!r}"
        )
    if not isinstance(card.get("inputs"), dict):
        raise IncompatibleModelError(f"{path} lists no signature inputs")
    return card


def input_spec(card: dict[str, Any]):
    """The InputSpec from the model card's signature shapes (no TensorFlow needed)."""
    from training.features import InputSpec

    try:
        return InputSpec.from_signature({k: v["shape"] for k, v in card["inputs"].items()})
    except ValueError as exc:
        raise IncompatibleModelError(str(exc)) from exc


def build_index(
    settings: Settings,
    model_version: int,
    embedder: Embedder | None = None,
    show_progress: bool = True,
    engine: str | None = None,
) -> BuildReport:
    """Embed every user of the active dataset with ``model_version`` into its own collection,
    then index, load, promote (the alias moves) and prune. See the module docstring.

    ``engine='ray'`` reads the online rows and embeds on Ray workers (one SavedModel each); the
    driver inserts the batches as they come, and the alias moves only after ``finish`` has
    counted every user."""
    import pyarrow.parquet as pq

    from friendrec import contract as contracts
    from friendrec.data.canonical import read_meta
    from friendrec.engine import resolve_engine
    from friendrec.feast_store import open_store
    from friendrec.online_users import online_user_ids

    # A caller's own embedder runs in this process whatever engine.kind says.
    engine = (
        "local" if embedder is not None and engine is None else resolve_engine(settings, engine)
    )

    started = time.perf_counter()
    # The prepared users' ids, meta and contract only: the whole prepared dataset (its
    # friendships) held ~1.1 GB at 1M users for the length of the build.
    paths = DatasetPaths.of(settings)
    dataset = read_meta(paths).name
    contract = contracts.load(paths.data_dir)
    prepared = pq.read_table(paths.users, columns=[contracts.JOIN_KEY])
    prepared_ids = prepared.column(contracts.JOIN_KEY).to_numpy()
    # The prepared users and those the stream created since (they have online rows only).
    online = online_user_ids(open_store(settings))
    user_ids = np.union1d(prepared_ids, online)
    if len(user_ids) > len(prepared_ids):
        log.info(
            "%d users created by the stream (online rows only) are indexed too",
            len(user_ids) - len(prepared_ids),
        )
    if len(user_ids) == 0:
        raise NotPreparedError(f"dataset {dataset!r} has no users")
    card = read_model_card(settings, model_version, dataset, contract)
    spec = input_spec(card)
    timings = dict.fromkeys(("features", "embed", "insert", "finish"), 0.0)

    with EmbeddingIndex.connect(settings) as index:
        index.timeout = max(index.timeout, BUILD_RPC_TIMEOUT_S)
        target = index.collection_name(model_version)
        before = index.live()
        if before is not None and before.collection == target:
            raise EmbeddingIndexError(
                f"model version {model_version} is live ({target} behind alias "
                f"{index.alias!r}); build a new version, or `friendrec index rollback` first"
            )
        if index.exists(target):
            log.warning("%s exists but is not live: dropping and rebuilding it", target)
            index.drop(target)
        if engine == "ray":
            from serving.index_build_ray import embed_batches_ray

            if embedder is not None:
                raise ValueError("a custom embedder runs in this process: use engine='local'")
            batches = embed_batches_ray(settings, user_ids, model_version, spec, contract)
        else:
            batches = embed_batches_local(
                settings,
                user_ids,
                embedder or LocalEmbedder(version_dir(settings, model_version)),
                spec,
                contract,
            )

        collection: str | None = None
        unknown = 0
        dim = 0
        try:
            bar = tqdm(
                total=len(user_ids),
                desc=f"index v{model_version}",
                unit="user",
                disable=progress_disabled(show_progress),
            )
            with bar, contextlib.closing(batches):
                for embedded in batches:
                    ids, vectors = embedded.user_ids, embedded.vectors
                    if vectors.ndim != 2 or len(vectors) != len(ids):
                        raise IncompatibleModelError(
                            f"the embedder returned shape {vectors.shape} for {len(ids)} users"
                        )
                    t0 = time.perf_counter()
                    if collection is None:
                        dim = int(vectors.shape[1])
                        collection = index.create_version(
                            model_version, dim, dataset, schema_hash=contract.schema_hash
                        )
                    index.insert(collection, ids, vectors, model_version)
                    timings["features"] += embedded.features_s
                    timings["embed"] += embedded.embed_s
                    timings["insert"] += time.perf_counter() - t0
                    unknown += embedded.unknown
                    bar.update(len(ids))
            t0 = time.perf_counter()
            index.finish(collection, len(user_ids))
            live = index.promote(model_version)
            timings["finish"] = time.perf_counter() - t0
        except BaseException:
            if collection is not None:
                _discard(index, collection)
            raise
        if unknown:
            log.warning(
                "%d of %d users are unknown to the online store (embedded from contract "
                "defaults): is the store materialized?",
                unknown,
                len(user_ids),
            )
        try:
            pruned = index.prune()
        except FriendrecError as exc:  # the build itself succeeded: prune again later
            log.warning("prune after the build failed: %s", exc)
            pruned = []

    report = BuildReport(
        dataset=dataset,
        model_version=int(model_version),
        collection=live.collection,
        users=len(user_ids),
        unknown_users=unknown,
        dim=dim,
        index_type=settings.milvus.index_type,
        seconds=time.perf_counter() - started,
        previous=before.collection if before else None,
        pruned=pruned,
        timings=timings,
        engine=engine,
    )
    log.info(
        "indexed %d users of model version %d into %s in %.1fs (%.0f users/s); alias %s -> %s",
        report.users,
        report.model_version,
        report.collection,
        report.seconds,
        report.users_per_s,
        index.alias,
        report.collection,
    )
    return report


def _discard(index: EmbeddingIndex, collection: str) -> None:
    """Drop a failed build's collection unless the alias already points at it (best effort: if
    Milvus is gone too, the collection stays ``building``; a rebuild or prune drops it)."""
    try:
        live = index.live()
        if live is not None and live.collection == collection:
            log.error("the build failed after %s went live; it stays live", collection)
            return
        index.drop(collection)
        log.warning("build failed: dropped the half-built %s; the alias is unchanged", collection)
    except FriendrecError as exc:
        log.error("build failed and %s could not be dropped: %s", collection, exc)
