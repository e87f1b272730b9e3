"""`friendrec bench ...`: benchmarks (commands, not tests): print a table and write JSON."""

from __future__ import annotations

import typer

app = typer.Typer(help="Benchmarks: print a table and write JSON.", no_args_is_help=True)
