"""The end-to-end story behind `friendrec demo`: data -> features -> training -> evaluation ->
export -> index -> the local stack -> recommendations -> friendship events through Kafka ->
refreshed recommendations -> everything stopped."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
from rich.console import Console
from rich.markdown import Markdown
from rich.table import Table

from friendrec.config import Settings, load_settings

log = logging.getLogger(__name__)
# Piped into a log: wide tables instead of 80 columns, no colour codes, no live progress bars.
_TTY = sys.stdout.isatty()
console = Console(width=None if _TTY else 160, no_color=not _TTY, highlight=_TTY)
T = TypeVar("T")
DEMO_EPOCHS = 2  # a brief training: the story, not the quality report (docs/quality.md)
DEMO_REPLAY = 2_000  # held-out friendships replayed as events
DEMO_FALLBACK = "synthetic:5000"  # when the default dataset's files are not on this machine


def _step(title: str, fn: Callable[[], T]) -> T:
    started = time.perf_counter()
    if _TTY:
        with console.status(f"[bold]{title}[/] ..."):
            result = fn()
    else:
        result = fn()
    console.print(f"[green]✓[/] {title} [dim]({time.perf_counter() - started:.1f} s)[/]")
    return result


def demo_settings(settings: Settings, dataset: str) -> Settings:
    """A private workdir and free loopback ports: the demo never touches the user's artifacts or
    a stack already running on the default ports."""
    from friendrec.local_services import free_port

    workdir = settings.workdir / "demo"
    return settings.model_copy(
        update={
            "workdir": workdir,
            "data": settings.data.model_copy(update={"dataset": dataset}),
            "training": settings.training.model_copy(update={"epochs": DEMO_EPOCHS}),
            "serving": settings.serving.model_copy(
                update={"model_base_path": None, "port": free_port(), "metrics_port": free_port()}
            ),
            "tfserving": settings.tfserving.model_copy(update={"port": free_port()}),
            "milvus": settings.milvus.model_copy(update={"uri": f"http://127.0.0.1:{free_port()}"}),
            "streaming": settings.streaming.model_copy(
                update={"bootstrap_servers": f"127.0.0.1:{free_port()}"}
            ),
        }
    )


def demo_dataset(settings: Settings, dataset: str | None) -> str:
    """The dataset the demo runs on: the one asked for, else the default one when its files are
    here, else the synthetic graph (said so: a fresh clone without ../shared still runs)."""
    from friendrec.data.canonical import files_present

    if dataset:
        return dataset
    if files_present(settings, settings.data.dataset):
        return settings.data.dataset
    console.print(
        f"[yellow]note:[/] {settings.data.dataset} is not in the datasets folder "
        f"{settings.datasets_dir} (`friendrec data fetch twitch` downloads the MUSAE graphs, or "
        f"set FRIENDREC_DATASETS_DIR), so the demo runs on the synthetic graph {DEMO_FALLBACK} "
        "and its schema (feature_repo/schemas/synthetic.yaml)."
    )
    return DEMO_FALLBACK


def run_demo(dataset: str | None, users: Sequence[int], replay_limit: int = DEMO_REPLAY) -> None:
    """The whole story on embedded defaults, every process stopped at the end (see README)."""
    from friendrec.stack import LocalStack

    if not _TTY:
        os.environ.setdefault("TQDM_DISABLE", "1")  # Feast's and our bars are noise in a log
    base = load_settings()
    dataset = demo_dataset(base, dataset)
    settings = demo_settings(base, dataset)
    console.rule(f"friendrec demo on {dataset} (workdir {settings.workdir})")
    _features(settings, dataset, users)
    version = _train_evaluate_export(settings, dataset)
    stack = LocalStack(settings)
    try:
        _step(
            "start milvus-lite (server mode) and TF Serving",
            lambda: stack.up(["milvus", "tfserving"]),
        )
        settings = stack.settings  # Milvus as a server from here on
        report = _step(f"index model v{version} into Milvus", lambda: _index(settings, version))
        console.print(f"  {report}")
        _step(
            "start the Tansu broker, the retrieval service and the stream workers",
            lambda: stack.up(),
        )
        pairs, demo_users = _replay_plan(settings, replay_limit)
        before = _recommend(settings, demo_users)
        console.print(_recommendations_table("recommendations before the new friendships", before))
        sent = _step(
            f"replay {len(pairs)} held-out friendships as Kafka events",
            lambda: _replay(settings, pairs),
        )
        console.print(f"  {sent}")
        waited = _step(
            "wait until the demo users' embeddings are refreshed in Milvus",
            lambda: _wait_refreshed(settings, demo_users, sent["started_ms"]),
        )
        console.print(f"  freshness of the demo users: {waited}")
        after = _recommend(settings, demo_users)
        console.print(
            _recommendations_table("recommendations after the refresh", after, before, pairs)
        )
    finally:
        stopped = _step("stop every process", stack.down)
        console.print(f"  stopped: {', '.join(stopped)}")


def _features(settings: Settings, dataset: str, users: Sequence[int]) -> None:
    from feature_repo.jobs.graph_features import build_features
    from feature_repo.jobs.materialize import apply, materialize
    from friendrec.data.canonical import prepare
    from friendrec.feast_store import online_features, open_store
    from friendrec.paths import load_contract

    meta = _step(f"prepare {dataset}", lambda: prepare(settings, dataset))
    console.print(
        f"  {meta.num_users:,} users, {meta.num_friendships:,} friendships, "
        f"split {meta.split_counts}"
    )
    _step("build graph features", lambda: build_features(settings, dataset, show_progress=False))
    _step("apply Feast definitions", lambda: apply(settings, dataset))
    _step(
        "materialize into the online store",
        lambda: materialize(settings, dataset, incremental=True),
    )
    features = load_contract(settings, dataset)
    rows = online_features(open_store(settings, dataset), [*users, 10**12], contract=features)
    console.print(_features_table(rows, features.profile_scalar_names[:1]))


def _train_evaluate_export(settings: Settings, dataset: str) -> int:
    import training  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
    from training.publish import export_run
    from training.runs import evaluate_runs
    from training.train import TrainingContext, train

    ctx = _step(
        "load the point-in-time training table", lambda: TrainingContext.load(settings, dataset)
    )
    runs = {}
    for objective in ("baseline", "ssmtl"):
        cfg = settings.training.model_copy(update={"objective": objective})
        console.print(f"[bold]train {objective}[/] ({cfg.epochs} epochs, early stopping)")
        result, _ = train(ctx, cfg)
        runs[objective] = result.model_dir
    out_dir = settings.workdir / "reports" / ctx.paths.slug / "test"
    report = _step("evaluate on the test friendships", lambda: evaluate_runs(ctx, runs, out_dir))
    console.print(Markdown(Path(report["files"]["markdown"]).read_text()))
    console.print(
        f"  [yellow]note:[/] {settings.training.epochs} epochs is the story, not the result: a "
        "run this short cannot show SSMTL's gain over the baseline (it may even trail it). The "
        "measured comparison (8 epochs, 3 seeds, every graph, confidence intervals) is in "
        "docs/quality.md and docs/quality_summary.md."
    )
    path = _step("export SSMTL for TF Serving", lambda: export_run(ctx, runs["ssmtl"], "ssmtl"))
    console.print(f"  {path}")
    return int(path.name)


def _index(settings: Settings, version: int) -> str:
    from serving.index_build import build_index

    report = build_index(settings, version, show_progress=False)
    return f"{report.users:,} users into {report.collection} ({report.users_per_s:,.0f} users/s)"


def _replay_plan(settings: Settings, limit: int) -> tuple[np.ndarray, list[int]]:
    """The first ``limit`` held-out friendships, and three users who gain friends in them."""
    from streaming.replay import held_out_pairs

    pairs = held_out_pairs(settings)[:limit]
    users, counts = np.unique(pairs.ravel(), return_counts=True)
    return pairs, [int(u) for u in users[np.argsort(-counts, kind="stable")][:3]]


def _recommend(
    settings: Settings, users: Sequence[int], k: int = 5
) -> dict[int, list[tuple[int, float]]]:
    from serving.client import RecommenderClient, recommend_request

    with RecommenderClient(settings, timeout_s=10) as client:
        return {
            u: [(c.user_id, c.score) for c in client.recommend(recommend_request(u, k)).candidates]
            for u in users
        }


def _replay(settings: Settings, pairs: np.ndarray) -> dict[str, float]:
    from streaming.replay import replay

    started_ms = int(time.time() * 1000)
    report = replay(settings, pairs, None, "add")
    return {
        "started_ms": started_ms,
        "friendships": report.friendships,
        "per_s": round(report.rate),
    }


def _wait_refreshed(
    settings: Settings, users: Sequence[int], since_ms: int, timeout: float = 120.0
) -> str:
    from serving.index import EmbeddingIndex

    deadline = time.monotonic() + timeout
    with EmbeddingIndex.connect(settings) as index:
        live = index.live()
        assert live is not None
        while True:
            written = index.updated_at(live.collection, users)
            if all(written.get(u, 0) >= since_ms for u in users):
                lags = [(written[u] - since_ms) / 1000 for u in users]
                return ", ".join(
                    f"user {u}: {lag:.1f} s" for u, lag in zip(users, lags, strict=True)
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"embeddings not refreshed within {timeout:.0f} s: {written}")
            time.sleep(0.2)


def _recommendations_table(
    title: str,
    now: dict[int, list[tuple[int, float]]],
    before: dict[int, list[tuple[int, float]]] | None = None,
    pairs: np.ndarray | None = None,
) -> Table:
    table = Table(title=title)
    table.add_column("user")
    table.add_column("top 5 candidates (blend score: embedding + friends of friends)")
    if before is not None and pairs is not None:
        table.add_column("new friends")
        table.add_column("changed")
    for user, candidates in now.items():
        cells = [str(user), ", ".join(f"{u} ({s:.2f})" for u, s in candidates)]
        if before is not None and pairs is not None:
            new = sorted(
                {int(b) for a, b in pairs if a == user} | {int(a) for a, b in pairs if b == user}
            )
            cells.append(", ".join(map(str, new[:6])) + (" ..." if len(new) > 6 else ""))
            cells.append("yes" if candidates != before[user] else "no")
        table.add_row(*cells)
    return table


def _number(value: float) -> str:
    return f"{value:,.0f}" if value.is_integer() else f"{value:,.3f}"


def _features_table(rows: list[dict], scalars: Sequence[str] = ()) -> Table:
    """A compact view of online feature rows (lists are shortened), with the profile scalars
    named in ``scalars``."""
    table = Table(title="online features (the last user is unknown on purpose)")
    for column in ("user", "known", "degree", "friend_ids", "sparse_ids", "nbr top ids", *scalars):
        table.add_column(column)

    def short(values: list) -> str:
        return ", ".join(map(str, values[:3])) + (
            f" ... ({len(values)})" if len(values) > 3 else ""
        )

    for row in rows:
        table.add_row(
            str(row["user_id"]),
            "yes" if row["known"] else "[yellow]no: defaults[/]",
            str(row["degree"]),
            short(row["friend_ids"]),
            short(row["sparse_ids"]),
            short(row["nbr_sparse_ids"]),
            *(_number(float(row[name])) for name in scalars),
        )
    return table
