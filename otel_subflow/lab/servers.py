"""The Redis servers the lab uses: a real ``redis-server`` it starts on loopback, or one it was given."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import redis

from otel_subflow._redis.endpoint import pool_kwargs
from otel_subflow.lab.process import RedisServerError, ServerProcess
from otel_subflow.lab.tls import TlsFiles


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


class RedisServer(ServerProcess):
    """One redis-server on 127.0.0.1 with persistence off, keyspace events on by default.

    Example::

        with RedisServer() as server:
            client = server.client()
    """

    # BusyLoadingError (a ConnectionError) too: a server loading data is not ready.
    not_ready_errors = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)

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
        super().__init__(port, workdir)
        self.notify_keyspace_events = notify_keyspace_events
        self.maxmemory = maxmemory
        self.maxmemory_policy = maxmemory_policy
        self.replicaof = replicaof
        self.extra_args = list(extra_args)
        self.password = password
        self.unixsocket = str(unixsocket) if unixsocket is not None else None
        self.tcp = tcp
        self.tls = tls

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
            "--logfile", str(self.log_path),
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

    def ready(self) -> bool:
        with contextlib.closing(self.client(socket_timeout=0.5)) as client:
            return bool(client.ping())

    def restart(self) -> None:
        """Stop and start on the same port: a new run_id and, without persistence, no data."""
        self.stop()
        self.start()

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


class ExternalServer:
    """A Redis the lab did not start (``--redis-url``): usable, never restarted or flushed."""

    def __init__(self, url: str) -> None:
        self._url = url
        probe = redis.Redis.from_url(url)
        kwargs = pool_kwargs(probe.connection_pool)
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
