"""`friendrec bench blend-learning`: is the blend's ranker short of validation users?

The ranker is fitted on validation edges, a few thousand users on the small graphs. Per graph, on
a single-task model (the `bench quality` run, trained if missing), its Recall@50 out of sample
(``training.evaluation.cross_fitted_recall``: fitted on one half of the validation users, judged
on the other) when fitted on the whole half and on half of it, and that of the shipped default
ranker (fitted on twitch/ENGB) given this graph's standardisation; each source alone beside them.
A steep step from a quarter to a half says more users would help; a default that does as well
says a graph needs no ranker of its own. Validation edges only.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

import training  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from bench.quality import ensure_features
from friendrec.config import DEFAULT_BLEND_RANKER, Settings
from friendrec.fof import BlendRanker
from training import evaluation as ev
from training.blend_ranker import fit_ranker, source_order, standardisation
from training.pipeline import embed_all
from training.train import TrainingContext, train

log = logging.getLogger(__name__)
COLUMNS = ("embedding", "fof", "ranker, a quarter", "ranker, a half", "default, restandardised")


def _standardised_on(
    ranker: BlendRanker, groups: list[tuple[np.ndarray, np.ndarray]]
) -> BlendRanker:
    """``ranker``'s weights over this graph's feature means and spreads (its inputs are model
    scores whose scale differs between models)."""
    mean, scale = standardisation(groups)
    return replace(ranker, mean=mean, scale=scale)


def measure(settings: Settings, dataset: str, seed: int, epochs: int) -> dict[str, Any]:
    """One graph's row: Recall@50 of each column on its validation users."""
    ensure_features(settings, dataset)
    ctx = TrainingContext.load(settings, dataset)
    cfg = settings.training.model_copy(
        update={"objective": "baseline", "seed": seed, "epochs": epochs}
    )
    _, tower = train(ctx, cfg, show_progress=False)
    emb = embed_all(tower, ctx.table, cfg.fanout)
    queries = tower.query_form(emb)
    valset = ev.EvalSet.from_prepared(ctx.data, "val")
    serving = settings.serving
    depth = serving.blend_depth
    fof = ev.topk_fof(valset, ctx.data.user_ids, k=depth, cap=serving.fof_max_friends)
    embedding = ev.embedding_topk(emb, valset, k=depth, queries=queries)
    source = ev.BlendSource(valset, ctx.data.user_ids, emb, queries)
    groups = ev.blend_groups(embedding, fof, source)
    held = np.diff(valset.heldout.indptr)
    default = BlendRanker.from_dict(json.loads(DEFAULT_BLEND_RANKER.read_text()))
    fits = {
        "embedding": lambda _: source_order("embedding"),
        "fof": lambda _: source_order("fof"),
        "ranker, a quarter": lambda fit_on: fit_ranker(fit_on[::2], seed=seed),
        "ranker, a half": lambda fit_on: fit_ranker(fit_on, seed=seed),
        "default, restandardised": lambda fit_on: _standardised_on(default, fit_on),
    }
    teaching = sum(1 for x, y in groups if len(x) and y.any())
    row: dict[str, Any] = {"dataset": dataset, "seed": seed, "users_teaching": teaching}
    for name in COLUMNS:
        row[name] = float(ev.cross_fitted_recall(groups, held, fits[name]).mean())
        log.info("%s: %s %.4f", dataset, name, row[name])
    return row


def run(settings: Settings, datasets: list[str], seed: int, epochs: int, output: Path) -> list:
    settings = settings.model_copy(update={"workdir": settings.workdir / "bench" / "quality"})
    rows = []
    for dataset in datasets:
        rows.append(measure(settings, dataset, seed, epochs))
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps({"split": "val", "recall": "@50", "rows": rows}, indent=2))
    table = Table(title=f"Validation Recall@50 out of sample (seed {seed})")
    for column in ("dataset", "users fitted on (all)", *COLUMNS):
        table.add_column(column)
    for row in rows:
        cells = [f"{row[c]:.4f}" for c in COLUMNS]
        table.add_row(row["dataset"], str(row["users_teaching"]), *cells)
    Console().print(table)
    return rows
