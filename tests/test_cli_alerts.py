"""Monitor alert rules and the no-storm state machine, on exact values (no Redis needed)."""

from __future__ import annotations

import pytest

from otel_subflow import names
from otel_subflow.cli._alerts import FIRING, REPEAT, RESOLVED, AlertTracker, default_rules

FIGURE_OF = {
    names.ALERT_RULE_CONNECTION: ("connection_failures", 1.0),
    names.ALERT_RULE_LATENCY: ("latency_ms", 500.0),
    names.ALERT_RULE_MEMORY: ("memory_pct", 80.0),
    names.ALERT_RULE_STATE_FAILURES: ("state_failures_per_min", 10.0),
    names.ALERT_RULE_EVICTIONS: ("evictions_per_min", 50.0),
}


def test_default_thresholds_match_the_issue() -> None:
    """Defaults: a connection failure, 500 ms, 80 %, 10 misses/min, 50 evictions/min."""
    rules = {rule.name: rule for rule in default_rules()}
    assert {name: (rule.figure, rule.threshold) for name, rule in rules.items()} == FIGURE_OF


@pytest.mark.parametrize("rule", [r for r in FIGURE_OF if r != names.ALERT_RULE_CONNECTION])
def test_threshold_rules_fire_above_and_not_at_or_below(rule: str) -> None:
    """'latency > 500 ms' etc.: the threshold itself does not fire, the next step above does."""
    figure, threshold = FIGURE_OF[rule]
    for value, fires in ((threshold - 1, False), (threshold, False), (threshold + 0.001, True)):
        tracker = AlertTracker(default_rules(), repeat_s=60)
        events = tracker.evaluate({figure: value}, 0.0, "t")
        assert [(e.rule, e.status) for e in events] == ([(rule, FIRING)] if fires else []), value


def test_connection_rule_fires_at_its_count_of_consecutive_failures() -> None:
    """--connection-failures N: N consecutive failures fire, N-1 do not."""
    tracker = AlertTracker(default_rules(connection_failures=3), repeat_s=60)
    assert tracker.evaluate({"connection_failures": 2.0}, 0.0, "t") == []
    (event,) = tracker.evaluate({"connection_failures": 3.0}, 1.0, "t")
    assert (event.rule, event.status, event.severity, event.value, event.threshold) == (
        names.ALERT_RULE_CONNECTION, FIRING, "critical", 3.0, 3.0)


def test_alert_repeats_only_at_the_cadence_and_resolves_once() -> None:
    """No storm: one firing, repeats every repeat_s while it holds, one resolved, then silence."""
    tracker = AlertTracker(default_rules(), repeat_s=10)
    seen = []
    for second in range(0, 31):
        for event in tracker.evaluate({"latency_ms": 900.0}, float(second), str(second)):
            seen.append((second, event.status))
    assert seen == [(0, FIRING), (10, REPEAT), (20, REPEAT), (30, REPEAT)]
    assert tracker.active() == [names.ALERT_RULE_LATENCY]
    resolved = tracker.evaluate({"latency_ms": 1.0}, 31.0, "31")
    assert [e.status for e in resolved] == [RESOLVED]
    assert tracker.evaluate({"latency_ms": 1.0}, 50.0, "50") == []
    assert tracker.counts[names.ALERT_RULE_LATENCY] == {FIRING: 1, REPEAT: 3, RESOLVED: 1}


def test_unmeasured_figure_keeps_the_alert_state() -> None:
    """Redis down: no memory figure; the memory alert neither resolves nor repeats early."""
    tracker = AlertTracker(default_rules(), repeat_s=100)
    tracker.evaluate({"memory_pct": 95.0}, 0.0, "0")
    assert tracker.evaluate({"connection_failures": 1.0}, 5.0, "5")[0].rule == names.ALERT_RULE_CONNECTION
    assert tracker.active() == [names.ALERT_RULE_CONNECTION, names.ALERT_RULE_MEMORY]
    assert [e.status for e in tracker.evaluate({"memory_pct": 10.0, "connection_failures": 0.0}, 6.0, "6")] == [
        RESOLVED, RESOLVED]
