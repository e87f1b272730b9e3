"""`friendrec features ...`: the graph-feature job and Feast."""

from __future__ import annotations

import json
from datetime import datetime

import typer

app = typer.Typer(
    help="Build graph features, register them in Feast, materialize and read them.",
    no_args_is_help=True,
)
DATASET = typer.Option(None, "--dataset", "-d", help="Dataset (default: data.dataset).")
ENGINE = typer.Option(
    None,
    "--engine",
    help="local (this process) or ray (engine.ray_address, or a local Ray started for the "
    "command). Default: engine.kind.",
)


def _parse_time(value: str | None) -> int | None:
    if value is None:
        return None
    if value.isdigit():
        return int(value)
    return int(datetime.fromisoformat(value).timestamp())


@app.command()
def build(
    dataset: str = DATASET,
    as_of: str = typer.Option(
        None,
        "--as-of",
        help="Snapshot time (unix seconds or ISO 8601). Default: the training cutoff.",
    ),
    engine: str = ENGINE,
) -> None:
    """Compute per-user graph features from the training graph as of a time and append them
    (changed users only) to the Feast offline source; also (re)write the profile source."""
    from feature_repo.jobs.graph_features import build_features
    from friendrec.config import load_settings

    report = build_features(load_settings(), dataset, _parse_time(as_of), engine=engine)
    typer.echo(json.dumps(report.as_dict(), indent=2))


@app.command()
def apply(dataset: str = DATASET) -> None:
    """Register the entity, feature views, push sources and feature services in Feast."""
    from feature_repo.jobs.materialize import apply as run
    from friendrec.config import load_settings

    store = run(load_settings(), dataset)
    typer.echo(f"applied Feast project {store.project}")


@app.command()
def materialize(
    dataset: str = DATASET,
    incremental: bool = typer.Option(
        False, "--incremental", help="Only rows newer than the last materialization."
    ),
    engine: str = ENGINE,
) -> None:
    """Load the latest offline rows into the online store (sqlite, or Redis by configuration).
    Idempotent: re-running changes nothing."""
    from feature_repo.jobs.materialize import materialize as run
    from friendrec.config import load_settings

    report = run(load_settings(), dataset, incremental=incremental, engine=engine)
    typer.echo(json.dumps(report.as_dict(), indent=2))


@app.command()
def get(
    user: list[int] = typer.Option(..., "--user", "-u", help="User id (repeatable)."),
    dataset: str = DATASET,
) -> None:
    """Online features of users as JSON. Unknown users are returned with the contract defaults
    and "known": false (never an error)."""
    from friendrec.config import load_settings
    from friendrec.feast_store import online_features, open_store
    from friendrec.paths import load_contract

    settings = load_settings()
    features = load_contract(settings, dataset)
    rows = online_features(open_store(settings, dataset), user, contract=features)
    typer.echo(json.dumps(rows, indent=2))
