"""`friendrec bench quality`: baseline vs SSMTL and its ablations on every graph, several seeds.

For each dataset: prepare it and its features if needed, train every objective for every seed
(hyper-parameters from the settings, tuned on validation edges only), then score the *test* edges.
Per-user metrics are averaged over seeds before the paired bootstrap over users, so a confidence
interval reflects both user sampling and seed noise averaged out. Adamic-Adar and random are
computed once per dataset, and so is the service's friends-of-friends source (capped like the
service); every trained model is also blended with it as the service blends, the weights chosen on
validation edges. Recall@50 per training-degree bucket goes into the report too. With
``--tune-minutes``, `friendrec tune` chooses a configuration per graph (validation edges), which is
trained per seed and reported as ``tuned``. The step-time ratio compares median training step times
measured in the same process, the objectives taking turns on the same batches (ratios, because the
machine is shared and noisy).
"""

from __future__ import annotations

import json
import logging
import platform
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

import training  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from feature_repo.jobs.graph_features import build_features
from feature_repo.jobs.materialize import apply
from friendrec.config import Settings
from friendrec.data.canonical import files_present, prepare
from friendrec.paths import DatasetPaths
from training import evaluation as ev
from training.optimizer import make_optimizer
from training.pipeline import embed_all
from training.runs import KS, baseline_topks, compare_to
from training.train import TrainingContext, train
from training.tune import blend_on_validation, tune

log = logging.getLogger(__name__)
OBJECTIVES = ("baseline", "ssmtl", "cca", "mae")
TARGETS = {"all": 0.05, "cold_start": 0.02}  # relative Recall@50 gain of SSMTL over baseline


def all_datasets(settings: Settings) -> list[str]:
    """Every Twitch graph whose files are here (the shipped schema's variants), then GitHub."""
    from friendrec.schema import resolve

    variants = resolve("twitch/ENGB").schema_.variants or []
    twitch = [f"twitch/{v}" for v in variants if files_present(settings, f"twitch/{v}")]
    return [*twitch, "github"]


def ensure_features(settings: Settings, dataset: str) -> None:
    """Prepare, build and register a dataset's features unless that was done already."""
    paths = DatasetPaths.of(settings, dataset)
    if not paths.meta.exists():
        prepare(settings, dataset)
    if not paths.graph_source.exists():
        build_features(settings, dataset, show_progress=False)
    if not paths.feast_registry.exists():
        apply(settings, dataset)


def interleaved_step_times(
    ctx: TrainingContext, objectives: list[str], batches: int = 8, repeats: int = 5
) -> dict[str, float]:
    """Median seconds per training step of each objective on the same batches, the objectives
    taking turns so that load on the shared machine hits each of them alike."""
    import tensorflow as tf

    from training.model import SSMTLModel
    from training.train import aux_user_count, loss_config, make_sampler, make_train_step

    cfg0 = ctx.settings.training
    configs = [cfg0.model_copy(update={"objective": o}) for o in objectives]
    # The batches of the settings' sampler (mixed negatives, uniformly drawn auxiliary users):
    # an objective ignores the inputs it does not use.
    sampler = make_sampler(
        ctx, cfg0, aux_users=max(aux_user_count(c, loss_config(c)) for c in configs)
    )
    fixed = [
        {k: tf.constant(v) for k, v in b.items()}
        for _, b in zip(range(batches), sampler.epoch(), strict=False)
    ]
    steps = {}
    for objective, cfg in zip(objectives, configs, strict=True):
        model = SSMTLModel(ctx.build_tower(cfg), loss_config(cfg), seed=cfg.seed)
        step = make_train_step(model, make_optimizer(cfg.learning_rate))
        step(fixed[0])  # trace
        steps[objective] = step
    times: dict[str, list[float]] = {o: [] for o in objectives}
    for _ in range(repeats):
        for objective, step in steps.items():
            started = time.perf_counter()
            for batch in fixed:
                step(batch)
            times[objective].append((time.perf_counter() - started) / len(fixed))
    return {o: float(np.median(t)) for o, t in times.items()}


def evaluate_dataset(
    settings: Settings,
    dataset: str,
    seeds: list[int],
    objectives: list[str],
    epochs: int | None,
    out_dir: Path,
    tune_budget_s: float = 0.0,
    workers: int = 1,
    blend_without_reads: bool = False,
) -> dict[str, Any]:
    ensure_features(settings, dataset)
    ctx = TrainingContext.load(settings, dataset)
    variants: list[tuple[str, dict[str, Any]]] = [(o, {"objective": o}) for o in objectives]
    if workers > 1:  # data-parallel training must keep the single-process model's quality
        variants.append((workers_variant(workers), {"objective": "baseline", "workers": workers}))
    tuned = None
    if tune_budget_s > 0:  # `friendrec tune` on validation edges, then trained per seed
        tuned = tune(ctx, tune_budget_s, epochs, show_progress=False)
        variants.append(("tuned", dict(tuned.best)))
    evalset = ev.EvalSet.from_prepared(ctx.data, "test")
    # The service's friends-of-friends source, on validation (to choose the blend) and on test.
    valset = ev.EvalSet.from_prepared(ctx.data, "val")
    cap, depth = settings.serving.fof_max_friends, settings.serving.blend_depth
    deepest = max(*KS, depth)
    fof = {
        split: ev.topk_fof(es, ctx.data.user_ids, k=deepest, cap=cap)
        for split, es in (("val", valset), ("test", evalset))
    }
    blend_fof = {split: (top[:, :depth], scores[:, :depth]) for split, (top, scores) in fof.items()}
    blends: dict[bool, dict[str, list[dict[str, Any]]]] = {True: {}, False: {}}
    ceilings: dict[str, list[np.ndarray]] = {}  # per seed: union recall of the blend's two lists
    per_seed: dict[str, list[dict[str, np.ndarray]]] = {o: [] for o in objectives}
    step_seconds: dict[str, list[float]] = {o: [] for o in objectives}
    val_recall: dict[str, list[float]] = {o: [] for o in objectives}
    popularity: dict[str, list[np.ndarray]] = {o: [] for o in objectives}
    curves: dict[str, dict[str, dict[int, float]]] = {}
    for seed in seeds:
        for objective, chosen_settings in variants:
            updates: dict[str, Any] = {**chosen_settings, "seed": seed}
            if epochs:
                updates["epochs"] = epochs
            cfg = settings.training.model_copy(update=updates)
            for table in (per_seed, step_seconds, val_recall, popularity):
                table.setdefault(objective, [])
            started = time.perf_counter()
            if cfg.workers > 1:  # the worker group trains the run; ``train`` then reads it back
                from training.distributed import train_distributed

                train_distributed(settings.model_copy(update={"training": cfg}), ctx=ctx)
            result, tower = train(ctx, cfg, show_progress=False)
            emb = embed_all(tower, ctx.table, cfg.fanout)
            queries = tower.query_form(emb)
            topk, scores = ev.embedding_topk(emb, evalset, k=deepest, queries=queries)
            per_seed[objective].append(ev.per_user_metrics(topk, evalset, ks=KS))
            top = topk[:, :depth]
            embedding = (top, scores[:, :depth])
            source = ev.BlendSource(evalset, ctx.data.user_ids, emb, queries)
            # The blend as served; and beside it, where asked, the blend without vector reads.
            for reads in (None, False) if blend_without_reads else (None,):
                ranker, chosen = blend_on_validation(
                    ctx, tower, emb, valset, blend_fof["val"], reads_vectors=reads
                )
                name = blend_name(objective, reads is None)
                blended = ev.topk_blend(embedding, blend_fof["test"], source, ranker, max(KS))
                per_seed.setdefault(name, []).append(ev.per_user_metrics(blended, evalset, ks=KS))
                popularity.setdefault(name, []).append(ev.retrieved_popularity(blended, evalset))
                blends[reads is None].setdefault(objective, []).append(chosen)
            ceilings.setdefault(objective, []).append(
                ev.union_recall([top, blend_fof["test"][0]], evalset)
            )
            popularity[objective].append(ev.retrieved_popularity(topk, evalset))
            if seed == seeds[0]:  # the Recall@K plot shows the first seed's curves
                curves[objective] = ev.recall_curve(topk, evalset)
            step_seconds[objective].append(result.step_seconds)
            val_recall[objective].append(result.best_val_recall50)
            log.info(
                "%s seed %d %s: val R@50 %.4f, %.0f s",
                dataset,
                seed,
                objective,
                result.best_val_recall50,
                time.perf_counter() - started,
            )
    per_user = {
        o: {m: np.mean([run[m] for run in runs], axis=0) for m in runs[0]}
        for o, runs in per_seed.items()
    }
    fixed = baseline_topks(evalset, settings.data.seed)
    fixed[f"fof (service, cap {cap})"] = fof["test"][0]
    per_user.update({n: ev.per_user_metrics(t, evalset, ks=KS) for n, t in fixed.items()})
    retrieved = {o: np.mean(runs, axis=0) for o, runs in popularity.items()}
    retrieved.update({n: ev.retrieved_popularity(t, evalset) for n, t in fixed.items()})
    retrieved["heldout_friends"] = ev.heldout_popularity(evalset)
    results = {n: ev.summarise_slices(m, evalset) for n, m in per_user.items()}
    comparisons = compare_to(per_user, evalset, "baseline")
    curves.update({n: ev.recall_curve(t, evalset) for n, t in fixed.items()})
    by_degree = {n: ev.recall_by_degree(m, evalset) for n, m in per_user.items()}
    slug = DatasetPaths.of(settings, dataset).slug
    ev.write_report(results, curves, comparisons, out_dir / slug, by_degree)
    interleaved = interleaved_step_times(ctx, objectives)
    slices = evalset.slice_masks()
    return {
        "dataset": dataset,
        "users": ctx.data.meta.num_users,
        "test_queries": int(evalset.num_queries),
        "cold_start_queries": int(evalset.cold_start.sum()),
        "results": results,
        "comparisons": comparisons,
        "by_degree": by_degree,
        "blend_rankers": blends[True],  # per seed: the ranker, its choice, its validation recall
        "tuned": None if tuned is None else tuned.as_dict(),
        "blend_gain": blend_gains(results, [v for v, _ in variants]),
        # --blend-without-reads: the blend fitted and served without the vectors' reads
        "blend_rankers_without_reads": blends[False],
        "blend_gain_without_reads": blend_gains(results, [v for v, _ in variants], False),
        # Recall of the two lists the blend merges, all their candidates (its ceiling at any k)
        "blend_ceiling": {
            o: {name: float(np.mean(runs, axis=0)[m].mean()) for name, m in slices.items()}
            for o, runs in ceilings.items()
        },
        "seed_recall50": {
            o: [float(np.mean(run["recall@50"])) for run in runs] for o, runs in per_seed.items()
        },
        "val_recall50": val_recall,
        # mean log(1 + training degree) of the top 50 per method, and of the true held-out friends
        "popularity@50": {
            name: {m: float(np.nanmean(v[mask])) for m, v in retrieved.items()}
            for name, mask in evalset.slice_masks().items()
        },
        "train_step_seconds": {o: float(np.median(v)) for o, v in step_seconds.items()},
        "step_seconds": interleaved,
        "step_ratio_vs_baseline": {o: t / interleaved["baseline"] for o, t in interleaved.items()},
    }


def workers_variant(workers: int) -> str:
    """The report's name of the single-task model trained by ``workers`` processes
    (``train --workers``: a global batch of workers x batch_size)."""
    return f"baseline, {workers} workers"


def blend_name(objective: str, as_configured: bool = True) -> str:
    """The report's name of a model's blend: as the settings serve it, or without vector reads
    (``serving.blend_reads_vectors`` false)."""
    return f"blend ({objective})" if as_configured else f"blend without reads ({objective})"


def blend_gains(
    results: dict[str, Any], objectives: list[str], as_configured: bool = True
) -> dict[str, dict[str, float]]:
    """Relative Recall@50 of each blend (``blend_name``) over the better of its two sources,
    per slice."""
    out: dict[str, dict[str, float]] = {}
    for objective in objectives:
        blended = results.get(blend_name(objective, as_configured))
        if blended is None:
            continue
        out[objective] = {}
        for slice_name in ("all", "cold_start"):
            best = max(
                results[objective][slice_name]["recall@50"],
                results["adamic_adar"][slice_name]["recall@50"],
            )
            out[objective][slice_name] = blended[slice_name]["recall@50"] / best - 1.0
    return out


def render(report: list[dict[str, Any]]) -> Table:
    table = Table(title="Test Recall@K (mean over seeds); CI: paired bootstrap vs baseline")
    for column in (
        "dataset",
        "method",
        "R@50 all",
        "R@100 all",
        "R@50 cold",
        "R@100 cold",
        "ΔR@50 all [95% CI]",
        "ΔR@50 cold [95% CI]",
        "step x",
    ):
        table.add_column(column)
    for entry in report:
        ci = {(c["a"], c["slice"]): c for c in entry["comparisons"] if c["metric"] == "recall@50"}
        for method, slices in entry["results"].items():
            ratio = entry["step_ratio_vs_baseline"].get(method)
            table.add_row(
                entry["dataset"],
                method,
                f"{slices['all']['recall@50']:.4f}",
                f"{slices['all']['recall@100']:.4f}",
                f"{slices['cold_start']['recall@50']:.4f}",
                f"{slices['cold_start']['recall@100']:.4f}",
                _delta(entry, ci, method, "all"),
                _delta(entry, ci, method, "cold_start"),
                f"{ratio:.2f}" if ratio is not None else "",
            )
    return table


def _delta(entry: dict[str, Any], ci: dict, method: str, slice_name: str) -> str:
    """SSMTL-minus-baseline cell: absolute and relative difference with its 95% CI."""
    c = ci.get((method, slice_name))
    if not c:
        return ""
    base = entry["results"]["baseline"][slice_name]["recall@50"]
    rel = c["diff"] / base if base else float("nan")
    return f"{c['diff']:+.4f} ({rel:+.1%}) [{c['lo']:+.4f}, {c['hi']:+.4f}]"


def run_quality(
    settings: Settings,
    datasets: list[str] | None,
    seeds: list[int],
    objectives: list[str],
    epochs: int | None,
    output: Path,
    tune_budget_s: float = 0.0,
    workers: int = 1,
    blend_without_reads: bool = False,
) -> list[dict[str, Any]]:
    # Its own workdir: runs made by hand (other timings, other settings) are never reused, and an
    # interrupted benchmark resumes its finished runs.
    settings = settings.model_copy(update={"workdir": settings.workdir / "bench" / "quality"})
    datasets = datasets or all_datasets(settings)
    report = []
    for dataset in datasets:
        out_dir = output.parent / "quality"
        report.append(
            evaluate_dataset(
                settings,
                dataset,
                seeds,
                objectives,
                epochs,
                out_dir,
                tune_budget_s,
                workers,
                blend_without_reads,
            )
        )
        output.parent.mkdir(parents=True, exist_ok=True)
        payload = _payload(settings, report, seeds, epochs)
        output.write_text(json.dumps(payload, indent=2, default=float))
        Console().print(render(report))
    return report


def _payload(
    settings: Settings, report: list[dict[str, Any]], seeds: list[int], epochs: int | None
) -> dict:
    return {
        "created_at": datetime.now(UTC).isoformat(),
        "machine": {"python": platform.python_version(), "processor": platform.processor()},
        "seeds": seeds,
        "max_epochs": epochs or settings.training.epochs,
        "training": settings.training.model_dump(),
        "targets": {"relative_recall50_gain": TARGETS, "max_step_ratio": 1.5},
        "datasets": report,
    }
