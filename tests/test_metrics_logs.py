"""Metrics and log records of the contract (README, "The contract")."""

from __future__ import annotations

import contextlib
import logging

from otel_subflow import instrument_state_get, names
from tests.service import get_state, initialize_state


def test_duration_histogram_by_operation_and_outcome(r, metric_points):
    """subflow.state.operation.duration counts each call under its operation and outcome."""
    def count(op, outcome):
        return sum(p.count for p in metric_points(names.METRIC_OPERATION_DURATION)
                   if p.attributes == {names.ATTR_STATE_OPERATION: op, names.ATTR_STATE_OUTCOME: outcome})
    hits, misses, creates = count("get", "hit"), count("get", "miss"), count("init", "created")
    initialize_state(r, "run-m", "n", "v")
    for _ in range(3):
        get_state(r, "run-m", "n")
    get_state(r, "run-m", "absent")
    assert count("get", "hit") - hits == 3
    assert count("get", "miss") - misses == 1
    assert count("init", "created") - creates == 1


def test_missing_counter_by_cause(r, metric_points):
    """subflow.state.missing counts misses under subflow.missing.cause."""
    def total():
        return sum(p.value for p in metric_points(names.METRIC_STATE_MISSING))
    before = total()
    get_state(r, "run-mc", "a")
    get_state(r, "run-mc", "b")
    assert total() - before == 2
    for point in metric_points(names.METRIC_STATE_MISSING):
        assert set(point.attributes) == {names.ATTR_MISSING_CAUSE}
        assert point.attributes[names.ATTR_MISSING_CAUSE] in names.ALL_CAUSES


def test_no_metric_carries_a_run_or_node_id(r, all_metrics):
    """No data point of any metric has a run id, node id or key among its attribute values."""
    run_id, node_id = "run-SECRETLY-UNIQUE-77", "node-UNIQUE-88"
    initialize_state(r, run_id, node_id, "v")
    get_state(r, run_id, node_id)
    get_state(r, run_id, "node-UNIQUE-99")
    seen = 0
    for metric in all_metrics():
        for point in metric.data.data_points:
            seen += 1
            for attr, value in point.attributes.items():
                assert attr not in (names.ATTR_RUN_ID, names.ATTR_NODE_ID, names.ATTR_STATE_KEY)
                assert "UNIQUE" not in str(value), (metric.name, attr, value)
    assert seen > 0


def test_log_records_are_structured_and_trace_correlated(r, spans, caplog):
    """STATE_OPERATION_DETAILED (debug) and MISSING_STATE_ANALYSIS (warning) carry ids and fields."""
    caplog.set_level(logging.DEBUG, logger=names.LOGGER_NAME)
    get_state(r, "run-log", "n1")
    span = next(s for s in spans() if s.name == names.SPAN_STATE_GET)
    trace_id = format(span.context.trace_id, "032x")
    span_id = format(span.context.span_id, "016x")
    by_message = {rec.getMessage(): rec for rec in caplog.records if rec.name == names.LOGGER_NAME}
    detailed = by_message[names.LOG_STATE_OPERATION_DETAILED]
    analysis = by_message[names.LOG_MISSING_STATE_ANALYSIS]
    assert detailed.levelno == logging.DEBUG
    assert analysis.levelno == logging.WARNING
    for record in (detailed, analysis):
        assert record.trace_id == trace_id
        assert record.span_id == span_id
        assert getattr(record, names.ATTR_RUN_ID) == "run-log"
        assert getattr(record, names.ATTR_NODE_ID) == "n1"
    assert getattr(analysis, names.ATTR_MISSING_CAUSE) in names.ALL_CAUSES
    assert getattr(detailed, names.ATTR_STATE_OUTCOME) == "miss"


def test_connection_error_logs_critical_state_issue(caplog, spans):
    """A connection error in a state operation is a CRITICAL_STATE_ISSUE record (error level)."""
    import redis

    from otel_subflow.lab.process import free_port

    caplog.set_level(logging.DEBUG, logger=names.LOGGER_NAME)
    dead = redis.Redis(port=free_port(), socket_connect_timeout=0.1, retry=None)
    with contextlib.suppress(redis.ConnectionError):
        get_state(dead, "run-x", "n")
    critical = [rec for rec in caplog.records if rec.getMessage() == names.LOG_CRITICAL_STATE_ISSUE]
    assert len(critical) == 1
    assert critical[0].levelno == logging.ERROR
    assert critical[0].issue == "redis_connection_error"
    assert critical[0].trace_id


def test_internal_errors_are_counted_in_a_metric(r, metric_points, monkeypatch):
    """A failure of ours (here: the user's is_missing predicate raising inside our classification) is
    swallowed in production and counted in subflow.internal.errors by place."""
    from otel_subflow._boundary import ATTR_WHERE

    monkeypatch.delenv("OTEL_SUBFLOW_RAISE_INTERNAL_ERRORS", raising=False)

    def broken(value):
        raise RuntimeError("boom")

    @instrument_state_get(is_missing=broken)
    def get(redis, run_id, node_id):
        return redis.get(f"subflow:state:{run_id}:{node_id}")

    def count() -> int:
        return sum(p.value for p in metric_points(names.METRIC_INTERNAL_ERRORS)
                   if p.attributes.get(ATTR_WHERE) == "decorator.is_missing")

    before = count()
    assert get(r, "run-ie", "n") is None
    assert get(r, "run-ie", "n") is None
    assert count() == before + 2
