"""Local service processes on loopback (a private redis-server today), shared by the test
fixtures and the benchmarks: start on a free port, wait until ready, always stop."""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

REDIS_NO_PERSISTENCE = ("--save", "", "--appendonly", "no", "--daemonize", "no")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes], name: str) -> None:
    """Terminate a child we started, and kill it if it ignores SIGTERM."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        log.warning("%s (pid %d) ignored SIGTERM; killing it", name, proc.pid)
        proc.kill()
        proc.wait(timeout=15)


@contextlib.contextmanager
def redis_server(log_dir: Path | None = None, timeout: float = 15.0) -> Iterator[str]:
    """A throw-away redis-server (no persistence) on a free loopback port: yields host:port."""
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed: run `make setup` (apt redis-server)")
    port = free_port()
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
    out_path = log_dir / "redis-server.log" if log_dir is not None else Path("/dev/null")
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", *REDIS_NO_PERSISTENCE],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start (log: {out_path})") from None
                time.sleep(0.05)
        log.info("redis-server on 127.0.0.1:%d (pid %d)", port, proc.pid)
        yield f"127.0.0.1:{port}"
    finally:
        stop_process(proc, "redis-server")
