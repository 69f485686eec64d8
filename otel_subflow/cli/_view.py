"""What the monitor shows: a rich live view on a terminal, plain lines otherwise, nothing with --json.

The keyspace watcher's state is part of it: a ``watcher=<state>`` line whenever it
changes (plain), a ``watcher:`` line under the header (live). The live view also
draws the session's trends (:mod:`otel_subflow.cli._trends`): a sparkline per
figure, and a table of ops/s, the state commands' latency and the misses per check
by cause.
"""

from __future__ import annotations

import collections
import json
import sys
from typing import Any

import click
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from otel_subflow.cli._alerts import RESOLVED, AlertEvent, AlertTracker
from otel_subflow.cli._common import RedisTarget
from otel_subflow.cli._sampler import FIGURES, FigureStats
from otel_subflow.cli._trends import TRENDS, TrendHistory, sparkline


class MonitorOutput:
    """Where alerts and checks go: rich live view on a TTY, plain lines otherwise, nothing with --json."""

    def __init__(self, console: Console, mode: str, target: RedisTarget, tracker: AlertTracker,
                 stats: FigureStats, history: TrendHistory, interval: float) -> None:
        self.console = console
        self.mode = mode  # "live", "plain" or "quiet"
        self.target = target
        self.tracker = tracker
        self.stats = stats
        self.history = history
        self.interval = interval
        self.recent: collections.deque[AlertEvent] = collections.deque(maxlen=8)
        self.live: Live | None = None
        self.ticks = 0
        self.status = "starting"
        self.watcher_state = "starting"
        self.watcher_text = "starting"

    def __enter__(self) -> MonitorOutput:
        if self.mode == "live":
            self.live = Live(self.view(), console=self.console, auto_refresh=False, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.update(self.view(), refresh=True)
            self.live.__exit__(None, None, None)

    def line(self, text: str) -> None:
        if self.mode == "plain":
            click.echo(text)
            sys.stdout.flush()

    def tick(self, stamp: str, figures: dict[str, float | None], error: str | None) -> None:
        self.ticks += 1
        self.status = "down" if error else "ok"
        if self.mode == "plain":
            if error:
                self.line(f"{stamp} tick={self.ticks} status=down error={json.dumps(error)}")
            else:
                parts = " ".join(f"{name}={_fmt(figures.get(name))}" for name in FIGURES)
                self.line(f"{stamp} tick={self.ticks} status=ok {parts} active_alerts={len(self.tracker.active())}")
        elif self.live is not None:
            self.live.update(self.view(error), refresh=True)

    def watcher(self, stamp: str, state: str, *, text: str, changed: bool, since: str | None = None,
                error: str | None = None, errors: int = 0, reason: str | None = None) -> None:
        """The keyspace watcher's state: ``running``, ``retrying`` (since when, why), ``stopped`` or ``off``.

        Plain: a line when it changed. Live: drawn by the next :meth:`tick`.
        """
        self.watcher_state, self.watcher_text = state, text
        if self.mode == "plain" and changed:
            parts = [f"{stamp} watcher={state}"]
            if since is not None and state != "off":
                parts.append(f"since={since}")
            if state == "retrying":
                parts.append(f"errors={errors} error={json.dumps(error)}")
            if reason is not None:
                parts.append(f"reason={json.dumps(reason)}")
            self.line(" ".join(parts))

    def alert(self, event: AlertEvent) -> None:
        self.recent.append(event)
        if self.mode == "plain":
            self.line(f"{event.time} ALERT {event.status.upper()} {event.severity} {event.rule} "
                      f"value={_fmt(event.value)} threshold={event.threshold:g} {event.unit}: {event.message}")

    def view(self, error: str | None = None) -> Group:
        """What the live view draws: header, watcher, figures, trends, alerts."""
        header = (f"[bold]otel-subflow monitor[/] {self.target.masked}  check #{self.ticks} every "
                  f"{self.interval:g} s  status: " + ("[bold red]down[/]" if self.status == "down" else
                                                     f"[green]{self.status}[/]"))
        figures = Table(title="Figures", title_justify="left")
        for column in ("figure", "last", "min", "avg", "max", "alert above"):
            figures.add_column(column)
        summary = self.stats.summary()
        thresholds = {rule.figure: f"{rule.threshold:g} {rule.unit}" for rule in self.tracker.rules}
        for name in FIGURES:
            item = summary[name]
            figures.add_row(name, _fmt(item["last"]), _fmt(item["min"]), _fmt(item["avg"]), _fmt(item["max"]),
                            thresholds.get(name, ""))
        active = self.tracker.active()
        alerts = Table(title=f"Alerts ({len(active)} active: {', '.join(active) or 'none'})", title_justify="left")
        for column in ("time", "status", "severity", "rule", "message"):
            alerts.add_column(column, overflow="fold")
        for event in self.recent:
            style = "green" if event.status == RESOLVED else "red" if event.severity == "critical" else "yellow"
            alerts.add_row(event.time[11:], f"[{style}]{event.status}[/]", event.severity, event.rule, event.message)
        style = {"running": "green", "retrying": "bold red", "off": "yellow"}.get(self.watcher_state, "yellow")
        watcher = Text("keyspace watcher: ")
        watcher.append(self.watcher_text, style=style)
        parts: list[Any] = [header, watcher, figures, self._trends(), alerts]
        if error:
            parts.insert(1, f"[red]{error}[/]")
        return Group(*parts)

    def _spark(self, values: list[float | None] | list[int | None]) -> str:
        return sparkline(values, ascii_only=not self.console.encoding.lower().startswith("utf"))

    def _trends(self) -> Group:
        """One row per series: its sparkline over the window, with its min, max and last value; then the sources."""
        table = Table(title=f"Trends (last {len(self.history)} of {self.history.window} checks)", title_justify="left")
        for column in ("series", "checks", "min", "max", "last"):
            table.add_column(column, no_wrap=True)
        rows: list[tuple[str, list[float | None] | list[int | None]]] = [
            (name, self.history.series(name)) for name in FIGURES]
        rows.extend((trend.label, self.history.series(trend.key)) for trend in TRENDS)
        rows.append(("misses", self.history.misses_series()))
        rows.extend((f"misses {cause}", self.history.cause_series(cause)) for cause in self.history.causes())
        for label, values in rows:
            known = [v for v in values if v is not None]
            table.add_row(label, self._spark(values), _fmt(min(known) if known else None),
                          _fmt(max(known) if known else None), _fmt(values[-1] if values else None))
        sources = Text("one character per check, scaled to the row's min..max, blank: not measured · ops/s, µs/call: "
                       "between checks (INFO stats, commandstats) · p99: INFO latencystats, since the server's stats "
                       "were reset · misses: journalled between checks, by cause", style="dim")
        return Group(table, sources)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)
