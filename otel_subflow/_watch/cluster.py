"""``KeyspaceWatcher(cluster_client)``: one watcher per master of a Redis Cluster, following its topology.

Keyspace notifications are per node: a key's events come from the master that serves its slot. So a
cluster is watched by one :class:`~otel_subflow._watch.watcher.KeyspaceWatcher` per master, each on
a client of our own to that node (the cluster client's settings, the node's address). Every
``refresh_s`` a thread reads the masters (``CLUSTER SLOTS``, on our own client to a node it knows,
never on the application's connections): a new master (a replica promoted in a failover, a node
added) gets a watcher, a node that stopped being a master loses its own. Tombstones go to the
cluster's journal, on the master of the journal's slot (:mod:`otel_subflow._redis.cluster`).

The per-node watchers beat no heartbeat: the lease keys of the election are per server and would
not live on the node they describe.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from redis.cluster import RedisCluster

from otel_subflow._boundary import internal_errors
from otel_subflow._redis.cluster import Address, live_slots, masters, node_target, remember
from otel_subflow._watch.watcher import KeyspaceWatcher

_log = logging.getLogger("otel_subflow")


class ClusterWatcher(KeyspaceWatcher):
    """What ``KeyspaceWatcher(cluster_client, ...)`` returns: a watcher per master (same options)."""

    def __init__(self, client: RedisCluster, *, refresh_s: float = 2.0, **options: Any) -> None:
        self.cluster = client
        self.refresh_s = refresh_s
        self._options = {**options, "heartbeat": False}
        self._watchers: dict[Address, KeyspaceWatcher] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wait_s = 5.0

    # -- what the per-master watchers are doing ---------------------------------

    @property
    def watchers(self) -> dict[Address, KeyspaceWatcher]:
        """The watcher of each master, by address (a copy)."""
        with self._lock:
            return dict(self._watchers)

    @property
    def subscribed(self) -> bool:
        """True while every master known has a subscribed watcher."""
        current = self.watchers
        return bool(current) and all(w.subscribed for w in current.values())

    @property
    def last_error(self) -> str | None:
        errors = [w.last_error for w in self.watchers.values() if w.last_error]
        return errors[-1] if errors else None

    # -- the topology --------------------------------------------------------------

    def _node_client(self, address: Address) -> Any:
        target = node_target(self.cluster, address)
        return None if target is None else target.sync_client(float(self._options.get("socket_timeout_s", 2.0)))

    def _masters_now(self) -> list[Address]:
        """The masters now (``CLUSTER SLOTS`` on our own clients), else the cluster client's view."""
        live = live_slots(self.cluster, float(self._options.get("socket_timeout_s", 2.0)), list(self.watchers))
        return list(live) or [(str(n.host), int(n.port)) for n in masters(self.cluster)]

    def _sync(self) -> None:
        """Start a watcher on each new master; stop those of nodes that are no longer masters."""
        current = self._masters_now()
        with self._lock:
            gone = [a for a in self._watchers if a not in current]
            stopped = [self._watchers.pop(a) for a in gone]
        for watcher in stopped:
            watcher.stop(1.0)
        for address in current:
            if address in self.watchers:
                continue
            remember(self.cluster, address)  # before the watcher: its tombstones go to the cluster's journal
            client = self._node_client(address)
            if client is None:
                continue
            watcher = KeyspaceWatcher(client, **self._options).start(self._wait_s)
            with self._lock:
                self._watchers[address] = watcher

    def _follow(self) -> None:
        while not self._stop.wait(self.refresh_s):
            with internal_errors("cluster watcher"):
                self._sync()

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, wait_s: float = 5.0) -> KeyspaceWatcher:
        if self._thread is not None and self._thread.is_alive():
            return self
        self._wait_s = wait_s
        self._stop.clear()
        with internal_errors("cluster watcher"):
            self._sync()
        self._thread = threading.Thread(target=self._follow, name="otel-subflow-cluster-watcher", daemon=True)
        self._thread.start()
        return self

    def wait_subscribed(self, timeout_s: float = 10.0) -> bool:
        current = self.watchers
        return bool(current) and all(w.wait_subscribed(timeout_s) for w in current.values())

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        with self._lock:
            stopping = list(self._watchers.values())
            self._watchers.clear()
        for watcher in stopping:
            watcher.stop(timeout_s)


__all__ = ["ClusterWatcher"]
