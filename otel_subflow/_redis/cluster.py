"""Redis Cluster: the node that serves a key, and where a cluster's journal lives.

A decorated call on a ``redis.cluster.RedisCluster`` is a call on the master that serves the key's
slot. That node's own client (``ClusterNode.redis_connection``: the pool RedisCluster sends the
key's commands through) stands in for the cluster from then on: it gives the span's
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
from redis.cluster import RedisCluster

from otel_subflow._journal.schema import INDEX_KEY
from otel_subflow._runtime import runtime

Address = tuple[str, int | None]


def is_cluster(client: object) -> bool:
    return isinstance(client, RedisCluster)


def node_client(cluster: RedisCluster, key: str) -> redis.Redis | None:
    """The client of the master serving ``key`` (``None`` while the cluster knows no such node)."""
    node = cluster.get_node_from_key(key)  # type: ignore[no-untyped-call]
    client: redis.Redis | None = getattr(node, "redis_connection", None)
    if client is not None:
        remember(cluster, (node.host, node.port))
    return client


def remember(cluster: RedisCluster, address: Address) -> None:
    known = runtime.cluster_nodes.get(address)
    if known is None or known() is not cluster:
        runtime.cluster_nodes[address] = weakref.ref(cluster)


def cluster_at(address: Address | None) -> RedisCluster | None:
    """The cluster a node at ``address`` belongs to, if a call (or a watcher) has been there."""
    if address is None:
        return None
    ref = runtime.cluster_nodes.get(address)
    return None if ref is None else ref()


def journal_node(cluster: RedisCluster) -> redis.Redis | None:
    """The client of the master that holds the cluster's journal (its keys' slot)."""
    return node_client(cluster, INDEX_KEY)


def masters(cluster: RedisCluster) -> list[Any]:
    """The cluster's masters as it knows them now (``ClusterNode``), each remembered by address."""
    nodes = list(cluster.get_primaries())  # type: ignore[no-untyped-call]
    for node in nodes:
        remember(cluster, (node.host, node.port))
    return nodes


__all__ = ["cluster_at", "is_cluster", "journal_node", "masters", "node_client", "remember"]
