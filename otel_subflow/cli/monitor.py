"""``otel-subflow monitor``: watch the state Redis over time and alert on what loses state.

Every ``--interval`` seconds one check measures PING latency, memory against
maxmemory, keys evicted and state reads that missed in the last minute (from
the global journal, by server time). Alert rules turn figures into alerts
(:mod:`otel_subflow.cli._alerts`) that go to the terminal, optionally to a JSON
lines file, to ``CRITICAL_STATE_ISSUE`` log records and to the
``subflow.monitor.alerts`` counter. The keyspace watcher runs meanwhile, so
tombstones are journalled; its real state (running, retrying since when and
why, off) is shown with the checks and in the summary. At the end
(``--duration``, SIGINT or SIGTERM) a session summary is written and the exit
code is 0.
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
from otel_subflow._watcher import KeyspaceWatcher, WatcherStatus
from otel_subflow.cli._alerts import RESOLVED, AlertEvent, AlertTracker, default_rules
from otel_subflow.cli._common import (
    RedisTarget,
    dump_json,
    iso,
    make_console,
    open_redis,
    redis_command_options,
    resolve_dir,
    scrub,
    stamped_path,
    utc_now,
    write_json,
    write_private,
)
from otel_subflow.cli._sampler import FIGURES, FigureStats, Sampler
from otel_subflow.cli._view import MonitorOutput

SCHEMA = "otel-subflow/monitor-summary/v1"
ALERTS_FILE = "subflow_monitoring_alerts.jsonl"
#: Most watcher state changes kept for the summary.
MAX_WATCHER_CHANGES = 100


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

#: The flag that sets each rule's threshold (by the rule's figure); the defaults are the rules' own.
_THRESHOLD_FLAGS = (
    ("--connection-failures", "connection_failures", click.IntRange(1, None),
     "Alert when this many consecutive checks fail to reach Redis."),
    ("--latency-threshold-ms", "latency_ms", click.FloatRange(0.0, None),
     "Alert when the PING latency is above this."),
    ("--memory-threshold-pct", "memory_pct", click.FloatRange(0.0, 100.0),
     "Alert when used memory is above this % of maxmemory."),
    ("--state-failures-per-min", "state_failures_per_min", click.FloatRange(0.0, None),
     "Alert when more state reads than this missed in the last minute (journal)."),
    ("--evictions-per-min", "evictions_per_min", click.FloatRange(0.0, None),
     "Alert when more keys than this were evicted in the last minute."),
)


def _threshold_options(func: Any) -> Any:
    """One option per alert rule; the command gets the values by figure, for :func:`default_rules`."""
    defaults = {rule.figure: rule.threshold for rule in default_rules()}
    for flag, figure, kind, help_text in reversed(_THRESHOLD_FLAGS):
        default = int(defaults[figure]) if isinstance(kind, click.IntRange) else defaults[figure]
        func = click.option(flag, figure, type=kind, default=default, show_default=True, help=help_text)(func)
    return func


def _otel_wanted() -> bool:
    """Export metrics and logs only when OpenTelemetry is configured through the environment."""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    return any(os.environ.get(var) for var in (
        "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "OTEL_METRICS_EXPORTER",
    ))


@click.command("monitor")
@redis_command_options
@click.option("--interval", type=click.FloatRange(0.01, 86_400.0), default=60.0, show_default=True,
              help="Seconds between checks.")
@click.option("--duration", type=click.FloatRange(0.0, None), default=None,
              help="Stop after this many seconds (default: until SIGINT/SIGTERM).")
@click.option("--export-alerts", is_flag=True, help=f"Append alerts as JSON lines to <output-dir>/{ALERTS_FILE}.")
@_threshold_options
@click.option("--repeat-every", type=click.FloatRange(0.0, None), default=300.0, show_default=True,
              help="Seconds between repeats of an alert whose condition still holds.")
@click.option("--ping-samples", type=click.IntRange(1, 100), default=3, show_default=True,
              help="PINGs per check; the median is the latency figure.")
@click.option("--watcher/--no-watcher", default=True, show_default=True,
              help="Run the keyspace watcher (journal tombstones) during the session.")
@click.option("--enable-keyspace-events", is_flag=True,
              help="Let the watcher add the notify-keyspace-events flags it needs (CONFIG SET), keeping those "
                   "already set (also OTEL_SUBFLOW_ENABLE_KEYSPACE_EVENTS=true).")
def monitor(
    redis_url: str,
    as_json: bool,
    output_dir: Path | None,
    interval: float,
    duration: float | None,
    export_alerts: bool,
    repeat_every: float,
    ping_samples: int,
    watcher: bool,
    enable_keyspace_events: bool,
    timeout: float,
    **thresholds: float,
) -> None:
    """Monitor the state Redis and alert on what makes state go missing.

    \b
    Examples:
      otel-subflow monitor --interval 10 --export-alerts
      otel-subflow monitor --interval 5 --duration 600 --latency-threshold-ms 100 --json
    """
    directory = resolve_dir(output_dir)
    with open_redis(redis_url, timeout) as (config, target, journal):
        telemetry = None
        if _otel_wanted():
            from otel_subflow._setup import configure

            telemetry = configure(service_name=os.environ.get("OTEL_SERVICE_NAME") or "otel-subflow-monitor",
                                  instrument_redis=False, redis_metrics=False)
        console = make_console()
        mode = "quiet" if as_json else ("live" if console.is_terminal else "plain")
        session = _Session(
            target,
            Sampler(target, journal, ping_samples, window_s=60.0),
            AlertTracker(default_rules(**thresholds), repeat_every),
            console,
            mode,
            interval,
            alerts_path=directory / ALERTS_FILE if export_alerts else None,
        )
        keyspace_watcher, watcher_info = (
            _start_watcher(target, config, enable_keyspace_events, warn=not as_json) if watcher
            else (None, {"enabled": False, "reason": "disabled by --no-watcher", "state": names.WATCHER_STOPPED})
        )
        session.watcher = keyspace_watcher
        session.watcher_off_reason = None if keyspace_watcher is not None else str(watcher_info["reason"])
        try:
            session.run(duration)
        finally:
            if keyspace_watcher is not None:
                # The state the session ended in, before the monitor stops the watcher itself.
                watcher_info.update(_watcher_fields(keyspace_watcher.status, target))
                keyspace_watcher.stop()
                keyspace_watcher.client.close()
                watcher_info.update(dataclasses.asdict(keyspace_watcher.stats))
            watcher_info["changes"] = session.watcher_changes
            if telemetry is not None:
                telemetry.shutdown()

    summary = session.summary(watcher_info)
    summary_path = stamped_path(directory, "subflow_monitoring_summary", session.ended_at)
    summary["summary_file"] = str(summary_path)
    write_json(summary_path, summary)
    if as_json:
        click.echo(dump_json(summary))
        return
    text = (f"{summary['ticks']} checks ({summary['ticks_failed']} failed), {summary['alerts_total']} alerts; "
            f"{_watcher_summary(watcher_info)}; stopped by {summary['stopped_by']}; wrote {summary_path}")
    if mode == "plain":
        session.output.line(f"summary: {text}")
    else:
        console.print(f"Session summary: {text}")


def _start_watcher(
    target: RedisTarget, config: SubflowConfig, enable_events: bool, *, warn: bool
) -> tuple[KeyspaceWatcher | None, dict[str, Any]]:
    """Start the keyspace watcher on its own connection, after checking the flags it needs.

    Flags off (and not to be enabled): warn and go on without it. Flags that cannot be
    read (CONFIG refused): go on without it, saying why. Otherwise start it; from then
    on it never raises: a refused subscription or a lost connection shows as its state
    (``retrying``) in the output and the summary while it keeps trying.
    """
    watcher = KeyspaceWatcher(
        redis.Redis.from_url(target.url, socket_connect_timeout=target.timeout_s), config=config,
        enable_events=True if enable_events else None,  # None: OTEL_SUBFLOW_ENABLE_KEYSPACE_EVENTS decides
        socket_timeout_s=target.timeout_s,
    )
    try:
        check = watcher.check_events()
    except (redis.RedisError, OSError) as exc:
        watcher.client.close()
        reason = f"cannot check notify-keyspace-events: {target.describe_error(exc)}"
        return None, {"enabled": False, "reason": reason, "state": names.WATCHER_STOPPED}
    if not check.ok and not watcher.enable_events:
        watcher.client.close()
        if warn:
            click.echo(f"warning: keyspace watcher not started: {check.describe()} "
                       f"(or use --enable-keyspace-events)", err=True)
        return None, {"enabled": False, "reason": check.describe(), "state": names.WATCHER_STOPPED}
    watcher.start(wait_s=target.timeout_s)
    return watcher, {"enabled": True, "reason": None}


def _watcher_summary(info: dict[str, Any]) -> str:
    """The watcher in the summary line: ``watcher running``, ``watcher retrying (...)`` or ``watcher off (...)``."""
    if not info.get("enabled"):
        return f"watcher off ({info.get('reason')})"
    text = f"watcher {info.get('state')}"
    if info.get("errors"):
        text += f" ({info['errors']} errors, last {info.get('last_error_type')} at {info.get('last_error_at')})"
    return text


def _watcher_fields(status: WatcherStatus, target: RedisTarget) -> dict[str, Any]:
    """The watcher's status for the summary, secrets scrubbed; ``reason`` says why it is not running."""
    fields = status.as_dict()
    for name in ("last_error", "events_note"):
        if fields[name] is not None:
            fields[name] = scrub(fields[name], target.secrets)
    fields["reason"] = None if status.state == names.WATCHER_RUNNING else scrub(status.describe(), target.secrets)
    return fields


class _Session:
    """The check loop: sample, evaluate the rules, emit alerts, wait (with backoff while Redis is away)."""

    def __init__(self, target: RedisTarget, sampler: Sampler, tracker: AlertTracker, console: Any, mode: str,
                 interval: float, *, alerts_path: Path | None) -> None:
        self.target = target
        self.sampler = sampler
        self.tracker = tracker
        self.interval = interval
        self.alerts_path = alerts_path
        self.stats = FigureStats()
        self.output = MonitorOutput(console, mode, target, tracker, self.stats, interval)
        self.counter = metrics.get_meter(names.INSTRUMENTATION_NAME, __version__).create_counter(
            names.METRIC_MONITOR_ALERTS, unit="{alert}", description="Alerts raised by otel-subflow monitor, by rule."
        )
        self.ticks = self.ok_ticks = self.failed_ticks = self.consecutive_failures = 0
        self.outages: list[dict[str, Any]] = []
        self.down_since: str | None = None
        self.watcher: KeyspaceWatcher | None = None
        self.watcher_off_reason: str | None = None
        self.watcher_changes: list[dict[str, Any]] = []
        self._watcher_key: tuple[str, str | None] | None = None
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
        else:
            self.ok_ticks += 1
            if self.down_since is not None:
                self.outages.append({"from": self.down_since, "to": stamp,
                                     "failed_checks": self.consecutive_failures})
                self.down_since = None
            self.consecutive_failures = 0
            figures = {"connection_failures": 0.0, **{name: getattr(sample, name) for name in FIGURES}}
            self.stats.add(figures)
        for event in self.tracker.evaluate(figures, time.monotonic(), stamp):
            self.emit(event)
        self.check_watcher(stamp)  # first, so that the live view the tick draws has the watcher's state
        self.output.tick(stamp, figures, error)
        return error is None

    def check_watcher(self, stamp: str) -> None:
        """Show the watcher's state with each check; a change is a line of its own and is kept for the summary."""
        if self.watcher is None:
            if self._watcher_key is None:
                self._watcher_key = ("off", None)
                self.output.watcher(stamp, "off", text=f"off: {self.watcher_off_reason}",
                                    reason=self.watcher_off_reason, changed=True)
            return
        status = self.watcher.status
        retrying = status.state == names.WATCHER_RETRYING
        error = scrub(status.last_error, self.target.secrets) if retrying and status.last_error else None
        since = status.as_dict()["since"]
        key = (status.state, status.last_error_type if retrying else None)
        changed = key != self._watcher_key
        self._watcher_key = key
        if changed and len(self.watcher_changes) < MAX_WATCHER_CHANGES:
            self.watcher_changes.append({"time": stamp, "state": status.state, "since": since, "error": error})
        self.output.watcher(stamp, status.state, text=scrub(status.describe(), self.target.secrets), since=since,
                            error=error, errors=status.consecutive_errors, changed=changed)

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
            "watcher": watcher_info,
            "alerts_file": str(self.alerts_path) if self.alerts_path is not None else None,
            "summary_file": None,
        }
