"""`friendrec bench views`: what the auxiliary losses changed in the tower, per training degree.

The quality issue asks why SSMTL gains where it does and fails where it does. Recall alone cannot
say; these probes can. For each model (the single-task one and SSMTL, the same seeds, `bench
quality`'s runs), on the validation queries, in inference mode:

- **views' agreement**: the cosine between two views of a user made with CCA-SSG's own
  augmentations (feature masking and friend dropping at the paper's rates, 20 % each, whatever
  the model trained with): what CCA-SSG's invariance term raises; and the view rank, the share
  of other users (of a batch of 2,048) whose second view is closer to the user's first than its
  own second view;
- **stability**: the cosine between the user's served embedding and one such view, and the
  Recall@50 and top-50 overlap of the view's query against the served index: whether that
  invariance reaches the ranking;
- **id reliance**: one minus the cosine between the served embedding and the same user's without
  its user-id vector: how much of a user is memorised rather than read from features and friends;
  and the Recall@50 of that id-less query against the served index: whether the id vector helps
  the user's own ranking (a user without training friendships has an id vector no friendship
  trained); likewise the reliance on the user's own sparse features (all masked) and on its
  friends' layer-1 states (all dropped), the two inputs CCA-SSG's views augment;
- **effective dimension** of the index (the participation ratio of the embeddings' covariance
  spectrum): what CCA-SSG's decorrelation term raises.

Each per training-degree bucket of the query user, where the cold-start story is told. Validation
edges only; the tables and a plot go to stdout, JSON and PNG.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

import training  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from bench.quality import ensure_features
from friendrec.config import Settings
from friendrec.paths import DatasetPaths
from training import evaluation as ev
from training.features import sample_neighbours, tower_inputs
from training.model import LossConfig
from training.pipeline import embed_all
from training.tower import UserTower
from training.train import TrainingContext, train

log = logging.getLogger(__name__)
K = 50
PROBES = (
    "agreement",
    "view_rank",
    "stability",
    "id_reliance",
    "feature_reliance",
    "friend_reliance",
    "recall@50",
    "view_recall@50",
    "overlap@50",
    "no_id_recall@50",
)
# The views every model is probed with: CCA-SSG's augmentations at the paper's rates, the
# masks its invariance term made the tower insensitive to when they were training's defaults.
PROBE_VIEWS = LossConfig(feature_drop=0.2, neighbour_drop=0.2)
# The whole-population probes of the table across graphs.
SUMMARY_PROBES = ("agreement", "overlap@50", "id_reliance", "feature_reliance", "friend_reliance")


def effective_dimension(emb: np.ndarray) -> float:
    """Participation ratio of the covariance spectrum, (sum l)^2 / sum l^2: 1 when every user lies
    on one line, the width when the variance is spread evenly over every direction."""
    centred = emb - emb.mean(axis=0)
    eig = np.clip(np.linalg.eigvalsh(centred.T @ centred / max(len(emb) - 1, 1)), 0.0, None)
    return float(eig.sum() ** 2 / max((eig**2).sum(), 1e-30))


def probe_views(
    tower: UserTower,
    ctx: TrainingContext,
    fanout: int,
    rows: np.ndarray,
    augment: LossConfig,
    seed: int,
    batch: int = 2048,
) -> dict[str, np.ndarray]:
    """Per user of ``rows``: the served unit embedding (``clean``), one augmented view's
    (``view``) and the one without the user-id vector (``no_id``); the two views' cosine and view
    rank, the served embedding's cosine with the view (``stability``), and 1 minus its cosine
    with the embedding without the id vector, without every own sparse feature and without every
    friend's state (the three reliances). The views are CCA-SSG's (``augment``'s feature and
    friend drop rates), drawn from ``seed``, so every model is probed with the same masks."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[np.ndarray]] = {}
    for lo in range(0, len(rows), batch):
        part = rows[lo : lo + batch]
        inputs = tower_inputs(ctx.table, part, sample_neighbours(ctx.table, part, fanout, None))
        inputs = {k: tf.convert_to_tensor(v) for k, v in inputs.items()}
        ids_shape, friends_shape = inputs["self_sparse_ids"].shape, inputs["friend_mask"].shape

        def embed(inputs: dict[str, tf.Tensor] = inputs, **hooks: tf.Tensor) -> np.ndarray:
            return tower.embed(inputs, **hooks).numpy()

        def masks(rate: float, shape: tuple[int, ...]) -> tf.Tensor:
            return tf.constant(rng.random(shape) >= rate, tf.float32)

        clean = embed()
        views = [
            embed(
                id_keep=masks(augment.feature_drop, ids_shape),
                friend_keep=masks(augment.neighbour_drop, friends_shape),
            )
            for _ in range(2)
        ]
        no_id = embed(id_vector_keep=tf.zeros([len(part), 1])) if tower.id_dim else clean
        probes = {
            "clean": clean,
            "view": views[0],
            "no_id": no_id,
            "agreement": _cosine(views[0], views[1]),
            "view_rank": view_rank(views[0], views[1]),
            "stability": _cosine(clean, views[0]),
            "id_reliance": 1.0 - _cosine(clean, no_id),
            "feature_reliance": 1.0 - _cosine(clean, embed(id_keep=tf.zeros(ids_shape))),
            "friend_reliance": 1.0 - _cosine(clean, embed(friend_keep=tf.zeros(friends_shape))),
        }
        for name, value in probes.items():
            out.setdefault(name, []).append(value)
    return {k: np.concatenate(v) for k, v in out.items()}


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of unit vectors."""
    return np.sum(a * b, axis=1)


def view_rank(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per user i, the share of the other users j whose view ``b[j]`` is closer to ``a[i]`` than
    the user's own ``b[i]``: 0 when each user's two views find each other first. Unlike the
    cosine it does not rise when every embedding crowds into one narrow cone."""
    scores = a @ b.T
    own = np.diag(scores)
    closer = (scores > own[:, None]).sum(axis=1)
    return closer / max(len(a) - 1, 1)


def overlap_at_k(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row, the share of ``a``'s list that ``b``'s holds too (-1: an empty slot)."""
    out = np.empty(len(a), dtype=np.float64)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        x = x[x >= 0]
        out[i] = len(np.intersect1d(x, y[y >= 0])) / max(len(x), 1)
    return out


def model_probes(
    ctx: TrainingContext,
    tower: UserTower,
    fanout: int,
    valset: ev.EvalSet,
    augment: LossConfig,
    seed: int,
) -> tuple[dict[str, np.ndarray], float]:
    """Every probe per validation query, and the index's effective dimension."""
    emb = embed_all(tower, ctx.table, fanout)
    views = probe_views(tower, ctx, fanout, valset.queries, augment, seed)
    queries = tower.query_form(emb)
    clean_top = ev.topk_from_embeddings(emb, valset, k=K, queries=queries)
    queries[valset.queries] = tower.query_vectors(tf.constant(views["view"])).numpy()
    view_top = ev.topk_from_embeddings(emb, valset, k=K, queries=queries)
    queries[valset.queries] = tower.query_vectors(tf.constant(views["no_id"])).numpy()
    no_id_top = ev.topk_from_embeddings(emb, valset, k=K, queries=queries)
    per_user = {
        **{k: views[k] for k in PROBES if k in views},
        "recall@50": ev.per_user_metrics(clean_top, valset, ks=(K,))["recall@50"],
        "view_recall@50": ev.per_user_metrics(view_top, valset, ks=(K,))["recall@50"],
        "overlap@50": overlap_at_k(clean_top, view_top),
        "no_id_recall@50": ev.per_user_metrics(no_id_top, valset, ks=(K,))["recall@50"],
    }
    return per_user, effective_dimension(emb[:, : tower.embedding_dim])


def by_bucket(per_user: dict[str, np.ndarray], valset: ev.EvalSet) -> dict[str, dict[str, float]]:
    """Mean of each probe per training-degree bucket, and over every query ("all")."""
    masks = {"all": np.ones(valset.num_queries, dtype=bool), **ev.degree_buckets(valset)}
    return {
        label: {"users": float(mask.sum())}
        | {k: float(v[mask].mean()) if mask.any() else float("nan") for k, v in per_user.items()}
        for label, mask in masks.items()
    }


def aux_anchor_shares(train_degree: np.ndarray) -> dict[str, dict[str, float]]:
    """Per training-degree bucket, the share of the auxiliary losses' users that each
    ``aux_users`` setting draws: ``pairs``, the anchors of uniformly drawn friendships (a user
    in proportion to its degree), and ``uniform``, users drawn uniformly. Whom CCA-SSG's
    invariance is taught on, without training anything."""
    degree = np.asarray(train_degree, dtype=np.int64)
    total = max(int(degree.sum()), 1)
    return {
        label: {
            "pairs": float(degree[mask].sum() / total),
            "uniform": float(mask.mean()) if len(degree) else 0.0,
        }
        for label, mask in ev.degree_bucket_masks(degree).items()
    }


def _cold_anchor_shares(report: dict[str, Any]) -> str:
    """ "pairs / uniform": the auxiliary losses' share of users with at most 2 friends ("" for
    reports written before ``aux_anchors``)."""
    anchors = report.get("aux_anchors")
    if not anchors:
        return ""
    return " / ".join(
        f"{anchors['0'][how] + anchors['1-2'][how]:.3f}" for how in ("pairs", "uniform")
    )


def probe_dataset(
    settings: Settings, dataset: str, objectives: list[str], seeds: list[int], epochs: int
) -> dict[str, Any]:
    """Every model's probes on one graph, averaged over the seeds per user, then per bucket."""
    ensure_features(settings, dataset)
    ctx = TrainingContext.load(settings, dataset)
    valset = ev.EvalSet.from_prepared(ctx.data, "val")
    report: dict[str, Any] = {
        "dataset": dataset,
        "seeds": seeds,
        "split": "val",
        "aux_anchors": aux_anchor_shares(valset.train_degree),
        "models": {},
    }
    for objective in objectives:
        runs, dims = [], []
        for seed in seeds:
            cfg = settings.training.model_copy(
                update={"objective": objective, "seed": seed, "epochs": epochs}
            )
            _, tower = train(ctx, cfg, show_progress=False)
            # Every model is probed with the same views, whatever it trained with.
            per_user, dim = model_probes(ctx, tower, cfg.fanout, valset, PROBE_VIEWS, seed)
            runs.append(per_user)
            dims.append(dim)
            log.info("%s %s seed %d: effective dimension %.1f", dataset, objective, seed, dim)
        mean = {k: np.mean([r[k] for r in runs], axis=0) for k in PROBES}
        report["models"][objective] = {
            "effective_dimension": float(np.mean(dims)),
            "buckets": by_bucket(mean, valset),
        }
    return report


def run(
    settings: Settings,
    datasets: list[str],
    objectives: list[str],
    seeds: list[int],
    epochs: int,
    output: Path,
) -> list[dict[str, Any]]:
    """Probe each graph (`bench quality`'s workdir and runs, trained where missing); print a
    table per graph and one across them, write the JSON and a plot per graph beside it."""
    settings = settings.model_copy(update={"workdir": settings.workdir / "bench" / "quality"})
    reports = []
    console = Console(width=170)
    output.parent.mkdir(parents=True, exist_ok=True)
    for dataset in tqdm(datasets, desc="graphs", unit="graph", disable=len(datasets) < 2):
        report = probe_dataset(settings, dataset, objectives, seeds, epochs)
        reports.append(report)
        slug = DatasetPaths.of(settings, dataset).slug
        plot(report, output.with_name(f"{output.stem}_{slug}.png"))
        console.print(render(report))
        # Written after every graph: a long run keeps what it measured.
        output.write_text(json.dumps(reports, indent=2))
    console.print(render_summary(reports))
    return reports


def render(report: dict[str, Any]) -> Table:
    table = Table(
        title=f"the user tower's views, {report['dataset']}, validation queries, "
        f"seeds {report['seeds']} (means per training-degree bucket)"
    )
    for column in ("model", "degree", "users", "eff. dim", *PROBES):
        table.add_column(column, justify="left" if column in ("model", "degree") else "right")
    for objective, model in report["models"].items():
        for label, row in model["buckets"].items():
            dim = f"{model['effective_dimension']:.1f}" if label == "all" else ""
            cells = [f"{row[k]:.4f}" for k in PROBES]
            table.add_row(objective, label, f"{row['users']:.0f}", dim, *cells)
    return table


def render_summary(reports: list[dict[str, Any]]) -> Table:
    """One row per graph and model: the whole-population probes beside the recall of the users
    with at most 2 training friends and of those with more than 20, and the share of the
    auxiliary losses' users with at most 2 friends under ``aux_users`` pairs / uniform."""
    table = Table(title="the user tower's views across graphs (validation queries)")
    columns = ("graph", "model", "eff. dim", "agreement", "overlap@50", "id_reliance",
               "feature_reliance", "friend_reliance", "R@50 all", "R@50 degree <= 2",
               "R@50 degree > 20", "aux users degree <= 2: pairs / uniform")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column in ("graph", "model") else "right")
    for report in reports:
        for objective, model in report["models"].items():
            b = model["buckets"]
            cold = _pooled(b, ("0", "1-2"), "recall@50")
            table.add_row(
                report["dataset"],
                objective,
                f"{model['effective_dimension']:.1f}",
                *(f"{b['all'][k]:.4f}" for k in SUMMARY_PROBES),
                f"{b['all']['recall@50']:.4f}",
                f"{cold:.4f}",
                f"{b['>20']['recall@50']:.4f}",
                _cold_anchor_shares(report),
            )
    return table


def _pooled(buckets: dict[str, dict[str, float]], labels: tuple[str, ...], probe: str) -> float:
    """A probe's mean over the users of several buckets (weighted by their counts)."""
    users = [buckets[b]["users"] for b in labels]
    values = [buckets[b][probe] if buckets[b]["users"] else 0.0 for b in labels]
    return float(np.dot(users, values) / max(sum(users), 1.0))


def plot(report: dict[str, Any], path: Path) -> None:
    """One panel per probe, one line per model over the degree buckets."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = ("recall@50", "overlap@50", "id_reliance", "feature_reliance", "friend_reliance")
    fig = Figure(figsize=(16, 3.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(shown))
    buckets = [label for label, _, _ in ev.DEGREE_BUCKETS]
    for ax, probe in zip(axes, shown, strict=True):
        for objective, model in report["models"].items():
            ax.plot(buckets, [model["buckets"][b][probe] for b in buckets], "o-", label=objective)
        ax.set_title(probe)
        ax.set_xlabel("training degree")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle(f"{report['dataset']}: validation queries, seeds {report['seeds']}")
    fig.savefig(path, dpi=110)
