"""Monitor alert rules and the state machine that keeps them from storming.

An alert *fires* when its condition starts to hold, *repeats* at most every
``repeat_s`` while it keeps holding, and is *resolved* once when it stops.
A figure that could not be measured (``None``, e.g. Redis is down) changes
nothing: an active alert stays active, an inactive one stays quiet.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from otel_subflow import names

FIRING = "firing"
REPEAT = "repeat"
RESOLVED = "resolved"


@dataclasses.dataclass(frozen=True)
class Rule:
    """A threshold on one figure. ``at_least``: value >= threshold fires; otherwise value > threshold."""

    name: str
    figure: str
    severity: str
    threshold: float
    unit: str
    description: str
    at_least: bool = False

    def holds(self, value: float) -> bool:
        return value >= self.threshold if self.at_least else value > self.threshold

    def comparator(self) -> str:
        return ">=" if self.at_least else ">"


@dataclasses.dataclass
class AlertEvent:
    """One alert notification (what goes to the terminal, the JSONL file, the log and the metric)."""

    time: str
    rule: str
    severity: str
    status: str
    value: float | None
    threshold: float
    unit: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: The monitor's rules at their default thresholds (``default_rules`` and the monitor's flags read them).
_RULES = (
    Rule(names.ALERT_RULE_CONNECTION, "connection_failures", "critical", 1.0,
         "failures", "consecutive failed checks of Redis", at_least=True),
    Rule(names.ALERT_RULE_LATENCY, "latency_ms", "warning", 500.0, "ms", "PING latency (median of a check)"),
    Rule(names.ALERT_RULE_MEMORY, "memory_pct", "warning", 80.0, "%", "used_memory / maxmemory"),
    Rule(names.ALERT_RULE_STATE_FAILURES, "state_failures_per_min", "critical", 10.0,
         "misses/min", "state reads that missed, journalled in the last minute (server time)"),
    Rule(names.ALERT_RULE_EVICTIONS, "evictions_per_min", "critical", 50.0,
         "keys/min", "keys evicted in the last minute"),
)


def default_rules(**thresholds: float) -> list[Rule]:
    """The monitor's rules; ``thresholds`` (by figure, e.g. ``latency_ms=100``) replace their defaults."""
    unknown = set(thresholds) - {rule.figure for rule in _RULES}
    if unknown:
        raise TypeError(f"no rule on {', '.join(sorted(unknown))}")
    return [dataclasses.replace(rule, threshold=float(thresholds.get(rule.figure, rule.threshold))) for rule in _RULES]


@dataclasses.dataclass
class _State:
    active: bool = False
    last_emit_s: float = 0.0
    fired_at_s: float = 0.0


class AlertTracker:
    """Turns figures into alert events, with no duplicate storms."""

    def __init__(self, rules: list[Rule], repeat_s: float) -> None:
        self.rules = rules
        self.repeat_s = repeat_s
        self._state = {rule.name: _State() for rule in rules}
        self.counts: dict[str, dict[str, int]] = {rule.name: {FIRING: 0, REPEAT: 0, RESOLVED: 0} for rule in rules}

    def active(self) -> list[str]:
        return [name for name, state in self._state.items() if state.active]

    def evaluate(self, figures: Mapping[str, float | None], now_s: float, stamp: str) -> list[AlertEvent]:
        events: list[AlertEvent] = []
        for rule in self.rules:
            value = figures.get(rule.figure)
            if value is None:
                continue
            state = self._state[rule.name]
            holds = rule.holds(value)
            status: str | None = None
            if holds and not state.active:
                status = FIRING
                state.active, state.fired_at_s = True, now_s
            elif holds and now_s - state.last_emit_s >= self.repeat_s:
                status = REPEAT
            elif not holds and state.active:
                status = RESOLVED
                state.active = False
            if status is None:
                continue
            state.last_emit_s = now_s
            self.counts[rule.name][status] += 1
            if status == RESOLVED:
                message = f"{rule.description}: {value:g} {rule.unit}, back within {rule.threshold:g}"
            else:
                message = f"{rule.description}: {value:g} {rule.unit} {rule.comparator()} {rule.threshold:g}"
            events.append(AlertEvent(stamp, rule.name, rule.severity, status, value, rule.threshold, rule.unit,
                                     message))
        return events
