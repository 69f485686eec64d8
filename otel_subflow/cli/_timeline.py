"""The journal, read back: timelines in server order and the conflicts they show.

Order is always the journal's order (the Redis server's clock), never an
application host's clock, so two hosts whose clocks drift still line up.
"""

from __future__ import annotations

from collections import Counter
from typing import Any
from urllib.parse import quote

import redis

from otel_subflow import names
from otel_subflow._journal import store
from otel_subflow._journal.entries import JournalEntry
from otel_subflow._journal.schema import OP_GAP, OP_INIT, OP_MISS, OP_RACE, TOMBSTONE_OPS
from otel_subflow.cli._common import iso_ms
from otel_subflow.cli._secrets import join_url


def jaeger_link(jaeger_url: str | None, trace_id: str | None) -> str | None:
    """The Jaeger UI page of a trace, without the credentials of ``jaeger_url`` (the browser asks for them)."""
    if not jaeger_url or not trace_id:
        return None
    return join_url(jaeger_url, f"/trace/{quote(trace_id, safe='')}")


def timeline_rows(entries: list[JournalEntry], jaeger_url: str | None = None) -> list[dict[str, Any]]:
    """Journal entries as rows of a timeline, oldest first, with the offset from the first entry.

    Times are the operations' own (server clock, less the time a record waited in its writer's
    queue), not the journal's flushes: a 50 ms TTL shows 50 ms between the init and its expiry."""
    rows: list[dict[str, Any]] = []
    entries = sorted(entries, key=lambda e: (e.op_ms, e.seq))
    first_ms = entries[0].op_ms if entries else 0
    for entry in entries:
        fields = entry.fields
        trace_id = fields.get("trace_id") or fields.get("get_trace_id") or None
        rows.append({
            "stream_id": entry.stream_id,
            "server_time": iso_ms(entry.op_ms),
            "offset_ms": entry.op_ms - first_ms,
            "op": entry.op,
            "host": fields.get("host"),
            "pid": fields.get("pid"),
            "run_id": fields.get("run_id"),
            "node_id": fields.get("node_id"),
            "key": fields.get("key"),
            "trace_id": trace_id,
            "span_id": fields.get("span_id") or fields.get("get_span_id") or None,
            "cause": fields.get("cause"),
            "jaeger_url": jaeger_link(jaeger_url, trace_id),
            "fields": dict(fields),
        })
    return rows


def read_run_journal(journal: redis.Redis, run_id: str) -> list[JournalEntry]:
    """The whole journal of one run, in server order."""
    return store.read_run(journal, run_id)


def read_recent(journal: redis.Redis, limit: int) -> tuple[list[JournalEntry], int]:
    """The last ``limit`` records of every run (server order), and how many were ever written."""
    return store.read_recent(journal, limit), sum(store.read_counts(journal).values())


def _conflict(kind: str, entries: list[JournalEntry], description: str) -> dict[str, Any]:
    first = entries[0].fields
    return {
        "type": kind,
        "key": first.get("key"),
        "node_id": first.get("node_id"),
        "stream_ids": [e.stream_id for e in entries],
        "hosts": [e.fields.get("host") for e in entries],
        "trace_ids": [e.fields.get("trace_id") or e.fields.get("get_trace_id") or None for e in entries],
        "gap_ms": entries[-1].op_ms - entries[0].op_ms,
        "description": description,
    }


def find_conflicts(entries: list[JournalEntry]) -> list[dict[str, Any]]:
    """Every conflict in a run's journal, in server order.

    - ``get_before_init``: a miss of a key that had no init yet, answered by a
      later init of it (or a ``race`` record the writers found themselves);
    - ``init_after_miss``: a key that had been initialised, went missing, and
      was initialised again (the workflow re-created lost state);
    - ``double_init``: two inits of one key from different hosts with no
      expiry, eviction or deletion between them;
    - ``cross_host_interleaving``: host A, then host B, then host A again on
      one key: the hosts took turns on the same state.
    """
    conflicts: list[dict[str, Any]] = []
    by_key: dict[str, list[JournalEntry]] = {}
    races: list[JournalEntry] = []
    for entry in entries:
        key = entry.fields.get("key")
        if entry.op == OP_RACE:
            races.append(entry)
        elif key and entry.op in (OP_INIT, OP_MISS, *TOMBSTONE_OPS):
            by_key.setdefault(key, []).append(entry)
    # Misses whose answer is already reported from the miss/init pair (by span id).
    reported_misses: set[str] = set()

    for key, ops in by_key.items():
        last_init: JournalEntry | None = None
        pending_miss: JournalEntry | None = None
        pending_miss_had_init = False
        ever_init = False
        for entry in ops:
            if entry.op == OP_MISS:
                if pending_miss is None:
                    pending_miss = entry
                    pending_miss_had_init = ever_init
            elif entry.op == OP_INIT:
                if pending_miss is not None:
                    kind = names.CONFLICT_INIT_AFTER_MISS if pending_miss_had_init else names.CONFLICT_GET_BEFORE_INIT
                    reported_misses.add(pending_miss.fields.get("span_id") or f"key:{key}")
                    gap = entry.op_ms - pending_miss.op_ms
                    if kind == names.CONFLICT_GET_BEFORE_INIT:
                        text = (f"{pending_miss.fields.get('host')} read it {gap} ms before "
                                f"{entry.fields.get('host')} initialised it.")
                    else:
                        text = (f"Initialised, then missing ({pending_miss.fields.get('cause') or '?'}) "
                                f"on {pending_miss.fields.get('host')}, then was initialised again "
                                f"by {entry.fields.get('host')} {gap} ms later.")
                    conflicts.append(_conflict(kind, [pending_miss, entry], text))
                    pending_miss = None
                elif last_init is not None and last_init.fields.get("host") != entry.fields.get("host"):
                    conflicts.append(_conflict(
                        names.CONFLICT_DOUBLE_INIT, [last_init, entry],
                        f"Initialised by {last_init.fields.get('host')} and again by "
                        f"{entry.fields.get('host')} {entry.op_ms - last_init.op_ms} ms later: the second write "
                        "overwrote the first.",
                    ))
                last_init = entry
                ever_init = True
            else:  # a tombstone: the state is gone, a later init is a fresh start
                last_init = None

        # Hosts taking turns on one key: A, B, A after collapsing consecutive same-host operations.
        turns: list[JournalEntry] = []
        for entry in ops:
            if entry.op not in (OP_INIT, OP_MISS):
                continue
            if turns and turns[-1].fields.get("host") == entry.fields.get("host"):
                continue
            turns.append(entry)
        for a, b, c in zip(turns, turns[1:], turns[2:], strict=False):
            if a.fields.get("host") == c.fields.get("host"):
                conflicts.append(_conflict(
                    names.CONFLICT_CROSS_HOST_INTERLEAVING, [a, b, c],
                    f"{a.fields.get('host')} ({a.op}), {b.fields.get('host')} ({b.op}), "
                    f"{c.fields.get('host')} ({c.op}) took turns on it within {c.op_ms - a.op_ms} ms.",
                ))
    for entry in races:
        # The writers found this race themselves; report it unless its miss is already in a pair above.
        if (entry.fields.get("get_span_id") or f"key:{entry.fields.get('key')}") in reported_misses:
            continue
        get_trace = entry.fields.get("get_trace_id") or ""
        conflicts.append(_conflict(
            names.CONFLICT_GET_BEFORE_INIT, [entry],
            f"The writers saw the race themselves ({entry.fields.get('detected_by', '?')}): "
            f"the read in trace {get_trace[:16] or '?'} ran before the init.",
        ))
    conflicts.sort(key=lambda c: _seq(c["stream_ids"][-1]))
    return conflicts


def _seq(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def race_section(journal: redis.Redis, run_id: str, jaeger_url: str | None = None) -> dict[str, Any]:
    """The ``race_conditions`` section for one run."""
    entries = read_run_journal(journal, run_id)
    conflicts = find_conflicts(entries)
    hosts = sorted({e.fields.get("host") or "?" for e in entries if e.op != OP_GAP})
    return {
        "run_id": run_id,
        "journal": names.JOURNAL_KEY_PREFIX + "*",
        "journal_found": bool(entries),
        "entries": len(entries),
        "hosts": hosts,
        "ops": dict(Counter(e.op for e in entries)),
        "timeline": timeline_rows(entries, jaeger_url),
        "conflicts": conflicts,
    }
