"""A service decorated with otel_subflow, through the bundled collector, into Jaeger, Prometheus and the vendor."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from otel_subflow import names

# Stack fixtures come from tests/e2e/conftest.py (E2EStack there).
E2EStack = Any
Poll = Callable[..., Any]

SERVICE = "e2e-decorated"


def tags_of(span: dict[str, Any]) -> dict[str, Any]:
    return {t["key"]: t["value"] for t in span["tags"]}


@pytest.fixture(scope="module")
def service_run(e2e: E2EStack) -> dict[str, Any]:
    """One run of tests/e2e/decorated_service.py: 6 hits, 2 never-written misses, 1 expired."""
    result: dict[str, Any] = e2e.run_script(
        "decorated_service.py", "--prefix=dec", "--hit=6", "--never-written=2", "--expired=1", service=SERVICE
    )
    return result


def find_miss_trace(e2e: E2EStack, poll_until: Poll, tag: str, value: str) -> dict[str, Any]:
    def search() -> list[dict[str, Any]]:
        traces: list[dict[str, Any]] = e2e.jaeger_traces(SERVICE, {tag: value, names.ATTR_STATE_OUTCOME: "miss"})
        return traces

    traces: list[dict[str, Any]] = poll_until(search, timeout=60, what=f"Jaeger trace with {tag}={value}")
    assert len(traces) == 1, [t["traceID"] for t in traces]
    return traces[0]


def test_jaeger_finds_the_miss_by_run_id_and_by_node_id(
    e2e: E2EStack, service_run: dict[str, Any], poll_until: Poll
) -> None:
    """Jaeger's tag search finds the failed read by subflow.run_id and by subflow.node_id: the same trace."""
    for run_id, node_id in service_run["never_written"]:
        by_run = find_miss_trace(e2e, poll_until, names.ATTR_RUN_ID, run_id)
        by_node = find_miss_trace(e2e, poll_until, names.ATTR_NODE_ID, node_id)
        assert by_run["traceID"] == by_node["traceID"]


def test_miss_span_carries_host_connection_and_verdict(
    e2e: E2EStack, service_run: dict[str, Any], poll_until: Poll
) -> None:
    """The get span has the connection attributes, the resource has the host, the event has the verdict."""
    run_id, node_id = service_run["never_written"][0]
    trace = find_miss_trace(e2e, poll_until, names.ATTR_RUN_ID, run_id)
    gets = [s for s in trace["spans"] if s["operationName"] == names.SPAN_STATE_GET]
    assert len(gets) == 1
    span = gets[0]
    tags = tags_of(span)
    assert tags[names.ATTR_RUN_ID] == run_id
    assert tags[names.ATTR_NODE_ID] == node_id
    assert tags[names.ATTR_STATE_KEY] == f"subflow:state:{run_id}:{node_id}"
    assert tags[names.ATTR_STATE_OUTCOME] == names.OUTCOME_MISS
    assert tags[names.ATTR_SERVER_ADDRESS] == "127.0.0.1"
    assert tags[names.ATTR_SERVER_PORT] == service_run["redis_port"]
    assert tags[names.ATTR_DB_SYSTEM_NAME] == names.DB_SYSTEM_REDIS
    assert names.ATTR_REDIS_CLIENT_ID in tags
    assert names.ATTR_REDIS_SERVER_RUN_ID in tags
    assert tags["otel.status_code"] == "ERROR"

    process = {t["key"]: t["value"] for t in trace["processes"][span["processID"]]["tags"]}
    assert process[names.RES_HOST_NAME] == service_run["host"]
    assert process[names.RES_PROCESS_PID] == service_run["pid"]
    assert process[names.RES_SERVICE_INSTANCE_ID]
    assert process["subflow.collector"] == "otel-subflow", "resource enrichment by the collector"

    events = [{f["key"]: f["value"] for f in log["fields"]} for log in span["logs"]]
    verdicts = [e for e in events if e.get("event") == names.EVENT_STATE_MISSING]
    assert len(verdicts) == 1
    verdict = verdicts[0]
    assert verdict[names.ATTR_MISSING_CAUSE] == names.CAUSE_NEVER_WRITTEN
    assert verdict[names.ATTR_MISSING_CONFIDENCE] in {names.CONFIDENCE_DEFINITIVE, names.CONFIDENCE_PROBABLE}
    assert verdict[names.ATTR_MISSING_SUMMARY]

    # Redis command spans nested in the decorated scope carry the run too (one-span tag search).
    children = [s for s in trace["spans"] if s["spanID"] != span["spanID"]]
    assert children, "the redis GET span from opentelemetry-instrumentation-redis"
    assert all(tags_of(c).get(names.ATTR_RUN_ID) == run_id for c in children)


def test_expired_state_verdict_survives_sampling(e2e: E2EStack, service_run: dict[str, Any], poll_until: Poll) -> None:
    """A read after the TTL ran out is kept by tail sampling with cause `expired`."""
    run_id, _node = service_run["expired"][0]
    trace = find_miss_trace(e2e, poll_until, names.ATTR_RUN_ID, run_id)
    causes = [
        f["value"]
        for s in trace["spans"]
        for log in s["logs"]
        for f in log["fields"]
        if f["key"] == names.ATTR_MISSING_CAUSE
    ]
    assert causes == [names.CAUSE_EXPIRED], [log["fields"] for s in trace["spans"] for log in s["logs"]]


def test_prometheus_answers_for_the_decorated_metrics(
    e2e: E2EStack, service_run: dict[str, Any], poll_until: Poll
) -> None:
    """Operation and miss metrics from the package, and span_metrics RED metrics, in PromQL."""
    job = f'job="{SERVICE}"'
    ops = f"subflow_state_operation_duration_seconds_count{{{job}"
    expected = {
        f'sum({ops},subflow_state_operation="get",subflow_state_outcome="hit"}})': 6,
        f'sum({ops},subflow_state_operation="get",subflow_state_outcome="miss"}})': 3,
        f'sum({ops},subflow_state_operation="init",subflow_state_outcome="created"}})': 9,
        f'sum(subflow_state_missing_total{{{job},subflow_missing_cause="never_written"}})': 2,
        f'sum(subflow_state_missing_total{{{job},subflow_missing_cause="expired"}})': 1,
        f'sum(subflow_spans_calls_total{{{job},span_name="subflow.state.get",subflow_state_outcome="miss"}})': 3,
        f'sum(subflow_spans_calls_total{{{job},span_name="subflow.state.init"}})': 9,
    }  # fmt: skip
    for query, value in expected.items():
        poll_until(
            lambda q=query, v=value: (r := e2e.promql(q)) and float(r[0]["value"][1]) == v,
            timeout=60,
            what=f"{query} == {value}",
        )
    # p99 over the whole (one-shot) run: the histogram's cumulative buckets, no rate().
    p99 = e2e.promql(
        f"histogram_quantile(0.99, sum by (le) (subflow_state_operation_duration_seconds_bucket{{{job}}}))"
    )
    assert p99 and 0 < float(p99[0]["value"][1]) < 0.5, p99
    labels = {k for s in e2e.promql(f"{{{job}}}") for k in s["metric"]}
    assert not {"subflow_run_id", "subflow_node_id", "subflow_state_key"} & labels


def test_vendor_receives_the_decorated_miss_with_the_auth_header(
    e2e: E2EStack, service_run: dict[str, Any], poll_until: Poll
) -> None:
    """Through the overlay, the vendor gets the miss span (verdict included) with the Authorization header."""
    run_id, _node = service_run["never_written"][1]

    def spans() -> list[Any]:
        return [
            s
            for s in e2e.vendor.spans()
            if s.name == names.SPAN_STATE_GET and s.attributes.get(names.ATTR_RUN_ID) == run_id
        ]

    found = poll_until(spans, timeout=60, what=f"vendor span for {run_id}")
    assert found[0].attributes["vendor.received.authorization"] == f"Bearer {e2e.vendor.api_key}"
    assert names.EVENT_STATE_MISSING in [e for e, _ in found[0].events]
    assert found[0].resource[names.RES_HOST_NAME] == service_run["host"]


def test_vendor_receives_the_trace_correlated_verdict_log(
    e2e: E2EStack, service_run: dict[str, Any], poll_until: Poll
) -> None:
    """The MISSING_STATE_ANALYSIS record goes app -> collector logs pipeline -> vendor, tied to the miss trace."""
    run_id, _node = service_run["never_written"][0]
    trace = find_miss_trace(e2e, poll_until, names.ATTR_RUN_ID, run_id)

    def records() -> list[dict[str, Any]]:
        return [
            r
            for r in e2e.vendor.log_records()
            if r["body"] == names.LOG_MISSING_STATE_ANALYSIS and r["attributes"].get(names.ATTR_RUN_ID) == run_id
        ]

    found = poll_until(records, timeout=60, what=f"verdict log for {run_id} at the vendor")
    assert len(found) == 1
    record = found[0]
    assert record["trace_id"] == trace["traceID"]
    assert record["attributes"][names.ATTR_MISSING_CAUSE] == names.CAUSE_NEVER_WRITTEN
    assert record["attributes"]["vendor.received.authorization"] == f"Bearer {e2e.vendor.api_key}"
    assert record["resource"][names.RES_SERVICE_NAME] == SERVICE
