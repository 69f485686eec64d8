"""What we know about the Redis connection behind a client, cached per pool.

**Where the server is.** The address is the server the pool's connections
actually connect to. A plain pool names it in its connection kwargs (host and
port, or a unix socket path). A Sentinel pool (``Sentinel(...).master_for()``)
does not: its connections ask Sentinel at connect time. So every (re)connect of
one of the pool's connections reports the connection's own address, through a
connect callback (redis-py's ``register_connect_callback``), and the one-off id
fetch reads it off the connection it borrows. Until a connection has connected,
the address is unknown (``None``): spans carry no ``server.*`` attributes, and
our own clients (journal, analysis) are not built at all rather than pointed at
a default host. After a Sentinel failover the pool reconnects to the new master
and the address follows it.

**Ids.** The ``CLIENT ID`` and the server's ``run_id`` cost a round trip, so they
are fetched once per connection and never per call: a (re)connect marks them
stale, and they are fetched again after the next call that worked. A stale
server run_id would turn into a wrong verdict (a restart that did not happen).

**Doing no harm.** The fetch runs on a connection of the application's own pool.
It reads every reply it asked for, so an error reply (a restricted ACL user:
NOPERM) leaves the connection in sync, and it goes back to the pool as it was:
we never close or re-create an application's connection over a refusal. A
refused command is remembered per endpoint (:mod:`otel_subflow._redis.permissions`)
and not asked again, whatever reconnects. A read that times out is another
matter: the reply may still come, so the connection is out of sync and is
closed, exactly as redis-py closes its own timed-out connections; fetches then
back off exponentially (a reconnect does not reset the back-off).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import weakref
from typing import Any

from opentelemetry.instrumentation.utils import suppress_instrumentation
from redis.exceptions import ResponseError

from otel_subflow import names
from otel_subflow._boundary import internal_errors
from otel_subflow._redis.endpoint import (
    EndpointIdent,
    connection_address,
    endpoint_ident,
    pool_kwargs,
    pool_of,
    pool_resolved_at_connect,
)
from otel_subflow._runtime import runtime

#: Seconds before the first retry after a failed fetch (a timeout, no connection);
#: doubled after each further failure, up to :data:`_RETRY_MAX_S`.
_RETRY_AFTER_S = 30.0
_RETRY_MAX_S = 3600.0

CMD_CLIENT_ID = "CLIENT ID"
CMD_INFO = "INFO"
#: What each fetched command gives, for the refusal's log line.
_CONSEQUENCE = {
    CMD_CLIENT_ID: f"span attribute {names.ATTR_REDIS_CLIENT_ID} will be absent",
    CMD_INFO: f"span attribute {names.ATTR_REDIS_SERVER_RUN_ID} will be absent",
}
_COMMAND_ARGS = {CMD_CLIENT_ID: ("CLIENT", "ID"), CMD_INFO: ("INFO", "server")}


@dataclasses.dataclass
class ConnectionInfo:
    """Identity of the Redis endpoint a client talks to.

    ``address`` is the host (or the unix socket path, with ``port`` ``None``) of
    the server the pool's connections connect to; ``None`` until it is known.
    """

    address: str | None
    port: int | None
    db: int
    username: str | None = None
    client_id: int | None = None
    server_run_id: str | None = None
    pid: int = dataclasses.field(default_factory=os.getpid)
    fetched: bool = False
    retry_at: float = 0.0
    #: Failed fetches in a row (timeouts, no connection); the back-off doubles with each.
    failures: int = 0
    #: Bumped whenever the address changes (a Sentinel failover).
    address_version: int = 0
    #: Our own client settings for this address, kept here by :func:`otel_subflow._redis.clients.endpoint_of`
    #: and dropped when the address changes.
    endpoint_cache: Any = dataclasses.field(default=None, repr=False, compare=False)
    #: span_attributes(), built once per change of the ids (read-only for callers).
    _attrs: dict[str, Any] | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def endpoint_ident(self) -> EndpointIdent | None:
        """The endpoint as the refusal registry names it (no db: ACLs do not depend on it)."""
        if self.address is None:
            return None
        return (self.address, self.port, self.username)

    def learn_address(self, connection: Any) -> None:
        """Take the address a connection of the pool is connected (or connects) to."""
        address = connection_address(connection)
        if address is None or address == (self.address, self.port):
            return
        self.address, self.port = address
        self.address_version += 1
        self.endpoint_cache = None
        self._attrs = None

    def on_connect(self, connection: Any) -> None:
        """redis-py connect callback: a new or re-established connection has other ids, maybe another server.

        Runs inside the application's connect: cheap, no I/O, and it resets
        neither the back-off nor the refusals.
        """
        with internal_errors("connection.on_connect"):
            self.learn_address(connection)
            self.fetched = False

    def mark_stale(self) -> None:
        """The ids may be out of date (a connection error, a restart): fetch them after the next call that works."""
        self.fetched = False

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
        known = ((names.ATTR_SERVER_ADDRESS, self.address), (names.ATTR_SERVER_PORT, self.port),
                 (names.ATTR_REDIS_CLIENT_ID, self.client_id), (names.ATTR_REDIS_SERVER_RUN_ID, self.server_run_id))
        attrs.update((name, value) for name, value in known if value is not None)
        self._attrs = attrs
        return attrs

    def apply_fetch(self, client_id: Any, info_server: Any) -> None:
        """The fetched ids; ``None`` for one that was refused (or not asked): its attribute is dropped."""
        self.client_id = int(client_id) if client_id is not None else None
        if isinstance(info_server, dict):
            run_id = info_server.get("run_id")
            self.server_run_id = str(run_id) if run_id is not None else None
        elif info_server is None:
            self.server_run_id = None
        self.fetched = True
        self.failures = 0
        self.retry_at = 0.0
        self._attrs = None

    def fetch_failed(self) -> None:
        """A fetch failed (timeout, no connection): back off, twice as long as last time."""
        self.failures += 1
        delay = min(_RETRY_MAX_S, _RETRY_AFTER_S * 2.0 ** min(self.failures - 1, 32))
        self.retry_at = time.monotonic() + delay

    def commands_to_fetch(self) -> list[str]:
        """The id commands this endpoint has not refused."""
        ident = self.endpoint_ident
        return [c for c in (CMD_CLIENT_ID, CMD_INFO) if not runtime.refusals.is_refused(ident, c)]


def connection_info(client: Any) -> ConnectionInfo | None:
    """The cached info of ``client``'s pool, created (without any round trip) on first use."""
    pool = pool_of(client)
    if pool is None:
        return None
    info = runtime.connections.get(pool)
    if info is not None and info.pid == os.getpid():
        return info
    kwargs = pool_kwargs(pool)
    username = kwargs.get("username")
    fresh = ConnectionInfo(address=None, port=None, db=int(kwargs.get("db", 0) or 0),
                           username=str(username) if username else None)
    if info is not None and info.address is not None:
        fresh.address, fresh.port = info.address, info.port  # a forked child: the same server
    elif not pool_resolved_at_connect(pool, kwargs):
        ident = endpoint_ident(kwargs)
        if ident is not None:
            fresh.address, fresh.port = ident[0], ident[1]
    _watch_connects(pool, fresh)
    with runtime.lock:
        runtime.connections[pool] = fresh
    return fresh


class PoolHook:
    """The connect callback of one pool: reports each (re)connect to that pool's current info."""

    def __init__(self, pool: Any) -> None:
        self.pool = weakref.ref(pool)

    def on_connect(self, connection: Any) -> None:
        pool = self.pool()
        info = runtime.connections.get(pool) if pool is not None else None
        if info is not None:
            info.on_connect(connection)

    def register(self, connection: Any) -> None:
        register = getattr(connection, "register_connect_callback", None)
        if register is not None:
            with contextlib.suppress(Exception):
                register(self.on_connect)


def _watch_connects(pool: Any, info: ConnectionInfo) -> None:
    """Have every connection of ``pool``, present and future, report its (re)connects."""
    if pool in runtime.pool_hooks:
        return
    listener = runtime.pool_hooks[pool] = PoolHook(pool)
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
    """The ids of ``client``'s pool may be out of date (after a connection error or a restart).

    They are fetched again after the next call that works. The address, the
    back-off and the refusals are kept: a connection error says nothing about them.
    """
    pool = pool_of(client)
    info = runtime.connections.get(pool) if pool is not None else None
    if info is not None:
        info.mark_stale()


def note_server_run_id(client: Any, server_run_id: str) -> None:
    """The analysis read the server's run_id: refresh the cache if the server restarted."""
    info = connection_info(client)
    if info is not None and info.server_run_id not in (None, server_run_id):
        info.mark_stale()


# The fetch runs on a connection of the application's own pool (CLIENT ID must
# name the app's connection), right after a call that worked, with our own read
# timeout: a slow or paused server costs the caller at most ``timeout_s``.


def _begin_fetch(info: ConnectionInfo, connection: Any) -> list[str]:
    info.learn_address(connection)
    return info.commands_to_fetch()


def _finish_fetch(info: ConnectionInfo, commands: list[str], replies: list[Any]) -> None:
    """Apply the replies (values or error replies) of ``commands``; remember refusals."""
    values: dict[str, Any] = {}
    failed = False
    ident = info.endpoint_ident
    for command, reply in zip(commands, replies, strict=True):
        if isinstance(reply, Exception):
            if not runtime.refusals.note(ident, command, reply, consequence=_CONSEQUENCE[command]):
                failed = True  # an error reply that is no refusal (LOADING...): try again later
            continue
        values[command] = reply
    if failed:
        info.fetch_failed()
        return
    raw_info = values.get(CMD_INFO)
    info.apply_fetch(values.get(CMD_CLIENT_ID), _info_run_id(raw_info) if raw_info is not None else None)


def _nothing_to_fetch(info: ConnectionInfo) -> bool:
    """Every id command was refused and the address is known: no need to borrow a connection."""
    if info.address is not None and not info.commands_to_fetch():
        info.apply_fetch(None, None)
        return True
    return False


def _pool_to_fetch(client: object, info: ConnectionInfo) -> Any:
    """The client's pool when ids are due (a new connection, a reconnect), else ``None``."""
    pool = pool_of(client)
    return None if pool is None or _nothing_to_fetch(info) else pool


def fetch_ids_sync(client: object, info: ConnectionInfo, timeout_s: float = 0.25) -> None:
    """One round trip (CLIENT ID + INFO server, less what was refused) once per connection.

    Learns the pool's address from the borrowed connection. Failures only delay a retry.
    """
    pool = _pool_to_fetch(client, info)
    if pool is None:
        return
    with internal_errors("connection.fetch_ids"), suppress_instrumentation():
        try:
            connection = pool.get_connection()
        except Exception:  # noqa: BLE001 - no connection to be had: try again later
            info.fetch_failed()
            return
        try:
            commands = _begin_fetch(info, connection)
            replies = _read_ids_sync(connection, commands, timeout_s)
        except Exception:  # noqa: BLE001 - a timeout, a dead server: never the caller's problem
            info.fetch_failed()
        else:
            _finish_fetch(info, commands, replies)
        finally:
            pool.release(connection)


def _read_ids_sync(connection: Any, commands: list[str], timeout_s: float) -> list[Any]:
    """Send ``commands`` in one packet and read every reply (an error reply is a value)."""
    replies: list[Any] = []
    if not commands:
        return replies
    # No health-check PING of ours: the pool just checked the connection.
    connection.send_packed_command(connection.pack_commands([_COMMAND_ARGS[c] for c in commands]),
                                   check_health=False)
    for _ in commands:
        try:
            # disconnect_on_error: a read that timed out leaves the connection out of
            # sync; redis-py closes it (its default, which Sentinel's connections turn off).
            replies.append(connection.read_response(timeout=timeout_s, disconnect_on_error=True))
        except ResponseError as exc:
            replies.append(exc)  # an error reply: the connection is in sync, keep reading
    return replies


async def fetch_ids_async(client: object, info: ConnectionInfo, timeout_s: float = 0.25) -> None:
    """The ``redis.asyncio`` twin of :func:`fetch_ids_sync`."""
    pool = _pool_to_fetch(client, info)
    if pool is None:
        return
    with internal_errors("connection.fetch_ids"), suppress_instrumentation():
        try:
            connection = await pool.get_connection()
        except Exception:  # noqa: BLE001 - see fetch_ids_sync
            info.fetch_failed()
            return
        try:
            commands = _begin_fetch(info, connection)
            replies = await _read_ids_async(connection, commands, timeout_s)
        except Exception:  # noqa: BLE001 - see fetch_ids_sync
            info.fetch_failed()
        else:
            _finish_fetch(info, commands, replies)
        finally:
            await pool.release(connection)


async def _read_ids_async(connection: Any, commands: list[str], timeout_s: float) -> list[Any]:
    """:func:`_read_ids_sync` on a ``redis.asyncio`` connection."""
    replies: list[Any] = []
    if not commands:
        return replies
    await connection.send_packed_command(connection.pack_commands([_COMMAND_ARGS[c] for c in commands]),
                                         check_health=False)
    for _ in commands:
        try:
            reply = await connection.read_response(timeout=timeout_s)
        except ResponseError as exc:
            replies.append(exc)
            continue
        if reply is None:
            # redis.asyncio returns None when OUR timeout expired, and leaves the connection
            # as it is: out of sync (the reply may still come). Close it, as redis-py does
            # when its own socket timeout expires.
            await connection.disconnect(nowait=True)
            raise TimeoutError("CLIENT ID / INFO fetch timed out")
        replies.append(reply)
    return replies


def _info_run_id(raw: Any) -> dict[str, str]:
    if isinstance(raw, dict):
        return {"run_id": str(raw.get("run_id"))}
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    for line in text.splitlines():
        if line.startswith("run_id:"):
            return {"run_id": line.split(":", 1)[1].strip()}
    return {}
