"""Watching with no extra process: one keyspace watcher per Redis master, elected by a lease.

Every process that ``configure()`` (or the zero-code instrumentor) set up takes
part: each Redis master its decorators talk to is noticed on the first init or
miss, and a background thread then runs one command per master every
:data:`LEASE_EVERY_S` seconds, the lease script: it takes the lease when it is
free, renews it when this process holds it, and does nothing otherwise. The
holder runs a :class:`~otel_subflow._watch.watcher.KeyspaceWatcher` for that master;
when it dies its lease expires (:data:`LEASE_TTL_S`) and the next process to run
the script takes over. So exactly one process watches each master, across hosts.

The lease key, ``{subflow:journal}:watcher`` in db 0 of the watched master, is
also the watcher's heartbeat: its value names the holder and whether its watcher
is subscribed, and the analysis of a miss reads it to know whether a tombstone
could still be on its way (:func:`heartbeat_alive`). A watcher started by hand
beats the same key (and so keeps elected watchers away from its master).

Replicas never take the lease (their ``SET`` fails with READONLY): they do not
expire or evict on their own. A user whose ACL refuses the script is noted once
and not asked again (:data:`~otel_subflow._redis.permissions.refusals`).
``OTEL_SUBFLOW_WATCH=false`` turns it all off.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import uuid
from typing import TYPE_CHECKING, Any

import redis
from opentelemetry.instrumentation.utils import suppress_instrumentation
from redis.crc import key_slot

from otel_subflow import names
from otel_subflow._boundary import internal_errors
from otel_subflow._config import SubflowConfig, get_config
from otel_subflow._identity import identity
from otel_subflow._redis.clients import Target
from otel_subflow._redis.cluster import cluster_at, live_slots, node_target
from otel_subflow._redis.permissions import is_refusal
from otel_subflow._runtime import runtime

if TYPE_CHECKING:
    from otel_subflow._watch.watcher import KeyspaceWatcher

_log = logging.getLogger(names.LOGGER_NAME)

#: The lease and heartbeat key, in db 0 of the watched master.
LEASE_KEY = names.JOURNAL_KEY_PREFIX + "watcher"
#: Seconds between two runs of the lease script, per process and master.
LEASE_EVERY_S = 5.0
#: The lease's TTL: a dead holder is replaced within this plus one period.
LEASE_TTL_S = 10.0
#: The state a holder announces: its watcher is subscribed, or not (yet).
SUBSCRIBED, NOT_SUBSCRIBED = "subscribed", "waiting"
_TIMEOUT_S = 1.0

# Take the lease when free, renew it when ours (the value starts with our token), else nothing.
# KEYS[1] the lease; ARGV: our token, our state, the TTL in ms. Returns 1 when we hold it.
_LEASE_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if current == false or string.sub(current, 1, #ARGV[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1] .. ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""
_LEASE_SHA = hashlib.sha1(_LEASE_SCRIPT.encode()).hexdigest()


def new_token() -> str:
    """Who holds a lease: host, pid and a random part, then ``|`` and the holder's state."""
    return f"{identity.host} {identity.pid} {uuid.uuid4().hex[:12]}|"


def heartbeat_alive(value: Any) -> bool:
    """Whether a lease value (GET of :data:`LEASE_KEY`) says a subscribed watcher is alive."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return isinstance(value, str) and value.endswith("|" + SUBSCRIBED)


def cluster_lease_key(slots: list[tuple[int, int]]) -> str | None:
    """A lease key for a Redis Cluster's master: one whose hash tag falls in a slot it serves (each master
    holds its own lease: :data:`LEASE_KEY`'s slot is one master's)."""
    for n in range(100_000):
        key = f"{{subflow:watcher:{n}}}"
        slot = key_slot(key.encode())
        if any(low <= slot <= high for low, high in slots):
            return key
    return None


class Lease:
    """One process's side of the lease on one master: :meth:`beat` runs the script once."""

    def __init__(self, client: redis.Redis, token: str | None = None, key: str = LEASE_KEY) -> None:
        self.client = client
        self.token = token or new_token()
        self.key = key

    def beat(self, subscribed: bool) -> bool:
        """Take or renew the lease (one EVALSHA; EVAL the first time on a server); True when ours."""
        args = (self.key, self.token, SUBSCRIBED if subscribed else NOT_SUBSCRIBED, int(LEASE_TTL_S * 1000))
        with suppress_instrumentation():
            try:
                held = self.client.evalsha(_LEASE_SHA, 1, *args)
            except redis.exceptions.NoScriptError:  # EVAL caches it (no SCRIPT LOAD: fewer grants)
                held = self.client.eval(_LEASE_SCRIPT, 1, *args)
        return bool(int(held))

    def release(self) -> None:
        """Give the lease up now if it is ours (at a clean stop), so another process takes over at once."""
        with suppress_instrumentation(), contextlib.suppress(redis.RedisError):
            value = self.client.get(self.key)
            text = value.decode() if isinstance(value, bytes) else value
            if isinstance(text, str) and text.startswith(self.token):
                self.client.pexpire(self.key, 1)  # (not DEL: the deletes counter is the user's)


class _Master:
    """A master this process's decorators talk to: its lease, and our watcher while we hold it."""

    def __init__(self, target: Target, lease_key: str = LEASE_KEY) -> None:
        self.target = target
        self.lease = Lease(target.sync_client(_TIMEOUT_S), key=lease_key)
        self.watcher: KeyspaceWatcher | None = None
        self.retired: str | None = None  # why this endpoint is not watched from here (a replica...)


class Coordinator:
    """The per-process thread that runs the lease script for every noticed master."""

    def __init__(self, config: SubflowConfig, every_s: float = LEASE_EVERY_S) -> None:
        self.config = config
        self.every_s = every_s
        self._masters: dict[tuple[Any, ...], _Master] = {}
        self._clusters: dict[int, Any] = {}  # Redis Clusters whose masters are noticed at every tick
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def notice(self, app_client: Any) -> None:
        """A client the decorators used: watch its server if nobody does (cheap after the first time)."""
        target = Target.of_client(app_client, db=0)
        if target is None:
            return
        ident = target.ident(_TIMEOUT_S)
        if ident in self._masters:
            return
        cluster = cluster_at(target.endpoint.address) if target.endpoint is not None else None
        if cluster is not None:
            self._notice_cluster(cluster)
            return
        with self._lock:
            if ident in self._masters:
                return
            self._masters[ident] = _Master(target)
        self._start()
        self._wake.set()

    def _notice_cluster(self, cluster: Any) -> None:
        """Every master of a Redis Cluster, as ``CLUSTER SLOTS`` shows it now, each with a lease key in a
        slot it serves; again at each tick, so a master promoted since is watched without waiting for a
        call to reach it (a demoted one's next beat meets MOVED and retires it)."""
        self._clusters[id(cluster)] = cluster
        added = False
        for address, slots in live_slots(cluster, _TIMEOUT_S).items():
            target = node_target(cluster, address)
            key = cluster_lease_key(slots)
            if target is None or key is None:
                continue
            ident = (*target.ident(_TIMEOUT_S), key)
            current = self._masters.get(ident)
            if current is not None and current.retired is None:
                continue
            with self._lock:
                self._masters[ident] = _Master(target, key)
            added = True
        if added:
            self._start()
            self._wake.set()

    def watchers(self) -> list[KeyspaceWatcher]:
        """The watchers this process runs (it holds their masters' leases)."""
        return [m.watcher for m in list(self._masters.values()) if m.watcher is not None]

    def _start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="otel-subflow-lease", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for cluster in list(self._clusters.values()):
                with internal_errors("watching.cluster"):
                    self._notice_cluster(cluster)
            for master in list(self._masters.values()):
                with internal_errors("watching.lease"):
                    self._tick(master)
            self._wake.wait(self.every_s)
            self._wake.clear()

    def _tick(self, master: _Master) -> None:
        if master.retired is not None:
            return
        ident = master.target.refusal_ident()
        if runtime.refusals.is_refused(ident, "EVALSHA"):
            return
        subscribed = master.watcher is not None and master.watcher.subscribed
        try:
            held = master.lease.beat(subscribed)
        except redis.RedisError as exc:
            self._failed(master, ident, exc)
            return
        if held and master.watcher is None:
            master.watcher = self._new_watcher(master)
            master.watcher.start(wait_s=0.0)
            _log.info("otel-subflow: this process (%s) now watches %s for expired/evicted/del events "
                      "(lease %s)", identity.host, master.watcher.endpoint, LEASE_KEY)
        elif not held and master.watcher is not None:
            watcher, master.watcher = master.watcher, None
            watcher.stop(1.0)
            _log.info("otel-subflow: another process holds the watcher lease of %s now", watcher.endpoint)

    def _failed(self, master: _Master, ident: Any, exc: redis.RedisError) -> None:
        # (redis-py strips the error's prefix from the message: tell them by class)
        if isinstance(exc, redis.exceptions.ReadOnlyError) or "READONLY" in str(exc):
            master.retired = "a replica: its master's watcher sees its keys' events"
        elif isinstance(exc, redis.exceptions.MovedError):  # a cluster node no longer serving its lease key's slot
            master.retired = "no longer a master of the cluster: the new master is watched"
            if master.watcher is not None:
                watcher, master.watcher = master.watcher, None
                watcher.stop(1.0)
        elif is_refusal(exc):
            runtime.refusals.note(ident, "EVALSHA", exc, consequence="no keyspace watcher is elected on this server",
                          grant=f"+evalsha +eval +get +set ~{LEASE_KEY}")
        # else: a connection error or timeout; the next period tries again.

    def _new_watcher(self, master: _Master) -> KeyspaceWatcher:
        from otel_subflow._watch.watcher import KeyspaceWatcher

        return KeyspaceWatcher(master.target.sync_client(_TIMEOUT_S), config=self.config, heartbeat=False)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop watching and give every lease up (another process takes over at its next beat)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        for master in list(self._masters.values()):
            if master.watcher is not None:
                master.watcher.stop(timeout_s)
                master.watcher = None
                master.lease.release()
        self._masters.clear()


def start_watching(config: SubflowConfig | None = None) -> Coordinator | None:
    """Take part in the election of watchers (``configure()`` and the instrumentor call this).

    ``None`` when turned off (``OTEL_SUBFLOW_WATCH=false``)."""
    config = config or get_config()
    if not config.watch_enabled:
        return None
    with runtime.lock:
        if runtime.watching is None:
            runtime.watching = Coordinator(config)
        return runtime.watching


def stop_watching(timeout_s: float = 5.0) -> None:
    coordinator, runtime.watching = runtime.watching, None
    if coordinator is not None:
        coordinator.stop(timeout_s)


def notice(app_client: object) -> None:
    """Called by the decorators on inits and misses: a no-op unless watching was started."""
    coordinator = runtime.watching
    if coordinator is not None and app_client is not None:
        coordinator.notice(app_client)


def _after_fork_in_child() -> None:
    # The parent's thread, watchers and leases stay the parent's: the child starts afresh and
    # takes part in the election from its first init or miss, with a token of its own.
    if runtime.watching is not None:
        runtime.watching = Coordinator(runtime.watching.config, runtime.watching.every_s)


os.register_at_fork(after_in_child=_after_fork_in_child)
