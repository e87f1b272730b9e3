"""Tiny user towers for tests: trained for a few steps or not at all, exported like real ones."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

import training  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from friendrec.config import Settings, TrainingSettings
from training.pipeline import embed_all
from training.publish import export_with_card
from training.train import TrainingContext

SMALL = TrainingSettings(
    embedding_dim=16,
    sparse_dim=8,
    id_dim=8,
    hidden_dim=32,
    fanout=5,
    batch_size=64,
    seed=3,
    popularity_bias=True,
)


@dataclass
class ExportedModels:
    """Model versions exported to a private model base path, with what the training code computes
    for every user (rows in ``user_ids`` order): the reference for every serving test."""

    settings: Settings  # the ENGB store's settings, serving.model_base_path -> base_path
    base_path: Path
    user_ids: np.ndarray
    embeddings: dict[int, np.ndarray]  # version -> [n_users, dim]: the index vectors
    queries: dict[int, np.ndarray]  # version -> [n_users, dim]: the query vectors

    @property
    def versions(self) -> list[int]:
        return sorted(self.embeddings)


def export_untrained_versions(
    store_settings: Settings, base_path: Path, seeds: tuple[int, ...] = (1, 2)
) -> ExportedModels:
    """One exported version per seed (version i+1 = seeds[i]); random weights are enough to test
    the serving path, which must reproduce whatever the tower computes. The popularity weight is
    set (0.05 * seed), so index and query vectors differ as in a trained model."""
    serving = store_settings.serving.model_copy(update={"model_base_path": base_path})
    settings = store_settings.model_copy(update={"training": SMALL, "serving": serving})
    ctx = TrainingContext.load(settings, "twitch/ENGB")
    embeddings, queries = {}, {}
    for version, seed in enumerate(seeds, start=1):
        cfg = SMALL.model_copy(update={"seed": seed})
        tower = ctx.build_tower(cfg)
        tower.popularity_weight.assign(0.05 * seed)
        export_with_card(ctx, tower, cfg, f"untrained-seed{seed}", {}, version)
        embeddings[version] = embed_all(tower, ctx.table, cfg.fanout)
        queries[version] = tower.query_form(embeddings[version])
    return ExportedModels(settings, base_path, ctx.table.user_ids.copy(), embeddings, queries)
