"""A real ``redis-sentinel`` on loopback watching one master: failovers on demand for tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path

import redis
from redis.sentinel import Sentinel

from otel_subflow.lab.process import RedisServerError, ServerProcess
from otel_subflow.lab.servers import find_redis_server


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


class RedisSentinel(ServerProcess):
    """One Sentinel on 127.0.0.1 watching one master (quorum 1), with its config in a temp dir.

    Example::

        with RedisServer() as master, RedisSentinel(("127.0.0.1", master.port)) as sentinel:
            client = sentinel.sentinel().master_for(sentinel.service)
    """

    program = "redis-sentinel"
    kind = "sentinel"
    # ResponseError too: a Sentinel that does not know the master yet.
    not_ready_errors = (redis.ConnectionError, redis.TimeoutError, redis.ResponseError)

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
        super().__init__(port, workdir)
        self.master = master
        self.service = service
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms

    @property
    def config_path(self) -> Path:
        return self.workdir / f"sentinel-{self.port}.conf"

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

    def _prepare(self) -> None:
        self.config_path.write_text(self.config_text())  # Sentinel rewrites it: a fresh one each start

    def command(self) -> list[str]:
        command = find_redis_sentinel()
        return [command[0], str(self.config_path), *command[1:]]

    def ready(self) -> bool:
        """The Sentinel answers and names a master for the service."""
        return self.master_address() is not None

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


def _sentinel_fields(reply: object) -> dict[str, str]:
    """A SENTINEL REPLICAS / MASTERS entry (a flat name, value list, or a dict under RESP3) as a dict."""
    if isinstance(reply, dict):
        return {str(k): str(v) for k, v in reply.items()}
    items = list(reply) if isinstance(reply, (list, tuple)) else []
    return {str(items[i]): str(items[i + 1]) for i in range(0, len(items) - 1, 2)}
