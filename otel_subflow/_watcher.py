"""The keyspace watcher: expired / evicted / del events of state keys become journal tombstones.

Run one per Redis master (replicas never expire or evict on their own). It uses
redis-py 8's ``redis.keyspace_notifications``; the server needs
``notify-keyspace-events`` with ``E`` plus ``x``, ``e``, ``g`` (e.g. ``Exeg``).
Events are fire-and-forget: those published while the watcher is down are lost,
so after a reconnect it journals the gap, and verdicts fall back to counters.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
from typing import Any

import redis
from opentelemetry.instrumentation.utils import suppress_instrumentation
from redis.keyspace_notifications import KeyeventChannel, KeyNotification, KeyspaceNotifications

from otel_subflow import names
from otel_subflow._config import SubflowConfig, get_config
from otel_subflow._journal import OP_DEL, OP_EVICTED, OP_EXPIRED, Journal, journal_for

_log = logging.getLogger(names.LOGGER_NAME)

WATCHED_EVENTS = {"expired": OP_EXPIRED, "evicted": OP_EVICTED, "del": OP_DEL}
#: Flags the watcher needs: keyevent channel (E) and the expired (x), evicted (e), generic (g) classes.
REQUIRED_FLAGS = "Exeg"


class KeyspaceEventsOff(RuntimeError):
    """The server's notify-keyspace-events lacks flags the watcher needs."""


@dataclasses.dataclass(frozen=True)
class EventsCheck:
    """What ``notify-keyspace-events`` is set to, and what it lacks for the watcher."""

    current: str
    missing: str

    @property
    def ok(self) -> bool:
        return not self.missing

    def describe(self) -> str:
        if self.ok:
            return f"notify-keyspace-events={self.current!r} has what the watcher needs"
        return (
            f"notify-keyspace-events={self.current!r} lacks {self.missing!r}: expired/evicted/del "
            f"events are not published, so verdicts fall back to counters (probable). "
            f"Fix: CONFIG SET notify-keyspace-events {merge_flags(self.current)!r}"
        )


def check_events_flags(current: str) -> EventsCheck:
    """Which of E, x, e, g are missing from a ``notify-keyspace-events`` value ('A' = g$lshzxet...)."""
    have = set(current)
    missing = ""
    for flag in REQUIRED_FLAGS:
        if flag in have or (flag in "xeg" and "A" in have):
            continue
        missing += flag
    return EventsCheck(current, missing)


def merge_flags(current: str) -> str:
    """``current`` plus the missing flags, keeping everything already set."""
    return current + check_events_flags(current).missing


def key_pattern(template: str) -> re.Pattern[str]:
    """A regex that parses run_id / node_id out of keys built from ``template``."""
    parts: list[str] = []
    pos = 0
    for match in re.finditer(r"\{([^{}]*)\}", template):
        parts.append(re.escape(template[pos:match.start()]))
        field = match.group(1).split(".", 1)[0].split("[", 1)[0].split("!", 1)[0].split(":", 1)[0]
        if field in ("run_id", "node_id") and f"(?P<{field}>" not in "".join(parts):
            parts.append(f"(?P<{field}>.+?)")
        else:
            parts.append("(?:.+?)")
        pos = match.end()
    parts.append(re.escape(template[pos:]))
    return re.compile("^" + "".join(parts) + "$", re.DOTALL)


@dataclasses.dataclass
class WatcherStats:
    events: int = 0
    tombstones: int = 0
    ignored: int = 0
    reconnects: int = 0
    gaps: int = 0


class KeyspaceWatcher:
    """Subscribe to a master's key events and journal tombstones of state keys.

    Example::

        watcher = KeyspaceWatcher(redis.Redis.from_url(url))
        print(watcher.check_events().describe())
        watcher.start()      # background thread; watcher.stop() at the end
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        journal: Journal | None = None,
        config: SubflowConfig | None = None,
        enable_events: bool = False,
        reconnect_max_s: float = 5.0,
    ) -> None:
        self.client = client
        self.config = config or get_config()
        self.journal = journal or journal_for(client, self.config)
        self.enable_events = enable_events
        self.reconnect_max_s = reconnect_max_s
        self.pattern = key_pattern(self.config.key_template)
        self.stats = WatcherStats()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.server_run_id: str | None = None
        self.last_error: str | None = None
        # redis-py's PubSub reconnects and resubscribes by itself when the server comes
        # back quickly, without raising: its connect callback tells us, so the gap is
        # journalled all the same.
        self._reconnected = threading.Event()
        self._alive_ms = 0

    def _on_connect(self, connection: Any) -> None:
        self._reconnected.set()

    # -- configuration check -----------------------------------------------------

    def check_events(self) -> EventsCheck:
        value = self.client.config_get("notify-keyspace-events").get("notify-keyspace-events", "")
        if isinstance(value, bytes):
            value = value.decode()
        return check_events_flags(str(value))

    def ensure_events(self) -> EventsCheck:
        """Check the flags; with ``enable_events`` add the missing ones, else raise :class:`KeyspaceEventsOff`."""
        check = self.check_events()
        if check.ok:
            return check
        if not self.enable_events:
            raise KeyspaceEventsOff(check.describe())
        self.client.config_set("notify-keyspace-events", merge_flags(check.current))
        _log.warning("otel-subflow watcher enabled keyspace events: %s", merge_flags(check.current))
        return self.check_events()

    # -- event handling ----------------------------------------------------------

    def handle(self, notification: KeyNotification) -> None:
        """Turn one key event into a tombstone if it concerns a state key."""
        self.stats.events += 1
        op = WATCHED_EVENTS.get(notification.event_type)
        key = notification.key
        match = self.pattern.match(key) if op is not None else None
        if op is None or match is None or self.journal is None:
            self.stats.ignored += 1
            return
        groups = match.groupdict()
        extra = {"db": str(notification.database), "source": "keyspace_watcher"}
        if self.server_run_id:
            extra["server_run_id"] = self.server_run_id
        self.journal.record_tombstone(op, groups.get("run_id"), groups.get("node_id"), key, **extra)
        self.stats.tombstones += 1

    # -- the loop ----------------------------------------------------------------

    def _subscribe(self) -> KeyspaceNotifications:
        info = self.client.info("server")
        self.server_run_id = str(info.get("run_id")) if isinstance(info, dict) else None
        notifications = KeyspaceNotifications(self.client)
        for event in WATCHED_EVENTS:
            notifications.subscribe(KeyeventChannel(event, db="*"))  # type: ignore[arg-type]
        connection = getattr(getattr(notifications, "_pubsub", None), "connection", None)
        if connection is not None:
            connection.register_connect_callback(self._on_connect)
        self._reconnected.clear()
        return notifications

    def _record_gap(self, started_ms: int, reason: str) -> None:
        self.stats.reconnects += 1
        self.stats.gaps += 1
        if self.journal is not None:
            self.journal.record_gap(None, started_ms, int(time.time() * 1000), reason)
        _log.warning("otel-subflow watcher reconnected; key events in between were lost (%s)", reason)

    def run(self) -> None:
        """Watch until :meth:`stop`; reconnects with backoff and journals each gap."""
        backoff = 0.1
        down_since_ms: int | None = None
        down_reason = ""
        while not self._stop.is_set():
            notifications: KeyspaceNotifications | None = None
            try:
                with suppress_instrumentation():
                    notifications = self._subscribe()
                    if down_since_ms is not None:
                        self._record_gap(down_since_ms, down_reason)
                        down_since_ms = None
                    backoff = 0.1
                    self._ready.set()
                    while not self._stop.is_set():
                        message = notifications.get_message(timeout=0.2)
                        if self._reconnected.is_set():
                            self._reconnected.clear()
                            info = self.client.info("server")
                            self.server_run_id = str(info.get("run_id")) if isinstance(info, dict) else None
                            self._record_gap(self._alive_ms, "connection dropped; redis-py resubscribed")
                        self._alive_ms = int(time.time() * 1000)
                        if message is not None:
                            self.handle(message)
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                self._ready.clear()
                self.last_error = type(exc).__name__
                if down_since_ms is None:
                    down_since_ms = int(time.time() * 1000)
                    down_reason = f"{type(exc).__name__}: {exc}"
                    _log.warning("otel-subflow watcher lost its connection (%s); retrying", type(exc).__name__)
                self._stop.wait(backoff)
                backoff = min(self.reconnect_max_s, backoff * 2)
            finally:
                if notifications is not None:
                    notifications.close()  # type: ignore[no-untyped-call]

    def start(self, wait_s: float = 5.0) -> KeyspaceWatcher:
        """Check (or enable) the flags, then watch in a daemon thread until subscribed."""
        self.ensure_events()
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name="otel-subflow-watcher", daemon=True)
        self._thread.start()
        self._ready.wait(wait_s)
        return self

    @property
    def subscribed(self) -> bool:
        return self._ready.is_set()

    def wait_subscribed(self, timeout_s: float = 10.0) -> bool:
        return self._ready.wait(timeout_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self.journal is not None:
            self.journal.flush(timeout_s)

    def __enter__(self) -> KeyspaceWatcher:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
