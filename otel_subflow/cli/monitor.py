"""``otel-subflow monitor``: watch the state Redis over time and alert on what loses state.

Every ``--interval`` seconds one check measures PING latency, memory against
maxmemory, keys evicted and state reads that missed in the last minute (from
the global journal, by server time). Alert rules turn figures into alerts
(:mod:`otel_subflow.cli._alerts`) that go to the terminal, optionally to a JSON
lines file, to ``CRITICAL_STATE_ISSUE`` log records and to the
``subflow.monitor.alerts`` counter (:mod:`otel_subflow.cli._session`). The
keyspace watcher runs meanwhile, so tombstones are journalled; its real state
(running, retrying since when and why, off) is shown with the checks and in the
summary (:mod:`otel_subflow.cli._session_watcher`). The live view and the
summary show how the figures, ops/s, the state commands' latency and the misses
by cause moved over the last checks (:mod:`otel_subflow.cli._trends`). At the end
(``--duration``, SIGINT or SIGTERM) a session summary is written and the exit code is 0.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from otel_subflow.cli._alerts import AlertTracker, default_rules
from otel_subflow.cli._common import (
    dump_json,
    make_console,
    open_redis,
    redis_command_options,
    resolve_dir,
    stamped_path,
    write_json,
)
from otel_subflow.cli._sampler import Sampler
from otel_subflow.cli._session import MonitorSession
from otel_subflow.cli._session_watcher import SessionWatcher, summary_line

ALERTS_FILE = "subflow_monitoring_alerts.jsonl"

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
    timeout: float,
    interval: float,
    duration: float | None,
    export_alerts: bool,
    repeat_every: float,
    ping_samples: int,
    watcher: bool,
    enable_keyspace_events: bool,
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
            from otel_subflow._telemetry.setup import configure

            telemetry = configure(service_name=os.environ.get("OTEL_SERVICE_NAME") or "otel-subflow-monitor",
                                  instrument_redis=False, redis_metrics=False)
        console = make_console()
        mode = "quiet" if as_json else ("live" if console.is_terminal else "plain")
        session = MonitorSession(
            target,
            Sampler(target, journal, ping_samples, window_s=60.0),
            AlertTracker(default_rules(**thresholds), repeat_every),
            console,
            mode,
            interval,
            alerts_path=directory / ALERTS_FILE if export_alerts else None,
        )
        session.watcher = (SessionWatcher.start(target, config, enable_keyspace_events, warn=not as_json)
                           if watcher else SessionWatcher.off(target, "disabled by --no-watcher"))
        try:
            session.run(duration)
        finally:
            watcher_info = session.watcher.finish()
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
            f"{summary_line(watcher_info)}; stopped by {summary['stopped_by']}; wrote {summary_path}")
    if mode == "plain":
        session.output.line(f"summary: {text}")
    else:
        console.print(f"Session summary: {text}")
