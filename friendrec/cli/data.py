"""`friendrec data ...`: graph datasets."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(help="Prepare graph datasets (users, friendships, split).", no_args_is_help=True)


_DATASET_HELP = (
    "A shipped schema's short name: twitch/<LANG> (ENGB, ES, FR, PTBR, RU, TW), github, "
    "synthetic:<N>; with --schema, the name to store it under (default: the schema's name). "
    "Default: data.dataset from the settings."
)
_SCHEMA_HELP = (
    "A data schema YAML describing your own users and friendships (docs/data.md). "
    "Default: data.schema_file from the settings."
)


@app.command()
def prepare(
    dataset: str = typer.Option(None, "--dataset", "-d", help=_DATASET_HELP),
    schema: Path = typer.Option(None, "--schema", "-s", help=_SCHEMA_HELP),
) -> None:
    """Read a dataset in place as its schema declares, validate it, encode its features, time
    and split it 85/5/10, and write the canonical layout under FRIENDREC_WORKDIR/data/<dataset>/
    (users, friendships, contract.json, report.json, meta.json; id_map.parquet for string ids).
    A failed run leaves the previous layout intact."""
    from friendrec.config import load_settings
    from friendrec.data.canonical import prepare as run

    meta = run(load_settings(), dataset, schema)
    typer.echo(json.dumps(meta.model_dump(exclude={"sources"}), indent=2))


@app.command()
def check(
    dataset: str = typer.Option(None, "--dataset", "-d", help=_DATASET_HELP),
    schema: Path = typer.Option(None, "--schema", "-s", help=_SCHEMA_HELP),
    as_json: bool = typer.Option(False, "--json", help="The report as JSON."),
) -> None:
    """Validate a dataset against its schema and print what prepare would do (users, defaults,
    dropped self loops and duplicates, vocabularies) without writing anything. Exits 1 with the
    file, line and column of the first error."""
    from friendrec.config import load_settings
    from friendrec.data.canonical import check as run

    report = run(load_settings(), dataset, schema)
    if as_json:
        typer.echo(report.model_dump_json(indent=2))
    else:
        typer.echo("\n".join(report.lines()))


@app.command()
def fetch(
    name: str = typer.Argument(..., help="What to fetch: twitch (six languages) or github."),
    datasets_dir: str = typer.Option(
        None, "--datasets-dir", help="Where to unpack. Default: datasets_dir from the settings."
    ),
    url: str = typer.Option(None, "--url", help="Download from this URL instead (a mirror)."),
    force: bool = typer.Option(False, "--force", help="Download even if all files are in place."),
    registry: str = typer.Option(None, "--registry", hidden=True, help="Another registry file."),
) -> None:
    """Download a public MUSAE archive (SNAP), check every file's SHA-256 and unpack it under the
    datasets folder. Nothing downloads unless you run this."""
    from pathlib import Path

    from friendrec.config import load_settings
    from friendrec.data.fetch import fetch as run
    from friendrec.data.fetch import get_entry

    entry = get_entry(name, Path(registry) if registry else None)
    target = Path(datasets_dir) if datasets_dir else load_settings().datasets_dir
    result = run(entry, target, url=url, force=force)
    summary = {
        "dataset": result.name,
        "status": "downloaded" if result.downloaded else "already present",
        "url": result.url,
        "datasets_dir": str(result.datasets_dir),
        "files": [str(p.relative_to(result.datasets_dir)) for p in result.files],
    }
    typer.echo(json.dumps(summary, indent=2))
