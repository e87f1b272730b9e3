"""`friendrec train`: seeded training with checkpoints, resume and early stopping on validation
Recall@50 (validation edges only; test edges are for `friendrec evaluate`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from friendrec.config import Settings, TrainingSettings
from friendrec.contract import Contract
from friendrec.data.canonical import PreparedDataset, load_prepared
from friendrec.errors import NotPreparedError
from friendrec.feast_store import open_store
from friendrec.logs import progress_disabled
from friendrec.paths import DatasetPaths
from training.evaluation import (
    EvalSet,
    blocked_topk,
    merge_topk,
    per_user_metrics,
    topk_from_embeddings,
)
from training.features import FeatureTable, InputSpec
from training.model import LossConfig, SSMTLModel
from training.optimizer import make_optimizer
from training.pipeline import PairSampler, embed_all, layer1_states, readout_rows
from training.tower import UserTower

log = logging.getLogger(__name__)

# Written last, by the chief: a run folder that holds it is a finished run.
RESULT_FILE = "result.json"
# Beside the best weights: the best epoch's Recall@50 per validation query and that epoch, so
# that `tune` compares runs user for user without scoring them again.
BEST_RECALLS_FILE = "val_recalls.npz"


def loss_config(cfg: TrainingSettings) -> LossConfig:
    """The objective's loss weights, with explicit weights in the settings taking precedence."""
    overrides = {
        k: getattr(cfg, k)
        for k in (
            "temperature",
            "log_q",
            "log_q_strength",
            "cca_lambda",
            "cca_fraction",
            "cca_projector_dim",
            "cca_id_drop",
            "feature_drop",
            "neighbour_drop",
            "view_noise",
            "cca_target",
            "mae_fraction",
            "mae_gamma",
        )
    }
    for weight in ("cca_weight", "mae_weight"):
        if getattr(cfg, weight) is not None:
            overrides[weight] = getattr(cfg, weight)
    return LossConfig.for_objective(cfg.objective, **overrides)


def aux_user_count(cfg: TrainingSettings, losses: LossConfig) -> int:
    """Users drawn uniformly per batch for the auxiliary losses (``aux_users: uniform``): as many
    as the larger fraction of the batch an auxiliary loss takes (each takes its own fraction of
    the batch size from them); 0 with no auxiliary loss on, or ``aux_users: pairs``."""
    fractions = [
        fraction
        for weight, fraction in (
            (losses.cca_weight, losses.cca_fraction),
            (losses.mae_weight, losses.mae_fraction),
        )
        if weight > 0
    ]
    if cfg.aux_users != "uniform" or not fractions:
        return 0
    return max(2, math.ceil(cfg.batch_size * max(fractions)))


def make_sampler(
    ctx: TrainingContext,
    cfg: TrainingSettings,
    shard: int = 0,
    shards: int = 1,
    aux_users: int | None = None,
) -> PairSampler:
    """The training batches ``cfg`` asks for (mixed negatives, uniformly drawn auxiliary users:
    ``aux_users``, by default what ``cfg``'s own losses take)."""
    if aux_users is None:
        aux_users = aux_user_count(cfg, loss_config(cfg))
    return PairSampler(
        ctx.data,
        ctx.table,
        cfg.fanout,
        cfg.batch_size,
        seed=cfg.seed,
        shard=shard,
        num_shards=shards,
        uniform_negatives=cfg.uniform_negatives,
        aux_users=aux_users,
    )


# Settings added after runs were cached: the value every earlier run had, and the loss weights
# they act through (None: every run). A setting at that value, or whose losses are all off, is
# left out of a run's identity, so earlier runs (and every run it cannot change) keep their
# folders.
ADDED_SETTINGS: dict[str, tuple[object, tuple[str, ...] | None]] = {
    "cca_projector_dim": (0, ("cca_weight",)),
    "cca_id_drop": (None, ("cca_weight",)),
    "popularity_bias": (False, None),
    # The global batch (workers x batch_size) and its in-batch negatives change the model.
    "workers": (1, None),
    "val_max_users": (None, None),
    "log_q_strength": (1.0, None),
    "uniform_negatives": (0, None),
    "aux_users": ("pairs", ("cca_weight", "mae_weight")),
    "view_noise": (0.0, ("cca_weight",)),
    "cca_target": ("views", ("cca_weight",)),
}


def read_run_config(run_dir: Path) -> TrainingSettings:
    """A run's settings as it was trained: a setting added after the run gets the value the run
    actually had, not today's default."""
    raw = json.loads((run_dir / "config.json").read_text())
    earlier = {name: value for name, (value, _) in ADDED_SETTINGS.items() if name not in raw}
    return TrainingSettings.model_validate({**raw, **earlier})


# Settings only CCA-SSG's views read, and the values a run without CCA-SSG is named with: a
# change of them is no new model there, and runs cached before this rule (when these were the
# defaults) keep their names whatever the defaults are now.
VIEW_SETTINGS: dict[str, float] = {"feature_drop": 0.2, "neighbour_drop": 0.2}


def run_name(cfg: TrainingSettings) -> str:
    """The run folder: the model's identity, not its stopping rule (or how often a data-parallel
    group may be relaunched), so that asking for more epochs (or more patience) continues the
    same run."""
    losses = loss_config(cfg)
    if losses.cca_weight == 0:
        cfg = cfg.model_copy(update=VIEW_SETTINGS)
    unset = {
        name
        for name, (earlier, weights) in ADDED_SETTINGS.items()
        if getattr(cfg, name) == earlier
        or (weights is not None and all(getattr(losses, w) == 0 for w in weights))
    }
    identity = cfg.model_dump_json(exclude={"epochs", "patience", "max_restarts", *unset})
    digest = hashlib.sha256(identity.encode()).hexdigest()[:8]
    return f"{cfg.objective}-seed{cfg.seed}-{digest}"


@dataclass
class TrainResult:
    model_dir: Path
    objective: str
    best_epoch: int
    best_val_recall50: float
    epochs_run: int
    examples_per_second: float
    step_seconds: float
    history: list[dict[str, float]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["model_dir"] = str(self.model_dir)
        return out


@dataclass
class TrainingContext:
    """Everything a run needs, loaded once (also used by evaluation and export)."""

    settings: Settings
    paths: DatasetPaths
    data: PreparedDataset
    table: FeatureTable
    spec: InputSpec

    @classmethod
    def load(cls, settings: Settings, dataset: str | None = None) -> TrainingContext:
        paths = DatasetPaths.of(settings, dataset)
        data = load_prepared(paths)
        if not paths.feast_registry.exists():
            raise NotPreparedError(
                f"no Feast registry for {paths.name}; run `friendrec features build` and "
                "`friendrec features apply` first"
            )
        spec = InputSpec.from_settings(settings, data.meta.vocab_size, settings.training.fanout)
        table = FeatureTable.from_offline_store(open_store(settings, paths.name), data, spec)
        return cls(settings, paths, data, table, spec)

    @property
    def contract(self) -> Contract:
        """The dataset's feature contract (loaded with the prepared data)."""
        return self.data.contract

    def build_tower(self, cfg: TrainingSettings) -> UserTower:
        profile = self.contract.transform_profile(self.table.profile)
        tf.keras.utils.set_random_seed(cfg.seed)
        return UserTower(
            replace(self.spec, fanout=cfg.fanout),
            profile.mean(axis=0),
            profile.var(axis=0),
            known_user_ids=self.table.user_ids,
            embedding_dim=cfg.embedding_dim,
            sparse_dim=cfg.sparse_dim,
            id_dim=cfg.id_dim,
            id_dropout=cfg.id_dropout,
            hidden_dim=cfg.hidden_dim,
            transform=self.contract.transform_arrays(),
            popularity_bias=cfg.popularity_bias,
        )


@dataclass(frozen=True)
class Cluster:
    """This process's place in a data-parallel group (``training/distributed.py`` starts one
    process per worker under ``tf.distribute.MultiWorkerMirroredStrategy``)."""

    strategy: tf.distribute.Strategy
    index: int  # the task index; 0 is the chief
    size: int  # workers in the group

    @property
    def is_chief(self) -> bool:
        return self.index == 0

    def __post_init__(self) -> None:
        strategy = self.strategy

        @tf.function(reduce_retracing=True)
        def all_gather(value: tf.Tensor) -> tf.Tensor:
            def gather(v: tf.Tensor) -> tf.Tensor:
                return tf.distribute.get_replica_context().all_gather(tf.identity(v), axis=0)

            return strategy.experimental_local_results(strategy.run(gather, args=(value,)))[0]

        object.__setattr__(self, "_all_gather", all_gather)

    def all_gather(self, value: np.ndarray) -> np.ndarray:
        """Every worker's ``value`` (the same shape on each), concatenated in task order on
        axis 0: a collective, so every worker of the group must call it."""
        return self._all_gather(tf.convert_to_tensor(value)).numpy()


def make_train_step(
    model: SSMTLModel,
    optimizer: tf.keras.optimizers.Optimizer,
    strategy: tf.distribute.Strategy | None = None,
):
    """One compiled optimisation step (heads a run does not use get no gradient: skipped).

    Under a ``strategy`` each replica's loss is divided by the number of replicas before its
    gradient is taken: the optimizer sums the replicas' gradients (all-reduce), so the update is
    the gradient of the mean loss over the global batch. The step returns that mean.
    """
    replicas = strategy.num_replicas_in_sync if strategy is not None else 1

    def step(batch: dict[str, tf.Tensor]) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = model.compute_loss(batch, training=True)
            scaled = loss / replicas if replicas > 1 else loss
        variables = model.trainable_variables
        grads = tape.gradient(scaled, variables)
        optimizer.apply_gradients(
            [(g, v) for g, v in zip(grads, variables, strict=True) if g is not None]
        )
        return loss

    if strategy is None:
        return tf.function(step, reduce_retracing=True)

    @tf.function(reduce_retracing=True)
    def train_step(batch: dict[str, tf.Tensor]) -> tf.Tensor:
        per_replica = strategy.run(step, args=(batch,))
        return strategy.reduce(tf.distribute.ReduceOp.MEAN, per_replica, axis=None)

    return train_step


# Rows of layer-1 states per all-gather of a group's validation (64 MB of 128-wide states).
GATHER_ROWS = 1 << 17


def validation_recalls(
    tower: UserTower, ctx: TrainingContext, evalset: EvalSet, cluster: Cluster | None = None
) -> np.ndarray:
    """Per validation query, its Recall@50 over every user as a candidate: early stopping reads
    their mean, `tune` compares trials by them user for user. A group of workers shares the
    work (``group_topk``) and each gets the same figures."""
    if cluster is None or cluster.size == 1:
        emb = embed_all(tower, ctx.table, ctx.spec.fanout)
        topk = topk_from_embeddings(emb, evalset, k=50, queries=tower.query_form(emb))
    else:
        topk = group_topk(tower, ctx, evalset, cluster, k=50)
    return per_user_metrics(topk, evalset, ks=(50,), ndcg_k=50)["recall@50"]


def best_validation_recalls(result: TrainResult, evalset: EvalSet) -> np.ndarray | None:
    """The run's best epoch's Recall@50 per query of ``evalset``, as training saved it; None
    where it did not (runs from before it was saved, or another epoch's or query set's)."""
    path = Path(result.model_dir) / "best" / BEST_RECALLS_FILE
    if not path.exists():
        return None
    with np.load(path) as saved:
        recalls, epoch, queries = saved["recalls"], int(saved["epoch"]), saved["queries"]
    if epoch != result.best_epoch or not np.array_equal(queries, evalset.queries):
        return None
    return recalls


def group_topk(
    tower: UserTower, ctx: TrainingContext, evalset: EvalSet, cluster: Cluster, k: int
) -> np.ndarray:
    """``topk_from_embeddings`` of ``embed_all``, split over the group's workers: each computes
    the layer-1 states of its range of users, the group all-gathers them (every readout needs
    its friends' states), then each scores every query against its own range of candidates and
    the group merges the lists (the same lists, tested). The chief validating alone on one
    intra-op thread of two shared cores while the other worker waited took 26 s of a 1M-user
    group's capped epoch, against 17 s in one process (docs/scaling.md)."""
    started = time.perf_counter()
    n, fanout = len(ctx.table), ctx.spec.fanout
    chunk = -(-n // cluster.size)
    start, stop = min(n, cluster.index * chunk), min(n, (cluster.index + 1) * chunk)
    width = tower.layer1.units
    # An empty range (fewer users than workers x chunk) still takes part, with zero rows.
    mine = layer1_states(tower, ctx.table, start, stop) if stop > start else np.zeros((0, width))
    states = np.empty((cluster.size * chunk, width), np.float32)
    for lo in range(0, chunk, GATHER_ROWS):  # in blocks: the collective's buffers stay small
        hi = min(lo + GATHER_ROWS, chunk)
        block = np.zeros((hi - lo, width), np.float32)
        block[: len(mine[lo:hi])] = mine[lo:hi]
        gathered = cluster.all_gather(block).reshape(cluster.size, hi - lo, width)
        for worker in range(cluster.size):
            states[worker * chunk + lo : worker * chunk + hi] = gathered[worker]
    del mine
    states = states[:n]
    # One readout for this worker's candidates and every query.
    rows = np.concatenate([np.arange(start, stop), evalset.queries])
    vectors = readout_rows(tower, ctx.table, states, rows, fanout)
    del states
    candidates, queries = vectors[: stop - start], tower.query_form(vectors[stop - start :])
    users, scores = blocked_topk(evalset, k, queries, candidates, first_user=start)
    q = evalset.num_queries
    users = cluster.all_gather(users).reshape(cluster.size, q, k)
    scores = cluster.all_gather(scores).reshape(cluster.size, q, k)
    log.info(
        "embedding top-%d for %d queries in %.2fs (worker %d of %d: users %d..%d)",
        k,
        q,
        time.perf_counter() - started,
        cluster.index,
        cluster.size,
        start,
        stop - 1,
    )
    return merge_topk(list(users), list(scores), k)


def train(
    ctx: TrainingContext,
    cfg: TrainingSettings | None = None,
    show_progress: bool = True,
    cluster: Cluster | None = None,
) -> tuple[TrainResult, UserTower]:
    """Train one model; resumes from the run folder's checkpoint when one exists.

    With a ``cluster`` this process is one worker of a data-parallel group: it trains on its
    shard of every global batch, and only the chief writes the run folder (the others save their
    checkpoints to a private temporary folder: saving may run collective ops, so every worker
    must take part). Without one, training is exactly the single-process loop.
    """
    cfg = cfg or ctx.settings.training
    if cluster is not None and cluster.size != cfg.workers:
        raise ValueError(f"a group of {cluster.size} workers for settings of {cfg.workers}")
    chief = cluster is None or cluster.is_chief
    model_dir = ctx.settings.workdir / "models" / ctx.paths.slug / run_name(cfg)
    write_dir = model_dir
    if chief:
        model_dir.mkdir(parents=True, exist_ok=True)
        (model_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    else:
        write_dir = Path(tempfile.mkdtemp(prefix=f"friendrec-worker{cluster.index}-"))
    try:
        return _train(ctx, cfg, show_progress, cluster, model_dir, write_dir)
    finally:
        if write_dir != model_dir:
            shutil.rmtree(write_dir, ignore_errors=True)


def _train(
    ctx: TrainingContext,
    cfg: TrainingSettings,
    show_progress: bool,
    cluster: Cluster | None,
    model_dir: Path,
    write_dir: Path,
) -> tuple[TrainResult, UserTower]:
    chief = cluster is None or cluster.is_chief
    shard, shards = (cluster.index, cluster.size) if cluster else (0, 1)
    with cluster.strategy.scope() if cluster else contextlib.nullcontext():
        tower = ctx.build_tower(cfg)
        model = SSMTLModel(tower, loss_config(cfg), seed=cfg.seed + 7919 * shard)
        optimizer = make_optimizer(cfg.learning_rate)
    sampler = make_sampler(ctx, cfg, shard, shards)
    # Every worker of a group takes part in validation (``group_topk``).
    evalset = EvalSet.from_prepared(ctx.data, "val", max_queries=cfg.val_max_users, seed=cfg.seed)

    epoch_var = tf.Variable(0, dtype=tf.int64)
    best_var = tf.Variable(-1.0, dtype=tf.float64)
    best_epoch_var = tf.Variable(0, dtype=tf.int64)
    checkpoint = tf.train.Checkpoint(
        model=model, optimizer=optimizer, epoch=epoch_var, best=best_var, best_epoch=best_epoch_var
    )
    latest = tf.train.CheckpointManager(checkpoint, write_dir / "ckpt", max_to_keep=1)
    best_weights = tf.train.Checkpoint(tower=tower)
    history_path = model_dir / "history.json"
    history: list[dict[str, float]] = []
    # Every worker resumes from the chief's checkpoint (non-chief workers write theirs elsewhere).
    resume_from = tf.train.latest_checkpoint(str(model_dir / "ckpt"))
    if resume_from:
        checkpoint.restore(resume_from)
        done = int(epoch_var.numpy())
        history = json.loads(history_path.read_text()) if history_path.exists() else []
        # The history is written before the checkpoint: a run cut off between the two has rows
        # of an epoch it will train again.
        history = [h for h in history if h["epoch"] <= done]
        sampler.restart(done)
        log.info("resumed %s at epoch %d", model_dir.name, done)

    train_step = make_train_step(model, optimizer, cluster.strategy if cluster else None)

    steps = sampler.steps_per_epoch
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    step_times: list[float] = []
    examples, train_seconds = 0, 0.0
    stale = sum(1 for h in history if h["epoch"] > int(best_epoch_var.numpy()))
    while int(epoch_var.numpy()) < cfg.epochs and stale < cfg.patience:
        epoch = int(epoch_var.numpy()) + 1
        for tracker in model.loss_trackers.values():
            tracker.reset_state()
        bar = tqdm(
            total=steps,
            desc=f"{cfg.objective} epoch {epoch}",
            disable=progress_disabled(show_progress and chief),
        )
        epoch_started = time.perf_counter()
        for i, batch in enumerate(sampler.dataset()):
            if i >= steps:
                break
            started = time.perf_counter()
            loss = train_step(batch)
            if i >= 2:  # skip tracing
                step_times.append(time.perf_counter() - started)
            bar.update(1)
            if cluster is None:
                bar.set_postfix(
                    loss=f"{float(loss):.3f}",
                    **{k: f"{float(m.result()):.3f}" for k, m in model.loss_trackers.items()},
                )
            else:  # a tracker's result is a collective: read them once an epoch, everywhere
                bar.set_postfix(loss=f"{float(loss):.3f}")
        bar.close()
        train_seconds += time.perf_counter() - epoch_started
        examples += min(i + 1, steps) * cfg.batch_size * shards
        # The same figure on every worker of a group: early stopping agrees everywhere.
        recalls = validation_recalls(tower, ctx, evalset, cluster)
        recall = float(recalls.mean())
        row = {"epoch": epoch, "val_recall@50": recall}
        row.update({k: float(m.result()) for k, m in model.loss_trackers.items()})
        history.append(row)
        log.info("epoch %d: %s", epoch, row)
        epoch_var.assign(epoch)
        if recall > float(best_var.numpy()):
            best_var.assign(recall)
            best_epoch_var.assign(epoch)
            best_weights.write(str(write_dir / "best" / "tower"))
            np.savez(
                write_dir / "best" / BEST_RECALLS_FILE,
                recalls=recalls,
                epoch=epoch,
                queries=evalset.queries,
            )
            stale = 0
        else:
            stale += 1
        if chief:
            history_path.write_text(json.dumps(history, indent=2))
        latest.save()

    best_weights.read(str(model_dir / "best" / "tower")).expect_partial()
    step_seconds = float(np.median(step_times)) if step_times else float("nan")
    throughput = examples / train_seconds if train_seconds else float("nan")
    previous = model_dir / RESULT_FILE
    if not step_times and previous.exists():  # nothing left to train: keep the run's timings
        earlier = json.loads(previous.read_text())
        step_seconds, throughput = earlier["step_seconds"], earlier["examples_per_second"]
    result = TrainResult(
        model_dir=model_dir,
        objective=cfg.objective,
        best_epoch=int(best_epoch_var.numpy()),
        best_val_recall50=float(best_var.numpy()),
        epochs_run=int(epoch_var.numpy()),
        examples_per_second=throughput,
        step_seconds=step_seconds,
        history=history,
    )
    if not chief:
        return result, tower
    (model_dir / RESULT_FILE).write_text(json.dumps(result.as_dict(), indent=2))
    log.info(
        "trained %s: best val Recall@50 %.4f at epoch %d, %.0f examples/s",
        cfg.objective,
        result.best_val_recall50,
        result.best_epoch,
        result.examples_per_second,
    )
    return result, tower
