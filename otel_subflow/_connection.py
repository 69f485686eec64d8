"""What we know about the Redis connection behind a client, cached per pool.

Address, port and db come from the pool's connection kwargs for free. The
``CLIENT ID`` and the server's ``run_id`` cost a round trip, so they are fetched
once per connection and never per call: we register a connect callback (redis-py's
``register_connect_callback``) on the pool's connections, and any (re)connect,
for instance to a restarted server, marks the ids stale. They are fetched again
after the next call that worked. A stale server run_id would turn into a wrong
verdict (a restart that did not happen), so this matters.
"""

from __future__ import annotations

import contextlib
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
    #: span_attributes(), built once per change of the ids (read-only for callers).
    _attrs: dict[str, Any] | None = dataclasses.field(default=None, repr=False, compare=False)

    def on_connect(self, connection: Any) -> None:
        """redis-py connect callback: a new or re-established connection has other ids."""
        self.fetched = False
        self.retry_at = 0.0

    def needs_fetch(self) -> bool:
        return not self.fetched and time.monotonic() >= self.retry_at

    def span_attributes(self) -> dict[str, Any]:
        """The connection's span attributes; the same dict until the ids change: do not modify it."""
        if self._attrs is not None:
            return self._attrs
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
        self._attrs = attrs
        return attrs

    def apply_fetch(self, client_id: Any, info_server: Any) -> None:
        self.client_id = int(client_id)
        if isinstance(info_server, dict):
            run_id = info_server.get("run_id")
            self.server_run_id = str(run_id) if run_id is not None else None
        self.fetched = True
        self._attrs = None

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
    _watch_connects(pool, info)
    with _cache_lock:
        _cache[pool] = info
    return info


class _PoolListener:
    """The connect callback of one pool: marks that pool's current info stale."""

    def __init__(self, pool: Any) -> None:
        self.pool = weakref.ref(pool)

    def on_connect(self, connection: Any) -> None:
        pool = self.pool()
        info = _cache.get(pool) if pool is not None else None
        if info is not None:
            info.on_connect(connection)

    def register(self, connection: Any) -> None:
        register = getattr(connection, "register_connect_callback", None)
        if register is not None:
            with contextlib.suppress(Exception):
                register(self.on_connect)


_listeners: weakref.WeakKeyDictionary[Any, _PoolListener] = weakref.WeakKeyDictionary()


def _watch_connects(pool: Any, info: ConnectionInfo) -> None:
    """Have every connection of ``pool``, present and future, report its (re)connects."""
    if pool in _listeners:
        return
    listener = _listeners[pool] = _PoolListener(pool)
    for attr in ("_available_connections", "_in_use_connections"):
        for connection in list(getattr(pool, attr, None) or ()):
            listener.register(connection)
    make = getattr(pool, "make_connection", None)
    if make is None:
        return

    def make_connection(*args: Any, **kwargs: Any) -> Any:
        connection = make(*args, **kwargs)
        listener.register(connection)
        return connection

    with contextlib.suppress(AttributeError, TypeError):
        pool.make_connection = make_connection


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


# The fetch runs on a connection of the application's own pool (CLIENT ID must
# name the app's connection), right after a call that worked, with our own read
# timeout: a slow or paused server costs the caller at most ``timeout_s``.


def fetch_ids_sync(client: Any, info: ConnectionInfo, timeout_s: float = 0.25) -> None:
    """One round trip (CLIENT ID + INFO server) once per connection; failures only delay a retry."""
    pool = _pool_of(client)
    if pool is None:
        return
    with internal_errors("connection.fetch_ids"), suppress_instrumentation():
        try:
            connection = pool.get_connection()
        except Exception:  # noqa: BLE001 - no connection to be had: try again later
            info.fetch_failed()
            return
        try:
            connection.send_command("CLIENT", "ID")
            connection.send_command("INFO", "server")
            client_id = connection.read_response(timeout=timeout_s)
            raw_info = connection.read_response(timeout=timeout_s)
            info.apply_fetch(client_id, _info_run_id(raw_info))
        except Exception:  # noqa: BLE001 - an ACL, a timeout, a dead server: never the caller's problem
            connection.disconnect()
            info.fetch_failed()
        finally:
            pool.release(connection)


async def fetch_ids_async(client: Any, info: ConnectionInfo, timeout_s: float = 0.25) -> None:
    """The ``redis.asyncio`` twin of :func:`fetch_ids_sync`."""
    pool = _pool_of(client)
    if pool is None:
        return
    with internal_errors("connection.fetch_ids"), suppress_instrumentation():
        try:
            connection = await pool.get_connection()
        except Exception:  # noqa: BLE001 - see fetch_ids_sync
            info.fetch_failed()
            return
        try:
            await connection.send_command("CLIENT", "ID")
            await connection.send_command("INFO", "server")
            client_id = await connection.read_response(timeout=timeout_s)
            raw_info = await connection.read_response(timeout=timeout_s)
            info.apply_fetch(client_id, _info_run_id(raw_info))
        except Exception:  # noqa: BLE001 - see fetch_ids_sync
            await connection.disconnect()
            info.fetch_failed()
        finally:
            await pool.release(connection)


def _info_run_id(raw: Any) -> dict[str, str]:
    if isinstance(raw, dict):
        return {"run_id": str(raw.get("run_id"))}
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    for line in text.splitlines():
        if line.startswith("run_id:"):
            return {"run_id": line.split(":", 1)[1].strip()}
    return {}
