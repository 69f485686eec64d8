"""One configuration dataclass, read from ``OTEL_SUBFLOW_*`` environment variables.

A bad value is logged and the default is used: configuration must never stop
the instrumented service from starting.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from otel_subflow import names
from otel_subflow._runtime import runtime

_log = logging.getLogger(names.LOGGER_NAME)
_T = TypeVar("_T")


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {raw!r}")


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError(f"must be > 0: {raw!r}")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError(f"must be > 0: {raw!r}")
    return value


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if value < 0:
        raise ValueError("must be >= 0")
    return value


def _percent(raw: str) -> float:
    value = float(raw)
    if not 0 < value <= 100:
        raise ValueError(f"must be a percentage in (0, 100]: {raw!r}")
    return value


@dataclasses.dataclass(frozen=True)
class SubflowConfig:
    """Settings of the instrumentation. Every field has an ``OTEL_SUBFLOW_*`` variable.

    Example::

        config = SubflowConfig.from_env()
        config = dataclasses.replace(config, analysis_rate_per_s=5.0)
    """

    #: Key template of the state records (``OTEL_SUBFLOW_KEY_TEMPLATE``).
    key_template: str = names.DEFAULT_KEY_TEMPLATE
    #: Longest run or node id put on spans and in the journal (``OTEL_SUBFLOW_MAX_ID_LENGTH``).
    max_id_length: int = 256
    #: Set span status ERROR on a miss (``OTEL_SUBFLOW_MISS_IS_ERROR``).
    miss_is_error: bool = True
    #: Write the journal (``OTEL_SUBFLOW_JOURNAL``).
    journal_enabled: bool = True
    #: Separate Redis for the journal (``OTEL_SUBFLOW_JOURNAL_URL``); default: the app's client.
    journal_url: str | None = None
    #: Bounded in-process journal queue (``OTEL_SUBFLOW_JOURNAL_QUEUE_SIZE``).
    journal_queue_size: int = 10_000
    #: Entries per flush round trip (``OTEL_SUBFLOW_JOURNAL_BATCH_SIZE``).
    journal_batch_size: int = 512
    #: Longest wait before a partial batch is flushed, seconds (``OTEL_SUBFLOW_JOURNAL_FLUSH_INTERVAL``).
    journal_flush_interval_s: float = 0.2
    #: The journal's memory budget in percent of the server's maxmemory
    #: (``OTEL_SUBFLOW_JOURNAL_BUDGET_PCT``); default 2, or 50 on a journal Redis of its own.
    journal_budget_pct: float | None = None
    #: The budget in MB when the server has no maxmemory (``OTEL_SUBFLOW_JOURNAL_BUDGET_MB``).
    journal_budget_mb: float = 16.0
    #: used_memory in percent of maxmemory at which the journal stops writing and shrinks
    #: (``OTEL_SUBFLOW_JOURNAL_PRESSURE_PCT``); it resumes 5 points lower.
    journal_pressure_pct: float = 90.0
    #: Longest the journal keeps records, seconds (``OTEL_SUBFLOW_JOURNAL_TTL``). Within
    #: it, retention follows the state TTLs: twice the longest TTL seen, at least 10 minutes.
    journal_ttl_s: int = 7 * 24 * 3600
    #: How often Redis's counters (memory, evictions, latency) go into the journal's series for
    #: ``diagnose --patterns``, seconds (``OTEL_SUBFLOW_JOURNAL_SERIES_INTERVAL``; 0: never).
    journal_series_s: float = 10.0
    #: Analyse misses (``OTEL_SUBFLOW_ANALYSIS``).
    analysis_enabled: bool = True
    #: Analyses per second per process, sustained (``OTEL_SUBFLOW_ANALYSIS_RATE``).
    analysis_rate_per_s: float = 10.0
    #: Analyses allowed in a burst (``OTEL_SUBFLOW_ANALYSIS_BURST``).
    analysis_burst: int = 30
    #: Socket timeout of the analysis round trip, seconds (``OTEL_SUBFLOW_ANALYSIS_TIMEOUT``).
    analysis_timeout_s: float = 0.25
    #: SCAN COUNT used to look for near-identical keys (``OTEL_SUBFLOW_SCAN_COUNT``).
    scan_count: int = 100
    #: How long a miss marker lives for cross-process race detection, ms (``OTEL_SUBFLOW_MISS_MARKER_TTL_MS``).
    miss_marker_ttl_ms: int = 60_000
    #: Let the keyspace watcher add the ``notify-keyspace-events`` flags it needs (``Exeg``) to the
    #: server's, never removing one (``OTEL_SUBFLOW_ENABLE_KEYSPACE_EVENTS``); off: it only warns.
    enable_keyspace_events: bool = False
    #: Take part in electing one keyspace watcher per Redis master, by a lease in Redis, when
    #: ``configure()`` or the instrumentor set things up (``OTEL_SUBFLOW_WATCH``).
    watch_enabled: bool = True

    def journal_settings(self) -> tuple[object, ...]:
        """What a journal writer is built from: decorators that differ here get writers of their own."""
        return (self.journal_queue_size, self.journal_batch_size, self.journal_flush_interval_s,
                self.journal_budget_pct, self.journal_budget_mb, self.journal_pressure_pct, self.journal_ttl_s,
                self.miss_marker_ttl_ms, self.journal_series_s)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SubflowConfig:
        """Build a config from the environment; bad values are logged and ignored."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field_name, (var, parse) in _ENV_FIELDS.items():
            raw = env.get(var)
            if raw is None or raw == "":
                continue
            try:
                values[field_name] = parse(raw)
            except (TypeError, ValueError) as exc:
                _log.warning(
                    "ignoring %s=%r (%s); using the default %r",
                    var,
                    raw,
                    exc,
                    getattr(cls, field_name),
                )
        return cls(**values)


def _identity(raw: str) -> str:
    return raw


_ENV_FIELDS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "key_template": ("OTEL_SUBFLOW_KEY_TEMPLATE", _identity),
    "max_id_length": ("OTEL_SUBFLOW_MAX_ID_LENGTH", _positive_int),
    "miss_is_error": ("OTEL_SUBFLOW_MISS_IS_ERROR", _parse_bool),
    "journal_enabled": ("OTEL_SUBFLOW_JOURNAL", _parse_bool),
    "journal_url": ("OTEL_SUBFLOW_JOURNAL_URL", _identity),
    "journal_queue_size": ("OTEL_SUBFLOW_JOURNAL_QUEUE_SIZE", _positive_int),
    "journal_batch_size": ("OTEL_SUBFLOW_JOURNAL_BATCH_SIZE", _positive_int),
    "journal_flush_interval_s": ("OTEL_SUBFLOW_JOURNAL_FLUSH_INTERVAL", _positive_float),
    "journal_budget_pct": ("OTEL_SUBFLOW_JOURNAL_BUDGET_PCT", _percent),
    "journal_series_s": ("OTEL_SUBFLOW_JOURNAL_SERIES_INTERVAL", _non_negative_float),
    "journal_budget_mb": ("OTEL_SUBFLOW_JOURNAL_BUDGET_MB", _positive_float),
    "journal_pressure_pct": ("OTEL_SUBFLOW_JOURNAL_PRESSURE_PCT", _percent),
    "journal_ttl_s": ("OTEL_SUBFLOW_JOURNAL_TTL", _positive_int),
    "analysis_enabled": ("OTEL_SUBFLOW_ANALYSIS", _parse_bool),
    "analysis_rate_per_s": ("OTEL_SUBFLOW_ANALYSIS_RATE", _positive_float),
    "analysis_burst": ("OTEL_SUBFLOW_ANALYSIS_BURST", _positive_int),
    "analysis_timeout_s": ("OTEL_SUBFLOW_ANALYSIS_TIMEOUT", _positive_float),
    "scan_count": ("OTEL_SUBFLOW_SCAN_COUNT", _positive_int),
    "miss_marker_ttl_ms": ("OTEL_SUBFLOW_MISS_MARKER_TTL_MS", _positive_int),
    "enable_keyspace_events": ("OTEL_SUBFLOW_ENABLE_KEYSPACE_EVENTS", _parse_bool),
    "watch_enabled": ("OTEL_SUBFLOW_WATCH", _parse_bool),
}

def get_config() -> SubflowConfig:
    """The process-wide config: set by :func:`set_config`, else read from the environment once."""
    config = runtime.config
    if config is None:
        config = runtime.config = SubflowConfig.from_env()
    return config


def set_config(config: SubflowConfig | None) -> None:
    """Replace the process-wide config (``None``: read the environment again on next use)."""
    runtime.config = config
