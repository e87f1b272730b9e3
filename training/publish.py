"""Export a trained run for TF Serving, with the model card that ties it to its data and quality."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from friendrec.config import TrainingSettings
from friendrec.contract import Contract
from training.export import export_tower
from training.features import sample_neighbours, tower_inputs
from training.runs import latest_run, offline_metrics_of, restore_tower
from training.tower import UserTower
from training.train import TrainingContext

WARMUP_USERS = 4


def export_run(
    ctx: TrainingContext,
    run_dir: Path | None = None,
    objective: str = "ssmtl",
    version: int | None = None,
) -> Path:
    """Export a run's best tower to ``<model_base_path>/<model_name>/<version>/``."""
    run_dir = run_dir or latest_run(ctx, objective)
    tower, cfg = restore_tower(ctx, run_dir)
    return export_with_card(ctx, tower, cfg, run_dir.name, offline_metrics_of(run_dir), version)


def contract_card(contract: Contract) -> dict[str, Any]:
    """The model card's contract fields: what a model version was trained on."""
    return {
        "schema_hash": contract.schema_hash,
        "vocab_sha256": contract.vocab_sha256,
        "contract_version": contract.version,
        "feature_service": contract.serving_service,
        "declared_features": list(contract.declared_names),
        "profile_scalars": list(contract.profile_scalar_names),
    }


def export_with_card(
    ctx: TrainingContext,
    tower: UserTower,
    cfg: TrainingSettings,
    run: str,
    offline_metrics: dict[str, Any],
    version: int | None = None,
) -> Path:
    """Export a tower with warmup requests from real users and the model card that names its
    dataset, split, feature contract (schema hash, vocabulary digest, feature service, declared
    features) and training configuration (index build and serving check them)."""
    rows = np.arange(min(WARMUP_USERS, len(ctx.table)))
    warmup = tower_inputs(ctx.table, rows, sample_neighbours(ctx.table, rows, cfg.fanout, None))
    card = {
        **contract_card(ctx.contract),
        "dataset": ctx.data.meta.name,
        "data_split_sha256": ctx.data.meta.split_sha256,
        "training_cutoff_ts": ctx.data.meta.train_cutoff_ts,
        "training_config": cfg.model_dump(),
        "feature_settings": ctx.settings.features.model_dump(),
        "run": run,
        "offline_metrics": offline_metrics,
    }
    return export_tower(
        tower,
        ctx.settings.model_base_path,
        ctx.settings.serving.model_name,
        warmup,
        card,
        version,
    )
