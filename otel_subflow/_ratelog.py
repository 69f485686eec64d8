"""Logs of our own that cannot flood the user's: at most one line per cause per interval.

A failure that repeats on every call (a refused command, a full queue, a server under
memory pressure) is said once; the repeats are counted and the count rides on the next
line for the same cause.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from otel_subflow import names

_log = logging.getLogger(names.LOGGER_NAME)

#: Seconds between two lines of the same cause.
INTERVAL_S = 60.0


class RateLimitedLog:
    """``log(level, cause, msg, *args)`` emits at most once per ``interval_s`` per cause."""

    def __init__(self, logger: logging.Logger = _log, interval_s: float = INTERVAL_S) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def log(self, level: int, cause: str, msg: str, *args: Any) -> bool:
        """Log unless ``cause`` was logged less than an interval ago; True when a line went out."""
        if not self.logger.isEnabledFor(level):
            return False
        now = time.monotonic()
        with self._lock:
            last = self._last.get(cause)
            if last is not None and now - last < self.interval_s:
                self._suppressed[cause] = self._suppressed.get(cause, 0) + 1
                return False
            self._last[cause] = now
            repeats = self._suppressed.pop(cause, 0)
        if repeats:
            msg += " (%d more like this since the last line)"
            args = (*args, repeats)
        self.logger.log(level, msg, *args)
        return True

    def reset(self) -> None:
        with self._lock:
            self._last.clear()
            self._suppressed.clear()


#: The process's shared limiter for our warnings.
ratelog = RateLimitedLog()
