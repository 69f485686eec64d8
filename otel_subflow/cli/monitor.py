"""``otel-subflow monitor``: watch the state Redis over time and alert on what loses state.

Every ``--interval`` seconds one check measures PING latency, memory against
maxmemory, keys evicted and state reads that missed in the last minute (from
the global journal, by server time). Alert rules turn figures into alerts
(:mod:`otel_subflow.cli._alerts`) that go to the terminal, optionally to a JSON
lines file, to ``CRITICAL_STATE_ISSUE`` log records and to the
``subflow.monitor.alerts`` counter. The keyspace watcher runs meanwhile, so
tombstones are journalled. At the end (``--duration``, SIGINT or SIGTERM) a
session summary is written and the exit code is 0.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import click
import redis
from opentelemetry import metrics

from otel_subflow import names
from otel_subflow._config import SubflowConfig
from otel_subflow._telemetry import emit_log
from otel_subflow._version import __version__
from otel_subflow._watcher import KeyspaceEventsOff, KeyspaceWatcher
from otel_subflow.cli._alerts import RESOLVED, AlertEvent, AlertTracker, default_rules
from otel_subflow.cli._common import (
    RedisTarget,
    dump_json,
    file_stamp,
    iso,
    json_option,
    make_console,
    output_dir_option,
    redis_url_option,
    resolve_dir,
    unique_path,
    utc_now,
    write_private,
)
from otel_subflow.cli._sampler import FIGURES, FigureStats, Sampler
from otel_subflow.cli._view import MonitorOutput

SCHEMA = "otel-subflow/monitor-summary/v1"
ALERTS_FILE = "subflow_monitoring_alerts.jsonl"


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


def _otel_wanted() -> bool:
    """Export metrics and logs only when OpenTelemetry is configured through the environment."""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    return any(os.environ.get(var) for var in (
        "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "OTEL_METRICS_EXPORTER",
    ))


@click.command("monitor")
@redis_url_option
@json_option
@output_dir_option
@click.option("--interval", type=click.FloatRange(0.01, 86_400.0), default=60.0, show_default=True,
              help="Seconds between checks.")
@click.option("--duration", type=click.FloatRange(0.0, None), default=None,
              help="Stop after this many seconds (default: until SIGINT/SIGTERM).")
@click.option("--export-alerts", is_flag=True, help=f"Append alerts as JSON lines to <output-dir>/{ALERTS_FILE}.")
@click.option("--connection-failures", type=click.IntRange(1, None), default=1, show_default=True,
              help="Alert when this many consecutive checks fail to reach Redis.")
@click.option("--latency-threshold-ms", type=click.FloatRange(0.0, None), default=500.0, show_default=True,
              help="Alert when the PING latency is above this.")
@click.option("--memory-threshold-pct", type=click.FloatRange(0.0, 100.0), default=80.0, show_default=True,
              help="Alert when used memory is above this % of maxmemory.")
@click.option("--state-failures-per-min", type=click.FloatRange(0.0, None), default=10.0, show_default=True,
              help="Alert when more state reads than this missed in the last minute (journal).")
@click.option("--evictions-per-min", type=click.FloatRange(0.0, None), default=50.0, show_default=True,
              help="Alert when more keys than this were evicted in the last minute.")
@click.option("--repeat-every", type=click.FloatRange(0.0, None), default=300.0, show_default=True,
              help="Seconds between repeats of an alert whose condition still holds.")
@click.option("--ping-samples", type=click.IntRange(1, 100), default=3, show_default=True,
              help="PINGs per check; the median is the latency figure.")
@click.option("--watcher/--no-watcher", default=True, show_default=True,
              help="Run the keyspace watcher (journal tombstones) during the session.")
@click.option("--enable-keyspace-events", is_flag=True,
              help="Let the watcher add the notify-keyspace-events flags it needs (CONFIG SET).")
@click.option("--timeout", type=click.FloatRange(0.05, 300.0), default=5.0, show_default=True,
              help="Redis socket timeout, seconds.")
def monitor(
    redis_url: str,
    as_json: bool,
    output_dir: Path | None,
    interval: float,
    duration: float | None,
    export_alerts: bool,
    connection_failures: int,
    latency_threshold_ms: float,
    memory_threshold_pct: float,
    state_failures_per_min: float,
    evictions_per_min: float,
    repeat_every: float,
    ping_samples: int,
    watcher: bool,
    enable_keyspace_events: bool,
    timeout: float,
) -> None:
    """Monitor the state Redis and alert on what makes state go missing.

    \b
    Examples:
      otel-subflow monitor --interval 10 --export-alerts
      otel-subflow monitor --interval 5 --duration 600 --latency-threshold-ms 100 --json
    """
    directory = resolve_dir(output_dir)
    config = SubflowConfig.from_env()
    target = RedisTarget(redis_url, timeout)
    target.connect()
    journal = target.journal_client(config)
    telemetry = None
    if _otel_wanted():
        from otel_subflow._setup import configure

        telemetry = configure(service_name=os.environ.get("OTEL_SERVICE_NAME") or "otel-subflow-monitor",
                              instrument_redis=False, redis_metrics=False)
    counter = metrics.get_meter(names.INSTRUMENTATION_NAME, __version__).create_counter(
        names.METRIC_MONITOR_ALERTS, unit="{alert}", description="Alerts raised by otel-subflow monitor, by rule."
    )
    rules = default_rules(
        connection_failures=connection_failures,
        latency_ms=latency_threshold_ms,
        memory_pct=memory_threshold_pct,
        state_failures_per_min=state_failures_per_min,
        evictions_per_min=evictions_per_min,
    )
    tracker = AlertTracker(rules, repeat_every)
    stats = FigureStats()
    alerts_path = directory / ALERTS_FILE if export_alerts else None
    console = make_console()
    mode = "quiet" if as_json else ("live" if console.is_terminal else "plain")
    sampler = Sampler(target, journal, ping_samples, window_s=60.0)

    watcher_info: dict[str, Any] = {"enabled": False, "reason": "disabled by --no-watcher"}
    keyspace_watcher: KeyspaceWatcher | None = None
    if watcher:
        keyspace_watcher = KeyspaceWatcher(
            redis.Redis.from_url(redis_url, socket_connect_timeout=timeout), config=config,
            enable_events=enable_keyspace_events,
        )
        try:
            keyspace_watcher.start()
            watcher_info = {"enabled": True, "reason": None}
        except KeyspaceEventsOff as exc:
            keyspace_watcher = None
            watcher_info = {"enabled": False, "reason": str(exc)}
            if not as_json:
                click.echo(f"warning: keyspace watcher not started: {exc} "
                           "(use --enable-keyspace-events)", err=True)
        except (redis.RedisError, OSError) as exc:
            keyspace_watcher = None
            watcher_info = {"enabled": False, "reason": target.describe_error(exc)}

    stopper = _Stopper()
    stopper.install()
    started_at = utc_now()
    started = time.monotonic()
    deadline = started + duration if duration is not None else None
    ticks = ok_ticks = failed_ticks = 0
    consecutive_failures = 0
    outages: list[dict[str, Any]] = []
    down_since: str | None = None
    stop_reason = "duration"
    output = MonitorOutput(console, mode, target, tracker, stats, interval)

    def emit(event: AlertEvent) -> None:
        output.alert(event)
        record = {**event.as_dict(), "redis_url": target.masked}
        if alerts_path is not None:
            write_private(alerts_path, json.dumps(record) + "\n", append=True)
        attrs = {names.ATTR_ALERT_RULE: event.rule, names.ATTR_ALERT_SEVERITY: event.severity}
        emit_log(logging.ERROR if event.status != RESOLVED else logging.INFO, names.LOG_CRITICAL_STATE_ISSUE, None, {
            **attrs,
            names.ATTR_ALERT_STATUS: event.status,
            names.ATTR_ALERT_VALUE: event.value,
            names.ATTR_ALERT_THRESHOLD: event.threshold,
            "message_text": event.message,
        })
        if event.status != RESOLVED:
            counter.add(1, attrs)

    try:
        with output:
            while True:
                tick_started = time.monotonic()
                stamp = iso(utc_now())
                ticks += 1
                error: str | None = None
                figures: dict[str, float | None]
                try:
                    sample = sampler.sample()
                except (redis.RedisError, OSError) as exc:
                    error = target.describe_error(exc)
                    failed_ticks += 1
                    consecutive_failures += 1
                    if down_since is None:
                        down_since = stamp
                    figures = {"connection_failures": float(consecutive_failures)}
                else:
                    ok_ticks += 1
                    if down_since is not None:
                        outages.append({"from": down_since, "to": stamp, "failed_checks": consecutive_failures})
                        down_since = None
                    consecutive_failures = 0
                    figures = {"connection_failures": 0.0, **{name: getattr(sample, name) for name in FIGURES}}
                    stats.add(figures)
                for event in tracker.evaluate(figures, time.monotonic(), stamp):
                    emit(event)
                output.tick(stamp, figures, error)

                if error is None:
                    delay = interval
                else:  # back off while Redis is away: min(interval, 1 s), doubling, up to max(interval, 1 s)
                    delay = min(max(interval, 1.0), min(interval, 1.0) * 2 ** (consecutive_failures - 1))
                wake_at = tick_started + delay
                if deadline is not None and wake_at >= deadline:
                    stopper.event.wait(max(0.0, deadline - time.monotonic()))
                    if stopper.event.is_set():
                        stop_reason = stopper.reason or "signal"
                    break
                if stopper.event.wait(max(0.0, wake_at - time.monotonic())):
                    stop_reason = stopper.reason or "signal"
                    break
    finally:
        stopper.restore()
        if keyspace_watcher is not None:
            keyspace_watcher.stop()
            keyspace_watcher.client.close()
            watcher_info.update(dataclasses.asdict(keyspace_watcher.stats))
        if down_since is not None:
            outages.append({"from": down_since, "to": None, "failed_checks": consecutive_failures})

    ended_at = utc_now()
    summary: dict[str, Any] = {
        "schema": SCHEMA,
        "version": __version__,
        "redis_url": target.masked,
        "started_at": iso(started_at),
        "ended_at": iso(ended_at),
        "duration_s": round(time.monotonic() - started, 3),
        "stopped_by": stop_reason,
        "interval_s": interval,
        "thresholds": {rule.name: {"figure": rule.figure, "threshold": rule.threshold, "unit": rule.unit,
                                   "severity": rule.severity, "fires_when": f"value {rule.comparator()} threshold"}
                       for rule in rules},
        "ticks": ticks,
        "ticks_ok": ok_ticks,
        "ticks_failed": failed_ticks,
        "outages": outages,
        "alerts_total": sum(c["firing"] + c["repeat"] for c in tracker.counts.values()),
        "alerts_by_rule": tracker.counts,
        "active_alerts": tracker.active(),
        "figures": stats.summary(),
        "watcher": watcher_info,
        "alerts_file": str(alerts_path) if alerts_path is not None else None,
        "summary_file": None,
    }
    summary_path = unique_path(directory, f"subflow_monitoring_summary_{file_stamp(ended_at)}", ".json")
    summary["summary_file"] = str(summary_path)
    write_private(summary_path, dump_json(summary) + "\n")
    target.close()
    journal.close()
    if telemetry is not None:
        telemetry.shutdown()
    if as_json:
        click.echo(dump_json(summary))
    elif mode == "plain":
        output.line(f"summary: {ticks} checks ({failed_ticks} failed), {summary['alerts_total']} alerts; "
                    f"stopped by {stop_reason}; wrote {summary_path}")
    else:
        console.print(f"Session summary: {ticks} checks ({failed_ticks} failed), {summary['alerts_total']} alerts, "
                      f"stopped by {stop_reason}. Wrote {summary_path}")
