"""`friendrec <command>`: one CLI for every component. Heavy imports happen inside commands so
that `--help` stays instant."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.console import Console

from friendrec.cli import bench, data, features, index, model, serving, stack, stream, tfserving
from friendrec.errors import FriendrecError

app = typer.Typer(
    name="friendrec",
    help=(
        "Friend recommendation with SSMTL embeddings over Feast, TensorFlow Recommenders, "
        "Kafka and Milvus. Configuration: defaults < FRIENDREC_CONFIG / --config YAML < "
        "FRIENDREC_* environment variables (nested with __, e.g. FRIENDREC_DATA__SEED=7)."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(data.app, name="data")
app.add_typer(features.app, name="features")
app.add_typer(bench.app, name="bench")
app.add_typer(index.app, name="index")
app.add_typer(stream.app, name="stream")
model.register(app)
tfserving.register(app)
serving.register(app)
stack.register(app)
console = Console(stderr=True)


@app.callback()
def root(
    config: Path | None = typer.Option(
        None, "--config", "-c", exists=True, dir_okay=False, help="YAML settings file."
    ),
    log_level: str = typer.Option("INFO", "--log-level", help="DEBUG, INFO, WARNING, ERROR."),
    log_format: str = typer.Option(
        None,
        "--log-format",
        help="rich (people) or json (one object per line); default: the log_format setting.",
    ),
) -> None:
    """Global options (they apply to every command)."""
    if config is not None:
        os.environ["FRIENDREC_CONFIG"] = str(config.resolve())
    from friendrec.logs import setup_logging

    if log_format is None:
        from friendrec.config import load_settings

        try:
            log_format = load_settings().log_format
        except Exception:  # invalid settings: the command itself reports them
            log_format = "rich"
    if log_format not in ("rich", "json"):
        raise typer.BadParameter("--log-format must be rich or json")
    setup_logging(log_level, log_format)


@app.command()
def config() -> None:
    """Print the effective settings as JSON (after file and environment)."""
    from friendrec.config import load_settings

    typer.echo(load_settings().model_dump_json(indent=2))


@app.command()
def demo(
    dataset: str = typer.Option(
        None,
        help="Dataset to run the story on. Default: data.dataset (twitch/ENGB), or the synthetic "
        "graph (synthetic:5000) when the datasets folder does not hold it.",
    ),
    users: list[int] = typer.Option([0, 1, 2], "--user", help="Users whose features to show."),
    replay: int = typer.Option(
        2000, "--replay", min=1, help="Held-out friendships replayed as Kafka events."
    ),
) -> None:
    """The whole story on embedded defaults, in <workdir>/demo on free loopback ports: prepare
    data -> build and materialize features -> train baseline and SSMTL briefly -> evaluate ->
    export -> index into Milvus -> start milvus-lite, TF Serving, the Tansu broker, the
    retrieval service and the stream workers -> recommend -> replay held-out friendships as
    events -> show the refreshed recommendations -> stop every process."""
    from friendrec.pipeline import run_demo

    run_demo(dataset, users, replay)


def main() -> None:
    """Console-script entry: project errors become one clear line and exit code 2."""
    try:
        app()
    except FriendrecError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        sys.exit(2)
