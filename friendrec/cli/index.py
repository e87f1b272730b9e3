"""`friendrec index ...`: the Milvus embedding index (one collection per model version, one live
alias)."""

from __future__ import annotations

import json
import logging

import typer

from friendrec.config import Settings

log = logging.getLogger(__name__)

app = typer.Typer(
    help="Build the Milvus embedding index of a model version, move the live alias, roll back, "
    "list and prune versions.",
    no_args_is_help=True,
)


def index_settings() -> Settings:
    """The settings, pointed at the local stack's Milvus while `friendrec up` runs one and no
    Milvus server is configured: the index is then built where the stack's service reads it
    (a milvus-lite file cannot be shared between processes)."""
    from friendrec.config import load_settings
    from friendrec.stack import LocalStack

    settings = load_settings()
    stack = LocalStack(settings)
    if stack.settings.milvus.uri != settings.milvus.uri and "milvus" in stack.running():
        log.info("the local stack runs Milvus at %s: using it", stack.settings.milvus.uri)
        return stack.settings
    return settings


@app.command()
def build(
    model_version: int = typer.Option(
        ..., "--model-version", min=1, help="Exported model version to index."
    ),
    via_tfserving: bool = typer.Option(
        False,
        "--tfserving/--local",
        help="Ask TF Serving (tfserving.address, Predict pinned to the version) for the "
        "embeddings instead of running the exported SavedModel in-process (the default).",
    ),
    engine: str = typer.Option(
        None,
        "--engine",
        help="local (this process) or ray (the SavedModel loaded once per Ray worker; "
        "engine.ray_address, or a local Ray for the command). Default: engine.kind.",
    ),
) -> None:
    """Embed every user of the active dataset (Feast online features -> the exported model, in
    batches of milvus.build_batch) into a new collection, build its index, load it, move the
    alias to it and prune old versions. A failed build leaves the alias and collections as
    they were."""
    from serving.index_build import TFServingEmbedder, build_index
    from serving.tfserving.client import TFServingClient

    settings = index_settings()
    if via_tfserving and engine == "ray":
        raise typer.BadParameter("--tfserving embeds through one client: use --engine local")
    if not via_tfserving:
        report = build_index(settings, model_version, engine=engine)
    else:
        address, name = settings.tfserving.address, settings.serving.model_name
        with TFServingClient(address, name, timeout_s=60.0) as client:
            report = build_index(
                settings, model_version, TFServingEmbedder(client, model_version), engine="local"
            )
    typer.echo(json.dumps(report.as_dict(), indent=2))


@app.command()
def rollback() -> None:
    """Move the alias back to the previously live version's collection."""
    from serving.index import EmbeddingIndex

    with EmbeddingIndex.connect(index_settings()) as index:
        before = index.live()
        live = index.rollback()
    result = {
        "alias": live.alias,
        "collection": live.collection,
        "model_version": live.model_version,
        "previous": before.collection if before else None,
    }
    typer.echo(json.dumps(result, indent=2))


@app.command("list")
def list_versions(
    as_json: bool = typer.Option(False, "--json", help="JSON instead of a table."),
) -> None:
    """Every version's collection: state, rows, when built and promoted, live / rollback."""
    from rich.console import Console
    from rich.table import Table

    from serving.index import EmbeddingIndex

    settings = index_settings()
    with EmbeddingIndex.connect(settings) as index:
        versions = index.versions()
    if as_json:
        typer.echo(json.dumps([v.as_dict() for v in versions], indent=2))
        return
    table = Table(title=f"alias {settings.milvus.alias} @ {settings.milvus_uri}")
    for column in ("version", "collection", "role", "state", "rows", "dim", "index", "loaded"):
        table.add_column(column)
    table.add_column("built at")
    table.add_column("promoted at")
    for v in versions:
        role = "live" if v.live else "rollback" if v.rollback_target else ""
        if v.rolled_back_at:
            role = role or "rolled back"
        table.add_row(
            str(v.version),
            v.collection,
            role,
            v.state,
            "" if v.rows is None else str(v.rows),
            str(v.dim),
            v.index_type,
            "yes" if v.loaded else "no",
            _short_time(v.built_at),
            _short_time(v.promoted_at),
        )
    console = Console()
    if not console.is_terminal:  # piped: do not squeeze the table into 80 columns
        console = Console(width=200)
    console.print(table)


def _short_time(iso: str) -> str:
    """``2025-01-02T03:04:05.678+00:00`` -> ``2025-01-02 03:04:05Z`` (UTC, for the table)."""
    return iso[:19].replace("T", " ") + "Z" if iso else ""


@app.command()
def prune(
    incomplete: bool = typer.Option(
        False,
        "--incomplete",
        help="Also drop collections of builds that never finished (no build may be running).",
    ),
) -> None:
    """Drop collections beyond milvus.keep_versions (never the live one or the rollback one)."""
    from serving.index import EmbeddingIndex

    with EmbeddingIndex.connect(index_settings()) as index:
        dropped = index.prune(include_incomplete=incomplete)
    typer.echo(json.dumps({"dropped": dropped}, indent=2))
