"""Real ``redis-server`` and ``redis-sentinel`` processes on loopback, in a temp dir, for tests and the lab."""

from __future__ import annotations

import contextlib
import dataclasses
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
from redis.sentinel import Sentinel


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


def find_redis_sentinel() -> list[str]:
    """The command that starts a Sentinel: ``OTEL_SUBFLOW_REDIS_SENTINEL``, ``redis-sentinel`` on PATH,
    else ``redis-server --sentinel`` (the same program in Debian's packages)."""
    explicit = os.environ.get("OTEL_SUBFLOW_REDIS_SENTINEL") or shutil.which("redis-sentinel")
    if explicit:
        return [explicit]
    try:
        return [find_redis_server(), "--sentinel"]
    except RedisServerError:
        raise RedisServerError(
            "redis-sentinel not found: install it (Debian: apt-get install redis-sentinel) "
            "or set OTEL_SUBFLOW_REDIS_SENTINEL"
        ) from None


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """A throw-away CA and a server certificate for 127.0.0.1 / localhost (see :func:`make_tls_files`)."""

    ca_cert: Path
    cert: Path
    key: Path


def make_tls_files(directory: str | Path) -> TlsFiles:
    """Create a CA and a server certificate with the ``openssl`` command (raises RedisServerError without it)."""
    openssl = shutil.which("openssl")
    if not openssl:
        raise RedisServerError("openssl not found: needed to make test certificates")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert, key, csr, cert = (d / n for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt"))
    ext = d / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    steps = [
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=otel-subflow test CA",
         "-keyout", str(ca_key), "-out", str(ca_cert)],
        [openssl, "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
         "-keyout", str(key), "-out", str(csr)],
        [openssl, "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key), "-CAcreateserial",
         "-days", "2", "-extfile", str(ext), "-out", str(cert)],
    ]
    for step in steps:
        proc = subprocess.run(step, capture_output=True, text=True, check=False, timeout=60)
        if proc.returncode != 0:
            raise RedisServerError(f"openssl failed: {proc.stderr[-500:]}")
    return TlsFiles(ca_cert=ca_cert, cert=cert, key=key)


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
        unixsocket: str | Path | None = None,
        tcp: bool = True,
        tls: TlsFiles | None = None,
    ) -> None:
        """``unixsocket``: also listen on that socket; ``tcp=False``: only there (clients use it).
        ``tls``: the port speaks TLS only (clients use the CA of ``tls``)."""
        if not tcp and unixsocket is None:
            raise ValueError("tcp=False needs a unixsocket")
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.notify_keyspace_events = notify_keyspace_events
        self.maxmemory = maxmemory
        self.maxmemory_policy = maxmemory_policy
        self.replicaof = replicaof
        self.extra_args = list(extra_args)
        self.password = password
        self.unixsocket = str(unixsocket) if unixsocket is not None else None
        self.tcp = tcp
        self.tls = tls
        self._own_dir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="subflow-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    # -- lifecycle ---------------------------------------------------------------

    def command(self) -> list[str]:
        if self.tls is not None:
            listen = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls.cert),
                      "--tls-key-file", str(self.tls.key), "--tls-ca-cert-file", str(self.tls.ca_cert),
                      "--tls-auth-clients", "no"]
        else:
            listen = ["--port", str(self.port) if self.tcp else "0"]
        if self.unixsocket is not None:
            listen += ["--unixsocket", self.unixsocket, "--unixsocketperm", "700"]
        args = [
            find_redis_server(),
            *listen,
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
        if not self.tcp:
            return f"unix://{auth}{self.unixsocket}?db={db}"
        scheme = "rediss" if self.tls is not None else "redis"
        return f"{scheme}://{auth}{self.host}:{self.port}/{db}"

    def client(self, db: int = 0, **kwargs: object) -> redis.Redis:
        """A client over TCP (TLS when the server speaks it), or over the unix socket when TCP is off."""
        if not self.tcp:
            return redis.Redis(unix_socket_path=self.unixsocket, db=db, password=self.password, **kwargs)  # type: ignore[arg-type]
        if self.tls is not None:
            kwargs = {"ssl": True, "ssl_ca_certs": str(self.tls.ca_cert), **kwargs}
        return redis.Redis(host=self.host, port=self.port, db=db, password=self.password, **kwargs)  # type: ignore[arg-type]

    def run_id(self) -> str:
        with contextlib.closing(self.client()) as client:
            return str(client.info("server")["run_id"])


class RedisSentinel:
    """One Sentinel on 127.0.0.1 watching one master (quorum 1), with its config in a temp dir.

    Example::

        with RedisServer() as master, RedisSentinel(("127.0.0.1", master.port)) as sentinel:
            client = sentinel.sentinel().master_for(sentinel.service)
    """

    def __init__(
        self,
        master: tuple[str, int],
        *,
        service: str = "mymaster",
        port: int | None = None,
        quorum: int = 1,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
        workdir: str | Path | None = None,
    ) -> None:
        self.master = master
        self.service = service
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self._own_dir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="subflow-sentinel-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.workdir / f"sentinel-{self.port}.conf"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"sentinel-{self.port}.log"

    def config_text(self) -> str:
        s, (host, port) = self.service, self.master
        return "\n".join([
            f"port {self.port}",
            f"bind {self.host}",
            "daemonize no",
            f"dir {self.workdir}",
            f"logfile {self.log_path}",
            f"sentinel monitor {s} {host} {port} {self.quorum}",
            f"sentinel down-after-milliseconds {s} {self.down_after_ms}",
            f"sentinel failover-timeout {s} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {s} 1",
            "",
        ])

    def start(self, timeout_s: float = 10.0) -> RedisSentinel:
        if self.running:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text())  # Sentinel rewrites it: a fresh one each start
        command = find_redis_sentinel()
        argv = [command[0], str(self.config_path), *command[1:]]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        start_new_session=True)
        self.wait_ready(timeout_s)
        return self

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        """Until the Sentinel answers and names a master for the service."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise RedisServerError(f"redis-sentinel exited with {self.process.returncode}: {err}{self.log_tail()}")
            with contextlib.suppress(redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
                if self.master_address() is not None:
                    return
            time.sleep(0.02)
        raise RedisServerError(f"redis-sentinel on port {self.port} not ready after {timeout_s}s{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.exists():
            return ""
        return "\n" + "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self, **kwargs: object) -> redis.Redis:
        """A client to the Sentinel itself (SENTINEL commands)."""
        return redis.Redis(host=self.host, port=self.port, socket_timeout=2, **kwargs)  # type: ignore[arg-type]

    def sentinel(self, **connection_kwargs: object) -> Sentinel:
        """redis-py's Sentinel manager on this Sentinel (``.master_for(self.service)`` gives a client)."""
        return Sentinel([(self.host, self.port)], socket_timeout=2, **connection_kwargs)  # type: ignore[no-untyped-call]

    def master_address(self) -> tuple[str, int] | None:
        """The master the Sentinel names for the service now."""
        with contextlib.closing(self.client()) as client:
            reply = client.execute_command("SENTINEL", "get-master-addr-by-name", self.service)  # type: ignore[no-untyped-call]
        if not reply:
            return None
        host, port = (x.decode() if isinstance(x, bytes) else str(x) for x in reply)
        return host, int(port)

    def wait_replicas(self, count: int, timeout_s: float = 30.0) -> None:
        """Until the Sentinel knows ``count`` healthy replicas of the master (needed before a failover)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.closing(self.client(decode_responses=True)) as client:
                replicas = client.execute_command("SENTINEL", "REPLICAS", self.service)  # type: ignore[no-untyped-call]
            healthy = [r for r in replicas if _sentinel_fields(r).get("flags") == "slave"
                       and _sentinel_fields(r).get("master-link-status") == "ok"]
            if len(healthy) >= count:
                return
            time.sleep(0.05)
        raise RedisServerError(f"Sentinel did not see {count} healthy replica(s) in {timeout_s}s{self.log_tail()}")

    def failover(self, timeout_s: float = 30.0) -> tuple[str, int]:
        """``SENTINEL FAILOVER``, then wait until the Sentinel names another master; returns it."""
        old = self.master_address()
        with contextlib.closing(self.client()) as client:
            client.execute_command("SENTINEL", "FAILOVER", self.service)  # type: ignore[no-untyped-call]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            new = self.master_address()
            if new is not None and new != old:
                return new
            time.sleep(0.05)
        raise RedisServerError(f"no failover in {timeout_s}s{self.log_tail()}")

    def stop(self, timeout_s: float = 10.0) -> None:
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

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RedisSentinel:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.cleanup()


def _sentinel_fields(reply: object) -> dict[str, str]:
    """A SENTINEL REPLICAS / MASTERS entry (a flat name, value list, or a dict under RESP3) as a dict."""
    if isinstance(reply, dict):
        return {str(k): str(v) for k, v in reply.items()}
    items = list(reply) if isinstance(reply, (list, tuple)) else []
    return {str(items[i]): str(items[i + 1]) for i in range(0, len(items) - 1, 2)}


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
