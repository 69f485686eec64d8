"""Redis Cluster: the node that serves a key, and where a cluster's journal lives.

A decorated call on a ``redis.cluster.RedisCluster`` (or ``redis.asyncio.cluster.RedisCluster``) is a
call on the master that serves the key's slot. That node's own client (``ClusterNode.redis_connection``:
the pool RedisCluster sends the key's commands through; for asyncio, a stand-in over the node's own
connections) stands in for the cluster from then on: it gives the span's
``server.address`` / ``server.port`` and client id, the analysis's probe, and the watcher election
(one watcher per master, as on single servers).

The journal's keys share one hash tag (:mod:`otel_subflow._journal.schema`), so a cluster keeps
them in one slot, on the master that serves it: the journal of every node of a cluster is there.
Its write script then samples no Redis counters (they would be the journal node's, not the key's),
and the analysis reads the key's node and the journal's node: two round trips at most. Each node a
call reached is remembered here by address, so that anything holding a client to a node (our own
watchers and analysis clients included) finds the cluster, and so its journal.
"""

from __future__ import annotations

import weakref
from typing import Any

import redis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster

from otel_subflow._journal.schema import INDEX_KEY
from otel_subflow._redis.clients import Target, endpoint_of
from otel_subflow._runtime import runtime

Address = tuple[str, int | None]


def is_cluster(client: object) -> bool:
    return isinstance(client, (RedisCluster, AsyncRedisCluster))


class _AsyncNodePool:
    """A ``redis.asyncio`` cluster node seen as the connection pool our connection info and id fetch read:
    its settings, and one of its own connections lent for the ids (the app's, as on a single server)."""

    def __init__(self, node: Any) -> None:
        self.node = node

    @property
    def connection_kwargs(self) -> Any:
        return self.node.connection_kwargs

    @property
    def connection_class(self) -> Any:
        return self.node.connection_class

    async def get_connection(self) -> Any:
        return self.node.acquire_connection()

    async def release(self, connection: Any) -> None:
        self.node.release(connection)


class AsyncNodeClient:
    """The stand-in for the client of one ``redis.asyncio`` cluster node (which has none of its own)."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.connection_pool = _AsyncNodePool(node)


def client_of(node: Any) -> Any:
    """The client of a cluster node: redis-py's own (sync), or our stand-in, one per node (asyncio)."""
    client = getattr(node, "redis_connection", None)
    if client is not None or not hasattr(node, "acquire_connection"):
        return client
    known = runtime.async_cluster_nodes.get(id(node))
    if known is None or known.node is not node:
        known = runtime.async_cluster_nodes[id(node)] = AsyncNodeClient(node)
    return known


def node_client(cluster: Any, key: str) -> Any:
    """The client of the master serving ``key`` (``None`` while the cluster knows no such node)."""
    node = cluster.get_node_from_key(key)
    client = None if node is None else client_of(node)
    if client is not None:
        remember(cluster, (node.host, node.port))
    return client


def remember(cluster: Any, address: Address) -> None:
    known = runtime.cluster_nodes.get(address)
    if known is None or known() is not cluster:
        runtime.cluster_nodes[address] = weakref.ref(cluster)


def cluster_at(address: Address | None) -> Any:
    """The cluster a node at ``address`` belongs to, if a call (or a watcher) has been there."""
    if address is None:
        return None
    ref = runtime.cluster_nodes.get(address)
    return None if ref is None else ref()


def journal_node(cluster: Any) -> Any:
    """The client of the master that holds the cluster's journal (its keys' slot)."""
    return node_client(cluster, INDEX_KEY)


def reads_replicas(cluster: Any) -> bool:
    """Whether the cluster client may send a read to a replica (then a miss may be a replica's lag)."""
    if getattr(cluster, "read_from_replicas", False):
        return True
    return getattr(cluster, "load_balancing_strategy", None) is not None  # (each one may pick a replica)


def node_target(cluster: Any, address: Address) -> Target | None:
    """Our client settings for one node: the cluster client's (password, TLS...), the node's address."""
    seed = next((c for c in map(client_of, masters(cluster)) if c is not None), None)
    endpoint = None if seed is None else endpoint_of(seed)
    return None if endpoint is None else Target(endpoint, host=address[0], port=address[1])


Slots = list[tuple[int, int]]


def live_slots(cluster: Any, timeout_s: float, ask_first: list[Address] | None = None) -> dict[Address, Slots]:
    """The masters and their slot ranges now, from ``CLUSTER SLOTS`` on our own client to a node the
    cluster client knows (never on the application's connections, never changing its view); the first
    node that answers is believed. Empty when none does."""
    known: list[Address] = [(str(n.host), int(n.port)) for n in masters(cluster)]
    for address in [*(ask_first or []), *known]:
        target = node_target(cluster, address)
        if target is None:
            continue
        try:
            reply = target.sync_client(timeout_s).execute_command("CLUSTER SLOTS")  # type: ignore[no-untyped-call]
        except redis.RedisError:
            continue  # that node is down: ask the next one
        found: dict[Address, Slots] = {}
        for entry in reply:
            host, port = entry[2][0], entry[2][1]
            node: Address = (host.decode() if isinstance(host, bytes) else str(host), int(port))
            found.setdefault(node, []).append((int(entry[0]), int(entry[1])))
        for node in found:
            remember(cluster, node)
        return found
    return {}


def masters(cluster: Any) -> list[Any]:
    """The cluster's masters as it knows them now (``ClusterNode``), each remembered by address."""
    nodes = list(cluster.get_primaries())
    for node in nodes:
        remember(cluster, (node.host, node.port))
    return nodes


__all__ = ["cluster_at", "is_cluster", "journal_node", "live_slots", "masters", "node_client", "node_target",
           "reads_replicas", "remember"]
