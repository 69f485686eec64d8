"""What keeps the miss analysis cheap under pressure: a rate limit and a circuit breaker.

Both are process-wide (held by :data:`otel_subflow._runtime.runtime`): a failure storm
analyses at most ``analysis_rate_per_s`` misses a second, and a slow or paused server
costs a serial worker a few timeouts, not one per miss.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Hashable

from otel_subflow._redis.permissions import RateLimitedLog


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


class Skipped(Exception):
    """The breaker is open for an endpoint of this analysis: not asked, the verdict says so."""


class CircuitBreaker:
    """Per endpoint: after ``threshold`` timeouts in a row, analyses skip it for ``cooldown_s``.

    Then one analysis tries again; a success closes the breaker, a timeout opens it
    again.
    """

    def __init__(self, log: RateLimitedLog, threshold: int = 3, cooldown_s: float = 10.0) -> None:
        self.log = log
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self._failures: dict[Hashable, int] = {}
        self._open_until: dict[Hashable, float] = {}
        self._lock = threading.Lock()

    def allow(self, ident: Hashable) -> bool:
        until = self._open_until.get(ident)
        if until is None:
            return True
        with self._lock:
            if time.monotonic() < until:
                return False
            self._open_until.pop(ident, None)  # half-open: this one analysis tries
            self._failures[ident] = self.threshold - 1
            return True

    def success(self, ident: Hashable) -> None:
        if self._failures.get(ident):
            with self._lock:
                self._failures.pop(ident, None)

    def failure(self, ident: Hashable) -> None:
        with self._lock:
            count = self._failures.get(ident, 0) + 1
            self._failures[ident] = count
            if count >= self.threshold:
                self._open_until[ident] = time.monotonic() + self.cooldown_s
                self.log.log("analysis.breaker", logging.WARNING,
                             "otel-subflow: %d analysis timeouts in a row on one Redis endpoint; misses there are "
                             "not analysed for %.0f s (verdict unknown: analysis skipped: server slow)",
                             count, self.cooldown_s)

    def clear(self) -> None:
        with self._lock:
            self._failures.clear()
            self._open_until.clear()

    def after_fork(self) -> None:
        self._lock = threading.Lock()
