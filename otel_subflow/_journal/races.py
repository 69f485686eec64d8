"""Races between a failed read and the init that follows it.

In one process a miss is remembered here (bounded, short-lived), so the init
that follows can carry event ``subflow.state.race`` and a Link to the failed
get without any Redis round trip. Across processes the journal's write script
finds them (see ``store.py``), and :func:`emit_race_span` records each one as a
``subflow.state.race`` span linked to both the failed get and the init.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, TraceFlags

from otel_subflow import names
from otel_subflow._journal import schema

if TYPE_CHECKING:
    from otel_subflow._journal.records import Record


class MissRecord:
    """A failed get that an init may still answer."""

    __slots__ = ("at", "claimed", "key", "node_id", "run_id", "span_context", "verdict_cause")

    def __init__(
        self,
        key: str,
        run_id: str | None,
        node_id: str | None,
        span_context: SpanContext,
        verdict_cause: str,
    ) -> None:
        self.key = key
        self.run_id = run_id
        self.node_id = node_id
        self.span_context = span_context
        self.verdict_cause = verdict_cause
        self.at = time.monotonic()
        #: Set when an init in this process answered the miss: the flusher then
        #: knows the race is already recorded and skips the cross-process check.
        self.claimed = False

    @property
    def trace_id(self) -> str:
        return format(self.span_context.trace_id, "032x")

    @property
    def span_id(self) -> str:
        return format(self.span_context.span_id, "016x")

    def event_attributes(self) -> dict[str, Any]:
        return {
            names.ATTR_MISSING_CAUSE: names.CAUSE_GET_BEFORE_INIT,
            names.ATTR_STATE_KEY: self.key,
            "subflow.race.get_trace_id": self.trace_id,
            "subflow.race.get_span_id": self.span_id,
            "subflow.race.previous_cause": self.verdict_cause,
            "subflow.race.detected_by": "in_process",
        }


class RecentMisses:
    """Bounded map key -> most recent unanswered miss, with a time limit."""

    def __init__(self, capacity: int = 10_000, max_age_s: float = 60.0) -> None:
        self.capacity = capacity
        self.max_age_s = max_age_s
        self._items: collections.OrderedDict[str, MissRecord] = collections.OrderedDict()
        self._lock = threading.Lock()

    def add(self, record: MissRecord) -> None:
        with self._lock:
            self._items.pop(record.key, None)
            self._items[record.key] = record
            oldest_allowed = record.at - self.max_age_s
            while self._items and (
                len(self._items) > self.capacity or next(iter(self._items.values())).at < oldest_allowed
            ):
                self._items.popitem(last=False)

    def take(self, key: str) -> MissRecord | None:
        if not self._items:  # lock-free fast path for the common case
            return None
        with self._lock:
            record = self._items.pop(key, None)
        if record is None or time.monotonic() - record.at > self.max_age_s:
            return None
        record.claimed = True
        return record

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()



#: The journal fields of a tombstone and of an init that a miss analysis needs (see _analysis/verdict.py).
TOMBSTONE_FIELDS = ("op", "key", "node_id", "run_id", "db", "source", "host", "server_run_id")
INIT_FIELDS = ("op", "key", "node_id", "run_id", "host", "trace_id", "span_id", "ttl_ms", "server_run_id",
               "db", "endpoint")


class _Remembered:
    """A record of this process, remembered until the journal surely holds it."""

    __slots__ = ("at", "values")

    def __init__(self, names_: tuple[str, ...], fields: dict[str, str]) -> None:
        self.values = tuple(fields.get(name) for name in names_)
        self.at = time.monotonic()


class RecentRecords:
    """Bounded map key -> this process's latest record of one kind, for misses within the journal's lag.

    The journal is written off the hot path, so for up to a flush interval (an init)
    or a round trip (a tombstone of a watcher in this process) a record is not in
    Redis yet. A miss of the same key in that window must still see it.
    """

    def __init__(self, fields: tuple[str, ...], capacity: int = 2048, max_age_s: float = 2.0) -> None:
        self.field_names = fields
        self.capacity = capacity
        self.max_age_s = max_age_s
        self._items: collections.OrderedDict[str, _Remembered] = collections.OrderedDict()
        self._lock = threading.Lock()

    def add(self, key: str, fields: dict[str, str]) -> None:
        record = _Remembered(self.field_names, fields)
        oldest_allowed = record.at - self.max_age_s
        with self._lock:
            self._items.pop(key, None)
            self._items[key] = record
            while self._items and (
                len(self._items) > self.capacity or next(iter(self._items.values())).at < oldest_allowed
            ):
                self._items.popitem(last=False)

    def get(self, key: str) -> tuple[float, dict[str, str]] | None:
        """``(monotonic time it was added, its fields)``, or ``None``."""
        if not self._items:
            return None
        with self._lock:
            record = self._items.get(key)
        if record is None or time.monotonic() - record.at > self.max_age_s:
            return None
        fields = {n: v for n, v in zip(self.field_names, record.values, strict=True) if v is not None}
        return record.at, fields

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()




def span_context(trace_id: str, span_id: str) -> SpanContext | None:
    """A remote span context from hex ids (``None`` when they are missing or invalid)."""
    try:
        ctx = SpanContext(
            trace_id=int(trace_id, 16),
            span_id=int(span_id, 16),
            is_remote=True,
            trace_flags=TraceFlags(TraceFlags.SAMPLED),
        )
    except ValueError:
        return None
    return ctx if ctx.is_valid else None


def emit_race_span(tracer: trace.Tracer, attrs: dict[str, Any], get_ctx: SpanContext | None,
                   init_ctx: SpanContext | None, detected_by: str) -> None:
    """A ``subflow.state.race`` span, child of the init when known, linked to the failed get and the init.

    ``attrs`` carries the run, node and key attributes of the race.
    """
    links = []
    if get_ctx is not None:
        links.append(Link(get_ctx, {"subflow.race.role": "failed_get"}))
    parent = None
    if init_ctx is not None and init_ctx.is_valid:
        links.append(Link(init_ctx, {"subflow.race.role": "init"}))
        parent = trace.set_span_in_context(NonRecordingSpan(init_ctx))
    attributes = dict(attrs)
    attributes.update({
        names.ATTR_MISSING_CAUSE: names.CAUSE_GET_BEFORE_INIT,
        names.ATTR_MISSING_CONFIDENCE: names.CONFIDENCE_DEFINITIVE,
        "subflow.race.detected_by": detected_by,
    })
    span = tracer.start_span(names.SPAN_STATE_RACE, context=parent, kind=SpanKind.INTERNAL,
                             attributes=attributes, links=links)
    span.add_event(names.EVENT_STATE_RACE, attributes)
    span.end()


def found_by_script(record: Record, kind: str, value: str, tracer: trace.Tracer) -> tuple[str, str, str, str] | None:
    """A race the write script found for ``record``: its span, linked to both sides, goes to ``tracer``.

    Returns what the race record holds (the get's and the init's packed ids, who detected it, the
    miss's first cause), or ``None`` when the init had already linked this miss in process.
    """
    parts = value.split(schema.US)
    if kind == "init":
        get_ids, previous = parts[0], parts[2] if len(parts) > 2 else ""
        init_ids = schema.pack_ids(record.trace_id, record.span_id)
        get_trace, get_span = schema.unpack_ids(get_ids)
        if get_span and get_span == record.known_race_get_span:
            return None  # the init already linked this miss in process: nothing new
        init_ctx = record.init_span
        detected_by = "cross_process_init"
    else:
        get_ids, init_ids = schema.pack_ids(record.trace_id, record.span_id), parts[0]
        get_trace, get_span = record.ids_hex()
        previous = record.extra[0] if record.extra else ""
        init_trace, init_span = schema.unpack_ids(init_ids)
        init_ctx = span_context(init_trace, init_span) if init_trace else None
        detected_by = "cross_process_miss"
    attrs: dict[str, Any] = {"subflow.race.previous_cause": previous,
                             **names.state_attributes(record.run_id, record.node_id, record.key)}
    get_ctx = span_context(get_trace, get_span) if get_trace else None
    emit_race_span(tracer, attrs, get_ctx, init_ctx, detected_by)
    return get_ids, init_ids, detected_by, previous
