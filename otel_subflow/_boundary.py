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
from collections.abc import Iterable, Iterator

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from otel_subflow import names
from otel_subflow._runtime import runtime

_log = logging.getLogger(names.LOGGER_NAME)
_METRIC_KEY = "internal_errors"

#: Where in our code an internal error happened (a fixed set of places, never user data).
ATTR_WHERE = "subflow.internal.where"


def _observe(options: CallbackOptions) -> Iterable[Observation]:
    return [Observation(count, {ATTR_WHERE: where}) for where, count in internal_error_counts().items()]


def _ensure_metric() -> None:
    """``subflow.internal.errors``: our failures by place, on the global meter provider."""
    if _METRIC_KEY in runtime.registered_instruments:
        return
    runtime.registered_instruments.add(_METRIC_KEY)
    metrics.get_meter(names.INSTRUMENTATION_NAME).create_observable_counter(
        names.METRIC_INTERNAL_ERRORS, [_observe], unit="{error}",
        description="otel-subflow's own failures, swallowed so the application never sees them, by place.")


def _raise_internal() -> bool:
    return os.environ.get("OTEL_SUBFLOW_RAISE_INTERNAL_ERRORS") == "1"


def swallow(where: str, exc: Exception) -> None:
    """The boundary itself: count ``exc``, log it the first time at ``where``, and return.

    Call it from ``except Exception as exc:`` in code that runs inside a user's call
    (the hot path: a plain ``try`` costs nothing when nothing fails; elsewhere use
    :func:`internal_errors`). Under our tests it re-raises instead.
    """
    with runtime.lock:
        runtime.internal_errors[where] += 1
        first = runtime.internal_errors[where] == 1
    _ensure_metric()
    if first:
        _log.error("otel-subflow internal error in %s (logged once; later ones are only counted)", where,
                   exc_info=exc)
    if _raise_internal():
        raise exc


@contextlib.contextmanager
def internal_errors(where: str) -> Iterator[None]:
    """Swallow (log once, count) any exception raised by our own code inside the block."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - the boundary: whatever our code raised
        swallow(where, exc)


def internal_error_counts() -> dict[str, int]:
    """A copy of the internal error counters, by place."""
    with runtime.lock:
        return dict(runtime.internal_errors)
