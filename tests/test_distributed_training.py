"""Data-parallel training: 2 real worker processes on loopback (MultiWorkerMirroredStrategy) on
twitch/ENGB, a worker killed and the group relaunched from the chief's checkpoint; the retrieval
loss of 2 replicas against the single-process loss on the same global batch; the pair shards."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from conftest import REPO_ROOT
from tiny_models import SMALL

import training  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from friendrec.config import Settings
from training.pipeline import PairSampler
from training.train import TrainingContext, read_run_config, run_name

TINY = SMALL.model_copy(
    update={"objective": "baseline", "max_steps_per_epoch": 3, "batch_size": 32, "seed": 11}
)


@pytest.fixture(scope="module")
def ctx(engb_store: Settings) -> TrainingContext:
    # The settings' fanout is the one validation embeds with (``ctx.spec``): TINY's.
    return TrainingContext.load(engb_store.model_copy(update={"training": TINY}), "twitch/ENGB")


def test_shards_together_are_the_global_batch(ctx):
    """Two shards of batch B see, step by step, exactly the pairs of one batch of 2B."""
    whole = PairSampler(ctx.data, ctx.table, 5, 64, seed=4, shard=0, num_shards=1)
    shards = [
        PairSampler(ctx.data, ctx.table, 5, 32, seed=4, shard=i, num_shards=2) for i in (0, 1)
    ]
    assert shards[0].steps_per_epoch == shards[1].steps_per_epoch == whole.steps_per_epoch
    # The single-process permutation is drawn from the same seed as the shards' shared one.
    order = np.random.default_rng(4).permutation(whole.num_pairs)
    batches = [next(s.epoch()) for s in shards]
    first = order[:64]
    np.testing.assert_array_equal(
        np.concatenate([b["q/self_user_id"] for b in batches]),
        ctx.table.user_ids[whole.pairs(first)[0]],
    )
    assert not np.array_equal(batches[0]["c_id"], batches[1]["c_id"])
    for epoch in (None, 3):  # resuming keeps the shards on one permutation
        for s in shards:
            s.restart(epoch)
        assert np.array_equal(
            shards[0].order_rng.permutation(9), shards[1].order_rng.permutation(9)
        )


def test_workers_are_part_of_the_run_identity_and_restarts_are_not():
    assert run_name(TINY) == run_name(TINY.model_copy(update={"workers": 1}))
    old = json.loads(TINY.model_dump_json(exclude={"workers", "max_restarts"}))
    assert run_name(TINY.model_validate(old)) == run_name(TINY)  # runs from before keep folders
    assert run_name(TINY.model_copy(update={"workers": 2})) != run_name(TINY)
    assert run_name(TINY.model_copy(update={"max_restarts": 0})) == run_name(TINY)


GLOBAL_BATCH_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import training
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from friendrec.config import TrainingSettings, load_settings
    from training.model import SSMTLModel
    from training.pipeline import PairSampler
    from training.train import TrainingContext, loss_config

    args = json.loads(sys.argv[1])
    cfg = TrainingSettings.model_validate(args["cfg"])
    ctx = TrainingContext.load(load_settings(workdir=args["workdir"]), "twitch/ENGB")
    batch = next(PairSampler(ctx.data, ctx.table, cfg.fanout, 64, seed=0).epoch())
    full = {k: tf.constant(v) for k, v in batch.items()}
    halves = [{k: tf.constant(v[i * 32 : (i + 1) * 32]) for k, v in batch.items()} for i in (0, 1)]

    def loss_and_grads(model, inputs, scale):
        with tf.GradientTape() as tape:
            loss = model.compute_loss(inputs) / scale
        variables = model.tower.trainable_variables
        grads = tape.gradient(loss, variables)
        return loss, [
            tf.zeros_like(v) if g is None else tf.convert_to_tensor(g)
            for g, v in zip(grads, variables)
        ]

    ref_tower = ctx.build_tower(cfg)
    ref = SSMTLModel(ref_tower, loss_config(cfg), seed=1)
    ref_loss, ref_grads = loss_and_grads(ref, full, 1.0)
    # Each half alone: what a replica would compute from its own in-batch negatives.
    local = float(ref.compute_loss(halves[0]))

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = SSMTLModel(ctx.build_tower(cfg), loss_config(cfg), seed=1)
    shards = strategy.experimental_distribute_values_from_function(
        lambda c: halves[c.replica_id_in_sync_group]
    )
    step = tf.function(lambda b: loss_and_grads(model, b, 2.0))
    strategy.run(step, args=(shards,))  # builds the variables
    model.tower.set_weights(ref_tower.get_weights())
    per_replica = strategy.run(step, args=(shards,))
    loss = strategy.reduce("SUM", per_replica[0], axis=None)
    grads = [strategy.reduce("SUM", g, axis=None) for g in per_replica[1]]
    print(json.dumps({
        "replicas": strategy.num_replicas_in_sync,
        "ref": float(ref_loss), "dist": float(loss), "local": local,
        "grad_max_abs_diff": max(float(tf.reduce_max(tf.abs(a - b)))
                                 for a, b in zip(grads, ref_grads)),
        "grad_max_abs": max(float(tf.reduce_max(tf.abs(b))) for b in ref_grads),
    }))
    """
)


def test_two_replicas_score_against_the_global_batch(engb_store):
    """The all-gathered retrieval loss of 2 replicas (each scaled by 1/2, summed as the
    optimizer's all-reduce does) equals the single-process loss on the concatenated batch, and
    so do the gradients: every query's negatives are the whole global batch."""
    cfg = TINY.model_copy(update={"log_q": True})
    args = json.dumps(
        {"cfg": json.loads(cfg.model_dump_json()), "workdir": str(engb_store.workdir)}
    )
    out = subprocess.run(
        [sys.executable, "-c", GLOBAL_BATCH_SCRIPT, args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["replicas"] == 2
    assert got["dist"] == pytest.approx(got["ref"], rel=1e-5)
    assert abs(got["local"] - got["ref"]) > 1e-2  # a local-only softmax would differ
    assert got["grad_max_abs_diff"] <= 1e-5 * max(1.0, got["grad_max_abs"])


def test_group_validation_in_blocks_is_one_process_validation(ctx, monkeypatch):
    """``group_topk`` (layer-1 states all-gathered in blocks, candidates scored per range and
    merged) gives ``embed_all`` + ``topk_from_embeddings``'s lists; here a group of one whose
    states travel in 7 blocks (the two-worker test below checks a group of two)."""
    import tensorflow as tf

    from training import train as train_module
    from training.evaluation import EvalSet, topk_from_embeddings
    from training.pipeline import embed_all
    from training.train import Cluster, group_topk

    tower = ctx.build_tower(TINY)
    evalset = EvalSet.from_prepared(ctx.data, "val", max_queries=300, seed=0)
    emb = embed_all(tower, ctx.table, ctx.spec.fanout)
    expected = topk_from_embeddings(emb, evalset, k=50, queries=tower.query_form(emb))
    monkeypatch.setattr(train_module, "GATHER_ROWS", len(ctx.table) // 7 + 1)
    cluster = Cluster(tf.distribute.MirroredStrategy(["/cpu:0"]), index=0, size=1)
    np.testing.assert_array_equal(group_topk(tower, ctx, evalset, cluster, k=50), expected)


def test_two_workers_train_and_resume_after_a_worker_is_killed(engb_store, ctx):
    """2 worker processes train ENGB; worker 1 is SIGKILLed once the chief checkpointed epoch 1;
    the launcher relaunches the group, which resumes at epoch >= 1 and finishes; the chief's run
    folder holds everything a single-process run's would (``friendrec export`` restores the
    tower exactly this way)."""
    from training.distributed import train_distributed
    from training.evaluation import EvalSet
    from training.runs import restore_tower
    from training.train import validation_recalls

    cfg = TINY.model_copy(update={"epochs": 2, "patience": 5, "workers": 2, "max_restarts": 2})
    settings = engb_store.model_copy(update={"training": cfg})
    model_dir = engb_store.workdir / "models" / ctx.paths.slug / run_name(cfg)
    killed: list[int] = []

    def kill_after_first_checkpoint(launch: int, procs: list[subprocess.Popen]) -> None:
        if launch != 1:
            return

        def watch() -> None:
            deadline = time.monotonic() + 150
            while time.monotonic() < deadline and procs[1].poll() is None:
                if (model_dir / "ckpt" / "checkpoint").exists():
                    procs[1].send_signal(signal.SIGKILL)
                    killed.append(procs[1].pid)
                    return
                time.sleep(0.02)

        threading.Thread(target=watch, daemon=True).start()

    started = time.monotonic()
    run = train_distributed(settings, "twitch/ENGB", on_launch=kill_after_first_checkpoint)
    elapsed = time.monotonic() - started

    assert killed, "the first checkpoint never appeared"
    assert run.launches == 2 and run.exit_codes[0][1] == -signal.SIGKILL
    assert run.exit_codes[1] == [0, 0]
    resumed = [
        int(m.group(1))
        for launch, worker, line in run.lines
        if launch == 2 and worker == 0 and (m := re.search(r"resumed \S+ at epoch (\d+)", line))
    ]
    assert resumed and resumed[0] >= 1, "the relaunched group did not resume from a checkpoint"

    result = run.result
    assert result.model_dir == model_dir and result.epochs_run == 2
    epochs = [h["epoch"] for h in json.loads((model_dir / "history.json").read_text())]
    assert epochs == [1, 2]  # nothing lost, nothing trained twice into the history
    assert [h["epoch"] for h in result.history] == epochs
    assert 0.0 < result.best_val_recall50 <= 1.0
    assert (model_dir / "best" / "tower.index").exists()
    assert read_run_config(model_dir).workers == 2
    assert not list(model_dir.glob("*worker*"))  # the other worker wrote nothing here

    tower, restored_cfg = restore_tower(ctx, model_dir)  # what `friendrec export` loads
    assert restored_cfg.workers == 2
    recall = float(validation_recalls(tower, ctx, EvalSet.from_prepared(ctx.data, "val")).mean())
    assert recall == pytest.approx(result.best_val_recall50, abs=1e-9)
    assert elapsed < 100, f"2-worker training with one restart took {elapsed:.0f}s"


def test_cli_train_workers_option_reaches_the_settings():
    from friendrec.cli.model import _training_settings

    assert _training_settings(None, None, None, None, 3).training.workers == 3
    assert _training_settings(None, None, None, None, None).training.workers == 1


def test_group_config_from_tf_config_or_an_indexed_job():
    from friendrec.errors import FriendrecError
    from training.distributed import group_config

    env = {
        "TRAIN_GROUP_PEERS": "train-0.train:2222, train-1.train:2222",
        "JOB_COMPLETION_INDEX": "1",
    }
    config = group_config(env)
    assert config == {
        "cluster": {"worker": ["train-0.train:2222", "train-1.train:2222"]},
        "task": {"type": "worker", "index": 1},
    }
    assert json.loads(env["TF_CONFIG"]) == config  # what the strategy reads
    assert group_config({"TF_CONFIG": env["TF_CONFIG"]}) == config
    bad = {
        "needs TF_CONFIG": {"JOB_COMPLETION_INDEX": "0"},
        "not a number": {"TRAIN_GROUP_PEERS": "a:1", "JOB_COMPLETION_INDEX": "x"},
        "index 2 is not in a group of 2": {
            "TRAIN_GROUP_PEERS": "a:1,b:1",
            "JOB_COMPLETION_INDEX": "2",
        },
        "not a worker group": {"TF_CONFIG": "{}"},
        "only a group of 'worker'": {
            "TF_CONFIG": json.dumps(
                {
                    "cluster": {"worker": ["a:1"], "ps": ["b:1"]},
                    "task": {"type": "worker", "index": 0},
                }
            )
        },
    }
    for message, environ in bad.items():
        with pytest.raises(FriendrecError, match=message):
            group_config(environ)


def test_workers_that_join_a_group_train_one_run(engb_store, ctx, tmp_path):
    """Two `friendrec train --join` processes, as the pods of an Indexed Job (peers and index from
    the environment, each loading its own context), train one run: the chief writes the folder
    `train --workers 2` would, with the group's size in its settings."""
    from friendrec.local_services import child_environment, free_ports

    cfg = TINY.model_copy(update={"epochs": 1, "seed": 23})
    settings = engb_store.model_copy(
        update={"training": cfg, "workdir": tmp_path / "work", "log_format": "json"}
    )
    (tmp_path / "work").mkdir()
    for name in ("data", "features", "feast"):  # the group's shared storage
        (tmp_path / "work" / name).symlink_to(engb_store.workdir / name)
    env = child_environment(settings, tmp_path / "settings.yaml")
    peers = ",".join(f"127.0.0.1:{p}" for p in free_ports(2))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "friendrec", "train", "--join", "-d", "twitch/ENGB"],
            env={**env, "TRAIN_GROUP_PEERS": peers, "JOB_COMPLETION_INDEX": str(i)},
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in (0, 1)
    ]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    model_dir = (
        tmp_path
        / "work"
        / "models"
        / ctx.paths.slug
        / run_name(cfg.model_copy(update={"workers": 2}))
    )
    result = json.loads((model_dir / "result.json").read_text())
    assert result["epochs_run"] == 1 and 0.0 < result["best_val_recall50"] <= 1.0
    assert read_run_config(model_dir).workers == 2
    assert f'"model_dir": "{model_dir}"' in outputs[0]  # the chief's result, printed
