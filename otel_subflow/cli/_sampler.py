"""One monitor check of Redis, and the session statistics of its figures.

A check is a few PINGs (the median is the latency), one ``TIME`` + ``INFO``
round trip, and the journal's record counters. Evictions and state failures are
counted from deltas of counters in a sliding window (``evicted_keys``; the journal's
misses, rate-limited ones included), so a counter reset by a restart is not mistaken
for a burst. The first check has no earlier counters: it counts the misses among the
journal's recent records in the last minute of server time.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any

import redis

from otel_subflow._journal import store
from otel_subflow._journal.schema import OP_MISS, OP_SUPPRESSED
from otel_subflow.cli._common import RedisTarget, percentile

FIGURES = ("latency_ms", "memory_pct", "state_failures_per_min", "evictions_per_min")
#: Most recent journal records the first check reads for its state-failure window.
WINDOW_READ_LIMIT = 10_000


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

    def sample(self) -> Sample:
        client = self.target.client
        timings = []
        for _ in range(self.ping_samples):
            started = time.perf_counter()
            client.ping()
            timings.append((time.perf_counter() - started) * 1000.0)
        pipe = client.pipeline(transaction=False)
        pipe.time()
        pipe.execute_command("INFO", "server", "memory", "stats")  # type: ignore[no-untyped-call]
        (seconds, micros), info = pipe.execute()
        server_ms = int(seconds) * 1000 + int(micros) // 1000
        used, maxmemory = int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))
        run_id = str(info.get("run_id", ""))
        evicted = int(info.get("evicted_keys", 0))
        now = time.monotonic()
        if self._last_evicted is None:
            delta = 0  # the first check is the baseline
        elif run_id != self._last_run_id or evicted < self._last_evicted:
            delta = evicted  # the server restarted: its counters started again from zero
        else:
            delta = evicted - self._last_evicted
        self._last_evicted, self._last_run_id = evicted, run_id
        self._evictions.append((now, delta))
        while self._evictions and self._evictions[0][0] <= now - self.window_s:
            self._evictions.popleft()
        return Sample(
            latency_ms=round(percentile(timings, 50) or 0.0, 3),
            latency_max_ms=round(max(timings), 3),
            memory_pct=round(used / maxmemory * 100.0, 2) if maxmemory else None,
            used_bytes=used,
            maxmemory_bytes=maxmemory,
            evictions_per_min=float(sum(d for _, d in self._evictions)) * 60.0 / self.window_s,
            state_failures_per_min=self._state_failures(server_ms, now),
            server_run_id=run_id,
        )

    def _state_failures(self, server_ms: int, now: float) -> float | None:
        """Misses journalled in the last window (rate-limited ones included)."""
        try:
            counts = store.read_counts(self.journal)
            total = counts.get(OP_MISS, 0) + counts.get(OP_SUPPRESSED, 0)
            if not self._misses:
                start = server_ms - int(self.window_s * 1000)
                recent = [e for e in store.read_recent(self.journal, WINDOW_READ_LIMIT) if e.ms >= start]
                misses = sum(1 for e in recent if e.op == OP_MISS) + sum(
                    int(e.fields.get("count", "0") or 0) for e in recent if e.op == OP_SUPPRESSED)
                self._misses.append((now - self.window_s, total - misses))
        except redis.ResponseError:
            return None
        self._misses.append((now, total))
        while len(self._misses) > 2 and self._misses[1][0] <= now - self.window_s:
            self._misses.popleft()
        oldest = self._misses[0][1]
        return max(0, total - oldest) * 60.0 / self.window_s


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
