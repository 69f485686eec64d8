"""`otel-subflow demo` telemetry in the stack: exported live over OTLP, or replayed later from its OTLP-JSON files.

Both paths end in the same place: Jaeger's HTTP API finds every failed run's
trace by `subflow.run_id`, with the `subflow.state.missing` verdict event that
tail sampling keeps it for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from otel_subflow import names

# The stack fixtures come from tests/e2e/conftest.py (typed there as E2EStack).
E2EStack = Any
Poll = Callable[..., Any]

REPO = Path(__file__).resolve().parents[2]
SERVICE = "subflow-demo"
CLI = [sys.executable, "-m", "otel_subflow.cli"]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any OTEL_* variable (so the demo picks its export from `extra` alone)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env | extra


def run_demo(cwd: Path, env: dict[str, str], *args: str) -> dict[str, Any]:
    done = subprocess.run([*CLI, "demo", "--runs", "8", "--json", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    assert report["failures"] >= 6, report["injected"]  # the default mix, each mode at least once
    return report


def example_runs(report: dict[str, Any]) -> set[str]:
    return {entry["example"]["run_id"] for entry in report["failures_by_cause"].values()}


def verdict_events(trace: dict[str, Any]) -> list[dict[str, Any]]:
    """The `subflow.state.missing` events (Jaeger shows span events as logs) of a trace's spans."""
    events = [{f["key"]: f["value"] for f in log["fields"]} for span in trace["spans"] for log in span["logs"]]
    return [e for e in events if e.get("event") == names.EVENT_STATE_MISSING]


def wait_for_runs_in_jaeger(env: E2EStack, poll_until: Poll, runs: set[str]) -> None:
    """Every run in `runs` has a trace in Jaeger, found by its run id, holding a verdict event."""
    pending = set(runs)

    def found_all() -> bool:
        for run_id in sorted(pending):
            traces = env.jaeger_traces(SERVICE, {names.ATTR_RUN_ID: run_id})
            if any(verdict_events(t) for t in traces):
                pending.discard(run_id)
        return not pending

    poll_until(found_all, timeout=90, interval=1.0, what=f"Jaeger traces with a verdict for runs {pending}")


# -- live: the demo exports to the running stack ------------------------------------------------


def test_demo_exports_to_the_stack_with_a_jaeger_link_per_failed_run(
    e2e: E2EStack, poll_until: Poll, tmp_path: Path
) -> None:
    """With OTEL_EXPORTER_OTLP_ENDPOINT set, every failed run has a Jaeger search URL, and Jaeger has its trace."""
    stack_env = e2e.stack.app_env()
    report = run_demo(tmp_path, clean_env(**stack_env))
    assert report["telemetry"].startswith("exported over OTLP to " + stack_env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert not (tmp_path / "subflow-demo-telemetry").exists()

    links: dict[str, str] = report["jaeger_search"]
    assert len(links) == report["failures"]
    assert example_runs(report) <= set(links)
    jaeger = stack_env["OTEL_SUBFLOW_JAEGER_URL"]
    for run_id, url in links.items():
        # The Jaeger UI's search page: service and URL-encoded JSON tags, nothing left unencoded.
        parts = urllib.parse.urlsplit(url)
        assert f"{parts.scheme}://{parts.netloc}" == jaeger and parts.path == "/search", url
        assert not set(parts.query) & set('{}" '), url
        query = dict(urllib.parse.parse_qsl(parts.query, strict_parsing=True))
        assert query["service"] == SERVICE
        assert json.loads(query["tags"]) == {names.ATTR_RUN_ID: run_id}

    wait_for_runs_in_jaeger(e2e, poll_until, set(links))


# -- later: the demo's OTLP-JSON files replayed into the stack -----------------------------------


def _file_lines(folder: Path, signal: str) -> Iterator[dict[str, Any]]:
    for path in sorted(folder.glob(f"*.{signal}.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                yield json.loads(line)


def _instance_ids(resource: dict[str, Any]) -> set[str]:
    return {
        a["value"]["stringValue"] for a in resource.get("attributes", []) if a["key"] == names.RES_SERVICE_INSTANCE_ID
    }


def test_demo_files_replay_into_the_stack(e2e: E2EStack, poll_until: Poll, tmp_path: Path) -> None:
    """No OTEL_* env: the demo writes OTLP-JSON files; scripts/replay_telemetry.sh loads all three signals later."""
    report = run_demo(tmp_path, clean_env(), "--seed", "23")
    assert report["jaeger_search"] == {}
    folder = tmp_path / "subflow-demo-telemetry"

    # What the files hold: the failed reads' runs (span with the verdict event) and the workers' instance ids.
    missing_runs: set[str] = set()
    instances: set[str] = set()
    for request in _file_lines(folder, "traces"):
        for rs in request["resourceSpans"]:
            instances |= _instance_ids(rs["resource"])
            for ss in rs["scopeSpans"]:
                for span in ss["spans"]:
                    if any(e["name"] == names.EVENT_STATE_MISSING for e in span.get("events", [])):
                        attrs = {a["key"]: a["value"].get("stringValue") for a in span["attributes"]}
                        missing_runs.add(attrs[names.ATTR_RUN_ID])
    assert example_runs(report) <= missing_runs
    assert len(instances) >= 2  # one per worker host

    replay = subprocess.run(
        ["bash", str(REPO / "scripts" / "replay_telemetry.sh"), str(folder), e2e.stack.otlp_http_endpoint],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert replay.returncode == 0, replay.stdout + replay.stderr
    lines = sum(1 for signal in ("traces", "metrics", "logs") for _ in _file_lines(folder, signal))
    assert f"{lines} requests from {folder} sent to {e2e.stack.otlp_http_endpoint}" in replay.stdout

    # Traces: Jaeger finds every failed run by run_id, with its verdict.
    wait_for_runs_in_jaeger(e2e, poll_until, missing_runs)

    # Logs and metrics went through the collector too (the shared stack forwards both to its vendor).
    def verdict_logs() -> set[str]:
        return {
            r["attributes"].get(names.ATTR_RUN_ID)
            for r in e2e.vendor.log_records()
            if r["body"] == names.LOG_MISSING_STATE_ANALYSIS
        } & missing_runs

    poll_until(verdict_logs, timeout=60, what="replayed MISSING_STATE_ANALYSIS logs at the vendor")

    def missing_metric() -> bool:
        points = e2e.vendor.metric_names().get(names.METRIC_STATE_MISSING, [])
        return any(p.get(names.RES_SERVICE_INSTANCE_ID) in instances for p in points)

    poll_until(missing_metric, timeout=60, what=f"replayed {names.METRIC_STATE_MISSING} metric at the vendor")


def test_replay_stops_at_a_refused_request(e2e: E2EStack, tmp_path: Path) -> None:
    """A line the collector refuses (not OTLP) fails the replay, naming the file; so does a missing directory."""
    folder = tmp_path / "telemetry"
    folder.mkdir()
    (folder / "worker-x.traces.jsonl").write_text('{"resourceSpans": "not a list"}\n')
    script = ["bash", str(REPO / "scripts" / "replay_telemetry.sh")]
    refused = subprocess.run([*script, str(folder), e2e.stack.otlp_http_endpoint],
                             capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "refused a request from" in refused.stderr and "worker-x.traces.jsonl" in refused.stderr
    assert "requests from" not in refused.stdout
    missing = subprocess.run([*script, str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=60,
                             check=False)  # fmt: skip
    assert missing.returncode == 2 and "no such directory" in missing.stderr


# -- one story: the report, Prometheus and Jaeger count the same misses by cause ----------------


def jaeger_story(env: E2EStack, service: str, runs: set[str]) -> dict[str, int]:
    """Misses by cause as Jaeger tells it: every verdict event of the runs' traces, corrected by
    every race event (a race span, or an init's in-process race event) naming the previous cause."""
    spans: dict[str, dict[str, Any]] = {}
    for run_id in runs:
        for trace in env.jaeger_traces(service, {names.ATTR_RUN_ID: run_id}):
            for span in trace["spans"]:
                spans[span["spanID"]] = span
    counts: dict[str, int] = {}
    for span in spans.values():
        for log in span["logs"]:
            fields = {f["key"]: f["value"] for f in log["fields"]}
            if fields.get("event") == names.EVENT_STATE_MISSING:
                cause = fields[names.ATTR_MISSING_CAUSE]
                counts[cause] = counts.get(cause, 0) + 1
            elif fields.get("event") == names.EVENT_STATE_RACE:
                previous = fields.get("subflow.race.previous_cause")
                if previous and previous != names.CAUSE_GET_BEFORE_INIT:
                    counts[previous] = counts.get(previous, 0) - 1
                    counts[names.CAUSE_GET_BEFORE_INIT] = counts.get(names.CAUSE_GET_BEFORE_INIT, 0) + 1
    return {cause: n for cause, n in counts.items() if n}


def test_report_prometheus_and_jaeger_count_the_same_misses_by_cause(
    e2e: E2EStack, poll_until: Poll, tmp_path: Path
) -> None:
    """The demo's misses, races among them, through the real collector: the report's counts by final
    cause equal Prometheus's corrected counts (recording rule subflow:state_missing:corrected_total)
    and what Jaeger's traces say once their race spans are applied."""
    service = "subflow-demo-story"
    env = clean_env(**e2e.stack.app_env(), OTEL_SERVICE_NAME=service, OTEL_METRIC_EXPORT_INTERVAL="500",
                    OTEL_BSP_SCHEDULE_DELAY="200")
    done = subprocess.run([*CLI, "demo", "--runs", "14", "--seed", "11", "--json",
                           "--scenario", "cross_worker_race", "--scenario", "never_written",
                           "--scenario", "ttl_too_short", "--scenario", "early_cleanup", "--scenario", "wrong_db"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    expected = {cause: entry["count"] for cause, entry in report["failures_by_cause"].items()}
    assert sum(expected.values()) == report["failures"] == len(report["jaeger_search"])
    assert report["injected"].get("cross_worker_race"), report["injected"]

    query = f'sum by (subflow_missing_cause) (subflow:state_missing:corrected_total{{job="{service}"}})'

    def prometheus() -> dict[str, int] | None:
        got = {r["metric"]["subflow_missing_cause"]: round(float(r["value"][1])) for r in e2e.promql(query)}
        got = {cause: n for cause, n in got.items() if n}
        return got if got == expected else None

    try:
        poll_until(prometheus, timeout=90, interval=1.0, what="Prometheus's corrected counts")
    except AssertionError:
        raw = e2e.promql(f'{{__name__=~"subflow_state_missing.*",job="{service}"}}')
        raise AssertionError(f"report {expected}; Prometheus {raw}") from None

    runs = set(report["jaeger_search"])
    print(f"\nreport by cause {expected}; injected {report['injected']}")

    def jaeger() -> bool:
        return jaeger_story(e2e, service, runs) == expected

    try:
        poll_until(jaeger, timeout=90, interval=1.0, what="Jaeger's corrected counts")
    except AssertionError:
        raise AssertionError(f"report {expected}; Jaeger {jaeger_story(e2e, service, runs)}") from None
