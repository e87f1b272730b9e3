"""Logging set-up shared by every entry point: rich console logs for people, or one JSON object
per line for log pipelines (services in production: ``FRIENDREC_LOG_FORMAT=json``)."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from rich.console import Console
from rich.logging import RichHandler

_NOISY = ("feast", "faiss", "ibis", "urllib3", "kafka", "absl", "tensorflow", "pymilvus")


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", ...fields}``; structured fields come from
    ``extra={"fields": {...}}`` (e.g. the retrieval service's access log)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(level: str = "INFO", fmt: str = "rich") -> None:
    if fmt == "json":
        handler: logging.Handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
    else:
        # stderr: stdout is reserved for command results (JSON), so they can be piped.
        handler = RichHandler(console=Console(stderr=True), rich_tracebacks=True, show_path=False)
    logging.basicConfig(
        level=level.upper(),
        format="%(name)s: %(message)s",
        datefmt="[%X]",
        handlers=[handler],
        force=True,
    )
    for name in _NOISY:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))


def progress_disabled(show_progress: bool) -> bool | None:
    """tqdm's ``disable``: None draws bars only on a terminal (a log file or a pipe gets none),
    True never."""
    return None if show_progress else True
