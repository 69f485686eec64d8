"""Keyspace events: which the watcher needs, how to check and enable them, and which keys are states.

The server publishes expired / evicted / del events only with ``notify-keyspace-events``
holding ``E`` plus ``x``, ``e``, ``g`` (e.g. ``Exeg``). The watcher adds the missing
flags itself only when asked to, and never removes one.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from otel_subflow._journal.schema import OP_DEL, OP_EVICTED, OP_EXPIRED
from otel_subflow.names import JOURNAL_KEY_PREFIX

#: The key events the watcher turns into tombstones, by event name.
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


def worth_watching(template: str) -> bool:
    """A template the watchers of the process may match on their own: it names the run or the node and
    has text of its own (``{run_id}`` alone would take every key of the server for a state)."""
    fields = re.findall(r"\{([^{}]*)\}", template)
    literal = re.sub(r"\{[^{}]*\}", "", template)
    names_ids = any(re.match(r"(run_id|node_id)\b", field) for field in fields)
    return names_ids and bool(literal.strip())


class KeyTemplates:
    """The key templates the decorators of this process were given (``runtime.key_templates``).

    Read by every keyspace watcher of the process, the elected ones included; ``version`` tells a
    watcher when to rebuild its :class:`KeyMatcher`.
    """

    def __init__(self) -> None:
        self._templates: dict[str, None] = {}  # ordered: the first registered is tried first
        self._lock = threading.Lock()
        #: Bumped on every change.
        self.version = 0

    def add(self, template: str) -> None:
        if template in self._templates or not worth_watching(template):
            return
        with self._lock:
            if template not in self._templates:
                self._templates[template] = None
                self.version += 1

    def snapshot(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(self._templates)

    def clear(self) -> None:
        with self._lock:
            self._templates.clear()
            self.version += 1


class KeyMatcher:
    """Which state a key is, by the first of several templates that parses it (compiled once)."""

    def __init__(self, templates: tuple[str, ...]) -> None:
        self.templates = templates
        self._patterns = tuple(key_pattern(template) for template in templates)

    def match(self, key: str) -> dict[str, str | None] | None:
        """``{"run_id": ..., "node_id": ...}`` (either may be missing) of a state key, ``None`` for other keys."""
        if key.startswith(JOURNAL_KEY_PREFIX):
            return None  # ours, never a state (no template can be meant to match them)
        for pattern in self._patterns:
            found = pattern.match(key)
            if found is not None:
                return found.groupdict()
        return None


@functools.lru_cache(maxsize=64)
def key_matcher(templates: tuple[str, ...]) -> KeyMatcher:
    """The matcher of ``templates`` (duplicates dropped, order kept), shared by the watchers that use them."""
    return KeyMatcher(tuple(dict.fromkeys(templates)))


class StateKeys:
    """Which keys one watcher takes for states: its own templates (the config's first), then those the
    decorators registered (re-read when the registry changes)."""

    def __init__(self, registry: KeyTemplates, templates: tuple[str, ...]) -> None:
        self._registry = registry
        self._own = templates
        self._seen = -1
        self._matcher = self._current()

    def _current(self) -> KeyMatcher:
        version = self._registry.version  # read first: a template registered meanwhile rebuilds next time
        if version != self._seen:
            self._matcher = key_matcher(self._own + self._registry.snapshot())
            self._seen = version
        return self._matcher

    @property
    def templates(self) -> tuple[str, ...]:
        return self._current().templates

    def match(self, key: str) -> dict[str, str | None] | None:
        return self._current().match(key)


def read_events(client: Any) -> EventsCheck:
    """``CONFIG GET notify-keyspace-events`` on ``client``, checked (raises what redis-py raises)."""
    value = client.config_get("notify-keyspace-events").get("notify-keyspace-events", "")
    if isinstance(value, bytes):
        value = value.decode()
    return check_events_flags(str(value))



def add_missing_flags(client: Any, check: EventsCheck) -> EventsCheck:
    """Add the flags ``check`` lacks to the server's, keeping every flag set; the flags after.

    Raises :class:`KeyspaceEventsOff` when CONFIG SET is refused or the flags are still short.
    """
    try:
        client.config_set("notify-keyspace-events", merge_flags(check.current))
    except redis.ResponseError as exc:  # NOPERM of an ACL, or CONFIG renamed away (managed Redis)
        raise KeyspaceEventsOff(f"{check.describe()}; adding them was refused ({type(exc).__name__}: {exc})") from exc
    after = read_events(client)
    if not after.ok:
        raise KeyspaceEventsOff(after.describe())
    return after


def subscribe(pubsub: Any, timeout_s: float, stop: threading.Event,
              other: Callable[[dict[str, Any]], None]) -> bool:
    """PSUBSCRIBE to :data:`WATCHED_PATTERNS` and wait until the server confirmed each one.

    ``False`` when ``stop`` was set meanwhile; events that arrive first go to ``other``.
    Raises the server's refusal (NOPERM on the channels) or a timeout after ``timeout_s``.
    """
    pubsub.psubscribe(*WATCHED_PATTERNS)
    pending = set(WATCHED_PATTERNS)
    deadline = time.monotonic() + timeout_s
    while pending:
        if stop.is_set():
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise redis.TimeoutError(f"PSUBSCRIBE not confirmed within {timeout_s:g} s (waiting for {sorted(pending)})")
        # A NOPERM on the channels is the server's reply to PSUBSCRIBE: it is raised here.
        message = pubsub.get_message(ignore_subscribe_messages=False, timeout=min(0.2, remaining))
        if message is None:
            continue
        if message.get("type") == "psubscribe":
            channel = message.get("channel")
            pending.discard(channel.decode() if isinstance(channel, bytes) else str(channel))
        else:
            other(message)
    return True
