"""`friendrec data ...`: graph datasets."""

from __future__ import annotations

import json

import typer

app = typer.Typer(help="Prepare graph datasets (users, friendships, split).", no_args_is_help=True)


@app.command()
def prepare(
    dataset: str = typer.Option(
        None,
        "--dataset",
        "-d",
        help="twitch/<LANG> (ENGB, ES, FR, PTBR, RU, TW), github, or synthetic:<N>. "
        "Default: data.dataset from the settings.",
    ),
) -> None:
    """Read a dataset in place, validate it, assign timestamps, split 85/5/10 and write the
    canonical parquet layout under FRIENDREC_WORKDIR/data/<dataset>/."""
    from friendrec.config import load_settings
    from friendrec.data.canonical import prepare as run

    meta = run(load_settings(), dataset)
    typer.echo(json.dumps(meta.model_dump(exclude={"sources"}), indent=2))
