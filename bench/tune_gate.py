"""`friendrec bench tune-gate`: `tune --require-significance` replayed on the trials a `bench
quality --tune-minutes` run made, and what it would have meant on test.

For each graph of the source JSON: every trial it records, restored from `bench quality`'s
runs (all cached: nothing trains), with its Recall@50 per validation user (as training saved
it at the best epoch; scored again for runs from before that); its gain over the defaults with
the paired-bootstrap CI, as `tune` computes it; the trial the rule chooses (``tune.choose``)
against the one the best validation mean chose. Where the rule keeps the defaults, their test
figures are the source's ``ssmtl`` rows (the same runs, 3 seeds): the table says what the gate
would have changed on test without training anything. Validation chooses; test only reports.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

import training  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from bench.quality_summary import GraphResult
from friendrec.config import Settings, TrainingSettings
from friendrec.errors import FriendrecError
from training.runs import runs_dir
from training.train import RESULT_FILE, TrainingContext, run_name, train
from training.tune import Trial, choose, score_trial, trial_base, validation_set

log = logging.getLogger(__name__)


def _test_gain(result: GraphResult, method: str, slice_name: str) -> dict[str, float] | None:
    """``method`` against the single-task model on test, relative, from the source's paired
    bootstrap (None: the source has no such comparison)."""
    c = result.comparison(method, slice_name)
    return None if c is None else {"diff": c["rel"], "lo": c["rel_lo"], "hi": c["rel_hi"]}


def replay(settings: Settings, entry: dict[str, Any], epochs: int | None) -> dict[str, Any]:
    """One graph: its trials re-scored, the rule's choice and the test figures of both
    (``epochs``: the source's ``max_epochs``, as `bench quality` passed it to `tune`)."""
    ctx = TrainingContext.load(settings, entry["dataset"])
    base = trial_base(ctx, epochs)
    valset = validation_set(ctx, base)
    trials: list[Trial] = []
    defaults: np.ndarray | None = None
    recorded = [t["settings"] for t in entry["tuned"]["trials"]]
    for settings_of in [{"objective": base.objective}, *recorded]:  # the defaults first
        cfg = TrainingSettings.model_validate({**base.model_dump(), **settings_of})
        if not (runs_dir(ctx) / run_name(cfg) / RESULT_FILE).exists():
            raise FriendrecError(
                f"{entry['dataset']}: the run of trial {settings_of} is not in {runs_dir(ctx)}; "
                "run tune-gate with the FRIENDREC_WORKDIR (and settings) `bench quality` had"
            )  # nothing trains here: a replay restores, it does not redo the search
        result, tower = train(ctx, cfg, show_progress=False)
        if trials and result.model_dir.name == trials[0].run:
            continue  # the defaults, already first
        recalls, vs_defaults = score_trial(result, tower, ctx, valset, defaults)
        defaults = recalls if defaults is None else defaults
        trials.append(
            Trial(
                settings=settings_of,
                val_recall50=float(recalls.mean()),
                best_epoch=int(result.best_epoch),
                seconds=0.0,
                run=result.model_dir.name,
                cached=True,
                vs_defaults=vs_defaults,
            )
        )
    top = max(trials, key=lambda t: t.val_recall50)
    gated = choose(trials, require_significance=True)
    # Test rows of the source: `tune`'s choice is "tuned" (also when it is the defaults), the
    # defaults their objective's row; any other trial was not trained with every seed.
    method = {trials[0].run: base.objective, top.run: "tuned"}
    graph = GraphResult(source=Path(), created_at="", seeds=(), targets={}, entry=entry)
    test = {
        name: {
            s: _test_gain(graph, method[t.run], s) if t.run in method else None
            for s in ("all", "cold_start")
        }
        for name, t in (("top", top), ("gated", gated))
    }
    return {
        "dataset": entry["dataset"],
        "trials": [t.__dict__ for t in trials],
        "top": top.settings,
        "top_vs_defaults": top.vs_defaults,
        "gated": gated.settings,
        "test_vs_single_task": test,
    }


def _pct(gain: dict[str, float] | None) -> str:
    if gain is None:
        return "not trained on the seeds"
    return f"{gain['diff']:+.1%} [{gain['lo']:+.1%}, {gain['hi']:+.1%}]"


def run(settings: Settings, sources: list[Path], output: Path) -> list[dict[str, Any]]:
    settings = settings.model_copy(update={"workdir": settings.workdir / "bench" / "quality"})
    report = []
    for source in sources:
        if not source.is_file():
            raise FriendrecError(f"{source}: no such `bench quality` JSON")
        try:
            payload = json.loads(source.read_text())
            entries = [(e, payload["max_epochs"]) for e in payload["datasets"] if e.get("tuned")]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise FriendrecError(f"{source}: not a `bench quality` JSON ({exc!r})") from exc
        if not entries:
            raise FriendrecError(f"{source}: no graph in it ran with --tune-minutes")
        report += [replay(settings, entry, epochs) for entry, epochs in entries]
    table = Table(title="tune's rule on recorded trials: validation chooses, test reports")
    columns = ("graph", "best trial (val)", "its val gain vs defaults", "rule's choice",
               "test, best trial: all", "test, rule: all", "test, rule: cold-start")  # fmt: skip
    for column in columns:
        table.add_column(column)
    for r in report:
        settings_text = ", ".join(f"{k}={v}" for k, v in r["gated"].items())
        top_text = ", ".join(f"{k}={v}" for k, v in r["top"].items())
        g = r["top_vs_defaults"]
        test = r["test_vs_single_task"]
        table.add_row(
            r["dataset"],
            top_text,
            f"{g[0]:+.1%} [{g[1]:+.1%}, {g[2]:+.1%}]",
            settings_text,
            _pct(test["top"]["all"]),
            _pct(test["gated"]["all"]),
            _pct(test["gated"]["cold_start"]),
        )
    Console().print(table)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2, default=float))
    return report
