"""The journal: a Redis stream per run (plus a global capped one) of init / miss / race / tombstone records.

Stream ids are assigned by the server, so they are the clock of record: app
servers' clocks drift, the Redis server's order does not.

The decorated call never waits on the journal. Records go into a bounded deque
(full: the oldest is dropped and counted) and a background thread writes a
whole batch in one pipelined round trip, with instrumentation suppressed. The
queue is flushed at exit; after ``fork()`` the child starts empty (the parent
still owns and writes what it had queued), so nothing is written twice.

Cross-process races are found by the two flushes, whichever comes second in
the journal server's order. The miss side runs a tiny Lua script: if the run's
journal already holds an init of the key that the miss's analysis did not see
(stream ids after the last one it read), that init answered the miss: a race;
otherwise it leaves a short-lived miss marker. The init side takes the marker
with GETDEL in its own flush. Each race is found exactly once.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import logging
import os
import threading
import time
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import redis
from opentelemetry import trace
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, TraceFlags

from otel_subflow import names
from otel_subflow._boundary import internal_errors
from otel_subflow._clients import endpoint_of, sync_client_from_url
from otel_subflow._config import SubflowConfig
from otel_subflow._identity import identity
from otel_subflow._race import recent_inits
from otel_subflow._version import __version__

if TYPE_CHECKING:
    from otel_subflow._race import MissRecord

_log = logging.getLogger(names.LOGGER_NAME)

OP_INIT = "init"
OP_MISS = "miss"
OP_RACE = "race"
OP_EXPIRED = "expired"
OP_EVICTED = "evicted"
OP_DEL = "del"
OP_GAP = "watcher_gap"
OP_SUPPRESSED = "misses_suppressed"
TOMBSTONE_OPS = (OP_EXPIRED, OP_EVICTED, OP_DEL)
#: Misses that a later init can answer. A miss already explained by an init
#: (expired, evicted, a wrong endpoint...) is not a race when the workflow re-inits.
RACE_CANDIDATE_CAUSES = frozenset({names.CAUSE_NEVER_WRITTEN, names.CAUSE_UNKNOWN, names.CAUSE_GET_BEFORE_INIT})
#: Without OTEL_SUBFLOW_JOURNAL_URL the journal is kept in this db of the state server.
JOURNAL_DB = 0

# KEYS: the run's journal, the miss marker. ARGV: state key, marker value, marker
# TTL (ms), last journal id the analysis saw ('' when it saw none). Returns the
# answering init's {stream id, trace id, span id}, or 0 after leaving the marker.
_MISS_MARKER_SCRIPT = """
if ARGV[4] ~= '' then
  local entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[4], '+', 'COUNT', 500)
  for _, entry in ipairs(entries) do
    local f = entry[2]
    local op, key, tid, sid = nil, nil, '', ''
    for i = 1, #f, 2 do
      if f[i] == 'op' then op = f[i + 1]
      elseif f[i] == 'key' then key = f[i + 1]
      elseif f[i] == 'trace_id' then tid = f[i + 1]
      elseif f[i] == 'span_id' then sid = f[i + 1] end
    end
    if op == 'init' and key == ARGV[1] then return {entry[1], tid, sid} end
  end
end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 0
"""


def _encoded_fields(fields: Mapping[str, str]) -> list[bytes]:
    """Stream entry fields as the flat ``k, v, ...`` argument list of XADD, UTF-8 encoded once.

    ``backslashreplace``: a value UTF-8 cannot encode is written escaped instead of
    failing the whole pipelined batch it is in.
    """
    out: list[bytes] = []
    for name, value in fields.items():
        out.append(name.encode("utf-8", "backslashreplace"))
        out.append(value.encode("utf-8", "backslashreplace"))
    return out


def run_stream_key(run_id: str) -> str:
    return names.JOURNAL_KEY_TEMPLATE.format(run_id=run_id)


def miss_marker_key(key: str) -> str:
    return names.MISS_MARKER_KEY_TEMPLATE.format(key=key)


@dataclasses.dataclass
class JournalStats:
    """Counters of one journal (read them with :meth:`Journal.stats`)."""

    queued: int = 0
    written: int = 0  # stream entries written (a record goes to its run's stream and the global one)
    dropped: int = 0
    flushes: int = 0
    failed_flushes: int = 0
    races_detected: int = 0
    #: Misses the rate limit kept out of the journal one by one (counted in one record per flush).
    misses_suppressed: int = 0


class _Record:
    __slots__ = ("enqueued", "fields", "init_span", "key", "known_race_get_span", "miss", "run_id")

    def __init__(
        self,
        fields: dict[str, str],
        run_id: str | None,
        key: str | None,
        miss: MissRecord | None = None,
        init_span: SpanContext | None = None,
    ) -> None:
        self.fields = fields
        self.run_id = run_id
        self.key = key
        self.miss = miss
        self.init_span = init_span
        self.known_race_get_span: str | None = None
        self.enqueued = time.monotonic()


def _hex_ids(span: trace.Span | None) -> tuple[str, str]:
    if span is None:
        return "", ""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return "", ""
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def _span_context(trace_id: str, span_id: str) -> SpanContext | None:
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


class Journal:
    """One journal target (a Redis endpoint) with its queue and flusher thread."""

    def __init__(self, client: redis.Redis, config: SubflowConfig) -> None:
        self.client = client
        self.config = config
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
        self._tracer = trace.get_tracer(names.INSTRUMENTATION_NAME, __version__)

    # -- producer side (called inside the user's call: no I/O, no waiting) ----

    def _enqueue(self, record: _Record) -> None:
        queue = self._queue
        if len(queue) == queue.maxlen:
            self._stats.dropped += 1  # deque(maxlen) drops the oldest on append
        queue.append(record)
        self._stats.queued += 1
        if self._thread is None or not self._thread.is_alive():
            self._start()
        if len(queue) >= self.config.journal_batch_size:
            self._wake.set()

    def _base_fields(self, op: str, run_id: str | None, node_id: str | None, key: str | None) -> dict[str, str]:
        fields = {"op": op, "host": identity.host, "pid": str(identity.pid)}
        if run_id is not None:
            fields["run_id"] = run_id
        if node_id is not None:
            fields["node_id"] = node_id
        if key is not None:
            fields["key"] = key
        return fields

    def _conn_fields(self, fields: dict[str, str], info: Any) -> None:
        if info is None:
            return
        if info.server_run_id:
            fields["server_run_id"] = info.server_run_id
        fields["db"] = str(info.db)
        if info.address is not None:
            fields["endpoint"] = f"{info.address}:{info.port}" if info.port is not None else info.address

    def record_init(self, call: Any) -> None:
        """Journal a successful init (and, if it answered a miss of this process, the race)."""
        fields = self._base_fields(OP_INIT, call.run_id, call.node_id, call.key)
        fields["trace_id"], fields["span_id"] = _hex_ids(call.span)
        if call.ttl_ms is not None:
            fields["ttl_ms"] = str(call.ttl_ms)
        self._conn_fields(fields, call.info)
        if call.key is not None:
            recent_inits.add(call.key, fields)
        record = _Record(fields, call.run_id, call.key, init_span=call.span.get_span_context())
        race_of = call.race_of
        if race_of is not None:
            record.known_race_get_span = race_of.span_id
        self._enqueue(record)
        if race_of is not None:
            self._enqueue_race(race_of.run_id, race_of.node_id, race_of.key, race_of.trace_id,
                               race_of.span_id, fields["trace_id"], fields["span_id"], "in_process")

    def record_miss(self, call: Any, cause: str, confidence: str, miss: MissRecord | None,
                    journal_seen_id: str | None = None) -> None:
        """Journal a failed read with its verdict at the time of the read.

        ``journal_seen_id`` is the newest journal entry the analysis read: an init
        journalled after it, for this key, answered this miss (a race).
        """
        fields = self._base_fields(OP_MISS, call.run_id, call.node_id, call.key)
        fields["trace_id"], fields["span_id"] = _hex_ids(call.span)
        fields["cause"] = cause
        fields["confidence"] = confidence
        if journal_seen_id is not None:
            fields["journal_seen_id"] = journal_seen_id
        self._conn_fields(fields, call.info)
        self._enqueue(_Record(fields, call.run_id, call.key, miss=miss))

    def record_tombstone(self, op: str, run_id: str | None, node_id: str | None, key: str, **extra: str) -> None:
        """Journal an expired / evicted / del key event seen by the keyspace watcher."""
        fields = self._base_fields(op, run_id, node_id, key)
        fields.update(extra)
        self._enqueue(_Record(fields, run_id, key))

    def count_suppressed_miss(self) -> None:
        """A rate-limited miss: not journalled on its own, so a failure storm adds no load.

        The next flush writes one ``misses_suppressed`` record with the count to the
        global stream, so the monitor's failure rate still sees the storm.
        """
        self._suppressed_pending += 1
        self._stats.misses_suppressed += 1
        if self._thread is None or not self._thread.is_alive():
            self._start()

    def record_gap(self, run_id: str | None, started_ms: int, ended_ms: int, reason: str) -> None:
        """The watcher was disconnected: tombstones between these times may be lost."""
        fields = self._base_fields(OP_GAP, run_id, None, None)
        fields.update({"gap_start_ms": str(started_ms), "gap_end_ms": str(ended_ms), "reason": reason})
        self._enqueue(_Record(fields, run_id, None))

    def _enqueue_race(self, run_id: str | None, node_id: str | None, key: str | None, get_trace: str,
                      get_span: str, init_trace: str, init_span: str, detected_by: str) -> None:
        fields = self._base_fields(OP_RACE, run_id, node_id, key)
        fields.update({
            "cause": names.CAUSE_GET_BEFORE_INIT,
            "confidence": names.CONFIDENCE_DEFINITIVE,
            "get_trace_id": get_trace,
            "get_span_id": get_span,
            "init_trace_id": init_trace,
            "init_span_id": init_span,
            "detected_by": detected_by,
        })
        self._stats.races_detected += 1
        self._enqueue(_Record(fields, run_id, key))

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
            self._flush_available()
            if self._stopping and not self._queue:
                return

    def _flush_available(self) -> None:
        suppressed, self._suppressed_pending = self._suppressed_pending, 0
        if suppressed:
            fields = self._base_fields(OP_SUPPRESSED, None, None, None)
            fields["count"] = str(suppressed)
            self._queue.append(_Record(fields, None, None))
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

    def _flush_batch(self) -> bool:
        batch = self._take_batch()
        if not batch:
            return True
        config = self.config
        pipe = self.client.pipeline(transaction=False)
        actions: list[tuple[str, _Record]] = []
        runs: set[str] = set()
        run_maxlen, global_maxlen = str(config.journal_maxlen), str(config.global_journal_maxlen)
        queue_command: Any = pipe.execute_command  # untyped in redis-py's Pipeline
        now = time.monotonic()
        for record in batch:
            # How long the record waited here: the server stamps the flush, and the
            # operation happened this much earlier (same process, monotonic clock).
            record.fields["lag_ms"] = str(int((now - record.enqueued) * 1000))
            # The same command redis-py's xadd() builds, with the fields encoded once for
            # both streams: packing str arguments is most of the flusher's CPU.
            flat = _encoded_fields(record.fields)
            if record.run_id is not None:
                queue_command("XADD", run_stream_key(record.run_id), b"MAXLEN", b"~", run_maxlen, "*", *flat)
                actions.append(("xadd", record))
                runs.add(record.run_id)
            queue_command("XADD", names.GLOBAL_JOURNAL_KEY, b"MAXLEN", b"~", global_maxlen, "*", *flat)
            actions.append(("xadd", record))
            op = record.fields["op"]
            if record.key is not None and op == OP_INIT:
                pipe.getdel(miss_marker_key(record.key))
                actions.append(("take_marker", record))
            elif (record.key is not None and record.run_id is not None and op == OP_MISS
                  and record.fields.get("cause") in RACE_CANDIDATE_CAUSES
                  and not (record.miss and record.miss.claimed)):
                marker = f"{record.fields.get('trace_id', '')}:{record.fields.get('span_id', '')}"
                pipe.eval(_MISS_MARKER_SCRIPT, 2, run_stream_key(record.run_id), miss_marker_key(record.key),
                          record.key, marker, config.miss_marker_ttl_ms, record.fields.get("journal_seen_id", ""))
                actions.append(("set_marker", record))
        for run in runs:
            pipe.expire(run_stream_key(run), config.journal_ttl_s)
        try:
            with suppress_instrumentation():
                replies = pipe.execute(raise_on_error=False)
        except Exception as exc:  # noqa: BLE001 - Redis down: count, drop, back off
            self._stats.failed_flushes += 1
            self._stats.dropped += len(batch)
            self._backoff_s = min(5.0, max(0.1, self._backoff_s * 2))
            if self._stats.failed_flushes == 1 or self._stats.failed_flushes % 100 == 0:
                _log.warning("otel-subflow journal flush failed (%s); %d records dropped so far",
                             type(exc).__name__, self._stats.dropped)
            return False
        self._backoff_s = 0.0
        self._stats.flushes += 1
        for (action, record), reply in zip(actions, replies, strict=False):
            if isinstance(reply, Exception):
                continue
            if action == "xadd":
                self._stats.written += 1
            elif action == "take_marker" and reply:
                with internal_errors("journal.race_from_init"):
                    self._race_from_init(record, reply)
            elif action == "set_marker" and isinstance(reply, list) and len(reply) == 3:
                with internal_errors("journal.race_from_miss"):
                    self._race_from_miss(record, str(reply[1]), str(reply[2]))
        return True

    def _race_from_init(self, record: _Record, marker: Any) -> None:
        text = marker.decode() if isinstance(marker, bytes) else str(marker)
        get_trace, _, get_span = text.partition(":")
        fields = record.fields
        if get_span == record.known_race_get_span:
            return  # the init already linked this miss in process: nothing new
        self._emit_race_span(fields, get_trace, get_span, record.init_span, "cross_process_init")
        self._enqueue_race(record.run_id, fields.get("node_id"), record.key, get_trace, get_span,
                           fields.get("trace_id", ""), fields.get("span_id", ""), "cross_process_init")

    def _race_from_miss(self, record: _Record, init_trace: str, init_span: str) -> None:
        fields = record.fields
        get_trace, get_span = fields.get("trace_id", ""), fields.get("span_id", "")
        init_ctx = _span_context(init_trace, init_span)
        self._emit_race_span(fields, get_trace, get_span, init_ctx, "cross_process_miss")
        self._enqueue_race(record.run_id, fields.get("node_id"), record.key, get_trace, get_span,
                           init_trace, init_span, "cross_process_miss")

    def _emit_race_span(self, fields: Mapping[str, str], get_trace: str, get_span: str,
                        init_span: SpanContext | None, detected_by: str) -> None:
        """A ``subflow.state.race`` span, child of the init when known, linked to the failed get."""
        links = []
        get_ctx = _span_context(get_trace, get_span)
        if get_ctx is not None:
            links.append(Link(get_ctx, {"subflow.race.role": "failed_get"}))
        parent = None
        if init_span is not None and init_span.is_valid:
            links.append(Link(init_span, {"subflow.race.role": "init"}))
            parent = trace.set_span_in_context(NonRecordingSpan(init_span))
        attrs = {
            names.ATTR_MISSING_CAUSE: names.CAUSE_GET_BEFORE_INIT,
            names.ATTR_MISSING_CONFIDENCE: names.CONFIDENCE_DEFINITIVE,
            "subflow.race.detected_by": detected_by,
        }
        copied = (("run_id", names.ATTR_RUN_ID), ("node_id", names.ATTR_NODE_ID), ("key", names.ATTR_STATE_KEY))
        for field, attr in copied:
            if field in fields:
                attrs[attr] = fields[field]
        span = self._tracer.start_span(names.SPAN_STATE_RACE, context=parent, kind=SpanKind.INTERNAL,
                                       attributes=attrs, links=links)
        span.add_event(names.EVENT_STATE_RACE, attrs)
        span.end()

    # -- control --------------------------------------------------------------

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Write everything queued now.

        ``True`` when the queue drained in time and nothing was dropped on the way
        (a batch that Redis refused is dropped and counted, and makes this ``False``).
        """
        deadline = time.monotonic() + timeout_s
        failed_before = self._stats.failed_flushes
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
        return drained and self._stats.failed_flushes == failed_before

    def stats(self) -> JournalStats:
        return dataclasses.replace(self._stats)

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


_journals: dict[tuple[Any, ...], Journal] = {}
_by_pool: weakref.WeakKeyDictionary[Any, Journal] = weakref.WeakKeyDictionary()
_registry_lock = threading.Lock()

def journal_for(client: Any, config: SubflowConfig) -> Journal | None:
    """The journal that records for ``client`` (or the one at ``OTEL_SUBFLOW_JOURNAL_URL``)."""
    if not config.journal_enabled:
        return None
    if config.journal_url:
        ident: tuple[Any, ...] = ("url", config.journal_url)
        journal = _journals.get(ident)
        if journal is None:
            with _registry_lock:
                journal = _journals.get(ident)
                if journal is None:
                    journal = Journal(sync_client_from_url(config.journal_url, 1.0), config)
                    _journals[ident] = journal
        return journal
    # The server the app's connections actually reach (a Sentinel pool: the current
    # master); not known yet: no journal, never a default host.
    endpoint = endpoint_of(client)
    if endpoint is None:
        return None
    journal = _by_pool.get(endpoint)
    if journal is not None:
        return journal
    with _registry_lock:
        # The journal lives in db 0 of the state server, whatever db the app
        # uses: a worker on the wrong db must still find the run's journal.
        ident = endpoint.ident(db=JOURNAL_DB)
        journal = _journals.get(ident)
        if journal is None:
            journal = Journal(endpoint.sync_client(1.0, db=JOURNAL_DB), config)
            _journals[ident] = journal
        _by_pool[endpoint] = journal
    return journal


def all_journals() -> list[Journal]:
    return list(_journals.values())


def flush_journals(timeout_s: float = 5.0) -> bool:
    """Flush every journal of this process (at exit, in tests)."""
    ok = True
    for journal in all_journals():
        ok = journal.flush(timeout_s) and ok
    return ok


def reset_journals() -> None:
    """Shut down and forget every journal (tests, reconfiguration)."""
    with _registry_lock:
        journals = list(_journals.values())
        _journals.clear()
        _by_pool.clear()
    for journal in journals:
        journal.shutdown(1.0)


def _after_fork_in_child() -> None:
    for journal in all_journals():
        journal._after_fork_in_child()


atexit.register(flush_journals, 2.0)
os.register_at_fork(after_in_child=_after_fork_in_child)
