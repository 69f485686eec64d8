"""What a keyspace watcher is doing, for people and metrics: its status, counters and the ``up`` gauge."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from otel_subflow import names
from otel_subflow._runtime import runtime

if TYPE_CHECKING:
    from otel_subflow._watch.watcher import KeyspaceWatcher

#: Longest error text kept in a status.
MAX_ERROR_TEXT = 500


@dataclasses.dataclass
class WatcherStats:
    events: int = 0
    tombstones: int = 0
    ignored: int = 0
    reconnects: int = 0
    gaps: int = 0


def _iso(unix_s: float | None) -> str | None:
    if unix_s is None:
        return None
    moment = _dt.datetime.fromtimestamp(unix_s, _dt.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclasses.dataclass(frozen=True)
class WatcherStatus:
    """A snapshot of what the watcher is doing, from :attr:`KeyspaceWatcher.status`.

    Times are unix seconds (:meth:`as_dict` gives ISO-8601 UTC strings).
    """

    #: ``starting``, ``running`` (subscribed), ``retrying`` (an error; the next attempt is due at
    #: ``next_retry_at``) or ``stopped`` (never started, or :meth:`KeyspaceWatcher.stop` was called).
    state: str
    #: True only while the PSUBSCRIBE of every watched channel is confirmed by the server.
    subscribed: bool
    #: When the watcher entered ``state``.
    since: float | None
    #: The server watched, ``host:port`` (or the socket path); never a password.
    endpoint: str
    #: ``"<error type>: <message>"`` of the last error, kept after recovery; None if there was none.
    last_error: str | None
    last_error_type: str | None
    last_error_at: float | None
    #: Errors since the watcher was created, all together and by error type.
    errors: int
    errors_by_type: dict[str, int]
    #: Errors since the last successful subscription (0 while running).
    consecutive_errors: int
    next_retry_at: float | None
    #: ``notify-keyspace-events`` as last read (None: not read yet, or CONFIG GET was refused).
    events_flags: str | None
    #: Why the flags are unknown, when they are (e.g. CONFIG GET refused by an ACL).
    events_note: str | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the same fields, times as ISO-8601 UTC strings."""
        out = dataclasses.asdict(self)
        for field in ("since", "last_error_at", "next_retry_at"):
            out[field] = _iso(getattr(self, field))
        return out

    def describe(self) -> str:
        """One line a person reads: ``retrying since <time> after 3 errors; last at <time>: <error>...``."""
        if self.state == names.WATCHER_RUNNING:
            text = f"running since {_iso(self.since)}"
            return f"{text}; {self.events_note}" if self.events_note else text
        if self.state == names.WATCHER_RETRYING:
            retry = ""
            if self.next_retry_at is not None:
                retry = f"; next attempt in {max(0.0, self.next_retry_at - time.time()):.1f} s"
            return (f"retrying since {_iso(self.since)} after {self.consecutive_errors} error(s); last at "
                    f"{_iso(self.last_error_at)}: {self.last_error}{retry}")
        if self.state == names.WATCHER_STOPPED and self.last_error:
            return f"stopped; last error at {_iso(self.last_error_at)}: {self.last_error}"
        return self.state



class StatusBoard:
    """A watcher's state and error history, updated by its thread and read by anyone (thread-safe)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._lock = threading.Lock()
        self._state = names.WATCHER_STOPPED
        self._since: float | None = None
        self._last_error: str | None = None
        self._last_error_type: str | None = None
        self._last_error_at: float | None = None
        self._errors = 0
        self._errors_by_type: dict[str, int] = {}
        self._consecutive = 0
        self._next_retry_at: float | None = None
        self._events_flags: str | None = None
        self._events_note: str | None = None

    def snapshot(self, subscribed: bool) -> WatcherStatus:
        with self._lock:
            return WatcherStatus(
                state=self._state, subscribed=subscribed, since=self._since, endpoint=self.endpoint,
                last_error=self._last_error, last_error_type=self._last_error_type,
                last_error_at=self._last_error_at, errors=self._errors, errors_by_type=dict(self._errors_by_type),
                consecutive_errors=self._consecutive, next_retry_at=self._next_retry_at,
                events_flags=self._events_flags, events_note=self._events_note,
            )

    @property
    def last_error(self) -> str | None:
        return self._last_error

    def set_state(self, state: str) -> None:
        with self._lock:
            if self._state != state:
                self._state = state
                self._since = time.time()
            if state != names.WATCHER_RETRYING:
                self._next_retry_at = None

    def set_events(self, flags: str | None, note: str | None = None) -> None:
        with self._lock:
            self._events_flags, self._events_note = flags, note

    def failed(self, exc: BaseException, backoff: Callable[[int], float]) -> tuple[str, float]:
        """Record one error; the error's text and the back-off before the next attempt (state: retrying)."""
        error_type = type(exc).__name__
        text = f"{error_type}: {exc}"
        if len(text) > MAX_ERROR_TEXT:
            text = text[:MAX_ERROR_TEXT] + "..."
        now = time.time()
        with self._lock:
            self._errors += 1
            self._errors_by_type[error_type] = self._errors_by_type.get(error_type, 0) + 1
            self._consecutive += 1
            delay = backoff(self._consecutive)
            self._last_error, self._last_error_type, self._last_error_at = text, error_type, now
        self.set_state(names.WATCHER_RETRYING)
        with self._lock:
            self._next_retry_at = now + delay
        return text, delay

    def recovered(self) -> int:
        """Subscribed again (state: running); how many errors in a row came before."""
        with self._lock:
            errors, self._consecutive = self._consecutive, 0
        self.set_state(names.WATCHER_RUNNING)
        return errors


# -- the subflow.watcher.up gauge ------------------------------------------------------
# One observable gauge per meter provider (the SDK hands out the first instrument again on a
# second create and drops its callbacks), observing every started watcher of that provider.


def _observe_up(key: object) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def callback(_options: CallbackOptions) -> Iterable[Observation]:
        with runtime.lock:
            watchers = list(runtime.watchers_up.get(key, ()))
        return [Observation(1 if watcher.subscribed else 0, watcher.metric_attributes) for watcher in watchers]

    return callback


def register_up(watcher: KeyspaceWatcher, meter: Meter, meter_key: object) -> None:
    with runtime.lock:
        watchers = runtime.watchers_up.get(meter_key)
        if watchers is None:
            watchers = runtime.watchers_up[meter_key] = weakref.WeakSet()
            meter.create_observable_gauge(
                names.METRIC_WATCHER_UP, [_observe_up(meter_key)], unit="1",
                description="1 while the otel-subflow keyspace watcher is subscribed to the server's key "
                            "events, 0 while it is not (starting, retrying).",
            )
        watchers.add(watcher)


def unregister_up(watcher: KeyspaceWatcher, meter_key: object) -> None:
    with runtime.lock:
        watchers = runtime.watchers_up.get(meter_key)
        if watchers is not None:
            watchers.discard(watcher)
