"""`friendrec up | down | status`: the local stack (see friendrec/stack.py)."""

from __future__ import annotations

import json

import typer

COMPONENTS_HELP = (
    "Comma-separated subset of milvus, tfserving, broker, service, feature-updater, "
    "embedding-refresher, milvus-sink (default: all)."
)


def register(app: typer.Typer) -> None:
    @app.command()
    def up(
        only: str = typer.Option(None, "--only", help=COMPONENTS_HELP),
    ) -> None:
        """Start the local stack as background processes on loopback (ports from the settings):
        a milvus-lite server, the TF Serving-protocol server (needs an exported model), the Tansu
        Kafka broker, the retrieval service and the three stream workers; each is waited for.
        Logs: <workdir>/stack/logs/. Clients use the same settings plus
        `--config <workdir>/stack/settings.yaml` (Milvus runs as a server there)."""
        from friendrec.config import load_settings
        from friendrec.stack import COMPONENTS, LocalStack

        components = [c.strip() for c in only.split(",")] if only else list(COMPONENTS)
        stack = LocalStack(load_settings())
        state = stack.up(components)
        typer.echo(json.dumps({"settings": str(stack.paths.settings), "running": state}, indent=2))

    @app.command()
    def down() -> None:
        """Stop everything `friendrec up` started (SIGTERM, then SIGKILL after 20 s)."""
        from friendrec.config import load_settings
        from friendrec.stack import LocalStack

        typer.echo(json.dumps({"stopped": LocalStack(load_settings()).down()}))

    @app.command()
    def status() -> None:
        """The local stack's components: pid, address, log file, running or not."""
        from friendrec.config import load_settings
        from friendrec.stack import LocalStack

        typer.echo(json.dumps(LocalStack(load_settings()).status(), indent=2))
