"""Commands a Redis endpoint refused us, and log lines that cannot flood.

Restricted ACL users are normal in production (``ACL SETUSER app ... -@all +get
+set +del``), and managed services rename or disable commands. A command the
server refused once will be refused again: asking on every call costs the
user's Redis a round trip each time, and a log line each time would flood the
user's logs. So:

- :class:`Refusals` (the process's: ``runtime.refusals``) remembers, per endpoint (address, port or socket path, user;
  not the db: ACLs do not depend on it) and per command, that the server refused
  it. Whoever sends a command of ours asks :meth:`Refusals.is_refused` first and
  reports a refusal with :meth:`Refusals.note`. A refusal is kept for
  :data:`RECHECK_AFTER_S` (an operator who grants the permission sees it used
  within the hour, without a restart); reconnects and server restarts do not
  reset it.
- :func:`refusal_reason` tells a refusal (NOPERM, an unknown / renamed /
  disabled command) from any other error reply.
- :class:`RateLimitedLog` (``runtime.log``) writes at most one line per cause per minute to our
  logger; repeats are counted and the count goes into the next line.

An error *reply* leaves the connection in sync: read every reply you sent, keep
the connection. Never disconnect an application's connection over a refusal.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Hashable
from typing import Any

from otel_subflow import names
from otel_subflow._redis.endpoint import EndpointIdent, describe_endpoint

#: Seconds a refusal is remembered before the command is tried once more.
RECHECK_AFTER_S = 3600.0
#: Endpoints remembered at most (the oldest is forgotten first): a bound, not a tuning knob.
MAX_ENDPOINTS = 1024

_log = logging.getLogger(names.LOGGER_NAME)

#: The ACL rules that give an application's Redis user full verdicts, beyond what the
#: application itself needs on its own keys (``~subflow:state:*`` or yours, ``+get +set ...``).
#: Commands and key patterns are listed one per entry; docs/acl.md shows them as one
#: ``ACL SETUSER`` line and says what each buys.
MINIMAL_ACL: tuple[str, ...] = (
    # the journal: its keys, its scripts and what they call (the watcher lease: GET, SET)
    f"~{names.JOURNAL_KEY_PREFIX}*", "+evalsha", "+eval", "+time", "+info",
    "+hset", "+hsetnx", "+hget", "+hmget", "+hincrby", "+hdel", "+zadd", "+zrem", "+zrange",
    "+hkeys", "+pexpire", "+get", "+set",
    # span attributes: the connection's id (INFO above gives the server's run id)
    "+client|id",
    # the analysis of a miss: the key's TTL, the run's other keys, a replica's master
    "+pttl", "+scan", "+exists",
    # the keyspace watcher
    # (PSUBSCRIBE's patterns must match the ACL's literally: one rule per watched event)
    "&__keyevent@*__:expired", "&__keyevent@*__:evicted", "&__keyevent@*__:del",
    "+psubscribe", "+punsubscribe", "+config|get",
    # Redis Cluster: each master's watcher lease, in a slot it serves; the topology (failover, watchers)
    "~{subflow:watcher:*", "+cluster|nodes", "+cluster|slots",
)



# -- naming -------------------------------------------------------------------------


def command_name(command: str) -> str:
    """The canonical name of a command: ``"client|id"``, ``"CLIENT ID"``, ``"client  id"`` -> ``"CLIENT ID"``."""
    return " ".join(command.replace("|", " ").split()).upper()


def acl_name(command: str) -> str:
    """The name ACL rules use: ``"CLIENT ID"`` -> ``"client|id"`` (for ``+client|id`` in a hint)."""
    return command_name(command).lower().replace(" ", "|")


# -- classifying errors -------------------------------------------------------------

_REFUSAL_PHRASES = (
    ("unknown command", "unknown command"),
    ("unknown subcommand", "unknown subcommand"),
    ("command is disabled", "disabled"),
    ("has been disabled", "disabled"),
    ("renamed", "renamed"),
    ("command not allowed", "not allowed"),
    ("command is not allowed", "not allowed"),
)
#: Error replies that mention a command but are about the situation, not the permission.
_SITUATIONAL = ("transaction", "context", "loading", "readonly", "busy", "noscript")


def refusal_reason(error: BaseException | None) -> str | None:
    """``"NOPERM"``, ``"NOPERM (keys)"``, ``"unknown command"``, ``"renamed"``... or ``None``.

    ``None`` means: not a refusal (a timeout, a wrong type, a script error...),
    do not remember it. Only error replies qualify (``redis.ResponseError`` and
    subclasses); connection errors never do. ``"NOPERM (keys)"`` and
    ``"NOPERM (channels)"`` are refusals of the keys or channels named, not of
    the command itself: remember them for the command only if you always use
    keys of that kind with it.
    """
    if error is None:
        return None
    try:
        from redis.exceptions import NoPermissionError, ResponseError
    except ImportError:  # pragma: no cover - redis is a dependency
        return None
    if not isinstance(error, ResponseError):
        return None
    text = str(error).strip()
    lowered = text.lower()
    if isinstance(error, NoPermissionError) or lowered.startswith("noperm"):
        if "access one of the keys" in lowered:
            return "NOPERM (keys)"
        if "access one of the channels" in lowered:
            return "NOPERM (channels)"
        return "NOPERM"
    if any(word in lowered for word in _SITUATIONAL):
        return None
    for phrase, reason in _REFUSAL_PHRASES:
        if phrase in lowered:
            return reason
    return None


def is_refusal(error: BaseException | None) -> bool:
    return refusal_reason(error) is not None


# -- rate-limited logging -----------------------------------------------------------


class RateLimitedLog:
    """At most one line per cause per ``interval_s``; repeats are counted into the next line.

    Example::

        runtime.log.log(("refused", endpoint, "CLIENT ID"), logging.WARNING,
                        "CLIENT ID refused on %s", "127.0.0.1:6379")

    Each record carries ``otel_subflow_cause`` (the cause, as ``str``) and
    ``otel_subflow_repeats`` (lines held back since the previous one) as extra
    fields. Thread-safe; remembers at most ``max_causes`` causes.
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0, max_causes: int = 4096) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.max_causes = max_causes
        self._lock = threading.Lock()
        #: cause -> [monotonic time of the last line, repeats held back since]
        self._state: dict[Hashable, list[float]] = {}

    def log(self, cause: Hashable, level: int, msg: str, *args: Any) -> bool:
        """Log ``msg % args`` unless this cause logged less than ``interval_s`` ago; ``True`` if written."""
        if not self.logger.isEnabledFor(level):
            return False
        now = time.monotonic()
        with self._lock:
            state = self._state.get(cause)
            if state is not None and now - state[0] < self.interval_s:
                state[1] += 1
                return False
            repeats = int(state[1]) if state is not None else 0
            if state is None and len(self._state) >= self.max_causes:
                self._state.pop(next(iter(self._state)))
            self._state[cause] = [now, 0.0]
        if repeats:
            msg = f"{msg} ({repeats} more since the last such line)"
        self.logger.log(level, msg, *args, extra={"otel_subflow_cause": str(cause), "otel_subflow_repeats": repeats})
        return True

    def held_back(self, cause: Hashable) -> int:
        """Lines of ``cause`` held back since its last line."""
        with self._lock:
            state = self._state.get(cause)
            return int(state[1]) if state is not None else 0

    def reset(self) -> None:
        with self._lock:
            self._state.clear()

    def after_fork(self) -> None:
        self._lock = threading.Lock()


# -- the refusal registry -----------------------------------------------------------


class Refusals:
    """Per endpoint and per command: did the server refuse it, and why. Thread-safe.

    Callers, for any command of ours (``CLIENT ID``, ``INFO``, ``EVALSHA``, ``PTTL``...)::

        ident = endpoint_ident(connection)          # or Endpoint.refusal_ident()
        if not runtime.refusals.is_refused(ident, "CLIENT ID"):
            ...send it, read EVERY reply...
            if runtime.refusals.note(ident, "CLIENT ID", reply_error, consequence="..."):
                ...a refusal: carry on without it (the connection is fine)...
    """

    def __init__(self, log: RateLimitedLog, recheck_after_s: float | None = RECHECK_AFTER_S,
                 max_endpoints: int = MAX_ENDPOINTS) -> None:
        self.log = log
        self.recheck_after_s = recheck_after_s
        self.max_endpoints = max_endpoints
        self._lock = threading.Lock()
        #: endpoint -> command -> (reason, monotonic time noted)
        self._by_endpoint: dict[EndpointIdent, dict[str, tuple[str, float]]] = {}

    def note(self, endpoint: EndpointIdent | None, command: str, error: BaseException | None,
             consequence: str = "", grant: str | None = None) -> bool:
        """Remember ``command`` as refused on ``endpoint`` if ``error`` is a refusal; ``True`` if it was.

        Logs one rate-limited warning per endpoint and command: what was refused,
        why, ``consequence`` (what the user loses) and the ACL rule that would
        grant it (``grant``, default ``+<command>``). Not a refusal (a timeout, a
        WRONGTYPE...) or no endpoint: nothing is remembered, ``False``.
        """
        reason = refusal_reason(error)
        if reason is None or endpoint is None:
            return False
        name = command_name(command)
        with self._lock:
            commands = self._by_endpoint.get(endpoint)
            if commands is None:
                if len(self._by_endpoint) >= self.max_endpoints:
                    self._by_endpoint.pop(next(iter(self._by_endpoint)))
                commands = self._by_endpoint[endpoint] = {}
            commands[name] = (reason, time.monotonic())
        user = endpoint[2] or "default"
        rule = grant if grant is not None else f"+{acl_name(name)}"
        tail = f"; {consequence}" if consequence else ""
        self.log.log(
            ("refused", endpoint, name), logging.WARNING,
            "%s refused on %s for user %s (%s)%s; grant %s to enable",
            name, describe_endpoint(endpoint), user, reason, tail, rule,
        )
        return True

    def is_refused(self, endpoint: EndpointIdent | None, command: str) -> bool:
        """Whether ``command`` was refused on ``endpoint`` (and is not due for a re-check)."""
        if endpoint is None:
            return False
        commands = self._by_endpoint.get(endpoint)
        if not commands:
            return False
        entry = commands.get(command_name(command))
        if entry is None:
            return False
        if self.recheck_after_s is not None and time.monotonic() - entry[1] >= self.recheck_after_s:
            with self._lock:
                commands.pop(command_name(command), None)
            return False
        return True

    def reason(self, endpoint: EndpointIdent | None, command: str) -> str | None:
        """Why ``command`` was refused on ``endpoint`` (``"NOPERM"``...), ``None`` if it was not."""
        if endpoint is None or not self.is_refused(endpoint, command):
            return None
        entry = self._by_endpoint.get(endpoint, {}).get(command_name(command))
        return entry[0] if entry is not None else None

    def refused_commands(self, endpoint: EndpointIdent | None) -> list[str]:
        """The commands refused on ``endpoint``, sorted (for a verdict that names missing permissions)."""
        if endpoint is None:
            return []
        with self._lock:
            names_ = list(self._by_endpoint.get(endpoint, {}))
        return sorted(n for n in names_ if self.is_refused(endpoint, n))

    def forget(self, endpoint: EndpointIdent | None = None) -> None:
        """Forget the refusals of ``endpoint``, or of every endpoint (tests, reconfiguration)."""
        with self._lock:
            if endpoint is None:
                self._by_endpoint.clear()
            else:
                self._by_endpoint.pop(endpoint, None)

    def after_fork(self) -> None:
        self._lock = threading.Lock()
