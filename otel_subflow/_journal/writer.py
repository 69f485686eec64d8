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
from typing import TYPE_CHECKING, Any

import redis
from opentelemetry.instrumentation.utils import suppress_instrumentation

from otel_subflow import names
from otel_subflow._boundary import internal_errors
from otel_subflow._config import SubflowConfig
from otel_subflow._identity import identity
from otel_subflow._journal import races, schema, script
from otel_subflow._journal.races import MissRecord
from otel_subflow._journal.records import RACE_CANDIDATE_CAUSES, Record, WriterCache, classify_failure
from otel_subflow._journal.schema import (
    OP_GAP,
    OP_INIT,
    OP_MISS,
    OP_RACE,
    OP_SUPPRESSED,
    TOMBSTONE_OPS,
    Writer,
)
from otel_subflow._runtime import runtime
from otel_subflow._telemetry.instruments import instruments_of

if TYPE_CHECKING:
    from otel_subflow._analysis.interface import TracedCall

_log = logging.getLogger(names.LOGGER_NAME)

#: How long the flusher gathers records after a tombstone woke it, before it writes them.
URGENT_COALESCE_S = 0.003
#: How long a refused write script is not tried again on an endpoint.
REFUSAL_RETRY_S = 600.0

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


class Journal:
    """One journal (a Redis endpoint) with its queue and flusher thread."""

    def __init__(self, client: redis.Redis, config: SubflowConfig, *, dedicated: bool = False,
                 label: str = "", counters: bool = True) -> None:
        self.client = client
        self.config = config
        #: True when the journal has a Redis of its own (``OTEL_SUBFLOW_JOURNAL_URL``).
        self.dedicated = dedicated
        #: Where it lives, for logs and metrics (``host:port``; never credentials).
        self.label = label
        self._queue: collections.deque[Record] = collections.deque(maxlen=config.journal_queue_size)
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
        self._writers = WriterCache()
        self._script_loaded = False
        self._urgent = False
        # (the server's counters describe the states only where they live: not on a Redis of its own,
        # nor on the one node of a cluster that holds the journal)
        self._params = script.write_params(config, dedicated, counters=counters and not dedicated)
        #: What the writer was built from (:meth:`SubflowConfig.journal_settings`).
        self.settings = config.journal_settings()

    # -- producer side (called inside the user's call: no I/O, no waiting) ----

    def _enqueue(self, record: Record) -> None:
        queue = self._queue
        if len(queue) == queue.maxlen:
            self._drop("queue_full", 1)  # deque(maxlen) drops the oldest on append
            runtime.log.log("journal.queue_full", logging.WARNING,
                        "otel-subflow journal queue full (%d records): the oldest are dropped and counted",
                        queue.maxlen or 0)
        queue.append(record)
        self._stats.queued += 1
        if self._thread is None or not self._thread.is_alive():
            self._start()
        if len(queue) >= self.config.journal_batch_size:
            self._wake.set()

    def record_init(self, call: TracedCall) -> None:
        """Journal a successful init (and, if it answered a miss of this process, the race)."""
        span_ctx = call.span.get_span_context()
        writer = self._writers.of(call.info)
        record = Record(OP_INIT, call.run_id, call.node_id, call.key, writer, ttl_ms=call.ttl_ms, span=span_ctx,
                         instruments=call.instruments)
        if call.ttl_ms is not None and call.ttl_ms > self._max_ttl_ms:
            self._max_ttl_ms = call.ttl_ms
        if call.key is not None:
            runtime.recent_inits.add(call.key, record.fields())
        race_of = call.race_of
        if race_of is not None:
            record.known_race_get_span = race_of.span_id
        self._enqueue(record)
        if race_of is not None:
            get_ids = schema.pack_ids(race_of.span_context.trace_id, race_of.span_context.span_id)
            self._enqueue_race(record, race_of.run_id, get_ids, schema.pack_ids(record.trace_id, record.span_id),
                               "in_process", race_of.verdict_cause)

    def record_miss(self, call: TracedCall, cause: str, confidence: str, miss: MissRecord | None,
                    seen_ms: int | None = None) -> None:
        """Journal a failed read with its verdict at the time of the read.

        ``seen_ms`` is the journal server's time when the analysis read the run's
        records: an init of the key written after it answered this miss (a race).
        """
        span_ctx = call.span.get_span_context()
        race_seen = seen_ms if cause in RACE_CANDIDATE_CAUSES else None
        self._enqueue(Record(OP_MISS, call.run_id, call.node_id, call.key, self._writers.of(call.info), span=span_ctx,
                              extra=(cause, confidence), seen_ms=race_seen, miss=miss,
                              instruments=call.instruments))

    def record_tombstone(self, op: str, run_id: str | None, node_id: str | None, key: str, *,
                         db: int | str | None = None, source: str = "keyspace_watcher",
                         server_run_id: str | None = None, endpoint: str | None = None) -> None:
        """Journal an expired / evicted / del key event seen by the keyspace watcher."""
        writer = Writer(identity.host, identity.pid, endpoint, None, server_run_id)
        extra = ("" if db is None else str(db), source)
        self._enqueue(Record(op, run_id, node_id, key, writer, extra=extra))
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
        self._enqueue(Record(OP_GAP, run_id, None, None, self._writers.of(None), extra=extra))

    def _enqueue_race(self, side: Record, run_id: str | None, get_ids: str, init_ids: str, detected_by: str,
                      previous_cause: str) -> None:
        """A race record for the key of ``side`` (the init or the miss that found it)."""
        self._stats.races_detected += 1
        if previous_cause and previous_cause != names.CAUSE_GET_BEFORE_INIT:
            # The miss was counted under its first verdict; the correction makes the totals right.
            instruments_of(side.instruments).corrected.add(1, {
                names.ATTR_MISSING_CAUSE: names.CAUSE_GET_BEFORE_INIT,
                names.ATTR_MISSING_PREVIOUS_CAUSE: previous_cause})
        self._enqueue(Record(OP_RACE, run_id, side.node_id, side.key, side.writer,
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
            self._queue.append(Record(OP_SUPPRESSED, None, None, None, self._writers.of(None),
                                      extra=(str(suppressed),)))
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

    def _take_batch(self) -> list[Record]:
        batch: list[Record] = []
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
        args = script.write_args(self._params.encode(self._max_ttl_ms), writers.values(), records)
        try:
            with suppress_instrumentation():
                reply = self._execute(args)
            result = script.WriteResult.parse(reply)
        except Exception as exc:  # noqa: BLE001 - any failure: count, drop, back off, say so (rate-limited)
            self._failed(exc, len(batch))
            return False
        self._backoff_s = 0.0
        self._apply(result, batch)
        return True

    def _execute(self, args: list[str]) -> Any:
        keys = script.WRITE_KEYS
        if self._script_loaded:
            try:
                return self.client.evalsha(script.WRITE_SCRIPT_SHA, len(keys), *keys, *args)
            except redis.exceptions.NoScriptError:
                self._script_loaded = False  # the server restarted or flushed its scripts
        reply = self.client.eval(script.WRITE_SCRIPT, len(keys), *keys, *args)
        self._script_loaded = True  # EVAL caches the script: EVALSHA from now on
        return reply

    def _failed(self, exc: BaseException, count: int) -> None:
        reason = classify_failure(exc)
        stats = self._stats
        stats.failed_flushes += 1
        self._drop(reason, count)
        if reason == "noperm":
            self._refused_until = time.monotonic() + REFUSAL_RETRY_S
            runtime.log.log(f"journal.noperm.{self.label}", logging.WARNING,
                        "otel-subflow journal on %s is refused (%s): records are dropped and counted, and the "
                        "verdicts lose the journal's evidence. Grant the journal's user +eval +evalsha on keys "
                        "'%s*' (see docs/acl.md); retrying in %d s",
                        self.label, str(exc).split("\n")[0][:200], schema.PREFIX, int(REFUSAL_RETRY_S))
            return
        self._backoff_s = min(5.0, max(0.1, self._backoff_s * 2))
        runtime.log.log(f"journal.{reason}.{self.label}", logging.WARNING,
                    "otel-subflow journal write to %s failed (%s: %s); %d records dropped so far",
                    self.label, reason, type(exc).__name__, stats.dropped)

    def _apply(self, result: script.WriteResult, batch: list[Record]) -> None:
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
                runtime.log.log(f"journal.pressure.{self.label}", logging.WARNING,
                            "otel-subflow journal paused on %s: used_memory %d of maxmemory %d; it writes nothing "
                            "and gave memory back until usage falls", self.label, result.used_memory,
                            result.maxmemory)
            return
        stats.written += len(batch)
        for number, kind, value in result.races:
            if 1 <= number <= len(batch):
                with internal_errors("journal.race"):
                    record = batch[number - 1]
                    found = races.found_by_script(record, kind, value, instruments_of(record.instruments).tracer)
                    if found is not None:
                        self._enqueue_race(record, record.run_id, *found)

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
        self._writers = WriterCache()

