"""Data-parallel training: `friendrec train --workers N`.

The launcher (``train_distributed``) starts N worker processes on loopback, each with a
``TF_CONFIG`` naming the whole group and its own task index, and supervises them. Each worker
(``python -m training.distributed SPEC``) builds a ``tf.distribute.MultiWorkerMirroredStrategy``
and runs ``training.train.train`` as one member of the group: it assembles its own shard of every
global batch (``PairSampler`` shards), scores its queries against the candidates of the global
batch (all-gathered: ``training.model.global_candidates``) and the optimizer all-reduces the
gradients. Task 0, the chief, writes the run folder (checkpoints, history, best weights,
result.json), laid out and named as a single-process run's (``workers`` is part of the name:
a different global batch is a different model), so ``friendrec export`` / ``evaluate`` take it
as it is.

A worker that dies (a crash, an OOM kill, a lost machine) leaves the others blocked in a
collective: the launcher then stops the whole group and starts it again on new ports, up to
``training.max_restarts`` times; the new group resumes from the chief's latest checkpoint (the
resume logic of ``train``), so at most the epoch in progress is lost.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from friendrec.config import PROJECT_ROOT, Settings, TrainingSettings
from friendrec.local_services import free_ports

if TYPE_CHECKING:
    from training.train import TrainingContext, TrainResult

log = logging.getLogger(__name__)

POLL_S = 0.2
BUFFER_ALIGN = 64  # bytes: the alignment of each shared array
STOP_GRACE_S = 5.0
# After the chief is done the others only close down; one that hangs there is stopped.
AFTER_CHIEF_S = 60.0
# TensorFlow's native start-up chatter on stderr (absl before InitializeLog): forwarded at DEBUG.
TF_NATIVE_NOISE = ("WARNING: All log messages before absl", "I0000 ", "W0000 ", "E0000 ")


@dataclass
class DistributedRun:
    """What ``train_distributed`` did: the chief's result and every launch of the group."""

    result: TrainResult
    launches: int  # 1 + restarts
    exit_codes: list[list[int]] = field(default_factory=list)  # per launch, per worker
    lines: list[tuple[int, int, str]] = field(default_factory=list)  # (launch, worker, line)


def tf_config(ports: Sequence[int], index: int) -> str:
    """The ``TF_CONFIG`` of worker ``index`` in a loopback group."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    return json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})


def blas_threads(workers_here: int) -> dict[str, str]:
    """numpy's BLAS threads per worker: the machine's cores shared out among its workers, as
    ``make_strategy`` shares TensorFlow's (set before numpy loads; a variable the caller set
    wins). Each worker's validation scores its candidates with numpy: two workers of two
    threads each on two cores made that slower than one process scoring them all."""
    threads = str(max(1, (os.cpu_count() or 1) // workers_here))
    names = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    return {name: os.environ.get(name, threads) for name in names}


class _Group:
    """One launch: N worker processes and the threads that forward their output."""

    def __init__(self, context_path: Path, workers: int, launch: int, run: DistributedRun) -> None:

        ports = free_ports(workers)
        env_base = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p
            ),
        }
        self.procs: list[subprocess.Popen] = []
        self.readers: list[threading.Thread] = []
        for index in range(workers):
            proc = subprocess.Popen(
                [sys.executable, "-m", "training.distributed", str(context_path)],
                env={
                    **env_base,
                    **blas_threads(workers),
                    "TF_CONFIG": tf_config(ports, index),
                    # At least INFO: the supervisor keeps the lines (resumes, epochs) either way.
                    "TRAINING_WORKER_LOG_LEVEL": logging.getLevelName(
                        min(log.getEffectiveLevel(), logging.INFO)
                    ),
                },
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
                start_new_session=True,  # a Ctrl-C of the launcher is handled by the launcher
            )
            self.procs.append(proc)
            reader = threading.Thread(
                target=self._forward, args=(proc, launch, index, run), daemon=True
            )
            reader.start()
            self.readers.append(reader)
        log.info(
            "launch %d: %d workers on 127.0.0.1 ports %s (pids %s)",
            launch,
            workers,
            ports,
            [p.pid for p in self.procs],
        )

    @staticmethod
    def _forward(proc: subprocess.Popen, launch: int, index: int, run: DistributedRun) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            if line:
                run.lines.append((launch, index, line))
                level = logging.DEBUG if line.startswith(TF_NATIVE_NOISE) else logging.INFO
                log.log(level, "worker %d: %s", index, line)

    def codes(self) -> list[int | None]:
        return [p.poll() for p in self.procs]

    def stop(self) -> None:
        """Kills what is still running and waits for every process and reader. Nothing is lost:
        a worker's state that matters is the chief's last checkpoint (and a worker blocked in a
        collective does not get to a SIGTERM handler anyway)."""
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait()
        for r in self.readers:
            r.join(timeout=STOP_GRACE_S)


def train_distributed(
    settings: Settings,
    dataset: str | None = None,
    workers: int | None = None,
    max_restarts: int | None = None,
    on_launch: Callable[[int, list[subprocess.Popen]], None] | None = None,
    ctx: TrainingContext | None = None,
) -> DistributedRun:
    """Train with ``workers`` processes (default: ``training.workers``), relaunching the group
    after a worker dies, at most ``max_restarts`` times (default: ``training.max_restarts``).
    ``ctx``: the dataset's training context when the caller has it loaded already (the workers
    get it with these settings); else it is loaded here.

    ``on_launch(launch, processes)`` is called after each launch (tests kill a worker with it).
    Returns the chief's result (read back from the run folder) and what happened to the group.
    """
    from friendrec.errors import FriendrecError
    from training.train import RESULT_FILE, TrainingContext, TrainResult, run_name

    updates: dict = {}
    if workers is not None:
        updates["workers"] = workers
    if max_restarts is not None:
        updates["max_restarts"] = max_restarts
    cfg = TrainingSettings.model_validate({**settings.training.model_dump(), **updates})
    settings = settings.model_copy(update={"training": cfg})
    # Loaded once here (a missing dataset or feature store fails before any worker starts) and
    # handed to the workers as a shared context: each would otherwise repeat the offline-store
    # join and hold its own copy of the feature table.
    if ctx is None:
        ctx = TrainingContext.load(settings, dataset)
    else:
        ctx = replace(ctx, settings=settings)
    model_dir = settings.workdir / "models" / ctx.paths.slug / run_name(cfg)

    run = DistributedRun(result=None, launches=0)  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory(prefix="friendrec-group-") as tmp:
        context_path = Path(tmp) / "context"
        ctx.table.friend_rows  # noqa: B018  (computed once, shared with the rest)
        dump_shared(ctx, context_path)
        del ctx  # the launcher only supervises from here
        for launch in range(1, cfg.max_restarts + 2):
            run.launches = launch
            group = _Group(context_path, cfg.workers, launch, run)
            try:
                if on_launch is not None:
                    on_launch(launch, group.procs)
                ok = _supervise(group)
            finally:
                group.stop()
            run.exit_codes.append([p.returncode for p in group.procs])
            if ok:
                break
            log.warning(
                "launch %d failed (exit codes %s)%s",
                launch,
                run.exit_codes[-1],
                "; relaunching the group" if launch <= cfg.max_restarts else "",
            )
        else:
            tail = "\n".join(line for _, _, line in run.lines[-20:])
            raise FriendrecError(
                f"data-parallel training failed {cfg.max_restarts + 1} times; last output:\n{tail}"
            )
    raw = json.loads((model_dir / RESULT_FILE).read_text())
    raw["model_dir"] = Path(raw["model_dir"])
    run.result = TrainResult(**raw)
    return run


def _supervise(group: _Group) -> bool:
    """Wait for the chief; True when it finished cleanly. A worker that exits non-zero before
    the chief is done fails the launch (the others would wait for it forever)."""
    chief_done_at = None
    while True:
        codes = group.codes()
        if any(c not in (None, 0) for c in codes):
            return codes[0] == 0
        if codes[0] == 0:
            chief_done_at = chief_done_at or time.monotonic()
            if all(c is not None for c in codes):
                return True
            if time.monotonic() - chief_done_at > AFTER_CHIEF_S:
                log.warning("the chief finished; stopping workers that did not exit")
                return True
        time.sleep(POLL_S)


# -- the worker -------------------------------------------------------------------------------
def make_strategy(workers_here: int):
    """The group's strategy (from ``TF_CONFIG``), created before any other TensorFlow op as
    MultiWorkerMirroredStrategy requires; the CPU's cores are shared out among the
    ``workers_here`` workers of this machine."""
    import tensorflow as tf

    threads = max(1, (os.cpu_count() or 1) // workers_here)
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.RING
    )
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


def dump_shared(obj: object, path: Path) -> None:
    """Pickle ``obj`` with its numpy arrays out of band, in one file beside the pickle, so that
    ``load_shared`` maps them instead of copying them: the workers of one host then share one
    copy of the feature table and the graph in the page cache (at 5M users each worker held
    its own ~8 GB, and the launcher a third; docs/scaling.md)."""
    buffers: list[pickle.PickleBuffer] = []
    payload = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    spans = []
    with (path.with_suffix(".buffers")).open("wb") as f:
        for buffer in buffers:
            raw = buffer.raw()
            f.write(b"\0" * (-f.tell() % BUFFER_ALIGN))  # aligned for any dtype
            spans.append((f.tell(), raw.nbytes))
            f.write(raw)
    path.with_suffix(".pkl").write_bytes(pickle.dumps((spans, payload)))


def load_shared(path: Path) -> Any:
    """``dump_shared``'s object, its arrays read-only views of a shared memory map."""
    spans, payload = pickle.loads(path.with_suffix(".pkl").read_bytes())
    with path.with_suffix(".buffers").open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        view = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)) if size else None
    return pickle.loads(payload, buffers=[view[o : o + n] for o, n in spans] if view else [])


def group_config(environ: MutableMapping[str, str] | None = None) -> dict[str, Any]:
    """This worker's ``TF_CONFIG``: as given, or made from ``TRAIN_GROUP_PEERS``
    (``host:port,...``, task 0 first) and ``JOB_COMPLETION_INDEX`` (what a Kubernetes Indexed
    Job gives each pod) and set in ``environ`` for the strategy to read."""
    from friendrec.errors import FriendrecError

    environ = os.environ if environ is None else environ
    if "TF_CONFIG" in environ:
        try:
            config = json.loads(environ["TF_CONFIG"])
            peers, task = config["cluster"]["worker"], config["task"]
            index = int(task["index"])
        except (ValueError, KeyError, TypeError) as exc:
            raise FriendrecError(f"TF_CONFIG is not a worker group's: {exc!r}") from exc
        if task.get("type") != "worker" or set(config["cluster"]) != {"worker"}:
            raise FriendrecError("TF_CONFIG: only a group of 'worker' tasks trains friendrec")
    else:
        raw, index_text = environ.get("TRAIN_GROUP_PEERS"), environ.get("JOB_COMPLETION_INDEX")
        if not raw or index_text is None:
            raise FriendrecError(
                "joining a training group needs TF_CONFIG, or TRAIN_GROUP_PEERS "
                "(host:port,...) and JOB_COMPLETION_INDEX (a Kubernetes Indexed Job's pod)"
            )
        peers = [p.strip() for p in raw.split(",") if p.strip()]
        try:
            index = int(index_text)
        except ValueError as exc:
            raise FriendrecError(f"JOB_COMPLETION_INDEX {index_text!r} is not a number") from exc
        config = {"cluster": {"worker": peers}, "task": {"type": "worker", "index": index}}
        environ["TF_CONFIG"] = json.dumps(config)
    if not 0 <= index < len(peers):
        raise FriendrecError(f"worker index {index} is not in a group of {len(peers)}")
    return config


def join_group(settings: Settings, dataset: str | None = None) -> TrainResult:
    """Train as one worker of the group ``group_config`` names: a pod of a group across
    machines (``infra/k8s/jobs/train-group.yaml``). Unlike ``train_distributed``'s workers it
    loads the context itself (from the shared offline store); task 0 writes the run. A dead
    peer fails the others' collectives; the orchestrator restarts the pods, which resume from
    the chief's checkpoint (the run folder must be on a volume every pod mounts)."""
    from training.train import Cluster, TrainingContext, train

    config = group_config()
    size = len(config["cluster"]["worker"])
    strategy = make_strategy(workers_here=1)  # before any other TensorFlow op
    cfg = settings.training.model_copy(update={"workers": size})
    ctx = TrainingContext.load(settings.model_copy(update={"training": cfg}), dataset)
    cluster = Cluster(strategy, int(config["task"]["index"]), strategy.num_replicas_in_sync)
    log.info("worker %d of %d: training %s", cluster.index, cluster.size, cfg.objective)
    return train(ctx, cfg, show_progress=cluster.is_chief, cluster=cluster)[0]


def worker_main(argv: Sequence[str] | None = None) -> int:
    """One worker: ``python -m training.distributed CONTEXT_PICKLE`` with ``TF_CONFIG`` set."""
    import training  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
    from friendrec.logs import setup_logging

    args = list(sys.argv[1:] if argv is None else argv)
    config = json.loads(os.environ["TF_CONFIG"])
    index = int(config["task"]["index"])
    workers = len(config["cluster"]["worker"])
    # Plain lines on stderr: the launcher forwards them, prefixed with the worker's index.
    setup_logging(os.environ.get("TRAINING_WORKER_LOG_LEVEL", "INFO"), "json")
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    # Reading a loss tracker once an epoch is a collective run eagerly: TF warns each time.
    logging.getLogger("tensorflow").addFilter(
        lambda record: "eagerly has significant overhead" not in record.getMessage()
    )
    started = time.perf_counter()
    strategy = make_strategy(workers)
    log.debug("strategy in %.1fs", time.perf_counter() - started)

    from training.train import Cluster, train

    ctx = load_shared(Path(args[0]))  # the launcher's TrainingContext, mapped read-only
    log.debug("context in %.1fs", time.perf_counter() - started)
    cfg = ctx.settings.training
    cluster = Cluster(strategy, index, strategy.num_replicas_in_sync)
    log.info("worker %d of %d: training %s", index, cluster.size, cfg.objective)
    train(ctx, cfg, show_progress=False, cluster=cluster)
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
