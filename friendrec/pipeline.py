"""The end-to-end story behind `friendrec demo` (grows with every component)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from rich.console import Console
from rich.table import Table

from friendrec.config import load_settings

log = logging.getLogger(__name__)
console = Console()
T = TypeVar("T")


def _step(title: str, fn: Callable[[], T]) -> T:
    started = time.perf_counter()
    with console.status(f"[bold]{title}[/] ..."):
        result = fn()
    console.print(f"[green]✓[/] {title} [dim]({time.perf_counter() - started:.1f} s)[/]")
    return result


def run_demo(dataset: str, users: Sequence[int]) -> None:
    """Prepare -> build features -> apply -> materialize -> read online features."""
    from feature_repo.jobs.graph_features import build_features
    from feature_repo.jobs.materialize import apply, materialize
    from friendrec.data.canonical import prepare
    from friendrec.feast_store import online_features, open_store

    settings = load_settings()
    console.rule(f"friendrec demo on {dataset} (workdir {settings.workdir})")
    meta = _step(f"prepare {dataset}", lambda: prepare(settings, dataset))
    console.print(
        f"  {meta.num_users:,} users, {meta.num_friendships:,} friendships, "
        f"split {meta.split_counts}"
    )
    report = _step("build graph features", lambda: build_features(settings, dataset))
    console.print(f"  {report.as_dict()}")
    _step("apply Feast definitions", lambda: apply(settings, dataset))
    _step(
        "materialize into the online store",
        lambda: materialize(settings, dataset, incremental=True),
    )
    rows = online_features(open_store(settings, dataset), [*users, 10**12])
    console.print(_features_table(rows))


def _features_table(rows: list[dict]) -> Table:
    """A compact view of online feature rows (lists are shortened)."""
    table = Table(title="online features (the last user is unknown on purpose)")
    for column in ("user", "known", "degree", "friend_ids", "sparse_ids", "nbr top ids", "views"):
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
            f"{row['views']:,.0f}",
        )
    return table
