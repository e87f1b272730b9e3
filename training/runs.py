"""Trained runs on disk: find them, restore their towers, evaluate them against the baselines."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from friendrec.config import TrainingSettings
from friendrec.errors import NotPreparedError
from training import evaluation as ev
from training.features import sample_neighbours, tower_inputs
from training.pipeline import embed_all
from training.tower import UserTower
from training.train import RESULT_FILE, TrainingContext, read_run_config

log = logging.getLogger(__name__)

KS = (10, 50, 100)


def runs_dir(ctx: TrainingContext) -> Path:
    return ctx.settings.workdir / "models" / ctx.paths.slug


def latest_run(ctx: TrainingContext, objective: str, seed: int | None = None) -> Path:
    """The most recently finished run of an objective (and seed) for the dataset."""
    candidates = []
    for result in runs_dir(ctx).glob(f"*/{RESULT_FILE}"):
        cfg = read_run_config(result.parent)
        if cfg.objective == objective and (seed is None or cfg.seed == seed):
            candidates.append(result)
    if not candidates:
        raise NotPreparedError(
            f"no finished {objective!r} run for {ctx.paths.name}; "
            f"run `friendrec train --objective {objective}` first"
        )
    return max(candidates, key=lambda p: p.stat().st_mtime).parent


def restore_tower(ctx: TrainingContext, run_dir: Path) -> tuple[UserTower, TrainingSettings]:
    """Rebuild a run's tower from its config and load its best weights."""
    cfg = read_run_config(run_dir)
    tower = ctx.build_tower(cfg)
    rows = np.arange(min(2, len(ctx.table)))  # one tiny call builds the variables to restore
    tower(tower_inputs(ctx.table, rows, sample_neighbours(ctx.table, rows, cfg.fanout, None)))
    tf.train.Checkpoint(tower=tower).read(str(run_dir / "best" / "tower")).expect_partial()
    return tower, cfg


def baseline_topks(evalset: ev.EvalSet, seed: int) -> dict[str, np.ndarray]:
    """The non-learned methods of the comparison table."""
    return {
        "adamic_adar": ev.topk_adamic_adar(evalset, k=max(KS)),
        "random": ev.topk_random(evalset, k=max(KS), seed=seed),
    }


def compare_to(
    per_user: dict[str, dict[str, np.ndarray]],
    evalset: ev.EvalSet,
    baseline: str,
    n_boot: int = 1000,
    metrics: tuple[str, ...] = ("recall@50", "recall@100"),
) -> list[dict[str, Any]]:
    """Paired bootstrap 95% CIs (over users) of every method minus ``baseline``, per slice."""
    comparisons: list[dict[str, Any]] = []
    if baseline not in per_user:
        return comparisons
    for name in per_user:
        if name in (baseline, "random"):
            continue
        for slice_name, mask in evalset.slice_masks().items():
            for metric in metrics:
                diff, lo, hi = ev.paired_bootstrap(
                    per_user[name][metric][mask], per_user[baseline][metric][mask], n_boot
                )
                comparisons.append(
                    {
                        "a": name,
                        "b": baseline,
                        "metric": metric,
                        "slice": slice_name,
                        "diff": diff,
                        "lo": lo,
                        "hi": hi,
                    }
                )
    return comparisons


def evaluate_runs(
    ctx: TrainingContext,
    runs: dict[str, Path],
    out_dir: Path,
    split: str = "test",
    baseline: str = "baseline",
    n_boot: int = 1000,
) -> dict[str, Any]:
    """Exact top-K of every run plus Adamic-Adar and random, metrics per slice, paired bootstrap
    CIs of each run minus ``baseline``; writes JSON, markdown and the Recall@K plot."""
    evalset = ev.EvalSet.from_prepared(ctx.data, split)
    topks: dict[str, np.ndarray] = {}
    for name, run_dir in runs.items():
        tower, cfg = restore_tower(ctx, run_dir)
        emb = embed_all(tower, ctx.table, cfg.fanout)
        topks[name] = ev.topk_from_embeddings(emb, evalset, queries=tower.query_form(emb))
    topks.update(baseline_topks(evalset, ctx.settings.data.seed))
    per_user = {name: ev.per_user_metrics(topk, evalset, ks=KS) for name, topk in topks.items()}
    results = {name: ev.summarise_slices(metrics, evalset) for name, metrics in per_user.items()}
    curves = {name: ev.recall_curve(topk, evalset) for name, topk in topks.items()}
    comparisons = compare_to(per_user, evalset, baseline, n_boot)
    by_degree = {name: ev.recall_by_degree(metrics, evalset) for name, metrics in per_user.items()}
    paths = ev.write_report(results, curves, comparisons, out_dir, by_degree)
    log.info("evaluation written to %s", {k: str(v) for k, v in paths.items()})
    return {
        "split": split,
        "runs": {k: str(v) for k, v in runs.items()},
        "results": results,
        "comparisons": comparisons,
        "by_degree": by_degree,
        "files": {k: str(v) for k, v in paths.items()},
    }


def offline_metrics_of(run_dir: Path) -> dict[str, Any]:
    """What the run knows about its own quality (for the model card)."""
    result = json.loads((run_dir / RESULT_FILE).read_text())
    metrics: dict[str, Any] = {"val_recall@50": result["best_val_recall50"]}
    for split in ("val", "test"):
        evaluation = run_dir / f"evaluation_{split}.json"
        if evaluation.exists():
            metrics[split] = json.loads(evaluation.read_text())
    return metrics
