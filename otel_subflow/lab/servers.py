"""Real ``redis-server`` processes on loopback, in a temp dir, for tests, the lab and the demo."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import redis


class RedisServerError(RuntimeError):
    """redis-server is missing, or did not start."""


def find_redis_server() -> str:
    """The redis-server binary: ``OTEL_SUBFLOW_REDIS_SERVER`` or the one on PATH."""
    explicit = os.environ.get("OTEL_SUBFLOW_REDIS_SERVER")
    found = explicit or shutil.which("redis-server")
    if not found:
        raise RedisServerError(
            "redis-server not found: install it (Debian: apt-get install redis-server) "
            "or set OTEL_SUBFLOW_REDIS_SERVER"
        )
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One redis-server on 127.0.0.1 with persistence off, keyspace events on by default.

    Example::

        with RedisServer() as server:
            client = server.client()
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        notify_keyspace_events: str = "Exeg",
        maxmemory: str | None = None,
        maxmemory_policy: str | None = None,
        replicaof: tuple[str, int] | None = None,
        extra_args: Sequence[str] = (),
        workdir: str | Path | None = None,
        password: str | None = None,
    ) -> None:
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.notify_keyspace_events = notify_keyspace_events
        self.maxmemory = maxmemory
        self.maxmemory_policy = maxmemory_policy
        self.replicaof = replicaof
        self.extra_args = list(extra_args)
        self.password = password
        self._own_dir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="subflow-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    # -- lifecycle ---------------------------------------------------------------

    def command(self) -> list[str]:
        args = [
            find_redis_server(),
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", str(self.workdir),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", str(self.workdir / f"redis-{self.port}.log"),
            "--notify-keyspace-events", self.notify_keyspace_events,
        ]
        if self.maxmemory:
            args += ["--maxmemory", self.maxmemory]
        if self.maxmemory_policy:
            args += ["--maxmemory-policy", self.maxmemory_policy]
        if self.replicaof:
            args += ["--replicaof", self.replicaof[0], str(self.replicaof[1])]
        if self.password:
            args += ["--requirepass", self.password]
        return args + self.extra_args

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        if self.running:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        client = self.client(socket_timeout=0.5)
        try:
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                    code = self.process.returncode
                    raise RedisServerError(f"redis-server exited with {code}: {err}{self.log_tail()}")
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    time.sleep(0.02)
            raise RedisServerError(f"redis-server on port {self.port} not ready after {timeout_s}s{self.log_tail()}")
        finally:
            client.close()

    def log_tail(self, lines: int = 20) -> str:
        log = self.workdir / f"redis-{self.port}.log"
        if not log.exists():
            return ""
        return "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop gracefully (SIGTERM; persistence is off, so nothing is saved)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout_s)
        if self.process.stderr:
            self.process.stderr.close()
        self.process = None

    def kill(self) -> None:
        """SIGKILL: the server dies mid-flight, as in a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        if self.process is not None and self.process.stderr:
            self.process.stderr.close()
        self.process = None

    def restart(self) -> None:
        """Stop and start on the same port: a new run_id and, without persistence, no data."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.cleanup()

    # -- clients -----------------------------------------------------------------

    def url(self, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/{db}"

    def client(self, db: int = 0, **kwargs: object) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port, db=db, password=self.password, **kwargs)  # type: ignore[arg-type]

    def run_id(self) -> str:
        with contextlib.closing(self.client()) as client:
            return str(client.info("server")["run_id"])


class ExternalServer:
    """A Redis the lab did not start (``--redis-url``): usable, never restarted or flushed."""

    def __init__(self, url: str) -> None:
        self._url = url
        probe = redis.Redis.from_url(url)
        kwargs = probe.connection_pool.connection_kwargs
        self.host = str(kwargs.get("host", "localhost"))
        self.port = int(kwargs.get("port", 6379))
        self.db = int(kwargs.get("db", 0) or 0)
        probe.close()

    def url(self, db: int | None = None) -> str:
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(self._url)
        return urlunsplit(parts._replace(path=f"/{self.db if db is None else db}"))

    def client(self, db: int | None = None, **kwargs: object) -> redis.Redis:
        return redis.Redis.from_url(self.url(db), **kwargs)  # type: ignore[arg-type]

    def cleanup(self) -> None:
        return None
