"""The internal error boundary: our failures never reach the user's code.

Every piece of our work that runs inside a user's call goes through
:func:`internal_errors`. A failure is logged once per place, counted, and
swallowed. Under our own test suite (``OTEL_SUBFLOW_RAISE_INTERNAL_ERRORS=1``)
it is re-raised so that our bugs fail tests instead of hiding.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterable, Iterator

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from otel_subflow import names

_log = logging.getLogger(names.LOGGER_NAME)
_lock = threading.Lock()
_seen: set[str] = set()
_counts: dict[str, int] = {}
_metric_ready = False

#: Where in our code an internal error happened (a fixed set of places, never user data).
ATTR_WHERE = "subflow.internal.where"


def _observe(options: CallbackOptions) -> Iterable[Observation]:
    return [Observation(count, {ATTR_WHERE: where}) for where, count in internal_error_counts().items()]


def _ensure_metric() -> None:
    """``subflow.internal.errors``: our failures by place, on the global meter provider."""
    global _metric_ready
    if _metric_ready:
        return
    _metric_ready = True
    metrics.get_meter(names.INSTRUMENTATION_NAME).create_observable_counter(
        names.METRIC_INTERNAL_ERRORS, [_observe], unit="{error}",
        description="otel-subflow's own failures, swallowed so the application never sees them, by place.")


def _raise_internal() -> bool:
    return os.environ.get("OTEL_SUBFLOW_RAISE_INTERNAL_ERRORS") == "1"


def record_internal_error(where: str, exc: BaseException) -> None:
    """Count an internal failure and log it the first time it happens at ``where``."""
    with _lock:
        _counts[where] = _counts.get(where, 0) + 1
        first = where not in _seen
        _seen.add(where)
    _ensure_metric()
    if first:
        _log.error(
            "otel-subflow internal error in %s (logged once; later ones are only counted)",
            where,
            exc_info=exc,
        )


@contextlib.contextmanager
def internal_errors(where: str) -> Iterator[None]:
    """Swallow (log once, count) any exception raised by our own code inside the block."""
    try:
        yield
    except Exception as exc:
        record_internal_error(where, exc)
        if _raise_internal():
            raise


def internal_error_counts() -> dict[str, int]:
    """A copy of the internal error counters, by place."""
    with _lock:
        return dict(_counts)


def reset_internal_errors() -> None:
    """Forget counted errors (tests)."""
    with _lock:
        _counts.clear()
        _seen.clear()
