"""The journal writer: a bounded in-process queue and a background flusher.

The decorated call never waits on the journal. Records go into a bounded deque (full:
the oldest is dropped and counted) and a background thread writes each batch with one
``EVALSHA`` of the write script (``store.py``), with instrumentation suppressed. The
queue is flushed at exit; after ``fork()`` the child starts empty (the parent still owns
and writes what it had queued), so nothing is written twice.

Every record is accounted for: written, or dropped with a reason (``queue_full``,
``memory_pressure``, ``noperm``, ``oom``, ``readonly``, ``timeout``, ``connection``,
``error``). A refused script (an ACL without ``EVALSHA``) is remembered for the endpoint
and not retried for ten minutes; such failures are logged at most once a minute.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import Any

import redis
from opentelemetry import trace
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.trace import SpanContext

from otel_subflow import names
from otel_subflow._boundary import internal_errors
from otel_subflow._config import SubflowConfig
from otel_subflow._identity import identity
from otel_subflow._journal import schema, store
from otel_subflow._journal.races import MissRecord, emit_race_span, recent_inits, span_context
from otel_subflow._journal.schema import (
    OP_GAP,
    OP_INIT,
    OP_MISS,
    OP_RACE,
    OP_SUPPRESSED,
    TOMBSTONE_OPS,
    Writer,
)
from otel_subflow._redis.permissions import limited_log
from otel_subflow._telemetry.instruments import default_instruments
from otel_subflow._version import __version__

_log = logging.getLogger(names.LOGGER_NAME)

#: Misses that a later init can answer. A miss already explained by an init
#: (expired, evicted, a wrong endpoint...) is not a race when the workflow re-inits.
RACE_CANDIDATE_CAUSES = frozenset({names.CAUSE_NEVER_WRITTEN, names.CAUSE_UNKNOWN, names.CAUSE_GET_BEFORE_INIT})

#: Why records were dropped (the values of the ``subflow.journal.drop_reason`` attribute).
DROP_REASONS = ("queue_full", "memory_pressure", "noperm", "oom", "readonly", "timeout", "connection", "error")
#: How long the flusher gathers records after a tombstone woke it, before it writes them.
URGENT_COALESCE_S = 0.003
#: How long a refused write script is not tried again on an endpoint.
REFUSAL_RETRY_S = 600.0

# The write script's tuning, derived from the settings (see SubflowConfig).
_ROTATE_DIVISOR = 16
_MAX_BUCKETS = 32
_GLOBAL_CAP_BYTES = 64 * 1024
_RUN_CAP_BYTES = 1024 * 1024
_MIN_RETENTION_MS = 10 * 60 * 1000
_MEMORY_CHECK_MS = 1000
_RESUME_MARGIN_PCT = 5.0


def budget_pct(config: SubflowConfig, dedicated: bool) -> float:
    """The journal's budget in percent of maxmemory: configured, else 2 (50 on a Redis of its own)."""
    if config.journal_budget_pct is not None:
        return config.journal_budget_pct
    return 50.0 if dedicated else 2.0


def budget_bytes(config: SubflowConfig, dedicated: bool, maxmemory: int) -> int:
    """The budget the write script enforces on a server with this ``maxmemory`` (0: no limit)."""
    if maxmemory > 0:
        return int(maxmemory * budget_pct(config, dedicated) / 100)
    return int(config.journal_budget_mb * 1024 * 1024)


@dataclasses.dataclass
class JournalStats:
    """Counters of one journal (read them with :meth:`Journal.stats`)."""

    queued: int = 0
    #: Records the server took (each once, whatever copies the script keeps).
    written: int = 0
    #: Records lost on the way, all reasons together (see ``dropped_by_reason``).
    dropped: int = 0
    dropped_by_reason: dict[str, int] = dataclasses.field(default_factory=dict)
    flushes: int = 0
    failed_flushes: int = 0
    races_detected: int = 0
    #: Misses the rate limit kept out of the journal one by one (counted in one record per flush).
    misses_suppressed: int = 0
    #: The journal's estimated size and budget on its server, as of the last write, in bytes.
    bytes_used: int = 0
    budget_bytes: int = 0
    buckets: int = 0
    #: Buckets deleted to honour the budget, and buckets found gone (expired or evicted).
    buckets_trimmed: int = 0
    buckets_lost: int = 0
    #: True while the server is near maxmemory and the journal writes nothing.
    paused: bool = False
    maxmemory_policy: str = ""


class _Record:
    __slots__ = ("enqueued", "extra", "init_span", "key", "known_race_get_span", "miss", "node_id", "op",
                 "run_id", "seen_ms", "span_id", "trace_id", "ttl_ms", "writer")

    def __init__(self, op: str, run_id: str | None, node_id: str | None, key: str | None, writer: Writer,
                 *, ttl_ms: int | None = None, span: SpanContext | None = None, extra: tuple[str, ...] = (),
                 seen_ms: int | None = None, miss: MissRecord | None = None) -> None:
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

    def args(self, now: float) -> store.RecordArgs:
        ckey = self.ckey()
        body = schema.pack_body(
            self.op, lag_ms=int((now - self.enqueued) * 1000), node_id=self.node_id, ckey=ckey,
            writer_id=self.writer.id, ttl_ms=self.ttl_ms, ids=schema.pack_ids(self.trace_id, self.span_id),
            extra=self.extra,
        )
        race_check = self.op == OP_MISS and self.seen_ms is not None and not (self.miss and self.miss.claimed)
        return store.RecordArgs(
            run=schema.escape(self.run_id) if self.run_id is not None else "",
            ckey=ckey,
            seen_ms=str(self.seen_ms) if race_check else "",
            body=body,
        )

    def ids_hex(self) -> tuple[str, str]:
        if not self.trace_id:
            return "", ""
        return format(self.trace_id, "032x"), format(self.span_id, "016x")


def _classify(exc: BaseException) -> str:
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


class Journal:
    """One journal (a Redis endpoint) with its queue and flusher thread."""

    def __init__(self, client: redis.Redis, config: SubflowConfig, *, dedicated: bool = False,
                 label: str = "") -> None:
        self.client = client
        self.config = config
        #: True when the journal has a Redis of its own (``OTEL_SUBFLOW_JOURNAL_URL``).
        self.dedicated = dedicated
        #: Where it lives, for logs and metrics (``host:port``; never credentials).
        self.label = label
        self._queue: collections.deque[_Record] = collections.deque(maxlen=config.journal_queue_size)
        self._stats = JournalStats()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Condition(self._lock)
        self._busy = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._backoff_s = 0.0
        self._suppressed_pending = 0
        self._refused_until = 0.0
        self._dropped_at_flush = 0
        self._max_ttl_ms = 0
        self._writers: dict[tuple[Any, ...], Writer] = {}
        self._script_loaded = False
        self._urgent = False
        self._params = self._write_params(config, dedicated)
        self._tracer = trace.get_tracer(names.INSTRUMENTATION_NAME, __version__)

    @staticmethod
    def _write_params(config: SubflowConfig, dedicated: bool) -> store.WriteParams:
        pct = budget_pct(config, dedicated)
        pressure = config.journal_pressure_pct
        return store.WriteParams(
            budget_pct=pct,
            budget_fixed_bytes=int(config.journal_budget_mb * 1024 * 1024),
            rotate_divisor=_ROTATE_DIVISOR,
            min_retention_ms=_MIN_RETENTION_MS,
            max_retention_ms=config.journal_ttl_s * 1000,
            max_buckets=_MAX_BUCKETS,
            global_cap_bytes=_GLOBAL_CAP_BYTES,
            run_cap_bytes=_RUN_CAP_BYTES,
            marker_window_ms=config.miss_marker_ttl_ms,
            memory_check_ms=_MEMORY_CHECK_MS,
            pressure_pct=pressure,
            resume_pct=max(1.0, pressure - _RESUME_MARGIN_PCT),
            sample_counters=not dedicated,
        )

    # -- producer side (called inside the user's call: no I/O, no waiting) ----

    def _enqueue(self, record: _Record) -> None:
        queue = self._queue
        if len(queue) == queue.maxlen:
            self._drop("queue_full", 1)  # deque(maxlen) drops the oldest on append
            limited_log.log("journal.queue_full", logging.WARNING,
                        "otel-subflow journal queue full (%d records): the oldest are dropped and counted",
                        queue.maxlen or 0)
        queue.append(record)
        self._stats.queued += 1
        if self._thread is None or not self._thread.is_alive():
            self._start()
        if len(queue) >= self.config.journal_batch_size:
            self._wake.set()

    def _writer(self, info: Any) -> Writer:
        """The writer of records made over a connection (``ConnectionInfo``, or None for ours)."""
        if info is None:
            ident: tuple[Any, ...] = (identity.pid,)
        else:
            ident = (identity.pid, info.address, info.port, info.db, info.server_run_id)
        writer = self._writers.get(ident)
        if writer is None:
            endpoint = None
            if info is not None and info.address is not None:
                endpoint = f"{info.address}:{info.port}" if info.port is not None else str(info.address)
            writer = Writer(identity.host, identity.pid, endpoint, info.db if info is not None else None,
                            info.server_run_id if info is not None else None)
            if len(self._writers) > 64:
                self._writers.clear()
            self._writers[ident] = writer
        return writer

    def record_init(self, call: Any) -> None:
        """Journal a successful init (and, if it answered a miss of this process, the race)."""
        span_ctx = call.span.get_span_context()
        writer = self._writer(call.info)
        record = _Record(OP_INIT, call.run_id, call.node_id, call.key, writer, ttl_ms=call.ttl_ms, span=span_ctx)
        if call.ttl_ms is not None and call.ttl_ms > self._max_ttl_ms:
            self._max_ttl_ms = call.ttl_ms
        if call.key is not None:
            fields = writer.fields()
            fields.update(op=OP_INIT, key=call.key)
            if call.run_id is not None:
                fields["run_id"] = call.run_id
            if call.node_id is not None:
                fields["node_id"] = call.node_id
            if call.ttl_ms is not None:
                fields["ttl_ms"] = str(call.ttl_ms)
            trace_id, span_id = record.ids_hex()
            if trace_id:
                fields["trace_id"], fields["span_id"] = trace_id, span_id
            recent_inits.add(call.key, fields)
        race_of = call.race_of
        if race_of is not None:
            record.known_race_get_span = race_of.span_id
        self._enqueue(record)
        if race_of is not None:
            get_ids = schema.pack_ids(race_of.span_context.trace_id, race_of.span_context.span_id)
            self._enqueue_race(race_of.run_id, race_of.node_id, race_of.key, writer, get_ids,
                               schema.pack_ids(record.trace_id, record.span_id), "in_process", race_of.verdict_cause)

    def record_miss(self, call: Any, cause: str, confidence: str, miss: MissRecord | None,
                    seen_ms: int | None = None) -> None:
        """Journal a failed read with its verdict at the time of the read.

        ``seen_ms`` is the journal server's time when the analysis read the run's
        records: an init of the key written after it answered this miss (a race).
        """
        span_ctx = call.span.get_span_context()
        race_seen = seen_ms if cause in RACE_CANDIDATE_CAUSES else None
        self._enqueue(_Record(OP_MISS, call.run_id, call.node_id, call.key, self._writer(call.info), span=span_ctx,
                              extra=(cause, confidence), seen_ms=race_seen, miss=miss))

    def record_tombstone(self, op: str, run_id: str | None, node_id: str | None, key: str, *,
                         db: int | str | None = None, source: str = "keyspace_watcher",
                         server_run_id: str | None = None, endpoint: str | None = None) -> None:
        """Journal an expired / evicted / del key event seen by the keyspace watcher."""
        writer = Writer(identity.host, identity.pid, endpoint, None, server_run_id)
        extra = ("" if db is None else str(db), source)
        self._enqueue(_Record(op, run_id, node_id, key, writer, extra=extra))
        # Written at once (not at the next flush interval): a read soon after the event must find it.
        self._urgent = True
        self._wake.set()

    def count_suppressed_miss(self) -> None:
        """A rate-limited miss: not journalled on its own, so a failure storm adds no load.

        The next flush writes one ``misses_suppressed`` record with the count, so the
        monitor's failure rate still sees the storm.
        """
        self._suppressed_pending += 1
        self._stats.misses_suppressed += 1
        if self._thread is None or not self._thread.is_alive():
            self._start()

    def record_gap(self, run_id: str | None, started_ms: int, ended_ms: int, reason: str) -> None:
        """The watcher was disconnected: tombstones between these times may be lost."""
        extra = (str(started_ms), str(ended_ms), reason)
        self._enqueue(_Record(OP_GAP, run_id, None, None, self._writer(None), extra=extra))

    def _enqueue_race(self, run_id: str | None, node_id: str | None, key: str | None, writer: Writer,
                      get_ids: str, init_ids: str, detected_by: str, previous_cause: str) -> None:
        self._stats.races_detected += 1
        if previous_cause and previous_cause != names.CAUSE_GET_BEFORE_INIT:
            # The miss was counted under its first verdict; the correction makes the totals right.
            default_instruments().corrected.add(1, {names.ATTR_MISSING_CAUSE: names.CAUSE_GET_BEFORE_INIT,
                                                    names.ATTR_MISSING_PREVIOUS_CAUSE: previous_cause})
        self._enqueue(_Record(OP_RACE, run_id, node_id, key, writer,
                              extra=(get_ids, init_ids, detected_by, previous_cause)))

    # -- the flusher ----------------------------------------------------------

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="otel-subflow-journal", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.config.journal_flush_interval_s + self._backoff_s)
            self._wake.clear()
            if self._urgent and not self._backoff_s:
                # Tombstones: gather what else arrives within a few ms into the same script call,
                # so a burst of expiries costs one EVALSHA per few ms, not one per key.
                self._urgent = False
                time.sleep(URGENT_COALESCE_S)
            with internal_errors("journal.flush"):
                self._flush_available()
            if self._stopping and not self._queue:
                return

    def _flush_available(self) -> None:
        suppressed, self._suppressed_pending = self._suppressed_pending, 0
        if suppressed:
            self._queue.append(_Record(OP_SUPPRESSED, None, None, None, self._writer(None), extra=(str(suppressed),)))
            self._stats.queued += 1
        while self._queue:
            with self._lock:
                self._busy = True
            try:
                ok = self._flush_batch()
            finally:
                with self._lock:
                    self._busy = False
                    self._idle.notify_all()
            if not ok or len(self._queue) < self.config.journal_batch_size:
                break

    def _take_batch(self) -> list[_Record]:
        batch: list[_Record] = []
        queue = self._queue
        size = self.config.journal_batch_size
        while queue and len(batch) < size:
            try:
                batch.append(queue.popleft())
            except IndexError:
                break
        return batch

    def _drop(self, reason: str, count: int) -> None:
        stats = self._stats
        stats.dropped += count
        stats.dropped_by_reason[reason] = stats.dropped_by_reason.get(reason, 0) + count

    def _flush_batch(self) -> bool:
        batch = self._take_batch()
        if not batch:
            return True
        if time.monotonic() < self._refused_until:
            self._drop("noperm", len(batch))
            return True
        now = time.monotonic()
        records = [record.args(now) for record in batch]
        writers = {record.writer.id: record.writer for record in batch}
        args = store.write_args(self._params.encode(self._max_ttl_ms), writers.values(), records)
        try:
            with suppress_instrumentation():
                reply = self._execute(args)
            result = store.WriteResult.parse(reply)
        except Exception as exc:  # noqa: BLE001 - any failure: count, drop, back off, say so (rate-limited)
            self._failed(exc, len(batch))
            return False
        self._backoff_s = 0.0
        self._apply(result, batch)
        return True

    def _execute(self, args: list[str]) -> Any:
        keys = store.WRITE_KEYS
        if self._script_loaded:
            try:
                return self.client.evalsha(store.WRITE_SCRIPT_SHA, len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:
                self._script_loaded = False  # the server restarted or flushed its scripts
        reply = self.client.eval(store.WRITE_SCRIPT, len(keys), *keys, *args)
        self._script_loaded = True  # EVAL caches the script: EVALSHA from now on
        return reply

    def _failed(self, exc: BaseException, count: int) -> None:
        reason = _classify(exc)
        stats = self._stats
        stats.failed_flushes += 1
        self._drop(reason, count)
        if reason == "noperm":
            self._refused_until = time.monotonic() + REFUSAL_RETRY_S
            limited_log.log(f"journal.noperm.{self.label}", logging.WARNING,
                        "otel-subflow journal on %s is refused (%s): records are dropped and counted, and the "
                        "verdicts lose the journal's evidence. Grant the journal's user +eval +evalsha on keys "
                        "'%s*' (see docs/acl.md); retrying in %d s",
                        self.label, str(exc).split("\n")[0][:200], schema.PREFIX, int(REFUSAL_RETRY_S))
            return
        self._backoff_s = min(5.0, max(0.1, self._backoff_s * 2))
        limited_log.log(f"journal.{reason}.{self.label}", logging.WARNING,
                    "otel-subflow journal write to %s failed (%s: %s); %d records dropped so far",
                    self.label, reason, type(exc).__name__, stats.dropped)

    def _apply(self, result: store.WriteResult, batch: list[_Record]) -> None:
        stats = self._stats
        stats.flushes += 1
        stats.bytes_used = result.total_bytes
        stats.budget_bytes = result.budget
        stats.buckets = result.buckets
        stats.buckets_trimmed += result.trimmed
        stats.buckets_lost += result.lost_buckets
        stats.maxmemory_policy = result.policy
        was_paused, stats.paused = stats.paused, result.status.startswith("paused")
        if stats.paused:
            # Under pressure only tombstones are written ('paused+tombstones'); the rest is dropped.
            written = sum(r.op in TOMBSTONE_OPS for r in batch) if result.status == "paused+tombstones" else 0
            stats.written += written
            self._drop("memory_pressure", len(batch) - written)
            if not was_paused:
                limited_log.log(f"journal.pressure.{self.label}", logging.WARNING,
                            "otel-subflow journal paused on %s: used_memory %d of maxmemory %d; it writes nothing "
                            "and gave memory back until usage falls", self.label, result.used_memory,
                            result.maxmemory)
            return
        stats.written += len(batch)
        for number, kind, value in result.races:
            if 1 <= number <= len(batch):
                with internal_errors("journal.race"):
                    self._race(batch[number - 1], kind, value)

    def _race(self, record: _Record, kind: str, value: str) -> None:
        """A race the write script found: a span linked to both sides, and a race record."""
        parts = value.split(schema.US)
        if kind == "init":
            get_ids, previous = parts[0], parts[2] if len(parts) > 2 else ""
            init_ids = schema.pack_ids(record.trace_id, record.span_id)
            get_trace, get_span = schema.unpack_ids(get_ids)
            if get_span and get_span == record.known_race_get_span:
                return  # the init already linked this miss in process: nothing new
            init_ctx = record.init_span
            detected_by = "cross_process_init"
        else:
            get_ids, init_ids = schema.pack_ids(record.trace_id, record.span_id), parts[0]
            get_trace, get_span = record.ids_hex()
            previous = record.extra[0] if record.extra else ""
            init_trace, init_span = schema.unpack_ids(init_ids)
            init_ctx = span_context(init_trace, init_span) if init_trace else None
            detected_by = "cross_process_miss"
        attrs: dict[str, Any] = {"subflow.race.previous_cause": previous}
        if record.run_id is not None:
            attrs[names.ATTR_RUN_ID] = record.run_id
        if record.node_id is not None:
            attrs[names.ATTR_NODE_ID] = record.node_id
        if record.key is not None:
            attrs[names.ATTR_STATE_KEY] = record.key
        get_ctx = span_context(get_trace, get_span) if get_trace else None
        emit_race_span(self._tracer, attrs, get_ctx, init_ctx, detected_by)
        self._enqueue_race(record.run_id, record.node_id, record.key, record.writer, get_ids, init_ids, detected_by,
                           previous)

    # -- control --------------------------------------------------------------

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Write everything queued now.

        ``True`` when the queue drained in time and no record was dropped since the
        previous ``flush()`` (a full queue, a refused or failed write, memory pressure).
        """
        deadline = time.monotonic() + timeout_s
        if (self._queue or self._suppressed_pending) and (self._thread is None or not self._thread.is_alive()):
            self._start()
        drained = False
        while time.monotonic() < deadline:
            with self._lock:
                if not self._queue and not self._busy and not self._suppressed_pending:
                    drained = True
                    break
            self._wake.set()
            with self._lock:
                self._idle.wait(0.05)
        drained = drained or not self._queue
        dropped = self._stats.dropped
        lost = dropped != self._dropped_at_flush
        self._dropped_at_flush = dropped
        return drained and not lost

    def stats(self) -> JournalStats:
        copy = dataclasses.replace(self._stats)
        copy.dropped_by_reason = dict(self._stats.dropped_by_reason)
        return copy

    def shutdown(self, timeout_s: float = 5.0) -> None:
        self.flush(timeout_s)
        self._stopping = True
        self._wake.set()

    def _after_fork_in_child(self) -> None:
        # The parent still owns what was queued before the fork: drop our copy.
        self._queue.clear()
        self._thread = None
        self._busy = False
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._stats = JournalStats()
        self._suppressed_pending = 0
        self._dropped_at_flush = 0
        self._writers = {}

