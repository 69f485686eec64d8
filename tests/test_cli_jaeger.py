"""``diagnose --export-traces --jaeger-url``: traces of runs with misses, from Jaeger's HTTP API.

Once against a tiny local stub (to see the exact queries), once against the real
Jaeger v2 binary (scripts/build_binaries.sh) run by ``otel_subflow.stack``.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from otel_subflow import flush_journals, names
from otel_subflow._journal import store
from otel_subflow.lab.process import free_port
from otel_subflow.lab.servers import RedisServer
from otel_subflow.stack import LocalStack, StackError, StackPorts
from tests.cli_helpers import invoke, wait_for
from tests.service import get_state


class _StubJaeger(BaseHTTPRequestHandler):
    queries: list[dict[str, str]] = []

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        params = dict(urllib.parse.parse_qsl(url.query))
        if url.path == "/api/services":
            body: dict[str, Any] = {"data": ["svc-a", "svc-b"]}
        elif url.path == "/api/traces":
            self.queries.append(params)
            run_id = json.loads(params["tags"])[names.ATTR_RUN_ID]
            traces = [{"traceID": f"{params['service']}-{run_id}", "spans": [{"operationName": "subflow.state.get"}]}]
            body = {"data": traces if params["service"] == "svc-a" else []}
        else:
            self.send_error(404)
            return
        payload = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def stub_jaeger() -> Iterator[str]:
    _StubJaeger.queries = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StubJaeger)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def seed_misses(r: redis.Redis, runs: list[str]) -> None:
    for run in runs:
        assert get_state(r, run, "n1") is None
    flush_journals()


def test_export_queries_jaeger_per_run_and_service(r: redis.Redis, redis_server: RedisServer, stub_jaeger: str,
                                                   tmp_path: Path) -> None:
    """One /api/traces query per run with a miss and per service, tags={"subflow.run_id": run}, in microseconds."""
    seed_misses(r, ["run-j1", "run-j2"])
    first_ms = store.read_run(r, "run-j1")[0].op_ms
    out = tmp_path / "export.json"
    result = invoke("diagnose", "--export-traces", "--output", str(out), "--sample-interval", "0",
                    "--jaeger-url", stub_jaeger + "/", "--redis-url", redis_server.url())
    assert result.exit_code == 1, result.stderr  # persistence off on the test server
    assert "Jaeger: 2 traces fetched for 2 runs" in result.stdout
    document = json.loads(out.read_text())
    section = document["sections"]["jaeger"]
    assert section["service"] is None
    assert set(section["runs"]) == {"run-j1", "run-j2"}
    for run in ("run-j1", "run-j2"):
        assert section["runs"][run]["error"] is None
        assert [t["traceID"] for t in section["runs"][run]["traces"]] == [f"svc-a-{run}"]
    queries = sorted(_StubJaeger.queries, key=lambda q: (q["tags"], q["service"]))
    assert [(json.loads(q["tags"]), q["service"]) for q in queries] == [
        ({names.ATTR_RUN_ID: "run-j1"}, "svc-a"), ({names.ATTR_RUN_ID: "run-j1"}, "svc-b"),
        ({names.ATTR_RUN_ID: "run-j2"}, "svc-a"), ({names.ATTR_RUN_ID: "run-j2"}, "svc-b"),
    ]
    now_us = time.time() * 1_000_000
    for query in queries:
        start, end = int(query["start"]), int(query["end"])
        assert start <= first_ms * 1000 < end <= now_us
        assert query["limit"] == "20"
    # Timelines link each trace id to the Jaeger UI.
    run = next(run for run in document["sections"]["runs_with_misses"] if run["run_id"] == "run-j1")
    miss = next(row for row in run["timeline"] if row["op"] == "miss")
    assert miss["jaeger_url"] == f"{stub_jaeger}/trace/{miss['trace_id']}"


def test_export_with_a_named_service_and_jaeger_down(r: redis.Redis, redis_server: RedisServer,
                                                     stub_jaeger: str, tmp_path: Path) -> None:
    seed_misses(r, ["run-j3"])
    invoke("diagnose", "--export-traces", "--output-dir", str(tmp_path / "a"), "--sample-interval", "0",
           "--jaeger-url", stub_jaeger, "--jaeger-service", "svc-a", "--redis-url", redis_server.url())
    assert [q["service"] for q in _StubJaeger.queries] == ["svc-a"]
    # Jaeger unreachable: the export is still written, the error is in it and one warning line is printed.
    down = f"http://127.0.0.1:{free_port()}"
    result = invoke("diagnose", "--export-traces", "--output-dir", str(tmp_path / "b"), "--sample-interval", "0",
                    "--jaeger-url", down, "--redis-url", redis_server.url())
    assert result.exit_code == 1
    assert result.stderr.startswith("warning: Jaeger at http://127.0.0.1:") and result.stderr.count("\n") == 1
    (path,) = (tmp_path / "b").iterdir()
    run = json.loads(path.read_text())["sections"]["jaeger"]["runs"]["run-j3"]
    assert run["trace_count"] == 0 and "Jaeger at" in run["error"]


@pytest.fixture(scope="module")
def jaeger() -> Iterator[LocalStack]:
    """The real Jaeger v2, built from Go modules, as a local process (memory storage)."""
    try:
        stack = LocalStack(ports=StackPorts.free(), components=("jaeger",))
    except StackError as exc:
        if os.environ.get("OTEL_SUBFLOW_ALLOW_SKIP") == "1" and not os.environ.get("CI"):
            pytest.skip(str(exc))
        pytest.fail(f"{exc} (scripts/build_binaries.sh jaeger; OTEL_SUBFLOW_ALLOW_SKIP=1 skips)")
    with stack:
        yield stack


def test_export_fetches_the_run_from_a_real_jaeger(r: redis.Redis, redis_server: RedisServer,
                                                   jaeger: LocalStack, tmp_path: Path) -> None:
    """A span tagged with the run id goes to Jaeger over OTLP; the export finds it by that tag."""
    run = f"run-real-{int(time.time() * 1000)}"
    provider = TracerProvider(resource=Resource.create({"service.name": "cli-jaeger-test"}))
    exporter = OTLPSpanExporter(endpoint=f"127.0.0.1:{jaeger.ports.jaeger_otlp_grpc}", insecure=True)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("test").start_as_current_span(
        names.SPAN_STATE_GET, attributes={names.ATTR_RUN_ID: run, names.ATTR_NODE_ID: "n1"}
    ) as span:
        trace_id = format(span.get_span_context().trace_id, "032x")
    provider.shutdown()
    base = jaeger.urls["jaeger"]

    def indexed() -> bool:
        query = urllib.parse.urlencode({"service": "cli-jaeger-test", "tags": json.dumps({names.ATTR_RUN_ID: run})})
        with urllib.request.urlopen(f"{base}/api/traces?{query}", timeout=2) as response:
            return any(t["traceID"] == trace_id for t in json.load(response)["data"] or [])

    wait_for(indexed, 30, 0.25)
    seed_misses(r, [run])
    out = tmp_path / "real.json"
    result = invoke("diagnose", "--export-traces", "--output", str(out), "--sample-interval", "0",
                    "--jaeger-url", base, "--redis-url", redis_server.url())
    assert result.exit_code == 1, result.stderr
    fetched = json.loads(out.read_text())["sections"]["jaeger"]["runs"][run]
    assert fetched["error"] is None
    assert [t["traceID"] for t in fetched["traces"]] == [trace_id]
    (span_json,) = fetched["traces"][0]["spans"]
    assert span_json["operationName"] == names.SPAN_STATE_GET
    tags = {tag["key"]: tag["value"] for tag in span_json["tags"]}
    assert tags[names.ATTR_RUN_ID] == run
