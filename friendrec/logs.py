"""Logging set-up shared by every entry point: rich console logs, quiet third-party chatter."""

from __future__ import annotations

import logging

from rich.console import Console
from rich.logging import RichHandler

_NOISY = ("feast", "faiss", "ibis", "urllib3", "kafka", "absl", "tensorflow", "pymilvus")


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(name)s: %(message)s",
        datefmt="[%X]",
        # stderr: stdout is reserved for command results (JSON), so they can be piped.
        handlers=[RichHandler(console=Console(stderr=True), rich_tracebacks=True, show_path=False)],
        force=True,
    )
    for name in _NOISY:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
