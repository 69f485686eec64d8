"""The miss analysis as steps: what it asks the servers, and what it concludes.

Written once, as a generator that yields pipelines to run and receives their replies
(:func:`analysis_steps`); ``miss.py`` drives it on sync or ``redis.asyncio`` connections.
The rules that turn the evidence into a verdict are in ``verdict.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from typing import Any

from redis.crc import key_slot

from otel_subflow._analysis.interface import StateCall
from otel_subflow._analysis.limits import Skipped
from otel_subflow._analysis.probe import PROBE_COMMANDS, Call, Evidence, Probe, command_of
from otel_subflow._analysis.verdict import Verdict, decide, tombstone_may_be_in_flight, unknown
from otel_subflow._journal import schema
from otel_subflow._journal.entries import JournalEntry
from otel_subflow._journal.location import JOURNAL_DB, journal_target
from otel_subflow._journal.store import RunRead
from otel_subflow._redis.clients import Target
from otel_subflow._redis.cluster import cluster_at, reads_replicas
from otel_subflow._redis.connection import note_server_run_id
from otel_subflow._redis.endpoint import EndpointIdent, is_redis_client
from otel_subflow._runtime import runtime
from otel_subflow._watch.lease import LEASE_KEY, heartbeat_alive

RATE_LIMITED = "analysis rate-limited"
NOT_PERMITTED = "analysis not permitted: the server refuses PTTL and INFO to this user"
SERVER_SLOW = "analysis skipped: server slow"


# A step asks the driver to run a pipeline on a target and send back the replies. When the
# pipeline fails (a timeout, a refused connection, the breaker open), the driver throws the
# exception into the steps instead: a failed optional step (the journal elsewhere, a replica's
# master) is noted and the verdict is decided without it; a failed reader step ends the analysis.
Step = tuple[Target, list[Call]]

#: The target of a step that only waits (its one call: ``("sleep", (seconds,), {})``).
WAIT = Target()
#: How long an analysis waits, once, for a live watcher's tombstone (the issue's 20 ms p99).
TOMBSTONE_WAIT_S = 0.02

#: The journal's read commands: when the journal's server refused one, it is not read.
_JOURNAL_READS = ("ZRANGE", "HMGET", "HGET")


def analysis_steps(call: StateCall, evidence: Evidence) -> Generator[Step, list[Any], None]:
    """The analysis as steps: one round trip to the reader (with the journal when it lives
    there), one to the journal when it lives elsewhere, one to a replica's master; rarely one
    more for journal buckets or writers this process has not seen yet, and one more after a
    short wait when a live watcher's tombstone may still be on its way. Commands the servers
    refused before are not sent again (``runtime.refusals``)."""
    config = call.config
    reader = Target.of_client(call.client)
    if reader is None:
        return
    reader_ident = reader.refusal_ident()
    journal = journal_target(call.client, config)
    journal_ident = journal.refusal_ident() if journal is not None else None
    # (on a Redis Cluster the journal lives on the master of its slot: here only if that is the key's)
    journal_here = (journal is not None and journal.url is None and evidence.reader_db == JOURNAL_DB
                    and journal.endpoint is reader.endpoint)
    evidence.journal_dedicated = journal is not None and journal.url is not None
    run_read = None
    if journal is not None and call.run_id is not None:
        refused_reads = [c for c in _JOURNAL_READS if runtime.refusals.is_refused(journal_ident, c)]
        evidence.refused.extend(refused_reads)
        if not refused_reads:
            run_read = RunRead(journal.ident(0.0), call.run_id)

    refusals = runtime.refusals
    cluster = cluster_at(reader.endpoint.address) if reader.endpoint is not None else None
    on_cluster = cluster is not None
    if on_cluster:
        evidence.key_slot = key_slot(evidence.key.encode("utf-8", "surrogateescape"))
        evidence.reads_replicas = reads_replicas(cluster)
        started = getattr(call, "started", None)
        if isinstance(started, float) and started > 0:
            evidence.read_age_ms = (time.perf_counter() - started) * 1000
    probe = Probe(evidence.key, call.run_id, config.scan_count,
                  lambda command: refusals.is_refused(reader_ident, command), cluster=on_cluster)
    evidence.refused.extend(probe.skipped)
    calls = list(probe.calls)
    # The watchers' heartbeat lives in db 0 of the watched server (see _watch/lease.py); a cluster's
    # node holds no heartbeat (its key's slot is served by one node only).
    heartbeat_at = None
    if evidence.reader_db == 0 and not on_cluster and not runtime.refusals.is_refused(reader_ident, "GET"):
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
            _add_pending_tombstone(evidence)  # a watcher in this process: no round trip
            if evidence.watcher_alive and tombstone_may_be_in_flight(evidence):
                # A live watcher, the key gone, no tombstone yet: its event may be a few ms from
                # the journal (an expiry this very read set off, say). Wait once, read again.
                started = time.perf_counter()
                yield WAIT, [("sleep", (TOMBSTONE_WAIT_S,), {})]
                again = yield from _read_journal(journal, journal_ident, RunRead(journal.ident(0.0), run_read.run_id),
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
        if runtime.refusals.is_refused(master_ident, "EXISTS"):
            evidence.refused.append("EXISTS")
            return
        exists: list[Call] = [("exists", (evidence.key,), {})]
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
        if runtime.refusals.note(ident, command, reply, consequence=f"missing-state verdicts: {consequence}",
                                 grant=grant):
            evidence.refused.append(command)


def _why(exc: BaseException) -> str:
    return "server slow, skipped" if isinstance(exc, Skipped) else type(exc).__name__


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
    evidence.journal_paused = read.status.get(schema.STATUS_PAUSED) == "1"
    lost = read.status.get(schema.STATUS_LOST) or "0"
    evidence.journal_buckets_lost = int(lost) if lost.isdigit() else 0


def precheck(call: StateCall) -> Verdict | None:
    """A verdict without any round trip when the miss cannot or must not be analysed now."""
    config = call.config
    if not config.analysis_enabled:
        return unknown("analysis is disabled (OTEL_SUBFLOW_ANALYSIS=false)")
    if call.key is None:
        return unknown("the state key could not be built from the call's arguments")
    if call.info is None:  # no connection pool: not a Redis client
        if call.client is not None and not is_redis_client(call.client):  # client=... gave something else
            return unknown("the call's client is not a Redis client (no connection_pool or execute_command)",
                           client_type=type(call.client).__qualname__)
        return unknown("no Redis client was found in the call to analyse with")
    reader = Target.of_client(call.client)
    if reader is None:
        return unknown("the address of the Redis server behind the client is not known yet")
    ident = reader.refusal_ident()
    if runtime.refusals.is_refused(ident, "PTTL") and runtime.refusals.is_refused(ident, "INFO"):
        refused = runtime.refusals.refused_commands(ident)
        return unknown(NOT_PERMITTED, refused_commands=refused,
                       hint="grant the commands in docs/acl.md to this Redis user for full verdicts")
    bucket = runtime.analysis_bucket(config.analysis_rate_per_s, config.analysis_burst)
    if not bucket.take():
        return unknown(
            RATE_LIMITED,
            rate_limit_per_s=config.analysis_rate_per_s,
            rate_limited_total=bucket.denied,
        )
    return None


def new_evidence(call: StateCall, key: str) -> Evidence:
    """The evidence of a miss of ``key`` (the call's key, known), before any round trip."""
    info = call.info
    endpoint = None
    if info is not None and info.address is not None:
        endpoint = f"{info.address}:{info.port}" if info.port is not None else info.address
    return Evidence(
        key=key,
        run_id=call.run_id,
        node_id=call.node_id,
        reader_db=info.db if info is not None else 0,
        reader_endpoint=endpoint,
        cached_server_run_id=info.server_run_id if info is not None else None,
    )


def _add_pending_init(evidence: Evidence) -> None:
    """This process's init of the key, not flushed yet: place it in server time and add it."""
    _add_pending(evidence, runtime.recent_inits.get(evidence.key),
                 lambda entry, fields, _: entry.span_id == fields.get("span_id"))


#: A journalled tombstone this close to a watcher's in-process one is the same event.
_SAME_EVENT_MS = 1000


def _add_pending_tombstone(evidence: Evidence) -> None:
    """A tombstone of a keyspace watcher in this process, maybe not written yet: add it (no round trip)."""
    _add_pending(evidence, runtime.recent_tombstones.get(evidence.key),
                 lambda entry, fields, at_ms: entry.op == fields.get("op")
                 and entry.db == fields.get("db") and abs(entry.op_ms - at_ms) <= _SAME_EVENT_MS)


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


def conclude(call: StateCall, evidence: Evidence, elapsed_s: float) -> Verdict:
    if evidence.server_run_id:
        note_server_run_id(call.client, evidence.server_run_id)
    if not evidence.info and evidence.errors:
        return unknown("the analysis probe failed: " + "; ".join(evidence.errors))
    _add_pending_init(evidence)  # (this process's tombstones were added by the steps)
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

