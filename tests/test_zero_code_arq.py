"""``opentelemetry-instrument`` with arq installed and no other code change: arq's result spans, with verdicts.

A fresh venv with ``pip install <this checkout>[arq]`` (pip picks the arq its ranges allow next to redis 8)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from otel_subflow import names
from tests.cli_helpers import wait_for
from tests.test_setup import OtlpSink, _attrs, sink  # noqa: F401 - the fixture

ROOT = Path(__file__).resolve().parent.parent

APP = '''
import asyncio, sys
from arq.connections import RedisSettings, create_pool
from arq.jobs import Job
from arq.worker import Worker, func

async def add(ctx, a, b):
    return a + b

async def main(port):
    pool = await create_pool(RedisSettings(port=port))
    await pool.enqueue_job("add", 1, 2, _job_id="zc-job")
    worker = Worker(functions=[func(add, name="add")], redis_pool=pool, burst=True, poll_delay=0.01,
                    handle_signals=False)
    await worker.main()
    assert (await Job("zc-job", pool).result_info()).result == 3
    assert await Job("zc-gone", pool).result_info() is None
    await worker.close()

asyncio.run(main(int(sys.argv[1])))
'''


@pytest.mark.slow
def test_opentelemetry_instrument_with_arq_installed(redis_server, r, sink, tmp_path):  # noqa: F811
    venv = tmp_path / "v"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", f"{ROOT}[arq]", "opentelemetry-sdk"],
                         capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr[-3000:]
    (tmp_path / "app.py").write_text(APP)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_") and k != "PYTHONPATH"}
    env = {**clean, "OTEL_SERVICE_NAME": "zero-code-arq", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
           "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.port}", "OTEL_SUBFLOW_WATCH": "false",
           "OTEL_METRICS_EXPORTER": "none", "OTEL_LOGS_EXPORTER": "none", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    done = subprocess.run([str(venv / "bin" / "opentelemetry-instrument"), str(venv / "bin" / "python"),
                           str(tmp_path / "app.py"), str(redis_server.port)],
                          env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    wait_for(lambda: len(sink.received["/v1/traces"]) > 0, 10.0)
    spans = [(span, _attrs(span.attributes)) for request in sink.received["/v1/traces"]
             for rs in request.resource_spans for ss in rs.scope_spans for span in ss.spans]
    ours = [(span.name, attrs) for span, attrs in spans if span.name.startswith("subflow.state.")]
    assert [(n, a[names.ATTR_STATE_KEY], a[names.ATTR_STATE_OUTCOME]) for n, a in ours] == [
        (names.SPAN_STATE_INIT, "arq:result:zc-job", "created"),
        (names.SPAN_STATE_GET, "arq:result:zc-job", "hit"),
        (names.SPAN_STATE_GET, "arq:result:zc-gone", "miss"),
    ], ours
    (miss,) = [span for span, a in spans if a.get(names.ATTR_STATE_KEY) == "arq:result:zc-gone"]
    causes = [_attrs(e.attributes)[names.ATTR_MISSING_CAUSE] for e in miss.events
              if e.name == names.EVENT_STATE_MISSING]
    assert causes == [names.CAUSE_NEVER_WRITTEN]
