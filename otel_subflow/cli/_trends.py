"""The monitor's trends: a bounded history of its checks, and the sparklines the live view draws of it.

Each check adds one point to every series: the figures the alerts watch, the
server's commands per second, the latency the server reports for the state
commands, and the misses journalled since the previous check, by cause. A failed
check adds a gap. Only the last :data:`WINDOW` checks are kept, so a session of
weeks holds as much as one of an hour.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import Any

from otel_subflow import names
from otel_subflow.cli._sampler import FIGURES, NOT_READ, OTHER_CAUSE, RATE_LIMITED, STATE_COMMANDS, Sample

#: Checks kept. One sparkline character per check: 60 fit beside the labels and numbers on a
#: 120-column terminal, and at the default ``--interval`` of 60 s they are the last hour.
WINDOW = 60
#: The levels of a sparkline, lowest first; :data:`ASCII_LEVELS` where the terminal has no unicode.
BLOCKS = "▁▂▃▄▅▆▇█"
ASCII_LEVELS = "_.-:=+*#"
#: A check that measured nothing (Redis down, no earlier counters, no calls).
GAP = " "


@dataclasses.dataclass(frozen=True)
class Trend:
    """A series of the trends table: its key (in the summary), its label and what it measures."""

    key: str
    label: str
    source: str


#: The series of the trends table besides the misses (the figures have theirs in the figures table).
TRENDS = (
    Trend("ops_per_s", "ops/s", "commands the server processed per second since the previous check "
          "(INFO total_commands_processed; the monitor's own few per check included)"),
    *(Trend(f"latency_p99_us_{command}", f"{command.upper()} p99 µs",
            f"the server's p99 of {command.upper()} (INFO latencystats: since its stats were reset, not per check)")
      for command in STATE_COMMANDS),
    Trend("state_usec_per_call", "/".join(c.upper() for c in STATE_COMMANDS) + " µs/call",
          "mean server time per state command call since the previous check (INFO commandstats)"),
)
SERIES = (*FIGURES, *(trend.key for trend in TRENDS))
#: The misses' own rows, after the causes of the verdicts.
_EXTRA_CAUSES = (OTHER_CAUSE, RATE_LIMITED, NOT_READ)


@dataclasses.dataclass(frozen=True)
class Check:
    """One check in the history: when, its values by series, its misses by cause (``None``: not counted)."""

    time: str
    values: dict[str, float | None]
    misses: dict[str, int] | None


def trend_values(figures: dict[str, float | None], sample: Sample | None) -> dict[str, float | None]:
    """The values of every series for one check (``sample`` ``None``: the check failed)."""
    if sample is None:
        return {}
    values: dict[str, float | None] = {name: figures.get(name) for name in FIGURES}
    values["ops_per_s"] = sample.ops_per_s
    for command in STATE_COMMANDS:
        values[f"latency_p99_us_{command}"] = sample.latency_p99_us.get(command)
    values["state_usec_per_call"] = sample.state_usec_per_call
    return values


class TrendHistory:
    """The last ``window`` checks (the oldest dropped first)."""

    def __init__(self, window: int = WINDOW) -> None:
        self.window = window
        self.checks: collections.deque[Check] = collections.deque(maxlen=window)

    def __len__(self) -> int:
        return len(self.checks)

    def add(self, stamp: str, figures: dict[str, float | None], sample: Sample | None) -> None:
        self.checks.append(Check(stamp, trend_values(figures, sample),
                                 dict(sample.misses_by_cause) if sample and sample.misses_by_cause is not None
                                 else None))

    def series(self, key: str) -> list[float | None]:
        return [check.values.get(key) for check in self.checks]

    def causes(self) -> list[str]:
        """The causes with a miss in the window: the verdicts' order, then the misses without one."""
        seen = {cause for check in self.checks for cause, n in (check.misses or {}).items() if n}
        return [cause for cause in (*names.ALL_CAUSES, *_EXTRA_CAUSES) if cause in seen]

    def cause_series(self, cause: str) -> list[int | None]:
        return [None if check.misses is None else check.misses.get(cause, 0) for check in self.checks]

    def misses_series(self) -> list[int | None]:
        """All misses per check."""
        return [None if check.misses is None else sum(check.misses.values()) for check in self.checks]

    def as_dict(self) -> dict[str, Any]:
        """The ``trends`` of the session summary (docs/cli.md)."""
        return {
            "window": self.window,
            "checks": len(self.checks),
            "times": [check.time for check in self.checks],
            "series": {key: self.series(key) for key in SERIES},
            "misses": self.misses_series(),
            "misses_by_cause": {cause: self.cause_series(cause) for cause in self.causes()},
        }


def sparkline(values: Sequence[float | None], *, ascii_only: bool = False) -> str:
    """One character per value, scaled to the values' min and max (all equal: the lowest); ``None`` a gap."""
    levels = ASCII_LEVELS if ascii_only else BLOCKS
    known = [v for v in values if v is not None]
    if not known:
        return GAP * len(values)
    low, high = min(known), max(known)
    span = high - low
    top = len(levels) - 1
    return "".join(GAP if v is None else levels[round((v - low) / span * top) if span else 0] for v in values)
