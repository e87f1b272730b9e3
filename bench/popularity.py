"""`friendrec bench popularity`: how much popularity the ranking needs, on validation edges.

Two single-task models of one graph (the `bench quality` runs, trained if missing): one without
the popularity term, scored with a fixed term added after training (``cos + beta * log(1 +
degree)``, a grid of beta), and one with the learned term, its query scale varied (``[e, gamma]``
instead of ``[e, 1]``). Adamic-Adar alongside. Validation edges only: this is how the term was
chosen (docs/quality.md).
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
from bench.quality import ensure_features
from friendrec.config import Settings
from training import evaluation as ev
from training.pipeline import embed_all
from training.train import TrainingContext, train

log = logging.getLogger(__name__)
BETAS = (0.0, 0.02, 0.05, 0.1, 0.2)
GAMMAS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


def _recall(top: np.ndarray, evalset: ev.EvalSet) -> dict[str, float]:
    r = ev.per_user_metrics(top, evalset, ks=(50,), ndcg_k=50)["recall@50"]
    return {"all": float(r.mean()), "cold_start": float(r[evalset.cold_start].mean())}


def run(settings: Settings, dataset: str, seed: int, epochs: int, output: Path) -> dict[str, Any]:
    settings = settings.model_copy(update={"workdir": settings.workdir / "bench" / "quality"})
    ensure_features(settings, dataset)
    ctx = TrainingContext.load(settings, dataset)
    valset = ev.EvalSet.from_prepared(ctx.data, "val")
    pop = np.log1p(valset.train_degree).astype(np.float32)
    report: dict[str, Any] = {"dataset": dataset, "seed": seed, "split": "val"}
    report["adamic_adar"] = _recall(ev.topk_adamic_adar(valset), valset)

    base = {"objective": "baseline", "seed": seed, "epochs": epochs}
    cfg = settings.training.model_copy(update={**base, "popularity_bias": False})
    _, tower = train(ctx, cfg, show_progress=False)
    emb = embed_all(tower, ctx.table, cfg.fanout)
    report["fixed_term"] = {}
    for beta in BETAS:

        def scores(rows: np.ndarray, beta: float = beta) -> np.ndarray:
            return emb[rows] @ emb.T + beta * pop[None, :]

        top, _ = ev._dense_topk(valset, 50, 1024, scores)
        report["fixed_term"][str(beta)] = _recall(top, valset)

    cfg = settings.training.model_copy(update={**base, "popularity_bias": True})
    _, tower = train(ctx, cfg, show_progress=False)
    emb = embed_all(tower, ctx.table, cfg.fanout)
    report["learned_weight"] = float(tower.popularity_weight.numpy())
    report["learned_term_query_scale"] = {}
    for gamma in GAMMAS:
        queries = tower.query_form(emb)
        queries[:, -1] = gamma
        top = ev.topk_from_embeddings(emb, valset, k=50, queries=queries)
        report["learned_term_query_scale"][str(gamma)] = _recall(top, valset)

    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    table = Table(title=f"validation Recall@50 (all / cold-start), {dataset}, seed {seed}")
    table.add_column("model and scoring")
    table.add_column("R@50", justify="right")

    def cell(r: dict[str, float]) -> str:
        return f"{r['all']:.4f} / {r['cold_start']:.4f}"

    for beta, r in report["fixed_term"].items():
        table.add_row(f"no term; + {beta} * log(1 + degree) after training", cell(r))
    for gamma, r in report["learned_term_query_scale"].items():
        table.add_row(f"learned term (w = {report['learned_weight']:.4f}); query scale {gamma}",
                      cell(r))  # fmt: skip
    table.add_row("Adamic-Adar", cell(report["adamic_adar"]))
    Console(width=160).print(table)
    return report
