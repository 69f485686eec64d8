"""``diagnose --patterns``: the window's misses by cause, category, host pair and time, with the server beside them.

Everything comes from the journal: the misses with their verdicts (a race found later moves a
miss to ``get_before_init``), the inits that wrote the keys (the writer of a host pair), and the
counters sample every init carries (evictions, used memory, and the calls and microseconds of
all commands, from which each time bucket's average command latency follows). Buckets with no
init have no sample: their server columns are empty, never guessed.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Callable, Iterable
from typing import Any

from otel_subflow import names
from otel_subflow._analysis.remediation import ACTION_SUMMARY, ACTIONS_BY_CAUSE
from otel_subflow._journal.entries import JournalEntry
from otel_subflow._journal.schema import OP_INIT, OP_MISS, OP_RACE, OP_SUPPRESSED, parse_counter_sample
from otel_subflow._journal.store import Window

_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
#: A miss whose key no init in the window wrote.
NO_WRITER = "(no init seen)"
#: Bucket widths offered when none is given: the smallest giving at most ~12 buckets.
_NICE_BUCKETS_MS = (1000, 5000, 15_000, 60_000, 300_000, 900_000, 3_600_000, 2 * 3_600_000, 6 * 3_600_000,
                    86_400_000)


def actions_for(cause: str) -> list[tuple[str, str]]:
    """The fixes of a cause, ``(action, what)``: a miss counts toward each (``_analysis/remediation.py``)."""
    return [(action, ACTION_SUMMARY[action]) for action in ACTIONS_BY_CAUSE.get(cause, ())]


def parse_duration_ms(text: str) -> int:
    """``"24h"``, ``"15m"``, ``"90s"``, ``"500ms"``, ``"2d"`` in milliseconds (``ValueError`` otherwise)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*", text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration (use e.g. 90s, 15m, 24h, 2d)")
    value = int(float(match.group(1)) * _UNITS_MS[match.group(2)])
    if value <= 0:
        raise ValueError(f"{text!r} is not a positive duration")
    return value


def default_bucket_ms(window_ms: int) -> int:
    return next((b for b in _NICE_BUCKETS_MS if window_ms / b <= 12), _NICE_BUCKETS_MS[-1])


@dataclasses.dataclass(frozen=True)
class Miss:
    """One miss of the window, with its final cause and who wrote and read the key."""

    at_ms: int
    cause: str
    reader: str
    writer: str
    key: str | None
    run_id: str | None


def final_misses(entries: Iterable[JournalEntry]) -> list[Miss]:
    """The window's misses, each under its final cause, with its writer (the init of its key)."""
    ordered = sorted(entries, key=lambda e: e.seq)
    raced: dict[str, JournalEntry] = {}  # failed get's span id -> the race record (written by the init's side)
    for entry in ordered:
        get_span = entry.fields.get("get_span_id")
        if entry.op == OP_RACE and get_span:
            raced[get_span] = entry
    last_init: dict[str, str] = {}
    out: list[Miss] = []
    for entry in ordered:
        if entry.op == OP_INIT and entry.key is not None:
            last_init[entry.key] = entry.host or "?"
        elif entry.op == OP_MISS:
            race = raced.get(entry.span_id or "")
            cause = names.CAUSE_GET_BEFORE_INIT if race is not None else (entry.cause or names.CAUSE_UNKNOWN)
            writer = (race.host if race is not None and race.fields.get("detected_by") != "cross_process_miss"
                      else None) or last_init.get(entry.key or "", NO_WRITER)
            out.append(Miss(entry.op_ms, cause, entry.host or "?", writer, entry.key, entry.run_id))
    return out


def suppressed_count(entries: Iterable[JournalEntry]) -> int:
    """Misses the analysis rate limit counted without a verdict (one record per flush)."""
    return sum(int(e.fields.get("count", "0") or 0) for e in entries if e.op == OP_SUPPRESSED)


def _delta(first: dict[str, int], last: dict[str, int], name: str) -> int:
    return max(0, last[name] - first[name])


def server_buckets(series: Iterable[dict[str, int]], entries: Iterable[JournalEntry], since_ms: int, bucket_ms: int,
                   buckets: int) -> list[dict[str, Any]]:
    """Per bucket: evictions and expiries, used memory at its end, and the average command latency,
    from the journal's counters series and the samples the inits carry (``None`` where none falls)."""
    carried = (s for e in entries if e.op == OP_INIT if (s := parse_counter_sample(e.counters)) is not None)
    # The series' samples are whole; an init carries the first four fields of the same sample.
    samples = sorted({s["ms"]: s for s in (*carried, *series)}.values(), key=lambda s: s["ms"])
    whole = [s for s in samples if "usec" in s]
    out: list[dict[str, Any]] = []
    for i in range(buckets):
        start, end = since_ms + i * bucket_ms, since_ms + (i + 1) * bucket_ms
        row: dict[str, Any] = {"evicted": None, "expired": None, "used_memory_bytes": None,
                               "avg_command_latency_us": None, "samples": 0}
        inside = [s for s in samples if start <= s["ms"] < end]
        if inside:
            before = [s for s in samples if s["ms"] < start]
            first, last = (before[-1] if before else inside[0]), inside[-1]
            row.update(samples=len(inside), evicted=_delta(first, last, "evicted"),
                       expired=_delta(first, last, "expired"))
        whole_inside = [s for s in whole if start <= s["ms"] < end]
        if whole_inside:
            whole_before = [s for s in whole if s["ms"] < start]
            first, last = (whole_before[-1] if whole_before else whole_inside[0]), whole_inside[-1]
            row["used_memory_bytes"] = last["used_memory"]
            calls = last["calls"] - first["calls"]
            if calls > 0:
                row["avg_command_latency_us"] = round((last["usec"] - first["usec"]) / calls, 2)
        out.append(row)
    return out


def collect(window: Window, since_ms: int, now_ms: int, bucket_ms: int,
            actions_for: Callable[[str], list[tuple[str, str]]]) -> dict[str, Any]:
    """The ``patterns`` section. ``actions_for(cause)`` gives the remediations ``(action, what)`` of a cause."""
    entries = window.entries
    misses = final_misses(entries)
    by_cause = collections.Counter(m.cause for m in misses)
    by_category = collections.Counter(names.CAUSE_CATEGORY.get(m.cause, names.CATEGORY_UNKNOWN) for m in misses)
    pairs = collections.Counter((m.writer, m.reader) for m in misses)
    grid = since_ms - since_ms % bucket_ms  # buckets on whole multiples of their width (UTC)
    buckets = max(1, -(-(now_ms - grid) // bucket_ms))
    timeline = server_buckets(window.samples, entries, grid, bucket_ms, buckets)
    for i, row in enumerate(timeline):
        row["start_ms"] = grid + i * bucket_ms
        row["misses"] = dict(collections.Counter(
            m.cause for m in misses if grid + i * bucket_ms <= m.at_ms < grid + (i + 1) * bucket_ms))
    prevented: dict[str, dict[str, Any]] = {}
    for cause, count in by_cause.items():
        for action, what in actions_for(cause):
            item = prevented.setdefault(action, {"action": action, "what": what, "misses_prevented": 0, "causes": []})
            item["misses_prevented"] += count
            item["causes"].append(cause)
    ranked = sorted(prevented.values(), key=lambda a: (-a["misses_prevented"], a["action"]))
    return {
        "since_ms": since_ms,
        "until_ms": now_ms,
        "bucket_ms": bucket_ms,
        "misses": len(misses),
        "misses_not_analysed": suppressed_count(entries),
        "by_cause": dict(by_cause.most_common()),
        "by_category": dict(by_category.most_common()),
        "host_pairs": [{"writer": w, "reader": r, "misses": n, "cross_server": w not in (r, NO_WRITER)}
                       for (w, r), n in pairs.most_common()],
        "buckets": timeline,
        "remediations": ranked,
    }
