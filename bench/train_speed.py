"""`friendrec bench train-speed`: where one training process spends its time, and what each
lever buys, in examples (training pairs) per second.

On a prepared dataset (`friendrec data prepare`, `features build`, `features apply`) with the
settings' training configuration:

- **input**: the numpy batch assembly alone (``PairSampler.epoch``), then through tf.data
  (``PairSampler.dataset``: ``from_generator`` and prefetch);
- **step**: the compiled training step alone, on the same distinct prepared batches, per model
  variant: ``reference`` (``SSMTLModel(share_states=False)``: every pass per occurrence, as
  inference computes it) and ``shared`` (the default: each distinct friend once per batch,
  pooled lookups);
- **parts**: the step taken apart, per variant (ms per batch): the friends' layer-1 states
  (forward), the whole loss (forward: + the anchors' layers 1-2, retrieval and auxiliary losses),
  the loss with its gradients, the step with the optimizer (``LazyAdam``; also the step with
  tf_keras' Adam, which updates every row of a sparse-gradient table); optionally a TensorFlow
  profile's top ops;
  whether the loss and gradients compile with ``jit_compile=True`` (XLA);
- **loop**: generator and step together as `friendrec train` runs them (an epoch's batches,
  every one new), also with train's per-step progress reads;
- **inference**: embedding every user of the table, the tower on each user's own inputs against
  ``embed_all`` (layer by layer), in users per second;
- **processes**: the shared loop in a fresh process per setting that must be made before
  TensorFlow starts: op-thread pools (intra / inter) and XLA auto-clustering.

The machine is shared and noisy: every measurement is made ``repeats`` times, interleaved with
the others, and reported as the median and as the median ratio to the reference (or to the
default process) measured in the same round.
"""

from __future__ import annotations

import collections
import glob
import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

import training  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from friendrec.config import Settings, TrainingSettings

log = logging.getLogger(__name__)

MODEL_VARIANTS = {"reference": False, "shared": True}  # name -> SSMTLModel(share_states=)
INFERENCE_BATCH = 2048  # users per call of the per-user tower (embed_all's former batch)


@dataclass(frozen=True)
class ProcessVariant:
    """A training loop in a fresh process: settings TensorFlow reads only when it starts."""

    name: str
    share_states: bool = True
    intra_op_threads: int = 0  # 0: TensorFlow's default (one per core)
    inter_op_threads: int = 0
    xla_auto_jit: bool = False  # TF_XLA_FLAGS auto-clustering, CPU included

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.xla_auto_jit:
            env["TF_XLA_FLAGS"] = "--tf_xla_auto_jit=2 --tf_xla_cpu_global_jit"
        return env


DEFAULT_PROCESSES = (
    ProcessVariant("default threads"),
    ProcessVariant("intra 1, inter 1", intra_op_threads=1, inter_op_threads=1),
    ProcessVariant("intra 1, inter 2", intra_op_threads=1, inter_op_threads=2),
    ProcessVariant("intra 2, inter 1", intra_op_threads=2, inter_op_threads=1),
    ProcessVariant("XLA auto-clustering, reference", share_states=False, xla_auto_jit=True),
    ProcessVariant("XLA auto-clustering, shared", xla_auto_jit=True),
)


@dataclass(frozen=True)
class TrainSpeedConfig:
    dataset: str = "twitch/ENGB"
    objective: str | None = None  # None: the settings'
    batches: int = 20  # per measurement
    repeats: int = 3  # interleaved rounds
    warmup: int = 3  # untimed steps of a fresh step function (tracing)
    processes: tuple[ProcessVariant, ...] = DEFAULT_PROCESSES
    profile: bool = False  # a TensorFlow profile of each variant's step: its top ops


# -- measuring -----------------------------------------------------------------------------------
def _timed(calls: Iterable[Any], count: int, batch_size: int) -> float:
    """Examples per second over ``count`` items of ``calls`` (an iterator doing the work)."""
    started = time.perf_counter()
    done = 0
    for _ in calls:
        done += 1
        if done >= count:
            break
    return done * batch_size / (time.perf_counter() - started)


def _cycle(batches: list[Any], count: int) -> Iterator[Any]:
    for i in range(count):
        yield batches[i % len(batches)]


def _training_config(settings: Settings, cfg: TrainSpeedConfig) -> TrainingSettings:
    """The settings' training configuration, with the benchmark's objective."""
    if not cfg.objective:
        return settings.training
    return settings.training.model_copy(update={"objective": cfg.objective})


def _load(settings: Settings, cfg: TrainSpeedConfig):
    """The training context and a sampler of the training configuration (seed 0)."""
    from training.pipeline import PairSampler
    from training.train import TrainingContext

    ctx = TrainingContext.load(settings, cfg.dataset)
    train_cfg = _training_config(settings, cfg)
    sampler = PairSampler(ctx.data, ctx.table, train_cfg.fanout, train_cfg.batch_size, seed=0)
    return ctx, train_cfg, sampler


def _model(ctx, train_cfg: TrainingSettings, share_states: bool):
    from training.model import SSMTLModel
    from training.optimizer import make_optimizer
    from training.train import loss_config

    model = SSMTLModel(
        ctx.build_tower(train_cfg), loss_config(train_cfg), seed=0, share_states=share_states
    )
    return model, make_optimizer(train_cfg.learning_rate)


def _part_functions(model, optimizer) -> dict[str, Callable]:
    """The step and its prefixes, compiled: friends' layer 1, loss, loss + gradients, step."""
    import tensorflow as tf

    from training.model import split_inputs
    from training.train import make_train_step

    tower = model.tower

    @tf.function(reduce_retracing=True)
    def friends(batch):
        sides = [split_inputs(batch, "q/"), split_inputs(batch, "c/")]
        if model.share_states:
            states = tower.shared_friend_states(sides, training=True)
        else:
            states = [tower.friend_states(side, training=True) for side in sides]
        return tf.add_n([tf.reduce_sum(s) for s in states])

    @tf.function(reduce_retracing=True)
    def loss(batch):
        return model.compute_loss(batch, training=True)

    @tf.function(reduce_retracing=True)
    def gradients(batch):
        with tf.GradientTape() as tape:
            value = model.compute_loss(batch, training=True)
        grads = tape.gradient(value, model.trainable_variables)
        return value, [g for g in grads if g is not None]  # returned: never pruned

    return {
        "friends_layer1": friends,
        "loss": loss,
        "loss_and_gradients": gradients,
        "step": make_train_step(model, optimizer),
    }


def _jit_compile(model, batch) -> str:
    """Whether the loss and gradients compile with ``jit_compile=True`` (XLA): "ok", or the op
    XLA refused (the tower's id hash table; the shared path's dynamic shapes)."""
    import tensorflow as tf

    @tf.function(jit_compile=True)
    def gradients(batch):
        with tf.GradientTape() as tape:
            value = model.compute_loss(batch, training=True)
        grads = tape.gradient(value, model.trainable_variables)
        return value, [g for g in grads if g is not None]

    try:
        gradients(batch)
    except Exception as exc:  # XLA's refusal is an InvalidArgumentError naming the op
        refused = re.search(r"on XLA_\w+: (\w+)", str(exc))
        return "not compilable: " + (refused.group(1) if refused else type(exc).__name__)
    return "ok"


def _inference_timers(ctx, train_cfg: TrainingSettings) -> dict[str, Callable[[], float]]:
    """Users/s of embedding every user of the table: the tower on each user's own inputs (each
    friend's layer 1 recomputed for every user that samples it) and ``embed_all`` (layer by
    layer, each user's layer 1 once)."""
    import numpy as np

    from training.features import sample_neighbours, tower_inputs
    from training.pipeline import embed_all

    tower = ctx.build_tower(train_cfg)
    table, fanout, n = ctx.table, train_cfg.fanout, len(ctx.table)

    def per_user() -> float:
        started = time.perf_counter()
        for lo in range(0, n, INFERENCE_BATCH):
            rows = np.arange(lo, min(lo + INFERENCE_BATCH, n))
            tower(tower_inputs(table, rows, sample_neighbours(table, rows, fanout, None)))
        return n / (time.perf_counter() - started)

    def layered() -> float:
        started = time.perf_counter()
        embed_all(tower, table, fanout)
        return n / (time.perf_counter() - started)

    return {"per-user tower": per_user, "layer by layer": layered}


def _warm(fn: Callable, batches: list[Any], warmup: int) -> None:
    for batch in _cycle(batches, warmup):
        fn(batch)


def _loop(sampler, step, count: int, warmup: int, progress_of=None) -> float:
    """The training loop over one epoch stream (every batch new): examples/s after ``warmup``
    untimed steps (at least the pipeline's start). ``progress_of``: the model whose loss
    trackers are read every step, as `friendrec train` does for its progress bar."""
    dataset = iter(sampler.dataset())
    for _ in range(max(warmup, 1)):
        step(next(dataset))

    def steps() -> Iterator[None]:
        for batch in dataset:
            loss = step(batch)
            if progress_of is not None:
                _ = f"{float(loss):.3f}"
                _ = {k: f"{float(m.result()):.3f}" for k, m in progress_of.loss_trackers.items()}
            yield None

    return _timed(steps(), count, sampler.batch_size)


def _top_ops(step: Callable, batches: list[Any], top: int = 12) -> list[dict[str, Any]]:
    """The step's most expensive TensorFlow ops (ms per step, summed over threads), from a
    profile of one pass over ``batches``; empty where the profiler's protos are unavailable."""
    import tensorflow as tf

    try:
        from tensorflow.tsl.profiler.protobuf import xplane_pb2
    except ImportError:  # an internal module: not every build has it
        return []
    with tempfile.TemporaryDirectory(prefix="friendrec-train-speed-") as logdir:
        tf.profiler.experimental.start(logdir)
        for batch in batches:
            step(batch)
        tf.profiler.experimental.stop()
        paths = sorted(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True))
        if not paths:
            return []
        space = xplane_pb2.XSpace()
        space.ParseFromString(Path(paths[-1]).read_bytes())
    totals: collections.Counter[str] = collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if ":" in name.replace("::", ""):  # "name:OpType": a kernel, not a frame
                    totals[name] += event.duration_ps / 1e9
    return [
        {"op": name, "ms_per_step": round(ms / len(batches), 2)}
        for name, ms in totals.most_common(top)
    ]


def _process_variant(settings: Settings, cfg: TrainSpeedConfig, variant: ProcessVariant) -> float:
    """``variant``'s shared loop in a fresh process: examples/s (nan where it failed)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(
            {
                "settings": json.loads(settings.model_dump_json()),
                "config": {"dataset": cfg.dataset, "objective": cfg.objective},
                "batches": cfg.batches,
                "warmup": cfg.warmup,
                "variant": asdict(variant),
            },
            handle,
        )
    try:
        out = subprocess.run(
            [sys.executable, "-m", "bench.train_speed", handle.name],
            env=variant.env(),
            capture_output=True,
            text=True,
            timeout=1800,
        )
    finally:
        os.unlink(handle.name)
    if out.returncode != 0:
        log.error("%s failed: %s", variant.name, out.stderr[-2000:])
        return float("nan")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["examples_per_s"])


def process_main(path: str) -> None:
    """The child of ``_process_variant``: thread settings first, then the loop."""
    args = json.loads(Path(path).read_text())
    variant = ProcessVariant(**args["variant"])
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(variant.intra_op_threads)
    tf.config.threading.set_inter_op_parallelism_threads(variant.inter_op_threads)
    settings = Settings.model_validate(args["settings"])
    cfg = TrainSpeedConfig(**args["config"])
    ctx, train_cfg, sampler = _load(settings, cfg)
    model, optimizer = _model(ctx, train_cfg, variant.share_states)
    from training.train import make_train_step

    rate = _loop(sampler, make_train_step(model, optimizer), args["batches"], args["warmup"])
    print(json.dumps({"examples_per_s": rate}))


# -- the benchmark -------------------------------------------------------------------------------
def run(settings: Settings, cfg: TrainSpeedConfig, output: Path) -> dict[str, Any]:
    import tensorflow as tf

    from training.train import make_train_step

    ctx, train_cfg, sampler = _load(settings, cfg)
    batch_size = train_cfg.batch_size
    epoch = sampler.epoch()
    batches = [{k: tf.constant(v) for k, v in next(epoch).items()} for _ in range(cfg.batches)]
    models = {name: _model(ctx, train_cfg, share) for name, share in MODEL_VARIANTS.items()}
    parts = {name: _part_functions(*pair) for name, pair in models.items()}
    steps = {name: make_train_step(*pair) for name, pair in models.items()}
    # The optimizer lever: tf_keras' Adam updates every row of a sparse-gradient table each step.
    shared_model = models["shared"][0]
    dense_adam = tf.keras.optimizers.Adam(train_cfg.learning_rate)
    dense_adam_step = make_train_step(shared_model, dense_adam)
    for name in models:
        for fn in (*parts[name].values(), steps[name]):
            _warm(fn, batches, cfg.warmup)
    _warm(dense_adam_step, batches, cfg.warmup)

    jit = {name: _jit_compile(model, batches[0]) for name, (model, _) in models.items()}
    for name, outcome in jit.items():
        log.info("jit_compile=True, %s: %s", name, outcome)
    inference = _inference_timers(ctx, train_cfg)
    samples: dict[str, list[float]] = collections.defaultdict(list)
    for round_ in range(cfg.repeats):
        log.info("round %d of %d", round_ + 1, cfg.repeats)
        for name, timer in inference.items():
            samples[f"inference/{name}"].append(timer())
        samples["input/generator"].append(_timed(sampler.epoch(), cfg.batches, batch_size))
        dataset = iter(sampler.dataset())
        next(dataset)  # the pipeline's start is not a per-batch cost
        samples["input/tf.data"].append(_timed(dataset, cfg.batches, batch_size))
        for name, fns in parts.items():
            for part, fn in fns.items():
                rate = _timed(map(fn, batches), cfg.batches, batch_size)
                samples[f"parts/{name}/{part}"].append(rate)
        rate = _timed(map(dense_adam_step, batches), cfg.batches, batch_size)
        samples["parts/shared/step with tf_keras Adam"].append(rate)
        for name, step in steps.items():
            samples[f"loop/{name}"].append(_loop(sampler, step, cfg.batches, 1))
        model = models["shared"][0]
        samples["loop/shared+progress"].append(
            _loop(sampler, steps["shared"], cfg.batches, 1, progress_of=model)
        )
        for variant in cfg.processes:
            log.info("process: %s", variant.name)
            samples[f"process/{variant.name}"].append(_process_variant(settings, cfg, variant))

    def median(key: str) -> float:
        return statistics.median(samples[key])

    def ratio(key: str, base: str) -> float:
        return statistics.median(a / b for a, b in zip(samples[key], samples[base], strict=True))

    trained = [key for key in samples if not key.startswith("inference/")]
    ms = {key: 1000 * batch_size / median(key) for key in trained}
    breakdown = {}
    for name in models:
        p = f"parts/{name}/"
        breakdown[name] = {
            "friends_layer1_forward_ms": ms[p + "friends_layer1"],
            "rest_of_forward_ms": ms[p + "loss"] - ms[p + "friends_layer1"],
            "backward_ms": ms[p + "loss_and_gradients"] - ms[p + "loss"],
            "optimizer_ms": ms[p + "step"] - ms[p + "loss_and_gradients"],
            "step_ms": ms[p + "step"],
        }
    levers = [
        ("step alone, reference (per occurrence)", "parts/reference/step", "parts/reference/step"),
        ("step alone, shared (default)", "parts/shared/step", "parts/reference/step"),
        (
            "step alone, shared, tf_keras Adam (every row each step)",
            "parts/shared/step with tf_keras Adam",
            "parts/shared/step",
        ),
        ("loop (generator + step), reference", "loop/reference", "loop/reference"),
        ("loop (generator + step), shared", "loop/shared", "loop/reference"),
        ("loop, shared, train's progress reads", "loop/shared+progress", "loop/shared"),
    ]
    processes = [v.name for v in cfg.processes]
    if processes:
        base = f"process/{processes[0]}"
        levers += [(f"process: {name}", f"process/{name}", base) for name in processes]
    result: dict[str, Any] = {
        "benchmark": "train-speed",
        "command": (
            f"friendrec bench train-speed --dataset {cfg.dataset} --batches {cfg.batches} "
            f"--repeats {cfg.repeats}"
            + (f" --objective {cfg.objective}" if cfg.objective else "")
            + ("" if processes else " --no-processes")
        ),
        "host": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "load_average": os.getloadavg(),
        },
        "training": {
            k: getattr(train_cfg, k)
            for k in ("objective", "batch_size", "fanout", "hidden_dim", "embedding_dim")
        },
        "users": len(ctx.table),
        "examples_per_s": {key: round(median(key), 1) for key in trained},
        "samples": {key: [round(v, 1) for v in values] for key, values in samples.items()},
        # Every user's index vector (users/s): the tower on each user's inputs vs embed_all.
        "inference_users_per_s": {
            name: round(median(f"inference/{name}"), 1) for name in inference
        },
        "inference_ratio": round(ratio("inference/layer by layer", "inference/per-user tower"), 2),
        "ms_per_batch": {key: round(v, 2) for key, v in ms.items()},
        "breakdown_ms": {n: {k: round(v, 2) for k, v in b.items()} for n, b in breakdown.items()},
        "jit_compile": jit,
        "levers": [
            {
                "lever": label,
                "examples_per_s": round(median(key), 1),
                "ratio": round(ratio(key, base), 3),
                "ratio_to": base,
            }
            for label, key, base in levers
        ],
    }
    if cfg.profile:
        result["top_ops"] = {name: _top_ops(step, batches) for name, step in steps.items()}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print_tables(result)
    return result


def print_tables(result: dict[str, Any]) -> None:
    console = Console(width=140)
    names = list(result["breakdown_ms"])
    table = Table(title=f"Where the time goes: ms per batch of {result['training']['batch_size']}")
    table.add_column("part")
    for name in names:
        table.add_column(name, justify="right")
    input_ms = {k: v for k, v in result["ms_per_batch"].items() if k.startswith("input/")}
    for key, value in input_ms.items():
        table.add_row(key.split("/", 1)[1] + " (no model)", *[f"{value:.1f}"] * len(names))
    for part in next(iter(result["breakdown_ms"].values())):
        table.add_row(part, *(f"{result['breakdown_ms'][n][part]:.1f}" for n in names))
    console.print(table)
    levers = Table(title="Levers: examples/s (median of rounds), ratio in the same rounds")
    for column in ("lever", "examples/s", "ratio", "to"):
        levers.add_column(column, justify="left" if column in ("lever", "to") else "right")
    for row in result["levers"]:
        levers.add_row(
            row["lever"], f"{row['examples_per_s']:,.0f}", f"{row['ratio']:.2f}", row["ratio_to"]
        )
    console.print(levers)
    if result.get("inference_users_per_s"):
        rates = result["inference_users_per_s"]
        console.print(
            "embedding every user (users/s): "
            + ", ".join(f"{name} {rate:,.0f}" for name, rate in rates.items())
            + f"; layer by layer / per-user {result['inference_ratio']:.2f}x in the same rounds"
        )
    for name, outcome in result.get("jit_compile", {}).items():
        console.print(f"loss + gradients with jit_compile=True (XLA), {name}: {outcome}")
    if result.get("top_ops"):
        for name, ops in result["top_ops"].items():
            top = Table(title=f"Top ops of a {name} step (ms per step, summed over threads)")
            top.add_column("op")
            top.add_column("ms", justify="right")
            for op in ops:
                top.add_row(op["op"], f"{op['ms_per_step']:.1f}")
            console.print(top)


if __name__ == "__main__":
    process_main(sys.argv[1])
