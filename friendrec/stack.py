"""`friendrec up | down | status`: the local stack as detached processes on loopback.

Milvus (milvus-lite in server mode: several processes share it, which a .db file does not
allow), our TF Serving-protocol server, the Tansu Kafka broker, the retrieval service and the
three stream workers. Ports come from the shared settings; every process reads one settings file
(``<workdir>/stack/settings.yaml``) and logs to ``<workdir>/stack/logs/``; ``stack.json`` keeps
the pids so that ``friendrec down`` (another process, later) stops exactly what ``up`` started.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from friendrec.config import Settings
from friendrec.errors import FriendrecError, NotPreparedError

log = logging.getLogger(__name__)

DEFAULT_MILVUS_PORT = 19530
WORKERS = ("feature-updater", "embedding-refresher", "milvus-sink")
COMPONENTS = ("milvus", "tfserving", "broker", "service", *WORKERS)


@dataclass(frozen=True)
class StackPaths:
    root: Path

    @classmethod
    def of(cls, settings: Settings) -> StackPaths:
        return cls(settings.workdir / "stack")

    @property
    def state(self) -> Path:
        return self.root / "stack.json"

    @property
    def settings(self) -> Path:
        return self.root / "settings.yaml"

    @property
    def logs(self) -> Path:
        return self.root / "logs"


def stack_settings(settings: Settings) -> Settings:
    """The settings all stack processes share: Milvus as a local server (unless a server URI is
    configured already), everything else as configured."""
    uri = settings.milvus.uri
    if uri is None or not uri.startswith(("http://", "https://", "tcp://")):
        uri = f"http://127.0.0.1:{DEFAULT_MILVUS_PORT}"
    return settings.model_copy(update={"milvus": settings.milvus.model_copy(update={"uri": uri})})


def _port(address: str) -> int:
    parsed = urlparse(address if "://" in address else f"//{address}")
    if parsed.port is None:
        raise FriendrecError(f"no port in {address!r}")
    return parsed.port


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie has exited; /proc says so.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class LocalStack:
    def __init__(self, settings: Settings) -> None:
        self.settings = stack_settings(settings)
        self.paths = StackPaths.of(settings)

    # -- state -----------------------------------------------------------------------------------
    def _read(self) -> dict[str, dict[str, Any]]:
        if not self.paths.state.exists():
            return {}
        return json.loads(self.paths.state.read_text())

    def _write(self, state: dict[str, dict[str, Any]]) -> None:
        self.paths.root.mkdir(parents=True, exist_ok=True)
        tmp = self.paths.state.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.paths.state)

    def running(self) -> dict[str, dict[str, Any]]:
        """Components whose process is still the one we started."""
        return {
            name: entry
            for name, entry in self._read().items()
            if _alive(entry["pid"]) and entry["marker"] in _cmdline(entry["pid"])
        }

    # -- up --------------------------------------------------------------------------------------
    def up(self, components: Sequence[str] = COMPONENTS) -> dict[str, dict[str, Any]]:
        """Start the components not running yet, in dependency order, each waited for."""
        unknown = sorted(set(components) - set(COMPONENTS))
        if unknown:
            raise FriendrecError(f"unknown component(s) {unknown}; known: {list(COMPONENTS)}")
        from friendrec.local_services import write_settings_file

        self.paths.logs.mkdir(parents=True, exist_ok=True)
        write_settings_file(self.settings, self.paths.settings)  # for clients: --config
        state = self.running()
        for name in COMPONENTS:
            if name not in components or name in state:
                continue
            started = time.perf_counter()
            pid, marker, address, log_path = self._starters()[name]()
            state[name] = {"pid": pid, "marker": marker, "address": address, "log": str(log_path)}
            self._write(state)
            log.info(
                "%s up at %s (pid %d, %.1f s)", name, address, pid, time.perf_counter() - started
            )
        return state

    def _starters(self) -> dict[str, Callable[[], tuple[int, str, str, Path]]]:
        return {
            "milvus": self._start_milvus,
            "tfserving": self._start_tfserving,
            "broker": self._start_broker,
            "service": self._start_service,
            **{w: (lambda w=w: self._start_worker(w)) for w in WORKERS},
        }

    def _start_milvus(self) -> tuple[int, str, str, Path]:
        from friendrec.local_services import MilvusLiteProcess

        uri = self.settings.milvus_uri
        host = urlparse(uri).hostname
        if host not in ("127.0.0.1", "localhost"):
            raise FriendrecError(f"milvus.uri {uri} is not local: nothing to start")
        server = MilvusLiteProcess(self.paths.root / "milvus", _port(uri), log_dir=self.paths.logs)
        server.start()
        assert server.proc is not None
        assert server.log_path is not None
        return server.proc.pid, "milvus-lite", uri, server.log_path

    def _start_tfserving(self) -> tuple[int, str, str, Path]:
        from friendrec.local_services import TFServingProcess

        model_root = self.settings.model_base_path / self.settings.serving.model_name
        if not any(p.name.isdigit() for p in model_root.glob("*")):
            raise NotPreparedError(
                f"no exported model under {model_root}: run `friendrec train` and "
                "`friendrec export` first"
            )
        server = TFServingProcess(
            self.settings, self.settings.tfserving.port, log_dir=self.paths.logs
        )
        server.start()
        assert server.proc is not None
        return server.proc.pid, "tfserving", server.address, server.log_path

    def _start_broker(self) -> tuple[int, str, str, Path]:
        from friendrec.local_services import TansuProcess

        first = self.settings.streaming.bootstrap_servers.split(",")[0]
        broker = TansuProcess(_port(first), log_dir=self.paths.logs)
        broker.start()
        assert broker.proc is not None
        assert broker.log_path is not None
        return broker.proc.pid, "tansu", broker.bootstrap_servers, broker.log_path

    def _start_service(self) -> tuple[int, str, str, Path]:
        import grpc

        from friendrec.local_services import FriendrecProcess
        from serving.client import RecommenderClient

        def answering() -> bool:  # SERVING needs a live index: being reachable is enough here
            with RecommenderClient(self.settings, timeout_s=1.0) as client:
                try:
                    client.health()
                except grpc.RpcError as exc:
                    return exc.code() != grpc.StatusCode.UNAVAILABLE
                return True

        process = FriendrecProcess(
            self.settings, ["serve"], self.paths.logs, name="service", ready=answering
        )
        process.start()
        assert process.pid is not None
        return process.pid, "friendrec serve", self.settings.serving.address, process.log_path

    def worker_settings(self, worker: str) -> Settings:
        """The stack's settings with this worker's heartbeat file."""
        streaming = self.settings.streaming.model_copy(
            update={"heartbeat_file": self.paths.root / "run" / f"{worker}.heartbeat"}
        )
        return self.settings.model_copy(update={"streaming": streaming})

    def _start_worker(self, worker: str) -> tuple[int, str, str, Path]:
        from friendrec.local_services import FriendrecProcess
        from streaming.worker import heartbeat_health

        settings = self.worker_settings(worker)
        assert settings.streaming.heartbeat_file is not None
        settings.streaming.heartbeat_file.unlink(missing_ok=True)

        def ready() -> bool:  # its partitions held and one whole poll loop done
            return heartbeat_health(settings).startswith("ready")

        process = FriendrecProcess(
            settings, ["stream", worker], self.paths.logs, name=worker, ready=ready
        )
        process.start()
        assert process.pid is not None
        address = self.settings.streaming.bootstrap_servers
        return process.pid, f"stream {worker}", address, process.log_path

    # -- down ------------------------------------------------------------------------------------
    def down(self, timeout: float = 20.0) -> list[str]:
        """Stop every running component, last started first: SIGTERM (workers finish their
        batch and commit), SIGKILL after ``timeout``. Returns the names stopped."""
        running = self.running()
        stopped = []
        for name in reversed(COMPONENTS):
            entry = running.get(name)
            if entry is None:
                continue
            pid = entry["pid"]
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                log.warning("%s (pid %d) ignored SIGTERM; killing it", name, pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            stopped.append(name)
            log.info("%s stopped", name)
        self.paths.state.unlink(missing_ok=True)
        return stopped

    def status(self) -> list[dict[str, Any]]:
        """Each recorded component: running or not (its pid is still the process we started);
        for the retrieval service its gRPC health (SERVING needs a live index), for a stream
        worker its heartbeat (ready, starting or stalled)."""
        recorded, running = self._read(), self.running()
        rows = []
        for name in COMPONENTS:
            if name not in recorded:
                continue
            row = {"component": name, "running": name in running, **recorded[name]}
            if name == "service":
                row["health"] = self.service_health() if name in running else "down"
            elif name in WORKERS:
                from streaming.worker import heartbeat_health

                row["health"] = (
                    heartbeat_health(self.worker_settings(name), recorded[name]["pid"])
                    if name in running
                    else "down: the process exited (see its log)"
                )
            rows.append(row)
        return rows

    def service_health(self) -> str:
        """The service's gRPC health status name, or UNREACHABLE: an error text."""
        import grpc

        from serving.client import RecommenderClient

        with RecommenderClient(self.settings, timeout_s=2.0) as client:
            try:
                return client.health()
            except grpc.RpcError as exc:
                return f"UNREACHABLE: {exc.code().name} {exc.details() or ''}".strip()
