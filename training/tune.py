"""`friendrec tune`: choose the training settings and the blend for one graph, on validation edges.

What works depends on the graph (docs/quality.md: CCA-SSG carries the Twitch gain, masked
reconstruction GitHub's), so the choice is a command a team runs on its own graph. A bounded,
ordered search: first the settings as they are (the defaults), then the auxiliary-loss weights
(the single-task baseline among them), then, around the best so far, the auxiliary losses on
uniformly drawn users, CCA-SSG's fixed target, the paper's feature masking in CCA-SSG's views,
the temperature, the embedding and id widths, mixed negatives and the log-Q strength. Each trial
is an ordinary training run (early stopping on validation Recall@50, cached by its settings, so a
second `tune` reuses finished trials, and a change that leaves the model as it is, none at all);
no trial starts once the time budget would be exceeded by a trial as long as the average trained
one (cached ones restore in seconds and do not count). Every trial's gain over the defaults is
reported with its paired-bootstrap 95 % CI over validation users, so a team sees how much of it
a sample of this size can resolve. The best validation Recall@50 is chosen; with
``require_significance`` a trial replaces the defaults only where that CI lies above 0 (the
best trial that clears it, else the defaults), for teams that would rather not ship a change
noise may have chosen. Not the default: on the six Twitch graphs (1-4k validation users, CIs
2.6-7.8 points wide) it kept the defaults everywhere and gave up test gains the plain choice
had (PTBR +2.3 %, FR +1.5 %, both with CIs above 0; docs/quality.md, `friendrec bench
tune-gate`). Then the blend of the chosen model with friends-of-friends is fitted on the same
edges.

Writes a settings YAML (``friendrec --config tuned.yaml train`` takes it; ``friendrec up`` serves
with its blend) and the table of what was tried (markdown and JSON beside it). Test edges are
never read.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm.auto import tqdm

from friendrec.config import TrainingSettings
from friendrec.fof import BlendRanker
from friendrec.logs import progress_disabled
from training import evaluation as ev
from training.model import LossConfig
from training.pipeline import embed_all
from training.runs import runs_dir
from training.tower import UserTower
from training.train import (
    RESULT_FILE,
    TrainingContext,
    TrainResult,
    best_validation_recalls,
    run_name,
    train,
    validation_recalls,
)

log = logging.getLogger(__name__)

# Stage 1: auxiliary weights (cca_weight, mae_weight); (0, 0) is the single-task baseline.
WEIGHTS: tuple[tuple[float, float], ...] = (
    (0.0, 0.0),
    (0.2, 1.0),
    (0.2, 0.0),
    (0.0, 1.0),
    (0.05, 0.5),
    (0.5, 1.0),
)
# Stage 2, around the best weights: one setting changed at a time, in the order they are
# worth a trial (a budget stops the list; docs/quality.md has each one's validation figures).
# The auxiliary losses on uniformly drawn users first (validation Recall@50 of SSMTL +2.5 % on FR,
# +1 % on ENGB; a no-op, skipped, when the best has no auxiliary loss); half the log-Q
# correction last: it lost 14-20 % on every graph it ran on.
NEIGHBOURS: tuple[dict[str, Any], ...] = (
    {"aux_users": "uniform"},
    # CCA-SSG's augmented view pulled towards the user's unaugmented embedding, held fixed
    # (validation, seed 0: ahead of the paper's two views on five of the six Twitch graphs).
    {"cca_target": "clean"},
    # CCA-SSG's views masking features as in the paper (off by default: the invariance then
    # erases the users' own features, and users with few friends lose; docs/quality.md).
    {"feature_drop": 0.2},
    {"temperature": 0.1},
    {"temperature": 0.03},
    {"embedding_dim": 128},
    {"id_dim": 64},
    {"uniform_negatives": 256},
    {"log_q_strength": 0.5},
)


# Resamples of the paired bootstrap (over validation users) of each trial's gain over the defaults.
BOOTSTRAP_SAMPLES = 1000


@dataclass
class Trial:
    settings: dict[str, Any]
    val_recall50: float
    best_epoch: int
    seconds: float
    run: str
    cached: bool = False  # finished before this tune: restored, not trained (seconds ~ 0)
    # Relative validation Recall@50 gain over the defaults (the first trial), paired-bootstrap
    # 95 % CI over validation users: (gain, lo, hi).
    vs_defaults: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass
class TuneResult:
    dataset: str
    best: dict[str, Any]
    val_recall50: float
    best_run: str
    blend: dict[str, Any]
    trials: list[Trial] = field(default_factory=list)
    budget_s: float = 0.0
    spent_s: float = 0.0
    # The trial with the best validation Recall@50: ``best`` unless ``require_significance``
    # kept another (its gain's CI over the defaults reached 0).
    top_run: str = ""
    require_significance: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "trials": [asdict(t) for t in self.trials]}


def _objective(cca: float, mae: float) -> str:
    return {(False, False): "baseline", (True, False): "cca", (False, True): "mae"}.get(
        (cca > 0, mae > 0), "ssmtl"
    )


def _stage1() -> Iterator[dict[str, Any]]:
    """The weight grid as settings; an objective's own default weights are left to it, so the
    trial is the same run (and run folder) as ``train --objective`` with defaults."""
    for cca, mae in WEIGHTS:
        objective = _objective(cca, mae)
        default = LossConfig.for_objective(objective)  # type: ignore[arg-type]
        if (default.cca_weight, default.mae_weight) == (cca, mae):
            yield {"objective": objective}
        else:
            yield {"objective": objective, "cca_weight": cca, "mae_weight": mae}


def tune(
    ctx: TrainingContext,
    budget_s: float,
    epochs: int | None = None,
    show_progress: bool = True,
    require_significance: bool = False,
) -> TuneResult:
    """Run trials until the budget is spent (see the module docstring): the defaults first,
    then the weight grid and the changes around its best. Return the best by validation
    Recall@50 (``require_significance``: among the defaults and the trials whose gain over them
    has a CI above 0)."""
    base = trial_base(ctx, epochs)
    started = time.perf_counter()
    trials: list[Trial] = []
    defaults: np.ndarray | None = None  # trial 1's Recall@50 per validation user
    tried: set[str] = set()
    valset = validation_set(ctx, base)
    progress = tqdm(
        total=1 + len(WEIGHTS) + len(NEIGHBOURS),
        desc="tune trials",
        disable=progress_disabled(show_progress),
    )

    def run_trial(updates: dict[str, Any]) -> bool:
        """Train one trial unless tried already or the budget is too small; False: stop."""
        nonlocal defaults
        cfg = TrainingSettings.model_validate({**base.model_dump(), **updates})
        key = run_name(cfg)  # the model's identity: a change that cannot act is no new trial
        if key in tried:
            progress.update(1)
            return True
        spent = time.perf_counter() - started
        # The next trial's likely length: the mean of those that trained (a cached one, restored
        # in seconds, would make it look short and the budget overrun by a whole trial).
        trained = [t.seconds for t in trials if not t.cached]
        mean = float(np.mean(trained)) if trained else 0.0
        if trials and spent + mean > budget_s:
            log.info("budget: %.0f of %.0f s spent, a trial takes ~%.0f s; stopping", spent,
                     budget_s, mean)  # fmt: skip
            return False
        tried.add(key)
        cached = (runs_dir(ctx) / key / RESULT_FILE).exists()
        t0 = time.perf_counter()
        result, tower = train(ctx, cfg, show_progress=False)
        recalls, vs_defaults = score_trial(result, tower, ctx, valset, defaults)
        defaults = recalls if defaults is None else defaults
        trial = Trial(
            settings=updates,
            val_recall50=float(result.best_val_recall50),
            best_epoch=int(result.best_epoch),
            seconds=time.perf_counter() - t0,
            run=result.model_dir.name,
            cached=cached,
            vs_defaults=vs_defaults,
        )
        trials.append(trial)
        log.info("trial %s: val R@50 %.4f, vs defaults %+.1f %% [%+.1f, %+.1f]", updates,
                 result.best_val_recall50, *(100 * x for x in trial.vs_defaults))  # fmt: skip
        progress.update(1)
        return True

    # The defaults first: every later trial is judged against them, and a budget of one trial
    # still returns what `friendrec train` would train.
    go = run_trial({"objective": base.objective}) and all(run_trial(u) for u in _stage1())
    if go:
        top = max(trials, key=lambda t: t.val_recall50)
        for change in NEIGHBOURS:
            if not run_trial({**top.settings, **change}):
                break
    progress.close()
    top = max(trials, key=lambda t: t.val_recall50)
    best = choose(trials, require_significance)
    if best is not top:
        log.info("validation cannot tell the best trial %s (%+.1f %% [%+.1f, %+.1f]) from the "
                 "defaults; chose %s", top.settings, *(100 * x for x in top.vs_defaults),
                 best.settings)  # fmt: skip
    chosen = TrainingSettings.model_validate({**base.model_dump(), **best.settings})
    blend = _choose_blend(ctx, chosen)
    return TuneResult(
        dataset=ctx.paths.name,
        best={**best.settings, "popularity_bias": True, "epochs": chosen.epochs},
        val_recall50=best.val_recall50,
        best_run=best.run,
        blend=blend,
        trials=trials,
        budget_s=budget_s,
        spent_s=time.perf_counter() - started,
        top_run=top.run,
        require_significance=require_significance,
    )


def trial_base(ctx: TrainingContext, epochs: int | None) -> TrainingSettings:
    """The settings every trial changes: the context's, with the popularity term (every trial
    has it) and ``epochs`` if given."""
    base = ctx.settings.training.model_copy(update={"popularity_bias": True})
    return base.model_copy(update={"epochs": epochs}) if epochs else base


def validation_set(ctx: TrainingContext, base: TrainingSettings) -> ev.EvalSet:
    """The validation queries training early-stops on (the same sample, if capped)."""
    return ev.EvalSet.from_prepared(ctx.data, "val", max_queries=base.val_max_users,
                                    seed=base.seed)  # fmt: skip


def score_trial(
    result: TrainResult,
    tower: UserTower,
    ctx: TrainingContext,
    valset: ev.EvalSet,
    defaults: np.ndarray | None,
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A trained trial's Recall@50 per validation user (as training saved it at the best epoch,
    else scored again), and its gain over ``defaults`` (the same of trial 1; None: this is
    trial 1, no gain) with the CI."""
    recalls = best_validation_recalls(result, valset)
    if recalls is None:
        recalls = validation_recalls(tower, ctx, valset)
    return recalls, (0.0, 0.0, 0.0) if defaults is None else _relative_gain(recalls, defaults)


def _relative_gain(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """(mean(a) / mean(b) - 1) with its paired-bootstrap 95 % CI over users."""
    diff, lo, hi = ev.paired_bootstrap(a, b, n_boot=BOOTSTRAP_SAMPLES)
    ref = float(np.mean(b)) or 1.0
    return diff / ref, lo / ref, hi / ref


def choose(trials: list[Trial], require_significance: bool = False) -> Trial:
    """The best trial by validation Recall@50; ``require_significance``: among the defaults
    (the first trial) and the trials whose gain over them has a CI above 0."""
    if require_significance:
        trials = [trials[0]] + [t for t in trials[1:] if t.vs_defaults[1] > 0]
    return max(trials, key=lambda t: t.val_recall50)


def _choose_blend(ctx: TrainingContext, cfg: TrainingSettings) -> dict[str, Any]:
    """The friends-of-friends blend of the chosen model, on validation edges."""
    _, tower = train(ctx, cfg, show_progress=False)  # finished: restores the best weights
    valset = ev.EvalSet.from_prepared(ctx.data, "val")
    serving = ctx.settings.serving
    fof = ev.topk_fof(valset, ctx.data.user_ids, k=serving.blend_depth, cap=serving.fof_max_friends)
    return blend_on_validation(ctx, tower, embed_all(tower, ctx.table, cfg.fanout), valset, fof)[1]


def blend_on_validation(
    ctx: TrainingContext,
    tower: UserTower,
    emb: np.ndarray,
    valset: ev.EvalSet,
    fof_val: tuple[np.ndarray, np.ndarray],
    reads_vectors: bool | None = None,
) -> tuple[BlendRanker, dict[str, Any]]:
    """A model's blend ranker, fitted on validation edges only (``emb``: its index vectors;
    ``fof_val``: ``topk_fof`` of the same eval set, as deep as the service's blend;
    ``reads_vectors``: by default ``serving.blend_reads_vectors``), and what was fitted, for
    reports."""
    serving = ctx.settings.serving
    reads = serving.blend_reads_vectors if reads_vectors is None else reads_vectors
    queries = tower.query_form(emb)
    embedding = ev.embedding_topk(emb, valset, k=serving.blend_depth, queries=queries)
    source = ev.BlendSource(valset, ctx.data.user_ids, emb, queries)
    seed = ctx.settings.training.seed
    ranker, info = ev.fit_blend(embedding, fof_val, source, seed=seed, reads_vectors=reads)
    return ranker, {
        "ranker": ranker.as_dict(),
        "chosen": info["chosen"],
        "val_recall50": info["recall@50"][info["chosen"]],
        "val_recall50_by_source": info["recall@50"],
        "by_bucket": info["by_bucket"],
    }


def write_outputs(result: TuneResult, output: Path) -> dict[str, Path]:
    """The settings YAML, and the trials as markdown and JSON beside it."""
    output.parent.mkdir(parents=True, exist_ok=True)
    settings = {
        "data": {"dataset": result.dataset},
        "training": result.best,
        "serving": {
            "blend_reads_vectors": result.blend["ranker"]["reads_vectors"],
            "blend_ranker": result.blend["ranker"],
        },
    }
    header = (
        f"# friendrec tune {result.dataset}: chosen on validation edges "
        f"(val Recall@50 {result.val_recall50:.4f}); see {output.stem}.md for every trial.\n"
    )
    # Lists of numbers in flow style: the blend ranker's weight matrices one row per line.
    output.write_text(header + yaml.safe_dump(settings, sort_keys=False, default_flow_style=None))
    lines = [
        f"# friendrec tune: {result.dataset}",
        "",
        f"Budget {result.budget_s / 60:.0f} min, spent {result.spent_s / 60:.1f} min; "
        "validation edges only.",
        "",
        "Each trial's gain over the defaults (trial 1) has its paired-bootstrap 95 % CI over "
        "validation users: a CI that reaches 0 is a gain this sample cannot tell from noise. "
        + (
            "Chosen: the best among the defaults and the trials whose CI is above 0."
            if result.require_significance
            else "Chosen: the best validation Recall@50."
        ),
        "",
        "| trial | settings | val R@50 | vs defaults [95 % CI] | best epoch | minutes |",
        "|---:|---|---:|---|---:|---:|",
    ]
    for i, t in enumerate(result.trials, start=1):
        mark = " **chosen**" if t.run == result.best_run else ""
        settings_text = ", ".join(f"{k}={v}" for k, v in t.settings.items())
        gain = "defaults" if i == 1 else "{:+.1%} [{:+.1%}, {:+.1%}]".format(*t.vs_defaults)
        lines.append(
            f"| {i} | {settings_text}{mark} | {t.val_recall50:.4f} | {gain} | {t.best_epoch} | "
            f"{'cached' if t.cached else f'{t.seconds / 60:.1f}'} |"
        )
    if result.top_run and result.top_run != result.best_run:
        lines += ["", "The best trial's gain has a CI that reaches 0: not chosen."]
    lines += [
        "",
        f"Blend with friends-of-friends (its ranker, in the settings, scored out of sample: "
        f"fitted on half of the validation users, scored on the other half): "
        f"{result.blend['chosen']}, val Recall@50 {result.blend['val_recall50']:.4f}.",
        "",
    ]
    table = output.with_suffix(".md")
    table.write_text("\n".join(lines))
    as_json = output.with_suffix(".json")
    as_json.write_text(json.dumps(result.as_dict(), indent=2, default=str))
    return {"settings": output, "table": table, "json": as_json}
