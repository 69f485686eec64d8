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
import dataclasses
import datetime as _dt
import logging
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import redis
from opentelemetry import metrics
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
from redis.keyspace_notifications import KeyNotification

from otel_subflow import names
from otel_subflow._analysis.probe import parse_info
from otel_subflow._boundary import internal_errors
from otel_subflow._config import SubflowConfig, get_config
from otel_subflow._identity import identity
from otel_subflow._journal import OP_DEL, OP_EVICTED, OP_EXPIRED, Journal, journal_for
from otel_subflow._journal.races import recent_tombstones
from otel_subflow._redis.clients import Endpoint
from otel_subflow._version import __version__
from otel_subflow._watch.lease import LEASE_EVERY_S, LEASE_KEY, Lease

_log = logging.getLogger(names.LOGGER_NAME)

WATCHED_EVENTS = {"expired": OP_EXPIRED, "evicted": OP_EVICTED, "del": OP_DEL}
#: The channels, in every db: ``__keyevent@*__:expired`` and so on (PSUBSCRIBE).
WATCHED_PATTERNS = tuple(f"__keyevent@*__:{event}" for event in WATCHED_EVENTS)
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


def read_events(client: Any) -> EventsCheck:
    """``CONFIG GET notify-keyspace-events`` on ``client``, checked (raises what redis-py raises)."""
    value = client.config_get("notify-keyspace-events").get("notify-keyspace-events", "")
    if isinstance(value, bytes):
        value = value.decode()
    return check_events_flags(str(value))


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


class _LogLimiter:
    """At most one log line per cause every ``every_s`` seconds; the ones held back are counted into the next."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._lock = threading.Lock()
        self._causes: dict[str, tuple[float, int]] = {}  # cause -> (monotonic time logged, held back since)

    def log(self, level: int, cause: str, message: str, *args: object) -> bool:
        now = time.monotonic()
        with self._lock:
            logged_at, held = self._causes.get(cause, (None, 0))
            if logged_at is not None and now - logged_at < self.every_s:
                self._causes[cause] = (logged_at, held + 1)
                return False
            self._causes[cause] = (now, 0)
        if held:
            message += f" [{held} more like this held back since the last line]"
        _log.log(level, message, *args)
        return True


# -- the subflow.watcher.up gauge ------------------------------------------------------
# One observable gauge per meter provider (the SDK hands out the first instrument again on a
# second create and drops its callbacks), observing every started watcher of that provider.

_GLOBAL = "global"
_up_lock = threading.Lock()
_up_watchers: dict[Any, weakref.WeakSet[KeyspaceWatcher]] = {}


def _observe_up(key: Any) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def callback(_options: CallbackOptions) -> Iterable[Observation]:
        with _up_lock:
            watchers = list(_up_watchers.get(key, ()))
        return [Observation(1 if watcher.subscribed else 0, watcher.metric_attributes) for watcher in watchers]

    return callback


def _register_up(watcher: KeyspaceWatcher) -> None:
    with _up_lock:
        watchers = _up_watchers.get(watcher._meter_key)
        if watchers is None:
            watchers = _up_watchers[watcher._meter_key] = weakref.WeakSet()
            watcher._meter.create_observable_gauge(
                names.METRIC_WATCHER_UP, [_observe_up(watcher._meter_key)], unit="1",
                description="1 while the otel-subflow keyspace watcher is subscribed to the server's key "
                            "events, 0 while it is not (starting, retrying).",
            )
        watchers.add(watcher)


def _unregister_up(watcher: KeyspaceWatcher) -> None:
    with _up_lock:
        watchers = _up_watchers.get(watcher._meter_key)
        if watchers is not None:
            watchers.discard(watcher)


_PHASES = {
    "connect": "connecting (INFO server)",
    "events": "checking notify-keyspace-events",
    "subscribe": "subscribing (PSUBSCRIBE __keyevent@*__:expired|evicted|del)",
    "listen": "listening",
}
_MAX_ERROR_TEXT = 500


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
    ) -> None:
        self.client = client
        self.config = config or get_config()
        self.journal = journal or journal_for(client, self.config)
        self.enable_events = self.config.enable_keyspace_events if enable_events is None else enable_events
        self.reconnect_max_s = max(0.01, reconnect_max_s)
        self.reconnect_min_s = min(0.1, self.reconnect_max_s)
        self.socket_timeout_s = socket_timeout_s
        self.pattern = key_pattern(self.config.key_template)
        self.stats = WatcherStats()
        self.server_run_id: str | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._attempted = threading.Event()
        self._thread: threading.Thread | None = None
        self._alive_ms = 0
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
        self._logs = _LogLimiter(log_every_s)
        pool = getattr(client, "connection_pool", None)
        self._endpoint = Endpoint(pool) if pool is not None else None
        # The heartbeat (see _watching): the lease key of the watched master, beaten while subscribed
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
        is_global = meter_provider is None or meter_provider is metrics.get_meter_provider()
        self._meter_key: Any = _GLOBAL if is_global else meter_provider
        self._meter = metrics.get_meter(names.INSTRUMENTATION_NAME, __version__, meter_provider)
        self._error_counter = self._meter.create_counter(
            names.METRIC_WATCHER_ERRORS, unit="{error}",
            description="Errors of the otel-subflow keyspace watcher, by error.type; each one is retried.",
        )

    # -- status --------------------------------------------------------------------

    @property
    def status(self) -> WatcherStatus:
        """What the watcher is doing now (a snapshot)."""
        with self._lock:
            return WatcherStatus(
                state=self._state,
                subscribed=self.subscribed,
                since=self._since,
                endpoint=self.endpoint,
                last_error=self._last_error,
                last_error_type=self._last_error_type,
                last_error_at=self._last_error_at,
                errors=self._errors,
                errors_by_type=dict(self._errors_by_type),
                consecutive_errors=self._consecutive,
                next_retry_at=self._next_retry_at,
                events_flags=self._events_flags,
                events_note=self._events_note,
            )

    @property
    def last_error(self) -> str | None:
        """``"<error type>: <message>"`` of the last error (also after recovery), or None."""
        return self._last_error

    @property
    def subscribed(self) -> bool:
        """True only while the server has confirmed every subscription and the thread runs."""
        thread = self._thread
        return self._ready.is_set() and (thread is None or thread.is_alive())

    def _set_state(self, state: str) -> None:
        with self._lock:
            if self._state != state:
                self._state = state
                self._since = time.time()
            if state != names.WATCHER_RETRYING:
                self._next_retry_at = None

    # -- configuration check -----------------------------------------------------

    def check_events(self) -> EventsCheck:
        """The flags on the server, read with ``client`` (raises what redis-py raises)."""
        return read_events(self.client)

    def ensure_events(self) -> EventsCheck:
        """Check the flags; with ``enable_events`` add the missing ones, else raise :class:`KeyspaceEventsOff`."""
        check = self.check_events()
        if check.ok:
            return check
        if not self.enable_events:
            raise KeyspaceEventsOff(check.describe())
        self.client.config_set("notify-keyspace-events", merge_flags(check.current))
        _log.warning("otel-subflow watcher enabled keyspace events: %s", merge_flags(check.current))
        after = self.check_events()
        if not after.ok:
            raise KeyspaceEventsOff(after.describe())
        return after

    def _prepare_events(self, client: Any) -> None:
        """Check (or add) the flags on our connection; raise :class:`KeyspaceEventsOff` when they stay off."""
        try:
            check = read_events(client)
        except redis.ResponseError as exc:  # NOPERM of an ACL, or CONFIG renamed away (managed Redis)
            note = (f"notify-keyspace-events unknown: CONFIG GET refused ({type(exc).__name__}: {exc}); "
                    f"subscribed anyway")
            with self._lock:
                self._events_flags, self._events_note = None, note
            self._logs.log(
                logging.WARNING, "events:config-refused",
                "otel-subflow keyspace watcher on %s cannot read notify-keyspace-events (CONFIG GET refused: "
                "%s: %s); it subscribes anyway, but tombstones appear only if the server has %r in its flags "
                "(an admin can check with CONFIG GET notify-keyspace-events)",
                self.endpoint, type(exc).__name__, exc, REQUIRED_FLAGS,
            )
            return
        with self._lock:
            self._events_flags, self._events_note = check.current, None
        if check.ok:
            return
        if not self.enable_events:
            raise KeyspaceEventsOff(
                f"{check.describe()} (or let the watcher add them: enable_events=True, "
                f"OTEL_SUBFLOW_ENABLE_KEYSPACE_EVENTS=true)"
            )
        merged = merge_flags(check.current)
        try:
            client.config_set("notify-keyspace-events", merged)
        except redis.ResponseError as exc:
            raise KeyspaceEventsOff(
                f"{check.describe()}; adding them was refused ({type(exc).__name__}: {exc})"
            ) from exc
        after = read_events(client)
        with self._lock:
            self._events_flags = after.current
        if not after.ok:
            raise KeyspaceEventsOff(after.describe())
        self._logs.log(
            logging.WARNING, "events:enabled",
            "otel-subflow keyspace watcher on %s enabled keyspace events: notify-keyspace-events %r -> %r",
            self.endpoint, check.current, after.current,
        )

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
        recent_tombstones.add(key, {"op": op, "key": key, "node_id": groups.get("node_id") or "",
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
            self._logs.log(logging.WARNING, f"heartbeat:{type(exc).__name__}",
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
            self._logs.log(logging.WARNING, "connect:info-refused",
                           "otel-subflow keyspace watcher on %s cannot read INFO server (%s: %s); tombstones "
                           "are journalled without the server run id", self.endpoint, type(exc).__name__, exc)
            return
        self.server_run_id = parse_info(raw).get("run_id") or None

    def _subscribe(self, pubsub: Any) -> bool:
        """PSUBSCRIBE and wait for the server to confirm each pattern; False if stopped meanwhile."""
        pubsub.psubscribe(*WATCHED_PATTERNS)
        pending = set(WATCHED_PATTERNS)
        deadline = time.monotonic() + self.socket_timeout_s
        while pending:
            if self._stop.is_set():
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise redis.TimeoutError(
                    f"PSUBSCRIBE not confirmed within {self.socket_timeout_s:g} s (waiting for {sorted(pending)})"
                )
            # A NOPERM on the channels is the server's reply to PSUBSCRIBE: it is raised here.
            message = pubsub.get_message(ignore_subscribe_messages=False, timeout=min(0.2, remaining))
            if message is None:
                continue
            if message.get("type") == "psubscribe":
                channel = message.get("channel")
                pending.discard(channel.decode() if isinstance(channel, bytes) else str(channel))
            else:
                self._dispatch(message)
        return True

    def _subscribed(self, down_since_ms: int | None, down_reason: str) -> None:
        now_ms = int(time.time() * 1000)
        errors = self._consecutive
        with self._lock:
            self._consecutive = 0
        self._set_state(names.WATCHER_RUNNING)
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
            logging.WARNING, "resubscribed",
            "otel-subflow keyspace watcher on %s subscribed again after %d error(s) over %.1f s; key events "
            "in between were lost (journalled as a watcher_gap)",
            self.endpoint, errors, (now_ms - down_since_ms) / 1000.0,
        )

    def _failed(self, phase: str, exc: BaseException) -> float:
        """Record one error everywhere it must show; returns the back-off before the next attempt."""
        error_type = type(exc).__name__
        text = f"{error_type}: {exc}"
        if len(text) > _MAX_ERROR_TEXT:
            text = text[:_MAX_ERROR_TEXT] + "..."
        now = time.time()
        self._ready.clear()
        with self._lock:
            self._errors += 1
            self._errors_by_type[error_type] = self._errors_by_type.get(error_type, 0) + 1
            self._consecutive += 1
            delay = min(self.reconnect_max_s, self.reconnect_min_s * float(2 ** min(self._consecutive - 1, 30)))
            self._last_error, self._last_error_type, self._last_error_at = text, error_type, now
        self._set_state(names.WATCHER_RETRYING)
        with self._lock:
            self._next_retry_at = now + delay
        self._error_counter.add(1, {names.ATTR_ERROR_TYPE: error_type, **self.metric_attributes})
        self._logs.log(
            logging.WARNING, f"{phase}:{error_type}",
            "otel-subflow keyspace watcher on %s is not subscribed (%s failed: %s); retrying in %.1f s, "
            "back-off doubling up to %g s; expired/evicted/del tombstones are not recorded meanwhile",
            self.endpoint, _PHASES.get(phase, phase), text, delay, self.reconnect_max_s,
        )
        return delay

    def run(self) -> None:
        """Watch until :meth:`stop`: any error is recorded and retried with back-off; each gap is journalled."""
        self._set_state(names.WATCHER_STARTING)
        _register_up(self)
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
                        if not self._subscribe(pubsub):
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
                        down_reason = f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_TEXT]
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
            self._set_state(names.WATCHER_STOPPED)
            _unregister_up(self)
            self._attempted.set()

    def start(self, wait_s: float = 5.0) -> KeyspaceWatcher:
        """Watch in a daemon thread; return once subscribed or after the first error (at most ``wait_s``).

        Never raises for a server-side condition: read :attr:`status` (or :attr:`subscribed`).
        """
        if self._thread is not None and self._thread.is_alive():
            return self
        self._stop.clear()
        self._attempted.clear()
        self._set_state(names.WATCHER_STARTING)
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
