"""The keyspace watcher: expired / evicted / del events of state keys become journal tombstones.

Run one per Redis master (replicas never expire or evict on their own). It
pattern-subscribes to ``__keyevent@*__:expired|evicted|del`` and parses events
with redis-py 8's ``redis.keyspace_notifications``; the server needs
``notify-keyspace-events`` with ``E`` plus ``x``, ``e``, ``g`` (e.g. ``Exeg``).
Events are fire-and-forget: those published while the watcher is down are lost,
so after a reconnect it journals the gap, and verdicts fall back to counters.

The watcher never raises into the application and never dies silently. Any
error (connection refused, NOPERM on the channels, keyspace events off, CONFIG
refused when enabling them) is retried with capped exponential back-off and is
visible: :attr:`KeyspaceWatcher.status` (state ``starting`` / ``running`` /
``retrying`` / ``stopped``, the last error and when it happened), a warning on
the ``otel_subflow`` logger at most once per cause per minute (the ones held
back are counted into the next line), the ``subflow.watcher.errors`` counter
and the ``subflow.watcher.up`` gauge.
"""


from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

import redis
from opentelemetry import metrics
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.metrics import MeterProvider
from redis.keyspace_notifications import KeyNotification

from otel_subflow import names
from otel_subflow._analysis.probe import parse_info
from otel_subflow._boundary import internal_errors
from otel_subflow._config import SubflowConfig, get_config
from otel_subflow._identity import identity
from otel_subflow._journal.location import journal_for
from otel_subflow._journal.writer import Journal
from otel_subflow._redis.cluster import is_cluster
from otel_subflow._redis.endpoint import Endpoint
from otel_subflow._redis.permissions import RateLimitedLog
from otel_subflow._runtime import runtime
from otel_subflow._version import __version__
from otel_subflow._watch.events import (
    REQUIRED_FLAGS,
    WATCHED_EVENTS,
    EventsCheck,
    KeyspaceEventsOff,
    StateKeys,
    add_missing_flags,
    read_events,
    subscribe,
)
from otel_subflow._watch.lease import LEASE_EVERY_S, LEASE_KEY, Lease
from otel_subflow._watch.status import (
    MAX_ERROR_TEXT,
    StatusBoard,
    WatcherStats,
    WatcherStatus,
    register_up,
    unregister_up,
)

_log = logging.getLogger(names.LOGGER_NAME)
_GLOBAL = "global"


_PHASES = {
    "connect": "connecting (INFO server)",
    "events": "checking notify-keyspace-events",
    "subscribe": "subscribing (PSUBSCRIBE __keyevent@*__:expired|evicted|del)",
    "listen": "listening",
}


class KeyspaceWatcher:
    """Subscribe to a master's key events and journal tombstones of state keys.

    Example::

        watcher = KeyspaceWatcher(redis.Redis.from_url(url)).start()   # never raises
        print(watcher.status.describe())   # running since ... / retrying since ... after 3 error(s) ...
        watcher.stop()

    ``start()`` runs the watcher in a daemon thread on its own connection (built from
    ``client``'s settings, with ``socket_timeout_s``). It returns once the first attempt
    has succeeded or failed (at most ``wait_s``); it never raises for a server-side
    condition: those go to :attr:`status`, a rate-limited warning and the metrics, and
    are retried every ``0.1`` s doubling up to ``reconnect_max_s``. With keyspace events
    off, the watcher warns with the exact ``CONFIG SET`` to run and keeps re-checking;
    with ``enable_events`` (default: ``OTEL_SUBFLOW_ENABLE_KEYSPACE_EVENTS``) it adds
    ``Exeg`` to the server's flags itself, keeping every flag already set. When CONFIG
    is refused (an ACL, a renamed command) it subscribes anyway and says so.
    """

    def __new__(cls, client: Any = None, *args: Any, **kwargs: Any) -> KeyspaceWatcher:
        """``KeyspaceWatcher(cluster_client)`` is a watcher per master of the cluster (``_watch/cluster.py``)."""
        if cls is KeyspaceWatcher and is_cluster(client):
            from otel_subflow._watch.cluster import ClusterWatcher  # (it subclasses this one)

            return super().__new__(ClusterWatcher)
        return super().__new__(cls)

    def __init__(
        self,
        client: redis.Redis,
        *,
        journal: Journal | None = None,
        config: SubflowConfig | None = None,
        enable_events: bool | None = None,
        reconnect_max_s: float = 5.0,
        meter_provider: MeterProvider | None = None,
        socket_timeout_s: float = 2.0,
        log_every_s: float = 60.0,
        heartbeat: bool = True,
        key_templates: Iterable[str] = (),
    ) -> None:
        self.client = client
        self.config = config or get_config()
        self.journal = journal or journal_for(client, self.config)
        self.enable_events = self.config.enable_keyspace_events if enable_events is None else enable_events
        self.reconnect_max_s = max(0.01, reconnect_max_s)
        self.reconnect_min_s = min(0.1, self.reconnect_max_s)
        self.socket_timeout_s = socket_timeout_s
        #: Templates of the state keys to watch besides the config's and the registered ones.
        self.key_templates = tuple(key_templates)
        self.state_keys = StateKeys(runtime.key_templates, (self.config.key_template, *self.key_templates))
        self.stats = WatcherStats()
        self.server_run_id: str | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._attempted = threading.Event()
        self._thread: threading.Thread | None = None
        self._alive_ms = 0
        self._logs = RateLimitedLog(_log, interval_s=log_every_s)
        pool = getattr(client, "connection_pool", None)
        self._endpoint = Endpoint(pool) if pool is not None else None
        # The heartbeat (see lease.py): the lease key of the watched master, beaten while subscribed
        # so that analyses know a tombstone may be on its way. Elected watchers leave it to the election.
        self._lease: Lease | None = None
        if heartbeat and self._endpoint is not None:
            self._lease = Lease(self._endpoint.sync_client(socket_timeout_s, db=0))
        self._beat_at = 0.0
        kwargs = self._endpoint.kwargs if self._endpoint is not None else {}
        if kwargs.get("path"):
            self.endpoint = str(kwargs["path"])
            self.metric_attributes: dict[str, str | int] = {names.ATTR_SERVER_ADDRESS: self.endpoint}
        else:
            host, port = str(kwargs.get("host", "localhost")), int(kwargs.get("port", 6379) or 6379)
            self.endpoint = f"{host}:{port}"
            self.metric_attributes = {names.ATTR_SERVER_ADDRESS: host, names.ATTR_SERVER_PORT: port}
        self._board = StatusBoard(self.endpoint)
        is_global = meter_provider is None or meter_provider is metrics.get_meter_provider()
        self._meter_key: object = _GLOBAL if is_global else meter_provider
        self._meter = metrics.get_meter(names.INSTRUMENTATION_NAME, __version__, meter_provider)
        self._error_counter = self._meter.create_counter(
            names.METRIC_WATCHER_ERRORS, unit="{error}",
            description="Errors of the otel-subflow keyspace watcher, by error.type; each one is retried.",
        )

    # -- status --------------------------------------------------------------------

    @property
    def status(self) -> WatcherStatus:
        """What the watcher is doing now (a snapshot)."""
        return self._board.snapshot(self.subscribed)

    @property
    def last_error(self) -> str | None:
        """``"<error type>: <message>"`` of the last error (also after recovery), or None."""
        return self._board.last_error

    @property
    def subscribed(self) -> bool:
        """True only while the server has confirmed every subscription and the thread runs."""
        thread = self._thread
        return self._ready.is_set() and (thread is None or thread.is_alive())

    # -- configuration check -----------------------------------------------------

    def check_events(self) -> EventsCheck:
        """The flags on the server, read with ``client`` (raises what redis-py raises)."""
        return read_events(self.client)

    def ensure_events(self) -> EventsCheck:
        """Check the flags; with ``enable_events`` add the missing ones, else raise :class:`KeyspaceEventsOff`."""
        return self._ensure_events(self.client, hint="")

    def _ensure_events(self, client: Any, hint: str) -> EventsCheck:
        check = read_events(client)
        self._board.set_events(check.current)
        if check.ok:
            return check
        if not self.enable_events:
            raise KeyspaceEventsOff(check.describe() + hint)
        after = add_missing_flags(client, check)
        self._board.set_events(after.current)
        self._logs.log(
            "events:enabled", logging.WARNING,
            "otel-subflow keyspace watcher on %s enabled keyspace events: notify-keyspace-events %r -> %r",
            self.endpoint, check.current, after.current,
        )
        return after

    def _prepare_events(self, client: Any) -> None:
        """Check (or add) the flags on our connection; raise :class:`KeyspaceEventsOff` when they stay off."""
        try:
            self._ensure_events(client, hint=" (or let the watcher add them: enable_events=True, "
                                             "OTEL_SUBFLOW_ENABLE_KEYSPACE_EVENTS=true)")
        except redis.ResponseError as exc:  # CONFIG GET refused: an ACL, or renamed away (managed Redis)
            self._board.set_events(None, f"notify-keyspace-events unknown: CONFIG GET refused "
                                         f"({type(exc).__name__}: {exc}); subscribed anyway")
            self._logs.log(
                "events:config-refused", logging.WARNING,
                "otel-subflow keyspace watcher on %s cannot read notify-keyspace-events (CONFIG GET refused: "
                "%s: %s); it subscribes anyway, but tombstones appear only if the server has %r in its flags "
                "(an admin can check with CONFIG GET notify-keyspace-events)",
                self.endpoint, type(exc).__name__, exc, REQUIRED_FLAGS,
            )

    # -- event handling ----------------------------------------------------------

    @property
    def templates(self) -> tuple[str, ...]:
        """The key templates this watcher parses events with, in the order it tries them."""
        return self.state_keys.templates

    def handle(self, notification: KeyNotification) -> None:
        """Turn one key event into a tombstone if it concerns a state key."""
        self.stats.events += 1
        op = WATCHED_EVENTS.get(notification.event_type)
        key = notification.key
        groups = self.state_keys.match(key) if op is not None else None
        if op is None or groups is None or self.journal is None:
            self.stats.ignored += 1
            return
        extra = {"db": str(notification.database), "source": "keyspace_watcher"}
        if self.server_run_id:
            extra["server_run_id"] = self.server_run_id
        self.journal.record_tombstone(op, groups.get("run_id"), groups.get("node_id"), key, **extra)
        runtime.recent_tombstones.add(key, {"op": op, "key": key, "node_id": groups.get("node_id") or "",
                                    "run_id": groups.get("run_id") or "", "host": identity.host, **extra})
        self.stats.tombstones += 1

    def _heartbeat(self, force: bool = False) -> None:
        """Beat the master's lease key (one command per LEASE_EVERY_S) while subscribed."""
        if self._lease is None:
            return
        now = time.monotonic()
        if not force and now - self._beat_at < LEASE_EVERY_S:
            return
        self._beat_at = now
        try:
            self._lease.beat(subscribed=True)
        except redis.RedisError as exc:  # refused or unreachable: the watcher works on without it
            self._logs.log(f"heartbeat:{type(exc).__name__}", logging.WARNING,
                           "otel-subflow keyspace watcher on %s cannot beat its heartbeat %s (%s: %s): analyses "
                           "will not wait for tombstones in flight", self.endpoint, LEASE_KEY,
                           type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")

    def _dispatch(self, message: dict[str, Any]) -> None:
        if message.get("type") != "pmessage":
            return
        notification = KeyNotification.from_message(message)
        if notification is None:
            self.stats.events += 1
            self.stats.ignored += 1
            return
        with internal_errors("keyspace watcher event"):
            self.handle(notification)

    # -- the loop ----------------------------------------------------------------

    def _own_client(self) -> redis.Redis:
        """Our connection to the watched server: the client's settings, our timeout, no redis-py retries.

        redis-py's own retries would reconnect and resubscribe behind our back, so the
        watcher could not tell (or say) that it had lost its subscription.
        """
        if self._endpoint is None:
            return self.client
        return self._endpoint.sync_client(self.socket_timeout_s)

    def _read_server_id(self, client: Any) -> None:
        try:
            raw = client.info("server")
        except redis.ResponseError as exc:  # INFO refused by an ACL: tombstones go without the run id
            self.server_run_id = None
            self._logs.log("connect:info-refused", logging.WARNING,
                           "otel-subflow keyspace watcher on %s cannot read INFO server (%s: %s); tombstones "
                           "are journalled without the server run id", self.endpoint, type(exc).__name__, exc)
            return
        self.server_run_id = parse_info(raw).get("run_id") or None

    def _subscribed(self, down_since_ms: int | None, down_reason: str) -> None:
        now_ms = int(time.time() * 1000)
        errors = self._board.recovered()
        self._alive_ms = now_ms
        self._ready.set()
        self._attempted.set()
        if down_since_ms is None:
            _log.info("otel-subflow keyspace watcher subscribed to key events on %s", self.endpoint)
            return
        self.stats.reconnects += 1
        self.stats.gaps += 1
        if self.journal is not None:
            self.journal.record_gap(None, down_since_ms, now_ms, down_reason)
        self._logs.log(
            "resubscribed", logging.WARNING,
            "otel-subflow keyspace watcher on %s subscribed again after %d error(s) over %.1f s; key events "
            "in between were lost (journalled as a watcher_gap)",
            self.endpoint, errors, (now_ms - down_since_ms) / 1000.0,
        )

    def _failed(self, phase: str, exc: BaseException) -> float:
        """Record one error everywhere it must show; returns the back-off before the next attempt."""
        self._ready.clear()
        text, delay = self._board.failed(exc, lambda consecutive: min(
            self.reconnect_max_s, self.reconnect_min_s * float(2 ** min(consecutive - 1, 30))))
        error_type = type(exc).__name__
        self._error_counter.add(1, {names.ATTR_ERROR_TYPE: error_type, **self.metric_attributes})
        self._logs.log(
            f"{phase}:{error_type}", logging.WARNING,
            "otel-subflow keyspace watcher on %s is not subscribed (%s failed: %s); retrying in %.1f s, "
            "back-off doubling up to %g s; expired/evicted/del tombstones are not recorded meanwhile",
            self.endpoint, _PHASES.get(phase, phase), text, delay, self.reconnect_max_s,
        )
        return delay

    def run(self) -> None:
        """Watch until :meth:`stop`: any error is recorded and retried with back-off; each gap is journalled."""
        self._board.set_state(names.WATCHER_STARTING)
        register_up(self, self._meter, self._meter_key)
        down_since_ms: int | None = None
        down_reason = ""
        client: redis.Redis | None = None
        try:
            while not self._stop.is_set():
                pubsub: Any = None
                phase = "connect"
                try:
                    with suppress_instrumentation():
                        if client is None:
                            client = self._own_client()
                        self._read_server_id(client)
                        phase = "events"
                        self._prepare_events(client)
                        phase = "subscribe"
                        pubsub = client.pubsub(ignore_subscribe_messages=False)  # type: ignore[no-untyped-call]
                        if not subscribe(pubsub, self.socket_timeout_s, self._stop, self._dispatch):
                            break
                        self._subscribed(down_since_ms, down_reason)
                        self._heartbeat(force=True)
                        down_since_ms = None
                        phase = "listen"
                        while not self._stop.is_set():
                            message = pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
                            self._alive_ms = int(time.time() * 1000)
                            if message is not None:
                                self._dispatch(message)
                            self._heartbeat()
                except Exception as exc:  # noqa: BLE001 - every error is shown and retried: the thread never dies
                    if down_since_ms is None:
                        down_since_ms = self._alive_ms if self._ready.is_set() else int(time.time() * 1000)
                        down_reason = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_TEXT]
                    delay = self._failed(phase, exc)
                    self._attempted.set()
                    self._stop.wait(delay)
                finally:
                    if pubsub is not None:
                        with contextlib.suppress(Exception):  # closing a broken connection
                            pubsub.close()
        finally:
            self._ready.clear()
            if client is not None and client is not self.client:
                with contextlib.suppress(Exception):
                    client.close()
            self._board.set_state(names.WATCHER_STOPPED)
            unregister_up(self, self._meter_key)
            self._attempted.set()

    def start(self, wait_s: float = 5.0) -> KeyspaceWatcher:
        """Watch in a daemon thread; return once subscribed or after the first error (at most ``wait_s``).

        Never raises for a server-side condition: read :attr:`status` (or :attr:`subscribed`).
        """
        if self._thread is not None and self._thread.is_alive():
            return self
        self._stop.clear()
        self._attempted.clear()
        self._board.set_state(names.WATCHER_STARTING)
        self._thread = threading.Thread(target=self.run, name="otel-subflow-watcher", daemon=True)
        self._thread.start()
        self._attempted.wait(wait_s)
        return self

    def wait_subscribed(self, timeout_s: float = 10.0) -> bool:
        return self._ready.wait(timeout_s) and self.subscribed

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._lease is not None:
            self._lease.release()
        if self.journal is not None:
            self.journal.flush(timeout_s)

    def __enter__(self) -> KeyspaceWatcher:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

