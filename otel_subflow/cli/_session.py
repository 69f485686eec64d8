"""One monitor session: the check loop (sample, evaluate the rules, emit alerts, wait) and its summary.

It runs until its duration has passed or SIGINT / SIGTERM arrives, backing off
while Redis is away; :meth:`MonitorSession.summary` is the document of
docs/cli.md ("``monitor --json`` (and the summary file)").
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import redis
from opentelemetry import metrics

from otel_subflow import names
from otel_subflow._telemetry.instruments import emit_log
from otel_subflow._version import __version__
from otel_subflow.cli._alerts import RESOLVED, AlertEvent, AlertTracker
from otel_subflow.cli._common import RedisTarget, iso, utc_now, write_private
from otel_subflow.cli._sampler import FIGURES, FigureStats, Sampler
from otel_subflow.cli._session_watcher import SessionWatcher
from otel_subflow.cli._trends import TrendHistory
from otel_subflow.cli._view import MonitorOutput

SCHEMA = "otel-subflow/monitor-summary/v1"


class _Stopper:
    """Stops the session on SIGINT / SIGTERM (only installable from the main thread)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.reason = signal.Signals(signum).name
        self.event.set()

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class MonitorSession:
    """The check loop: sample, evaluate the rules, emit alerts, wait (with backoff while Redis is away)."""

    def __init__(self, target: RedisTarget, sampler: Sampler, tracker: AlertTracker, console: Any, mode: str,
                 interval: float, *, alerts_path: Path | None) -> None:
        self.target = target
        self.sampler = sampler
        self.tracker = tracker
        self.interval = interval
        self.alerts_path = alerts_path
        self.stats = FigureStats()
        self.history = TrendHistory()
        self.output = MonitorOutput(console, mode, target, tracker, self.stats, self.history, interval)
        self.counter = metrics.get_meter(names.INSTRUMENTATION_NAME, __version__).create_counter(
            names.METRIC_MONITOR_ALERTS, unit="{alert}", description="Alerts raised by otel-subflow monitor, by rule."
        )
        self.ticks = self.ok_ticks = self.failed_ticks = self.consecutive_failures = 0
        self.outages: list[dict[str, Any]] = []
        self.down_since: str | None = None
        #: Set once the watcher is started (after the session, so that its start counts in the duration).
        self.watcher: SessionWatcher | None = None
        self.stop_reason = "duration"
        self.started_at = self.ended_at = utc_now()
        self.started = time.monotonic()

    def emit(self, event: AlertEvent) -> None:
        """One alert to the display, the JSON lines file, a log record and the counter."""
        self.output.alert(event)
        if self.alerts_path is not None:
            record = {**event.as_dict(), "redis_url": self.target.masked}
            write_private(self.alerts_path, json.dumps(record) + "\n", append=True)
        attrs = {names.ATTR_ALERT_RULE: event.rule, names.ATTR_ALERT_SEVERITY: event.severity}
        level = logging.INFO if event.status == RESOLVED else logging.ERROR
        emit_log(level, names.LOG_CRITICAL_STATE_ISSUE, None, {
            **attrs,
            names.ATTR_ALERT_STATUS: event.status,
            names.ATTR_ALERT_VALUE: event.value,
            names.ATTR_ALERT_THRESHOLD: event.threshold,
            "message_text": event.message,
        })
        if event.status != RESOLVED:
            self.counter.add(1, attrs)

    def check(self) -> bool:
        """One check; ``False`` when Redis could not be reached."""
        stamp = iso(utc_now())
        self.ticks += 1
        error: str | None = None
        figures: dict[str, float | None]
        try:
            sample = self.sampler.sample()
        except (redis.RedisError, OSError) as exc:
            error = self.target.describe_error(exc)
            self.failed_ticks += 1
            self.consecutive_failures += 1
            if self.down_since is None:
                self.down_since = stamp
            figures = {"connection_failures": float(self.consecutive_failures)}
            self.history.add(stamp, figures, None)
        else:
            self.ok_ticks += 1
            if self.down_since is not None:
                self.outages.append({"from": self.down_since, "to": stamp,
                                     "failed_checks": self.consecutive_failures})
                self.down_since = None
            self.consecutive_failures = 0
            figures = {"connection_failures": 0.0, **{name: getattr(sample, name) for name in FIGURES}}
            self.stats.add(figures)
            self.history.add(stamp, figures, sample)
        for event in self.tracker.evaluate(figures, time.monotonic(), stamp):
            self.emit(event)
        if self.watcher is not None:
            self.watcher.show(stamp, self.output)  # first, so that the live view the tick draws has its state
        self.output.tick(stamp, figures, error)
        return error is None

    def next_delay(self, ok: bool) -> float:
        if ok:
            return self.interval
        # Back off while Redis is away: min(interval, 1 s), doubling, up to max(interval, 1 s).
        first, cap = min(self.interval, 1.0), max(self.interval, 1.0)
        return float(min(cap, first * 2 ** (self.consecutive_failures - 1)))

    def run(self, duration: float | None) -> None:
        """Check until ``duration`` has passed or SIGINT / SIGTERM arrives."""
        stopper = _Stopper()
        stopper.install()
        deadline = self.started + duration if duration is not None else None
        try:
            with self.output:
                while True:
                    tick_started = time.monotonic()
                    wake_at = tick_started + self.next_delay(self.check())
                    if deadline is not None and wake_at >= deadline:
                        if stopper.event.wait(max(0.0, deadline - time.monotonic())):
                            self.stop_reason = stopper.reason or "signal"
                        return
                    if stopper.event.wait(max(0.0, wake_at - time.monotonic())):
                        self.stop_reason = stopper.reason or "signal"
                        return
        finally:
            stopper.restore()
            if self.down_since is not None:
                self.outages.append({"from": self.down_since, "to": None, "failed_checks": self.consecutive_failures})

    def summary(self, watcher_info: dict[str, Any]) -> dict[str, Any]:
        """The session summary document (docs/cli.md); also fixes :attr:`ended_at`."""
        self.ended_at = ended_at = utc_now()
        return {
            "schema": SCHEMA,
            "version": __version__,
            "redis_url": self.target.masked,
            "started_at": iso(self.started_at),
            "ended_at": iso(ended_at),
            "duration_s": round(time.monotonic() - self.started, 3),
            "stopped_by": self.stop_reason,
            "interval_s": self.interval,
            "thresholds": {
                rule.name: {"figure": rule.figure, "threshold": rule.threshold, "unit": rule.unit,
                            "severity": rule.severity, "fires_when": f"value {rule.comparator()} threshold"}
                for rule in self.tracker.rules
            },
            "ticks": self.ticks,
            "ticks_ok": self.ok_ticks,
            "ticks_failed": self.failed_ticks,
            "outages": self.outages,
            "alerts_total": sum(c["firing"] + c["repeat"] for c in self.tracker.counts.values()),
            "alerts_by_rule": self.tracker.counts,
            "active_alerts": self.tracker.active(),
            "figures": self.stats.summary(),
            "trends": self.history.as_dict(),
            "watcher": watcher_info,
            "alerts_file": str(self.alerts_path) if self.alerts_path is not None else None,
            "summary_file": None,
        }
