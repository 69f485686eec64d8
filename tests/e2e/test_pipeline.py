"""The collector pipeline end to end with contract-shaped telemetry from the bare OTel SDK.

These prove the plumbing (sampling, span metrics, Prometheus, vendor fan-out,
failure isolation) independently of the otel_subflow decorators, which
test_decorated_service.py drives through the same stack.
"""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The stack fixtures come from tests/e2e/conftest.py (typed there as E2EStack);
# importing conftest by name is fragile across pytest import modes.
E2EStack = Any

REPO = Path(__file__).resolve().parents[2]
Poll = Callable[..., Any]

DECIDED = "otelcol_processor_tail_sampling_global_count_traces_sampled"
PENDING = "otelcol_processor_tail_sampling_sampling_traces_on_memory"


def run_ids_in_jaeger(env: E2EStack, service: str) -> set[str]:
    runs: set[str] = set()
    for trace in env.jaeger_traces(service):
        for span in trace["spans"]:
            for tag in span["tags"]:
                if tag["key"] == "subflow.run_id":
                    runs.add(tag["value"])
    return runs


def emit(env: E2EStack, service: str, prefix: str, **counts: int) -> dict[str, Any]:
    args = [f"--prefix={prefix}"] + [f"--{k.replace('_', '-')}={v}" for k, v in counts.items()]
    result: dict[str, Any] = env.run_script("emit_raw.py", *args, service=service)
    return result


def wait_decided(env: E2EStack, poll_until: Poll, before: float, count: int) -> None:
    """Tail sampling has decided on `count` more traces than `before` and holds none pending (its own counters)."""
    poll_until(
        lambda: env.collector_self_metric(DECIDED) >= before + count and env.collector_self_metric(PENDING) == 0,
        timeout=60,
        what=f"tail sampling decisions on {count} traces",
    )


def test_tail_sampling_keeps_missing_and_error_traces_and_a_share_of_the_rest(e2e: E2EStack, poll_until: Poll) -> None:
    """Every missing-state and error trace reaches Jaeger; of 40 successes some, not all, do (25%).

    quiet_missing traces (verdict event, status UNSET) prove the span-event
    policy on its own, apart from the status_code policy.
    """
    service = "e2e-sampling"
    before = e2e.collector_self_metric(DECIDED)
    out = emit(e2e, service, "samp", success=40, missing=3, quiet_missing=3, error=2)
    wait_decided(e2e, poll_until, before, 48)
    must = set(out["missing"]) | set(out["quiet_missing"]) | set(out["error"])
    found = poll_until(
        lambda: (r := run_ids_in_jaeger(e2e, service)) >= must and r,
        timeout=60,
        what="missing and error traces in Jaeger",
    )
    kept = found & set(out["success"])
    # Binomial(40, 0.25): P(0 kept) ~ 1e-5, P(>= 25 kept) ~ 1e-7.
    assert 0 < len(kept) < 25, f"{len(kept)} of 40 success traces kept"


def test_span_metrics_and_app_metrics_answer_promql(e2e: E2EStack, poll_until: Poll) -> None:
    """Prometheus, scraping the collector, answers PromQL for RED, operation and miss metrics."""
    service = "e2e-metrics"
    emit(e2e, service, "met", success=5, missing=2)
    calls = f'subflow_spans_calls_total{{job="{service}",span_name="subflow.state.get"'
    queries = {
        f'sum({calls},subflow_state_outcome="miss"}})': 2,
        f'sum({calls},subflow_state_outcome="hit"}})': 5,
        f'sum(subflow_state_missing_total{{job="{service}",subflow_missing_cause="expired"}})': 2,
        f'sum(subflow_state_operation_duration_seconds_count{{job="{service}",subflow_state_operation="get"}})': 7,
    }
    for query, expected in queries.items():
        poll_until(
            lambda q=query, e=expected: (r := e2e.promql(q)) and float(r[0]["value"][1]) == e,
            timeout=60,
            what=f"{query} == {expected}",
        )
    # Never a run or node id as a label, on any series this service produced.
    series = e2e.promql(f'{{job="{service}"}}')
    assert series
    labels = {k for s in series for k in s["metric"]}
    assert not {"subflow_run_id", "subflow_node_id", "subflow_state_key"} & labels
    # The e2e.step spans are not counted by span_metrics (only the two state spans are).
    assert not e2e.promql(f'subflow_spans_calls_total{{job="{service}",span_name="e2e.step"}}')


def test_redis_receiver_metrics_reach_prometheus(e2e: E2EStack, poll_until: Poll) -> None:
    """The redis receiver reads the e2e Redis; its metrics carry the server address and port."""
    port = str(e2e.redis.port)
    for metric in ("redis_uptime_seconds_total", "redis_memory_used_bytes", "redis_maxmemory_bytes",
                   "redis_keys_evicted_total"):  # fmt: skip
        poll_until(
            lambda m=metric: e2e.promql(f'{m}{{server_address="127.0.0.1",server_port="{port}"}}'),
            timeout=60,
            what=f"{metric} for the e2e Redis",
        )
    maxmemory = e2e.promql(f'redis_maxmemory_bytes{{server_port="{port}"}}')
    assert float(maxmemory[0]["value"][1]) == 256 * 1024 * 1024


def test_alert_rules_evaluate_against_live_metrics(e2e: E2EStack, poll_until: Poll) -> None:
    """Prometheus loaded all rules (the alerts and the corrected-counts recording rule) and evaluates
    them without error."""

    def rules() -> list[dict[str, Any]] | None:
        data = json.load(urllib.request.urlopen(f"{e2e.stack.urls['prometheus']}/api/v1/rules", timeout=5))
        found = [r for g in data["data"]["groups"] for r in g["rules"]]
        return found if found and all(r.get("lastEvaluation", "").startswith("2") for r in found) else None

    evaluated = poll_until(rules, timeout=30, what="rules evaluated")
    assert {r["name"] for r in evaluated} == {
        "SubflowStateFailuresHigh", "SubflowStateLatencyHigh", "RedisEvictionsHigh",
        "RedisMemoryNearMax", "RedisDown", "RedisMetricsAbsent", "subflow:state_missing:corrected_total",
    }  # fmt: skip
    assert all(r["health"] == "ok" for r in evaluated), [(r["name"], r.get("lastError")) for r in evaluated]
    # Redis is up and scraped: the scraped-points counter RedisDown watches is growing.
    poll_until(
        lambda: (
            (r := e2e.promql('increase(otelcol_scraper_scraped_metric_points{receiver="redis"}[30s])'))
            and float(r[0]["value"][1]) > 0
        ),
        timeout=60,
        what="redis scraped points growing",
    )


def test_grafana_panel_queries_answer(e2e: E2EStack, poll_until: Poll) -> None:
    """Each dashboard panel's PromQL runs on Prometheus and the state panels return data."""
    service = "e2e-grafana"
    emit(e2e, service, "graf", success=3, missing=1)
    dash = json.loads((REPO / "collector" / "grafana" / "dashboards" / "subflow-state.json").read_text())
    for panel in dash["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "1m").replace('"$job"', f'"{service}"')
            if panel["title"].startswith("Redis"):
                assert isinstance(e2e.promql(expr), list)
                continue
            poll_until(lambda x=expr: e2e.promql(x), timeout=60, what=f"panel {panel['title']!r}: {expr}")


def test_vendor_receives_traces_and_metrics_with_the_auth_header(e2e: E2EStack, poll_until: Poll) -> None:
    """The overlay's OTLP/HTTP exporter delivers both signals with `Authorization: Bearer <key>`."""
    service = "e2e-vendor"
    out = emit(e2e, service, "vend", missing=2)
    want = set(out["missing"])

    def vendor_spans() -> list[Any]:
        spans = [s for s in e2e.vendor.spans() if s.attributes.get("subflow.run_id") in want]
        return spans if {s.attributes["subflow.run_id"] for s in spans} == want else []

    spans = poll_until(vendor_spans, timeout=60, what="vendor traces")
    expected_auth = f"Bearer {e2e.vendor.api_key}"
    assert {s.attributes["vendor.received.authorization"] for s in spans} == {expected_auth}
    # Tail sampling ran before the vendor too: the verdict event is there, and resource enrichment.
    assert all(("subflow.state.missing" in [e for e, _ in s.events]) for s in spans)
    assert {s.resource.get("subflow.collector") for s in spans} == {"otel-subflow"}

    def vendor_metrics() -> list[dict[str, Any]]:
        names = e2e.vendor.metric_names()
        points = [
            p
            for name in ("subflow.state.missing", "subflow.spans.calls")
            for p in names.get(name, [])
            if p.get("service.name") == service
        ]
        have = {n for n in ("subflow.state.missing", "subflow.spans.calls") if any(
            p.get("service.name") == service for p in names.get(n, []))}  # fmt: skip
        return points if have == {"subflow.state.missing", "subflow.spans.calls"} else []

    points = poll_until(vendor_metrics, timeout=60, what="vendor metrics (app + span_metrics)")
    assert {p["vendor.received.authorization"] for p in points} == {expected_auth}


def test_vendor_key_is_in_no_file(e2e: E2EStack) -> None:
    """The key reached the vendor only through the environment: no config or repo file holds it."""
    key = e2e.vendor.api_key
    assert key.startswith("e2e-") and len(key) > 20
    roots = [REPO / "collector", REPO / "docker-compose.yml", REPO / "docker-compose.vendor.yml", e2e.stack.workdir]
    for root in roots:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for path in files:
            if path.suffix == ".log" or "prometheus-data" in path.parts:
                continue
            assert key not in path.read_text(errors="replace"), path
    # Nor any command line (visible to every user through /proc): it travels in the environment.
    for name in ("collector", "jaeger", "prometheus"):
        pid = e2e.stack._components[name].process.pid
        assert key not in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")


def _wait_runs(env: E2EStack, poll_until: Poll, service: str, want: set[str], where: str) -> None:
    if where == "jaeger":
        poll_until(lambda: run_ids_in_jaeger(env, service) >= want, timeout=90, what=f"{sorted(want)} in Jaeger")
    else:
        poll_until(
            lambda: {s.attributes.get("subflow.run_id") for s in env.vendor.spans()} >= want,
            timeout=90,
            what=f"{sorted(want)} at the vendor",
        )


def test_jaeger_down_loses_nothing_for_the_vendor_and_prometheus(fresh_e2e: E2EStack, poll_until: Poll) -> None:
    """With Jaeger stopped the vendor and Prometheus still get everything, and the app is not slowed."""
    env = fresh_e2e
    service = "e2e-jaeger-down"
    baseline = emit(env, service, "up", success=3)
    _wait_runs(env, poll_until, service, set(baseline["success"]), "jaeger")

    env.stack.stop_component("jaeger")
    during = emit(env, service, "down", success=5, missing=2)
    _wait_runs(env, poll_until, service, set(during["success"]) | set(during["missing"]), "vendor")
    poll_until(
        lambda: (
            (r := env.promql(f'sum(subflow_state_missing_total{{job="{service}"}})')) and float(r[0]["value"][1]) == 2
        ),
        timeout=60,
        what="miss counter in Prometheus while Jaeger is down",
    )
    # The app talks to the collector only; Jaeger being down costs it nothing.
    assert during["_elapsed_s"] < baseline["_elapsed_s"] + 5, (baseline["_elapsed_s"], during["_elapsed_s"])

    # Back up: the exporter's bounded retry queue delivers what waited.
    env.stack.start_component("jaeger")
    after = emit(env, service, "after", success=2)
    _wait_runs(env, poll_until, service, set(after["success"]) | set(during["missing"]), "jaeger")


def test_vendor_down_loses_nothing_for_jaeger_and_prometheus(fresh_e2e: E2EStack, poll_until: Poll) -> None:
    """With the vendor stopped Jaeger and Prometheus still get everything; the vendor catches up after."""
    env = fresh_e2e
    service = "e2e-vendor-down"
    env.vendor.managed.stop()
    during = emit(env, service, "vdown", success=4, missing=2)
    want = set(during["success"]) | set(during["missing"])
    _wait_runs(env, poll_until, service, want, "jaeger")
    poll_until(
        lambda: (
            (r := env.promql(f'sum(subflow_spans_calls_total{{job="{service}"}})')) and float(r[0]["value"][1]) == 6
        ),
        timeout=60,
        what="span metrics in Prometheus while the vendor is down",
    )
    env.vendor.managed.start()
    _wait_runs(env, poll_until, service, want, "vendor")


def test_shipped_defaults_are_not_the_test_settings() -> None:
    """Tests shorten the intervals through env; the file keeps production defaults."""
    text = (REPO / "collector" / "otelcol.yaml").read_text()
    assert re.search(r"\$\{env:OTEL_SUBFLOW_DECISION_WAIT:-10s\}", text)
    assert re.search(r"\$\{env:OTEL_SUBFLOW_SPANMETRICS_FLUSH:-15s\}", text)
