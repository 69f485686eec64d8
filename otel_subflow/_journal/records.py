"""What the journal writer queues: one :class:`Record` per event, and why a write failed.

A record is built inside the user's call (no I/O) and packed into the write script's
arguments by the flusher (``schema.pack_body``); ``schema.py`` holds its layout.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import redis
from opentelemetry.trace import SpanContext

from otel_subflow import names
from otel_subflow._identity import identity
from otel_subflow._journal import schema, script
from otel_subflow._journal.races import MissRecord
from otel_subflow._journal.schema import OP_INIT, OP_MISS, Writer
from otel_subflow._telemetry.instruments import Instruments

if TYPE_CHECKING:
    from otel_subflow._redis.connection import ConnectionInfo

#: Misses that a later init can answer. A miss already explained by an init
#: (expired, evicted, a wrong endpoint...) is not a race when the workflow re-inits.
RACE_CANDIDATE_CAUSES = frozenset({names.CAUSE_NEVER_WRITTEN, names.CAUSE_UNKNOWN, names.CAUSE_GET_BEFORE_INIT})

#: Why records were dropped (the values of the ``subflow.journal.drop_reason`` attribute).
DROP_REASONS = ("queue_full", "memory_pressure", "noperm", "oom", "readonly", "timeout", "connection", "error")

class Record:
    __slots__ = ("enqueued", "extra", "init_span", "instruments", "key", "known_race_get_span", "miss", "node_id",
                 "op", "run_id", "seen_ms", "span_id", "trace_id", "ttl_ms", "writer")

    def __init__(self, op: str, run_id: str | None, node_id: str | None, key: str | None, writer: Writer,
                 *, ttl_ms: int | None = None, span: SpanContext | None = None, extra: tuple[str, ...] = (),
                 seen_ms: int | None = None, miss: MissRecord | None = None,
                 instruments: Instruments | None = None) -> None:
        #: The instruments of the decorator that made the record (its race span and correction
        #: metric go to that decorator's providers); ``None``: the global ones.
        self.instruments = instruments
        self.op = op
        self.run_id = run_id
        self.node_id = node_id
        self.key = key
        self.writer = writer
        self.ttl_ms = ttl_ms
        valid = span is not None and span.is_valid
        self.trace_id = span.trace_id if valid and span is not None else 0
        self.span_id = span.span_id if valid and span is not None else 0
        self.init_span = span if op == OP_INIT else None
        self.extra = extra
        self.seen_ms = seen_ms
        self.miss = miss
        self.known_race_get_span: str | None = None
        self.enqueued = time.monotonic()

    def ckey(self) -> str:
        return schema.compact_key(self.key, self.run_id, self.node_id) if self.key is not None else ""

    def args(self, now: float) -> script.RecordArgs:
        ckey = self.ckey()
        body = schema.pack_body(
            self.op, lag_ms=int((now - self.enqueued) * 1000), node_id=self.node_id, ckey=ckey,
            writer_id=self.writer.id, ttl_ms=self.ttl_ms, ids=schema.pack_ids(self.trace_id, self.span_id),
            extra=self.extra,
        )
        race_check = self.op == OP_MISS and self.seen_ms is not None and not (self.miss and self.miss.claimed)
        return script.RecordArgs(
            run=schema.escape(self.run_id) if self.run_id is not None else "",
            ckey=ckey,
            seen_ms=str(self.seen_ms) if race_check else "",
            body=body,
        )

    def fields(self) -> dict[str, str]:
        """The record as the journal's readers see it (``JournalEntry.fields``), before it is written."""
        out = self.writer.fields()
        out["op"] = self.op
        for name, value in (("key", self.key), ("run_id", self.run_id), ("node_id", self.node_id)):
            if value is not None:
                out[name] = value
        if self.ttl_ms is not None:
            out["ttl_ms"] = str(self.ttl_ms)
        trace_id, span_id = self.ids_hex()
        if trace_id:
            out["trace_id"], out["span_id"] = trace_id, span_id
        return out

    def ids_hex(self) -> tuple[str, str]:
        if not self.trace_id:
            return "", ""
        return format(self.trace_id, "032x"), format(self.span_id, "016x")


def classify_failure(exc: BaseException) -> str:
    """The drop reason of a failed write."""
    if isinstance(exc, redis.TimeoutError):
        return "timeout"
    if isinstance(exc, redis.ConnectionError):
        return "connection"
    text = str(exc)
    if isinstance(exc, redis.exceptions.NoPermissionError) or text.startswith("NOPERM"):
        return "noperm"
    if "unknown command" in text or "renamed" in text:
        return "noperm"  # scripting disabled or renamed: as good as refused
    if isinstance(exc, redis.exceptions.OutOfMemoryError) or text.startswith("OOM"):
        return "oom"
    if isinstance(exc, redis.exceptions.ReadOnlyError) or text.startswith("READONLY"):
        return "readonly"
    return "error"


class WriterCache:
    """Who writes records made over a connection: this host and process, and the server it reached."""

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self._writers: dict[tuple[object, ...], Writer] = {}

    def of(self, info: ConnectionInfo | None) -> Writer:
        """The writer for ``info`` (``None``: records of our own, a tombstone or a gap)."""
        if info is None:
            ident: tuple[object, ...] = (identity.pid,)
        else:
            ident = (identity.pid, info.address, info.port, info.db, info.server_run_id)
        writer = self._writers.get(ident)
        if writer is None:
            endpoint = None
            if info is not None and info.address is not None:
                endpoint = f"{info.address}:{info.port}" if info.port is not None else str(info.address)
            writer = Writer(identity.host, identity.pid, endpoint, info.db if info is not None else None,
                            info.server_run_id if info is not None else None)
            if len(self._writers) >= self.capacity:
                self._writers.clear()
            self._writers[ident] = writer
        return writer
