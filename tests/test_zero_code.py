"""Zero-code, as a user gets it: ``pip install otel-subflow`` into a fresh venv, then
``opentelemetry-instrument`` with the README's variables, and nothing else.

The service below has no OpenTelemetry code at all, and its state functions do not
follow our defaults (another key layout, the client in ``self.db``, an empty dict
for "missing"): the per-function options of ``OTEL_SUBFLOW_INSTRUMENT_*`` say so.
Spans must reach a real OTLP/HTTP endpoint, ours and the Redis command spans, and
those carry the run and node ids.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from otel_subflow import names
from otel_subflow._instrument.instrumentor import decorator_options, parse_targets
from tests.cli_helpers import wait_for
from tests.test_setup import OtlpSink, _attrs, sink  # noqa: F401 - the fixture

ROOT = Path(__file__).resolve().parent.parent

STORE = '''
import json

class Store:
    def __init__(self, db):
        self.db = db

    def save(self, run, step, payload, ttl_ms=60000):
        return self.db.set(f"wf:{run}/{step}", json.dumps(payload), px=ttl_ms)

    def load(self, run, step):
        raw = self.db.get(f"wf:{run}/{step}")
        return json.loads(raw) if raw else {}
'''

APP = '''
import sys
import redis
import store
s = store.Store(redis.Redis(port=int(sys.argv[1])))
s.save("run-zc", "a", {"x": 1})
assert s.load("run-zc", "a") == {"x": 1}
assert s.load("run-zc", "gone") == {}
'''

OPTIONS = "key=wf:{run}/{step};run_id=run;node_id=step;client=self.db"
GET = f"store:Store.load[{OPTIONS};missing=empty]"
INIT = f"store:Store.save[{OPTIONS};ttl_ms=ttl_ms]"


def test_target_options_parse_into_decorator_options():
    (target,) = parse_targets(GET)
    module, path, options = target
    assert (module, path) == ("store", ["Store", "load"])
    assert options == {"key": "wf:{run}/{step}", "run_id": "run", "node_id": "step", "client": "self.db",
                       "missing": "empty"}
    kwargs = decorator_options(options, names.OPERATION_GET)
    assert kwargs["key"] == "wf:{run}/{step}" and kwargs["run_id"] == "run"
    assert kwargs["client"]({"self": type("S", (), {"db": "the-client"})()}) == "the-client"
    assert kwargs["is_missing"]({}) and kwargs["is_missing"](None) and not kwargs["is_missing"]({"x": 1})
    # several targets, commas inside brackets, bad ones left out with a warning
    many = parse_targets("a:f[key=k:{x},{y}], b:g, c:h[nope=1], d:i[missing=sometimes], e")
    assert [(m, p) for m, p, _ in many] == [("a", ["f"]), ("b", ["g"])]
    assert many[0][2] == {"key": "k:{x},{y}"}


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with nothing but ``pip install <this checkout>`` (no extras, no distro), next to the
    newest OpenTelemetry SDK and Redis instrumentation pip can find: the ranges must let them in."""
    venv = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--upgrade", "--upgrade-strategy", "eager",
                          str(ROOT), "opentelemetry-sdk", "opentelemetry-instrumentation-redis"],
                         capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr[-3000:]
    versions = subprocess.run([str(venv / "bin" / "pip"), "list", "--format", "freeze"], capture_output=True,
                              text=True, timeout=120).stdout
    print("\nfresh venv:", " ".join(line for line in versions.split() if line.startswith(("opentelemetry-sdk",
                                                                                        "opentelemetry-instr"))))
    return venv


@pytest.mark.slow
def test_demo_without_the_demo_extra_says_what_to_install(fresh_venv, tmp_path):
    """No OTLP endpoint and no file exporter installed: one clear line and exit 2, not a traceback."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_") and k != "PYTHONPATH"}
    done = subprocess.run([str(fresh_venv / "bin" / "otel-subflow"), "demo", "--runs", "1"], env=clean,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "pip install 'otel-subflow[demo]'" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_opentelemetry_instrument_after_a_plain_install_exports_spans(fresh_venv, redis_server, sink, tmp_path):  # noqa: F811
    (tmp_path / "store.py").write_text(STORE)
    (tmp_path / "app.py").write_text(APP)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_") and k != "PYTHONPATH"}
    env = {**clean, "PYTHONPATH": str(tmp_path), "OTEL_SERVICE_NAME": "zero-code",
           "OTEL_SUBFLOW_INSTRUMENT_GET": GET, "OTEL_SUBFLOW_INSTRUMENT_INIT": INIT,
           "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
           "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.port}",
           "OTEL_METRICS_EXPORTER": "none", "OTEL_LOGS_EXPORTER": "none", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    done = subprocess.run([str(fresh_venv / "bin" / "opentelemetry-instrument"), str(fresh_venv / "bin" / "python"),
                           str(tmp_path / "app.py"), str(redis_server.port)],
                          env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    wait_for(lambda: sink.received["/v1/traces"], 10.0)
    spans = [(span.name, _attrs(span.attributes))
             for request in sink.received["/v1/traces"] for rs in request.resource_spans
             for ss in rs.scope_spans for span in ss.spans]
    ours = [(name, attrs) for name, attrs in spans if name.startswith("subflow.state.")]
    assert [name for name, _ in ours] == [names.SPAN_STATE_INIT, names.SPAN_STATE_GET, names.SPAN_STATE_GET], spans
    assert [a[names.ATTR_STATE_OUTCOME] for _, a in ours] == ["created", "hit", "miss"]
    assert [a[names.ATTR_STATE_KEY] for _, a in ours] == ["wf:run-zc/a", "wf:run-zc/a", "wf:run-zc/gone"]
    assert all(a[names.ATTR_RUN_ID] == "run-zc" for _, a in ours)
    # The Redis command spans (opentelemetry-instrumentation-redis) carry the run and node ids.
    commands = [(name, attrs) for name, attrs in spans
                if attrs.get("db.system.name", attrs.get("db.system")) == "redis"]
    assert {name.split()[0] for name, _ in commands} >= {"SET", "GET"}, [n for n, _ in spans]
    assert all(a.get(names.ATTR_RUN_ID) == "run-zc" for _, a in commands), commands
    assert {a.get(names.ATTR_NODE_ID) for _, a in commands} >= {"a", "gone"}
