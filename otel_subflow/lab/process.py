"""A server the lab runs as a child process on loopback: its port, temp dir, start, readiness, stop, log.

:class:`~otel_subflow.lab.servers.RedisServer` and
:class:`~otel_subflow.lab.sentinel.RedisSentinel` share this lifecycle; each says
only how it is started and when it counts as ready.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import redis


class RedisServerError(RuntimeError):
    """redis-server (or redis-sentinel) is missing, or did not start."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_P = TypeVar("_P", bound="ServerProcess")


class ServerProcess:
    """One server process on 127.0.0.1, in its own session, with its files in ``workdir`` (a temp dir by default)."""

    #: The program, as messages name it.
    program = "redis-server"
    #: The start of its file names (``<kind>-<port>.log``) and of its temp dir.
    kind = "redis"
    #: What ``ready()`` may raise while the server is still starting.
    not_ready_errors: tuple[type[Exception], ...] = (redis.ConnectionError, redis.TimeoutError)

    def __init__(self, port: int | None, workdir: str | Path | None) -> None:
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self._own_dir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix=f"subflow-{self.kind}-"))
        self.process: subprocess.Popen[bytes] | None = None

    # -- what each server says ---------------------------------------------------

    def command(self) -> list[str]:
        """The argv that starts the server."""
        raise NotImplementedError

    def ready(self) -> bool:
        """Whether the server answers as it should once started."""
        raise NotImplementedError

    def _prepare(self) -> None:
        """Before each start, with ``workdir`` created (e.g. write a config file)."""

    # -- lifecycle ---------------------------------------------------------------

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.kind}-{self.port}.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self: _P, timeout_s: float = 10.0) -> _P:
        if self.running:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._prepare()
        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        """Until :meth:`ready`; a server that exits meanwhile raises at once, with its stderr and log."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise RedisServerError(f"{self.program} exited with {self.process.returncode}: {err}{self.log_tail()}")
            with contextlib.suppress(*self.not_ready_errors):
                if self.ready():
                    return
            time.sleep(0.02)
        raise RedisServerError(f"{self.program} on port {self.port} not ready after {timeout_s}s{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.exists():
            return ""
        return "\n" + "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop gracefully: SIGTERM, and SIGKILL when it has not exited after ``timeout_s``."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout_s)
        self._forget_process()

    def kill(self) -> None:
        """SIGKILL: the server dies mid-flight, as in a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._forget_process()

    def _forget_process(self) -> None:
        if self.process is not None and self.process.stderr:
            self.process.stderr.close()
        self.process = None

    def cleanup(self) -> None:
        """Stop, and remove the temp dir when the server made it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self: _P) -> _P:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.cleanup()
