"""What we know about the Redis connection behind a client, cached per pool.

Address, port and db come from the pool's connection kwargs for free. The
``CLIENT ID`` and the server's ``run_id`` cost a round trip, so they are fetched
once per pool and process (pools reconnect after fork) and never per call.
After a connection error the entry is dropped: a reconnect means a new client id.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import weakref
from typing import Any

from opentelemetry.instrumentation.utils import suppress_instrumentation

from otel_subflow import names
from otel_subflow._boundary import internal_errors

#: Seconds to wait before fetching ids again after a failed fetch.
_RETRY_AFTER_S = 30.0


@dataclasses.dataclass
class ConnectionInfo:
    """Identity of the Redis endpoint a client talks to."""

    address: str | None
    port: int | None
    db: int
    client_id: int | None = None
    server_run_id: str | None = None
    pid: int = dataclasses.field(default_factory=os.getpid)
    fetched: bool = False
    retry_at: float = 0.0

    def needs_fetch(self) -> bool:
        return not self.fetched and time.monotonic() >= self.retry_at

    def span_attributes(self) -> dict[str, Any]:
        attrs: dict[str, Any] = {
            names.ATTR_DB_SYSTEM_NAME: names.DB_SYSTEM_REDIS,
            names.ATTR_DB_NAMESPACE: str(self.db),
        }
        if self.address is not None:
            attrs[names.ATTR_SERVER_ADDRESS] = self.address
        if self.port is not None:
            attrs[names.ATTR_SERVER_PORT] = self.port
        if self.client_id is not None:
            attrs[names.ATTR_REDIS_CLIENT_ID] = self.client_id
        if self.server_run_id is not None:
            attrs[names.ATTR_REDIS_SERVER_RUN_ID] = self.server_run_id
        return attrs

    def apply_fetch(self, client_id: Any, info_server: Any) -> None:
        self.client_id = int(client_id)
        if isinstance(info_server, dict):
            run_id = info_server.get("run_id")
            self.server_run_id = str(run_id) if run_id is not None else None
        self.fetched = True

    def fetch_failed(self) -> None:
        self.retry_at = time.monotonic() + _RETRY_AFTER_S


_cache: weakref.WeakKeyDictionary[Any, ConnectionInfo] = weakref.WeakKeyDictionary()
_cache_lock = threading.Lock()


def _pool_of(client: Any) -> Any:
    return getattr(client, "connection_pool", None)


def connection_info(client: Any) -> ConnectionInfo | None:
    """The cached info of ``client``'s pool, created (without any round trip) on first use."""
    pool = _pool_of(client)
    if pool is None:
        return None
    info = _cache.get(pool)
    if info is not None and info.pid == os.getpid():
        return info
    kwargs: dict[str, Any] = getattr(pool, "connection_kwargs", {}) or {}
    path = kwargs.get("path")
    if path:
        address, port = str(path), None
    else:
        address, port = str(kwargs.get("host", "localhost")), int(kwargs.get("port", 6379))
    info = ConnectionInfo(address=address, port=port, db=int(kwargs.get("db", 0) or 0))
    with _cache_lock:
        _cache[pool] = info
    return info


def forget_connection(client: Any) -> None:
    """Drop the cached ids of ``client``'s pool (after a connection error or a restart)."""
    pool = _pool_of(client)
    if pool is not None:
        with _cache_lock:
            _cache.pop(pool, None)


def note_server_run_id(client: Any, server_run_id: str) -> None:
    """The analysis read the server's run_id: refresh the cache if the server restarted."""
    info = connection_info(client)
    if info is not None and info.server_run_id not in (None, server_run_id):
        forget_connection(client)


def fetch_ids_sync(client: Any, info: ConnectionInfo) -> None:
    """One round trip (CLIENT ID + INFO server), once per pool; failures only delay a retry."""
    with internal_errors("connection.fetch_ids"), suppress_instrumentation():
        try:
            pipe = client.pipeline(transaction=False)
            pipe.client_id()
            pipe.info("server")
            client_id, info_server = pipe.execute()
        except Exception:  # noqa: BLE001 - an ACL or a dead server must not break the user's call
            info.fetch_failed()
            return
        info.apply_fetch(client_id, info_server)


async def fetch_ids_async(client: Any, info: ConnectionInfo) -> None:
    """The ``redis.asyncio`` twin of :func:`fetch_ids_sync`."""
    with internal_errors("connection.fetch_ids"), suppress_instrumentation():
        try:
            pipe = client.pipeline(transaction=False)
            pipe.client_id()
            pipe.info("server")
            client_id, info_server = await pipe.execute()
        except Exception:  # noqa: BLE001 - see fetch_ids_sync
            info.fetch_failed()
            return
        info.apply_fetch(client_id, info_server)
