"""Our own small Redis clients, next to the application's.

The analysis and the journal never borrow the application's pool: they need
their own short socket timeouts, must not compete for the app's connections,
and must work from a background thread even when the app uses ``redis.asyncio``.
Each is built from the app client's connection settings, pointed at the server
the app's connections actually reach (:func:`endpoint_of`), and cached per endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import threading
import weakref
from typing import Any

import redis
import redis.asyncio as aredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from otel_subflow._redis.connection import connection_info
from otel_subflow._redis.permissions import EndpointIdent, endpoint_ident

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
    return response  # parsed by us, field by field (see _probe.parse_info)


class Endpoint:
    """Connection settings of an application client, without the pool.

    ``address`` is the server the app's connections actually reach (``(host,
    port)``, or ``(socket path, None)``), as :class:`ConnectionInfo` learned it;
    it wins over the pool's kwargs, which name no server at all for a Sentinel
    pool. Build one with :func:`endpoint_of`, which returns ``None`` while the
    address is not known: never fall back to a default host.
    """

    def __init__(self, pool: Any, address: tuple[str, int | None] | None = None) -> None:
        kwargs: dict[str, Any] = dict(getattr(pool, "connection_kwargs", {}) or {})
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

    def _pool_kwargs(self, timeout_s: float, db: int | None) -> dict[str, Any]:
        """Our clients' settings: the app's endpoint, our short timeouts, no retries, str replies."""
        kwargs = dict(self.kwargs)
        if db is not None:
            kwargs["db"] = db
        kwargs.update(socket_timeout=timeout_s, socket_connect_timeout=timeout_s, max_connections=4,
                      decode_responses=True)
        return kwargs

    def sync_client(self, timeout_s: float, db: int | None = None) -> redis.Redis:
        klass = _SYNC_CLASSES[self.class_name]
        pool = redis.ConnectionPool(connection_class=klass, retry=_no_retry(),
                                    **_ssl_kwargs_for(klass, self._pool_kwargs(timeout_s, db)))
        client = redis.Redis(connection_pool=pool)
        client.set_response_callback("INFO", _raw_info)
        return client

    def async_client(self, timeout_s: float, db: int | None = None) -> aredis.Redis:
        klass = _ASYNC_CLASSES[self.class_name]
        pool = aredis.ConnectionPool(connection_class=klass, retry=_no_retry_async(),
                                     **_ssl_kwargs_for(klass, self._pool_kwargs(timeout_s, db)))
        client = aredis.Redis(connection_pool=pool)
        client.set_response_callback("INFO", _raw_info)
        return client


def sync_client_from_url(url: str, timeout_s: float) -> redis.Redis:
    client = redis.Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, decode_responses=True, retry=_no_retry()
    )
    client.set_response_callback("INFO", _raw_info)
    return client


def endpoint_of(app_client: Any) -> Endpoint | None:
    """Our client settings for the server ``app_client`` actually talks to, or ``None``.

    ``None`` when the client has no pool, or the pool's address is not known
    yet (a Sentinel pool before its first connection): skip the journal and the
    analysis then, never guess a host. The same object is returned until the
    address changes (after a Sentinel failover, a new one for the new master),
    so it can key caches.
    """
    info = connection_info(app_client)
    if info is None or info.address is None:
        return None
    endpoint = info.endpoint_cache
    if isinstance(endpoint, Endpoint):
        return endpoint
    endpoint = Endpoint(app_client.connection_pool, (info.address, info.port))
    info.endpoint_cache = endpoint
    return endpoint


_lock = threading.Lock()
_sync: dict[tuple[Any, ...], redis.Redis] = {}
_async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[Any, ...], aredis.Redis]] = (
    weakref.WeakKeyDictionary()
)


class Target:
    """A Redis endpoint we talk to for diagnostics: an app endpoint (maybe another db or host) or a URL."""

    def __init__(self, endpoint: Endpoint | None = None, db: int | None = None, url: str | None = None,
                 host: str | None = None, port: int | None = None) -> None:
        self.endpoint = endpoint
        self.db = db
        self.url = url
        self.host = host
        self.port = port

    @classmethod
    def of_client(cls, app_client: Any, db: int | None = None) -> Target | None:
        """The server ``app_client`` talks to; ``None`` when there is none or its address is not known yet."""
        endpoint = endpoint_of(app_client)
        return None if endpoint is None else cls(endpoint, db=db)

    def refusal_ident(self) -> EndpointIdent | None:
        """This target as the refusal registry names it (a URL's host, port and user)."""
        if self.url is not None:
            try:
                return endpoint_ident(redis.connection.parse_url(self.url))  # type: ignore[no-untyped-call]
            except ValueError:
                return None
        if self.endpoint is None:
            return None
        if self.host is not None:
            return endpoint_ident({**self.endpoint.kwargs, "path": None, "host": self.host, "port": self.port})
        return self.endpoint.refusal_ident()

    def ident(self, timeout_s: float) -> tuple[Any, ...]:
        if self.url is not None:
            return ("url", self.url, timeout_s)
        return (*self._app_endpoint().ident(self.db), self.host, self.port, timeout_s)

    def _app_endpoint(self) -> Endpoint:
        if self.endpoint is None:
            raise ValueError("a diagnostic target needs an application endpoint or a URL")
        return self.endpoint

    def _endpoint(self) -> Endpoint:
        endpoint = self._app_endpoint()
        if self.host is None and self.port is None:
            return endpoint
        moved = Endpoint.__new__(Endpoint)
        unix = endpoint.class_name == "UnixDomainSocketConnection"
        moved.class_name = "Connection" if unix else endpoint.class_name
        moved.kwargs = {k: v for k, v in endpoint.kwargs.items() if k != "path"}
        moved.kwargs.update({"host": self.host, "port": self.port})
        moved.db = endpoint.db
        return moved

    def sync_client(self, timeout_s: float) -> redis.Redis:
        key = self.ident(timeout_s)
        client = _sync.get(key)
        if client is None:
            with _lock:
                client = _sync.get(key)
                if client is None:
                    if self.url is not None:
                        client = sync_client_from_url(self.url, timeout_s)
                    else:
                        client = self._endpoint().sync_client(timeout_s, db=self.db)
                    _sync[key] = client
        return client

    def async_client(self, timeout_s: float) -> aredis.Redis:
        loop = asyncio.get_running_loop()
        per_loop = _async.setdefault(loop, {})
        key = self.ident(timeout_s)
        client = per_loop.get(key)
        if client is None:
            if self.url is not None:
                client = aredis.Redis.from_url(self.url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                               decode_responses=True, retry=_no_retry_async())
                client.set_response_callback("INFO", _raw_info)
            else:
                client = self._endpoint().async_client(timeout_s, db=self.db)
            per_loop[key] = client
        return client


def reset_clients() -> None:
    """Close and forget every diagnostic client (tests, reconfiguration)."""
    with _lock:
        clients = list(_sync.values())
        _sync.clear()
        _async.clear()
    for client in clients:
        client.close()
