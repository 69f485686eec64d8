"""Everything otel-subflow keeps per process, in one object: :data:`runtime`.

Caches, registries and counters that outlive a call live here and nowhere else, so
that one :meth:`Runtime.reset` returns the process to a fresh start (tests, and a
reconfiguration), and a reader finds in one place what the package holds on to.
The code that uses each part lives with its idea (the journal registry in
``_journal/location.py``, the refusal registry's rules in ``_redis/permissions.py``...);
this module only owns the state.

Two things are installed once and survive :meth:`Runtime.reset`: the connect hooks
placed on the application's connection pools (``pool_hooks``), and the observable
instruments registered on the global meter provider (``registered_instruments``):
installing either twice would report everything twice.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any

from otel_subflow import names
from otel_subflow._analysis.limits import CircuitBreaker, TokenBucket
from otel_subflow._journal.races import INIT_FIELDS, TOMBSTONE_FIELDS, RecentMisses, RecentRecords
from otel_subflow._redis.permissions import RateLimitedLog, Refusals
from otel_subflow._watch.events import KeyTemplates

if TYPE_CHECKING:
    import redis
    import redis.asyncio as aredis

    from otel_subflow._config import SubflowConfig
    from otel_subflow._journal.schema import Writer
    from otel_subflow._journal.writer import Journal
    from otel_subflow._redis.connection import ConnectionInfo, PoolHook
    from otel_subflow._redis.endpoint import Endpoint
    from otel_subflow._telemetry.instruments import Instruments
    from otel_subflow._telemetry.setup import Telemetry
    from otel_subflow._watch.lease import Coordinator
    from otel_subflow._watch.watcher import KeyspaceWatcher

#: How many writer descriptions the journal readers keep (ids are content-addressed: never stale).
WRITER_CACHE_SIZE = 4096


class Runtime:
    """The process-wide state of otel-subflow (one instance: :data:`runtime`)."""

    def __init__(self) -> None:
        #: Guards the registries below while an entry is created.
        self.lock = threading.Lock()
        #: The rate-limited view of the ``otel_subflow`` logger (one line per cause a minute).
        self.log = RateLimitedLog(logging.getLogger(names.LOGGER_NAME))
        #: Set by ``set_config()``; ``None``: read from the environment on next use.
        self.config: SubflowConfig | None = None
        #: ``configure()``'s providers (the OpenTelemetry API lets them be set once: reset keeps them).
        self.telemetry: Telemetry | None = None
        #: The instruments of decorators given no providers (bound to the global ones).
        self.instruments: Instruments | None = None
        self.registered_instruments: set[str] = set()
        #: Started keyspace watchers by meter provider (one ``subflow.watcher.up`` gauge each).
        self.watchers_up: dict[object, weakref.WeakSet[KeyspaceWatcher]] = {}
        # -- Redis: what the servers refused, our own clients, what we know of the app's pools
        self.refusals = Refusals(log=self.log)
        self.sync_clients: dict[tuple[object, ...], redis.Redis] = {}
        self.async_clients: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[tuple[object, ...], aredis.Redis]] = weakref.WeakKeyDictionary()
        self.connections: weakref.WeakKeyDictionary[object, ConnectionInfo] = weakref.WeakKeyDictionary()
        self.pool_hooks: weakref.WeakKeyDictionary[object, PoolHook] = weakref.WeakKeyDictionary()
        # -- the miss analysis: its rate limit and the breaker of slow endpoints
        self.rate_limit: TokenBucket | None = None
        self.breaker = CircuitBreaker(log=self.log)
        # -- the journal: one writer per endpoint (and settings), and the readers' caches
        self.journals: dict[tuple[object, ...], Journal] = {}
        self.journals_by_endpoint: weakref.WeakKeyDictionary[Endpoint, Journal] = weakref.WeakKeyDictionary()
        self.journal_writers: collections.OrderedDict[str, Writer] = collections.OrderedDict()
        self.journal_indexes: dict[object, list[str]] = {}
        # -- Redis Cluster: each node a call or a watcher reached, by address -> its cluster (weakly)
        self.cluster_nodes: dict[tuple[str, int | None], weakref.ref[Any]] = {}
        # the stand-in clients of ``redis.asyncio`` cluster nodes (which have none), by id of the node
        self.async_cluster_nodes: dict[int, Any] = {}
        # -- races: this process's recent misses, inits and watcher tombstones
        self.recent_misses = RecentMisses(capacity=4096)
        self.recent_inits = RecentRecords(INIT_FIELDS)
        self.recent_tombstones = RecentRecords(TOMBSTONE_FIELDS)
        # -- watching: the lease-based election of keyspace watchers (``configure()`` starts it), and
        # the key templates the decorators were given (every watcher of the process parses them)
        self.watching: Coordinator | None = None
        self.key_templates = KeyTemplates()
        # -- our own failures, by place (the ``subflow.internal.errors`` metric)
        self.internal_errors: collections.Counter[str] = collections.Counter()

    def analysis_bucket(self, rate: float, burst: int) -> TokenBucket:
        """The analyses' token bucket (rebuilt when the configured rate changes)."""
        bucket = self.rate_limit
        if bucket is None or (bucket.rate, bucket.burst) != (rate, float(burst)):
            with self.lock:
                bucket = self.rate_limit
                if bucket is None or (bucket.rate, bucket.burst) != (rate, float(burst)):
                    bucket = self.rate_limit = TokenBucket(rate, burst)
        return bucket

    def reset(self, timeout_s: float = 1.0) -> None:
        """Stop watching, flush and drop the journals, close our clients, forget every cache and count."""
        watching, self.watching = self.watching, None
        if watching is not None:
            watching.stop(timeout_s)
        with self.lock:
            journals = list(self.journals.values())
            self.journals.clear()
            self.journals_by_endpoint.clear()
            clients = list(self.sync_clients.values())
            self.sync_clients.clear()
            self.async_clients.clear()
        for journal in journals:
            journal.shutdown(timeout_s)
        for client in clients:
            client.close()
        self.connections.clear()
        self.journal_writers.clear()
        self.journal_indexes.clear()
        self.cluster_nodes.clear()
        self.async_cluster_nodes.clear()
        self.refusals.forget()
        self.log.reset()
        self.breaker.clear()
        self.rate_limit = None
        self.recent_misses.clear()
        self.recent_inits.clear()
        self.recent_tombstones.clear()
        self.key_templates.clear()
        self.internal_errors.clear()
        self.config = None
        self.instruments = None

    def _after_fork_in_child(self) -> None:
        # A lock held by another thread at fork() would stay locked in the child forever. What
        # was learned stays (the child talks to the same servers as the same users); what the
        # parent's threads own (journal queues, watchers) is rebuilt by their own modules.
        self.lock = threading.Lock()
        self.refusals.after_fork()
        self.log.after_fork()
        self.breaker.after_fork()


runtime = Runtime()
os.register_at_fork(after_in_child=runtime._after_fork_in_child)
