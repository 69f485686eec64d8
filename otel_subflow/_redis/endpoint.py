"""Where a Redis client's connections go, read from its pool once: the one parser of ``connection_kwargs``.

- :func:`pool_of` / :func:`pool_kwargs`: a client's pool and its settings (never the client's own state);
- :func:`endpoint_ident`: the endpoint as the refusal registry names it (address, port, user);
- :class:`Endpoint`: the app's settings without the pool, from which our own small clients
  (short timeouts, no retries) are built, pointed at the server the app reaches.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Mapping
from typing import Any, TypeVar

import redis
import redis.asyncio as aredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

#: (host or unix socket path, port or ``None`` for a socket, ACL user or ``None`` for ``default``).
EndpointIdent = tuple[str, int | None, str | None]


def pool_of(client: object) -> Any:
    """The connection pool of a redis-py client (sync or async), ``None`` for anything else."""
    return getattr(client, "connection_pool", None)


def is_redis_client(value: object) -> bool:
    """A Redis client: a connection pool (redis-py, sync or ``redis.asyncio``) or an ``execute_command``
    (``redis.cluster.RedisCluster`` has no pool). The redis-py *module* (Celery's ``RedisBackend.redis``)
    is not one."""
    if value is None or isinstance(value, type):
        return False
    return getattr(value, "connection_pool", None) is not None or callable(getattr(value, "execute_command", None))


def pool_kwargs(pool: object) -> dict[str, Any]:
    """A copy of the settings the pool's connections are made with (``{}`` if it has none)."""
    kwargs = getattr(pool, "connection_kwargs", None)
    return dict(kwargs) if isinstance(kwargs, Mapping) else {}


def endpoint_ident(source: Any) -> EndpointIdent | None:
    """The endpoint of a redis-py connection, client, pool or connection kwargs; ``None`` when not known.

    A pool whose kwargs name no host and no socket (Sentinel's ``master_for``)
    has no endpoint until one of its connections connected: pass the connection.
    """
    kwargs: Mapping[str, Any] | None = None
    if isinstance(source, Mapping):
        kwargs = source
    elif not hasattr(source, "read_response"):  # a client or a pool, not a connection
        holder = getattr(source, "connection_pool", source)
        kwargs = pool_kwargs(holder)
        if not kwargs:
            return None
    if kwargs is not None:
        path, host, port, username = kwargs.get("path"), kwargs.get("host"), kwargs.get("port"), kwargs.get("username")
    else:  # a connection
        path, host, port = getattr(source, "path", None), getattr(source, "host", None), getattr(source, "port", None)
        username = getattr(source, "username", None)
    user = str(username) if username else None
    if path:
        return (str(path), None, user)
    if host and port:
        try:
            return (str(host), int(port), user)
        except (TypeError, ValueError):
            return None
    return None


def describe_endpoint(endpoint: EndpointIdent) -> str:
    address, port, _ = endpoint
    return address if port is None else f"{address}:{port}"


def connection_address(connection: Any) -> tuple[str, int | None] | None:
    """``(host, port)`` or ``(socket path, None)`` of a redis-py connection, ``None`` if it has neither."""
    ident = endpoint_ident(connection)
    return None if ident is None else (ident[0], ident[1])


def pool_resolved_at_connect(pool: Any, kwargs: Any) -> bool:
    """A pool whose connections find their server at connect time (Sentinel): its kwargs name no server."""
    if "connection_pool" in kwargs:  # redis-py's Sentinel pools hand their connections a back-reference
        return True
    klass = getattr(pool, "connection_class", None)
    return any("Sentinel" in k.__name__ for k in getattr(klass, "__mro__", ()))


_SYNC_CLASSES: dict[str, type[redis.Connection] | type[redis.UnixDomainSocketConnection]] = {
    "Connection": redis.Connection,
    "SSLConnection": redis.SSLConnection,
    "UnixDomainSocketConnection": redis.UnixDomainSocketConnection,
}
_ASYNC_CLASSES: dict[str, Any] = {
    "Connection": aredis.Connection,
    "SSLConnection": aredis.SSLConnection,
    "UnixDomainSocketConnection": aredis.UnixDomainSocketConnection,
}
_COPIED = ("host", "port", "db", "username", "password", "path", "credential_provider")
#: TLS settings (``ssl_ca_certs``, ``ssl_certfile``, ``ssl_min_version``...) are all copied, for TLS only.
_SSL_PREFIX = "ssl_"


def _family(connection_class: Any) -> str:
    """Which of our connection classes matches the app's: plain TCP, TLS or a unix socket.

    By ancestry, so that subclasses (Sentinel's managed connections, TLS
    included) keep their transport.
    """
    if not isinstance(connection_class, type):
        return "Connection"
    if issubclass(connection_class, (redis.UnixDomainSocketConnection, aredis.UnixDomainSocketConnection)):
        return "UnixDomainSocketConnection"
    if issubclass(connection_class, (redis.SSLConnection, aredis.SSLConnection)):
        return "SSLConnection"
    return "Connection"


@functools.cache
def _accepted(connection_class: type) -> frozenset[str]:
    """Keyword arguments a connection class takes (its own and its bases')."""
    out: set[str] = set()
    for klass in connection_class.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        with contextlib.suppress(TypeError, ValueError):
            out.update(inspect.signature(init).parameters)
    return frozenset(out)


def _ssl_kwargs_for(connection_class: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` less the TLS settings ``connection_class`` does not take (sync and async differ a little)."""
    accepted = _accepted(connection_class)
    return {k: v for k, v in kwargs.items() if not k.startswith(_SSL_PREFIX) or k in accepted}


def _no_retry() -> Retry:
    # Our timeouts are the bound we promise: redis-py's default retries would multiply them.
    return Retry(NoBackoff(), 0)


def _no_retry_async() -> AsyncRetry:
    return AsyncRetry(NoBackoff(), 0)


def _raw_info(response: Any, **_: Any) -> Any:
    return response  # parsed by us, field by field (see _analysis/probe.py, parse_info)


class Endpoint:
    """Connection settings of an application client, without the pool.

    ``address`` is the server the app's connections actually reach (``(host,
    port)``, or ``(socket path, None)``), as :class:`ConnectionInfo` learned it;
    it wins over the pool's kwargs, which name no server at all for a Sentinel
    pool. Build one with :func:`endpoint_of`, which returns ``None`` while the
    address is not known: never fall back to a default host.
    """

    def __init__(self, pool: Any, address: tuple[str, int | None] | None = None) -> None:
        kwargs = pool_kwargs(pool)
        self.class_name = _family(getattr(pool, "connection_class", None))
        if address is not None:
            kwargs.pop("host", None)
            kwargs.pop("port", None)
            kwargs.pop("path", None)
            if address[1] is None:
                kwargs["path"] = address[0]
                self.class_name = "UnixDomainSocketConnection"
            else:
                kwargs["host"], kwargs["port"] = address
                if self.class_name == "UnixDomainSocketConnection":
                    self.class_name = "Connection"
        self.kwargs = {k: kwargs[k] for k in _COPIED if k in kwargs}
        if self.class_name == "SSLConnection":
            self.kwargs.update({k: v for k, v in kwargs.items() if k.startswith(_SSL_PREFIX)})
        if self.class_name == "UnixDomainSocketConnection":
            self.kwargs.pop("host", None)
            self.kwargs.pop("port", None)
        else:
            self.kwargs.pop("path", None)
        self.db = int(self.kwargs.get("db", 0) or 0)

    @property
    def address(self) -> tuple[str, int | None]:
        """``(host, port)``, or ``(socket path, None)``."""
        k = self.kwargs
        return (str(k["path"]), None) if k.get("path") else (str(k.get("host")), k.get("port"))

    def refusal_ident(self) -> EndpointIdent | None:
        """This endpoint as the refusal registry names it (:mod:`otel_subflow._redis.permissions`)."""
        return endpoint_ident(self.kwargs)

    def ident(self, db: int | None = None) -> tuple[Any, ...]:
        k = self.kwargs
        return (self.class_name, k.get("host"), k.get("port"), k.get("path"),
                self.db if db is None else db, k.get("username"))

    def label(self) -> str:
        """``host:port`` (or the socket path) for logs and metrics: never credentials."""
        k = self.kwargs
        if k.get("path"):
            return str(k["path"])
        return f"{k.get('host', '?')}:{k.get('port', '?')}"

    def _pool(self, family: Mapping[str, Any], pool_class: Any, retry: object, timeout_s: float,
              db: int | None) -> Any:
        """A pool for our clients: the app's endpoint, our short timeouts, no retries, str replies."""
        kwargs = dict(self.kwargs)
        if db is not None:
            kwargs["db"] = db
        kwargs.update(socket_timeout=timeout_s, socket_connect_timeout=timeout_s, max_connections=4,
                      decode_responses=True)
        klass = family[self.class_name]
        return pool_class(connection_class=klass, retry=retry, **_ssl_kwargs_for(klass, kwargs))

    def sync_client(self, timeout_s: float, db: int | None = None) -> redis.Redis:
        pool = self._pool(_SYNC_CLASSES, redis.ConnectionPool, _no_retry(), timeout_s, db)
        return _ours(redis.Redis(connection_pool=pool))

    def async_client(self, timeout_s: float, db: int | None = None) -> aredis.Redis:
        pool = self._pool(_ASYNC_CLASSES, aredis.ConnectionPool, _no_retry_async(), timeout_s, db)
        return _ours(aredis.Redis(connection_pool=pool))


_C = TypeVar("_C", redis.Redis, aredis.Redis)


def _ours(client: _C) -> _C:
    """INFO replies left raw: the analysis parses them field by field."""
    client.set_response_callback("INFO", _raw_info)
    return client


def sync_client_from_url(url: str, timeout_s: float) -> redis.Redis:
    return _ours(redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                      decode_responses=True, retry=_no_retry()))


def async_client_from_url(url: str, timeout_s: float) -> aredis.Redis:
    return _ours(aredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                       decode_responses=True, retry=_no_retry_async()))
