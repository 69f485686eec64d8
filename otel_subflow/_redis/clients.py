"""Our own small Redis clients, next to the application's.

The analysis and the journal never borrow the application's pool: they need
their own short socket timeouts, must not compete for the app's connections,
and must work from a background thread even when the app uses ``redis.asyncio``.
Each is built from the app client's connection settings, pointed at the server
the app's connections actually reach (:func:`endpoint_of`), and cached per endpoint.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import redis
import redis.asyncio as aredis

from otel_subflow._redis.connection import connection_info
from otel_subflow._redis.endpoint import (
    Endpoint,
    EndpointIdent,
    async_client_from_url,
    endpoint_ident,
    sync_client_from_url,
)
from otel_subflow._runtime import runtime


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


@dataclasses.dataclass(frozen=True, eq=False)
class Target:
    """A Redis endpoint we talk to for diagnostics: an app endpoint (maybe another db or host) or a URL."""

    endpoint: Endpoint | None = None
    db: int | None = None
    url: str | None = None
    host: str | None = None
    port: int | None = None

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
        client = runtime.sync_clients.get(key)
        if client is None:
            with runtime.lock:
                client = runtime.sync_clients.get(key)
                if client is None:
                    if self.url is not None:
                        client = sync_client_from_url(self.url, timeout_s)
                    else:
                        client = self._endpoint().sync_client(timeout_s, db=self.db)
                    runtime.sync_clients[key] = client
        return client

    def async_client(self, timeout_s: float) -> aredis.Redis:
        loop = asyncio.get_running_loop()
        per_loop = runtime.async_clients.setdefault(loop, {})
        key = self.ident(timeout_s)
        client = per_loop.get(key)
        if client is None:
            if self.url is not None:
                client = async_client_from_url(self.url, timeout_s)
            else:
                client = self._endpoint().async_client(timeout_s, db=self.db)
            per_loop[key] = client
        return client
