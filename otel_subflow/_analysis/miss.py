"""The miss path: rate-limited analysis, then the verdict as span event, log record and metric.

The analysis is written once, as a generator that yields pipelines to run and
receives their replies (:func:`_analysis_steps`); a sync and an async driver run
it. It runs with instrumentation suppressed (no spans of its own), on our own
connections with a short socket timeout, and at most ``analysis_rate_per_s``
times a second per process, so a failure storm cannot multiply the load on a
struggling Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any

from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.trace import Status, StatusCode
from redis.exceptions import TimeoutError as RedisTimeoutError

from otel_subflow import names
from otel_subflow._analysis.probe import PROBE_COMMANDS, Call, Evidence, Probe, command_of
from otel_subflow._analysis.verdict import Verdict, decide, tombstone_may_be_in_flight, unknown
from otel_subflow._config import SubflowConfig
from otel_subflow._journal import JOURNAL_DB, journal_for, journal_target
from otel_subflow._journal.races import MissRecord, recent_inits, recent_misses, recent_tombstones
from otel_subflow._journal.schema import JournalEntry
from otel_subflow._journal.store import RunRead
from otel_subflow._redis.clients import Target
from otel_subflow._redis.connection import note_server_run_id
from otel_subflow._redis.permissions import EndpointIdent, limited_log, refusals
from otel_subflow._telemetry.instruments import emit_log, logger
from otel_subflow._watch.lease import LEASE_KEY, heartbeat_alive

RATE_LIMITED = "analysis rate-limited"
NOT_PERMITTED = "analysis not permitted: the server refuses PTTL and INFO to this user"


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up. Thread-safe."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.updated = time.monotonic()
        self.denied = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return True
            self.denied += 1
            return False


_bucket: TokenBucket | None = None
_bucket_key: tuple[float, int] | None = None
_bucket_lock = threading.Lock()


def analysis_bucket(config: SubflowConfig) -> TokenBucket:
    """The process's token bucket (rebuilt if the configured rate changes)."""
    global _bucket, _bucket_key
    key = (config.analysis_rate_per_s, config.analysis_burst)
    if _bucket is None or _bucket_key != key:
        with _bucket_lock:
            if _bucket is None or _bucket_key != key:
                _bucket = TokenBucket(*key)
                _bucket_key = key
    return _bucket


def reset_rate_limit() -> None:
    global _bucket, _bucket_key
    _bucket, _bucket_key = None, None


# A step asks the driver to run a pipeline on a target and send back the replies. When the
# pipeline fails (a timeout, a refused connection, the breaker open), the driver throws the
# exception into the steps instead: a failed optional step (the journal elsewhere, a replica's
# master) is noted and the verdict is decided without it; a failed reader step ends the analysis.
Step = tuple[Target, list[Call]]

#: The target of a step that only waits (its one call: ``("sleep", (seconds,), {})``).
_WAIT = Target()
#: How long an analysis waits, once, for a live watcher's tombstone (the issue's 20 ms p99).
TOMBSTONE_WAIT_S = 0.02

#: The journal's read commands: when the journal's server refused one, it is not read.
_JOURNAL_READS = ("ZRANGE", "HMGET", "HGET")


def _analysis_steps(call: Any, evidence: Evidence) -> Generator[Step, list[Any], None]:
    """The analysis as steps: one round trip to the reader (with the journal when it lives
    there), one to the journal when it lives elsewhere, one to a replica's master; rarely one
    more for journal buckets or writers this process has not seen yet, and one more after a
    short wait when a live watcher's tombstone may still be on its way. Commands the servers
    refused before are not sent again (:data:`~otel_subflow._redis.permissions.refusals`)."""
    config: SubflowConfig = call.config
    reader = Target.of_client(call.client)
    if reader is None:
        return
    reader_ident = reader.refusal_ident()
    journal = journal_target(call.client, config)
    journal_ident = journal.refusal_ident() if journal is not None else None
    journal_here = journal is not None and journal.url is None and evidence.reader_db == JOURNAL_DB
    evidence.journal_dedicated = journal is not None and journal.url is not None
    run_read = None
    if journal is not None and call.run_id is not None:
        refused_reads = [c for c in _JOURNAL_READS if refusals.is_refused(journal_ident, c)]
        evidence.refused.extend(refused_reads)
        if not refused_reads:
            run_read = RunRead(journal.ident(0.0), call.run_id)

    probe = Probe(call.key, call.run_id, config.scan_count, lambda command: refusals.is_refused(reader_ident, command))
    evidence.refused.extend(probe.skipped)
    calls = list(probe.calls)
    # The watchers' heartbeat lives in db 0 of the watched server (see _watching).
    heartbeat_at = None
    if evidence.reader_db == 0 and not refusals.is_refused(reader_ident, "GET"):
        heartbeat_at = len(calls)
        calls.append(("get", (LEASE_KEY,), {}))
    journal_at = len(calls)
    if journal_here and run_read is not None:
        calls.extend(run_read.first_calls())
    journal_end = len(calls)
    if probe.info_call is not None:
        calls.append(probe.info_call)
    if not calls:
        return
    replies = yield reader, calls
    _note_refusals(reader_ident, calls, replies, evidence)
    info_reply = replies[-1] if probe.info_call is not None else None
    probe.parse(evidence, replies[: len(probe.calls)], info_reply)
    if heartbeat_at is not None and not isinstance(replies[heartbeat_at], Exception):
        evidence.watcher_alive = heartbeat_alive(replies[heartbeat_at])

    if run_read is not None and journal is not None:
        here = replies[journal_at:journal_end] if journal_here else None
        if here is not None:
            evidence.journal_seen_ms = evidence.server_time_ms
        read = yield from _read_journal(journal, journal_ident, run_read, here, evidence)
        if read is not None:
            _journal_evidence(evidence, read)
            _add_pending_tombstone(call, evidence)  # a watcher in this process: no round trip
            if evidence.watcher_alive and tombstone_may_be_in_flight(evidence):
                # A live watcher, the key gone, no tombstone yet: its event may be a few ms from
                # the journal (an expiry this very read set off, say). Wait once, read again.
                started = time.perf_counter()
                yield _WAIT, [("sleep", (TOMBSTONE_WAIT_S,), {})]
                again = yield from _read_journal(journal, journal_ident, RunRead(journal.ident(0.0), call.run_id),
                                                 None, evidence)
                evidence.tombstone_wait_ms = round((time.perf_counter() - started) * 1000.0, 3)
                if again is not None:
                    _journal_evidence(evidence, again)

    if evidence.is_replica and evidence.info.get("master_host") and reader.endpoint is not None:
        host = evidence.info["master_host"]
        port = int(evidence.info.get("master_port", "6379") or 6379)
        evidence.master_endpoint = f"{host}:{port}"
        master = Target(reader.endpoint, db=evidence.reader_db, host=host, port=port)
        master_ident = master.refusal_ident()
        if refusals.is_refused(master_ident, "EXISTS"):
            evidence.refused.append("EXISTS")
            return
        exists: list[Call] = [("exists", (call.key,), {})]
        try:
            answer = yield master, exists
        except Exception as exc:  # noqa: BLE001 - as above
            evidence.errors.append(f"master unreachable ({_why(exc)})")
            return
        _note_refusals(master_ident, exists, answer, evidence)
        if not isinstance(answer[0], Exception):
            evidence.master_has_key = int(answer[0]) > 0


def _read_journal(journal: Target, ident: EndpointIdent | None, run_read: RunRead, first_replies: list[Any] | None,
                  evidence: Evidence) -> Generator[Step, list[Any], RunRead | None]:
    """Read the run's journal: from replies already in hand, else in a round trip of its own (with
    the journal server's TIME); then the buckets or writers not known yet. ``None``: not read."""
    if first_replies is not None:
        more = run_read.feed_first(first_replies)
    else:
        first = [*run_read.first_calls(), ("time", (), {})]
        try:
            away = yield journal, first
        except Exception as exc:  # noqa: BLE001 - decided without the journal, and the verdict says so
            evidence.errors.append(f"journal unreachable ({_why(exc)})")
            return None
        _note_refusals(ident, first, away, evidence)
        more = run_read.feed_first(away[:-1])
        evidence.journal_seen_ms = _time_ms(away[-1])
    while more:
        try:
            answer = yield journal, more
        except Exception as exc:  # noqa: BLE001 - as above
            evidence.errors.append(f"journal unreachable ({_why(exc)})")
            return None
        _note_refusals(ident, more, answer, evidence)
        more = run_read.feed_second(answer)
    return run_read


def _note_refusals(ident: EndpointIdent | None, calls: list[Call], replies: list[Any], evidence: Evidence) -> None:
    """Remember the commands this server refused (one rate-limited line each), and name them."""
    for call_, reply in zip(calls, replies, strict=False):
        if not isinstance(reply, Exception):
            continue
        command = command_of(call_)
        consequence, grant = PROBE_COMMANDS.get(command, ("", f"+{command.lower()}"))
        if refusals.note(ident, command, reply, consequence=f"missing-state verdicts: {consequence}", grant=grant):
            evidence.refused.append(command)


def _why(exc: BaseException) -> str:
    return "server slow, skipped" if isinstance(exc, _Skipped) else type(exc).__name__


def _time_ms(reply: Any) -> int | None:
    if isinstance(reply, Exception) or not reply:
        return None
    seconds, micros = reply
    return int(seconds) * 1000 + int(micros) // 1000


def _journal_evidence(evidence: Evidence, read: RunRead) -> None:
    if read.errors or read.refused:  # not read whole: decided as if there were no journal
        evidence.errors.extend(f"journal {e}" for e in read.errors)
        return
    entries = read.entries()
    evidence.journal = entries
    evidence.journal_total = len(entries)
    evidence.journal_read = True
    evidence.journal_paused = read.status.get("paused") == "1"
    lost = read.status.get("lost") or "0"
    evidence.journal_buckets_lost = int(lost) if lost.isdigit() else 0


def _fill(pipe: Any, calls: list[Call]) -> None:
    for name, args, kwargs in calls:
        getattr(pipe, name)(*args, **kwargs)


def _precheck(call: Any) -> Verdict | None:
    config: SubflowConfig = call.config
    if not config.analysis_enabled:
        return unknown("analysis is disabled (OTEL_SUBFLOW_ANALYSIS=false)")
    if call.key is None:
        return unknown("the state key could not be built from the call's arguments")
    if call.client is None or getattr(call.client, "connection_pool", None) is None:
        return unknown("no Redis client was found in the call to analyse with")
    reader = Target.of_client(call.client)
    if reader is None:
        return unknown("the address of the Redis server behind the client is not known yet")
    ident = reader.refusal_ident()
    if refusals.is_refused(ident, "PTTL") and refusals.is_refused(ident, "INFO"):
        refused = refusals.refused_commands(ident)
        return unknown(NOT_PERMITTED, refused_commands=refused,
                       hint="grant the commands in docs/acl.md to this Redis user for full verdicts")
    bucket = analysis_bucket(config)
    if not bucket.take():
        return unknown(
            RATE_LIMITED,
            rate_limit_per_s=config.analysis_rate_per_s,
            rate_limited_total=bucket.denied,
        )
    return None


def _new_evidence(call: Any) -> Evidence:
    info = call.info
    endpoint = None
    if info is not None and info.address is not None:
        endpoint = f"{info.address}:{info.port}" if info.port is not None else info.address
    return Evidence(
        key=call.key,
        run_id=call.run_id,
        node_id=call.node_id,
        reader_db=info.db if info is not None else 0,
        reader_endpoint=endpoint,
        cached_server_run_id=info.server_run_id if info is not None else None,
    )


def _add_pending_init(call: Any, evidence: Evidence) -> None:
    """This process's init of the key, not flushed yet: place it in server time and add it."""
    _add_pending(evidence, recent_inits.get(call.key),
                 lambda entry, fields, _: entry.fields.get("span_id") == fields.get("span_id"))


#: A journalled tombstone this close to a watcher's in-process one is the same event.
_SAME_EVENT_MS = 1000


def _add_pending_tombstone(call: Any, evidence: Evidence) -> None:
    """A tombstone of a keyspace watcher in this process, maybe not written yet: add it (no round trip)."""
    _add_pending(evidence, recent_tombstones.get(call.key),
                 lambda entry, fields, at_ms: entry.op == fields.get("op")
                 and entry.fields.get("db") == fields.get("db") and abs(entry.op_ms - at_ms) <= _SAME_EVENT_MS)


def _add_pending(evidence: Evidence, pending: tuple[float, dict[str, str]] | None,
                 same: Callable[[JournalEntry, dict[str, str], int], bool]) -> None:
    """Place a record of this process in the journal's server time, unless the journal holds it already."""
    now_ms = evidence.server_time_ms
    if pending is None or now_ms is None or not evidence.journal_read:
        return
    at, fields = pending
    at_ms = now_ms - int((time.monotonic() - at) * 1000)
    if any(same(entry, fields, at_ms) for entry in evidence.journal):
        return
    evidence.journal.append(JournalEntry(at_ms, 0, {**fields, "pending": "1"}))
    evidence.journal.sort(key=lambda e: e.seq)


def _conclude(call: Any, evidence: Evidence, elapsed_s: float) -> Verdict:
    if evidence.server_run_id:
        note_server_run_id(call.client, evidence.server_run_id)
    if not evidence.info and evidence.errors:
        return unknown("the analysis probe failed: " + "; ".join(evidence.errors))
    _add_pending_init(call, evidence)  # (this process's tombstones were added by the steps)
    verdict = decide(evidence)
    verdict.evidence["analysis_ms"] = round(elapsed_s * 1000.0, 3)
    refused = sorted(set(evidence.refused))
    if refused:
        lost = sorted({PROBE_COMMANDS[c][0] for c in refused if c in PROBE_COMMANDS})
        verdict.evidence["refused_commands"] = refused
        verdict.summary += (f" The server refused {', '.join(refused)} to this user (ACL): "
                            f"{'; '.join(lost)} (grants in docs/acl.md).")
    if evidence.journal_read and evidence.journal_seen_ms is not None:
        # When the analysis read the journal (its server's clock): an init written after
        # it answers this miss, and the journal finds it (a race).
        verdict.evidence["journal_seen_ms"] = evidence.journal_seen_ms
    return verdict


class CircuitBreaker:
    """Per endpoint: after ``threshold`` timeouts in a row, analyses skip it for ``cooldown_s``.

    Then one analysis tries again; a success closes the breaker, a timeout opens it
    again. A slow or paused server thus costs a serial worker a few timeouts, not one
    per miss.
    """

    def __init__(self, threshold: int = 3, cooldown_s: float = 10.0) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self._failures: dict[Any, int] = {}
        self._open_until: dict[Any, float] = {}
        self._lock = threading.Lock()

    def allow(self, ident: Any) -> bool:
        until = self._open_until.get(ident)
        if until is None:
            return True
        with self._lock:
            if time.monotonic() < until:
                return False
            self._open_until.pop(ident, None)  # half-open: this one analysis tries
            self._failures[ident] = self.threshold - 1
            return True

    def success(self, ident: Any) -> None:
        if self._failures.get(ident):
            with self._lock:
                self._failures.pop(ident, None)

    def failure(self, ident: Any) -> None:
        with self._lock:
            count = self._failures.get(ident, 0) + 1
            self._failures[ident] = count
            if count >= self.threshold:
                self._open_until[ident] = time.monotonic() + self.cooldown_s
                limited_log.log("analysis.breaker", logging.WARNING,
                            "otel-subflow: %d analysis timeouts in a row on one Redis endpoint; misses there are "
                            "not analysed for %.0f s (verdict unknown: analysis skipped: server slow)",
                            count, self.cooldown_s)

    def clear(self) -> None:
        with self._lock:
            self._failures.clear()
            self._open_until.clear()


breaker = CircuitBreaker()
SERVER_SLOW = "analysis skipped: server slow"


class _Skipped(Exception):
    """The breaker is open for a target of this analysis."""


def _timed_out(exc: BaseException) -> bool:
    return isinstance(exc, (RedisTimeoutError, TimeoutError))


@contextlib.contextmanager
def _guarded(target: Target, timeout_s: float) -> Iterator[None]:
    """The circuit breaker around one round trip: skip an endpoint that keeps timing out."""
    ident = target.ident(timeout_s)
    if not breaker.allow(ident):
        raise _Skipped
    try:
        yield
    except Exception as exc:
        if _timed_out(exc):
            breaker.failure(ident)
        raise
    breaker.success(ident)


def _run_sync(target: Target, calls: list[Call], timeout_s: float) -> list[Any]:
    if target is _WAIT:
        time.sleep(calls[0][1][0])
        return []
    with _guarded(target, timeout_s):
        pipe = target.sync_client(timeout_s).pipeline(transaction=False)
        _fill(pipe, calls)
        return list(pipe.execute(raise_on_error=False))


async def _run_async(target: Target, calls: list[Call], timeout_s: float) -> list[Any]:
    if target is _WAIT:
        await asyncio.sleep(calls[0][1][0])
        return []
    with _guarded(target, timeout_s):
        pipe = target.async_client(timeout_s).pipeline(transaction=False)
        _fill(pipe, calls)
        return list(await pipe.execute(raise_on_error=False))


def _drive_sync(steps: Generator[Step, list[Any], None], timeout_s: float) -> None:
    """Run the analysis steps on sync pipelines (raises what a failed reader step raised)."""
    with suppress_instrumentation():
        try:
            target, calls = next(steps)
            while True:
                try:
                    replies = _run_sync(target, calls, timeout_s)
                except Exception as exc:  # noqa: BLE001 - the steps decide what a failure costs
                    target, calls = steps.throw(exc)
                else:
                    target, calls = steps.send(replies)
        except StopIteration:
            return


async def _drive_async(steps: Generator[Step, list[Any], None], timeout_s: float) -> None:
    """Run the analysis steps on ``redis.asyncio`` pipelines (as :func:`_drive_sync`)."""
    with suppress_instrumentation():
        try:
            target, calls = next(steps)
            while True:
                try:
                    replies = await _run_async(target, calls, timeout_s)
                except Exception as exc:  # noqa: BLE001 - as above
                    target, calls = steps.throw(exc)
                else:
                    target, calls = steps.send(replies)
        except StopIteration:
            return


def _failed(exc: Exception) -> Verdict:
    if isinstance(exc, _Skipped):
        return unknown(SERVER_SLOW)
    return unknown(f"the analysis failed ({type(exc).__name__})", analysis_error=type(exc).__name__)


def analyze_miss_sync(call: Any) -> Verdict:
    """Run the analysis for a miss in a sync call."""
    early = _precheck(call)
    if early is not None:
        return early
    evidence = _new_evidence(call)
    started = time.perf_counter()
    try:
        _drive_sync(_analysis_steps(call, evidence), call.config.analysis_timeout_s)
    except Exception as exc:  # noqa: BLE001 - timeouts, refused connections: the verdict says so
        return _failed(exc)
    return _conclude(call, evidence, time.perf_counter() - started)


async def analyze_miss_async(call: Any) -> Verdict:
    """Run the analysis for a miss in an ``async def`` call (redis.asyncio)."""
    early = _precheck(call)
    if early is not None:
        return early
    evidence = _new_evidence(call)
    started = time.perf_counter()
    try:
        await _drive_async(_analysis_steps(call, evidence), call.config.analysis_timeout_s)
    except Exception as exc:  # noqa: BLE001 - see analyze_miss_sync
        return _failed(exc)
    return _conclude(call, evidence, time.perf_counter() - started)


#: Verdicts of misses that were not analysed: counted and summed up, not logged one by one.
_UNANALYSED = frozenset({RATE_LIMITED, SERVER_SLOW, NOT_PERMITTED})


def emit_verdict(call: Any, verdict: Verdict) -> None:
    """Record the verdict: span event + status, log record, metric, journal, race memory."""
    span = call.span
    attrs = verdict.event_attributes()
    span.add_event(names.EVENT_STATE_MISSING, attrs)
    if call.config.miss_is_error:
        span.set_status(Status(StatusCode.ERROR, f"state missing: {verdict.cause}"))
    call.spec.instruments.missing.add(1, {names.ATTR_MISSING_CAUSE: verdict.cause})
    reason = verdict.evidence.get("reason")
    analysed = reason not in _UNANALYSED
    level = logging.WARNING
    if not analysed:
        # A storm or a slow server: one line a minute says so; the records go to debug.
        level = logging.DEBUG
        limited_log.log(f"miss.{reason}", logging.WARNING,
                    "otel-subflow: misses are not analysed one by one (%s); they are counted in the "
                    "subflow.state.missing metric with cause unknown", reason)
    if logger.isEnabledFor(level):
        fields: dict[str, Any] = {
            names.ATTR_RUN_ID: call.run_id,
            names.ATTR_NODE_ID: call.node_id,
            names.ATTR_STATE_KEY: call.key,
        }
        fields.update(attrs)
        emit_log(level, names.LOG_MISSING_STATE_ANALYSIS, span, fields)
    miss = None
    ctx = span.get_span_context()
    if call.key is not None and ctx.is_valid:
        miss = MissRecord(call.key, call.run_id, call.node_id, ctx, verdict.cause)
        recent_misses.add(miss)
    journal = journal_for(call.client, call.config)
    if journal is None:
        return
    if not analysed:
        journal.count_suppressed_miss()  # counted, not written one by one
        return
    seen = verdict.evidence.get("journal_seen_ms")
    journal.record_miss(call, verdict.cause, verdict.confidence, miss, int(seen) if seen is not None else None)


class _AdHoc:
    """The parts of a decorated call the analysis reads, for an analysis outside any call."""

    def __init__(self, client: Any, run_id: str | None, node_id: str | None, key: str, config: SubflowConfig) -> None:
        from otel_subflow._redis.connection import connection_info

        self.client = client
        self.run_id = run_id
        self.node_id = node_id
        self.key = key
        self.config = config
        self.info = connection_info(client)


def analyze_state(
    client: Any,
    run_id: str,
    node_id: str,
    *,
    key: str | None = None,
    config: SubflowConfig | None = None,
) -> tuple[Verdict, Evidence]:
    """Analyse one state now, outside any decorated call (the CLI's ``--missing-state``).

    Not rate-limited, not journalled; raises redis errors so the caller can report them.
    """
    from otel_subflow._config import get_config

    cfg = config or get_config()
    state_key = key if key is not None else cfg.key_template.format(run_id=run_id, node_id=node_id)
    call = _AdHoc(client, run_id, node_id, state_key, cfg)
    evidence = _new_evidence(call)
    started = time.perf_counter()
    _drive_sync(_analysis_steps(call, evidence), max(cfg.analysis_timeout_s, 2.0))
    return _conclude(call, evidence, time.perf_counter() - started), evidence
