"""One monitor check of Redis, and the session statistics of its figures.

A check is a few PINGs (the median is the latency), one ``TIME`` + ``INFO``
round trip, and the journal's record counters. Evictions and state failures are
counted from deltas of counters in a sliding window (``evicted_keys``; the journal's
misses, rate-limited ones included), so a counter reset by a restart is not mistaken
for a burst. The first check has no earlier counters: it counts the misses among the
journal's recent records in the last minute of server time.

The same ``INFO`` gives what the trends need (:mod:`otel_subflow.cli._trends`): the
server's commands per second between checks, the p99 it reports for the state
commands, and their mean server time per call in the interval. The misses since the
previous check, by cause, come from the journal (:class:`MissCauses`).
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Mapping
from typing import Any

import redis

from otel_subflow import names
from otel_subflow._journal import schema, store
from otel_subflow._journal.entries import JournalEntry, parse_records
from otel_subflow._journal.schema import OP_MISS, OP_SUPPRESSED
from otel_subflow.cli._common import RedisTarget, percentile

FIGURES = ("latency_ms", "memory_pct", "state_failures_per_min", "evictions_per_min")
#: Most recent journal records the first check reads for its state-failure window.
WINDOW_READ_LIMIT = 10_000
#: The commands of a state service written as the README shows: GET reads the state, SET is the init.
STATE_COMMANDS = ("get", "set")
#: Misses the rate limiter let through unanalysed: counted by the journal, with no cause.
RATE_LIMITED = "rate_limited"
#: Misses the journal counted whose records its capped recent copy no longer held when the check read it.
NOT_READ = "not_read"
#: A cause this version does not know (a newer writer's).
OTHER_CAUSE = "other"


@dataclasses.dataclass
class Sample:
    """The figures of one successful check."""

    latency_ms: float
    latency_max_ms: float
    memory_pct: float | None
    used_bytes: int
    maxmemory_bytes: int
    evictions_per_min: float
    state_failures_per_min: float | None
    server_run_id: str
    #: Commands the server processed per second since the previous check (``None``: first check, or a reset).
    ops_per_s: float | None = None
    #: p99 in µs of each of :data:`STATE_COMMANDS` as ``INFO latencystats`` reports it (since the stats reset).
    latency_p99_us: dict[str, float | None] = dataclasses.field(default_factory=dict)
    #: Mean server time in µs per call of the state commands since the previous check (``None``: no calls).
    state_usec_per_call: float | None = None
    #: Misses journalled since the previous check, by cause (``None``: first check, or the journal unreadable).
    misses_by_cause: dict[str, int] | None = None


class Sampler:
    """Takes one check of Redis and keeps the windows the per-minute figures need."""

    def __init__(self, target: RedisTarget, journal: redis.Redis, ping_samples: int, window_s: float) -> None:
        self.target = target
        self.journal = journal
        self.ping_samples = ping_samples
        self.window_s = window_s
        self._evictions: collections.deque[tuple[float, int]] = collections.deque()
        self._last_evicted: int | None = None
        self._last_run_id: str | None = None
        self._misses: collections.deque[tuple[float, int]] = collections.deque()
        #: (server ms, total commands, state command calls, their µs) at the previous check.
        self._last_counters: tuple[int, int, int, int] | None = None
        self.causes = MissCauses(journal)

    def sample(self) -> Sample:
        client = self.target.client
        timings = []
        for _ in range(self.ping_samples):
            started = time.perf_counter()
            client.ping()
            timings.append((time.perf_counter() - started) * 1000.0)
        pipe = client.pipeline(transaction=False)
        pipe.time()
        pipe.execute_command(  # type: ignore[no-untyped-call]
            "INFO", "server", "memory", "stats", "commandstats", "latencystats")
        (seconds, micros), info = pipe.execute()
        server_ms = int(seconds) * 1000 + int(micros) // 1000
        used, maxmemory = int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))
        run_id = str(info.get("run_id", ""))
        restarted = self._last_run_id is not None and run_id != self._last_run_id
        evicted = int(info.get("evicted_keys", 0))
        now = time.monotonic()
        if self._last_evicted is None:
            delta = 0  # the first check is the baseline
        elif restarted or evicted < self._last_evicted:
            delta = evicted  # the server restarted: its counters started again from zero
        else:
            delta = evicted - self._last_evicted
        self._last_evicted, self._last_run_id = evicted, run_id
        self._evictions.append((now, delta))
        while self._evictions and self._evictions[0][0] <= now - self.window_s:
            self._evictions.popleft()
        ops_per_s, usec_per_call = self._rates(info, server_ms, restarted)
        try:
            counts: dict[str, int] | None = store.read_counts(self.journal)
        except redis.ResponseError:
            counts = None
        state_failures = self._state_failures(counts, server_ms, now)
        try:
            by_cause = self.causes.count(counts) if counts is not None else None
        except redis.ResponseError:
            by_cause = None
        return Sample(
            latency_ms=round(percentile(timings, 50) or 0.0, 3),
            latency_max_ms=round(max(timings), 3),
            memory_pct=round(used / maxmemory * 100.0, 2) if maxmemory else None,
            used_bytes=used,
            maxmemory_bytes=maxmemory,
            evictions_per_min=float(sum(d for _, d in self._evictions)) * 60.0 / self.window_s,
            state_failures_per_min=state_failures,
            server_run_id=run_id,
            ops_per_s=ops_per_s,
            latency_p99_us={command: _p99(info, command) for command in STATE_COMMANDS},
            state_usec_per_call=usec_per_call,
            misses_by_cause=by_cause,
        )

    def _rates(self, info: Mapping[str, Any], server_ms: int, restarted: bool) -> tuple[float | None, float | None]:
        """Commands per second, and µs per state command call, since the previous check (by server time)."""
        commands = int(info.get("total_commands_processed", 0))
        calls = usec = 0
        for command in STATE_COMMANDS:
            stat = info.get(f"cmdstat_{command}")
            if isinstance(stat, dict):
                calls += int(stat.get("calls", 0))
                usec += int(stat.get("usec", 0))
        previous, self._last_counters = self._last_counters, (server_ms, commands, calls, usec)
        if previous is None or restarted:
            return None, None
        ms0, commands0, calls0, usec0 = previous
        if commands < commands0 or calls < calls0 or usec < usec0 or server_ms <= ms0:
            return None, None  # CONFIG RESETSTAT between the checks (or the server's clock went back)
        ops = round((commands - commands0) * 1000.0 / (server_ms - ms0), 1)
        per_call = round((usec - usec0) / (calls - calls0), 2) if calls > calls0 else None
        return ops, per_call

    def _state_failures(self, counts: dict[str, int] | None, server_ms: int, now: float) -> float | None:
        """Misses journalled in the last window (rate-limited ones included)."""
        if counts is None:
            return None
        total = counts.get(OP_MISS, 0) + counts.get(OP_SUPPRESSED, 0)
        if not self._misses:
            start = server_ms - int(self.window_s * 1000)
            try:
                recent = [e for e in store.read_recent(self.journal, WINDOW_READ_LIMIT) if e.ms >= start]
            except redis.ResponseError:
                return None
            misses = sum(1 for e in recent if e.op == OP_MISS) + sum(
                int(e.fields.get("count", "0") or 0) for e in recent if e.op == OP_SUPPRESSED)
            self._misses.append((now - self.window_s, total - misses))
        self._misses.append((now, total))
        while len(self._misses) > 2 and self._misses[1][0] <= now - self.window_s:
            self._misses.popleft()
        oldest = self._misses[0][1]
        return max(0, total - oldest) * 60.0 / self.window_s


def _p99(info: Mapping[str, Any], command: str) -> float | None:
    """``INFO latencystats``'s p99 of ``command`` in µs (Redis 7+, ``latency-tracking yes``)."""
    stat = info.get(f"latency_percentiles_usec_{command}")
    if isinstance(stat, dict) and "p99" in stat:
        return float(stat["p99"])
    return None


class MissCauses:
    """The misses journalled since the previous check, by cause.

    The journal's counters are exact; the records in its recent copy (each bucket's
    capped global field) carry each analysed miss's cause. The counters are read
    first, so every miss they count is in the buckets read after them; the records
    read since the newest one the previous check saw are the new ones. A miss the
    rate limiter let through unanalysed has no cause (:data:`RATE_LIMITED`); a miss
    counted whose record the capped copy dropped before it was read is :data:`NOT_READ`.
    A miss later found to be a race keeps the cause it was journalled with.
    """

    def __init__(self, journal: redis.Redis) -> None:
        self.journal = journal
        #: The newest record read: (arrival ms, records at that ms); ``None``: none yet.
        self._seen: tuple[int, int] | None = None
        #: (misses, rate-limited misses) the counters said at the previous check; ``None``: no check yet.
        self._counted: tuple[int, int] | None = None
        #: Records read ahead of the counters (written between the two reads): the next check's.
        self._ahead = 0

    def count(self, counts: Mapping[str, int]) -> dict[str, int] | None:
        """Misses by cause since the previous call (``counts``: :func:`store.read_counts`, read just before)."""
        misses, limited = counts.get(OP_MISS, 0), counts.get(OP_SUPPRESSED, 0)
        previous, self._counted = self._counted, (misses, limited)
        index = sorted(int(schema.text(v)) for v in self.journal.zrange(schema.INDEX_KEY, 0, -1))
        if self._seen is not None:
            floor = max((b for b in index if b <= self._seen[0]), default=None)
            index = [b for b in index if floor is None or b >= floor]
        elif previous is None:
            index = index[-1:]  # the baseline: only where the newest record is
        records = self._read(index)
        if previous is None:
            # An empty newest bucket: every record older than its start is older than the session.
            self._seen = self._newest(records) or ((index[-1], 0) if index else None)
            return None
        seen_ms, seen_n = self._seen or (-1, 0)
        new: list[JournalEntry] = []
        at_seen = 0
        for entry in records:
            if entry.ms < seen_ms:
                continue
            if entry.ms == seen_ms:
                at_seen += 1
                if at_seen <= seen_n:
                    continue
            new.append(entry)
        self._seen = self._newest(records) or self._seen
        by_cause: collections.Counter[str] = collections.Counter(
            _cause(entry) for entry in new if entry.op == OP_MISS)
        read = sum(by_cause.values())
        # A counter lower than before: the journal's keys were deleted; it counts again from zero.
        counted = misses - previous[0] if misses >= previous[0] else misses
        limited_now = limited - previous[1] if limited >= previous[1] else limited
        unread = counted - read - self._ahead
        self._ahead = max(0, -unread)
        if unread > 0:
            by_cause[NOT_READ] = unread
        if limited_now > 0:
            by_cause[RATE_LIMITED] = limited_now
        return dict(by_cause)

    def _read(self, buckets: list[int]) -> list[JournalEntry]:
        """The records of these buckets' recent copies, oldest first."""
        if not buckets:
            return []
        pipe = self.journal.pipeline(transaction=False)
        for bucket in buckets:
            pipe.hget(schema.bucket_key(bucket), schema.GLOBAL_FIELD)
        records: list[JournalEntry] = []
        for bucket, value in zip(buckets, pipe.execute(), strict=True):
            if value is not None:
                records.extend(parse_records(schema.text(value), bucket, None, {}, with_run=True))
        return records

    @staticmethod
    def _newest(records: list[JournalEntry]) -> tuple[int, int] | None:
        if not records:
            return None
        newest = records[-1].ms
        return newest, sum(1 for entry in records if entry.ms == newest)


def _cause(entry: JournalEntry) -> str:
    cause = entry.cause or names.CAUSE_UNKNOWN
    return cause if cause in names.ALL_CAUSES else OTHER_CAUSE


class FigureStats:
    """min / avg / max of each figure over the session.

    Running aggregates, not the values: a session of weeks holds as much as one of a minute.
    """

    def __init__(self) -> None:
        self.samples: dict[str, int] = {name: 0 for name in FIGURES}
        self.total: dict[str, float] = {name: 0.0 for name in FIGURES}
        self.low: dict[str, float | None] = {name: None for name in FIGURES}
        self.high: dict[str, float | None] = {name: None for name in FIGURES}
        self.last: dict[str, float | None] = {name: None for name in FIGURES}

    def add(self, figures: dict[str, float | None]) -> None:
        for name in FIGURES:
            value = figures.get(name)
            self.last[name] = value
            if value is None:
                continue
            self.samples[name] += 1
            self.total[name] += value
            low, high = self.low[name], self.high[name]
            self.low[name] = value if low is None else min(low, value)
            self.high[name] = value if high is None else max(high, value)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in FIGURES:
            samples, low, high = self.samples[name], self.low[name], self.high[name]
            out[name] = {
                "samples": samples,
                "min": round(low, 3) if low is not None else None,
                "avg": round(self.total[name] / samples, 3) if samples else None,
                "max": round(high, 3) if high is not None else None,
                "last": self.last[name],
            }
        return out
