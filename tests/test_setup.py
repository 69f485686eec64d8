"""configure() for applications and SubflowInstrumentor for zero-code setups, each in its own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from otel_subflow import names

_MESSAGES = {"/v1/traces": ExportTraceServiceRequest, "/v1/metrics": ExportMetricsServiceRequest,
             "/v1/logs": ExportLogsServiceRequest}


class OtlpSink:
    """A real OTLP/HTTP endpoint on loopback that keeps what it receives, decoded."""

    def __init__(self) -> None:
        self.received: dict[str, list[Any]] = {path: [] for path in _MESSAGES}
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                message = _MESSAGES[self.path]()
                message.ParseFromString(body)
                sink.received[self.path].append(message)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def sink() -> Iterator[OtlpSink]:
    server = OtlpSink()
    yield server
    server.close()


def _attrs(kvs: Any) -> dict[str, Any]:
    out = {}
    for kv in kvs:
        value = kv.value
        out[kv.key] = getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None
    return out


def _python(code: str, env: dict[str, str], cwd: Path | None = None, argv0: list[str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return subprocess.run([*(argv0 or [sys.executable]), "-c", textwrap.dedent(code)], env={**clean, **env},
                          capture_output=True, text=True, timeout=120, cwd=cwd or os.getcwd())


def test_configure_exports_traces_metrics_logs_over_otlp_from_env(redis_server, sink):
    """OTEL_* env only: resource, our spans, the contrib GET span with run ids, metrics (ours and redis-py's), logs."""
    code = f"""
        import redis
        from otel_subflow import configure, shutdown
        from otel_subflow.lab.service import initialize_state, get_state
        configure("svc-configured")
        client = redis.Redis(port={redis_server.port})
        initialize_state(client, "run-cfg", "n1", "v")
        assert get_state(client, "run-cfg", "n1") == b"v"
        assert get_state(client, "run-cfg", "n2") is None
        shutdown()
    """
    done = _python(code, {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.port}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=test",
    })
    assert done.returncode == 0, done.stderr
    spans, resources = [], []
    for request in sink.received["/v1/traces"]:
        for rs in request.resource_spans:
            resources.append(_attrs(rs.resource.attributes))
            for ss in rs.scope_spans:
                spans.extend(ss.spans)
    resource = resources[0]
    assert resource["service.name"] == "svc-configured"
    assert resource["host.name"] and resource["process.pid"] > 0 and resource["service.instance.id"]
    assert resource["deployment.environment.name"] == "test"
    by_name: dict[str, list[Any]] = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)
    assert len(by_name[names.SPAN_STATE_GET]) == 2 and len(by_name[names.SPAN_STATE_INIT]) == 1
    redis_gets = by_name["GET"]
    assert {_attrs(s.attributes)[names.ATTR_RUN_ID] for s in redis_gets} == {"run-cfg"}
    metric_names = {m.name for req in sink.received["/v1/metrics"] for rm in req.resource_metrics
                    for sm in rm.scope_metrics for m in sm.metrics}
    assert {names.METRIC_OPERATION_DURATION, names.METRIC_STATE_MISSING} <= metric_names
    assert any(n.startswith(("db.client", "redis.")) for n in metric_names), metric_names  # redis-py's own
    records = [lr for req in sink.received["/v1/logs"] for rl in req.resource_logs for sl in rl.scope_logs
               for lr in sl.log_records]
    analysis = [lr for lr in records if lr.body.string_value == names.LOG_MISSING_STATE_ANALYSIS]
    assert len(analysis) == 1
    assert analysis[0].trace_id and analysis[0].span_id
    assert _attrs(analysis[0].attributes)[names.ATTR_MISSING_CAUSE] in names.ALL_CAUSES


APP = '''
import json, sys, redis
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
import store  # untouched service code: no decorators in it
s = store.Store(redis.Redis(port=int(sys.argv[1])))
s.initialize_state("run-z", "n", "v")
s.get_state("run-z", "n")
s.get_state("run-z", "gone")
print(json.dumps([[sp.name, dict(sp.attributes)] for sp in exporter.get_finished_spans()]))
'''
STORE = '''
class Store:
    def __init__(self, client):
        self.redis = client

    def initialize_state(self, run_id, node_id, data, ttl_ms=60000):
        return self.redis.set(f"subflow:state:{run_id}:{node_id}", data, px=ttl_ms)

    def get_state(self, run_id, node_id):
        return self.redis.get(f"subflow:state:{run_id}:{node_id}")
'''


def test_instrumentor_under_opentelemetry_instrument_needs_no_code_change(redis_server, tmp_path):
    """opentelemetry-instrument + OTEL_SUBFLOW_INSTRUMENT_*: the undecorated service emits our spans."""
    (tmp_path / "store.py").write_text(STORE)
    (tmp_path / "app.py").write_text(APP)
    instrument = Path(sys.executable).parent / "opentelemetry-instrument"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env = {**clean, "PYTHONPATH": str(tmp_path),
           "OTEL_SUBFLOW_INSTRUMENT_GET": "store:Store.get_state",
           "OTEL_SUBFLOW_INSTRUMENT_INIT": "store:Store.initialize_state",
           "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "redis",
           # this app builds its own tracer provider: no configurator may set one first
           # (tests/test_zero_code.py covers the configurator otel-subflow ships)
           "OTEL_PYTHON_CONFIGURATOR": "the-app-itself",
           "OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none", "OTEL_LOGS_EXPORTER": "none"}
    done = subprocess.run([str(instrument), sys.executable, str(tmp_path / "app.py"), str(redis_server.port)],
                          env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    spans = json.loads(done.stdout.strip().splitlines()[-1])
    ours = [(name, attrs) for name, attrs in spans if name.startswith("subflow.")]
    assert [name for name, _ in ours] == [names.SPAN_STATE_INIT, names.SPAN_STATE_GET, names.SPAN_STATE_GET]
    assert [a[names.ATTR_STATE_OUTCOME] for _, a in ours] == ["created", "hit", "miss"]
    assert all(a[names.ATTR_RUN_ID] == "run-z" for _, a in ours)


def test_instrumentor_wraps_already_imported_and_uninstruments(redis_server, tmp_path):
    """Instrumenting a module that is already imported, then uninstrumenting, restores the original."""
    (tmp_path / "store.py").write_text(STORE)
    code = """
        import store, json
        original = store.Store.get_state
        from otel_subflow import SubflowInstrumentor
        SubflowInstrumentor().instrument(get_targets="store:Store.get_state, bad-target")
        wrapped = store.Store.get_state
        SubflowInstrumentor().uninstrument()  # another reference to the singleton: still undoes it
        print(json.dumps([wrapped is not original, hasattr(wrapped, "__subflow_spec__"),
                          store.Store.get_state is original]))
    """
    done = _python(code, {"PYTHONPATH": str(tmp_path)}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [True, True, True]
